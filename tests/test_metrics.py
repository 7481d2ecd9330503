import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from reinseg.cli import main
from reinseg.data import CLASSES
from reinseg.metrics import ConfusionMatrix, format_scores_table, mean_over_domains


def test_iou_counts_by_hand():
    confusion = ConfusionMatrix(3)
    target = torch.tensor([0, 0, 0, 1, 1, 255, 255])
    prediction = torch.tensor([0, 0, 1, 1, 2, 0, 1])
    confusion.update(prediction, target)
    scores = confusion.scores(["a", "b", "c"])
    # a: tp 2, fp 0, fn 1 -> 2/3; b: tp 1, fp 1, fn 1 -> 1/3; c: tp 0, fp 1, fn 0 -> 0
    assert scores["IoU"] == pytest.approx({"a": 200 / 3, "b": 100 / 3, "c": 0.0})
    assert scores["mIoU"] == pytest.approx((200 / 3 + 100 / 3 + 0) / 3)
    assert scores["aAcc"] == pytest.approx(300 / 5)  # ignored pixels are not counted
    assert scores["pixels"] == 5


def test_absent_classes_are_left_out_and_invalid_predictions_are_misses():
    confusion = ConfusionMatrix(3)
    confusion.update(torch.tensor([0, 7, 0]), torch.tensor([0, 0, 0]))
    scores = confusion.scores(["a", "b", "c"])
    assert scores["IoU"] == {"a": pytest.approx(200 / 3), "b": None, "c": None}
    assert scores["mIoU"] == pytest.approx(200 / 3)


def test_targets_outside_the_classes_are_refused():
    with pytest.raises(ValueError, match=r"target values \[3\]"):
        ConfusionMatrix(3).update(torch.tensor([0]), torch.tensor([3]))


def counted_by_a_loop(prediction, target, classes, ignore=255):
    """The oracle: ``matrix[true, predicted]`` pixel by pixel."""
    matrix = np.zeros((classes, classes + 1), dtype=np.int64)
    for p, t in zip(prediction.flatten().tolist(), target.flatten().tolist(), strict=True):
        if t != ignore:
            matrix[t, p if 0 <= p < classes else classes] += 1
    return matrix


@pytest.mark.parametrize("at_once", [True, False])
def test_an_update_counts_every_pixel_and_off_the_cpu_makes_the_host_wait_for_nothing(monkeypatch, at_once):
    """Off the CPU (here the CPU standing in, ``_checks_each_update`` answering no) an update
    reads nothing back: no target check read, no boolean index, no bincount (whose size is the
    largest value). It was five waits an image in an evaluation. The counts are the loop's."""
    from conftest import HostWaits

    import reinseg.metrics as metrics

    monkeypatch.setattr(metrics, "_checks_each_update", lambda device: at_once)
    rng = np.random.default_rng(0)
    confusion = ConfusionMatrix(5)
    expected = np.zeros((5, 6), dtype=np.int64)
    host = HostWaits(monkeypatch)
    for size in ((7, 9), (16, 3)):
        target = rng.integers(0, 5, size)
        target[rng.random(size) < 0.3] = 255
        prediction = rng.integers(-2, 8, size)  # some outside the classes: misses
        with host:
            confusion.update(torch.from_numpy(prediction), torch.from_numpy(target))
        expected += counted_by_a_loop(prediction, target, 5)
    assert np.array_equal(confusion.matrix.numpy(), expected)
    checks = [(None, "aten._local_scalar_dense.default")] * 2  # on the CPU: each update's check, read
    assert host.waits == (checks if at_once else [])


def test_off_the_cpu_targets_outside_the_classes_are_refused_by_check_reduce_and_scores(monkeypatch):
    import reinseg.metrics as metrics

    monkeypatch.setattr(metrics, "_checks_each_update", lambda device: False)
    confusion = ConfusionMatrix(3)
    confusion.update(torch.tensor([0, 1]), torch.tensor([0, 255]))
    confusion.update(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64))  # no pixel
    confusion.check()  # 255 is ignored
    confusion.update(torch.tensor([0, 1, 2, 0]), torch.tensor([7, 1, -1, 7]))
    confusion.update(torch.tensor([0]), torch.tensor([1]))
    for read in (confusion.check, confusion.reduce, confusion.scores):
        with pytest.raises(ValueError, match=r"target values from -1 to 7 are outside 0..2 and not 255: 3 pixel\(s\)"):
            read()
    confusion.reset()
    assert not confusion.matrix.any()
    confusion.update(torch.tensor([2]), torch.tensor([9]))
    with pytest.raises(ValueError, match=r"target values \[9\] are outside 0..2 and not 255: 1 pixel\(s\)"):
        confusion.scores()


def test_mean_over_domains_and_table():
    results = {
        "a": {"mIoU": 40.0, "aAcc": 80.0, "IoU": {"road": 40.0}},
        "b": {"mIoU": 60.0, "aAcc": 90.0, "IoU": {"road": None}},
    }
    assert mean_over_domains(results) == 50.0
    assert mean_over_domains(results, ["b"]) == 60.0
    table = format_scores_table(results, ["road"])
    assert "40.00" in table and "-" in table.splitlines()[2]


