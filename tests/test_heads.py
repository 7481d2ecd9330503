import math

import pytest
import torch
import torch.nn.functional as F
from conftest import load_golden, tiny_model_config

from reinseg.backbones import resize_map
from reinseg.build import build_segmentor
from reinseg.heads import Mask2FormerHead
from reinseg.heads.deformable_attention import _softmax_over_last, multi_scale_deformable_attention
from reinseg.heads.mask2former import _attention_mask, mask_products, resize_to_levels
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


def test_the_sine_encodings_axis_tables_are_made_once_per_size_and_kept():
    """Each axis's table is kept per size and device (a GPU ran some twenty kernels per map and
    forward); the map is a fresh tensor with the values of mmdet's (above). First asked for
    under inference mode (prediction), a table is still a plain tensor that training can use."""
    from reinseg.heads import position_encoding

    kept = position_encoding._kept_axis_encoding
    kept.cache_clear()
    with torch.inference_mode():
        first = sine_position_encoding(2, 5, 7, 16)
    assert (kept.cache_info().misses, kept.cache_info().hits) == (2, 0)  # a 5-row and a 7-column table
    again = sine_position_encoding(3, 5, 7, 16)
    assert (kept.cache_info().misses, kept.cache_info().hits) == (2, 2)
    assert not again.is_inference() and again.shape == (3, 32, 5, 7)
    assert torch.equal(first[0], again[0]) and torch.equal(again[2], again[0])
    theirs = mmdet_sine_encoding(torch.zeros(1, 5, 7, dtype=torch.bool), 16)[0]
    torch.testing.assert_close(again[0], theirs, rtol=0, atol=1e-6)
    again[0].zero_()  # the map is the caller's own: the tables are untouched
    assert torch.equal(sine_position_encoding(1, 5, 7, 16)[0], first[0])
    weights = torch.ones(32, 1, 1, requires_grad=True)
    (again * weights).sum().backward()
    assert weights.grad is not None
    sine_position_encoding(1, 7, 5, 16)  # the same two sizes on the other axes: no new table
    assert kept.cache_info().misses == 2
    assert position_encoding._resolved(None) == torch.get_default_device()


def test_the_sine_encoding_compiles_as_one_graph_with_and_without_a_device():
    """Under a tracer the tables are computed in the graph, the device taken as given (a
    default-device query is not traceable)."""
    for device in (None, "cpu"):
        torch._dynamo.reset()
        traced = torch.compile(
            lambda d=device: sine_position_encoding(2, 5, 7, 16, device=d), fullgraph=True, backend="eager"
        )
        torch.testing.assert_close(traced(), sine_position_encoding(2, 5, 7, 16), rtol=0, atol=1e-6)


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


@pytest.mark.slow  # 0.5 s; the fast tier builds every full-size zoo backbone on the meta device
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


@pytest.mark.parametrize("size", [(4, 4), (8, 8)])
def test_semantic_logits_leave_the_mask_logits_alone(size):
    """The sigmoid runs in place on the upsampled masks, never on the caller's logits (at the
    logits' own size too), and gradients still flow to them."""
    from reinseg.heads import semantic_logits

    class_logits = torch.randn(1, 3, 5)
    mask_logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    before = mask_logits.detach().clone()
    out = semantic_logits(class_logits, mask_logits, size)
    assert torch.equal(mask_logits.detach(), before)
    out.sum().backward()
    up = F.interpolate(before.requires_grad_(), size=size, mode="bilinear", align_corners=False).sigmoid()
    torch.einsum("bqc,bqhw->bchw", class_logits.softmax(-1)[..., :-1], up).sum().backward()
    torch.testing.assert_close(mask_logits.grad, before.grad, rtol=0, atol=0)


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


@pytest.mark.parametrize(
    ("size", "level_sizes", "bitwise"),
    [
        ((128, 128), [(16, 16), (32, 32), (64, 64)], True),
        ((96, 160), [(12, 20), (24, 40), (48, 80)], True),
        ((127, 131), [(16, 17), (45, 37), (91, 96)], False),
    ],
)
def test_mask_features_resized_to_the_levels_as_nchw_bilinear(size, level_sizes, bitwise):
    """The CPU's channels-last resize gives what F.interpolate gives on the NCHW map: the same
    bits at power-of-two factors (the paper's crops), float rounding elsewhere; the maps come
    back NCHW-contiguous, as the attention masks' products read them."""
    torch.manual_seed(0)
    features = torch.randn(2, 256, *size) * 5
    resized = resize_to_levels(features, level_sizes)
    for ours, level_size in zip(resized, level_sizes, strict=True):
        expected = F.interpolate(features, size=level_size, mode="bilinear", align_corners=False)
        assert ours.shape == expected.shape and ours.is_contiguous()
        if bitwise:
            assert torch.equal(ours, expected)
        else:
            torch.testing.assert_close(ours, expected, rtol=0, atol=4e-6)


def test_the_cpu_resizes_the_mask_features_channels_last(monkeypatch):
    """The fast kernel is the one that runs: every resize reads an NHWC map."""
    import reinseg.heads.mask2former as mask2former

    layouts = []
    interpolate = F.interpolate

    def recording(x, *args, **kwargs):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        return interpolate(x, *args, **kwargs)

    monkeypatch.setattr(mask2former.F, "interpolate", recording)
    resize_to_levels(torch.randn(2, 8, 32, 32), [(4, 4), (8, 8), (16, 16)])
    assert layouts == [True, True, True]


