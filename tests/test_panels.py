"""Panels that explain themselves: titled columns, a class legend, the same picture everywhere."""

from pathlib import Path

import numpy as np
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agmm_lightning.callbacks import palette_of
from agmm_lightning.cli import main
from agmm_lightning.panels import COLUMNS, draw_panel, render

CONFIG = str(Path(__file__).parent / "conf" / "demo.yaml")
NAMES = ["background", "disc", "square"]


def texts(figure) -> list[str]:
    return [text.get_text() for axes in figure.axes for text in axes.texts]


def test_a_panel_has_titled_columns_a_legend_and_says_where_pseudo_labels_are_missing(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (24, 24, 3), dtype=np.uint8) for _ in range(2)]
    labels = [rng.integers(0, 3, (24, 24)).astype(np.uint8) for _ in range(2)]
    maps = {
        "weak label": labels,
        "pseudo label": [labels[0], None],
        "prediction": labels,
        "ground truth": labels,
    }
    figure = draw_panel(images, maps, palette_of(3), NAMES, "epoch 3: val mIoU 41.0%")
    assert [axes.get_title() for axes in figure.axes[:5]] == list(COLUMNS)
    assert figure.get_suptitle() == "epoch 3: val mIoU 41.0%"
    (legend,) = figure.legends
    assert [t.get_text() for t in legend.get_texts()] == [*NAMES, "unlabelled", "void / ignored"]
    assert texts(figure) == ["no pseudo labels yet"]  # the second row's pseudo-label cell

    path = tmp_path / "panel.png"
    Image.fromarray(render(figure)).save(path)
    pixels = np.array(Image.open(path))
    assert pixels.shape[1] == 5 * 200 and pixels.shape[0] > 2 * 200  # crops upscaled to 200 px
    colours = {tuple(c) for c in pixels.reshape(-1, 3)[::7].tolist()}
    assert tuple(palette_of(3)[1].tolist()) in colours  # class colours drawn, not blank


def test_training_writes_the_same_panel_to_disk_and_tensorboard(tmp_path):
    main(
        [
            "fit",
            "--config",
            CONFIG,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
        ]
    )
    (run,) = (tmp_path / "lightning_logs").iterdir()
    panel = Image.open(run / "panels" / "epoch_000.png")
    assert panel.width == 5 * 200
    events = EventAccumulator(str(run), size_guidance={"images": 0})
    events.Reload()
    (logged,) = events.Images("panels")
    assert (logged.width, logged.height) == panel.size


def test_each_row_of_a_mixed_batch_names_its_form():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (24, 24, 3), dtype=np.uint8) for _ in range(2)]
    labels = [rng.integers(0, 3, (24, 24)).astype(np.uint8) for _ in range(2)]
    maps = {"weak label": labels, "prediction": labels}
    figure = draw_panel(images, maps, palette_of(3), NAMES, "mixed", row_names=["point", "box"])
    first_column = figure.axes[0::3]
    assert [axes.get_ylabel() for axes in first_column] == ["point", "box"]
