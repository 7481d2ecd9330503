"""SoMA (``tuning: soma``) against the official code (``soma_tiny.pt``, tests/golden/make_soma_golden.py).

The official SoMA splits DINOv2's fused qkv into q, k and v layers, one SVD each; reinseg keeps
timm's fused layer and splits its rows alike, so official ``blocks.i.attn.q`` is row block 0 of
reinseg's ``blocks.i.attn.qkv``. Singular vectors are defined up to sign: the split is compared
through its products (``B A``, the residual, the features), the gradients with the official
factors loaded.
"""

import dataclasses
import math
import statistics
from pathlib import Path

import pytest
import torch
from conftest import killed_writers_leftover, load_golden, relative_errors, tiny_model_config

from reinseg.build import build_segmentor
from reinseg.checkpoints import checkpoint_state_dict, save_checkpoint, segmentor_from_checkpoint
from reinseg.cli import main
from reinseg.config import BackboneConfig, Config, ConfigError, TrainConfig, load_config, to_dict
from reinseg.optim import build_optimizer, lr_factor, parameter_groups
from reinseg.tuning import SomaConfig
from reinseg.tuning.soma import cosine_weight_decay

pytestmark = pytest.mark.usefixtures("one_thread")

QKV = {"q": 0, "k": 1, "v": 2}
CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.fixture(scope="module")
def golden():
    return load_golden("soma_tiny.pt")


def soma_options(golden) -> SomaConfig:
    official = golden["soma_config"]
    assert official["target_modules"] == ["q", "k", "v", "proj", "fc1", "fc2"] and not official["first_eigen"]
    return SomaConfig(rank=official["r"], alpha=official["lora_alpha"], start_block=official["start_lora_idx"])


def model_config(golden, tmp_path, tuning="soma"):
    from conftest import tiny_model_config

    vit = golden["vit_config"]
    path = tmp_path / "dinov2_tiny.pth"
    torch.save(golden["backbone_state_dict"], path)
    config = tiny_model_config()
    config.tuning = tuning
    config.backbone = BackboneConfig(
        name="dinov2_vits14",
        img_size=vit["img_size"],
        patch_size=vit["patch_size"],
        out_indices=vit["out_indices"],
        checkpoint=str(path),
        timm_kwargs=dict(embed_dim=vit["embed_dim"], depth=vit["depth"], num_heads=vit["num_heads"]),
    )
    config.soma = soma_options(golden)
    config.lora.rank = 2
    return config


def ours_of(official: str) -> tuple[str, int]:
    """reinseg's layer (under ``backbone.vit.``) and row block of an official layer name."""
    prefix, _, leaf = official.rpartition(".")
    if leaf in QKV:
        return f"{prefix}.qkv", QKV[leaf]
    return official, 0


def parametrization(backbone, layer: str):
    return backbone.vit.get_submodule(layer).parametrizations.weight


def test_the_split_is_the_official_one(golden, tmp_path):
    segmentor = build_segmentor(model_config(golden, tmp_path))
    backbone = segmentor.backbone
    assert len(golden["adapters"]) == 12
    for name, official in golden["adapters"].items():
        layer, chunk = ours_of(name)
        minor = parametrization(backbone, layer)[0]
        rows = slice(chunk * official["weight"].shape[0], (chunk + 1) * official["weight"].shape[0])
        assert minor.scaling == official["scaling"] == 2.0
        ours_product = minor.lora_B[chunk] @ minor.lora_A[chunk]
        theirs_product = official["lora_B"] @ official["lora_A"]
        assert (ours_product - theirs_product).abs().max().item() <= 1e-5, name
        residual = parametrization(backbone, layer).original[rows]
        assert (residual - official["residual"]).abs().max().item() <= 1e-5, name
        # The minor components: the product holds the smallest singular values of the weight.
        singular = torch.linalg.svdvals(official["weight"])
        assert torch.allclose(torch.linalg.svdvals(minor.scaling * ours_product)[:4], singular[-4:], atol=1e-5)


def test_features_equal_the_official_code(golden, tmp_path):
    backbone = build_segmentor(model_config(golden, tmp_path)).backbone.eval()
    with torch.no_grad():
        features = backbone(golden["image"]).features
    for ours, theirs in zip(features, golden["features"], strict=True):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() <= 1e-4


