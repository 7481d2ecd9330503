"""The paper's comparisons as benchmarks: parameters, train-step cost and inference speed per strategy.

    python benchmarks/strategies.py params                 # every zoo backbone x every strategy (meta device)
    python benchmarks/strategies.py train                  # CPU: ViT-S, 512 px, batch 2, one process per strategy
    python benchmarks/strategies.py train --device cuda --backbone dinov2_vitl14 --batch 4 --precision 32 bf16
    python benchmarks/strategies.py slide --device cuda    # sliding-window inference on 512x1024 images
    python benchmarks/strategies.py train --device cuda --strategies rein --levers none frozen_dtype=bfloat16

``train`` runs every strategy in a fresh process, so that each one's peak memory is its own (peak
resident memory on CPU, peak allocated memory on CUDA), and reports the median train-step time
(forward, loss, backward, optimizer step of the whole segmentor: VFM + tuning + Mask2Former head)
and both as ratios to the frozen backbone. Weights are random: speed and memory do not depend on
them. ``--levers`` repeats the table once per training lever (``benchmarks/levers.py``: ``train``
options such as activation checkpointing, the frozen VFM in bf16, compile).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from levers import LEVERS, apply_lever

from reinseg.backbones import backbone_kind, list_backbones
from reinseg.build import build_segmentor
from reinseg.config import BackboneConfig, ModelConfig
from reinseg.tuning import STRATEGIES, strategy_names


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def model_config(backbone: str, tuning: str, img_size: int = 512) -> ModelConfig:
    return ModelConfig(tuning=tuning, backbone=BackboneConfig(name=backbone, img_size=img_size, patch_size=16))


def trainable_in_backbone(segmentor) -> int:
    return sum(p.numel() for n, p in segmentor.named_parameters() if p.requires_grad and n.startswith("backbone."))


def cmd_params(args) -> None:
    print(
        f"Trainable backbone parameters (M) at {args.img_size} px, patch 16, built on the meta device "
        "(the head adds about 20.6 M for every strategy).\n"
    )
    # The VFM's size (a strategy that trains all of it), then each strategy adding its own modules.
    trains_all = next(name for name, s in STRATEGIES.items() if s.trains_vfm)
    adding = [name for name, s in STRATEGIES.items() if not s.trains_vfm and s.options_class is not None]
    print("| backbone | VFM total | " + " | ".join(adding) + " |")
    print("|---|---|" + "---|" * len(adding))
    for name in list_backbones():
        if backbone_kind(name) != "vit":
            continue  # the token strategies are ViT-only; CNN counts: reinseg params configs/rein_resnet50_gta_512.yaml
        cells = []
        total = None
        for tuning in (trains_all, *adding):
            with torch.device("meta"):
                segmentor = build_segmentor(model_config(name, tuning, args.img_size), load_backbone_weights=False)
            if tuning == trains_all:
                total = trainable_in_backbone(segmentor)
            else:
                cells.append(f"{trainable_in_backbone(segmentor) / 1e6:.2f}")
        print(f"| {name} | {total / 1e6:.1f} | " + " | ".join(cells) + " |", flush=True)


def measure_training(args) -> dict:
    """One strategy, in this process: median step time and peak memory."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = model_config(args.backbone, args.child, args.img_size)
    config.loss.num_points = 12544
    segmentor = build_segmentor(config, load_backbone_weights=False).to(device).train()
    if apply_lever(segmentor, args.lever, args.child) and args.precision == "32":
        args.precision = "bf16"  # the lever is bf16 autocast
    params = [p for p in segmentor.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 19, (args.batch, args.img_size, args.img_size), device=device)
    dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[args.precision]
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(args.warmup + args.steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = segmentor.loss(images, labels)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "strategy": args.child,
        "step_s": statistics.median(times),
        "peak_mib": peak,
        "trainable": sum(p.numel() for p in params),
    }


