from pathlib import Path

import pytest
import torch
from conftest import load_golden, take_gpu_code_paths

from reinseg.build import build_segmentor
from reinseg.checkpoints import segmentor_from_checkpoint
from reinseg.cli import main
from reinseg.config import ConfigError
from reinseg.official import from_official
from reinseg.official_config import read_official_config


@pytest.fixture(scope="module")
def golden():
    return load_golden("official_segmentor_tiny.pt")


@pytest.fixture(scope="module")
def segmentor(golden):
    return from_official(golden["model_config"], golden["release_state_dict"], golden["backbone_state_dict"]).eval()


def max_error(a, b):
    return (a - b).abs().max().item()


# Each also on the GPU's code paths (taken on the CPU), which the official numerics would not
# otherwise pin: the deformable attention through grid_sample, the plain mask products.
GPU_CODE_PATHS = pytest.mark.parametrize("gpu_code_paths", [False, True])


@pytest.fixture
def code_paths(gpu_code_paths, monkeypatch):
    if gpu_code_paths:
        take_gpu_code_paths(monkeypatch)


@GPU_CODE_PATHS
def test_per_layer_head_outputs_match_the_official_code(golden, segmentor, code_paths):
    with torch.no_grad():
        class_logits, mask_logits = segmentor(golden["crop_input"])
    assert len(class_logits) == len(golden["crop_class_logits_per_layer"]) == 10
    for ours, theirs in zip(class_logits, golden["crop_class_logits_per_layer"], strict=False):
        assert max_error(ours, theirs) <= 1e-4
    for ours, theirs in zip(mask_logits, golden["crop_mask_logits_per_layer"], strict=False):
        assert max_error(ours, theirs) <= 1e-4


@GPU_CODE_PATHS
def test_whole_image_logits_match_the_official_code(golden, segmentor, code_paths):
    assert max_error(segmentor.predict(golden["crop_input"], mode="whole"), golden["crop_seg_logits"]) <= 1e-4


@GPU_CODE_PATHS
def test_sliding_window_logits_match_the_official_code(golden, segmentor, code_paths):
    assert segmentor.test_mode == "slide" and segmentor.crop_size == tuple(golden["slide_crop"])
    assert segmentor.stride == tuple(golden["slide_stride"])
    assert max_error(segmentor.predict(golden["slide_input"]), golden["slide_seg_logits"]) <= 1e-4


def write_release(golden, tmp_path, release=None, config=None):
    release = golden["release_state_dict"] if release is None else release
    # Released files hold the weights under state_dict next to framework objects.
    torch.save({"state_dict": release, "meta": {"iter": 40000, "seed": 42}}, tmp_path / "release.pth")
    torch.save(golden["backbone_state_dict"], tmp_path / "dinov2_converted.pth")
    (tmp_path / "config.py").write_text(f"model = {config or golden['model_config']!r}\n")
    return [
        "convert-official",
        "--config",
        str(tmp_path / "config.py"),
        "--checkpoint",
        str(tmp_path / "release.pth"),
        "--backbone",
        str(tmp_path / "dinov2_converted.pth"),
        "--output",
        str(tmp_path / "out"),
    ]


def test_convert_official_round_trip(golden, tmp_path, capsys):
    assert main(write_release(golden, tmp_path)) == 0
    assert (tmp_path / "out" / "config.yaml").is_file() and (tmp_path / "out" / "checkpoint.pt").is_file()
    segmentor, payload = segmentor_from_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert not any(k.startswith("backbone.vit.") for k in payload["state_dict"])  # referenced, not copied
    segmentor.eval()
    assert max_error(segmentor.predict(golden["slide_input"]), golden["slide_seg_logits"]) <= 1e-4


def full_release(golden):
    """A release holding the VFM weights too, as the official ``generate_full_weights.py`` writes it."""
    return {**golden["release_state_dict"], **{f"backbone.{k}": v for k, v in golden["backbone_state_dict"].items()}}


def without_backbone(argv):
    return argv[: argv.index("--backbone")] + argv[argv.index("--backbone") + 2 :]


