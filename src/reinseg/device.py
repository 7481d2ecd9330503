"""Device helpers of the forward's hot path: small constants made on an accelerator without
making the host wait (:func:`device_tensor`, :func:`host_to_device`), and whether autocast is
on (:func:`autocast_enabled`, :func:`autocast_serves`).

``torch.tensor(values, device="cuda")`` copies from pageable host memory, and PyTorch
synchronizes the stream after such a copy: the host waits until every kernel queued before it
has run. The loss's label-map sampling made one such constant per image and prediction twice
(80 waits a step at the paper's batch 4, 10 predictions) among small kernels, each wait leaving
the GPU idle while the host queues the next ones. Writing each value with a fill kernel (the
value travels as the kernel's argument) queues instead of waiting; a tensor the host holds
goes over from pinned memory, asynchronously (:func:`host_to_device`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from .tracing import tracing

__all__ = ["autocast_enabled", "autocast_serves", "device_tensor", "filled", "host_to_device", "usable_device"]

# The device types autocast serves here, found once at import: torch.compile of torch 2.11 (the
# GPU image's) cannot trace torch.amp.is_autocast_available and breaks the graph at every call.
_AUTOCAST_TYPES = frozenset(
    kind
    for kind in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu", "privateuseone")
    if torch.amp.is_autocast_available(kind)
)


def autocast_serves(device_type: str) -> bool:
    """``torch.amp.is_autocast_available(device_type)``, traced by torch.compile without a graph break."""
    return device_type in _AUTOCAST_TYPES


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type``; False for a type it does not serve (``meta``,
    on which ``torch.is_autocast_enabled`` raises). Traced by torch.compile without a graph break."""
    return device_type in _AUTOCAST_TYPES and torch.is_autocast_enabled(device_type)


def device_tensor(values: Sequence[float] | Sequence[Sequence[float]], dtype: torch.dtype, device) -> Tensor:
    """``torch.tensor(values, dtype=dtype, device=device)``, the same values, for a flat or a
    rectangular nested sequence; on an accelerator made by fill kernels instead of a host copy.
    On the CPU and under a tracer (which folds the constant) it is ``torch.tensor`` itself."""
    device = torch.device(device)
    if device.type == "cpu" or tracing():
        return torch.tensor(values, dtype=dtype, device=device)
    return filled(values, dtype, device)


def filled(values: Sequence[float] | Sequence[Sequence[float]], dtype: torch.dtype, device) -> Tensor:
    """The tensor of ``values`` (flat or rectangular nested), each written by a fill kernel."""
    nested = bool(values) and isinstance(values[0], Sequence)
    rows = cast("list[Sequence[float]]", list(values) if nested else [values])
    if any(len(row) != len(rows[0]) for row in rows):
        # torch.tensor refuses a ragged list; a flat fill would give it a wrong shape silently.
        raise ValueError(f"filled: rows of different lengths {[len(row) for row in rows]}")
    flat = [v for row in rows for v in row]
    out = torch.empty(len(flat), dtype=dtype, device=device)
    for i, value in enumerate(flat):
        out[i].fill_(value)
    return out.view(len(rows), -1) if nested else out


def host_to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` (in host memory) copied to ``device`` without making the host wait: on CUDA
    from pinned memory, asynchronously (PyTorch keeps the pinned block until the copy has run);
    elsewhere, and under a tracer, ``tensor.to(device)``."""
    if device.type != "cuda" or tracing():
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def usable_device(name: str) -> torch.device:
    """The device ``name`` (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...) if tensors can be made on
    it here; ValueError saying why not otherwise (a misspelt type, no driver, an index past the
    devices present)."""
    try:
        device = torch.device(name)
        if device.type == "meta":
            raise RuntimeError("meta tensors hold no values")
        torch.empty(0, device=device)  # the one test that holds for every backend
    except Exception as err:  # RuntimeError, AssertionError (a build without CUDA), ModuleNotFoundError (hpu), ...
        # The first sentence: backends add pages of advice and dispatch tables.
        reason = str(err).strip().split(". ")[0].splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ValueError(f"device {name!r} is not usable here: {reason}") from None
    return device
