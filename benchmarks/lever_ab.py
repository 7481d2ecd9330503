"""One training lever against another (none by default), in one process: paired train steps, alternating.

Builds the segmentor twice from the same seed (random weights of the real architecture), sets
``--against`` (default ``none``) on the first and ``--lever`` on the second (``benchmarks/levers.py``
names both), and runs their train steps (forward, loss, backward; no optimizer step)
alternately, swapping the order every round so that both see the same machine state. Prints each
round's seconds, the medians, the median of the per-round ratios (lever / against; on this kind
of shared CPU two medians from separate processes move by several per cent), and, from the first
round, both losses and the worst gradient difference relative to the gradient's largest entry.
The loss's point sampling is seeded alike in both, but its importance sampling picks points by
rank: rounding differences of 1e-6 in the masks may pick other points, which moves a gradient by
far more than the rounding itself (``tests/test_train_options.py`` compares the levers' outputs
and gradients through a fixed function instead).

    OMP_NUM_THREADS=1 python benchmarks/lever_ab.py --lever channels_last=true --threads 1
    python benchmarks/lever_ab.py --backbone resnet50_v1c --lever channels_last=true
    python benchmarks/lever_ab.py --device cuda --backbone resnet50_v1c --batch 4 \
        --against precision=bf16-mixed --lever "bf16-mixed + channels_last"
"""

from __future__ import annotations

import argparse
import statistics

import torch
from levers import LEVERS, apply_lever
from strategies import build_on, machine, model_config, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lever", required=True, choices=list(LEVERS))
    parser.add_argument("--against", default="none", choices=list(LEVERS))
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2, help="rounds run first and not counted")
    args = parser.parse_args()
    if args.rounds < 1 or args.warmup < 0:
        parser.error(f"--rounds must be at least 1 and --warmup at least 0 (got {args.rounds}, {args.warmup})")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models, autocast = [], []
    for lever in (args.against, args.lever):
        torch.manual_seed(0)
        config = model_config(args.backbone, "rein", args.img_size)
        config.loss.num_points = 12544
        models.append(build_on(device, config).train())
        autocast.append(apply_lever(models[-1], lever))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=generator).to(device)
    labels = torch.randint(0, 19, (args.batch, args.img_size, args.img_size), generator=generator).to(device)

    def train_step(k: int) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast[k]):
            loss = models[k].loss(images, labels)["loss"]
        loss.backward()
        return loss

    def step(k: int, compared: bool):
        """Seconds, loss and (in the round that compares them) the gradients of model ``k``'s step."""
        torch.manual_seed(5)  # the loss's point sampling
        seconds, loss = timed(device, lambda: train_step(k))
        grads = {}
        if compared:
            grads = {n: p.grad.float().clone() for n, p in models[k].named_parameters() if p.grad is not None}
        models[k].zero_grad(set_to_none=True)
        return seconds, loss.item(), grads

    print(f"# {machine(args.device)}; {args.backbone} + Rein + Mask2Former, {args.img_size} px, batch {args.batch}")
    print(f"# against: {args.against}; lever: {args.lever} ({LEVERS[args.lever][2]})")
    seconds: list[list[float]] = [[], []]
    for round_ in range(args.warmup + args.rounds):
        found = {k: step(k, compared=round_ == 0) for k in ((0, 1) if round_ % 2 == 0 else (1, 0))}
        if round_ == 0:
            (_, loss, grads), (_, loss_lever, grads_lever) = found[0], found[1]
            differences = {
                n: ((grads_lever[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)).item() for n, g in grads.items()
            }
            worst = max(differences, key=differences.get)
            print(
                f"loss: against {loss:.6f}, lever {loss_lever:.6f}; worst relative gradient difference "
                f"{differences[worst]:.2e} ({worst})"
            )
        counted = round_ >= args.warmup
        label = f"round {round_}{'' if counted else ' (warm-up)'}"
        print(f"{label}: against {found[0][0]:.3f} s, lever {found[1][0]:.3f} s")
        if counted:
            for k in (0, 1):
                seconds[k].append(found[k][0])
    ratios = [b / a for a, b in zip(*seconds, strict=True)]
    print(
        f"median: against {statistics.median(seconds[0]):.3f} s, lever {statistics.median(seconds[1]):.3f} s; "
        f"lever / against (median of the rounds' ratios) {statistics.median(ratios):.3f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f})"
    )


if __name__ == "__main__":
    main()
