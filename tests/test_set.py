"""SET (``tuning: set``, :mod:`reinseg.set_tokens`) against the official SET code (github
JingjunYi/SET): tests/data/set_tiny.pt, made by tests/golden/make_set_golden.py."""

from pathlib import Path

import pytest
import torch
from conftest import assert_matches, load_golden, rein_parameters, tiny_model_config

from reinseg import backbone_from_official
from reinseg.build import build_segmentor
from reinseg.config import ConfigError, SetConfig, check_values, load_config
from reinseg.optim import parameter_groups
from reinseg.set_tokens import SpectralRein, compose, decompose
from reinseg.tuning import get_strategy


@pytest.fixture(scope="module")
def golden():
    return load_golden("set_tiny.pt")


def official_module(config):
    """A SpectralRein with the official constructor arguments (``Reins``: full-rank tokens)."""
    kwargs = {k: v for k, v in config.items() if k != "type"}
    if config["type"] == "Reins":
        kwargs["lora_dim"] = None
    return SpectralRein(**kwargs)


def assert_gradients_match(ours: dict, theirs: dict, tol: float = 1e-5):
    """Every official gradient, within ``tol`` of the tensor's largest official entry."""
    assert set(ours) == set(theirs)
    for name, expected in theirs.items():
        error = (ours[name] - expected).abs().max().item()
        assert error <= tol * max(expected.abs().max().item(), 1e-3), (name, error)


