import functools

import pytest
import torch
from conftest import copies_to_device, tiny_model_config

from reinseg.build import build_segmentor
from reinseg.heads.criterion import HungarianMatcher, Mask2FormerLoss, Segments, point_sample, semantic_to_masks


def test_semantic_labels_become_one_mask_per_present_class():
    label = torch.tensor([[0, 0, 255], [7, 7, 3]])
    classes, masks = semantic_to_masks(label)
    assert classes.tolist() == [0, 3, 7]
    assert masks.shape == (3, 2, 3)
    assert masks[0].tolist() == [[True, True, False], [False, False, False]]
    assert not masks[:, 0, 2].any()  # the ignored pixel belongs to no class


@pytest.mark.parametrize("size", [(512, 512), (37, 53), (8, 5)])
def test_segments_sample_their_label_map_as_grid_sample_samples_the_masks(size):
    """Bit for bit point_sample of semantic_to_masks' float masks: at random points, on pixel
    edges and centres, and on the border (zero padding); every segment at shared points (the
    matching) and each at its own (the loss)."""
    height, width = size
    generator = torch.Generator().manual_seed(height)
    label = torch.randint(0, 6, size, generator=generator)
    label[label == 5] = 255  # ignored: no segment's
    classes, masks = semantic_to_masks(label)
    segments = Segments.of(label)
    assert torch.equal(segments.classes, classes) and len(segments) == len(classes)
    coords = torch.rand(3000, 2, generator=generator)
    halves = torch.tensor([2 * width, 2 * height])
    steps = torch.rand(1000, 2, generator=generator) * (halves + 1)
    coords[:1000] = steps.floor() / halves  # on pixel edges and centres
    coords[1000:1004] = torch.tensor([[0.0, 0.0], [1 - 2**-24, 0.5], [0.5, 1 - 2**-24], [0.0, 1 - 2**-24]])
    expected = point_sample(masks.unsqueeze(0).float(), coords.unsqueeze(0))[0]
    assert torch.equal(segments.sample(coords), expected)
    assert 0 < expected.mean() < 1
    order = torch.randperm(len(classes), generator=generator)
    own = torch.rand(len(classes), 500, 2, generator=generator)
    expected = point_sample(masks.float()[order].unsqueeze(1), own)[:, 0]
    assert torch.equal(segments.sample_each(order, own), expected)


def test_matcher_recovers_a_known_assignment():
    torch.manual_seed(0)
    h = w = 16
    gt_masks = torch.zeros(3, h, w, dtype=torch.bool)
    gt_masks[0, :8, :8] = True
    gt_masks[1, 8:, :] = True
    gt_masks[2, :8, 8:] = True
    gt_classes = torch.tensor([4, 11, 0])
    # Query q predicts gt expected[q] (mask and class); the others predict nothing in particular.
    expected = {3: 0, 0: 2, 5: 1}
    class_logits = torch.zeros(6, 20)
    mask_logits = torch.full((6, h, w), -8.0)
    for q, g in expected.items():
        class_logits[q, gt_classes[g]] = 8.0
        mask_logits[q][gt_masks[g]] = 8.0
    queries, gts = HungarianMatcher(num_points=1024)(class_logits, mask_logits, gt_classes, gt_masks)
    assert dict(zip(queries.tolist(), gts.tolist(), strict=False)) == expected


def mmdet_matching_cost(matcher, class_logits, mask_logits, gt_classes, gt_masks, coords):
    """mmdet's ClassificationCost + CrossEntropyLossCost(use_sigmoid) + DiceCost(naive), written
    with the BCE calls mmdet makes, on the given points."""
    grid = 2 * coords.unsqueeze(2) - 1
    sample = functools.partial(torch.nn.functional.grid_sample, grid=grid, align_corners=False)
    pred = sample(mask_logits.unsqueeze(1), grid=grid.expand(len(mask_logits), -1, -1, -1))
    target = sample(gt_masks.unsqueeze(1).float(), grid=grid.expand(len(gt_masks), -1, -1, -1))
    pred, target = pred[:, 0, :, 0], target[:, 0, :, 0]
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    pos = bce(pred, torch.ones_like(pred), reduction="none")
    neg = bce(pred, torch.zeros_like(pred), reduction="none")
    cost_mask = (pos @ target.t() + neg @ (1 - target).t()) / pred.shape[1]
    prob = pred.sigmoid()
    cost_dice = 1 - (2 * prob @ target.t() + 1) / (prob.sum(-1)[:, None] + target.sum(-1)[None, :] + 1)
    cost_class = -class_logits.softmax(-1)[:, gt_classes]
    return matcher.class_weight * cost_class + matcher.mask_weight * cost_mask + matcher.dice_weight * cost_dice


