"""The paper's comparisons as benchmarks: parameters, train-step cost and inference speed per strategy.

    python benchmarks/strategies.py params                 # every zoo backbone x every strategy (meta device)
    python benchmarks/strategies.py train                  # CPU: ViT-S, 512 px, batch 2, one process per strategy
    python benchmarks/strategies.py train --device cuda --backbone dinov2_vitl14 --batch 4 --precision 32 bf16
    python benchmarks/strategies.py slide --device cuda    # sliding-window inference on 512x1024 images
    python benchmarks/strategies.py train --device cuda --strategies rein --levers none frozen_dtype=bfloat16
    python benchmarks/strategies.py synthetic --output /tmp/reinseg-strategies   # the demo's benchmark per strategy

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
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from levers import LEVERS, apply_lever

from reinseg.backbones import backbone_kind, list_backbones
from reinseg.build import build_segmentor, plan_segmentor
from reinseg.config import BackboneConfig, Config, ModelConfig
from reinseg.data import label_values
from reinseg.optim import build_optimizer
from reinseg.tuning import STRATEGIES, strategy_names

SEGMENTS = {
    "host": "the labels' values found on the host, as the training loader gives them",
    "device": "the batch's classes found on the device and read back (a wait after the forward)",
}


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
    patch_size = 16 if backbone_kind(backbone) == "vit" else None  # a CNN has none
    return ModelConfig(tuning=tuning, backbone=BackboneConfig(name=backbone, img_size=img_size, patch_size=patch_size))


def timed(device: torch.device, run):
    """``run()``'s wall seconds (a GPU's queue drained before and after) and what it returned."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def build_on(device: torch.device, config: ModelConfig):
    """The segmentor with random weights, initialised on ``device`` itself (a 7B ViT's
    initialisation on the CPU would take minutes before it reached a GPU). cuDNN's algorithm
    search as `reinseg train` sets it (train.cudnn_benchmark)."""
    torch.backends.cudnn.benchmark = Config().train.cudnn_benchmark
    with device:
        segmentor = build_segmentor(config, load_backbone_weights=False)
    return segmentor.to(device)  # anything built outside the device context


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
            segmentor = plan_segmentor(model_config(name, tuning, args.img_size))
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
    segmentor = build_on(device, config).train()
    if apply_lever(segmentor, args.lever, args.child) and args.precision == "32":
        args.precision = "bf16"  # the lever is bf16 autocast
    params = [p for p in segmentor.parameters() if p.requires_grad]
    # The trainer's optimizer (its parameter groups; fused AdamW on a CPU or GPU), as `reinseg train` runs it.
    optimizer, _ = build_optimizer(segmentor, Config(model=config))
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 19, (args.batch, args.img_size, args.img_size))
    # Each label's values found on the host, as the training loader's workers find them; with
    # --segments device the loss reads the classes back from the device instead.
    values = [label_values(label) for label in labels] if args.segments == "host" else None
    labels = labels.to(device)
    dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[args.precision]
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def train_step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = segmentor.loss(images, labels, label_values=values)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for step in range(args.warmup + args.steps):
        seconds, _ = timed(device, train_step)
        if step >= args.warmup:
            times.append(seconds)
    host_waits = None
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
        host_waits = count_host_waits(train_step)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "strategy": args.child,
        "step_s": statistics.median(times),
        "peak_mib": peak,
        "trainable": sum(p.numel() for p in params),
        "host_waits": host_waits,
    }


def count_host_waits(step) -> int:
    """The operations of one ``step()`` (forward, loss, backward, optimizer) that make the host
    wait for the GPU as CUDA's sync debug mode flags them (``.item()``, copies between host and
    device, ``nonzero``, ``unique``...): a lower bound, since it does not see every kind of wait
    (``torch.cuda.synchronize``, the caching allocator's), nor Lightning's loop around the step.
    reinseg's tests count them on the CPU by another route (``tests/test_segmentor.py``: one
    wait per batch and one for the assignments of all predictions, each of one to three such
    operations)."""
    before = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(before)
    return sum("synchroniz" in str(w.message) for w in caught)


