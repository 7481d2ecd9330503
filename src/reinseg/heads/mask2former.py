"""The Mask2Former head whose object queries come from Rein's tokens.

Wei et al. link Rein's tokens to the instances: the backbone's linked queries ``(m, D)`` are the
positional query embedding of every decoder layer, and through the linear ``querys2feat`` the
initial query features (``ReinMask2FormerHead`` of the official code, ``replace_query_feat``).
Without linked queries the head learns its own (``query_embed``, ``query_feat``), as the original
Mask2Former.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .criterion import Mask2FormerLoss
from .deformable_csr import eager_on_cpu
from .pixel_decoder import PixelDecoder, ReLUInPlaceWithoutGraph
from .position_encoding import sine_position_encoding
from .registry import register_head
from .transformer_decoder import TransformerDecoder

__all__ = ["Mask2FormerHead", "mask_products", "semantic_logits"]


@register_head("mask2former")
class Mask2FormerHead(nn.Module):
    """Mask2Former for semantic segmentation.

    Args:
        in_channels: channels of the four backbone maps (strides 4, 8, 16, 32).
        num_classes: number of classes ``K`` (a no-object class is added).
        feat_channels: decoder width (256).
        out_channels: mask-embedding width (256).
        num_queries: object queries (the Rein ``token_length`` when linked, 100).
        num_feature_levels: coarse levels attended to by both decoders (3).
        num_heads: attention heads of both transformers (8).
        num_decoder_layers: masked-attention decoder layers (9).
        decoder_ffn_dims: FFN width of the decoder (2048).
        num_encoder_layers, encoder_ffn_dims, num_points: the pixel decoder's deformable encoder
            (6, 1024, 4).
        num_groups: GroupNorm groups of the pixel decoder (32).
        linked_queries: queries come from the backbone (Rein) rather than from the head.

    ``forward(features, queries)`` returns per-prediction lists (the initial queries' and every
    decoder layer's): class logits ``(B, Q, K + 1)`` and mask logits ``(B, Q, H/4, W/4)``;
    ``forward(..., last_only=True)`` only the last prediction (one-element lists), what inference
    needs.

    Each layer's attention mask is the previous prediction's mask logits, bilinearly resized to
    the next level and thresholded at 0. Resizing and the mask product are both linear, so the
    head resizes the mask features once per level and takes the product there: the same logits
    (up to float rounding) as resizing the full-size masks, at a fraction of the work, and the
    full-size masks are only made for the predictions that are returned.
    """

    criterion_class = Mask2FormerLoss
    # The official paramwise_cfg: no weight decay for the query and level embeddings.
    no_decay_keys = ("query_embed", "level_embed")

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int = 19,
        feat_channels: int = 256,
        out_channels: int = 256,
        num_queries: int = 100,
        num_feature_levels: int = 3,
        num_heads: int = 8,
        num_decoder_layers: int = 9,
        decoder_ffn_dims: int = 2048,
        num_encoder_layers: int = 6,
        encoder_ffn_dims: int = 1024,
        num_points: int = 4,
        num_groups: int = 32,
        linked_queries: bool = True,
    ) -> None:
        super().__init__()
        if len(in_channels) != 4:
            raise ValueError(f"the head reads 4 backbone maps, got in_channels={list(in_channels)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.feat_channels = feat_channels
        self.linked_queries = linked_queries
        self.pixel_decoder = PixelDecoder(
            in_channels,
            feat_channels,
            out_channels,
            num_encoder_levels=num_feature_levels,
            num_layers=num_encoder_layers,
            num_heads=num_heads,
            num_points=num_points,
            ffn_dims=encoder_ffn_dims,
            num_groups=num_groups,
        )
        self.transformer_decoder = TransformerDecoder(num_decoder_layers, feat_channels, num_heads, decoder_ffn_dims)
        self.level_embed = nn.Embedding(num_feature_levels, feat_channels)
        self.cls_embed = nn.Linear(feat_channels, num_classes + 1)
        self.mask_embed = nn.Sequential(
            nn.Linear(feat_channels, feat_channels),
            ReLUInPlaceWithoutGraph(),
            nn.Linear(feat_channels, feat_channels),
            ReLUInPlaceWithoutGraph(),
            nn.Linear(feat_channels, out_channels),
        )
        if linked_queries:
            self.querys2feat = nn.Linear(feat_channels, feat_channels)
        else:
            self.query_embed = nn.Embedding(num_queries, feat_channels)
            self.query_feat = nn.Embedding(num_queries, feat_channels)

    def forward(
        self,
        features: Sequence[Tensor],
        queries: Tensor | None = None,
        last_only: bool = False,
        scales: Sequence[float] | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            features: four maps ``(B, C_i, H/s, W/s)``, strides 4, 8, 16, 32.
            queries: linked object queries ``(Q, D)`` or ``(B, Q, D)`` (required iff linked).
            last_only: return the last prediction only (inference), not the deep supervision.
            scales: ``features`` are the maps before their resizing to those strides, by these
                factors (:class:`~reinseg.backbones.BackboneMaps`); the pixel decoder resizes them.
        Returns:
            ``(class_logits, mask_logits)``: lists of ``1 + num_decoder_layers`` tensors (one
            with ``last_only``) ``(B, Q, K + 1)`` and ``(B, Q, H/4, W/4)``.
        """
        batch = features[0].shape[0]
        if self.linked_queries:
            if queries is None:
                raise ValueError("this head takes its queries from the backbone (Rein), but none were given")
            if queries.shape[-2:] != (self.num_queries, self.feat_channels):
                raise ValueError(
                    f"linked queries must be ({self.num_queries}, {self.feat_channels}), got {tuple(queries.shape)}"
                )
            query_pos = queries.expand(batch, -1, -1) if queries.dim() == 2 else queries
            query = self.querys2feat(query_pos)
        else:
            query_pos = self.query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
            query = self.query_feat.weight.unsqueeze(0).expand(batch, -1, -1)

        mask_features, levels = self.pixel_decoder(features, scales)  # levels coarsest first
        memories, memory_pos, memory_with_pos = [], [], []
        for i, level in enumerate(levels):
            h, w = level.shape[-2:]
            memories.append(level.flatten(2).transpose(1, 2) + self.level_embed.weight[i].view(1, 1, -1))
            pos = sine_position_encoding(batch, h, w, self.feat_channels // 2, device=level.device)
            memory_pos.append(pos.to(level.dtype).flatten(2).transpose(1, 2))
            # The keys of every layer attending to this level: made, and kept for backward, once.
            memory_with_pos.append(memories[-1] + memory_pos[-1])

        # Mask features resized to each level (no gradient: attention masks are thresholded).
        with torch.no_grad():
            level_mask_features = resize_to_levels(mask_features, [level.shape[-2:] for level in levels])
        decoder = self.transformer_decoder
        num_layers = len(decoder.layers)
        class_logits: list[Tensor] = []
        mask_embeds: list[Tensor] = []
        query_embed = self._embed(query, class_logits, mask_embeds, returned=not last_only)
        for i, layer in enumerate(decoder.layers):
            level = i % self.num_feature_levels
            attn_mask = _attention_mask(query_embed, level_mask_features[level])
            query = layer(query, query_pos, memories[level], memory_pos[level], attn_mask, memory_with_pos[level])
            returned = not last_only or i == num_layers - 1
            query_embed = self._embed(query, class_logits, mask_embeds, returned)
        # The full-size masks feed nothing inside the head: all predictions' at once.
        return class_logits, mask_products(mask_embeds, mask_features)

    def _embed(self, query: Tensor, class_logits: list[Tensor], mask_embeds: list[Tensor], returned: bool) -> Tensor:
        """The mask embedding ``(B, Q, C)`` of the current queries; when ``returned``, their class
        logits and the embedding are appended to the lists."""
        query = self.transformer_decoder.post_norm(query)
        embed = self.mask_embed(query)
        if returned:
            class_logits.append(self.cls_embed(query))
            mask_embeds.append(embed)
        return embed


def mask_products(embeds: Sequence[Tensor], mask_features: Tensor) -> list[Tensor]:
    """Mask logits ``(B, Q, H, W)`` of every ``embed (B, Q, C)`` on ``mask_features (B, C, H, W)``.

    The loss only reaches the masks of the queries matched to a segment (about a fifth of them
    in the paper's setting): on the CPU in fp32 the backward multiplies only the rows whose
    gradient is not zero (the others add exact zeros), those of all predictions together (one
    product per image for the features' gradient, instead of one per prediction and their sum).
    The same gradients up to the order of float sums; elsewhere (GPU, autocast, tracing: the
    rows are found on the host) the plain products.
    """
    if (
        not eager_on_cpu(mask_features)
        or torch.is_autocast_enabled("cpu")
        or not (mask_features.requires_grad or any(e.requires_grad for e in embeds))
    ):
        return [torch.einsum("bqc,bchw->bqhw", embed, mask_features) for embed in embeds]
    return list(_MaskProducts.apply(mask_features, *embeds))


class _MaskProducts(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mask_features: Tensor, *embeds: Tensor) -> tuple[Tensor, ...]:
        ctx.save_for_backward(mask_features, *embeds)
        ctx.set_materialize_grads(False)  # a prediction the loss does not read: None, not zeros
        return tuple(torch.einsum("bqc,bchw->bqhw", embed, mask_features) for embed in embeds)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        mask_features, *embeds = ctx.saved_tensors
        features = mask_features.flatten(2)  # (B, C, H*W)
        grad_embeds = [
            torch.zeros_like(embed) if grad is not None and ctx.needs_input_grad[1 + i] else None
            for i, (embed, grad) in enumerate(zip(embeds, grads, strict=True))
        ]
        grad_features = torch.empty_like(features) if ctx.needs_input_grad[0] else None
        for b in range(features.shape[0]):
            # The rows the loss reached, of all predictions: (n, C) embeddings, (n, H*W) gradients.
            used_embeds, used_grads, places = [], [], []
            for i, (embed, grad) in enumerate(zip(embeds, grads, strict=True)):
                if grad is None:
                    continue
                grad_b = grad[b].flatten(1)
                used = grad_b.any(-1).nonzero().squeeze(1)
                if len(used):
                    used_embeds.append(embed[b].index_select(0, used))
                    used_grads.append(grad_b.index_select(0, used))
                    places.append((i, used))
            if not places:
                if grad_features is not None:
                    grad_features[b].zero_()
                continue
            grad_rows = torch.cat(used_grads)
            if grad_features is not None:
                torch.mm(torch.cat(used_embeds).t(), grad_rows, out=grad_features[b])
            if any(grad_embeds[i] is not None for i, _ in places):
                parts = (grad_rows @ features[b].t()).split([len(used) for _, used in places])
                for (i, used), part in zip(places, parts, strict=True):
                    grad_embed = grad_embeds[i]
                    if grad_embed is not None:
                        grad_embed[b].index_copy_(0, used, part)
        return None if grad_features is None else grad_features.view_as(mask_features), *grad_embeds


def resize_to_levels(mask_features: Tensor, sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """``mask_features (B, C, H, W)`` resized bilinearly (align_corners False) to each ``(h, w)``
    of ``sizes``: ``(B, C, h, w)`` maps (NCHW-contiguous on the CPU; elsewhere in the layout of
    ``mask_features``).

    On the CPU the maps are resized channels-last: PyTorch's CPU kernel downsamples an NCHW map
    of 256 channels 20-500x slower than the same map in NHWC (128 to 64 pixels at batch 2: 64
    against 2.6 ms, to 16: 53 against 0.1 ms; the three levels took about 0.1 s of every training forward,
    benchmarks/RESULTS.md "Eighteenth session"). The two kernels give the same values up to float
    rounding, bit for bit at the power-of-two factors of the paper's crops
    (tests/test_heads.py). On a GPU the layout is left alone.
    """
    if eager_on_cpu(mask_features):
        source = mask_features.contiguous(memory_format=torch.channels_last)
        # Back to NCHW: the attention masks' products read the maps as before.
        return [F.interpolate(source, size=size, mode="bilinear", align_corners=False).contiguous() for size in sizes]
    return [F.interpolate(mask_features, size=size, mode="bilinear", align_corners=False) for size in sizes]


def _attention_mask(embed: Tensor, level_mask_features: Tensor) -> Tensor:
    """``(B, 1, Q, h*w)``, one mask for all heads: True where the query's predicted mask (logit
    of ``embed (B, Q, C)`` on ``level_mask_features (B, C, h, w)``) is on. A query whose mask
    covers nothing would attend to nothing: it sees everything instead (as mmdet)."""
    with torch.no_grad():
        logits = torch.einsum("bqc,bchw->bqhw", embed, level_mask_features).flatten(2)
        # Written as mmdet's "masked where sigmoid < 0.5", negated, to treat NaN alike.
        attn_mask = ~(logits.sigmoid() < 0.5)
        # mmdet's assignment through a boolean index, as one elementwise or.
        attn_mask |= ~attn_mask.any(-1, keepdim=True)
    return attn_mask.unsqueeze(1)


def semantic_logits(class_logits: Tensor, mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Per-class scores: sum over queries of ``softmax(class)[:, :-1] * sigmoid(mask)``.

    Args:
        class_logits: ``(B, Q, K + 1)``.
        mask_logits: ``(B, Q, h, w)``, upsampled bilinearly to ``size`` before the sigmoid.
    Returns:
        ``(B, K, H, W)``.
    """
    # In place: at a whole 2048x1024 image the 100 upsampled masks take 0.8 GB, and a second
    # tensor for their sigmoid would double the peak (the same values).
    masks = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False).sigmoid_()
    scores = class_logits.softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", scores, masks)
