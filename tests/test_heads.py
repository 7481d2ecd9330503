import math

import pytest
import torch
import torch.nn.functional as F
from conftest import load_golden

from reinseg.heads import Mask2FormerHead
from reinseg.heads.deformable_attention import multi_scale_deformable_attention
from reinseg.heads.mask2former import _attention_mask, mask_product
from reinseg.heads.position_encoding import sine_position_encoding


def mmdet_sine_encoding(mask, num_feats, temperature=10000, scale=2 * math.pi, eps=1e-6):
    """mmdet's SinePositionalEncoding(normalize=True).forward, written out."""
    not_mask = 1 - mask.to(torch.int)
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / num_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    B, H, W = mask.size()
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).view(B, H, W, -1)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).view(B, H, W, -1)
    return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


def test_sine_encoding_matches_mmdet():
    ours = sine_position_encoding(2, 5, 7, 16)
    theirs = mmdet_sine_encoding(torch.zeros(2, 5, 7, dtype=torch.bool), 16)
    assert ours.shape == (2, 32, 5, 7)
    assert torch.allclose(ours, theirs, atol=1e-6)


def naive_deformable_attention(value, shapes, locations, weights):
    """Per-point bilinear sampling with zero padding (pixel centres at +0.5), looped."""
    batch, _, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    out = torch.zeros(batch, queries, heads, dim)
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    grid = value[b, starts[lvl] : starts[lvl + 1], m].reshape(h, w, dim)
                    for p in range(points):
                        x = locations[b, q, m, lvl, p, 0] * w - 0.5
                        y = locations[b, q, m, lvl, p, 1] * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        sample = torch.zeros(dim)
                        for yy, xx, wt in [
                            (y0, x0, (1 - (x - x0)) * (1 - (y - y0))),
                            (y0, x0 + 1, (x - x0) * (1 - (y - y0))),
                            (y0 + 1, x0, (1 - (x - x0)) * (y - y0)),
                            (y0 + 1, x0 + 1, (x - x0) * (y - y0)),
                        ]:
                            if 0 <= yy < h and 0 <= xx < w:
                                sample += wt * grid[yy, xx]
                        out[b, q, m] += weights[b, q, m, lvl, p] * sample
    return out.flatten(2)


def test_deformable_attention_samples_bilinearly_with_zero_padding():
    shapes = [(3, 4), (2, 2)]
    value = torch.randn(1, sum(h * w for h, w in shapes), 2, 3)
    locations = torch.rand(1, 5, 2, 2, 3, 2) * 1.4 - 0.2  # some points fall outside the map
    weights = torch.rand(1, 5, 2, 2, 3)
    ours = multi_scale_deformable_attention(value, shapes, locations, weights)
    assert torch.allclose(ours, naive_deformable_attention(value, shapes, locations, weights), atol=1e-5)


def tiny_head(**kwargs):
    args = dict(
        num_classes=19, feat_channels=32, out_channels=32, num_queries=10, decoder_ffn_dims=256, encoder_ffn_dims=128
    )
    return Mask2FormerHead([64] * 4, **(args | kwargs))


def test_head_structure_maps_one_to_one_to_the_official_weights():
    release = load_golden("official_segmentor_tiny.pt")["release_state_dict"]
    official = {k[len("decode_head.") :]: tuple(v.shape) for k, v in release.items() if k.startswith("decode_head.")}
    ours = {k: tuple(v.shape) for k, v in tiny_head().state_dict().items()}
    assert ours == official


def test_head_outputs_every_prediction():
    head = tiny_head()
    features = [torch.randn(2, 64, s, 2 * s) for s in (16, 8, 4, 2)]
    class_logits, mask_logits = head(features, torch.randn(10, 32))
    assert len(class_logits) == len(mask_logits) == 10  # initial queries + 9 layers
    assert all(c.shape == (2, 10, 20) for c in class_logits)
    assert all(m.shape == (2, 10, 16, 32) for m in mask_logits)


def test_head_without_linked_queries_learns_its_own():
    head = tiny_head(linked_queries=False)
    assert "query_embed.weight" in head.state_dict() and "querys2feat.weight" not in head.state_dict()
    class_logits, _ = head([torch.randn(1, 64, s, s) for s in (16, 8, 4, 2)])
    assert class_logits[-1].shape == (1, 10, 20)


def test_linked_head_requires_queries_of_the_right_shape():
    head = tiny_head()
    features = [torch.randn(1, 64, s, s) for s in (16, 8, 4, 2)]
    with pytest.raises(ValueError, match="queries"):
        head(features)
    with pytest.raises(ValueError, match=r"\(10, 32\)"):
        head(features, torch.randn(12, 32))


