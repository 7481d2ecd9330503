"""fp32 against bf16 autocast on the synthetic benchmark: the demo's run in both precisions.

Same data, seed, model and iterations as ``reinseg demo`` (small ViT with random weights, Rein +
Mask2Former head, trained on the ``game`` domain); only ``train.precision`` differs. Prints the
mIoU per domain and the difference, and writes ``precision.json`` into ``--output``.

    OMP_NUM_THREADS=1 python benchmarks/precision.py --output /tmp/reinseg-precision
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


def main() -> None:
    from reinseg.data.synthetic import write_cityscapes_layout
    from reinseg.demo import DEMO_ITERS, SIZE, demo_config
    from reinseg.engine import train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="reinseg-precision")
    parser.add_argument("--iters", type=int, default=DEMO_ITERS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", nargs="+", default=["32-true", "bf16-mixed"])
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    out = Path(args.output)
    write_cityscapes_layout(
        out / "data", num_train=400, num_val=50, size=SIZE, seed=args.seed, workers=1, progress=False
    )
    results = {}
    for precision in args.precision:
        config = demo_config(out / "data", out / precision, max_iters=args.iters, seed=args.seed)
        config.train.precision = precision
        config.train.accelerator = args.accelerator
        start = time.perf_counter()
        task = train(config, resume="never")
        found = task.last_results
        results[precision] = dict(
            seconds=time.perf_counter() - start,
            mIoU={domain: scores["mIoU"] for domain, scores in found["domains"].items()},
            mean_unseen=found["mean_mIoU"],
        )
        print(f"{precision}: {results[precision]}", flush=True)
    (out / "precision.json").write_text(json.dumps(results, indent=2))
    names = list(results)
    domains = list(results[names[0]]["mIoU"])
    print(f"\n{'domain':<16}" + "".join(f"{n:>12}" for n in names) + (f"{'difference':>12}" if len(names) == 2 else ""))
    for domain in domains + ["mean unseen"]:
        values = [r["mean_unseen"] if domain == "mean unseen" else r["mIoU"][domain] for r in results.values()]
        diff = f"{values[1] - values[0]:12.2f}" if len(values) == 2 else ""
        print(f"{domain:<16}" + "".join(f"{v:12.2f}" for v in values) + diff)
    print("seconds         " + "".join(f"{r['seconds']:12.0f}" for r in results.values()))


if __name__ == "__main__":
    main()
