"""Image-level tags and boxes on the synthetic data: CAM and box-filling baselines against AGMM.

Every seed renders the synthetic scenes of ``experiments/demo.yaml`` into the generic folder layout
(images/, masks/, splits/) and trains on them through ``FolderDataModule``:

- **tags** (METHOD §5): stage 1 trains ``CAMClassifier`` on the tags of the training scenes and
  writes CAM pseudo labels (``predict_split="train"``); stage 2 trains ``AGMMSegmenter`` on them
  (``weak_label="image"``, ``cam_dir``). Reported: the dense CAM labels (background at or below
  ``background_threshold``) on the training scenes and on val, the thresholded pseudo labels
  (uncertain band excluded) with their coverage, and the segmenter's val mIoU.
- **boxes** (METHOD §4): the "fill" baseline labels every box with its class (smaller boxes on top)
  and trains the same segmenter on that as full supervision; AGMM trains on the boxes themselves
  (unlabelled inside, background outside, allowed map) with the box settings of
  ``experiments/voc_box.yaml``: a labelled box core.

The segmenters use the model and budget of ``experiments/demo.yaml``. Mean ± std over seeds;
Markdown table. ``--quick`` shrinks everything to check the pipeline end to end in about a minute.

Run: ``python benchmarks/tags_and_boxes.py [--seeds 0 1 2] [--accelerator gpu] [--out FILE]``
or ``python benchmarks/tags_and_boxes.py --quick``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import platform
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
import yaml
from _runs import form_settings, publish, quiet_trainer
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from agmm_lightning import AGMMSegmenter, CAMClassifier
from agmm_lightning.callbacks import PredictionWriter
from agmm_lightning.data import FolderDataModule, SyntheticDataModule
from agmm_lightning.data.synthetic import SyntheticDataset
from agmm_lightning.data.transforms import eval_transform
from agmm_lightning.weak_labels import boxes_from_mask

CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"
CAM_ARGS: dict[str, Any] = {
    "encoder": "resnet18",
    "output_stride": 8,
    "optimizer": "adamw",
    "lr": 0.001,
    "head_lr_multiplier": 10.0,
}
QUICK_DATA = {
    "num_train": 8,
    "num_val": 4,
    "image_size": 32,
    "crop_size": 32,
    "batch_size": 4,
    "num_workers": 0,
}
QUICK_MODEL = {"encoder": "tu-test_resnet", "warmup_steps": 1}
QUICK_CAM = {"encoder": "tu-test_resnet", "cam_scales": (1.0, 0.5)}


def settings(quick: bool) -> dict[str, Any]:
    """Data, segmenter, classifier and epochs of demo.yaml (tiny ones with ``quick``), and the
    box settings of voc_box.yaml."""
    config = yaml.safe_load(CONFIG.read_text())
    box_model, box_data = form_settings("box")
    data = config["data"]["init_args"]
    data.pop("weak_label")
    model = config["model"]["init_args"]
    model.pop("method")
    model["num_classes"] = data["num_classes"]
    epochs = config["trainer"]["max_epochs"]
    cam = dict(CAM_ARGS)
    if quick:
        data, model, cam, epochs = data | QUICK_DATA, model | QUICK_MODEL, cam | QUICK_CAM, 1
    return {
        "data": data,
        "model": model,
        "cam": cam,
        "epochs": epochs,
        "box_model": box_model,
        "box_data": box_data,
    }


# --------------------------------------------------------------------------------------------
# Scenes on disk
# --------------------------------------------------------------------------------------------


def export_scenes(
    root: Path, data: dict[str, Any], num_classes: int, seed: int
) -> dict[str, np.ndarray]:
    """Write the train and val scenes in the folder layout; return the training masks by name."""
    size = data.get("image_size", 96)
    for folder in ("images", "masks", "splits"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = SyntheticDataModule(num_classes=num_classes).class_names
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    train_masks = {}
    for split, length in (("train", data["num_train"]), ("val", data["num_val"])):
        scenes = SyntheticDataset(
            split, length, size, num_classes, mode="eval", transform=eval_transform(), seed=seed
        )
        stems = []
        for index in range(length):
            name, image, mask = scenes.load(index)
            Image.fromarray(image).save(root / "images" / f"{name}.png")
            Image.fromarray(mask).save(root / "masks" / f"{name}.png")
            stems.append(name)
            if split == "train":
                train_masks[name] = mask
        (root / "splits" / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return train_masks


def fill_boxes(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """The "fill" baseline: every box of the mask's segments filled with its class, small on top."""
    boxes = boxes_from_mask(mask, num_classes)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    filled = np.zeros(mask.shape, np.uint8)
    for x0, y0, x1, y1, cls in boxes[np.argsort(-area)].astype(int):
        filled[y0:y1, x0:x1] = cls
    return filled


