import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_model_config
from fake_datasets import make_fake_cityscapes

from reinseg.build import build_segmentor
from reinseg.config import Config, ConfigError, DataConfig, TrainConfig, dump_config, load_config
from reinseg.engine import ShardSampler, TrainingStream, build_trainer, lr_factor, parameter_groups, set_tf32


def tiny_config(tmp_path, num_val=4, **train):
    root = tmp_path / "cityscapes"
    if not root.exists():
        make_fake_cityscapes(root, n=num_val, size=(64, 128), prepared=True)
    data = DataConfig(
        train=[dict(name="cityscapes", root=str(root), split="train")],
        val=[dict(name="cityscapes", root=str(root), split="val", scale=[128, 64])],
        crop_size=64,
        base_size=64,
        max_size=256,
        batch_size=2,
        num_workers=0,
    )
    options = (
        dict(
            max_iters=6,
            val_interval=100,
            checkpoint_interval=2,
            log_interval=1,
            lr=1e-3,
            output_dir=str(tmp_path / "run"),
        )
        | train
    )
    return Config(model=tiny_model_config(), data=data, train=TrainConfig(**options))


def run_reinseg(*args, timeout=300):
    """The command line in a fresh process (as users and DDP launchers run it)."""
    return subprocess.run(
        [sys.executable, "-m", "reinseg", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        # The thread count of this process: the oracle runs here, and float sums follow it.
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )


def test_poly_schedule_with_warmup():
    # mmengine's schedulers act on iterations begin .. end - 1 and reach their end value at the
    # last one (tests/test_optimizer_golden.py pins whole 40k-iteration curves against mmengine).
    assert lr_factor(0, 100) == 1.0
    assert lr_factor(50, 100) == pytest.approx((1 - 50 / 99) ** 0.9)
    assert lr_factor(99, 100) == 0.0
    assert lr_factor(100, 100) == 0.0
    assert lr_factor(0, 100, warmup_iters=10) == pytest.approx(1e-6)
    assert lr_factor(5, 100, warmup_iters=10) == pytest.approx(1e-6 + (1 - 1e-6) * 5 / 9)
    assert lr_factor(9, 100, warmup_iters=10) == 1.0
    # The poly phase spans warm-up end to max_iters (mmengine's LinearLR + PolyLR(begin=warmup)).
    assert lr_factor(10, 100, warmup_iters=10) == 1.0
    assert lr_factor(10 + 40, 100, warmup_iters=10) == pytest.approx((1 - 40 / 89) ** 0.9)
    assert lr_factor(50, 100, min_factor=0.1) == pytest.approx(0.1 + 0.9 * (1 - 50 / 99) ** 0.9)


@pytest.fixture
def restore_tf32_flags():
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


# Three configs in the fast tier (the main setting, the 4-GPU one, a CNN); every one in the full suite.
_FAST_CONFIGS = {"rein_dinov2-l_gta_512.yaml", "rein_dinov2-l_cityscapes2acdc_1024.yaml", "rein_resnet50_gta_512.yaml"}


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(path, marks=() if path.name in _FAST_CONFIGS else pytest.mark.slow, id=path.name)
        for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    ],
)
def test_paper_configs_train_in_fp32_as_the_official_runs(path, tmp_path, restore_tf32_flags):
    # The official runs: fp32 OptimWrapper (no AMP), PyTorch's TF32 defaults (convolutions only).
    config = load_config(path, [f"train.output_dir={tmp_path}"])
    # Set in the file: "auto" would be fp32 here but bf16 autocast on a GPU.
    assert config.train.precision == "32-true"
    # As many devices as the official run (the batch size is per device); "auto" takes every GPU.
    assert config.train.devices == (4 if "acdc" in path.name else 1)
    trainer = build_trainer(config, logging=False)
    assert trainer.precision == "32-true"
    assert not torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    # bf16 autocast is one override away.
    config = load_config(path, [f"train.output_dir={tmp_path}", "train.precision=bf16-mixed"])
    assert build_trainer(config, logging=False).precision == "bf16-mixed"


def test_cudnn_benchmark_follows_the_config_as_the_official_runtime(tmp_path):
    # The official default_runtime.py: env_cfg cudnn_benchmark=True; reinseg's default likewise.
    before = torch.backends.cudnn.benchmark
    try:
        for override, expected in (([], True), (["train.cudnn_benchmark=false"], False)):
            config = load_config(
                Path(__file__).parents[1] / "configs/rein_dinov2-l_gta_512.yaml",
                [f"train.output_dir={tmp_path}", *override],
            )
            torch.backends.cudnn.benchmark = not expected
            build_trainer(config, logging=False)
            assert torch.backends.cudnn.benchmark is expected
    finally:
        torch.backends.cudnn.benchmark = before


