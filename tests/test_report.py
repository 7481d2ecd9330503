"""`reinseg eval --save-examples` and `reinseg report`: the recorded data against the saved
predictions, and the page in a real browser (headless Chromium) against the results JSON."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from conftest import tiny_model_config
from fake_datasets import make_fake_cityscapes
from PIL import Image

from reinseg.build import build_segmentor
from reinseg.checkpoints import checkpoint_state_dict, save_checkpoint
from reinseg.cli import main
from reinseg.config import Config, DataConfig, TrainConfig, dump_config, to_dict
from reinseg.data.classes import CLASSES, PALETTE
from reinseg.metrics import ConfusionMatrix, scores_from_confusion

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (apt-get install chromium; .ci/run installs it)"
)
N = 2
IMAGES = 6


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A tiny model (random weights) evaluated with --save-examples and --save-preds on two
    domains of fake Cityscapes (its 6 training and 6 validation images)."""
    tmp = tmp_path_factory.mktemp("report")
    make_fake_cityscapes(tmp / "cityscapes", n=IMAGES, size=(32, 64), prepared=True)
    root = str(tmp / "cityscapes")
    config = Config(
        model=tiny_model_config(),
        data=DataConfig(
            train=[dict(name="cityscapes", root=root, split="train")],
            val=[
                dict(name="cityscapes", root=root, split="train", label="source", in_mean=False),
                dict(name="cityscapes", root=root, split="val", label="target"),
            ],
            crop_size=32,
            base_size=64,
            max_size=256,
            batch_size=2,
            num_workers=0,
        ),
        train=TrainConfig(max_iters=2, val_interval=2, checkpoint_interval=2, lr=1e-3, output_dir=str(tmp / "run")),
    )
    (tmp / "config.yaml").write_text(dump_config(config))
    segmentor = build_segmentor(config.model)
    checkpoint = str(tmp / "random.ckpt")
    save_checkpoint(checkpoint, to_dict(config), checkpoint_state_dict(segmentor))
    result = tmp / "results" / "late.json"
    args = ["eval", str(tmp / "config.yaml"), checkpoint, "--json", str(result), "--save-examples", str(N)]
    assert main([*args, "--save-preds", str(tmp / "preds_late")]) == 0
    return tmp, result


def _confusion(prediction: np.ndarray, label: np.ndarray) -> np.ndarray:
    confusion = ConfusionMatrix(len(CLASSES))
    confusion.update(torch.from_numpy(prediction.astype(np.int64)), torch.from_numpy(label.astype(np.int64)))
    return confusion.matrix.numpy()


def _handmade_results(folder, name: str, seed: int):
    """A results file as `reinseg eval --save-examples 1` writes it, from random labels and
    predictions (3 images of 12 x 16 per domain), with its example PNGs."""
    rng = np.random.default_rng(seed)
    domains = {}
    for domain in ("source", "target"):
        images, confusion, examples = [], np.zeros((19, 20), dtype=np.int64), {}
        for i, group in enumerate(("best", "median", "worst")):
            label = rng.integers(0, 19, (12, 16)).astype(np.uint8)
            label[0] = 255
            prediction = np.where(rng.random((12, 16)) < 0.7 - 0.3 * i, label, rng.integers(0, 19, (12, 16)))
            counts = _confusion(prediction.astype(np.uint8), label)
            confusion += counts
            own = scores_from_confusion(torch.from_numpy(counts))
            files = {}
            for what, array in (
                ("image", rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)),
                ("label", label),
                ("prediction", prediction.astype(np.uint8)),
            ):
                files[what] = f"{name}_examples/{domain}/{i:05d}_{what}.png"
                (folder / files[what]).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(folder / files[what])
            record = {"image": f"/data/{domain}/{i}.png", "label": f"/data/{domain}/{i}_label.png"}
            images.append(record | {"mIoU": own["mIoU"], "aAcc": own["aAcc"], "pixels": own["pixels"]})
            examples[group] = [
                {"image": record["image"], "label": record["label"], "mIoU": own["mIoU"], "files": files}
            ]
        scores = scores_from_confusion(torch.from_numpy(confusion), CLASSES)
        scores |= {"classes": list(CLASSES), "palette": PALETTE.tolist(), "confusion": confusion.tolist()}
        domains[domain] = scores | {"images": images, "examples": examples}
    data = {"step": 4, "domains": domains, "mean_mIoU": domains["target"]["mIoU"], "mean_domains": ["target"]}
    (folder / f"{name}.json").write_text(json.dumps(data))
    return folder / f"{name}.json"


