import contextlib
import math

import pytest
import torch
from conftest import load_golden
from torch import nn

from reinseg import Rein

OFFICIAL_NAMES = {
    "scale",
    "mlp_token2feat.weight",
    "mlp_token2feat.bias",
    "mlp_delta_f.weight",
    "mlp_delta_f.bias",
    "transform.weight",
    "transform.bias",
    "merge.weight",
    "merge.bias",
}


@pytest.fixture(scope="module")
def golden():
    return load_golden("lora_rein_small.pt")


def test_golden_low_rank_parity(golden):
    rein = Rein(**golden["config"])
    rein.load_state_dict(golden["state_dict"], strict=True)
    for layer, (x, expected) in enumerate(zip(golden["inputs"], golden["outputs"], strict=False)):
        out = rein(x, layer)
        assert out.shape == expected.shape
        assert (out - expected).abs().max().item() <= 1e-5
    assert (rein.queries() - golden["queries"]).abs().max().item() <= 1e-5


def test_full_rank_tokens_compute_the_same_as_their_low_rank_product(golden):
    config = dict(golden["config"], lora_dim=None)
    rein = Rein(**config)
    state = {k: v for k, v in golden["state_dict"].items() if not k.startswith("learnable_tokens")}
    state["learnable_tokens"] = golden["state_dict"]["learnable_tokens_a"] @ golden["state_dict"]["learnable_tokens_b"]
    rein.load_state_dict(state, strict=True)
    assert rein.learnable_tokens.shape == (4, 10, 64)
    for layer, (x, expected) in enumerate(zip(golden["inputs"], golden["outputs"], strict=False)):
        assert (rein(x, layer) - expected).abs().max().item() <= 1e-5
    assert (rein.queries() - golden["queries"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "kwargs, tokens",
    [
        (dict(lora_dim=4), {"learnable_tokens_a", "learnable_tokens_b"}),
        (dict(lora_dim=None), {"learnable_tokens"}),
    ],
)
def test_parameter_names_are_the_official_ones(kwargs, tokens):
    rein = Rein(num_layers=2, embed_dims=16, patch_size=16, query_dims=8, token_length=5, **kwargs)
    assert set(rein.state_dict()) == OFFICIAL_NAMES | tokens


def test_zero_mlp_delta_f_has_no_scale_and_starts_as_identity():
    rein = Rein(num_layers=2, embed_dims=16, patch_size=16, query_dims=8, token_length=5, zero_mlp_delta_f=True)
    assert "scale" not in rein.state_dict()
    assert rein.scale == 1.0
    assert torch.count_nonzero(rein.mlp_delta_f.weight) == 0 and torch.count_nonzero(rein.mlp_delta_f.bias) == 0
    x = torch.randn(2, 1 + 9, 16)
    assert torch.equal(rein(x, 1), x)
    # It still learns: the delta MLP receives gradients.
    rein(x, 1).square().sum().backward()
    assert rein.mlp_delta_f.weight.grad.abs().sum() > 0


def test_strict_loading_rejects_foreign_names():
    rein = Rein(num_layers=2, embed_dims=16, patch_size=16, query_dims=8, token_length=5, lora_dim=4)
    state = dict(rein.state_dict())
    state["learnable_tokens"] = torch.zeros(2, 5, 16)
    with pytest.raises(RuntimeError, match="learnable_tokens"):
        rein.load_state_dict(state, strict=True)


@pytest.mark.parametrize("num_prefix_tokens", [0, 1, 5])
def test_prefix_tokens_pass_unchanged_and_patches_change(num_prefix_tokens):
    rein = Rein(
        num_layers=3,
        embed_dims=16,
        patch_size=14,
        query_dims=8,
        token_length=6,
        num_prefix_tokens=num_prefix_tokens,
        scale_init=1.0,
    )
    x = torch.randn(2, num_prefix_tokens + 12, 16)
    out = rein(x, 2)
    assert out.shape == x.shape
    assert torch.equal(out[:, :num_prefix_tokens], x[:, :num_prefix_tokens])
    assert (out[:, num_prefix_tokens:] - x[:, num_prefix_tokens:]).abs().min() > 0


def test_first_token_is_a_sink_that_never_contributes():
    # Without softmax the delta is linear in the tokens' contributions, so the first token
    # must have no influence at all.
    rein = Rein(
        num_layers=2,
        embed_dims=16,
        patch_size=16,
        query_dims=8,
        token_length=5,
        lora_dim=None,
        use_softmax=False,
        scale_init=1.0,
    )
    x = torch.randn(2, 1 + 7, 16)
    before = rein(x, 0)
    with torch.no_grad():
        rein.learnable_tokens[0, 0].normal_()
    assert torch.allclose(rein(x, 0), before, atol=0, rtol=0)
    with torch.no_grad():
        rein.learnable_tokens[0, 1].normal_()
    assert not torch.allclose(rein(x, 0), before)


def test_initialisation_follows_the_official_code():
    L, m, C, r, p, D = 3, 7, 24, 4, 16, 8
    torch.manual_seed(123)
    rein = Rein(num_layers=L, embed_dims=C, patch_size=p, query_dims=D, token_length=m, lora_dim=r)

    # The official LoRAReins.create_model, call by call (w1oves/Rein, rein/models/backbones/reins.py).
    torch.manual_seed(123)
    tokens = torch.empty(L, m, C)
    token2feat, delta_f = nn.Linear(C, C), nn.Linear(C, C)
    val = math.sqrt(6.0 / float(3 * p * p + C))
    nn.init.uniform_(tokens, -val, val)
    nn.init.kaiming_uniform_(delta_f.weight, a=math.sqrt(5))
    nn.init.kaiming_uniform_(token2feat.weight, a=math.sqrt(5))
    transform, merge = nn.Linear(C, D), nn.Linear(3 * D, D)
    a, b = torch.empty(L, m, r), torch.empty(L, r, C)
    val = math.sqrt(6.0 / float(3 * p * p + (C * r) ** 0.5))
    nn.init.uniform_(a, -val, val)
    nn.init.uniform_(b, -val, val)

    assert rein.scale.item() == pytest.approx(1e-3)
    for ours, theirs in [
        (rein.learnable_tokens_a, a),
        (rein.learnable_tokens_b, b),
        (rein.mlp_token2feat.weight, token2feat.weight),
        (rein.mlp_token2feat.bias, token2feat.bias),
        (rein.mlp_delta_f.weight, delta_f.weight),
        (rein.mlp_delta_f.bias, delta_f.bias),
        (rein.transform.weight, transform.weight),
        (rein.transform.bias, transform.bias),
        (rein.merge.weight, merge.weight),
        (rein.merge.bias, merge.bias),
    ]:
        assert torch.equal(ours, theirs)
    assert rein.learnable_tokens_a.abs().max() <= val


def test_queries_pool_over_layers_in_the_official_order():
    rein = Rein(num_layers=3, embed_dims=16, patch_size=16, query_dims=8, token_length=5, lora_dim=None)
    per_layer = rein.transform(rein.learnable_tokens)  # (L, m, D)
    # Official: permute to (m, D, L), max/avg-pool over L, take the last, cat -> (m, D, 3), flatten.
    t = per_layer.permute(1, 2, 0)
    pooled = torch.cat([t.max(-1, keepdim=True).values, t.mean(-1, keepdim=True), t[..., -1:]], dim=-1)
    expected = rein.merge(pooled.flatten(-2))
    queries = rein.queries()
    assert queries.shape == (5, 8)
    assert torch.allclose(queries, expected, atol=1e-6)


def test_gradients_reach_every_rein_parameter():
    rein = Rein(num_layers=2, embed_dims=16, patch_size=16, query_dims=8, token_length=5, lora_dim=4)
    x = torch.randn(2, 1 + 6, 16)
    (rein(x, 0).sum() + rein(x, 1).sum() + rein.queries().sum()).backward()
    for name, param in rein.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_no_queries_without_link():
    rein = Rein(num_layers=2, embed_dims=16, patch_size=16, link_token_to_query=False)
    with pytest.raises(RuntimeError, match="link_token_to_query"):
        rein.queries()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(token_length=1), "token_length"),
        (dict(lora_dim=0), "lora_dim"),
        (dict(num_prefix_tokens=-1), "num_prefix_tokens"),
        (dict(embed_dims=0), "embed_dims"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = dict(num_layers=2, embed_dims=16, patch_size=16) | kwargs
    with pytest.raises(ValueError, match=message):
        Rein(**args)


def test_bad_input_shapes_are_reported():
    rein = Rein(num_layers=2, embed_dims=16, patch_size=16)
    with pytest.raises(ValueError, match=r"\(B, P \+ N, 16\)"):
        rein(torch.randn(2, 5, 8), 0)
    with pytest.raises(IndexError, match="2 layers"):
        rein(torch.randn(2, 5, 16), 2)


@pytest.mark.parametrize("embed_dims, token_length, lora_dim, pays", [(64, 20, 4, True), (16, 6, 8, False)])
def test_low_rank_tokens_are_applied_through_their_factors_when_that_is_cheaper(
    embed_dims, token_length, lora_dim, pays
):
    """Rein's output and gradients equal the paper's formula on the formed tokens ``A @ B``
    (the oracle: ``token_delta`` on the patch rows alone), whichever way they are computed."""
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, embed_dims=embed_dims, patch_size=16, query_dims=8, token_length=token_length)
    rein = Rein(**kwargs, lora_dim=lora_dim, num_prefix_tokens=2, scale_init=0.5).double()
    assert rein._low_rank_pays(embed_dims) is pays
    x = torch.randn(3, 2 + 25, embed_dims, dtype=torch.float64, requires_grad=True)
    out = rein(x, 1)
    out.square().sum().backward()
    ours = [x.grad, *(p.grad for p in rein.parameters() if p.grad is not None)]

    x.grad = None
    rein.zero_grad()
    tokens = rein.learnable_tokens_a[1] @ rein.learnable_tokens_b[1]
    patches = x[:, 2:]
    delta = rein.token_delta(patches, tokens, rein.mlp_token2feat, rein.mlp_delta_f)
    expected = torch.cat([x[:, :2], patches + rein.scale * delta], dim=1)
    expected.square().sum().backward()
    theirs = [x.grad, *(p.grad for p in rein.parameters() if p.grad is not None)]

    assert torch.equal(out[:, :2], x[:, :2])
    assert torch.allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert len(ours) == len(theirs) == 8  # x, scale, the two token factors, both MLPs' weights and biases
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def _delta_f_calls(rein: Rein) -> list[int]:
    calls: list[int] = []
    rein.mlp_delta_f.register_forward_hook(lambda *_: calls.append(1))
    return calls