def test_tf32_modes_set_the_torch_flags(restore_tf32_flags):
    expected = {"conv": (False, True), "all": (True, True), "none": (False, False)}
    for mode, flags in expected.items():
        set_tf32(mode)
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == flags
    with pytest.raises(ConfigError, match="train.tf32 must be one of conv, all, none, got 'matmul'"):
        set_tf32("matmul")


def test_no_weight_decay_where_the_official_config_has_none():
    segmentor = build_segmentor(tiny_model_config())
    groups = parameter_groups(segmentor, lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    named = dict(segmentor.named_parameters())
    no_decay = {n for n, p in named.items() if p.requires_grad and decay_of[id(p)] == 0}
    assert {
        "backbone.rein.learnable_tokens_a",
        "backbone.rein.learnable_tokens_b",
        "backbone.rein.scale",
        "head.level_embed.weight",
        "head.transformer_decoder.post_norm.weight",
        "head.pixel_decoder.input_convs.0.gn.weight",
        "head.transformer_decoder.layers.0.norms.1.bias",
    } <= no_decay
    assert decay_of[id(named["backbone.rein.mlp_delta_f.weight"])] == 0.05
    assert decay_of[id(named["head.cls_embed.bias"])] == 0.05
    assert all(p.requires_grad for g in groups for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in named.values())


def test_backbone_lr_multiplier_when_the_backbone_trains():
    segmentor = build_segmentor(tiny_model_config())
    segmentor.backbone.vit.requires_grad_(True)
    groups = parameter_groups(segmentor, lr=1e-4, weight_decay=0.05, backbone_lr_mult=0.1)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(segmentor.backbone.vit.blocks[0].attn.qkv.weight)] == pytest.approx(1e-5)
    assert lr_of[id(segmentor.head.cls_embed.weight)] == pytest.approx(1e-4)


class Numbers(torch.utils.data.Dataset):
    """Items are their index and the epoch the stream set."""

    def __init__(self, n):
        self.n, self.epoch = n, 0

    def __len__(self):
        return self.n

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __getitem__(self, i):
        return (self.epoch, i)


def take(stream, count):
    iterator = iter(stream)
    return [next(iterator) for _ in range(count)]


def test_training_stream_is_reproducible_and_resumable():
    full = take(TrainingStream(Numbers(5), batch_size=2, seed=3), 14)
    assert full == take(TrainingStream(Numbers(5), batch_size=2, seed=3), 14)
    assert sorted(i for _, i in full[:5]) == [0, 1, 2, 3, 4]  # each epoch is a permutation
    assert {e for e, _ in full[5:10]} == {1}
    resumed = take(TrainingStream(Numbers(5), batch_size=2, seed=3, start_step=3), 8)
    assert resumed == full[6:14]


def test_a_resume_with_another_global_batch_continues_at_the_next_sample():
    full = take(TrainingStream(Numbers(5), batch_size=1, seed=3), 12)
    # Three steps of batch 2 took samples 0-5; then batch 3, or batch 1 on each of two ranks.
    assert take(TrainingStream(Numbers(5), batch_size=3, seed=3, start_step=3, start_sample=6), 6) == full[6:12]
    ranks = [
        take(TrainingStream(Numbers(5), batch_size=1, seed=3, start_step=3, rank=r, world_size=2, start_sample=6), 3)
        for r in range(2)
    ]
    assert ranks[0] == full[6:12:2] and ranks[1] == full[7:12:2]


