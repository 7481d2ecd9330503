"""The parts of timm reinseg relies on beyond its public model API, pinned.

reinseg runs timm's blocks itself (families.py) and converts release checkpoints with timm's
filters, so it touches functions and attributes timm may rename between releases. pyproject.toml
bounds timm's version; this test fails loudly, naming what moved, when a timm inside the bound
changes them.
"""

import inspect

import pytest
import timm
import torch
from conftest import tiny_overrides

from reinseg import build_backbone

FUNCTIONS = {
    "timm.layers": ["resample_abs_pos_embed", "resample_abs_pos_embed_nhwc", "resample_patch_embed"],
    "timm.models._hub": ["load_state_dict_from_hf"],
    "timm.models.eva": ["checkpoint_filter_fn"],
    "timm.models.vision_transformer": ["checkpoint_filter_fn"],
    "timm.models.vision_transformer_sam": [
        "checkpoint_filter_fn",
        "get_decomposed_rel_pos_bias",
        "window_partition",
        "window_unpartition",
    ],
}


@pytest.mark.parametrize("module", sorted(FUNCTIONS))
def test_functions_reinseg_imports_exist(module):
    imported = __import__(module, fromlist=["_"])
    missing = [name for name in FUNCTIONS[module] if not callable(getattr(imported, name, None))]
    assert not missing, f"timm {timm.__version__}: {module} no longer has {missing}"


def test_signatures_reinseg_calls():
    from timm.layers import resample_abs_pos_embed
    from timm.models.vision_transformer_sam import get_decomposed_rel_pos_bias, window_partition

    assert "num_prefix_tokens" in inspect.signature(resample_abs_pos_embed).parameters
    assert len(inspect.signature(get_decomposed_rel_pos_bias).parameters) == 5
    assert list(inspect.signature(window_partition).parameters)[:2] == ["x", "window_size"]
    assert callable(timm.models.get_pretrained_cfg)


# Attributes of timm's models that the family adapters read, per zoo family.
ATTRIBUTES = {
    "dinov2_vits14_reg": [
        "patch_embed.grid_size",
        "cls_token",
        "reg_token",
        "no_embed_class",
        "num_prefix_tokens",
        "norm_pre",
        "patch_drop",
        "pos_drop",
        "pos_embed",
        "blocks.0.ls1.gamma",
    ],
    "clip_vitl14": ["patch_embed.grid_size", "no_embed_class", "norm_pre", "pos_embed"],
    "eva02_vitl14": ["_pos_embed", "norm_pre", "num_prefix_tokens", "blocks.0.attn.num_prefix_tokens"],
    "sam_vitb16": [
        "pos_embed",
        "norm_pre",
        "patch_drop",
        "pos_drop",
        "blocks.0.window_size",
        "blocks.0.attn.use_rel_pos",
        "blocks.0.attn.qkv",
        "blocks.0.attn.q_norm",
        "blocks.0.attn.k_norm",
        "blocks.0.norm1",
        "blocks.0.ls1",
    ],
}


@pytest.mark.parametrize("name", sorted(ATTRIBUTES))
def test_model_attributes_the_families_read(name):
    backbone = build_backbone(name, img_size=32, patch_size=16, **tiny_overrides(name))
    missing = []
    for dotted in ATTRIBUTES[name]:
        value = backbone.vit
        for part in dotted.split("."):
            if part.isdigit():
                value = value[int(part)]
            elif hasattr(value, part):
                value = getattr(value, part)
            else:
                missing.append(dotted)
                break
    assert not missing, f"timm {timm.__version__}: {name} no longer has {missing}"
    # And the embedding they feed still runs end to end.
    with torch.no_grad():
        features, _ = backbone(torch.randn(1, 3, 32, 32))
    assert features[2].shape[-2:] == (2, 2)
