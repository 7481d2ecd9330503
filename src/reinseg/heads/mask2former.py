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
from .pixel_decoder import PixelDecoder
from .position_encoding import sine_position_encoding
from .registry import register_head
from .transformer_decoder import TransformerDecoder

__all__ = ["Mask2FormerHead", "mask_product", "semantic_logits"]


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
            nn.ReLU(inplace=True),
            nn.Linear(feat_channels, feat_channels),
            nn.ReLU(inplace=True),
            nn.Linear(feat_channels, out_channels),
        )
        if linked_queries:
            self.querys2feat = nn.Linear(feat_channels, feat_channels)
        else:
            self.query_embed = nn.Embedding(num_queries, feat_channels)
            self.query_feat = nn.Embedding(num_queries, feat_channels)

    def forward(
        self, features: Sequence[Tensor], queries: Tensor | None = None, last_only: bool = False
    ) -> tuple[list[Tensor], list[Tensor]]:
        """
        Args:
            features: four maps ``(B, C_i, H/s, W/s)``, strides 4, 8, 16, 32.
            queries: linked object queries ``(Q, D)`` or ``(B, Q, D)`` (required iff linked).
            last_only: return the last prediction only (inference), not the deep supervision.
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

        mask_features, levels = self.pixel_decoder(features)  # levels coarsest first
        memories, memory_pos = [], []
        for i, level in enumerate(levels):
            h, w = level.shape[-2:]
            memories.append(level.flatten(2).transpose(1, 2) + self.level_embed.weight[i].view(1, 1, -1))
            pos = sine_position_encoding(batch, h, w, self.feat_channels // 2, device=level.device)
            memory_pos.append(pos.to(level.dtype).flatten(2).transpose(1, 2))

        # Mask features resized to each level (no gradient: attention masks are thresholded).
        with torch.no_grad():
            level_mask_features = [
                F.interpolate(mask_features, size=level.shape[-2:], mode="bilinear", align_corners=False)
                for level in levels
            ]
        decoder = self.transformer_decoder
        num_layers = len(decoder.layers)
        class_logits: list[Tensor] = []
        mask_logits: list[Tensor] = []
        query_embed = self._embed(query, mask_features, class_logits, mask_logits, returned=not last_only)
        for i, layer in enumerate(decoder.layers):
            level = i % self.num_feature_levels
            attn_mask = _attention_mask(query_embed, level_mask_features[level])
            query = layer(query, query_pos, memories[level], memory_pos[level], attn_mask)
            returned = not last_only or i == num_layers - 1
            query_embed = self._embed(query, mask_features, class_logits, mask_logits, returned)
        return class_logits, mask_logits

    def _embed(
        self,
        query: Tensor,
        mask_features: Tensor,
        class_logits: list[Tensor],
        mask_logits: list[Tensor],
        returned: bool,
    ) -> Tensor:
        """The mask embedding ``(B, Q, C)`` of the current queries; when ``returned``, their class
        logits and full-size mask logits are appended to the lists."""
        query = self.transformer_decoder.post_norm(query)
        embed = self.mask_embed(query)
        if returned:
            class_logits.append(self.cls_embed(query))
            mask_logits.append(mask_product(embed, mask_features))
        return embed


def mask_product(embed: Tensor, mask_features: Tensor) -> Tensor:
    """Mask logits ``(B, Q, H, W)`` of ``embed (B, Q, C)`` on ``mask_features (B, C, H, W)``.

    The loss only reaches the masks of the queries matched to a segment (about a fifth of them
    in the paper's setting): on the CPU in fp32 the backward multiplies only the rows whose
    gradient is not zero (the others add exact zeros). The same gradients up to the order of
    float sums; elsewhere (GPU, autocast, tracing: the rows are found on the host) the plain
    product.
    """
    if (
        not eager_on_cpu(mask_features)
        or torch.is_autocast_enabled("cpu")
        or not (embed.requires_grad or mask_features.requires_grad)
    ):
        return torch.einsum("bqc,bchw->bqhw", embed, mask_features)
    return _MaskProduct.apply(embed, mask_features)


class _MaskProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, embed: Tensor, mask_features: Tensor) -> Tensor:
        ctx.save_for_backward(embed, mask_features)
        return torch.einsum("bqc,bchw->bqhw", embed, mask_features)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        embed, mask_features = ctx.saved_tensors
        batch = embed.shape[0]
        features = mask_features.flatten(2)  # (B, C, H*W)
        grad = grad.flatten(2)  # (B, Q, H*W)
        grad_embed = torch.zeros_like(embed) if ctx.needs_input_grad[0] else None
        grad_features = torch.empty_like(features) if ctx.needs_input_grad[1] else None
        rows = grad.any(-1)  # (B, Q): the queries the loss reached
        for b in range(batch):
            used = rows[b].nonzero().squeeze(1)
            if len(used) == 0:
                if grad_features is not None:
                    grad_features[b].zero_()
                continue
            grad_rows = grad[b].index_select(0, used)  # (n, H*W)
            if grad_embed is not None:
                grad_embed[b].index_copy_(0, used, grad_rows @ features[b].t())
            if grad_features is not None:
                torch.mm(embed[b].index_select(0, used).t(), grad_rows, out=grad_features[b])
        return grad_embed, None if grad_features is None else grad_features.view_as(mask_features)


def _attention_mask(embed: Tensor, level_mask_features: Tensor) -> Tensor:
    """``(B, 1, Q, h*w)``, one mask for all heads: True where the query's predicted mask (logit
    of ``embed (B, Q, C)`` on ``level_mask_features (B, C, h, w)``) is on. A query whose mask
    covers nothing would attend to nothing: it sees everything instead (as mmdet)."""
    with torch.no_grad():
        logits = torch.einsum("bqc,bchw->bqhw", embed, level_mask_features).flatten(2)
        # Written as mmdet's "masked where sigmoid < 0.5", negated, to treat NaN alike.
        attn_mask = ~(logits.sigmoid() < 0.5)
        attn_mask[~attn_mask.any(-1)] = True
    return attn_mask.unsqueeze(1)


def semantic_logits(class_logits: Tensor, mask_logits: Tensor, size: tuple[int, int]) -> Tensor:
    """Per-class scores: sum over queries of ``softmax(class)[:, :-1] * sigmoid(mask)``.

    Args:
        class_logits: ``(B, Q, K + 1)``.
        mask_logits: ``(B, Q, h, w)``, upsampled bilinearly to ``size`` before the sigmoid.
    Returns:
        ``(B, K, H, W)``.
    """
    masks = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False).sigmoid()
    scores = class_logits.softmax(-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", scores, masks)
