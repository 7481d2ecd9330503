"""Rein on CNNs (ResNet V1c, ConvNeXt) against the official ReinsResNetV1c / ReinsConvNeXt.

Golden files: tests/data/reins_resnet_tiny.pt and reins_convnext_tiny.pt, made by running the
official code (tests/data/README.md): every weight perturbed, BatchNorm statistics set.
"""

import copy

import pytest
import torch
from conftest import assert_matches, assert_plain_backbone_matches, load_golden, rein_parameters

from reinseg import backbone_from_official, build_backbone
from reinseg.cnn import ReinCNNBackbone
from reinseg.config import ConfigError

GOLDENS = ["reins_resnet_tiny.pt", "reins_convnext_tiny.pt"]
# The official parents of the Rein classes (the same weights without Rein).
PLAIN_TYPES = {"ReinsResNetV1c": "ResNetV1c", "ReinsConvNeXt": "mmpretrain.ConvNeXt"}


@pytest.fixture(scope="module", params=GOLDENS)
def golden(request):
    return load_golden(request.param)


def official_backbone(golden):
    return backbone_from_official(golden["backbone_config"], golden["backbone_state_dict"], golden["reins_state_dict"])


def test_features_and_queries_match_the_official_code(golden):
    backbone = official_backbone(golden)
    assert isinstance(backbone, ReinCNNBackbone) and not backbone.training
    with torch.no_grad():
        features, queries = backbone(golden["image"])
    assert len(features) == len(golden["features"]) == 4
    for ours, theirs in zip(features, golden["features"], strict=False):
        assert_matches(ours, theirs)
    assert_matches(queries, golden["queries"])
    assert backbone.out_channels == [f.shape[1] for f in golden["features"]]


def test_the_queries_are_the_sum_of_the_stages_linked_queries(golden):
    backbone = official_backbone(golden)
    with torch.no_grad():
        for rein, theirs in zip(backbone.rein, golden["stage_queries"], strict=False):
            assert_matches(rein.queries(), theirs)


def test_train_mode_gives_the_eval_outputs_and_trains_only_the_reins(golden):
    assert golden["train_matches_eval"]
    backbone = official_backbone(golden)
    with torch.no_grad():
        evaluated = backbone(golden["image"])
    assert backbone.train() is backbone
    with torch.no_grad():
        trained = backbone(golden["image"])
    for ours, theirs, same in zip(trained.features, golden["train_features"], evaluated.features, strict=False):
        assert_matches(ours, theirs)
        assert torch.equal(ours, same)
    assert_matches(trained.queries, golden["train_queries"])
    # The official modules in training mode are the reins*; ours are named rein*.
    training = {name for name, module in backbone.named_modules() if module.training and name}
    assert training == {"rein" + name[len("reins") :] for name in golden["train_mode_modules"]}
    for name, param in backbone.named_parameters():
        assert param.requires_grad == name.startswith("rein."), name


def test_a_cnn_in_ordinary_train_mode_would_differ(golden):
    """The check above is sensitive: BatchNorm batch statistics / drop path change the maps by O(1)."""
    backbone = official_backbone(golden)
    backbone.freeze_backbone = False
    backbone.train()
    with torch.no_grad():
        features, _ = backbone(golden["image"])
    assert (
        max((ours - theirs).abs().max().item() for ours, theirs in zip(features, golden["features"], strict=False))
        > 0.1
    )


def test_the_weight_mapping_alone_reproduces_the_plain_backbone(golden):
    assert_plain_backbone_matches(golden, PLAIN_TYPES[golden["backbone_config"]["type"]])


def test_parameter_counts_follow_distinct_cfgs(golden):
    backbone = official_backbone(golden)
    # The official Rein weights are exactly the trainable parameters, stage by stage.
    assert sum(p.numel() for p in backbone.parameters() if p.requires_grad) == sum(
        v.numel() for v in golden["reins_state_dict"].values()
    )
    for stage, (rein, cfg) in enumerate(zip(backbone.rein, golden["distinct_cfgs"], strict=False)):
        assert (rein.num_layers, rein.embed_dims) == (cfg["num_layers"], cfg["embed_dims"]), stage


