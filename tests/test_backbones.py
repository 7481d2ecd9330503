import math

import pytest
import torch
import torch.nn.functional as F
from conftest import load_golden, tiny_overrides

from reinseg import BACKBONES, build_backbone, list_backbones
from reinseg.backbones import backbone_kind, default_out_indices

TINY_REIN = dict(lora_dim=4, token_length=6, query_dims=16)
# The ViT entries of the zoo (the CNN entries have their own tests, tests/test_cnn.py).
VIT_NAMES = [name for name in list_backbones() if backbone_kind(name) == "vit"]
# Full-size builds take up to a second each: the fast tier builds the smallest entry of each
# architecture (DINOv2, DINOv3, EVA02, timm's plain ViT, SAM), the slow tier all of them.
FAST_FULL_SIZE = {"dinov2_vits14", "dinov3_vits16", "eva02_vitl14", "clip_vitl14", "sam_vitb16"}
FULL_SIZE = [pytest.param(n, marks=() if n in FAST_FULL_SIZE else pytest.mark.slow) for n in VIT_NAMES]


@pytest.fixture(scope="module")
def golden():
    return load_golden("dinov2_lora_rein_tiny.pt")


def build_golden_backbone(golden, tmp_path, **kwargs):
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(golden["backbone_state_dict"], path)
    return build_backbone(
        "dinov2_vits14",
        img_size=64,
        patch_size=16,
        embed_dim=64,
        depth=4,
        num_heads=4,
        out_indices=[0, 1, 2, 3],
        checkpoint=path,
        **kwargs,
    )


def test_golden_dinov2_rein_parity(golden, tmp_path):
    backbone = build_golden_backbone(golden, tmp_path, rein=dict(lora_dim=4, token_length=10, query_dims=32))
    backbone.rein.load_state_dict(golden["rein_state_dict"], strict=True)
    with torch.no_grad():
        features, queries = backbone(golden["image"])
    assert len(features) == 4
    for ours, expected in zip(features, golden["features"], strict=False):
        assert ours.shape == expected.shape
        assert (ours - expected).abs().max().item() <= 1e-5
    assert (queries - golden["queries"]).abs().max().item() <= 1e-5


def test_zero_delta_leaves_the_backbone_output_unchanged(golden, tmp_path):
    plain = build_golden_backbone(golden, tmp_path)
    adapted = build_golden_backbone(
        golden, tmp_path, rein=dict(lora_dim=4, token_length=10, query_dims=32, zero_mlp_delta_f=True)
    )
    image = golden["image"]
    with torch.no_grad():
        expected = plain(image).features
        features, _ = adapted(image)
        for ours, theirs in zip(features, expected, strict=False):
            assert torch.equal(ours, theirs)
        # With a real delta the output moves.
        adapted.rein.mlp_delta_f.weight.normal_()
        moved, _ = adapted(image)
    assert not torch.allclose(moved[2], expected[2])


def test_a_forward_takes_reins_layers_from_one_unbind_of_their_stacked_tokens(monkeypatch):
    """``Rein.one_forward`` around the blocks: no layer's tokens indexed out of their stack
    (whose backward fills a zero gradient of the whole stack per layer)."""
    from reinseg.rein import Rein

    backbone = build_backbone(
        "dinov2_vits14", img_size=64, patch_size=16, rein=TINY_REIN, **tiny_overrides("dinov2_vits14")
    )
    taken: list[tuple[str, int, bool]] = []  # (parameter, layer, inside one_forward)
    of_layer = Rein._of_layer

    def recorded(self, name, layer):
        taken.append((name, layer, self._per_layer is not None))
        return of_layer(self, name, layer)

    monkeypatch.setattr(Rein, "_of_layer", recorded)
    backbone.train()(torch.randn(1, 3, 64, 64))
    depth = len(backbone.vit.blocks)
    assert sorted({(name, layer) for name, layer, _ in taken}) == [
        (name, layer) for name in ("learnable_tokens_a", "learnable_tokens_b") for layer in range(depth)
    ]
    assert all(inside for *_, inside in taken) and backbone.rein._per_layer is None


@pytest.mark.parametrize("name", VIT_NAMES)
def test_every_zoo_entry_runs_forward_and_backward_with_only_rein_learning(name):
    backbone = build_backbone(name, img_size=64, patch_size=16, rein=TINY_REIN, **tiny_overrides(name))
    backbone.train()
    images = torch.randn(2, 3, 64, 96)  # non-square and not the build size
    features, queries = backbone(images)
    expected = [(2, 32, 16, 24), (2, 32, 8, 12), (2, 32, 4, 6), (2, 32, 2, 3)]  # strides 4, 8, 16, 32
    assert [tuple(f.shape) for f in features] == expected
    assert queries.shape == (6, 16)
    (sum(f.square().mean() for f in features) + queries.square().mean()).backward()
    for param_name, param in backbone.named_parameters():
        if param_name.startswith("rein."):
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, param_name
        else:
            assert not param.requires_grad and param.grad is None, param_name


