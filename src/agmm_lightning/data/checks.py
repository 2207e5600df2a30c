"""Checks of a dataset's files: header reads before training, a full decode on demand.

A bad file found by the DataLoader hours into a run costs the run. :func:`read_headers` reads
only the headers of every image and label file of a split (sizes, image channels against
``in_channels``, single-channel labels), fast enough to run at every ``setup``;
:func:`decode_all` decodes every file with the checks of training (images, mask values,
weak-label files), which ``agmm check-data`` runs. Both return every problem they find, not only
the first.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from rich.progress import track

from agmm_lightning.data.io import check_channels, check_same_size, image_header, label_size
from agmm_lightning.data.readers import (
    ImageLevelWeakLabels,
    MixedWeakLabels,
    RasterWeakLabels,
    WeakLabelReader,
)
from agmm_lightning.errors import InputError

if TYPE_CHECKING:  # files.py imports this module: the dataset type only annotates
    from agmm_lightning.data.files import FileDataset

__all__ = ["decode_all", "read_headers", "summarize", "track_progress"]

Item = TypeVar("Item")

PROGRESS_FROM = 1000
"""Header checks of at least this many images show a progress bar."""


def _weak_label_rasters(reader: WeakLabelReader | MixedWeakLabels | None, name: str) -> list[Path]:
    """The weak-label PNGs of an image that must have its size (XML and JSON labels have none)."""
    if isinstance(reader, MixedWeakLabels):
        reader = reader.reader(name)
    if isinstance(reader, ImageLevelWeakLabels):
        reader = reader.cam
    return [reader.files.path(name)] if isinstance(reader, RasterWeakLabels) else []


def track_progress(items: Sequence[Item], description: str, show: bool) -> Iterator[Item]:
    """Iterate over ``items`` behind a transient progress bar (none unless ``show``)."""
    yield from track(items, description=description, disable=not show, transient=True)


def read_headers(dataset: FileDataset, split: str, *, progress: bool = True) -> list[str]:
    """Read the header of every image and label file of a split; no pixel is decoded.

    Args:
        dataset: The split's dataset.
        split: Its name, for the progress bar.
        progress: Allow a progress bar (shown for :data:`PROGRESS_FROM` images or more).

    Returns:
        One message per unreadable file, image whose channels do not fit ``in_channels``, or
        size mismatch (empty when all is well).
    """
    problems = []
    show = progress and len(dataset.records) >= PROGRESS_FROM
    labels_needed = dataset.mode != "predict"
    for record in track_progress(dataset.records, f"Checking the {split} files", show):
        try:
            header = image_header(record.image)
            check_channels(header.channels, dataset.in_channels, record.image)
        except InputError as error:
            problems.append(str(error))
            continue
        shape = (header.height, header.width)
        labels = [record.mask] if labels_needed and record.mask is not None else []
        if labels_needed:
            labels += _weak_label_rasters(dataset.weak_labels, record.name)
        for path in labels:
            try:
                check_same_size(label_size(path), shape, path, record.image)
            except InputError as error:
                problems.append(str(error))
    return problems


def decode_all(dataset: FileDataset, split: str) -> list[str]:
    """Decode every image, mask and weak-label file of a split as training would.

    Args:
        dataset: The split's dataset.
        split: Its name, for the progress bar.

    Returns:
        One message per file that fails (empty when all is well).
    """
    problems = []
    reads_weak_labels = dataset.weak_labels is not None and dataset.mode in ("train", "tagged")
    for index in track_progress(range(len(dataset)), f"Decoding the {split} files", True):
        try:
            name, _, mask = dataset.load(index)
            if reads_weak_labels:
                dataset.weak_label(name, mask)
        except InputError as error:
            problems.append(str(error))
    return problems


def summarize(problems: Iterable[str], what: str, shown: int = 10) -> str:
    """One message listing the first ``shown`` problems and counting the others.

    Args:
        problems: The problems' messages.
        what: What was checked, e.g. "the train split".
        shown: How many to list.

    Returns:
        The message.
    """
    problems = list(problems)
    lines = [f"{len(problems)} problem(s) with the files of {what}:"]
    lines += [f"  {problem}" for problem in problems[:shown]]
    if len(problems) > shown:
        lines.append(f"  ... and {len(problems) - shown} more")
    return "\n".join(lines)
