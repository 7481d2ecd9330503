"""FADA (tuning: fada) against the official code: tests/data/fada_tiny.pt, made by
tests/golden/make_fada_golden.py running JingjunYi/FADA (see its docstring for the cases)."""

import pytest
import torch
from conftest import load_golden, tiny_model_config

from reinseg import build_backbone
from reinseg.build import build_segmentor
from reinseg.config import ConfigError, load_config
from reinseg.fada import Fada, HaarSplit
from reinseg.optim import parameter_groups
from reinseg.tuning import FadaConfig, get_strategy


@pytest.fixture(scope="module")
def golden():
    return load_golden("fada_tiny.pt")


def official_module(case):
    """reinseg's Fada with the official constructor arguments (``type`` Reins: full-rank tokens)."""
    config = {k: v for k, v in case["config"].items() if k != "type"}
    if case["config"]["type"] == "Reins":
        config["lora_dim"] = None
    return Fada(**config)


def max_error(ours, theirs):
    assert ours.shape == theirs.shape
    return (ours - theirs).abs().max().item()


def assert_gradients_match(grads, expected):
    """Each gradient to 1e-5 of its tensor's largest official entry (as official_train_tiny.pt)."""
    assert set(grads) == set(expected)
    for name, grad in grads.items():
        assert grad is not None, name
        assert max_error(grad, expected[name]) <= 1e-5 * max(expected[name].abs().max().item(), 1e-3), name


def test_module_matches_the_official_outputs_queries_and_gradients(golden):
    case = golden["module"]
    fada = official_module(case)
    fada.load_state_dict(case["state_dict"], strict=True)  # the official names
    outputs = [fada(x, layer) for layer, x in enumerate(case["inputs"])]
    queries = fada.queries()
    for ours, theirs in zip(outputs, case["outputs"], strict=True):
        assert max_error(ours, theirs) <= 1e-5
    assert max_error(queries, case["queries"]) <= 1e-5
    loss = sum((t * w).sum() for t, w in zip([*outputs, queries], case["loss_weights"], strict=True))
    loss.backward()
    assert_gradients_match({k: p.grad for k, p in fada.named_parameters()}, case["grads"])


def test_full_rank_module_matches_the_official_reins(golden):
    case = golden["module_full"]
    fada = official_module(case)
    fada.load_state_dict(case["state_dict"], strict=True)
    assert fada.learnable_tokens.shape == (3, 6, 16) and fada.learnable_tokens2.shape == (3, 6, 48)
    with torch.no_grad():
        for layer, (x, expected) in enumerate(zip(case["inputs"], case["outputs"], strict=True)):
            assert max_error(fada(x, layer), expected) <= 1e-5
        assert max_error(fada.queries(), case["queries"]) <= 1e-5


def test_seeded_initialisation_and_width_1024_equal_the_unmodified_official_module(golden):
    """The official module as released (WavePool(1024)): a seed gives the same weights, call by
    call, and the same refinement at ViT-L's width."""
    case = golden["init_1024"]
    torch.manual_seed(case["seed"])
    fada = official_module(case)
    state = fada.state_dict()
    assert set(state) == set(case["param_sums"])
    for name, (total, squares) in case["param_sums"].items():
        assert state[name].double().sum().item() == pytest.approx(total, rel=1e-9, abs=1e-9), name
        assert state[name].double().square().sum().item() == pytest.approx(squares, rel=1e-9), name
    with torch.no_grad():
        fada.scale.fill_(1.0)
        for layer, (x, expected) in enumerate(zip(case["inputs"], case["outputs"], strict=True)):
            assert max_error(fada(x, layer), expected) <= 1e-5
        assert max_error(fada.queries(), case["queries"]) <= 1e-5


def test_haar_split_equals_the_official_wavepool(golden):
    case = golden["wavepool"]
    with torch.no_grad():
        bands = HaarSplit(8)(case["input"])
    for name, band in zip(("LL", "LH", "HL", "HH"), bands, strict=True):
        assert max_error(band, case[name]) <= 1e-6, name


def test_haar_split_is_the_orthonormal_haar_transform():
    """Independent oracle: the 2 x 2 block formulas, exact reconstruction, energy kept."""
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    split = HaarSplit(3).double()
    with torch.no_grad():
        ll, lh, hl, hh = split(x)
    a, b, c, d = x[..., 0::2, 0::2], x[..., 0::2, 1::2], x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    for band, expected in [
        (ll, (a + b + c + d) / 2),  # local mean (x 2): the low frequencies
        (lh, (-a + b - c + d) / 2),  # left-right differences
        (hl, (-a - b + c + d) / 2),  # top-bottom differences
        (hh, (a - b - c + d) / 2),  # diagonal
    ]:
        assert torch.allclose(band, expected, atol=1e-12)
    rebuilt = torch.empty_like(x)
    rebuilt[..., 0::2, 0::2] = (ll - lh - hl + hh) / 2
    rebuilt[..., 0::2, 1::2] = (ll + lh - hl - hh) / 2
    rebuilt[..., 1::2, 0::2] = (ll - lh + hl - hh) / 2
    rebuilt[..., 1::2, 1::2] = (ll + lh + hl + hh) / 2
    assert torch.allclose(rebuilt, x, atol=1e-12)
    energy = sum(band.square().sum() for band in (ll, lh, hl, hh))
    assert energy.item() == pytest.approx(x.square().sum().item(), rel=1e-12)
    # A constant map has no high frequencies.
    with torch.no_grad():
        bands = split(torch.full((1, 3, 4, 4), 3.0, dtype=torch.float64))
    assert torch.allclose(bands[0], torch.full((1, 3, 2, 2), 6.0, dtype=torch.float64))
    assert all(band.abs().max() == 0 for band in bands[1:])


