import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from golden.make_opencv_hsv_golden import every_hsv_value, hsv_to_rgb_digest

from reinseg.data import IMAGENET_MEAN, IMAGENET_STD, TEST_SCALES
from reinseg.data.transforms import (
    Compose,
    Normalize,
    Pad,
    PhotoMetricDistortion,
    RandomCrop,
    RandomFlip,
    RandomResizeShortestEdge,
    Resize,
    ToTensor,
    eval_transform,
    rescale_size,
    resize_image,
    resize_label,
    train_transform,
)


def _pair(size=(24, 40), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    label = rng.choice(np.array([0, 1, 2, 13, 255], np.uint8), size)
    return image, label


class Scripted:
    """A stand-in for numpy's Generator that returns scripted draws and records each call."""

    def __init__(self, integers=(), uniform=(), random=()):
        self._integers, self._uniform, self._random = list(integers), list(uniform), list(random)
        self.calls = []

    def integers(self, low, high=None, size=None):
        self.calls.append(("integers", low, high))
        return self._integers.pop(0) if self._integers else 0

    def uniform(self, low, high):
        self.calls.append(("uniform", low, high))
        return self._uniform.pop(0)

    def random(self):
        self.calls.append(("random",))
        return self._random.pop(0)


# --- geometry -------------------------------------------------------------------------------


def test_resize_label_is_nearest_neighbour_as_cv2():
    label = np.array([[0, 1], [2, 255]], np.uint8)
    up = resize_label(label, (4, 4))
    assert up.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 255, 255], [2, 2, 255, 255]]
    # Output pixel i reads input pixel floor(i * 5 / 3): 0, 1, 3.
    row = np.arange(5, dtype=np.uint8)[None]
    assert resize_label(row, (1, 3)).tolist() == [[0, 1, 3]]


def test_resize_label_never_invents_values():
    _, label = _pair()
    for size in [(7, 9), (50, 80), (24, 41)]:
        out = resize_label(label, size)
        assert out.shape == size and out.dtype == label.dtype
        assert set(np.unique(out)) <= set(np.unique(label))


def test_resize_image_is_bilinear_with_half_pixel_centres_and_no_antialias():
    image = np.zeros((1, 2, 3), np.uint8)
    image[0, 1] = 100
    # cv2 INTER_LINEAR: source x = (x + 0.5) / 2 - 0.5, clamped at the borders.
    assert resize_image(image, (1, 4))[0, :, 0].tolist() == [0, 25, 75, 100]
    stripes = np.zeros((4, 8, 3), np.uint8)
    stripes[:, ::2] = 200
    # Halving picks the midpoint between pixel pairs: no antialiasing, every column averages to 100.
    assert np.all(resize_image(stripes, (2, 4)) == 100)


def test_resize_image_keeps_constant_images_constant():
    image = np.full((10, 12, 3), (10, 128, 250), np.uint8)
    assert np.all(resize_image(image, (23, 7)) == image[0, 0])


def test_rescale_size_follows_mmcv_imrescale():
    assert rescale_size((1024, 2048), (2048, 1024)) == (1024, 2048)
    assert rescale_size((1024, 2048), (1024, 512)) == (512, 1024)
    # GTAV frames at the GTAV test scale: factor min(1280 / 1914, 720 / 1052), rounded half up.
    assert rescale_size((1052, 1914), (1280, 720)) == (704, 1280)
    assert rescale_size((1080, 1920), (1920, 1080)) == (1080, 1920)
    # The order of the limits does not matter: (long, short) either way.
    assert rescale_size((600, 800), (512, 1024)) == rescale_size((600, 800), (1024, 512)) == (512, 683)


