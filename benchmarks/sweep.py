"""Mixture count × OEM momentum grid of point-supervised AGMM on the synthetic data.

Every cell trains ``method: agmm`` with the settings of ``experiments/demo.yaml`` (as
``ablation.py`` does) and only ``mixture_count`` and ``oem_momentum`` changed; val mIoU is averaged
over the seeds. Prints a Markdown table; with ``--out`` writes it there and a heat map beside it
(same name, ``.png``). ``AGMMSegmenter``'s defaults (``mixture_count=1``, ``oem_momentum=0.9``)
are set from this grid (``results/sweep.md``, 2 seeds on a CPU): every cell lies within 2.8 points
of the others, and the best one, K = 1 at m = 0.99, scored the same as the defaults over three
seeds (``results/ablation_point_m099.md``), so the cheapest setting stays.

Run: ``python benchmarks/sweep.py [--counts 1 2 4] [--momenta 0.5 0.9 0.99] [--seeds 0]
[--accelerator gpu] [--parallel N] [--out results/sweep.md]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import matplotlib
import torch
from _runs import add_run_arguments, publish, run_options
from ablation import DEMO, train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DEFAULTS = (1, 0.9)  # AGMMSegmenter's mixture_count and oem_momentum
# The colour saturates this many points from the defaults' cell: about the gap between the
# partial-CE baseline and full supervision on the demo, so a cell's colour shows its difference
# on the scale that matters, and differences of a seed's spread stay pale.
COLOUR_SPAN = 10.0


def heat_map(
    means: list[list[float]],
    stds: list[list[float]] | None,
    counts: list[int],
    momenta: list[float],
    path: Path,
) -> None:
    """Cells coloured by their val mIoU's difference (points) from the defaults' cell (or from the
    grid's mean when the grid lacks it) on a fixed ±``COLOUR_SPAN`` scale, each annotated with its
    mean ± std over seeds (``stds`` None: the mean alone); components down, momentum across."""
    cells = [value for row in means for value in row]
    if DEFAULTS[0] in counts and DEFAULTS[1] in momenta:
        reference = means[counts.index(DEFAULTS[0])][momenta.index(DEFAULTS[1])]
        name = f"the defaults (K={DEFAULTS[0]}, m={DEFAULTS[1]})"
    else:
        reference, name = statistics.mean(cells), "the grid's mean"
    span = max([COLOUR_SPAN, *(abs(value - reference) for value in cells)])
    differences = [[value - reference for value in row] for row in means]
    figure, axes = plt.subplots(figsize=(1.3 * len(momenta) + 2.4, 0.9 * len(counts) + 1.4))
    image = axes.imshow(differences, cmap="RdBu", vmin=-span, vmax=span)
    for row, values in enumerate(means):
        for col, value in enumerate(values):
            text = f"{value:.1f}" + (f"\n± {stds[row][col]:.1f}" if stds else "")
            dark = abs(differences[row][col]) > 0.6 * span
            axes.text(col, row, text, ha="center", va="center", color="white" if dark else "black")
    axes.set_xticks(range(len(momenta)), [str(m) for m in momenta])
    axes.set_yticks(range(len(counts)), [str(k) for k in counts])
    axes.set_xlabel("oem_momentum")
    axes.set_ylabel("mixture_count")
    axes.set_title("val mIoU (%)" + (", mean ± std over seeds" if stds else ""), fontsize="medium")
    bar = figure.colorbar(image)
    bar.set_label(f"difference from {name}, points", fontsize="small")
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--momenta", type=float, nargs="+", default=[0.5, 0.9, 0.99])
    parser.add_argument("--form", default="point")
    add_run_arguments(parser, seeds=[0])
    args = parser.parse_args()
    options = run_options(args) | {"config": DEMO}
    cells = [(k, m) for k in args.counts for m in args.momenta]
    cell_options = [
        options | {"model": options["model"] | {"mixture_count": k, "oem_momentum": m}}
        for k, m in cells
    ]
    jobs = [(args.form, "agmm", seed, cell) for cell in cell_options for seed in args.seeds]
    with ProcessPoolExecutor(args.parallel, multiprocessing.get_context("spawn")) as pool:
        flat = [run["val_miou"] for run in pool.map(train, jobs)]
    seeds = len(args.seeds)
    per_cell = [
        [100 * value for value in flat[i * seeds : (i + 1) * seeds]] for i in range(len(cells))
    ]
    means = [statistics.mean(values) for values in per_cell]
    width = len(args.momenta)
    grid = [means[row * width : (row + 1) * width] for row in range(len(args.counts))]
    spreads = [statistics.stdev(values) if seeds > 1 else 0.0 for values in per_cell]
    std_grid = [spreads[row * width : (row + 1) * width] for row in range(len(args.counts))]
    best = max(range(len(cells)), key=means.__getitem__)

    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else platform.machine()
    lines = [
        f"Synthetic demo data, {args.form} labels, settings of experiments/demo.yaml"
        f"{' (--quick sizes)' if args.quick else ''}, seeds {args.seeds}, on {device}: "
        "val mIoU (%) of agmm.",
        "",
        "| mixture_count \\ oem_momentum | " + " | ".join(str(m) for m in args.momenta) + " |",
        "|---|" + "---|" * len(args.momenta),
        *(
            f"| {k} | " + " | ".join(f"{v:.1f}" for v in row) + " |"
            for k, row in zip(args.counts, grid, strict=True)
        ),
        "",
        f"Best: mixture_count={cells[best][0]}, oem_momentum={cells[best][1]} ({means[best]:.1f}).",
    ]
    text = "\n".join(lines)
    publish(text, args.out)
    if args.out:
        stds = std_grid if seeds > 1 else None
        heat_map(grid, stds, args.counts, args.momenta, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
