"""What each part of OEM mode adds: agmm with one part switched off at a time, and cvpr mode.

Every row trains one weak form with the settings of one experiment config, as ``ablation.py``
does, and changes only the options shown: ``cvpr`` mode, ``agmm`` with every part, and ``agmm``
without the GMM pseudo loss, with the pseudo loss of earlier releases (soft: CE against G on
every unlabelled cell), with hard pseudo labels without the agreement gate, with a tenth of the
soft loss's weight, with the pseudo loss training the segmentation head alone, with the soft loss
only where the GMM is more confident than the prediction, with an unbounded unlabelled fitting
mass, without CVPR mode's kernel terms, without the maximization loss, with the global mixtures in
the posterior instead of per-image adapted means, and with the prediction instead of a uniform
prior in the GMM posterior (with and without the pseudo loss). Val mIoU, the train mIoU of the
GMM pseudo labels (teacher) and of the network (student) on the same pixels, mean ± std over
seeds, then (for runs that logged it) both during training and G per class; with ``--out``, a
plot of teacher and student over training beside the table. Runs are recorded in
``results/runs/`` and shared with ``ablation.py`` (see there): a rerun resumes.

Run: ``python benchmarks/terms.py [--config experiments/macaque.yaml --root data/macaque]
[--form point] [--variants agmm no_pseudo ...] [--seeds 0 1 2] [--parallel 2]
[--out results/macaque_terms.md]``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import matplotlib
import torch
from _runs import (
    METHOD_COLOURS,
    OTHER_COLOURS,
    add_run_arguments,
    publish,
    run_options,
    save_plot,
)
from ablation import DEMO, cell, pseudo_table, train

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "cvpr": ("cvpr", {}),
    "agmm": ("agmm", {}),
    "no_pseudo": ("agmm", {"lambda_gmm": 0}),
    "soft_pseudo": ("agmm", {"pseudo_mode": "soft"}),
    "hard_pseudo": ("agmm", {"pseudo_mode": "hard"}),
    "weak_pseudo": ("agmm", {"pseudo_mode": "soft", "lambda_gmm": 0.1}),
    "head_pseudo": ("agmm", {"pseudo_mode": "soft", "pseudo_gradient": "head"}),
    "surer_pseudo": ("agmm", {"pseudo_mode": "surer"}),
    "unbounded_fit": ("agmm", {"unlabelled_mass": None}),
    "prediction_prior": ("agmm", {"prior": "prediction"}),
    "prediction_prior_no_pseudo": ("agmm", {"prior": "prediction", "lambda_gmm": 0}),
    "no_kernel": ("agmm", {"lambda_kernel": 0}),
    "no_maximization": ("agmm", {"lambda_max": 0}),
    "global_means": ("agmm", {"adaptation": None}),
}


def jobs(args: argparse.Namespace) -> list[tuple]:
    """One ``ablation.train`` job per variant and seed, in that order."""
    options = run_options(args, root=args.root) | {"config": args.config}
    return [
        (args.form, method, seed, options | {"model": options["model"] | overrides})
        for method, overrides in (VARIANTS[name] for name in args.variants)
        for seed in args.seeds
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEMO, help="an experiment config")
    parser.add_argument("--root", default=None, help="another dataset of a folder-layout config")
    parser.add_argument("--form", default="point")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    add_run_arguments(parser, seeds=[0, 1, 2])
    args = parser.parse_args(argv)
    with ProcessPoolExecutor(args.parallel, multiprocessing.get_context("spawn")) as pool:
        flat = list(pool.map(train, jobs(args)))
    count = len(args.seeds)
    runs = {name: flat[i * count : (i + 1) * count] for i, name in enumerate(args.variants)}

    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else platform.machine()
    config = args.config.resolve().relative_to(Path(__file__).resolve().parents[1])
    lines = [
        f"{args.form} labels, settings of {config}{f' on {args.root}' if args.root else ''}"
        f"{' (--quick sizes)' if args.quick else ''}, seeds {args.seeds}, on {device}; "
        f"{max(run['steps'] for run in flat)} training steps per run.",
        "",
        "| variant | method, options | val mIoU (%) | train mIoU of G (%) | of the network (%) |",
        "|---|---|---|---|---|",
    ]
    for name, results in runs.items():
        method, overrides = VARIANTS[name]
        settings = ", ".join([method, *(f"{k}={v}" for k, v in overrides.items())])
        scores = [
            cell([r[key] for r in results]) if all(r.get(key) is not None for r in results) else "–"
            for key in ("val_miou", "train_pseudo_miou", "train_student_miou")
        ]
        lines.append(f"| {name} | {settings} | {' | '.join(scores)} |")
    agmm_runs = {(name, "agmm"): results for name, results in runs.items() if name != "cvpr"}
    history = pseudo_table(agmm_runs, [name for name, _ in agmm_runs], "variant")
    text = "\n".join(lines) + (f"\n\n{history}" if history else "")
    publish(text, args.out)
    if args.out and history:
        teacher_and_student(agmm_runs, args.out.with_suffix(".png"))


def variant_colours(names: list[str]) -> dict[str, str]:
    """A method's colour for the variant named after it (``agmm``, ``cvpr``), the other colours
    in order for the rest."""
    others = iter(OTHER_COLOURS)
    return {name: METHOD_COLOURS.get(name) or next(others) for name in names}


def teacher_and_student(runs: dict[tuple[str, str], list[dict]], path: Path) -> None:
    """mIoU of G (solid) and of the network (dashed) on the training crops over the epochs, mean
    over seeds, one colour per variant (:func:`variant_colours`), the legend right of the axes."""
    figure, axes = plt.subplots(figsize=(6.5, 3.5))
    colours = variant_colours([name for name, _ in runs])
    for (name, _), results in runs.items():
        histories = [r.get("pseudo_history") or [] for r in results]
        if not all(histories):
            continue
        epochs = [entry["epoch"] + 1 for entry in histories[0]]
        for key, style in (("train_pseudo_miou", "-"), ("train_student_miou", "--")):
            if all(key in entry for history in histories for entry in history):
                curve = [
                    100 * statistics.mean(history[i][key] for history in histories)
                    for i in range(len(epochs))
                ]
                label = f"{name}: {'G (GMM labels)' if style == '-' else 'network'}"
                axes.plot(epochs, curve, style, marker=".", color=colours[name], label=label)
    axes.set_xlabel("epoch")
    axes.set_ylabel("train-crop mIoU (%)")
    save_plot(figure, axes, path)
    plt.close(figure)


if __name__ == "__main__":
    main()
