"""The segmentor: frozen VFM + Rein + Mask2Former head, with training loss and inference.

Inference follows mmseg's semantics, so that official checkpoints give the same predictions:
``whole`` runs the model on the full image; ``slide`` runs it on ``crop_size`` windows every
``stride`` pixels (the last window of a row/column is shifted back inside the image) and averages
the overlapping scores. Horizontal-flip test-time augmentation averages the softmax of the scores
of the image and of its mirror at the input size; evaluation and ``reinseg predict`` resize each
to the label's size first, in the order of mmseg's ``SegTTAModel``
(:func:`reinseg.predict.scores_at_sizes`).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .backbones import ReinBackbone, as_pair
from .heads import Mask2FormerHead, semantic_logits
from .heads.criterion import Mask2FormerLoss
from .rein import Rein

__all__ = ["Segmentor", "sliding_windows"]


def sliding_windows(
    height: int, width: int, crop: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """Windows ``(y1, y2, x1, x2)`` covering the image as mmseg's ``slide_inference`` places them."""
    (crop_h, crop_w), (stride_h, stride_w) = crop, stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for row in range(rows):
        for col in range(cols):
            y2 = min(row * stride_h + crop_h, height)
            x2 = min(col * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


class Segmentor(nn.Module):
    """Backbone (+ Rein) and Mask2Former head.

    Args:
        backbone: the frozen VFM with Rein (:func:`reinseg.build_backbone`).
        head: the Mask2Former head; it takes the backbone's queries when they are linked.
        criterion: the training loss (optional for inference-only models).
        test_mode, crop_size, stride, flip: default inference settings of :meth:`predict`.
        window_batch: sliding windows run through the model at once (``model.test.window_batch``).

    Images are normalized RGB ``(B, 3, H, W)`` (ImageNet mean/std on 0-255 pixels).
    """

    def __init__(
        self,
        backbone: ReinBackbone,
        head: Mask2FormerHead,
        criterion: Mask2FormerLoss | None = None,
        test_mode: str = "whole",
        crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
        flip: bool = False,
        window_batch: int = 1,
    ) -> None:
        super().__init__()
        if head.linked_queries != backbone.links_queries:
            raise ValueError(
                "the head's linked_queries must match whether the backbone links Rein's tokens to queries "
                f"(head: {head.linked_queries}, backbone: {backbone.links_queries})"
            )
        self.backbone = backbone
        self.head = head
        self.criterion = criterion
        self.num_classes = head.num_classes
        self.test_mode = test_mode
        self.crop_size = None if crop_size is None else as_pair(crop_size, "crop_size")
        self.stride = None if stride is None else as_pair(stride, "stride")
        self.flip = flip
        self.window_batch = window_batch
        # Parameter-name substrings without weight decay (the builder adds the strategy's).
        self.no_decay_keys: tuple[str, ...] = ("norm", *getattr(head, "no_decay_keys", ()))
        self._check_inference_settings(test_mode, self.crop_size, self.stride)
        # Inference needs only the last prediction; a head may offer to compute only that. A head
        # may also take the backbone's maps before their resizing (BackboneMaps), to resize them
        # after its first, linear step.
        parameters = inspect.signature(head.forward).parameters
        self._head_takes_last_only = "last_only" in parameters
        self._head_takes_scales = "scales" in parameters

    @property
    def window_batch(self) -> int:
        """Sliding windows run through the model at once (stacked on the batch axis)."""
        return self._window_batch

    @window_batch.setter
    def window_batch(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"window_batch must be a positive integer, got {value!r}")
        self._window_batch = value

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per-prediction class logits ``(B, Q, K + 1)`` and mask logits ``(B, Q, H/4, W/4)``."""
        features, queries, extra = self._features(images)
        return self.head(features, queries, **extra)

    def _features(self, images: Tensor) -> tuple[list[Tensor], Tensor | None, dict[str, Any]]:
        """The backbone's maps and queries, and what the head needs besides."""
        if self._head_takes_scales:
            maps, scales, queries = self.backbone(images, resize=False)
            return maps, queries, {"scales": scales}
        features, queries = self.backbone(images)
        return features, queries, {}

    def loss(
        self, images: Tensor, labels: Tensor, label_values: Sequence[Sequence[int]] | None = None
    ) -> dict[str, Tensor]:
        """Training losses for ``images (B, 3, H, W)`` and semantic ``labels (B, H, W)`` of an
        integer dtype (class IDs, 255 ignored; uint8 as read from PNGs is fine).

        ``label_values``, if given, holds each label's distinct values as the host found them
        (:func:`reinseg.data.label_values`; the training loader's batches carry them): on a GPU
        the loss then takes the images' classes from them instead of reading them back, a wait
        for the whole forward (:meth:`~reinseg.heads.criterion.Segments.of_images`). On the CPU
        they are checked against the labels.

        Returns the criterion's terms: ``loss_cls``, ``loss_mask``, ``loss_dice`` of the last
        prediction, ``d<i>.loss_*`` of the decoder layer ``i``'s, and ``loss``, their sum (the one
        to backpropagate: summing every value counts each term twice)."""
        if self.criterion is None:
            raise RuntimeError("this segmentor has no criterion; build it with a loss configuration to train")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"labels must hold integer class IDs, got {labels.dtype}")
        if labels.dim() != 3 or labels.shape != (images.shape[0], *images.shape[-2:]):
            raise ValueError(
                f"labels must be (B, H, W) = {(images.shape[0], *images.shape[-2:])} for images "
                f"{tuple(images.shape)}, got {tuple(labels.shape)}"
            )
        labels = labels.long()
        class_logits, mask_logits = self(images)
        return self.criterion(class_logits, mask_logits, labels, label_values=label_values)

    @property
    def mixes_batch(self) -> bool:
        """Whether an image's scores depend on the other images of its batch: some module says so
        (``mixes_batch``, e.g. SET's refinement, whose FFT runs over the batch axis, and FADA's,
        whose trained Haar filters follow a token's place in the batch); :meth:`predict` then runs
        one image at a time."""
        return any(getattr(m, "mixes_batch", False) is True for m in self.modules() if m is not self)

    def encode_decode(self, images: Tensor) -> Tensor:
        """Semantic scores ``(B, K, H, W)`` of images run whole."""
        features, queries, extra = self._features(images)
        if self._head_takes_last_only:
            extra["last_only"] = True
        class_logits, mask_logits = self.head(features, queries, **extra)
        return semantic_logits(class_logits[-1], mask_logits[-1], images.shape[-2:])

    @torch.no_grad()
    def predict(
        self,
        images: Tensor,
        mode: str | None = None,
        crop_size: Sequence[int] | None = None,
        stride: Sequence[int] | None = None,
        flip: bool | None = None,
    ) -> Tensor:
        """Semantic scores ``(B, num_classes, H, W)``; argmax over classes gives the prediction.

        Args:
            images: normalized ``(B, 3, H, W)``.
            mode: ``"whole"`` or ``"slide"`` (default: the segmentor's ``test_mode``).
            crop_size, stride: sliding window ``(h, w)`` (default: the segmentor's).
            flip: also run the mirrored image and average the two softmaxes at the input size
                (default: the segmentor's ``flip``); :func:`reinseg.predict.scores_at_sizes`
                resizes each to the output size first, as mmseg.
        """
        with self._weights_fixed():
            return self._predict(images, mode, crop_size, stride, flip)

    @contextlib.contextmanager
    def _weights_fixed(self) -> Iterator[None]:
        """Every Rein's :meth:`~reinseg.rein.Rein.weights_fixed` at once (one prediction call)."""
        with contextlib.ExitStack() as stack:
            for module in self.modules():
                if isinstance(module, Rein):
                    stack.enter_context(module.weights_fixed())
            yield

    def _predict(
        self,
        images: Tensor,
        mode: str | None,
        crop_size: Sequence[int] | None,
        stride: Sequence[int] | None,
        flip: bool | None,
    ) -> Tensor:
        mode = self.test_mode if mode is None else mode
        crop = self.crop_size if crop_size is None else as_pair(crop_size, "crop_size")
        step = self.stride if stride is None else as_pair(stride, "stride")
        flip = self.flip if flip is None else flip
        self._check_inference_settings(mode, crop, step)
        mixes = self.mixes_batch
        if mixes and len(images) > 1:  # each image as the official test runs it, alone
            return torch.cat([self._predict(image[None], mode, crop, step, flip) for image in images])
        per_forward = 1 if mixes else self.window_batch  # windows, stacked on the batch axis
        run = self.encode_decode if mode == "whole" else lambda x: self._slide(x, crop, step, per_forward)
        if not flip:
            return run(images)
        scores = run(images).softmax(1) + run(images.flip(-1)).flip(-1).softmax(1)
        return scores / 2

    def _slide(self, images: Tensor, crop: tuple[int, int], stride: tuple[int, int], per_forward: int) -> Tensor:
        batch, _, height, width = images.shape
        scores = images.new_zeros(batch, self.num_classes, height, width)
        counts = images.new_zeros(1, 1, height, width)
        windows = sliding_windows(height, width, crop, stride)
        # Every window has the same size (mmseg's windows stay inside the image), so that
        # ``per_forward`` of them stack on the batch axis, window after window.
        for start in range(0, len(windows), per_forward):
            group = windows[start : start + per_forward]
            crops = [images[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in group]
            group_scores = self.encode_decode(crops[0] if len(crops) == 1 else torch.cat(crops))
            for (y1, y2, x1, x2), window_scores in zip(group, group_scores.split(batch), strict=True):
                scores[:, :, y1:y2, x1:x2] += window_scores
                counts[:, :, y1:y2, x1:x2] += 1
        return scores / counts

    def _check_inference_settings(
        self, mode: str, crop: tuple[int, int] | None, stride: tuple[int, int] | None
    ) -> None:
        if mode not in ("whole", "slide"):
            raise ValueError(f"test mode must be 'whole' or 'slide', got {mode!r}")
        if mode != "slide":
            return
        if crop is None or stride is None:
            raise ValueError("sliding-window inference needs crop_size and stride")
        patch = self.backbone.patch_size
        if crop[0] % patch[0] or crop[1] % patch[1]:
            raise ValueError(f"crop_size {crop[0]}x{crop[1]} is not divisible by the patch size {patch[0]}")
        smallest = self.backbone.smallest_input
        if crop[0] < smallest[0] or crop[1] < smallest[1]:
            raise ValueError(f"crop_size {crop[0]}x{crop[1]} must be at least two patches ({smallest[0]}) a side")
        if stride[0] > crop[0] or stride[1] > crop[1] or min(stride) < 1:
            # Windows further apart than they are wide leave pixels no window covers (0 / 0 scores).
            raise ValueError(
                f"model.test.stride {stride[0]}x{stride[1]} must be at least 1 and at most the crop_size "
                f"{crop[0]}x{crop[1]}"
            )
