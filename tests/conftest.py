import contextlib
import os
from pathlib import Path

# Tests never reach the network: pretrained downloads must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DATA = Path(__file__).parent / "data"

# One intra-op thread: the tests' tensors are tiny, and a second thread's hand-offs cost more than
# it computes (fast tier 62.8 -> 57.3 s on 2 cores). A test about thread counts sets its own.
torch.set_num_threads(1)


def run_reinseg(args: list[str], env_without: tuple[str, ...] = ()):
    """Run ``python args...`` in a fresh interpreter on this checkout's reinseg (``src/`` first on
    PYTHONPATH), without the environment variables ``env_without``; the CompletedProcess (text)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in env_without}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)


def load_golden(name: str) -> dict:
    return torch.load(DATA / name, map_location="cpu", weights_only=False)


def shape_rand(seed: int, real_rand=torch.rand):
    """The ``torch.rand`` stand-in of the official training goldens (``official_train_tiny.pt``).

    For a size ``(..., P, d)`` it returns the same ``(P, d)`` block of U[0, 1) values at every
    leading index, drawn from a generator seeded by ``seed`` and ``(P, d)``: the points then do not
    depend on the order or batching of the draws, only on their being drawn with ``torch.rand``.
    """

    def rand(
        *size, generator=None, out=None, dtype=None, layout=None, device=None, pin_memory=False, requires_grad=False
    ):
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        size = tuple(int(s) for s in size)
        tail = size[-2:]
        key = seed * 1000003 + sum(t * 7919 ** (i + 1) for i, t in enumerate(tail))
        block = real_rand(tail, generator=torch.Generator().manual_seed(key % 2**62), dtype=torch.float32)
        values = block.expand(size).to(device=device, dtype=dtype or torch.get_default_dtype()).clone()
        return values.requires_grad_(requires_grad)

    return rand


@contextlib.contextmanager
def golden_rand(seed: int):
    """Replace ``torch.rand`` by :func:`shape_rand` inside the block."""
    real = torch.rand
    torch.rand = shape_rand(seed, real)
    try:
        yield
    finally:
        torch.rand = real


def relative_errors(ours: dict, theirs: dict) -> dict[str, float]:
    """Per tensor, the largest difference over the tensor's largest official entry, that floored at
    1e-3 of the largest official entry overall (entries that are only float noise, such as the zero
    true gradient of a conv bias in front of a one-channel GroupNorm, are not compared relatively)."""
    top = max(t.abs().max().item() for t in theirs.values())
    return {
        name: ((ours[name] - t).abs().max() / max(t.abs().max().item(), 1e-3 * top)).item()
        for name, t in theirs.items()
    }


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
    for ours, theirs in zip(features, golden["plain_features"], strict=False):
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


@pytest.fixture
def one_thread():
    """Run the test with one PyTorch thread (golden comparisons of sums made by the official code)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def killed_writers_leftover(folder, name: str, is_folder: bool = False):
    """What a writer of ``folder/name`` killed midway leaves: its temporary file (or staging
    folder, ``is_folder``), named with the id of a process that has ended."""
    import subprocess
    import sys

    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    leftover = folder / f".{name}.{ended.pid}-partial-x1y2{'' if is_folder else '.tmp'}"
    folder.mkdir(parents=True, exist_ok=True)
    if is_folder:
        leftover.mkdir()
        (leftover / "frame_000001.png").write_bytes(b"half")
    else:
        leftover.write_bytes(b"half")
    return leftover


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler (KeyboardInterrupt) in this process, as an interactive one has
    (a test process started as a background job ignores SIGINT), put back after the test."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def take_gpu_code_paths(monkeypatch) -> None:
    """The head's and the loss's GPU code paths on the CPU for the test (``eager_on_cpu``
    answers no, as ``benchmarks/gpu_paths.py`` sets it): the deformable attention through
    ``grid_sample`` (not the CSR kernel), the plain mask products and short softmaxes, the
    matching of every prediction in one trip and every prediction scored together."""
    import reinseg.heads.criterion as criterion
    import reinseg.heads.deformable_attention as deformable_attention
    import reinseg.heads.mask2former as mask2former

    for module in (criterion, deformable_attention, mask2former):
        monkeypatch.setattr(module, "eager_on_cpu", lambda tensor: False)


