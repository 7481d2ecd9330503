"""Exporting a checkpoint's whole segmentor (VFM + Rein + Mask2Former head) to ONNX.

The graph maps normalized images ``(B, 3, H, W)`` (as :func:`reinseg.predict.segment_image` feeds
the model: ImageNet mean/std on 0-255 RGB, H and W multiples of the patch size) to the per-pixel
class scores ``(B, K, H, W)`` of whole-image inference (:meth:`Segmentor.encode_decode`), whose
argmax over K is what ``reinseg predict`` writes. Deformable attention runs in its pure-PyTorch
form (``grid_sample``), so the graph holds standard ONNX operators only.

The exporter is torch's dynamo-based one (``torch.export`` then ONNX, opset :data:`OPSET`): the
TorchScript-based exporter fails on the backbone's position-embedding interpolation, whose scale
factors the tracer turns into tensors (``upsample_bicubic2d() received an invalid combination of
arguments``). Opset 18 is the dynamo exporter's default, the oldest it supports well, and is run
by every onnxruntime since 1.14.

Every export is checked with onnxruntime on the CPU against PyTorch before the file is written
(atomically: a failed export or check leaves no file behind).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .fada import fits_haar_split
from .rein import Rein

__all__ = [
    "OPSET",
    "SegmentationLogits",
    "FoldedRein",
    "fold_rein",
    "segmentor_to_onnx",
    "export_onnx",
    "onnx_session",
    "check_parity",
]

OPSET = 18
PARITY_TOLERANCE = 1e-4  # max |onnxruntime - PyTorch| over the logits


class SegmentationLogits(nn.Module):
    """A segmentor as one function for export: normalized images ``(B, 3, H, W)`` -> class scores
    ``(B, K, H, W)`` (whole-image inference, no flip)."""

    def __init__(self, segmentor: nn.Module) -> None:
        super().__init__()
        self.segmentor = segmentor

    def forward(self, images: Tensor) -> Tensor:
        return self.segmentor.encode_decode(images)


class FoldedRein(nn.Module):
    """A trained :class:`reinseg.rein.Rein` with everything that depends on its tokens alone
    precomputed: the tokens ``A @ B`` (L, m, C), their ``mlp_token2feat`` (L, m - 1, C) and the
    linked queries (m, D). The same arithmetic per image; for inference only."""

    def __init__(self, rein: nn.Module) -> None:
        super().__init__()
        with torch.no_grad():
            tokens = rein.tokens()
            self.register_buffer("folded_tokens", tokens.clone())
            self.register_buffer("folded_token_feats", rein.mlp_token2feat(tokens[:, 1:]).clone())
            self.register_buffer("folded_queries", rein.queries().clone() if rein.link_token_to_query else None)
        self.mlp_delta_f = rein.mlp_delta_f
        self.scale = rein.scale
        self.embed_dims = rein.embed_dims
        self.use_softmax = rein.use_softmax
        self.num_prefix_tokens = rein.num_prefix_tokens
        self.link_token_to_query = rein.link_token_to_query

    def forward(self, x: Tensor, layer: int) -> Tensor:
        """Batch-first tokens ``(B, P + N, C)`` of block ``layer``, refined as :meth:`Rein.forward`."""
        prefix, feats = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        attn = feats @ self.folded_tokens[layer].transpose(0, 1)
        if self.use_softmax:
            attn = torch.softmax(attn * self.embed_dims**-0.5, dim=-1)
        delta = self.mlp_delta_f(attn[..., 1:] @ self.folded_token_feats[layer] + feats)
        feats = feats + delta * self.scale
        return torch.cat([prefix, feats], dim=1) if self.num_prefix_tokens else feats

    def queries(self) -> Tensor:
        """The linked object queries ``(m, D)``."""
        return self.folded_queries

    def one_forward(self) -> contextlib.AbstractContextManager[None]:
        """:meth:`reinseg.rein.Rein.one_forward`, which the backbone enters around its blocks:
        nothing to share here (buffers, no gradients)."""
        return contextlib.nullcontext()


def fold_rein(segmentor: nn.Module) -> nn.Module:
    """A copy of ``segmentor`` whose Rein (if any, one per ViT) is a :class:`FoldedRein`."""
    folded = copy.deepcopy(segmentor)
    rein = getattr(folded.backbone, "rein", None)
    # Rein's own arithmetic only: SET and FADA (subclasses) refine otherwise and stay as they are.
    if rein is not None and type(rein) is Rein:
        folded.backbone.rein = FoldedRein(rein)
    return folded


def _traceable_position_embedding(vit: Any, grid: tuple[Any, Any], antialiased: bool) -> Tensor:
    """The position interpolation of a DINOv2 (:func:`reinseg.families.dinov2_interpolate_pos_embed`:
    bicubic, scale ``(grid + 0.1) / stored``) or, ``antialiased``, of a DINOv2 with registers or a
    plain ViT (timm's ``resample_abs_pos_embed``: antialiased bicubic to the grid's size), written
    as two interpolation matrices built from the grid with tensor operations, so that a
    dynamic-size graph computes it for the input's grid instead of keeping the one it was traced
    at. ``(1, P + h*w, C)``."""
    stored = tuple(vit.patch_embed.grid_size)
    num_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
    prefix, patches = vit.pos_embed[:, :num_prefix], vit.pos_embed[:, num_prefix:]
    channels = patches.shape[-1]
    patches = patches.float().reshape(*stored, channels)
    # The stored grid itself is used as it is (no interpolation), as the model does.
    same = (patches.new_ones(()) * grid[0] == stored[0]) & (patches.new_ones(()) * grid[1] == stored[1])
    matrix = _antialiased_bicubic_matrix if antialiased else _bicubic_matrix
    rows = matrix(grid[0], stored[0], same)  # (h, stored h)
    cols = matrix(grid[1], stored[1], same)  # (w, stored w)
    out = torch.einsum("ij,jkc,lk->ilc", rows, patches, cols).reshape(1, -1, channels)
    return torch.cat([prefix, out.to(vit.pos_embed.dtype)], dim=1)


def _keys_near(d: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel (parameter ``a``) at distances ``|d| <= 1``."""
    return ((a + 2) * d - (a + 3)) * d * d + 1


