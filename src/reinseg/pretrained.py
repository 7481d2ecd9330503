"""Reading pretrained backbone (VFM) weight files and fitting them to a timm model of another patch size or grid.

Supported files: PyTorch pickles (``.pth``/``.pt``/``.bin``, read by
:func:`reinseg.safe_load.load_torch_file`: nothing in them runs), TorchScript archives (read as
data) and safetensors, holding either timm state dicts or the original releases' layouts that timm's
checkpoint filters understand (DINOv2 as Facebook releases it and as the official Rein
conversion script writes it, DINOv3, EVA02, OpenAI CLIP, SAM, MAE).

Two ways to fit a checkpoint trained at another patch size or resolution:

- ``"official"`` (default): the official Rein conversion (``tools/convert_models`` in
  w1oves/Rein): bicubic resize (align_corners False, no antialiasing) of the patch kernel to the
  new patch size and of the position grid to the new grid, prefix (CLS) positions kept. The
  released Rein heads were trained on DINOv2 weights converted this way.
- ``"timm"``: timm's resampling (pseudo-inverse patch-kernel resampling, antialiased bicubic
  position grid).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .safe_load import load_torch_file

__all__ = [
    "RESAMPLE_METHODS",
    "read_state_dict",
    "read_weights",
    "resize_patch_kernel",
    "resize_pos_grid",
    "fit_state_dict",
    "state_dict_mismatches",
    "load_into",
    "weights_fingerprint",
    "backbone_part",
]

RESAMPLE_METHODS = ("official", "timm")

# Wrappers that training frameworks put around a state dict ("teacher": DINOv2's and DINOv3's
# training checkpoints, whose teacher network is the released one).
_WRAPPER_KEYS = ("state_dict", "model", "model_ema", "module", "teacher")
# Keys of parts of a ViT that the segmentation backbone never runs (final norms, classifier,
# SAM's neck, MIM heads); checkpoints may or may not hold them.
_UNUSED_PREFIXES = ("norm.", "fc_norm.", "head.", "neck.", "attn_pool.", "lm_head.", "head_drop.")
# Where position embeddings and patch kernels live in the layouts we read, before conversion.
_POS_KEYS = ("pos_embed", "visual.positional_embedding", "positional_embedding", "image_encoder.pos_embed")
_PATCH_KEYS = (
    "patch_embed.proj.weight",
    "visual.conv1.weight",
    "conv1.weight",
    "image_encoder.patch_embed.proj.weight",
)


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a weight file into a flat ``{name: tensor}`` dict, unwrapping framework wrappers.

    Nothing in the file is executed (:mod:`reinseg.safe_load`). Raises a
    ``FileNotFoundError``/``ValueError`` naming ``path`` when the file is missing, unreadable,
    asks for code, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except Exception as err:  # safetensors raises its own kinds on a corrupt file
            raise ValueError(f"could not read checkpoint {path}: {err}") from err
    else:
        obj = load_torch_file(path, what="weight file")
    return unwrap_state_dict(obj, source=str(path))


def read_weights(weights: str | Path | dict[str, Tensor]) -> tuple[dict[str, Tensor], str]:
    """``(state dict, its name for messages)`` of a weight file path or a (wrapped) state dict."""
    if isinstance(weights, (str, Path)):
        return read_state_dict(weights), str(weights)
    return unwrap_state_dict(weights, "backbone state dict"), "backbone state dict"


def unwrap_state_dict(obj: object, source: str = "state dict") -> dict[str, Tensor]:
    """Return the tensor dict inside ``obj`` (unwrapping ``state_dict``/``model``/... and ``module.``)."""
    while isinstance(obj, dict):
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{source} holds no state dict (got {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise ValueError(f"{source} holds no tensors")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module.") :]: v for k, v in tensors.items()}
    # DINOv2 trained with block_chunks > 0 names blocks ``blocks.<chunk>.<index>.``.
    chunked = re.compile(r"^blocks\.\d+\.(\d+)\.")
    if any(chunked.match(k) for k in tensors):
        tensors = {chunked.sub(r"blocks.\1.", k): v for k, v in tensors.items()}
    return tensors


def backbone_part(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's weights of a whole-model checkpoint (a DINO teacher's ``backbone.*`` beside
    its projection heads; an mmpretrain or mmseg model's ``backbone.*``, without the Reins an
    official Rein release holds there), with the prefix removed; any other dict copied as it is
    (the caller's dict is never changed)."""
    if not any(k.startswith("backbone.") for k in state_dict):
        return dict(state_dict)
    return {
        k[len("backbone.") :]: v
        for k, v in state_dict.items()
        if k.startswith("backbone.") and not k.startswith("backbone.reins.")
    }


