"""Mask2Former's transformer decoder: masked cross-attention -> self-attention -> FFN, post-norm.

Named as mmdet's ``Mask2FormerTransformerDecoder`` (``layers.N.{cross_attn,self_attn}.attn``,
``layers.N.ffn``, ``layers.N.norms``, ``post_norm``) so its weights map one to one.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .pixel_decoder import FFN

__all__ = ["Attention", "DecoderLayer", "TransformerDecoder"]


class Attention(nn.Module):
    """Multi-head attention with positional encodings added to queries and keys, and a residual.

    The weights live in an ``nn.MultiheadAttention`` (``attn.in_proj_weight``, ``attn.out_proj``,
    as mmdet names them); the computation calls ``F.scaled_dot_product_attention`` directly so
    that a mask can be shared by all heads instead of being repeated for each.
    """

    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, batch_first=True)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        query_pos: Tensor,
        key_pos: Tensor,
        attn_mask: Tensor | None = None,
        key_with_pos: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: ``(B, Q, C)``; key: ``(B, K, C)`` (also the values); query_pos, key_pos: alike.
            attn_mask: boolean ``(B, 1, Q, K)`` (or ``(B, heads, Q, K)``), True where a query may look.
            key_with_pos: ``key + key_pos`` when the caller has it (layers attending to the same
                memory share one, which backward keeps once).
        Returns:
            ``(B, Q, C)``, residual included.
        """
        attn = self.attn
        batch, num_queries, channels = query.shape
        heads = attn.num_heads
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)

        def split_heads(x: Tensor) -> Tensor:  # (B, n, C) -> (B, heads, n, C / heads)
            return x.view(batch, x.shape[1], heads, -1).transpose(1, 2)

        q = split_heads(F.linear(query + query_pos, w_q, b_q))
        k = split_heads(F.linear(key + key_pos if key_with_pos is None else key_with_pos, w_k, b_k))
        v = split_heads(F.linear(key, w_v, b_v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(batch, num_queries, channels)
        return query + attn.out_proj(out)


class DecoderLayer(nn.Module):
    """One decoder layer; ``attn_mask`` ``(B, 1, Q, h*w)`` is True where a query may look."""

    def __init__(self, embed_dims: int, num_heads: int, ffn_dims: int) -> None:
        super().__init__()
        self.self_attn = Attention(embed_dims, num_heads)
        self.cross_attn = Attention(embed_dims, num_heads)
        self.ffn = FFN(embed_dims, ffn_dims)
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])

    def forward(
        self,
        query: Tensor,
        query_pos: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        attn_mask: Tensor,
        memory_with_pos: Tensor | None = None,
    ) -> Tensor:
        query = self.norms[0](self.cross_attn(query, memory, query_pos, memory_pos, attn_mask, memory_with_pos))
        query = self.norms[1](self.self_attn(query, query, query_pos, query_pos))
        return self.norms[2](self.ffn(query))


class TransformerDecoder(nn.Module):
    def __init__(self, num_layers: int, embed_dims: int, num_heads: int, ffn_dims: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.layers = nn.ModuleList([DecoderLayer(embed_dims, num_heads, ffn_dims) for _ in range(num_layers)])
        self.post_norm = nn.LayerNorm(embed_dims)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)