def export_filled_boxes(
    root: Path, fill_root: Path, masks: dict[str, np.ndarray], num_classes: int
) -> float:
    """A copy of ``root`` whose training masks are the filled boxes; return their mIoU."""
    for folder in ("images", "masks", "splits"):
        (fill_root / folder).mkdir(parents=True, exist_ok=True)
        for path in (root / folder).iterdir():
            (fill_root / folder / path.name).symlink_to(path.resolve())
    (fill_root / "classes.txt").symlink_to((root / "classes.txt").resolve())
    metric = MulticlassJaccardIndex(num_classes, average="macro", ignore_index=255)
    for name, mask in masks.items():
        filled = fill_boxes(mask, num_classes)
        target = fill_root / "masks" / f"{name}.png"
        target.unlink()
        Image.fromarray(filled).save(target)
        metric.update(torch.from_numpy(filled).long(), torch.from_numpy(mask).long())
    return float(metric.compute())


# --------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------


def folder_data(root: Path, setup: dict[str, Any], seed: int, **kwargs: Any) -> FolderDataModule:
    """The exported scenes with the demo's batch, crop and workers."""
    keys = ("batch_size", "crop_size", "num_workers")
    options = {key: setup["data"][key] for key in keys if key in setup["data"]}
    return FolderDataModule(str(root), seed=seed, **options, **kwargs)


def segmenter(setup: dict[str, Any], method: str, **overrides: Any) -> AGMMSegmenter:
    """The demo's segmenter with ``method`` and ``overrides``."""
    return AGMMSegmenter(**(setup["model"] | overrides), method=method)


def fit_metrics(model: pl.LightningModule, data: pl.LightningDataModule, run: pl.Trainer) -> dict:
    """Fit and return the final callback metrics as floats."""
    run.fit(model, data)
    return {name: float(value) for name, value in run.callback_metrics.items()}


