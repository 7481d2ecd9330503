"""Untrusted files never run code or exhaust the machine: weight files, checkpoints, configs.

Each hostile payload would create a marker file if any of its code ran; every loading path must
refuse it with the file and the global named, and leave no marker.
"""

import io
import json
import os
import pickle
import subprocess
import warnings
import zipfile

import pytest
import torch
from conftest import DATA, tiny_model_config, tiny_overrides

from reinseg import build_backbone
from reinseg.build import build_segmentor
from reinseg.checkpoints import checkpoint_state_dict, load_checkpoint, save_checkpoint
from reinseg.cli import main
from reinseg.config import Config, ConfigError, dump_config, load_config, to_dict
from reinseg.official_config import read_official_config
from reinseg.pretrained import read_state_dict
from reinseg.safe_load import MAX_NODES, UnsafeFileError, count_nodes, load_torch_file, load_yaml

TINY = tiny_overrides("dinov2_vits14")
# torch's legacy (pre-zip) format starts with this number, pickled.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class RunsExec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


class RunsSubprocess(RunsExec):
    def __reduce__(self):
        return (subprocess.call, (["touch", str(self.marker)],))


class RunsOsSystem(RunsExec):
    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


class HeaderThatRunsAndPasses(RunsExec):
    """Evaluates to the legacy magic number after running code: the rest of the file still loads."""

    def __reduce__(self):
        code = f"__import__('pathlib').Path({str(self.marker)!r}).touch() or {LEGACY_MAGIC}"
        return (eval, (code,))


def backbone_weights():
    return build_backbone("dinov2_vits14", img_size=32, patch_size=16, **TINY).vit.state_dict()


def hostile_files(directory, marker):
    """Every way a hostile payload can sit in a weight file; name -> path."""
    weights = backbone_weights()
    files = {}
    files["zip_exec"] = directory / "zip_exec.pth"
    torch.save({"state_dict": weights, "meta": RunsExec(marker)}, files["zip_exec"])
    files["zip_subprocess"] = directory / "zip_subprocess.pth"
    torch.save({"state_dict": weights, "meta": RunsSubprocess(marker)}, files["zip_subprocess"])
    files["legacy_os_system"] = directory / "legacy_os_system.pth"
    torch.save(
        {"state_dict": weights, "hub": RunsOsSystem(marker)},
        files["legacy_os_system"],
        _use_new_zipfile_serialization=False,
    )
    files["plain_pickle"] = directory / "plain_pickle.pth"
    files["plain_pickle"].write_bytes(pickle.dumps({"state_dict": {}, "x": RunsExec(marker)}, protocol=2))
    # A legacy file whose first record (the magic number torch reads with pickle's load) runs code
    # and then evaluates to the magic number, followed by a working backbone.
    legit = io.BytesIO()
    torch.save(weights, legit, _use_new_zipfile_serialization=False)
    legit_bytes = legit.getvalue()
    magic_length = len(pickle.dumps(LEGACY_MAGIC, protocol=2))
    assert pickle.loads(legit_bytes[:magic_length]) == LEGACY_MAGIC
    files["legacy_header"] = directory / "legacy_header.pth"
    files["legacy_header"].write_bytes(
        pickle.dumps(HeaderThatRunsAndPasses(marker), protocol=2) + legit_bytes[magic_length:]
    )
    return files


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hostile")
    marker = directory / "code_ran"
    return hostile_files(directory, marker), marker


def assert_refused(err_text, path, marker):
    assert not marker.exists(), "code in the file ran"
    assert str(path) in err_text


@pytest.mark.parametrize("kind", ["zip_exec", "zip_subprocess", "legacy_os_system", "plain_pickle", "legacy_header"])
def test_read_state_dict_and_build_backbone_refuse_code(hostile, kind):
    files, marker = hostile
    with pytest.raises(ValueError) as err:
        read_state_dict(files[kind])
    assert_refused(str(err.value), files[kind], marker)
    with pytest.raises(ValueError) as err:
        build_backbone("dinov2_vits14", img_size=32, patch_size=16, checkpoint=files[kind], **TINY)
    assert_refused(str(err.value), files[kind], marker)


