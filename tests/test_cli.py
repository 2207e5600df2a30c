"""The command line: fit/validate/test/predict through `main`, and its error messages."""

from pathlib import Path

import pytest
from PIL import Image

from agmm_lightning.cli import main

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


def test_fit_then_validate_test_and_predict_from_the_checkpoint(tmp_path):
    run(tmp_path, "fit", "--trainer.logger=false", "--model.oem_momentum=0.99")
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    for stage in ("validate", "test"):
        run(tmp_path, stage, f"--ckpt_path={checkpoint}", "--trainer.logger=false")
    out = tmp_path / "predictions"
    run(tmp_path, "predict", f"--ckpt_path={checkpoint}", "--trainer.logger=false")
    indices = sorted(p for p in out.glob("*.png") if not p.stem.endswith("_color"))
    assert len(indices) == 4 and len(list(out.glob("*_color.png"))) == 4
    labels = Image.open(indices[0])
    assert labels.mode == "L" and labels.size == (32, 32)
    assert max(labels.getdata()) < 6
    assert Image.open(out / f"{indices[0].stem}_color.png").mode == "RGB"


def test_print_config_of_the_demo(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "experiments/demo.yaml", "--print_config"])
    assert exit_info.value.code == 0
    assert "SyntheticDataModule" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--model.arch=NotANet", "Unknown arch 'NotANet'; choose one of"),
        ("--model.encoder=not_an_encoder", "Unknown encoder 'not_an_encoder'"),
        ("--model.num_classes=5", "set --model.init_args.num_classes=6"),
        ("--model.mixture_cnt=3", "mixture_cnt"),
        ("--model.method=magic", "magic"),
    ],
)
def test_bad_configuration_exits_with_a_message(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        run(tmp_path, "fit", override, "--trainer.fast_dev_run=true")
    assert exit_info.value.code != 0
    assert message in capsys.readouterr().err