def run_seed(job: tuple[int, bool, str]) -> dict[str, float]:
    """Every row of the table for one seed."""
    seed, quick, accelerator = job
    setup = settings(quick)
    epochs = setup["epochs"]
    with tempfile.TemporaryDirectory(prefix="tags_and_boxes_") as work:
        root, fill_root, cams = Path(work) / "scenes", Path(work) / "filled", Path(work) / "cams"
        num_classes = setup["model"]["num_classes"]
        masks = export_scenes(root, setup["data"], num_classes, seed)
        fill_miou = export_filled_boxes(root, fill_root, masks, num_classes)
        start = time.perf_counter()

        pl.seed_everything(seed, verbose=False)
        classifier = CAMClassifier(num_classes, **setup["cam"], output_dir=str(cams))
        tag_data = folder_data(root, setup, seed, weak_label="image", predict_split="train")
        cam_val = fit_metrics(classifier, tag_data, quiet_trainer(epochs, accelerator, work))
        writer = [PredictionWriter()]  # the CAM pseudo labels, into output_dir
        quiet_trainer(epochs, accelerator, work, callbacks=writer).predict(classifier, tag_data)
        cam_train = classifier.pseudo_label_quality

        pl.seed_everything(seed, verbose=False)
        image_data = folder_data(root, setup, seed, weak_label="image", cam_dir=str(cams))
        agmm_tags = fit_metrics(
            segmenter(setup, "agmm"), image_data, quiet_trainer(epochs, accelerator, work)
        )

        pl.seed_everything(seed, verbose=False)
        box_data = folder_data(root, setup, seed, weak_label="box", **setup["box_data"])
        agmm_boxes = fit_metrics(
            segmenter(setup, "agmm", **setup["box_model"]),
            box_data,
            quiet_trainer(epochs, accelerator, work),
        )

        pl.seed_everything(seed, verbose=False)
        fill_data = folder_data(fill_root, setup, seed, weak_label="full")
        fill = fit_metrics(
            segmenter(setup, "baseline"), fill_data, quiet_trainer(epochs, accelerator, work)
        )
    return {
        "cam_train_dense": cam_train["cam_miou"],
        "cam_train_pseudo": cam_train["pseudo_miou"],
        "cam_train_coverage": cam_train["pseudo_coverage"],
        "cam_val_dense": cam_val["val_cam_miou"],
        "cam_val_map": cam_val["val_map"],
        "agmm_tags_val": agmm_tags["val_miou"],
        "agmm_tags_pseudo": agmm_tags.get("train_pseudo_miou", float("nan")),
        "fill_train": fill_miou,
        "fill_val": fill["val_miou"],
        "agmm_boxes_val": agmm_boxes["val_miou"],
        "agmm_boxes_pseudo": agmm_boxes.get("train_pseudo_miou", float("nan")),
        "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------


def mean_std(results: list[dict[str, float]], key: str) -> str:
    """``mean ± std`` in percent of one measure over the seeds."""
    values = [run[key] for run in results]
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def table(results: list[dict[str, float]], header: str) -> str:
    """The Markdown table of every row."""

    def cell(key: str) -> str:
        return mean_std(results, key)

    rows = [
        ("tags: CAM, dense (stage 1)", cell("cam_train_dense"), cell("cam_val_dense")),
        (
            f"tags: CAM pseudo labels, confident only (coverage {cell('cam_train_coverage')})",
            cell("cam_train_pseudo"),
            "–",
        ),
        ("tags: AGMM on the CAM labels (stage 2)", cell("agmm_tags_pseudo"), cell("agmm_tags_val")),
        ("boxes: filled with their class, baseline", cell("fill_train"), cell("fill_val")),
        ("boxes: AGMM", cell("agmm_boxes_pseudo"), cell("agmm_boxes_val")),
    ]
    lines = [
        header,
        "",
        "| labels / method | training-scene labels mIoU (%) | val mIoU (%) |",
        "|---|---|---|",
        *(f"| {name} | {train} | {val} |" for name, train, val in rows),
        "",
        "Training-scene labels: the CAM labels, the filled boxes, or for AGMM the GMM pseudo "
        "labels (`train_pseudo_miou`, last epoch). Val: the CAM's dense labels with the val "
        f"masks' tags, or the segmenter's prediction. Classifier val mAP {cell('cam_val_map')}.",
    ]
    return "\n".join(lines)


def main() -> None:
    """Parse the options, run every seed and print (or write) the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--parallel", type=int, default=1, help="seeds at once")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a pipeline check")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    jobs = [(seed, args.quick, args.accelerator) for seed in args.seeds]
    with ProcessPoolExecutor(args.parallel, multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(run_seed, jobs))
    device = torch.cuda.get_device_name() if args.accelerator == "gpu" else platform.machine()
    seconds = statistics.mean(run["seconds"] for run in results)
    header = (
        f"Synthetic scenes of experiments/demo.yaml{' (--quick sizes)' if args.quick else ''}, "
        f"seeds {args.seeds}, on {device}, {seconds:.0f} s per seed."
    )
    text = table(results, header)
    publish(text, args.out)


if __name__ == "__main__":
    main()