def _plain_refinement(rein: Rein, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Rein's refinement as autograd sees it op by op (the equation, prefix rows restored)."""
    refined = x + rein.delta(x, layer) * rein.scale
    prefix = rein.num_prefix_tokens
    return torch.cat([x[:, :prefix], refined[:, prefix:]], 1)


VARIANTS = [
    dict(lora_dim=4),
    dict(lora_dim=None),
    dict(lora_dim=None, use_softmax=False),
    dict(lora_dim=4, use_softmax=False),
    dict(lora_dim=4, num_prefix_tokens=0),
    dict(lora_dim=4, num_prefix_tokens=3),
    dict(zero_mlp_delta_f=True),
    dict(zero_mlp_delta_f=True, lora_dim=4),
]


def _trained_rein(kwargs) -> Rein:
    torch.manual_seed(0)
    rein = Rein(num_layers=2, embed_dims=64, patch_size=16, query_dims=8, token_length=10, scale_init=0.7, **kwargs)
    rein = rein.double()
    with torch.no_grad():  # a trained delta MLP: zero_mlp_delta_f's starts at zero
        for p in rein.mlp_delta_f.parameters():
            p.normal_(0, 0.1)
    return rein


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_inference_folds_the_delta_mlp_into_one_product_with_the_same_values(kwargs):
    rein = _trained_rein(kwargs)
    calls = _delta_f_calls(rein)
    x = torch.randn(3, 3 + 20, 64, dtype=torch.float64)
    with torch.no_grad():
        plain = _plain_refinement(rein, x, 1)
        calls.clear()
        folded = rein(x, 1)
    assert not calls  # the delta MLP was folded, not called
    assert (folded - plain).abs().max().item() <= 1e-12
    prefix = rein.num_prefix_tokens
    assert torch.equal(folded[:, :prefix], x[:, :prefix])


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_inside_weights_fixed_the_weight_only_parts_are_made_once_with_the_same_values(kwargs):
    """Inside ``weights_fixed`` the folded refinement's token products (per layer) and the
    queries are made once, with the bits of the plain inference; they are kept for the context
    only. Shown by breaking the contract: token MLP weights changed inside do not show until the
    context ends."""
    rein = _trained_rein(kwargs).float()
    x = torch.randn(2, 3 + 20, 64)
    with torch.no_grad():
        plain = [rein(x, layer) for layer in (0, 1)]
        plain_queries = rein.queries() if rein.link_token_to_query else None
        with rein.weights_fixed():
            fixed = [rein(x, layer) for layer in (0, 1)]
            queries = rein.queries() if rein.link_token_to_query else None
            for p in (rein.mlp_token2feat.weight, rein.merge.weight):
                p.mul_(2)  # against the contract
            with rein.weights_fixed():  # nested: the outer one's
                kept = [rein(x, layer) for layer in (1, 0)]
            kept_queries = rein.queries() if rein.link_token_to_query else None
        assert rein._fixed is None
        after = rein(x, 1)
        after_queries = rein.queries() if rein.link_token_to_query else None
        expected = _plain_refinement(rein, x, 1)
    assert all(torch.equal(a, b) for a, b in zip(fixed + kept, plain + plain[::-1], strict=True))
    assert (after - expected).abs().max().item() <= 1e-5
    assert (after - plain[1]).abs().max().item() > 1e-4
    if rein.link_token_to_query:
        assert torch.equal(queries, plain_queries) and kept_queries is queries
        assert not torch.equal(after_queries, queries)


def test_under_a_tracer_weights_fixed_keeps_nothing(monkeypatch):
    """A compiled graph computes the weight-only parts itself: a dict filled between windows
    gave torch.compile a second graph for the later windows of a call."""
    import reinseg.rein as rein_module

    rein = _trained_rein(dict(lora_dim=4)).float()
    x = torch.randn(2, 3 + 20, 64)
    monkeypatch.setattr(rein_module, "tracing", lambda: True)
    with torch.no_grad(), rein.weights_fixed():
        rein._folded_refinement(x, 0)  # forward() takes the traced route itself
        rein.queries()
        assert rein._fixed == {}


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_training_refinement_gives_autograds_values_and_gradients(kwargs):
    """Low-rank Rein trains through one autograd node (reinseg.rein_fused): the same forward bits
    as the operations one by one, and the same gradients of the input and every parameter
    (float64); full-rank Rein keeps autograd's own graph."""
    rein = _trained_rein(kwargs)
    x = torch.randn(3, 3 + 20, 64, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, 3 + 20, 64, dtype=torch.float64)
    inputs = [x, *(p for p in rein.parameters() if p.requires_grad)]
    out = rein(x, 1)
    assert (type(out.grad_fn).__name__ == "LowRankRefinementBackward") == rein._low_rank_pays(64)
    plain = _plain_refinement(rein, x, 1)
    assert torch.equal(out, plain)
    got = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    expected = torch.autograd.grad(plain, inputs, grad, allow_unused=True)
    for g, e in zip(got, expected, strict=True):
        assert (g is None) == (e is None)
        if e is not None:
            assert (g - e).abs().max().item() <= 1e-12 * max(1.0, e.abs().max().item())


@pytest.mark.parametrize("kwargs", [dict(lora_dim=4), dict(lora_dim=None), dict(lora_dim=64)])
def test_inside_one_forward_the_layers_tokens_are_one_unbind_with_the_same_gradients(kwargs):
    """Indexing a layer of the stacked tokens makes, in backward, a zero-filled gradient of the
    whole stack and a sum into it, for every layer; inside ``one_forward`` every layer's part
    comes from one unbind, whose backward stacks them: the same bits, fewer operations."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.operations: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.operations.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    rein = Rein(num_layers=4, embed_dims=64, patch_size=16, query_dims=8, token_length=10, **kwargs)
    x = torch.randn(2, 1 + 20, 64)
    found = {}
    for per_forward in (False, True):
        rein.zero_grad(set_to_none=True)
        with rein.one_forward() if per_forward else contextlib.nullcontext():
            out = x
            for layer in range(rein.num_layers):
                out = rein(out, layer)
            loss = out.square().sum()
        count = Count()
        with count:
            loss.backward()
        found[per_forward] = ({n: p.grad for n, p in rein.named_parameters() if p.grad is not None}, count.operations)
    (indexed, indexed_ops), (unbound, unbound_ops) = found[False], found[True]
    assert indexed.keys() == unbound.keys() and all(torch.equal(indexed[n], unbound[n]) for n in indexed)
    stacked = 1 if kwargs["lora_dim"] is None else 2  # the tokens, or their two factors
    assert unbound_ops.count("select_backward") == 0 and indexed_ops.count("select_backward") == 4 * stacked
    assert unbound_ops.count("stack") == stacked
    assert len(unbound_ops) < len(indexed_ops)
    assert rein._per_layer is None  # nothing kept after the forward
    # A layer taken without a graph first (no_grad) does not cost the next ones their gradient.
    rein.zero_grad(set_to_none=True)
    with rein.one_forward():
        with torch.no_grad():
            rein(x, 0)
        rein(x, 1).square().sum().backward()
    assert all(rein.get_parameter(name).grad is not None for name in indexed if "tokens" in name)


def _kept_row_bytes(refine, rows: int) -> int:
    """Bytes of the tensors of at least ``rows`` elements that autograd keeps for backward while
    ``refine()`` runs, each storage once."""
    storages: dict[int, int] = {}

    def pack(t):
        if t.numel() >= rows:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        refine()
    return sum(storages.values())


def test_training_refinement_keeps_less_for_backward():
    rein = _trained_rein(dict(lora_dim=4)).float()
    x = torch.randn(2, 1 + 64, 64, requires_grad=True)
    # The fused node keeps the rows once (and rank-wide tensors); autograd keeps the rows, the
    # delta MLP's input and the delta.
    assert _kept_row_bytes(lambda: rein(x, 1), x.numel()) == x.numel() * 4
    assert _kept_row_bytes(lambda: _plain_refinement(rein, x, 1), x.numel()) >= 3 * x.numel() * 4


def test_folded_inference_matches_the_official_outputs(golden):
    rein = Rein(**golden["config"])
    rein.load_state_dict(golden["state_dict"], strict=True)
    calls = _delta_f_calls(rein)
    with torch.no_grad():
        for layer, (x, expected) in enumerate(zip(golden["inputs"], golden["outputs"], strict=False)):
            assert (rein(x, layer) - expected).abs().max().item() <= 1e-5
    assert not calls


def test_bf16_autocast_is_neither_folded_nor_fused():
    # In bf16, 1 + scale * w would round to 1 and lose the delta's own feature term.
    rein = Rein(num_layers=1, embed_dims=32, patch_size=16, query_dims=8, token_length=5, lora_dim=1)
    calls = _delta_f_calls(rein)
    x = torch.randn(1, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            rein(x, 0)
        rein(x, 0)
    assert len(calls) == 2
