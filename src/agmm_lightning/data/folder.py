"""Bring your own data: a generic folder of images, masks, split lists and weak labels.

Layout (``root``)::

    images/<stem>.png|.jpg          RGB (grey is converted to RGB), or in_channels channels
    masks/<stem>.png                dense class-index masks, 255 = void (optional for training)
    splits/train.txt, val.txt, test.txt   one stem per line (test optional: val is used)
    classes.txt                     optional, one class name per line (line i = class i)
    weak/<form>/<stem>.png          optional ready-made weak labels (point|scribble|block|box|image)
    weak/box/<stem>.json            optional boxes: [{"label": int, "box": [x0, y0, x1, y1]}, ...]
    splits/train_forms.txt          optional: "<stem> <form>" per training image (mixed forms)

Without ``weak/<form>/`` the weak label is simulated from ``masks/`` (seeded, the same every
epoch). Validation and test always use ``masks/``. With ``splits/<train_split>_forms.txt``
each training image has its own form, read from ``weak/<form>/`` (``full``: its mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Literal, cast, get_args

import numpy as np

from agmm_lightning.data.files import FileDataModule, match_images
from agmm_lightning.data.io import (
    IMAGE_SUFFIXES,
    index_files,
    read_id_list,
    read_json,
    require_directory,
)
from agmm_lightning.data.readers import (
    BoxWeakLabels,
    ImageRecord,
    MaskTags,
    TagReader,
    WeakLabelReader,
)
from agmm_lightning.errors import InputError, MissingInputError
from agmm_lightning.weak_labels import WeakLabelForm, WeakLabelOption

__all__ = ["FolderDataModule", "read_box_file", "read_forms_manifest"]

_FORMS: tuple[str, ...] = get_args(WeakLabelForm)


def read_forms_manifest(
    path: Path, names: Sequence[str], split_list: Path
) -> dict[str, WeakLabelForm]:
    """Read a forms manifest: one ``<image id> <form>`` line per image of the training split.

    Blank lines and lines starting with ``#`` are skipped.

    Args:
        path: The manifest (``splits/<train_split>_forms.txt``).
        names: The training split's ids.
        split_list: The training split's list, for messages.

    Returns:
        ``image id -> form``.

    Raises:
        InputError: Listing every bad line (not two words, an unknown form, an id listed twice
            or not in the split) and every image of the split without a line.
    """
    in_split = set(names)
    forms: dict[str, WeakLabelForm] = {}
    lines: dict[str, int] = {}
    mentioned = set()
    problems = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        where = f"{path}, line {number}"
        if len(words) != 2:
            problems.append(f"{where}: {line.strip()!r} is not '<image id> <form>'.")
            continue
        name, form = PurePosixPath(words[0]).stem, words[1]
        mentioned.add(name)
        if form not in _FORMS:
            problems.append(
                f"{where}: unknown form {form!r} for image {name!r}; expected one of {_FORMS}."
            )
        elif name in lines:
            first = lines[name]
            problems.append(f"{where}: image {name!r} is listed again (first on line {first}).")
        elif name not in in_split:
            problems.append(
                f"{where}: image {name!r} is not in the training split ({split_list}); remove "
                "the line, or add the image to the split."
            )
        else:
            forms[name] = cast(WeakLabelForm, form)
            lines[name] = number
    problems += [
        f"{path}: no line for training image {name!r} (expected '{name} <form>'), so it has no "
        "weak label."
        for name in names
        if name not in mentioned
    ]
    if problems:
        shown = "\n".join(f"  {problem}" for problem in problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise InputError(
            f"{len(problems)} problem(s) with the weak-label forms of the training images:\n"
            f"{shown}{more}\nGive each image of {split_list} one line '<image id> <form>', form "
            f"one of {_FORMS}, or remove {path} to give every image `weak_label`'s form."
        )
    return forms


def read_box_file(path: Path, num_classes: int) -> np.ndarray:
    """Read a box file: ``[{"label": int, "box": [x0, y0, x1, y1]}, ...]`` in pixel edges.

    ``x1`` and ``y1`` are exclusive (a box covering only pixel (0, 0) is ``[0, 0, 1, 1]``).

    Args:
        path: JSON file.
        num_classes: C.

    Returns:
        float32 [N,5] rows ``(x0, y0, x1, y1, class)``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not a list of such objects, or a label is out of range.
    """
    expected = 'a JSON list of {"label": int, "box": [x0, y0, x1, y1]}'
    entries = read_json(path, "weak/box", expected)
    if not isinstance(entries, list):
        raise InputError(f"{path}: expected {expected}, got {type(entries).__name__}.")
    rows = []
    for entry in entries:
        try:
            label = int(entry["label"])
            x0, y0, x1, y1 = (float(value) for value in entry["box"])
        except (TypeError, KeyError, ValueError) as error:
            raise InputError(f"{path}: entry {entry!r} is not {expected}.") from error
        if not 0 <= label < num_classes:
            raise InputError(
                f"{path}: box label {label} is out of range; expected 0..{num_classes - 1}."
            )
        rows.append((x0, y0, x1, y1, label))
    return np.asarray(rows, np.float32).reshape(-1, 5)


class FolderDataModule(FileDataModule):
    """Images, masks and weak labels in the generic folder layout (see the module docstring).

    Args:
        root: The dataset folder.
        weak_label: Form of the training label (METHOD §4), or a mix ``form -> fraction``; a
            forms manifest ``splits/<train_split>_forms.txt`` gives each training image its own
            form instead (it wins over ``weak_label``).
        num_classes: Number of classes C; None reads it from ``classes.txt``.
        train_split: Name of the training list in ``splits/``.
        val_split: Name of the validation list in ``splits/``.
        test_split: Name of the test list in ``splits/`` (the validation list if it is missing).
        **kwargs: Options of :class:`~agmm_lightning.data.files.FileDataModule` and of every
            DataModule. Here ``simulate`` ignores ``weak/<form>/``, and ``cam_dir=None`` uses
            ``weak/image/`` when it exists.

    Raises:
        FileNotFoundError: If ``num_classes`` is None and ``root`` or ``classes.txt`` does not
            exist.
        ValueError: If ``num_classes`` disagrees with ``classes.txt`` or an option is out of
            range.
    """

    layout = "images/, masks/, splits/{train,val}.txt and optionally classes.txt and weak/"
    mask_fix = "Masks in masks/ must be class-index PNGs (0..C-1, 255 = void)."

    def __init__(
        self,
        root: str,
        weak_label: WeakLabelOption = "point",
        num_classes: int | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str = "test",
        **kwargs: Any,
    ) -> None:
        splits = {"train": train_split, "val": val_split, "test": test_split}
        super().__init__(root, splits=splits, weak_label=weak_label, **kwargs)
        self._class_names = self._read_class_names(num_classes)
        count = len(self._class_names)
        source = "classes.txt lists" if num_classes is None else f"num_classes={count} gives"
        self.mask_fix = (
            f"{source} {count} classes (0..{count - 1}): add the missing ones, or fix the masks "
            "(class-index PNGs in masks/, 255 = void)."
        )

    def _read_class_names(self, num_classes: int | None) -> list[str]:
        """Class names from ``classes.txt``, or ``class_<i>`` when only ``num_classes`` is given."""
        path = self.root / "classes.txt"
        if not path.is_file():
            if num_classes is None:
                require_directory(self.root, "root", self.layout)
                raise MissingInputError(
                    f"{path}: file not found; expected one class name per line. Add it, or set "
                    "the `num_classes` option."
                )
            return [f"class_{index}" for index in range(num_classes)]
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if num_classes is not None and num_classes != len(names):
            raise InputError(
                f"{path}: lists {len(names)} classes but num_classes={num_classes}. Fix one of "
                "them (or leave `num_classes` unset)."
            )
        return names

    @property
    def class_names(self) -> list[str]:
        """Names from ``classes.txt`` (``class_<i>`` without it)."""
        return list(self._class_names)

    def find_images(self) -> dict[str, Path]:
        """Index ``images/``."""
        folder = require_directory(self.root / "images", "root", "images/<stem>.png|.jpg")
        return index_files(folder, IMAGE_SUFFIXES)

    def has_test_split(self) -> bool:
        """Whether a test split is configured (else ``test`` evaluates the validation split)."""
        return (self.root / "splits" / f"{self.splits['test']}.txt").is_file()

    def split_records(self, split: Literal["train", "val", "test"]) -> list[ImageRecord]:
        """Read ``splits/<name>.txt`` and pair each stem with its image and mask."""
        path = self.root / "splits" / f"{self.splits[split]}.txt"
        option = f"{split}_split"
        names = read_id_list(path, option)
        return match_images(
            names,
            self.image_index(),
            source=f"{path} (`{option}`)",
            expected_image=lambda stem: self.root / "images" / f"{stem}.png",
            mask_path=lambda stem: self.root / "masks" / f"{stem}.png",
        )

    def forms_manifest(self) -> Path:
        """The training images' forms manifest, ``splits/<train_split>_forms.txt``."""
        return self.root / "splits" / f"{self.splits['train']}_forms.txt"

    def train_forms(self, records: Sequence[ImageRecord]) -> dict[str, WeakLabelForm] | None:
        """Each training image's form from the forms manifest, else as ``weak_label`` says."""
        path = self.forms_manifest()
        if not path.is_file():
            return super().train_forms(records)
        split_list = self.root / "splits" / f"{self.splits['train']}.txt"
        return read_forms_manifest(path, [record.name for record in records], split_list)

    def native_weak_labels(
        self, form: WeakLabelForm, names: Sequence[str]
    ) -> WeakLabelReader | None:
        """Read ``weak/<form>/`` (JSON or PNG boxes); None, to simulate, when it is missing."""
        folder = self.root / "weak" / form
        if not folder.is_dir():
            return None
        option = f"weak/{form}"
        if form == "box" and any(folder.glob("*.json")):
            files = self.label_files(folder, option, names, suffixes=(".json",))
            return BoxWeakLabels(files, partial(read_box_file, num_classes=self.num_classes))
        return self.png_weak_labels(folder, option, names, as_points=form == "point")

    def cam_folder(self) -> Path | None:
        """``cam_dir``, else ``weak/image/`` when it exists."""
        folder = super().cam_folder()
        default = self.root / "weak" / "image"
        return folder if folder is not None or not default.is_dir() else default

    def image_tags(self, names: Sequence[str]) -> TagReader | None:
        """Tags from the masks when ``masks/`` exists, else from the CAM pseudo labels."""
        del names
        if (self.root / "masks").is_dir():
            return MaskTags(self.num_classes)
        if self.cam_folder() is None:
            raise InputError(
                f"{self.root}: weak_label='image' needs tags or pseudo labels, but there is "
                "neither masks/ nor weak/image/. Add one of them, or set the `cam_dir` option."
            )
        return None
