import pytest
import torch
from conftest import HostWaits, copies_to_device, take_gpu_code_paths, tiny_model_config

from reinseg.build import build_segmentor
from reinseg.config import ConfigError, HeadConfig, ReinConfig
from reinseg.segmentor import sliding_windows


def test_sliding_windows_follow_mmseg():
    # mmseg: grids = ceil((size - crop) / stride) + 1, the last window shifted back inside.
    windows = sliding_windows(64, 128, (64, 64), (42, 42))
    assert windows == [(0, 64, 0, 64), (0, 64, 42, 106), (0, 64, 64, 128)]
    windows = sliding_windows(512, 1024, (512, 512), (341, 341))
    assert [w[2:] for w in windows] == [(0, 512), (341, 853), (512, 1024)]
    assert sliding_windows(40, 40, (64, 64), (42, 42)) == [(0, 40, 0, 40)]  # smaller than the crop


@pytest.mark.parametrize("window_batch", [1, 3, 8])
def test_every_pixel_is_covered_and_overlaps_are_averaged(monkeypatch, window_batch):
    """A stub model whose scores are a known function of position: channels 0 and 1 repeat the
    pixel's own row and column (coded in the image), channel 2 is the window's left edge. Stitched
    right, the first two come back unchanged and the third is the mean left edge of the windows
    covering each column, with the windows written out by hand from mmseg's rule."""
    segmentor = build_segmentor(tiny_model_config(num_classes=3)).eval()
    segmentor.window_batch = window_batch
    forwards = []

    def stub(crop):
        forwards.append(len(crop))
        left_edge = crop[:, 1, :1, :1].expand_as(crop[:, 1])
        return torch.stack([crop[:, 0], crop[:, 1], left_edge], dim=1)

    monkeypatch.setattr(segmentor, "encode_decode", stub)
    height, width = 80, 170
    rows = torch.arange(height, dtype=torch.float32).view(1, height, 1).expand(1, height, width)
    cols = torch.arange(width, dtype=torch.float32).view(1, 1, width).expand(1, height, width)
    images = torch.stack([rows, cols, torch.zeros_like(rows)], dim=1)
    slide = segmentor.predict(images, mode="slide", crop_size=64, stride=48)
    # mmseg: ceil((170 - 64) / 48) + 1 = 4 columns of windows at 0, 48, 96 and 170 - 64 = 106;
    # ceil((80 - 64) / 48) + 1 = 2 rows at 0 and 80 - 64 = 16.
    lefts = [0, 48, 96, 106]
    expected_left = torch.tensor(
        [sum(x for x in lefts if x <= c < x + 64) / sum(x <= c < x + 64 for x in lefts) for c in range(width)]
    )
    assert torch.equal(slide[0, 0], rows[0]) and torch.equal(slide[0, 1], cols[0])
    assert torch.allclose(slide[0, 2], expected_left.expand(height, width), atol=1e-5)
    # The 8 windows, window_batch at a time.
    assert forwards == {1: [1] * 8, 3: [3, 3, 2], 8: [8]}[window_batch]


