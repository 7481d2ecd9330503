import pytest
import torch
import torch.nn.functional as F
from conftest import load_golden, tiny_overrides
from safetensors.torch import save_file
from torch import Tensor

from reinseg import build_backbone
from reinseg.pretrained import read_state_dict

TINY = tiny_overrides("dinov2_vits14")


def official_dinov2_conversion(weight, old_grid, new_grid, patch):
    """tools/convert_models/convert_dinov2_large_512x512.py of the official Rein, for any size."""
    weight = dict(weight)
    dim = weight["pos_embed"].shape[-1]
    weight["pos_embed"] = torch.cat(
        (
            weight["pos_embed"][:, :1, :],
            F.interpolate(
                weight["pos_embed"][:, 1:, :].reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2),
                size=(new_grid, new_grid),
                mode="bicubic",
                align_corners=False,
            )
            .permute(0, 2, 3, 1)
            .reshape(1, new_grid * new_grid, dim),
        ),
        dim=1,
    )
    weight["patch_embed.proj.weight"] = F.interpolate(
        weight["patch_embed.proj.weight"].float(), size=(patch, patch), mode="bicubic", align_corners=False
    )
    return weight


def dinov2_release_layout(grid=5, patch=14, registers=False):
    """A tiny state dict in the layout Facebook releases DINOv2 in (patch 14, square grid + CLS)."""
    source = build_backbone(
        "dinov2_vits14_reg" if registers else "dinov2_vits14", img_size=grid * patch, patch_size=patch, **TINY
    )
    state = {k: v.clone() for k, v in source.vit.state_dict().items()}
    if registers:  # back from timm's no-embed-class layout to the original one
        state["register_tokens"] = state.pop("reg_token")
        cls_pos = torch.randn(1, 1, 32)
        state["cls_token"] = state["cls_token"] - cls_pos[:, 0]
        state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    state["mask_token"] = torch.zeros(1, 32)
    state["norm.weight"], state["norm.bias"] = torch.ones(32), torch.zeros(32)
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_of_a_saved_backbone(tmp_path, suffix):
    source = build_backbone("dinov2_vits14", img_size=32, patch_size=16, **TINY)
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.vit.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    loaded = build_backbone("dinov2_vits14", img_size=32, patch_size=16, checkpoint=path, **TINY)
    for key, value in source.vit.state_dict().items():
        assert torch.equal(loaded.vit.state_dict()[key], value), key
    images = torch.randn(1, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(source(images).features, loaded(images).features, strict=False))


def test_dinov2_release_converts_14_to_16_as_the_official_script(tmp_path):
    release = dinov2_release_layout(grid=5, patch=14)
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(release, path)
    backbone = build_backbone("dinov2_vits14", img_size=64, patch_size=16, checkpoint=path, **TINY)
    expected = official_dinov2_conversion(release, old_grid=5, new_grid=4, patch=16)
    loaded = backbone.vit.state_dict()
    assert loaded["patch_embed.proj.weight"].shape == (32, 3, 16, 16)
    assert loaded["pos_embed"].shape == (1, 1 + 16, 32)
    assert torch.equal(loaded["patch_embed.proj.weight"], expected["patch_embed.proj.weight"])
    assert torch.equal(loaded["pos_embed"], expected["pos_embed"])
    for key, value in loaded.items():
        if key not in ("patch_embed.proj.weight", "pos_embed"):
            assert torch.equal(value, release[key]), key


def test_converted_file_loads_unchanged(tmp_path):
    """Weights already converted by the official script (the golden layout) are not resampled again."""
    release = dinov2_release_layout(grid=5, patch=14)
    converted = official_dinov2_conversion(release, old_grid=5, new_grid=4, patch=16)
    path = tmp_path / "dinov2_converted.pth"
    torch.save(converted, path)
    backbone = build_backbone("dinov2_vits14", img_size=64, patch_size=16, checkpoint=path, **TINY)
    for key, value in backbone.vit.state_dict().items():
        assert torch.equal(value, converted[key]), key


def test_grid_only_resize(tmp_path):
    release = dinov2_release_layout(grid=5, patch=14)
    path = tmp_path / "w.pth"
    torch.save(release, path)
    backbone = build_backbone("dinov2_vits14", img_size=3 * 14, checkpoint=path, **TINY)
    assert torch.equal(backbone.vit.patch_embed.proj.weight, release["patch_embed.proj.weight"])
    expected = official_dinov2_conversion(release, old_grid=5, new_grid=3, patch=14)["pos_embed"]
    assert torch.equal(backbone.vit.pos_embed, expected)