def test_a_conversion_killed_midway_leaves_the_earlier_one_whole(golden, tmp_path, monkeypatch):
    """A conversion into an earlier one's folder wrote its files there one by one: a kill after
    the backbone file left the new backbone beside the old checkpoint and config (refused only
    when used). Now they are staged inside the folder and renamed in at the end; the next
    conversion removes a killed one's staging folder. Other files are never touched."""
    import reinseg.official as official

    assert main(without_backbone(write_release(golden, tmp_path, release=full_release(golden)))) == 0
    out = tmp_path / "out"
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(before) == ["backbone.safetensors", "checkpoint.pt", "config.yaml", "notes.txt"]
    assert str(out.resolve() / "backbone.safetensors") in before["config.yaml"].decode()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(official, "save_checkpoint", killed)
    config = dict(golden["model_config"], test_cfg=dict(mode="whole"))  # another conversion, other VFM weights
    other = {k: v + 1 if k.startswith("backbone.") else v for k, v in full_release(golden).items()}
    argv_other = write_release(golden, tmp_path, release=other, config=config)
    with pytest.raises(KeyboardInterrupt):
        official.convert_official(tmp_path / "config.py", tmp_path / "release.pth", None, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    assert main(without_backbone(argv_other)) == 0
    assert "mode: whole" in (out / "config.yaml").read_text()
    assert (out / "backbone.safetensors").read_bytes() != before["backbone.safetensors"]
    assert sorted(p.name for p in out.iterdir()) == sorted(before)  # no staging folder left


def test_a_killed_conversions_staging_folder_is_removed_by_the_next(golden, tmp_path):
    from conftest import killed_writers_leftover

    out = tmp_path / "out"
    out.mkdir()
    leftover = killed_writers_leftover(out, "config.yaml", is_folder=True)
    assert main(write_release(golden, tmp_path)) == 0
    assert not leftover.exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.yaml"]


def test_a_conversion_keeps_the_backbone_file_of_an_earlier_one(golden, tmp_path):
    """A conversion that references its backbone elsewhere leaves an earlier conversion's
    ``backbone.safetensors`` in the folder: another config may reference it (here, its own)."""
    out = tmp_path / "out"
    assert main(without_backbone(write_release(golden, tmp_path, release=full_release(golden)))) == 0
    argv = write_release(golden, tmp_path)  # a release without the VFM's weights
    argv[argv.index("--backbone") + 1] = str(out / "backbone.safetensors")  # the earlier conversion's file
    assert main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["backbone.safetensors", "checkpoint.pt", "config.yaml"]
    segmentor, _ = segmentor_from_checkpoint(out / "checkpoint.pt")
    assert max_error(segmentor.eval().predict(golden["slide_input"]), golden["slide_seg_logits"]) <= 1e-4


def test_a_conversion_writes_through_links_and_stops_whole_at_a_link_to_nowhere(golden, tmp_path):
    """A file moved elsewhere (another disk) and linked back is written through the link, the
    link kept; a link into a missing folder stops the conversion before any file is replaced
    (the renames happened one by one: the backbone was replaced, then the checkpoint failed)."""
    import os

    assert main(without_backbone(write_release(golden, tmp_path, release=full_release(golden)))) == 0
    out = tmp_path / "out"
    elsewhere = Path("/dev/shm") if Path("/dev/shm").is_dir() else tmp_path  # another file system where there is one
    moved = elsewhere / f"reinseg-test-{os.getpid()}.pt"
    try:
        moved.write_bytes((out / "checkpoint.pt").read_bytes())
        (out / "checkpoint.pt").unlink()
        (out / "checkpoint.pt").symlink_to(moved)
        config = dict(golden["model_config"], test_cfg=dict(mode="whole"))
        assert main(without_backbone(write_release(golden, tmp_path, release=full_release(golden), config=config))) == 0
        assert (out / "checkpoint.pt").is_symlink() and "mode: whole" in (out / "config.yaml").read_text()
        assert segmentor_from_checkpoint(out / "checkpoint.pt")[1]["config"]["model"]["test"]["mode"] == "whole"
        assert sorted(p.name for p in moved.parent.glob(f".{moved.name}.*")) == []  # no temporary left there

        (out / "checkpoint.pt").unlink()
        (out / "checkpoint.pt").symlink_to(tmp_path / "missing" / "checkpoint.pt")
        before = {p.name: p.read_bytes() for p in out.iterdir() if not p.is_symlink()}
        other = {k: v + 1 if k.startswith("backbone.") else v for k, v in full_release(golden).items()}
        assert main(without_backbone(write_release(golden, tmp_path, release=other))) == 2
        assert {p.name: p.read_bytes() for p in out.iterdir() if not p.is_symlink()} == before
        assert sorted(p.name for p in out.iterdir()) == ["backbone.safetensors", "checkpoint.pt", "config.yaml"]
    finally:
        moved.unlink(missing_ok=True)


def test_release_keys_that_do_not_fit_are_named(golden, tmp_path, capsys):
    release = dict(golden["release_state_dict"])
    del release["decode_head.querys2feat.weight"]
    release["decode_head.query_feat.weight"] = torch.zeros(10, 32)
    assert main(write_release(golden, tmp_path, release=release)) == 2
    err = capsys.readouterr().err
    assert "missing keys (1): decode_head.querys2feat.weight" in err
    assert "unexpected keys (1): decode_head.query_feat.weight" in err
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_class_count_mismatch(golden):
    config = dict(golden["model_config"], decode_head=dict(golden["model_config"]["decode_head"], num_classes=18))
    config["decode_head"]["loss_cls"] = dict(config["decode_head"]["loss_cls"], class_weight=[1.0] * 18 + [0.1])
    with pytest.raises(ValueError, match=r"class count mismatch: the config has 18 classes .* has 19"):
        from_official(config, golden["release_state_dict"], golden["backbone_state_dict"])


def test_crop_size_not_divisible_by_the_patch_size(golden):
    config = dict(golden["model_config"], test_cfg=dict(mode="slide", crop_size=(60, 60), stride=(40, 40)))
    with pytest.raises(ConfigError, match=r"model.test_cfg.crop_size=\(60, 60\) is not divisible by the patch size 16"):
        from_official(config, golden["release_state_dict"], golden["backbone_state_dict"])


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("backbone", "type"), "ReinsSwin", "model.backbone.type='ReinsSwin' is not supported"),
        (
            ("decode_head", "feat_channels"),
            48,
            "model.backbone.reins_config.query_dims=32 must equal model.decode_head.feat_channels=48",
        ),
        (("decode_head", "num_queries"), 12, "model.decode_head.num_queries=12 must equal 10"),
        (("backbone", "reins_config", "embed_dims"), 32, "model.backbone.reins_config.embed_dims=32 must equal 64"),
        (("decode_head", "align_corners"), True, "model.decode_head.align_corners=True is not supported"),
        # DINOv2's arguments: the official code takes these, reinseg cannot represent them.
        (("backbone", "drop_path_uniform"), True, "model.backbone.drop_path_uniform=True is not supported"),
        (("backbone", "in_chans"), 4, "model.backbone.in_chans=4 is not supported"),
        (
            ("backbone", "act_layer"),
            "SiLU",
            "model.backbone: act_layer not supported by reinseg for ReinsDinoVisionTransformer",
        ),
        # mmdet's SinePositionalEncoding, in both transformers.
        (
            ("decode_head", "pixel_decoder", "positional_encoding", "normalize"),
            False,
            "model.decode_head.pixel_decoder.positional_encoding.normalize=False is not supported",
        ),
        (
            ("decode_head", "positional_encoding", "temperature"),
            20,
            "model.decode_head.positional_encoding.temperature=20 is not supported",
        ),
        (
            ("decode_head", "positional_encoding", "offset"),
            -0.5,
            "model.decode_head.positional_encoding.offset=-0.5 is not supported",
        ),
        (
            ("decode_head", "positional_encoding", "dim"),
            2,
            "model.decode_head.positional_encoding: dim not supported by reinseg$",
        ),
    ],
)
def test_unsupported_config_fields_are_named(golden, path, value, message):
    import copy

    config = copy.deepcopy(golden["model_config"])
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_official(config, golden["release_state_dict"], golden["backbone_state_dict"])