def test_windows_run_together_give_the_scores_of_windows_run_alone():
    """Two images, five windows each: stacked 2 or 5 at a time (the last group short) the
    scores are those of one window at a time, up to float rounding."""
    torch.manual_seed(0)
    segmentor = build_segmentor(tiny_model_config(num_classes=5)).eval()
    images = torch.randn(2, 3, 64, 192)
    alone = segmentor.predict(images, mode="slide", crop_size=64, stride=32)
    for window_batch in (2, 5):
        segmentor.window_batch = window_batch
        together = segmentor.predict(images, mode="slide", crop_size=64, stride=32)
        torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_one_predict_call_makes_reins_weight_only_parts_once(monkeypatch):
    """``predict`` holds ``Rein.weights_fixed`` for the call: the folded token products of each
    layer and the queries are made once for all five windows of both images (and the flipped run),
    with the scores of making them per window; a change of the weights between calls is seen."""
    import contextlib

    from reinseg.rein import Rein
    from reinseg.segmentor import Segmentor

    torch.manual_seed(0)
    segmentor = build_segmentor(tiny_model_config(num_classes=5)).eval()
    rein = segmentor.backbone.rein
    images = torch.randn(2, 3, 64, 192)
    kept = []
    weights_fixed = Rein.weights_fixed

    @contextlib.contextmanager
    def recorded(self):
        with weights_fixed(self):
            yield
            kept.append(sorted(map(str, self._fixed or {})))

    def predict():
        return segmentor.predict(images, mode="slide", crop_size=64, stride=32, flip=True)

    monkeypatch.setattr(Rein, "weights_fixed", recorded)
    fixed = predict()
    layers = [str((layer, torch.float32, torch.device("cpu"))) for layer in range(rein.num_layers)]
    assert kept == [sorted(layers + [str(("queries", torch.float32, torch.device("cpu"), False))])]
    monkeypatch.setattr(Segmentor, "_weights_fixed", lambda self: contextlib.nullcontext())
    assert torch.equal(fixed, predict())
    with torch.no_grad():
        rein.mlp_delta_f.weight.mul_(2)
    changed = predict()
    monkeypatch.undo()
    assert torch.equal(predict(), changed) and not torch.equal(changed, fixed)


def test_a_model_whose_images_mix_runs_its_windows_alone(monkeypatch):
    segmentor = build_segmentor(tiny_model_config(num_classes=3)).eval()
    segmentor.window_batch = 4
    monkeypatch.setattr(type(segmentor), "mixes_batch", property(lambda self: True))
    forwards = []

    def stub(crop):
        forwards.append(len(crop))
        return crop.new_zeros(len(crop), 3, *crop.shape[-2:])

    monkeypatch.setattr(segmentor, "encode_decode", stub)
    segmentor.predict(torch.randn(1, 3, 64, 192), mode="slide", crop_size=64, stride=32)
    assert forwards == [1] * 5


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_window_batch_must_be_a_positive_integer(value):
    config = tiny_model_config()
    config.test.window_batch = value
    with pytest.raises(ConfigError, match="model.test"):
        build_segmentor(config)
    segmentor = build_segmentor(tiny_model_config())
    with pytest.raises(ValueError, match=f"window_batch must be a positive integer, got {value!r}"):
        segmentor.window_batch = value
    assert segmentor.window_batch == 1


def test_whole_mode_returns_scores_at_input_size():
    segmentor = build_segmentor(tiny_model_config(num_classes=7)).eval()
    images = torch.randn(2, 3, 48, 80)
    scores = segmentor.predict(images, mode="whole")
    assert scores.shape == (2, 7, 48, 80)
    # Mask2Former's semantic inference: class probabilities (no-object dropped) times mask
    # probabilities, summed over queries, with the masks upsampled to the input first.
    with torch.no_grad():
        class_logits, mask_logits = segmentor(images)
    masks = torch.nn.functional.interpolate(mask_logits[-1], size=(48, 80), mode="bilinear").sigmoid()
    probabilities = class_logits[-1].softmax(-1)[..., :7]
    expected = (probabilities[..., None, None] * masks[:, :, None]).sum(1)
    assert torch.allclose(scores, expected, atol=1e-6)


def test_flip_augmentation_is_mirror_symmetric():
    segmentor = build_segmentor(tiny_model_config()).eval()
    images = torch.randn(1, 3, 64, 64)
    scores = segmentor.predict(images, flip=True)
    mirrored = segmentor.predict(images.flip(-1), flip=True).flip(-1)
    assert torch.allclose(scores, mirrored, atol=1e-6)
    assert torch.allclose(scores.sum(1), torch.ones(1, 64, 64), atol=1e-5)  # averaged probabilities


