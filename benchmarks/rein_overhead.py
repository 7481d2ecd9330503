"""What Rein costs on top of a frozen backbone: one training step's backbone work.

For each backbone (random weights, the real architecture) it times, at the given resolution:

- ``frozen``: the frozen backbone's forward (no graph: with a frozen VFM only the head trains, so
  the backbone is never backpropagated);
- ``rein fwd``: the forward with Rein, no graph (inference: Rein's delta MLP folded,
  :meth:`reinseg.Rein._folded_refinement`);
- ``rein``: forward + backward with Rein after every block (gradients flow back through all blocks
  to reach the tokens);
- ``full``: forward + backward of the whole backbone fine-tuned, for reference.

``frozen`` and ``rein fwd`` run the same model (its Rein detached for ``frozen``), alternating
step by step, so that both see the same machine state; ``Rein fwd / frozen`` is the median of the
per-pair ratios (on a shared or frequency-scaling CPU the two medians alone move apart by several
per cent from run to run). Prints the median times and the ratios to ``frozen``, with peak memory
on CUDA.

    python benchmarks/rein_overhead.py                          # ViT-S/B at 512 px on CPU
    python benchmarks/rein_overhead.py --device cuda --batch 4 --backbones dinov2_vitl14
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from reinseg import build_backbone


def _loss(out) -> torch.Tensor:
    features, queries = out
    loss = sum(f.float().square().mean() for f in features)
    return loss if queries is None else loss + queries.float().square().mean()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_step(backbone, images, repeats: int, warmup: int) -> tuple[float, float]:
    """Median seconds per forward + backward step (``rein``, ``full``) and peak memory
    (MiB, CUDA only)."""
    cuda = images.device.type == "cuda"
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + repeats):
        _synchronize(images.device)
        start = time.perf_counter()
        _loss(backbone(images)).backward()
        backbone.zero_grad(set_to_none=True)
        _synchronize(images.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return statistics.median(times), peak


@torch.no_grad()
def time_forwards(backbone, images, repeats: int, warmup: int) -> tuple[float, float, float, float, float]:
    """The frozen forward and the forward with Rein of one backbone, alternating (ABBA order):
    median seconds of each, the median of the per-pair ratios Rein / frozen, and peak memory
    (MiB, CUDA only) of each."""
    rein = backbone.rein
    cuda = images.device.type == "cuda"
    times: dict[bool, list[float]] = {False: [], True: []}
    peaks = {False: float("nan"), True: float("nan")}
    for i in range(warmup + repeats):
        for with_rein in (False, True) if i % 2 == 0 else (True, False):
            backbone.rein = rein if with_rein else None
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            _synchronize(images.device)
            start = time.perf_counter()
            _loss(backbone(images))
            _synchronize(images.device)
            if i >= warmup:
                times[with_rein].append(time.perf_counter() - start)
            if cuda:
                peaks[with_rein] = torch.cuda.max_memory_allocated() / 2**20
    backbone.rein = rein
    ratio = statistics.median(r / f for f, r in zip(times[False], times[True], strict=True))
    return statistics.median(times[False]), statistics.median(times[True]), ratio, peaks[False], peaks[True]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["dinov2_vits14", "dinov2_vitb14"])
    parser.add_argument("--img-size", type=int, default=512)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cpu = _cpu_name()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu}, {torch.get_num_threads()} threads"
    print(
        f"# {where}; torch {torch.__version__}; {args.img_size} px, patch {args.patch_size}, batch {args.batch}, "
        f"median of {args.repeats}"
    )
    print(
        "| backbone | frozen fwd (s) | Rein fwd (s) | Rein fwd+bwd (s) | full FT fwd+bwd (s) "
        "| Rein fwd / frozen | Rein fwd+bwd / frozen | full / frozen |"
        + (" peak MiB frozen / Rein / full |" if device.type == "cuda" else "")
    )
    print("|---|---|---|---|---|---|---|---|" + ("---|" if device.type == "cuda" else ""))
    for name in args.backbones:
        torch.manual_seed(0)
        images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
        with device:  # initialised on the device (a 7B ViT's initialisation on the CPU takes minutes)
            backbone = build_backbone(name, img_size=args.img_size, patch_size=args.patch_size, rein={}).to(device)
        backbone.train()
        frozen, infer, infer_ratio, mf, _ = time_forwards(backbone, images, args.repeats, args.warmup)
        rein, mr = time_step(backbone, images, args.repeats, args.warmup)
        del backbone
        with device:
            backbone = build_backbone(name, img_size=args.img_size, patch_size=args.patch_size).to(device)
        backbone.freeze_backbone = False
        backbone.vit.requires_grad_(True)
        backbone.train()
        full, mfull = time_step(backbone, images, args.repeats, args.warmup)
        del backbone
        row = (
            f"| {name} | {frozen:.3f} | {infer:.3f} | {rein:.3f} | {full:.3f} | {infer_ratio:.3f} "
            f"| {rein / frozen:.2f} | {full / frozen:.2f} |"
        )
        if device.type == "cuda":
            row += f" {mf:.0f} / {mr:.0f} / {mfull:.0f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
