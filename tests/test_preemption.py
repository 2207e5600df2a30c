"""Nothing lost: the latest checkpoint whatever the validation interval, SIGTERM, resume."""

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

from agmm_lightning import AGMMSegmenter
from agmm_lightning.cli import latest_checkpoint, long_run_callbacks, main
from agmm_lightning.data import SyntheticDataModule

CONFIG = str(Path(__file__).parent / "conf" / "demo.yaml")


def tiny_fit(tmp_path: Path, **trainer_options) -> Trainer:
    options = {"enable_progress_bar": False, "logger": False}
    model = AGMMSegmenter(num_classes=6, arch="Unet", encoder="tu-test_resnet", warmup_steps=1)
    data = SyntheticDataModule(
        num_train=8, num_val=4, image_size=32, crop_size=32, batch_size=4, augment=False
    )
    trainer = Trainer(
        callbacks=long_run_callbacks(options, [], model),
        default_root_dir=tmp_path,
        enable_model_summary=False,
        **options,
        **trainer_options,
    )
    trainer.fit(model, data)
    return trainer


def saved_step(path: Path) -> int:
    return torch.load(path, weights_only=True)["global_step"]


def test_last_checkpoint_without_validation_in_the_run(tmp_path):
    """Validation rarer than the run (common on long runs) still leaves the latest state."""
    tiny_fit(tmp_path, max_epochs=3, check_val_every_n_epoch=1000)
    assert saved_step(tmp_path / "checkpoints" / "last.ckpt") == 6


def test_last_checkpoint_at_the_end_of_a_step_budget_that_ends_mid_epoch(tmp_path):
    tiny_fit(tmp_path, max_steps=3, check_val_every_n_epoch=10)
    assert saved_step(tmp_path / "checkpoints" / "last.ckpt") == 3


# A fit through the command line that SIGTERM (what SLURM sends at preemption) stops at step 3.
PREEMPTED = """
import os, signal, sys
from lightning.pytorch import Callback
import agmm_lightning.cli as cli

class Preempt(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

default = cli.long_run_callbacks
cli.long_run_callbacks = lambda *args: default(*args) + [Preempt()]
cli.main(sys.argv[1:])
"""


def test_sigterm_saves_the_step_exits_non_zero_and_last_resumes(tmp_path, caplog):
    args = ["fit", "--config", CONFIG, f"--trainer.default_root_dir={tmp_path}"]
    budget = ["--trainer.max_epochs=4", "--trainer.enable_progress_bar=false"]
    stopped = subprocess.run(
        [sys.executable, "-c", PREEMPTED, *args, *budget], capture_output=True, text=True
    )
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("stopped by SIGTERM")
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert 3 <= saved_step(last) < 8 and latest_checkpoint(tmp_path) == last
    with caplog.at_level(logging.INFO):
        main([*args, *budget, "--ckpt_path=last"])
    assert f"Restored all states from the checkpoint at {last}" in caplog.text
    resumed = tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt"
    assert saved_step(resumed) == 8


def test_last_without_an_earlier_run_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                "fit",
                "--config",
                CONFIG,
                f"--trainer.default_root_dir={tmp_path}",
                "--ckpt_path=last",
            ]
        )
    assert exit_info.value.code == 2
    first = capsys.readouterr().err.strip().splitlines()[0]
    assert first.startswith(
        f"error: --ckpt_path=last: no checkpoint of an earlier run under {tmp_path}"
    )


class StopAfter(Callback):
    """Interrupt a fit at the end of an epoch, as a time limit would."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epochs:
            trainer.should_stop = True


def fit_epochs(
    root: Path, epochs: int, ckpt_path: Path | None = None, workers: int = 0, stop: int = 0
):
    """The final weights of a seeded tiny fit of ``epochs`` epochs with augmentation on,
    stopped after ``stop`` epochs when given."""
    seed_everything(0)
    model = AGMMSegmenter(num_classes=6, arch="Unet", encoder="tu-test_resnet", warmup_steps=1)
    data = SyntheticDataModule(
        num_train=8, num_val=4, image_size=48, crop_size=32, batch_size=4, num_workers=workers
    )
    options = {"enable_progress_bar": False, "logger": False}
    trainer = Trainer(
        max_epochs=epochs,
        callbacks=long_run_callbacks(options, [], model) + ([StopAfter(stop)] if stop else []),
        default_root_dir=root,
        enable_model_summary=False,
        **options,
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return model.state_dict()


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=0, atol=0, msg=name)


def test_a_resumed_fit_equals_the_uninterrupted_one(tmp_path):
    """Augmentation is seeded per sample from (seed, epoch, index): a fit stopped after two
    epochs and resumed from last.ckpt ends with the weights of the one that never stopped."""
    whole = fit_epochs(tmp_path / "whole", 4)
    fit_epochs(tmp_path / "parts", 4, stop=2)
    resumed = fit_epochs(tmp_path / "parts", 4, tmp_path / "parts" / "checkpoints" / "last.ckpt")
    assert_same_weights(whole, resumed)


def test_the_same_seed_gives_the_same_fit_whatever_the_worker_count(tmp_path):
    assert_same_weights(fit_epochs(tmp_path / "a", 2), fit_epochs(tmp_path / "b", 2))
    assert_same_weights(fit_epochs(tmp_path / "c", 2), fit_epochs(tmp_path / "d", 2, workers=2))
