"""The command line: fit/validate/test/predict through `main`, and its error messages."""

import os
import re
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
import wandb
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import (
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    TQDMProgressBar,
)
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader, TensorDataset

from agmm_lightning.callbacks import (
    BestCheckpoint,
    LatestCheckpoint,
    PredictionWriter,
    SegmentationPanels,
    colorize,
    default_callbacks,
)
from agmm_lightning.cli import AGMMLightningCLI, main
from agmm_lightning.data import SyntheticDataModule

CONFIG = str(Path(__file__).parent / "conf" / "demo.yaml")


def run(tmp_path: Path, *args: str) -> None:
    main([args[0], "--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", *args[1:]])


@pytest.mark.parametrize("method", ["baseline", "cvpr", "agmm"])
def test_fit_fast_dev_run_for_each_method(tmp_path, method):
    run(tmp_path, "fit", f"--model.method={method}", "--trainer.fast_dev_run=true")
    assert (tmp_path / "panels" / "epoch_000.png").is_file()


def test_saved_configs_never_collide(tmp_path):
    quick = ["--trainer.max_steps=1", "--trainer.limit_val_batches=1", "--trainer.logger=false"]
    run(tmp_path, "fit", *quick)
    run(tmp_path, "fit", *quick, "--model.mixture_count=2")
    assert "mixture_count: 1" in (tmp_path / "config.yaml").read_text()
    assert "mixture_count: 2" in (tmp_path / "config_1.yaml").read_text()


def test_fit_then_validate_test_and_predict_from_the_checkpoint(tmp_path, capsys):
    run(tmp_path, "fit", "--trainer.logger=false", "--model.oem_momentum=0.99")
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    for stage in ("validate", "test"):
        run(tmp_path, stage, f"--ckpt_path={checkpoint}", "--trainer.logger=false")
    out = tmp_path / "predictions"
    capsys.readouterr()
    run(tmp_path, "predict", f"--ckpt_path={checkpoint}", "--trainer.logger=false")
    assert f"Predictions of 4 images written to {out}" in capsys.readouterr().out
    written = sorted(out.glob("*.png"))
    assert [path.stem for path in written] == [f"test_{i:05d}" for i in range(4)]
    labels = Image.open(written[0])
    assert labels.mode == "P" and labels.size == (32, 32)
    indices = np.array(labels)
    assert indices.max() < 6
    colours = np.array(labels.convert("RGB"))
    assert (colours == colorize(indices, 6)).all()


def test_print_config_of_the_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "experiments/demo.yaml", "--print_config"])
    assert exit_info.value.code == 0
    assert "SyntheticDataModule" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.arch=NotANet", "arch='NotANet' is not an smp architecture; choose one of"),
        ("--model.encoder=not_an_encoder", "encoder='not_an_encoder' is neither an smp encoder"),
        ("--model.num_classes=5", "set --model.init_args.num_classes=6"),
        ("--model.mixture_cnt=3", "mixture_cnt"),
        ("--model.method=magic", "magic"),
        ("--model.lr=-1", "error: lr must be >= 0, got -1.0"),
        ("--model.weight_decay=-0.1", "error: weight_decay must be >= 0, got -0.1"),
        ("--model.oem_momentum=1.5", "error: oem_momentum must be in [0, 1), got 1.5"),
    ],
)
def test_bad_configuration_exits_with_a_message(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "fit", override, "--trainer.fast_dev_run=true")
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_missing_config_file_is_named(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(tmp_path / "missing.yaml")])
    assert exit_info.value.code == 1
    assert (
        capsys.readouterr().err == f"error: --config={tmp_path / 'missing.yaml'}: file not found\n"
    )


def test_a_checkpoint_of_another_class_count_names_the_count_not_classes_txt(tmp_path, capsys):
    """A 6-class checkpoint on a 3-class folder dataset: the message is about the model."""
    checkpoint = fit_once(tmp_path / "first")
    capsys.readouterr()
    folder = Path(__file__).parent / "data" / "folder"
    config = tmp_path / "folder.yaml"
    config.write_text(
        "model:\n  class_path: agmm_lightning.AGMMSegmenter\n  init_args:\n"
        "    arch: Unet\n    encoder: tu-test_resnet\n"
        "data:\n  class_path: agmm_lightning.data.FolderDataModule\n"
        f"  init_args:\n    root: {folder}\n"
        f"trainer:\n  accelerator: cpu\n  default_root_dir: {tmp_path / 'second'}\n"
    )
    with pytest.raises(SystemExit):
        main(["validate", "--config", str(config), f"--ckpt_path={checkpoint}"])
    message = capsys.readouterr().err
    assert "classes.txt" not in message
    assert f"--ckpt_path={checkpoint} holds a model with num_classes=6" in message