def cmd_train(args) -> None:
    print(
        f"# {machine(args.device)}; {args.backbone} at {args.img_size} px, batch {args.batch}, "
        f"median of {args.steps} steps after {args.warmup} warm-up, one process per strategy; "
        + SEGMENTS[args.segments]
    )
    memory = "peak allocated (MiB)" if args.device.startswith("cuda") else "peak resident (MiB)"
    # The frozen VFM first (the ratios' base), and each row printed when its process ends: a run
    # stopped midway (gpu.sh's time budget) keeps the rows it finished.
    strategies = sorted(args.strategies, key=lambda name: name != "frozen")
    for precision in args.precision:
        autocast_levers = [lever for lever in args.levers if LEVERS[lever][1]]
        note = f" ({', '.join(autocast_levers)}: bf16 autocast, the lever's own)" if autocast_levers else ""
        print(f"\nprecision {precision}{note}\n")
        print(
            f"| strategy | trainable | step (s) | images/s | {memory} | step / frozen | memory / frozen "
            "| host waits / step |"
        )
        print("|---|---|---|---|---|---|---|---|", flush=True)
        base, failures = None, []
        for strategy, lever in [(strategy, lever) for lever in args.levers for strategy in strategies]:
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
                "--segments",
                args.segments,
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            label = strategy if lever == "none" else f"{strategy}, {lever}"
            if done.returncode != 0:
                print(f"| {label} | failed: {child_error(done.stderr)} | | | | | | |", flush=True)
                failures.append((label, done.stderr))
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            if label == "frozen":
                base = row
            ratio_t = f"{row['step_s'] / base['step_s']:.2f}" if base else "-"
            ratio_m = f"{row['peak_mib'] / base['peak_mib']:.2f}" if base else "-"
            print(
                f"| {label} | {row['trainable'] / 1e6:.2f} M | {row['step_s']:.3f} | "
                f"{args.batch / row['step_s']:.2f} | {row['peak_mib']:.0f} | {ratio_t} | {ratio_m} | "
                f"{'-' if row['host_waits'] is None else row['host_waits']} |",
                flush=True,
            )
        print_failures(failures)


_EXCEPTION_LINE = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")


