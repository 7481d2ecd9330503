"""Peak GPU memory of a training step, estimated without a GPU: ViT-L, ViT-g and DINOv3-7B at 512
and 1024 crops, per lever (issue 13 asks for the larger VFMs "with whatever makes them fit").

    OMP_NUM_THREADS=2 python benchmarks/memory_estimate.py --threads 2                        # the table
    OMP_NUM_THREADS=2 python benchmarks/memory_estimate.py --check 24 --backbones dinov2_vitl14 --threads 2

``torch.cuda.max_memory_allocated`` reports the largest sum, over a run, of the allocator's blocks
holding live tensors. This script counts the live tensor storages, each rounded up to the
caching allocator's 512-byte granule, while one training step (forward, loss, backward, fused
AdamW step) runs on the CPU in its steady state (AdamW's moments already made):
:class:`LiveBytes`, a ``TorchDispatchMode``, sees every storage an operation makes, and a finalizer on
the storage sees it freed; parameters, buffers, optimizer state and inputs are counted from the
start. The step takes the GPU's code paths where the CPU's differ (``eager_on_cpu`` answers no):
the deformable attention samples with ``grid_sample``, not the CPU's CSR kernel, and the mask
products and short softmaxes take their plain forms.

The count is a lower bound of the GPU's figure: the allocator charges whole blocks (it splits a
block of the large pool only when more than 1 MiB would remain, so a tensor over 1 MiB may take
up to 1 MiB more); kernels' own allocations (cuBLAS/cuDNN workspaces) count there and not here;
CUDA autocast returns some outputs in fp32 that CPU autocast leaves in bf16 (normalisations,
softmaxes, sums); and the CUDA context (~0.5 GiB) and the allocator's fragmentation
(``memory_reserved``) come on top.

A ViT is a stack of identical blocks, and the step's memory is a line in the depth: the frozen
weights, Rein's tokens and their optimizer state, and the activations each block keeps for
backward all grow by the same amount per block, as long as the peak falls at the same point of
the step. So each estimate runs the step at two reduced depths (``--depths``; reinseg's four
default taps spread over each) and extends the line through the two peaks to the full depth;
``--check N`` runs the step at ``N`` blocks too (24 with ViT-L: the whole model) and prints the
line's error there. Each step runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).parent))
from gpu_paths import synthetic_batch, take_gpu_code_paths  # noqa: E402
from levers import LEVERS, apply_lever  # noqa: E402

GRANULE = 512  # bytes: the CUDA caching allocator's smallest block (c10/cuda/CUDACachingAllocator.cpp)
GPU_GIB = 80  # an H100's memory: the table says whether each estimate stays under it
FULL_DEPTHS = {"dinov2_vitl14": 24, "dinov2_vitg14": 40, "dinov3_vit7b16": 40}
ESTIMATE_LEVERS = [
    "none",
    "precision=bf16-mixed",
    "bf16-mixed + frozen bf16",
    "bf16-mixed + frozen bf16 + checkpointing",
]


class LiveBytes(TorchDispatchMode):
    """Live tensor bytes while the mode is on: ``current`` and its maximum ``peak``.

    Every storage an operation returns is counted once (views share it) until Python frees it;
    :meth:`add` counts tensors made before the mode (parameters, optimizer state, inputs)."""

    def __init__(self, granule: int = GRANULE) -> None:
        super().__init__()
        self.granule = granule
        self.live: dict[tuple, int] = {}
        self.current = 0
        self.peak = 0

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        size = -(-storage.nbytes() // self.granule) * self.granule
        if size == 0 or key in self.live:
            return
        self.live[key] = size
        self.current += size
        self.peak = max(self.peak, self.current)
        # PyTorch keeps one Python object per storage while it lives: this runs when it is freed.
        weakref.finalize(storage, self._free, key)

    def _free(self, key: tuple) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                self.add(value)
        return out


def child(args) -> dict:
    from reinseg.build import build_segmentor
    from reinseg.config import BackboneConfig, ModelConfig

    # The GPU's code paths: the CPU's eager fp32 forms (the deformable attention's CSR kernel,
    # the mask products' row-selecting backward, the short softmax) keep other tensors.
    take_gpu_code_paths()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    depth = args.depth
    timm_kwargs = {} if depth == FULL_DEPTHS[args.backbone] else {"depth": depth}
    # out_indices: reinseg's default, spread over the depth built (1/3, 1/2, 2/3 and the last).
    backbone = BackboneConfig(name=args.backbone, img_size=args.crop, patch_size=16, timm_kwargs=timm_kwargs)
    start = time.perf_counter()
    segmentor = build_segmentor(ModelConfig(backbone=backbone), load_backbone_weights=False).train()
    autocast = apply_lever(segmentor, args.lever)
    built = time.perf_counter() - start
    trainable = [p for p in segmentor.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05, fused=True)
    # The steady state: from the second step on, AdamW's moments (made by its first step) are
    # live through forward and backward. One step on zero gradients makes them without a forward.
    for p in trainable:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    state = [v for per_param in optimizer.state.values() for v in per_param.values() if isinstance(v, torch.Tensor)]
    images, labels = synthetic_batch(args.batch, args.crop)
    tracker = LiveBytes()
    for tensor in [*segmentor.parameters(), *segmentor.buffers(), *state, images, labels]:
        tracker.add(tensor)
    before = tracker.current
    start = time.perf_counter()
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = segmentor.loss(images, labels)["loss"]
        loss.backward()
        del loss
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return dict(
        backbone=args.backbone,
        depth=depth,
        crop=args.crop,
        batch=args.batch,
        lever=args.lever,
        before_bytes=before,
        peak_bytes=tracker.peak,
        after_bytes=tracker.current,
        parameters=sum(p.numel() for p in segmentor.parameters()),
        build_seconds=built,
        step_seconds=time.perf_counter() - start,
    )


def measure(args, backbone: str, depth: int, crop: int, batch: int, lever: str) -> dict:
    command = [sys.executable, __file__, "--child", "--threads", str(args.threads), "--backbone", backbone]
    command += ["--depth", str(depth), "--crop", str(crop), "--batch", str(batch), "--lever", lever]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[1:])} failed:\n{done.stderr[-3000:]}")
    found = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  measured {json.dumps(found)}", file=sys.stderr, flush=True)
    return found


def per_block(low: dict, high: dict) -> float:
    """The bytes each block adds to the peak: the slope of the line through two measured peaks."""
    return (high["peak_bytes"] - low["peak_bytes"]) / (high["depth"] - low["depth"])


def extend(low: dict, high: dict, depth: int) -> float:
    """The peak at ``depth`` blocks on the line through two measured peaks."""
    return high["peak_bytes"] + per_block(low, high) * (depth - high["depth"])


def gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def check(args) -> None:
    """The line's error: the peak measured at ``--check`` blocks against the line through the two
    reduced depths, per backbone, crop, batch and lever."""
    low_depth, high_depth = args.depths
    print(f"# The method checked: the peak measured at {args.check} blocks and extended from {low_depth} and")
    print(f"# {high_depth}; GiB of live tensors (512-byte granules); torch {torch.__version__}\n")
    print(f"| backbone | crop | batch | lever | measured at {args.check} blocks | extended | error |")
    print("|---|---|---|---|---|---|---|")
    for backbone, crop, batch, lever in _grid(args):
        measured = measure(args, backbone, args.check, crop, batch, lever)
        low = measure(args, backbone, low_depth, crop, batch, lever)
        high = measure(args, backbone, high_depth, crop, batch, lever)
        line = extend(low, high, args.check)
        error = (line - measured["peak_bytes"]) / measured["peak_bytes"]
        row = (
            f"| {backbone} | {crop} | {batch} | {lever} | {gib(measured['peak_bytes'])} | {gib(line)} | {error:+.2%} |"
        )
        print(row, flush=True)


def _grid(args):
    return [
        (backbone, crop, batch, lever)
        for backbone in args.backbones
        for crop in args.crops
        for batch in args.batch
        for lever in args.levers
    ]


def estimate(args) -> None:
    low_depth, high_depth = args.depths
    print("# Peak GPU memory of one training step (+ Rein + Mask2Former), estimated on the CPU: GiB of live")
    print(f"# tensors (512-byte granules), extended from {low_depth} and {high_depth} blocks to the full depth;")
    print(f"# torch {torch.__version__}\n")
    print(f"| backbone | crop | batch | lever | peak GiB | fits {GPU_GIB} GiB | per block MiB |")
    print("|---|---|---|---|---|---|---|")
    for backbone, crop, batch, lever in _grid(args):
        low = measure(args, backbone, low_depth, crop, batch, lever)
        high = measure(args, backbone, high_depth, crop, batch, lever)
        line = extend(low, high, FULL_DEPTHS[backbone])
        fits = "yes" if line <= GPU_GIB * 2**30 else "no"
        mib = per_block(low, high) / 2**20
        print(f"| {backbone} | {crop} | {batch} | {lever} | {gib(line)} | {fits} | {mib:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(FULL_DEPTHS), choices=list(FULL_DEPTHS))
    parser.add_argument("--crops", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--levers", nargs="+", default=ESTIMATE_LEVERS, choices=list(LEVERS))
    parser.add_argument("--depths", type=int, nargs=2, default=[4, 8], help="the two reduced depths (>= 4)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--check", type=int, metavar="N", help="measure at N blocks too: the line's error there")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--crop", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--backbone", default="dinov2_vitl14", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=24, help=argparse.SUPPRESS)
    parser.add_argument("--lever", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.depths) < 4 or args.depths[0] >= args.depths[1]:
        parser.error("--depths: two depths, the first smaller, each at least 4 (four distinct taps)")
    if args.check is not None and args.check < 4:
        parser.error("--check: a depth of at least 4 (four distinct taps)")
    if args.child:
        args.batch = args.batch[0]
        print(json.dumps(child(args)))
    elif args.check is not None:
        check(args)
    else:
        estimate(args)


if __name__ == "__main__":
    main()
