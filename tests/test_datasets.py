import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from fake_datasets import (
    FAKE_MAKERS,
    make_fake_acdc,
    make_fake_cityscapes,
    make_fake_gtav,
    make_fake_mapillary,
    make_fake_synthia,
    make_fake_urbansyn,
    write_png,
    write_png16_rgb,
)
from torch.utils.data import DataLoader

from reinseg.data import (
    CLASSES,
    DATASETS,
    IGNORE_INDEX,
    PALETTE,
    ConcatSegmentationDataset,
    SegmentationDataset,
    build_dataset,
    build_datasets,
    collate,
    collate_training,
    label_values,
    train_transform,
)

SPLIT_FILE_SPLITS = {("gtav", "val"), ("gtav", "test")}
# GTAV's val and test are subsets read from its split file (tested on their own below).
NATIVE_SPLITS = [
    (name, split) for name in FAKE_MAKERS for split in DATASETS[name].splits if (name, split) not in SPLIT_FILE_SPLITS
]


def _options(name):
    return {"half": False} if name == "mapillary" else {}  # the half-resolution set needs `prepare`


def test_class_contract():
    assert CLASSES == (
        "road",
        "sidewalk",
        "building",
        "wall",
        "fence",
        "pole",
        "traffic light",
        "traffic sign",
        "vegetation",
        "terrain",
        "sky",
        "person",
        "rider",
        "car",
        "truck",
        "bus",
        "train",
        "motorcycle",
        "bicycle",
    )
    assert IGNORE_INDEX == 255
    palette = np.asarray(PALETTE)
    assert palette.shape == (19, 3) and palette.dtype == np.uint8
    assert palette[0].tolist() == [128, 64, 128] and palette[13].tolist() == [0, 0, 142]


@pytest.mark.parametrize("name, split", NATIVE_SPLITS)
def test_every_dataset_reads_in_its_native_layout(tmp_path, name, split):
    fake = FAKE_MAKERS[name](tmp_path / name)
    dataset = build_dataset(name, fake.root, split, **_options(name))
    assert len(dataset) > 0 and not dataset.skipped
    for item in dataset:
        expected = fake.expected[item["image_path"]]
        assert item["image"].shape == (3, 32, 64) and item["image"].dtype == torch.float32
        assert item["ori_size"] == (32, 64)
        if expected is None:  # ACDC test: no labels
            assert item["label"] is None and item["label_path"] is None
            continue
        assert item["label"].dtype == torch.int64
        assert np.array_equal(item["label"].numpy(), expected), item["label_path"]


def test_prepared_labels_are_preferred_to_native_ones(tmp_path):
    fake = make_fake_cityscapes(tmp_path, prepared=True)
    dataset = build_dataset("cityscapes", fake.root, "val")
    assert all(label.endswith("_gtFine_labelTrainIds.png") for _, label in dataset.pairs)
    for item in dataset:
        assert np.array_equal(item["label"].numpy(), fake.expected[item["image_path"]])


def test_mapillary_classes_map_to_cityscapes_train_ids(tmp_path):
    fake = make_fake_mapillary(tmp_path, n=1)
    label_path = next((tmp_path / "training/v1.2/labels").iterdir())
    # v1.2 IDs: 2 Curb, 0 Bird, 50 Traffic Sign (Front), 58 On Rails, 20 Bicyclist, 44 Street Light,
    # 24 Lane Marking - General, 65 Unlabeled.
    native = np.array([[2, 0, 50, 58, 20, 44, 24, 65]] * 32, np.uint8).repeat(8, axis=1)
    write_png(label_path, native, palette=True)
    item = build_dataset("mapillary", fake.root, "train")[0]
    assert item["label"][0, ::8].tolist() == [1, 255, 7, 16, 12, 5, 0, 255]


