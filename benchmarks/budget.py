"""Which labels to buy: val mIoU against the annotation time of the training split, per label form.

Trains the pure forms and mixes of forms (``--labels``; a mix as ``full:0.1,point:0.9``, each
image's form dealt out by the DataModule from the seed) on the macaque MRI slices
(``experiments/macaque.yaml``, built at ``--data-root`` when missing, like ``macaque.py``) and on
the demo's synthetic scenes (``experiments/demo.yaml``), with each method of ``--methods``
(default ``agmm``) and seed, through ``ablation.py``'s ``train``: each form or mix takes the
settings of its ``experiments/voc_<form>.yaml`` (:func:`_runs.form_settings`), and every finished
run is recorded in, and read back from, ``results/runs/``, so the table resumes and is rebuilt
from the records without training. The annotation time of a row is what labelling its training
split would cost, each image at the published time of its form (:data:`ANNOTATION_SECONDS`, a
box image per box the simulation drew in it), mean over seeds. With ``--out`` the Markdown table
is written there and one plot per dataset beside it (``<out>_<dataset>.png``): val mIoU against
annotation hours, one point per row and method. ``--quick``: tiny sizes, a pipeline check (CI,
with ``--data-root tests/data/folder``).

Run: ``python benchmarks/budget.py [--datasets macaque demo] [--data-root data/macaque] [--labels
full point box image scribble full:0.1,point:0.9 box:0.3,point:0.7 full:0.05,image:0.95]
[--methods agmm] [--seeds 0 1 2] [--accelerator gpu] [--parallel N] [--out results/budget.md]``.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import platform
import shlex
import statistics
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import cast

import matplotlib
import torch
from _runs import (
    METHOD_COLOURS,
    add_run_arguments,
    parse_overrides,
    publish,
    run_options,
    save_plot,
)
from ablation import DEMO, METHODS, ROOT, cell, datamodule, mean_std, run_settings, train
from macaque import CONFIG as MACAQUE
from macaque import ensure

from agmm_lightning.data.base import AGMMDataModule, WeakLabelDataset
from agmm_lightning.errors import InputError
from agmm_lightning.weak_labels import WeakLabelForm, WeakLabelOption, check_form, form_mix

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator  # noqa: E402

ANNOTATION_SECONDS: dict[WeakLabelForm, float] = {
    "image": 20.0,
    "point": 22.1,
    "scribble": 34.9,
    "block": 34.9,
    "full": 239.7,
    "box": 7.0,
}
"""Seconds a person takes to label one image in each form; ``box``: per box.

From published annotation-time studies on PASCAL VOC (docs/budget.md):

- ``image``, ``point``, ``scribble``, ``full``: Bearman et al., "What's the point: semantic
  segmentation with point supervision", ECCV 2016: mean time per VOC image for image-level tags
  (20.0 s), a click on an object of each class present (22.1 s), squiggles (34.9 s) and full
  masks (239.7 s).
- ``box``: Papadopoulos et al., "Extreme clicking for efficient object annotation", ICCV 2017:
  7.0 s per box by extreme clicking (34.5 s drawn the traditional way); an image costs this per
  box it holds.
- ``block``: no study times blocks; our assumption is a scribble's time (a few strokes per
  image, each region's class named).

The per-image times are VOC means, taken as they are for images of any content; only boxes are
counted, so on images of many segments (the macaque slices) boxes cost more, against the other
forms, than on VOC.
"""

DATASETS = {"macaque": MACAQUE, "demo": DEMO}
MARKERS = "osD^vP*Xph<>"
LABELS = [
    "full",
    "point",
    "box",
    "image",
    "scribble",
    "full:0.1,point:0.9",
    "box:0.3,point:0.7",
    "full:0.05,image:0.95",
]


def parse_labels(text: str) -> WeakLabelOption:
    """``"point"`` -> ``"point"``; ``"full:0.1,point:0.9"`` -> ``{"full": 0.1, "point": 0.9}``,
    checked as the DataModules check ``weak_label``."""
    try:
        if ":" not in text:
            check_form(text)
            return cast(WeakLabelForm, text)
        pairs = (item.split(":") for item in text.split(","))
        mix = form_mix({form: float(fraction) for form, fraction in pairs})
    except (InputError, ValueError) as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from error
    return cast(WeakLabelOption, mix)


def describe(labels: WeakLabelOption) -> str:
    """A row's name: the form, or the mix as ``10% full + 90% point``."""
    if isinstance(labels, str):
        return labels
    return " + ".join(f"{100 * fraction:g}% {form}" for form, fraction in labels.items())


def annotation_seconds(dataset: WeakLabelDataset) -> float:
    """Seconds to label a training split in the forms its images train with.

    Each image costs :data:`ANNOTATION_SECONDS` of its form; a box image that per box of its
    weak label (the boxes the run trains on: one per connected segment of each foreground class
    when simulated), so only box images are read.
    """
    seconds = 0.0
    for index, name in enumerate(dataset.image_names()):
        form = dataset.form(name)
        count = 1
        if form == "box":
            _, _, mask = dataset.load(index)
            boxes = dataset.weak_label(name, mask).boxes
            if boxes is None:
                raise ValueError(f"Box image {name!r} has its boxes as a raster, not a list.")
            count = len(boxes)
        seconds += ANNOTATION_SECONDS[form] * count
    return seconds


