"""A strategy and a head defined here, outside the package, train and evaluate with a config alone.

Adding either is one class and one registration (DEVELOPERS.md); nothing in ``src/`` names them.
"""

import json
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_model_config
from fake_datasets import make_custom, make_fake_cityscapes
from torch import nn

from reinseg.build import build_segmentor
from reinseg.config import Config, ConfigError, DataConfig, TrainConfig
from reinseg.engine import evaluate, parameter_groups, train
from reinseg.heads import HEADS
from reinseg.heads.criterion import Mask2FormerLoss
from reinseg.tuning import STRATEGIES, TuningStrategy, get_strategy


@dataclass
class FirstBlockBiasOptions:
    init: float = 0.0


class _AddBias:
    def __init__(self, bias: nn.Parameter) -> None:
        self.bias = bias

    def __call__(self, module, inputs, output):
        return output + self.bias


class FirstBlockBias(TuningStrategy):
    """A toy strategy: a learnable bias added to the first block's output, without weight decay."""

    options_class = FirstBlockBiasOptions
    no_decay_keys = ("backbone.toy_bias",)

    def apply(self, backbone, options: FirstBlockBiasOptions) -> None:
        backbone.toy_bias = nn.Parameter(torch.full((backbone.embed_dim,), options.init))
        backbone.vit.blocks[0].register_forward_hook(_AddBias(backbone.toy_bias))


class LinearMaskHead(nn.Module):
    """A toy head: each query is a 1x1 convolution of the stride-4 map and a learned class vector."""

    criterion_class = Mask2FormerLoss
    no_decay_keys = ()

    def __init__(self, in_channels, num_classes=19, num_queries=100, linked_queries=False, hidden=8) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.linked_queries = linked_queries
        self.reduce = nn.Conv2d(in_channels[0], hidden, 1)
        self.masks = nn.Conv2d(hidden, num_queries, 1)
        self.classes = nn.Parameter(torch.zeros(num_queries, num_classes + 1))

    def forward(self, features, queries=None):
        masks = self.masks(self.reduce(features[0]).relu())
        return [self.classes.expand(masks.shape[0], -1, -1)], [masks]


@pytest.fixture
def registered(monkeypatch):
    FirstBlockBias.name = "first_block_bias"
    monkeypatch.setitem(STRATEGIES, "first_block_bias", FirstBlockBias())
    monkeypatch.setitem(HEADS, "linear_mask", LinearMaskHead)


def toy_model(num_classes=19):
    model = tiny_model_config(num_classes=num_classes)
    model.tuning = "first_block_bias"
    model.options = {"first_block_bias": {"init": 0.5}}
    model.head.type = "linear_mask"
    model.head.options = {"hidden": 4}
    return model


def test_the_builder_reads_both_registries(registered):
    segmentor = build_segmentor(toy_model())
    assert isinstance(segmentor.head, LinearMaskHead) and segmentor.head.reduce.out_channels == 4
    assert torch.equal(segmentor.backbone.toy_bias, torch.full((32,), 0.5))
    trainable = {name for name, p in segmentor.named_parameters() if p.requires_grad}
    assert "backbone.toy_bias" in trainable and not any(n.startswith("backbone.vit.") for n in trainable)
    groups = parameter_groups(segmentor, lr=1e-3, weight_decay=0.05, backbone_lr_mult=1.0)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert id(segmentor.backbone.toy_bias) in no_decay
    assert id(segmentor.head.masks.weight) not in no_decay


def one_step_config(model, entry: dict, output_dir) -> Config:
    """One training step on ``entry``'s train split, then validation on its val split."""
    data = DataConfig(
        train=[dict(entry, split="train")],
        val=[dict(entry, split="val", scale=[128, 64])],
        crop_size=64,
        base_size=64,
        max_size=256,
        batch_size=2,
        num_workers=0,
    )
    train_config = TrainConfig(max_iters=1, val_interval=1, checkpoint_interval=1, lr=1e-2, output_dir=str(output_dir))
    return Config(model=model, data=data, train=train_config)


def test_a_toy_strategy_and_head_train_one_step_and_evaluate(registered, tmp_path):
    make_fake_cityscapes(tmp_path / "cityscapes", n=2, size=(64, 128), prepared=True)
    entry = dict(name="cityscapes", root=str(tmp_path / "cityscapes"))
    task = train(one_step_config(toy_model(), entry, tmp_path / "run"), resume="never")
    bias = task.segmentor.backbone.toy_bias
    assert not torch.equal(bias.detach(), torch.full_like(bias, 0.5))  # it trained
    results = json.loads((tmp_path / "run" / "metrics" / "val_step0000001.json").read_text())
    assert set(results["domains"]) == {"cityscapes"}
    assert len(results["domains"]["cityscapes"]["IoU"]) == 19


def test_a_toy_custom_dataset_trains_one_step_and_evaluates(registered, tmp_path):
    """A 3-class dataset of images and index PNGs, its classes and palette in the config only."""
    classes = ["soil", "plant", "sky"]
    fake = make_custom(tmp_path / "garden", num_classes=3, n=2, size=(64, 128))
    entry = dict(
        name="custom",
        root=str(tmp_path / "garden"),
        classes=classes,
        palette=[[90, 60, 30], [0, 160, 0], [120, 180, 255]],
        image_suffix=".jpg",
    )
    config = one_step_config(toy_model(num_classes=3), entry, tmp_path / "run")
    task = train(config, resume="never")
    assert task.segmentor.head.classes.shape[-1] == 3 + 1  # the 3 classes and "no object"
    scores = json.loads((tmp_path / "run" / "metrics" / "val_step0000001.json").read_text())["domains"]["custom"]
    assert list(scores["IoU"]) == classes
    val_labels = [labels for image, labels in fake.expected.items() if "/images/val/" in image]
    assert scores["pixels"] == sum(int((labels != 255).sum()) for labels in val_labels)
    evaluated = evaluate(config, str(tmp_path / "run" / "checkpoints" / "last.ckpt")).last_results
    assert evaluated["domains"]["custom"] == scores


def test_unknown_strategy_head_and_options_are_named(registered):
    model = toy_model()
    model.head.options = {"width": 3}
    with pytest.raises(ConfigError, match=r"model.head.options: \['width'\] are not arguments of the linear_mask head"):
        build_segmentor(model)
    model.head.type = "nope"
    with pytest.raises(ConfigError, match="model.head.type='nope' is not one of .*linear_mask.*mask2former"):
        build_segmentor(model)
    model.tuning = "nope"
    with pytest.raises(ConfigError, match="model.tuning='nope' is not one of .*first_block_bias"):
        build_segmentor(model)
    model = toy_model()
    model.options = {"first_block_bias": {"innit": 1.0}}
    with pytest.raises(ConfigError, match="unknown config key 'model.options.first_block_bias.innit'"):
        build_segmentor(model)


def test_built_in_strategies_declare_what_the_optimizer_reads():
    assert get_strategy("full").trains_vfm and not get_strategy("rein").trains_vfm
    assert "backbone.rein.scale" in get_strategy("rein").no_decay_keys
    assert get_strategy("frozen").options_class is None


def test_head_options_do_not_override_the_named_head_keys():
    """They won silently: options.num_classes=3 built a 3-class head for a 19-class loss."""
    from conftest import tiny_model_config

    model = tiny_model_config()
    model.head.options = {"num_classes": 3, "in_channels": [1, 2]}
    with pytest.raises(
        ConfigError,
        match=r"model.head.options.in_channels: set from the backbone; "
        r"model.head.options.num_classes: set model.head.num_classes instead",
    ):
        build_segmentor(model)