def test_matching_cost_is_bit_for_bit_mmdets():
    generator = torch.Generator().manual_seed(0)
    class_logits = torch.randn(7, 20, generator=generator)
    # Logits from 0 to beyond float32's exp range, where log-sigmoid saturates.
    mask_logits = torch.randn(7, 24, 24, generator=generator) * torch.logspace(-3, 2.3, 7).view(7, 1, 1)
    gt_classes = torch.tensor([3, 0, 11])
    gt_masks = torch.rand(3, 24, 24, generator=generator) > 0.6
    matcher = HungarianMatcher(num_points=300)
    torch.manual_seed(1)
    cost = matcher.cost(class_logits, mask_logits, gt_classes, gt_masks)
    torch.manual_seed(1)
    coords = torch.rand(1, 300, 2)
    assert torch.equal(cost, mmdet_matching_cost(matcher, class_logits, mask_logits, gt_classes, gt_masks, coords))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_matching_cost_is_fp32_under_autocast(dtype):
    """Confident masks over a large segment: in fp16 the products over 12,544 points pass 65,504
    and the cost became infinite (the assignment refuses it: training stopped)."""
    gt_masks = torch.zeros(2, 64, 64, dtype=torch.bool)
    gt_masks[0, :, :48] = True
    gt_masks[1] = ~gt_masks[0]
    mask_logits = torch.where(gt_masks[[0, 1, 0, 1]], -12.0, 12.0)  # confidently wrong
    class_logits = torch.randn(4, 20, generator=torch.Generator().manual_seed(0))
    matcher = HungarianMatcher(num_points=12544)
    torch.manual_seed(0)
    expected = matcher.cost(class_logits, mask_logits, torch.tensor([1, 2]), gt_masks)
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=dtype):
        cost = matcher.cost(class_logits, mask_logits, torch.tensor([1, 2]), gt_masks)
    assert cost.dtype == torch.float32 and torch.equal(cost, expected)


def test_assign_solves_each_cost_as_scipy_does_in_one_call(monkeypatch):
    from scipy.optimize import linear_sum_assignment

    sent = copies_to_device(monkeypatch)  # the indices go back in one copy, pinned on a GPU (no second wait)
    generator = torch.Generator().manual_seed(0)
    # More segments than queries, fewer, none, one.
    costs = [torch.rand(5, g, generator=generator) for g in (7, 3, 0, 1)]
    found = HungarianMatcher.assign(costs)
    assert sent == [(torch.int64, (2 * (5 + 3 + 0 + 1),))]
    assert len(found) == len(costs)
    for cost, (queries, segments) in zip(costs, found, strict=True):
        rows, cols = linear_sum_assignment(cost.numpy())
        assert queries.dtype == segments.dtype == torch.long
        assert queries.tolist() == rows.tolist() and segments.tolist() == cols.tolist()
    with pytest.raises(FloatingPointError, match="not finite"):
        HungarianMatcher.assign([costs[0], torch.tensor([[float("nan")]])])
    assert HungarianMatcher.assign([]) == []  # a batch of no images, as before the one-call form


