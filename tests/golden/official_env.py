"""Import the official Rein code in the official environment (see ../shared/golden/README.md).

``import official_env`` (from a script in this folder) puts the official repository on the path
(the script's first argument, default /work/official), stands in for what this CPU environment
lacks (compiled mmcv ops, the CLIP tokenizer's packages, xformers), registers mmseg's modules and
the official Rein ones, and gives ``MODELS``, mmseg's model registry.
"""

import sys
import types

sys.path.insert(0, sys.argv[1] if len(sys.argv) > 1 else "/work/official")


class _NoOps(types.ModuleType):
    """Compiled mmcv ops are absent; the CPU code paths used here never call them."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*args, **kwargs):
            raise RuntimeError(f"{self.__name__}.{name} is not available")

        return missing


sys.modules["mmcv._ext"] = _NoOps("mmcv._ext")
# mmseg's CLIP tokenizer needs ftfy and regex at import; it is not used here.
sys.modules["mmseg.utils.tokenizer"] = _NoOps("mmseg.utils.tokenizer")
# The official EVA02 module imports xformers at import time (used only with xattn=True); empty
# modules keep the DINOv2 layers' own `from xformers.ops import ...` failing as without xformers.
sys.modules["xformers"] = types.ModuleType("xformers")
sys.modules["xformers.ops"] = types.ModuleType("xformers.ops")

from mmseg.registry import MODELS
from mmseg.utils import register_all_modules

register_all_modules()
import rein  # noqa: F401  (registers the Rein backbones and head)

__all__ = ["MODELS"]