def _official_config_without(golden, *paths):
    import copy

    config = copy.deepcopy(golden["model_config"])
    for path in paths:
        node = config
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return config


def test_left_out_loss_weights_are_mmdets_defaults(golden):
    """mmdet's loss_weight default is 1.0, not the released 2 / 5 / 5 (an official run of such a
    config trains with 1.0): the matching costs left at their default weight 1.0 agree."""
    head = ("decode_head",)
    config = _official_config_without(
        golden, *[(*head, loss, "loss_weight") for loss in ("loss_cls", "loss_mask", "loss_dice")]
    )
    for cost in config["decode_head"]["train_cfg"]["assigner"]["match_costs"]:
        cost.pop("weight")
    criterion = from_official(config, golden["release_state_dict"], golden["backbone_state_dict"]).criterion
    assert (criterion.class_weight, criterion.mask_weight, criterion.dice_weight) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize(
    "path, message",
    [
        (("loss_dice", "naive_dice"), "model.decode_head.loss_dice.naive_dice=False is not supported"),
        (("loss_dice", "eps"), "model.decode_head.loss_dice.eps=0.001 is not supported"),
        (("loss_mask", "use_sigmoid"), "model.decode_head.loss_mask.use_sigmoid=False is not supported"),
        (("loss_cls", "loss_weight"), "match_costs\\[0\\].weight 2.0 differs from the matching loss weight 1.0"),
    ],
)
def test_left_out_loss_options_are_read_as_mmdet_reads_them(golden, path, message):
    config = _official_config_without(golden, ("decode_head", *path))
    with pytest.raises(ConfigError, match=message):
        from_official(config, golden["release_state_dict"], golden["backbone_state_dict"])


