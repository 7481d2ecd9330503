"""reinseg: Rein (CVPR 2024) for domain-generalized semantic segmentation with vision foundation models."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

# Public name -> the module defining it. They are imported on first use, so that `reinseg --help`
# and the data tools do not pay for importing torch and timm.
_EXPORTS = {
    "Rein": ".rein",
    "ReinBackbone": ".backbones",
    "build_backbone": ".backbones",
    "list_backbones": ".backbones",
    "BACKBONES": ".backbones",
    "Segmentor": ".segmentor",
    "build_segmentor": ".build",
    "from_official": ".official",
    "backbone_from_official": ".official",
    "Config": ".config",
    "ModelConfig": ".config",
    "load_config": ".config",
    "keep_freed_memory": ".allocator",
}

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
    "keep_freed_memory",
    "__version__",
]

if TYPE_CHECKING:
    from .allocator import keep_freed_memory
    from .backbones import BACKBONES, ReinBackbone, build_backbone, list_backbones
    from .build import build_segmentor
    from .config import Config, ModelConfig, load_config
    from .official import backbone_from_official, from_official
    from .rein import Rein
    from .segmentor import Segmentor


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