def test_timm_resampling_is_available_and_differs(tmp_path):
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    release = dinov2_release_layout(grid=5, patch=14)
    path = tmp_path / "w.pth"
    torch.save(release, path)
    backbone = build_backbone("dinov2_vits14", img_size=64, patch_size=16, checkpoint=path, resample="timm", **TINY)
    kernel = resample_patch_embed(release["patch_embed.proj.weight"], [16, 16], verbose=False)
    pos = resample_abs_pos_embed(release["pos_embed"], [4, 4], [5, 5], num_prefix_tokens=1)
    assert torch.allclose(backbone.vit.patch_embed.proj.weight, kernel)
    assert torch.allclose(backbone.vit.pos_embed, pos)
    official = official_dinov2_conversion(release, old_grid=5, new_grid=4, patch=16)
    assert not torch.allclose(backbone.vit.patch_embed.proj.weight, official["patch_embed.proj.weight"])
    with pytest.raises(ValueError, match="resample"):
        build_backbone("dinov2_vits14", img_size=64, patch_size=16, checkpoint=path, resample="nearest", **TINY)


def test_dinov2_with_registers_release_layout(tmp_path):
    release = dinov2_release_layout(grid=4, patch=16, registers=True)
    path = tmp_path / "w.pth"
    torch.save(release, path)
    backbone = build_backbone(
        "dinov2_vits14_reg", img_size=64, patch_size=16, checkpoint=path, **tiny_overrides("dinov2_vits14_reg")
    )
    vit = backbone.vit
    assert torch.equal(vit.reg_token, release["register_tokens"])
    # Original DINOv2 adds the CLS position to the CLS token and inserts registers after it.
    images = torch.randn(1, 3, 64, 64)
    patches = vit.patch_embed(images).reshape(1, 16, 32)
    with_pos = torch.cat([release["cls_token"], patches], dim=1) + release["pos_embed"]
    expected = torch.cat([with_pos[:, :1], release["register_tokens"], with_pos[:, 1:]], dim=1)
    embedded, _ = backbone.family.embed(vit, images)
    assert torch.allclose(embedded, expected, atol=1e-6)


