"""Helpers shared by the benchmark scripts: run options, trainers and writing their tables."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.loggers import Logger

from agmm_lightning.weak_labels import WeakLabelOption

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
FORM_MODEL_KEYS = ("lambda_gmm", "prior", "pseudo_mode", "confidence", "unlabelled_mass")
FORM_DATA_KEYS = ("box_core_fraction",)

# One colour per method in every plot (Okabe-Ito colours, distinct under colour blindness); full
# supervision is a black dashed line. Lines that are no method (variants of agmm, devices) take
# OTHER_COLOURS in order, so they never reuse a method's colour.
METHOD_COLOURS = {"baseline": "#999999", "cvpr": "#0072B2", "agmm": "#D55E00", "full": "#000000"}
OTHER_COLOURS = ("#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#332288", "#F0E442")


def publish(text: str, out: Path | None) -> None:
    """Print a script's Markdown tables and, given a path, write them there too."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def legend_outside(axes: Any, **kwargs: Any) -> None:
    """A legend to the right of a matplotlib ``axes``, clear of the data; save the figure with
    ``bbox_inches="tight"`` so it is kept."""
    axes.legend(
        loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0, fontsize="small", **kwargs
    )


def save_plot(figure: Any, axes: Any, path: Path) -> None:
    """Finish a plot of scores (axis from 0, no top and right spines, the legend outside the axes)
    and write it to ``path``."""
    axes.set_ylim(0, None)
    axes.spines[["top", "right"]].set_visible(False)
    legend_outside(axes)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def parse_value(text: str) -> Any:
    """``"0.1"`` -> 0.1, ``"adamw"`` -> "adamw", for ``key=value`` overrides."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(text.lower(), text)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["lr=0.01", ...]`` -> ``{"lr": 0.01, ...}``."""
    return {key: parse_value(value) for key, value in (item.split("=", 1) for item in items)}


def add_run_arguments(parser: argparse.ArgumentParser, seeds: list[int]) -> None:
    """Seeds, budget, hardware, overrides and output: the options every training script takes."""
    parser.add_argument("--seeds", type=int, nargs="+", default=seeds)
    parser.add_argument("--epochs", type=int, default=None, help="default: demo.yaml's")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once")
    parser.add_argument("--set", nargs="*", default=[], help="model overrides, key=value")
    parser.add_argument("--data", nargs="*", default=[], help="data overrides, key=value")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a pipeline check")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file; PNG beside it")


def run_options(args: argparse.Namespace, root: str | None = None) -> dict[str, Any]:
    """What every training job of a script shares, from :func:`add_run_arguments`' options.

    ``runs``: whether each run is recorded in (and resumed from) ``results/runs/``; smoke runs
    (``--quick``) are not.
    """
    return {
        "root": root,
        "runs": not args.quick,
        "epochs": args.epochs,
        "accelerator": args.accelerator,
        "quick": args.quick,
        "model": parse_overrides(args.set),
        "data": parse_overrides(args.data),
    }


def quiet_trainer(
    epochs: int,
    accelerator: str,
    root: Path | str,
    logger: Logger | bool = False,
    callbacks: list[pl.Callback] | None = None,
) -> pl.Trainer:
    """A trainer that validates after the last epoch; no checkpoints, progress bar or logger."""
    return pl.Trainer(
        callbacks=callbacks,
        accelerator=accelerator,
        devices=1,
        max_epochs=epochs,
        check_val_every_n_epoch=epochs,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )


def form_name(form: WeakLabelOption) -> str:
    """A form's name, or a mix's: its forms in alphabetical order with their percentages
    (``full10+point90``), so one mix has one name however it was written; fit for file names."""
    if isinstance(form, str):
        return form
    return "+".join(f"{name}{100 * form[name]:g}" for name in sorted(form))


def form_settings(form: WeakLabelOption) -> tuple[dict[str, Any], dict[str, Any]]:
    """The method and data settings that ``experiments/voc_<form>.yaml`` gives a weak form.

    Only the keys that tune AGMM to a form (:data:`FORM_MODEL_KEYS`, :data:`FORM_DATA_KEYS`):
    boxes take a labelled core, boxes and scribbles the agreement-gated teacher. The
    benchmarks train each form with the data keys and OEM mode with the model keys too. A mix
    takes the settings of all its forms (a box among them brings its core and teacher).

    Raises:
        ValueError: If two forms of a mix set a key to different values.
    """
    if isinstance(form, Mapping):
        model: dict[str, Any] = {}
        data: dict[str, Any] = {}
        for part in sorted(form):
            for merged, settings in zip((model, data), form_settings(part), strict=True):
                clash = [key for key in settings if merged.get(key, settings[key]) != settings[key]]
                if clash:
                    raise ValueError(f"The forms of {form} set {clash} differently.")
                merged.update(settings)
        return model, data
    config_path = EXPERIMENTS / f"voc_{form}.yaml"
    if not config_path.is_file():
        return {}, {}
    config = yaml.safe_load(config_path.read_text())
    model, data = config["model"]["init_args"], config["data"]["init_args"]
    return (
        {key: model[key] for key in FORM_MODEL_KEYS if key in model},
        {key: data[key] for key in FORM_DATA_KEYS if key in data},
    )