@pytest.mark.parametrize(
    "key, message",
    [
        ("pred_act", "match_costs\\[2\\].pred_act=False is not supported"),
        ("eps", "match_costs\\[2\\].eps=0.001 is not supported"),
    ],
)
def test_left_out_dice_cost_options_are_mmdets_defaults(golden, key, message):
    config = _official_config_without(golden, ("decode_head", "train_cfg", "assigner", "match_costs", 2, key))
    with pytest.raises(ConfigError, match=message):
        from_official(config, golden["release_state_dict"], golden["backbone_state_dict"])


def test_a_left_out_mask_cost_sigmoid_is_mmdets_default_true(golden):
    config = _official_config_without(golden, ("decode_head", "train_cfg", "assigner", "match_costs", 1, "use_sigmoid"))
    assert from_official(config, golden["release_state_dict"], golden["backbone_state_dict"]).criterion is not None


@pytest.mark.parametrize(
    "segmentor_type, backbone_type, tuning",
    [
        ("EncoderDecoder", "ReinsDinoVisionTransformer", "rein"),
        ("EncoderDecoder", "DinoVisionTransformer", "full"),  # configs/dinov2/dinov2_mask2former_512x512_bs1x4.py
        ("FrozenBackboneEncoderDecoder", "DinoVisionTransformer", "frozen"),  # configs/frozen_vfms/
    ],
)
def test_the_strategy_is_what_the_official_segmentor_trains(golden, segmentor_type, backbone_type, tuning):
    import copy

    from reinseg.official import official_model_config

    config = copy.deepcopy(golden["model_config"])
    config["type"] = segmentor_type
    config["backbone"]["type"] = backbone_type
    if backbone_type != "ReinsDinoVisionTransformer":
        del config["backbone"]["reins_config"]
        config["decode_head"]["type"] = "Mask2FormerHead"  # as the official configs without Rein
    assert official_model_config(config).tuning == tuning


