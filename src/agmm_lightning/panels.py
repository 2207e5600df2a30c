"""Image panels that explain themselves: titled columns, a class legend, a titled figure.

One row per image: the image, its weak label, the GMM pseudo label, the prediction and the ground
truth, each crop upscaled to a readable size, in the class colours of
:func:`~agmm_lightning.callbacks.palette_of` with a legend that names them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from agmm_lightning.targets import VOID

__all__ = ["COLUMNS", "draw_panel", "render"]

COLUMNS = ("image", "weak label", "pseudo label", "prediction", "ground truth")
"""Column titles, in order."""

_CELL_INCHES = 2.0  # each crop is drawn this large (200 px at the default 100 dpi)
_LEGEND_COLUMNS = 6


def draw_panel(
    images: Sequence[np.ndarray],
    maps: Mapping[str, Sequence[np.ndarray | None]],
    palette: np.ndarray,
    class_names: Sequence[str],
    title: str,
    missing: str = "no pseudo labels yet",
    row_names: Sequence[str] | None = None,
) -> Figure:
    """The panel of a few images as a matplotlib figure.

    Args:
        images: uint8 RGB crops [h,w,3], one per row.
        maps: For each title of :data:`COLUMNS` after "image", one class-index map [h,w] per row;
            a column may be absent (no ground truth), and a map None (no pseudo labels).
        palette: uint8 [256,3] class colours (index C unlabelled, 255 void).
        class_names: Name of each class, index i = class i.
        title: The figure's title (epoch, val mIoU).
        missing: Written in a cell whose map is None.
        row_names: Written beside each row, e.g. the weak-label form of each image of a mix.

    Returns:
        The figure, drawn off-screen (see :func:`render`).
    """
    columns = [column for column in COLUMNS if column == "image" or column in maps]
    rows = len(images)
    legend_rows = (len(class_names) + 2 + _LEGEND_COLUMNS - 1) // _LEGEND_COLUMNS
    height = _CELL_INCHES * rows + 0.8 + 0.25 * legend_rows  # titles above, legend below
    figure = Figure(figsize=(_CELL_INCHES * len(columns), height))
    FigureCanvasAgg(figure)  # drawn off-screen, whatever matplotlib's backend
    grid = figure.subplots(rows, len(columns), squeeze=False)
    for row, image in enumerate(images):
        for col, column in enumerate(columns):
            axes = grid[row, col]
            axes.set_xticks([])
            axes.set_yticks([])
            if row == 0:
                axes.set_title(column, fontsize=11)
            if col == 0 and row_names is not None:
                axes.set_ylabel(row_names[row], fontsize=10)
            labels = image if column == "image" else maps[column][row]
            if labels is None:
                axes.set_facecolor("0.95")
                axes.text(0.5, 0.5, missing, ha="center", va="center", fontsize=9, wrap=True)
                continue
            pixels = labels if column == "image" else palette[labels]
            axes.imshow(pixels, interpolation="nearest")
    num_classes = len(class_names)
    legend = [Patch(color=palette[i] / 255, label=name) for i, name in enumerate(class_names)]
    legend += [
        Patch(color=palette[num_classes] / 255, label="unlabelled"),
        Patch(facecolor=palette[VOID] / 255, edgecolor="0.6", label="void / ignored"),
    ]
    figure.legend(handles=legend, loc="lower center", ncol=_LEGEND_COLUMNS, fontsize=9)
    figure.suptitle(title, fontsize=12)
    figure.subplots_adjust(
        left=0.01,
        right=0.99,
        top=1 - 0.7 / height,
        bottom=(0.1 + 0.25 * legend_rows) / height,
        wspace=0.04,
        hspace=0.04,
    )
    return figure


def render(figure: Figure) -> np.ndarray:
    """The figure's pixels, uint8 RGB [H,W,3] (what files and loggers receive)."""
    canvas = figure.canvas
    assert isinstance(canvas, FigureCanvasAgg)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