@pytest.fixture
def handmade(tmp_path):
    return [_handmade_results(tmp_path, name, seed) for seed, name in enumerate(("frozen", "rein"))]


@pytest.mark.slow
def test_eval_records_what_the_saved_predictions_score(evaluated):
    tmp, file = evaluated
    results = json.loads(file.read_text())
    labels = {"source": tmp / "cityscapes" / "gtFine" / "train", "target": tmp / "cityscapes" / "gtFine" / "val"}
    for domain, scores in results["domains"].items():
        assert scores["classes"] == list(CLASSES) and scores["palette"] == PALETTE.tolist()
        # The per-image scores are those of --save-preds's predictions (the ordinary validation output).
        assert len(scores["images"]) == IMAGES
        total = np.zeros((19, 20), dtype=np.int64)
        for record in scores["images"]:
            label_path = record["label"]
            relative = label_path[len(str(labels[domain])) + 1 :]
            prediction = np.asarray(Image.open(tmp / "preds_late" / domain / relative))
            label = np.asarray(Image.open(label_path))
            counts = _confusion(prediction, label)
            own = scores_from_confusion(torch.from_numpy(counts))
            assert record["mIoU"] == pytest.approx(own["mIoU"], abs=1e-9)
            assert record["aAcc"] == pytest.approx(own["aAcc"], abs=1e-9) and record["pixels"] == own["pixels"]
            total += counts
        assert scores["confusion"] == total.tolist()
        assert scores_from_confusion(torch.from_numpy(total), CLASSES)["IoU"] == pytest.approx(scores["IoU"])
        # best, median and worst: N each, in the order of the per-image scores
        by_score = sorted(scores["images"], key=lambda r: r["mIoU"])
        examples = scores["examples"]
        assert [e["mIoU"] for e in examples["worst"]] == [r["mIoU"] for r in by_score[:N]]
        assert [e["mIoU"] for e in examples["best"]] == [r["mIoU"] for r in by_score[::-1][:N]]
        assert [e["mIoU"] for e in examples["median"]] == [r["mIoU"] for r in by_score[(IMAGES - N) // 2 :][:N]]
        for group in examples.values():
            for entry in group:
                # The saved example is the image, its label and the validation's prediction.
                folder = file.parent
                saved = {k: np.asarray(Image.open(folder / v)) for k, v in entry["files"].items()}
                relative = entry["label"][len(str(labels[domain])) + 1 :]
                assert np.array_equal(
                    saved["prediction"], np.asarray(Image.open(tmp / "preds_late" / domain / relative))
                )
                assert np.array_equal(saved["label"], np.asarray(Image.open(entry["label"])))
                assert np.array_equal(saved["image"], np.asarray(Image.open(entry["image"]).convert("RGB")))


def test_choose_examples_by_score_skipping_unscored_images():
    from reinseg.examples import choose_examples

    scores = [50.0, None, 10.0, 90.0, 10.0, 70.0]
    # sorted: 2 (10), 4 (10, later), 0 (50), 5 (70), 3 (90); image 1 has no score
    assert choose_examples(scores, 2) == {"best": [3, 5], "median": [4, 0], "worst": [2, 4]}
    assert choose_examples(scores, 9) == {"best": [3, 5, 0, 2, 4], "median": [2, 4, 0, 5, 3], "worst": [2, 4, 0, 5, 3]}
    assert choose_examples([None, None], 1) == {"best": [], "median": [], "worst": []}


class _Collect(HTMLParser):
    """The elements with a data-key (the numbers the page shows), the images, and the status line."""

    def __init__(self):
        super().__init__()
        self.values, self.images, self.status, self._open, self._svg = [], [], {}, None, {}
        self.cells = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-key" in attrs:
            self._open = attrs
            attrs["text"] = ""
            self.values.append(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if attrs.get("id") == "report-status":
            self.status = attrs
        if tag == "svg":
            self._svg = attrs
        if "data-true" in attrs:
            self.cells.append(attrs | {"model": self._svg.get("data-model"), "domain": self._svg.get("data-domain")})

    def handle_data(self, data):
        if self._open is not None:
            self.values[-1]["text"] += data

    def handle_endtag(self, tag):
        self._open = None


def _open_in_chromium(page) -> tuple[_Collect, str]:
    """The page's DOM after its scripts ran, and Chromium's log (console messages included)."""
    run = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    dom = _Collect()
    dom.feed(run.stdout)
    return dom, run.stderr


def _console_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "CONSOLE" in line]


@pytest.mark.slow  # a Chromium subprocess
@needs_chromium
def test_report_renders_in_chromium_with_the_numbers_of_the_results(handmade, tmp_path):
    files = handmade
    assert main(["report", *map(str, files), "--output", str(tmp_path / "report")]) == 0
    page = tmp_path / "report" / "index.html"
    dom, log = _open_in_chromium(page)
    assert _console_lines(log) == []
    # every picture loaded (the page's own check, run by the browser) and no script error
    assert int(dom.status["data-images"]) == len(dom.images) > 0
    assert dom.status["data-loaded"] == dom.status["data-images"] and dom.status["data-errors"] == "0"
    results = {f.stem: json.loads(f.read_text()) for f in files}
    shown = {}
    for v in dom.values:
        shown[(v.get("data-model"), v.get("data-domain"), v.get("data-class"), v["data-key"])] = v["text"].strip()
    for model, data in results.items():
        assert shown[(model, None, None, "mean_mIoU")] == f"{data['mean_mIoU']:.2f}"
        for domain, scores in data["domains"].items():
            assert shown[(model, domain, None, "mIoU")] == f"{scores['mIoU']:.2f}"
            for name, iou in scores["IoU"].items():
                assert shown[(model, domain, name, "IoU")] == ("–" if iou is None else f"{iou:.2f}")
    # confusion cells: each row of the JSON's matrix normalised to sum to 1 (2 models x 2 domains)
    assert len(dom.cells) == 2 * 2 * 19 * 19
    for cell in dom.cells:
        matrix = results[cell["model"]]["domains"][cell["domain"]]["confusion"]
        t, p = int(cell["data-true"]), int(cell["data-pred"])
        expected = matrix[t][p] / sum(matrix[t]) if sum(matrix[t]) else 0.0
        assert cell["data-value"] == f"{expected:.4f}"


@needs_chromium
@pytest.mark.slow
def test_the_browser_check_sees_a_missing_picture_and_a_script_error(handmade, tmp_path):
    """The page's check and the console log catch what they must (else the test above proves nothing)."""
    files = handmade
    assert main(["report", str(files[0]), "--output", str(tmp_path / "report")]) == 0
    page = tmp_path / "report" / "index.html"
    dom, _ = _open_in_chromium(page)
    missing = tmp_path / "report" / dom.images[0]
    missing.unlink()
    text = page.read_text().replace("</body>", "<script>undefinedFunction();</script></body>")
    page.write_text(text)
    dom, log = _open_in_chromium(page)
    assert int(dom.status["data-loaded"]) == int(dom.status["data-images"]) - 1
    assert int(dom.status["data-errors"]) >= 2
    assert any("undefinedFunction" in line for line in _console_lines(log))


def test_report_lists_the_largest_losses_and_its_pictures(handmade, tmp_path):
    out = tmp_path / "report"
    assert main(["report", *map(str, handmade), "--name", "A", "--name", "B", "--output", str(out)]) == 0
    dom = _Collect()
    dom.feed((out / "index.html").read_text())
    for model, file in zip(("A", "B"), handmade, strict=True):
        results = json.loads(file.read_text())["domains"]
        source, target = results["source"]["IoU"], results["target"]["IoU"]
        drops = sorted(
            ((source[c] - target[c], c) for c in source if source[c] is not None and target[c] is not None),
            key=lambda d: (-d[0], d[1]),
        )
        listed = [v for v in dom.values if v["data-key"] == "loss" and v.get("data-model") == model]
        assert [float(v["text"]) for v in listed] == pytest.approx([d for d, _ in drops[:5]], abs=0.005)
    # image, ground truth, and per model a prediction and an error map, for 3 examples in 2 domains
    assert len(dom.images) == 2 * 3 * (2 + 2 * 2)
    assert all((out / src).is_file() for src in dom.images)
    # The ground truth is drawn in the Cityscapes colours (255 black); the error map marks exactly the wrong pixels.
    results = json.loads(handmade[0].read_text())["domains"]["source"]
    label = np.asarray(Image.open(handmade[0].parent / results["examples"]["best"][0]["files"]["label"]))
    prediction = np.asarray(Image.open(handmade[0].parent / results["examples"]["best"][0]["files"]["prediction"]))
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:19] = PALETTE
    assert np.array_equal(np.asarray(Image.open(out / dom.images[1])), lut[label])
    errors = np.asarray(Image.open(out / dom.images[3]))
    wrong = (label != 255) & (prediction != label)
    assert (errors[wrong] == (230, 25, 25)).all() and not (errors[~wrong] == (230, 25, 25)).all(-1).any()


def test_report_refuses_bad_results_and_leaves_no_folder(handmade, tmp_path, capsys):
    files = handmade
    out = tmp_path / "report"
    other = json.loads(files[0].read_text())
    for scores in other["domains"].values():
        scores["IoU"] = {f"class {i}": v for i, v in enumerate(scores["IoU"].values())}
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "corrupt.json").write_text('{"domains": {"a": ')
    malformed = json.loads(files[0].read_text())
    malformed["domains"]["source"]["examples"]["best"] = [{"image": "a.png"}]
    (tmp_path / "malformed.json").write_text(json.dumps(malformed))
    missing = tmp_path / "missing.json"
    for bad in (tmp_path / "other.json", tmp_path / "corrupt.json", tmp_path / "malformed.json", missing):
        assert main(["report", str(files[0]), str(bad), "--output", str(out)]) == 2
        error = capsys.readouterr().err
        assert str(bad) in error and len(error.strip().splitlines()) == 1
        assert not out.exists() and not list(tmp_path.glob(".report*"))
    # A missing example picture fails the whole report; an earlier report stays as it was.
    assert main(["report", str(files[0]), "--output", str(out)]) == 0
    before = sorted(p.name for p in (out / "images").iterdir())
    broken = json.loads(files[0].read_text())
    broken["domains"]["target"]["examples"]["best"][0]["files"]["prediction"] = "nowhere.png"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    assert main(["report", str(tmp_path / "broken.json"), "--output", str(out)]) == 2
    assert "nowhere.png" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "images").iterdir()) == before
    assert not list(tmp_path.glob(".report*"))
    # A folder that is not a report is never replaced.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["report", str(files[0]), "--output", str(tmp_path / "mine")]) == 2
    assert "is not a reinseg report" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    # Nor a report a user added files to, or one that holds a results file it is made from.
    (out / "notes.txt").write_text("keep")
    assert main(["report", str(files[0]), "--output", str(out)]) == 2
    assert "holds notes.txt" in capsys.readouterr().err and (out / "notes.txt").exists()
    (out / "notes.txt").unlink()
    kept = out / "kept.json"
    kept.write_text(files[0].read_text())
    assert main(["report", str(kept), "--output", str(out)]) == 2
    assert "holds kept.json" in capsys.readouterr().err and kept.exists()
    kept.unlink()
    (out / "images" / ".DS_Store").write_bytes(b"\0")  # a file browser looked at the pictures
    assert main(["report", str(files[0]), "--output", str(out)]) == 0


