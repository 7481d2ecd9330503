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

    from .backbones import build_backbone
    from .parameters import format_parameter_table

    rein = None
    if not args.no_rein:
        rein = dict(lora_dim=None if args.lora_dim == 0 else args.lora_dim, token_length=args.token_length,
                    query_dims=args.query_dims)
    # The meta device builds even giant models instantly and without memory.
    with torch.device("meta"):
        backbone = build_backbone(args.backbone, rein=rein, img_size=args.img_size, patch_size=args.patch_size or None)
    patch = backbone.patch_size[0]
    described = "no Rein" if rein is None else (
        f"Rein: {args.token_length} tokens, rank {rein['lora_dim'] or 'full'}, {args.query_dims}-d queries")
    print(f"{args.backbone} at {args.img_size} px, patch {patch}, {described}")
    print(format_parameter_table({"backbone (frozen)": backbone.vit, "Rein": backbone.rein}))
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
        help="parameter table of a backbone with Rein",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build a backbone with Rein on the meta device (no weights, no memory) and print "
        "its parameter counts: frozen backbone, Rein, trainable share.",
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
    p.add_argument("--no-rein", action="store_true", help="the plain frozen backbone")
    p.set_defaults(func=_cmd_params)
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