def fit_once(root: Path, *args: str) -> Path:
    run(root, "fit", "--trainer.max_steps=1", "--trainer.logger=false", *args)
    return next(root.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("override", "found", "asked"),
    [
        ("--model.mixture_count=3", "mixture_count=1", "mixture_count=3"),
        ("--model.embed_dim=32", "embed_dim=64", "embed_dim=32"),
        (
            "--model.encoder=tu-test_efficientnet",
            "encoder='tu-test_resnet'",
            "tu-test_efficientnet",
        ),
    ],
)
def test_a_checkpoint_of_another_model_is_refused_before_training(
    tmp_path, capsys, override, found, asked
):
    checkpoint = fit_once(tmp_path / "first")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path / "second", "fit", f"--ckpt_path={checkpoint}", override)
    assert exit_info.value.code != 0
    message = capsys.readouterr().err
    assert f"--ckpt_path={checkpoint} holds a model with {found}" in message
    assert asked in message and "--model.init_args.encoder_weights=" in message
    assert not (tmp_path / "second").exists()


def test_long_runs_keep_best_and_last_checkpoints_beside_the_config(tmp_path):
    run(tmp_path, "fit", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1")
    run_dir = tmp_path / "lightning_logs" / "version_0"
    assert "mixture_count: 1" in (run_dir / "config.yaml").read_text()
    checkpoints = sorted(path.name for path in (run_dir / "checkpoints").iterdir())
    assert checkpoints[0].startswith("best-epoch=0-val_miou=") and checkpoints[1] == "last.ckpt"
    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert any(tag.startswith("lr-") for tag in events.Tags()["scalars"])


def test_default_callbacks_stand_aside_when_switched_off_or_configured():
    kinds = {type(c) for c in default_callbacks()}
    assert kinds == {
        RichProgressBar,
        LatestCheckpoint,
        BestCheckpoint,
        LearningRateMonitor,
        SegmentationPanels,
        PredictionWriter,
    }
    switched_off = {"enable_progress_bar": False, "enable_checkpointing": False, "logger": False}
    assert {type(c) for c in default_callbacks(switched_off)} == {
        SegmentationPanels,
        PredictionWriter,
    }
    own = [TQDMProgressBar(), LearningRateMonitor(), SegmentationPanels(every_n_epochs=7)]
    kept = default_callbacks({}, own)
    assert kept[:3] == own and {type(c) for c in kept[3:]} == {
        LatestCheckpoint,
        BestCheckpoint,
        PredictionWriter,
    }
    plain = ModelCheckpoint(monitor="val_loss")
    assert plain in default_callbacks({}, [plain]), "a checkpoint of another kind adds to ours"


def test_the_printed_config_is_the_run(tmp_path, capsys):
    """--print_config to a file, then that file alone: the same callbacks, options and optimizer;
    a configured callback replaces the default of its kind, and --optimizer is refused."""
    own_panels = ["--trainer.callbacks+=SegmentationPanels", "--trainer.callbacks.every_n_epochs=7"]
    short = ["--trainer.max_steps=1", "--trainer.limit_val_batches=0"]
    args = ["--config", CONFIG, f"--trainer.default_root_dir={tmp_path}", *own_panels, *short]
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)

    def built(arguments):
        cli = AGMMLightningCLI(args=["fit", *arguments])
        callbacks = [(type(c), vars(c).get("every_n_epochs")) for c in cli.trainer.callbacks]
        (optimizer,) = cli.trainer.optimizers
        (schedule,) = cli.trainer.lr_scheduler_configs
        groups = [group["initial_lr"] for group in optimizer.param_groups]
        return callbacks, type(optimizer), groups, type(schedule.scheduler), schedule.interval

    direct, from_file = built(args), built(["--config", str(printed)])
    assert direct == from_file
    callbacks, optimizer, groups, _, interval = direct
    assert [every for kind, every in callbacks if kind is SegmentationPanels] == [7]
    assert {LatestCheckpoint, BestCheckpoint, PredictionWriter} <= {kind for kind, _ in callbacks}
    assert optimizer is torch.optim.SGD and len(groups) == 2 and interval == "step"
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--optimizer=Adam"])
    assert exit_info.value.code == 2
    assert "--optimizer" in capsys.readouterr().err.splitlines()[0]


class _Worsening(LightningModule):
    """A model whose val_miou falls every epoch."""

    selection_metric = "val_miou"

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val_miou", 1.0 / (self.current_epoch + 1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.ones(4, 1)), batch_size=2)

    val_dataloader = train_dataloader


def test_last_checkpoint_holds_the_last_epoch_when_it_was_not_the_best(tmp_path):
    options = {"enable_progress_bar": False, "logger": False}
    trainer = Trainer(
        max_epochs=3,
        callbacks=default_callbacks(options),
        default_root_dir=tmp_path,
        enable_model_summary=False,
        **options,
    )
    trainer.fit(_Worsening())
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    assert best.name.startswith("best-epoch=0-")
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 2 and last["global_step"] == 6