def test_shortest_edge_resize_scales_short_edge_and_caps_long_edge():
    resize = RandomResizeShortestEdge([512], max_size=2048)
    assert resize.target_size((1024, 2048), 512) == (512, 1024)
    assert resize.target_size((2048, 1024), 512) == (1024, 512)
    # 1000 on the short edge would make the long edge 4000: capped to 2048 instead.
    assert resize.target_size((500, 2000), 1000) == (512, 2048)
    image, label = _pair((20, 40))
    out_image, out_label = RandomResizeShortestEdge([30], max_size=2048)(image, label, rng=0)
    assert out_image.shape == (30, 60, 3) and out_label.shape == (30, 60)
    assert set(np.unique(out_label)) <= set(np.unique(label))


def test_train_scales_are_the_official_list_drawn_uniformly():
    resize = train_transform().transforms[0]
    assert resize.scales == [256, 307, 358, 409, 460, 512, 563, 614, 665, 716, 768, 819, 870, 921, 972, 1024]
    assert resize.max_size == 2048
    rng = np.random.default_rng(0)
    assert {resize.sample(rng) for _ in range(400)} == set(resize.scales)


def test_resize_keep_ratio_for_evaluation_leaves_the_label_alone():
    image, label = _pair((40, 80))
    out_image, out_label = Resize((32, 16), keep_ratio=True, resize_label=False)(image, label)
    assert out_image.shape == (16, 32, 3)
    assert out_label is label
    _, resized = Resize((32, 16), keep_ratio=False)(image, label)
    assert resized.shape == (16, 32)


def test_random_crop_has_the_crop_size_and_cuts_a_window_of_the_pair():
    image, label = _pair((30, 50))
    crop = RandomCrop((16, 20), cat_max_ratio=1.0)
    out_image, out_label = crop(image, label, rng=3)
    assert out_image.shape == (16, 20, 3) and out_label.shape == (16, 20)
    windows = [(y, x) for y in range(15) for x in range(31) if np.array_equal(image[y : y + 16, x : x + 20], out_image)]
    assert len(windows) == 1
    y, x = windows[0]
    assert np.array_equal(label[y : y + 16, x : x + 20], out_label)


def test_random_crop_of_a_small_image_is_not_padded():
    image, label = _pair((10, 12))
    out_image, out_label = RandomCrop(16)(image, label, rng=0)
    assert np.array_equal(out_image, image) and np.array_equal(out_label, label)


def test_pad_fills_bottom_and_right_with_zero_and_ignore_after_normalisation():
    image, label = _pair((10, 12))
    normalized, _ = Normalize()(image)
    out_image, out_label = Pad(16)(normalized, label)
    assert out_image.shape == (16, 16, 3) and out_label.shape == (16, 16)
    assert np.array_equal(out_image[:10, :12], normalized) and np.array_equal(out_label[:10, :12], label)
    assert np.all(out_image[10:] == 0) and np.all(out_image[:, 12:] == 0)
    assert np.all(out_label[10:] == 255) and np.all(out_label[:, 12:] == 255)
    big_image, big_label = Pad(8)(normalized, label)
    assert big_image is normalized and big_label is label


def test_train_transform_flips_and_distorts_before_padding():
    # A short side of 10 after the resize: a 10 x 16 crop, padded to 16 x 16 only after the flip
    # and the photometric steps, so the padding is exactly 0 / 255 below it whatever they drew.
    image, label = _pair((10, 20))
    transform = train_transform(crop_size=16, base_size=10, ratio_range=(1.0, 1.0), max_size=64)
    for seed in range(8):
        out_image, out_label = transform(image, label, rng=seed)
        assert out_image.shape == (3, 16, 16) and out_label.shape == (16, 16)
        assert torch.all(out_image[:, 10:] == 0) and torch.all(out_label[10:] == 255)
        assert torch.any(out_image[:, :10] != 0)


@pytest.mark.parametrize(
    "label, windows_drawn",
    [
        (np.zeros((32, 32), np.uint8), 11),  # one class everywhere: 10 retries, the 11th kept
        (np.full((32, 32), 255, np.uint8), 11),  # only ignore: no two classes either
        (np.indices((32, 32)).sum(0).astype(np.uint8) % 2, 1),  # a checkerboard: balanced at once
    ],
)
def test_random_crop_retries_like_mmseg_when_one_class_dominates(label, windows_drawn):
    rng = Scripted()
    RandomCrop(8, cat_max_ratio=0.75)(np.zeros((32, 32, 3), np.uint8), label, rng=rng)
    assert len(rng.calls) == 2 * windows_drawn  # two offsets per window


