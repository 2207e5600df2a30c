"""OEM mode's teacher gate: the GMM teaches a class only while it labels it as well as the network.

The GMM posterior G supervises the network's unlabelled pixels, and the mixtures are refitted from
the pixels G is sure of. If G becomes worse than the network on a class, both steps pull the
network toward G's errors and the next G is read from the drifted features. The gate compares
teacher and student on labels that neither has learnt from: the labels of a fixed share of the
training images (chosen by name, so the same images in every epoch, worker and rank) are held out
of every training term and only score the two. For each class, G's labels teach it (pseudo loss)
and feed its mixture (refit) only while G's running IoU on those labels is at least the network's.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TeacherGate", "gate_evidence", "held_out_images"]


def held_out_images(names: Sequence[str], fraction: float) -> list[int]:
    """The positions in a batch of the images whose labels are held out.

    An image is held out when the CRC-32 of its name falls in the lowest ``fraction`` of the
    range: a fixed share of any split, independent of epoch, order, workers and ranks.
    """
    if fraction <= 0:
        return []
    return [i for i, name in enumerate(names) if zlib.crc32(name.encode()) < fraction * 2**32]


def gate_evidence(teacher: Tensor, student: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """The true positives, false positives and false negatives of teacher and student.

    Args:
        teacher: ``[n, h, w]`` class of each feature cell by the GMM posterior (``num_classes``
            where no class was valid).
        student: ``[n, h, w]`` class of each feature cell by the network's prediction.
        labels: ``[n, H, W]`` held-out labels (values ``>= num_classes`` are not labels); the
            cells' classes are read at each labelled pixel's cell.
        num_classes: Number of classes C.

    Returns:
        ``[2, 3, C]`` float32 counts: teacher then student; TP, FP, FN per class.
    """
    size = labels.shape[-2:]
    labelled = labels < num_classes
    truth = labels.clamp_max(num_classes - 1).long()
    counts = []
    for cells in (teacher, student):
        predicted = F.interpolate(cells[:, None].float(), size=size, mode="nearest")[:, 0].long()
        # A cell without a valid class is wrong for every label (a false negative only).
        pairs = truth * (num_classes + 1) + predicted
        confusion = torch.zeros(num_classes * (num_classes + 1), device=labels.device)
        confusion.scatter_add_(0, pairs.flatten(), labelled.flatten().float())
        confusion = confusion.view(num_classes, num_classes + 1)
        right = confusion.diagonal()
        false_positive = confusion[:, :num_classes].sum(0) - right
        false_negative = confusion.sum(1) - right
        counts.append(torch.stack([right, false_positive, false_negative]))
    return torch.stack(counts)


class TeacherGate(nn.Module):
    """Running TP/FP/FN counts of teacher and student on held-out labels, and what they allow.

    The counts decay by ``momentum`` at every update, so the comparison follows training (with
    0.98, about the last 50 steps weigh most). Before any evidence every class is open: the
    teacher has not been shown to be worse.

    Args:
        num_classes: Number of classes C.
        momentum: Decay of the running counts per update.

    Attributes:
        counts: ``[2, 3, C]`` buffer: teacher then student; TP, FP, FN per class.
    """

    counts: Tensor

    def __init__(self, num_classes: int, momentum: float = 0.98) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("counts", torch.zeros(2, 3, num_classes))

    def update(self, evidence: Tensor) -> None:
        """Add one step's :func:`gate_evidence` (summed over micro-batches and ranks)."""
        self.counts.mul_(self.momentum).add_(evidence.to(self.counts))

    def iou(self) -> Tensor:
        """``[2, C]`` running IoU of teacher and student (0 for a class without evidence)."""
        right, false_positive, false_negative = self.counts.unbind(1)
        return right / (right + false_positive + false_negative).clamp_min(1e-6)

    def open(self) -> Tensor:
        """``[C]`` bool: the classes whose teacher IoU is at least the student's."""
        teacher, student = self.iou()
        return teacher >= student