def test_mapillary_mapping_follows_the_datasets_own_config(tmp_path):
    fake = make_fake_mapillary(tmp_path, n=1)
    config = json.loads((tmp_path / "config_v1.2.json").read_text())
    config["labels"][0]["readable"], config["labels"][2]["readable"] = "Curb", "Bird"  # swap two classes
    (tmp_path / "config_v1.2.json").write_text(json.dumps(config))
    label_path = next((tmp_path / "training/v1.2/labels").iterdir())
    write_png(label_path, np.array([[0, 2]], np.uint8).repeat(32, 0).repeat(32, 1), palette=True)
    item = build_dataset("mapillary", fake.root, "train")[0]
    assert item["label"][0, ::32].tolist() == [1, 255]


def test_mapillary_v12_package_layout(tmp_path):
    fake = make_fake_mapillary(tmp_path, package="v1.2")
    item = build_dataset("mapillary", fake.root, "val", half=False)[0]
    assert item["label_path"].startswith(str(tmp_path / "validation" / "labels"))
    assert np.array_equal(item["label"].numpy(), fake.expected[item["image_path"]])


def test_gtav_and_cityscapes_ids(tmp_path):
    fake = make_fake_gtav(tmp_path, n=1)
    label = np.array([[7, 8, 26, 24, 33, 9, 34, 0]], np.uint8).repeat(32, 0).repeat(8, 1)
    write_png(tmp_path / "labels" / "00001.png", label, palette=True)
    item = build_dataset("gtav", fake.root)[0]
    assert item["label"][0, ::8].tolist() == [0, 1, 13, 11, 18, 255, 255, 255]


def test_synthia_reads_both_bytes_of_its_16_bit_labels(tmp_path):
    fake = make_fake_synthia(tmp_path, n=1)
    path = tmp_path / "GT" / "LABELS" / "0000000.png"
    classes = np.array([[3, 8, 10, 21, 0]], np.uint16).repeat(32, 0).repeat(13, 1)[:, :64]
    write_png16_rgb(path, np.stack([classes, np.full_like(classes, 4000), 0 * classes], -1))
    item = build_dataset("synthia", fake.root)[0]
    assert item["label"][0, ::13].tolist() == [0, 13, 11, 3, 255]
    # 259 = 0x0103: reading only the low byte would see 3 (road) where the class is unknown.
    classes[0, 0] = 259
    write_png16_rgb(path, np.stack([classes, 0 * classes, 0 * classes], -1))
    with pytest.raises(ValueError, match=r"0000000\.png.*\{259\}"):
        build_dataset("synthia", fake.root)[0]


def test_urbansyn_unlabeled_is_ignore(tmp_path):
    fake = make_fake_urbansyn(tmp_path, n=1)
    write_png(tmp_path / "ss" / "ss_0001.png", np.array([[0, 13, 18, 19]], np.uint8).repeat(32, 0).repeat(16, 1))
    item = build_dataset("urbansyn", fake.root)[0]
    assert item["label"][0, ::16].tolist() == [0, 13, 18, 255]


def test_acdc_conditions(tmp_path):
    fake = make_fake_acdc(tmp_path, n=2)
    night = build_dataset("acdc", fake.root, "val", condition="night")
    assert night.name == "acdc/night" and len(night) == 2
    assert all("/rgb_anon/night/val/" in image for image, _ in night.pairs)
    everything = build_dataset("acdc", fake.root, "train", condition="all")
    assert everything.name == "acdc" and len(everything) == 8
    test = build_dataset("acdc", fake.root, "test", condition="snow")
    assert all(label is None for _, label in test.pairs)
    with pytest.raises(ValueError, match="fog, night, rain, snow"):
        build_dataset("acdc", fake.root, "val", condition="sunny")


def test_unknown_names_splits_and_options_list_the_valid_ones(tmp_path):
    make_fake_cityscapes(tmp_path)
    with pytest.raises(ValueError, match="valid: gtav, synthia, urbansyn, cityscapes, bdd100k"):
        build_dataset("kitti", tmp_path)
    with pytest.raises(ValueError, match="no split 'test'; valid: train, val"):
        build_dataset("cityscapes", tmp_path, "test")
    with pytest.raises(ValueError, match="takes no option condition"):
        build_dataset("cityscapes", tmp_path, "val", condition="night")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_dataset("cityscapes", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="on_error"):
        build_dataset("cityscapes", tmp_path, on_error="ignore")


