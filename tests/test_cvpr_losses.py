"""cvpr_agmm_losses against a deliberately plain loop implementation of METHOD §2."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from agmm_lightning.agmm import cvpr, cvpr_agmm_losses
from agmm_lightning.weak_labels.rasterize import rasterize_boxes

EPS = 1e-6


def _mean_or_zero(values):
    return values.mean() if values.numel() else values.sum() * 0


def reference_losses(features, logits, target, num_classes, image_classes=None, allowed=None):
    """METHOD §2 written out with loops over images, classes and pairs, as the paper's code does;
    with a box map, ``gmm_to_pred`` and ``absent`` as cvpr_agmm_losses documents them."""
    batch, channels, h, w = features.shape
    height, width = target.shape[-2:]
    upsampled = F.interpolate(features, size=(height, width), mode="bilinear", align_corners=False)
    present = torch.zeros(batch, num_classes, dtype=features.dtype)
    centers = []
    for b in range(batch):
        row = []
        for k in range(num_classes):
            pixels = target[b] == k
            if pixels.any():
                present[b, k] = 1
                row.append(upsampled[b][:, pixels].sum(1) / (pixels.sum().to(features.dtype) + EPS))
            else:
                row.append(features.new_zeros(channels))
        centers.append(torch.stack(row))
    centers = torch.stack(centers)
    if image_classes is None:
        image_classes = present

    preserve = (target < 255).to(features.dtype)[:, None]
    preserve = F.interpolate(preserve, size=(h, w), mode="bilinear", align_corners=False)[:, 0]
    kernels = []
    for b in range(batch):
        per_class = []
        for k in range(num_classes):
            diff = (features[b] - centers[b, k][:, None, None]).abs().mean(0)
            diff = diff * present[b, k] * preserve[b]
            per_class.append(torch.exp(-diff * diff))
        kernels.append(torch.stack(per_class))
    kernel = F.interpolate(
        torch.stack(kernels), size=(height, width), mode="bilinear", align_corners=False
    )
    kernel = kernel * present[:, :, None, None]

    probs = logits.softmax(1)
    one_hot = torch.stack([(target == k).to(features.dtype) for k in range(num_classes)], 1)

    def bce(p, q):
        return -q * torch.log(p + EPS) - (1 - q) * torch.log(1 - p + EPS)

    def class_average(values):
        total = sum(values[:, k] * present[:, k, None, None] for k in range(num_classes))
        return total / (present.sum(1)[:, None, None] + EPS)

    if allowed is None:
        gmm_to_pred = class_average(bce(probs, kernel) / 2)[target != 255]
    else:
        image_wide = allowed.flatten(2).all(2)[:, :, None, None]
        boxed = allowed & ~image_wide
        in_box = boxed.any(1, keepdim=True)
        pull = (allowed & (boxed | ~in_box)).to(features.dtype)
        push = (allowed & ~boxed).to(features.dtype)
        parts = -pull * kernel * torch.log(probs + EPS)
        parts = parts - push * (1 - kernel) * torch.log(1 - probs + EPS)
        gmm_to_pred = class_average(parts / 2)[target != 255]
        image_classes = allowed.to(features.dtype)
    label_to_gmm = class_average(bce(kernel, one_hot) / 2)[target < num_classes]

    counts = present.sum(0)
    vectors = centers.sum(0) * counts[:, None] / (counts[:, None] + EPS)
    separation, pairs = features.new_zeros(()), 0
    for k in range(num_classes):
        for j in range(k + 1, num_classes):
            if counts[k] > 0 and counts[j] > 0:
                pairs += 1
                gap = (vectors[k] - vectors[j]).abs().mean()
                separation = separation + torch.exp(-gap * gap)
    separation = separation / (pairs + EPS)

    if image_classes.ndim == 2:
        image_classes = image_classes[:, :, None, None]
    absent = sum(
        -(1 - image_classes[:, k]) * torch.log(1 - probs[:, k] + EPS) for k in range(num_classes)
    )[target != 255]

    ce = F.cross_entropy(
        logits, target.masked_fill(target >= num_classes, 255), ignore_index=255, reduction="none"
    )[target < num_classes]
    losses = {
        "seg": _mean_or_zero(ce),
        "gmm_to_pred": _mean_or_zero(gmm_to_pred),
        "label_to_gmm": _mean_or_zero(label_to_gmm),
        "separation": separation,
        "absent": _mean_or_zero(absent),
    }
    losses["total"] = sum(losses.values())
    return losses


def make_case(seed, batch, channels, feat_size, label_size, num_classes, kind):
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels, *feat_size, generator=gen, dtype=torch.float64)
    logits = torch.randn(batch, num_classes, *label_size, generator=gen, dtype=torch.float64)
    target = torch.full((batch, *label_size), num_classes, dtype=torch.long)
    if kind == "clicks":
        for _ in range(6 * batch):
            b = int(torch.randint(batch, (1,), generator=gen))
            y = int(torch.randint(label_size[0], (1,), generator=gen))
            x = int(torch.randint(label_size[1], (1,), generator=gen))
            target[b, max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2] = int(
                torch.randint(num_classes, (1,), generator=gen)
            )
    elif kind == "dense":
        target = torch.randint(num_classes, (batch, *label_size), generator=gen)
    elif kind == "one_class":
        target[:, : label_size[0] // 2] = 1
    elif kind == "void_padding":
        target = torch.randint(num_classes + 1, (batch, *label_size), generator=gen)
        target[:, :, -label_size[1] // 3 :] = 255
        target[0, -2:] = 255
    elif kind == "unlabelled":
        target[:, :2] = 255
    return features.requires_grad_(), logits.requires_grad_(), target


CASES = [
    (0, 2, 4, (6, 6), (11, 11), 3, "clicks"),
    (1, 3, 5, (7, 5), (13, 17), 4, "dense"),
    (2, 2, 3, (5, 5), (9, 9), 3, "one_class"),
    (3, 2, 6, (6, 8), (21, 31), 5, "void_padding"),
    (4, 2, 4, (4, 4), (8, 8), 3, "unlabelled"),
    (5, 1, 8, (9, 9), (9, 9), 6, "clicks"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[-1] + str(c[0]) for c in CASES])
@pytest.mark.parametrize("with_tags", [False, True])
@pytest.mark.parametrize("bands", ["whole", "rows"])
def test_equals_plain_reference_values_and_gradients(case, with_tags, bands, monkeypatch):
    if bands == "rows":  # the pixel terms a row at a time, as at real shapes
        monkeypatch.setattr(cvpr, "CPU_CHUNK_ELEMENTS", 1)
    seed, batch, channels, feat_size, label_size, num_classes, kind = case
    features, logits, target = make_case(*case)
    tags = None
    if with_tags:
        gen = torch.Generator().manual_seed(seed + 100)
        tags = (torch.rand(batch, num_classes, generator=gen) > 0.5).double()
    assert_equals_reference(features, logits, target, num_classes, tags)


def assert_equals_reference(features, logits, target, num_classes, tags, allowed=None):
    """Every term's value and the gradients of a weighted sum of them, against the reference."""
    ours = cvpr_agmm_losses(features, logits, target, num_classes, tags, allowed)
    ref_features = features.detach().clone().requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    theirs = reference_losses(ref_features, ref_logits, target, num_classes, tags, allowed)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.isfinite(ours[name]), name
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-10, msg=name)
    # Weighted sum so that every term's gradient is checked, not only the total's.
    weights = torch.arange(1, 6, dtype=torch.float64)
    names = ["seg", "gmm_to_pred", "label_to_gmm", "separation", "absent"]
    sum(w * ours[n] for w, n in zip(weights, names, strict=True)).backward()
    sum(w * theirs[n] for w, n in zip(weights, names, strict=True)).backward()
    torch.testing.assert_close(features.grad, ref_features.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("label_size", [(16, 24), (17, 23)], ids=["tiled", "untiled"])
@pytest.mark.parametrize("bands", ["whole", "rows"])
def test_cell_logits_are_the_logits_averaged_over_each_feature_cell(label_size, bands, monkeypatch):
    # OEM mode reads them; where the cells tile the logits their gradient joins the pixel terms'.
    if bands == "rows":
        monkeypatch.setattr(cvpr, "CPU_CHUNK_ELEMENTS", 1)
    features, logits, target = make_case(7, 2, 4, (4, 6), label_size, 5, "clicks")
    ref_logits = logits.detach().clone().requires_grad_()
    ours = cvpr_agmm_losses(features, logits, target, 5, with_cell_logits=True)
    theirs = cvpr_agmm_losses(features.detach(), ref_logits, target, 5)
    pooled = F.adaptive_avg_pool2d(ref_logits, (4, 6))
    torch.testing.assert_close(ours["cell_logits"], pooled)
    weights = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(0))
    (ours["total"] + (ours["cell_logits"] * weights).sum()).backward()
    (theirs["total"] + (pooled * weights).sum()).backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-6, atol=1e-7)