def test_the_loss_takes_one_trip_to_the_host_per_prediction(monkeypatch):
    """All images' costs of a prediction go to scipy together (a GPU waits once per prediction),
    with the losses of solving each image's cost on its own."""
    sizes = []
    solve = HungarianMatcher.solve

    def counted(costs):
        sizes.append([tuple(c.shape) for c in costs])
        return solve(costs)

    def one_at_a_time(costs):
        return [solve([cost])[0] for cost in costs]

    generator = torch.Generator().manual_seed(3)
    class_logits = [torch.randn(3, 6, 20, generator=generator) for _ in range(4)]
    mask_logits = [torch.randn(3, 6, 16, 16, generator=generator) for _ in range(4)]
    labels = torch.randint(0, 4, (3, 32, 32), generator=generator)
    labels[1] = 255  # an image without segments
    criterion = Mask2FormerLoss(19, num_points=64)
    found = {}
    for name, solver in (("together", counted), ("apart", one_at_a_time)):
        monkeypatch.setattr(HungarianMatcher, "solve", staticmethod(solver))
        torch.manual_seed(7)
        found[name] = criterion(class_logits, mask_logits, labels)
    assert sizes == [[(6, 4), (6, 0), (6, 4)]] * 4
    together, apart = found["together"], found["apart"]
    assert together.keys() == apart.keys() and all(torch.equal(together[k], apart[k]) for k in together)


@pytest.mark.parametrize("importance", [0.75, 1.0])
@pytest.mark.parametrize("labelled", [True, False])
# At 6 queries: passes of 1, 3 + 1 and all 4 predictions choosing points; of 1, 3 + 1 and all 4 matching.
@pytest.mark.parametrize(("points_per_pass", "values_per_pass"), [(1, 1), (5000, 3500), (1 << 20, 1 << 20)])
@pytest.mark.parametrize("queries", [6, 2])  # 2: fewer queries than segments
def test_off_the_cpu_every_prediction_is_matched_in_one_trip_and_scored_at_once_with_mmdets_draws(
    monkeypatch, importance, labelled, points_per_pass, values_per_pass, queries
):
    """On a GPU all predictions' costs go to scipy together (one wait a step, not one per
    prediction), and all predictions are then scored in one pass (a few kernels, not a few per
    prediction). mmdet draws a prediction's loss points before the next prediction's matching
    points: those draws are made and dropped in their place and replayed from the generator's
    state, so the points are mmdet's, the generator ends where mmdet's does, and the losses and
    gradients are those of one prediction at a time up to the order of their sums (a class
    loss here differs in its last bit)."""
    import reinseg.heads.criterion as criterion_module

    monkeypatch.setattr(criterion_module, "eager_on_cpu", lambda tensor: False)
    monkeypatch.setattr(criterion_module, "_MASK_POINTS_PER_PASS", points_per_pass)
    monkeypatch.setattr(criterion_module, "_MATCH_VALUES_PER_PASS", values_per_pass)
    solved = []
    solve = HungarianMatcher.solve
    monkeypatch.setattr(
        HungarianMatcher, "solve", staticmethod(lambda costs: (solved.append(len(costs)), solve(costs))[1])
    )
    generator = torch.Generator().manual_seed(3)
    class_logits = [torch.randn(3, queries, 20, generator=generator) for _ in range(4)]
    mask_logits = [torch.randn(3, queries, 16, 16, generator=generator) for _ in range(4)]
    labels = torch.randint(0, 4, (3, 32, 32), generator=generator)
    labels[1] = 255  # an image without segments
    if not labelled:
        labels[:] = 255  # nothing to match: no loss points are drawn
    criterion = Mask2FormerLoss(19, num_points=64, importance_sample_ratio=importance)
    passes: list[int] = []  # the masks of each pass choosing points
    uncertain = criterion_module.uncertain_points
    monkeypatch.setattr(
        criterion_module,
        "uncertain_points",
        lambda masks, *args, **kwargs: (passes.append(len(masks)), uncertain(masks, *args, **kwargs))[1],
    )
    matched: list[int] = []  # the predictions of each matching pass
    costs_at = HungarianMatcher.costs_at
    monkeypatch.setattr(
        HungarianMatcher,
        "costs_at",
        lambda self, predictions, *args: (matched.append(len(predictions)), costs_at(self, predictions, *args))[1],
    )
    found = {}
    for route, one_trip in (("per prediction", lambda device: None), ("one trip", criterion_module._default_generator)):
        monkeypatch.setattr(criterion_module, "_default_generator", one_trip)
        passes.clear()
        matched.clear()
        logits = [t.clone().requires_grad_() for t in class_logits + mask_logits]
        torch.manual_seed(7)
        losses = criterion(logits[:4], logits[4:], labels)
        losses["loss"].backward()
        found[route] = (losses, [t.grad for t in logits], torch.rand(5))
    assert solved == [3] * 4 + [12]  # 3 images' costs a trip: 4 trips, then one
    n = 2 * min(queries, 4)  # the pairs of a prediction: two images of 4 classes
    expected = {1: [n] * 4, 5000: [3 * n, n] if queries == 6 else [4 * n], 1 << 20: [4 * n]}[points_per_pass]
    assert passes == (expected if labelled else [])
    # 3 images x queries x 64 points a prediction
    assert matched == {1: [1] * 4, 3500: [3, 1] if queries == 6 else [4], 1 << 20: [4]}[values_per_pass]
    (apart, apart_grads, apart_next), (together, together_grads, together_next) = found.values()
    assert list(apart) == list(together)
    for key in apart:
        torch.testing.assert_close(together[key], apart[key], rtol=1e-6, atol=0, msg=key)
    for a, b in zip(apart_grads, together_grads, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-12)
    assert torch.equal(apart_next, together_next)  # the generator is where mmdet's would be
    assert labelled == bool(together["loss_mask"])


