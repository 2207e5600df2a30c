"""DDP on CPU (2 ranks, gloo, ``ddp_spawn``): the OEM refit sees the global batch.

What these tests prove:

- Under DDP the sufficient statistics of every rank are summed before the M-step, so both ranks
  end with identical mixtures, equal (to float tolerance) to those of ONE process that trained on
  the same global batches (batch 4 = 2 ranks x 2) in the same order, over 4 steps and 2 epochs.
- Only the statistics path is compared: ``lr=0`` keeps the network fixed (DDP averages per-rank
  mean losses, which is not the global batch's mean loss over labelled pixels), and BatchNorm
  layers run on their running statistics, since with per-rank BatchNorm a sample's features
  depend on which samples share its rank's batch (``sync_batchnorm`` removes that on GPUs; torch's
  SyncBatchNorm has no CPU kernel). One component per class: with K > 1 the k-means++ seeds are
  drawn from candidates pooled per rank, a different (equally valid) sample than one process's;
  the ranks still agree with each other, which is checked with K = 2.
- The order of samples under DDP is deterministic, and its global batches are those of one
  process with the global batch size: ``EpochShuffleSampler`` deals each epoch's permutation out
  to the ranks, and Lightning uses it as it is.
- A checkpoint written under DDP restores the same mixtures on one process, which then trains on.

Under ``ddp_spawn`` the model object in the test process is not the one trained, so the ranks
write what they saw into files.
"""

from __future__ import annotations

import shlex
import string
import subprocess
from functools import partial
from pathlib import Path

import helpers
import lightning.pytorch as pl
import pytest
import torch
import yaml
from helpers import tiny_segmenter, tiny_trainer
from torch import nn

from agmm_lightning.cli import main
from agmm_lightning.data import SyntheticDataModule
from agmm_lightning.data.base import EpochShuffleSampler

NUM_TRAIN = 8
WORLD_SIZE = 2
RANK_BATCH = 2
GLOBAL_BATCH = WORLD_SIZE * RANK_BATCH
EPOCHS = 2


class FrozenBatchNorm(pl.Callback):
    """Run BatchNorm on its running statistics, so features do not depend on the batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for module in pl_module.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


class RecordRun(pl.Callback):
    """Write each rank's per-step sample names and its final mixtures to ``rank<r>.pt``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.names: list[list[str]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.names.append(list(batch["name"]))

    def on_train_end(self, trainer, pl_module):
        mixtures = {k: v.cpu().clone() for k, v in pl_module.model.mixtures.state_dict().items()}
        record = {"names": self.names, "mixtures": mixtures, "global_step": trainer.global_step}
        torch.save(record, self.folder / f"rank{trainer.global_rank}.pt")


class RecordRestored(pl.Callback):
    """Keep the mixtures as restored from the checkpoint (restoring precedes ``on_fit_start``)."""

    def on_fit_start(self, trainer, pl_module):
        self.mixtures = {k: v.clone() for k, v in pl_module.model.mixtures.state_dict().items()}


def ddp_rank_order(rank: int, epoch: int) -> list[int]:
    """The indices ``rank`` trains on in ``epoch``."""
    sampler = EpochShuffleSampler(NUM_TRAIN, seed=0, rank=rank, world_size=WORLD_SIZE)
    sampler.set_epoch(epoch)
    return list(sampler)