def copies_to_device(monkeypatch) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """Records ``(dtype, shape)`` of each tensor the loss sends from the host to the device through
    ``host_to_device`` (pinned, without a wait on a GPU; a pageable copy would wait)."""
    import reinseg.heads.criterion as criterion

    sent: list[tuple[torch.dtype, tuple[int, ...]]] = []
    to_device = criterion.host_to_device

    def recorded(tensor, device):
        sent.append((tensor.dtype, tuple(tensor.shape)))
        return to_device(tensor, device)

    monkeypatch.setattr(criterion, "host_to_device", recorded)
    return sent


class HostWaits:
    """Records each operation that makes the host wait for a device (``.item()``, a boolean
    index, ``unique``, ``bincount``, a copy to the host, ...) while it is entered, as
    ``(where(), operation)`` in ``waits``; counted on the CPU, operation by operation. A value
    read inside another operation (``masked_fill`` with a tensor fill value calls ``.item()``),
    which a dispatch mode does not see, is found by the profiler and recorded at the block's end
    as ``(None, "aten._local_scalar_dense inside another operation")``. Copies from the host to
    a device do not show on the CPU."""

    def __init__(self, monkeypatch, where=lambda: None) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        self.waits: list[tuple] = []
        waits = self.waits

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                by_mask = func in _INDEXING_OPS and any(i is not None and i.dtype == torch.bool for i in args[1])
                if func in _WAITING_OPS or by_mask:
                    waits.append((where(), str(func)))
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        self.active = False
        for name in ("cpu", "numpy", "tolist", "item"):  # copies to the host (no-ops on the CPU)
            method = getattr(torch.Tensor, name)

            def recorded(tensor, *a, _method=method, _name=name, **k):
                if self.active:
                    waits.append((where(), f"Tensor.{_name}"))
                return _method(tensor, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, recorded)

    def __enter__(self) -> "HostWaits":
        self.active, self.start = True, len(self.waits)
        self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self.profile.__enter__()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.mode.__exit__(*exc)
        self.profile.__exit__(*exc)
        self.active = False
        self.waits += [(None, "aten._local_scalar_dense inside another operation")] * _reads_inside_operations(
            self.profile.profiler.kineto_results.events()  # raw: building the event tree takes seconds
        )


_aten = torch.ops.aten
# The operations whose result the host reads (HostWaits records them), and the indexing ones that
# read where their index is a boolean mask.
_WAITING_OPS = {
    _aten._local_scalar_dense.default,  # .item(), bool(), float()
    _aten.nonzero.default,
    _aten._unique2.default,
    _aten.unique_dim.default,
    _aten.unique_consecutive.default,
    _aten.masked_select.default,
    _aten.equal.default,
    _aten.is_nonzero.default,
    _aten.bincount.default,  # its size is the largest value
    _aten.repeat_interleave.Tensor,
}
_INDEXING_OPS = {_aten.index.Tensor, _aten.index_put_.default, _aten.index_put.default}
# The operations that are a read themselves (``.item()``, ``bool()``), or the dispatch mode's own
# second record of one, by the profiler's names.
_READS = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero"}
# Operations the dispatch mode records as waits already (a read inside them is theirs), by the
# profiler's names (an overload's name without the overload).
_RECORDED_WAITS = {op.name().split(".")[0] for op in _WAITING_OPS | _INDEXING_OPS} - _READS


def _reads_inside_operations(events) -> int:
    """How many reads (``_local_scalar_dense``) ran inside an operation other than a read or a
    wait the dispatch mode records, by the profiler's raw events' times on one thread (the mode
    sees only the outermost operation)."""
    spans = [(e.name(), e.start_thread_id(), e.start_ns(), e.end_ns()) for e in events if e.name().startswith("aten::")]
    reads = [span for span in spans if span[0] == "aten::_local_scalar_dense"]
    hidden = 0
    for _, thread, start, end in reads:
        around = {name for name, t, s, e in spans if t == thread and s <= start < e and end <= e}
        hidden += bool(around - _READS) and not around & _RECORDED_WAITS
    return hidden
