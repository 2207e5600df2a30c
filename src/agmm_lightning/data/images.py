"""Images to segment: any folder of image files, without masks, splits or class names.

``agmm predict --ckpt_path=model.ckpt --data=photos/`` reads every ``.jpg``, ``.jpeg`` and
``.png`` under ``photos/`` (sub-folders included) at its own size; a prediction keeps the file's
path relative to the folder as its name, so sub-folders are mirrored in the output. The name drops
the suffix unless two files share a stem (``a.png`` and ``a.jpg``): those keep it, so no output
overwrites another. An image that cannot be read is skipped and reported at the end. The images
are read and normalised as the model's training images were: its ``in_channels``, ``mean`` and
``std`` (from its checkpoint) unless given.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

from agmm_lightning.data.base import AGMMDataModule, Split, WeakLabelDataset
from agmm_lightning.data.io import IMAGE_SUFFIXES, read_image, require_directory
from agmm_lightning.data.pixels import Normalization, check_normalization, default_normalization
from agmm_lightning.data.transforms import eval_transform
from agmm_lightning.errors import InputError

__all__ = ["ImageFolderDataModule", "ImageFolderDataset", "find_images"]


def find_images(root: Path) -> list[Path]:
    """Every image file under ``root`` (sub-folders included), sorted by path.

    Raises:
        InputError: If ``root`` is not a folder or holds no image.
    """
    require_directory(root, "data.root", "a folder of .jpg or .png images")
    images = sorted(
        path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()
    )
    if not images:
        raise InputError(
            f"{root}: no image found; expected .jpg, .jpeg or .png files in it or its sub-folders."
        )
    return images


class ImageFolderDataset(WeakLabelDataset):
    """The images of a folder for prediction, named by their path relative to it.

    Args:
        root: The folder.
        in_channels: Channels of the images (see :func:`~agmm_lightning.data.io.read_image`).
        normalization: Per-channel ``(mean, std)``; None is ImageNet's.
    """

    def __init__(
        self, root: Path, in_channels: int = 3, normalization: Normalization | None = None
    ) -> None:
        super().__init__(0, mode="predict", transform=eval_transform(*(normalization or ())))
        self.root = root
        self.in_channels = in_channels
        self.paths = find_images(root)
        stems = [path.relative_to(root).with_suffix("").as_posix() for path in self.paths]
        shared = {stem for stem, count in Counter(stems).items() if count > 1}
        self.names = [
            path.relative_to(root).as_posix() if stem in shared else stem
            for path, stem in zip(self.paths, stems, strict=True)
        ]

    def __len__(self) -> int:
        """Return the number of images."""
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """The sample of image ``index``; ``unreadable`` holds why when it cannot be read.

        An unreadable image does not stop the run: it comes as a one-pixel placeholder that the
        prediction writer skips and lists at the end.
        """
        try:
            return super().__getitem__(index) | {"unreadable": ""}
        except InputError as error:
            warnings.warn(f"{error} Skipped; the other images are predicted.", stacklevel=2)
            placeholder = torch.zeros(self.in_channels, 1, 1)
            return {"image": placeholder, "name": self.names[index], "unreadable": str(error)}

    def load(self, index: int) -> tuple[str, np.ndarray, None]:
        """Read image ``index``: its name (see the module) and pixels."""
        return self.names[index], read_image(self.paths[index], self.in_channels), None


class ImageFolderDataModule(AGMMDataModule):
    """A folder of images to segment with ``predict``: no masks, no splits, any sizes.

    The model brings the class count and names (from its checkpoint), so ``num_classes`` stays
    None unless a run needs it before the model is built; likewise the channels and normalisation
    of its training images.

    Args:
        root: The folder of images.
        num_classes: The model's class count, or None to take the checkpoint's.
        num_workers: DataLoader worker processes.
        in_channels: Channels of the images, or None to take the model's (3 without one).
        mean: Per-channel mean of the 0..1 pixels, or None to take the model's.
        std: Per-channel standard deviation, or None to take the model's.

    Raises:
        InputError: At ``setup``, if ``root`` holds no image; when asked for a split other than
            ``predict``.
    """

    def __init__(
        self,
        root: str,
        num_classes: int | None = None,
        num_workers: int = 0,
        in_channels: int | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__(num_workers=num_workers, in_channels=in_channels or 3)
        check_normalization(mean, std, in_channels or len(mean or std or ()) or 3)
        self.root = Path(root)
        self._num_classes = num_classes
        self._options = (in_channels, mean, std)

    @property
    def num_classes(self) -> int | None:  # type: ignore[override]
        """The class count given, or None (the model's)."""
        return self._num_classes

    @property
    def in_channels(self) -> int | None:  # type: ignore[override]
        """The channels given, or None (the model's)."""
        return self._options[0]

    @property
    def mean(self) -> tuple[float, ...] | None:
        """The mean given, or None (the model's)."""
        return self._options[1]

    @property
    def std(self) -> tuple[float, ...] | None:
        """The standard deviation given, or None (the model's)."""
        return self._options[2]

    def build_dataset(self, split: Split) -> ImageFolderDataset:
        """The folder's images, for ``predict`` only, read and normalised as the model's were."""
        if split != "predict":
            raise InputError(
                f"ImageFolderDataModule ({self.root}) holds images without masks: it serves "
                f"`predict` only, not the {split!r} split. Train and evaluate with a dataset "
                "that has labels (e.g. FolderDataModule)."
            )
        in_channels, mean, std = self._options
        model = self.trainer.lightning_module if self.trainer is not None else None
        in_channels = in_channels or getattr(model, "hparams", {}).get("in_channels") or 3
        normalization: Normalization | None = None
        if mean is not None and std is not None:
            normalization = (mean, std)
        else:
            normalization = getattr(model, "normalization", None)
        normalization = normalization or default_normalization(in_channels)
        if normalization is None:
            raise InputError(
                f"ImageFolderDataModule ({self.root}): no mean and std for {in_channels}-channel "
                "images; give `mean` and `std`, or predict with the model's checkpoint."
            )
        return ImageFolderDataset(self.root, in_channels, normalization)