def test_trainable_parameters_and_gradients_equal_the_official_code(golden, tmp_path):
    backbone = build_segmentor(model_config(golden, tmp_path)).backbone
    official_of = {}
    with torch.no_grad():  # the official factors, so that the gradients' signs agree
        for name, official in golden["adapters"].items():
            layer, chunk = ours_of(name)
            minor = parametrization(backbone, layer)[0]
            minor.lora_A[chunk].copy_(official["lora_A"])
            minor.lora_B[chunk].copy_(official["lora_B"])
            official_of[(layer, chunk)] = name
    trainable = {n for n, p in backbone.vit.named_parameters() if p.requires_grad}
    expected = set()
    for name in golden["trainable"]:
        if name == "mask_token":  # trainable in the official code but never used: timm has none
            continue
        prefix, _, kind = name.rpartition(".")
        layer, _ = ours_of(prefix.removesuffix(".lora_A").removesuffix(".lora_B"))
        if prefix.endswith((".lora_A", ".lora_B")):
            expected.add(f"{layer}.parametrizations.weight.0.{prefix.rpartition('.')[2]}")
        else:
            expected.add(f"{layer}.{kind}")
    assert trainable == expected

    features = backbone(golden["image"]).features
    sum((f * p).sum() for f, p in zip(features, golden["probes"], strict=True)).backward()
    ours, theirs = {}, {}
    for name, grad in golden["grads"].items():
        prefix, _, kind = name.rpartition(".")
        if prefix.endswith((".lora_A", ".lora_B")):
            layer, chunk = ours_of(prefix.rpartition(".")[0])
            param = getattr(parametrization(backbone, layer)[0], prefix.rpartition(".")[2])
            ours[name] = param.grad[chunk]
        else:
            layer, chunk = ours_of(prefix)
            bias = backbone.vit.get_submodule(layer).bias
            ours[name] = bias.grad.chunk(3)[chunk] if layer.endswith("qkv") else bias.grad
        theirs[name] = grad
    # A key bias adds q.b_k to every logit of a query's row, which the softmax ignores: its true
    # gradient is zero, both codes give float noise.
    top = max(t.abs().max().item() for t in theirs.values())
    for name in [n for n in theirs if n.endswith("attn.k.bias")]:
        noise_ours, noise_theirs = ours.pop(name), theirs.pop(name)
        assert noise_ours.abs().max().item() <= 1e-5 * top and noise_theirs.abs().max().item() <= 1e-5 * top
    errors = relative_errors(ours, theirs)
    assert max(errors.values()) <= 1e-5, max(errors.items(), key=lambda kv: kv[1])


def test_parameter_groups_equal_the_official_constructor(golden, tmp_path):
    """The official paramwise_cfg as the release config sets it: the whole backbone at lr x 0.5, weight decay 0.05."""
    release = load_config(CONFIGS / "soma_dinov2-l_gta_512.yaml")
    model = model_config(golden, tmp_path)
    sizes = {k: getattr(model.soma, k) for k in ("rank", "alpha", "start_block")}
    model.soma = dataclasses.replace(release.model.soma, **sizes)
    segmentor = build_segmentor(model).train()
    optimizer, _ = build_optimizer(segmentor, Config(model=model, train=release.train))
    backbone = {id(p) for p in segmentor.backbone.parameters()}
    # Per tensor (reinseg's fused qkv is the official q, k and v): the settings each one gets.
    ours = {
        (round(g["lr"], 12), round(g["weight_decay"], 12))
        for g in optimizer.param_groups
        for p in g["params"]
        if id(p) in backbone
    }
    theirs = {
        (round(lr, 12), round(wd, 12))
        for k, (lr, wd) in golden["param_groups"].items()
        if k != "backbone.model.mask_token"
    }
    assert ours == theirs == {(5e-5, 0.05)}


def test_lr_and_annealed_weight_decay_equal_mmengine(golden):
    schedule = golden["schedule"]
    max_iters = schedule["max_iters"]
    decay = cosine_weight_decay(SomaConfig().min_weight_decay, max_iters)
    for group, (lr, initial) in enumerate(zip(schedule["initial_lr"], schedule["initial_weight_decay"], strict=True)):
        lrs = torch.tensor([lr * lr_factor(int(s), max_iters) for s in schedule["steps"]], dtype=torch.float64)
        decays = torch.tensor([decay(initial, int(s)) for s in schedule["steps"]], dtype=torch.float64)
        assert (lrs - schedule["lr"][:, group]).abs().max().item() <= 1e-9 * lr
        assert (decays - schedule["weight_decay"][:, group]).abs().max().item() <= 1e-12
    # The group without weight decay rises to the minimum, as in mmengine.
    assert schedule["weight_decay"][-1, 1].item() == pytest.approx(1e-5, rel=1e-6)


