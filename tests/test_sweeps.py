"""W&B sweeps: the command the agent builds for each sweep parses through our CLI, and trains.

``agent_command`` mirrors how ``wandb agent`` expands a sweep's ``command`` (wandb_agent.py and
wandb/sdk/launch/sweeps/utils.py): ``${env}`` is ``/usr/bin/env``, ``${interpreter}`` is
``python``, ``${program}`` the sweep's ``program``, ``${args}`` one ``--<name>=<value>`` per
parameter (``str(value)``), ``${args_no_hyphens}`` one ``<name>=<value>``, and
``${envvar:NAME}`` inside an item the environment variable NAME (left as NAME when unset).
"""

from __future__ import annotations

import itertools
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from agmm_lightning.cli import main

REPO = Path(__file__).resolve().parents[1]
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
ENVVAR = re.compile(r"\$\{envvar:([A-Z0-9_]*)\}")


def agent_command(sweep: dict[str, Any], values: dict[str, Any]) -> list[str]:
    macros = {
        "env": ["/usr/bin/env"],
        "interpreter": ["python"],
        "program": [str(sweep["program"])],
        "args": [f"--{name}={value}" for name, value in values.items()],
        "args_no_hyphens": [f"{name}={value}" for name, value in values.items()],
    }
    command: list[str] = []
    for item in sweep.get("command", DEFAULT_COMMAND):
        item = ENVVAR.sub(lambda match: os.environ.get(match[1], match[1]), str(item))
        if item.startswith("${") and item.endswith("}"):
            command += macros[item[2:-1]]
        else:
            command.append(item)
    return command


def candidate_values(spec: dict[str, Any]) -> list[Any]:
    """The values a grid tries, or the two ends of a distribution's range."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    return [spec["min"], spec["max"]]


def samples(sweep: dict[str, Any]) -> list[dict[str, Any]]:
    """Every grid point; for other methods, all ranges at their minimum, then their maximum."""
    names = list(sweep["parameters"])
    candidates = [candidate_values(sweep["parameters"][name]) for name in names]
    if sweep["method"] == "grid":
        return [dict(zip(names, point, strict=True)) for point in itertools.product(*candidates)]
    return [
        {name: values[end] for name, values in zip(names, candidates, strict=True)}
        for end in (0, -1)
    ]


def cli_args(command: list[str]) -> list[str]:
    """The arguments our CLI gets: the command must run ``agmm`` through ``env``."""
    assert command[:2] == ["/usr/bin/env", "agmm"], command
    return command[2:]


def tiny_twin(arg: str) -> str:
    """An experiment config's tiny twin in tests/conf (trains in seconds); others unchanged."""
    twin = REPO / "tests" / "conf" / Path(arg).name
    return str(twin) if arg.startswith("experiments/") and twin.is_file() else arg


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def test_there_are_sweeps() -> None:
    assert {path.name for path in SWEEPS} >= {"demo_grid.yaml", "voc_point_bayes.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_sample_of_the_sweep_parses(
    path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)  # the agent runs from the repository root
    monkeypatch.setenv("VOC_ROOT", "tests/data/voc")
    sweep = load(path)
    assert sweep["metric"] == {"name": "val_miou", "goal": "maximize"}
    for values in samples(sweep):
        with pytest.raises(SystemExit) as exit_info:
            main([*cli_args(agent_command(sweep, values)), "--print_config"])
        assert exit_info.value.code == 0, values
        printed = yaml.safe_load(capsys.readouterr().out)
        assert printed["trainer"]["logger"]["class_path"].endswith("WandbLogger")
        for name, value in values.items():
            section, _, key = name.rpartition(".")
            node = printed
            for part in section.split("."):
                node = node[part]
            assert node[key] == value, name


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_one_sample_of_the_sweep_trains(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("VOC_ROOT", "tests/data/voc")
    sweep = load(path)
    args = cli_args(agent_command(sweep, samples(sweep)[-1]))
    main(
        [
            *map(tiny_twin, args),
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'wandb'}",
        ]
    )
    assert (tmp_path / "panels" / "epoch_000.png").is_file()


def test_a_parameter_that_is_no_cli_key_is_named_in_the_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(REPO)
    sweep = load(REPO / "experiments" / "sweeps" / "demo_grid.yaml")
    command = agent_command(sweep, {"model.init_args.mixture_cnt": 4})
    with pytest.raises(SystemExit) as exit_info:
        main([*cli_args(command), "--print_config"])
    assert exit_info.value.code != 0
    assert "mixture_cnt" in capsys.readouterr().err


def test_agent_command_expands_the_documented_macros(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATA", "/data")
    sweep = {
        "program": "train.py",
        "command": ["${env}", "${interpreter}", "${program}", "--root=${envvar:DATA}", "${args}"],
    }
    assert agent_command(sweep, {"a.b": 4, "lr": 1e-05}) == [
        "/usr/bin/env",
        "python",
        "train.py",
        "--root=/data",
        "--a.b=4",
        "--lr=1e-05",
    ]
    assert agent_command({"program": "p", "command": ["${args_no_hyphens}"]}, {"x": 1}) == ["x=1"]
