"""Real-data benchmark: every method and weak form on the macaque MRI slices, against full labels.

Builds the dataset when it is missing (Debian's ``mricron-data`` package ships the INIA19 macaque
T1 template and its NeuroMaps atlas: ``apt-get download mricron-data``, then ``nibabel`` reads the
volumes), then runs ``ablation.py`` with ``experiments/macaque.yaml``: same table, same options.

Classes: background, other brain tissue and the 7 largest NeuroMaps structures (left and right
hemisphere merged). Images: coronal slices with at least 300 pixels of the 7 structures, as 8-bit
greyscale PNGs, read as one channel (the config's ``in_channels: 1``); masks: class-index PNGs;
every 4th block of 6 consecutive slices is validation.

Run: ``python benchmarks/macaque.py [--data-root data/macaque] [--build-only] [ablation.py
options, e.g. --forms point --seeds 0 1 2 --parallel 2 --out results/macaque.md]``.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from ablation import main as ablation
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "macaque.yaml"
STRUCTURES = 7  # the largest NeuroMaps structures kept as classes
MIN_STRUCTURE_PIXELS = 300  # slices with fewer pixels of them are left out
TEMPLATES = "usr/share/mricron/templates"


def download_templates(folder: Path) -> Path:
    """Fetch and unpack Debian's ``mricron-data`` package; return its templates folder."""
    subprocess.run(["apt-get", "download", "mricron-data"], cwd=folder, check=True)
    (package,) = folder.glob("mricron-data_*.deb")
    subprocess.run(["dpkg", "-x", str(package), str(folder / "x")], check=True)
    return folder / "x" / TEMPLATES


def build(templates: Path, out: Path) -> None:
    """Write the slices, masks, splits and class names in the FolderDataModule layout."""
    import nibabel  # only needed to build the dataset

    t1 = np.asanyarray(nibabel.load(templates / "inia19-t1-brain.nii.gz").dataobj)
    atlas = np.asanyarray(nibabel.load(templates / "inia19-NeuroMaps.nii.gz").dataobj)
    merged = np.where(atlas > 0, atlas.astype(np.int64) % 1000, 0)  # left/right share % 1000
    ids, counts = np.unique(merged[merged > 0], return_counts=True)
    largest = ids[np.argsort(-counts)][:STRUCTURES]
    lut = np.ones(merged.max() + 1, np.uint8)  # other brain tissue
    lut[0] = 0
    lut[largest] = np.arange(2, STRUCTURES + 2)
    labels = lut[merged]
    low, high = np.percentile(t1[t1 > 0], [1, 99.5])
    for folder in ("images", "masks", "splits"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    kept = [y for y in range(labels.shape[1]) if (labels[:, y] > 1).sum() > MIN_STRUCTURE_PIXELS]
    splits: dict[str, list[str]] = {"train": [], "val": []}
    for position, y in enumerate(kept):
        grey = np.clip((t1[:, y].astype(np.float32) - low) / (high - low), 0, 1).T[::-1]
        name = f"inia19_y{y:03d}"
        Image.fromarray((grey * 255).astype(np.uint8)).save(out / "images" / f"{name}.png")
        Image.fromarray(np.ascontiguousarray(labels[:, y].T[::-1])).save(
            out / "masks" / f"{name}.png"
        )
        splits["val" if (position // 6) % 4 == 3 else "train"].append(name)
    for split, names in splits.items():
        (out / "splits" / f"{split}.txt").write_text("\n".join(names) + "\n")
    classes = ["background", "other_brain"] + [f"structure_{int(s)}" for s in largest]
    (out / "classes.txt").write_text("\n".join(classes) + "\n")
    print(f"{len(splits['train'])} train, {len(splits['val'])} val slices, {len(classes)} classes")


def ensure(root: Path) -> None:
    """Build the dataset at ``root`` unless it is there."""
    if (root / "classes.txt").is_file():
        return
    with tempfile.TemporaryDirectory() as work:
        build(download_templates(Path(work)), root)


def main() -> None:
    # No abbreviations: ablation.py's --data must not read as --data-root.
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], add_help=False, allow_abbrev=False
    )
    parser.add_argument("--data-root", type=Path, default=ROOT / "data" / "macaque")
    parser.add_argument("--build-only", action="store_true")
    args, rest = parser.parse_known_args()
    ensure(args.data_root)
    if not args.build_only:
        ablation(["--config", str(CONFIG), "--root", str(args.data_root), *rest])


if __name__ == "__main__":
    main()