@pytest.mark.parametrize("name", FULL_SIZE)
def test_every_zoo_entry_builds_full_size_on_the_meta_device(name):
    with torch.device("meta"):
        backbone = build_backbone(name, img_size=512, patch_size=16, rein={})
        features, queries = backbone(torch.empty(1, 3, 512, 512))
    width = backbone.embed_dim
    assert [tuple(f.shape) for f in features] == [(1, width, s, s) for s in (128, 64, 32, 16)]
    assert queries.shape == (100, 256)
    assert backbone.out_indices == default_out_indices(backbone.depth)


def test_dinov2_large_rein_has_the_papers_parameter_count():
    with torch.device("meta"):
        backbone = build_backbone(
            "dinov2_vitl14", img_size=512, patch_size=16, rein=dict(lora_dim=16, token_length=100, query_dims=256)
        )
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    assert trainable == 2_990_081
    assert sum(p.numel() for p in backbone.rein.parameters()) == trainable
    assert backbone.depth == 24 and backbone.embed_dim == 1024


def test_backbone_stays_in_eval_mode_while_rein_trains():
    backbone = build_backbone(
        "dinov2_vits14",
        img_size=32,
        patch_size=16,
        rein=TINY_REIN,
        drop_path_rate=0.5,
        **tiny_overrides("dinov2_vits14"),
    )
    backbone.train()
    assert backbone.training and backbone.rein.training
    assert not any(m.training for m in backbone.vit.modules())
    images = torch.randn(1, 3, 32, 32)
    first, _ = backbone(images)
    second, _ = backbone(images)  # drop-path would make these differ if the ViT were training
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=False))
    backbone.eval()
    assert not backbone.rein.training


def test_rein_fields_are_filled_from_the_backbone():
    backbone = build_backbone(
        "dinov2_vits14_reg", img_size=32, patch_size=16, rein=TINY_REIN, **tiny_overrides("dinov2_vits14_reg")
    )
    rein = backbone.rein
    assert (rein.num_layers, rein.embed_dims, rein.patch_size, rein.num_prefix_tokens) == (4, 32, 16, 5)
    sam = build_backbone("sam_vitb16", img_size=32, patch_size=16, rein=TINY_REIN, **tiny_overrides("sam_vitb16"))
    assert sam.rein.num_prefix_tokens == 0


def test_plain_backbone_returns_no_queries():
    backbone = build_backbone("mae_vitl16", img_size=32, patch_size=16, **tiny_overrides("mae_vitl16"))
    features, queries = backbone(torch.randn(1, 3, 32, 32))
    assert isinstance(features, list) and len(features) == 4 and queries is None
    linked_off = build_backbone(
        "mae_vitl16",
        img_size=32,
        patch_size=16,
        rein=dict(TINY_REIN, link_token_to_query=False),
        **tiny_overrides("mae_vitl16"),
    )
    assert linked_off(torch.randn(1, 3, 32, 32)).queries is None


def test_dinov2_interpolates_positions_as_the_original_code(golden, tmp_path):
    backbone = build_golden_backbone(golden, tmp_path)
    images = torch.randn(1, 3, 96, 48)  # grid 6x3 instead of the stored 4x4
    pos = golden["backbone_state_dict"]["pos_embed"]

    # DinoVisionTransformer.interpolate_pos_encoding of the official code.
    n = pos.shape[1] - 1
    w0, h0 = 96 // 16 + 0.1, 48 // 16 + 0.1
    patch_pos = F.interpolate(
        pos[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), 64).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
        mode="bicubic",
    )
    expected_pos = torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, 64)], dim=1)
    tokens = backbone.vit.patch_embed(images).reshape(1, -1, 64)
    expected = torch.cat([backbone.vit.cls_token, tokens], dim=1) + expected_pos
    embedded, _ = backbone.family.embed(backbone.vit, images)
    assert torch.allclose(embedded, expected, atol=1e-6)


@pytest.mark.parametrize("grid", [(6, 6), (3, 5), (8, 2)])
def test_dinov2_with_registers_interpolates_positions_as_its_original_code(grid):
    """facebookresearch/dinov2's register models: interpolate_antialias=True, interpolate_offset=0.0
    (their vision_transformer.py: bicubic to the grid's size, antialiased)."""
    import torch.nn.functional as F

    from reinseg.families import DINOv2Family

    backbone = build_backbone("dinov2_vits14_reg", img_size=64, patch_size=16, **tiny_overrides("dinov2_vits14_reg"))
    vit = backbone.vit
    vit.pos_embed.data.normal_()
    assert vit.pos_embed.shape[1] == 4 * 4  # patches only: the CLS position is folded into the token
    stored = vit.pos_embed.reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(stored, size=grid, mode="bicubic", align_corners=False, antialias=True)
    expected = expected.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)
    torch.testing.assert_close(DINOv2Family().position_embedding(vit, grid), expected, rtol=0, atol=1e-6)
    maps = backbone(torch.randn(1, 3, 16 * grid[0], 16 * grid[1]), resize=False).maps
    assert maps[2].shape[-2:] == grid