def test_ranks_take_disjoint_consecutive_samples():
    full = take(TrainingStream(Numbers(7), batch_size=2, seed=0), 8)
    rank0 = take(TrainingStream(Numbers(7), batch_size=2, seed=0, rank=0, world_size=2), 4)
    rank1 = take(TrainingStream(Numbers(7), batch_size=2, seed=0, rank=1, world_size=2), 4)
    assert rank0 == full[0:2] + full[4:6] and rank1 == full[2:4] + full[6:8]
    shards = [list(ShardSampler(7, r, 2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(7))


@pytest.mark.parametrize("start_step", [0, 1, 3])  # a resume: at, and off, a multiple of the workers
def test_workers_keep_the_stream_order(start_step):
    stream = TrainingStream(Numbers(9), batch_size=3, seed=1)
    stream.start_step = start_step
    serial = [b for _, b in zip(range(4), torch.utils.data.DataLoader(stream, batch_size=3), strict=False)]
    parallel = [
        b for _, b in zip(range(4), torch.utils.data.DataLoader(stream, batch_size=3, num_workers=2), strict=False)
    ]
    assert all(torch.equal(a[1], b[1]) and torch.equal(a[0], b[0]) for a, b in zip(serial, parallel, strict=True))


KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    import lightning as L
    from reinseg.config import load_config
    from reinseg.engine import train

    class Kill(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == int(sys.argv[2]):
                os.kill(os.getpid(), signal.SIGKILL)  # as a power cut: no clean-up

    train(load_config(sys.argv[1]), callbacks=[Kill()])
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("cuda", [True, False])
def test_training_and_validation_batches_come_in_pinned_memory_where_a_gpu_is(tmp_path, monkeypatch, cuda):
    """Pinned, a batch's copy to the GPU queues behind the work before it; from pageable memory
    the host would first wait for the previous step's or image's work (validation's loaders were
    not pinned)."""
    from reinseg.datamodule import SegmentationDataModule

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    data = SegmentationDataModule(tiny_config(tmp_path))
    loaders = [data.train_dataloader(), *data.val_dataloader()]
    assert len(loaders) == 2 and all(loader.pin_memory is cuda for loader in loaders)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # a step outside a Trainer
def test_the_training_step_gives_the_loss_the_labels_values_found_by_the_data_workers(tmp_path, monkeypatch):
    """The training loader's batches carry each label's values (``collate_training``) and the
    step passes them on: on a GPU the loss then reads no classes back (``Segments.of_images``)."""
    from reinseg.build import build_segmentor
    from reinseg.data import label_values
    from reinseg.datamodule import SegmentationDataModule
    from reinseg.engine import SegmentationTask
    from reinseg.heads.criterion import Segments

    config = tiny_config(tmp_path)
    batch = next(iter(SegmentationDataModule(config).train_dataloader()))
    assert batch["label_values"] == [label_values(label) for label in batch["label"]]
    given = []
    of_images = Segments.of_images.__func__

    def recorded(cls, labels, *args, values=None, **kwargs):
        given.append(values)
        return of_images(cls, labels, *args, values=values, **kwargs)

    monkeypatch.setattr(Segments, "of_images", classmethod(recorded))
    task = SegmentationTask(config, segmentor=build_segmentor(config.model), write_metrics=False)
    assert torch.isfinite(task.training_step(batch, 0))
    assert given == [batch["label_values"]]


@pytest.mark.slow  # a process of its own, killed (6 s); tests/test_resume.py kills runs at every other point
def test_a_killed_run_resumes_exactly(tmp_path):
    from reinseg.engine import train

    reference = tiny_config(tmp_path / "a")
    interrupted = tiny_config(tmp_path / "b")
    (tmp_path / "b.yaml").write_text(dump_config(interrupted))
    train(reference)  # here: the killed run alone needs a process of its own
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(tmp_path / "b.yaml"), "4"],
        capture_output=True,
        timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    assert killed.returncode == -9  # SIGKILL after iteration 4 (checkpoints at 2 and 4)
    checkpoints = tmp_path / "b" / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["iter_000002.ckpt", "iter_000004.ckpt", "last.ckpt"]
    train(interrupted)
    a = torch.load(tmp_path / "a" / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


def test_checkpoints_hold_the_trainable_weights_and_reference_the_vfm(tmp_path):
    from reinseg.build import build_segmentor
    from reinseg.engine import train

    config = tiny_config(tmp_path, max_iters=2)
    vfm = tmp_path / "vfm.pth"
    torch.save(build_segmentor(config.model).backbone.vit.state_dict(), vfm)
    config.model.backbone.checkpoint = str(vfm)
    train(config)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    keys = set(checkpoint["state_dict"])
    assert keys and all(k.startswith(("segmentor.backbone.rein.", "segmentor.head.")) for k in keys)
    assert checkpoint["config"]["model"]["backbone"]["checkpoint"] == str(vfm)
    assert checkpoint["optimizer_states"] and checkpoint["lr_schedulers"]
    leftovers = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # atomic writes leave no temporary files


@pytest.mark.slow  # an in-process training run
def test_a_randomly_initialised_vfm_is_stored_since_it_cannot_be_referenced(tmp_path):
    from reinseg.checkpoints import segmentor_from_checkpoint
    from reinseg.engine import train

    task = train(tiny_config(tmp_path, max_iters=2))
    checkpoint = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert any(k.startswith("segmentor.backbone.vit.") for k in torch.load(checkpoint, weights_only=True)["state_dict"])
    restored, _ = segmentor_from_checkpoint(checkpoint)
    for key, value in task.segmentor.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path):
    num_val = 5
    config = tiny_config(tmp_path, num_val=num_val, max_iters=3, val_interval=3, devices=2, accelerator="cpu")
    (tmp_path / "ddp.yaml").write_text(dump_config(config))
    result = run_reinseg("train", str(tmp_path / "ddp.yaml"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in result.stderr + result.stdout
    import json

    metrics = json.loads((tmp_path / "run" / "metrics" / "val_step0000003.json").read_text())
    # The validation images on 2 ranks: the summed confusion matrix counts every labelled pixel once.
    from reinseg.data import build_dataset

    dataset = build_dataset("cityscapes", tmp_path / "cityscapes", "val")
    labelled = sum(int((item["label"] != 255).sum()) for item in (dataset[i] for i in range(len(dataset))))
    assert len(dataset) == num_val
    assert metrics["domains"]["cityscapes"]["pixels"] == labelled


EXIT_WITH_A_PROCESS_GROUP = textwrap.dedent(
    """
    import atexit, sys
    import torch
    import torch.distributed as dist

    # Registered before reinseg's own exit handler, so it runs after it.
    atexit.register(lambda: print("initialized at exit:", dist.is_initialized()))
    import reinseg.engine as engine

    def run():  # a run's collectives (train, evaluate): returns, or fails in the middle
        total = torch.ones(2)
        dist.all_reduce(total)
        print("reduced:", total.tolist())
        if sys.argv[2] == "fails":
            raise SystemExit(3)

    dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
    engine._records_completion(run)()
    """
)


@pytest.mark.slow  # processes importing Lightning
@pytest.mark.parametrize(("ending", "status", "destroyed"), [("returns", 0, True), ("fails", 3, False)])
def test_the_process_group_a_run_leaves_is_destroyed_at_exit(tmp_path, ending, status, destroyed):
    """Lightning destroys NCCL's process group at exit, not gloo's: a two-rank CPU run that had
    finished its work then aborted now and then in the interpreter's teardown (exit -6,
    "terminate called without an active exception"). reinseg's exit handler destroys it first,
    after a run that returned; after one that failed it is left as before (a collective still in
    flight would make the destroy wait for the other ranks, up to the group's timeout)."""
    script = tmp_path / "exit.py"
    script.write_text(EXIT_WITH_A_PROCESS_GROUP)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "store"), ending], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == status, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["reduced: [1.0, 1.0]", f"initialized at exit: {not destroyed}"]
    assert "Exception ignored" not in result.stderr and "Traceback" not in result.stderr


EVAL_WITH_SIGTERM = textwrap.dedent(
    """
    import json, os, signal, sys
    import lightning as L
    import reinseg.engine as engine
    from reinseg.config import load_config

    class SignalEveryBatch(L.Callback):  # each DDP rank signals itself during the validation
        def on_validation_batch_end(self, trainer, *args):
            os.kill(os.getpid(), signal.SIGTERM)

    build_trainer = engine.build_trainer
    engine.build_trainer = lambda config, callbacks=None, **kw: build_trainer(config, [SignalEveryBatch()], **kw)
    task = engine.evaluate(load_config(sys.argv[1]), sys.argv[2])
    if task.trainer.is_global_zero:
        print(json.dumps(task.last_results["domains"]["cityscapes"]["pixels"]))
    """
)


@pytest.mark.slow
def test_sigterm_during_a_two_process_evaluation_lets_it_finish(tmp_path):
    """Lightning's SIGTERM handling stopped one rank mid-validation while the other waited in the
    score sums: the ranks hung. Now the evaluation ends, with every image counted. One validation
    image: rank 1 has none (Lightning refused its empty loader; it now validates an empty batch)."""
    from reinseg.build import build_segmentor
    from reinseg.checkpoints import checkpoint_state_dict, save_checkpoint
    from reinseg.config import to_dict
    from reinseg.data import build_dataset

    config = tiny_config(tmp_path, num_val=1, devices=2, accelerator="cpu")
    (tmp_path / "eval.yaml").write_text(dump_config(config))
    checkpoint = save_checkpoint(
        tmp_path / "model.ckpt", {"model": to_dict(config.model)}, checkpoint_state_dict(build_segmentor(config.model))
    )
    (tmp_path / "evaluate.py").write_text(EVAL_WITH_SIGTERM)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "evaluate.py"), str(tmp_path / "eval.yaml"), str(checkpoint)],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(torch.get_num_threads())},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGTERM arrived during the evaluation, which finished first" in result.stderr
    dataset = build_dataset("cityscapes", tmp_path / "cityscapes", "val")
    labelled = sum(int((dataset[i]["label"] != 255).sum()) for i in range(len(dataset)))
    assert json.loads(result.stdout.strip().splitlines()[-1]) == labelled


