import pytest
import torch

from conftest import tiny_model_config
from reinseg.config import ConfigError, HeadConfig, ReinConfig
from reinseg.build import build_segmentor
from reinseg.segmentor import sliding_windows


def test_sliding_windows_follow_mmseg():
    # mmseg: grids = ceil((size - crop) / stride) + 1, the last window shifted back inside.
    windows = sliding_windows(64, 128, (64, 64), (42, 42))
    assert windows == [(0, 64, 0, 64), (0, 64, 42, 106), (0, 64, 64, 128)]
    windows = sliding_windows(512, 1024, (512, 512), (341, 341))
    assert [w[2:] for w in windows] == [(0, 512), (341, 853), (512, 1024)]
    assert sliding_windows(40, 40, (64, 64), (42, 42)) == [(0, 40, 0, 40)]  # smaller than the crop


def test_every_pixel_is_covered_and_overlaps_are_averaged():
    segmentor = build_segmentor(tiny_model_config()).eval()
    images = torch.randn(1, 3, 64, 160)
    slide = segmentor.predict(images, mode="slide", crop_size=64, stride=48)
    windows = sliding_windows(64, 160, (64, 64), (48, 48))
    expected = torch.zeros_like(slide)
    counts = torch.zeros(1, 1, 64, 160)
    for y1, y2, x1, x2 in windows:
        expected[..., y1:y2, x1:x2] += segmentor.predict(images[..., y1:y2, x1:x2], mode="whole")
        counts[..., y1:y2, x1:x2] += 1
    assert counts.min() >= 1
    assert torch.allclose(slide, expected / counts, atol=1e-6)


def test_whole_mode_returns_scores_at_input_size():
    segmentor = build_segmentor(tiny_model_config(num_classes=7)).eval()
    scores = segmentor.predict(torch.randn(2, 3, 48, 80), mode="whole")
    assert scores.shape == (2, 7, 48, 80)
    assert (scores >= 0).all()


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