def test_missing_label_folder_is_named(tmp_path):
    make_fake_cityscapes(tmp_path)
    for path in (tmp_path / "gtFine").rglob("*"):
        if path.is_file():
            path.unlink()
    (tmp_path / "gtFine" / "train").rename(tmp_path / "gtFine" / "training")
    with pytest.raises(FileNotFoundError, match=r"gtFine/train"):
        build_dataset("cityscapes", tmp_path, "train")


# --- bad input: failing and skipping --------------------------------------------------------


def test_image_without_label_fails_or_is_skipped(tmp_path, caplog):
    fake = make_fake_cityscapes(tmp_path, n=3)
    orphan = next(p for p in (tmp_path / "gtFine" / "val").rglob("*_labelIds.png"))
    orphan.unlink()
    image = str(orphan).replace("_gtFine_labelIds", "_leftImg8bit").replace("/gtFine/", "/leftImg8bit/")
    with pytest.raises(ValueError, match="image has no label") as info:
        build_dataset("cityscapes", fake.root, "val")
    assert image in str(info.value)
    with caplog.at_level(logging.WARNING, logger="reinseg.data"):
        dataset = build_dataset("cityscapes", fake.root, "val", on_error="skip")
    assert len(dataset) == 2 and image not in [p for p, _ in dataset.pairs]
    assert dataset.skipped == [(image, dataset.skipped[0][1])] and "has no label" in dataset.skipped[0][1]
    assert image in caplog.text


def test_label_without_image_is_reported(tmp_path):
    make_fake_gtav(tmp_path, n=2)
    (tmp_path / "images" / "00002.png").unlink()
    dataset = build_dataset("gtav", tmp_path, on_error="skip")
    assert len(dataset) == 1
    assert dataset.skipped[0][0] == str(tmp_path / "labels" / "00002.png")
    assert "label has no image" in dataset.skipped[0][1]


def _corrupt(tmp_path, kind):
    """A GTAV copy whose second pair has one problem; returns (root, the file at fault)."""
    make_fake_gtav(tmp_path, n=3)
    label, image = tmp_path / "labels" / "00002.png", tmp_path / "images" / "00002.png"
    if kind == "size mismatch":
        write_png(label, np.full((30, 64), 7, np.uint8), palette=True)
        return label
    if kind == "invalid values":
        write_png(label, np.full((32, 64), 200, np.uint8), palette=True)
        return label
    image.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return image


@pytest.mark.parametrize(
    "kind, message",
    [
        ("size mismatch", r"30x64 \(HxW\) but its image"),
        ("invalid values", r"outside the GTAV label IDs \{0\.\.34\}: \{200\}"),
        ("unreadable", "unreadable"),
    ],
)
def test_bad_pairs_fail_at_load_time_naming_the_file(tmp_path, kind, message):
    culprit = _corrupt(tmp_path, kind)
    dataset = build_dataset("gtav", tmp_path)
    dataset[0]
    with pytest.raises(ValueError, match=message) as info:
        dataset[1]
    assert str(culprit) in str(info.value)


@pytest.mark.parametrize("kind", ["size mismatch", "invalid values", "unreadable"])
def test_bad_pairs_are_skipped_counted_and_logged(tmp_path, caplog, kind):
    culprit = _corrupt(tmp_path, kind)
    dataset = build_dataset("gtav", tmp_path, on_error="skip")
    with caplog.at_level(logging.WARNING, logger="reinseg.data"):
        item = dataset[1]
    assert item["image_path"] == str(tmp_path / "images" / "00003.png")  # the next good pair
    assert [path for path, _ in dataset.skipped] == [str(culprit)]
    assert str(culprit) in caplog.text
    dataset[1]
    assert len(dataset.skipped) == 1  # counted once


@pytest.mark.parametrize("kind", ["size mismatch", "invalid values", "unreadable"])
def test_validate_scans_every_pair_up_front(tmp_path, kind):
    culprit = _corrupt(tmp_path, kind)
    with pytest.raises(ValueError, match=str(culprit)):
        build_dataset("gtav", tmp_path).validate(workers=1)
    dataset = build_dataset("gtav", tmp_path, on_error="skip")
    problems = dataset.validate(workers=2)
    assert [p.path for p in problems] == [str(culprit)] and problems[0].kind == kind
    assert len(dataset) == 2 and str(culprit) not in [p for pair in dataset.pairs for p in pair]