@pytest.mark.slow
def test_a_two_process_eval_writes_its_results_and_examples_once(tmp_path):
    """Every rank returned from the evaluation and wrote the results JSON (and would have made the
    ACDC submission, racing for its folder): the first rank alone does now."""
    from reinseg.build import build_segmentor
    from reinseg.checkpoints import checkpoint_state_dict, save_checkpoint
    from reinseg.config import to_dict

    config = tiny_config(tmp_path, num_val=3, devices=2, accelerator="cpu")
    (tmp_path / "eval.yaml").write_text(dump_config(config))
    checkpoint = save_checkpoint(
        tmp_path / "model.ckpt", {"model": to_dict(config.model)}, checkpoint_state_dict(build_segmentor(config.model))
    )
    target = tmp_path / "results.json"
    preds = tmp_path / "preds"
    result = run_reinseg(
        "eval",
        *(str(tmp_path / "eval.yaml"), str(checkpoint), "--json", str(target), "--save-examples", "1"),
        *("--save-preds", str(preds)),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(f"wrote {target}") == 1
    results = json.loads(target.read_text())
    assert len(results["domains"]["cityscapes"]["images"]) == 3  # every image once, over both ranks
    assert list((tmp_path / "results_examples" / "cityscapes").glob("*.png"))
    # Both ranks' predictions; the first rank alone prepared the folder (its marker, then gone).
    assert len(list(preds.rglob("*.png"))) == 3 and not (preds / ".reinseg-incomplete").exists()
    assert "removing the incomplete predictions" not in result.stderr  # the second rank did not take it for one


def test_under_ddp_the_sigterm_handler_lightning_registers_only_marks_the_rank(tmp_path):
    """Lightning's handler runs a collective inside the signal handler; under DDP the trainer's
    connector registers _RunGuard's mark instead, from the start of fit or validate on."""
    import signal

    from reinseg.engine import _run_guard

    trainer = build_trainer(tiny_config(tmp_path, devices=2, accelerator="cpu"), logging=False)
    connector = trainer._signal_connector
    connector.register_signal_handlers()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        connector.teardown()
    assert _run_guard(trainer).signalled() and not trainer.received_sigterm


def test_a_resume_restores_the_current_cuda_devices_generator_only(monkeypatch):
    """One state per rank's own device: a checkpoint of a node with 8 visible GPUs resumes where
    one is visible (every device's states, restored all, raised IndexError there)."""
    from reinseg.engine import rng_state, set_rng_state

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": restored.append(int(state[0])))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every device's state saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every device's state restored"))
    state = rng_state()
    assert int(state["cuda_device"][0]) == 7
    set_rng_state(state)
    old = {"torch": torch.get_rng_state(), "cuda": [torch.tensor([i], dtype=torch.uint8) for i in range(8)]}
    set_rng_state(old)  # an older checkpoint: the current device's entry
    assert restored == [7, 0]


