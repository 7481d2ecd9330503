"""Memory of a training step on the CPU, per lever: the paper config without a GPU.

    OMP_NUM_THREADS=1 python benchmarks/memory.py                       # DINOv2-L, batch 1 and 4
    OMP_NUM_THREADS=1 python benchmarks/memory.py --backbone dinov2_vits14 --batch 1 --levers none

The model is the paper's (``model`` defaults: DINOv2-L at patch 16 + Rein + the Mask2Former
head, 19 classes), random weights, 512x512 crops. Each (lever, batch) runs in a fresh process:
one training step (forward, loss, backward, AdamW step) and, from ``/proc/self/status``, the
resident set before the step (weights, mostly) and the peak resident set the step reaches
(``VmHWM``). On a GPU the allocator holds the same tensors (less the CPU kernels' scratch and
the interpreter's ~0.3 GiB), so the CPU peak is an estimate of the GPU one without a GPU.
Levers are ``train`` options (:mod:`reinseg.train_options`) plus bf16 autocast.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from levers import LEVERS, apply_lever

# compile changes no memory worth its compile time here.
MEMORY_LEVERS = [name for name in LEVERS if not name.startswith("compile")]


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args) -> dict:
    from reinseg.build import build_segmentor
    from reinseg.config import BackboneConfig, ModelConfig

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ModelConfig(backbone=BackboneConfig(name=args.backbone, img_size=512, patch_size=16))
    segmentor = build_segmentor(model, load_backbone_weights=False).train()
    autocast = apply_lever(segmentor, args.lever)
    trainable = [p for p in segmentor.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05)
    images = torch.randn(args.batch, 3, 512, 512)
    labels = torch.randint(0, 19, (args.batch, 512, 512))
    weights_mib = sum(p.numel() * p.element_size() for p in segmentor.parameters()) / 2**20
    before = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak resident set
    start, start_cpu = time.perf_counter(), time.process_time()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = segmentor.loss(images, labels)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return dict(
        lever=args.lever,
        batch=args.batch,
        weights_mib=weights_mib,
        before_mib=before,
        peak_mib=_status_mib("VmHWM"),
        added_mib=_status_mib("VmHWM") - before,
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - start_cpu,
        max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="dinov2_vitl14")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--levers", nargs="+", default=MEMORY_LEVERS, choices=list(LEVERS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lever", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.batch = args.batch[0]
        print(json.dumps(child(args)))
        return
    print(
        f"# {args.backbone} + Rein + Mask2Former, 512 crops, one train step per fresh process, "
        f"torch {torch.__version__}"
    )
    print(f"# {args.threads} thread(s); MiB of resident memory (/proc/self/status)\n")
    print("| lever | batch | parameters MiB | resident before the step | step adds (peak) | peak | step CPU s |")
    print("|---|---|---|---|---|---|---|")
    rows = {}
    for lever in args.levers:
        for batch in args.batch:
            command = [sys.executable, __file__, "--child", "--lever", lever, "--batch", str(batch)]
            command += ["--backbone", args.backbone, "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"| {lever} | {batch} | failed: {(done.stderr.strip().splitlines() or ['?'])[-1]} | | | | |")
                continue
            row = rows[lever, batch] = json.loads(done.stdout.strip().splitlines()[-1])
            print(
                f"| {lever} | {batch} | {row['weights_mib']:.0f} | {row['before_mib']:.0f} | {row['added_mib']:.0f} | "
                f"{row['peak_mib']:.0f} | {row['cpu_seconds']:.1f} |",
                flush=True,
            )
    base = {b: rows.get(("none", b)) for b in args.batch}
    if any(base.values()):
        print("\nPeak against no lever (same batch):")
        for (lever, batch), row in rows.items():
            if base[batch] and lever != "none":
                saved = base[batch]["peak_mib"] - row["peak_mib"]
                ratio = row["peak_mib"] / base[batch]["peak_mib"]
                print(f"- {lever}, batch {batch}: {saved:+.0f} MiB saved ({ratio:.2f}x)")


if __name__ == "__main__":
    main()
