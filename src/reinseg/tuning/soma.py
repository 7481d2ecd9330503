"""``soma``: SoMA, the minor singular components of the VFM's linear layers tuned (Yun et al., CVPR 2025).

Each target linear layer of the tuned blocks is split by the SVD of its pretrained weight,
``W = U diag(S) V^T``: the ``rank`` smallest singular components become a trainable low-rank
pair, ``A = diag(sqrt(S_r / s)) V_r^T`` (r, in) and ``B = U_r diag(sqrt(S_r / s))`` (out, r) with
``s = alpha / rank``, and the frozen residual keeps the rest, ``W - s B A``; the layer computes
``x (W - s B A + s B A)^T + b``, the pretrained layer at the start. The target layers' biases
train too, the early blocks stay frozen (``start_block``), and the weight decay is annealed
(cosine, ``train.weight_decay`` -> ``min_weight_decay`` over the run). A fused ``qkv`` projection
is split as the official code splits DINOv2's: one SVD each for q, k and v.

The low-rank pair is a parametrization of the weight (``torch.nn.utils.parametrize``), so every
code path that reads ``layer.weight`` (EVA's attention calls ``F.linear`` on it) sees the adapted
weight, and :meth:`Soma.merge` folds it into a plain weight: no cost at inference. The split is
computed when the model is built (DINOv2-L: about a minute of one CPU core), also when a
checkpoint is loaded, which stores the adapters and biases, not the residual weights; a merged
checkpoint (``reinseg merge``) needs no split.

reinseg splits the pretrained weights, as the paper describes and as the official ``SoraModel``
does when it wraps a loaded backbone (``tests/golden/make_soma_golden.py``). The official training
script wraps the backbone before mmengine's ``init_weights()`` loads the checkpoint, which then
overwrites the residual with the pretrained weight, the adapters keeping the minor components of
the random initial weights (``soma_tiny.pt``'s ``runner_order``); the released checkpoints are
merged the same way (``tools/merge_soma_weights.py``: pretrained weights + trained adapters).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .registry import TuningStrategy, register_strategy

__all__ = ["SomaConfig", "MinorComponents", "add_soma", "merge_parametrizations", "cosine_weight_decay"]

# Every linear layer of a block, as the official q, k, v, proj, fc1, fc2 (timm's names across the
# zoo: fused qkv or EVA's q/k/v_proj, EVA's SwiGLU fc1_g / fc1_x).
_ALL_LINEARS = ["qkv", "q_proj", "k_proj", "v_proj", "proj", "fc1", "fc1_g", "fc1_x", "fc2"]


@dataclass
class SomaConfig:
    """SoMA (``tuning: soma``), defaults of the official DINOv2-L configs."""

    rank: int = 16
    alpha: float | None = None  # null: rank (scaling alpha / rank = 1, as the official configs)
    start_block: int = 8  # blocks before it stay frozen (the official start_lora_idx)
    targets: list[str] = field(default_factory=lambda: list(_ALL_LINEARS))  # linear layers, by name in the block
    components: str = "minor"  # "minor": the smallest singular values (SoMA); "major": the largest (PiSSA-like)
    train_bias: bool = True  # the targets' biases train too (official bias="all")
    lr_mult: float = 0.5  # lr x this for the adapters and biases (official custom key "backbone": lr_mult 0.5)
    # Cosine annealing of every parameter group's weight decay to this over train.max_iters
    # (the official CosineAnnealingParamScheduler on weight_decay); null: constant weight decay.
    min_weight_decay: float | None = 1e-5
    # Whose singular components the adapters start from. "pretrained": the loaded VFM weights', the
    # residual keeping the rest (the paper). "initial": as the official training runs, which split
    # the randomly initialised weights before loading the checkpoint, so the pretrained weights stay
    # whole and B A starts as the minor components of a random init (nn.Linear's default init, as
    # the official ViT's linear layers hold it).
    split: str = "pretrained"


class MinorComponents(nn.Module):
    """The trainable singular components of a weight, as a parametrization: ``W = residual + s B A``.

    ``lora_A`` is ``(chunks, r, in)``, ``lora_B`` ``(chunks, out / chunks, r)``: one pair per block
    of output rows (q, k and v of a fused projection), each the official ``lora_A.weight`` /
    ``lora_B.weight`` of that row block.
    """

    def __init__(self, lora_a: Tensor, lora_b: Tensor, scaling: float) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(lora_a)
        self.lora_B = nn.Parameter(lora_b)
        self.scaling = scaling

    def delta(self) -> Tensor:
        """``s B A`` as one ``(out, in)`` matrix."""
        product = torch.bmm(self.lora_B, self.lora_A)
        return self.scaling * product.reshape(-1, product.shape[-1])

    def forward(self, residual: Tensor) -> Tensor:
        return residual + self.delta().to(residual.dtype)


def split_components(
    weight: Tensor, rank: int, scaling: float, minor: bool = True, chunks: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """The SVD split of ``weight`` (out, in): ``(A (chunks, r, in), B (chunks, out/chunks, r),
    residual (out, in))`` with ``residual + scaling * B A == weight`` (per row block)."""
    dtype = weight.dtype
    blocks = weight.detach().float().chunk(chunks, dim=0)
    a_list, b_list, residuals = [], [], []
    for w in blocks:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        keep = slice(-rank, None) if minor else slice(0, rank)
        root = torch.sqrt(s[keep] / scaling)
        a = root[:, None] * vh[keep]
        b = u[:, keep] * root[None, :]
        a_list.append(a)
        b_list.append(b)
        residuals.append(w - scaling * b @ a)
    return torch.stack(a_list), torch.stack(b_list), torch.cat(residuals).to(dtype)


def add_soma(
    backbone,
    rank: int = 16,
    alpha: float | None = None,
    start_block: int = 8,
    targets: tuple[str, ...] = tuple(_ALL_LINEARS),
    minor: bool = True,
    train_bias: bool = True,
    split: str = "pretrained",
) -> list[str]:
    """Split the target linear layers of blocks ``start_block ..`` of ``backbone.vit`` (its
    weights loaded) and set what trains; returns the adapted layers' names. ``split``: see
    :class:`SomaConfig` (``"initial"``: the components of a random init, the weights left whole)."""
    depth = len(backbone.vit.blocks)
    if not 0 <= start_block < depth:
        raise ValueError(f"model.soma.start_block={start_block} must be in [0, {depth}), the backbone's blocks")
    scaling = (rank if alpha is None else alpha) / rank
    pattern = re.compile(r"blocks\.(\d+)\.(.+\.)?(" + "|".join(map(re.escape, targets)) + r")")
    backbone.vit.requires_grad_(False)
    adapted = []
    for name, module in list(backbone.vit.named_modules()):
        match = pattern.fullmatch(name)
        if not match or int(match.group(1)) < start_block or not isinstance(module, nn.Linear):
            continue
        leaf = match.group(3)
        chunks = 3 if leaf == "qkv" else 1
        if rank > min(module.out_features // chunks, module.in_features):
            raise ValueError(f"model.soma.rank={rank} exceeds the size of {name} ({tuple(module.weight.shape)})")
        if split == "initial":
            # The official runs split the weight as their ViT is built: the DINOv2 of Rein's code base
            # initialises nothing itself, so each linear layer holds PyTorch's default init,
            # kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)) (not Meta DINOv2's
            # trunc. normal, std 0.02: about 3.6x smaller at the golden's width 64).
            initial = nn.init.kaiming_uniform_(torch.empty_like(module.weight, dtype=torch.float32), a=math.sqrt(5))
            lora_a, lora_b, _ = split_components(initial, rank, scaling, minor, chunks)
        else:
            lora_a, lora_b, residual = split_components(module.weight, rank, scaling, minor, chunks)
            with torch.no_grad():
                module.weight.copy_(residual)
        parametrize.register_parametrization(module, "weight", MinorComponents(lora_a, lora_b, scaling))
        module.parametrizations.weight.original.requires_grad_(False)
        if train_bias:
            if module.bias is not None:
                module.bias.requires_grad_(True)
            if leaf == "qkv":  # EVA-style fused projections keep q and v biases beside the layer
                parent = backbone.vit.get_submodule(name.rsplit(".", 1)[0])
                for extra in ("q_bias", "v_bias"):
                    if isinstance(getattr(parent, extra, None), nn.Parameter):
                        getattr(parent, extra).requires_grad_(True)
        adapted.append(name)
    if not adapted:
        raise ValueError(
            f"model.soma.targets {list(targets)} match no linear layer of blocks {start_block}..{depth - 1}"
        )
    return adapted


def merge_parametrizations(module: nn.Module) -> int:
    """Fold every parametrized weight under ``module`` into a plain one; returns how many."""
    merged = 0
    for sub in list(module.modules()):
        if parametrize.is_parametrized(sub):
            for tensor_name in list(sub.parametrizations.keys()):
                parametrize.remove_parametrizations(sub, tensor_name, leave_parametrized=True)
                merged += 1
    return merged


def cosine_weight_decay(minimum: float, max_iters: int) -> Callable[[float, int], float]:
    """mmengine's ``CosineAnnealingParamScheduler(param_name="weight_decay", eta_min=minimum,
    begin=0, end=max_iters)`` in closed form: a group's weight decay during iteration ``step``.

    mmengine anneals every group from its own value, so a group without decay (0) rises to
    ``minimum`` at the end, as in the official runs.
    """

    def decay(initial: float, step: int) -> float:
        step = min(step, max_iters - 1)
        return minimum + (initial - minimum) * (1 + math.cos(math.pi * step / max_iters)) / 2

    return decay


@register_strategy("soma")
class Soma(TuningStrategy):
    options_class = SomaConfig
    backbone_kinds = ("vit",)  # linear layers of transformer blocks
    frozen_in_bf16 = False  # the trainable biases would meet bf16 weights in the same layer
    # The SoMA fork's custom_keys: the head's own queries take no decay (sora_dinov2-L_mask2former.py).
    no_decay_keys = ("query_feat",)

    def check(self, options: SomaConfig) -> None:
        if options.rank < 1:
            raise ValueError(f"model.soma.rank must be at least 1, got {options.rank}")
        if options.alpha is not None and not options.alpha > 0:
            raise ValueError(f"model.soma.alpha must be greater than 0, got {options.alpha}")
        if options.start_block < 0:
            raise ValueError(f"model.soma.start_block must be at least 0, got {options.start_block}")
        if not options.targets:
            raise ValueError("model.soma.targets must name at least one linear layer")
        if options.components not in ("minor", "major"):
            raise ValueError(f"model.soma.components must be 'minor' or 'major', got {options.components!r}")
        if options.split not in ("pretrained", "initial"):
            raise ValueError(f"model.soma.split must be 'pretrained' or 'initial', got {options.split!r}")
        if options.lr_mult < 0:
            raise ValueError(f"model.soma.lr_mult must be at least 0, got {options.lr_mult}")
        if options.min_weight_decay is not None and options.min_weight_decay < 0:
            raise ValueError(f"model.soma.min_weight_decay must be at least 0, got {options.min_weight_decay}")

    def apply(self, backbone, options: SomaConfig) -> None:
        self.check(options)
        add_soma(
            backbone,
            options.rank,
            options.alpha,
            options.start_block,
            tuple(options.targets),
            options.components == "minor",
            options.train_bias,
            options.split,
        )

    def merge(self, backbone) -> None:
        merge_parametrizations(backbone.vit)

    def backbone_lr_mult(self, options: SomaConfig) -> float:
        return options.lr_mult

    def weight_decay_schedule(self, options: SomaConfig, max_iters: int):
        if options.min_weight_decay is None:
            return None
        return cosine_weight_decay(options.min_weight_decay, max_iters)
