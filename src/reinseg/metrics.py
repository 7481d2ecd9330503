"""Semantic-segmentation scores from a confusion matrix, reduced over DDP ranks.

IoU of class c = TP / (TP + FP + FN), counted over pixels whose ground truth is not ignored (255);
a prediction outside the classes counts as a miss of the true class. A class that is neither in
the ground truth nor predicted has no IoU (None) and is left out of the mean, as mmseg and the
official Cityscapes evaluation (cityscapesScripts) do. The domain-generalization papers report
the mIoU per unseen target domain and the mean of those.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["ConfusionMatrix", "scores_from_confusion", "format_scores_table", "mean_over_domains"]

# The running lowest and highest invalid target values before any is seen.
_NO_LOW, _NO_HIGH = torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min


class ConfusionMatrix:
    """Pixel counts ``matrix[true, predicted]``; column ``num_classes`` collects out-of-range predictions.

    A target value outside the classes (and not ``ignore_index``) is an error. On the CPU
    :meth:`update` raises it at once, listing the values. On a device it is counted there and
    raised by :meth:`check` (which :meth:`reduce` and :meth:`scores` call): reading it in every
    update would make the host wait for the device once per image, where it can queue the next
    image's work instead.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=device)
        # Target pixels outside the classes since the last reset, and their lowest and highest values.
        self._outside = torch.zeros(3, dtype=torch.int64, device=device)
        self.reset()

    def update(self, prediction: Tensor, target: Tensor) -> None:
        """Count ``prediction`` against ``target`` (same shape, integer class ids), without reading
        anything back from the device."""
        if prediction.shape != target.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
        classes = self.num_classes
        target = target.to(self.matrix.device).long().flatten()
        prediction = prediction.to(self.matrix.device).long().flatten()
        valid = target != self.ignore_index
        inside = (target >= 0) & (target < classes)
        outside = valid & ~inside
        if _checks_each_update(self.matrix.device):
            if outside.any():  # nothing counted: the error names this update
                bad = target[outside].unique()[:8].tolist()
                raise ValueError(f"target values {bad} are outside 0..{classes - 1} and not {self.ignore_index}")
        elif target.numel():
            self._outside[0] += outside.sum()
            # Filled with Python numbers: CUDA's masked_fill reads a tensor fill value on the host.
            self._outside[1] = torch.minimum(self._outside[1], target.masked_fill(~outside, _NO_LOW).min())
            self._outside[2] = torch.maximum(self._outside[2], target.masked_fill(~outside, _NO_HIGH).max())
        prediction = torch.where((prediction < 0) | (prediction >= classes), classes, prediction)
        # Ignored and outside pixels go to one extra bin, dropped: no boolean index (its size is
        # read by the host), and a fixed-size scatter rather than bincount (which reads the largest value).
        bins = torch.where(valid & inside, target * (classes + 1) + prediction, classes * (classes + 1))
        counts = torch.zeros(classes * (classes + 1) + 1, dtype=torch.int64, device=bins.device)
        counts.scatter_add_(0, bins, torch.ones_like(bins))
        self.matrix += counts[:-1].view(classes, classes + 1)

    def check(self) -> None:
        """A ValueError if an update since the last reset had target values outside the classes."""
        count, low, high = self._outside.tolist()
        if count:
            # None of them on this DDP rank: the count is all ranks'.
            values = "" if low > high else f" [{low}]" if low == high else f" from {low} to {high}"
            raise ValueError(
                f"target values{values} are outside 0..{self.num_classes - 1} and not {self.ignore_index}: "
                f"{count} pixel(s)"
            )

    def reduce(self) -> None:
        """Sum the counts of all DDP ranks (a no-op outside distributed runs); then :meth:`check`,
        on every rank alike."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = torch.cat([self.matrix.flatten(), self._outside[:1]])  # one all-reduce for both
            torch.distributed.all_reduce(counts)
            self.matrix.copy_(counts[:-1].view_as(self.matrix))
            self._outside[0] = counts[-1]
        self.check()

    def reset(self) -> None:
        self.matrix.zero_()
        # Fills, not a copy from the host (which a GPU's stream waits for).
        self._outside[0].fill_(0)
        self._outside[1].fill_(_NO_LOW)
        self._outside[2].fill_(_NO_HIGH)

    def scores(self, class_names: Sequence[str] | None = None) -> dict:
        self.check()
        return scores_from_confusion(self.matrix, class_names)


def _checks_each_update(device: torch.device) -> bool:
    """Whether :meth:`ConfusionMatrix.update` checks its targets at once: on the CPU, where
    reading a value makes no host wait for a device."""
    return device.type == "cpu"


def scores_from_confusion(matrix: Tensor, class_names: Sequence[str] | None = None) -> dict:
    """Scores in percent from a ``(K, K [+ 1])`` confusion matrix.

    Returns a dict: ``mIoU``, ``aAcc`` (pixel accuracy), ``mAcc``, ``IoU`` and ``Acc`` (class name
    -> value, None for a class absent from both ground truth and prediction), ``pixels``.
    """
    matrix = matrix.double().cpu()
    num_classes = matrix.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names for {num_classes} classes")
    tp = matrix.diagonal()[:num_classes]
    gt = matrix.sum(1)
    predicted = matrix[:, :num_classes].sum(0)
    union = gt + predicted - tp
    iou = [None if u == 0 else 100.0 * t / u for t, u in zip(tp.tolist(), union.tolist(), strict=False)]
    acc = [None if g == 0 else 100.0 * t / g for t, g in zip(tp.tolist(), gt.tolist(), strict=False)]
    total = gt.sum().item()
    return {
        "mIoU": _mean(iou),
        "aAcc": None if total == 0 else 100.0 * tp.sum().item() / total,
        "mAcc": _mean(acc),
        "IoU": dict(zip(names, iou, strict=False)),
        "Acc": dict(zip(names, acc, strict=False)),
        "pixels": int(total),
    }


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def mean_over_domains(results: Mapping[str, dict], domains: Sequence[str] | None = None) -> float | None:
    """Mean mIoU over ``domains`` (default: all), as the DG papers average their unseen targets:
    the mean of each domain's mIoU rounded to two decimals, as the official ``DGIoUMetric``
    averages mmseg's rounded per-dataset mIoUs (and as a paper's table adds up); it differs from
    the mean of the unrounded values by at most 0.005."""
    keys = list(results) if domains is None else list(domains)
    missing = [k for k in keys if k not in results]
    if missing:
        raise KeyError(f"no results for domains {missing}")
    values = [results[k]["mIoU"] for k in keys]
    return None if any(v is None for v in values) else mean_of_rounded(values)


def mean_of_rounded(values: Sequence[float]) -> float | None:
    """The mean of ``values`` rounded to two decimals, as the official ``DGIoUMetric`` averages
    mmseg's rounded mIoUs; None for no values."""
    return sum(float(np.round(v, 2)) for v in values) / len(values) if values else None