def _keys_far(d: Tensor, a: float) -> Tensor:
    """Keys' cubic convolution kernel at distances ``1 < |d| < 2``."""
    return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a


def _or_identity(matrix: Tensor, index: Tensor, stored: int, identity: Tensor) -> Tensor:
    """``matrix``, or the identity where the boolean tensor ``identity`` holds (then the output
    size is ``stored``: the stored grid is used as it is)."""
    unit = nn.functional.one_hot(index.long().clamp(max=stored - 1), stored).float()
    return torch.where(identity, unit, matrix)


def _bicubic_matrix(size: Any, stored: int, identity: Tensor) -> Tensor:
    """``(size, stored)``: PyTorch's bicubic upsampling (A = -0.75, align_corners False, indices
    clamped at the border) with scale ``(size + 0.1) / stored``; the identity where the boolean
    tensor ``identity`` holds (then size == stored)."""
    index = torch.arange(size, device=identity.device, dtype=torch.float32)
    inverse_scale = stored / (index.new_ones(()) * size + 0.1)
    source = (index + 0.5) * inverse_scale - 0.5
    base = source.floor()
    t = source - base
    a = -0.75
    weights = (_keys_far(t + 1, a), _keys_near(t, a), _keys_near(1 - t, a), _keys_far(2 - t, a))
    matrix = index.new_zeros(index.shape[0], stored)
    for offset, weight in zip((-1, 0, 1, 2), weights, strict=True):
        column = (base + offset).clamp(0, stored - 1).long()
        matrix = matrix + nn.functional.one_hot(column, stored).float() * weight[:, None]
    return _or_identity(matrix, index, stored, identity)


def _antialiased_bicubic_matrix(size: Any, stored: int, identity: Tensor) -> Tensor:
    """``(size, stored)``: PyTorch's antialiased bicubic resize to ``size`` (Keys' kernel with
    A = -0.5, stretched by the scale when downsampling, the weights inside the input normalised
    to sum to 1: ``upsample_bicubic2d_aa``); the identity where ``identity`` holds."""
    index = torch.arange(size, device=identity.device, dtype=torch.float32)
    scale = stored / (index.new_ones(()) * size)  # input pixels per output pixel
    stretch = torch.clamp(scale, min=1.0)  # the kernel widens when downsampling
    centre = (index + 0.5) * scale
    source = torch.arange(stored, device=identity.device, dtype=torch.float32)
    x = ((source[None, :] + 0.5 - centre[:, None]) / stretch).abs()
    a = -0.5
    weight = torch.where(x < 1, _keys_near(x, a), torch.where(x < 2, _keys_far(x, a), torch.zeros_like(x)))
    return _or_identity(weight / weight.sum(dim=1, keepdim=True), index, stored, identity)


