"""Rein per block: its low-rank tokens applied through their factors against the formed tokens.

``Rein.forward`` (low-rank tokens ``T = A @ B`` used through ``A`` and ``B``, all rows refined and
the prefix rows restored) against the same module made to take the paper's formula literally
(``T`` formed, the patch rows sliced out and concatenated back), for the widths of ViT-S/B/L:
one block's tokens (batch 1, 1 prefix + 1024 patch tokens, 100 tokens of rank 16), median
milliseconds of inference calls and of training calls (forward and backward).

    OMP_NUM_THREADS=1 python benchmarks/rein_factors.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from reinseg import Rein


class FormedTokensRein(Rein):
    """The same module computing ``T = A @ B`` first, on the patch rows alone."""

    refines_rows_alone = False

    def _low_rank_pays(self, channels: int) -> bool:
        return False


def median_ms(call, repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[384, 768, 1024])
    parser.add_argument("--tokens", type=int, default=1024, help="patch tokens per image")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, 1 + {args.tokens} tokens, batch 1")
    print("| width C | formed tokens (ms) | factors (ms) | training: formed (ms) | factors (ms) | max abs difference |")
    print("|---|---|---|---|---|---|")
    for width in args.widths:
        torch.manual_seed(0)
        factored = Rein(num_layers=1, embed_dims=width, patch_size=16)
        formed = FormedTokensRein(num_layers=1, embed_dims=width, patch_size=16)
        formed.load_state_dict(factored.state_dict())
        x = torch.randn(1, 1 + args.tokens, width)
        x_grad = x.clone().requires_grad_()
        with torch.no_grad():
            difference = (factored(x, 0) - formed(x, 0)).abs().max().item()
            infer = [median_ms(lambda m=m, x=x: m(x, 0), args.repeats) for m in (formed, factored)]
        train = [
            median_ms(lambda m=m, x=x_grad: m(x, 0).sum().backward(), args.repeats // 4) for m in (formed, factored)
        ]
        print(
            f"| {width} | {infer[0]:.2f} | {infer[1]:.2f} | {train[0]:.1f} | {train[1]:.1f} | {difference:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
