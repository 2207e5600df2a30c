"""Val mIoU of baseline, cvpr and agmm for each weak-label form, against full supervision.

Every run uses the model, data and budget of ``experiments/demo.yaml`` (the synthetic scenes) or,
with ``--root``, a dataset in the ``FolderDataModule`` layout whose weak labels are simulated from
its masks. Only ``method`` and the weak-label form change between runs, and boxes take the box
settings of ``experiments/voc_box.yaml`` (a labelled core; for AGMM a uniform prior and hard
pseudo labels). Mean ± std over seeds,
printed as a Markdown table (AGMM's pseudo labels and its ratio to full supervision when agmm is
among ``--methods``); with ``--out`` the table is written there and a bar chart beside it
(same name, ``.png``). ``--quick`` shrinks everything to check the pipeline in about a minute.

Run: ``python benchmarks/ablation.py [--forms point scribble block box] [--seeds 0 1 2]
[--methods baseline cvpr agmm] [--root DIR] [--accelerator gpu] [--parallel N]
[--out results/ablation.md]``.
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
import matplotlib
import torch
import yaml
from _runs import add_run_arguments, box_settings, quiet_trainer, run_options

from agmm_lightning import AGMMSegmenter
from agmm_lightning.data import FolderDataModule, SyntheticDataModule

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"
METHODS = ("baseline", "cvpr", "agmm")
QUICK_DATA = {"num_train": 8, "num_val": 4, "image_size": 32, "crop_size": 32, "batch_size": 4}
QUICK_MODEL = {"encoder": "tu-test_resnet", "warmup_steps": 1}
SYNTHETIC_ONLY = ("num_train", "num_val", "num_test", "image_size", "num_classes")


def settings(quick: bool, epochs: int | None) -> tuple[dict, dict, int]:
    """Model arguments, data arguments and epochs of demo.yaml (tiny ones with ``quick``)."""
    config = yaml.safe_load(CONFIG.read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    if quick:
        model, data, epochs = model | QUICK_MODEL, data | QUICK_DATA, epochs or 1
    return model, data, epochs or config["trainer"]["max_epochs"]


def datamodule(root: str | None, form: str, data_args: dict, seed: int) -> pl.LightningDataModule:
    """The synthetic scenes, or the folder dataset at ``root`` with simulated weak labels."""
    args = data_args | {"weak_label": form, "seed": seed}
    if root is None:
        return SyntheticDataModule(**args)
    shared = {key: value for key, value in args.items() if key not in SYNTHETIC_ONLY}
    return FolderDataModule(root, simulate=True, **shared)


def train(job: tuple) -> dict[str, float]:
    """Train one model and return its final metrics."""
    form, method, seed, options = job
    model_args, data_args, epochs = settings(options["quick"], options["epochs"])
    if form == "box":
        box_model, box_data = box_settings()
        model_args, data_args = model_args | box_model, data_args | box_data
    model_args = model_args | options["model"] | {"method": method}
    data = datamodule(options["root"], form, data_args | options["data"], seed)
    model_args["num_classes"] = data.num_classes
    pl.seed_everything(seed, verbose=False)
    model = AGMMSegmenter(**model_args)
    trainer = quiet_trainer(epochs, options["accelerator"], "logs/benchmarks")
    start = time.perf_counter()
    trainer.fit(model, data)
    metrics = trainer.callback_metrics
    pseudo = metrics.get("train_pseudo_miou")
    return {
        "val_miou": float(metrics["val_miou"]),
        "train_pseudo_miou": float("nan") if pseudo is None else float(pseudo),
        "seconds": time.perf_counter() - start,
    }


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation (0 for one value), in percent."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return 100 * statistics.mean(values), 100 * std


def cell(values: list[float]) -> str:
    """``mean ± std`` in percent; the mean alone for a single seed."""
    mean, std = mean_std(values)
    return f"{mean:.1f} ± {std:.1f}" if len(values) > 1 else f"{mean:.1f}"


def table(
    results: dict[tuple[str, str], list[dict]], forms: list[str], methods: list[str], header: str
) -> str:
    """Markdown: one row per weak form, val mIoU per method, AGMM's pseudo labels and ratio."""
    full, _ = mean_std([run["val_miou"] for run in results["full", "baseline"]])
    columns = [f"{m} val mIoU (%)" for m in methods]
    if "agmm" in methods:
        columns += ["agmm train pseudo-label mIoU (%)", "agmm / full supervision"]
    lines = [header, "", f"| labels | {' | '.join(columns)} |", "|---|" + "---|" * len(columns)]
    for form in forms:
        runs = {method: results[form, method] for method in methods}
        values = [cell([run["val_miou"] for run in runs[method]]) for method in methods]
        if "agmm" in methods:
            agmm, _ = mean_std([run["val_miou"] for run in runs["agmm"]])
            pseudo = cell([run["train_pseudo_miou"] for run in runs["agmm"]])
            values += [pseudo, f"{agmm / full:.0%}"]
        lines.append(f"| {form} | {' | '.join(values)} |")
    full_cell = cell([run["val_miou"] for run in results["full", "baseline"]])
    seconds = statistics.mean(run["seconds"] for runs in results.values() for run in runs)
    lines += [
        "",
        f"Full supervision (every pixel labelled, partial CE = CE): {full_cell} val mIoU. "
        f"{seconds:.0f} s per run on average. Baseline and cvpr make no GMM pseudo labels.",
    ]
    return "\n".join(lines)


