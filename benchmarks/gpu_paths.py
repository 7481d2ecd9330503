"""What the benchmarks that count a GPU's work on the CPU share (``memory_estimate.py``,
``launches.py``): the GPU's code paths, and a synthetic batch."""

from __future__ import annotations

import torch


def take_gpu_code_paths() -> None:
    """Make the head take the GPU's code paths on the CPU: ``eager_on_cpu`` answers no, so the
    deformable attention samples with ``grid_sample`` (not the CPU's CSR kernel), the mask
    products and short softmaxes take their plain forms, and the matching's costs are one batched
    pass, keeping and launching what a GPU does."""
    import reinseg.heads.criterion
    import reinseg.heads.deformable_attention
    import reinseg.heads.mask2former

    for module in (reinseg.heads.criterion, reinseg.heads.deformable_attention, reinseg.heads.mask2former):
        module.eager_on_cpu = _never  # type: ignore[attr-defined]


def _never(tensor: torch.Tensor) -> bool:
    return False


def synthetic_batch(batch: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(batch, 3, crop, crop)`` images and ``(batch, crop, crop)`` labels of 19 classes,
    the top eighth of each image ignored (255)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(batch, 3, crop, crop, generator=generator)
    labels = torch.randint(0, 19, (batch, crop, crop), generator=generator)
    labels[:, : crop // 8] = 255
    return images, labels
