"""The names users import keep working wherever the code behind them lives."""

import ast
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "agmm_lightning"
# The algorithm in pure torch (and NumPy): testable and benchmarkable without Lightning.
PURE = [
    "agmm",
    "cam",
    "weak_labels",
    "targets.py",
    "encoders.py",
    "weights.py",
    "errors.py",
    "inference.py",
]
LIGHTNING_MODULES = ("lightning", "pytorch_lightning")
WIRING = ("agmm_lightning.tasks", "agmm_lightning.callbacks", "agmm_lightning.cli")

PUBLIC = {
    "agmm_lightning": ["AGMMSegmenter", "CAMClassifier", "ClassMixtures"],
    "agmm_lightning.losses": ["cvpr_agmm_losses", "partial_cross_entropy", "absent_class_loss"],
    "agmm_lightning.mixtures": ["ClassMixtures", "MixtureStatistics"],
    "agmm_lightning.agmm": [
        "AGMMModel",
        "ClassMixtures",
        "OEMOptions",
        "build_network",
        "cvpr_agmm_losses",
    ],
    "agmm_lightning.cam": ["CAMModel", "cam_pseudo_labels", "normalize_cams"],
    "agmm_lightning.encoders": ["build_encoder", "build_network", "check_encoder"],
    "agmm_lightning.data": [
        "ADE20KDataModule",
        "AGMMDataModule",
        "COCODataModule",
        "CityscapesDataModule",
        "FolderDataModule",
        "SyntheticDataModule",
        "VOCDataModule",
    ],
    "agmm_lightning.weak_labels": ["WeakLabel", "simulate_weak_label", "rasterize_points"],
    "agmm_lightning.cli": ["main"],
}


@pytest.mark.parametrize(("module", "names"), PUBLIC.items())
def test_public_names_import(module, names):
    imported = importlib.import_module(module)
    for name in names:
        assert callable(getattr(imported, name)), f"{module}.{name}"


def test_the_documented_names_are_the_implementations():
    from agmm_lightning import ClassMixtures, agmm, losses, mixtures

    assert losses.cvpr_agmm_losses is agmm.cvpr_agmm_losses
    assert mixtures.ClassMixtures is ClassMixtures is agmm.ClassMixtures


def test_one_encoder_builder():
    from agmm_lightning import agmm, encoders
    from agmm_lightning.agmm import model

    assert agmm.build_network is model.build_network is encoders.build_network
    assert model.check_encoder is encoders.check_encoder


def pure_files() -> list[Path]:
    files = []
    for name in PURE:
        path = PACKAGE / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return files


def imported_modules(path: Path) -> set[str]:
    """The absolute module names a file imports, at any depth of its code."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", pure_files(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_pure_modules_never_import_lightning(path):
    for name in imported_modules(path):
        assert name.split(".")[0] not in LIGHTNING_MODULES, f"{path.name} imports {name}"
        assert not name.startswith(WIRING), f"{path.name} imports the Lightning wiring {name}"


TRANSITIVE = [
    "agmm_lightning.agmm",
    "agmm_lightning.cam",
    "agmm_lightning.inference",
    "agmm_lightning.weak_labels",
    "agmm_lightning.encoders",
    "agmm_lightning.targets",
]


@pytest.mark.parametrize("module", TRANSITIVE)
def test_pure_packages_import_without_lightning_installed(module):
    """Import the package with Lightning blocked, skipping agmm_lightning/__init__ (the tasks)."""
    script = textwrap.dedent(
        f"""
        import importlib, sys, types
        for name in {LIGHTNING_MODULES!r}:
            sys.modules[name] = None  # any import of it raises ImportError
        package = types.ModuleType("agmm_lightning")
        package.__path__ = [{str(PACKAGE)!r}]
        sys.modules["agmm_lightning"] = package
        importlib.import_module({module!r})
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1]