def test_the_mean_over_domains_averages_rounded_mious_as_the_official_dgiou_metric():
    # rein/dg_metrics.py averages mmseg's per-dataset mIoUs, which IoUMetric rounds to 2 decimals:
    # (61.00 + 61.00 + 61.01) / 3 = 61.0033 (printed 61.00), not 61.0082 (61.01).
    results = {name: {"mIoU": value} for name, value in (("c", 61.0049), ("b", 61.0049), ("m", 61.0149))}
    mean = mean_over_domains(results)
    assert mean == pytest.approx((61.00 + 61.00 + 61.01) / 3, abs=1e-12)
    assert f"{mean:.2f}" == "61.00"


def cityscapes_ids():
    """train ID -> Cityscapes label ID (cityscapesScripts' labels.py)."""
    from cityscapesscripts.helpers.labels import labels

    return {label.trainId: label.id for label in labels if 0 <= label.trainId < 19}


def test_scores_equal_the_official_cityscapes_evaluation(tmp_path):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    rng = np.random.default_rng(0)
    to_id = cityscapes_ids()
    lut = np.zeros(256, dtype=np.uint8)  # 255 (ignore) -> 0 (unlabeled)
    for train_id, label_id in to_id.items():
        lut[train_id] = label_id
    confusion = ConfusionMatrix(19)
    predictions, labels = [], []
    for i in range(3):
        label = rng.integers(0, 19, size=(24, 40)).astype(np.uint8)
        label[rng.random(label.shape) < 0.2] = 255
        label[label == 17] = 255  # a class absent from the ground truth
        prediction = np.where(rng.random(label.shape) < 0.6, label, rng.integers(0, 19, size=label.shape))
        prediction = np.where(prediction == 255, 3, prediction).astype(np.uint8)
        prediction[prediction == 16] = 0  # and one never predicted
        confusion.update(torch.from_numpy(prediction), torch.from_numpy(label))
        pred_file, gt_file = tmp_path / f"pred{i}.png", tmp_path / f"gt{i}_gtFine_labelIds.png"
        Image.fromarray(lut[prediction]).save(pred_file)
        Image.fromarray(lut[label]).save(gt_file)
        predictions.append(str(pred_file))
        labels.append(str(gt_file))
    args = official.args
    args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True
    result = official.evaluateImgLists(predictions, labels, args)
    ours = confusion.scores(CLASSES)
    for name in CLASSES:
        theirs = result["classScores"][name]
        if np.isnan(theirs):
            assert ours["IoU"][name] is None, name
        else:
            assert ours["IoU"][name] == pytest.approx(100 * theirs, abs=1e-9), name
    assert ours["mIoU"] == pytest.approx(100 * result["averageScoreClasses"], abs=1e-9)


def write_pair(root_pred, root_gt, relative, prediction, label):
    for root, array in ((root_pred, prediction), (root_gt, label)):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array.astype(np.uint8)).save(path)


def test_score_command_writes_the_json_contract(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    label = np.zeros((8, 8), dtype=np.uint8)
    label[:, 4:] = 13
    prediction = np.zeros((8, 8), dtype=np.uint8)
    prediction[:, 6:] = 13
    write_pair(pred, gt, "city/a_gtFine_labelTrainIds.png", prediction, label)
    write_pair(pred, gt, "city/b_gtFine_labelTrainIds.png", label, label)
    assert main(["score", str(pred), str(gt), "--json", str(tmp_path / "s.json")]) == 0
    scores = json.loads((tmp_path / "s.json").read_text())
    road = 100 * 64 / (64 + 16)  # tp 32 + 32; fp 16: road predicted on car in image a
    car = 100 * 48 / (48 + 16)  # tp 16 + 32; fn 16
    assert scores["IoU"]["road"] == pytest.approx(road) and scores["IoU"]["car"] == pytest.approx(car)
    assert scores["IoU"]["sky"] is None
    assert scores["mIoU"] == pytest.approx((road + car) / 2)


def test_score_of_labels_without_a_labelled_pixel_has_no_miou(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    write_pair(pred, gt, "city/a_gtFine_labelTrainIds.png", np.zeros((8, 8), np.uint8), np.full((8, 8), 255, np.uint8))
    assert main(["score", str(pred), str(gt), "--json", str(tmp_path / "s.json")]) == 0
    assert "1 images, mIoU - (no labelled pixel)" in capsys.readouterr().out
    assert json.loads((tmp_path / "s.json").read_text())["mIoU"] is None


def test_score_refuses_what_does_not_match(tmp_path, capsys):
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    label = np.zeros((8, 8), dtype=np.uint8)
    write_pair(pred, gt, "a.png", label, label)
    (gt / "b.png").write_bytes((gt / "a.png").read_bytes())
    assert main(["score", str(pred), str(gt)]) == 2
    assert "1 labels have no prediction" in capsys.readouterr().err
    (pred / "b.png").write_bytes(b"not a png")
    assert main(["score", str(pred), str(gt)]) == 2
    assert "b.png" in capsys.readouterr().err
    Image.fromarray(np.zeros((4, 8), dtype=np.uint8)).save(pred / "b.png")
    assert main(["score", str(pred), str(gt)]) == 2
    assert "is 8x4 but its label" in capsys.readouterr().err
    os.remove(gt / "b.png")
    assert main(["score", str(pred), str(gt)]) == 2
    assert "1 predictions have no label" in capsys.readouterr().err