def test_slide_crop_not_divisible_by_the_patch_size():
    segmentor = build_segmentor(tiny_model_config()).eval()
    with pytest.raises(ValueError, match="crop_size 60x60 is not divisible by the patch size 16"):
        segmentor.predict(torch.randn(1, 3, 64, 64), mode="slide", crop_size=60, stride=40)
    with pytest.raises(ValueError, match="test mode"):
        segmentor.predict(torch.randn(1, 3, 64, 64), mode="tiles")
    # Windows further apart than they are wide would leave pixels no window covers (0 / 0 scores,
    # predicted as class 0).
    with pytest.raises(ValueError, match="model.test.stride 48x48 must be at least 1 and at most the crop_size 32x32"):
        segmentor.predict(torch.randn(1, 3, 96, 96), mode="slide", crop_size=32, stride=48)
    assert segmentor.predict(torch.randn(1, 3, 96, 96), mode="slide", crop_size=32, stride=32).isfinite().all()


def test_default_slide_settings_are_the_official_ones():
    config = tiny_model_config()
    config.test.mode = "slide"
    config.backbone.img_size = 512
    with torch.device("meta"):
        segmentor = build_segmentor(config)
    assert segmentor.crop_size == (512, 512) and segmentor.stride == (341, 341)


def test_linked_queries_must_fit_the_head():
    config = tiny_model_config()
    config.head = HeadConfig(**{**config.head.__dict__, "num_queries": 12})
    with pytest.raises(ConfigError, match="model.head.num_queries=12 must equal model.rein.token_length=8"):
        build_segmentor(config)
    config = tiny_model_config()
    config.rein = ReinConfig(token_length=8, lora_dim=4, query_dims=16)
    with pytest.raises(ConfigError, match="query_dims=16 must equal model.head.feat_channels=32"):
        build_segmentor(config)


def test_without_rein_the_head_learns_its_queries():
    config = tiny_model_config()
    config.tuning = "frozen"
    segmentor = build_segmentor(config)
    assert not segmentor.head.linked_queries
    trainable = {n.split(".")[0] for n, p in segmentor.named_parameters() if p.requires_grad}
    assert trainable == {"head"}
    assert segmentor.predict(torch.randn(1, 3, 32, 32), mode="whole").shape == (1, 19, 32, 32)


def test_loss_needs_a_criterion():
    segmentor = build_segmentor(tiny_model_config())
    segmentor.criterion = None
    with pytest.raises(RuntimeError, match="criterion"):
        segmentor.loss(torch.randn(1, 3, 32, 32), torch.zeros(1, 32, 32, dtype=torch.long))


def test_loss_checks_its_labels_and_takes_png_dtypes():
    """uint8 labels (as PNGs read) failed deep in the loss; labels of another size were taken,
    even transposed ones, and trained on misaligned targets."""
    torch.manual_seed(0)
    segmentor = build_segmentor(tiny_model_config())
    images = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, 19, (2, 64, 96), generator=torch.Generator().manual_seed(1))
    labels[:, :8] = 255
    torch.manual_seed(2)
    expected = segmentor.loss(images, labels)
    torch.manual_seed(2)
    as_png = segmentor.loss(images, labels.to(torch.uint8))
    assert set(as_png) == set(expected) and all(torch.equal(as_png[k], expected[k]) for k in expected)
    # "loss" is the sum of the terms (every other key).
    torch.testing.assert_close(expected["loss"], sum(v for k, v in expected.items() if k != "loss"))
    with pytest.raises(ValueError, match=r"labels must be \(B, H, W\) = \(2, 64, 96\) for images"):
        segmentor.loss(images, labels.transpose(1, 2))
    with pytest.raises(ValueError, match="labels must hold integer class IDs, got torch.float32"):
        segmentor.loss(images, labels.float())


def test_full_fine_tuning_trains_the_backbone_too():
    config = tiny_model_config()
    config.tuning = "full"
    segmentor = build_segmentor(config).train()
    assert segmentor.backbone.rein is None
    assert all(p.requires_grad for p in segmentor.parameters())
    assert segmentor.backbone.vit.training  # not held in eval mode


def test_tuning_must_be_known_and_consistent():
    config = tiny_model_config()
    config.tuning = "prompt"
    with pytest.raises(ConfigError, match="model.tuning='prompt' is not one of"):
        build_segmentor(config)
    config = tiny_model_config()
    config.rein = None
    with pytest.raises(ConfigError, match="model.rein is null"):
        build_segmentor(config)


