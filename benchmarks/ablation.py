"""Val mIoU of baseline, cvpr and agmm for each weak-label form, against full supervision.

Every run uses the model, data and budget of one experiment config (``--config``, default
``experiments/demo.yaml``, the synthetic scenes; ``experiments/macaque.yaml`` for the real MRI
data), with weak labels simulated from the dense masks. Only ``method`` and the weak-label form
change between runs; each form takes the data settings of its ``experiments/voc_<form>.yaml``
(boxes: a labelled core) and its agmm runs the OEM settings it sets (boxes and scribbles: the
agreement-gated teacher).
Mean ± std over seeds, printed as a Markdown table (AGMM's pseudo labels and its ratio to full
supervision when agmm is among ``--methods``, and then its pseudo labels' mIoU over training and
IoU per class, from each run's CSV log); with ``--out`` the tables are written there and a bar
chart beside them (same name, ``.png``). ``--root`` points a folder-layout config at another
dataset (CI uses the test fixture); ``--quick`` shrinks everything to check the pipeline in about a
minute. Every finished run (except ``--quick`` ones) leaves a JSON record in ``results/runs/``,
named by its form, method, seed and a hash of its settings; a run whose record exists is read, not
trained, so an interrupted table resumes, scripts share runs with equal settings, and the records,
kept in git, let a table grow over several sessions or machines. Delete the records a code change
affects.

Run: ``python benchmarks/ablation.py [--config experiments/macaque.yaml] [--forms point scribble
block box] [--seeds 0 1 2] [--methods baseline cvpr agmm] [--set key=value ...] [--root DIR]
[--accelerator gpu] [--parallel N] [--out results/ablation.md]``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import importlib
import json
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
from _runs import (
    METHOD_COLOURS,
    add_run_arguments,
    form_name,
    form_settings,
    publish,
    quiet_trainer,
    run_options,
    save_plot,
)
from lightning.pytorch.loggers import CSVLogger

from agmm_lightning import AGMMSegmenter
from agmm_lightning.weak_labels import WeakLabelOption

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "experiments" / "demo.yaml"
RUNS = ROOT / "results" / "runs"
METHODS = ("baseline", "cvpr", "agmm")
QUICK_MODEL = {"encoder": "tu-test_resnet", "warmup_steps": 1}
QUICK_DATA = {"crop_size": 32, "batch_size": 2, "num_workers": 0}
QUICK_SCENES = {"num_train": 8, "num_val": 4, "image_size": 32, "batch_size": 4}


def settings(config: Path, quick: bool, epochs: int | None) -> tuple[dict, dict, int]:
    """Model arguments, data class and arguments, and epochs of a config (tiny with ``quick``)."""
    loaded = yaml.safe_load(config.read_text())
    model, data = loaded["model"]["init_args"], loaded["data"]
    if quick:
        scenes = QUICK_SCENES if data["class_path"].endswith("SyntheticDataModule") else {}
        model = model | QUICK_MODEL
        data = data | {"init_args": data["init_args"] | QUICK_DATA | scenes}
        epochs = epochs or 1
    return model, data, epochs or loaded["trainer"]["max_epochs"]


def datamodule(data: dict, seed: int, root: str | None) -> pl.LightningDataModule:
    """The DataModule of one run's data config (:func:`run_settings`) with its seed."""
    module_name, _, name = data["class_path"].rpartition(".")
    data_class = getattr(importlib.import_module(module_name), name)
    args = data["init_args"] | {"seed": seed}
    return data_class(**(args | ({"root": root} if root else {})))


def run_settings(form: WeakLabelOption, method: str, options: dict) -> tuple[dict, dict, int]:
    """Model arguments, data config and epochs of one run (``form``: a form or a mix).

    The config's settings, then the form's (:func:`form_settings`; its model keys tune OEM mode
    and only ``agmm`` runs take them), then the overrides, then the method and the form.
    """
    model_args, data, epochs = settings(options["config"], options["quick"], options["epochs"])
    form_model, form_data = form_settings(form)
    if method != "agmm":
        form_model = {}
    model_args = model_args | form_model | options["model"] | {"method": method}
    init_args = data["init_args"] | form_data | options["data"] | {"weak_label": form}
    data = data | {"init_args": init_args}
    return model_args, data, epochs


def run_identity(
    form: WeakLabelOption, seed: int, settings: tuple[dict, dict, int], options: dict
) -> dict:
    """What one run trains with (its :func:`run_settings`, seed, accelerator), the dataset by name.

    Equal identities train equal models, so a run on another machine or checkout finds the same
    record (:func:`record_path`) and a changed config or override trains anew.
    """
    model_args, data, epochs = settings
    root = options["root"] or data["init_args"].get("root")
    return {
        "form": form,
        "seed": seed,
        "model": model_args,
        "data": data["init_args"] | {"root": root and Path(root).name},
        "data_class": data["class_path"],
        "epochs": epochs,
        "accelerator": options["accelerator"],
    }