def format_scores_table(results: Mapping[str, dict], class_names: Sequence[str]) -> str:
    """Per-class IoU (rows) per domain (columns), with mIoU / aAcc rows."""
    domains = list(results)
    width = max(12, *(len(n) for n in class_names))
    cols = [max(8, len(d)) for d in domains]
    header = f"{'class':<{width}}" + "".join(f"  {d:>{c}}" for d, c in zip(domains, cols, strict=False))
    lines = [header, "-" * len(header)]

    def row(label: str, values: list[float | None]) -> str:
        cells = "".join(f"  {_fmt(v):>{c}}" for v, c in zip(values, cols, strict=False))
        return f"{label:<{width}}{cells}"

    for name in class_names:
        lines.append(row(name, [results[d]["IoU"].get(name) for d in domains]))
    lines.append("-" * len(header))
    lines.append(row("mIoU", [results[d]["mIoU"] for d in domains]))
    lines.append(row("aAcc", [results[d]["aAcc"] for d in domains]))
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def score_directories(
    prediction_dir: str,
    label_dir: str,
    class_names: Sequence[str],
    ignore_index: int = 255,
    label_suffix: str | None = None,
) -> dict:
    """Score train-ID PNG predictions against train-ID PNG labels matched by relative path.

    Every label file (``*{label_suffix}`` under ``label_dir``; by default ``*labelTrainIds.png``
    where there are such files, as in Cityscapes, GTAV and ACDC, else every ``*.png``) needs a
    prediction at the same relative path under ``prediction_dir``; a missing or extra prediction,
    a size mismatch or an unreadable file is an error naming the file. Predictions in a folder an
    ``eval --save-preds`` or ``predict`` is writing, or one of them left unfinished (the
    ``.reinseg-incomplete`` marker in it, or an evaluation's in a folder above it;
    :mod:`reinseg.unfinished`), are refused: they may be partial, or two models' side by side.
    """
    from pathlib import Path

    import numpy as np
    from PIL import Image

    from .data.io import RASTER_FORMATS, files_below
    from .unfinished import check_finished

    pred_root, label_root = Path(prediction_dir), Path(label_dir)
    for root, what in ((pred_root, "prediction"), (label_root, "label")):
        if not root.is_dir():
            raise FileNotFoundError(f"{what} folder not found: {root}")
    check_finished(pred_root)
    label_files = files_below(label_root)
    if label_suffix is None:
        label_suffix = "labelTrainIds.png" if any(p.name.endswith("labelTrainIds.png") for p in label_files) else ".png"
    labels = sorted(p for p in label_files if p.name.endswith(label_suffix))
    predictions = sorted(p for p in files_below(pred_root) if p.name.endswith(".png"))
    if not labels:
        raise ValueError(f"no label files (*{label_suffix}) under {label_root}")
    missing = sorted(set(labels) - set(predictions))
    extra = sorted(set(predictions) - set(labels))
    if missing:
        raise ValueError(
            f"{len(missing)} labels have no prediction at the same relative path under {pred_root}, "
            f"e.g. {', '.join(map(str, missing[:3]))}"
        )
    if extra:
        raise ValueError(
            f"{len(extra)} predictions have no label at the same relative path under {label_root}, "
            f"e.g. {', '.join(map(str, extra[:3]))}"
        )

    def read(path: Path) -> np.ndarray:
        try:
            with Image.open(path, formats=RASTER_FORMATS) as image:
                array = np.asarray(image)
        except Exception as err:
            raise ValueError(f"could not read {path}: {err}") from err
        if array.ndim != 2:
            raise ValueError(f"{path} is not a single-channel label image (shape {array.shape})")
        return array

    confusion = ConfusionMatrix(len(class_names), ignore_index)
    for relative in labels:
        label, prediction = read(label_root / relative), read(pred_root / relative)
        if label.shape != prediction.shape:
            raise ValueError(
                f"{pred_root / relative} is {prediction.shape[1]}x{prediction.shape[0]} but its label "
                f"{label_root / relative} is {label.shape[1]}x{label.shape[0]}"
            )
        try:
            confusion.update(torch.from_numpy(prediction.astype(np.int64)), torch.from_numpy(label.astype(np.int64)))
        except ValueError as err:
            raise ValueError(f"{label_root / relative}: {err}") from err
    results = confusion.scores(class_names)
    results["num_images"] = len(labels)
    return results