def test_the_scheduler_sets_the_weight_decay_every_iteration(golden, tmp_path):
    schedule = golden["schedule"]
    config = Config(model=model_config(golden, tmp_path), train=TrainConfig(max_iters=schedule["max_iters"]))
    segmentor = build_segmentor(config.model).train()
    optimizer, scheduler = build_optimizer(segmentor, config)
    wanted = dict(zip(schedule["steps"].tolist(), schedule["weight_decay"][:, 0].tolist(), strict=True))
    for step in range(200):
        decays = [g["weight_decay"] for g in optimizer.param_groups if g["initial_weight_decay"] == 0.05]
        if step in wanted:
            assert decays and decays == pytest.approx([wanted[step]] * len(decays), rel=1e-12)
        optimizer.step()
        scheduler.step()
    assert "decay" not in scheduler.state_dict()


def test_release_config_has_the_official_trainable_count(golden, capsys):
    """DINOv2-L at 512 (meta device) as ``reinseg params`` counts it. The official count also has
    DINOv2's mask token (1024), which the official code marks trainable but never uses."""
    assert main(["params", str(CONFIGS / "soma_dinov2-l_gta_512.yaml")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("backbone "))
    assert row.split()[2] == f"{golden['dinov2_l_trainable'] - golden['dinov2_l_mask_token']:,}" == "4,866,048"


@pytest.mark.parametrize("tuning", ["soma", pytest.param("lora", marks=pytest.mark.slow)])
def test_merge_gives_plain_weights_with_the_same_logits(golden, tmp_path, tuning):
    config = model_config(golden, tmp_path, tuning)
    segmentor = build_segmentor(config).eval()
    with torch.no_grad():
        for name, param in segmentor.named_parameters():
            if param.requires_grad and name.startswith("backbone."):
                param.add_(torch.randn_like(param) * 0.05)  # as if trained
    save_checkpoint(tmp_path / "c.pt", {"model": to_dict(config)}, checkpoint_state_dict(segmentor))
    leftover = killed_writers_leftover(tmp_path, "merged.pt")  # a killed merge's (a whole VFM)
    assert main(["merge", str(tmp_path / "c.pt"), "--output", str(tmp_path / "merged.pt")]) == 0
    assert not leftover.exists()
    merged, payload = segmentor_from_checkpoint(tmp_path / "merged.pt")
    assert payload["config"]["model"]["tuning"] == "full" and payload["merged_from"] == tuning
    assert payload["config"]["model"]["backbone"]["checkpoint"] is None  # self-contained
    assert not any("parametrizations" in k or "lora" in k for k in merged.state_dict())
    merged.eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = merged.predict(images, mode="whole"), segmentor.predict(images, mode="whole")
    assert (ours - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()
    # The run's own configuration evaluates it with model.tuning=full.
    config.tuning = "full"
    again = segmentor_from_checkpoint(tmp_path / "merged.pt", config)[0].eval()
    with torch.no_grad():
        assert torch.equal(again.predict(images, mode="whole"), ours)


def test_merge_refuses_strategies_that_cannot_be_merged(golden, tmp_path, capsys):
    config = model_config(golden, tmp_path, "rein")
    save_checkpoint(tmp_path / "c.pt", {"model": to_dict(config)}, checkpoint_state_dict(build_segmentor(config)))
    assert main(["merge", str(tmp_path / "c.pt"), "--output", str(tmp_path / "merged.pt")]) == 2
    err = capsys.readouterr().err
    assert "model.tuning='rein' cannot be merged into the VFM's weights (mergeable: lora, soma)" in err
    assert not (tmp_path / "merged.pt").exists()
    assert main(["merge", str(tmp_path / "c.pt"), "--output", str(tmp_path / "c.pt")]) == 2
    assert "is the checkpoint itself" in capsys.readouterr().err


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("rank", 0, "model.soma.rank must be at least 1"),
        ("min_weight_decay", -1e-5, "model.soma.min_weight_decay must be at least 0"),
        ("start_block", 4, r"model.soma.start_block=4 must be in \[0, 4\)"),
        ("start_block", -1, "model.soma.start_block must be at least 0"),
        ("rank", 65, r"model.soma.rank=65 exceeds the size of blocks.2.attn.qkv"),
        ("components", "middle", "model.soma.components must be 'minor' or 'major'"),
        ("lr_mult", -0.5, "model.soma.lr_mult must be at least 0"),
        ("targets", ["to_q"], r"model.soma.targets \['to_q'\] match no linear layer"),
    ],
)
def test_options_out_of_range_name_the_key(golden, tmp_path, key, value, message):
    config = model_config(golden, tmp_path)
    setattr(config.soma, key, value)
    with pytest.raises(ConfigError, match=message):
        build_segmentor(config)


def test_major_components_are_the_largest_singular_values(golden, tmp_path):
    config = model_config(golden, tmp_path)
    config.soma.components = "major"
    backbone = build_segmentor(config).backbone
    weight = golden["adapters"]["blocks.3.mlp.fc2"]["weight"]
    minor = parametrization(backbone, "blocks.3.mlp.fc2")[0]
    product = minor.scaling * minor.lora_B[0] @ minor.lora_A[0]
    assert torch.allclose(torch.linalg.svdvals(product)[:4], torch.linalg.svdvals(weight)[:4], atol=1e-5)
    assert math.isclose(minor.scaling, 2.0)