def tiny_batch():
    labels = torch.full((2, 64, 64), 255, dtype=torch.long)
    labels[0, :32] = 0
    labels[0, 32:] = 13
    labels[1, :, :40] = 10
    labels[1, :, 40:] = 2
    images = torch.randn(2, 3, 64, 64)
    return images, labels


@pytest.mark.slow  # 60 training steps; the loss's parts have fast tests of their own
def test_a_tiny_model_fits_one_batch():
    torch.manual_seed(0)
    segmentor = build_segmentor(tiny_model_config())
    segmentor.train()
    images, labels = tiny_batch()
    optimizer = torch.optim.AdamW([p for p in segmentor.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(60):
        loss = segmentor.loss(images, labels)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < losses[0] / 4, losses


def test_gradients_reach_rein_and_the_head_only():
    segmentor = build_segmentor(tiny_model_config())
    segmentor.train()
    images, labels = tiny_batch()
    losses = segmentor.loss(images, labels)
    assert {"loss", "loss_cls", "loss_mask", "loss_dice", "d0.loss_cls", "d2.loss_dice"} <= set(losses)
    losses["loss"].backward()
    for name, param in segmentor.named_parameters():
        if name.startswith("backbone.vit."):
            assert param.grad is None and not param.requires_grad, name
        else:
            assert param.grad is not None, name
    rein_grads = [p.grad.abs().sum() for n, p in segmentor.named_parameters() if n.startswith("backbone.rein.")]
    assert all(g > 0 for g in rein_grads)


def test_images_without_any_labelled_pixel_give_a_finite_loss():
    criterion = Mask2FormerLoss(19, num_points=64)
    class_logits = [torch.randn(2, 5, 20, requires_grad=True)]
    mask_logits = [torch.randn(2, 5, 8, 8, requires_grad=True)]
    losses = criterion(class_logits, mask_logits, torch.full((2, 32, 32), 255))
    assert torch.isfinite(losses["loss"]) and losses["loss_mask"] == 0 and losses["loss_dice"] == 0
    losses["loss"].backward()
    assert mask_logits[0].grad is not None


def test_label_values_outside_the_classes_are_refused():
    criterion = Mask2FormerLoss(19, num_points=64)
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 0, 0] = 19
    with pytest.raises(ValueError, match=r"\[19\] are outside 0..18"):
        criterion([torch.randn(1, 5, 20)], [torch.randn(1, 5, 4, 4)], labels)


def test_no_object_class_is_down_weighted():
    criterion = Mask2FormerLoss(3, num_points=16)
    # All queries unmatched (no labels): the classification loss is the plain mean CE to no-object,
    # whatever the weight, because the weights normalize the sum.
    class_logits = torch.randn(1, 4, 4)
    labels = torch.full((1, 4, 4), 255)
    loss = criterion([class_logits], [torch.randn(1, 4, 4, 4)], labels)["loss_cls"]
    expected = torch.nn.functional.cross_entropy(class_logits[0], torch.full((4,), 3))
    assert torch.allclose(loss, 2.0 * expected, atol=1e-6)
    assert criterion.ce_class_weights.tolist() == pytest.approx([1, 1, 1, 0.1])


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(importance_sample_ratio=1.5), "importance_sample_ratio must be in \\[0, 1\\], got 1.5"),
        (dict(importance_sample_ratio=-0.1), "importance_sample_ratio must be in \\[0, 1\\], got -0.1"),
        (dict(oversample_ratio=0.5), "oversample_ratio must be at least 1, got 0.5"),
    ],
)
def test_sampling_ratios_outside_mmdets_range_are_refused(option, message):
    """A ratio over 1 drew more points than the mask losses divide by: 1.5x the mask loss, silently."""
    with pytest.raises(ValueError, match=message):
        Mask2FormerLoss(num_classes=3, **option)


