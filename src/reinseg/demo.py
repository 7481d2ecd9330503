"""The offline demo: Rein on the synthetic domain-shift benchmark, on a CPU, in a few minutes.

It generates the synthetic street scenes (:mod:`reinseg.data.synthetic`), trains Rein + the
Mask2Former head on a small ViT on the ``game`` domain only, and evaluates on the held-out ``game``
images and on the unseen ``real``, ``dusk`` and ``fog`` domains, and writes the HTML report of
:mod:`reinseg.report` from that evaluation. The small ViT has random weights:
no foundation model can be downloaded here, so the numbers show the pipeline working end to end,
not what a pretrained VFM reaches (see the README for a real run).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch

from .config import (
    BackboneConfig,
    Config,
    DataConfig,
    HeadConfig,
    LossConfig,
    ModelConfig,
    ReinConfig,
    TestConfig,
    TrainConfig,
    dump_config,
)

if TYPE_CHECKING:
    from .data.classes import ClassList

__all__ = ["DEMO_ITERS", "demo_config", "free_cores", "run_demo", "comparison_picture"]

SIZE = (128, 256)  # synthetic images, (H, W)
DEMO_ITERS = 250  # about 2.5 minutes of training on 2 CPU cores
DEMO_EXAMPLES = 2  # best, median and worst images per domain in the demo's report


def demo_config(root: Path, output: Path, max_iters: int = DEMO_ITERS, seed: int = 0) -> Config:
    """The demo's configuration: a small ViT (random weights) + Rein + a small Mask2Former head."""
    from .data.synthetic import DOMAINS

    model = ModelConfig(
        tuning="rein",
        backbone=BackboneConfig(
            name="dinov2_vits14",
            img_size=128,
            patch_size=8,
            out_indices=[1, 2, 3, 5],
            timm_kwargs=dict(embed_dim=96, depth=6, num_heads=3),
        ),
        rein=ReinConfig(token_length=16, lora_dim=8, query_dims=64),
        head=HeadConfig(
            num_classes=19,
            feat_channels=64,
            out_channels=64,
            num_heads=4,
            num_decoder_layers=3,
            decoder_ffn_dims=256,
            num_encoder_layers=2,
            encoder_ffn_dims=256,
            num_groups=16,
        ),
        loss=LossConfig(num_points=2048),
        test=TestConfig(mode="whole"),
    )
    data = DataConfig(
        train=[dict(name="synthetic", root=str(root), split="train", domain=DOMAINS[0])],
        val=[
            dict(
                name="synthetic",
                root=str(root),
                split="val",
                domain=d,
                label=d,
                scale=[SIZE[1], SIZE[0]],
                in_mean=d != DOMAINS[0],
            )
            for d in DOMAINS
        ],
        crop_size=128,
        base_size=128,
        max_size=512,
        batch_size=8,
        num_workers=0,
    )
    train = TrainConfig(
        max_iters=max_iters,
        lr=1e-3,
        warmup_iters=20,
        val_interval=max_iters,
        checkpoint_interval=max_iters,
        keep_checkpoints=1,
        log_interval=10,
        seed=seed,
        accelerator="cpu",
        devices=1,
        output_dir=str(output / "run"),
    )
    return Config(model=model, data=data, train=train)


