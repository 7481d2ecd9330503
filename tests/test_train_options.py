"""The training levers (reinseg.train_options): activation checkpointing, the deformable
attention's recompute, the frozen VFM in bf16, channels-last
convolutions, torch.compile.

Oracle: the same model and step without the lever (fp32, eager). Recomputing in backward must give
the very same gradients; bf16 must stay within bf16's rounding of the fp32 result.
"""

import io

import pytest
import torch
from conftest import tiny_model_config
from test_cnn import tiny_cnn_config
from test_tuning import tiny_config, with_trained_layer_scale

from reinseg.build import build_segmentor
from reinseg.config import Config, ConfigError, TrainConfig, check_values, from_dict
from reinseg.engine import SegmentationTask
from reinseg.heads.deformable_attention import MultiScaleDeformableAttention
from reinseg.heads.pixel_decoder import PixelDecoder
from reinseg.train_options import apply_train_options


def built(tuning="rein", name="dinov2_vits14", **train):
    """The tiny segmentor (seed 0, layer scales 1 so every block counts) with ``train`` levers."""
    torch.manual_seed(0)
    model = tiny_config(name, tuning)  # every strategy's options sized to the tiny model
    segmentor = build_segmentor(model, load_backbone_weights=False).train()
    with_trained_layer_scale(segmentor)
    config = Config(model=model, train=TrainConfig(**train))
    check_values(config)
    return apply_train_options(segmentor, config)


def step(segmentor):
    """Loss and the gradient of every trainable parameter after one step on a fixed batch."""
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    labels = torch.randint(0, 19, (2, 64, 64), generator=generator)
    torch.manual_seed(2)  # the loss's point sampling
    loss = segmentor.loss(images, labels)["loss"]
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in segmentor.named_parameters() if p.requires_grad}