def _varied_labels(batch: int) -> torch.Tensor:
    """``(batch, 24, 24)`` labels of 19 classes: image 0 half ignored, image 1 all ignored, image
    2 three classes (3..5), the rest all classes."""
    generator = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 19, (batch, 24, 24), generator=generator)
    labels[0, :12] = 255
    labels[1] = 255
    labels[2] = torch.randint(3, 6, (24, 24), generator=generator)
    return labels


def _label_variants(labels: torch.Tensor) -> list[tuple[torch.Tensor, int]]:
    """``(labels, ignore_index)``: as they are, in uint8, and with another ignore index."""
    return [(labels, 255), (labels.to(torch.uint8), 255), (labels.clamp(max=18), 4)]


def test_the_segments_of_a_batch_are_each_images_own():
    """One trip for the batch finds each image's classes as ``Segments.of`` finds them on its own:
    also for an image of ignored pixels only, uint8 labels and another ignore index."""
    labels = _varied_labels(4)
    for batch, ignore_index in _label_variants(labels):
        found = Segments.of_images(batch, 19, ignore_index)
        assert len(found) == len(batch)
        for segments, label in zip(found, batch, strict=True):
            alone = Segments.of(label, ignore_index)
            assert segments.label is label or torch.equal(segments.label, label)
            assert segments.classes.dtype == torch.int64 and torch.equal(segments.classes, alone.classes.long())
    assert torch.equal(Segments.of_images(labels, 19)[1].classes, torch.empty(0, dtype=torch.int64))
    assert Segments.of_images(labels[:0], 19) == []
    bad = labels.clone()
    bad[3, 0, :3] = torch.tensor([19, -1, 300])
    with pytest.raises(ValueError, match=r"label values \[-1, 19, 300\] are outside 0..18 and not 255"):
        Segments.of_images(bad, 19)
    with pytest.raises(ValueError, match=r"labels must be \(B, H, W\), got \(24, 24\)"):
        Segments.of_images(labels[0], 19)  # one image's: its rows would pass for images
    with pytest.raises(ValueError, match="labels must hold integer class IDs, got torch.float32"):
        Segments.of_images(labels + 0.5, 19)  # 1.5 would become class 1