def cmd_train(args) -> None:
    print(
        f"# {machine(args.device)}; {args.backbone} at {args.img_size} px, batch {args.batch}, "
        f"median of {args.steps} steps after {args.warmup} warm-up, one process per strategy"
    )
    memory = "peak allocated (MiB)" if args.device.startswith("cuda") else "peak resident (MiB)"
    for precision in args.precision:
        rows = []
        for strategy, lever in [(strategy, lever) for lever in args.levers for strategy in args.strategies]:
            command = [
                sys.executable,
                __file__,
                "train",
                "--child",
                strategy,
                "--backbone",
                args.backbone,
                "--img-size",
                str(args.img_size),
                "--batch",
                str(args.batch),
                "--device",
                args.device,
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--precision",
                precision,
                "--levers",
                lever,
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            label = strategy if lever == "none" else f"{strategy}, {lever}"
            if done.returncode != 0:
                rows.append({"strategy": label, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
                continue
            rows.append({**json.loads(done.stdout.strip().splitlines()[-1]), "strategy": label})
        base = next((r for r in rows if r["strategy"] == "frozen" and "error" not in r), None)
        print(f"\nprecision {precision}\n")
        print(f"| strategy | trainable | step (s) | images/s | {memory} | step / frozen | memory / frozen |")
        print("|---|---|---|---|---|---|---|")
        for row in rows:
            if "error" in row:
                print(f"| {row['strategy']} | failed: {row['error']} | | | | | |")
                continue
            ratio_t = f"{row['step_s'] / base['step_s']:.2f}" if base else "-"
            ratio_m = f"{row['peak_mib'] / base['peak_mib']:.2f}" if base else "-"
            print(
                f"| {row['strategy']} | {row['trainable'] / 1e6:.2f} M | {row['step_s']:.3f} | "
                f"{args.batch / row['step_s']:.2f} | {row['peak_mib']:.0f} | {ratio_t} | {ratio_m} |",
                flush=True,
            )


@torch.no_grad()
def cmd_slide(args) -> None:
    device = torch.device(args.device)
    print(
        f"# {machine(args.device)}; {args.backbone} + Rein + head, sliding window 512 / stride 341 on "
        f"{args.height}x{args.width} images, batch 1, median of {args.steps} after {args.warmup} warm-up"
    )
    config = model_config(args.backbone, "rein", 512)
    config.test.mode = "slide"
    segmentor = build_segmentor(config, load_backbone_weights=False).to(device).eval()
    image = torch.randn(1, 3, args.height, args.width, device=device)
    for precision in args.precision:
        dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[precision]
        times = []
        for step in range(args.warmup + args.steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                segmentor.predict(image)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        median = statistics.median(times)
        print(f"precision {precision}: {median:.3f} s per image, {1 / median:.2f} images/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params")
    p.add_argument("--img-size", type=int, default=512)
    p.set_defaults(func=cmd_params)
    for name, func in (("train", cmd_train), ("slide", cmd_slide)):
        p = sub.add_parser(name)
        p.add_argument("--backbone", default="dinov2_vits14")
        p.add_argument("--img-size", type=int, default=512)
        p.add_argument("--batch", type=int, default=2)
        p.add_argument("--device", default="cpu")
        p.add_argument("--steps", type=int, default=3)
        p.add_argument("--warmup", type=int, default=1)
        p.add_argument("--precision", nargs="+", default=["32"], choices=["32", "bf16", "16"])
        p.add_argument("--strategies", nargs="+", default=list(strategy_names()), choices=strategy_names())
        p.add_argument("--height", type=int, default=512)
        p.add_argument("--width", type=int, default=1024)
        p.add_argument("--levers", nargs="+", default=["none"], choices=list(LEVERS))
        p.add_argument("--child", default=None, help=argparse.SUPPRESS)
        p.set_defaults(func=func)
    args = parser.parse_args()
    if getattr(args, "child", None):
        args.precision, args.lever = args.precision[0], args.levers[0]
        print(json.dumps(measure_training(args)))
        return
    args.func(args)


if __name__ == "__main__":
    main()
