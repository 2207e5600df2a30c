"""OEM mode's teacher gate: held-out labels, their evidence, and what a closed gate stops."""

import copy
import zlib

import torch
import torch.nn.functional as F
from helpers import tiny_data, tiny_network, tiny_segmenter, tiny_trainer

from agmm_lightning.agmm import AGMMModel, OEMOptions, TeacherGate
from agmm_lightning.agmm.gate import gate_evidence, held_out_images


def tiny_model(**oem):
    options = OEMOptions(**({"warmup_steps": 1, "pseudo_mode": "soft"} | oem))
    return AGMMModel(tiny_network(), 6, "agmm", options)


def fitted(model):
    """The model with every class's mixture fitted to random unit features."""
    torch.manual_seed(0)
    features = F.normalize(torch.randn(60, 64), dim=1)
    labels = F.one_hot(torch.arange(60) % 6, 6).float()
    model.mixtures.update(model.mixtures.sufficient_statistics(features, labels))
    return model


def names_by_holdout(fraction):
    """A name the share ``fraction`` holds out, and one it keeps."""
    names = [f"slice_{i:03d}" for i in range(200)]
    held = {names[i] for i in held_out_images(names, fraction)}
    return next(n for n in names if n in held), next(n for n in names if n not in held)


def test_held_out_images_are_a_fixed_share_chosen_by_name_alone():
    names = [f"image_{i:05d}" for i in range(20000)]
    held = {names[i] for i in held_out_images(names, 0.125)}
    assert abs(len(held) / len(names) - 0.125) < 0.01
    shuffled = names[::-7] + names[1::3]
    assert {shuffled[i] for i in held_out_images(shuffled, 0.125)} == held & set(shuffled)
    assert held <= {names[i] for i in held_out_images(names, 0.25)}
    assert held_out_images(names, 0.0) == []
    assert held == {n for n in names if zlib.crc32(n.encode()) / 2**32 < 0.125}


def test_gate_evidence_counts_each_labelled_pixel_against_its_cells_class():
    gen = torch.Generator().manual_seed(3)
    num_classes = 4
    teacher = torch.randint(0, num_classes + 1, (2, 3, 5), generator=gen)  # C: no valid class
    student = torch.randint(0, num_classes, (2, 3, 5), generator=gen)
    labels = torch.randint(0, num_classes + 2, (2, 6, 10), generator=gen)  # C, C+1: no label
    labels[0, 0, 0] = 255
    evidence = gate_evidence(teacher, student, labels, num_classes)
    labelled = labels < num_classes
    for who, cells in enumerate((teacher, student)):
        at_pixel = cells.repeat_interleave(2, 1).repeat_interleave(2, 2)  # 2x2 pixels per cell
        for c in range(num_classes):
            right = (labelled & (labels == c) & (at_pixel == c)).sum()
            false_positive = (labelled & (labels != c) & (at_pixel == c)).sum()
            false_negative = (labelled & (labels == c) & (at_pixel != c)).sum()
            expected = torch.stack([right, false_positive, false_negative]).float()
            assert torch.equal(evidence[who, :, c], expected), (who, c)


def test_the_gate_closes_exactly_the_classes_whose_teacher_is_behind():
    gate = TeacherGate(3, momentum=0.5)
    assert gate.open().all()  # no evidence: the teacher is not shown to be worse
    evidence = torch.zeros(2, 3, 3)
    evidence[0, :, 0], evidence[1, :, 0] = torch.tensor([5.0, 5, 0]), torch.tensor([9.0, 1, 0])
    evidence[0, :, 1], evidence[1, :, 1] = torch.tensor([8.0, 0, 2]), torch.tensor([4.0, 3, 3])
    evidence[:, :, 2] = torch.tensor([6.0, 2, 2])
    gate.update(evidence)
    assert gate.open().tolist() == [False, True, True]
    for _ in range(8):  # newer evidence outweighs the old: class 0's teacher has caught up
        gate.update(evidence.flip(0))
    assert gate.open().tolist() == [True, False, True]


def test_a_teacher_worse_than_the_student_does_not_move_it():
    """With the teacher behind the student on every class, the GMM pseudo loss gives the network
    no gradient and no unlabelled cell joins the refit; with the gate open the same step teaches."""
    batch = next(iter(tiny_data(augment=False).train_dataloader()))
    model = fitted(tiny_model(teacher_holdout=0.0, fit_confidence=0.0))
    model.gate.counts[1, 0] = 10.0  # the student right on every held-out label, the teacher never
    step, logits = model.losses(batch, step=5)
    (gradient,) = torch.autograd.grad(step.terms["pseudo"], logits, allow_unused=True)
    assert step.terms["pseudo"] == 0 and not step.pseudo_cells.any()
    assert gradient is None or (gradient == 0).all()
    warm_up, _ = model.losses(batch, step=0)  # before warm-up: the labelled features alone
    torch.testing.assert_close(step.stats.weight, warm_up.stats.weight)

    model.gate.counts.zero_()
    step, logits = model.losses(batch, step=5)
    (gradient,) = torch.autograd.grad(step.terms["pseudo"], logits)
    assert step.terms["pseudo"] > 0 and gradient.abs().sum() > 0
    assert (step.stats.weight > warm_up.stats.weight + 1e-3).any()


def test_held_out_labels_train_nothing_and_score_teacher_and_student():
    """A held-out image's labels reach no term and no statistic (its training is that of an
    unlabelled image); they are the gate's evidence, each labelled pixel counted once."""
    held, kept = names_by_holdout(0.125)
    batch = next(iter(tiny_data(augment=False, batch_size=2).train_dataloader()))
    batch["name"] = [held, kept]
    model = fitted(tiny_model(teacher_holdout=0.125)).eval()
    blind = copy.deepcopy(model)
    blind.oem = OEMOptions(warmup_steps=1, pseudo_mode="soft", teacher_holdout=0.0)
    hidden = dict(batch, target=batch["target"].clone())
    hidden["target"][0][hidden["target"][0] < 6] = 6

    step, _ = model.losses(batch, step=5)
    expected, _ = blind.losses(hidden, step=5)
    for name, term in expected.terms.items():
        torch.testing.assert_close(step.terms[name], term, msg=name)
    for field in ("weight", "sum", "square_sum"):
        torch.testing.assert_close(getattr(step.stats, field), getattr(expected.stats, field))
    counted = step.gate_evidence[:, [0, 2]].sum((1, 2))  # TP + FN: every labelled pixel once
    assert counted.tolist() == [float((batch["target"][0] < 6).sum())] * 2
    assert expected.gate_evidence.sum() == 0


def test_training_feeds_the_gate_and_logs_teacher_against_student(tmp_path):
    model = tiny_segmenter(warmup_steps=1, teacher_holdout=0.5)
    trainer = tiny_trainer(tmp_path, max_steps=4, limit_val_batches=0)
    trainer.fit(model, tiny_data())
    assert model.model.gate.counts.sum() > 0
    for key in ("teacher_gate_open", "teacher_holdout_miou", "student_holdout_miou"):
        assert key in trainer.logged_metrics, key