def test_an_image_below_the_crop_is_one_smaller_window_in_predict_as_in_eval():
    """mmseg's slide_inference runs an image smaller than the crop as one window of its own size
    (on the patch grid): the whole-image scores. predict and eval share that path."""
    from reinseg.predict import scores_at_sizes

    torch.manual_seed(0)
    segmentor = build_segmentor(tiny_model_config()).eval()
    images = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        (slide,) = scores_at_sizes(segmentor, images, [(48, 48)], mode="slide", crop_size=64, stride=32, flip=False)
        (whole,) = scores_at_sizes(segmentor, images, [(48, 48)], mode="whole", flip=False)
    torch.testing.assert_close(slide, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["whole", "slide"])
@pytest.mark.parametrize("size", [(16, 64), (64, 9), (1, 1)])
def test_images_of_one_patch_or_less_a_side_are_predicted(mode, size):
    """The head also takes the ViT's map at half its size: an image side of one patch or less
    (16 px here) is padded to two patches, and the scores of the image itself are the padded
    image's scores at its pixels (the oracle: the same padding done by hand)."""
    from reinseg.predict import padded_scores

    segmentor = build_segmentor(tiny_model_config()).eval()
    segmentor.crop_size, segmentor.stride = (64, 64), (32, 32)
    images = torch.randn(1, 3, *size)
    with torch.no_grad():
        scores = padded_scores(segmentor, images, mode=mode)
        h, w = size
        by_hand = torch.nn.functional.pad(images, (0, max(32, -(-w // 16) * 16) - w, 0, max(32, -(-h // 16) * 16) - h))
        expected = segmentor.predict(by_hand, mode=mode)[..., :h, :w]
    assert scores.shape == (1, 19, *size)
    torch.testing.assert_close(scores, expected, rtol=0, atol=0)


def test_test_windows_and_training_crops_of_one_patch_are_refused():
    from reinseg.config import Config, DataConfig
    from reinseg.engine import check_run_options

    segmentor = build_segmentor(tiny_model_config()).eval()
    with pytest.raises(ValueError, match="crop_size 16x64 must be at least two patches \\(32\\) a side"):
        segmentor.predict(torch.randn(1, 3, 64, 64), mode="slide", crop_size=(16, 64), stride=16)
    with pytest.raises(ValueError, match="data.crop_size=16 must be at least two patches \\(32\\)"):
        check_run_options(Config(model=tiny_model_config(), data=DataConfig(crop_size=16)), segmentor)
    model = tiny_model_config()
    model.test.mode, model.test.crop_size, model.test.stride = "slide", [16, 16], [16, 16]
    with pytest.raises(ValueError, match="crop_size 16x16 must be at least two patches"):
        check_run_options(Config(model=model, data=DataConfig(crop_size=64)), build_segmentor(model))


@pytest.mark.parametrize("values_from_the_host", [False, True])
def test_a_train_step_waits_for_the_device_once_for_every_matching_and_for_segments_it_is_not_given(
    monkeypatch, values_from_the_host
):
    """On a GPU every operation whose result the host must read (``.item()``, a boolean index,
    ``unique``, a copy to the host) makes the host wait for the device. A train step (forward,
    loss, backward) on the GPU's code paths does so only where the loss needs the host: once for
    scipy's assignments of every prediction (``HungarianMatcher.solve``: all costs read at once;
    it was once per prediction, ten a step at the paper's nine decoder layers), and, unless the
    labels' values come from the host (``label_values``, as the training loader gives them),
    once for the batch's segments (``Segments.of_images``: the classes found and read; a wait
    for the whole forward, after which the device idled while the host queued the matching's
    684 operations at the paper config then, 355 since they are computed for several
    predictions a pass). Counted on the CPU, operation by operation. Copies from the host to a
    device do not show on the CPU (``benchmarks/strategies.py train`` counts on a GPU the
    operations CUDA's sync debug mode flags); from pageable memory they would wait too, so the
    loss's two (the classes, the matched indices) are checked to go through ``host_to_device``."""
    from reinseg.data import label_values
    from reinseg.heads.criterion import HungarianMatcher, Segments

    torch.manual_seed(0)
    segmentor = build_segmentor(tiny_model_config()).train()  # built first: initialising reads values
    images = torch.randn(2, 3, 64, 64)
    labels = torch.randint(0, 19, (2, 64, 64), generator=torch.Generator().manual_seed(1))
    labels[:, :8] = 255
    region: list[str | None] = [None]
    calls = {"of_images": 0, "solve": 0}
    host = HostWaits(monkeypatch, where=lambda: region[0])  # (the allowed call it came in, or None; the operation)

    def allowed(name, function):
        def run(*args, **kwargs):
            calls[name] += 1
            region[0] = f"{name} {calls[name]}"
            try:
                return function(*args, **kwargs)
            finally:
                region[0] = None

        return run

    monkeypatch.setattr(Segments, "of_images", classmethod(allowed("of_images", Segments.of_images.__func__)))
    monkeypatch.setattr(HungarianMatcher, "solve", staticmethod(allowed("solve", HungarianMatcher.solve)))
    take_gpu_code_paths(monkeypatch)
    sent = copies_to_device(monkeypatch)  # what the host sends to the device in the step

    values = [label_values(label) for label in labels] if values_from_the_host else None
    with host:
        losses = segmentor.loss(images, labels, label_values=values)
        losses["loss"].backward()
    assert calls == {"of_images": 1, "solve": 1}
    segments = [("of_images 1", "aten._unique2.default"), ("of_images 1", "Tensor.tolist")]  # one unique, read
    assert host.waits == [
        *([] if values_from_the_host else segments),
        ("solve 1", "Tensor.cpu"),  # every prediction's and image's costs to the host in one copy
        ("solve 1", "Tensor.numpy"),
    ]
    # From pinned memory, without a wait: the batch's classes (each image's and padded, one copy)
    # and every prediction's matched (rows, images, segments), one copy after the one read.
    (classes, indices) = sent
    assert classes[0] == indices[0] == torch.int64 and len(classes[1]) == 1 and indices[1][0] == 3
    queries, predictions = segmentor.head.num_queries, 4  # the tiny head: 3 decoder layers
    pairs = sum(min(queries, len(set(label[label != 255].tolist()))) for label in labels)
    assert indices[1][1] == predictions * pairs
    with torch.no_grad():  # the same losses either way
        torch.manual_seed(3)
        read_back = segmentor.loss(images, labels)
        torch.manual_seed(3)
        given = segmentor.loss(images, labels, label_values=values)
    assert read_back.keys() == given.keys() and all(torch.equal(read_back[k], given[k]) for k in read_back)


def test_an_evaluated_image_makes_the_host_wait_for_nothing_on_the_gpus_code_paths(monkeypatch):
    """Sliding windows with flip, the scores at the label's size, the argmax and the confusion
    matrix's update queue every operation: on a GPU the host reads nothing back per image and
    can prepare the next one while the device works (the update read its check, two boolean
    indexes and bincount's size: five waits per image). Counted on the CPU as in the train step's test."""
    import reinseg.metrics as metrics
    from reinseg.metrics import ConfusionMatrix
    from reinseg.predict import scores_at_sizes

    torch.manual_seed(0)
    segmentor = build_segmentor(tiny_model_config()).eval()
    segmentor.test_mode, segmentor.crop_size, segmentor.stride = "slide", (32, 32), (21, 21)
    take_gpu_code_paths(monkeypatch)
    monkeypatch.setattr(metrics, "_checks_each_update", lambda device: False)
    images, labels = torch.randn(2, 3, 48, 80), torch.randint(0, 19, (2, 50, 78))
    confusion = ConfusionMatrix(19)
    host = HostWaits(monkeypatch)
    with torch.no_grad(), host:
        for score, label in zip(scores_at_sizes(segmentor, images, [(50, 78)] * 2, flip=True), labels, strict=True):
            confusion.update(score.argmax(0), label)
    assert host.waits == []
    assert confusion.scores()["pixels"] == 2 * 50 * 78