def annotation_hours(labels: WeakLabelOption, seeds: list[int], options: dict) -> float:
    """Hours to label the training split of a row, mean over seeds (the seed deals a mix's forms
    out and draws the demo's scenes)."""
    _, data, _ = run_settings(labels, "agmm", options)
    modules = [cast(AGMMDataModule, datamodule(data, seed, options["root"])) for seed in seeds]
    splits = [cast(WeakLabelDataset, module.build_dataset("train")) for module in modules]
    return statistics.mean(annotation_seconds(split) for split in splits) / 3600


def table(
    rows: dict[str, float], results: dict[tuple[str, str], list[dict]], methods: list[str]
) -> str:
    """Markdown: one row per form or mix, its annotation hours, each method's val mIoU (mean ±
    std over seeds, then each seed's)."""
    columns = ["labels", "annotation (h)"]
    for method in methods:
        columns += [f"{method} val mIoU (%)", f"{method} per seed"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for row, hours in rows.items():
        values = [row, f"{hours:.3g}"]
        for method in methods:
            scores = [run["val_miou"] for run in results[row, method]]
            values += [cell(scores), " / ".join(f"{100 * score:.1f}" for score in scores)]
        lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def plot(
    rows: dict[str, float],
    results: dict[tuple[str, str], list[dict]],
    methods: list[str],
    title: str,
    path: Path,
) -> None:
    """Val mIoU (mean ± std) against annotation hours (log scale): a point per row and method,
    the row by its marker, the method by its colour (:data:`_runs.METHOD_COLOURS`); the legend,
    outside the axes (``save_plot``), names both, so close points need no labels on the axes."""
    figure, axes = plt.subplots(figsize=(6, 3.6))
    markers = dict(zip(rows, itertools.cycle(MARKERS)))
    for row, marker in markers.items():
        axes.plot([], [], marker, color="grey", label=row)
    for method in methods:
        colour = METHOD_COLOURS[method]
        axes.plot([], [], "-", color=colour, label=method)
        for row, hours in rows.items():
            mean, std = mean_std([run["val_miou"] for run in results[row, method]])
            axes.errorbar(hours, mean, yerr=std, fmt=markers[row], capsize=3, color=colour)
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 5, 7)))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axes.xaxis.set_minor_locator(NullLocator())
    axes.set_xlabel("annotation time of the training split (hours, log scale)")
    axes.set_ylabel("val mIoU (%), mean ± std")
    axes.set_title(title, fontsize="medium")
    save_plot(figure, axes, path)
    plt.close(figure)


def commit() -> str:
    """The checkout's short commit hash, ``+`` when its tracked files differ from it."""
    git = ["git", "-C", str(ROOT)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "diff", "--quiet", "HEAD"], capture_output=True).returncode
    return head.stdout.strip() + ("+" if dirty else "")


def section(
    dataset: str, args: argparse.Namespace, options: dict, results: dict[tuple, list[dict]]
) -> str:
    """One dataset's table (and with ``--out`` its plot): every row's hours and scores."""
    rows = {
        describe(labels): annotation_hours(labels, args.seeds, options) for labels in args.labels
    }
    by_row = {(row, m): results[dataset, row, m] for row in rows for m in args.methods}
    config = DATASETS[dataset].relative_to(ROOT)
    where = f" on {options['root']}" if options["root"] else ""
    title = f"{dataset} ({config}{where})"
    if args.out:
        png = args.out.with_name(f"{args.out.stem}_{dataset}.png")
        plot(rows, by_row, args.methods, title, png)
    return f"**{title}**\n\n{table(rows, by_row, args.methods)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=list(DATASETS), default=list(DATASETS))
    parser.add_argument("--data-root", type=Path, default=ROOT / "data" / "macaque")
    parser.add_argument(
        "--labels", nargs="+", type=parse_labels, default=[parse_labels(x) for x in LABELS]
    )
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=["agmm"])
    add_run_arguments(parser, seeds=[0, 1, 2])
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    if "macaque" in args.datasets:
        ensure(args.data_root)
    options = {
        dataset: run_options(args, root=str(args.data_root) if dataset == "macaque" else None)
        | {"config": DATASETS[dataset]}
        for dataset in args.datasets
    }
    runs = [(d, labels, m) for d in args.datasets for labels in args.labels for m in args.methods]
    jobs = [(labels, m, seed, options[d]) for d, labels, m in runs for seed in args.seeds]
    with ProcessPoolExecutor(args.parallel, multiprocessing.get_context("spawn")) as pool:
        flat = list(pool.map(train, jobs))
    count = len(args.seeds)
    results = {
        (d, describe(labels), m): flat[i * count : (i + 1) * count]
        for i, (d, labels, m) in enumerate(runs)
    }
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else platform.machine()
    overrides = parse_overrides(args.set) | parse_overrides(args.data)
    header = (
        "Val mIoU against the annotation time of the training split (seconds per image and form "
        "from Bearman et al. 2016 and Papadopoulos et al. 2017: docs/budget.md), seeds "
        f"{args.seeds}{' (--quick sizes)' if args.quick else ''}, overrides "
        f"{overrides or 'none'}, on {device} ({torch.get_num_threads()} threads), written at "
        f"commit {commit()} (runs read from results/runs/ may be older):\n\n"
        f"`python benchmarks/budget.py {shlex.join(argv)}`"
    )
    sections = [section(d, args, options[d], results) for d in args.datasets]
    publish("\n\n".join([header, *sections]), args.out)


if __name__ == "__main__":
    main()