@pytest.mark.parametrize("case", ["lora", "full_odd"])
def test_module_matches_the_official_code_with_its_gradients(golden, case):
    case = golden["modules"][case]
    module = official_module(case["config"])
    module.load_state_dict(case["state_dict"], strict=True)
    inputs = [x.clone().requires_grad_(True) for x in case["inputs"]]
    outputs = [module(x, layer) for layer, x in enumerate(inputs)]
    for ours, theirs in zip(outputs, case["outputs"], strict=True):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= 1e-5
    results = list(outputs)
    if case["queries"] is not None:
        results.append(module.queries())
        assert (results[-1] - case["queries"]).abs().max().item() <= 1e-5
    sum((r * w).sum() for r, w in zip(results, case["loss_weights"], strict=True)).backward()
    grads = {k: p.grad for k, p in module.named_parameters() if p.grad is not None}
    assert_gradients_match(grads, case["grads"])
    for x, expected in zip(inputs, case["input_grads"], strict=True):
        assert (x.grad - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_initialisation_follows_the_official_code(golden):
    """The same seed gives the official initial weights: parameters are drawn in its order."""
    torch.manual_seed(123)
    module = official_module(golden["init"]["config"])
    state = module.state_dict()
    assert set(state) == set(golden["init"]["state_dict"])
    for name, expected in golden["init"]["state_dict"].items():
        assert torch.equal(state[name], expected), name


def golden_backbone(golden):
    """The golden's DINOv2 through the official-config reader, SET added by the strategy."""
    case = golden["backbone"]
    config = {k: v for k, v in case["backbone_config"].items() if k != "reins_config"}
    backbone = backbone_from_official(dict(config, type="DinoVisionTransformer"), case["backbone_state_dict"])
    reins = case["backbone_config"]["reins_config"]
    options = SetConfig(token_length=reins["token_length"], lora_dim=reins["lora_dim"], query_dims=reins["query_dims"])
    get_strategy("set").apply(backbone, options)
    backbone.rein.load_state_dict({k[len("reins.") :]: v for k, v in case["reins_state_dict"].items()}, strict=True)
    return backbone


def test_dinov2_backbone_matches_the_official_code_with_its_gradients(golden):
    case = golden["backbone"]
    backbone = golden_backbone(golden).eval()
    with torch.no_grad():
        features, queries = backbone(case["image"])
        single, _ = backbone(case["image"][:1])
    for ours, theirs in zip(features, case["features"], strict=True):
        assert_matches(ours, theirs, tol=1e-4)
    assert_matches(queries, case["queries"], tol=1e-5)
    # The official FFT runs over the batch axis: the first image alone gives other features.
    for ours, theirs, batched in zip(single, case["single_features"], case["features"], strict=True):
        assert_matches(ours, theirs, tol=1e-4)
        assert (theirs - batched[:1]).abs().max() > 1e-2

    backbone.train()
    features, queries = backbone(case["image"])
    sum((r * w).sum() for r, w in zip([*features, queries], case["loss_weights"], strict=True)).backward()
    grads = {"reins." + k[len("rein.") :]: p.grad for k, p in backbone.named_parameters() if p.requires_grad}
    assert_gradients_match(grads, case["grads"])


def test_resnet_with_a_set_per_stage_matches_the_official_code_with_its_gradients(golden):
    """The official SET module is also the per-stage one of ReinsResNetV1c (tokens (B, H*W, C)).
    In float64 (the golden's): through eight blocks float32 rounding alone reaches 1e-5."""
    case = golden["resnet"]
    weights = load_golden("reins_resnet_tiny.pt")["backbone_state_dict"]
    config = {k: v for k, v in case["backbone_config"].items() if k not in ("reins_config", "distinct_cfgs")}
    backbone = backbone_from_official(dict(config, type="ResNetV1c"), weights)
    reins = case["backbone_config"]["reins_config"]
    options = SetConfig(token_length=reins["token_length"], lora_dim=reins["lora_dim"], query_dims=reins["query_dims"])
    get_strategy("set").apply(backbone, options)
    backbone.rein.load_state_dict({k[len("reins.") :]: v for k, v in case["reins_state_dict"].items()}, strict=True)
    backbone.double().eval()
    with torch.no_grad():
        features, queries = backbone(case["image"])
    for ours, theirs in zip(features, case["features"], strict=True):
        assert_matches(ours, theirs, tol=1e-4)
    assert_matches(queries, case["queries"], tol=1e-5)
    backbone.train()
    features, queries = backbone(case["image"])
    sum((r * w).sum() for r, w in zip([*features, queries], case["loss_weights"], strict=True)).backward()
    grads = {"reins." + k[len("rein.") :]: p.grad for k, p in backbone.named_parameters() if p.requires_grad}
    assert_gradients_match(grads, case["grads"])


def test_decompose_and_compose_invert_a_batch_and_channel_fft():
    """compose(decompose(f)) is f scaled by sqrt(B / 2) (the official normalisations: a backward
    FFT, an orthonormal inverse and the division by sqrt(2C)), for even and odd widths."""
    torch.manual_seed(0)
    for shape in [(2, 5, 8), (3, 4, 7)]:
        feats = torch.randn(shape, dtype=torch.float64)
        phase, amplitude = decompose(feats)
        assert phase.shape == amplitude.shape == feats.shape
        assert phase.abs().max() <= torch.pi and amplitude.min() > 0
        restored = compose(phase, amplitude)
        assert torch.allclose(restored, feats * (shape[0] / 2) ** 0.5, atol=1e-9)


def test_spectral_parameters_train_and_decay_as_the_official_custom_keys():
    config = tiny_model_config()
    config.tuning = "set"
    config.set = SetConfig(token_length=8, lora_dim=4, query_dims=32)
    segmentor = build_segmentor(config)
    trainable = {n for n, p in segmentor.backbone.named_parameters() if p.requires_grad}
    assert {"rein.learnable_tokens2", "rein.mlp_token2feat2.weight", "rein.mlp_delta_f2.bias"} <= trainable
    assert all(n.startswith("rein.") for n in trainable)
    decay = {}
    for group in parameter_groups(segmentor, 1e-4, 0.05, backbone_lr_mult=0.1):
        for param in group["params"]:
            decay[param] = group["weight_decay"]
    rein = segmentor.backbone.rein
    # "learnable_tokens" matches both token sets; the amplitude MLPs are decayed.
    assert decay[rein.learnable_tokens2] == 0 and decay[rein.learnable_tokens_a] == 0
    assert decay[rein.scale] == 0
    assert decay[rein.mlp_delta_f2.weight] == 0.05


def test_dinov2_l_count_is_rein_plus_the_amplitude_branch():
    """The official shapes at DINOv2-L: LoRAReins (Rein's 2.99 M) plus learnable_tokens2
    (24 x 100 x 1024) and two 1024 -> 1024 MLPs."""
    config = load_config(Path(__file__).parents[1] / "configs" / "set_dinov2-l_gta_512.yaml").model
    with torch.device("meta"):
        segmentor = build_segmentor(config, load_backbone_weights=False)
    count = sum(p.numel() for p in segmentor.backbone.parameters() if p.requires_grad)
    assert count == rein_parameters(24, 1024) + 24 * 100 * 1024 + 2 * (1024 * 1024 + 1024) == 7_546_881


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("lora_dim", 0, "model.set.lora_dim must be at least 1"),
        ("token_length", 1, "model.set.token_length must be at least 2"),
        ("query_dims", -3, "model.set.query_dims must be at least 1"),
    ],
)
def test_out_of_range_options_name_the_key(key, value, message):
    config = tiny_model_config()
    config.tuning = "set"
    config.set = SetConfig(**{key: value})
    with pytest.raises(ConfigError, match=message):
        build_segmentor(config)


