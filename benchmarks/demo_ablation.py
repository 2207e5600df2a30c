"""Val mIoU of baseline, cvpr and agmm on the embedded demo data, against full supervision.

Every run uses the model, data and budget of ``experiments/demo.yaml``; only ``method`` (and, for
the upper bound, the weak-label form ``full``) changes. Mean ± std over seeds; Markdown table.

Run: ``python benchmarks/demo_ablation.py [--seeds 0 1 2] [--accelerator gpu] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from agmm_lightning import AGMMSegmenter
from agmm_lightning.data import SyntheticDataModule

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"
RUNS = (("full supervision", "baseline", "full"),) + tuple(
    (method, method, "point") for method in ("baseline", "cvpr", "agmm")
)


def parse_value(text: str):
    """``"0.1"`` -> 0.1, ``"adamw"`` -> "adamw", for ``key=value`` overrides."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def train(job: tuple) -> dict:
    """Train one model as configured in demo.yaml and return its metrics."""
    method, weak_label, seed, accelerator, epochs, model_args, data_args = job
    config = yaml.safe_load(CONFIG.read_text())
    model_config = config["model"]["init_args"] | model_args | {"method": method}
    data_config = config["data"]["init_args"] | data_args | {"weak_label": weak_label}
    pl.seed_everything(seed, verbose=False)
    data = SyntheticDataModule(**(data_config | {"seed": seed}))
    model = AGMMSegmenter(**model_config)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=epochs or config["trainer"]["max_epochs"],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        check_val_every_n_epoch=epochs or config["trainer"]["max_epochs"],
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
    parser.add_argument("--epochs", type=int, default=None, help="default: demo.yaml's")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--set", nargs="*", default=[], help="model overrides, key=value")
    parser.add_argument("--data", nargs="*", default=[], help="data overrides, key=value")
    parser.add_argument("--only", nargs="*", default=None, help="rows to run, e.g. agmm")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = [row for row in RUNS if args.only is None or row[0] in args.only]
    model_args = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.set)}
    data_args = {k: parse_value(v) for k, v in (item.split("=", 1) for item in args.data)}

    jobs = [
        (method, form, seed, args.accelerator, args.epochs, model_args, data_args)
        for _, method, form in rows
        for seed in args.seeds
    ]
    with ProcessPoolExecutor(args.parallel, multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(train, jobs))
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else platform.machine()
    lines = [
        f"Synthetic demo data, settings of experiments/demo.yaml, seeds {args.seeds}, "
        f"overrides {model_args | data_args or 'none'}, on {device}.",
        "",
        "| labels / method | val mIoU (%) | train pseudo-label mIoU (%) | time per run (s) |",
        "|---|---|---|---|",
    ]
    for index, (name, method, _) in enumerate(rows):
        runs = results[index * len(args.seeds) : (index + 1) * len(args.seeds)]
        pseudo = mean_std([r["train_pseudo_miou"] for r in runs]) if method == "agmm" else "–"
        seconds = statistics.mean(r["seconds"] for r in runs)
        label = name if name == "full supervision" else f"points / {name}"
        lines.append(
            f"| {label} | {mean_std([r['val_miou'] for r in runs])} | {pseudo} | {seconds:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
