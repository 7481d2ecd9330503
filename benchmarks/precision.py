"""fp32 against bf16 on the synthetic benchmark: the demo's run once per numerics variant.

Same data, seed, model and iterations as ``reinseg demo`` (small ViT with random weights, Rein +
Mask2Former head, trained on the ``game`` domain); only the variant's ``train`` keys differ:

- ``fp32``: ``train.precision=32-true`` (the reference);
- ``bf16-mixed``: bf16 autocast (``train.precision=bf16-mixed``);
- ``frozen-bf16``: fp32, with the frozen VFM held and run in bf16 (``train.frozen_dtype=bfloat16``);
- ``checkpointing``: fp32 with ``train.activation_checkpointing=true`` (must equal ``fp32``).

Prints the mIoU per domain and each variant's difference to the first, and writes
``precision.json`` into ``--output``.

    OMP_NUM_THREADS=1 python benchmarks/precision.py --output /tmp/reinseg-precision
    OMP_NUM_THREADS=1 python benchmarks/precision.py --output /tmp/p --variants fp32 frozen-bf16 --iters 100
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

VARIANTS = {
    "fp32": dict(precision="32-true"),
    "bf16-mixed": dict(precision="bf16-mixed"),
    "frozen-bf16": dict(precision="32-true", frozen_dtype="bfloat16"),
    "checkpointing": dict(precision="32-true", activation_checkpointing=True),
}


def main() -> None:
    from reinseg.data.synthetic import write_cityscapes_layout
    from reinseg.demo import DEMO_ITERS, SIZE, demo_config
    from reinseg.engine import train

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="reinseg-precision")
    parser.add_argument("--iters", type=int, default=DEMO_ITERS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--variants", nargs="+", default=["fp32", "bf16-mixed", "frozen-bf16"], choices=list(VARIANTS))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    out = Path(args.output)
    write_cityscapes_layout(
        out / "data", num_train=400, num_val=50, size=SIZE, seed=args.seed, workers=1, progress=False
    )
    results = {}
    for variant in args.variants:
        config = demo_config(out / "data", out / variant, max_iters=args.iters, seed=args.seed)
        for key, value in VARIANTS[variant].items():
            setattr(config.train, key, value)
        config.train.accelerator = args.accelerator
        start, start_cpu = time.perf_counter(), time.process_time()
        task = train(config, resume="never")
        found = task.last_results
        results[variant] = dict(
            seconds=time.perf_counter() - start,
            cpu_seconds=time.process_time() - start_cpu,
            mIoU={domain: scores["mIoU"] for domain, scores in found["domains"].items()},
            mean_unseen=found["mean_mIoU"],
        )
        print(f"{variant}: {results[variant]}", flush=True)
    (out / "precision.json").write_text(json.dumps(results, indent=2))
    names = list(results)
    domains = list(results[names[0]]["mIoU"])
    differences = [f"{n} - {names[0]}" for n in names[1:]]
    print(f"\n| domain | {' | '.join(names + differences)} |")
    print("|---|" + "---|" * (len(names) + len(differences)))
    for domain in domains + ["mean unseen"]:
        values = [r["mean_unseen"] if domain == "mean unseen" else r["mIoU"][domain] for r in results.values()]
        cells = [f"{v:.2f}" for v in values] + [f"{v - values[0]:+.2f}" for v in values[1:]]
        print(f"| {domain} | {' | '.join(cells)} |")
    seconds = [f"{r['cpu_seconds']:.0f}" for r in results.values()] + [""] * len(differences)
    print(f"| CPU seconds | {' | '.join(seconds)} |")


if __name__ == "__main__":
    main()
