"""The training levers the benchmarks compare (``vs_official.py --levers``, ``memory.py``,
``strategies.py train --levers``, ``lever_ab.py``): ``train`` options of :mod:`reinseg.train_options` plus bf16
autocast (``train.precision=bf16-mixed``), and the numbers each one changes."""

from __future__ import annotations

LEVERS: dict[str, tuple[dict, bool, str]] = {
    "none": (dict(), False, "the reference (fp32, deformable and encoder FFN recompute on, CSR sampling on the CPU)"),
    "deformable_recompute=false": (dict(deformable_recompute=False), False, "none"),
    "deformable_kernel=grid_sample": (
        dict(deformable_kernel="grid_sample"),
        False,
        "none (the reference sampling; float rounding)",
    ),
    "activation_checkpointing=true": (dict(activation_checkpointing=True), False, "none (the same fp32 ops again)"),
    "pixel_decoder_checkpointing=true": (
        dict(pixel_decoder_checkpointing=True),
        False,
        "none (the same fp32 ops again)",
    ),
    "encoder_ffn_recompute=false": (
        dict(encoder_ffn_recompute=False),
        False,
        "none (the FFNs keep their hidden activations: the default before 2026-12-04)",
    ),
    "both checkpointings": (
        dict(activation_checkpointing=True, pixel_decoder_checkpointing=True),
        False,
        "none (the same fp32 ops again)",
    ),
    "frozen_dtype=bfloat16": (dict(frozen_dtype="bfloat16"), False, "the frozen blocks in bf16"),
    "frozen bf16 + checkpointing": (
        dict(frozen_dtype="bfloat16", activation_checkpointing=True),
        False,
        "the frozen blocks in bf16",
    ),
    "precision=bf16-mixed": (dict(), True, "matmuls, convolutions, attention in bf16 (autocast)"),
    "bf16-mixed + frozen bf16": (dict(frozen_dtype="bfloat16"), True, "both of the above"),
    "bf16-mixed + frozen bf16 + checkpointing": (
        dict(frozen_dtype="bfloat16", activation_checkpointing=True),
        True,
        "both of the above",
    ),
    "bf16-mixed + frozen bf16 + both checkpointings": (
        dict(frozen_dtype="bfloat16", activation_checkpointing=True, pixel_decoder_checkpointing=True),
        True,
        "both of the above",
    ),
    "channels_last=true": (dict(channels_last=True), False, "convolutions sum in another order (about 1e-6)"),
    "bf16-mixed + channels_last": (dict(channels_last=True), True, "bf16 autocast; convolutions in NHWC"),
    "compile=true": (dict(compile=True), False, "inductor's fused kernels: sums in another order"),
}


def apply_lever(segmentor, lever: str, tuning: str = "rein") -> bool:
    """Set ``lever``'s train options on ``segmentor`` (built with ``model.tuning=tuning``);
    returns whether its steps run under bf16 autocast."""
    from reinseg.config import Config, ModelConfig, TrainConfig, check_values
    from reinseg.train_options import apply_train_options

    options, autocast, _ = LEVERS[lever]
    config = check_values(Config(model=ModelConfig(tuning=tuning), train=TrainConfig(**options)))
    apply_train_options(segmentor, config)
    return autocast