def test_wandb_runs_save_their_configs_in_their_own_directories(tmp_path):
    wandb_config = str(Path(__file__).parents[1] / "experiments" / "loggers" / "wandb.yaml")
    for mixture_count in (1, 2):
        run(
            tmp_path,
            "fit",
            "--config",
            wandb_config,
            f"--trainer.logger.init_args.save_dir={tmp_path / 'wandb'}",
            "--trainer.max_steps=1",
            f"--model.mixture_count={mixture_count}",
        )
        wandb.finish()  # one process runs one CLI; here the next must not reuse this W&B run
    first, second = sorted((tmp_path / "wandb" / "agmm-lightning").iterdir(), key=os.path.getmtime)
    assert "mixture_count: 1" in (first / "config.yaml").read_text()
    assert "mixture_count: 2" in (second / "config.yaml").read_text()
    assert (first / "checkpoints" / "last.ckpt").is_file()
    assert not list((tmp_path / "wandb").glob("config*.yaml"))


def test_inference_options_given_with_a_checkpoint_are_kept(tmp_path):
    run(tmp_path, "fit", "--trainer.max_steps=1", "--trainer.logger=false")
    checkpoint = next(tmp_path.rglob("last.ckpt"))
    cli = AGMMLightningCLI(
        save_config_callback=None,
        args=[
            "validate",
            "--config",
            CONFIG,
            f"--ckpt_path={checkpoint}",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--model.test_flip=true",
            "--model.tile_size=16",
        ],
    )
    assert cli.model.hparams["test_flip"] and cli.model.hparams["tile_size"] == 16
    assert "val_miou" in cli.trainer.callback_metrics


def test_the_class_count_comes_from_the_data(tmp_path):
    """The folder layout trains with num_classes given nowhere but in classes.txt."""
    config = tmp_path / "folder.yaml"
    config.write_text(
        "model:\n  class_path: agmm_lightning.AGMMSegmenter\n"
        "  init_args:\n    arch: Unet\n    encoder: tu-test_resnet\n"
        "data:\n  class_path: agmm_lightning.data.FolderDataModule\n"
        f"  init_args:\n    root: {Path(__file__).parent / 'data' / 'folder'}\n"
        "    batch_size: 2\n    crop_size: 32\n"
    )
    main(
        ["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"]
        + ["--trainer.max_steps=1", "--trainer.accelerator=cpu"]  # the logger merges hparams
    )
    checkpoint = torch.load(next(tmp_path.rglob("last.ckpt")), weights_only=True)
    assert checkpoint["hyper_parameters"]["num_classes"] == 3
    assert checkpoint["state_dict"]["model.network.segmentation_head.0.weight"].shape[0] == 3


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: None, "file not found"),
        (lambda path: path.write_text("not a checkpoint"), "not a checkpoint (torch.load cannot"),
        (lambda path: torch.save({"w": torch.ones(2)}, path), "not a Lightning checkpoint"),
    ],
)
def test_a_missing_or_unreadable_checkpoint_is_one_line(tmp_path, capsys, make, message):
    path = tmp_path / "model.ckpt"
    make(path)
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "validate", f"--ckpt_path={path}")
    assert exit_info.value.code != 0
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == f"error: --ckpt_path={path}: {lines[0].split(': ', 2)[2]}"
    assert message in lines[0] and len(lines) == 2 and "weights_only" not in lines[0]


@pytest.mark.parametrize(
    ("override", "first_line"),
    [
        (
            "--model.mixture_cnt=3",
            "error: --model.mixture_cnt: no such option of agmm_lightning.AGMMSegmenter "
            "(did you mean mixture_count?)",
        ),
        ("--model.lambda_max=abc", "error: --model.lambda_max: Expected a float. Got value: abc"),
        ("--trainer.max_epochs=abc", "error: --trainer.max_epochs: Expected an int, got abc"),
        ("--trainer.max_step=2", "error: unrecognized arguments: --trainer.max_step=2"),
    ],
)
def test_parser_errors_name_the_key_first_in_one_line(tmp_path, capsys, override, first_line):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "fit", override)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [first_line, "(`agmm fit --help` lists every option)"]


def test_a_redirected_log_shows_every_validation_and_the_per_class_table(tmp_path):
    """As under SLURM or nohup: stdout goes to a file, and the lines are there."""
    log = tmp_path / "job.log"
    with log.open("w") as stdout:
        subprocess.run(
            [sys.executable, "-m", "agmm_lightning", "fit", "--config", CONFIG]
            + [f"--trainer.default_root_dir={tmp_path}", "--trainer.max_epochs=2"],
            stdout=stdout,
            stderr=subprocess.DEVNULL,
            check=True,
            env=os.environ | {"PYTHONWARNINGS": "ignore"},
        )
    text = log.read_text()
    assert re.search(r"^epoch 0 step 2: val_miou 0\.\d{4} \(elapsed \d\d:\d\d:\d\d\)$", text, re.M)
    assert re.search(r"^epoch 1 step 4: val_miou", text, re.M)
    table = text[text.index("Per-class IoU (%), val, epoch 1:") :].splitlines()[1:8]
    assert [row.split()[0] for row in table] == [*SyntheticDataModule().class_names, "mIoU"]


def test_the_lightning_command_runs_this_projects_cli(capsys):
    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "lightning"]
    assert script.value == "agmm_lightning.cli:main"
    result = subprocess.run(
        [Path(sys.executable).parent / "lightning", "fit", "--config", CONFIG, "--print_config"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "class_path: agmm_lightning.data.SyntheticDataModule" in result.stdout
