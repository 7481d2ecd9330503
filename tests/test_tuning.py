import re

import pytest
import torch
from conftest import tiny_model_config, tiny_overrides

from reinseg.build import build_segmentor
from reinseg.checkpoints import checkpoint_state_dict, save_checkpoint, segmentor_from_checkpoint
from reinseg.config import BackboneConfig, SetConfig, to_dict
from reinseg.families import sam_block_with_prompts
from reinseg.tuning import strategy_names

TUNINGS = strategy_names()

FAMILIES = ["dinov2_vits14", "clip_vitl14", "eva02_vitl14", "dinov3_vits16", "sam_vitb16"]

# Which parameters train with each strategy (besides the head).
TRAINS = {
    "frozen": lambda name: False,
    "full": lambda name: name.startswith("backbone.vit."),
    "rein": lambda name: name.startswith("backbone.rein."),
    "lora": lambda name: ".lora_" in name,
    "vpt": lambda name: name == "backbone.prompts.tokens",
    "adaptformer": lambda name: ".adaptformer." in name,
    "fada": lambda name: name.startswith("backbone.rein."),
    "set": lambda name: name.startswith("backbone.rein."),
    # the minor components and the biases of the linear layers of blocks >= start_block (1 here)
    "soma": lambda name: (
        ".lora_" in name
        or bool(
            re.fullmatch(
                r"backbone\.vit\.blocks\.[1-9]\.(attn|mlp)\.(qkv|[qkv]_proj|proj|fc1|fc1_[gx]|fc2)\.bias", name
            )
        )
    ),
}


def with_trained_layer_scale(*models):
    """timm initialises DINOv2's layer scales at 1e-5, which hides every block's contribution."""
    with torch.no_grad():
        for model in models:
            for name, param in model.named_parameters():
                if name.endswith(("ls1.gamma", "ls2.gamma", "gamma_1", "gamma_2")):
                    param.fill_(1.0)


def tiny_config(name, tuning):
    config = tiny_model_config()
    config.tuning = tuning
    config.backbone = BackboneConfig(
        name=name, img_size=64, patch_size=16, out_indices=[0, 1, 2, 3], timm_kwargs=tiny_overrides(name)
    )
    config.lora.rank = 2
    config.vpt.num_prompts = 3
    config.adaptformer.bottleneck = 4
    config.fada.token_length, config.fada.lora_dim, config.fada.query_dims = 8, 4, 32
    config.set = SetConfig(token_length=8, lora_dim=4, query_dims=32)
    config.soma.rank = 2
    config.soma.start_block = 1
    return config


# The fast tier keeps every strategy on both DINOs, and every family with the strategies that
# reach into its blocks in their own way (Rein, LoRA, VPT, AdaptFormer, SoMA); the others (no
# module: frozen, full; Rein's kind of module: fada, set) on CLIP, EVA02 and SAM in the full suite.
_FAST_EVERYWHERE = {"rein", "lora", "vpt", "adaptformer", "soma"}


@pytest.mark.parametrize(
    ("name", "tuning"),
    [
        pytest.param(
            name,
            tuning,
            marks=pytest.mark.slow if tuning not in _FAST_EVERYWHERE and not name.startswith("dinov") else (),
        )
        for name in FAMILIES
        for tuning in TUNINGS
    ],
)
def test_each_strategy_trains_exactly_its_parameters(name, tuning):
    segmentor = build_segmentor(tiny_config(name, tuning)).train()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))
    segmentor.loss(images, labels)["loss"].backward()
    for param_name, param in segmentor.named_parameters():
        intended = param_name.startswith("head.") or TRAINS[tuning](param_name)
        assert param.requires_grad == intended, param_name
        if intended:
            assert param.grad is not None, param_name
        else:
            assert param.grad is None, param_name
    assert any(TRAINS[tuning](n) for n, _ in segmentor.named_parameters()) == (tuning != "frozen")


@pytest.mark.parametrize("tuning", ["lora", "adaptformer", "soma"])
@pytest.mark.parametrize("name", FAMILIES)
def test_added_modules_start_as_identity_and_are_in_the_path(name, tuning):
    torch.manual_seed(0)
    frozen = build_segmentor(tiny_config(name, "frozen")).eval()
    torch.manual_seed(0)
    tuned = build_segmentor(tiny_config(name, tuning)).eval()
    images = torch.randn(1, 3, 64, 64)
    with_trained_layer_scale(frozen, tuned)
    with torch.no_grad():
        before = frozen.backbone(images).features
        assert all(
            torch.allclose(a, b, atol=1e-6) for a, b in zip(tuned.backbone(images).features, before, strict=False)
        )
        for param_name, param in tuned.named_parameters():
            if TRAINS[tuning](param_name):
                param.normal_()
        after = tuned.backbone(images).features
    assert not torch.allclose(after[2], before[2], atol=1e-3)