def fit(
    folder: Path,
    data: SyntheticDataModule,
    devices: int = 1,
    epochs: int = EPOCHS,
    mixture_count: int = 1,
    callbacks: tuple[pl.Callback, ...] = (),
    ckpt_path: Path | None = None,
) -> pl.Trainer:
    """Train the tiny model (fixed weights: lr=0), each rank recording what it saw."""
    folder.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(0)
    model = tiny_segmenter(warmup_steps=1, lr=0.0, mixture_count=mixture_count)
    trainer = tiny_trainer(
        folder,
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_epochs=epochs,
        limit_val_batches=0,
        enable_checkpointing=True,
        callbacks=[FrozenBatchNorm(), RecordRun(folder), *callbacks],
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


tiny_data = partial(helpers.tiny_data, num_train=NUM_TRAIN, batch_size=RANK_BATCH, augment=False)


def load_ranks(folder: Path, world_size: int = WORLD_SIZE) -> list[dict]:
    return [torch.load(folder / f"rank{rank}.pt") for rank in range(world_size)]


def assert_ranks_agree(ranks: list[dict]) -> None:
    first, *others = ranks
    assert first["mixtures"]["initialized"].any()
    for other in others:
        for name, value in first["mixtures"].items():
            assert torch.equal(other["mixtures"][name], value), name


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ddp")
    fit(folder, tiny_data(), devices=WORLD_SIZE)
    return folder


def test_both_ranks_hold_identical_mixtures(ddp_run: Path) -> None:
    assert_ranks_agree(load_ranks(ddp_run))


def test_ddp_sample_order_is_deterministic(ddp_run: Path) -> None:
    steps_per_epoch = NUM_TRAIN // GLOBAL_BATCH
    for rank, record in enumerate(load_ranks(ddp_run)):
        expected = [ddp_rank_order(rank, epoch) for epoch in range(EPOCHS)]
        names = [f"train_{i:05d}" for order in expected for i in order]
        assert sum(record["names"], []) == names
        assert record["global_step"] == EPOCHS * steps_per_epoch
    assert ddp_rank_order(0, 0) != ddp_rank_order(0, 1), "each epoch has its own order"


def test_ddp_mixtures_equal_one_process_on_the_global_batch(ddp_run: Path, tmp_path: Path) -> None:
    fit(tmp_path, tiny_data(batch_size=GLOBAL_BATCH))
    (single,) = load_ranks(tmp_path, 1)
    ranks = load_ranks(ddp_run)
    for step, names in enumerate(single["names"]):
        assert sorted(names) == sorted(sum((rank["names"][step] for rank in ranks), []))
    for name, value in single["mixtures"].items():
        torch.testing.assert_close(ranks[0]["mixtures"][name], value, rtol=1e-4, atol=1e-5)


def test_ranks_agree_with_several_components(tmp_path: Path) -> None:
    fit(tmp_path, tiny_data(), devices=WORLD_SIZE, epochs=1, mixture_count=2)
    assert_ranks_agree(load_ranks(tmp_path))


def test_a_ddp_checkpoint_resumes_on_one_process(ddp_run: Path, tmp_path: Path) -> None:
    (checkpoint,) = (ddp_run / "checkpoints").glob("*.ckpt")
    saved = torch.load(checkpoint, weights_only=False)["state_dict"]
    restored = RecordRestored()
    trainer = fit(
        tmp_path, tiny_data(), epochs=EPOCHS + 1, callbacks=(restored,), ckpt_path=checkpoint
    )
    (rank_zero, _) = load_ranks(ddp_run)
    for name, value in restored.mixtures.items():
        assert torch.equal(value, saved[f"model.mixtures.{name}"]), name
        assert torch.equal(value, rank_zero["mixtures"][name]), name
    steps_before = EPOCHS * NUM_TRAIN // GLOBAL_BATCH
    assert trainer.global_step == steps_before + NUM_TRAIN // RANK_BATCH


SBATCH = Path(__file__).resolve().parents[1] / "experiments" / "slurm" / "train.sbatch"


def test_the_slurm_script_runs_one_ddp_process_per_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    script = SBATCH.read_text()
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    options = {
        name: value
        for line in script.splitlines()
        if line.startswith("#SBATCH --")
        for name, _, value in [line.split()[1].removeprefix("--").partition("=")]
    }
    assert options["ntasks-per-node"] == options["gpus-per-node"]
    # The srun line, with the variables SLURM sets, through our CLI parser.
    srun = next(line for line in script.replace("\\\n", " ").splitlines() if "srun " in line)
    env = {"config": "experiments/demo.yaml", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4"}
    words = shlex.split(string.Template(srun).safe_substitute(env))
    args = [word for word in words[words.index("agmm") + 1 :] if word != "$@"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    # Trainer parses devices="4" as four devices, as it does on the command line.
    assert (trainer["num_nodes"], trainer["devices"], trainer["strategy"]) == (2, "4", "ddp")
    assert trainer["sync_batchnorm"] is True


def test_validation_under_ddp_counts_every_image_once(tmp_path: Path) -> None:
    """5 val images on 2 ranks: no image is repeated to even out the ranks."""
    data = tiny_data(num_val=5)
    pl.seed_everything(0)
    model = tiny_segmenter()
    results = {}
    for devices in (1, 2):
        strategy = "ddp_spawn" if devices > 1 else "auto"
        trainer = tiny_trainer(tmp_path, devices=devices, strategy=strategy)
        (results[devices],) = trainer.validate(model, data, verbose=False)
    assert results[2]["val_miou"] == pytest.approx(results[1]["val_miou"], abs=1e-6)
    for name, value in results[1].items():
        assert results[2][name] == pytest.approx(value, abs=1e-6), name


def test_ranks_agree_on_batches_of_mixed_forms(tmp_path: Path) -> None:
    """Point and box images in one batch (box maps on some samples only) keep the ranks equal."""
    fit(tmp_path, tiny_data(weak_label={"point": 0.5, "box": 0.5}), devices=WORLD_SIZE)
    ranks = load_ranks(tmp_path)
    names_seen = {name for rank in ranks for batch in rank["names"] for name in batch}
    assert len(names_seen) == NUM_TRAIN
    assert_ranks_agree(ranks)