@pytest.mark.parametrize(
    "name, depths, channels",
    [
        ("resnet50_v1c", [3, 4, 6, 3], [256, 512, 1024, 2048]),
        pytest.param("resnet101_v1c", [3, 4, 23, 3], [256, 512, 1024, 2048], marks=pytest.mark.slow),  # as ResNet-50
        ("convnext_large", [3, 3, 27, 3], [192, 384, 768, 1536]),
    ],
)
def test_zoo_cnns_at_full_size(name, depths, channels):
    with torch.device("meta"):
        backbone = build_backbone(name, patch_size=None, rein=dict(token_length=100, lora_dim=16, query_dims=256))
        features, queries = backbone(torch.empty(1, 3, 512, 512))
        maps, scales, _ = backbone(torch.empty(1, 3, 512, 512), resize=False)
    assert [tuple(f.shape) for f in features] == [
        (1, c, 512 // s, 512 // s) for c, s in zip(channels, (4, 8, 16, 32), strict=False)
    ]
    # A CNN's maps are at their strides already: nothing left to resize.
    assert scales == (1, 1, 1, 1) and [m.shape for m in maps] == [f.shape for f in features]
    assert queries.shape == (100, 256)
    assert backbone.out_channels == channels and backbone.stage_depths == depths
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    assert trainable == sum(rein_parameters(d, c) for d, c in zip(depths, channels, strict=False))


def tiny_cnn_config():
    """conftest's tiny model config on a tiny ResNet V1c (BasicBlocks, one per stage)."""
    from conftest import tiny_model_config

    config = tiny_model_config()
    config.backbone.name, config.backbone.patch_size = "resnet50_v1c", None
    config.backbone.timm_kwargs = dict(block="basic", layers=[1, 1, 1, 1], stem_width=4, channels=[8, 16, 32, 64])
    return config


def test_a_tiny_cnn_segmentor_trains_only_rein_and_head():
    from reinseg.build import build_segmentor

    config = tiny_cnn_config()
    segmentor = build_segmentor(config)
    assert segmentor.head.pixel_decoder is not None and segmentor.backbone.out_channels == [8, 16, 32, 64]
    segmentor.train()
    images = torch.randn(2, 3, 64, 96)
    class_logits, mask_logits = segmentor(images)
    (class_logits[-1].square().mean() + mask_logits[-1].square().mean()).backward()
    for name, param in segmentor.named_parameters():
        if name.startswith("backbone.vit."):
            assert not param.requires_grad and param.grad is None, name
    assert all(p.grad is not None for n, p in segmentor.named_parameters() if n.startswith("backbone.rein."))


def test_timm_layout_weights_load_and_convnext_takes_its_final_norm():
    import timm

    overrides = dict(depths=[1, 1, 1, 1], dims=[8, 16, 32, 64])
    reference = timm.create_model("convnext_large", num_classes=0, **overrides)
    state = {k: torch.randn_like(v) for k, v in reference.state_dict().items()}
    backbone = build_backbone("convnext_large", patch_size=None, **overrides)
    backbone.load_backbone_weights(state)
    # timm's classifier norm is the original final norm, mmpretrain's norm3; the others start as identity.
    assert torch.equal(backbone.vit.norm3.weight, state["head.norm.weight"])
    assert torch.equal(backbone.vit.norm0.weight, torch.ones(8)) and torch.equal(
        backbone.vit.norm0.bias, torch.zeros(8)
    )
    assert torch.equal(backbone.vit.stages[2].blocks[0].mlp.fc1.weight, state["stages.2.blocks.0.mlp.fc1.weight"])


def test_resnet_weights_without_batchnorm_counters_load(tmp_path):
    """PyTorch's strict loading fills in the num_batches_tracked counters a file leaves out."""
    overrides = dict(layers=[1, 1, 1, 1], channels=[8, 16, 32, 64])
    source = build_backbone("resnet50_v1c", patch_size=None, **overrides)
    state = {k: v.clone() for k, v in source.vit.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) < len(source.vit.state_dict())
    backbone = build_backbone("resnet50_v1c", patch_size=None, **overrides)
    backbone.load_backbone_weights(state)
    assert torch.equal(backbone.vit.layer3[0].conv2.weight, source.vit.layer3[0].conv2.weight)
    assert torch.equal(backbone.vit.bn1.running_var, source.vit.bn1.running_var)


def test_an_unknown_backbone_type_is_named(golden):
    config = dict(golden["backbone_config"], type="ReinsSwin")
    with pytest.raises(ConfigError, match="backbone.type='ReinsSwin' is not supported"):
        backbone_from_official(config, golden["backbone_state_dict"], golden["reins_state_dict"])


RESNET, CONVNEXT = GOLDENS


@pytest.mark.parametrize(
    "file, change, message",
    [
        (RESNET, lambda c: c.update(style="caffe"), "backbone.style='caffe' is not supported"),
        (RESNET, lambda c: c.update(dilations=(1, 1, 2, 4)), "backbone.dilations=.* is not supported"),
        (RESNET, lambda c: c["norm_cfg"].update(eps=1e-3), "backbone.norm_cfg.eps=0.001 is not supported"),
        (
            CONVNEXT,
            lambda c: c.update(gap_before_final_norm=True),
            "backbone.gap_before_final_norm=True is not supported",
        ),
        (CONVNEXT, lambda c: c.update(use_grn=True), "backbone.use_grn=True is not supported"),
        (RESNET, lambda c: c.update(unknown_option=1), "unknown_option not supported by reinseg for ReinsResNetV1c"),
        (
            CONVNEXT,
            lambda c: c["distinct_cfgs"][1].update(embed_dims=7),
            r"distinct_cfgs\[1\].embed_dims=7 must equal 32",
        ),
        (RESNET, lambda c: c["distinct_cfgs"][3].update(num_layers=3), r"distinct_cfgs\[3\].num_layers=3 must equal 2"),
        (RESNET, lambda c: c["distinct_cfgs"].pop(), "distinct_cfgs must hold one dict per stage"),
        (
            CONVNEXT,
            lambda c: c["distinct_cfgs"][2].update(token_length=5),
            r"distinct_cfgs\[2\] gives stage 2 other Rein",
        ),
    ],
)
def test_unsupported_fields_are_named(file, change, message):
    golden = load_golden(file)
    config = copy.deepcopy(golden["backbone_config"])
    change(config)
    with pytest.raises(ConfigError, match=message):
        backbone_from_official(config, golden["backbone_state_dict"], golden["reins_state_dict"])


def test_weights_whose_keys_do_not_fit_are_named(golden):
    reins = dict(golden["reins_state_dict"])
    reins["reins.1.extra"] = reins.pop("reins.1.scale")
    with pytest.raises(ValueError, match=r"missing keys \(1\): reins.1.scale; unexpected keys \(1\): reins.1.extra"):
        backbone_from_official(golden["backbone_config"], golden["backbone_state_dict"], reins)
    weights = dict(golden["backbone_state_dict"])
    key = next(iter(weights))
    weights.pop(key)
    with pytest.raises(ValueError, match="does not fit.*missing keys"):
        backbone_from_official(golden["backbone_config"], weights, golden["reins_state_dict"])


# The whole official segmentor (EncoderDecoder, ReinMask2FormerHead) on these backbones:
# tests/golden/make_reins_cnn_segmentor.py.
SEGMENTOR_KINDS = {"resnet": RESNET, "convnext": CONVNEXT}


@pytest.fixture(scope="module")
def segmentor_goldens():
    return load_golden("official_cnn_segmentor_tiny.pt")


@pytest.mark.parametrize("kind", sorted(SEGMENTOR_KINDS))
def test_a_converted_official_cnn_segmentor_predicts_as_the_official_one(segmentor_goldens, kind):
    from reinseg.official import from_official

    golden = segmentor_goldens[kind]
    weights = load_golden(SEGMENTOR_KINDS[kind])["backbone_state_dict"]
    segmentor = from_official(golden["model_config"], golden["release_state_dict"], weights).eval()
    with torch.no_grad():
        class_logits, mask_logits = segmentor(golden["crop_input"])
        assert len(class_logits) == len(golden["crop_class_logits_per_layer"]) == 10
        for ours, theirs in zip(class_logits, golden["crop_class_logits_per_layer"], strict=False):
            assert_matches(ours, theirs)
        for ours, theirs in zip(mask_logits, golden["crop_mask_logits_per_layer"], strict=False):
            assert_matches(ours, theirs)
        assert_matches(segmentor.predict(golden["crop_input"], mode="whole"), golden["crop_seg_logits"])
        assert segmentor.crop_size == golden["slide_crop"] and segmentor.stride == golden["slide_stride"]
        assert_matches(segmentor.predict(golden["slide_input"]), golden["slide_seg_logits"])


@pytest.mark.parametrize("kind", sorted(SEGMENTOR_KINDS))
def test_an_image_off_the_stride_grid_is_scored_unpadded_as_the_official_cnn_segmentor(segmentor_goldens, kind):
    """52x84 (off the 32 grid, below the 64 crop in height): mmseg pads nothing, whole or sliding
    (one smaller window); reinseg's evaluation (padded_scores) likewise."""
    from reinseg.official import from_official
    from reinseg.predict import padded_scores

    golden = segmentor_goldens[kind]
    weights = load_golden(SEGMENTOR_KINDS[kind])["backbone_state_dict"]
    segmentor = from_official(golden["model_config"], golden["release_state_dict"], weights).eval()
    assert segmentor.backbone.input_multiple == (1, 1)
    with torch.no_grad():
        whole = padded_scores(segmentor, golden["offgrid_input"], mode="whole")
        slide = padded_scores(segmentor, golden["offgrid_input"], mode="slide")
    assert_matches(whole, golden["offgrid_whole_seg_logits"])
    assert_matches(slide, golden["offgrid_slide_seg_logits"])


@pytest.mark.parametrize("kind, separate_backbone", [("resnet", True), ("convnext", False)])
def test_convert_official_writes_a_cnn_checkpoint_that_predicts_the_same(
    segmentor_goldens, kind, separate_backbone, tmp_path
):
    """The CNN weights in their own file (mmseg / mmpretrain names) or inside the release (``backbone.*``,
    as the official generate_full_weights.py writes it: saved as backbone.safetensors in timm's names)."""
    from reinseg.checkpoints import segmentor_from_checkpoint
    from reinseg.cli import main

    golden = segmentor_goldens[kind]
    cnn_weights = load_golden(SEGMENTOR_KINDS[kind])["backbone_state_dict"]
    release = dict(golden["release_state_dict"])
    args = ["convert-official", "--config", str(tmp_path / "config.py"), "--checkpoint", str(tmp_path / "release.pth")]
    if separate_backbone:
        torch.save(cnn_weights, tmp_path / "cnn.pth")
        args += ["--backbone", str(tmp_path / "cnn.pth")]
    else:
        release.update({f"backbone.{k}": v for k, v in cnn_weights.items()})
    torch.save({"state_dict": release}, tmp_path / "release.pth")
    (tmp_path / "config.py").write_text(f"model = {golden['model_config']!r}\n")
    assert main([*args, "--output", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "backbone.safetensors").is_file() != separate_backbone
    segmentor, payload = segmentor_from_checkpoint(tmp_path / "out" / "checkpoint.pt")
    assert not any(k.startswith("backbone.vit.") for k in payload["state_dict"])  # referenced, not copied
    with torch.no_grad():
        assert_matches(segmentor.eval().predict(golden["slide_input"]), golden["slide_seg_logits"])


def test_weight_decay_follows_the_official_custom_keys_on_cnns():
    """custom_keys "learnable_tokens" and "reins.scale": the per-stage tokens take no decay, while the
    per-stage scales (reins.<i>.scale) match no key and are decayed, as in the official training."""
    from reinseg.build import build_segmentor
    from reinseg.engine import parameter_groups

    config = tiny_cnn_config()
    segmentor = build_segmentor(config)
    groups = parameter_groups(segmentor, lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    rein = segmentor.backbone.rein
    for stage in rein:
        assert decay[id(stage.learnable_tokens_a)] == decay[id(stage.learnable_tokens_b)] == 0.0
        assert decay[id(stage.scale)] == 0.05 and decay[id(stage.mlp_delta_f.weight)] == 0.05


@pytest.mark.parametrize("tuning", ["vpt", "adaptformer", "lora", "soma"])
def test_token_and_attention_strategies_refuse_cnns_by_name(tuning):
    from reinseg.build import build_segmentor

    config = tiny_cnn_config()
    config.tuning = tuning
    with pytest.raises(ConfigError, match=f"model.tuning='{tuning}' applies to vit backbones, not to resnet50_v1c"):
        build_segmentor(config)


def test_full_fine_tuning_trains_the_cnn_in_train_mode():
    from reinseg.build import build_segmentor

    config = tiny_cnn_config()
    config.tuning = "full"
    segmentor = build_segmentor(config).train()
    assert segmentor.backbone.vit.training and all(p.requires_grad for p in segmentor.backbone.vit.parameters())


def test_a_v1d_resnet_is_refused():
    """timm's average-pool shortcuts (V1d, resnet*d) are not the official V1c."""
    with pytest.raises(ValueError, match="is not a V1c ResNet"):
        build_backbone("resnet50_v1c", patch_size=None, avg_down=True)


def test_whole_official_checkpoints_give_their_backbone_part(golden):
    """An mmpretrain / mmseg checkpoint holds the CNN under ``backbone.`` beside a classifier or head."""
    whole = {f"backbone.{k}": v for k, v in golden["backbone_state_dict"].items()}
    whole.update({f"backbone.{k}": v for k, v in golden["reins_state_dict"].items()})  # a full Rein release
    whole["head.fc.weight"] = torch.zeros(10, golden["features"][-1].shape[1])
    whole["decode_head.conv_seg.weight"] = torch.zeros(19, 8, 1, 1)
    backbone = official_backbone(golden)
    with torch.no_grad():
        for param in backbone.vit.parameters():
            param.zero_()
    backbone.load_backbone_weights(whole)
    with torch.no_grad():
        features, _ = backbone(golden["image"])
    for ours, theirs in zip(features, golden["features"], strict=False):
        assert_matches(ours, theirs)
