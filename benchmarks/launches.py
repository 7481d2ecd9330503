"""The operations a GPU would launch in one training step, counted on the CPU.

    python benchmarks/launches.py                                  # DINOv2-L's 24 blocks, batch 4
    python benchmarks/launches.py --backbone dinov2_vitg14 --batch 2
    python benchmarks/launches.py --predict                        # one image's prediction, three windows

In eager PyTorch every operation that computes (not a view, not an allocation) is at least one
kernel launch, and the host spends several microseconds on each: with thousands per step the
host, not the GPU, can set the pace. The step (forward, loss, backward, fused AdamW) runs on the
CPU with the GPU's code paths (``eager_on_cpu`` answers no, as in ``memory_estimate.py``), under
a ``TorchDispatchMode`` that counts what each phase dispatches, by the source file that asked for
it. The count does not depend on the widths or the image size, so the model is built at the
backbone's real depth and the head's real structure, with a narrow backbone (``--width``) and a
small crop: seconds instead of minutes. Counts, not times: what a launch costs depends on the
GPU's host. ``--predict`` counts one ``Segmentor.predict`` call instead: a Cityscapes-shaped
image (2:1) as three sliding windows (the crop and the stride of 512 / 341 scaled to ``--crop``),
one window per forward and all three at once (``model.test.window_batch``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys

import torch
from gpu_paths import synthetic_batch, take_gpu_code_paths
from torch.utils._python_dispatch import TorchDispatchMode

# Operations that launch no kernel: views, reshapes that are views, allocations.
NO_KERNEL = {
    "view", "_unsafe_view", "reshape", "_reshape_alias", "transpose", "t", "permute", "expand", "expand_as",
    "slice", "select", "unsqueeze", "squeeze", "as_strided", "alias", "detach", "split", "split_with_sizes",
    "unbind", "chunk", "narrow", "flatten", "unflatten", "view_as", "diagonal", "movedim", "lift_fresh",
    "empty", "empty_like", "empty_strided", "_record_function_enter_new", "_record_function_exit",
}  # fmt: skip


class Launches(TorchDispatchMode):
    """Counts the dispatched operations that compute, by the innermost reinseg or timm file."""

    def __init__(self) -> None:
        super().__init__()
        self.by_source: collections.Counter[str] = collections.Counter()
        self.no_kernel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in NO_KERNEL:
            self.no_kernel += 1
        else:
            self.by_source[_source()] += 1
        return func(*args, **(kwargs or {}))


def _source() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        for package in ("/reinseg/", "/timm/"):
            if package in name:
                return package.strip("/") + "/" + name.split(package, 1)[1]
        frame = frame.f_back
    return "PyTorch itself (autograd's backward of its operations, the optimizer)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="dinov2_vitl14")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument(
        "--width", type=int, default=64, help="the backbone's embedding width (counts do not depend on it)"
    )
    parser.add_argument("--crop", type=int, default=128)
    parser.add_argument("--top", type=int, default=8, help="sources listed per phase")
    parser.add_argument("--predict", action="store_true", help="count one image's prediction instead of a step")
    args = parser.parse_args()

    from reinseg.build import build_segmentor
    from reinseg.config import BackboneConfig, ModelConfig
    from reinseg.data import label_values

    take_gpu_code_paths()
    torch.manual_seed(0)
    backbone = BackboneConfig(
        name=args.backbone, img_size=args.crop, patch_size=16, timm_kwargs={"embed_dim": args.width, "num_heads": 4}
    )
    segmentor = build_segmentor(ModelConfig(backbone=backbone), load_backbone_weights=False).train()
    if args.predict:
        count_prediction(segmentor.eval(), args)
        return
    trainable = [p for p in segmentor.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.05, fused=True)
    images, labels = synthetic_batch(args.batch, args.crop)
    values = [label_values(label) for label in labels]  # as the training loader's batches hold them

    def step(phases: dict[str, TorchDispatchMode] | None = None) -> None:
        phase = phases or collections.defaultdict(contextlib.nullcontext)
        with phase["forward and loss"]:
            loss = segmentor.loss(images, labels, label_values=values)["loss"]
        with phase["backward"]:
            loss.backward()
        with phase["optimizer"]:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state made, as from the second step on
    phases: dict[str, Launches] = {name: Launches() for name in ("forward and loss", "backward", "optimizer")}
    step(phases)  # type: ignore[arg-type]
    depth = len(segmentor.backbone.vit.blocks)
    print(
        f"# {args.backbone} ({depth} blocks, width {args.width}) + Rein + Mask2Former head, batch {args.batch}, "
        f"{args.crop} px, GPU code paths; torch {torch.__version__}"
    )
    print("| phase | operations that compute | views and allocations | the most from |")
    print("|---|---|---|---|")
    for name, counter in phases.items():
        top = ", ".join(f"{source} {n}" for source, n in counter.by_source.most_common(args.top))
        print(f"| {name} | {sum(counter.by_source.values())} | {counter.no_kernel} | {top} |")
    total = sum(sum(c.by_source.values()) for c in phases.values())
    print(f"\n{total} operations that compute per step")


def count_prediction(segmentor, args: argparse.Namespace) -> None:
    """Prints the operations of one ``predict`` call of a ``(crop, 2 crop)`` image, three windows."""
    image = torch.randn(1, 3, args.crop, 2 * args.crop, generator=torch.Generator().manual_seed(0))
    stride = round(args.crop * 341 / 512)
    depth = len(segmentor.backbone.vit.blocks)
    print(
        f"# {args.backbone} ({depth} blocks, width {args.width}) + Rein + Mask2Former head, one "
        f"{args.crop} x {2 * args.crop} image as three {args.crop} windows (stride {stride}), GPU code paths; "
        f"torch {torch.__version__}"
    )
    print("| windows per forward | operations that compute | views and allocations | the most from |")
    print("|---|---|---|---|")
    for window_batch in (1, 3):
        segmentor.window_batch = window_batch
        with torch.inference_mode():
            segmentor.predict(image, mode="slide", crop_size=args.crop, stride=stride)  # warm: caches made
            counter = Launches()
            with counter:
                segmentor.predict(image, mode="slide", crop_size=args.crop, stride=stride)
        top = ", ".join(f"{source} {n}" for source, n in counter.by_source.most_common(args.top))
        print(f"| {window_batch} | {sum(counter.by_source.values())} | {counter.no_kernel} | {top} |")


if __name__ == "__main__":
    main()