@pytest.mark.parametrize(
    "kind, global_name",
    [("zip_exec", "builtins.exec"), ("zip_subprocess", r"(subprocess|commands)\.call"), ("legacy_os_system", "system")],
)
def test_the_refused_global_is_named(hostile, kind, global_name):
    files, marker = hostile
    with pytest.raises(UnsafeFileError, match=global_name):
        load_torch_file(files[kind])
    assert not marker.exists()


def test_the_legacy_header_payload_was_a_working_backbone_before(tmp_path):
    """Guards the fixture: with an unrestricted reader, the crafted file runs code and loads."""
    marker = tmp_path / "control_marker"
    path = hostile_files(tmp_path, marker)["legacy_header"]
    state = torch.load(path, weights_only=False)  # the unsafe reader, on purpose
    assert marker.exists() and set(state) == set(backbone_weights())


def test_reinseg_checkpoint_paths_refuse_code(hostile):
    files, marker = hostile
    for path in files.values():
        with pytest.raises(ValueError) as err:
            load_checkpoint(path)
        assert_refused(str(err.value), path, marker)


def test_convert_official_refuses_code(hostile, tmp_path, capsys):
    files, marker = hostile
    (tmp_path / "config.py").write_text("model = dict(type='EncoderDecoder')\n")
    legit = tmp_path / "legit.pth"
    torch.save({"x": torch.zeros(1)}, legit)
    for option in ("--checkpoint", "--backbone"):
        paths = {"--checkpoint": legit, "--backbone": legit, option: files["legacy_header"]}
        argv = ["convert-official", "--config", str(tmp_path / "config.py"), "--output", str(tmp_path / "out")]
        argv += ["--checkpoint", str(paths["--checkpoint"]), "--backbone", str(paths["--backbone"])]
        assert main(argv) == 2
        assert_refused(capsys.readouterr().err, files["legacy_header"], marker)


