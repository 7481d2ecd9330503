"""reinseg.device: constants made on an accelerator by fill kernels hold torch.tensor's values.

Oracle: ``torch.tensor`` of the same values (its conversion of each Python number to the dtype).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from reinseg.device import autocast_enabled, autocast_serves, device_tensor, filled, host_to_device

SIZES = [[512, 1024], [[128, 64], [64, 32], [32, 16]]]
FRACTIONS = [[0.1, 1 / 3, 1e-40], [[0.1, 0.7], [2 / 3, 1e-300]]]


@pytest.mark.parametrize(
    "values, dtype",
    [(v, d) for v in SIZES for d in (torch.float32, torch.float64, torch.int32)]
    + [(v, d) for v in FRACTIONS for d in (torch.float32, torch.float64, torch.bfloat16)],
)
def test_filled_holds_the_values_torch_tensor_makes(values, dtype):
    expected = torch.tensor(values, dtype=dtype)
    got = filled(values, dtype, "cpu")
    assert got.shape == expected.shape and got.dtype == dtype
    assert torch.equal(got, expected)


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_device_tensor_fills_off_the_cpu_and_is_torch_tensor_on_it():
    values = [[128, 64], [64, 32]]
    assert torch.equal(device_tensor(values, torch.float32, "cpu"), torch.tensor(values, dtype=torch.float32))
    with _Ops() as ops:
        on_meta = device_tensor(values, torch.float32, "meta")
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 2) and on_meta.dtype == torch.float32
    # Four fills, no copy: `out[i] = value` would make a CPU scalar tensor and copy it over.
    assert ops.names.count("fill_.Scalar") == 4
    assert not any(name.startswith(("scalar_tensor", "copy_")) for name in ops.names), ops.names


def test_host_to_device_copies_to_cuda_from_pinned_memory_without_waiting():
    """A blocking copy from pageable memory makes the host wait for everything queued on the
    GPU; from pinned memory with ``non_blocking`` it is queued behind it. (No GPU here: the
    calls are recorded.)"""
    calls = []

    class HostTensor:
        def pin_memory(self):
            calls.append("pin_memory")
            return self

        def to(self, device, **kwargs):
            calls.append(("to", device, kwargs))
            return "on the device"

    assert host_to_device(HostTensor(), torch.device("cuda", 1)) == "on the device"  # type: ignore[arg-type]
    assert calls == ["pin_memory", ("to", torch.device("cuda", 1), {"non_blocking": True})]
    values = torch.arange(5)
    assert host_to_device(values, torch.device("cpu")) is values
    assert host_to_device(values, torch.device("meta")).device.type == "meta"


def test_filled_refuses_ragged_rows_as_torch_tensor_does():
    with pytest.raises(ValueError):
        torch.tensor([[1, 2], [3]])
    with pytest.raises(ValueError, match="rows of different lengths"):
        filled([[1, 2], [3]], torch.float32, "meta")


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "meta", "mps"])
def test_autocast_serves_as_torch_says(device_type):
    assert autocast_serves(device_type) == torch.amp.is_autocast_available(device_type)


def test_autocast_enabled_follows_autocast_and_is_false_where_it_does_not_serve():
    assert not autocast_enabled("cpu") and not autocast_enabled("meta")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_enabled("cpu") and not autocast_enabled("meta")


@pytest.mark.slow  # dynamo's first use in the process: about 1 s
def test_the_autocast_checks_trace_without_a_graph_break():
    """Rein and the encoder FFN ask in every block; torch.amp.is_autocast_available broke
    torch.compile's graph there (torch 2.11)."""

    def forward(x):
        y = x.sin()  # (a graph under way: torch 2.11 broke it only then)
        if autocast_serves(x.device.type) and not autocast_enabled(x.device.type):
            y = y * 2
        return y.cos()

    explanation = torch._dynamo.explain(forward)(torch.ones(3))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_usable_device_accepts_the_cpu_and_says_why_another_is_not_usable():
    from reinseg.device import usable_device

    assert usable_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device 'gpu' is not usable here: Expected one of cpu"):
        usable_device("gpu")  # not a device type
    with pytest.raises(ValueError, match="device 'meta' is not usable here"):
        usable_device("meta")
    missing = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"  # one past the last
    with pytest.raises(ValueError, match=f"device '{missing}' is not usable here: ."):
        usable_device(missing)