def record_path(identity: dict) -> Path:
    """``results/runs/<form>_<method>_seed<seed>_<hash of the identity>.json`` (a mix's form
    named by :func:`form_name`)."""
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    method = identity["model"]["method"]
    name = form_name(identity["form"])
    return RUNS / f"{name}_{method}_seed{identity['seed']}_{digest}.json"


def train(job: tuple) -> dict:
    """Train one model and return its final metrics, or read them from the run's record.

    Options with ``runs`` true record each finished run, its identity (:func:`run_identity`)
    beside its metrics, and read a recorded run instead of training it again.
    """
    form, method, seed, options = job
    model_args, data, epochs = run_settings(form, method, options)
    identity = run_identity(form, seed, (model_args, data, epochs), options)
    record = record_path(identity) if options["runs"] else None
    if record and record.is_file():
        return json.loads(record.read_text())
    datamodule_ = datamodule(data, seed, options["root"])
    pl.seed_everything(seed, verbose=False)
    classes, channels = datamodule_.num_classes, datamodule_.in_channels
    model = AGMMSegmenter(**model_args, num_classes=classes, in_channels=channels)
    logger = CSVLogger("logs/benchmarks", name=f"{form_name(form)}_{method}_seed{seed}")
    trainer = quiet_trainer(epochs, options["accelerator"], "logs/benchmarks", logger)
    start = time.perf_counter()
    trainer.fit(model, datamodule_)
    metrics = trainer.callback_metrics
    pseudo, student = metrics.get("train_pseudo_miou"), metrics.get("train_student_miou")
    result = {
        "val_miou": float(metrics["val_miou"]),
        "train_pseudo_miou": None if pseudo is None else float(pseudo),
        "train_student_miou": None if student is None else float(student),
        "seconds": time.perf_counter() - start,
        "steps": trainer.global_step,
        "pseudo_history": pseudo_history(Path(logger.log_dir) / "metrics.csv"),
    }
    if record:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"run": identity} | result, indent=1) + "\n")
    return result


def pseudo_history(metrics_csv: Path) -> list[dict[str, float]]:
    """Teacher against student in every epoch, from a run's CSV log: the mIoU and per-class IoU
    of the GMM's pseudo labels and of the network's prediction on the training crops, and the
    precision of the pixels the pseudo loss supervised."""
    history = []
    with metrics_csv.open() as file:
        for row in csv.DictReader(file):
            if row.get("train_pseudo_miou"):
                scores = {
                    k: float(v)
                    for k, v in row.items()
                    if v and k.startswith(("train_pseudo", "train_student"))
                }
                history.append({"epoch": int(row["epoch"])} | scores)
    return history


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
    full = results.get(("full", "baseline"))
    full_mean = mean_std([run["val_miou"] for run in full])[0] if full else None
    columns = [f"{m} val mIoU (%)" for m in methods]
    if "agmm" in methods:
        columns += ["agmm train pseudo-label mIoU (%)"]
        columns += ["agmm / full supervision"] if full_mean else []
    lines = [header, "", f"| labels | {' | '.join(columns)} |", "|---|" + "---|" * len(columns)]
    for form in forms:
        runs = {method: results[form, method] for method in methods}
        values = [cell([run["val_miou"] for run in runs[method]]) for method in methods]
        if "agmm" in methods:
            values.append(cell([run["train_pseudo_miou"] for run in runs["agmm"]]))
            if full_mean:
                agmm, _ = mean_std([run["val_miou"] for run in runs["agmm"]])
                values.append(f"{agmm / full_mean:.0%}")
        lines.append(f"| {form} | {' | '.join(values)} |")
    seconds = statistics.mean(run["seconds"] for runs in results.values() for run in runs)
    steps = max(run["steps"] for runs in results.values() for run in runs)
    footer = f"Every run: {steps} training steps, {seconds:.0f} s on average."
    if full:
        footer = (
            "Full supervision (every pixel labelled, partial CE = CE): "
            f"{cell([run['val_miou'] for run in full])} val mIoU. {footer}"
        )
    return "\n".join([*lines, "", footer + " Baseline and cvpr make no GMM pseudo labels."])


