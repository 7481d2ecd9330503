import os
from pathlib import Path

# Tests never reach the network: pretrained downloads must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DATA = Path(__file__).parent / "data"


def load_golden(name: str) -> dict:
    return torch.load(DATA / name, map_location="cpu", weights_only=False)


def assert_matches(ours, theirs, tol=1e-4):
    """``ours`` equals the official ``theirs`` within ``tol``, absolute and relative to the largest
    official value."""
    assert ours.shape == theirs.shape
    error = (ours - theirs).abs().max().item()
    assert error <= tol and error <= tol * theirs.abs().max().item(), error


def assert_plain_backbone_matches(golden: dict, plain_type: str) -> None:
    """The golden's backbone config as its official parent ``plain_type`` (no Rein) and its weights
    reproduce ``plain_features`` (the weight mapping on its own)."""
    from reinseg import backbone_from_official

    config = {k: v for k, v in golden["backbone_config"].items() if k not in ("reins_config", "distinct_cfgs")}
    backbone = backbone_from_official(dict(config, type=plain_type), golden["backbone_state_dict"])
    assert backbone.rein is None
    with torch.no_grad():
        features, queries = backbone(golden["image"])
    assert queries is None
    for ours, theirs in zip(features, golden["plain_features"]):
        assert_matches(ours, theirs, tol=1e-5)


def rein_parameters(num_layers, channels, tokens=100, rank=16, queries=256):
    """Official LoRAReins shapes: A (L, T, r), B (L, r, C), two C -> C MLPs, transform C -> Q,
    merge 3Q -> Q, the scale."""
    return (
        num_layers * tokens * rank
        + num_layers * rank * channels
        + 2 * (channels * channels + channels)
        + (channels * queries + queries)
        + (3 * queries * queries + queries)
        + 1
    )


def tiny_overrides(name: str) -> dict:
    """timm overrides that keep each zoo architecture but make it tiny."""
    overrides = dict(embed_dim=32, depth=4, num_heads=2)
    if name.startswith("sam"):
        overrides.update(global_attn_indexes=[1, 3], window_size=2)
    return overrides


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_model_config(num_classes: int = 19, **head):
    """A ModelConfig of the real architectures at toy size (random weights, no download)."""
    from reinseg.config import BackboneConfig, HeadConfig, LossConfig, ModelConfig, ReinConfig, TestConfig

    return ModelConfig(
        backbone=BackboneConfig(
            name="dinov2_vits14",
            img_size=64,
            patch_size=16,
            out_indices=[0, 1, 2, 3],
            timm_kwargs=dict(embed_dim=32, depth=4, num_heads=2),
        ),
        rein=ReinConfig(token_length=8, lora_dim=4, query_dims=32),
        head=HeadConfig(
            **(
                dict(
                    num_classes=num_classes,
                    feat_channels=32,
                    out_channels=32,
                    num_heads=4,
                    num_decoder_layers=3,
                    decoder_ffn_dims=64,
                    num_encoder_layers=1,
                    encoder_ffn_dims=64,
                    num_groups=8,
                )
                | head
            )
        ),
        loss=LossConfig(num_points=256),
        test=TestConfig(mode="whole"),
    )