def export_onnx(
    checkpoint: str | Path,
    output: str | Path,
    size: Sequence[int] | None = None,
    dynamic: bool = False,
    fold: bool = True,
    check: bool = True,
    backbone: str | Path | None = None,
    tolerance: float = PARITY_TOLERANCE,
) -> dict[str, Any]:
    """Write ``checkpoint``'s segmentor as an ONNX graph to ``output``.

    Args:
        size: the input ``(H, W)``, multiples of the patch size (default: the backbone's
            ``img_size``: a ViT's as built, a CNN's ``model.backbone.img_size``). With
            ``dynamic``, the size traced at and checked first.
        dynamic: batch, H and W are free in the graph (checked at a second, other size too); the
            batch stays 1 for a model whose images mix in a batch (SET, FADA:
            :attr:`Segmentor.mixes_batch`), as ``predict`` runs them one at a time.
        fold: precompute what depends on Rein's tokens alone (:class:`FoldedRein`).
        check: compare onnxruntime's logits with PyTorch's before writing (needs onnxruntime).
        backbone: the VFM weight file, instead of the one the checkpoint references.
        tolerance: the largest ``|onnxruntime - PyTorch|`` logit difference accepted (1e-4). SET's
            graphs need more: its phase (``atan2`` of a spectrum) jumps by 2 pi where the sign of
            an exactly zero imaginary part changes, so it follows the FFT's last bits.
    Returns:
        ``{"output", "opset", "size", "dynamic", "max_error": {size: error}}``.
    Raises:
        FileNotFoundError / ValueError naming the checkpoint, the VFM weight file it references,
        or the bad option; nothing is written then.
    """
    from .checkpoints import atomic_write_bytes, segmentor_from_checkpoint

    output = Path(output)
    if output.is_dir():
        raise IsADirectoryError(21, "Is a directory", str(output))
    if not (math.isfinite(tolerance) and tolerance > 0):  # inf would accept any graph, even of another shape
        raise ValueError(f"--tolerance {tolerance}: must be a positive, finite number")
    segmentor, payload = segmentor_from_checkpoint(checkpoint, backbone=backbone)
    segmentor = segmentor.cpu().eval()
    family = segmentor.backbone.family
    if not getattr(family, "onnx_exportable", True):
        raise ValueError(f"{checkpoint}: ONNX export of {family.name} backbones is not supported (torch's exporter)")
    patch = segmentor.backbone.patch_size
    chosen = "--size {} {}" if size is not None else "the default size {}x{} (the backbone's img_size)"
    if size is None:
        # A ViT's grid as built; a CNN's, which has none, from its configuration.
        img_size = getattr(getattr(segmentor.backbone.vit, "patch_embed", None), "img_size", None)
        if img_size is None:
            img_size = ((payload["config"].get("model") or {}).get("backbone") or {}).get("img_size", 512)
        size = tuple(img_size) if isinstance(img_size, (list, tuple)) else (img_size, img_size)
    size = tuple(int(s) for s in size)
    if len(size) != 2 or size[0] < patch[0] or size[1] < patch[1] or size[0] % patch[0] or size[1] % patch[1]:
        raise ValueError(
            f"--size {' '.join(map(str, size))}: H and W must be positive multiples of the patch size {patch[0]}"
        )
    if getattr(getattr(segmentor.backbone, "rein", None), "square_even_grid", False):
        # FADA's Haar split reshapes the tokens to a square of the traced side: its graph takes
        # that size alone (onnxruntime failed at a second size with a reshape error).
        if dynamic:
            raise ValueError(
                f"{checkpoint}: --dynamic: FADA's Haar split takes the token grid as a square of the traced side, "
                "so its graph takes one size; export with --size H W"
            )
        grid = (size[0] // patch[0], size[1] // patch[1])
        if not fits_haar_split(*grid):
            raise ValueError(
                f"{chosen.format(*size)}: FADA needs a square patch grid with an even side, got "
                f"{grid[0]}x{grid[1]} patches (export with --size H W)"
            )
    try:
        import onnx  # noqa: F401  (the dynamo exporter needs it; fail before the long export)
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise RuntimeError(f"ONNX export needs `pip install reinseg[export]` ({err})") from None
    data = segmentor_to_onnx(segmentor, size, dynamic, fold)
    errors = {}
    if check:
        sizes = [size] + ([(size[0] + 2 * patch[0], size[1] + patch[1])] if dynamic else [])
        for checked in sizes:
            batch = 3 if dynamic and checked != size and not segmentor.mixes_batch else 1
            errors["x".join(map(str, checked))] = check_parity(segmentor, data, checked, batch=batch)
        worst = max(errors.values())
        if not worst <= tolerance:
            raise RuntimeError(
                f"{checkpoint}: the ONNX graph's logits differ from PyTorch's by {worst:.2e} "
                f"(> --tolerance {tolerance:g}) at {errors}; {output} not written"
            )
    atomic_write_bytes(output, data)
    return {"output": str(output), "opset": OPSET, "size": list(size), "dynamic": dynamic, "max_error": errors}


def segmentor_to_onnx(segmentor: nn.Module, size: tuple[int, int], dynamic: bool = False, fold: bool = True) -> bytes:
    """The serialized ONNX graph of ``segmentor`` (eval mode, CPU) traced at ``size`` (H, W); see
    :func:`export_onnx`."""
    patch = segmentor.backbone.patch_size
    model = SegmentationLogits(fold_rein(segmentor) if fold else segmentor).eval()
    # An image's logits must not depend on its batch: a model whose images mix keeps batch 1.
    free_batch = dynamic and not segmentor.mixes_batch
    # torch.export takes a dimension of size 1 for a constant: a dynamic batch is traced at 2.
    example = torch.randn(2 if free_batch else 1, 3, *size, generator=torch.Generator().manual_seed(0))
    dynamic_shapes = None
    if dynamic:
        dim = torch.export.Dim
        # H = ph * h' keeps H a multiple of the patch (the graph has no padding).
        free: dict[int, Any] = {0: dim("batch", min=1, max=1024)} if free_batch else {}
        free[2] = patch[0] * dim("rows", min=1, max=1024)
        free[3] = patch[1] * dim("cols", min=1, max=1024)
        dynamic_shapes = (free,)
    with torch.no_grad(), _traceable_positions(model.segmentor.backbone, dynamic), _quiet_folding():
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=dynamic_shapes,
            verbose=False,
            optimize=True,
        )
    if program.model_proto.ByteSize() >= 2**31:
        raise ValueError("the ONNX graph exceeds protobuf's 2 GiB: models this large are not supported yet")
    return program.model_proto.SerializeToString()


