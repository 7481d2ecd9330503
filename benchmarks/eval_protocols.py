"""Evaluation speed per test protocol (reinseg.protocols): images per second and model windows.

    python benchmarks/eval_protocols.py                          # CPU, ViT-S + Rein + head, 1 thread
    python benchmarks/eval_protocols.py --device cuda --backbone dinov2_vitl14 --images 5

One synthetic Cityscapes-sized image (2048x1024 RGB, uint8) is scored under each protocol as
``reinseg eval`` does (resize, sliding windows, flips, scores resized to the 2048x1024 label):
the time from the image as read to the class scores at the label's size. Weights are random:
speed does not depend on them. Wall and CPU time (process time) are both given: on a shared
machine the CPU time is the steadier figure. On a GPU each protocol first scores the image once
untimed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from strategies import machine, model_config

from reinseg.build import build_segmentor
from reinseg.data.entries import DatasetEntry
from reinseg.protocols import PROTOCOLS, input_sizes, protocol_run, protocol_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="dinov2_vits14")
    parser.add_argument("--img-size", type=int, default=512, help="training crop: the official windows' size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=1, help="images timed per protocol (after one warm-up window)")
    parser.add_argument("--protocols", nargs="+", default=["official", "highres", "ms-flip"], choices=list(PROTOCOLS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = model_config(args.backbone, "rein", args.img_size)
    segmentor = build_segmentor(config, load_backbone_weights=False).to(device).eval()
    windows = [0]
    real_encode_decode = segmentor.encode_decode

    def counting_encode_decode(images):
        windows[0] += 1
        return real_encode_decode(images)

    segmentor.encode_decode = counting_encode_decode
    entry = DatasetEntry("cityscapes", "unused", "val")
    image = np.random.default_rng(0).integers(0, 256, (1024, 2048, 3), dtype=np.uint8)
    with torch.no_grad():  # warm-up: one window
        segmentor.encode_decode(torch.zeros(1, 3, args.img_size, args.img_size, device=device))
    print(
        f"# {machine(args.device)}; {args.backbone} + Rein + Mask2Former head (random weights), "
        f"2048x1024 Cityscapes-sized image, {args.images} image(s) per protocol"
    )
    print("| protocol | sizes the model sees (h x w) | windows / image | wall s / image | CPU s / image | images / s |")
    print("|---|---|---|---|---|---|")
    for name in args.protocols:
        run = protocol_run(PROTOCOLS[name], [("cityscapes", entry)], config)
        if device.type == "cuda":  # the protocol's sizes once untimed: kernels chosen, memory cached
            protocol_scores(segmentor, run, "cityscapes", image, (1024, 2048))
            torch.cuda.synchronize()
        windows[0] = 0
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(args.images):
            scores = protocol_scores(segmentor, run, "cityscapes", image, (1024, 2048))
            if device.type == "cuda":
                torch.cuda.synchronize()
        wall, cpu = (time.perf_counter() - wall) / args.images, (time.process_time() - cpu) / args.images
        assert scores.shape == (19, 1024, 2048)
        sizes = ", ".join(f"{h}x{w}" for h, w in dict.fromkeys(input_sizes(run, "cityscapes", (1024, 2048))))
        print(f"| {name} | {sizes} | {windows[0] // args.images} | {wall:.3f} | {cpu:.3f} | {1 / wall:.2f} |")


if __name__ == "__main__":
    main()
