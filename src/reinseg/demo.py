"""The offline demo: Rein on the synthetic domain-shift benchmark, on a CPU, in a few minutes.

It generates the synthetic street scenes (:mod:`reinseg.data.synthetic`), trains Rein + the
Mask2Former head on a small ViT on the ``game`` domain only, and evaluates on the held-out ``game``
images and on the unseen ``real``, ``dusk`` and ``fog`` domains. The small ViT has random weights:
no foundation model can be downloaded here, so the numbers show the pipeline working end to end,
not what a pretrained VFM reaches (see the README for a real run).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

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

__all__ = ["DEMO_ITERS", "demo_config", "run_demo"]

SIZE = (128, 256)  # synthetic images, (H, W)
DEMO_ITERS = 250  # about 2.5 minutes of training on 2 CPU cores


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


def run_demo(
    output: str | Path = "reinseg-demo",
    seed: int = 0,
    max_iters: int = DEMO_ITERS,
    num_train: int = 400,
    num_val: int = 50,
) -> dict:
    """Generate, train, evaluate; writes ``metrics.json`` and ``<domain>.png`` into ``output``."""
    from .checkpoints import atomic_write_bytes
    from .data.io import write_png
    from .data.synthetic import DOMAINS, write_cityscapes_layout
    from .engine import train

    output = Path(output)
    start = time.perf_counter()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no GPU/TPU banners
    print(
        f"[1/3] generating the synthetic benchmark ({num_train} training scenes, {num_val} per domain to "
        f"test) in {output / 'data'}"
    )
    generated = write_cityscapes_layout(
        output / "data", num_train=num_train, num_val=num_val, size=SIZE, seed=seed, progress=False
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
    task = train(config, resume="never", overwrite=True)
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
        write_png(output / f"{domain}.png", _comparison(task.segmentor.eval(), dataset), sync=True)
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
    return {"metrics": metrics, "mean_mIoU": results["mean_mIoU"], "seconds": seconds}


@torch.no_grad()
def _comparison(segmentor, dataset, index: int = 0) -> np.ndarray:
    """image | ground truth | prediction of one validation item, side by side (uint8 RGB)."""
    from .data import colorize
    from .data.io import read_image
    from .predict import segment_image

    image_path, _ = dataset.pairs[index]
    item = dataset[index]
    image = read_image(image_path)
    prediction = segment_image(segmentor, image, scale=None)
    label = item["label"].numpy().astype(np.uint8)
    gap = np.full((image.shape[0], 4, 3), 255, dtype=np.uint8)
    return np.concatenate([image, gap, colorize(label), gap, colorize(prediction)], axis=1)