def test_gradients_of_a_subset_of_the_terms_equal_the_reference():
    # OEM mode adds only the kernel terms: the unused seg and absent outputs get no gradient.
    features, logits, target = make_case(*CASES[0])
    num_classes = CASES[0][5]
    ref_features = features.detach().clone().requires_grad_()
    ref_logits = logits.detach().clone().requires_grad_()
    ours = cvpr_agmm_losses(features, logits, target, num_classes)
    theirs = reference_losses(ref_features, ref_logits, target, num_classes, None)
    names = ["gmm_to_pred", "label_to_gmm", "separation"]
    sum(ours[n] for n in names).backward()
    sum(theirs[n] for n in names).backward()
    torch.testing.assert_close(features.grad, ref_features.grad, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-7, atol=1e-10)
    # Only seg: the pixel terms' gradient paths are all skipped but the cross-entropy's.
    logits.grad = None
    ref_logits.grad = None
    cvpr_agmm_losses(features, logits, target, num_classes)["seg"].backward()
    reference_losses(ref_features, ref_logits, target, num_classes, None)["seg"].backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad, rtol=1e-7, atol=1e-10)


def test_keeps_no_float32_copy_of_bfloat16_logits_for_backward():
    # One class present: the [B, S, H, W] maps of the present classes are smaller than the logits.
    features, logits, target = make_case(2, 2, 3, (5, 5), (9, 9), 3, "one_class")
    logits = logits.detach().bfloat16().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        losses = cvpr_agmm_losses(features.detach().float().requires_grad_(), logits, target, 3)
    logit_sized = [t for t in saved if t.shape == logits.shape]
    assert logit_sized and all(t.dtype == torch.bfloat16 for t in logit_sized)
    losses["total"].backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad).all()


