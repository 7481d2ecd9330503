"""Mask2Former's transformer decoder: masked cross-attention -> self-attention -> FFN, post-norm.

Named as mmdet's ``Mask2FormerTransformerDecoder`` (``layers.N.{cross_attn,self_attn}.attn``,
``layers.N.ffn``, ``layers.N.norms``, ``post_norm``) so its weights map one to one.
"""

from __future__ import annotations

from torch import Tensor, nn

from .pixel_decoder import FFN

__all__ = ["Attention", "DecoderLayer", "TransformerDecoder"]


class Attention(nn.Module):
    """Multi-head attention with positional encodings added to queries and keys, and a residual."""

    def __init__(self, embed_dims: int, num_heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(embed_dims, num_heads, batch_first=True)

    def forward(
        self, query: Tensor, key: Tensor, query_pos: Tensor, key_pos: Tensor, attn_mask: Tensor | None = None
    ) -> Tensor:
        out = self.attn(query + query_pos, key + key_pos, key, attn_mask=attn_mask, need_weights=False)[0]
        return query + out


class DecoderLayer(nn.Module):
    """One decoder layer; ``attn_mask`` ``(B * heads, Q, h*w)`` is True where a query may not look."""

    def __init__(self, embed_dims: int, num_heads: int, ffn_dims: int) -> None:
        super().__init__()
        self.self_attn = Attention(embed_dims, num_heads)
        self.cross_attn = Attention(embed_dims, num_heads)
        self.ffn = FFN(embed_dims, ffn_dims)
        self.norms = nn.ModuleList([nn.LayerNorm(embed_dims) for _ in range(3)])

    def forward(
        self, query: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor, attn_mask: Tensor
    ) -> Tensor:
        query = self.norms[0](self.cross_attn(query, memory, query_pos, memory_pos, attn_mask))
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