@pytest.mark.parametrize(
    "where, value, message",
    [
        (("mIoU",), True, "mIoU is True, not a percentage"),
        (("IoU", "road"), float("nan"), "IoU\\['road'\\] is nan"),
        (("mIoU",), 5000, "mIoU is 5000"),
        (("mIoU",), [1, 2], r"mIoU is \[1, 2\]"),
        (("confusion", 0, 0), -4, "the confusion matrix of domain 'target' is not"),
        (("palette", 0), [300, 0, 0], "the palette of domain 'target' is not"),
    ],
)
def test_a_malformed_results_file_is_named_not_shown(handmade, tmp_path, capsys, where, value, message):
    """true was shown as 1.00, NaN and 5000 as they are; a list or a colour of 300 crashed the page."""
    results = json.loads(handmade[0].read_text())
    scores = results["domains"]["target"]
    scores.setdefault("palette", [[0, 0, 0]] * len(scores["IoU"]))
    target = scores
    for key in where[:-1]:
        target = target[key]
    target[where[-1]] = value
    (tmp_path / "bad.json").write_text(json.dumps(results))
    assert main(["report", str(tmp_path / "bad.json"), "--output", str(tmp_path / "out")]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_report_copies_no_picture_from_outside_the_results_folder(handmade, tmp_path, capsys):
    """A shared results file could otherwise name any image on the disk (``../``, absolute, or a
    symbolic link in the folder)."""
    secret = tmp_path.parent / f"{tmp_path.name}_secret.png"
    Image.fromarray(np.zeros((12, 16), np.uint8)).save(secret)
    (tmp_path / "link.png").symlink_to(secret)  # inside the folder, leading out of it
    for named in (f"../{secret.name}", str(secret), "link.png"):
        hostile = json.loads(handmade[0].read_text())
        hostile["domains"]["target"]["examples"]["best"][0]["files"]["prediction"] = named
        (tmp_path / "hostile.json").write_text(json.dumps(hostile))
        assert main(["report", str(tmp_path / "hostile.json"), "--output", str(tmp_path / "report")]) == 2
        assert "outside the results' folder" in capsys.readouterr().err
        assert not (tmp_path / "report").exists()
    secret.unlink()


@pytest.mark.slow
def test_eval_refuses_bad_examples_options_before_evaluating(evaluated, tmp_path, capsys, monkeypatch):
    tmp, _ = evaluated

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated before checking the options")

    monkeypatch.setattr("reinseg.engine.evaluate", no_evaluation)
    args = ["eval", str(tmp / "config.yaml"), str(tmp / "random.ckpt"), "--json", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as done:
        main([*args, "--save-examples", "0"])
    assert done.value.code == 2 and "--save-examples" in capsys.readouterr().err
    (tmp_path / "r_examples").write_text("a file where the examples go")
    assert main([*args, "--save-examples", "1"]) == 2
    assert str(tmp_path / "r_examples") in capsys.readouterr().err
    # A folder holding a user's file is not replaced (it was, silently).
    (tmp_path / "r_examples").unlink()
    (tmp_path / "r_examples" / "target").mkdir(parents=True)
    (tmp_path / "r_examples" / "notes.txt").write_text("mine")
    assert main([*args, "--save-examples", "1"]) == 2
    assert "holds notes.txt, which --save-examples did not write" in capsys.readouterr().err
    assert (tmp_path / "r_examples" / "notes.txt").read_text() == "mine"


def test_an_examples_folder_is_replaced_only_when_it_holds_examples(tmp_path):
    from reinseg.examples import check_replaceable

    folder = tmp_path / "results_examples"
    check_replaceable(folder)  # none yet
    for name in ("00000_image.png", "00000_label.png", "00017_prediction.png", "123456_image.png", ".DS_Store"):
        (folder / "acdc_night").mkdir(parents=True, exist_ok=True)
        (folder / "acdc_night" / name).write_bytes(b"")
    (folder / ".DS_Store").write_bytes(b"")
    check_replaceable(folder)  # an earlier evaluation's, looked at in a file browser
    for extra in (folder / "acdc_night" / "todo.txt", folder / "readme.md"):
        extra.write_text("mine")
        with pytest.raises(ValueError, match=f"holds {extra.name}|holds acdc_night"):
            check_replaceable(folder)
        extra.unlink()


@pytest.mark.slow
def test_examples_like_saves_another_models_choices_for_the_report(evaluated, tmp_path):
    tmp, late = evaluated
    torch.manual_seed(1)  # another model: other best, median and worst images
    config_text = (tmp / "config.yaml").read_text()
    from reinseg.config import load_config

    config = load_config(str(tmp / "config.yaml"))
    save_checkpoint(tmp_path / "other.ckpt", to_dict(config), checkpoint_state_dict(build_segmentor(config.model)))
    other = tmp_path / "other.json"
    args = ["eval", str(tmp / "config.yaml"), str(tmp_path / "other.ckpt"), "--json", str(other)]
    assert main([*args, "--save-examples", str(N), "--examples-like", str(late)]) == 0
    assert (tmp / "config.yaml").read_text() == config_text
    ours, theirs = json.loads(other.read_text())["domains"], json.loads(late.read_text())["domains"]
    missing_cells = 0
    for domain in theirs:
        chosen = {e["image"] for g in ("best", "median", "worst") for e in theirs[domain]["examples"][g]}
        own = {e["image"] for g in ("best", "median", "worst") for e in ours[domain]["examples"][g]}
        assert {e["image"] for e in ours[domain]["examples"]["also"]} == chosen
        missing_cells += 2 * len(own - chosen)  # the late model did not save those
    assert main(["report", str(late), str(other), "--output", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "index.html").read_text().count(">not saved<") == missing_cells


def test_report_names_each_files_protocol_and_says_when_they_differ(handmade, tmp_path):
    """The protocol moves mIoU by points: results of two protocols side by side are flagged."""
    for file, protocol in zip(handmade, ("official", "config"), strict=True):
        data = json.loads(file.read_text())
        data["protocol"] = {"name": protocol}
        data["protocols"] = {protocol: {}, "ms-flip": {}} if protocol == "official" else {protocol: {}}
        file.write_text(json.dumps(data))

    def page(files, out):
        assert main(["report", *map(str, files), "--output", str(tmp_path / out)]) == 0
        html = (tmp_path / out / "index.html").read_text()
        dom = _Collect()
        dom.feed(html)
        return html, {v["data-model"]: v["text"] for v in dom.values if v["data-key"] == "protocol"}

    html, shown = page(handmade, "mixed")
    assert shown == {"frozen": "official", "rein": "config"}
    assert 'id="mixed-protocols"' in html and "under different protocols (config, official)" in html
    assert "frozen: ms-flip" in html  # the file's other protocol, not shown
    html, shown = page(handmade[:1], "one")
    assert shown == {"frozen": "official"} and 'id="mixed-protocols"' not in html
    # One name, other settings (ACDC's default scale at 512 crops changed between versions).
    for file, scale in zip(handmade, ([1920, 1080], [960, 540]), strict=True):
        data = json.loads(file.read_text())
        data["protocol"] = {"name": "config", "scales": {"target": scale}, "flip": False}
        file.write_text(json.dumps(data))
    html, shown = page(handmade, "renamed")
    assert shown == {"frozen": "config", "rein": "config"}
    assert "under different protocols (config; different scales, windows or flips)" in html
    # The same settings, one file covering a domain more: comparable where both have it.
    for file, domains in zip(handmade, ({"target": [960, 540], "source": [1, 1]}, {"target": [960, 540]}), strict=True):
        data = json.loads(file.read_text())
        data["protocol"] = {"name": "config", "scales": domains, "flip": False}
        if "source" not in domains:
            del data["domains"]["source"]
        file.write_text(json.dumps(data))
    html, _ = page(handmade, "covering")
    assert 'id="mixed-protocols"' not in html


def test_a_part_of_a_target_is_no_source_and_runs_at_its_wholes_scale(handmade, tmp_path):
    """ACDC evaluated as one entry gives its conditions as parts (``subdomains``): the source is
    the first domain that is neither a target nor a part of one, and a condition ran at ACDC's
    scale, comparable with a file that evaluated the condition as an entry of its own."""
    frozen, rein = (json.loads(f.read_text()) for f in handmade)
    scale = {"name": "config", "flip": False}
    whole = dict(rein, mean_domains=["acdc"], subdomains={"acdc": ["acdc/fog"]})
    whole["domains"] = {"acdc": rein["domains"]["target"], "acdc/fog": rein["domains"]["target"]}
    whole["domains"]["cityscapes"] = rein["domains"]["source"]
    whole["protocol"] = scale | {"scales": {"acdc": [128, 64], "cityscapes": [128, 64]}}
    entry = dict(frozen, mean_domains=["acdc/fog"])
    entry["domains"] = {"acdc/fog": frozen["domains"]["target"], "cityscapes": frozen["domains"]["source"]}
    entry["protocol"] = scale | {"scales": {"acdc/fog": [128, 64], "cityscapes": [128, 64]}}
    handmade[0].write_text(json.dumps(entry))
    handmade[1].write_text(json.dumps(whole))
    assert main(["report", *map(str, handmade), "--output", str(tmp_path / "out")]) == 0
    html = (tmp_path / "out" / "index.html").read_text()
    assert "rein: cityscapes → mean of acdc" in html and "frozen: cityscapes → mean of acdc/fog" in html
    assert 'id="mixed-protocols"' not in html
    del whole["domains"]["cityscapes"]
    handmade[1].write_text(json.dumps(whole))
    assert main(["report", str(handmade[1]), "--output", str(tmp_path / "alone")]) == 0
    assert "rein: no source domain among its results" in (tmp_path / "alone" / "index.html").read_text()


@pytest.mark.slow
def test_the_report_refuses_example_files_other_than_those_saved_with_the_results(evaluated, tmp_path, capsys):
    """An evaluation killed after it replaced the examples folder, before its results: the old
    results would have shown the new model's pictures beside their numbers."""
    import hashlib

    _, late = evaluated
    folder = tmp_path / "results"
    shutil.copytree(late.parent, folder)
    results = json.loads((folder / late.name).read_text())
    best = results["domains"]["target"]["examples"]["best"][0]
    saved = folder / best["files"]["prediction"]
    assert best["sha256"]["prediction"] == hashlib.sha256(saved.read_bytes()).hexdigest()
    assert main(["report", str(folder / late.name), "--output", str(tmp_path / "good")]) == 0
    other = (folder / best["files"]["label"]).read_bytes()  # (random weights predict one class everywhere)
    assert other != saved.read_bytes()  # another class map of the same size, a valid PNG
    saved.write_bytes(other)
    assert main(["report", str(folder / late.name), "--output", str(tmp_path / "report")]) == 2
    err = capsys.readouterr().err
    assert f"example file {saved} is not the one saved with these results" in err
    assert not (tmp_path / "report").exists()
