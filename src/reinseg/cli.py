"""The ``reinseg`` command line."""

from __future__ import annotations

import argparse
import sys
import textwrap

__all__ = ["main"]


def _cmd_backbones(args: argparse.Namespace) -> int:
    from .backbones import BACKBONES

    width = max(len(n) for n in BACKBONES)
    for name in sorted(BACKBONES):
        spec = BACKBONES[name]
        print(f"{name:<{width}}  {spec.family:<6}  {spec.timm_name:<45}  {spec.title}")
    return 0


def _cmd_params(args: argparse.Namespace) -> int:
    import torch

    from .config import BackboneConfig, HeadConfig, ModelConfig, ReinConfig
    from .parameters import format_parameter_table
    from .segmentor import build_segmentor

    rein = None
    if not args.no_rein:
        rein = ReinConfig(lora_dim=args.lora_dim or None, token_length=args.token_length, query_dims=args.query_dims)
    config = ModelConfig(
        backbone=BackboneConfig(name=args.backbone, img_size=args.img_size, patch_size=args.patch_size or None),
        rein=rein,
        head=HeadConfig(num_classes=args.num_classes, feat_channels=args.query_dims),
    )
    # The meta device builds even giant models instantly and without memory.
    with torch.device("meta"):
        segmentor = build_segmentor(config, load_backbone_weights=False)
    patch = segmentor.backbone.patch_size[0]
    described = "no Rein" if rein is None else (
        f"Rein: {rein.token_length} tokens, rank {rein.lora_dim or 'full'}, {rein.query_dims}-d queries")
    print(f"{args.backbone} at {args.img_size} px, patch {patch}, {described}, "
          f"Mask2Former head for {args.num_classes} classes")
    print(format_parameter_table({
        "backbone (frozen)": segmentor.backbone.vit,
        "Rein": segmentor.backbone.rein,
        "head": segmentor.head,
    }))
    return 0


def _cmd_convert_official(args: argparse.Namespace) -> int:
    from .official import convert_official

    config_file, checkpoint = convert_official(args.config, args.checkpoint, args.backbone, args.output)
    print(f"wrote {config_file}")
    print(f"wrote {checkpoint}")
    print(f"evaluate with: reinseg eval {config_file} {checkpoint}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reinseg",
        description="Rein: domain-generalized semantic segmentation with frozen vision foundation models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "backbones",
        help="list the backbone zoo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="List the backbones build_backbone accepts, with their timm models.",
        epilog="example:\n  reinseg backbones",
    )
    p.set_defaults(func=_cmd_backbones)

    p = sub.add_parser(
        "params",
        help="parameter table of a backbone with Rein and the Mask2Former head",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build a backbone with Rein and the Mask2Former head on the meta device (no weights, "
        "no memory) and print their parameter counts: frozen backbone, Rein, head, trainable share.",
        epilog=textwrap.dedent(
            """\
            examples:
              reinseg params --backbone dinov2_vitl14                # the paper's 2.99 M
              reinseg params --backbone eva02_vitl14 --lora-dim 0    # full-rank tokens"""
        ),
    )
    p.add_argument("--backbone", default="dinov2_vitl14", help="zoo name (see `reinseg backbones`)")
    p.add_argument("--img-size", type=int, default=512, help="input resolution (default 512)")
    p.add_argument("--patch-size", type=int, default=16, help="patch size (default 16, the paper's setting; 0: the model's own)")
    p.add_argument("--lora-dim", type=int, default=16, help="rank of the Rein tokens, 0 for full rank (default 16)")
    p.add_argument("--token-length", type=int, default=100, help="Rein tokens per layer (default 100)")
    p.add_argument("--query-dims", type=int, default=256, help="width of the linked queries (default 256)")
    p.add_argument("--num-classes", type=int, default=19, help="classes of the head (default 19)")
    p.add_argument("--no-rein", action="store_true", help="the plain frozen backbone")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser(
        "convert-official",
        help="convert an official Rein release (mmseg config + .pth) to a reinseg checkpoint",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Read an official Rein config (a Python file, read without executing it) and its "
        "released weights, check that they fit each other, and write DIR/config.yaml and DIR/checkpoint.pt. "
        "The backbone weights are referenced by path, not copied.",
        epilog=textwrap.dedent(
            """\
            example:
              reinseg convert-official --config config.py --checkpoint iter_40000_published.pth \\
                  --backbone checkpoints/dinov2_converted.pth --output checkpoints/rein_gta"""
        ),
    )
    p.add_argument("--config", required=True, help="the official config .py (e.g. the release's config.py)")
    p.add_argument("--checkpoint", required=True, help="the released .pth (backbone.reins.* and decode_head.*)")
    p.add_argument("--backbone", default=None,
                   help="the DINOv2 weights (original release or converted by the official script); "
                   "omit if the release holds them")
    p.add_argument("--output", required=True, help="output folder")
    p.set_defaults(func=_cmd_convert_official)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, TypeError) as err:
        print(f"reinseg {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
