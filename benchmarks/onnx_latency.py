"""ONNX Runtime against PyTorch on the CPU: one image through the whole segmentor.

A ViT-S-sized DINOv2 (384 wide, 12 blocks, patch 16) with the paper's Rein (100 tokens, rank 16,
256-d queries) and Mask2Former head (19 classes), random weights, is exported at a fixed size
(:func:`reinseg.export.segmentor_to_onnx`) twice: with Rein's token computations precomputed
(``folded``, the default of ``reinseg export``) and kept in the graph (``unfolded``). Each graph
runs in onnxruntime and the model in PyTorch (eager, ``no_grad``) with 1 and 2 threads; the
script prints the median wall time and process CPU time per image, and the largest logit
difference between the runtimes.

    python benchmarks/onnx_latency.py                      # 512x512, 1 and 2 threads
    python benchmarks/onnx_latency.py --size 256 --repeats 3 --threads 1

On a shared machine the threads wait on each other: measure with nothing else running.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from reinseg.build import build_segmentor
from reinseg.config import BackboneConfig, HeadConfig, ModelConfig, ReinConfig
from reinseg.export import onnx_session, segmentor_to_onnx


def vit_s_segmentor(size: int):
    config = ModelConfig(
        tuning="rein",
        backbone=BackboneConfig(name="dinov2_vits14", img_size=size, patch_size=16),
        rein=ReinConfig(token_length=100, lora_dim=16, query_dims=256),
        head=HeadConfig(num_classes=19),
    )
    return build_segmentor(config, load_backbone_weights=False).eval()


def median_times(run, repeats: int, warmup: int = 1) -> tuple[float, float]:
    """Median (wall, process CPU) seconds of ``run()``."""
    wall, cpu = [], []
    for i in range(warmup + repeats):
        w, c = time.perf_counter(), time.process_time()
        run()
        if i >= warmup:
            wall.append(time.perf_counter() - w)
            cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    torch.manual_seed(0)
    segmentor = vit_s_segmentor(args.size)
    images = torch.randn(1, 3, args.size, args.size)
    start = time.perf_counter()
    graphs = {"folded": segmentor_to_onnx(segmentor, (args.size, args.size), fold=True)}
    print(f"export (folded): {time.perf_counter() - start:.0f} s, {len(graphs['folded']) / 2**20:.0f} MiB")
    graphs["unfolded"] = segmentor_to_onnx(segmentor, (args.size, args.size), fold=False)
    with torch.no_grad():
        reference = segmentor.encode_decode(images).numpy()
    print(f"\n{args.size}x{args.size}, batch 1; median of {args.repeats} (after 1 warm-up), seconds per image")
    print("| runtime | threads | wall s | CPU s | max abs logit diff vs PyTorch |\n|---|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        with torch.no_grad():
            wall, cpu = median_times(lambda: segmentor.encode_decode(images), args.repeats)
        print(f"| PyTorch {torch.__version__} eager | {threads} | {wall:.3f} | {cpu:.3f} | - |", flush=True)
        for name, graph in graphs.items():
            session = onnx_session(graph, threads=threads)
            feed = {session.get_inputs()[0].name: images.numpy()}
            out = session.run(None, feed)[0]
            wall, cpu = median_times(lambda s=session, f=feed: s.run(None, f), args.repeats)
            error = abs(out - reference).max()
            print(f"| onnxruntime, Rein {name} | {threads} | {wall:.3f} | {cpu:.3f} | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
