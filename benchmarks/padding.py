"""Whether training crops that the network pads teach it to rely on the padding band.

The network pads an input whose side is not a multiple of the encoder's output stride at the
bottom and right. This trains full supervision on the demo scenes once per ``--crops`` size, then
scores each model on the val scenes whole and cropped to every training size (so padded as that
size is in training). Prints a Markdown table (val mIoU, %), written to ``--out`` too.

Run: ``python benchmarks/padding.py [--crops 80 96] [--seed 0] [--epochs N] [--quick]
[--out results/padding.md]``.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import lightning.pytorch as pl
import torch
from _runs import publish, quiet_trainer
from ablation import DEMO, datamodule, settings
from torchmetrics.classification import MulticlassJaccardIndex

from agmm_lightning import AGMMSegmenter
from agmm_lightning.targets import VOID


def train(
    crop: int, seed: int, epochs: int | None, quick: bool
) -> tuple[AGMMSegmenter, pl.LightningDataModule]:
    """A fully supervised demo model trained on ``crop``-pixel crops, and its data."""
    model_args, data, epochs = settings(DEMO, quick, epochs)
    data = data | {"init_args": data["init_args"] | {"crop_size": crop, "weak_label": "full"}}
    data_module = datamodule(data, seed, None)
    pl.seed_everything(seed, verbose=False)
    model = AGMMSegmenter(
        **(model_args | {"method": "baseline", "num_classes": data_module.num_classes})
    )
    quiet_trainer(epochs, "cpu", "logs/benchmarks").fit(model, data_module)
    return model, data_module


def val_miou(model: AGMMSegmenter, data_module: pl.LightningDataModule, side: int | None) -> float:
    """Val mIoU of the scenes whole (``side`` None) or cropped to their top-left ``side`` pixels."""
    metric = MulticlassJaccardIndex(model.hparams["num_classes"], ignore_index=VOID)
    model.eval()
    with torch.no_grad():
        for batch in data_module.val_dataloader():
            images, masks = batch["image"], batch["mask"]
            if side is not None:
                images, masks = images[..., :side, :side], masks[..., :side, :side]
            metric.update(model.predict_logits(images).argmax(1), masks)
    return 100 * float(metric.compute())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, nargs="+", default=[80, 96])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="default: demo.yaml's")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a pipeline check")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    crops = [24, 32] if args.quick else args.crops  # the quick scenes are 32 pixels
    header = " | ".join(f"val scenes cropped to {crop}" for crop in crops)
    lines = [
        f"Full supervision on the demo scenes (settings of experiments/demo.yaml"
        f"{', --quick sizes' if args.quick else ''}), seed {args.seed}, on {platform.machine()}.",
        "",
        f"| training crop | padded by | val scenes whole | {header} |",
        "|---|---|---|" + "---|" * len(crops),
    ]
    for crop in crops:
        model, data_module = train(crop, args.seed, args.epochs, args.quick)
        stride = model.model.network.encoder.output_stride
        scores = [val_miou(model, data_module, side) for side in (None, *crops)]
        cells = " | ".join(f"{score:.1f}" for score in scores)
        lines.append(f"| {crop} | {-crop % stride} px | {cells} |")
    text = "\n".join(lines)
    publish(text, args.out)


if __name__ == "__main__":
    main()
