"""Mask2Former's training loss for semantic segmentation, with the official Rein settings.

Every prediction (the initial queries' and each decoder layer's) is matched to the ground-truth
segments one-to-one (Hungarian, on ``num_points`` uniformly sampled points) and then scored:
class cross-entropy (no-object weighted 0.1), and mask BCE + dice on points chosen by
uncertainty (``oversample_ratio`` candidates, ``importance_sample_ratio`` of them the most
uncertain, the rest uniform). Semantic labels become one binary mask per class present; ignored
pixels (255) belong to no class, so, as in mmseg, they count as background of every mask.

The numerics follow mmseg 1.2 / mmdet 3.3 term for term (pinned by ``tests/test_train_golden.py``):
the classes of an image come in ``torch.unique`` order (ascending); the matching points of every
image are drawn, also for an image without a labelled pixel, and all points come from
``torch.rand`` in mmdet's order, so a seeded run draws the same points; mask and dice losses are
divided by the number of matched queries summed over the images, each image counting at least one
(mmdet's ``MaskSamplingResult.avg_factor``), averaged over DDP ranks and at least one.

On the CPU (and devices whose generator is not known here) each prediction is matched and then
scored, as mmdet does. On CUDA, where reading the costs makes the host wait for the device,
every prediction is matched first, with one trip to the host for all: each prediction's loss
points are drawn and dropped where mmdet draws them, and drawn again from the generator's state
saved there, so every draw is still mmdet's. Both the costs (three predictions a pass at the
paper config) and the losses (two a pass) are computed for several predictions together: each
operation is a kernel launch on a GPU, and a step's loss takes about 700 instead of about 1450.
The values are those of one prediction at a time up to the order of their sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from ..device import device_tensor, host_to_device
from ..tracing import tracing
from .deformable_csr import eager_on_cpu
from .grid_sample_math import grid_sample_pixel, powers_of_two

# mmdet divides summed losses by (avg_factor + eps).
_EPS = torch.finfo(torch.float32).eps

__all__ = ["point_sample", "semantic_to_masks", "Segments", "SegmentBatch", "HungarianMatcher", "Mask2FormerLoss"]


def point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of ``maps (N, C, H, W)`` at normalized ``coords (N, P, 2)`` (x, y in [0, 1]) -> ``(N, C, P)``."""
    return F.grid_sample(maps, 2.0 * coords.unsqueeze(2) - 1.0, align_corners=False).squeeze(3)


