"""float32 linear products on the CPU: MKL's ``sgemm`` (what ``F.linear`` calls) against oneDNN's
inner product with the weight packed once (``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``), at the forward linear shapes of the ``vs_official.py`` train step
(ViT-S/16 at 512 px, batch 2; the paper head's encoder FFN).

On this project's AMD EPYC the oneDNN route ran 11-24 % faster on one thread and 11-49 % on two
(RESULTS.md, "Twenty-third session"); its sums run in another order, so the outputs differ in
their last bits (the table gives the largest difference, on unit-normal operands)::

    OMP_NUM_THREADS=1 python benchmarks/cpu_linear.py --threads 1
"""

from __future__ import annotations

import argparse
import functools
import math
import time

import torch
import torch.nn.functional as F

# (M, K, N): (M, K) activations times a (N, K) weight, and what they are in the step.
SHAPES = (
    (2050, 384, 1152, "the ViT's qkv"),
    (2050, 384, 1536, "the ViT's fc1"),
    (2050, 1536, 384, "the ViT's fc2"),
    (10752, 256, 1024, "the encoder FFN's first layer"),
    (10752, 1024, 256, "the encoder FFN's second layer"),
    (10752, 256, 256, "the encoder's value and output projections"),
    (2048, 2048, 2048, "2048^3"),
)


def best_seconds(call, repeats: int) -> float:
    """The least seconds of ``repeats`` calls of ``call()``, after one uncounted call."""
    call()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, best of {args.repeats}\n")
    print("| (M, K) x (K, N) | what | MKL GMAC/s | oneDNN packed GMAC/s | largest difference |")
    print("|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    for m, k, n, what in SHAPES:
        x, weight = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator)
        bias = torch.randn(n, generator=generator)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, m)
        plain = functools.partial(F.linear, x, weight, bias)
        inner_product = functools.partial(torch.ops.mkldnn._linear_pointwise, x, packed, bias, "none", [], "")
        mkl, onednn = best_seconds(plain, args.repeats), best_seconds(inner_product, args.repeats)
        difference = inner_product() - plain()
        macs = m * k * n
        print(
            f"| ({m}, {k}) x ({k}, {n}) | {what} | {macs / mkl / 1e9:.1f} | {macs / onednn / 1e9:.1f} | "
            f"{difference.abs().max().item():.1e} |"
        )


if __name__ == "__main__":
    main()