def test_initial_split_keeps_the_pretrained_weights_as_the_official_runs(golden, tmp_path):
    """``split: initial``: the official training's order (SVD of the random init, then the
    checkpoint loaded over the residuals, ``soma_tiny.pt``'s ``runner_order``): every adapted
    weight stays the pretrained one and ``B A`` starts as small as the official run's."""
    config = model_config(golden, tmp_path)
    config.soma.split = "initial"
    backbone = build_segmentor(config).backbone
    order = golden["runner_order"]
    assert order["weight_is_pretrained"] and not order["weight_is_residual"]
    for name, official in golden["adapters"].items():
        layer, chunk = ours_of(name)
        rows = slice(chunk * official["weight"].shape[0], (chunk + 1) * official["weight"].shape[0])
        assert torch.equal(parametrization(backbone, layer).original[rows], official["weight"]), name
        minor = parametrization(backbone, layer)[0]
        product = minor.scaling * minor.lora_B[chunk] @ minor.lora_A[chunk]
        assert torch.linalg.matrix_rank(product).item() == config.soma.rank
    # ``max_abs_lora_product`` is one draw, the official run's unscaled B A of blocks.2.attn.q (a
    # 64 x 64 weight of nn.Linear's default init). Here the median of that statistic over the eight
    # 64 x 64 adapted weights (q, k, v, proj of blocks 2 and 3), of a seeded build: the official
    # draw lies within 2x of it, where timm's trunc. normal (std 0.02) init gives 3.6x less.
    torch.manual_seed(0)
    backbone = build_segmentor(config).backbone
    largest = []
    for block in (2, 3):
        qkv = parametrization(backbone, f"blocks.{block}.attn.qkv")[0]
        proj = parametrization(backbone, f"blocks.{block}.attn.proj")[0]
        products = [qkv.lora_B[chunk] @ qkv.lora_A[chunk] for chunk in range(3)] + [proj.lora_B[0] @ proj.lora_A[0]]
        largest += [product.abs().max().item() for product in products]
    assert order["max_abs_lora_product"] / 2 < statistics.median(largest) < order["max_abs_lora_product"] * 2
    config.soma.split = "both"
    with pytest.raises(ConfigError, match="model.soma.split must be 'pretrained' or 'initial'"):
        build_segmentor(config)


@pytest.mark.slow
def test_training_anneals_the_weight_decay_and_its_checkpoint_merges(tmp_path):
    """A short run through the engine: the optimizer's weight decay at the checkpoint is the
    annealed one, and the training checkpoint merges into plain weights."""
    from test_engine import tiny_config

    from reinseg.engine import train

    config = tiny_config(tmp_path, max_iters=4, checkpoint_interval=2, weight_decay=0.05)
    config.model.tuning = "soma"
    config.model.soma = SomaConfig(rank=2, start_block=2, min_weight_decay=0.01)
    train(config)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    decay = cosine_weight_decay(0.01, 4)
    groups = state["optimizer_states"][0]["param_groups"]
    assert {(g["initial_weight_decay"], round(g["weight_decay"], 12)) for g in groups} == {
        (0.05, round(decay(0.05, 4), 12)),
        (0.0, round(decay(0.0, 4), 12)),
    }
    assert main(["merge", str(last), "--output", str(tmp_path / "merged.pt")]) == 0
    merged, _ = segmentor_from_checkpoint(tmp_path / "merged.pt")
    trained, _ = segmentor_from_checkpoint(last)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours, theirs = merged.eval().predict(images, mode="whole"), trained.eval().predict(images, mode="whole")
    assert (ours - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()


@pytest.mark.parametrize(("tuning", "decay"), [("soma", 0.0), ("full", 0.05)])
def test_the_heads_own_queries_take_the_decay_of_the_strategys_official_config(tuning, decay):
    """SoMA's fork exempts query_feat from weight decay; the official full fine-tuning config
    does not: a strategy picked by ``model.tuning=`` on another config keeps its recipe."""
    model = tiny_model_config()
    model.tuning = tuning
    model.soma = dataclasses.replace(model.soma, rank=2, start_block=2)
    segmentor = build_segmentor(model, load_backbone_weights=False)
    groups = parameter_groups(segmentor, lr=1e-4, weight_decay=0.05, backbone_lr_mult=1.0)
    query_feat = segmentor.head.query_feat.weight
    assert [g["weight_decay"] for g in groups if any(p is query_feat for p in g["params"])] == [decay]