def openai_clip_layout(vit) -> dict:
    """A tiny timm CLIP's weights in the layout of OpenAI's release file (clip/model.py): the
    image tower under ``visual.`` and the text tower beside it, whose (77, C) position
    embedding is the unprefixed ``positional_embedding``."""
    renames = [
        ("patch_embed.proj", "conv1"),
        ("norm_pre", "ln_pre"),
        ("blocks.", "transformer.resblocks."),
        ("norm1", "ln_1"),
        ("norm2", "ln_2"),
        ("attn.qkv.", "attn.in_proj_"),
        ("attn.proj", "attn.out_proj"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
    ]
    release = {}
    for key, value in vit.state_dict().items():
        if key == "pos_embed":
            key, value = "positional_embedding", value[0]
        elif key == "cls_token":
            key, value = "class_embedding", value[0, 0]
        for ours, theirs in renames:
            key = key.replace(ours, theirs)
        release[f"visual.{key}"] = value.clone()
    width = vit.embed_dim
    release.update({"visual.ln_post.weight": torch.ones(width), "visual.ln_post.bias": torch.zeros(width)})
    release["visual.proj"] = torch.randn(width, 16)
    release.update(
        positional_embedding=torch.randn(77, 24),
        text_projection=torch.randn(24, 16),
        logit_scale=torch.tensor(4.6),
    )
    release["token_embedding.weight"] = torch.randn(100, 24)
    release["transformer.resblocks.0.attn.in_proj_weight"] = torch.randn(72, 24)
    release["ln_final.weight"] = torch.ones(24)
    return release


@pytest.mark.parametrize("resample", ["official", "timm"])
def test_openai_clip_release_layout_with_its_text_tower(tmp_path, resample):
    overrides = tiny_overrides("clip_vitl14")
    source = build_backbone("clip_vitl14", img_size=64, patch_size=16, **overrides)  # grid 4
    path = tmp_path / "ViT-L-14.pt"
    torch.save(openai_clip_layout(source.vit), path)
    backbone = build_backbone(
        "clip_vitl14", img_size=80, patch_size=16, checkpoint=path, resample=resample, **overrides
    )
    vit = backbone.vit
    assert torch.equal(vit.blocks[1].mlp.fc2.weight, source.vit.blocks[1].mlp.fc2.weight)
    assert torch.equal(vit.cls_token, source.vit.cls_token)
    assert vit.pos_embed.shape == (1, 1 + 25, vit.embed_dim)
    assert torch.equal(vit.pos_embed[:, :1], source.vit.pos_embed[:, :1])


def test_a_position_embedding_of_no_grid_is_named_with_its_file(tmp_path):
    release = dinov2_release_layout(grid=4, patch=16)
    release["pos_embed"] = release["pos_embed"][:, :-3]
    path = tmp_path / "w.pth"
    torch.save(release, path)
    with pytest.raises(ValueError, match=r"w.pth: pos_embed: a position embedding of 14 tokens is not a square grid"):
        build_backbone("dinov2_vits14", img_size=80, patch_size=16, checkpoint=path, **TINY)


def test_chunked_block_names_are_understood(tmp_path):
    release = dinov2_release_layout(grid=4, patch=16)
    chunked = {k.replace("blocks.", "blocks.0.", 1) if k.startswith("blocks.") else k: v for k, v in release.items()}
    path = tmp_path / "w.pth"
    torch.save(chunked, path)
    backbone = build_backbone("dinov2_vits14", img_size=64, patch_size=16, checkpoint=path, **TINY)
    assert torch.equal(backbone.vit.blocks[3].mlp.fc2.weight, release["blocks.3.mlp.fc2.weight"])


def test_sam_release_layout_with_another_resolution(tmp_path):
    overrides = tiny_overrides("sam_vitb16")
    source = build_backbone("sam_vitb16", img_size=128, **overrides)  # grid 8, stands for SAM's 1024 px
    release = {f"image_encoder.{k}".replace("mlp.fc", "mlp.lin"): v for k, v in source.vit.state_dict().items()}
    release["prompt_encoder.point_embeddings.0.weight"] = torch.zeros(1, 256)
    path = tmp_path / "sam.pth"
    torch.save(release, path)
    backbone = build_backbone("sam_vitb16", img_size=64, checkpoint=path, **overrides)
    vit = backbone.vit
    assert vit.pos_embed.shape == (1, 4, 4, 32)
    global_attn = vit.blocks[1].attn
    assert global_attn.rel_pos_h.shape[0] == 2 * 4 - 1
    assert torch.equal(vit.blocks[0].mlp.fc1.weight, source.vit.blocks[0].mlp.fc1.weight)
    expected = F.interpolate(
        source.vit.pos_embed.permute(0, 3, 1, 2), size=(4, 4), mode="bicubic", align_corners=False
    ).permute(0, 2, 3, 1)
    assert torch.allclose(vit.pos_embed, expected)
    features = backbone(torch.randn(1, 3, 64, 64)).features
    assert features[2].shape == (1, 32, 4, 4)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    release = dinov2_release_layout(grid=4, patch=16)
    del release["blocks.2.attn.qkv.weight"]
    release["blocks.9.attn.qkv.weight"] = torch.zeros(96, 32)
    path = tmp_path / "broken.pth"
    torch.save(release, path)
    with pytest.raises(ValueError) as err:
        build_backbone("dinov2_vits14", img_size=64, patch_size=16, checkpoint=path, **TINY)
    message = str(err.value)
    assert str(path) in message
    assert "missing keys (1): blocks.2.attn.qkv.weight" in message
    assert "unexpected keys (1): blocks.9.attn.qkv.weight" in message


def test_checkpoint_of_another_width_is_refused(tmp_path):
    release = dinov2_release_layout(grid=4, patch=16)
    path = tmp_path / "w.pth"
    torch.save(release, path)
    with pytest.raises(ValueError, match="shape mismatches"):
        build_backbone("dinov2_vits14", img_size=64, patch_size=16, checkpoint=path, embed_dim=48, depth=4, num_heads=2)


def test_unreadable_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match=r"garbage\.pth is not a weight file"):
        read_state_dict(garbage)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        build_backbone("dinov2_vits14", img_size=32, patch_size=16, checkpoint=tmp_path / "nowhere.pth", **TINY)
    empty = tmp_path / "empty.pth"
    torch.save({"meta": {"epoch": 3}}, empty)
    with pytest.raises(ValueError, match="holds no tensors"):
        read_state_dict(empty)