@pytest.mark.slow  # two short runs
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_gradients_are_clipped_under_each_precision(tmp_path, precision):
    """Lightning refuses to clip a fused optimizer's gradients under mixed precision (bf16-mixed
    is the GPU default): such a run failed at its first step."""
    import lightning as L

    from reinseg.engine import train

    class Norms(L.Callback):
        def __init__(self):
            self.norms = []

        def on_train_batch_end(self, trainer, pl_module, *args):  # the step's gradients, clipped
            grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
            self.norms.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())

    norms = Norms()
    config = tiny_config(tmp_path, max_iters=2, val_interval=100, precision=precision, grad_clip=1e-3)
    train(config, resume="never", callbacks=[norms])
    assert len(norms.norms) == 2 and max(norms.norms) <= 1e-3 * (1 + 1e-5)


@pytest.mark.slow  # a short run
def test_a_run_records_its_vfm_file_and_evaluation_refuses_another(tmp_path, monkeypatch):
    """The checkpoint references the VFM by its absolute path, with its fingerprint; evaluating
    with a config naming other weights is an error, not a wrong score."""
    from reinseg.checkpoints import load_checkpoint
    from reinseg.engine import evaluate, train

    config = tiny_config(tmp_path, max_iters=1, val_interval=100)
    torch.manual_seed(0)
    vit = build_segmentor(config.model, load_backbone_weights=False).backbone.vit
    torch.save(vit.state_dict(), tmp_path / "vfm.pth")
    torch.save({k: v * 1.01 for k, v in vit.state_dict().items()}, tmp_path / "other.pth")
    monkeypatch.chdir(tmp_path)
    config.model.backbone.checkpoint = "vfm.pth"
    train(config, resume="never")
    payload = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert payload["config"]["model"]["backbone"]["checkpoint"] == str(tmp_path / "vfm.pth")
    assert payload["vfm_fingerprint"]
    config.model.backbone.checkpoint = "other.pth"
    with pytest.raises(ValueError, match="was trained on other VFM weights than other.pth"):
        evaluate(config, str(tmp_path / "run" / "checkpoints" / "last.ckpt"))
    config.train.max_iters = 2  # nor does the run continue on them
    with pytest.raises(ValueError, match="was trained on other VFM weights than other.pth"):
        train(config)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_predictions_after_a_validation_run_as_the_validation(tmp_path, precision):
    """eval --save-examples and --submission predict after trainer.validate, whose teardown moves
    the model to the CPU: prediction_context puts it back on the trainer's device, under its
    autocast."""
    from reinseg.engine import SegmentationTask

    config = Config(model=tiny_model_config(), train=TrainConfig(output_dir=str(tmp_path), precision=precision))
    task = SegmentationTask(config, segmentor=build_segmentor(config.model), write_metrics=False)
    trainer = build_trainer(config, logging=False)
    task.trainer = trainer
    moved = []
    task.to = lambda device: moved.append(device) or task
    with task.prediction_context():
        assert torch.is_autocast_enabled("cpu") == (precision == "bf16-mixed")
    assert moved == [trainer.strategy.root_device]
    assert not torch.is_autocast_enabled("cpu")