def test_train_id_labels_outside_the_classes_never_pass(tmp_path):
    fake = make_fake_cityscapes(tmp_path, n=1, prepared=True)
    label = next((tmp_path / "gtFine" / "train").rglob("*_labelTrainIds.png"))
    values = fake.expected[next(iter(fake.expected))].copy()
    values[0, 0] = 19
    write_png(label, values)
    with pytest.raises(ValueError, match=r"outside the train IDs \{0\.\.18, 255\}: \{19\}"):
        build_dataset("cityscapes", fake.root, "train")[0]


# --- batching, concatenation, reproducibility -----------------------------------------------


def test_collate_batches_through_a_dataloader(tmp_path):
    fake = make_fake_cityscapes(tmp_path, n=4)
    dataset = build_dataset("cityscapes", fake.root, "train", transform=train_transform(crop_size=16, base_size=32))
    batch = next(iter(DataLoader(dataset, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["label"].shape == (4, 16, 16)
    assert len(batch["image_path"]) == 4 and batch["ori_size"] == [(32, 64)] * 4
    unlabeled = build_dataset(
        "acdc", make_fake_acdc(tmp_path / "acdc", conditions=("fog",)).root, "test", condition="fog"
    )
    assert collate([unlabeled[0], unlabeled[1]])["label"] is None
    items = [dataset[0], {**dataset[1], "image": torch.zeros(3, 8, 8)}]
    with pytest.raises(ValueError, match="different sizes"):
        collate(items)


@pytest.mark.parametrize(
    "label",
    [
        torch.tensor([[3, 255, 3], [0, 18, 255]], dtype=torch.uint8),
        torch.randint(0, 19, (64, 64), generator=torch.Generator().manual_seed(0)),
        torch.tensor([[-1, 5], [70000, 5]]),  # past the counted range: sorted by unique instead
        torch.tensor([[1 << 16, 0]]),
        torch.zeros(0, 4, dtype=torch.int64),
        torch.full((2, 2), 7, dtype=torch.int32),
    ],
)
def test_label_values_are_a_labels_distinct_values_ascending(label):
    assert label_values(label) == torch.unique(label).tolist()
    assert all(type(v) is int for v in label_values(label))


def test_training_batches_carry_each_labels_values(tmp_path):
    """Found in the data workers, where they cost the training nothing; the loss takes the
    images' classes from them (``Segments.of_images``) instead of reading them back from a GPU."""
    fake = make_fake_cityscapes(tmp_path, n=3)
    dataset = build_dataset("cityscapes", fake.root, "train", transform=train_transform(crop_size=16, base_size=32))
    batch = next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate_training)))
    assert batch["label_values"] == [torch.unique(label).tolist() for label in batch["label"]]
    assert {k: v for k, v in batch.items() if k != "label_values"}.keys() == collate([dataset[0]]).keys()
    unlabeled = build_dataset(
        "acdc", make_fake_acdc(tmp_path / "acdc", conditions=("fog",)).root, "test", condition="fog"
    )
    assert collate_training([unlabeled[0]])["label_values"] is None


def test_sources_concatenate_for_training(tmp_path):
    entries = []
    for name in ("gtav", "synthia", "urbansyn"):
        FAKE_MAKERS[name](tmp_path / name, n=2)
        entries.append({"name": name, "root": tmp_path / name, "split": "train"})
    combined = ConcatSegmentationDataset(build_datasets(entries, transform=train_transform(crop_size=16, base_size=32)))
    assert combined.name == "gtav+synthia+urbansyn" and len(combined) == 6 and len(combined.pairs) == 6
    sources = {
        name
        for i in range(6)
        for name in ("gtav", "synthia", "urbansyn")
        if str(tmp_path / name) in combined[i]["image_path"]
    }
    assert sources == {"gtav", "synthia", "urbansyn"}
    with pytest.raises(ValueError, match="lacks 'root'"):
        build_datasets([{"name": "gtav"}])


