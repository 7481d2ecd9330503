"""The ``reinseg`` command line: train, eval, predict, score, params, demo, and data/checkpoint tools."""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import signal
import sys
import textwrap
from pathlib import Path

from .allocator import keep_freed_memory

__all__ = ["main", "build_parser"]


def _cmd_backbones(args: argparse.Namespace) -> int:
    from .backbones import BACKBONES

    width = max(len(n) for n in BACKBONES)
    for name in sorted(BACKBONES):
        spec = BACKBONES[name]
        print(f"{name:<{width}}  {spec.family:<10}  {spec.timm_name:<45}  {spec.title}")
    return 0


# The row naming what a strategy added to the backbone in `reinseg params`.
_COMPONENT_NAMES = {"rein": "Rein", "vpt": "prompts", "set": "SET", "fada": "FADA"}


# reinseg params' options that describe a model without a config: flag -> (dest, default).
_PARAMS_MODEL_FLAGS = {
    "--backbone": ("backbone", "dinov2_vitl14"),
    "--img-size": ("img_size", 512),
    "--patch-size": ("patch_size", None),
    "--lora-dim": ("lora_dim", 16),
    "--token-length": ("token_length", 100),
    "--query-dims": ("query_dims", 256),
    "--num-classes": ("num_classes", 19),
    "--no-rein": ("no_rein", False),
}