@pytest.mark.parametrize("on_gpu_paths", [True, False])
def test_the_segments_from_the_hosts_label_values_are_those_read_back(monkeypatch, on_gpu_paths):
    """Each label's values as the data pipeline finds them on the host (``label_values``) give the
    segments that reading the labels back gives, and are checked as the labels are. Off the CPU
    they replace the read; on the CPU, where it costs no wait, they are checked against it."""
    import reinseg.heads.criterion as criterion
    from reinseg.data import label_values

    monkeypatch.setattr(criterion, "eager_on_cpu", lambda tensor: not on_gpu_paths)
    labels = _varied_labels(3)
    for batch, ignore_index in _label_variants(labels):
        values = [label_values(label) for label in batch]
        read_back = Segments.of_images(batch, 19, ignore_index)
        given = Segments.of_images(batch, 19, ignore_index, values=values)
        assert torch.equal(given.classes, read_back.classes) and given.classes.dtype == torch.int64
        assert torch.equal(given.padded_classes, read_back.padded_classes)
        for ours, theirs in zip(given, read_back, strict=True):
            assert torch.equal(ours.classes, theirs.classes) and torch.equal(ours.label, theirs.label)
    bad = labels.clone()
    bad[2, 0, :3] = torch.tensor([19, -1, 300])
    with pytest.raises(ValueError, match=r"label values \[-1, 19, 300\] are outside 0..18 and not 255"):
        Segments.of_images(bad, 19, values=[label_values(label) for label in bad])
    with pytest.raises(ValueError, match="coords hold 4 images' points for a batch of 3 images"):
        Segments.of_images(labels, 19).sample(torch.rand(4, 5, 2))
    with pytest.raises(ValueError, match="label_values holds 2 images' values for 3 labels"):
        Segments.of_images(labels, 19, values=[[0], [1]])
    stale = [label_values(label) for label in labels]
    stale[2] = stale[2][1:]  # one class lost on the way
    if on_gpu_paths:  # taken as given: the classes the values name, and no others
        assert Segments.of_images(labels, 19, values=stale)[2].classes.tolist() == stale[2]
    else:
        with pytest.raises(
            ValueError, match=r"label_values of image 2 give classes \[4, 5\], its label holds \[3, 4, 5\]"
        ):
            Segments.of_images(labels, 19, values=stale)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("num_points", [3, 300, 301])  # 3: few enough for a sum to show one ulp
def test_a_batch_is_matched_and_sampled_as_each_image_alone(num_points, threads):
    """``HungarianMatcher.costs`` and ``SegmentBatch.sample_rows`` take all images in one pass;
    their values are bit for bit those of ``cost`` and ``sample_each`` image by image, with the
    same random points (an image without segments still draws its own). On the CPU a sigmoid's
    values depend on where an element falls in its tensor, and a matrix product's on its
    operands' alignment: confident logits (x 6) and an odd point count reach both."""
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed in range(12):
            generator = torch.Generator().manual_seed(seed)
            class_logits = torch.randn(4, 7, 20, generator=generator)
            mask_logits = torch.randn(4, 7, 24, 20, generator=generator) * (1.0 if seed % 2 else 6.0)
            labels = torch.randint(0, 5, (4, 45, 38), generator=generator)  # sizes off the powers of two
            labels[1] = 255  # no segments
            labels[2, :10] = 255
            segments = Segments.of_images(labels, 19)
            matcher = HungarianMatcher(num_points=num_points)
            torch.manual_seed(4)
            together = matcher.costs(class_logits, mask_logits, segments)
            after_together = torch.rand(1)
            torch.manual_seed(4)
            alone = [matcher.cost(class_logits[b], mask_logits[b], s.classes, s) for b, s in enumerate(segments)]
            assert torch.equal(after_together, torch.rand(1))  # the same draws
            assert [tuple(c.shape) for c in together] == [(7, len(s)) for s in segments]
            assert [len(s) for s in segments] == [5, 0, 5, 5]
            assert all(torch.equal(a, b) for a, b in zip(together, alone, strict=True)), seed
    finally:
        torch.set_num_threads(threads_before)
    coords = torch.rand(5, 64, 2, generator=generator)
    images, index = torch.tensor([0, 0, 2, 2, 2]), torch.tensor([1, 4, 0, 3, 2])
    classes = torch.stack([segments[i].classes[g] for i, g in zip(images, index, strict=True)])
    rows = segments.sample_rows(images, classes, coords)
    each = torch.cat([segments[0].sample_each(index[:2], coords[:2]), segments[2].sample_each(index[2:], coords[2:])])
    assert torch.equal(rows, each)


