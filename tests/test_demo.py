import json
import re

import numpy as np
import pytest
from PIL import Image

from reinseg.cli import main
from reinseg.data.synthetic import DOMAINS
from reinseg.report import GENERATOR


@pytest.mark.slow
def test_demo_trains_evaluates_and_writes_its_results(tmp_path, capsys):
    from reinseg.demo import run_demo

    summary = run_demo(tmp_path / "demo", max_iters=3, num_train=8, num_val=2, threads=1)
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert set(metrics) == set(DOMAINS)
    for domain in DOMAINS:
        assert 0.0 <= metrics[domain]["mIoU"] <= 100.0
        picture = np.asarray(Image.open(tmp_path / "demo" / f"{domain}.png"))
        # image | ground truth | prediction, twice the size of the 128 x 256 scenes, with text around
        assert picture.shape[0] > 2 * 128 and picture.shape[1] > 3 * 2 * 256
    unseen = [metrics[d]["mIoU"] for d in DOMAINS[1:]]
    assert summary["mean_mIoU"] == pytest.approx(sum(float(np.round(v, 2)) for v in unseen) / len(unseen))
    # The report, from the full results, shows the demo's numbers and its examples' pictures.
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    page = (tmp_path / "demo" / "report" / "index.html").read_text()
    for domain in DOMAINS:
        assert results["domains"][domain]["mIoU"] == metrics[domain]["mIoU"]
        assert f'data-domain="{domain}" data-key="mIoU">{metrics[domain]["mIoU"]:.2f}<' in page
        assert len(results["domains"][domain]["images"]) == 2 and results["domains"][domain]["examples"]["best"]
    pictures = re.findall(r'<img src="([^"]+)"', page)
    assert pictures and all((tmp_path / "demo" / "report" / p).is_file() for p in pictures)
    out = capsys.readouterr().out
    assert "mean over unseen domains" in out and "game" in out


@pytest.mark.slow
def test_a_demo_stopped_by_ctrl_c_says_it_starts_again(tmp_path, monkeypatch):
    """train's message says to resume, which a demo does not: it starts afresh."""
    import signal

    from test_resume import CtrlC

    import reinseg.engine
    from reinseg.demo import run_demo

    # An earlier demo's results, which a stopped one must not leave beside its own run.
    earlier = tmp_path / "demo"
    for name in (
        "metrics.json",
        "results.json",
        "game.png",
        "report/index.html",
        "results_examples/game/00000_image.png",
    ):
        (earlier / name).parent.mkdir(parents=True, exist_ok=True)
        (earlier / name).write_text(f'<meta name="generator" content="{GENERATOR}">')
    real_train = reinseg.engine.train

    def train_pressing_ctrl_c(config, **options):
        return real_train(config, **options | {"callbacks": [*options["callbacks"], CtrlC(at_step=1)]})

    monkeypatch.setattr(reinseg.engine, "train", train_pressing_ctrl_c)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
    try:
        with pytest.raises(reinseg.engine.TrainingInterrupted) as stopped:
            run_demo(tmp_path / "demo", max_iters=4, num_train=8, num_val=2, threads=1)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.value.exit_status == 130  # the command's status
    assert str(stopped.value) == "the demo stopped on Ctrl-C (SIGINT): `reinseg demo` runs it again from the start"
    assert sorted(p.name for p in earlier.iterdir()) == ["config.yaml", "data", "run"]


@pytest.mark.parametrize("folder", ["report", "results_examples"])
def test_a_demo_refuses_to_delete_a_users_folder_of_the_name_it_writes(tmp_path, folder):
    """``--output`` naming a user's folder: its report/ or results_examples/ holding other files
    than the demo writes is refused before anything is deleted."""
    from reinseg.demo import _remove_results

    (tmp_path / folder).mkdir()
    (tmp_path / folder / "thesis.tex").write_text("a user's")
    (tmp_path / "fog.png").write_bytes(b"a user's picture")
    with pytest.raises(ValueError, match=folder):
        _remove_results(tmp_path)
    assert (tmp_path / folder / "thesis.tex").exists() and (tmp_path / "fog.png").exists()


def test_demo_help_has_an_example(capsys):
    try:
        main(["demo", "--help"])
    except SystemExit as done:
        assert done.code == 0
    assert "example" in capsys.readouterr().out


def test_comparison_picture_shows_the_panels_and_a_legend_of_their_classes():
    from reinseg.data import PALETTE
    from reinseg.demo import comparison_picture

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)
    label = np.zeros((16, 24), dtype=np.uint8)  # road
    label[:, 12:] = 10  # sky
    label[0] = 255  # ignored
    prediction = np.full((16, 24), 13, dtype=np.uint8)  # car
    picture, boxes = comparison_picture(image, label, prediction, "fog: mIoU 12.34", zoom=2)
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[: len(PALETTE)] = PALETTE  # the Cityscapes colours; 255 black
    for name, expected in (("image", image), ("ground truth", lut[label]), ("prediction", lut[prediction])):
        top, left, bottom, right = boxes[name]
        assert np.array_equal(picture[top:bottom, left:right], expected.repeat(2, axis=0).repeat(2, axis=1))
    assert [boxes[n][1] for n in ("image", "ground truth", "prediction")] == sorted(b[1] for b in boxes.values())
    top = min(b[0] for b in boxes.values())
    assert (picture[:top] < 64).all(axis=-1).any()  # the title and panel names are written above
    legend = {tuple(c) for c in picture[max(b[2] for b in boxes.values()) :].reshape(-1, 3)}
    for shown in (0, 10, 13):
        assert tuple(PALETTE[shown]) in legend
    for absent in (6, 11, 18):  # traffic light, person, bicycle (not greys, which antialiased text has)
        assert tuple(PALETTE[absent]) not in legend


def test_free_cores_leaves_the_busy_ones(monkeypatch):
    import os

    from reinseg.demo import free_cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    for load, expected in ((0.2, 4), (4.4, 4), (5.6, 2), (7.0, 1), (30.0, 1)):
        monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert free_cores() == expected


@pytest.mark.slow  # about 2 s (nine DINOv2-L builds / a fresh interpreter)
def test_demo_command_sets_passive_waiting_before_torch_loads():
    from conftest import run_reinseg

    code = """
import os, sys, types
seen = []
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            seen.append((os.environ.get("OMP_WAIT_POLICY"), os.environ.get("KMP_BLOCKTIME")))
sys.meta_path.insert(0, Watch())
demo = types.ModuleType("reinseg.demo")
demo.DEMO_ITERS = 1
def run_demo(*args, **kwargs):
    import torch
demo.run_demo = run_demo
sys.modules["reinseg.demo"] = demo
from reinseg.cli import main
assert main(["demo"]) == 0
print(seen[0])
"""
    done = run_reinseg(["-c", code], env_without=("OMP_WAIT_POLICY", "KMP_BLOCKTIME"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "('PASSIVE', '0')"
