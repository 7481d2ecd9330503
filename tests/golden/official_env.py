"""Import the official Rein code in the official environment (see tests/data/README.md).

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

from mmseg.registry import MODELS  # noqa: E402  (after the stand-ins above)
from mmseg.utils import register_all_modules  # noqa: E402

register_all_modules()
import rein  # noqa: E402, F401  (registers the Rein backbones and head)

__all__ = ["MODELS", "build_perturbed"]


def build_perturbed(config: dict, seed: int = 0):
    """The official module ``config`` describes, built after ``torch.manual_seed(seed)``, every
    parameter then perturbed with ``randn * 0.1`` so that no weight is trivial."""
    import copy

    import torch

    torch.manual_seed(seed)
    model = MODELS.build(copy.deepcopy(config))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model