def bar_chart(
    results: dict[tuple[str, str], list[dict]], forms: list[str], methods: list[str], path: Path
) -> None:
    """Grouped bars (mean ± std) per form and method, full supervision as a dashed line."""
    figure, axes = plt.subplots(figsize=(1.8 * len(forms) + 2, 3.5))
    width = 0.8 / len(methods)
    for index, method in enumerate(methods):
        stats = [mean_std([run["val_miou"] for run in results[form, method]]) for form in forms]
        offset = (index - (len(methods) - 1) / 2) * width
        positions = [position + offset for position in range(len(forms))]
        axes.bar(positions, [m for m, _ in stats], width, yerr=[s for _, s in stats], label=method)
    full, _ = mean_std([run["val_miou"] for run in results["full", "baseline"]])
    axes.axhline(full, color="black", linestyle="--", linewidth=1, label="full supervision")
    axes.set_xticks(range(len(forms)), forms)
    axes.set_ylabel("val mIoU (%)")
    axes.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", nargs="+", default=["point", "scribble", "block", "box"])
    parser.add_argument("--root", default=None, help="a FolderDataModule dataset instead")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    add_run_arguments(parser, seeds=[0, 1, 2])
    args = parser.parse_args()
    if "full" in args.forms:
        parser.error("full supervision is always run; list only weak forms in --forms")
    options = run_options(args, root=args.root)
    runs = [("full", "baseline")] + [(form, m) for form in args.forms for m in args.methods]
    jobs = [(form, method, seed, options) for form, method in runs for seed in args.seeds]
    with ProcessPoolExecutor(args.parallel, multiprocessing.get_context("spawn")) as pool:
        flat = list(pool.map(train, jobs))
    count = len(args.seeds)
    results = {run: flat[i * count : (i + 1) * count] for i, run in enumerate(runs)}

    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else platform.machine()
    overrides = options["model"] | options["data"]
    header = (
        f"{args.root or 'Synthetic demo data'}, settings of experiments/demo.yaml"
        f"{' (--quick sizes)' if args.quick else ''}, seeds {args.seeds}, "
        f"overrides {overrides or 'none'}, on {device} ({torch.get_num_threads()} threads)."
    )
    text = table(results, args.forms, args.methods, header)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        bar_chart(results, args.forms, args.methods, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