def _cmd_params(args: argparse.Namespace) -> int:
    from .build import plan_segmentor
    from .config import BackboneConfig, HeadConfig, ModelConfig, ReinConfig, load_config
    from .parameters import format_parameter_table, format_strategy_table
    from .tuning import strategy_names

    if args.config:
        given = [flag for flag, (dest, default) in _PARAMS_MODEL_FLAGS.items() if getattr(args, dest) != default]
        if given:
            raise ValueError(
                f"{', '.join(given)} {'describes' if len(given) == 1 else 'describe'} a model without a config; "
                f"with {args.config} override its keys instead "
                "(e.g. model.backbone.name=dinov2_vitb14 model.backbone.img_size=1024)"
            )
        config = load_config(args.config, args.overrides).model
        title = f"{args.config}: {config.backbone.name}"
    else:
        if args.overrides:
            raise ValueError(f"KEY=VALUE overrides need a CONFIG: {' '.join(args.overrides)}")
        rein = None
        if not args.no_rein:
            rein = ReinConfig(
                lora_dim=args.lora_dim or None, token_length=args.token_length, query_dims=args.query_dims
            )
        config = ModelConfig(
            tuning="frozen" if rein is None else "rein",
            backbone=BackboneConfig(name=args.backbone, img_size=args.img_size, patch_size=_patch_size(args)),
            rein=rein,
            head=HeadConfig(num_classes=args.num_classes, feat_channels=args.query_dims),
        )
        title = args.backbone
    if args.tuning:
        rein_flags = [
            f
            for f in ("--lora-dim", "--token-length")
            if getattr(args, _PARAMS_MODEL_FLAGS[f][0]) != _PARAMS_MODEL_FLAGS[f][1]
        ]
        if args.tuning != "rein" and not args.compare and not args.config and rein_flags:
            raise ValueError(
                f"{', '.join(rein_flags)} describe{'s' if len(rein_flags) == 1 else ''} Rein's tokens, which "
                f"--tuning {args.tuning} does not use; its own sizes are keys of a config "
                f"(reinseg params CONFIG --tuning {args.tuning} model.KEY=VALUE)"
            )
        config.tuning = args.tuning
    if args.compare:
        rows, skipped = [], []
        from .backbones import backbone_kind
        from .tuning import get_strategy

        kind = backbone_kind(config.backbone.name)
        for tuning in (t for t in strategy_names() if kind in get_strategy(t).backbone_kinds):
            config.tuning = tuning
            try:
                segmentor = plan_segmentor(config)
            except RuntimeError as err:
                if not isinstance(err.__cause__, ImportError):
                    raise
                skipped.append(f"{tuning}: {err}")  # an optional library (peft for lora) is not installed
                continue
            backbone = sum(p.numel() for p in segmentor.backbone.parameters() if p.requires_grad)
            head = sum(p.numel() for p in segmentor.head.parameters())
            rows.append((tuning, backbone, head, sum(p.numel() for p in segmentor.parameters())))
        print(
            f"{title} at {config.backbone.img_size} px, Mask2Former head for {config.head.num_classes} classes: "
            "trainable parameters per tuning strategy"
        )
        print(format_strategy_table(rows))
        for note in skipped:
            print(f"skipped {note}")
        return 0
    # The meta device builds even giant models instantly and without memory.
    segmentor = plan_segmentor(config)
    rein = config.rein if config.tuning == "rein" else None
    patch = segmentor.backbone.patch_size[0]
    grid = f"patch {patch}" if segmentor.backbone.family.kind == "vit" else "images of any size"
    described = (
        f"tuning {config.tuning}"
        if rein is None
        else (f"Rein: {rein.token_length} tokens, rank {rein.lora_dim or 'full'}, {rein.query_dims}-d queries")
    )
    print(
        f"{title} at {config.backbone.img_size} px, {grid}, {described}, "
        f"Mask2Former head for {config.head.num_classes} classes"
    )
    backbone = segmentor.backbone
    added = [m for m in (backbone.rein, backbone.prompts) if m is not None]
    print(
        format_parameter_table(
            {
                "backbone"
                if any(p.requires_grad for p in backbone.vit.parameters())
                else "backbone (frozen)": backbone.vit,
                _COMPONENT_NAMES.get(config.tuning, config.tuning): added[0] if added else None,
                "head": segmentor.head,
            }
        )
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import train

    config = load_config(args.config, args.overrides)
    if args.output:
        config.train.output_dir = args.output
    out = Path(config.train.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"train.output_dir (--output) {out}: is a file, not a folder")
    task = train(config, resume=args.resume, overwrite=args.overwrite)
    finished = task.already_finished
    if finished is not None:
        finished_text = (
            f"the run in {out} is finished (its checkpoint is at iteration {finished}, "
            f"train.max_iters is {config.train.max_iters})"
        )
        if task.last_results is None:
            print(f"{finished_text}; nothing changed (raise train.max_iters to train further)")
            return 0
    if not task.trainer.is_global_zero:
        return 0
    if finished is not None:
        print(f"{finished_text}; its interrupted final validation is now done")
    else:
        print(f"checkpoints in {out / 'checkpoints'}, logs in {out}")
    if task.last_results is not None and task.last_results["mean_mIoU"] is not None:
        print(f"final mean mIoU: {task.last_results['mean_mIoU']:.2f}")
    return 0


def _patch_size(args: argparse.Namespace) -> int | None:
    """--patch-size: 16 (the paper's) for a ViT unless given, none for a CNN, 0 for the model's own."""
    if args.patch_size is not None:
        return args.patch_size or None
    from .backbones import BACKBONES
    from .families import get_family

    spec = BACKBONES.get(args.backbone)
    return None if spec is not None and get_family(spec.family).kind == "cnn" else 16


def _cmd_eval(args: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import evaluate, first_process
    from .protocols import parse_protocols

    config = load_config(args.config, args.overrides)
    if args.output:
        config.train.output_dir = args.output
    if args.protocol:
        protocols = parse_protocols(args.protocol, "--protocol")
    else:
        protocols = parse_protocols(config.model.test.protocols, "model.test.protocols")
    target = Path(args.json) if args.json else Path(config.train.output_dir) / "eval_metrics.json"
    # Refuse an unwritable destination now, not after the whole evaluation.
    _check_writable_file(target, "--json" if args.json else "the results file (default of --json)")
    if args.save_preds and first_process():  # the other DDP ranks start once it is ready
        _start_predictions_folder(Path(args.save_preds))
    if args.submission:
        from .submission import check_submission_target

        check_submission_target(config, Path(args.submission))
    examples = target.with_name(f"{target.stem}_examples")
    if args.save_examples:
        _check_examples_folder(examples)
    like = None
    if args.examples_like:
        if not args.save_examples:
            raise ValueError("--examples-like needs --save-examples N")
        from .report import load_results

        like = {}
        for model in load_results(args.examples_like):
            for domain, scores in model.domains.items():
                for entries in scores.get("examples", {}).values():
                    like.setdefault(domain, set()).update(e["image"] for e in entries)
    task = evaluate(
        config,
        args.checkpoint,
        save_predictions=args.save_preds,
        protocols=protocols,
        save_examples=args.save_examples or 0,
        examples_dir=examples,
        examples_like=like,
    )
    if not task.trainer.is_global_zero:
        return 0  # under DDP the first rank writes the results and makes the submission
    replaced = target.exists()
    _write_json(target, task.last_results)
    # Results of another checkpoint may have been there: say so (--json keeps them apart).
    print(f"wrote {target}" + (" (replacing the results that were there; --json chooses the file)" if replaced else ""))
    if args.submission:
        from .submission import write_acdc_submission

        with task.prediction_context():
            written = write_acdc_submission(task, Path(args.submission), protocols[0])
        print(f"ACDC test-server submission ({written} predictions, Cityscapes label IDs) in {args.submission}")
    if args.save_examples:
        print(f"examples (best, median, worst per domain) in {examples}; an HTML report with: reinseg report {target}")
    if args.save_preds:
        from .unfinished import release_folder

        release_folder(Path(args.save_preds))
        _print_score_commands(args, task)
    return 0


def _start_predictions_folder(folder: Path) -> None:
    """``--save-preds``: a new or empty folder (another evaluation's files would score with
    these), or one an interrupted or failed evaluation left (its marker names its process, gone),
    emptied first unless a folder inside it holds a marker of its own; then marked with this
    process until the evaluation ends (:mod:`reinseg.unfinished`)."""
    import shutil

    from .unfinished import MARKER, check_folder, claim_folder, markers_below

    if check_folder(folder, "eval", "--save-preds"):
        below = markers_below(folder)
        if below:
            raise ValueError(
                f"--save-preds {folder}: {below[0]} marks a folder inside it that another command writes or left "
                f"unfinished, which emptying it would delete: choose a new folder"
            )
        print(f"removing the incomplete predictions an interrupted evaluation left in {folder}", file=sys.stderr)
        marker = folder / MARKER
        for entry in folder.iterdir():
            if entry == marker:
                continue  # last: a kill midway leaves a folder the next evaluation still empties
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        marker.unlink()
    _check_writable_folder(folder, "--save-preds", empty=True)
    claim_folder(folder, "eval", "--save-preds")


def _check_examples_folder(examples: Path) -> None:
    """Where --save-examples writes: a folder of an earlier evaluation's examples, or none."""
    from .examples import check_replaceable

    if examples.exists() and not examples.is_dir():
        raise NotADirectoryError(20, "Not a directory (where --save-examples writes)", str(examples))
    check_replaceable(examples)


def _print_score_commands(args: argparse.Namespace, task) -> None:
    """After ``eval --save-preds``: where the predictions are and the ``reinseg score`` command
    of each domain."""
    print(f"predictions (train-ID PNGs) in {args.save_preds}/<domain>/, scored with e.g.:")
    from .data.classes import CITYSCAPES_CLASSES
    from .data.layouts import split_layout
    from .datamodule import domain_folder, label_root, native_labels, part_label_folders, prepared_elsewhere

    for domain, dataset, entry in task.val_sets():
        # Another class list is read from the config (the Cityscapes one is score's default).
        classes = "" if dataset.classes == CITYSCAPES_CLASSES else f" --config {args.config}"
        root = label_root(dataset)
        predictions = Path(args.save_preds) / domain_folder(domain)
        if prepared_elsewhere(dataset):
            # The layout's first label source is the one prepare writes (Mapillary's own folder).
            [(_, part_root, layout)] = split_layout(entry.name, Path(entry.root), entry.split, entry.options)
            print(f"  (labels of {domain} are not train IDs: `reinseg prepare {entry.name} {entry.root}` first)")
            folders = [(predictions, part_root / layout.labels[0].folder)]
        else:
            # One command per part (ACDC's conditions), whose labels all have a prediction.
            folders = [(predictions / part.relative_to(root), part) for part in part_label_folders(dataset)]
        for predicted, labels in folders:
            command = f"reinseg score {predicted} {labels}{classes}"
            if native_labels(dataset) and not prepared_elsewhere(dataset):  # score reads what prepare writes
                print(f"  (labels of {domain} are not train IDs: `reinseg prepare` them first) {command}")
            else:
                print(f"  {command}")


def _cmd_predict(args: argparse.Namespace) -> int:
    from .predict import predict_files
    from .unfinished import check_folder
    from .video import is_video, predict_video, probe_video

    options = dict(
        scale=args.scale or "checkpoint",
        mode=args.mode,
        flip=args.flip,
        device=args.device,
        backbone=args.backbone,
        window_batch=args.window_batch,
    )
    # Glob patterns are expanded first, so that 'clips/*.mp4' names videos, not a file.
    inputs = [
        match
        for item in args.images
        for match in (sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]) or [item]
    ]
    videos = [item for item in inputs if is_video(item)]
    images = [item for item in inputs if not is_video(item)]
    # Before any output, images' or videos': a folder another command writes or left unfinished is refused.
    check_folder(Path(args.output), "predict", "--output")
    stems: dict[str, str] = {}
    for video in videos:  # a bad video is refused before any image's prediction is written
        probe_video(video)
        other = stems.setdefault(Path(video).stem, video)
        if other != video:
            raise ValueError(f"{other} and {video} would both write {Path(video).stem}_overlay.mp4: rename one")
    if images:
        written = predict_files(args.checkpoint, images, args.output, **options)
        print(f"wrote {len(written)} predictions (train-ID PNGs and overlays) to {args.output}")
    for video in videos:
        written = predict_video(args.checkpoint, video, args.output, batch=args.batch, frames=args.frames, **options)
        print(f"wrote {written[0]}" + (f" and {len(written) - 1} frame PNGs" if args.frames else ""))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_onnx

    result = export_onnx(
        args.checkpoint,
        args.output,
        size=args.size,
        dynamic=args.dynamic,
        fold=not args.no_fold,
        backbone=args.backbone,
        **({} if args.tolerance is None else {"tolerance": args.tolerance}),
    )
    size = "x".join(map(str, result["size"]))
    shape = f"(B, 3, H, W), traced at {size}" if result["dynamic"] else f"(1, 3, {size.replace('x', ', ')})"
    checked = ", ".join(f"{k}: {v:.1e}" for k, v in result["max_error"].items())
    print(f"wrote {result['output']} (ONNX opset {result['opset']}, input 'images' {shape})")
    print(f"onnxruntime vs PyTorch, max |logit difference|: {checked}")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from .data.classes import CITYSCAPES_CLASSES
    from .metrics import format_scores_table, score_directories

    classes = CITYSCAPES_CLASSES
    if args.config:
        from .config import load_config, to_dict
        from .data.layouts import config_classes

        # Checked as a run's: a malformed file or entry is named, not a traceback.
        config = load_config(args.config)
        try:
            classes = config_classes(to_dict(config))
        except ValueError as err:
            raise ValueError(f"{args.config}: {err}") from None
    names = classes.names
    results = score_directories(args.predictions, args.labels, names, label_suffix=args.label_suffix)
    print(format_scores_table({Path(args.labels).name or "scores": results}, names))
    miou = "- (no labelled pixel)" if results["mIoU"] is None else f"{results['mIoU']:.2f}"
    print(f"{results['num_images']} images, mIoU {miou}")
    if args.json:
        _write_json(Path(args.json), results)
        print(f"wrote {args.json}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    page = write_report(args.results, args.output, names=args.name, source=args.source, title=args.title)
    print(f"wrote {page} (open it in a browser; it needs no server)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    # Before torch is imported: its OpenMP runtime reads these once, when it loads. Threads that
    # wait for work sleep instead of spinning, which on a busy machine would take the cores the
    # other threads (and other processes) need.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    from .demo import DEMO_ITERS, run_demo

    run_demo(args.output, seed=args.seed, max_iters=args.iters or DEMO_ITERS, threads=args.threads)
    return 0


def _cmd_convert_official(args: argparse.Namespace) -> int:
    from .official import convert_official

    config_file, checkpoint = convert_official(args.config, args.checkpoint, args.backbone, args.output)
    print(f"wrote {config_file}")
    print(f"wrote {checkpoint}")
    print(f"evaluate with: reinseg eval {config_file} {checkpoint}  (add a data.val section for your datasets)")
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .checkpoints import merge_checkpoint

    _check_writable_file(Path(args.output), "--output")
    print(f"wrote {merge_checkpoint(args.checkpoint, args.output, backbone=args.backbone)}")
    print(f"evaluate with: reinseg eval CONFIG {args.output} model.tuning=full  (CONFIG: the run's config)")
    return 0


def _check_writable_folder(folder: Path, option: str, empty: bool = False) -> None:
    """Create ``folder`` and write a file in it, or raise a ValueError naming ``option``; with
    ``empty``, also when it holds anything (another evaluation's files would mix with the new
    ones, and score as one)."""
    from .checkpoints import probe_writable_folder
    from .examples import BROWSER_FILES

    if empty and folder.is_dir() and any(entry.name not in BROWSER_FILES for entry in folder.iterdir()):
        raise ValueError(f"{option} {folder} is not empty: choose a new folder or empty it")
    try:
        probe_writable_folder(folder)
    except OSError as err:
        raise ValueError(f"{option} {folder}: {err.strerror}") from None


def _check_writable_file(path: Path, option: str) -> None:
    if path.is_dir():
        raise ValueError(f"{option} {path}: is a folder, not a file")
    _check_writable_folder(path.parent, option)


def _device(text: str):
    from .device import usable_device

    try:
        return str(usable_device(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _write_json(path: Path, payload) -> None:
    from .checkpoints import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(payload, indent=2).encode())


def _parser(sub, name: str, help: str, description: str, example: str) -> argparse.ArgumentParser:
    return sub.add_parser(
        name,
        help=help,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n" + textwrap.indent(textwrap.dedent(example).strip(), "  "),
    )


def _backbone_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backbone",
        default=None,
        metavar="FILE",
        help="the VFM weight file (default: the one the checkpoint references, model.backbone.checkpoint; "
        "a checkpoint does not hold the frozen VFM)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reinseg",
        description="Rein: domain-generalized semantic segmentation with frozen vision foundation models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    overrides_help = "config overrides key.path=value, e.g. train.max_iters=1000 data.batch_size=2"

    p = _parser(
        sub,
        "train",
        "train Rein + head as a config says",
        "Train on data.train, validating on data.val every train.val_interval iterations. Checkpoints "
        "(Rein + head + optimizer state; the VFM is referenced, not copied) go to "
        "<train.output_dir>/checkpoints; a killed run resumes exactly from its newest checkpoint when started "
        "again. On SIGTERM it writes last.ckpt and exits with status 143, on Ctrl-C likewise with status 130 (a second "
        "Ctrl-C stops it at once, without saving); bad options exit with status 2.",
        "reinseg train configs/rein_dinov2-l_gta_512.yaml train.output_dir=work_dirs/gta data.batch_size=2",
    )
    p.add_argument("config", metavar="CONFIG", help="YAML config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)
    p.add_argument("--output", default=None, help="output folder (overrides train.output_dir)")
    p.add_argument(
        "--resume",
        default="auto",
        help="'auto' (default: continue from the newest checkpoint in <output>/checkpoints if any; a finished "
        "run is left as it is), 'never' (a new run: refused where checkpoints exist, unless --overwrite), "
        "or a checkpoint path",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="with --resume never: delete the earlier run's checkpoints, logs and metrics in the output folder",
    )
    p.set_defaults(func=_cmd_train)

    p = _parser(
        sub,
        "eval",
        "evaluate a checkpoint on the config's validation sets",
        "Per-domain mIoU, per-class IoU and aAcc on data.val, and their mean over the target domains; "
        "printed as a table and written as JSON.",
        "reinseg eval configs/rein_dinov2-l_gta_512.yaml work_dirs/gta/checkpoints/last.ckpt --save-preds preds",
    )
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a reinseg checkpoint (training or converted)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)
    p.add_argument(
        "--save-preds",
        default=None,
        metavar="DIR",
        help="also write the predictions as train-ID PNGs, mirroring each domain's label folder",
    )
    p.add_argument("--json", default=None, help="results file (default <train.output_dir>/eval_metrics.json)")
    p.add_argument(
        "--output",
        default=None,
        help="folder of the default results file, <output>/eval_metrics.json (overrides train.output_dir)",
    )
    p.add_argument(
        "--protocol",
        action="append",
        default=None,
        metavar="NAME",
        help="test protocol(s), repeatable or comma-separated, all in one pass over the data: config (default: "
        "the config's scales and model.test), official, highres, ms-flip (README, 'Evaluation protocols')",
    )
    p.add_argument(
        "--submission",
        default=None,
        metavar="DIR",
        help="also predict the ACDC test images (the root of the config's acdc entry) under the first protocol and "
        "write the test server's format: DIR/<condition>/test/<sequence>/<name>_rgb_anon.png in Cityscapes label "
        "IDs, and DIR/submission.zip",
    )
    p.add_argument(
        "--save-examples",
        type=_positive_int,
        default=None,
        metavar="N",
        help="also record what `reinseg report` shows: per domain the confusion matrix, per-image scores, and "
        "the N best, median and worst images with their predictions (PNGs in <results>_examples/ beside the "
        "results file; docs/report.md)",
    )
    p.add_argument(
        "--examples-like",
        action="append",
        default=None,
        metavar="RESULTS",
        help="with --save-examples: also save the predictions of the images these results files chose "
        "(another model's), so that a report shows every model on the same images",
    )
    p.set_defaults(func=_cmd_eval)

    p = _parser(
        sub,
        "predict",
        "segment images with a checkpoint",
        "Segment images (files, folders or glob patterns) and write, per image, <stem>_labelTrainIds.png "
        "(train IDs) and <stem>_overlay.png (the colours of the checkpoint's classes over the image). "
        "Photos are turned upright as their EXIF orientation says. Videos (.mp4, .mov, .avi, .mkv, .webm, ...; needs "
        "`pip install reinseg[video]`) give <stem>_overlay.mp4, and with --frames <stem>_frames/ of PNGs.",
        """
                reinseg predict work_dirs/gta/checkpoints/last.ckpt street.jpg photos/ 'more/*.png' --output out
                reinseg predict work_dirs/gta/checkpoints/last.ckpt drive.mp4 --output out --batch 4 --frames""",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("images", nargs="+", metavar="IMAGES")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument(
        "--scale",
        type=_positive_int,
        nargs=2,
        default=None,
        metavar=("LONG", "SHORT"),
        help="resize (keeping the ratio) to fit LONG x SHORT before inference; predictions are resized "
        "back (default: the scale the checkpoint was evaluated at, that of its first data.val set; "
        "if it records none, Cityscapes' in the official configs of its crop: 1024 512, or 2048 1024 from "
        "1024 px crops)",
    )
    p.add_argument("--mode", choices=["whole", "slide"], default=None, help="default: the checkpoint's test mode")
    p.add_argument(
        "--window-batch",
        type=_positive_int,
        default=None,
        help="slide mode: windows run through the model at once (default: the checkpoint's model.test.window_batch, "
        "1 if it has none); the same scores up to float rounding; SET and FADA models run one at a time",
    )
    p.add_argument(
        "--flip",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="average with the mirrored image (--no-flip: never; default: the checkpoint's model.test.flip)",
    )
    p.add_argument("--device", type=_device, default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument(
        "--batch", type=_positive_int, default=8, help="video frames run through the model at once (default 8)"
    )
    p.add_argument("--frames", action="store_true", help="videos: also write each frame's train-ID PNG and overlay PNG")
    _backbone_option(p)
    p.set_defaults(func=_cmd_predict)

    p = _parser(
        sub,
        "export",
        "export a checkpoint's segmentor to ONNX",
        "Write the whole segmentor (VFM + Rein + Mask2Former head) as one ONNX graph (opset 18): normalized "
        "images 'images' (B, 3, H, W) -> class scores 'logits' (B, K, H, W), whose argmax is what `predict` "
        "writes (whole-image inference). The graph is checked with onnxruntime against PyTorch before it is "
        "written. Needs `pip install reinseg[export]`.",
        "reinseg export work_dirs/gta/checkpoints/last.ckpt --format onnx --size 512 1024 --output rein.onnx",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument("--format", choices=["onnx"], default="onnx", help="only onnx for now")
    p.add_argument("--output", required=True, help="the .onnx file")
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--size",
        type=_positive_int,
        nargs=2,
        default=None,
        metavar=("H", "W"),
        help="the fixed input size, multiples of the patch size (default: the backbone's img_size)",
    )
    group.add_argument("--dynamic", action="store_true", help="free batch, H and W (multiples of the patch size)")
    p.add_argument(
        "--no-fold", action="store_true", help="keep Rein's token computations in the graph (default: precomputed)"
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        metavar="T",
        help="the largest |onnxruntime - PyTorch| logit difference accepted before writing (default 1e-4; "
        "SET's graphs need more, see README)",
    )
    _backbone_option(p)
    p.set_defaults(func=_cmd_export)

    p = _parser(
        sub,
        "score",
        "score saved predictions against labels",
        "Score train-ID PNG predictions against train-ID PNG labels matched by relative path, as the "
        "official Cityscapes evaluation does (classes absent from both are left out of the mean).",
        "reinseg score preds/cityscapes data/cityscapes/gtFine/val --json scores.json",
    )
    p.add_argument("predictions", metavar="PRED_DIR")
    p.add_argument("labels", metavar="GT_DIR")
    p.add_argument("--json", default=None, help="write the scores: mIoU (0-100) and IoU per class (null: absent)")
    p.add_argument(
        "--label-suffix",
        default=None,
        help="which files under GT_DIR are labels (default: *labelTrainIds.png if any, else *.png)",
    )
    p.add_argument(
        "--config",
        default=None,
        help="score in the classes of this config's first data.val dataset (default: the 19 Cityscapes classes)",
    )
    p.set_defaults(func=_cmd_score)

    p = _parser(
        sub,
        "report",
        "an HTML report comparing evaluation results",
        "One static HTML page (DIR/index.html and its pictures; no server, no network) from one or more "
        "results files of reinseg eval, one model each: mIoU per domain, per-class IoU bars, the classes "
        "that lose most from source to target, and, from results written with --save-examples, confusion "
        "matrices and the best, median and worst images with each model's prediction and errors.",
        """
                reinseg eval frozen.yaml frozen.ckpt --json frozen.json --save-examples 3
                reinseg eval rein.yaml rein.ckpt --json rein.json --save-examples 3
                reinseg report frozen.json rein.json --name frozen --name Rein --output report""",
    )
    p.add_argument("results", nargs="+", metavar="RESULTS", help="results JSON files of reinseg eval")
    p.add_argument("--output", required=True, metavar="DIR", help="folder of the report (replaced if a report)")
    p.add_argument(
        "--name",
        action="append",
        default=None,
        help="a model name per results file, in order (default: the file's 'model' key, else its name)",
    )
    p.add_argument(
        "--source",
        default=None,
        help="the source domain for the per-class losses (default: the first domain outside the mean)",
    )
    p.add_argument("--title", default="reinseg evaluation report", help="the page's title")
    p.set_defaults(func=_cmd_report)

    p = _parser(
        sub,
        "params",
        "parameter table: frozen backbone, Rein, head",
        "Build the model of a config (or of the options below) on the meta device (no weights, no memory) "
        "and print its parameter counts and trainable share.",
        """
                reinseg params configs/rein_dinov2-l_gta_512.yaml
                reinseg params --backbone eva02_vitl14 --lora-dim 0   # full-rank tokens""",
    )
    p.add_argument(
        "config", nargs="?", metavar="CONFIG", help="a YAML config (else the options below, but --tuning and --compare)"
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=overrides_help)
    flags = {flag: default for flag, (_, default) in _PARAMS_MODEL_FLAGS.items()}
    p.add_argument("--backbone", default=flags["--backbone"], help="zoo name (see `reinseg backbones`)")
    p.add_argument("--img-size", type=int, default=flags["--img-size"], help="input resolution (default 512)")
    p.add_argument(
        "--patch-size",
        type=int,
        default=flags["--patch-size"],
        help="patch size (default 16, the paper's, for a ViT; none for a CNN; 0: the model's own)",
    )
    p.add_argument(
        "--lora-dim",
        type=int,
        default=flags["--lora-dim"],
        help="rank of the Rein tokens, 0 for full rank (default 16)",
    )
    p.add_argument(
        "--token-length", type=int, default=flags["--token-length"], help="Rein tokens per layer (default 100)"
    )
    p.add_argument(
        "--query-dims", type=int, default=flags["--query-dims"], help="width of the linked queries (default 256)"
    )
    p.add_argument("--num-classes", type=int, default=flags["--num-classes"], help="classes of the head (default 19)")
    p.add_argument("--no-rein", action="store_true", help="the plain frozen backbone (without a CONFIG)")
    p.add_argument(
        "--tuning",
        default=None,
        help="a tuning strategy (rein, frozen, full, lora, vpt, adaptformer, soma, fada, set)",
    )
    p.add_argument("--compare", action="store_true", help="trainable parameters of every tuning strategy")
    p.set_defaults(func=_cmd_params)

    p = _parser(
        sub, "backbones", "list the backbone zoo", "List the backbones, with their timm models.", "reinseg backbones"
    )
    p.set_defaults(func=_cmd_backbones)

    p = _parser(
        sub,
        "demo",
        "train and evaluate on the synthetic domain-shift benchmark (offline, CPU)",
        "Generate the synthetic street scenes, train Rein + head on a small ViT on the source domain, "
        "evaluate on the unseen target domains, and write metrics.json, a picture per domain and an HTML report "
        "(report/index.html).",
        "reinseg demo --output reinseg-demo",
    )
    p.add_argument("--output", default="reinseg-demo", help="output folder (default ./reinseg-demo)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the synthetic scenes, the model and training (default 0)"
    )
    p.add_argument("--iters", type=_positive_int, default=None, help="training iterations (default 250)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: the cores not already busy, from the 1-minute load average)",
    )
    p.set_defaults(func=_cmd_demo)

    p = _parser(
        sub,
        "convert-official",
        "convert an official Rein release to a reinseg checkpoint",
        "Read an official Rein config (a Python file, read without executing it) and its released weights, "
        "check that they fit each other, and write DIR/config.yaml and DIR/checkpoint.pt. The backbone "
        "weights are referenced by path, not copied.",
        """
                reinseg convert-official --config config.py --checkpoint iter_40000_published.pth \\
                    --backbone checkpoints/dinov2_converted.pth --output checkpoints/rein_gta""",
    )
    p.add_argument("--config", required=True, help="the official config .py (e.g. the release's config.py)")
    p.add_argument("--checkpoint", required=True, help="the released .pth (backbone.reins.* and decode_head.*)")
    p.add_argument(
        "--backbone",
        default=None,
        help="the frozen backbone's weights: DINOv2 / EVA02 (original release or converted by the official "
        "script), ResNet V1c (mmseg names) or ConvNeXt (mmpretrain names), or timm's; refused where the release "
        "holds them (backbone.*: a full fine-tuning release, or one written by generate_full_weights.py)",
    )
    p.add_argument("--output", required=True, help="output folder")
    p.set_defaults(func=_cmd_convert_official)

    p = _parser(
        sub,
        "merge",
        "fold a checkpoint's SoMA or LoRA adapters into the backbone's weights",
        "Merge the tuning strategy's modules into the VFM's own weights and write a self-contained checkpoint "
        "of the plain model (model.tuning: full, every weight stored) with the same logits and no inference cost.",
        "reinseg merge work_dirs/soma_dinov2-l_gta_512/checkpoints/last.ckpt --output soma_merged.pt",
    )
    p.add_argument("checkpoint", help="a reinseg checkpoint of a mergeable strategy (soma, lora)")
    p.add_argument("--output", required=True, help="the merged checkpoint to write")
    _backbone_option(p)
    p.set_defaults(func=_cmd_merge)

    from .data.commands import register_commands

    register_commands(sub)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, with ``KEY=VALUE`` overrides taken after options too
    (``reinseg eval CONFIG CKPT --json x.json data.num_workers=0``): argparse ends a ``nargs="*"``
    positional at the first option. Anything else left over is the subcommand's usage error."""
    args, rest = parser.parse_known_args(argv)
    subcommand = _subparsers(parser)[args.command]
    overrides = [a for a in rest if _OVERRIDE.match(a)]
    if overrides and hasattr(args, "overrides"):
        args.overrides = list(args.overrides or []) + overrides
        rest = [a for a in rest if not _OVERRIDE.match(a)]
    if rest:
        subcommand.error(f"unrecognized arguments: {' '.join(rest)}")
    return args


_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\[\]-]*=")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_command_line(parser, argv)
    try:
        # Freed tensors stay in the process for the next step instead of coming back as new
        # pages (reinseg.allocator; REINSEG_ALLOCATOR=system opts out).
        keep_freed_memory()
        return args.func(args)
    except KeyboardInterrupt:
        # Ctrl-C where no command stops gracefully (train and eval do): a line, not a traceback.
        if os.environ.get("REINSEG_DEBUG"):
            raise
        print(f"reinseg {args.command}: stopped by Ctrl-C", file=sys.stderr)
        return 128 + signal.SIGINT
    except (ValueError, OSError, RuntimeError, FloatingPointError) as err:
        # Errors with their own exit status (engine.TrainingInterrupted: 143, 130) are not failures.
        status = getattr(err, "exit_status", None)
        if status is not None:
            print(f"reinseg {args.command}: {err}", file=sys.stderr)
            return status
        if os.environ.get("REINSEG_DEBUG"):
            raise
        print(f"reinseg {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2


def _one_line(err: BaseException) -> str:
    """An error as one line; OS errors as "reason: path" (their str() shows the errno)."""
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        text = f"{err.strerror}: {err.filename}" + (f" -> {err.filename2}" if err.filename2 else "")
    else:
        text = str(err)
    return " ".join(text.split()) if "\n" in text else text


if __name__ == "__main__":
    sys.exit(main())
