"""Tuning strategies: what learns in the backbone besides the head (the paper's comparisons).

Each strategy is one file here and one ``@register_strategy("name")`` (:mod:`.registry`):

- ``rein`` (the default): Rein after every block, its tokens linked to the head's queries.
- ``frozen``: nothing; the head learns its own queries. ``full``: the whole VFM.
- ``lora``: low-rank updates of the attention's projections (``peft``).
- ``vpt``: deep visual prompt tuning. ``adaptformer``: bottleneck adapters beside the MLPs.
- ``soma``: the minor singular components of the blocks' linear layers (SoMA), mergeable.
- ``fada``: FADA, Rein's refinement split by a Haar wavelet into low- and high-frequency branches.
- ``set``: SET, Rein's tokens on the FFT phase and amplitude of the features.

Every strategy works on every family of the zoo; where families differ (how prompts enter a
block: EVA's rotary prefix, SAM's windows) their adapters in :mod:`reinseg.families` say how.
"""

# Registration order is the order strategies are listed in (params --compare, benchmarks).
from . import rein, frozen, lora, vpt, adaptformer, soma  # noqa: F401, I001  (registers the built-in strategies)
from . import fada  # noqa: F401, I001  (FADA, NeurIPS 2024: Rein split into frequency bands)
from . import set as _set  # noqa: F401, I001  (SET, after the others: issue 15's successors of Rein)
from .adaptformer import AdaptFormerConfig, BottleneckAdapter, add_adaptformer
from .fada import FadaConfig
from .lora import LoraConfig, add_lora
from .registry import STRATEGIES, TuningStrategy, get_strategy, register_strategy, strategy_names
from .rein import ReinConfig
from .set import SetConfig
from .soma import SomaConfig
from .vpt import VisualPrompts, VptConfig, add_visual_prompts

__all__ = [
    "STRATEGIES",
    "TuningStrategy",
    "register_strategy",
    "get_strategy",
    "strategy_names",
    "ReinConfig",
    "SetConfig",
    "LoraConfig",
    "VptConfig",
    "AdaptFormerConfig",
    "FadaConfig",
    "SomaConfig",
    "VisualPrompts",
    "BottleneckAdapter",
    "add_lora",
    "add_adaptformer",
    "add_visual_prompts",
]