def test_full_size_head_builds_on_the_meta_device():
    with torch.device("meta"):
        head = Mask2FormerHead([1024] * 4, num_classes=19, num_queries=100)
        class_logits, mask_logits = head([torch.empty(1, 1024, s, s) for s in (128, 64, 32, 16)], torch.empty(100, 256))
    assert class_logits[-1].shape == (1, 100, 20) and mask_logits[-1].shape == (1, 100, 128, 128)
    assert sum(p.numel() for p in head.parameters()) == 20_579_796


def test_attention_mask_of_empty_masks_is_released():
    """A query whose mask is empty everywhere must still attend (mmdet sets its row to False)."""
    head = tiny_head()
    with torch.no_grad():
        head.mask_embed[4].bias.fill_(0)
        head.mask_embed[4].weight.fill_(0)
        head.pixel_decoder.mask_feature.bias.fill_(-1)  # every mask logit < 0 -> all masked
    features = [torch.randn(1, 64, s, s) for s in (16, 8, 4, 2)]
    class_logits, _ = head(features, torch.randn(10, 32))
    assert all(torch.isfinite(c).all() for c in class_logits)


def test_bilinear_mask_upsampling_precedes_the_sigmoid():
    from reinseg.heads import semantic_logits

    class_logits = torch.randn(1, 3, 5)
    mask_logits = torch.randn(1, 3, 4, 4)
    out = semantic_logits(class_logits, mask_logits, (8, 8))
    up = F.interpolate(mask_logits, size=(8, 8), mode="bilinear", align_corners=False).sigmoid()
    expected = torch.einsum("bqc,bqhw->bchw", class_logits.softmax(-1)[..., :-1], up)
    assert out.shape == (1, 4, 8, 8) and torch.allclose(out, expected)


def test_last_only_returns_the_last_prediction_of_the_full_run():
    head = tiny_head().eval()
    features = [torch.randn(2, 64, s, 2 * s) for s in (16, 8, 4, 2)]
    queries = torch.randn(10, 32)
    with torch.no_grad():
        all_cls, all_masks = head(features, queries)
        last_cls, last_masks = head(features, queries, last_only=True)
    assert len(last_cls) == len(last_masks) == 1
    assert torch.equal(last_cls[0], all_cls[-1]) and torch.equal(last_masks[0], all_masks[-1])


def test_attention_mask_from_resized_features_is_that_of_the_resized_masks():
    """Resizing the mask features and then taking the product gives mmdet's attention mask,
    which resizes the full-size mask logits (the oracle here, in float64)."""
    torch.manual_seed(0)
    embed = torch.randn(2, 10, 16, dtype=torch.float64)
    mask_features = torch.randn(2, 16, 32, 48, dtype=torch.float64)
    embed[0, 3] = 0.0  # an empty mask: logits of exactly 0 are "on", as sigmoid(0) = 0.5
    embed[1, 4] = -embed[1, 4].abs()
    mask_features[1] = mask_features[1].abs()  # query 4 of image 1 is off everywhere
    full = torch.einsum("bqc,bchw->bqhw", embed, mask_features)
    for size in [(8, 12), (16, 24), (32, 48)]:
        resized = F.interpolate(full, size=size, mode="bilinear", align_corners=False).flatten(2)
        expected = resized.sigmoid() >= 0.5
        expected[~expected.any(-1)] = True
        features = F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False)
        ours = _attention_mask(embed, features)
        assert ours.shape == (2, 1, 10, size[0] * size[1])
        assert torch.equal(ours[:, 0], expected)
        assert ours[1, 0, 4].all() and 0 < expected.float().mean() < 1


@pytest.mark.parametrize("reached", [[1, 4], list(range(6)), []])
def test_mask_product_gradient_equals_the_dense_products(reached):
    # The loss reaches only the matched queries' masks: the backward multiplies those rows only.
    generator = torch.Generator().manual_seed(0)
    embed = torch.randn(2, 6, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    features = torch.randn(2, 5, 7, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    grad = torch.zeros(2, 6, 7, 9, dtype=torch.float64)
    grad[0, reached] = torch.randn(len(reached), 7, 9, generator=generator, dtype=torch.float64)
    grad[1, reached[:1]] = torch.randn(len(reached[:1]), 7, 9, generator=generator, dtype=torch.float64)
    ours = torch.autograd.grad(mask_product(embed, features), (embed, features), grad)
    dense = torch.autograd.grad(torch.einsum("bqc,bchw->bqhw", embed, features), (embed, features), grad)
    torch.testing.assert_close(mask_product(embed, features), torch.einsum("bqc,bchw->bqhw", embed, features))
    for mine, theirs in zip(ours, dense, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
