"""Throughput of the training data stream: samples/s of the official 512 recipe on GTAV-sized images.

    OMP_NUM_THREADS=1 python benchmarks/data_pipeline.py [--images 8] [--samples 64]

Writes ``--images`` synthetic 1914x1052 image/label PNG pairs (GTAV's size; smooth colour fields
with noise, so they compress and decode like photographs rather than like white noise) in the
GTAV layout into a temporary folder, builds the training set as ``reinseg train`` does
(``train_transform()``: random shortest-edge resize, 512 crop with cat_max_ratio 0.75, flip,
photometric distortion, normalisation, padding) and times :class:`reinseg.engine.TrainingStream`
plus batch collation in this one process (no data-loader workers, one torch and one OpenCV
thread, as in each data-loader worker of a training run), after one warm-up batch, in wall-clock
samples/s and in samples per CPU second of the process (which other load on a shared machine
disturbs less). It also times
decoding alone (``read_pair``: image and label file to arrays), the part that does not depend on
the augmentation draws.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reinseg.data import build_dataset, collate, train_transform
from reinseg.data.datasets import read_pair
from reinseg.engine import TrainingStream

GTAV_SIZE = (1052, 1914)  # (H, W)


def write_pairs(root: Path, count: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    h, w = GTAV_SIZE
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (17, 30, 3), dtype=np.uint8))
        image = np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.int16)
        image = np.clip(image + rng.integers(-8, 9, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"{i:05d}.png")
        classes = rng.integers(0, 20, (9, 16)).astype(np.uint8)
        classes[classes == 19] = 255
        label = Image.fromarray(classes).resize((w, h), Image.NEAREST)
        label.save(root / "labels" / f"{i:05d}_labelTrainIds.png")


def machine() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, torch {torch.__version__}, {torch.get_num_threads()} torch thread(s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="distinct image/label pairs on disk")
    parser.add_argument("--samples", type=int, default=64, help="samples timed (after one warm-up batch)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the median is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(0)  # as reinseg.engine sets it in data-loader workers
    except ImportError:  # reinseg before it used OpenCV
        pass
    with tempfile.TemporaryDirectory() as tmp:
        write_pairs(Path(tmp), args.images)
        dataset = build_dataset("gtav", tmp, "train", transform=train_transform(), seed=0)
        rates, cpu_rates = [], []
        for repeat in range(args.repeats):
            stream = iter(TrainingStream(dataset, args.batch, seed=repeat))
            batches = args.samples // args.batch

            def batch(stream=stream):
                return collate([next(stream) for _ in range(args.batch)])

            batch()  # warm-up: imports, first file reads
            start, cpu = time.perf_counter(), time.process_time()
            for _ in range(batches):
                out = batch()
            rates.append(batches * args.batch / (time.perf_counter() - start))
            cpu_rates.append(batches * args.batch / (time.process_time() - cpu))
        assert out["image"].shape == (args.batch, 3, 512, 512)
        decode = []
        for _ in range(args.repeats):
            cpu = time.process_time()
            for image, label in dataset.pairs:
                read_pair(image, label)
            decode.append(len(dataset.pairs) / (time.process_time() - cpu))
    print(f"machine: {machine()}")
    print(
        f"samples/s: median {statistics.median(rates):.2f} over {args.repeats} passes of {args.samples} "
        f"samples ({', '.join(f'{r:.2f}' for r in rates)})"
    )
    print(f"samples per CPU second (this process; robust to other load): median {statistics.median(cpu_rates):.2f}")
    each = ", ".join(f"{r:.2f}" for r in decode)
    print(f"decoding alone (pairs per CPU second): median {statistics.median(decode):.2f} ({each})")


if __name__ == "__main__":
    main()