def test_float32_matches_reference():
    features, logits, target = make_case(7, 2, 16, (8, 8), (31, 31), 4, "clicks")
    ours = cvpr_agmm_losses(features.float(), logits.float(), target, 4)
    theirs = reference_losses(features.detach(), logits.detach(), target, 4)
    for name in ours:
        torch.testing.assert_close(ours[name].double(), theirs[name].detach(), rtol=1e-4, atol=1e-5)


def test_ties_with_centers_get_the_gradient_of_abs():
    """ReLU features with a dead channel equal their centers there: |F - mu|' must be 0."""
    features, logits, target = make_case(8, 2, 5, (6, 6), (11, 11), 3, "clicks")
    features = features.detach().relu()
    features[:, 2] = 0
    grads = []
    for losses_fn in (cvpr_agmm_losses, reference_losses):
        leaf = features.clone().requires_grad_()
        losses_fn(leaf, logits.detach(), target, 3)["total"].backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-10)


def test_backward_twice_with_retained_graph_gives_the_same_gradient():
    features, logits, target = make_case(9, 2, 4, (6, 6), (11, 11), 3, "clicks")
    total = cvpr_agmm_losses(features, logits, target, 3)["total"]
    first = torch.autograd.grad(total, [features, logits], retain_graph=True)
    kept = [gradient.clone() for gradient in first]
    # A different output gradient: a reused buffer would show in both results.
    second = torch.autograd.grad(total, [features, logits], grad_outputs=torch.tensor(2.0).double())
    for a, b, c in zip(first, second, kept, strict=True):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, 2 * c)


def test_no_labelled_pixel_keeps_losses_finite_and_differentiable():
    features, logits, target = make_case(4, 2, 4, (4, 4), (8, 8), 3, "unlabelled")
    losses = cvpr_agmm_losses(features, logits, target, 3)
    for name, value in losses.items():
        assert torch.isfinite(value), name
    assert losses["seg"] == 0 and losses["label_to_gmm"] == 0 and losses["separation"] == 0
    losses["total"].backward()
    assert torch.isfinite(logits.grad).all() and torch.isfinite(features.grad).all()