def semantic_to_masks(label: Tensor, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """One binary mask per class present in ``label (H, W)``: ``(classes (G,), masks (G, H, W))``
    (the classes as :meth:`Segments.of` finds them)."""
    classes = Segments.of(label, ignore_index).classes
    return classes, label.unsqueeze(0) == classes.view(-1, 1, 1)


class Segments:
    """The ground-truth segments of one image, kept as its label map: segment ``g`` is the pixels
    labelled ``classes[g]``.

    Sampling reads the label map instead of ``(G, H, W)`` float masks: a bilinear sample of a
    binary mask is the sum of its four pixels' bilinear weights where the pixel belongs to the
    segment. The weights and the sum are ``grid_sample``'s, step for step (zero padding,
    align_corners False), so the values are bit for bit ``point_sample`` of the masks
    (``tests/test_criterion.py``), without making the masks.

    Args:
        label: ``(H, W)`` integer labels; classes: ``(G,)`` the segments' labels.
    """

    def __init__(self, label: Tensor, classes: Tensor) -> None:
        self.label = label
        self.classes = classes
        self._framed: Tensor | None = None

    @classmethod
    def of(cls, label: Tensor, ignore_index: int = 255) -> Segments:
        """One segment per class present in ``label (H, W)``, ``ignore_index`` excluded.

        The classes keep ``torch.unique(sorted=False)``'s order, as mmseg's
        ``_seg_data_to_instance_data`` takes them: the order of the segments decides ties in the
        matching. PyTorch's CPU and CUDA kernels both sort, whatever ``sorted`` says.
        """
        classes = torch.unique(label, sorted=False)
        return cls(label, classes[classes != ignore_index])

    @classmethod
    def of_images(
        cls,
        labels: Tensor,
        num_classes: int,
        ignore_index: int = 255,
        values: Sequence[Sequence[int]] | None = None,
    ) -> SegmentBatch:
        """:meth:`of` for each image of ``labels (B, H, W)``, in one trip to the host.

        One ``torch.unique`` over the batch's labels keyed by their image finds every image's
        classes in ascending order, as :meth:`of` finds them; a GPU then waits for the host once
        per batch, not twice per image. The same trip checks the labels: a value outside
        ``0..num_classes - 1`` that is not ``ignore_index`` raises ValueError naming it. The
        classes are int64 (indices) whatever the labels' dtype.

        ``values``, each label's distinct values as the host already holds them
        (:func:`reinseg.data.label_values`), spare that trip off the CPU: the classes are taken
        from them, checked the same way, and the host does not wait. On the CPU, where the trip
        costs no wait, the labels' classes are found and those ``values`` give must equal them
        (ValueError otherwise; an ignored value or a repeat does not count): a pipeline whose
        values drift from its labels fails in the CPU tests instead of training on wrong
        segments on a GPU.
        """
        if labels.dim() != 3:
            raise ValueError(f"labels must be (B, H, W), got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must hold integer class IDs, got {labels.dtype}")
        batch = labels.shape[0]
        if values is not None and len(values) != batch:
            raise ValueError(f"label_values holds {len(values)} images' values for {batch} labels")
        if values is None or eager_on_cpu(labels):
            per_image = _classes_read_back(labels, num_classes, ignore_index)
            if values is not None:
                given = _classes_of_values(values, num_classes, ignore_index)
                for b, (found, held) in enumerate(zip(per_image, given, strict=True)):
                    if found != held:
                        raise ValueError(f"label_values of image {b} give classes {held}, its label holds {found}")
        else:
            per_image = _classes_of_values(values, num_classes, ignore_index)
        # Each image's classes, and the same padded to one row per image (for sampling every
        # image at once; the rows past an image's classes are never read): one copy for both.
        longest = max((len(c) for c in per_image), default=0)
        padded = [c + [-1] * (longest - len(c)) for c in per_image]
        both = host_to_device(torch.tensor(sum(per_image, []) + sum(padded, []), dtype=torch.int64), labels.device)
        flat, rows = both.split([len(both) - batch * longest, batch * longest])
        classes = flat.split([len(c) for c in per_image])  # int64: indices, whatever the labels' dtype
        segments = [cls(label, c) for label, c in zip(labels, classes, strict=True)]
        # int32 here, once a step, as the sampler takes them (not once per prediction there).
        return SegmentBatch(labels, segments, flat, rows.to(torch.int32).view(batch, longest))

    def __len__(self) -> int:
        return len(self.classes)

    def sample(self, coords: Tensor) -> Tensor:
        """Every segment at the same points ``coords (P, 2)`` (normalized ``(x, y)`` in [0, 1])
        -> ``(G, P)``."""
        return sample_label_maps(self._frame(), self.label.shape, coords[None], self.classes.view(1, -1))[0]

    def sample_each(self, index: Tensor, coords: Tensor) -> Tensor:
        """Segment ``index[n]`` at its own points ``coords[n]`` (``(N,)``, ``(N, P, 2)``) -> ``(N, P)``."""
        classes = self.classes[index].view(-1, 1)
        return sample_label_maps(self._frame(), self.label.shape, coords, classes, images=None)[:, 0]

    def _frame(self) -> Tensor:
        if self._framed is None:
            self._framed = framed_label_maps(self.label[None])
        return self._framed


def _classes_read_back(labels: Tensor, num_classes: int, ignore_index: int) -> list[list[int]]:
    """Each image's classes in ``labels (B, H, W)``, ascending, found on the labels' device and
    read back in one trip; ValueError naming the values outside the classes and not ignored."""
    batch = labels.shape[0]
    ignored, invalid = num_classes, num_classes + 1  # codes of the other values
    known = (labels >= 0) & (labels < num_classes)
    codes = torch.where(labels == ignore_index, ignored, torch.where(known, labels.long(), invalid))
    image = torch.arange(batch, device=labels.device).view(-1, 1, 1)
    keys = torch.unique(codes + (invalid + 1) * image).tolist()
    if any(key % (invalid + 1) == invalid for key in keys):
        # Only on the error path: the values themselves, for the message.
        _raise_outside(labels[(labels != ignore_index) & ~known].unique()[:8].tolist(), num_classes, ignore_index)
    per_image: list[list[int]] = [[] for _ in range(batch)]
    for key in keys:
        b, code = divmod(key, invalid + 1)
        if code < num_classes:
            per_image[b].append(code)
    return per_image


def _classes_of_values(values: Sequence[Sequence[int]], num_classes: int, ignore_index: int) -> list[list[int]]:
    """Each image's classes, ascending, from its label's distinct ``values``; ValueError as
    :func:`_classes_read_back` raises it."""
    per_image = [sorted({int(v) for v in image if v != ignore_index}) for image in values]
    bad = sorted({v for image in per_image for v in image if not 0 <= v < num_classes})
    if bad:
        _raise_outside(bad[:8], num_classes, ignore_index)
    return per_image


def _raise_outside(bad: list[int], num_classes: int, ignore_index: int) -> None:
    raise ValueError(f"label values {bad} are outside 0..{num_classes - 1} and not {ignore_index}")


class SegmentBatch(list):
    """The segments of every image of a batch (a list of :class:`Segments`), sampled together:
    one pass over all images instead of one per image, with the same values.

    Args:
        labels: ``(B, H, W)``; segments: each image's; classes: ``(G_0 + ... + G_{B-1},)`` int64,
            the images' classes one after the other; padded_classes: ``(B, G_max)`` int32, each
            image's classes, padded.
    """

    def __init__(self, labels: Tensor, segments: list[Segments], classes: Tensor, padded_classes: Tensor) -> None:
        super().__init__(segments)
        self.labels = labels
        self.classes = classes
        self.padded_classes = padded_classes
        self._framed: Tensor | None = None

    def sample(self, coords: Tensor) -> Tensor:
        """Each image's segments at that image's points ``coords (B, P, 2)`` -> ``(B, G_max, P)``:
        image ``b``'s ``(G_b, P)`` in ``[b, :G_b]`` (its padding rows hold nothing to read). For
        ``coords (k B, P, 2)``, ``k`` rounds of the images (``k`` predictions' points): ``(k B,
        G_max, P)``, row ``i`` image ``i mod B``'s."""
        rounds, left = divmod(coords.shape[0], len(self))
        if left or not rounds:
            raise ValueError(f"coords hold {coords.shape[0]} images' points for a batch of {len(self)} images")
        if rounds == 1:
            return sample_label_maps(self._frame(), self.labels.shape[1:], coords, self.padded_classes)
        images = torch.arange(len(self), dtype=torch.int32, device=coords.device).repeat(rounds)
        classes = self.padded_classes.repeat(rounds, 1)
        return sample_label_maps(self._frame(), self.labels.shape[1:], coords, classes, images)

    def sample_rows(self, images: Tensor, classes: Tensor, coords: Tensor) -> Tensor:
        """Segment ``classes[n]`` of image ``images[n]`` at its own points ``coords[n]``
        (``(N,)``, ``(N,)``, ``(N, P, 2)``) -> ``(N, P)``."""
        return sample_label_maps(self._frame(), self.labels.shape[1:], coords, classes.view(-1, 1), images)[:, 0]

    def _frame(self) -> Tensor:
        if self._framed is None:
            self._framed = framed_label_maps(self.labels)
        return self._framed


def framed_label_maps(labels: Tensor) -> Tensor:
    """``(B, H, W)`` labels -> ``(B (H + 2) (W + 2),)`` int32, each image framed by one pixel of no
    class (-1), where zero padding reads zeros: the four pixels of every sample are then in the
    frame, no bounds to check."""
    return F.pad(labels.to(torch.int32), (1, 1, 1, 1), value=-1).flatten()


def sample_label_maps(
    framed: Tensor, size: Sequence[int], coords: Tensor, classes: Tensor, images: Tensor | None = None
) -> Tensor:
    """The bilinear samples of binary masks ``label == class``, as ``grid_sample`` computes them.

    Args:
        framed: from :func:`framed_label_maps` of ``(B, H, W)`` labels; size: ``(H, W)``.
        coords: ``(M, P, 2)`` normalized ``(x, y)`` in [0, 1].
        classes: ``(M, R)``: the classes sampled at row ``m``'s points.
        images: ``(M,)``, the image of row ``m``; None for ``M == B`` rows, one per image.
    Returns:
        ``(M, R, P)``.
    """
    height, width = size
    scale = device_tensor([width, height], coords.dtype, coords.device)
    pixel = grid_sample_pixel(coords, scale, powers_of_two([width, height]))
    corner = pixel.floor()
    east, south = (pixel - corner).permute(2, 0, 1)  # (M, P) each
    stride, frame = width + 2, (height + 2) * (width + 2)
    corner = corner.to(torch.int32).add_(1)
    north_west = corner[..., 1] * stride + corner[..., 0]  # (M, P)
    if images is None and len(framed) > frame:
        images = torch.arange(coords.shape[0], dtype=torch.int32, device=coords.device)
    if images is not None:
        north_west = north_west + images.to(torch.int32).view(-1, 1) * frame
    # The four pixels of each sample, nw, ne, sw, se: one gather each from the frames shifted by
    # the corner's offset (views: the same indices serve all four).
    index = north_west.flatten()
    pixels = torch.empty(4, index.numel(), dtype=framed.dtype, device=framed.device)
    for k, offset in enumerate((0, 1, stride, stride + 1)):
        torch.index_select(framed[offset:], 0, index, out=pixels[k])
    # grid_sample's weights, one product each: (north, south) x (west, east) gives nw, ne, sw, se.
    north_south = torch.stack([1 - south, south]).unsqueeze(1)
    west_east = torch.stack([1 - east, east]).unsqueeze(0)
    weights = (north_south * west_east).view(4, *north_west.shape).unsqueeze(2)  # (4, M, 1, P)
    inside = pixels.view(4, *north_west.shape).unsqueeze(2) == classes.to(torch.int32).unsqueeze(-1)  # (4, M, R, P)
    terms = torch.where(inside, weights, 0.0)
    # grid_sample's order of the sum: nw, ne, sw, se.
    return terms[0].add(terms[1]).add_(terms[2]).add_(terms[3])


def _aligned(tensor: Tensor) -> Tensor:
    """``tensor``, copied where it starts off a 64-byte boundary (a slice into a batch's tensor;
    never at the default 12,544 points): MKL's products change in the last bits with an operand
    that starts off a 16-byte boundary (measured for the first operand)."""
    return tensor if tensor.data_ptr() % 64 == 0 else tensor.clone()


def uncertain_points(
    mask_logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_ratio: float,
    draws: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """Sample points where masks are least certain (logit near 0), plus uniform ones.

    Args:
        mask_logits: ``(N, 1, h, w)``.
        draws: :func:`point_draws`' ``(candidates, uniform)`` for the ``N`` masks, if drawn
            already; else drawn here.
    Returns:
        ``(N, num_points, 2)`` normalized coordinates.
    """
    candidates, uniform = draws or point_draws(
        mask_logits.shape[0], num_points, oversample_ratio, importance_ratio, mask_logits.device
    )
    uncertainty = -point_sample(mask_logits, candidates)[:, 0].abs()
    num_uncertain = num_points - uniform.shape[1]
    # Unsorted: the points form a set (the losses sum over them), and sorting is half the cost.
    chosen = uncertainty.topk(num_uncertain, dim=1, sorted=False).indices
    coords = torch.gather(candidates, 1, chosen.unsqueeze(-1).expand(-1, -1, 2))
    return torch.cat([coords, uniform], dim=1) if uniform.shape[1] else coords


def point_draws(
    n: int, num_points: int, oversample_ratio: float, importance_ratio: float, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The random draws of :func:`uncertain_points` for ``n`` masks, in mmdet's order: the
    candidates ``(n, num_points * oversample_ratio, 2)``, then the uniform points ``(n,
    num_points - num_points * importance_ratio, 2)`` (none drawn when that is 0)."""
    candidates = torch.rand(n, int(num_points * oversample_ratio), 2, device=device)
    num_uniform = num_points - int(importance_ratio * num_points)
    uniform = torch.rand(n, num_uniform, 2, device=device) if num_uniform > 0 else candidates.new_empty(n, 0, 2)
    return candidates, uniform


class HungarianMatcher:
    """One-to-one assignment of queries to ground-truth segments (mmdet's ``HungarianAssigner``).

    Cost = ``class_weight * -p(class)`` + ``mask_weight * BCE`` + ``dice_weight * dice``, masks
    compared on ``num_points`` random points shared by all queries and segments.
    """

    def __init__(
        self, class_weight: float = 2.0, mask_weight: float = 5.0, dice_weight: float = 5.0, num_points: int = 12544
    ) -> None:
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points

    @torch.no_grad()
    def cost(
        self, class_logits: Tensor, mask_logits: Tensor, gt_classes: Tensor, gt_masks: Tensor | Segments
    ) -> Tensor:
        """The ``(Q, G)`` matching cost of one image."""
        # Drawn before anything else, also when there is no segment: mmdet draws them for every
        # image, and skipping a draw would shift every later random point of a seeded run.
        coords = torch.rand(1, self.num_points, 2, device=mask_logits.device)
        if gt_classes.numel() == 0:
            return class_logits.new_zeros(class_logits.shape[0], 0, dtype=torch.float32)
        # All masks at the same points: sampled as the channels of one map, which gives each
        # mask the values it gets on its own (the same bilinear weights), computing them once.
        pred = point_sample(mask_logits.unsqueeze(0), coords).float()
        if isinstance(gt_masks, Segments):
            target = gt_masks.sample(coords[0])[None]
        else:
            target = point_sample(gt_masks.unsqueeze(0).float(), coords)
        return self._costs(class_logits[None], pred, target, [gt_classes])[0]

    @torch.no_grad()
    def costs(self, class_logits: Tensor, mask_logits: Tensor, segments: SegmentBatch) -> list[Tensor]:
        """:meth:`cost` of every image of a batch, ``(Q, G_b)`` each, the same values on the CPU (off
        it up to float rounding: :meth:`_costs`): the points of all images sampled in one pass (a
        GPU runs a few kernels per prediction, not per image).

        Args:
            class_logits: ``(B, Q, K + 1)``; mask_logits: ``(B, Q, h, w)``; segments: the batch's.
        """
        if not len(segments):
            return []
        coords = self.points(len(segments), mask_logits.device)
        return self.costs_at([(class_logits, mask_logits)], segments, [coords])

    def points(self, images: int, device: torch.device) -> Tensor:
        """The matching points of a prediction, ``(images, num_points, 2)``: one draw per image, in
        mmdet's order, also for an image without segments."""
        return torch.cat([torch.rand(1, self.num_points, 2, device=device) for _ in range(images)])

    @torch.no_grad()
    def costs_at(
        self, predictions: list[tuple[Tensor, Tensor]], segments: SegmentBatch, coords: list[Tensor]
    ) -> list[Tensor]:
        """:meth:`costs` of several predictions ``(class_logits, mask_logits)`` at their points
        (:meth:`points`, one ``(B, P, 2)`` each), all in one pass: ``(Q, G_b)`` per image,
        prediction after prediction."""
        class_logits = _joined([cls for cls, _ in predictions])  # (L B, Q, K + 1)
        pred = _joined([point_sample(masks, at) for (_, masks), at in zip(predictions, coords, strict=True)]).float()
        classes = [image.classes for image in segments] * len(predictions)
        padded = segments.padded_classes.repeat(len(predictions), 1)
        return self._costs(class_logits, pred, segments.sample(_joined(coords)), classes, padded)

    def _costs(
        self, class_logits: Tensor, pred: Tensor, target: Tensor, classes: list[Tensor], padded: Tensor | None = None
    ) -> list[Tensor]:
        """Each image's ``(Q, G_b)`` cost from its predictions and targets at its points:
        ``class_logits (B, Q, K + 1)``, ``pred (B, Q, P)``, ``target (B, G_max, P)`` (image ``b``'s
        in its first ``G_b`` rows), ``classes[b] (G_b,)``; ``padded`` ``(B, G_max)``, the same
        classes padded with -1 (None for one image).

        On the CPU the arithmetic is one image at a time, on tensors of that image alone, as
        mmdet's: there a sigmoid's values depend on where an element falls in the tensor (the
        vector loop's remainder is computed by another routine), and a matrix product's on where
        its operands start. Elsewhere all images are one batched pass (a GPU runs some thirty
        kernels per prediction, not twenty per image); the sums may round otherwise there."""
        num_queries = pred.shape[1]
        found = []
        # In fp32 under autocast too: fp16 products over 12,544 points exceed its 65,504 (confident
        # masks over large segments), and the assignment refuses an infinite cost.
        with torch.autocast(pred.device.type, enabled=False):
            probs = class_logits.float().softmax(-1)  # a row at a time, wherever the row is
            if not eager_on_cpu(pred):
                index = classes[0].view(1, -1) if padded is None else padded.clamp(min=0)
                cost = self._weighted(
                    -probs.gather(2, index.long().unsqueeze(1).expand(-1, num_queries, -1)), pred, target
                )
                return [cost[b, :, : len(gt_classes)] for b, gt_classes in enumerate(classes)]
            for b, gt_classes in enumerate(classes):
                size = len(gt_classes)
                if size == 0:
                    found.append(pred.new_zeros(num_queries, 0))
                    continue
                found.append(self._weighted(-probs[b][:, gt_classes], pred[b], _aligned(target[b, :size])))
        return found

    def _weighted(self, cost_class: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        """The weighted sum of the three costs: ``cost_class (..., Q, G)``, the mask logits ``pred
        (..., Q, P)`` and the targets ``target (..., G, P)`` at the same points -> ``(..., Q, G)``."""
        num_points = pred.shape[-1]
        target_t = target.transpose(-1, -2)
        # Sigmoid BCE of every prediction against every target, averaged over points. torch's BCE
        # with logits is (1 - t) x - log_sigmoid(x): against 1 and against 0 it is these two, bit
        # for bit, from one log-sigmoid instead of two.
        pos = F.logsigmoid(pred).neg_()
        neg = pred + pos  # x - log_sigmoid(x), the same bits
        cost_mask = (pos @ target_t + neg @ (1 - target).transpose(-1, -2)) / num_points
        del pos, neg  # (B, Q, P) each: not held beside the sigmoid's
        prob = pred.sigmoid()
        dice = (2 * prob @ target_t + 1) / (prob.sum(-1).unsqueeze(-1) + target.sum(-1).unsqueeze(-2) + 1)
        cost_dice = 1 - dice
        return self.class_weight * cost_class + self.mask_weight * cost_mask + self.dice_weight * cost_dice

    def __call__(
        self, class_logits: Tensor, mask_logits: Tensor, gt_classes: Tensor, gt_masks: Tensor | Segments
    ) -> tuple[Tensor, Tensor]:
        """Matched ``(query_indices, gt_indices)`` of one image, ``min(Q, G)`` pairs, queries ascending.

        Args:
            class_logits: ``(Q, K + 1)``; mask_logits: ``(Q, h, w)``;
            gt_classes: ``(G,)``; gt_masks: ``(G, H, W)`` boolean or float, or the image's
                :class:`Segments` (the same values, sampled from its label map).
        """
        return self.assign([self.cost(class_logits, mask_logits, gt_classes, gt_masks)])[0]

    @staticmethod
    def assign(costs: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """The Hungarian assignment of each ``(Q, G)`` cost (scipy's): ``(query_indices,
        gt_indices)``, ``min(Q, G)`` pairs, queries ascending, on the costs' device.

        The costs go to the host in one copy and the indices come back in one, from pinned
        memory: on a GPU the host waits for the device once per call, not once per image and
        index tensor.
        """
        if not costs:
            return []
        pairs = HungarianMatcher.solve(costs)
        sizes = [len(rows) for rows, _ in pairs]
        indices = np.concatenate([np.concatenate(pair) for pair in pairs]).astype(np.int64)
        on_device = host_to_device(torch.from_numpy(indices), costs[0].device).split([2 * size for size in sizes])
        return [(both[:size], both[size:]) for both, size in zip(on_device, sizes, strict=True)]

    @staticmethod
    def solve(costs: list[Tensor]) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`assign`'s pairs on the host, ``(query_indices, gt_indices)`` of each cost: the
        costs copied to the host at once (where a GPU makes the host wait), then scipy on each.

        Raises:
            FloatingPointError: a cost is NaN or infinite.
        """
        if not costs:
            return []
        flat = torch.cat([cost.flatten() for cost in costs]).cpu().numpy()
        if not np.isfinite(flat).all():
            raise FloatingPointError(
                "the matching cost is not finite: the predictions hold NaN or Inf (in training: it diverged; "
                "a lower train.lr, a train.grad_clip or fp32 precision may keep it finite)"
            )
        pairs, start = [], 0
        for cost in costs:
            num_queries, num_segments = cost.shape
            block = flat[start : start + num_queries * num_segments].reshape(num_queries, num_segments)
            pairs.append(linear_sum_assignment(block))
            start += num_queries * num_segments
        return pairs


class Mask2FormerLoss(nn.Module):
    """Deep-supervised Mask2Former loss on semantic labels.

    Args:
        num_classes: ``K`` (the no-object class is ``K``).
        class_weight, mask_weight, dice_weight: loss weights (2, 5, 5), also the matching costs'.
        no_object_weight: cross-entropy weight of the no-object class (0.1).
        num_points, oversample_ratio, importance_sample_ratio: point sampling (12544, 3, 0.75).
        ignore_index: label value that belongs to no class (255).

    ``forward(class_logits, mask_logits, labels)`` takes the head's per-prediction lists and
    ``labels (B, H, W)``, and returns a dict: ``loss_cls``, ``loss_mask``, ``loss_dice`` for the
    last prediction, ``d{i}.loss_*`` for the earlier ones (mmdet's names), and their sum ``loss``.
    """

    def __init__(
        self,
        num_classes: int,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        no_object_weight: float = 0.1,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        # mmdet asserts both: more than the points drawn, or a ratio over 1, would sample more
        # points than the losses divide by.
        if not 0 <= importance_sample_ratio <= 1:
            raise ValueError(f"importance_sample_ratio must be in [0, 1], got {importance_sample_ratio!r}")
        if oversample_ratio < 1:
            raise ValueError(f"oversample_ratio must be at least 1, got {oversample_ratio!r}")
        self.num_classes = num_classes
        self.class_weight = class_weight
        self.mask_weight = mask_weight
        self.dice_weight = dice_weight
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        self.ignore_index = ignore_index
        self.matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points)
        weights = torch.ones(num_classes + 1)
        weights[-1] = no_object_weight
        self.register_buffer("ce_class_weights", weights, persistent=False)

    def forward(
        self,
        class_logits: list[Tensor],
        mask_logits: list[Tensor],
        labels: Tensor,
        label_values: Sequence[Sequence[int]] | None = None,
    ) -> dict[str, Tensor]:
        """The losses of every prediction for ``labels (B, H, W)``; ``label_values``: each
        label's distinct values, known on the host (:meth:`Segments.of_images`)."""
        if labels.dim() != 3:
            raise ValueError(f"labels must be (B, H, W), got {tuple(labels.shape)}")
        # The segments stay label maps: sampling them gives the binary masks' values.
        targets = Segments.of_images(labels, self.num_classes, self.ignore_index, values=label_values)
        # The Hungarian matching pairs min(Q, G) queries of an image; mmdet counts at least one per image.
        num_queries = class_logits[0].shape[1]
        num_matched = sum(max(min(num_queries, len(segments)), 1) for segments in targets)
        num_masks = _mean_over_ranks(num_matched, labels.device)
        predictions = list(zip(class_logits, mask_logits, strict=True))
        generator = _default_generator(labels.device)
        matched: tuple[Tensor, Tensor, Tensor] | None = None  # None: a trip per prediction,
        if generator is not None and not eager_on_cpu(labels) and not tracing():  # as on the CPU
            matched, states = self._match_all(predictions, targets, num_queries, generator)
            if len(matched[0]):
                return self._all_at_once(predictions, targets, num_masks, matched, states, generator)
            # Nothing to match in the batch: no loss points are drawn, each class loss alone.
        losses: dict[str, Tensor] = {}
        for i, (cls, masks) in enumerate(predictions):
            # Every image's cost first (each draws its points in mmdet's order), then the host.
            own = (
                matched
                if matched is not None
                else self._matches([self.matcher.costs(cls, masks, targets)], targets, num_queries)
            )
            for name, value in self._single(cls, masks, targets, num_masks, own).items():
                losses[_prefix(i, len(predictions)) + name] = value
        losses["loss"] = cast(Tensor, sum(losses.values()))
        return losses

    @property
    def _point_ratios(self) -> tuple[int, float, float]:
        """``(num_points, oversample_ratio, importance_sample_ratio)``, as the loss points' draws
        (:func:`point_draws`, :func:`uncertain_points`) take them."""
        return self.num_points, self.oversample_ratio, self.importance_sample_ratio

    def _match_all(
        self,
        predictions: list[tuple[Tensor, Tensor]],
        targets: SegmentBatch,
        num_queries: int,
        generator: torch.Generator,
    ) -> tuple[tuple[Tensor, Tensor, Tensor], list[Tensor]]:
        """Every prediction's matched pairs (:meth:`_matches`, one prediction's after the other)
        in one trip to the host, and ``generator``'s state after each prediction's matching draws,
        from which its loss draws its points. mmdet draws a prediction's loss points before the
        next prediction's matching points: here they are drawn and dropped in their place, so
        that every draw is mmdet's."""
        n = sum(min(num_queries, len(segments)) for segments in targets)  # the pairs of each prediction
        batch, device = len(targets), targets.labels.device
        # A few predictions' costs a pass (:data:`_MATCH_VALUES_PER_PASS`): their masks' samples,
        # (B, Q, P) each, and those's temporaries are the pass's memory.
        per_pass = max(1, _MATCH_VALUES_PER_PASS // max(batch * num_queries * self.matcher.num_points, 1))
        costs: list[list[Tensor]] = []
        states = []
        for first in range(0, len(predictions), per_pass):
            these = predictions[first : first + per_pass]
            coords = []
            for _ in these:
                coords.append(self.matcher.points(batch, device))
                states.append(generator.get_state())
                if n:
                    point_draws(n, *self._point_ratios, device)
            found = self.matcher.costs_at(these, targets, coords) if batch else []
            costs.extend(found[i * batch : (i + 1) * batch] for i in range(len(these)))
        return self._matches(costs, targets, num_queries), states

    def _single(
        self,
        class_logits: Tensor,
        mask_logits: Tensor,
        targets: SegmentBatch,
        num_masks: Tensor,
        matched: tuple[Tensor, Tensor, Tensor],
    ) -> dict[str, Tensor]:
        """Losses of one prediction ``(B, Q, K + 1)``, ``(B, Q, h, w)`` and its ``matched`` pairs
        (:meth:`_matches` of its costs alone)."""
        batch, num_queries = class_logits.shape[:2]
        target_classes = torch.full(
            (batch, num_queries), self.num_classes, dtype=torch.long, device=class_logits.device
        )
        rows, images, classes = matched
        target_classes.view(-1)[rows] = classes

        # In fp32 also under bf16 autocast: 0.1 in bf16 would be 0.10009765625.
        weights = cast(Tensor, self.ce_class_weights).float()
        ce = F.cross_entropy(
            class_logits.flatten(0, 1).float(), target_classes.flatten(), weight=weights, reduction="sum"
        )
        loss_cls = ce / (weights[target_classes].sum() + _EPS)

        if not len(rows):
            # Nothing to match: keep the graph (and DDP's gradient buckets) alive with zeros.
            zero = mask_logits.sum() * 0.0
            return {"loss_cls": self.class_weight * loss_cls, "loss_mask": zero, "loss_dice": zero}
        # The matched queries' masks of all images in one selection (one gradient buffer in backward).
        preds = mask_logits.flatten(0, 1)[rows].unsqueeze(1)  # (N, 1, h, w)
        with torch.no_grad():
            coords = uncertain_points(preds, *self._point_ratios)
            point_targets = targets.sample_rows(images, classes, coords)
        point_logits = point_sample(preds, coords).squeeze(1).float()  # a view: no zero-filled gradient

        loss_mask = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="sum")
        loss_mask = loss_mask / (num_masks * self.num_points + _EPS)
        loss_dice = _dice_losses(point_logits, point_targets).sum() / (num_masks + _EPS)
        return {
            "loss_cls": self.class_weight * loss_cls,
            "loss_mask": self.mask_weight * loss_mask,
            "loss_dice": self.dice_weight * loss_dice,
        }

    def _all_at_once(
        self,
        predictions: list[tuple[Tensor, Tensor]],
        targets: SegmentBatch,
        num_masks: Tensor,
        matched: tuple[Tensor, Tensor, Tensor],
        states: list[Tensor],
        generator: torch.Generator,
    ) -> dict[str, Tensor]:
        """:meth:`_single`'s losses of all ``L`` predictions together: each operation a kernel
        launch on a GPU, queued while the device, just back from the matching, waits for work, and
        at the paper config (batch 4, 10 predictions) 347 a step instead of 74 per prediction
        (109 with every prediction's mask terms in one pass).

        Every prediction pairs as many queries, ``n`` (``min(Q, G_b)`` per image), so each term
        is an ``(L, n, ...)`` tensor summed per prediction; each prediction's points are drawn
        from its state after its matching (``states``), as one prediction at a time draws them.
        The values equal :meth:`_single`'s up to the order of their sums; the last prediction's
        draws leave ``generator`` where they leave it. The class terms are computed for all
        predictions at once, the mask terms a few predictions a pass (:data:`_MASK_POINTS_PER_PASS`).
        """
        rows, images, classes = matched
        count = len(predictions)
        n = len(rows) // count
        batch, num_queries = predictions[0][0].shape[:2]
        device = rows.device
        target_classes = torch.full((count, batch * num_queries), self.num_classes, dtype=torch.long, device=device)
        target_classes.scatter_(1, rows.view(count, n), classes.view(count, n))
        # In fp32 also under bf16 autocast: 0.1 in bf16 would be 0.10009765625.
        weights = cast(Tensor, self.ce_class_weights).float()
        class_logits = torch.stack([cls for cls, _ in predictions]).flatten(0, 2).float()
        ce = F.cross_entropy(class_logits, target_classes.flatten(), weight=weights, reduction="none")
        loss_cls = ce.view(count, -1).sum(1) / (weights[target_classes].sum(1) + _EPS)

        # The masks' terms a few predictions a pass (:data:`_MASK_POINTS_PER_PASS`): their points'
        # temporaries for all ten predictions at once add 1.2 GiB to the paper config's peak.
        own_rows = rows.view(count, n)
        per_pass = max(1, _MASK_POINTS_PER_PASS // (n * int(self.num_points * self.oversample_ratio)))
        ratios = self._point_ratios
        bce_sums, dice_sums = [], []
        for first in range(0, count, per_pass):
            these = range(first, min(first + per_pass, count))
            # The matched queries' masks, prediction after prediction: (len(these) n, 1, h, w).
            preds = _joined([predictions[i][1].flatten(0, 1)[own_rows[i]] for i in these]).unsqueeze(1)
            pairs = slice(first * n, these.stop * n)
            with torch.no_grad():
                draws = []
                for i in these:
                    generator.set_state(states[i])  # its points, as drawn after its matching
                    draws.append(point_draws(n, *ratios, device))
                candidates, uniform = (_joined(parts) for parts in zip(*draws, strict=True))
                coords = uncertain_points(preds, *ratios, draws=(candidates, uniform))
                point_targets = targets.sample_rows(images[pairs], classes[pairs], coords)
            point_logits = point_sample(preds, coords).squeeze(1).float()  # a view: no zero-filled gradient
            bce = F.binary_cross_entropy_with_logits(point_logits, point_targets, reduction="none")
            bce_sums.append(bce.view(len(these), -1).sum(1))
            dice_sums.append(_dice_losses(point_logits, point_targets).view(len(these), n).sum(1))
        loss_mask = _joined(bce_sums) / (num_masks * self.num_points + _EPS)
        loss_dice = _joined(dice_sums) / (num_masks + _EPS)
        terms = {
            "loss_cls": self.class_weight * loss_cls,
            "loss_mask": self.mask_weight * loss_mask,
            "loss_dice": self.dice_weight * loss_dice,
        }
        losses = {_prefix(i, count) + name: values[i] for i in range(count) for name, values in terms.items()}
        losses["loss"] = torch.stack(list(terms.values())).sum()
        return losses

    def _matches(
        self, costs: list[list[Tensor]], targets: SegmentBatch, num_queries: int
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The matched pairs of each prediction (its images' ``(Q, G_b)`` costs), image by image,
        queries ascending, one prediction's after the other: ``rows`` (``b Q + q``, into the
        batch's flattened queries), ``images`` (``b``) and the segments' ``classes``, ``(N_0 +
        N_1 + ...,)`` each. All costs go to the host at once and the indices come back in one
        copy from pinned memory (a GPU waits once: a copy from pageable memory would wait again,
        for nothing)."""
        pairs = self.matcher.solve([cost for prediction in costs for cost in prediction])
        offsets = np.cumsum([0] + [len(segments) for segments in targets])
        blocks, start = [], 0
        for prediction in costs:
            mine, start = pairs[start : start + len(prediction)], start + len(prediction)
            rows = [b * num_queries + queries for b, (queries, _) in enumerate(mine)]
            images = [np.full(len(queries), b) for b, (queries, _) in enumerate(mine)]
            segments = [offsets[b] + found for b, (_, found) in enumerate(mine)]
            blocks.append(np.stack([np.concatenate(part or [np.zeros(0)]) for part in (rows, images, segments)]))
        device = targets.labels.device
        indices = host_to_device(torch.from_numpy(np.concatenate(blocks, axis=1).astype(np.int64)), device)
        return indices[0], indices[1], targets.classes[indices[2]]


# The masks' samples (images x queries x points) whose matching costs Mask2FormerLoss._match_all
# computes in one pass: 2^24 takes three predictions a pass at the paper config (batch 4, 100
# queries, 12544 points).
_MATCH_VALUES_PER_PASS = 1 << 24

# The candidate points (masks x oversampled points) whose mask terms Mask2FormerLoss._all_at_once
# computes in one pass: 2^23 takes two predictions a pass at the paper config (batch 4, 19
# classes an image, 3 x 12544 candidates a mask). GPU peak estimate there (memory_estimate.py):
# 7.68 GiB one prediction at a time, 7.86 two a pass, 8.84 all ten (launches.py: 347 operations
# after the matching two a pass, 109 all ten, 740 one prediction at a time).
_MASK_POINTS_PER_PASS = 1 << 23


def _dice_losses(point_logits: Tensor, point_targets: Tensor) -> Tensor:
    """mmdet's dice loss (smoothed by 1) of each mask's ``(..., P)`` logits at its points
    against its targets there -> ``(...)``."""
    prob = point_logits.sigmoid()
    return 1 - (2 * (prob * point_targets).sum(-1) + 1) / (prob.sum(-1) + point_targets.sum(-1) + 1)


def _joined(parts: Sequence[Tensor]) -> Tensor:
    """``torch.cat(parts)``, without a copy for one part."""
    return torch.cat(list(parts)) if len(parts) > 1 else parts[0]


def _prefix(index: int, count: int) -> str:
    """The names' prefix of prediction ``index`` of ``count``: ``d<index>.`` but for the last."""
    return "" if index == count - 1 else f"d{index}."


def _default_generator(device: torch.device) -> torch.Generator | None:
    """The generator ``torch.rand`` draws from on ``device``; None where not known here."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return None


def _mean_over_ranks(count: int, device: torch.device) -> Tensor:
    """``count`` averaged over DDP ranks and at least 1, as mmdet normalizes; a 0-d tensor (no host sync)."""
    value = torch.full((), float(count), device=device)  # a fill, not a host copy (reinseg.device)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(value)
        value = value / torch.distributed.get_world_size()
    return value.clamp(min=1.0)
