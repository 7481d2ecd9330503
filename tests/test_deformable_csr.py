"""The deformable attention's CSR kernel (reinseg.heads.deformable_csr) against the grid_sample
reference and a looped bilinear oracle: values, gradients, padding, pixel edges, non-finite
locations, autocast, and which kernel the module runs."""

import pytest
import torch
from test_heads import naive_deformable_attention

from reinseg.config import Config, ConfigError, TrainConfig, check_values
from reinseg.heads import deformable_attention
from reinseg.heads.deformable_attention import MultiScaleDeformableAttention, multi_scale_deformable_attention
from reinseg.heads.deformable_csr import csr_deformable_attention

# Square and oblong levels, one a single row: the layout's row stride and clamping see all kinds.
SHAPES = [(3, 4), (2, 2), (1, 5)]


def inputs(dtype=torch.float64, batch=2, queries=7, heads=3, dim=4, points=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    value = torch.randn(batch, sum(h * w for h, w in SHAPES), heads, dim, generator=generator, dtype=dtype)
    # Some points fall outside their level (zero padding), up to 0.2 of its size away.
    locations = torch.rand(batch, queries, heads, len(SHAPES), points, 2, generator=generator, dtype=dtype) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, generator=generator, dtype=dtype)
    return [t.requires_grad_() for t in (value, locations, weights)]


def output_and_gradients(kernel, value, locations, weights, seed=1):
    out = kernel(value, SHAPES, locations, weights)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return (out, *torch.autograd.grad(out, (value, locations, weights), grad))


def test_csr_samples_bilinearly_with_zero_padding():
    value, locations, weights = (t.detach().float() for t in inputs())
    found = csr_deformable_attention(value, SHAPES, locations, weights)
    torch.testing.assert_close(found, naive_deformable_attention(value, SHAPES, locations, weights), rtol=0, atol=1e-5)


@pytest.mark.parametrize("keep_samples", [True, False])
def test_csr_values_and_gradients_equal_the_reference_in_float64(keep_samples):
    tensors = inputs()
    reference = output_and_gradients(multi_scale_deformable_attention, *tensors)
    found = output_and_gradients(lambda *a: csr_deformable_attention(*a, keep_samples=keep_samples), *tensors)
    for name, ours, theirs in zip(["output", "values", "locations", "weights"], found, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12, msg=name)


def test_csr_gradients_pass_gradcheck():
    value, locations, weights = inputs(batch=1, queries=3, heads=2, dim=2, points=2)
    # Away from pixel edges, where the bilinear weights' derivative jumps.
    assert torch.autograd.gradcheck(
        lambda v, loc, w: csr_deformable_attention(v, SHAPES, loc, w), (value, locations, weights)
    )


def test_csr_takes_grid_samples_side_of_a_pixel_edge():
    # At initialisation samples sit on pixel centres plus whole pixels (Deformable DETR's offsets):
    # every coordinate is on an edge of the bilinear cells, where the location's gradient is one-
    # sided. Computed with grid_sample's arithmetic, the CSR kernel picks the same side in float32.
    value, _, weights = inputs(torch.float32)
    generator = torch.Generator().manual_seed(3)
    size = torch.tensor([[w, h] for h, w in SHAPES], dtype=torch.float32).view(-1, 1, 2)
    pixels = torch.randint(-2, 6, tuple(weights.shape) + (2,), generator=generator).float()
    locations = ((pixels + 0.5) / size).requires_grad_()
    reference = output_and_gradients(multi_scale_deformable_attention, value, locations, weights)
    found = output_and_gradients(csr_deformable_attention, value, locations, weights)
    for name, ours, theirs in zip(["output", "values", "locations", "weights"], found, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5, msg=name)