@pytest.mark.parametrize("reached", [[1, 4], list(range(6)), []])
def test_mask_products_gradients_equal_the_dense_products(reached):
    # The loss reaches only the matched queries' masks: the backward multiplies those rows only,
    # of all predictions at once; a prediction the loss does not read gets no gradient.
    generator = torch.Generator().manual_seed(0)
    embeds = [torch.randn(2, 6, 5, generator=generator, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    features = torch.randn(2, 5, 7, 9, generator=generator, dtype=torch.float64, requires_grad=True)
    grads = [torch.zeros(2, 6, 7, 9, dtype=torch.float64) for _ in range(2)]
    for grad, rows in zip(grads, (reached, reached[::2]), strict=True):
        grad[0, rows] = torch.randn(len(rows), 7, 9, generator=generator, dtype=torch.float64)
        grad[1, rows[:1]] = torch.randn(len(rows[:1]), 7, 9, generator=generator, dtype=torch.float64)
    ours = mask_products(embeds, features)
    dense = [torch.einsum("bqc,bchw->bqhw", embed, features) for embed in embeds]
    for mine, theirs in zip(ours, dense, strict=True):
        torch.testing.assert_close(mine, theirs)
    # The third prediction is not read (as a loss that skips it).
    inputs = (*embeds, features)
    ours = torch.autograd.grad(ours[:2], inputs, grads, allow_unused=True, materialize_grads=True)
    dense = torch.autograd.grad(dense[:2], inputs, grads, allow_unused=True, materialize_grads=True)
    for mine, theirs in zip(ours, dense, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-12)
    assert not ours[2].any()


def test_the_pixel_decoder_projects_upsampled_maps_before_resizing_them():
    """Given the backbone's maps and their scales (a ViT's 4, 2, 1, 0.5), the pixel decoder gives
    what it gives on the resized maps (float64: the same function), running the 1x1 projections
    of the upsampled maps on the small maps."""
    torch.manual_seed(0)
    head = tiny_head().double().train()
    maps = [torch.randn(2, 64, 6, 8, dtype=torch.float64) for _ in range(4)]
    scales = (4, 2, 1, 0.5)
    resized = [resize_map(m, s) for m, s in zip(maps, scales, strict=True)]
    assert [tuple(f.shape[-2:]) for f in resized] == [(24, 32), (12, 16), (6, 8), (3, 4)]
    seen = []
    decoder = head.pixel_decoder
    for conv in [decoder.lateral_convs[0].conv, *(c.conv for c in decoder.input_convs)]:
        conv.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    expected_masks, expected_levels = decoder(resized)
    assert sorted(seen) == [(3, 4), (6, 8), (12, 16), (24, 32)]
    seen.clear()
    masks, levels = decoder(maps, scales)
    # Upsampled maps are projected at their own size, the downsampled one after its resizing.
    assert sorted(seen) == [(3, 4), (6, 8), (6, 8), (6, 8)]
    torch.testing.assert_close(masks, expected_masks, rtol=0, atol=1e-12)
    for ours, theirs in zip(levels, expected_levels, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="4 maps but 3 scales"):
        decoder(maps, scales[:3])


def test_a_segmentor_gives_its_head_the_maps_before_resizing():
    """The segmentor hands the Mask2Former head the ViT's maps and scales; the result is the
    backbone's resized features through the head (float32 rounding apart)."""
    torch.manual_seed(0)
    segmentor = build_segmentor(tiny_model_config()).eval()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps, scales, queries = segmentor.backbone(images, resize=False)
        features, same_queries = segmentor.backbone(images)
        assert scales == (4, 2, 1, 0.5) and torch.equal(queries, same_queries)
        for m, s, f in zip(maps, scales, features, strict=True):
            assert torch.equal(resize_map(m, s), f)
        class_logits, mask_logits = segmentor(images)
        expected_cls, expected_masks = segmentor.head(features, queries)
    torch.testing.assert_close(class_logits[-1], expected_cls[-1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mask_logits[-1], expected_masks[-1], rtol=1e-5, atol=1e-4)


def test_the_deformable_attention_weights_are_a_softmax_over_levels_and_points():
    # On the CPU the short softmax runs on the transposed rows: softmax(-1) up to the sums' order.
    x = torch.randn(2, 50, 8, 12, dtype=torch.float64, requires_grad=True)
    grad = torch.randn_like(x)
    ours = _softmax_over_last(x)
    theirs = x.softmax(-1)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-15)
    torch.testing.assert_close(*(torch.autograd.grad(y, x, grad)[0] for y in (ours, theirs)), rtol=0, atol=1e-15)
    assert ours.shape == x.shape


def test_the_heads_relu_is_in_place_without_a_graph_and_one_backward_node_with_one():
    """mmcv's in-place ReLU on a linear layer's output (a view): in training autograd rewrites
    it as a copy into slices of the view's base (CopySlices and AsStrided nodes, several kernels
    in backward); out of place it is one node. At inference it stays in place (no copy)."""
    from reinseg.heads.pixel_decoder import FFN, ReLUInPlaceWithoutGraph

    linear, relu = torch.nn.Linear(8, 8), ReLUInPlaceWithoutGraph()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        hidden = linear(x)
        assert relu(hidden).data_ptr() == hidden.data_ptr()  # in place
    hidden = linear(x)
    out = relu(hidden)
    assert torch.equal(out, F.relu(hidden)) and out.data_ptr() != hidden.data_ptr()
    assert type(out.grad_fn).__name__ == "ReluBackward0"
    head = build_segmentor(tiny_model_config()).head
    relus = [m for m in head.modules() if isinstance(m, torch.nn.ReLU)]
    # the mask embedding's two and each FFN's (decoder and encoder layers); the FPN's follows a GroupNorm
    ffns = sum(isinstance(m, FFN) for m in head.modules())
    assert ffns == len(head.transformer_decoder.layers) + len(head.pixel_decoder.encoder.layers)
    assert sum(isinstance(m, ReLUInPlaceWithoutGraph) for m in relus) == 2 + ffns