def saved_for_backward_bytes(segmentor) -> int:
    """Bytes of the tensors the step's graph keeps for backward (distinct storages, parameters
    excluded): the activation memory that peaks at the end of the forward pass."""
    params = {p.untyped_storage().data_ptr() for p in segmentor.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(segmentor)
    return sum(storages.values())


def assert_same_gradients(reference, other, atol=1e-6):
    assert reference.keys() == other.keys()
    for name, grad in reference.items():
        assert other[name] is not None, name
        torch.testing.assert_close(other[name], grad, rtol=0, atol=atol, msg=name)


def through_a_fixed_function(segmentor, images):
    """The segmentor's outputs and the gradients of a fixed random linear function of them. The
    loss's importance sampling picks points by rank, which float rounding may change: a lever
    that sums in another order is compared through this instead."""
    logits, masks = segmentor(images)
    outputs = [*logits, *masks]
    generator = torch.Generator().manual_seed(4)
    sum((o * torch.randn(o.shape, generator=generator)).sum() for o in outputs).backward()
    return outputs, {n: p.grad for n, p in segmentor.named_parameters() if p.requires_grad}


def assert_equal_up_to_rounding(reference, other):
    """``through_a_fixed_function``'s results of two segmentors: equal up to float32 rounding."""
    (outputs, grads), (outputs_other, grads_other) = reference, other
    for o, c in zip(outputs, outputs_other, strict=True):
        torch.testing.assert_close(c, o, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_other.keys()
    for name, grad in grads.items():  # sums in another order: relative to the gradient's size
        torch.testing.assert_close(grads_other[name], grad, rtol=1e-4, atol=1e-5 * grad.abs().max().item(), msg=name)


@pytest.mark.parametrize(
    ("tuning", "blocks"),
    # In the fast tier: every strategy checkpointing all blocks, and Rein with each form of the block list.
    [
        pytest.param(tuning, blocks, marks=pytest.mark.slow if tuning != "rein" and blocks is not True else ())
        for blocks in (True, 2, [1, 3])
        for tuning in ("rein", "vpt", "soma", "fada", "set")
    ],
)
def test_activation_checkpointing_gives_the_same_gradients(tuning, blocks):
    loss, grads = step(built(tuning))
    loss_ckpt, grads_ckpt = step(built(tuning, activation_checkpointing=blocks))
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert_same_gradients(grads, grads_ckpt)
    if tuning == "rein":  # every Rein layer and its tokens still learn
        rein = {n: g for n, g in grads_ckpt.items() if n.startswith("backbone.rein.")}
        assert len(rein) == len(list(built().backbone.rein.parameters()))
        assert all(g.abs().sum() > 0 for g in rein.values())


def test_activation_checkpointing_keeps_less_for_backward():
    full = saved_for_backward_bytes(built())
    half = saved_for_backward_bytes(built(activation_checkpointing=2))
    every = saved_for_backward_bytes(built(activation_checkpointing=True))
    assert every < half < full


def test_deformable_recompute_is_an_option_with_the_same_gradients():
    segmentor = built(deformable_recompute=False)
    attention = [m for m in segmentor.modules() if isinstance(m, MultiScaleDeformableAttention)]
    assert attention and not any(m.recompute for m in attention)
    assert all(m.recompute for m in built().modules() if isinstance(m, MultiScaleDeformableAttention))
    loss, grads = step(built())
    loss_kept, grads_kept = step(segmentor)
    torch.testing.assert_close(loss_kept, loss, rtol=0, atol=1e-6)
    assert_same_gradients(grads, grads_kept)
    assert saved_for_backward_bytes(built()) < saved_for_backward_bytes(built(deformable_recompute=False))


@pytest.mark.slow  # a lever's option, 0.7 s: the fast tier keeps the ViT's checkpointing
def test_pixel_decoder_checkpointing_gives_the_same_gradients_and_keeps_less():
    segmentor = built(pixel_decoder_checkpointing=True)
    decoders = [m for m in segmentor.modules() if isinstance(m, PixelDecoder)]
    assert decoders and all(d.checkpointing for d in decoders)
    assert not any(d.checkpointing for d in built().modules() if isinstance(d, PixelDecoder))
    # The layers' own recompute would sample a third time: it is off inside recomputed layers.
    assert not any(m.recompute for m in segmentor.modules() if isinstance(m, MultiScaleDeformableAttention))
    loss, grads = step(built())
    loss_ckpt, grads_ckpt = step(segmentor)
    torch.testing.assert_close(loss_ckpt, loss, rtol=0, atol=1e-6)
    assert_same_gradients(grads, grads_ckpt)
    kept = saved_for_backward_bytes(built())
    assert saved_for_backward_bytes(built(pixel_decoder_checkpointing=True)) < kept
    both = saved_for_backward_bytes(built(pixel_decoder_checkpointing=True, activation_checkpointing=True))
    assert both < saved_for_backward_bytes(built(activation_checkpointing=True))


def test_encoder_ffn_recompute_gives_the_same_gradients_and_keeps_less():
    segmentor = built()  # on by default
    ffns = [layer.ffn for d in segmentor.modules() if isinstance(d, PixelDecoder) for layer in d.encoder.layers]
    assert ffns and all(f.recompute_hidden for f in ffns)
    kept = built(encoder_ffn_recompute=False)
    assert not any(getattr(m, "recompute_hidden", False) for m in kept.modules())
    # Inside recomputed encoder layers it would buy nothing.
    both = built(pixel_decoder_checkpointing=True)
    assert not any(getattr(m, "recompute_hidden", False) for m in both.modules())
    loss, grads = step(kept)
    loss_recomputed, grads_recomputed = step(segmentor)
    torch.testing.assert_close(loss_recomputed, loss, rtol=0, atol=1e-6)
    assert_same_gradients(grads, grads_recomputed)
    # Each FFN keeps its input instead of its hidden activations (4x wider here).
    hidden = sum(f.layers[0][0].out_features for f in ffns) * 2 * sum(h * w for h, w in [(2, 2), (4, 4), (8, 8)]) * 4
    assert saved_for_backward_bytes(built(encoder_ffn_recompute=False)) - saved_for_backward_bytes(segmentor) == hidden


@pytest.mark.parametrize("chunk_rows", [1024, 3])
def test_encoder_ffn_recompute_gradients_equal_float64_autograd(chunk_rows):
    """The recomputing FFN's own forward and backward (fp32, in chunks of rows: one chunk, or
    four of 3, 3, 3 and 1 rows) against autograd's through the plain FFN in float64: the output,
    the input's and every weight's gradient."""
    from reinseg.heads.pixel_decoder import FFN

    torch.manual_seed(0)
    ffn = FFN(8, 32).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 5, 8, dtype=torch.float64)
    out = ffn(x)
    expected = torch.autograd.grad(out, (x, *ffn.parameters()), grad)
    x32 = x.detach().float().requires_grad_()
    ffn32 = FFN(8, 32)
    ffn32.load_state_dict(ffn.state_dict())
    ffn32.recompute_hidden = True
    ffn32.chunk_rows = chunk_rows
    out32 = ffn32(x32)
    torch.testing.assert_close(out32.double(), out.detach(), rtol=1e-6, atol=1e-6)
    got32 = torch.autograd.grad(out32, (x32, *ffn32.parameters()), grad.float())
    for ours, theirs in zip(got32, expected, strict=True):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "tuning, name",
    [
        ("rein", "dinov2_vits14"),
        ("rein", "eva02_vitl14"),
        ("rein", "sam_vitb16"),
        ("vpt", "dinov2_vits14"),
        # In the full suite only: frozen (no module), LoRA and AdaptFormer (adapters: peft's, reinseg's), FADA
        # and SET (Rein's kind).
        pytest.param("lora", "dinov2_vits14", marks=pytest.mark.slow),
        pytest.param("frozen", "dinov2_vits14", marks=pytest.mark.slow),
        pytest.param("adaptformer", "dinov2_vits14", marks=pytest.mark.slow),
        pytest.param("fada", "dinov2_vits14", marks=pytest.mark.slow),
        pytest.param("set", "dinov2_vits14", marks=pytest.mark.slow),
    ],
)
def test_frozen_vfm_in_bf16(tuning, name):
    reference = built(tuning, name)
    segmentor = built(tuning, name, frozen_dtype="bfloat16", activation_checkpointing=True)
    frozen = [p for p in segmentor.backbone.vit.parameters() if not p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    trainable = [p for p in segmentor.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)  # the fp32 masters
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = reference.backbone(images).features, segmentor.backbone(images).features
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == torch.float32
        # bf16 keeps 8 significant bits: about 0.4 % per rounding, a few % after the blocks.
        assert (g - e).norm() / e.norm() < 0.05
    loss, grads = step(segmentor)
    _, expected_grads = step(reference)
    assert torch.isfinite(loss)
    for n, g in grads.items():
        assert g is not None and g.dtype == torch.float32 and torch.isfinite(g).all(), n
        if not n.startswith("backbone."):
            continue
        # The strategy's own parameters learn in the fp32 direction (LoRA's A has no gradient
        # while B is still zero, in both).
        if expected_grads[n].abs().sum() == 0:
            assert g.abs().sum() == 0, n
        else:
            assert torch.nn.functional.cosine_similarity(g.flatten(), expected_grads[n].flatten(), dim=0) > 0.9, n


@pytest.mark.parametrize("name", ["dinov3_vits16", "eva02_vitl14"])
def test_frozen_vfm_in_bf16_keeps_the_rotary_frequencies_in_fp32(name):
    """The rotary tables are computed, not learned: in bf16 DINOv3's sines and cosines were off by
    up to 0.015 at a 32 x 32 grid. The frozen weights go to bf16, the angles stay timm's fp32."""
    reference, segmentor = built("rein", name), built("rein", name, frozen_dtype="bfloat16")
    assert {p.dtype for p in segmentor.backbone.vit.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for b in segmentor.backbone.vit.rope.buffers())
    expected = reference.backbone.vit.rope.get_embed((32, 32))
    assert torch.equal(segmentor.backbone.vit.rope.get_embed((32, 32)), expected)
    # ... and the blocks receive them in fp32 (timm casts the rotated queries and keys itself).
    family, received = segmentor.backbone.family, []
    run_block = family.run_block

    def recording(block, x, block_kwargs):
        received.extend(v.dtype for v in block_kwargs.values() if torch.is_tensor(v) and v.is_floating_point())
        return run_block(block, x, block_kwargs)

    family.run_block = recording
    try:
        with torch.no_grad():
            segmentor.backbone(torch.randn(1, 3, 64, 64))
    finally:
        del family.run_block
    assert received and set(received) == {torch.float32}


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_channels_last_holds_the_convolutions_nhwc_with_the_same_results(kind):
    def make(**train):
        torch.manual_seed(0)
        model = tiny_config("dinov2_vits14", "rein") if kind == "vit" else tiny_cnn_config()
        segmentor = build_segmentor(model, load_backbone_weights=False).train()
        return apply_train_options(segmentor, check_values(Config(model=model, train=TrainConfig(**train))))

    reference, nhwc = make(), make(channels_last=True)
    convs = [m for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not any(m.weight.is_contiguous() for m in convs)
    layouts = []
    for conv in convs:  # NCHW images in, NHWC maps out of every convolution
        conv.register_forward_hook(lambda m, i, o: layouts.append(o.is_contiguous(memory_format=torch.channels_last)))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = through_a_fixed_function(reference, images)
    got = through_a_fixed_function(nhwc, images)
    assert layouts and all(layouts)
    assert_equal_up_to_rounding(expected, got)


def test_channels_last_leaves_other_4d_tensors_as_they_are():
    """SAM's position embedding is ``(1, H, W, C)``: its last axis already holds the channels, and
    channels-last would reorder its memory for nothing. Only convolution weights change."""
    model = tiny_config("sam_vitb16", "rein")
    segmentor = build_segmentor(model, load_backbone_weights=False)
    convs = {id(m.weight) for m in segmentor.modules() if isinstance(m, torch.nn.Conv2d)}
    others = {n: t for n, t in [*segmentor.named_parameters(), *segmentor.named_buffers()] if t.ndim == 4}
    others = {n: t for n, t in others.items() if id(t) not in convs}
    assert "backbone.vit.pos_embed" in others
    apply_train_options(segmentor, check_values(Config(model=model, train=TrainConfig(channels_last=True))))
    kept = dict([*segmentor.named_parameters(), *segmentor.named_buffers()])
    for name in others:
        assert kept[name].is_contiguous(), name
    assert segmentor.backbone.vit.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("resumed_nhwc", [True, False])
def test_a_resume_across_channels_last_updates_as_the_run_would(resumed_nhwc):
    """Fused AdamW pairs elements by memory position: moments saved in one layout must be loaded
    in the other parameters' layout, or the update mixes elements."""
    from reinseg.optim import build_optimizer

    saved, resumed = built(channels_last=not resumed_nhwc), built(channels_last=resumed_nhwc)
    config = Config(model=tiny_config("dinov2_vits14", "rein"), train=TrainConfig())
    optimizer = build_optimizer(saved, config)[0]
    assert optimizer.defaults["fused"]
    step(saved)
    optimizer.step()
    resumed.load_state_dict(saved.state_dict())
    resumed_optimizer = build_optimizer(resumed, config)[0]
    checkpoint = io.BytesIO()  # as a checkpoint file keeps them: the moments' strides, no shared storage
    torch.save(optimizer.state_dict(), checkpoint)
    checkpoint.seek(0)
    resumed_optimizer.load_state_dict(torch.load(checkpoint))
    after = []
    for segmentor, opt in ((saved, optimizer), (resumed, resumed_optimizer)):
        generator = torch.Generator().manual_seed(3)
        for p in segmentor.parameters():
            if p.requires_grad:
                p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=generator))
        opt.step()
        after.append({n: p.detach() for n, p in segmentor.named_parameters() if p.requires_grad})
    nhwc = [n for n, p in resumed.named_parameters() if p.dim() == 4 and p.requires_grad and p.shape[-1] > 1]
    assert nhwc  # the pixel decoder's 3x3 convolutions train
    # lr 1e-4: moments of other elements would move a weight by about 1e-4.
    for name, weight in after[0].items():
        torch.testing.assert_close(after[1][name], weight, rtol=1e-6, atol=1e-7, msg=name)