def test_csr_takes_grid_samples_side_of_a_pixel_edge_on_levels_of_any_size():
    # Levels of a patch-14 ViT at 518 px (37 x 37 and its neighbours): there t * size / 2 is not
    # exact in float32, and only grid_sample's single rounding of t * size / 2 - 1/2 picks its side.
    shapes = [(37, 37), (18, 18), (74, 74)]
    generator = torch.Generator().manual_seed(0)
    value = torch.randn(1, sum(h * w for h, w in shapes), 2, 4, generator=generator)
    weights = torch.rand(1, 200, 2, len(shapes), 4, generator=generator)
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32).view(-1, 1, 2)
    # As the encoder at initialisation: pixel centres of one level plus whole pixels of each.
    centres = (torch.randint(0, 18, (1, 200, 1, 1, 1, 2), generator=generator).float() + 0.5) / 18
    offsets = torch.randint(-4, 5, (1, 200, 2, len(shapes), 4, 2), generator=generator).float()
    locations = centres + offsets / size
    tensors = [t.requires_grad_() for t in (value, locations, weights)]
    reference = output_and_gradients(lambda v, _, loc, w: multi_scale_deformable_attention(v, shapes, loc, w), *tensors)
    found = output_and_gradients(lambda v, _, loc, w: csr_deformable_attention(v, shapes, loc, w), *tensors)
    for name, ours, theirs in zip(["output", "values", "locations", "weights"], found, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4, msg=name)


def test_non_finite_locations_give_nan_like_the_reference_and_never_a_bad_index():
    value, locations, weights = (t.detach().float() for t in inputs())
    locations[0, 0, 0, 0, 0, 0] = float("nan")
    locations[0, 1, 1, 1, 1, 1] = float("inf")
    locations[1, 2, 2, 2, 2, 0] = -float("inf")
    locations[1, 3, 0, 0, 0, 0] = 1e30  # far outside: contributes nothing
    reference = multi_scale_deformable_attention(value, SHAPES, locations, weights)
    found = csr_deformable_attention(value, SHAPES, locations, weights)
    assert reference.isnan().any()
    assert torch.equal(found.isnan(), reference.isnan())
    torch.testing.assert_close(found.nan_to_num(), reference.nan_to_num(), rtol=0, atol=1e-5)


def test_csr_under_bf16_autocast_samples_in_float32_as_grid_sample_does():
    value, locations, weights = (t.detach().float() for t in inputs())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        found = csr_deformable_attention(value.bfloat16(), SHAPES, locations, weights)
    assert found.dtype == torch.float32
    expected = multi_scale_deformable_attention(value.bfloat16().float(), SHAPES, locations, weights)
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-5)


def test_csr_refuses_values_that_do_not_fit_the_levels():
    value, locations, weights = inputs()
    with pytest.raises(ValueError, match="value has 20 pixels"):
        csr_deformable_attention(value[:, :-1], SHAPES, locations, weights)


def attention_module(kernel):
    torch.manual_seed(0)
    module = MultiScaleDeformableAttention(embed_dims=12, num_heads=3, num_levels=len(SHAPES), num_points=2)
    module.kernel = kernel
    return module


def module_inputs():
    generator = torch.Generator().manual_seed(4)
    queries = sum(h * w for h, w in SHAPES)
    return (
        torch.randn(2, queries, 12, generator=generator),
        torch.randn(2, queries, 12, generator=generator),
        torch.rand(2, queries, len(SHAPES), 2, generator=generator),
        SHAPES,
    )


@pytest.mark.parametrize("kernel, csr_calls", [("auto", 1), ("csr", 1), ("grid_sample", 0)])
def test_the_module_runs_the_kernel_it_is_given(monkeypatch, kernel, csr_calls):
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return csr_deformable_attention(*args, **kwargs)

    monkeypatch.setattr(deformable_attention, "csr_deformable_attention", counting)
    out = attention_module(kernel)(*module_inputs())
    assert len(calls) == csr_calls
    torch.testing.assert_close(out, attention_module("grid_sample")(*module_inputs()), rtol=0, atol=1e-5)


def test_auto_leaves_tracing_to_the_reference(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    monkeypatch.setattr(
        deformable_attention, "csr_deformable_attention", lambda *a, **k: pytest.fail("CSR under export")
    )
    attention_module("auto")(*module_inputs())


def test_csr_is_refused_off_the_cpu():
    query, pos, references, shapes = module_inputs()
    module = attention_module("csr").to("meta")
    with pytest.raises(ValueError, match="csr runs on the CPU, not on meta"):
        module(query.to("meta"), pos.to("meta"), references.to("meta"), shapes)


def test_the_kernel_is_a_checked_train_option():
    with pytest.raises(ConfigError, match="train.deformable_kernel must be one of auto, csr, grid_sample, got 'cuda'"):
        check_values(Config(train=TrainConfig(deformable_kernel="cuda")))
