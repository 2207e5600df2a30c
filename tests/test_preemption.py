"""Nothing lost: the latest checkpoint whatever the validation interval, SIGTERM, resume."""

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.utilities.exceptions import SIGTERMException

from agmm_lightning import AGMMSegmenter
from agmm_lightning.callbacks import default_callbacks
from agmm_lightning.cli import latest_checkpoint, main
from agmm_lightning.data import SyntheticDataModule
from agmm_lightning.data.base import EpochShuffleSampler

CONFIG = str(Path(__file__).parent / "conf" / "demo.yaml")


def tiny_fit(tmp_path: Path, **trainer_options) -> Trainer:
    options = {"enable_progress_bar": False, "logger": False}
    model = AGMMSegmenter(num_classes=6, arch="Unet", encoder="tu-test_resnet", warmup_steps=1)
    data = SyntheticDataModule(
        num_train=8, num_val=4, image_size=32, crop_size=32, batch_size=4, augment=False
    )
    trainer = Trainer(
        callbacks=default_callbacks(options),
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
from agmm_lightning import callbacks, cli

class Preempt(Callback):
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

callbacks.DEFAULT_CALLBACKS["preempt"] = (Preempt, Preempt, {})
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


# The same fit sent SLURM's requeue signal (SIGUSR1) at step 3.
REQUEUED = PREEMPTED.replace("signal.SIGTERM", "signal.SIGUSR1")


def test_slurm_requeue_signal_saves_the_step_and_its_data_position(tmp_path):
    """Under SLURM, SIGUSR1 (``#SBATCH --signal=USR1@90``) makes Lightning save
    ``hpc_ckpt_1.ckpt`` (data position included) and requeue the job through ``scontrol``,
    which a stand-in on PATH records here."""
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    scontrol = bin_folder / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "requeued"}\n')
    scontrol.chmod(0o755)
    slurm = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "agmm", "SLURM_JOB_ID": "4242"}
    slurm |= {"SLURM_NODEID": "0", "SLURM_LOCALID": "0", "SLURM_PROCID": "0"}
    env = os.environ | slurm | {"PATH": f"{bin_folder}:{os.environ['PATH']}"}
    args = ["fit", "--config", CONFIG, f"--trainer.default_root_dir={tmp_path}"]
    budget = ["--trainer.max_epochs=3", "--trainer.enable_progress_bar=false"]
    run = subprocess.run(
        [sys.executable, "-c", REQUEUED, *args, *budget], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4242"]
    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    assert saved["global_step"] == 3
    (position,) = (value for key, value in saved.items() if key.endswith("DataModule"))
    assert position["epoch"] == 1 and position["consumed"] > 0


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


class SigtermAt(Callback):
    """Send this process SIGTERM (what SLURM sends at preemption) after ``step`` steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def fit_epochs(
    root: Path,
    epochs: int,
    ckpt_path: Path | None = None,
    workers: int = 0,
    stop: Callback | None = None,
):
    """The final weights of a seeded tiny fit of ``epochs`` epochs of 3 batches with
    augmentation on, interrupted by ``stop`` when given."""
    seed_everything(0)
    model = AGMMSegmenter(num_classes=6, arch="Unet", encoder="tu-test_resnet", warmup_steps=1)
    data = SyntheticDataModule(
        num_train=12, num_val=4, image_size=48, crop_size=32, batch_size=4, num_workers=workers
    )
    options = {"enable_progress_bar": False, "logger": False}
    trainer = Trainer(
        max_epochs=epochs,
        callbacks=default_callbacks(options, [stop] if stop else []),
        default_root_dir=root,
        enable_model_summary=False,
        **options,
    )
    try:
        trainer.fit(model, data, ckpt_path=ckpt_path)
    except SIGTERMException:
        assert stop is not None
    return model.state_dict()


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name, value in first.items():
        torch.testing.assert_close(second[name], value, rtol=0, atol=0, msg=name)


def test_a_resumed_fit_equals_the_uninterrupted_one(tmp_path):
    """Augmentation is seeded per sample from (seed, epoch, index): a fit stopped after two
    epochs and resumed from last.ckpt ends with the weights of the one that never stopped."""
    whole = fit_epochs(tmp_path / "whole", 4)
    fit_epochs(tmp_path / "parts", 4, stop=StopAfter(2))
    resumed = fit_epochs(tmp_path / "parts", 4, tmp_path / "parts" / "checkpoints" / "last.ckpt")
    assert_same_weights(whole, resumed)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_fit_preempted_mid_epoch_resumes_at_its_sample(tmp_path, workers):
    """SIGTERM after 4 steps (epoch 1, batch 1 of 3): the checkpoint holds the data position,
    and the resumed fit trains on the samples the uninterrupted one did, in its order."""
    whole = fit_epochs(tmp_path / "whole", 3, workers=workers)
    fit_epochs(tmp_path / "parts", 3, workers=workers, stop=SigtermAt(4))
    last = tmp_path / "parts" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["SyntheticDataModule"] == {
        "epoch": 1,
        "consumed": 4,
    }
    resumed = fit_epochs(tmp_path / "parts", 3, last, workers=workers)
    assert_same_weights(whole, resumed)


def test_the_sampler_deals_one_order_to_the_ranks_and_resumes_inside_it():
    single = EpochShuffleSampler(10, seed=3)
    single.set_epoch(2)
    order = list(single)
    ranks = [EpochShuffleSampler(10, seed=3, rank=rank, world_size=2) for rank in range(2)]
    for sampler in ranks:
        sampler.set_epoch(2)
    first, second = (list(sampler) for sampler in ranks)
    assert [i for pair in zip(first, second, strict=True) for i in pair] == order
    for sampler in ranks:
        sampler.resume(2, consumed=4)
    assert sorted(sum((list(sampler) for sampler in ranks), [])) == sorted(order[4:])
    assert all(index.epoch == 2 for index in ranks[0])
    ranks[0].set_epoch(3)
    assert len(list(ranks[0])) == 5, "a new epoch starts from its beginning"


def test_the_same_seed_gives_the_same_fit_whatever_the_worker_count(tmp_path):
    assert_same_weights(fit_epochs(tmp_path / "a", 2), fit_epochs(tmp_path / "b", 2))
    assert_same_weights(fit_epochs(tmp_path / "c", 2), fit_epochs(tmp_path / "d", 2, workers=2))