def test_process_count_reads_devices_as_lightning(monkeypatch):
    """Several processes get reinseg's DDP strategy (its SIGTERM handling): -1, "auto", "-1" and
    index strings were counted as one process, leaving Lightning to pick DDP without it."""
    from reinseg.engine import process_count

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    on_gpu = {(1, 1), (2, 2), ("2", 2), (-1, 4), ("-1", 4), ("auto", 4), ("0,1", 2), ("0,", 1), ("1, 3, 5", 3)}
    assert {(devices, process_count(devices, on_gpu=True)) for devices, _ in on_gpu} == on_gpu
    assert [process_count(devices, on_gpu=False) for devices in (1, 3, "auto", "3")] == [1, 3, 1, 3]


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="advisory locks are POSIX flock")
def test_a_run_holds_its_folder_and_a_second_run_there_is_refused_before_writing(tmp_path):
    import lightning as L

    from reinseg.checkpoints import RunInProgressError, refuse_running_run
    from reinseg.engine import train

    class SecondRun(L.Callback):
        refused = None

        def on_train_start(self, trainer, pl_module):
            try:
                refuse_running_run(tmp_path / "run")
            except RunInProgressError as err:
                SecondRun.refused = str(err)

    config = tiny_config(tmp_path, max_iters=1, checkpoint_interval=1)
    config.data.val = []
    train(config, callbacks=[SecondRun()])
    assert SecondRun.refused is not None and "another reinseg run (this process)" in SecondRun.refused
    train(config)  # the lock went with the first run: the finished run is found, not refused

    second = tiny_config(tmp_path, output_dir=str(tmp_path / "second"))
    from test_checkpoints import _hold_lock_in_another_process

    (tmp_path / "second").mkdir()
    holder = _hold_lock_in_another_process(tmp_path / "second")
    try:
        with pytest.raises(RunInProgressError, match=str(tmp_path / "second")):
            train(second)
    finally:
        holder.kill()
        holder.wait()
    assert sorted(p.name for p in (tmp_path / "second").iterdir()) == [".reinseg-run.lock"]


