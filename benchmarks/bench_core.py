"""Speed and memory of the algorithm core (issue: package foundation and algorithm core).

(a) ``cvpr_agmm_losses`` forward+backward at VOC shapes against a straightforward broadcast
implementation of the same formulas (METHOD §2), which builds the upsampled features and the
``[B, C, D, h, w]`` differences; (b) one OEM step (posterior, statistics, update) at VOC and ADE20K
scale as a multiple of one ``[N, D] x [D, C·K]`` matrix product.

Run: ``python benchmarks/bench_core.py [--device cuda] [--quick] [--out FILE.md]``. Prints one
Markdown table (and writes it to ``--out``).
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
from _measure import best_seconds, in_fresh_process, peak_memory_mib, resident_mib
from _runs import publish

from agmm_lightning.agmm import ClassMixtures, cvpr_agmm_losses


def broadcast_cvpr_losses(features, logits, target, num_classes):
    """METHOD §2 written the direct way: every feature minus every center, all at once."""
    eps = 1e-6
    batch, channels, h, w = features.shape
    labelled, valid = target < num_classes, target != 255
    one_hot = F.one_hot(target.clamp(max=num_classes), num_classes + 1)[..., :num_classes]
    one_hot = one_hot.permute(0, 3, 1, 2).float()
    present = one_hot.amax((2, 3))
    upsampled = F.interpolate(features, size=target.shape[-2:], mode="bilinear")
    centers = torch.einsum("bkhw,bdhw->bkd", one_hot, upsampled) / (
        one_hot.sum((2, 3))[..., None] + eps
    )
    preserve = F.interpolate(valid[:, None].float(), size=(h, w), mode="bilinear")
    diff = (features[:, None] - centers[..., None, None]).abs().mean(2)
    kernel = torch.exp(-((diff * present[..., None, None] * preserve) ** 2))
    kernel = (
        F.interpolate(kernel, size=target.shape[-2:], mode="bilinear") * present[..., None, None]
    )
    probs = logits.softmax(1)

    def bce(p, q):
        return -q * torch.log(p + eps) - (1 - q) * torch.log(1 - p + eps)

    def average(x):
        return (x * present[..., None, None]).sum(1) / (present.sum(1)[:, None, None] + eps)

    seg = F.cross_entropy(logits, target.masked_fill(~labelled, 255), ignore_index=255)
    gmm = (
        average(bce(probs, kernel) / 2)[valid].mean()
        + average(bce(kernel, one_hot) / 2)[labelled].mean()
    )
    n = present.sum(0)
    vectors = centers.sum(0) * n[:, None] / (n[:, None] + eps)
    gap = (vectors[:, None] - vectors[None]).abs().mean(-1)
    pairs = torch.triu((n[:, None] > 0) & (n[None] > 0), 1).float()
    separation = (torch.exp(-(gap**2)) * pairs).sum() / (pairs.sum() + eps)
    absent = (-(1 - present[..., None, None]) * torch.log(1 - probs + eps)).sum(1)[valid].mean()
    return seg + gmm + separation + absent


def click_target(batch, size, num_classes, clicks, gen):
    target = torch.full((batch, size, size), num_classes, dtype=torch.long)
    for b in range(batch):
        for _ in range(clicks):
            y, x = torch.randint(1, size - 1, (2,), generator=gen).tolist()
            target[b, y - 1 : y + 2, x - 1 : x + 2] = int(
                torch.randint(num_classes, (1,), generator=gen)
            )
    target[:, :, -20:] = 255  # crop padding
    return target


def cvpr_step(kind, device):
    """One forward+backward of ``ours`` or the ``broadcast`` CVPR losses at VOC shapes."""
    gen = torch.Generator().manual_seed(0)
    batch, num_classes, size, feat, channels = 4, 21, 321, 81, 256
    features = torch.randn(batch, channels, feat, feat, generator=gen).to(device)
    logits = torch.randn(batch, num_classes, size, size, generator=gen).to(device)
    target = click_target(batch, size, num_classes, 6, gen).to(device)
    features.requires_grad_()
    logits.requires_grad_()
    losses = {
        "ours": lambda: cvpr_agmm_losses(features, logits, target, num_classes)["total"],
        "broadcast": lambda: broadcast_cvpr_losses(features, logits, target, num_classes),
    }[kind]
    return lambda: torch.autograd.grad(losses(), [features, logits])


def cpu_peak_mib(kind):
    """Peak resident memory of one CVPR step beyond its inputs (in a fresh process)."""
    return resident_mib(cvpr_step(kind, torch.device("cpu")))


def loss_block(device, repeats):
    result = {}
    for kind in ("ours", "broadcast"):
        step = cvpr_step(kind, device)
        if device.type == "cuda":
            memory = peak_memory_mib(step, device)
        else:
            memory = in_fresh_process(cpu_peak_mib, kind)
        result[kind] = (best_seconds(step, device, repeats), memory)
    return result


def oem_step(device, repeats, num_classes, batch, size, components=4, dim=64):
    gen = torch.Generator().manual_seed(1)
    count = batch * size * size
    x = torch.randn(count, dim, generator=gen).to(device)
    prior = torch.rand(count, num_classes, generator=gen).softmax(1).to(device)
    mixtures = ClassMixtures(num_classes, dim, components).to(device)
    mixtures.update(mixtures.sufficient_statistics(x, prior))

    def step():
        # Worst case: every pixel joins the fitting set with its soft posterior as weight. One
        # E-step serves the posterior and the statistics, as in AGMMSegmenter.
        expectation = mixtures.expectation(x)
        posterior = mixtures.posterior_from_log_likelihood(expectation.log_likelihood, prior)
        mixtures.update(mixtures.sufficient_statistics(x, posterior, expectation))

    weight = torch.randn(dim, num_classes * components, generator=gen).to(device)
    # Both are short and the machine is shared: take the best of many calls of each.
    seconds = best_seconds(step, device, repeats * 4)
    matmul = best_seconds(lambda: x @ weight, device, repeats * 4)
    return seconds, matmul, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for CI smoke runs")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    device = torch.device(args.device)
    repeats = 1 if args.quick else 5
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    lines = [
        f"Device: {device} ({hardware or platform.machine()}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads",
        "",
    ]

    block = loss_block(device, repeats)
    (t_ours, m_ours), (t_ref, m_ref) = block["ours"], block["broadcast"]
    lines += [
        "| measurement | ours | reference | ratio |",
        "|---|---|---|---|",
        f"| CVPR losses fwd+bwd, B=4, 321², 81²×256, C=21: time | {t_ours * 1e3:.0f} ms | "
        f"{t_ref * 1e3:.0f} ms (broadcast) | {t_ref / t_ours:.1f}× faster |",
        f"| CVPR losses fwd+bwd: peak memory | {m_ours:.0f} MiB | {m_ref:.0f} MiB (broadcast) | "
        f"{m_ref / max(m_ours, 1e-3):.1f}× leaner |",
    ]
    for name, classes, batch, size in (("VOC", 21, 4, 81), ("ADE20K", 150, 8, 128)):
        seconds, matmul, count = oem_step(device, repeats, classes, batch, size)
        lines.append(
            f"| OEM step {name} (C={classes}, K=4, D=64, N={count}) | {seconds * 1e3:.0f} ms | "
            f"{matmul * 1e3:.1f} ms ([N,D]×[D,CK] matmul) | {seconds / matmul:.1f} matmuls |"
        )
    text = "\n".join(lines)
    publish(text, args.out)


if __name__ == "__main__":
    main()
