"""ViTs through ``backbone_from_official``: EVA02 + Rein on timm's EVA02 against the official
ReinsEVA2 (tests/data/reins_eva2_tiny.pt, made by tests/golden/make_reins_eva2.py from the
official code), and DINOv2 + Rein against the shared DINOv2 golden."""

import copy

import pytest
import torch
from conftest import assert_matches, assert_plain_backbone_matches, load_golden

from reinseg import backbone_from_official
from reinseg.config import ConfigError


@pytest.fixture(scope="module")
def golden():
    return load_golden("reins_eva2_tiny.pt")


def official_backbone(golden, config=None):
    return backbone_from_official(
        config or golden["backbone_config"], golden["backbone_state_dict"], golden["reins_state_dict"]
    )


def test_features_and_queries_match_the_official_code_in_eval_and_train_mode(golden):
    backbone = official_backbone(golden)
    for mode, features_key, queries_key in (
        ("eval", "features", "queries"),
        ("train", "train_features", "train_queries"),
    ):
        backbone.train(mode == "train")
        with torch.no_grad():
            features, queries = backbone(golden["image"])
        assert len(features) == 4
        for ours, theirs in zip(features, golden[features_key], strict=False):
            assert_matches(ours, theirs)
        assert_matches(queries, golden[queries_key])
    training = {name for name, module in backbone.named_modules() if module.training and name}
    assert training == {"rein" + name[len("reins") :] for name in golden["train_mode_modules"]}


def test_the_plain_eva02_matches_without_rein(golden):
    assert_plain_backbone_matches(golden, "EVA2")


def test_the_rotary_reference_grid_matters(golden):
    """pt_hw_seq_len is timm's ref_feat_shape: with another one the maps move (the check is sensitive)."""
    config = copy.deepcopy(golden["backbone_config"])
    config["pt_hw_seq_len"] = 4
    with torch.no_grad():
        features, _ = official_backbone(golden, config)(golden["image"])
    assert (features[3] - golden["features"][3]).abs().max() > 1e-2


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("use_rel_pos_bias", True, "backbone.use_rel_pos_bias=True is not supported"),
        ("naiveswiglu", False, "backbone.naiveswiglu=False is not supported"),
        ("hybrid_backbone", {"type": "ResNet"}, "backbone.hybrid_backbone=.* is not supported"),
        ("window", 7, "backbone: window not supported by reinseg for ReinsEVA2"),
        ("intp_freq", False, "backbone.intp_freq=False is not supported"),
    ],
)
def test_unsupported_fields_are_named(golden, key, value, message):
    config = dict(golden["backbone_config"], **{key: value})
    with pytest.raises(ConfigError, match=message):
        official_backbone(golden, config)


def test_dinov2_converts_through_backbone_from_official_too():
    """The shared DINOv2 golden (official ReinsDinoVisionTransformer) through the same entry point."""
    golden = load_golden("dinov2_lora_rein_tiny.pt")
    config = dict(golden["vit_config"], type="ReinsDinoVisionTransformer", reins_config=golden["rein_config"])
    reins = {f"reins.{k}": v for k, v in golden["rein_state_dict"].items()}
    backbone = backbone_from_official(config, golden["backbone_state_dict"], reins)
    with torch.no_grad():
        features, queries = backbone(golden["image"])
    for ours, theirs in zip(features, golden["features"], strict=False):
        assert_matches(ours, theirs, tol=1e-5)
    assert_matches(queries, golden["queries"], tol=1e-5)


def test_eva02_release_weights_convert_to_512_px_as_the_official_script(tmp_path):
    """tools/convert_models/convert_eva2_512x512.py, run on a tiny patch-14 EVA02 (golden): reinseg's
    loading of the original weights at patch 16 and 512 px gives the same kernel and positions."""
    golden = load_golden("eva2_conversion_tiny.pt")
    torch.save({"model": golden["release"]}, tmp_path / "eva02_p14.pt")
    backbone = backbone_from_official(
        dict({k: v for k, v in golden["eva2_config"].items() if k != "pt_hw_seq_len"}, img_size=512, patch_size=16),
        torch.load(tmp_path / "eva02_p14.pt", weights_only=True),
    )
    converted = golden["converted"]
    assert_matches(backbone.vit.patch_embed.proj.weight, converted["patch_embed.proj.weight"], tol=1e-6)
    assert_matches(backbone.vit.pos_embed, converted["pos_embed"], tol=1e-6)
    assert backbone.vit.pos_embed.shape == (1, 1 + 32 * 32, 32)
    for key in ("blocks.0.attn.q_proj.weight", "blocks.0.mlp.w1.weight"):
        timm_key = key.replace("mlp.w1", "mlp.fc1_g")
        assert torch.equal(backbone.vit.state_dict()[timm_key], converted[key])