@pytest.mark.slow
def test_a_failed_validation_keeps_the_training_before_it_and_the_resume_is_exact(tmp_path):
    """An error in a validation during training (a file, the disk) comes after a whole step:
    last.ckpt is written at that step first, and the resumed run ends as an uninterrupted one."""
    import lightning as L

    from reinseg.engine import train

    class FailingDisk(L.Callback):
        def on_validation_batch_start(self, trainer, *args):
            raise OSError(28, "No space left on device", "metrics")

    options = dict(max_iters=6, val_interval=3, checkpoint_interval=2)
    reference = tiny_config(tmp_path / "a", **options)
    train(reference)
    failed = tiny_config(tmp_path / "b", **options)
    with pytest.raises(OSError, match="No space left"):
        train(failed, callbacks=[FailingDisk()])
    checkpoints = Path(failed.train.output_dir) / "checkpoints"
    kept = torch.load(checkpoints / "last.ckpt", weights_only=True, map_location="cpu")
    assert kept["global_step"] == 3  # not iter_000002's step
    train(failed)
    a = torch.load(Path(reference.train.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert (Path(failed.train.output_dir) / "metrics" / "val_step0000003.json").is_file()


@pytest.mark.slow
def test_a_diverged_run_is_a_one_line_error_with_what_to_change(tmp_path, capsys):
    from reinseg.cli import main

    config = tiny_config(tmp_path, max_iters=4)
    config.data.val = []
    (tmp_path / "config.yaml").write_text(dump_config(config))
    assert main(["train", str(tmp_path / "config.yaml"), "train.lr=1e9"]) == 2
    err = capsys.readouterr().err
    assert "reinseg train: error: the matching cost is not finite" in err and "train.lr" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(devices="foo"), r"train.accelerator='auto', train.devices='foo', train.num_nodes=1: "),
        (dict(accelerator="tpu"), r"train.accelerator='tpu'"),
        (dict(accelerator="nope"), r"train.accelerator='nope'.*nope"),
    ],
)
def test_what_lightning_refuses_in_accelerator_and_devices_is_named(tmp_path, options, message):
    from reinseg.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        build_trainer(tiny_config(tmp_path, **options))


def _damage_largest_record(path: Path) -> None:
    """Overwrite bytes inside the checkpoint's largest tensor record (the zip stays readable;
    only the record's CRC tells)."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
        with open(path, "rb") as raw:
            raw.seek(info.header_offset + 26)
            name_length, extra_length = (int.from_bytes(raw.read(2), "little") for _ in range(2))
    start = info.header_offset + 30 + name_length + extra_length
    with open(path, "r+b") as raw:
        raw.seek(start + info.file_size // 2)
        raw.write(b"\x00\x00\x80\x3f" * 16)  # float 1.0


@pytest.mark.slow
def test_checkpoints_damaged_inside_a_tensor_are_passed_over_or_named(tmp_path, capsys):
    """torch.load does not check the zip CRCs: damaged bytes inside a tensor loaded as other
    numbers (a resume trained on from them, eval scored them)."""
    from reinseg.cli import main
    from reinseg.engine import latest_checkpoint, train

    config = tiny_config(tmp_path, max_iters=4, checkpoint_interval=2)
    config.data.val = []
    train(config)
    checkpoints = Path(config.train.output_dir) / "checkpoints"
    _damage_largest_record(checkpoints / "last.ckpt")
    assert latest_checkpoint(checkpoints) == checkpoints / "iter_000004.ckpt"  # the same step, intact
    (tmp_path / "config.yaml").write_text(dump_config(tiny_config(tmp_path, max_iters=4, checkpoint_interval=2)))
    assert main(["eval", str(tmp_path / "config.yaml"), str(checkpoints / "last.ckpt")]) == 2
    err = capsys.readouterr().err
    assert "last.ckpt: its record" in err and "do not match its CRC" in err
    for name in ("iter_000002.ckpt", "iter_000004.ckpt"):
        _damage_largest_record(checkpoints / name)
    # Every checkpoint damaged: starting afresh would write over the run; refused instead.
    with pytest.raises(ValueError, match="no checkpoint in .* reads back whole.*--resume never --overwrite"):
        train(tiny_config(tmp_path, max_iters=6, checkpoint_interval=2))
    with pytest.raises(ValueError, match="iter_000002.ckpt: its record .* is damaged"):
        train(tiny_config(tmp_path, max_iters=6, checkpoint_interval=2), resume=str(checkpoints / "iter_000002.ckpt"))


def test_a_partial_last_row_of_the_csv_log_is_cut_before_appending(tmp_path):
    """A kill or a full disk midway through an append left half a row, to which the resumed run
    joined its first row (loss 55.3 read as 55.3 of one column and a step of another)."""
    from reinseg.engine import _AppendingWriter

    log_dir = tmp_path / "csv"
    log_dir.mkdir()
    (log_dir / "metrics.csv").write_text("epoch,step,train/loss\n0,1,60.5\n0,2,55.3")
    writer = _AppendingWriter(str(log_dir))
    writer.log_metrics({"epoch": 0, "train/loss": 50.0}, step=2)
    writer.save()
    assert (log_dir / "metrics.csv").read_text().splitlines() == ["epoch,step,train/loss", "0,1,60.5", "0,2,50.0"]


def test_a_run_folder_the_run_cannot_write_to_is_found_before_training(tmp_path, monkeypatch):
    import tempfile

    from reinseg.engine import _check_writable_run

    out = tmp_path / "run"
    _check_writable_run(out)
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "csv", "metrics", "tensorboard"]
    (out / "metrics").rmdir()
    (out / "metrics").symlink_to(tmp_path / "nowhere" / "metrics")  # a link to a folder that is gone
    with pytest.raises(OSError, match="cannot write there"):
        _check_writable_run(out)
    (out / "metrics").unlink()
    (out / "checkpoints" / "last.ckpt").mkdir()
    with pytest.raises(IsADirectoryError, match="last.ckpt"):
        _check_writable_run(out)
    (out / "checkpoints" / "last.ckpt").rmdir()
    real = tempfile.TemporaryFile

    def read_only(*args, dir=None, **kwargs):  # as root, permission bits would not stop the test
        if str(dir).endswith("checkpoints"):
            raise PermissionError(13, "Permission denied", str(dir))
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(OSError, match=r"cannot write there \(Permission denied\)") as refused:
        _check_writable_run(out)
    assert refused.value.filename == str(out / "checkpoints")


FAILING_VALIDATION_RUN = """
import sys
from reinseg import engine
from reinseg.cli import main

