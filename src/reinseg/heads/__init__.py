"""Segmentation heads: Mask2Former driven by Rein's queries, and its training loss."""

from .mask2former import Mask2FormerHead, semantic_logits
from .registry import HEADS, get_head, register_head

__all__ = ["HEADS", "Mask2FormerHead", "get_head", "register_head", "semantic_logits"]