def test_off_the_cpu_the_costs_of_all_images_are_one_batched_pass(monkeypatch):
    """On a GPU (the CPU's per-image route switched off here) the matching's costs of all images
    are one batched computation: the values of the per-image ones up to rounding, the same
    assignments and losses up to rounding, and an image without segments gets a (Q, 0) cost.
    Each image's cost is also checked against a plain oracle: the class, BCE and dice costs
    written out from the sampled logits and binary masks."""
    import reinseg.heads.criterion as criterion_module

    generator = torch.Generator().manual_seed(0)
    class_logits = torch.randn(3, 7, 20, generator=generator)
    mask_logits = torch.randn(3, 7, 24, 20, generator=generator) * 3
    labels = torch.randint(0, 5, (3, 45, 38), generator=generator)
    labels[1] = 255  # no segments
    labels[2, :, :20] = 7
    segments = Segments.of_images(labels, 19)
    matcher = HungarianMatcher(num_points=300)
    torch.manual_seed(4)
    per_image = matcher.costs(class_logits, mask_logits, segments)
    monkeypatch.setattr(criterion_module, "eager_on_cpu", lambda tensor: False)
    shapes = []
    weighted = HungarianMatcher._weighted
    monkeypatch.setattr(
        HungarianMatcher,
        "_weighted",
        lambda self, *args: (shapes.append([a.shape for a in args]), weighted(self, *args))[1],
    )
    torch.manual_seed(4)
    batched = matcher.costs(class_logits, mask_logits, segments)
    assert shapes == [[(3, 7, 6), (3, 7, 300), (3, 6, 300)]]  # all images at once, padded to 6 segments
    torch.manual_seed(4)
    coords = torch.cat([torch.rand(1, 300, 2) for _ in segments])
    assert [tuple(c.shape) for c in batched] == [(7, 5), (7, 0), (7, 6)]
    for b, (found, alone) in enumerate(zip(batched, per_image, strict=True)):
        torch.testing.assert_close(found, alone, rtol=1e-6, atol=1e-6)
        if not len(segments[b]):
            continue
        pred = point_sample(mask_logits[b : b + 1], coords[b : b + 1])[0].double()  # (Q, P)
        masks = (labels[b].unsqueeze(0) == segments[b].classes.view(-1, 1, 1)).double()
        target = point_sample(masks.unsqueeze(0), coords[b : b + 1].double())[0]  # (G, P)
        prob = pred.sigmoid()
        bce = -(target[None] * torch.log(prob[:, None]) + (1 - target[None]) * torch.log(1 - prob[:, None])).mean(-1)
        dice = 1 - (2 * (prob[:, None] * target[None]).sum(-1) + 1) / (prob.sum(-1)[:, None] + target.sum(-1)[None] + 1)
        cost_class = -class_logits[b].double().softmax(-1)[:, segments[b].classes]
        expected = 2.0 * cost_class + 5.0 * bce + 5.0 * dice
        torch.testing.assert_close(found.double(), expected, rtol=1e-5, atol=1e-5)
    assert [[t.tolist() for t in pair] for pair in HungarianMatcher.assign(batched)] == [
        [t.tolist() for t in pair] for pair in HungarianMatcher.assign(per_image)
    ]
    criterion = Mask2FormerLoss(19, num_points=300)
    losses = {}
    for route in (lambda tensor: False, lambda tensor: True):
        monkeypatch.setattr(criterion_module, "eager_on_cpu", route)
        torch.manual_seed(5)
        losses[route(None)] = criterion([class_logits] * 2, [mask_logits] * 2, labels)
    for key, value in losses[True].items():
        torch.testing.assert_close(losses[False][key], value, rtol=1e-6, atol=0)


def test_labels_of_any_integer_dtype_give_the_same_loss():
    """uint8 labels (as PNGs read) and int32 ones: the classes are indices either way (uint8
    ones indexed the class probabilities as a mask)."""
    generator = torch.Generator().manual_seed(2)
    class_logits = [torch.randn(2, 6, 20, generator=generator)]
    mask_logits = [torch.randn(2, 6, 16, 16, generator=generator)]
    labels = torch.randint(0, 5, (2, 32, 32), generator=generator)
    labels[0, :4] = 255
    criterion = Mask2FormerLoss(19, num_points=64)
    found = {}
    for dtype in (torch.int64, torch.int32, torch.uint8):
        torch.manual_seed(3)
        found[dtype] = criterion(class_logits, mask_logits, labels.to(dtype))
    for dtype in (torch.int32, torch.uint8):
        assert all(torch.equal(found[dtype][k], found[torch.int64][k]) for k in found[torch.int64]), dtype