def fail(self, *args, **kwargs):
    raise OSError(28, "No space left on device", "metrics")

engine.SegmentationTask.validation_step = fail
sys.exit(main(["train", sys.argv[1]]))
"""


@pytest.mark.slow
def test_a_run_with_data_workers_exits_after_a_failed_validation(tmp_path):
    """The workers ignore SIGTERM (a group signal must reach the main process alone), and
    multiprocessing ends daemonic children at exit with SIGTERM, then waits: the process hung
    after printing its error."""
    config = tiny_config(tmp_path, max_iters=4, val_interval=2, checkpoint_interval=4)
    config.data.num_workers = 1
    (tmp_path / "config.yaml").write_text(dump_config(config))
    ended = subprocess.run(
        [sys.executable, "-c", FAILING_VALIDATION_RUN, str(tmp_path / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ended.returncode == 2, ended.stderr[-2000:]
    assert "reinseg train: error: No space left on device: metrics" in ended.stderr
    kept = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 2  # saved before the validation's error


@pytest.mark.slow  # two training runs
def test_on_a_gpu_training_steps_read_values_only_when_they_are_logged(tmp_path, monkeypatch):
    """Reading a tensor's value makes the host wait for a GPU, and so does copying a Python number
    to it. Outside the loss's own reads (``test_segmentor``), a step reads values only when its
    logs are written, where the progress bar takes the loss it shows (Lightning reads its
    progress-bar metrics twice every step, which is why the loss is not one), and logs nothing a
    copy would bring to the device. On the CPU, where reading is free, the bar reads every step."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from reinseg.engine import SegmentationTask, _Progress, train

    events: list[str] = []

    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            aten = torch.ops.aten
            if func in (aten._local_scalar_dense.default, aten.lift_fresh.default):
                frames, frame = [], sys._getframe()
                while frame is not None:
                    frames.append((frame.f_code.co_filename, frame.f_code.co_name))
                    frame = frame.f_back
                # (The data pipeline's reads are of host tensors: collate runs here without workers.)
                if not any(
                    "reinseg/heads" in file or "evaluation_loop" in file or "reinseg/data/" in file
                    for file, _ in frames
                ):
                    if func is aten.lift_fresh.default:
                        # A Python number logged: Lightning makes it torch.tensor(value, device=...).
                        if any(name.endswith("__to_tensor") for _, name in frames):
                            events.append("copy")
                    elif any(name == "on_train_batch_end" and file.endswith("engine.py") for file, name in frames):
                        events.append("bar")
                    else:
                        events.append("read")
            return func(*args, **(kwargs or {}))

    training_step = SegmentationTask.training_step

    def marked(self, *args, **kwargs):
        events.append("step")
        return training_step(self, *args, **kwargs)

    monkeypatch.setattr(SegmentationTask, "training_step", marked)
    for on_a_gpu in (True, False):
        monkeypatch.setattr(_Progress, "reads_freely", staticmethod(lambda module, free=not on_a_gpu: free))
        config = tiny_config(tmp_path / str(on_a_gpu), max_iters=6, log_interval=3, checkpoint_interval=100)
        events.clear()
        with Reads():
            train(config)
        steps = [step.split() for step in " ".join(events).split("step")[1:]]  # each step's, to the next one
        assert [i + 1 for i, step in enumerate(steps) if "copy" in step] == [], steps
        assert [i + 1 for i, step in enumerate(steps) if "read" in step] == [3, 6], steps  # the logs
        assert [step.count("bar") for step in steps] == ([0, 0, 1, 0, 0, 1] if on_a_gpu else [1] * 6), steps
