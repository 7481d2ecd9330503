"""Write tests/data/official_cnn_segmentor_tiny.pt: the official segmentor with a Rein CNN backbone.

Run in the official environment (mmseg 1.2, mmdet 3.3, mmpretrain; see tests/data/README.md)
with the official repository on the path:

    OMP_NUM_THREADS=1 /work/official-venv/bin/python tests/golden/make_reins_cnn_segmentor.py /work/official

For each of the shared CNN goldens (tests/data/reins_resnet_tiny.pt, reins_convnext_tiny.pt) the
official ``EncoderDecoder`` is built from the model dict of tests/data/official_segmentor_tiny.pt
with that golden's backbone (``ReinsResNetV1c`` / ``ReinsConvNeXt``) and weights, the head's
``in_channels`` set to the stages' channels and ``num_queries`` to the Rein token length. The head's
weights are initialised and perturbed (``randn * 0.1``) after ``torch.manual_seed(0)`` so that
nothing is trivial. Saved per kind:
``model_config``, ``release_state_dict`` (``backbone.reins.*`` and ``decode_head.*``, what released
checkpoints hold; the CNN weights are the golden's ``backbone_state_dict``), the inputs, the head's
per-layer outputs on ``crop_input`` and the whole-image and sliding-window logits, and both on
``offgrid_input`` (52x84: off the stride-32 grid, below the crop in height).
"""

import copy
from pathlib import Path

import torch
from official_env import MODELS  # the official code, importable on CPU

DATA = Path(__file__).resolve().parents[1] / "data"


def make(kind_file):
    cnn = torch.load(DATA / kind_file, weights_only=True)
    base = torch.load(DATA / "official_segmentor_tiny.pt", weights_only=False)
    model_config = copy.deepcopy(base["model_config"])
    model_config["backbone"] = copy.deepcopy(cnn["backbone_config"])
    model_config["decode_head"]["in_channels"] = [f.shape[1] for f in cnn["features"]]
    model_config["decode_head"]["num_queries"] = cnn["reins_config"]["token_length"]
    from mmengine.config import ConfigDict

    torch.manual_seed(0)
    model = MODELS.build(ConfigDict(copy.deepcopy(model_config)))
    model.init_weights()
    with torch.no_grad():
        for _name, param in model.decode_head.named_parameters():
            param.add_(torch.randn_like(param) * 0.1)
    missing, unexpected = model.backbone.load_state_dict(
        {**cnn["backbone_state_dict"], **cnn["reins_state_dict"]}, strict=False
    )
    assert not missing and not unexpected, (missing, unexpected)
    model.eval()

    crop_input = base["crop_input"]
    slide_input = base["slide_input"]
    # No pad_shape: mmseg's Mask2Former head would resize every sliding window's logits to it.
    meta = dict(img_shape=tuple(crop_input.shape[-2:]), ori_shape=tuple(crop_input.shape[-2:]))
    slide_meta = dict(img_shape=tuple(slide_input.shape[-2:]), ori_shape=tuple(slide_input.shape[-2:]))
    with torch.no_grad():
        features = model.extract_feat(crop_input)
        from mmseg.structures import SegDataSample

        samples = []
        for _ in range(crop_input.shape[0]):
            sample = SegDataSample()
            sample.set_metainfo(meta)
            samples.append(sample)
        class_logits, mask_logits = model.decode_head(features, samples)
        crop_seg_logits = model.encode_decode(crop_input, [meta] * crop_input.shape[0])
        slide_seg_logits = model.slide_inference(slide_input, [slide_meta] * slide_input.shape[0])
        # An image off the stride-32 grid, below the crop in height: mmseg pads nothing (one smaller
        # window in slide mode).
        offgrid_input = torch.randn(1, 3, 52, 84, generator=torch.Generator().manual_seed(1))
        offgrid_meta = dict(img_shape=(52, 84), ori_shape=(52, 84))
        offgrid_whole_seg_logits = model.encode_decode(offgrid_input, [offgrid_meta])
        offgrid_slide_seg_logits = model.slide_inference(offgrid_input, [offgrid_meta])

    # What a released checkpoint holds: the Reins and the head (the frozen CNN is not saved).
    release = {f"backbone.{k}": v for k, v in cnn["reins_state_dict"].items()}
    release.update({f"decode_head.{k}": v for k, v in model.decode_head.state_dict().items()})
    return dict(
        kind=cnn["kind"],
        model_config=model_config,
        release_state_dict=release,
        crop_input=crop_input.clone(),
        crop_class_logits_per_layer=[t.clone() for t in class_logits],
        crop_mask_logits_per_layer=[t.clone() for t in mask_logits],
        crop_seg_logits=crop_seg_logits,
        slide_input=slide_input.clone(),
        slide_crop=tuple(model_config["test_cfg"]["crop_size"]),
        slide_stride=tuple(model_config["test_cfg"]["stride"]),
        slide_seg_logits=slide_seg_logits,
        offgrid_input=offgrid_input,
        offgrid_whole_seg_logits=offgrid_whole_seg_logits,
        offgrid_slide_seg_logits=offgrid_slide_seg_logits,
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = {"resnet": make("reins_resnet_tiny.pt"), "convnext": make("reins_convnext_tiny.pt")}
    torch.save(out, DATA / "official_cnn_segmentor_tiny.pt")
    print("wrote", DATA / "official_cnn_segmentor_tiny.pt")
