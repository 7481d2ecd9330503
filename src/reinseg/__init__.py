"""reinseg: Rein (CVPR 2024) for domain-generalized semantic segmentation with vision foundation models."""

from .backbones import BACKBONES, ReinBackbone, build_backbone, list_backbones
from .rein import Rein

__version__ = "0.1.0"

__all__ = ["Rein", "ReinBackbone", "build_backbone", "list_backbones", "BACKBONES", "__version__"]