def test_config_values_are_checked_when_loading(tmp_path):
    path = tmp_path / "set.yaml"
    path.write_text("model:\n  tuning: set\n  set:\n    lora_dim: 0\n")
    with pytest.raises(ConfigError, match="model.set.lora_dim"):
        check_values(load_config(path))


def test_mixed_precision_runs_the_transforms_in_float32(golden):
    """FFTs have no bfloat16: under bf16 autocast (train.precision: bf16-mixed) SET still runs, its
    transforms in float32, and gives the official float32 refinement to bf16 precision."""
    case = golden["modules"]["lora"]
    module = official_module(case["config"])
    module.load_state_dict(case["state_dict"], strict=True)
    x = case["inputs"][0].clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x, 0)
    assert out.dtype == torch.float32
    # The refinement (output - input), not the output, which the residual input dominates.
    expected = case["outputs"][0] - case["inputs"][0]
    assert (out.detach() - case["inputs"][0] - expected).abs().max() <= 2e-2 * expected.abs().max()
    out.sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in module.parameters() if p.grad is not None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert module(x.detach().bfloat16(), 0).dtype == torch.bfloat16


def test_prediction_runs_set_one_image_at_a_time():
    """SET's FFT runs over the batch axis, so a batch of video frames would segment each frame
    otherwise than alone (the official test runs batch 1): predict runs SET's images singly."""
    import numpy as np

    from reinseg.predict import segment_image, segment_images

    config = tiny_model_config()
    config.tuning = "set"
    config.set = SetConfig(token_length=8, lora_dim=4, query_dims=32)
    torch.manual_seed(0)
    segmentor = build_segmentor(config).eval()
    with torch.no_grad():  # a visible refinement (the official init starts it near zero)
        segmentor.backbone.rein.scale.fill_(1.0)
    assert segmentor.mixes_batch and not build_segmentor(tiny_model_config()).mixes_batch
    frames = [np.random.default_rng(i).integers(0, 256, (48, 64, 3), dtype=np.uint8) for i in range(3)]
    batched = segment_images(segmentor, frames, (64, 48))
    for frame, prediction in zip(frames, batched, strict=True):
        np.testing.assert_array_equal(prediction, segment_image(segmentor, frame, (64, 48)))
    # The check above can fail: run as one batch, the images' scores differ from each one's
    # alone; predict runs them singly.
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        together = segmentor.encode_decode(images)
        alone = torch.cat([segmentor.encode_decode(images[i : i + 1]) for i in range(2)])
        assert (together - alone).abs().max() > 1e-3
        assert torch.equal(segmentor.predict(images, mode="whole"), alone)