def test_levers_refuse_what_they_cannot_do():
    with pytest.raises(ConfigError, match="train.frozen_dtype=bfloat16 .* model.tuning=full trains it"):
        built("full", frozen_dtype="bfloat16")
    with pytest.raises(ConfigError, match="train.frozen_dtype=bfloat16 .* model.tuning=soma trains parameters inside"):
        built("soma", frozen_dtype="bfloat16")
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing=9 is more than the VFM's 4 blocks"):
        built(activation_checkpointing=9)
    with pytest.raises(ConfigError, match=r"train.activation_checkpointing: blocks \[4\] are not in \[0, 4\)"):
        built(activation_checkpointing=[0, 4])
    cnn = build_segmentor(tiny_cnn_config(), load_backbone_weights=False)
    for lever, message in [
        (dict(frozen_dtype="bfloat16"), "train.frozen_dtype=bfloat16 applies to ViT backbones"),
        (dict(activation_checkpointing=True), "train.activation_checkpointing applies to ViT backbones"),
    ]:
        with pytest.raises(ConfigError, match=message):
            apply_train_options(cnn, Config(model=tiny_cnn_config(), train=TrainConfig(**lever)))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("activation_checkpointing", -1, "train.activation_checkpointing must be at least 0"),
        ("activation_checkpointing", [0, -2], "train.activation_checkpointing must be at least 0"),
        ("activation_checkpointing", "all", "train.activation_checkpointing: 'all' fits none of"),
        ("frozen_dtype", "float16", "train.frozen_dtype must be one of float32, bfloat16, got 'float16'"),
        ("deformable_recompute", "yes", "train.deformable_recompute must be true or false"),
        ("channels_last", 1, "train.channels_last must be true or false"),
        ("compile", "fastest", "train.compile must be true, false or a torch.compile backend"),
        ("tf32", "bogus", "train.tf32 must be one of conv, all, none, got 'bogus'"),
    ],
)
def test_lever_keys_are_checked(key, value, message):
    with pytest.raises(ConfigError, match=message):
        check_values(from_dict(Config, {"train": {key: value}}))


