"""Every experiment config parses through the CLI, and every tiny twin trains for one step."""

from __future__ import annotations

from pathlib import Path

import pytest

from agmm_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
TINY = sorted((REPO / "tests" / "conf").glob("*.yaml"))


def test_every_experiment_has_a_tiny_twin() -> None:
    assert {path.name for path in EXPERIMENTS} == {path.name for path in TINY}


@pytest.mark.parametrize("config", EXPERIMENTS + TINY, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path: agmm_lightning" in capsys.readouterr().out


@pytest.mark.parametrize("config", TINY, ids=lambda p: p.name)
def test_tiny_config_fits(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tiny configs point at tests/data/<dataset> relative to the repository.
    monkeypatch.chdir(REPO)
    main(
        [
            "fit",
            "--config",
            str(config),
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