def pseudo_table(
    results: dict[tuple[str, str], list[dict]], rows: list[str], row_title: str = "labels"
) -> str:
    """Markdown: teacher against student on the training crops, at up to four epochs.

    The mIoU of AGMM's pseudo labels (G) and of the network's own prediction (net) on the same
    pixels, means over seeds in percent against the dense masks (never trained on), then G's IoU
    per class at the last epoch; "–" where a run recorded no student score. Empty when no run
    recorded a history.
    """
    histories = {
        row: [r.get("pseudo_history") for r in results.get((row, "agmm"), [])] for row in rows
    }
    histories = {row: runs for row, runs in histories.items() if runs and all(runs)}
    if not histories:
        return ""
    first = next(iter(histories.values()))[0]
    epochs = sorted({first[round(i * (len(first) - 1) / 3)]["epoch"] for i in range(4)})
    prefix = "train_pseudo_iou_"
    classes = [key.removeprefix(prefix) for key in first[-1] if key.startswith(prefix)]
    columns = [f"epoch {e}: G / net" for e in epochs] + classes
    lines = [
        "Teacher against student on the training crops (%, mean over seeds): mIoU of the GMM "
        "pseudo labels (G) and of the network's prediction (net) on the same pixels during "
        "training, then G's IoU per class at the last epoch.",
        "",
        f"| {row_title} | {' | '.join(columns)} |",
        "|---|" + "---|" * len(columns),
    ]

    def mean(values: list[float | None]) -> str:
        return "–" if None in values else f"{100 * statistics.mean(values):.1f}"  # type: ignore[arg-type]

    for row, runs in histories.items():
        by_epoch = [{entry["epoch"]: entry for entry in history} for history in runs]
        values = [
            f"{mean([run[e]['train_pseudo_miou'] for run in by_epoch])} / "
            f"{mean([run[e].get('train_student_miou') for run in by_epoch])}"
            for e in epochs
        ]
        values += [mean([history[-1][prefix + name] for history in runs]) for name in classes]
        lines.append(f"| {row} | {' | '.join(values)} |")
    return "\n".join(lines)


def scores(
    results: dict[tuple[str, str], list[dict]],
) -> dict[tuple[str, str], tuple[float, float]]:
    """Val mIoU mean and std (%) of every (form, method) run list, for :func:`bar_chart`."""
    return {run: mean_std([r["val_miou"] for r in runs]) for run, runs in results.items()}


def bar_chart(
    scores: dict[tuple[str, str], tuple[float, float]],
    forms: list[str],
    methods: list[str],
    path: Path,
) -> None:
    """Grouped bars (mean ± std of val mIoU, %) per form in the methods' colours, full supervision
    (key ``("full", "baseline")``) as a dashed line, the legend right of the axes."""
    figure, axes = plt.subplots(figsize=(1.3 * len(forms) * len(methods) / 3 + 2.6, 3.2))
    width = 0.8 / max(len(methods), 2)
    for index, method in enumerate(methods):
        stats = [scores[form, method] for form in forms]
        offset = (index - (len(methods) - 1) / 2) * width
        positions = [position + offset for position in range(len(forms))]
        axes.bar(
            positions,
            [mean for mean, _ in stats],
            width,
            yerr=[std for _, std in stats],
            capsize=3,
            color=METHOD_COLOURS[method],
            label=method,
        )
    if ("full", "baseline") in scores:
        full, _ = scores["full", "baseline"]
        axes.axhline(
            full,
            color=METHOD_COLOURS["full"],
            linestyle="--",
            linewidth=1,
            label="full supervision",
        )
    axes.set_xticks(range(len(forms)), forms)
    axes.set_xlabel("weak labels")
    axes.set_ylabel("val mIoU (%), mean ± std")
    save_plot(figure, axes, path)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEMO, help="an experiment config")
    parser.add_argument("--forms", nargs="+", default=["point", "scribble", "block", "box"])
    parser.add_argument("--root", default=None, help="another dataset of a folder-layout config")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--no-full", action="store_true", help="skip full supervision")
    add_run_arguments(parser, seeds=[0, 1, 2])
    args = parser.parse_args(argv)
    if "full" in args.forms:
        parser.error("full supervision is run unless --no-full; list only weak forms in --forms")
    options = run_options(args, root=args.root) | {"config": args.config}
    runs = [] if args.no_full else [("full", "baseline")]
    runs += [(form, m) for form in args.forms for m in args.methods]
    jobs = [(form, method, seed, options) for form, method in runs for seed in args.seeds]
    with ProcessPoolExecutor(args.parallel, multiprocessing.get_context("spawn")) as pool:
        flat = list(pool.map(train, jobs))
    count = len(args.seeds)
    results = {run: flat[i * count : (i + 1) * count] for i, run in enumerate(runs)}

    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else platform.machine()
    overrides = options["model"] | options["data"]
    config = args.config.resolve().relative_to(ROOT)
    header = (
        f"Settings of {config}{f' on {args.root}' if args.root else ''}"
        f"{' (--quick sizes)' if args.quick else ''}, seeds {args.seeds}, "
        f"overrides {overrides or 'none'}, on {device} ({torch.get_num_threads()} threads)."
    )
    text = table(results, args.forms, args.methods, header)
    pseudo = pseudo_table(results, args.forms)
    text += f"\n\n{pseudo}" if pseudo else ""
    publish(text, args.out)
    if args.out:
        bar_chart(scores(results), args.forms, args.methods, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
