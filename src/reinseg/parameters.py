"""Parameter counting: how much of a model is frozen, how much Rein and the head add."""

from __future__ import annotations

from torch import nn

__all__ = ["count_parameters", "format_parameter_table"]


def count_parameters(module: nn.Module | None) -> tuple[int, int]:
    """``(total, trainable)`` parameter counts of ``module`` (0, 0 for None)."""
    if module is None:
        return 0, 0
    params = list(module.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def format_parameter_table(components: dict[str, nn.Module | None]) -> str:
    """A table of total and trainable parameters per component, with a total row.

    The trainable share is given against all parameters of the model.
    """
    rows = [(name, *count_parameters(module)) for name, module in components.items() if module is not None]
    total = sum(r[1] for r in rows)
    trainable = sum(r[2] for r in rows)
    rows.append(("total", total, trainable))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'component':<{width}}  {'parameters':>15}  {'trainable':>13}  {'trainable %':>11}"]
    for name, count, train in rows:
        share = 100.0 * train / total if total else 0.0
        if name == "total":
            lines.append("-" * len(lines[0]))
        lines.append(f"{name:<{width}}  {count:>15,}  {train:>13,}  {share:>10.2f}%")
    return "\n".join(lines)


def format_strategy_table(rows: list[tuple[str, int, int, int]]) -> str:
    """Trainable parameters per tuning strategy: rows of (strategy, trainable in the backbone,
    head parameters, all parameters of the model)."""
    lines = [f"{'strategy':<12}  {'trainable in backbone':>26}  {'head':>12}  {'trainable':>12}  {'of all':>7}"]
    lines.append("-" * len(lines[0]))
    for strategy, backbone, head, total in rows:
        trainable = backbone + head
        lines.append(
            f"{strategy:<12}  {backbone:>15,} ({backbone / 1e6:7.2f} M)  {head:>12,}  {trainable:>12,}  "
            f"{100 * trainable / total:6.2f}%"
        )
    return "\n".join(lines)
