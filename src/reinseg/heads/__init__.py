"""Segmentation heads: Mask2Former driven by Rein's queries, and its training loss."""

from .mask2former import Mask2FormerHead, semantic_logits

__all__ = ["Mask2FormerHead", "semantic_logits"]