def free_cores() -> int:
    """The cores this process may use that other processes are not already busy on: the cores it
    is allowed to run on, less the machine's 1-minute load average (at least one)."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = round(os.getloadavg()[0])
    except OSError:  # no load average on this platform
        busy = 0
    return max(1, min(allowed, (os.cpu_count() or allowed) - busy))


def _remove_results(output: Path) -> None:
    """An earlier demo's results, deleted before this one starts: stopped midway, it would leave
    them beside a new config and run that they do not describe. A ``report`` or
    ``results_examples`` folder that holds other files than the demo writes is refused first, as
    writing them would refuse it (a user's own files are never deleted)."""
    import shutil

    from .data.synthetic import DOMAINS
    from .examples import check_replaceable
    from .report import _check_replaceable as check_report_replaceable

    check_report_replaceable(output / "report")
    check_replaceable(output / "results_examples")
    for name in ("metrics.json", "results.json", *(f"{domain}.png" for domain in DOMAINS)):
        (output / name).unlink(missing_ok=True)
    for folder in ("report", "results_examples"):
        shutil.rmtree(output / folder, ignore_errors=True)


def run_demo(
    output: str | Path = "reinseg-demo",
    seed: int = 0,
    max_iters: int = DEMO_ITERS,
    num_train: int = 400,
    num_val: int = 50,
    threads: int | None = None,
) -> dict:
    """Generate, train, evaluate; writes ``metrics.json``, ``<domain>.png``, the full results
    (``results.json``, with the examples of ``reinseg eval --save-examples`` in ``results_examples/``)
    and their HTML report (``report/index.html``) into ``output``.

    ``threads``: torch's CPU threads (default: ``OMP_NUM_THREADS`` if set, else :func:`free_cores`).
    More threads than free cores make every step wait for the slowest thread, which shares its
    core with another process.
    """
    from .checkpoints import atomic_write_bytes
    from .data.io import write_png
    from .data.synthetic import DOMAINS, write_cityscapes_layout
    from .engine import TrainingInterrupted, train
    from .examples import write_examples
    from .report import write_report

    output = Path(output)
    start = time.perf_counter()
    _remove_results(output)
    # A thread count the user set for OpenMP wins over the guess.
    threads = threads or (torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") else free_cores())
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        print(
            f"[1/3] generating the synthetic benchmark ({num_train} training scenes, {num_val} per domain to "
            f"test) in {output / 'data'}, on {threads} of {os.cpu_count()} cores"
        )
        generated = write_cityscapes_layout(
            output / "data", num_train=num_train, num_val=num_val, size=SIZE, seed=seed, workers=threads, progress=False
        )
        print(f"      {generated['written']} renders in {generated['seconds']:.1f} s")
        config = demo_config(output / "data", output, max_iters=max_iters, seed=seed)
        (output).mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(output / "config.yaml", dump_config(config).encode())
        print(
            f"[2/3] training Rein + head on '{DOMAINS[0]}' for {config.train.max_iters} iterations (small ViT, "
            f"random weights; config in {output / 'config.yaml'})"
        )
        # A re-run replaces the previous demo run (never a stale last.ckpt beside the new one).
        try:
            task = train(config, resume="never", overwrite=True, callbacks=[_RecordImages()])
        except TrainingInterrupted as stopped:
            # train's message says to resume, but a demo starts afresh.
            raise TrainingInterrupted.on(
                stopped.stop, lambda name: f"the demo stopped on {name}: `reinseg demo` runs it again from the start"
            ) from None
        results = task.last_results
        if results is None:
            raise RuntimeError("the demo's validation produced no results")
        print("[3/3] evaluated on the held-out source images and the unseen target domains")
        metrics = {
            domain: {"mIoU": scores["mIoU"], "aAcc": scores["aAcc"], "IoU": scores["IoU"]}
            for domain, scores in results["domains"].items()
        }
        metrics_json = json.dumps(metrics, indent=2).encode()
        atomic_write_bytes(output / "metrics.json", metrics_json)
        for domain, dataset, _ in task.val_sets():
            role = "the source domain" if domain == DOMAINS[0] else f"unseen: trained on {DOMAINS[0]} only"
            title = f"{domain} ({role}): mIoU {metrics[domain]['mIoU']:.2f} over its {len(dataset)} test images"
            picture, _ = comparison_picture(
                *_first_item(task.segmentor.eval(), dataset), title, classes=dataset.classes
            )
            write_png(output / f"{domain}.png", picture, sync=True)
        write_examples(task, DEMO_EXAMPLES, output / "results_examples", relative_to=output)
        atomic_write_bytes(output / "results.json", json.dumps(results | {"model": "Rein (demo)"}, indent=2).encode())
        report = write_report(
            [output / "results.json"], output / "report", title="reinseg demo: Rein on synthetic domains"
        )
        seconds = time.perf_counter() - start
        print(f"\n{'domain':<8} {'mIoU':>6}")
        for domain, scores in metrics.items():
            role = "(source)" if domain == DOMAINS[0] else "(unseen)"
            print(f"{domain:<8} {scores['mIoU']:6.2f}  {role}")
        print(f"mean over unseen domains: {results['mean_mIoU']:.2f}")
        print(
            f"wrote {output / 'metrics.json'} and {', '.join(f'{d}.png' for d in metrics)} to {output} "
            f"in {seconds / 60:.1f} min"
        )
        print(f"the report (open it in a browser): {report}")
        # Float sums are split across threads, so the thread count changes the last bits, which 250
        # training steps amplify.
        print(
            f"scores of {threads} thread(s) on torch {torch.__version__}: the same thread count, torch "
            "version and CPU give the same numbers (--threads N to choose the count)"
        )
        return {"metrics": metrics, "mean_mIoU": results["mean_mIoU"], "seconds": seconds}
    finally:
        torch.set_num_threads(previous_threads)  # the caller's process is left as it was


class _RecordImages(L.Callback):
    """Makes the validation that ends training record what the report needs (per-image scores,
    confusion matrices): the demo evaluates once, not twice."""

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.record_images = True


@torch.no_grad()
def _first_item(segmentor, dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(image (H, W, 3) uint8, label (H, W), prediction (H, W))`` of a validation set's first item."""
    from .data.io import read_image
    from .predict import segment_image

    image_path, _ = dataset.pairs[0]
    label = dataset[0]["label"].numpy().astype(np.uint8)
    image = read_image(image_path)
    return image, label, segment_image(segmentor, image, scale=None)


PANELS = ("image", "ground truth", "prediction")


def comparison_picture(
    image: np.ndarray,
    label: np.ndarray,
    prediction: np.ndarray,
    title: str,
    zoom: int = 2,
    classes: ClassList | None = None,
) -> tuple[np.ndarray, dict[str, tuple[int, int, int, int]]]:
    """A labelled picture: ``title``, then image | ground truth | prediction (each ``(H, W)``, shown
    ``zoom`` times larger, pixels kept sharp) under their names, then a legend of the classes in the
    ground truth or the prediction with their colours (those of ``classes``, default Cityscapes').

    Returns the picture, (H', W', 3) uint8 RGB, and each panel's box ``(top, left, bottom, right)``.
    """
    from PIL import Image, ImageDraw, ImageFont

    from .data import IGNORE_INDEX
    from .data.classes import CITYSCAPES_CLASSES

    classes = classes or CITYSCAPES_CLASSES

    try:
        font = ImageFont.load_default(size=16)  # Pillow's own scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        font = ImageFont.load_default()  # its small bitmap font
    line = 24  # height of a line of text
    pad, gap, swatch = 10, 8, 12
    panels = [image, classes.colorize(label), classes.colorize(prediction)]
    panels = [np.repeat(np.repeat(p, zoom, axis=0), zoom, axis=1) for p in panels]
    height, width = panels[0].shape[:2]
    total_width = 2 * pad + 3 * width + 2 * gap
    shown = sorted(set(np.unique(label).tolist()) | set(np.unique(prediction).tolist()))
    entries = [(classes.names[c], tuple(int(v) for v in classes.palette[c])) for c in shown if c < len(classes)]
    if IGNORE_INDEX in shown:
        entries.append(("ignored (not scored)", (0, 0, 0)))
    # The legend flows in rows; measure its height before drawing.
    draw_probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows, x = 1, pad
    widths = [swatch + 4 + int(draw_probe.textlength(name, font=font)) + 14 for name, _ in entries]
    for w in widths:
        if x + w > total_width - pad and x > pad:
            rows, x = rows + 1, pad
        x += w
    panel_top = pad + 2 * line
    legend_top = panel_top + height + gap
    canvas = Image.new("RGB", (total_width, legend_top + rows * line + pad), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill=(0, 0, 0), font=font)
    boxes = {}
    for i, (name, panel) in enumerate(zip(PANELS, panels, strict=False)):
        left = pad + i * (width + gap)
        draw.text((left, pad + line), name, fill=(0, 0, 0), font=font)
        canvas.paste(Image.fromarray(panel), (left, panel_top))
        boxes[name] = (panel_top, left, panel_top + height, left + width)
    x, y = pad, legend_top
    for (name, colour), w in zip(entries, widths, strict=False):
        if x + w > total_width - pad and x > pad:
            x, y = pad, y + line
        draw.rectangle([x, y + 2, x + swatch - 1, y + 1 + swatch], fill=colour, outline=(128, 128, 128))
        draw.text((x + swatch + 4, y), name, fill=(0, 0, 0), font=font)
        x += w
    return np.asarray(canvas), boxes
