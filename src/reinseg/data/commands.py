"""The ``prepare`` and ``check-data`` subcommands, for the main ``reinseg`` parser.

``register_commands(subparsers)`` adds both; each sets ``func(args) -> exit code``. Problems with
the arguments or the data raise ValueError / FileNotFoundError, which the main CLI prints as
``reinseg <command>: error: ...``. Exit codes: 0 all good, 1 the data has problems (listed).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from .layouts import ACDC_CONDITIONS, DATASETS
from .prepare import NO_PREPARATION, NO_PREPARATION_MESSAGE, ON_MISMATCH, PREPARABLE, prepare

__all__ = ["register_commands"]


def _cmd_prepare(args: argparse.Namespace) -> int:
    if args.dataset in NO_PREPARATION:  # not a failure: a script preparing every dataset goes on
        print(NO_PREPARATION_MESSAGE.format(dataset=args.dataset))
        return 0
    summary = prepare(
        args.dataset, args.root, workers=args.workers, overwrite=args.overwrite, on_mismatch=args.on_mismatch
    )
    print(summary)
    return 0 if summary.ok else 1


def _cmd_check_data(args: argparse.Namespace) -> int:
    from .check import check

    options = {}
    if args.condition:
        options["condition"] = args.condition
    if args.domain:
        options["domain"] = args.domain
    if args.classes:
        options["classes"] = args.classes
    if args.image_suffix:
        options["image_suffix"] = args.image_suffix
    reports = check(
        args.target, dataset=args.dataset, split=args.split, workers=args.workers, on_error=args.on_error, **options
    )
    for report in reports:
        print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in reports], indent=2))
        print(f"wrote {args.json}")
    bad = [f"{r.name} {r.split}" for r in reports if not r.ok]
    print(f"problems in: {', '.join(bad)}" if bad else "all datasets are clean")
    return 1 if bad else 0


def register_commands(subparsers) -> None:
    """Add ``prepare`` and ``check-data`` to an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "prepare",
        help="convert a dataset's labels to train IDs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            Convert a dataset's native labels to Cityscapes train-ID PNGs as the official Rein
            tools do (GTAV, Synthia, UrbanSyn, Cityscapes label IDs; Mapillary's 66 classes, plus
            its half-resolution validation set). Re-running skips finished files; a summary lists
            files written, skipped, size mismatches (and what was done) and errors.
            BDD100K and ACDC ship train IDs and need no preparation. Layouts: docs/datasets.md."""
        ),
        epilog=textwrap.dedent(
            """\
            example:
              reinseg prepare gtav data/gta --workers 8
              reinseg prepare mapillary data/mapillary"""
        ),
    )
    p.add_argument("dataset", metavar="DATASET", help=f"one of: {', '.join(PREPARABLE)}")
    p.add_argument("root", metavar="ROOT", help="the dataset's root folder")
    p.add_argument("--workers", type=int, default=None, help="processes (default: the cores, up to 8)")
    p.add_argument("--overwrite", action="store_true", help="redo files that are already converted")
    p.add_argument(
        "--on-mismatch",
        choices=ON_MISMATCH,
        default="resize",
        help="a label whose size differs from its image: resize it to the image (nearest, "
        "default), skip it, or raise (report it as an error)",
    )
    p.set_defaults(func=_cmd_prepare)

    p = subparsers.add_parser(
        "check-data",
        help="count pairs, find broken files, histogram the classes",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent(
            """\
            List for each dataset split: the number of image/label pairs, files without a partner,
            unreadable files, size mismatches, label values outside the dataset's classes
            ({0..18, 255}; {0..N-1, 255} for a custom dataset of N classes) with the files, and
            the class histogram. CONFIG_OR_ROOT is a dataset root (its dataset recognised by
            the layout, or named with --dataset) or a YAML config with a `data` section.
            Exits 1 when any problem is found (2 with --on-error raise, at the first)."""
        ),
        epilog=textwrap.dedent(
            """\
            example:
              reinseg check-data data/cityscapes --split val
              reinseg check-data data/acdc --condition night --json acdc_night.json
              reinseg check-data configs/rein_dinov2-l_gta_512.yaml
              reinseg check-data data/cracks --dataset custom --split val --classes background crack"""
        ),
    )
    p.add_argument("target", metavar="CONFIG_OR_ROOT", help="a dataset root or a YAML config")
    p.add_argument("--dataset", choices=list(DATASETS), default=None, help="the dataset at ROOT (default: detected)")
    p.add_argument("--split", default=None, help="one split (default: every split present)")
    p.add_argument("--condition", choices=ACDC_CONDITIONS + ("all",), default=None, help="ACDC condition")
    p.add_argument("--domain", default=None, help="synthetic domain (default: every domain present)")
    p.add_argument("--classes", nargs="+", default=None, help="custom dataset: its class names, in label order")
    p.add_argument("--image-suffix", default=None, help="custom dataset: how image files end (default .png)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: the cores, up to 8)")
    p.add_argument(
        "--on-error",
        choices=("raise", "skip"),
        default="skip",
        help="stop at the first problem (raise) or list them all (skip, default)",
    )
    p.add_argument("--json", metavar="OUT", default=None, help="also write the reports as JSON to OUT")
    p.set_defaults(func=_cmd_check_data)