def test_predict_refuses_a_backbone_file_named_inside_a_checkpoint(hostile, tmp_path, capsys):
    """`predict` takes the VFM weight path from the checkpoint's own config."""
    import numpy as np
    from PIL import Image

    files, marker = hostile
    model = tiny_model_config()
    segmentor = build_segmentor(model)
    config = to_dict(Config(model=model))
    config["model"]["backbone"]["checkpoint"] = str(files["zip_exec"])
    save_checkpoint(tmp_path / "model.ckpt", config, checkpoint_state_dict(segmentor))
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "image.png")
    argv = ["predict", str(tmp_path / "model.ckpt"), str(tmp_path / "image.png"), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    assert_refused(capsys.readouterr().err, files["zip_exec"], marker)


@pytest.mark.slow
def test_train_refuses_hostile_backbone_and_resume_files(hostile, tmp_path, capsys):
    from test_engine import tiny_config

    files, marker = hostile
    config = tiny_config(tmp_path, num_val=2, max_iters=2, val_interval=2)
    (tmp_path / "config.yaml").write_text(dump_config(config))
    argv = ["train", str(tmp_path / "config.yaml"), f"model.backbone.checkpoint={files['legacy_header']}"]
    assert main(argv) == 2
    assert_refused(capsys.readouterr().err, files["legacy_header"], marker)
    # An auto-resume from a hostile last.ckpt in the run folder.
    (tmp_path / "run" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (tmp_path / "run" / "checkpoints" / "last.ckpt").write_bytes(files["zip_exec"].read_bytes())
    assert main(["train", str(tmp_path / "config.yaml")]) == 2
    assert_refused(capsys.readouterr().err, "last.ckpt", marker)


def test_a_real_mmengine_checkpoint_reads_without_mmengine():
    """tests/data/mmengine_runner_tiny.pth was written by mmengine's save_checkpoint
    (tests/golden/make_mmengine_checkpoint.py): history buffers, numpy values, ConfigDict, getattr."""
    import sys

    state = read_state_dict(DATA / "mmengine_runner_tiny.pth")
    expected = torch.load(DATA / "mmengine_runner_tiny_weights.pt", weights_only=True)
    assert set(state) == set(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert "mmengine" not in sys.modules


def test_argparse_namespaces_of_training_scripts_are_records(tmp_path):
    import argparse

    weights = {"w": torch.ones(2)}
    torch.save({"model": weights, "args": argparse.Namespace(lr=0.1, epochs=3)}, tmp_path / "deit.pth")
    assert torch.equal(read_state_dict(tmp_path / "deit.pth")["w"], weights["w"])


def torchscript_archive(tmp_path):
    source = build_backbone("dinov2_vits14", img_size=32, patch_size=16, **TINY)
    with warnings.catch_warnings():  # TorchScript's deprecation (Future- or DeprecationWarning by release)
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(source.vit, torch.randn(1, 3, 32, 32), strict=False)
    traced.save(str(tmp_path / "model.pt"))
    return source, tmp_path / "model.pt"


def test_torchscript_archives_are_read_as_data(tmp_path, monkeypatch):
    """OpenAI ships CLIP as a TorchScript archive: its modules' tensors are the state dict, read
    without torch.jit.load."""
    source, path = torchscript_archive(tmp_path)

    def no_jit_load(*args, **kwargs):
        raise AssertionError("torch.jit.load runs TorchScript code; it must not be called")

    monkeypatch.setattr(torch.jit, "load", no_jit_load)
    loaded = build_backbone("dinov2_vits14", img_size=32, patch_size=16, checkpoint=path, **TINY)
    for key, value in source.vit.state_dict().items():
        assert torch.equal(loaded.vit.state_dict()[key], value), key


def test_a_torchscript_archive_with_a_hostile_data_record_is_refused(tmp_path):
    _, path = torchscript_archive(tmp_path)
    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(hostile, "w") as dst:
        for name in src.namelist():
            data = src.read(name)
            if name.endswith("/data.pkl") and name.count("/") == 1:
                data = pickle.dumps(RunsExec(marker), protocol=2)
            dst.writestr(name, data)
    with pytest.raises(UnsafeFileError, match=r"hostile\.pt.*builtins\.exec"):
        read_state_dict(hostile)
    assert not marker.exists()


def test_a_checkpoint_whose_containers_hold_themselves_or_nest_exponentially_is_refused(tmp_path):
    """A 2 kB file: a list holding itself, or a list of the same list twice nested 40 levels
    (2 ** 40 paths). torch reads both in milliseconds; every walk over them ran forever."""
    looped: list = [1]
    looped.append(looped)
    nested: list = []
    for _ in range(40):
        nested = [nested, nested]
    for name, junk in (("looped.pth", looped), ("nested.pth", nested)):
        torch.save({"state_dict": {"w": torch.zeros(2)}, "junk": junk}, tmp_path / name)
        with pytest.raises(ValueError, match=f"{name}: refused.*more than {MAX_NODES:,} values"):
            load_torch_file(tmp_path / name, "checkpoint")


def test_a_compressed_record_that_expands_a_thousandfold_is_refused(tmp_path):
    """torch.save writes its records uncompressed; deflated zeros expand about 1000 times (a
    20 MB file, 20 GB as it is read)."""
    torch.save({"w": torch.zeros(2**20)}, tmp_path / "stored.pth")
    with zipfile.ZipFile(tmp_path / "stored.pth") as src, zipfile.ZipFile(tmp_path / "bomb.pth", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    assert (tmp_path / "bomb.pth").stat().st_size < 64 * 2**10
    assert torch.equal(load_torch_file(tmp_path / "stored.pth")["w"], torch.zeros(2**20))
    with pytest.raises(
        ValueError, match=r"bomb\.pth: refused.*tensor record .*data/0 is compressed \([\d,]+ bytes for 4,194,304\)"
    ):
        load_torch_file(tmp_path / "bomb.pth", "checkpoint")


def _script_record_class():
    """A class that pickles as a TorchScript module record, ``__torch__.M``, with its attributes."""
    import copyreg

    def reduce(self, protocol):
        return (copyreg.__newobj__, (type(self),), self.attributes)

    def init(self, attributes):
        self.attributes = attributes

    return type("M", (), {"__module__": "__torch__", "__init__": init, "__reduce_ex__": reduce})


class _StorageRef:
    """Pickles as a tensor of 4 floats on the archive's storage ``0``."""

    def __reduce__(self):
        import collections

        return (torch._utils._rebuild_tensor_v2, (_STORAGE, 0, (4,), (1,), False, collections.OrderedDict()))


_STORAGE = object()


class _ScriptPickler(pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj is _STORAGE else None


def test_a_torchscript_archive_of_shared_modules_nested_exponentially_is_refused(tmp_path, monkeypatch):
    """Module records holding the same record twice, 20 levels deep, over one tensor: a million
    names, each a clone (at 40 levels, 900 bytes of archive, memory grew until it ran out)."""
    import sys
    import types

    record = _script_record_class()
    module = types.ModuleType("__torch__")
    module.M = record
    monkeypatch.setitem(sys.modules, "__torch__", module)
    node = record({"w": _StorageRef()})
    for _ in range(20):
        node = record({"a": node, "b": node})
    pickled = io.BytesIO()
    _ScriptPickler(pickled, protocol=2).dump(node)
    with zipfile.ZipFile(tmp_path / "shared.pt", "w") as archive:  # stored, as torch.jit.save writes
        archive.writestr("arch/data.pkl", pickled.getvalue())
        archive.writestr("arch/constants.pkl", b"")
        archive.writestr("arch/code/__torch__.py", b"")
        archive.writestr("arch/data/0", bytes(16))
    with pytest.raises(ValueError, match=r"shared\.pt: refused.*more than 100,000 module records"):
        read_state_dict(tmp_path / "shared.pt")


def test_an_image_given_as_checkpoint_is_named_without_torch_advice(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.png")
    with pytest.raises(ValueError) as err:
        load_checkpoint(tmp_path / "photo.png")
    assert "photo.png" in str(err.value) and "weights_only" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# Configs


@pytest.mark.parametrize(
    "source, message",
    [
        ("x = list(range(10 ** 9))\n", "range of more than"),
        ("x = 2 ** 2 ** 40\n", "integer of more than"),
        ("x = 10 ** 10 ** 6\n", "integer of more than"),
        ("x = [0] * 10 ** 9\n", "more than"),
        ("x = 'ab' * 10 ** 9\n", "more than"),
        ("x = '%0999999999d' % 1\n", "string formatting"),
        ("x = round(1, -10 ** 9)\n", "ndigits"),
        pytest.param(  # 2.5 s: the work budget runs out
            "x = [[i for i in range(100000)] for j in range(100000)]\n", "evaluation steps", marks=pytest.mark.slow
        ),
        ("a = 'x' * 500000\n" + "".join(f"a{i} = a + a\na = a{i}\n" for i in range(12)), "more than"),
        ("x = " + "+".join(["1"] * 200000) + "\n", "nested too deeply"),
    ],
)
def test_hostile_official_configs_are_bounded(tmp_path, source, message):
    (tmp_path / "hostile.py").write_text(source)
    with pytest.raises(ValueError, match=message) as err:
        read_official_config(tmp_path / "hostile.py")
    assert "hostile.py" in str(err.value)


def test_a_base_cycle_names_its_files(tmp_path):
    (tmp_path / "a.py").write_text("_base_ = ['./b.py']\nx = 1\n")
    (tmp_path / "b.py").write_text("_base_ = './a.py'\ny = 2\n")
    with pytest.raises(ValueError, match=r"_base_ cycle: .*a\.py -> .*b\.py -> .*a\.py"):
        read_official_config(tmp_path / "a.py")
    (tmp_path / "self.py").write_text("_base_ = ['self.py']\n")
    with pytest.raises(ValueError, match="_base_ cycle"):
        read_official_config(tmp_path / "self.py")


def test_ordinary_official_configs_still_read(tmp_path):
    (tmp_path / "ok.py").write_text(
        "num_classes = 19\nscales = [int(512 * x * 0.1) for x in range(5, 21)]\n"
        "class_weight = [1.0] * num_classes + [0.1]\nmax_iters = 40000\nbig = 2 ** 31 - 1\n"
    )
    config = read_official_config(tmp_path / "ok.py")
    assert len(config["class_weight"]) == 20 and config["big"] == 2147483647 and len(config["scales"]) == 16


BILLION_LAUGHS = "\n".join(
    ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
)


def test_a_yaml_alias_bomb_is_refused(tmp_path, capsys):
    assert len(BILLION_LAUGHS) < 1500
    (tmp_path / "bomb.yaml").write_text(BILLION_LAUGHS + "\n")
    with pytest.raises(ConfigError, match=r"bomb\.yaml.*more than"):
        load_config(tmp_path / "bomb.yaml")
    assert main(["train", str(tmp_path / "bomb.yaml")]) == 2
    assert "bomb.yaml" in capsys.readouterr().err
    # The same bomb as a command-line override.
    flow_bomb = "{" + ", ".join(BILLION_LAUGHS.splitlines()) + "}"
    config = DATA.parent.parent / "configs" / "rein_dinov2-l_gta_512.yaml"
    with pytest.raises(ConfigError, match="override model.head: expands to more than"):
        load_config(config, ["model.head=" + flow_bomb])


def test_count_nodes_counts_shared_values_as_written_out():
    leaf = {"lr": 0.1, "name": "x" * 130}  # 1 + 2 keys + 2 values + 130 // 64 = 7
    shared = [leaf, leaf, (1, 2)]
    value = {"a": shared, "b": [shared, shared, "s"], "c": frozenset({1, 2})}
    # The oracle: the same value written out, no object shared (JSON has no references).
    written_out = json.loads(json.dumps({**value, "c": [1, 2]}))
    # The dict and its 3 keys; "a": the list, two leaves, the pair (1 + 7 + 7 + 3 = 18); "b": 1 + 2 x 18 + 1;
    # "c": 1 + 2.
    assert count_nodes(value) == count_nodes(written_out) == 1 + 3 + 18 + (1 + 2 * 18 + 1) + 3
    assert count_nodes(leaf) == 7
    assert count_nodes(value, limit=20) == 21  # stops once past the limit


def test_a_yaml_value_that_contains_itself_is_refused():
    with pytest.raises(ValueError, match="loop.yaml: expands to more than"):
        load_yaml("a: &a [1, *a]\n", "loop.yaml")
    nested = []
    nested.append({"self": nested})
    assert count_nodes(nested) == MAX_NODES + 1


def test_yaml_anchors_within_bounds_still_work():
    data = load_yaml("base: &base {lr: 0.1, wd: 0.05}\nrun: {<<: *base, lr: 0.2}\nlist: [*base, *base]\n", "x.yaml")
    assert data["run"] == {"lr": 0.2, "wd": 0.05} and data["list"] == [{"lr": 0.1, "wd": 0.05}] * 2
    # Far too many aliases is refused even when each expands to little.
    many = "a: &a 1\nb: [" + ",".join(["*a"] * 1000) + "]\n"
    with pytest.raises(ValueError, match="aliases"):
        load_yaml(many, "many.yaml")
    assert MAX_NODES >= 100_000


def test_a_yaml_text_over_a_mebibyte_is_refused_before_parsing():
    from reinseg.safe_load import MAX_YAML_CHARACTERS

    assert load_yaml("x: [" + "1, " * 1000 + "1]", "small.yaml")["x"] == [1] * 1001
    with pytest.raises(ValueError, match=r"huge\.yaml: 1,200,005 characters of YAML, more than 1,048,576"):
        load_yaml("x: [" + "1, " * 400_000 + "]", "huge.yaml")
    assert MAX_YAML_CHARACTERS == 2**20


def test_a_key_given_twice_is_refused_naming_its_lines(tmp_path, capsys):
    """PyYAML keeps a repeated key's last value: a second `train:` section replaced the first
    whole, silently."""
    with pytest.raises(ValueError, match=r"x\.yaml: line 3: the key 'lr' is given twice \(first on line 2\)"):
        load_yaml("train:\n  lr: 0.1\n  lr: 0.2\n", "x.yaml")
    (tmp_path / "twice.yaml").write_text("model:\n  tuning: rein\ntrain:\n  max_iters: 5\nmodel:\n  tuning: lora\n")
    with pytest.raises(ConfigError, match=r"twice\.yaml: line 5: the key 'model' is given twice"):
        load_config(tmp_path / "twice.yaml")
    assert main(["params", str(tmp_path / "twice.yaml")]) == 2
    assert "line 5" in capsys.readouterr().err
    # The same key in two mappings, and a merge's keys overridden, are fine.
    assert load_yaml("a: {lr: 1}\nb: {lr: 2}\nd: &d {x: 1}\ne: {<<: *d, x: 3}\n", "y.yaml")["e"] == {"x": 3}
    # An anchored mapping with a merge, used again: flattened once, not a repeat.
    assert load_yaml("a: &a {x: 1}\nb: &b {<<: *a, x: 2}\nd: *b\n", "z.yaml")["d"] == {"x": 2}


# ---------------------------------------------------------------------------------------------
# What a resumed checkpoint may delete


def _checkpoint_naming(paths: dict) -> dict:
    """A Lightning checkpoint whose ModelCheckpoint state lists ``paths`` (no dirpath: Lightning
    then restores them whatever folder the run writes to)."""
    state = {"monitor": "iteration", "best_model_score": None, "kth_value": None, **paths}
    return {"state_dict": {}, "callbacks": {"ModelCheckpoint{'monitor': 'iteration'}": state}}


def test_a_loaded_checkpoint_names_no_file_outside_the_checkpoint_folder(tmp_path):
    from reinseg.engine import AtomicCheckpointIO

    folder = tmp_path / "run" / "checkpoints"
    own = str(folder / "iter_000004.ckpt")
    outside = {
        "last_model_path": "local://" + str(tmp_path / "home"),
        "best_model_path": str(folder / ".." / ".." / "home"),
        "kth_best_model_path": str(tmp_path / "elsewhere.ckpt"),
        "best_k_models": {own: 4, str(folder / ".." / "x.ckpt"): 2, "file://" + own: 3},
    }
    torch.save(_checkpoint_naming(outside), tmp_path / "given.ckpt")
    io_ = AtomicCheckpointIO(folder)
    state = next(iter(io_.load_checkpoint(tmp_path / "given.ckpt")["callbacks"].values()))
    assert state["last_model_path"] == state["best_model_path"] == state["kth_best_model_path"] == ""
    assert state["best_k_models"] == {own: 4}


def test_a_moved_runs_own_checkpoint_counts_as_this_folders_and_names_nothing_outside(tmp_path):
    from reinseg.engine import AtomicCheckpointIO

    before = "/scratch/old/run/checkpoints"  # where the run was saved; not on this machine
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    (tmp_path / "elsewhere.ckpt").write_bytes(b"x")
    (folder / "iter_000006.ckpt").symlink_to(tmp_path / "elsewhere.ckpt")
    own = str(folder / "iter_000004.ckpt")
    moved = {
        "dirpath": before,
        "last_model_path": f"{before}/last.ckpt",
        "best_model_path": own,
        "kth_best_model_path": f"{before}/iter_000002.ckpt",
        "best_k_models": {f"{before}/iter_000002.ckpt": 2, own: 4, str(folder / "iter_000006.ckpt"): 6},
    }
    torch.save(_checkpoint_naming(moved), folder / "last.ckpt")
    torch.save(_checkpoint_naming(moved), tmp_path / "other_run_last.ckpt")
    io_ = AtomicCheckpointIO(folder)
    state = next(iter(io_.load_checkpoint(str(folder / "last.ckpt"))["callbacks"].values()))
    # Lightning restores a state of this folder's without a warning (the run's list of
    # checkpoints is then rebuilt from the folder: tests/test_runs.py).
    assert state["dirpath"] == os.path.realpath(folder)
    assert state["last_model_path"] == state["kth_best_model_path"] == "" and state["best_model_path"] == own
    assert state["best_k_models"] == {own: 4}  # the link leads out of the folder
    # Another run's checkpoint (--resume PATH) keeps the folder it names.
    state = next(iter(io_.load_checkpoint(tmp_path / "other_run_last.ckpt")["callbacks"].values()))
    assert state["dirpath"] == before and state["best_k_models"] == {own: 4}


def test_only_checkpoints_in_the_folder_are_removed_and_never_recursively(tmp_path):
    from reinseg.engine import AtomicCheckpointIO

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "key").write_text("k")
    (folder / "iter_000002.ckpt").write_bytes(b"x")
    (folder / "kept.ckpt").mkdir()  # a folder with a checkpoint's name
    (folder / "kept.ckpt" / "notes").write_text("n")
    io_ = AtomicCheckpointIO(folder)
    for path in ("local://" + str(home), str(home), str(folder / ".." / ".." / "home"), str(folder)):
        io_.remove_checkpoint(path)
    io_.remove_checkpoint(str(folder / "kept.ckpt"))
    assert (home / ".ssh" / "key").exists() and folder.is_dir() and (folder / "kept.ckpt" / "notes").exists()
    io_.remove_checkpoint(str(folder / "iter_000002.ckpt"))
    assert not (folder / "iter_000002.ckpt").exists()


@pytest.mark.slow
def test_resuming_a_hostile_checkpoint_deletes_nothing_outside_the_run(tmp_path):
    """The attack end to end: Lightning restores the listed paths and removes the 'last' one at
    the next checkpoint (recursively, any fsspec protocol: ``local://`` is the local disk)."""
    from test_engine import tiny_config

    from reinseg.engine import train

    first = tmp_path / "first"
    first.mkdir()
    train(tiny_config(first, max_iters=2, checkpoint_interval=2), resume="never")
    checkpoint = load_torch_file(first / "run" / "checkpoints" / "last.ckpt")
    state = next(v for k, v in checkpoint["callbacks"].items() if k.startswith("ModelCheckpoint"))
    state.pop("dirpath", None)
    victim = tmp_path / "home"
    (victim / ".ssh").mkdir(parents=True)
    (victim / ".ssh" / "key").write_text("k")
    state["last_model_path"] = "local://" + str(victim)
    torch.save(checkpoint, tmp_path / "hostile.ckpt")
    second = tmp_path / "second"
    second.mkdir()
    train(tiny_config(second, max_iters=4, checkpoint_interval=2), resume=str(tmp_path / "hostile.ckpt"))
    assert (victim / ".ssh" / "key").exists()
    assert (second / "run" / "checkpoints" / "last.ckpt").exists()


# ---------------------------------------------------------------------------------------------
# Images


def test_a_postscript_file_named_png_never_reaches_ghostscript(tmp_path, monkeypatch):
    from reinseg.data.io import DataError, read_image, read_label, read_photo

    marker = tmp_path / "gs_ran"
    fake_gs = tmp_path / "bin" / "gs"
    fake_gs.parent.mkdir()
    fake_gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    fake_gs.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_gs.parent}:{os.environ['PATH']}")
    eps = tmp_path / "label.png"
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n%%EOF\n")
    for read in (read_label, read_photo, read_image):
        with pytest.raises(DataError, match="label.png"):
            read(eps)
    assert not marker.exists()


def test_read_image_keeps_pillows_pixel_limit(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from reinseg.data.io import DataError, read_image

    path = tmp_path / "large.png"
    Image.fromarray(np.zeros((100, 100, 3), np.uint8)).save(path)
    assert read_image(path).shape == (100, 100, 3)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels: over twice the limit
    with pytest.raises(DataError, match="large.png.*refused"):
        read_image(path)


def test_read_image_refuses_formats_whose_size_it_cannot_check(tmp_path):
    """OpenCV decodes Radiance HDR, JPEG 2000, ... whatever the file's name; Pillow's pixel limit
    applies only to the formats it reads (a 277-byte JPEG 2000 named .png claimed 30000x30000)."""
    import cv2
    import numpy as np

    from reinseg.data.io import DataError, read_image

    ok, data = cv2.imencode(".hdr", np.ones((8, 8, 3), np.float32))
    assert ok and cv2.imdecode(data, cv2.IMREAD_COLOR).shape == (8, 8, 3)  # OpenCV would read it
    (tmp_path / "radiance.png").write_bytes(data.tobytes())
    with pytest.raises(DataError, match=r"radiance\.png: unreadable \(not an image in one of the formats PNG, JPEG"):
        read_image(tmp_path / "radiance.png")


def test_a_png_pillow_refuses_for_a_bad_ancillary_checksum_is_decoded_with_its_size_checked(tmp_path, monkeypatch):
    """Pillow refuses a PNG whose optional chunk has a bad checksum; OpenCV decodes it. It is read
    (it was refused as "not an image"), its IHDR size still bounded by Pillow's limit."""
    import struct
    import zlib

    import cv2
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    from reinseg.data.io import DataError, read_image

    ok, encoded = cv2.imencode(".png", np.full((100, 100, 3), 100, np.uint8))
    text = b"Comment\x00hello"
    chunk = struct.pack(">I", len(text)) + b"tEXt" + text + struct.pack(">I", (zlib.crc32(b"tEXt" + text) + 1) % 2**32)
    (tmp_path / "damaged.png").write_bytes(encoded.tobytes()[:33] + chunk + encoded.tobytes()[33:])
    with pytest.raises(UnidentifiedImageError):
        Image.open(tmp_path / "damaged.png")
    assert (read_image(tmp_path / "damaged.png") == 100).all()
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 pixels: over twice the limit
    with pytest.raises(DataError, match=r"damaged\.png: refused: 100x100 pixels"):
        read_image(tmp_path / "damaged.png")


def test_a_tensor_that_views_more_than_its_file_stores_is_refused(tmp_path):
    stretched = torch.zeros(1).expand(1, 1370, 2**16)  # 4 stored bytes, 359 MB once copied
    torch.save({"pos_embed": stretched}, tmp_path / "bomb.pth")
    assert (tmp_path / "bomb.pth").stat().st_size < 10_000
    with pytest.raises(ValueError, match=r"bomb.pth.*shape \(1, 1370, 65536\) views 4 stored bytes"):
        load_torch_file(tmp_path / "bomb.pth")
    with pytest.raises(ValueError, match="zero strides"):
        read_state_dict(tmp_path / "bomb.pth")
    # A small broadcast buffer stays readable.
    torch.save({"mask": torch.ones(1).expand(64, 64)}, tmp_path / "small.pth")
    assert load_torch_file(tmp_path / "small.pth")["mask"].shape == (64, 64)


@pytest.mark.parametrize("key", ["checkpoint_path", "pretrained_cfg_overlay"])
def test_timm_kwargs_cannot_make_timm_load_weights(key, tmp_path):
    with pytest.raises(ValueError, match=f"timm_kwargs: {key} would have timm load"):
        build_backbone("dinov2_vits14", img_size=32, patch_size=16, **TINY, **{key: str(tmp_path / "w.pth")})


class _CallsOnLoad:
    """Pickles as a call of ``target(*args)`` (what a crafted file would hold)."""

    def __init__(self, target, *args):
        self.target, self.args = target, args

    def __reduce__(self):
        return self.target, self.args


@pytest.mark.parametrize("target", ["DeviceMesh", "SystemExit"])
def test_globals_torch_adds_process_wide_are_refused_too(tmp_path, target):
    """Importing torch.distributed (Lightning does) allow-lists DeviceMesh, whose construction
    starts a process group, and every built-in exception: a weight file needs none of them."""
    import lightning  # noqa: F401  (what registers them in a reinseg process)
    from torch.distributed.device_mesh import DeviceMesh

    call = _CallsOnLoad(DeviceMesh, "cpu", [0]) if target == "DeviceMesh" else _CallsOnLoad(SystemExit, 3)
    registered = len(torch.serialization.get_safe_globals())
    assert any(getattr(g, "__name__", None) == target for g in torch.serialization.get_safe_globals())
    torch.save({"weights": torch.ones(2), "x": call}, tmp_path / "file.pth")
    with pytest.raises(UnsafeFileError, match=target):
        load_torch_file(tmp_path / "file.pth")
    assert len(torch.serialization.get_safe_globals()) == registered  # put back after the read


def test_a_file_saved_without_crcs_is_read_not_called_damaged(tmp_path):
    """torch.serialization.set_crc32_options(False) (faster saves) writes CRC 0 everywhere."""
    import torch

    from reinseg.safe_load import damaged_record, load_torch_file

    previous = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save({"w": torch.arange(1000.0)}, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(previous)
    assert damaged_record(tmp_path / "nocrc.pt") is None
    assert torch.equal(load_torch_file(tmp_path / "nocrc.pt", verify=True)["w"], torch.arange(1000.0))