def child_error(stderr: str) -> str:
    """The exception a child process died of, for a table cell: the last line of ``stderr`` that
    names an exception (``KeyError: ...``; compiler output and warnings may follow it), else its
    last line."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()] or ["?"]
    named = [line for line in lines if _EXCEPTION_LINE.match(line)]
    return (named or lines)[-1][:300].replace("|", "\\|")


def print_failures(failures: list[tuple[str, str]], tail: int = 40) -> None:
    """Each failed row's error after its table (a GPU session may have no second chance to see
    it): the end of the last traceback in its stderr, at most ``tail`` lines, then the lines
    that report an error (a compiler's ``error:``), at most 10; else the last ``tail`` lines."""
    for label, stderr in failures:
        lines = stderr.rstrip().splitlines()
        starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
        if starts:
            named = [i for i, line in enumerate(lines) if i > starts[-1] and _EXCEPTION_LINE.match(line.strip())]
            end = (named[-1] if named else len(lines) - 1) + 1
            shown = lines[max(starts[-1], end - tail) : end]
            shown += [line for line in lines[end:] if re.search(r"\berror\b", line)][:10]
        else:
            shown = lines[-tail:]
        print(f"\n<details><summary>{label}: its error ({len(shown)} lines of its stderr)</summary>\n")
        print("```\n" + "\n".join(shown) + "\n```\n</details>", flush=True)


def scale_to_demo(model) -> None:
    """Options sized for the demo's small ViT (6 blocks, 96 wide) instead of DINOv2-L: Rein's
    successors take the demo's Rein sizes (tokens, rank, query width); SoMA tunes the last two
    thirds of the blocks at Rein's rank, as the paper tunes blocks 8-23 of 24; FADA is tested in
    square windows."""
    options = getattr(model, model.tuning, None)
    for key in ("token_length", "lora_dim", "query_dims"):
        if options is not None and options is not model.rein and hasattr(options, key):
            setattr(options, key, getattr(model.rein, key))
    if model.tuning == "fada":
        # FADA's Haar split needs a square token grid (as its official code): the demo's 128x256
        # test images are scored in 128 windows (stride 85) instead of whole.
        model.test.mode, model.test.crop_size, model.test.stride = "slide", 128, 85
    if model.tuning == "soma":
        depth = model.backbone.timm_kwargs["depth"]
        model.soma.rank, model.soma.start_block = model.rein.lora_dim, depth // 3


def run_synthetic(args) -> dict:
    """One strategy, in this process: the demo's run (same data, seed, schedule, small ViT with
    random weights, Mask2Former head) with ``model.tuning`` set to the strategy."""
    import logging

    import lightning.pytorch as pl

    from reinseg.demo import demo_config
    from reinseg.engine import train

    class StepTimer(pl.Callback):
        """Wall and CPU seconds of each training step (forward, loss, backward, optimizer step)."""

        def __init__(self) -> None:
            self.wall: list[float] = []
            self.cpu: list[float] = []

        def on_train_batch_start(self, *_) -> None:
            self.start = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, *_) -> None:
            self.wall.append(time.perf_counter() - self.start[0])
            self.cpu.append(time.process_time() - self.start[1])

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    out = Path(args.output)
    config = demo_config(out / "data", out / args.child, max_iters=args.iters, seed=args.seed)
    config.model.tuning = args.child
    scale_to_demo(config.model)
    timer = StepTimer()
    task = train(config, resume="never", callbacks=[timer], overwrite=True)
    results = task.last_results
    warm = slice(min(10, len(timer.wall) - 1), None)  # the first steps pay for allocations
    return {
        "strategy": args.child,
        "trainable": sum(p.numel() for p in task.segmentor.parameters() if p.requires_grad),
        "mIoU": {domain: scores["mIoU"] for domain, scores in results["domains"].items()},
        "mean_unseen": results["mean_mIoU"],
        "step_s": statistics.median(timer.wall[warm]),
        "step_cpu_s": statistics.median(timer.cpu[warm]),
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def cmd_synthetic(args) -> None:
    from reinseg.data.synthetic import write_cityscapes_layout
    from reinseg.demo import SIZE

    out = Path(args.output)
    write_cityscapes_layout(
        out / "data", num_train=400, num_val=50, size=SIZE, seed=args.seed, workers=1, progress=False
    )
    rows = []
    for strategy in args.strategies:
        command = [sys.executable, __file__, "synthetic", "--child", strategy, "--output", str(out)]
        command += ["--iters", str(args.iters), "--seed", str(args.seed), "--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            rows.append({"strategy": strategy, "error": child_error(done.stderr)})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    (out / "strategies.json").write_text(json.dumps(rows, indent=2))
    domains = next((list(r["mIoU"]) for r in rows if "mIoU" in r), [])
    print(
        f"# {machine('cpu')}; the demo's benchmark (small ViT, random weights, {args.iters} iterations on "
        f"'{domains[0] if domains else '?'}', seed {args.seed}), one process per strategy\n"
    )
    print(
        "| strategy | trainable | "
        + " | ".join(domains)
        + " | mean unseen | step (s) | step CPU (s) | peak resident (MiB) |"
    )
    print("|---|---|" + "---|" * len(domains) + "---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['strategy']} | failed: {row['error']} |" + " |" * (len(domains) + 4))
            continue
        scores = " | ".join(f"{row['mIoU'][d]:.2f}" for d in domains)
        print(
            f"| {row['strategy']} | {row['trainable'] / 1e6:.3f} M | {scores} | {row['mean_unseen']:.2f} | "
            f"{row['step_s']:.3f} | {row['step_cpu_s']:.3f} | {row['peak_mib']:.0f} |"
        )


@torch.no_grad()
def cmd_slide(args) -> None:
    device = torch.device(args.device)
    print(
        f"# {machine(args.device)}; {args.backbone} + Rein + head, sliding window 512 / stride 341 on "
        f"{args.height}x{args.width} images, batch 1, median of {args.steps} after {args.warmup} warm-up; "
        "window batch: the windows run through the model at once (model.test.window_batch)"
    )
    config = model_config(args.backbone, "rein", 512)
    config.test.mode = "slide"
    segmentor = build_on(device, config).eval()
    image = torch.randn(1, 3, args.height, args.width, device=device)
    for precision in args.precision:
        dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[precision]
        scores = []  # each window batch's, from its last timed step
        for window_batch in args.window_batch:
            segmentor.window_batch = window_batch
            times = []
            for step in range(args.warmup + args.steps):
                with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                    seconds, result = timed(device, lambda: segmentor.predict(image))
                if step >= args.warmup:
                    times.append(seconds)
            scores.append(result.float())
            median = statistics.median(times)
            print(
                f"precision {precision}, window batch {window_batch}: {median:.3f} s per image, "
                f"{1 / median:.2f} images/s"
            )
        if len(scores) > 1:  # the windows stacked give the same scores up to float rounding
            differences = ", ".join(f"{(s - scores[0]).abs().max().item():.2e}" for s in scores[1:])
            print(
                f"precision {precision}: largest score difference from window batch "
                f"{args.window_batch[0]}: {differences}"
            )


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
        p.add_argument(
            "--window-batch", type=int, nargs="+", default=[1], help="slide: windows per forward (the segmentor checks)"
        )
        p.add_argument("--levers", nargs="+", default=["none"], choices=list(LEVERS))
        p.add_argument(
            "--segments", default="host", choices=list(SEGMENTS), help="train: where the batch's classes are found"
        )
        p.add_argument("--child", default=None, help=argparse.SUPPRESS)
        p.set_defaults(func=func)
    p = sub.add_parser("synthetic")
    p.add_argument("--output", default="reinseg-strategies")
    p.add_argument("--iters", type=int, default=250, help="training iterations (the demo's 250)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--strategies", nargs="+", default=list(strategy_names()), choices=strategy_names())
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_synthetic)
    args = parser.parse_args()
    if args.command == "synthetic" and args.child:
        print(json.dumps(run_synthetic(args)))
        return
    if getattr(args, "child", None):
        args.precision, args.lever = args.precision[0], args.levers[0]
        print(json.dumps(measure_training(args)))
        return
    args.func(args)


if __name__ == "__main__":
    main()