def test_official_python_configs_are_read_without_executing_them(tmp_path):
    (tmp_path / "_base_").mkdir()
    (tmp_path / "_base_" / "model.py").write_text(
        "crop_size = (512, 512)\nnum_classes = 19\n"
        "model = dict(type='EncoderDecoder', decode_head=dict(num_classes=num_classes,\n"
        "    class_weight=[1.0] * num_classes + [0.1]), test_cfg=dict(mode='slide', crop_size=crop_size))\n"
    )
    (tmp_path / "child.py").write_text(
        "_base_ = ['./_base_/model.py']\n"
        "model = dict(test_cfg=dict(crop_size=(1024, 1024)))\n"
        "scales = [int(512 * x * 0.1) for x in range(5, 21)]\n"
        "pipeline = [dict(type='RandomCrop', crop_size={{_base_.crop_size}})]\n"
    )
    config = read_official_config(tmp_path / "child.py")
    assert config["model"]["test_cfg"] == {"mode": "slide", "crop_size": (1024, 1024)}  # merged
    assert config["model"]["decode_head"]["class_weight"] == [1.0] * 19 + [0.1]
    assert config["scales"][:3] == [256, 307, 358] and len(config["scales"]) == 16
    assert config["pipeline"][0]["crop_size"] == (512, 512)

    (tmp_path / "evil.py").write_text("import os\nmodel = os.system('echo pwned')\n")
    with pytest.raises(ValueError, match=r"evil.py, line 1: only 'name = value' assignments"):
        read_official_config(tmp_path / "evil.py")
    (tmp_path / "evil2.py").write_text("model = __import__('os').system('echo pwned')\n")
    with pytest.raises(ValueError, match="evil2.py, line 1"):
        read_official_config(tmp_path / "evil2.py")


def full_fine_tuning_release(golden):
    """The official full fine-tuning config (EncoderDecoder + plain DinoVisionTransformer +
    Mask2FormerHead) and a release of it: the head's and the fine-tuned VFM's weights."""
    import copy

    from reinseg.checkpoints import checkpoint_state_dict
    from reinseg.official import official_model_config, to_official_name

    config = copy.deepcopy(golden["model_config"])
    config["backbone"]["type"] = "DinoVisionTransformer"
    del config["backbone"]["reins_config"]
    config["decode_head"]["type"] = "Mask2FormerHead"
    torch.manual_seed(0)
    model = build_segmentor(official_model_config(config), load_backbone_weights=False)
    release = {to_official_name(k): v for k, v in checkpoint_state_dict(model).items() if not k.startswith("backbone.")}
    release |= {f"backbone.{k}": v for k, v in model.backbone.vit.state_dict().items()}
    return config, release, model


def test_a_full_fine_tuning_release_converts_with_its_own_vfm_weights(golden):
    config, release, model = full_fine_tuning_release(golden)
    converted = from_official(config, release).eval()
    images = golden["crop_input"]
    with torch.no_grad():
        assert torch.equal(converted.predict(images, mode="whole"), model.eval().predict(images, mode="whole"))


def test_a_backbone_file_beside_a_release_holding_the_vfm_is_refused(golden):
    config, release, _ = full_fine_tuning_release(golden)
    with pytest.raises(ValueError, match=r"the release holds the VFM's weights \(\d+ backbone.\* tensors\)"):
        from_official(config, release, golden["backbone_state_dict"])


def test_dinov2_drop_path_is_timms_and_block_chunks_change_nothing(golden):
    """The official linear drop-path rule (0 to the rate over the blocks) is timm's; the block
    chunks only group the blocks."""
    import copy

    from reinseg.official import official_model_config

    config = copy.deepcopy(golden["model_config"])
    config["backbone"].update(drop_path_rate=0.3, block_chunks=4)
    backbone = official_model_config(config).backbone
    assert backbone.timm_kwargs["drop_path_rate"] == 0.3
    assert "drop_path_rate" not in official_model_config(golden["model_config"]).backbone.timm_kwargs