def resize_patch_kernel(kernel: Tensor, patch_size: tuple[int, int], method: str = "official") -> Tensor:
    """Resize a patch-embedding kernel ``(C, 3, p, p)`` to ``patch_size``."""
    if tuple(kernel.shape[-2:]) == tuple(patch_size):
        return kernel
    if method == "official":
        return F.interpolate(kernel.float(), size=patch_size, mode="bicubic", align_corners=False).to(kernel.dtype)
    from timm.layers import resample_patch_embed

    return resample_patch_embed(kernel, list(patch_size), interpolation="bicubic", antialias=True)


def resize_pos_grid(grid: Tensor, size: tuple[int, int], method: str = "official") -> Tensor:
    """Resize position embeddings laid out as an image ``(1, C, h, w)`` to ``size``."""
    if tuple(grid.shape[-2:]) == tuple(size):
        return grid
    antialias = method == "timm"
    return F.interpolate(grid.float(), size=size, mode="bicubic", align_corners=False, antialias=antialias).to(
        grid.dtype
    )


def _resize_pos_embed(pos: Tensor, grid: tuple[int, int], method: str, name: str = "position embedding") -> Tensor:
    """Resize a position embedding in any of the layouts we read to ``grid``, prefix kept.

    Layouts: ``(1, P + h*w, C)`` (timm, DINOv2, EVA), ``(P + h*w, C)`` (OpenAI CLIP),
    ``(1, h, w, C)`` (SAM). Stored grids are square; ``P`` is 0 or 1. ``name`` (the file and
    key) starts the error of a tensor in none of these layouts.
    """
    if pos.dim() == 4:
        out = resize_pos_grid(pos.permute(0, 3, 1, 2), grid, method)
        return out.permute(0, 2, 3, 1)
    flat = pos.unsqueeze(0) if pos.dim() == 2 else pos
    n, c = flat.shape[1], flat.shape[2]
    num_prefix = next((p for p in (0, 1) if math.isqrt(n - p) ** 2 == n - p), None)
    if num_prefix is None:
        raise ValueError(f"{name}: a position embedding of {n} tokens is not a square grid with 0 or 1 prefix tokens")
    side = math.isqrt(n - num_prefix)
    if (side, side) == tuple(grid):
        return pos
    patch = flat[:, num_prefix:].reshape(1, side, side, c).permute(0, 3, 1, 2)
    patch = resize_pos_grid(patch, grid, method).permute(0, 2, 3, 1).reshape(1, -1, c)
    out = torch.cat([flat[:, :num_prefix], patch], dim=1)
    return out[0] if pos.dim() == 2 else out


def _resize_rel_pos(rel_pos: Tensor, length: int) -> Tensor:
    """Resize SAM's decomposed relative positions ``(2s - 1, C)`` linearly, as SAM does at run time."""
    if rel_pos.shape[0] == length:
        return rel_pos
    out = F.interpolate(rel_pos.float().t().unsqueeze(0), size=length, mode="linear")
    return out[0].t().to(rel_pos.dtype)


