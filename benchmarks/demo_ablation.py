"""Val mIoU of baseline, cvpr and agmm on the embedded demo data with point labels.

Same model, data and budget for every method; mean ± std over seeds. Writes a Markdown table.

Run: ``python benchmarks/demo_ablation.py [--seeds 0 1 2] [--epochs 12] [--out results/demo.md]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from agmm_lightning import AGMMSegmenter
from agmm_lightning.data import SyntheticDataModule

METHODS = ("baseline", "cvpr", "agmm")


def train(method: str, seed: int, epochs: int, weak_label: str = "point", **model_args) -> dict:
    """Train one model and return its final val mIoU and train pseudo-label mIoU."""
    pl.seed_everything(seed, verbose=False)
    data = SyntheticDataModule(weak_label=weak_label, seed=seed, num_workers=2)
    model = AGMMSegmenter(
        num_classes=data.num_classes,
        arch="Unet",
        encoder="resnet18",
        method=method,
        backbone_lr_multiplier=1.0,
        **model_args,
    )
    trainer = pl.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=epochs,
        default_root_dir="logs/benchmarks",
    )
    start = time.perf_counter()
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    return {
        "val_miou": float(metrics["val_miou"]),
        "train_pseudo_miou": float(metrics.get("train_pseudo_miou", torch.tensor(float("nan")))),
        "seconds": time.perf_counter() - start,
    }


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    lines = [
        f"Point labels, synthetic demo data, Unet/resnet18 from scratch, {args.epochs} epochs, "
        f"seeds {args.seeds}.",
        "",
        "| method | val mIoU (%) | train pseudo-label mIoU (%) | time per run (s) |",
        "|---|---|---|---|",
    ]
    for method in args.methods:
        runs = [train(method, seed, args.epochs) for seed in args.seeds]
        pseudo = [r["train_pseudo_miou"] for r in runs]
        lines.append(
            f"| {method} | {mean_std([r['val_miou'] for r in runs])} | "
            f"{mean_std(pseudo) if method == 'agmm' else '–'} | "
            f"{statistics.mean(r['seconds'] for r in runs):.0f} |"
        )
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