def test_the_training_task_applies_the_levers():
    config = Config(model=tiny_model_config(), train=TrainConfig(frozen_dtype="bfloat16", activation_checkpointing=3))
    backbone = SegmentationTask(config).segmentor.backbone
    assert backbone.checkpoint_blocks == {0, 1, 2}
    assert backbone.vit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16


@pytest.mark.slow  # dynamo traces backbone and head three times: about half a minute
def test_compile_has_no_graph_break_and_trains_the_same():
    segmentor = built(activation_checkpointing=True)
    images = torch.randn(2, 3, 64, 64)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(segmentor.backbone)(images)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    features, queries = segmentor.backbone(images)
    explained = torch._dynamo.explain(segmentor.head)(features, queries)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    expected = through_a_fixed_function(built(), images)
    assert_equal_up_to_rounding(expected, through_a_fixed_function(built(compile="aot_eager"), images))


def test_a_run_with_the_levers_trains_and_validates(tmp_path):
    from test_engine import tiny_config

    from reinseg.engine import train

    levers = dict(frozen_dtype="bfloat16", activation_checkpointing=True, channels_last=True)
    config = tiny_config(tmp_path, max_iters=2, val_interval=2, **levers)
    task = train(config, resume="never")
    assert task.trainer.global_step == 2 and task.last_results["mean_mIoU"] is not None
    assert all(p.dtype == torch.float32 for p in task.segmentor.parameters() if p.requires_grad)
    assert task.segmentor.backbone.vit.patch_embed.proj.weight.is_contiguous(memory_format=torch.channels_last)