def golden_backbone(golden, tmp_path, **options):
    case = golden["backbone"]
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(case["backbone_state_dict"], path)
    vit = case["vit_config"]
    backbone = build_backbone(
        "dinov2_vits14",
        img_size=vit["img_size"],
        patch_size=vit["patch_size"],
        embed_dim=vit["embed_dim"],
        depth=vit["depth"],
        num_heads=vit["num_heads"],
        out_indices=vit["out_indices"],
        checkpoint=path,
    )
    fada = case["fada_config"]
    keys = ("token_length", "lora_dim", "query_dims")
    get_strategy("fada").apply(backbone, FadaConfig(**{k: fada[k] for k in keys}, **options))
    backbone.rein.load_state_dict(case["fada_state_dict"], strict=True)
    return backbone


def test_dinov2_backbone_matches_the_official_features_queries_and_gradients(golden, tmp_path):
    case = golden["backbone"]
    backbone = golden_backbone(golden, tmp_path).eval()
    with torch.no_grad():
        features, queries = backbone(case["image"])
    for ours, theirs in zip(features, case["features"], strict=True):
        assert max_error(ours, theirs) <= 1e-4
    assert max_error(queries, case["queries"]) <= 1e-4

    backbone.train()
    # The official train() trains every "reins" parameter, the Haar filters included.
    trainable = {name for name, p in backbone.named_parameters() if p.requires_grad}
    assert trainable == {"rein." + name.removeprefix("reins.") for name in case["trainable"]}
    features, queries = backbone(case["image"])
    for ours, theirs in zip(features, case["train_features"], strict=True):
        assert max_error(ours, theirs) <= 1e-4
    loss = sum((t * w).sum() for t, w in zip([*features, queries], case["loss_weights"], strict=True))
    loss.backward()
    assert_gradients_match({k: backbone.rein.get_parameter(k).grad for k in case["grads"]}, case["grads"])


def test_fixed_wavelet_keeps_the_official_names_and_trains_the_rest(golden, tmp_path):
    backbone = golden_backbone(golden, tmp_path, learn_wavelet=False)
    trainable = {name for name, p in backbone.rein.named_parameters() if p.requires_grad}
    assert trainable == {k for k in golden["backbone"]["grads"] if not k.startswith("wavepool.")}