def test_absent_classes_are_pushed_down():
    features, logits, target = make_case(0, 2, 4, (6, 6), (11, 11), 3, "one_class")
    losses = cvpr_agmm_losses(features, logits, target, 3)
    losses["absent"].backward()
    # Class 1 is the only class present: the absent loss raises its logit everywhere.
    assert (logits.grad[:, 1] < 0).all()
    everything_present = cvpr_agmm_losses(features, logits, target, 3, torch.ones(2, 3))
    assert everything_present["absent"] == 0


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda f, z, t: (f, z, t.masked_fill(t == 0, 7)), "target values"),
        (lambda f, z, t: (f, z, t.float()), "integer"),
        (lambda f, z, t: (f, z[:, :2], t), "logits must be"),
        (lambda f, z, t: (f[0], z, t), "features must be"),
        (lambda f, z, t: (f, z, t[:, :-1]), "target must be"),
    ],
)
def test_bad_input_raises_clear_value_error(mutate, match):
    features, logits, target = make_case(1, 3, 5, (7, 5), (13, 17), 4, "dense")
    with pytest.raises(ValueError, match=match):
        cvpr_agmm_losses(*mutate(features, logits, target), 4)


def test_wrong_image_classes_shape():
    features, logits, target = make_case(1, 3, 5, (7, 5), (13, 17), 4, "dense")
    with pytest.raises(ValueError, match="image_classes"):
        cvpr_agmm_losses(features, logits, target, 4, torch.ones(3, 5))


def box_case(seed=0, label_size=(20, 24), feat_size=(5, 6), core_fraction=0.4):
    """Boxes rasterised as the data pipeline does: class 2 nested in class 1's box, class 3
    apart; background labelled outside, cores labelled, the rest of each box unlabelled."""
    boxes = np.array([[1, 1, 14, 15, 1], [5, 5, 10, 11, 2], [16, 2, 23, 9, 3]], np.float32)
    maps = [rasterize_boxes(boxes, label_size, 4, core_fraction=core_fraction)] * 2
    target = torch.from_numpy(np.stack([t for t, _ in maps])).long()
    allowed = torch.from_numpy(np.stack([a for _, a in maps]))
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(2, 4, *feat_size, generator=gen, dtype=torch.float64)
    logits = torch.randn(2, 4, *label_size, generator=gen, dtype=torch.float64)
    return features.requires_grad_(), logits.requires_grad_(), target, allowed


@pytest.mark.parametrize("bands", ["whole", "rows"])
def test_with_a_box_map_equals_the_plain_reference(bands, monkeypatch):
    if bands == "rows":
        monkeypatch.setattr(cvpr, "CPU_CHUNK_ELEMENTS", 1)
    features, logits, target, allowed = box_case()
    assert (target == 2).any() and (target == 4).any()
    tags = allowed.flatten(2).any(2).double()
    assert_equals_reference(features, logits, target, 4, tags, allowed)


def test_with_a_box_map_the_pixel_terms_never_push_a_box_class_down_inside_its_box():
    """Inside a box, the kernel and absent terms only raise the box's class (boxes of other
    classes covering the same pixel compete with it through the softmax alone); the published
    terms (tags only) push it down where its kernel is low, which a box cannot justify."""
    features, logits, target, allowed = box_case(seed=3)
    tags = allowed.flatten(2).any(2).double()
    one_box = allowed[:, 1:].sum(1, keepdim=True) == 1
    inside = allowed[:, 1:] & one_box & (target == 4)[:, None]  # unlabelled, classes 1-3
    losses = cvpr_agmm_losses(features, logits, target, 4, tags, allowed)
    (gradient,) = torch.autograd.grad(losses["gmm_to_pred"] + losses["absent"], logits)
    assert (gradient[:, 1:][inside] <= 0).all()
    published = cvpr_agmm_losses(features, logits, target, 4, tags)
    (gradient,) = torch.autograd.grad(published["gmm_to_pred"] + published["absent"], logits)
    assert (gradient[:, 1:][inside] > 0).any()