def fit_state_dict(
    state_dict: dict[str, Tensor],
    model: nn.Module,
    filter_fn: Callable[[dict[str, Tensor], nn.Module], dict[str, Tensor]],
    method: str = "official",
    source: str = "checkpoint",
) -> dict[str, Tensor]:
    """Convert ``state_dict`` to ``model``'s timm layout, patch size and grid.

    Args:
        state_dict: weights in any supported layout.
        model: the timm model to fit (its patch kernel and position grid give the targets).
        filter_fn: timm's checkpoint filter for the model's family (layout conversion).
        method: ``"official"`` or ``"timm"`` resampling (module docstring).
        source: name of the weights for error messages.
    Returns:
        A state dict whose keys and shapes match ``model`` (unused heads and norms dropped).
    """
    if method not in RESAMPLE_METHODS:
        raise ValueError(f"resample must be one of {RESAMPLE_METHODS}, got {method!r}")
    patch = tuple(model.patch_embed.proj.weight.shape[-2:])
    grid = tuple(model.patch_embed.grid_size)
    state_dict = backbone_part(state_dict)
    if method == "official":
        # Resample before timm's filter sees the weights, so that it finds the shapes it
        # expects and leaves them alone. OpenAI's CLIP file holds the text tower too, whose
        # (77, C) position embedding is the unprefixed key: the image tower's keys carry "visual.".
        image_tower_prefixed = any(key.startswith("visual.") for key in state_dict)
        for key in _PATCH_KEYS:
            if key in state_dict and not (image_tower_prefixed and key == "conv1.weight"):
                state_dict[key] = resize_patch_kernel(state_dict[key], patch, method)
        for key in _POS_KEYS:
            if key in state_dict and not (image_tower_prefixed and key == "positional_embedding"):
                state_dict[key] = _resize_pos_embed(state_dict[key], grid, method, f"{source}: {key}")
    try:
        state_dict = filter_fn(state_dict, model)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None

    # Whatever the filter left unfitted (SAM's filter does no resampling).
    target = model.state_dict()
    for key, value in list(state_dict.items()):
        if key not in target or target[key].shape == value.shape:
            continue
        if key == "patch_embed.proj.weight":
            state_dict[key] = resize_patch_kernel(value, patch, method)
        elif key == "pos_embed":
            state_dict[key] = _resize_pos_embed(value, grid, method, f"{source}: {key}")
        elif key.endswith((".rel_pos_h", ".rel_pos_w")):
            state_dict[key] = _resize_rel_pos(value, target[key].shape[0])

    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(_UNUSED_PREFIXES)}
    problems = state_dict_mismatches(target, state_dict)
    if problems:
        raise ValueError(
            f"{source} does not fit {type(model).__name__} "
            f"(embed_dim {getattr(model, 'embed_dim', '?')}, depth {len(model.blocks)}): " + "; ".join(problems)
        )
    return state_dict


def load_into(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Copy a fitted state dict into ``model`` (works for models built on the meta device)."""
    model.load_state_dict(state_dict, strict=True, assign=_is_meta(model))


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def state_dict_mismatches(expected: dict[str, Tensor], given: dict[str, Tensor], name=lambda key: key) -> list[str]:
    """What keeps ``given`` from loading strictly where ``expected`` is: missing, unexpected and
    mis-shaped keys, each list cut to its first few names (written with ``name``)."""
    missing = [name(k) for k in expected if k not in given]
    unexpected = [name(k) for k in given if k not in expected]
    mismatched = [
        f"{name(k)}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in given.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    for label, names in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched)):
        if names:
            more = f", ... ({len(names) - 8} more)" if len(names) > 8 else ""
            problems.append(f"{label} ({len(names)}): {', '.join(names[:8])}{more}")
    return problems


# Tensors a load may resample (patch 14 -> 16, another grid, rotary tables): their bits could move
# with the PyTorch version, so they identify no file.
_RESAMPLED = ("pos_embed", "patch_embed", "rope", "position_embedding", "rel_pos")


def weights_fingerprint(model: nn.Module) -> str:
    """A short digest of a VFM's weights as loaded, to tell one weight file from another: names,
    shapes and an evenly spaced sample of about a thousand values of every floating tensor (the
    resampled ones excepted). A checkpoint records it beside the file it references, so that a
    model is not run on other weights than it was trained on."""
    digest = hashlib.sha256()
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name in sorted(tensors):
        tensor = tensors[name]
        if not tensor.is_floating_point() or any(part in name for part in _RESAMPLED):
            continue
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].to("cpu", torch.float32).contiguous()
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:20]