def test_golden_layout_is_the_release_layout():
    """The golden backbone weights are in the layout the loader reads (guards the fixture itself)."""
    state = load_golden("dinov2_lora_rein_tiny.pt")["backbone_state_dict"]
    assert "mask_token" in state and "blocks.0.ls1.gamma" in state


def test_objects_of_unknown_classes_in_a_checkpoint_are_refused_by_name(tmp_path):
    import collections
    import fractions

    source = build_backbone("dinov2_vits14", img_size=32, patch_size=16, **TINY)
    # Weights next to an object of a class outside the allow-list (reinseg.safe_load.FRAMEWORK_GLOBALS):
    # reading it would mean importing and calling that class.
    payload = {
        "state_dict": collections.OrderedDict(source.vit.state_dict()),
        "meta": {"hub": fractions.Fraction(1, 3), "iter": 40000},
    }
    torch.save(payload, tmp_path / "mm.pth")
    with pytest.raises(ValueError, match=r"mm\.pth: refused .* fractions\.Fraction"):
        read_state_dict(tmp_path / "mm.pth")


def dinov3_release_layout(vit, qkv_bias: Tensor | None = None) -> dict:
    """A tiny timm DINOv3's weights in the layout of the original release (facebookresearch/dinov3):
    ``storage_tokens``, ``ls1.gamma``, the rotary periods, the mask token, and the S to H+ models'
    attention biases with their key mask."""
    names = [("reg_token", "storage_tokens"), ("gamma_1", "ls1.gamma"), ("gamma_2", "ls2.gamma")]
    release = {}
    for key, value in vit.state_dict().items():
        for ours, theirs in names:
            key = key.replace(ours, theirs)
        release[key] = value.clone()
    width = vit.embed_dim
    release["rope_embed.periods"] = torch.ones(width // vit.blocks[0].attn.num_heads // 4)
    release["mask_token"] = torch.zeros(1, width)
    for i in range(len(vit.blocks)):
        release[f"blocks.{i}.attn.qkv.bias"] = torch.zeros(3 * width) if qkv_bias is None else qkv_bias.clone()
        key_masked = torch.cat([torch.ones(width), torch.zeros(width), torch.ones(width)])
        release[f"blocks.{i}.attn.qkv.bias_mask"] = key_masked
    return release


def test_dinov3_release_with_zero_attention_biases_loads_quietly(tmp_path, capfd):
    overrides = tiny_overrides("dinov3_vits16")
    source = build_backbone("dinov3_vits16", img_size=64, **overrides)
    path = tmp_path / "dinov3.pth"
    torch.save(dinov3_release_layout(source.vit), path)
    backbone = build_backbone("dinov3_vits16", img_size=64, checkpoint=path, **overrides)
    for key, value in source.vit.state_dict().items():
        assert torch.equal(backbone.vit.state_dict()[key], value), key
    assert capfd.readouterr().out == ""  # timm's filter printed a line per block


def test_dinov3_release_with_query_biases_is_refused_by_name(tmp_path):
    """The bias-free architecture would drop them silently (7.5e-3 off in a tiny model)."""
    overrides = tiny_overrides("dinov3_vits16")
    source = build_backbone("dinov3_vits16", img_size=64, **overrides)
    bias = torch.zeros(3 * 32)
    bias[:32] = 0.01
    path = tmp_path / "dinov3.pth"
    torch.save(dinov3_release_layout(source.vit, qkv_bias=bias), path)
    with pytest.raises(ValueError, match=r"dinov3.pth: blocks.0.attn.qkv.bias holds non-zero query and value biases"):
        build_backbone("dinov3_vits16", img_size=64, checkpoint=path, **overrides)


def test_a_dino_training_checkpoint_loads_its_teachers_backbone(tmp_path):
    """DINOv2 and DINOv3 save {"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}."""
    release = dinov2_release_layout(grid=4, patch=16)
    teacher = {f"backbone.{k}": v for k, v in release.items()}
    teacher["dino_head.mlp.0.weight"] = torch.zeros(8, 32)
    teacher["ibot_head.last_layer.weight"] = torch.zeros(8, 8)
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": teacher}, path)
    backbone = build_backbone("dinov2_vits14", img_size=64, patch_size=16, checkpoint=path, **TINY)
    assert torch.equal(backbone.vit.blocks[2].mlp.fc1.weight, release["blocks.2.mlp.fc1.weight"])
