import json

import numpy as np
from PIL import Image

from reinseg.cli import main
from reinseg.data.synthetic import DOMAINS


def test_demo_trains_evaluates_and_writes_its_results(tmp_path, capsys):
    from reinseg.demo import run_demo

    summary = run_demo(tmp_path / "demo", max_iters=3, num_train=8, num_val=2)
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert set(metrics) == set(DOMAINS)
    for domain in DOMAINS:
        assert 0.0 <= metrics[domain]["mIoU"] <= 100.0
        picture = np.asarray(Image.open(tmp_path / "demo" / f"{domain}.png"))
        assert picture.shape == (128, 3 * 256 + 2 * 4, 3)  # image | ground truth | prediction
    unseen = [metrics[d]["mIoU"] for d in DOMAINS[1:]]
    assert summary["mean_mIoU"] == sum(unseen) / len(unseen)
    out = capsys.readouterr().out
    assert "mean over unseen domains" in out and "game" in out


def test_demo_help_has_an_example(capsys):
    try:
        main(["demo", "--help"])
    except SystemExit as done:
        assert done.code == 0
    assert "example" in capsys.readouterr().out
