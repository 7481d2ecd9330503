"""The deformable attention's two kernels on the CPU: grid_sample (the reference) against the CSR products.

    OMP_NUM_THREADS=1 python benchmarks/deformable_kernels.py --threads 1

One call of the pixel decoder's deformable attention at the paper head's sizes (512 px crops,
batch 2: levels 16x16, 32x32 and 64x64, 8 heads of 32 channels, 4 points), values, locations and
weights shaped as in training: each query's points around its own centre, a few pixels away.
Per kernel: the forward without a graph (inference), and forward + backward with the samples
kept, and recomputed in backward (``train.deformable_recompute``, the default). CPU
milliseconds, the minimum over ``--repeats`` rounds in which the runs alternate (a shared
machine's noise hits both kernels alike), and each kernel's largest error against the float64
reference. Both compute a sample's pixel coordinate with grid_sample's float32 arithmetic, so on
a pixel edge (where the location's gradient jumps) both take the same side, which float64 may not.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.checkpoint import checkpoint

from reinseg.heads.deformable_attention import multi_scale_deformable_attention
from reinseg.heads.deformable_csr import csr_deformable_attention
from reinseg.heads.pixel_decoder import _grid_centers


def inputs(batch: int, crop: int, spread: float):
    torch.manual_seed(0)
    shapes = [(crop // s, crop // s) for s in (32, 16, 8)]
    queries = sum(h * w for h, w in shapes)
    value = torch.randn(batch, queries, 8, 32, requires_grad=True)
    centres = torch.cat([_grid_centers(h, w, None, torch.float32) for h, w in shapes])
    offsets = torch.randn(batch, queries, 8, len(shapes), 4, 2) * spread  # pixels of each level
    size = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    locations = (centres[None, :, None, None, None] + offsets / size[:, None]).requires_grad_()
    weights = torch.randn(batch, queries, 8, len(shapes) * 4).softmax(-1)
    weights = weights.view(batch, queries, 8, len(shapes), 4).requires_grad_()
    return value, shapes, locations, weights


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--spread", type=float, default=3.0, help="offsets' standard deviation, in pixels")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    value, shapes, locations, weights = inputs(args.batch, args.crop, args.spread)
    grad = torch.randn(args.batch, value.shape[1], 256)

    def call(kernel: str, mode: str):
        if mode == "forward":
            with torch.no_grad():
                return kernel_output(kernel, mode, value, shapes, locations, weights)
        out = kernel_output(kernel, mode, value, shapes, locations, weights)
        return out, *torch.autograd.grad(out, (value, locations, weights), grad)

    runs = [(kernel, mode) for kernel in KERNELS for mode in MODES]
    seconds = {run: [] for run in runs}
    for _ in range(args.repeats + 1):  # the first round warms up; runs alternate within a round
        for run in runs:
            start = time.process_time()
            call(*run)
            seconds[run].append(time.process_time() - start)
    # Float64 reference: on a pixel edge the location gradient jumps, and float32 rounding picks
    # either side, so each kernel is compared with the exact value, not with the other.
    as64 = [t.detach().double().requires_grad_() for t in (value, locations, weights)]
    exact = multi_scale_deformable_attention(as64[0], shapes, as64[1], as64[2])
    exact = (exact, *torch.autograd.grad(exact, as64, grad.double()))
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, levels {shapes}, 8 heads, 4 pts")
    print(
        "CPU ms, the minimum of",
        args.repeats,
        "calls; largest error against float64: output, values' / locations' /"
        " weights' gradients (relative to each's largest entry)\n",
    )
    print("| kernel | " + " | ".join(MODES.values()) + " | output | values | locations | weights |")
    print("|---|" + "---|" * (len(MODES) + 4))
    for kernel in KERNELS:
        found = call(kernel, "kept")
        errors = [((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(found, exact, strict=True)]
        times = " | ".join(f"{min(seconds[kernel, mode][1:]) * 1e3:.1f}" for mode in MODES)
        print(f"| {kernel} | {times} | " + " | ".join(f"{e:.1e}" for e in errors) + " |", flush=True)


KERNELS = ("grid_sample", "csr")
MODES = {
    "forward": "forward, no graph",
    "kept": "forward + backward, samples kept",
    "recomputed": "forward + backward, recomputed",
}


def kernel_output(kernel: str, mode: str, value, shapes, locations, weights):
    if kernel == "csr":
        return csr_deformable_attention(value, shapes, locations, weights, keep_samples=mode != "recomputed")
    if mode == "recomputed":
        return checkpoint(multi_scale_deformable_attention, value, shapes, locations, weights, use_reentrant=False)
    return multi_scale_deformable_attention(value, shapes, locations, weights)


if __name__ == "__main__":
    main()