def test_params_counts_the_official_dinov2_l_module(golden, capsys):
    """``reinseg params --tuning fada`` (DINOv2-L, 512 px, patch 16): the official LoRAReins of the
    released config, every parameter of which the official training trains."""
    from reinseg.cli import main

    assert main(["params", "--tuning", "fada"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("FADA "))
    assert golden["vitl_count"]["parameters"] == 2_061_825
    # All but the Haar filters (4 x 1024 x 2 x 2) are made trainable by the module itself.
    assert golden["vitl_count"]["requires_grad"] == 2_061_825 - 4 * 1024 * 4
    assert row.split()[1:3] == ["2,061,825", "2,061,825"]


@pytest.mark.parametrize("tokens", [15, 24, 49])  # not square; a square with an odd side
def test_token_grids_the_official_code_cannot_take_are_refused(tokens):
    fada = Fada(num_layers=1, embed_dims=16, patch_size=16, query_dims=8, token_length=4, lora_dim=2)
    with pytest.raises(ValueError, match="square token grid with an even side"):
        fada(torch.randn(1, 1 + tokens, 16), 0)


def test_width_must_split_into_quarters():
    with pytest.raises(ValueError, match="embed_dims must be a multiple of 4"):
        Fada(num_layers=1, embed_dims=18, patch_size=16)


def test_zero_delta_mlps_start_as_identity_and_learn():
    fada = Fada(num_layers=2, embed_dims=16, patch_size=16, query_dims=8, token_length=5, zero_mlp_delta_f=True)
    assert "scale" not in fada.state_dict() and fada.scale == 1.0
    x = torch.randn(2, 1 + 16, 16)
    assert torch.equal(fada(x, 1), x)
    fada(x, 1).square().sum().backward()
    assert fada.mlp_delta_f.weight.grad.abs().sum() > 0 and fada.mlp_delta_f2.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "section, message",
    [
        ("{lora_dim: 0}", "model.fada.lora_dim"),
        ("{token_length: 1}", "model.fada.token_length"),
        ("{query_dims: 0}", "model.fada.query_dims"),
        ("{learn_wavelet: 3}", "model.fada.learn_wavelet"),
        ("{wavelet: db2}", "model.fada"),
    ],
)
def test_bad_options_name_the_key(tmp_path, section, message):
    path = tmp_path / "fada.yaml"
    path.write_text(f"model:\n  tuning: fada\n  fada: {section}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_built_from_a_config_with_the_official_optimizer_groups():
    config = tiny_model_config()
    config.tuning = "fada"
    config.fada = FadaConfig(token_length=8, lora_dim=4, query_dims=32)
    segmentor = build_segmentor(config).train()
    assert isinstance(segmentor.backbone.rein, Fada)
    assert segmentor.head.num_queries == 8  # the low-frequency tokens are the queries
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))
    segmentor.loss(images, labels)["loss"].backward()
    assert all(p.grad is not None for p in segmentor.backbone.rein.parameters())
    groups = parameter_groups(segmentor, lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = dict(segmentor.backbone.rein.named_parameters())
    # The official custom_keys: no decay for "learnable_tokens" (both branches) and "reins.scale".
    for name, param in names.items():
        assert (id(param) in decayed) == (not name.startswith(("learnable_tokens", "scale"))), name


def test_not_for_cnn_backbones():
    config = tiny_model_config()
    config.tuning = "fada"
    config.backbone.name = "resnet50_v1c"
    with pytest.raises(ConfigError, match="model.tuning='fada' applies to vit backbones"):
        build_segmentor(config)


def test_a_run_whose_grids_fada_cannot_split_is_refused_before_training():
    """Found otherwise at the first step (an odd crop) or the first validation (whole images)."""
    from reinseg.config import Config, DataConfig
    from reinseg.engine import check_run_options

    config = tiny_model_config()
    config.tuning = "fada"
    config.fada = FadaConfig(token_length=8, lora_dim=4, query_dims=32)
    segmentor = build_segmentor(config)
    with pytest.raises(ConfigError, match="needs square patch grids with an even side: set model.test.mode=slide"):
        check_run_options(Config(model=config, data=DataConfig(crop_size=64)), segmentor)
    config.test.mode, config.test.crop_size, config.test.stride = "slide", [64, 64], [32, 32]
    segmentor = build_segmentor(config)
    with pytest.raises(ConfigError, match="data.crop_size=48 is 3 patches"):
        check_run_options(Config(model=config, data=DataConfig(crop_size=48)), segmentor)
    check_run_options(Config(model=config, data=DataConfig(crop_size=64)), segmentor)
    config.test.crop_size = [64, 32]
    with pytest.raises(ConfigError, match="model.test.crop_size 64x32 is 4x2 patches"):
        check_run_options(Config(model=config, data=DataConfig(crop_size=64)), build_segmentor(config))


def trained_fada_segmentor():
    """A tiny FADA segmentor in eval mode whose Haar filters and other weights moved off their
    initial values, as training moves them (the initial Haar filters hide the batch effect)."""
    torch.manual_seed(0)
    config = tiny_model_config()
    config.tuning = "fada"
    config.fada = FadaConfig(token_length=8, lora_dim=4, query_dims=32)
    segmentor = build_segmentor(config).eval()
    with torch.no_grad():
        for conv in segmentor.backbone.rein.wavepool.children():
            conv.weight.add_(0.3 * torch.randn_like(conv.weight))
        for param in segmentor.backbone.rein.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return segmentor


def test_an_image_is_refined_as_alone_whatever_its_batch():
    """The official reshape gives a token's Haar block the map channel, and so the trained
    filter, of its place in the batch: an image's features depend on its batch, so prediction
    runs FADA one image and one window at a time (``mixes_batch``), as the official test."""
    segmentor = trained_fada_segmentor()
    assert segmentor.mixes_batch
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        mixed = segmentor.backbone(images)[0][0]
        alone = torch.cat([segmentor.backbone(image[None])[0][0] for image in images])
    assert (mixed - alone).abs().max() > 1e-3  # the batch matters: what makes one-at-a-time needed
    wide = torch.randn(1, 3, 64, 192)  # five 64x64 windows
    one_by_one = segmentor.predict(wide, mode="slide", crop_size=64, stride=32)
    segmentor.window_batch = 5
    torch.testing.assert_close(segmentor.predict(wide, mode="slide", crop_size=64, stride=32), one_by_one)


def test_a_batch_is_predicted_as_its_images_alone():
    """Whole images and video frames (segment_images) too: each image as alone."""
    from reinseg.predict import segment_images

    segmentor = trained_fada_segmentor()
    images = torch.randn(3, 3, 64, 64)
    together = segmentor.predict(images, mode="whole")
    alone = torch.cat([segmentor.predict(image[None], mode="whole") for image in images])
    assert torch.equal(together, alone)
    frames = [(torch.rand(64, 64, 3) * 255).to(torch.uint8).numpy() for _ in range(3)]
    batched = segment_images(segmentor, frames, scale=None, mode="whole")
    single = [segment_images(segmentor, [frame], scale=None, mode="whole")[0] for frame in frames]
    assert all((b == s).all() for b, s in zip(batched, single, strict=True))