def test_default_out_indices_match_the_official_ones():
    assert default_out_indices(24) == [7, 11, 15, 23]
    assert default_out_indices(12) == [3, 5, 7, 11]
    assert default_out_indices(4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="out_indices"):
        default_out_indices(3)


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ValueError) as err:
        build_backbone("dinov2_vitx14")
    assert "dinov2_vitx14" in str(err.value)
    for name in BACKBONES:
        assert name in str(err.value)


def test_image_size_not_divisible_by_the_patch_size():
    with pytest.raises(ValueError, match="not divisible by the patch size 14"):
        build_backbone("dinov2_vits14", img_size=512, **tiny_overrides("dinov2_vits14"))
    backbone = build_backbone("dinov2_vits14", img_size=32, patch_size=16, **tiny_overrides("dinov2_vits14"))
    with pytest.raises(ValueError, match="image size 40x32 is not divisible by the patch size 16"):
        backbone(torch.randn(1, 3, 40, 32))


@pytest.mark.parametrize(
    "rein, message",
    [
        (dict(embed_dims=1024), "rein.embed_dims=1024 does not match"),
        (dict(num_layers=24), "rein.num_layers=24 does not match"),
        (dict(tokens=10), "unknown Rein arguments"),
    ],
)
def test_bad_rein_arguments_are_named(rein, message):
    with pytest.raises(ValueError, match=message):
        build_backbone("dinov2_vits14", img_size=32, patch_size=16, rein=rein, **tiny_overrides("dinov2_vits14"))


def test_bad_out_indices():
    with pytest.raises(ValueError, match="out_indices"):
        build_backbone(
            "dinov2_vits14", img_size=32, patch_size=16, out_indices=[0, 1, 2, 9], **tiny_overrides("dinov2_vits14")
        )


def test_pretrained_offline_says_to_pass_a_checkpoint():
    with pytest.raises(RuntimeError, match=r"could not download(.|\n)*pass checkpoint=PATH"):
        build_backbone("dinov2_vits14", img_size=32, patch_size=16, pretrained=True, **tiny_overrides("dinov2_vits14"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_head=2), r"timm_kwargs \(.*num_head=2\): timm cannot build dinov2_vits14 with them: .*'num_head'"),
        (dict(embed_dim=33), r"timm_kwargs \(embed_dim=33, .*\): timm cannot build .* divisible by num_heads"),
        (dict(num_heads=0), r"timm_kwargs \(.*num_heads=0\): timm cannot build"),
        (dict(depth=-1), r"timm_kwargs \(.*depth=-1.*\): timm cannot build"),
        (dict(act_layer="gelu_new2"), r"timm_kwargs \(.*act_layer='gelu_new2'\): timm cannot build .*gelu_new2"),
        (dict(img_size=32), r"timm_kwargs: set model.backbone.img_size instead"),
        (dict(pretrained=True, checkpoint="w.pth"), r"set model.backbone.checkpoint, model.backbone.pretrained inst"),
        (dict(num_classes=5), r"timm_kwargs: reinseg sets num_classes for dinov2_vits14 itself"),
        (dict(dynamic_img_size=False), r"timm_kwargs: reinseg sets dynamic_img_size for dinov2_vits14 itself"),
    ],
)
def test_timm_kwargs_timm_refuses_are_errors_naming_the_key(overrides, message):
    from conftest import tiny_model_config

    from reinseg.build import build_segmentor

    config = tiny_model_config()
    config.backbone.timm_kwargs = config.backbone.timm_kwargs | overrides
    with pytest.raises(ValueError, match=message):
        build_segmentor(config)


def test_a_cnns_timm_kwargs_timm_refuses_are_named():
    from test_cnn import tiny_cnn_config

    from reinseg.build import build_segmentor

    config = tiny_cnn_config()
    config.backbone.timm_kwargs = config.backbone.timm_kwargs | dict(layer=[1, 1, 1, 1])
    with pytest.raises(ValueError, match=r"timm_kwargs \(.*layer=\[1, 1, 1, 1\]\): timm cannot build resnet50_v1c"):
        build_segmentor(config)
    config = tiny_cnn_config()
    config.backbone.timm_kwargs = config.backbone.timm_kwargs | dict(num_classes=3)
    with pytest.raises(ValueError, match=r"timm_kwargs: reinseg sets num_classes for resnet50_v1c itself"):
        build_segmentor(config)
