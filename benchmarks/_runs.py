"""Helpers shared by the benchmark scripts: run options, trainers and writing their tables."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.loggers import Logger

BOX_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "voc_box.yaml"
BOX_MODEL_KEYS = ("prior", "pseudo_mode", "confidence")


def publish(text: str, out: Path | None) -> None:
    """Print a script's Markdown tables and, given a path, write them there too."""
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


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
    """What every training job of a script shares, from :func:`add_run_arguments`' options."""
    return {
        "root": root,
        "epochs": args.epochs,
        "accelerator": args.accelerator,
        "quick": args.quick,
        "model": parse_overrides(args.set),
        "data": parse_overrides(args.data),
    }


def quiet_trainer(
    epochs: int, accelerator: str, root: Path | str, logger: Logger | bool = False
) -> pl.Trainer:
    """A trainer that validates after the last epoch; no checkpoints, progress bar or logger."""
    return pl.Trainer(
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


def box_settings() -> tuple[dict[str, Any], dict[str, Any]]:
    """The model and data settings that ``experiments/voc_box.yaml`` gives boxes.

    A labelled box core, and for AGMM a uniform prior with hard pseudo labels; the benchmarks
    train on boxes with them.
    """
    config = yaml.safe_load(BOX_CONFIG.read_text())
    model = {key: config["model"]["init_args"][key] for key in BOX_MODEL_KEYS}
    return model, {"box_core_fraction": config["data"]["init_args"]["box_core_fraction"]}