@contextlib.contextmanager
def _quiet_folding():
    """onnxscript's optimizer warns once per multi-output node it does not fold (26 lines for a
    DINOv2 segmentor, nothing the user can act on): its constant-folding logger is quieted."""
    folding = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = folding.level
    folding.setLevel(logging.ERROR)
    try:
        yield
    finally:
        folding.setLevel(level)


class _traceable_positions:
    """While exporting a dynamic-size graph of a DINOv2 or plain ViT (CLIP, MAE) backbone, its
    position interpolation in tensor operations (:func:`_traceable_position_embedding`); other
    families are left as they are (the parity check at a second size tells whether their graph
    follows the input's size)."""

    def __init__(self, backbone: nn.Module, dynamic: bool) -> None:
        from .families import DINOv2Family, ViTFamily, has_registers

        self.backbone = backbone
        family = getattr(backbone, "family", None)
        self.active = dynamic and isinstance(family, (DINOv2Family, ViTFamily))
        if self.active:
            vit = backbone.vit
            self.antialiased = not isinstance(family, DINOv2Family) or has_registers(vit)

    def __enter__(self):
        if self.active:
            family = copy.copy(self.backbone.family)
            antialiased = self.antialiased
            family.position_embedding = lambda vit, grid: _traceable_position_embedding(vit, grid, antialiased)
            self.original, self.backbone.family = self.backbone.family, family
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.backbone.family = self.original


def onnx_session(model: bytes | str | Path, threads: int | None = None):
    """An onnxruntime CPU session of an ONNX graph (bytes or a file)."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise RuntimeError(f"checking an ONNX export needs `pip install reinseg[export]` ({err})") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def check_parity(
    segmentor: nn.Module, model: bytes | str | Path, size: Sequence[int], batch: int = 1, seed: int = 1
) -> float:
    """Max ``|onnxruntime - PyTorch|`` of the logits of random images ``(batch, 3, *size)``."""
    session = onnx_session(model)
    images = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(seed))
    try:
        ours = session.run(None, {session.get_inputs()[0].name: images.numpy()})[0]
    except Exception as err:  # onnxruntime's own error types
        raise RuntimeError(f"onnxruntime cannot run the graph on {tuple(images.shape)}: {err}") from None
    reference = segmentor.encode_decode(images).numpy()
    if ours.shape != reference.shape:
        return math.inf
    return float(abs(ours - reference).max())