@pytest.mark.parametrize("name", FAMILIES)
def test_prompts_change_the_features_and_keep_their_shapes(name):
    torch.manual_seed(0)
    frozen = build_segmentor(tiny_config(name, "frozen")).eval()
    torch.manual_seed(0)
    prompted = build_segmentor(tiny_config(name, "vpt")).eval()
    with_trained_layer_scale(frozen, prompted)
    images = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        before, after = frozen.backbone(images).features, prompted.backbone(images).features
    assert [a.shape for a in after] == [b.shape for b in before]
    assert not torch.allclose(after[3], before[3], atol=1e-4)


def test_sam_prompts_are_extra_tokens_of_the_global_attention():
    """Without windows or relative positions, SAM's attention treats all tokens alike: the prompts
    then act exactly as an extra row of tokens whose outputs are dropped."""
    from timm.models.vision_transformer_sam import Block

    torch.manual_seed(0)
    block = Block(dim=16, num_heads=2, window_size=0, use_rel_pos=False).eval()
    x = torch.randn(2, 3, 5, 16)
    prompts = torch.randn(5, 16)
    with torch.no_grad():
        ours = sam_block_with_prompts(block, x, prompts)
        with_row = block(torch.cat([x, prompts.expand(2, 1, 5, 16)], dim=1))[:, :3]
    assert torch.allclose(ours, with_row, atol=1e-5)


# Rein in the fast tier; every strategy in the full suite.
@pytest.mark.parametrize("tuning", [pytest.param(t, marks=() if t == "rein" else pytest.mark.slow) for t in TUNINGS])
def test_save_and_load_round_trip(tmp_path, tuning):
    config = tiny_config("eva02_vitl14", tuning)
    vfm = tmp_path / "vfm.pth"
    torch.save(build_segmentor(tiny_config("eva02_vitl14", "frozen")).backbone.vit.state_dict(), vfm)
    config.backbone.checkpoint = str(vfm)
    segmentor = build_segmentor(config).eval()
    with torch.no_grad():
        for _name, param in segmentor.named_parameters():
            if param.requires_grad:
                param.normal_(std=0.02)  # as if trained
    saved = checkpoint_state_dict(segmentor)
    vfm_keys = {k for k in segmentor.state_dict() if k.startswith("backbone.vit.")}
    if tuning == "full":
        assert vfm_keys <= set(saved)
    else:  # the frozen VFM weights are referenced: only the trainable ones inside it are stored
        trainable = {n for n, p in segmentor.named_parameters() if p.requires_grad}
        assert vfm_keys & set(saved) <= trainable
    save_checkpoint(tmp_path / "c.pt", {"model": to_dict(config)}, saved)
    restored, _ = segmentor_from_checkpoint(tmp_path / "c.pt")
    images = torch.randn(1, 3, 64, 64)
    assert torch.allclose(restored.predict(images, mode="whole"), segmentor.predict(images, mode="whole"), atol=1e-6)


def test_lora_targets_that_match_nothing():
    config = tiny_config("dinov2_vits14", "lora")
    config.lora.targets = ["to_q"]
    with pytest.raises(ValueError, match=r"model.lora.targets \['to_q'\] match no attention projection"):
        build_segmentor(config)


def test_lora_without_peft_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "peft", None)  # as if not installed
    with pytest.raises(RuntimeError, match=r"pip install 'reinseg\[lora\]'"):
        build_segmentor(tiny_config("dinov2_vits14", "lora"))


def test_prompt_tokens_take_no_weight_decay_as_reins_tokens():
    from reinseg.engine import parameter_groups

    segmentor = build_segmentor(tiny_config("dinov2_vits14", "vpt"))
    groups = parameter_groups(segmentor, lr=1e-4, weight_decay=0.05, backbone_lr_mult=1.0)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(segmentor.backbone.prompts.tokens)] == 0.0


@pytest.mark.parametrize(
    "tuning, backbone",
    [("rein", "dinov2_vits14"), ("rein", "resnet50_v1c"), ("fada", "dinov2_vits14"), ("set", "dinov2_vits14")],
)
def test_without_linked_queries_every_trainable_parameter_gets_a_gradient(tuning, backbone):
    """link_token_to_query: false leaves Rein's (FADA's, SET's) transform and merge unused (the head
    learns its own queries): they are frozen, as DDP runs without find_unused_parameters and fails
    at the second step on a trainable parameter without a gradient."""
    config = tiny_config("dinov2_vits14", tuning)
    if backbone == "resnet50_v1c":
        config.backbone = BackboneConfig(
            name=backbone,
            patch_size=None,
            timm_kwargs=dict(block="basic", layers=[1, 1, 1, 1], stem_width=4, channels=[8, 16, 32, 64]),
        )
    getattr(config, tuning).link_token_to_query = False
    segmentor = build_segmentor(config).train()
    images, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))
    segmentor.loss(images, labels)["loss"].backward()
    without = [n for n, p in segmentor.named_parameters() if p.requires_grad and p.grad is None]
    assert without == []
    frozen = {n for n, p in segmentor.named_parameters() if n.startswith("backbone.rein.") and not p.requires_grad}
    assert frozen and all(n.rsplit(".", 2)[-2] in ("transform", "merge") for n in frozen)
    assert any(n.startswith("backbone.rein.") and p.requires_grad for n, p in segmentor.named_parameters())
