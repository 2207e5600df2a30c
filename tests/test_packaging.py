"""Packaging: the declared dependencies are what the package imports, and it says its version."""

import ast
import re
import sys
from importlib.metadata import packages_distributions, version
from pathlib import Path

import pytest

from agmm_lightning import __version__
from agmm_lightning.cli import main

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "agmm_lightning"
# Needed at run time without an import of ours: LightningCLI parses with jsonargparse, and the
# default logger (Lightning's TensorBoardLogger) writes with tensorboard.
USED_WITHOUT_IMPORT = {"jsonargparse", "tensorboard"}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def imported_modules() -> set[str]:
    modules = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return modules - set(sys.stdlib_module_names) - {"agmm_lightning", "__future__"}


def declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {canonical(re.split(r"[\[<>=!~; ]", spec)[0]) for spec in project["dependencies"]}


def test_the_dependencies_are_what_the_package_imports():
    distributions = packages_distributions()
    imported = {canonical(distributions[module][0]) for module in imported_modules()}
    assert imported - declared() == set(), "imported but not declared"
    assert declared() - imported == USED_WITHOUT_IMPORT, "declared but not used"


def test_version_comes_from_the_package_metadata(capsys):
    assert __version__ == version("agmm-lightning")
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.split() == ["agmm", __version__]


def test_the_package_ships_its_type_information():
    assert (PACKAGE / "py.typed").is_file()
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "py.typed" in setuptools["package-data"]["agmm_lightning"]
