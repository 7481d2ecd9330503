"""Peak GPU memory of a training step, estimated without a GPU: ViT-L, ViT-g and DINOv3-7B at 512
and 1024 crops, per lever (issue 13 asks for the larger VFMs "with whatever makes them fit").

    OMP_NUM_THREADS=2 python benchmarks/memory_estimate.py --threads 2             # the table
    OMP_NUM_THREADS=2 python benchmarks/memory_estimate.py --check --threads 2     # test the method

What ``torch.cuda.max_memory_allocated`` reports is the largest sum, over a run, of the live tensor
storages, each rounded up to the caching allocator's 512-byte granule. This script counts exactly
that while one training step (forward, loss, backward, fused AdamW step) runs on the CPU:
:class:`LiveBytes`, a ``TorchDispatchMode``, sees every storage an operation makes, and a finalizer on
the storage sees it freed; the parameters, buffers and inputs are counted from the start. The
step takes the GPU's code paths where the CPU's differ (``eager_on_cpu`` answers no): the
deformable attention samples with ``grid_sample``, not the CPU's CSR kernel, and the mask
products and short softmaxes take their plain forms. What it cannot show: the allocator's
fragmentation (``memory_reserved`` above ``max_memory_allocated``), cuBLAS/cuDNN workspaces, the
CUDA context (~0.5 GiB), and which operations CPU autocast and CUDA autocast cast differently.

A ViT is a stack of identical blocks, and the step's memory is a line in the depth: the frozen
weights, Rein's tokens and their optimizer state, and the activations each block keeps for
backward all grow by the same amount per block. So each estimate runs the step at two reduced
depths (``--depths``, the backbone's four taps spread over each) and extends the line through the
two peaks to the full depth; ``--check`` also runs ViT-L whole and prints the line's error.
Each step runs in a fresh process.
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
from levers import LEVERS  # noqa: E402

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
    :meth:`add` counts tensors made before the mode (parameters, inputs)."""

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


def _out_indices(depth: int) -> list[int]:
    """reinseg's default taps (1/3, 1/2, 2/3 and all of the depth), distinct at any depth >= 4."""
    return sorted({max(0, round(depth * f) - 1) for f in (1 / 3, 1 / 2, 2 / 3)} | {depth - 1})


def _never(tensor: torch.Tensor) -> bool:
    return False


def child(args) -> dict:
    import reinseg.heads.deformable_attention
    import reinseg.heads.mask2former
    from reinseg.build import build_segmentor
    from reinseg.config import BackboneConfig, Config, ModelConfig, TrainConfig, check_values
    from reinseg.train_options import apply_train_options

    # The GPU's code paths: the CPU's eager fp32 forms (the deformable attention's CSR kernel,
    # the mask products' row-selecting backward, the short softmax) keep other tensors.
    for module in (reinseg.heads.deformable_attention, reinseg.heads.mask2former):
        module.eager_on_cpu = _never  # type: ignore[attr-defined]

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    depth = args.depth
    timm_kwargs = {} if depth == FULL_DEPTHS[args.backbone] else {"depth": depth}
    backbone = BackboneConfig(
        name=args.backbone, img_size=args.crop, patch_size=16, out_indices=_out_indices(depth), timm_kwargs=timm_kwargs
    )
    options, autocast, _ = LEVERS[args.lever]
    config = check_values(Config(model=ModelConfig(backbone=backbone), train=TrainConfig(**options)))
    start = time.perf_counter()
    segmentor = build_segmentor(config.model, load_backbone_weights=False).train()
    apply_train_options(segmentor, config)
    built = time.perf_counter() - start
    trainable = [p for p in segmentor.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05, fused=True)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch, 3, args.crop, args.crop, generator=generator)
    labels = torch.randint(0, 19, (args.batch, args.crop, args.crop), generator=generator)
    labels[:, : args.crop // 8] = 255
    tracker = LiveBytes()
    for tensor in [*segmentor.parameters(), *segmentor.buffers(), images, labels]:
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


def extend(low: dict, high: dict, depth: int) -> float:
    """The peak at ``depth`` blocks on the line through two measured peaks."""
    per_block = (high["peak_bytes"] - low["peak_bytes"]) / (high["depth"] - low["depth"])
    return high["peak_bytes"] + per_block * (depth - high["depth"])


def gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def check(args) -> None:
    """The line's error: ViT-L's peak measured whole against the line through two reduced depths."""
    low_depth, high_depth = args.depths
    print(f"# The method checked: dinov2_vitl14 (24 blocks) at {args.crop} px, measured whole and extended")
    print(f"# from {low_depth} and {high_depth} blocks; GiB of live tensors (512-byte granules)\n")
    print("| lever | batch | peak, 24 blocks measured | extended | error |")
    print("|---|---|---|---|---|")
    for lever in args.levers:
        for batch in args.batch:
            whole = measure(args, "dinov2_vitl14", 24, args.crop, batch, lever)
            low = measure(args, "dinov2_vitl14", low_depth, args.crop, batch, lever)
            high = measure(args, "dinov2_vitl14", high_depth, args.crop, batch, lever)
            line = extend(low, high, 24)
            error = (line - whole["peak_bytes"]) / whole["peak_bytes"]
            print(f"| {lever} | {batch} | {gib(whole['peak_bytes'])} | {gib(line)} | {error:+.1%} |", flush=True)


def estimate(args) -> None:
    low_depth, high_depth = args.depths
    print("# Peak GPU memory of one training step (+ Rein + Mask2Former), estimated on the CPU: GiB of live")
    print(f"# tensors (512-byte granules), extended from {low_depth} and {high_depth} blocks to the full depth;")
    print(f"# torch {torch.__version__}\n")
    print(f"| backbone | crop | batch | lever | peak GiB | fits {GPU_GIB} GiB | per block MiB |")
    print("|---|---|---|---|---|---|---|")
    for backbone in args.backbones:
        for crop in args.crops:
            for batch in args.batch:
                for lever in args.levers:
                    low = measure(args, backbone, low_depth, crop, batch, lever)
                    high = measure(args, backbone, high_depth, crop, batch, lever)
                    line = extend(low, high, FULL_DEPTHS[backbone])
                    per_block = (high["peak_bytes"] - low["peak_bytes"]) / (high_depth - low_depth) / 2**20
                    fits = "yes" if line <= GPU_GIB * 2**30 else "no"
                    row = f"| {backbone} | {crop} | {batch} | {lever} | {gib(line)} | {fits} | {per_block:.0f} |"
                    print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(FULL_DEPTHS), choices=list(FULL_DEPTHS))
    parser.add_argument("--crops", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch", type=int, nargs="+", default=[4])
    parser.add_argument("--levers", nargs="+", default=ESTIMATE_LEVERS, choices=list(LEVERS))
    parser.add_argument("--depths", type=int, nargs=2, default=[4, 8], help="the two reduced depths (>= 4)")
    parser.add_argument("--crop", type=int, default=512, help="--check's crop")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--check", action="store_true", help="test the line on ViT-L, measured whole")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", default="dinov2_vitl14", help=argparse.SUPPRESS)
    parser.add_argument("--depth", type=int, default=24, help=argparse.SUPPRESS)
    parser.add_argument("--lever", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.depths) < 4 or args.depths[0] >= args.depths[1]:
        parser.error("--depths: two depths, the first smaller, each at least 4 (four distinct taps)")
    if args.child:
        args.batch, args.crop = args.batch[0], args.crop
        print(json.dumps(child(args)))
    elif args.check:
        check(args)
    else:
        estimate(args)


if __name__ == "__main__":
    main()