def test_seeded_datasets_reproduce_augmentations_per_epoch(tmp_path):
    fake = make_fake_cityscapes(tmp_path, n=1)
    transform = train_transform(crop_size=16, base_size=32)
    a, b = (build_dataset("cityscapes", fake.root, transform=transform, seed=3) for _ in range(2))
    assert torch.equal(a[0]["image"], b[0]["image"])
    epochs = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        epochs.add(a[0]["image"].sum().item())
    assert len(epochs) > 1


def test_concatenated_datasets_draw_their_own_augmentations(tmp_path):
    fake = make_fake_cityscapes(tmp_path, n=1)
    transform = train_transform(crop_size=16, base_size=32)
    alone, first, second = (build_dataset("cityscapes", fake.root, transform=transform, seed=3) for _ in range(3))
    combined = ConcatSegmentationDataset([first, second])
    assert combined[0]["image_path"] == combined[1]["image_path"]
    assert torch.equal(combined[0]["image"], alone[0]["image"])  # the first keeps its draws
    assert not torch.equal(combined[0]["image"], combined[1]["image"])  # the same image, augmented otherwise


def test_dataset_from_explicit_pairs(tmp_path):
    fake = FAKE_MAKERS["bdd100k"](tmp_path, n=1, splits=("val",))
    image = next(iter(fake.expected))
    label = image.replace("images/10k", "labels/sem_seg/masks").replace(".jpg", ".png")
    dataset = SegmentationDataset("mine", [(image, label)])
    assert np.array_equal(dataset[0]["label"].numpy(), fake.expected[image])
    assert repr(dataset) == "SegmentationDataset('mine', 1 pairs, 0 skipped)"


