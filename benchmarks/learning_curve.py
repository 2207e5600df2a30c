"""Full supervision's learning curve: val mIoU against the budget, to find where it settles.

A weak form's score is read against full supervision at the same budget; that reference means
something only where full supervision has settled (its seeds within a few points). Every run uses
the model and data of one experiment config (``experiments/macaque.yaml`` for the real MRI data)
with every pixel labelled, at each budget of ``--budgets`` (epochs); runs are recorded and read
back like those of ``ablation.py`` (the same records: a budget it trained is not trained again).

Run: ``python benchmarks/learning_curve.py --config experiments/macaque.yaml --root data/macaque
--budgets 40 80 --seeds 0 1 2 --parallel 2 --out results/macaque_full_curve.md``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from _runs import add_run_arguments, publish, run_options
from ablation import DEMO, ROOT, train
from macaque import ensure


def curve_table(results: dict[int, list[dict]], seeds: list[int], header: str) -> str:
    """One row per budget: its steps, each seed's val mIoU, mean ± std and the seeds' range."""
    lines = [
        header,
        "",
        "| epochs | steps | "
        + " | ".join(f"seed {seed}" for seed in seeds)
        + " | mean ± std | range |",
        "|---" * (len(seeds) + 4) + "|",
    ]
    for epochs, runs in results.items():
        scores = [100 * run["val_miou"] for run in runs]
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        cells = [
            str(epochs),
            str(runs[0]["steps"]),
            *(f"{score:.1f}" for score in scores),
            f"{statistics.mean(scores):.1f} ± {spread:.1f}",
            f"{max(scores) - min(scores):.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEMO, help="an experiment config")
    parser.add_argument("--root", default=None, help="another dataset of a folder-layout config")
    add_run_arguments(parser, seeds=[0, 1, 2])
    parser.add_argument("--budgets", type=int, nargs="+", default=[40, 80], help="epochs")
    args = parser.parse_args(argv)
    if args.root and Path(args.config).name == "macaque.yaml":
        ensure(Path(args.root))
    budgets = [1] if args.quick else args.budgets
    options = run_options(args, root=args.root) | {"config": args.config}
    jobs = [
        ("full", "baseline", seed, options | {"epochs": epochs})
        for epochs in budgets
        for seed in args.seeds
    ]
    with ProcessPoolExecutor(args.parallel, multiprocessing.get_context("spawn")) as pool:
        flat = list(pool.map(train, jobs))
    count = len(args.seeds)
    results = {epochs: flat[i * count : (i + 1) * count] for i, epochs in enumerate(budgets)}
    config = args.config.resolve().relative_to(ROOT)
    header = (
        f"Full supervision with the settings of {config}"
        f"{f' on {args.root}' if args.root else ''}{' (--quick sizes)' if args.quick else ''}: "
        "val mIoU (%) at each budget."
    )
    publish(curve_table(results, args.seeds, header), args.out)


if __name__ == "__main__":
    main()
