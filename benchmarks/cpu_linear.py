"""float32 linear products on the CPU: MKL's ``sgemm`` (what ``F.linear`` calls) against oneDNN's
inner product with the weight packed once (``torch.ops.mkldnn._reorder_linear_weight`` and
``_linear_pointwise``), at the forward linear shapes of the ``vs_official.py`` train step
(ViT-S/16 at 512 px, batch 2; the paper head's encoder FFN).

On this project's AMD EPYC the oneDNN route ran 11-24 % faster on one thread and 11-49 % on two
(RESULTS.md, "Twenty-third session"); its sums run in another order, so the outputs differ in
their last bits (the table gives the largest difference, on unit-normal operands)::

    OMP_NUM_THREADS=1 python benchmarks/cpu_linear.py --threads 1

A public route to oneDNN is the linear as a 1x1 convolution (:func:`as_pointwise_convolution`),
whose backward oneDNN computes too: ``--backward`` times forward and backward of both routes,
with the weight frozen (the VFM's: the gradient of the input only) and trained (the head's).
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


# PyTorch sends a 1x1 convolution to oneDNN from this batch on, at any thread count (below it,
# on one thread, to its own slower kernel).
POINTWISE_BATCH = 16


def as_pointwise_convolution(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x (M, K)`` with ``M`` a multiple of 16: the rows viewed
    as a channels-last ``(16, K, M / 16, 1)`` batch of images (no copy), through a 1x1 convolution
    with ``weight (N, K)``; ``(M, N)``."""
    rows, channels = x.shape
    images = x.view(POINTWISE_BATCH, rows // POINTWISE_BATCH, 1, channels).permute(0, 3, 1, 2)
    return F.conv2d(images, weight[:, :, None, None], bias).permute(0, 2, 3, 1).reshape(rows, -1)


def forward_and_backward(route, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grad: torch.Tensor):
    """A call of ``route(x, weight, bias)`` and its backward with ``grad``."""

    def call() -> None:
        route(x, weight, bias).backward(grad)
        for tensor in (x, weight, bias):
            tensor.grad = None

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--backward", action="store_true", help="also time forward + backward, MKL against the 1x1 convolution"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, best of {args.repeats}")
    print("(the 1x1 convolution takes the rows down to a multiple of 16: 2048 of 2050)\n")
    print(
        "| (M, K) x (K, N) | what | MKL GMAC/s | oneDNN packed GMAC/s | 1x1 convolution GMAC/s | largest difference |"
    )
    print("|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    operands = []
    for m, k, n, what in SHAPES:
        x, weight = torch.randn(m, k, generator=generator), torch.randn(n, k, generator=generator)
        bias = torch.randn(n, generator=generator)
        operands.append((x, weight, bias, what))
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, m)
        rows = x[: m - m % POINTWISE_BATCH]
        plain = functools.partial(F.linear, x, weight, bias)
        inner_product = functools.partial(torch.ops.mkldnn._linear_pointwise, x, packed, bias, "none", [], "")
        convolution = functools.partial(as_pointwise_convolution, rows, weight, bias)
        mkl, onednn = best_seconds(plain, args.repeats), best_seconds(inner_product, args.repeats)
        pointwise = best_seconds(convolution, args.repeats)
        expected = plain()
        difference = max(
            (inner_product() - expected).abs().max().item(), (convolution() - expected[: len(rows)]).abs().max().item()
        )
        macs = m * k * n
        print(
            f"| ({m}, {k}) x ({k}, {n}) | {what} | {macs / mkl / 1e9:.1f} | {macs / onednn / 1e9:.1f} | "
            f"{len(rows) * k * n / pointwise / 1e9:.1f} | {difference:.1e} |"
        )
    if not args.backward:
        return
    print("\nForward and backward, milliseconds (the rows a multiple of 16 for both routes):\n")
    print("| (M, K) x (K, N) | what | weight | MKL ms | 1x1 convolution ms | saved |")
    print("|---|---|---|---|---|---|")
    for x, weight, bias, what in operands[:-1]:  # the step's shapes
        rows = x[: len(x) - len(x) % POINTWISE_BATCH].clone().requires_grad_()
        grad = torch.randn(len(rows), len(weight), generator=generator)
        for trained in (False, True):
            trainable = [t.detach().clone().requires_grad_(trained) for t in (weight, bias)]
            mkl = best_seconds(forward_and_backward(F.linear, rows, *trainable, grad), args.repeats)
            pointwise = best_seconds(
                forward_and_backward(as_pointwise_convolution, rows, *trainable, grad), args.repeats
            )
            print(
                f"| ({len(rows)}, {x.shape[1]}) x ({x.shape[1]}, {len(weight)}) | {what} | "
                f"{'trained' if trained else 'frozen'} | {mkl * 1e3:.1f} | {pointwise * 1e3:.1f} | "
                f"{1 - pointwise / mkl:.0%} |"
            )


if __name__ == "__main__":
    main()
