"""Whether a tracer is running (torch.compile, torch.export, jit tracing).

The CPU shortcuts (the CSR deformable kernel, the mask products' row-sparse backward) and the
hand-written autograd nodes (:mod:`reinseg.rein_fused`) step aside under a tracer: tracers
follow neither sparse tensors, host-side steps nor custom autograd nodes as well as the plain
operations they replace, which compute the same values.
"""

from __future__ import annotations

import torch

__all__ = ["tracing"]


def tracing() -> bool:
    """True inside torch.compile, torch.export or ``torch.jit.trace``."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