def test_random_crop_accepts_the_first_window_under_cat_max_ratio():
    label = np.zeros((8, 16), np.uint8)
    label[:, 8:] = 1  # left half one class, right half another
    image = np.zeros((8, 16, 3), np.uint8)
    # Offsets x = 0 (one class only: redrawn), then x = 4 (half and half: kept).
    out_image, out_label = RandomCrop((8, 8), cat_max_ratio=0.75)(image, label, rng=Scripted(integers=[0, 0, 0, 4]))
    assert out_label.tolist() == [[0] * 4 + [1] * 4] * 8


def test_random_flip_flips_image_and_label_together():
    image, label = _pair()
    flipped_image, flipped_label = RandomFlip(1.0)(image, label, rng=0)
    assert np.array_equal(flipped_image, image[:, ::-1]) and np.array_equal(flipped_label, label[:, ::-1])
    same_image, same_label = RandomFlip(0.0)(image, label, rng=0)
    assert same_image is image and same_label is label
    ramp = np.arange(10, dtype=np.uint8)[None].repeat(2, axis=0)
    rng = np.random.default_rng(0)
    flips = sum(RandomFlip(0.5)(ramp[..., None].repeat(3, -1), ramp, rng=rng)[1][0, 0] == 9 for _ in range(400))
    assert 160 < flips < 240  # Binomial(400, 1/2): mean 200, std 10


# --- photometry -----------------------------------------------------------------------------


def test_photometric_distortion_draws_in_mmseg_order_and_ranges():
    image = np.full((4, 4, 3), 100, np.uint8)
    # brightness on (+10.7), contrast last (mode 0), saturation off, hue off, contrast on (x1.5).
    rng = Scripted(integers=[1, 0, 0, 0, 1], uniform=[10.7, 1.5])
    out, label = PhotoMetricDistortion()(image, None, rng=rng)
    assert label is None
    assert rng.calls == [
        ("integers", 2, None),
        ("uniform", -32, 32),
        ("integers", 2, None),
        ("integers", 2, None),
        ("integers", 2, None),
        ("integers", 2, None),
        ("uniform", 0.5, 1.5),
    ]
    # (100 + 10.7) truncated to 110, then 110 * 1.5 = 165: uint8 truncation after each step.
    assert np.all(out == 165)


def test_photometric_distortion_hue_and_saturation_steps():
    image = np.array([[[200, 100, 50], [90, 90, 90]]], np.uint8)
    # no brightness, contrast first (mode 1) but off, saturation x0.5, hue +17.
    rng = Scripted(integers=[0, 1, 0, 1, 1, 17], uniform=[0.5])
    out, _ = PhotoMetricDistortion()(image, None, rng=rng)
    assert ("integers", -18, 18) in rng.calls and ("uniform", 0.5, 1.5) in rng.calls
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = (hsv[..., 1] * np.float32(0.5)).astype(np.uint8)
    expected = cv2.cvtColor(cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB), cv2.COLOR_RGB2HSV)
    expected[..., 0] = (expected[..., 0].astype(int) + 17) % 180
    assert np.array_equal(out, cv2.cvtColor(expected, cv2.COLOR_HSV2RGB))
    assert np.all(out[0, 1] == 90)  # gray has no hue or saturation to change


HSV_GOLDEN = json.loads((Path(__file__).parent / "data" / "opencv_hsv2rgb.json").read_text())


@pytest.fixture(scope="module")
def hsv_values():
    return every_hsv_value()


