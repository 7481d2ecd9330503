"""reinseg: Rein (CVPR 2024) for domain-generalized semantic segmentation with vision foundation models."""

from .backbones import BACKBONES, ReinBackbone, build_backbone, list_backbones
from .config import Config, ModelConfig, load_config
from .official import backbone_from_official, from_official
from .rein import Rein
from .build import build_segmentor
from .segmentor import Segmentor

__version__ = "0.1.0"

__all__ = [
    "Rein",
    "ReinBackbone",
    "build_backbone",
    "list_backbones",
    "BACKBONES",
    "Segmentor",
    "build_segmentor",
    "from_official",
    "backbone_from_official",
    "Config",
    "ModelConfig",
    "load_config",
    "__version__",
]