@pytest.mark.parametrize("damage", ["truncated jpeg", "truncated png", "empty", "text"])
def test_images_opencv_cannot_decode_are_errors_naming_the_file(tmp_path, damage):
    import cv2

    from reinseg.data.io import read_image

    image = np.random.default_rng(0).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    ext = ".png" if damage == "truncated png" else ".jpg"
    data = cv2.imencode(ext, image)[1].tobytes()
    path = tmp_path / f"bad{ext}"
    path.write_bytes({"empty": b"", "text": b"no image here"}.get(damage, data[: len(data) * 2 // 3]))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: unreadable"):
        read_image(path)
    path.write_bytes(data)  # the whole file decodes (as RGB: cv2 decodes BGR)
    decoded = read_image(path)
    assert decoded.shape == (64, 96, 3) and (ext == ".jpg" or np.array_equal(decoded, image[..., ::-1]))


def test_a_complete_jpeg_decodes_whatever_follows_it_and_whatever_its_exif_holds(tmp_path):
    """A motion photo appends a video after the image's end marker; an EXIF thumbnail holds a
    JPEG, end marker included, before the image's first scan. Both decode as the bare image."""
    import cv2
    from PIL import Image

    from reinseg.data.io import read_image

    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    bare = tmp_path / "bare.jpg"
    Image.fromarray(rgb).save(bare, quality=90)
    expected = read_image(bare)
    motion = tmp_path / "motion.jpg"
    trailer = b"\x00\x00\x00\x18ftypmp42" + b"\xff\xda\x00\x08" + bytes(range(256)) * 4  # a scan marker, no EOI
    motion.write_bytes(bare.read_bytes() + trailer)
    assert np.array_equal(cv2.imdecode(np.fromfile(motion, np.uint8), cv2.IMREAD_COLOR)[..., ::-1], expected)
    assert np.array_equal(read_image(motion), expected)
    small = tmp_path / "small.jpg"
    Image.fromarray(rgb[:8, :8]).save(small)
    payload = b"thumbnail\x00" + small.read_bytes()  # SOI ... EOI inside an application segment
    segment = b"\xff\xe5" + (len(payload) + 2).to_bytes(2, "big") + payload
    with_thumbnail = tmp_path / "thumb.jpg"
    with_thumbnail.write_bytes(bare.read_bytes()[:2] + segment + bare.read_bytes()[2:])
    assert np.array_equal(read_image(with_thumbnail), expected)
    with_thumbnail.write_bytes(with_thumbnail.read_bytes()[:-200])  # its own scan cut: damaged
    with pytest.raises(ValueError, match="unreadable"):
        read_image(with_thumbnail)
    # cut inside the last scan, or inside a header segment: damaged
    data = bare.read_bytes()
    for cut in (len(data) - 2, len(data) // 2, 30):
        motion.write_bytes(data[:cut])
        with pytest.raises(ValueError, match="unreadable"):
            read_image(motion)


def test_bilevel_label_pngs_read_as_zeros_and_ones(tmp_path):
    """Image.fromarray(mask > 0).save(...) writes a 1-bit PNG; mmseg reads it as 0 and 1."""
    from PIL import Image

    from reinseg.data.encodings import TRAIN_IDS
    from reinseg.data.io import read_label

    mask = np.random.default_rng(0).random((12, 20)) > 0.5
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)
    assert Image.open(path).mode == "1"
    values = read_label(path)
    assert values.dtype == np.uint8 and np.array_equal(values, mask.astype(np.uint8))
    assert np.array_equal(TRAIN_IDS.read(str(path)), mask.astype(np.uint8))


def test_city_folders_that_are_links_are_read_and_a_link_loop_ends(tmp_path):
    """Cities linked in from another disk are pairs as any other (mmengine's listing follows
    links); a link to a folder above is not walked (it would loop, and bring in the train split)."""
    import shutil

    from reinseg.data.io import files_below

    fake = make_fake_cityscapes(tmp_path / "cityscapes", n=2, splits=("train", "val"), prepared=True)
    elsewhere = tmp_path / "other_disk"
    for top in ("leftImg8bit", "gtFine"):
        moved = elsewhere / top / "bochum"
        shutil.move(fake.root / top / "val" / "bochum", moved)
        (fake.root / top / "val" / "bochum").symlink_to(moved, target_is_directory=True)
    (fake.root / "leftImg8bit" / "val" / "aachen" / "loop").symlink_to(
        fake.root / "leftImg8bit", target_is_directory=True
    )
    dataset = build_dataset("cityscapes", fake.root, "val")
    assert [Path(image).parent.name for image, _ in dataset.pairs] == ["aachen", "bochum"]
    assert all("/train/" not in image for image, _ in dataset.pairs)
    for i, (image, _) in enumerate(dataset.pairs):
        np.testing.assert_array_equal(dataset[i]["label"].numpy(), fake.expected[image])  # through the link
    below = files_below(fake.root / "leftImg8bit" / "val")
    assert len(below) == 2 and all("loop" not in p.parts for p in below)


def test_webp_images_are_not_turned_by_their_exif_orientation(tmp_path):
    """mmcv's OpenCV 4.x leaves a WebP image as stored; OpenCV 5 turns it, the label (read by
    Pillow) stays: the pair would silently disagree."""
    from PIL import Image

    from reinseg.data.io import read_image

    rgb = np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned: a viewer rotates it by 90 degrees
    path = tmp_path / "turned.webp"
    Image.fromarray(rgb).save(path, lossless=True, exif=exif.tobytes())
    assert Image.open(path).getexif().get(0x0112) == 6
    assert np.array_equal(read_image(path), rgb)


def test_a_native_label_of_another_size_names_prepare(tmp_path):
    from PIL import Image

    from reinseg.data.datasets import inspect_pair, read_pair
    from reinseg.data.encodings import GTAV_IDS
    from reinseg.data.io import DataError

    fake = make_fake_gtav(tmp_path / "gta", n=1, size=(32, 64))
    label = tmp_path / "gta" / "labels" / "00001.png"
    Image.fromarray(np.zeros((34, 64), np.uint8), mode="P").save(label)
    with pytest.raises(DataError, match=r"00001.png: label is 34x64 \(HxW\) but its image .* `reinseg prepare`"):
        read_pair(next(iter(fake.expected)), str(label), GTAV_IDS)
    # check-data and a validation set's up-front validation say the same
    (problem,) = inspect_pair(next(iter(fake.expected)), str(label), GTAV_IDS).problems
    assert problem.kind == "size mismatch" and "`reinseg prepare`" in problem.reason


def test_gtav_val_and_test_are_the_frames_of_the_official_split_file(tmp_path):
    from scipy.io import savemat

    fake = make_fake_gtav(tmp_path / "gta", n=6, size=(32, 64))
    # GTAV's split.mat: 1-based frame numbers as column vectors of doubles.
    ids = {"trainIds": [[1.0], [2.0], [5.0]], "valIds": [[3.0], [6.0]], "testIds": [[4.0]]}
    savemat(tmp_path / "gta" / "split.mat", ids)
    val = build_dataset("gtav", tmp_path / "gta", "val")
    assert [Path(image).name for image, _ in val.pairs] == ["00003.png", "00006.png"]
    assert len(build_dataset("gtav", tmp_path / "gta", "test")) == 1
    assert len(build_dataset("gtav", tmp_path / "gta", "train")) == 6  # the field trains on every frame
    for i, (image, _) in enumerate(val.pairs):
        np.testing.assert_array_equal(val[i]["label"].numpy(), fake.expected[image])
    (tmp_path / "gta" / "split.mat").unlink()
    (tmp_path / "gta" / "val.txt").write_text("00002.png\n4\n")
    names = [Path(image).name for image, _ in build_dataset("gtav", tmp_path / "gta", "val").pairs]
    assert names == ["00002.png", "00004.png"]
    with pytest.raises(FileNotFoundError, match=r"GTAV split 'test' needs .*split.mat"):
        build_dataset("gtav", tmp_path / "gta", "test")
    (tmp_path / "gta" / "val.txt").write_text("00009\n")
    with pytest.raises(ValueError, match="1 images of the split are missing below .*images, e.g. 00009"):
        build_dataset("gtav", tmp_path / "gta", "val")


def test_check_data_reads_the_gtav_frames_once_when_the_split_file_is_there(tmp_path):
    from scipy.io import savemat

    from reinseg.data.check import check

    make_fake_gtav(tmp_path / "gta", n=3, size=(32, 64))
    savemat(tmp_path / "gta" / "split.mat", {"trainIds": [[1.0]], "valIds": [[2.0]], "testIds": [[3.0]]})
    reports = check(tmp_path / "gta", dataset="gtav", progress=False)
    assert [report.pairs for report in reports] == [3]


def test_prediction_names_follow_the_prepared_labels(tmp_path):
    """--save-preds writes train IDs under the name `reinseg prepare` gives a label: Cityscapes'
    native *_labelIds.png become *_labelTrainIds.png, prepared labels keep theirs, and Mapillary's
    (prepared into another folder under the same names) keep theirs."""
    from reinseg.datamodule import label_root, prediction_name, prepared_elsewhere

    cases = {
        "cityscapes": (make_fake_cityscapes(tmp_path / "cs_native", n=1), {}),
        "cityscapes_prepared": (make_fake_cityscapes(tmp_path / "cs_prepared", n=1, prepared=True), {}),
        "mapillary": (make_fake_mapillary(tmp_path / "mapillary", n=1), {"half": False}),
    }
    names = {}
    for case, (fake, options) in cases.items():
        dataset = build_dataset(case.split("_")[0], fake.root, "val", **options)
        [(_, label)] = dataset.pairs
        relative = Path(label).relative_to(label_root(dataset))
        names[case] = (relative.name, prediction_name(dataset, relative).name, prepared_elsewhere(dataset))
    native, predicted, elsewhere = names["cityscapes"]
    assert native.endswith("_gtFine_labelIds.png") and not elsewhere
    assert predicted == native.replace("_labelIds.png", "_labelTrainIds.png")
    prepared, predicted, elsewhere = names["cityscapes_prepared"]
    assert prepared.endswith("_labelTrainIds.png") and predicted == prepared and not elsewhere
    native, predicted, elsewhere = names["mapillary"]
    assert elsewhere and predicted == native