@pytest.mark.parametrize("width", list(HSV_GOLDEN["sha256"]))
def test_hsv_to_rgb_of_every_value_equals_the_official_opencv_at_every_width(hsv_values, width):
    # The photometric steps convert each crop back from HSV. opencv rounds a row's SIMD blocks
    # and its remainder differently, so the result depends on the width; it must be the official
    # environment's (4.11) at every width (opencv-python-headless 5.1 differs at widths 37 and 96).
    digest = hsv_to_rgb_digest(hsv_values, int(width))
    assert digest == HSV_GOLDEN["sha256"][width], (
        f"opencv {cv2.__version__} converts HSV to RGB unlike opencv {HSV_GOLDEN['opencv']} at width {width}"
    )


def test_photometric_distortion_is_seeded_and_keeps_labels():
    image, label = _pair()
    a = PhotoMetricDistortion()(image, label, rng=5)
    b = PhotoMetricDistortion()(image, label, rng=5)
    assert np.array_equal(a[0], b[0]) and a[1] is label
    assert a[0].dtype == np.uint8 and a[0].shape == image.shape


# --- to the model ---------------------------------------------------------------------------


def test_normalize_and_to_tensor():
    image = np.zeros((2, 3, 3), np.uint8)
    image[..., 0] = 255
    normalized, _ = Normalize()(image)
    assert np.allclose(normalized[0, 0], (np.array([255, 0, 0]) - IMAGENET_MEAN) / IMAGENET_STD)
    tensor, label = ToTensor()(normalized, np.ones((2, 3), np.uint8))
    assert tensor.shape == (3, 2, 3) and tensor.dtype == torch.float32
    assert label.dtype == torch.int64 and label.shape == (2, 3)
    assert IMAGENET_MEAN == (123.675, 116.28, 103.53) and IMAGENET_STD == (58.395, 57.12, 57.375)


def test_train_transform_gives_crops_with_labels_from_the_input():
    image, label = _pair((120, 200))
    out_image, out_label = train_transform(crop_size=64, base_size=64)(image, label, rng=0)
    assert out_image.shape == (3, 64, 64) and out_image.dtype == torch.float32
    assert out_label.shape == (64, 64) and out_label.dtype == torch.int64
    assert set(out_label.unique().tolist()) <= set(np.unique(label).tolist()) | {255}
    again = train_transform(crop_size=64, base_size=64)(image, label, rng=0)
    assert torch.equal(out_image, again[0]) and torch.equal(out_label, again[1])


def test_eval_transform_resizes_only_the_image_to_the_test_scale():
    image, label = _pair((64, 128))
    out_image, out_label = eval_transform((32, 16))(image, label)
    assert out_image.shape == (3, 16, 32)
    assert torch.equal(out_label, torch.from_numpy(label.astype(np.int64)))


def test_test_scales_follow_the_official_configs():
    assert TEST_SCALES["cityscapes"] == (1024, 512)
    assert TEST_SCALES["bdd100k"] == (1280, 720)
    assert TEST_SCALES["mapillary"] == (1024, 512)
    assert TEST_SCALES["acdc"] == (1920, 1080)
    assert TEST_SCALES["gtav"] == (1280, 720)


def test_compose_threads_one_generator():
    image, label = _pair((40, 40))
    pipeline = Compose([RandomCrop(20), RandomFlip(0.5)])
    a, b = pipeline(image, label, rng=11), pipeline(image, label, rng=11)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


def test_transform_arguments_are_checked_when_built():
    """A zero crop or scale was accepted, then failed in OpenCV at the first image."""
    from reinseg.data.transforms import eval_transform, train_transform

    with pytest.raises(ValueError, match="train_transform: crop_size must be a positive integer, got 0"):
        train_transform(crop_size=0)
    train_transform(crop_size=(512, 1024), base_size=np.int64(512))  # (h, w) crops and numpy sizes, as before
    eval_transform((np.int64(1024), 512))
    with pytest.raises(ValueError, match=r"eval_transform: scale must be \(long, short\).* got \(0, 32\)"):
        eval_transform((0, 32))
