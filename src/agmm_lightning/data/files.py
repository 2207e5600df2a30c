"""Datasets read from disk: the file dataset of a split and the base of every file DataModule.

A concrete DataModule (VOC, Cityscapes, ...) lists the images of each split as
:class:`~agmm_lightning.data.readers.ImageRecord` s, says how its masks are encoded, and builds
the reader of its own weak-label files; :class:`FileDataModule` does the rest: image-level labels
from CAM folders, simulation from dense masks, the test split's fallback to validation, checks of
every file's header before training, and the :class:`FileDataset` of each split.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import partial
from itertools import compress
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np

from agmm_lightning.data.base import STAGE_SPLITS, AGMMDataModule, Split, WeakLabelDataset
from agmm_lightning.data.checks import PROGRESS_FROM, read_headers, summarize, track_progress
from agmm_lightning.data.io import (
    LabelDecoder,
    check_label_values,
    check_same_size,
    existing_files,
    image_size,
    index_files,
    read_class_index_png,
    read_image,
    read_onehot_tags,
    require_directory,
    unlabeled_to_target,
)
from agmm_lightning.data.readers import (
    ImageLevelWeakLabels,
    ImageRecord,
    LabelFiles,
    MaskTags,
    MixedWeakLabels,
    RasterWeakLabels,
    TableTags,
    TagReader,
    WeakLabelReader,
    index_label_files,
    require_entries,
)
from agmm_lightning.data.transforms import build_eval_sample
from agmm_lightning.errors import InputError, MissingInputError
from agmm_lightning.targets import VOID
from agmm_lightning.weak_labels import (
    WeakLabel,
    WeakLabelForm,
    WeakLabelOption,
    assign_forms,
    form_mix,
)

__all__ = ["FileDataModule", "FileDataset", "folder_split", "identity_mask", "match_images"]


def match_images(
    names: Sequence[str],
    images: Mapping[str, Path],
    *,
    source: str,
    expected_image: Callable[[str], Path],
    mask_path: Callable[[str], Path | None],
) -> list[ImageRecord]:
    """Pair the ids of a split with their image files, failing on the first ids without one.

    Args:
        names: The split's ids.
        images: Every image of the dataset, ``id -> path`` (see :func:`index_files`).
        source: Where the ids come from (a list file and its option), for the message.
        expected_image: Where the image of an id should be, for the message.
        mask_path: Where the dense mask of an id is, or None.

    Returns:
        One record per id, in order.

    Raises:
        FileNotFoundError: If some id has no image.
    """
    missing = [name for name in names if name not in images]
    if missing:
        raise MissingInputError(
            f"{source} names {len(missing)} image(s) that do not exist, e.g. "
            f"{expected_image(missing[0])} (ids {missing[:5]}). Remove them from the list, or "
            "check the `root` option."
        )
    return [ImageRecord(name, images[name], mask_path(name)) for name in names]


def folder_split(
    folder: Path, suffix: str, *, split: str, option: str, recursive: bool = False
) -> dict[str, Path]:
    """The images of a split kept in a folder of its own (ADE20K, Cityscapes, COCO).

    Args:
        folder: The split's folder.
        suffix: The images' file ending.
        split: The split, for messages.
        option: The DataModule option that names the folder.
        recursive: Also list sub-folders (Cityscapes' cities).

    Returns:
        ``id -> image file``.

    Raises:
        FileNotFoundError: If the folder does not exist.
        ValueError: If it holds no image.
    """
    require_directory(folder, option, f"the {split} images *{suffix}")
    images = index_files(folder, (suffix,), recursive=recursive)
    if not images:
        raise InputError(
            f"{folder}: no *{suffix} image; expected the {split} images. Check `{option}`."
        )
    return images


class FileDataset(WeakLabelDataset):
    """A split of images (and dense masks) on disk, with weak labels from a reader or simulated.

    Args:
        records: The split's images.
        num_classes: C.
        decode_mask: Raw mask values -> class indices (255 void).
        mask_fix: What to do about out-of-range mask values, for the message.
        weak_labels: Reader of the training weak labels; None simulates them from the masks. A
            split of mixed forms has one reader per form (:class:`MixedWeakLabels`), and its
            forms are the dataset's (``forms``).
        in_channels: Channels of the images (see :func:`~agmm_lightning.data.io.read_image`).
        ignore_index: The value the mask files mark void with; it becomes 255 (VOID), and a
            stored 255 is then a class value like any other.
        **kwargs: ``mode``, ``transform``, ``weak_label``, ``seed`` and ``simulation``: see
            :class:`~agmm_lightning.data.base.WeakLabelDataset`.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        num_classes: int,
        *,
        decode_mask: LabelDecoder,
        mask_fix: str,
        weak_labels: WeakLabelReader | MixedWeakLabels | None,
        in_channels: int = 3,
        ignore_index: int = VOID,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, **kwargs)
        self.in_channels = in_channels
        self.ignore_index = ignore_index
        self.records = list(records)
        self.records_by_name = {record.name: record for record in self.records}
        self.decode_mask = decode_mask
        self.mask_fix = mask_fix
        self.weak_labels = weak_labels
        # Batches must share their keys: when only some images have a mask, the others get an
        # all-void one (ignored by every metric) instead of none.
        self.void_missing_masks = any(record.mask is not None for record in self.records)

    def __len__(self) -> int:
        """Return the number of images."""
        return len(self.records)

    def image_names(self) -> list[str]:
        """The split's image ids."""
        return [record.name for record in self.records]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return the sample of image ``index``; a file that fails to decode does not end the run.

        The header check at ``setup`` finds most bad files; one whose pixels are corrupt behind a
        good header is found only here. A training sample is then replaced by the next good one
        and an evaluation sample by an all-void one (left out of the metrics, with the reason in
        its ``left_out``, which the segmenter reports), with a warning naming the file.
        """
        try:
            sample = super().__getitem__(index)
        except InputError as error:
            if self.mode == "train":
                return self._replace_training_sample(index, error)
            if self.mode == "eval":
                return self._void_sample(index, error)
            raise
        if self.mode == "eval":
            sample["left_out"] = ""  # nothing: the image counts
        return sample

    def _replace_training_sample(self, index: int, error: InputError) -> dict[str, Any]:
        warnings.warn(f"{error} Training goes on with the next image instead.", stacklevel=2)
        for offset in range(1, len(self)):
            try:
                return super().__getitem__((index + offset) % len(self))
            except InputError:
                continue
        raise InputError(f"No training image of the split can be read; the first: {error}")

    def _void_sample(self, index: int, error: InputError) -> dict[str, Any]:
        record = self.records[index]
        height, width = image_size(record.image)
        warnings.warn(f"{error} The image is left out of the metrics.", stacklevel=2)
        image = np.zeros((height, width, self.in_channels), np.uint8)
        void = np.full((height, width), VOID, np.uint8)
        sample = build_eval_sample(self.transform, image, name=record.name, mask=void)
        return sample | {"left_out": str(error)}

    def load(self, index: int) -> tuple[str, np.ndarray, np.ndarray | None]:
        """Read image ``index`` and, except for prediction, its dense mask.

        Args:
            index: Position in the split.

        Returns:
            The image id, its pixels [H,W,C] (uint8, or float32 in 0..1 for 16-bit files) and
            the mask [H,W] (255 void; all void for an image without one in a split where others
            have one) or None.

        Raises:
            FileNotFoundError: If a file is missing.
            ValueError: If a file is corrupt, the mask's size differs from the image's or it
                holds values out of range.
        """
        record = self.records[index]
        image = read_image(record.image, self.in_channels)
        if self.mode == "predict" or (record.mask is None and not self.void_missing_masks):
            return record.name, image, None
        if record.mask is None:
            return record.name, image, np.full(image.shape[:2], VOID, np.uint8)
        raw = read_class_index_png(record.mask)
        check_same_size(raw.shape, image.shape[:2], record.mask, record.image)
        mask = check_label_values(
            self._decode_void(raw, self.decode_mask(raw, record.mask)),
            raw,
            self.num_classes,
            record.mask,
            unlabeled=False,
            fix=self.mask_fix,
            stored_void=self.ignore_index,
        )
        return record.name, image, mask

    def _decode_void(self, raw: np.ndarray, decoded: np.ndarray) -> np.ndarray:
        """Map the stored ``ignore_index`` to VOID; a stored 255 is then out of range, not void."""
        if self.ignore_index == VOID:
            return decoded
        values = np.where((raw == VOID) & (decoded == VOID), -1, decoded.astype(np.int64))
        return np.where(raw == self.ignore_index, VOID, values)

    def weak_label(self, name: str, mask: np.ndarray | None) -> WeakLabel:
        """Return the training weak label of an image: read by the reader, else simulated.

        Args:
            name: The image id.
            mask: Its dense mask, or None.

        Returns:
            The weak label.
        """
        reader = self.weak_labels
        if isinstance(reader, MixedWeakLabels):
            reader = reader.reader(name)
        if reader is None:
            return super().weak_label(name, mask)
        record = self.records_by_name[name]
        shape = mask.shape if mask is not None else image_size(record.image)
        return reader(record, (shape[0], shape[1]), mask)


def identity_mask(raw: np.ndarray, path: Path) -> np.ndarray:
    """Masks stored as class indices with 255 void (the :data:`LabelDecoder` of most datasets).

    Args:
        raw: The PNG's values.
        path: Its file (unused).

    Returns:
        ``raw``.
    """
    del path
    return raw


class FileDataModule(AGMMDataModule):
    """Base of the DataModules that read a dataset in its distributed layout.

    Subclasses implement :meth:`find_images` and :meth:`split_records`, set :attr:`classes`, and
    override :meth:`native_weak_labels` (their own weak-label files),
    :meth:`image_tags`, :meth:`mask_decoder` and :attr:`layout` / :attr:`mask_fix` (messages).

    Args:
        root: The dataset's folder.
        splits: Where each split is listed (``train``, ``val``, ``test``: a folder or a list
            file, as the dataset has them); a ``test`` of None evaluates the validation split.
        weak_label: Form of the training label (METHOD §4), or a mix ``form -> fraction`` (see
            :class:`~agmm_lightning.data.base.AGMMDataModule`): each image's label is then read
            by the reader of its form (or simulated, as that form would be alone).
        simulate: Derive the weak label from the dense masks (seeded) instead of reading files.
        unlabeled_value: Value marking unlabelled pixels in ready-made weak-label and CAM PNGs;
            None detects it per file (C if the file holds C, else 255).
        cam_dir: Folder of CAM pseudo-label PNGs for ``weak_label="image"`` (relative to
            ``root`` unless absolute); None trains on tags alone.
        ignore_index: The value that marks void pixels in the dense mask files (255 by
            default); it is read as the library's void (255), before the dataset's own decoding
            (ADE20K's shift, Cityscapes' label ids). Weak-label PNGs keep 255 as void.
        **kwargs: ``batch_size``, ``crop_size``, ``num_workers``, ``seed``, ``augment``,
            ``predict_split``, ``points_per_segment``, ``block_fraction``,
            ``box_core_fraction``, ``in_channels``, ``mean`` and ``std``: see
            :class:`~agmm_lightning.data.base.AGMMDataModule`.

    Raises:
        ValueError: If an option is out of range.
    """

    layout = "the dataset's images and labels"
    """What ``root`` should hold, for error messages."""

    mask_fix = "Check that the masks hold class indices (255 = void)."
    """What to do about out-of-range mask values, for error messages."""

    def __init__(
        self,
        root: str,
        *,
        splits: Mapping[str, str | None],
        weak_label: WeakLabelOption = "point",
        simulate: bool = False,
        unlabeled_value: int | None = None,
        cam_dir: str | None = None,
        ignore_index: int = VOID,
        **kwargs: Any,
    ) -> None:
        super().__init__(weak_label=weak_label, **kwargs)
        if unlabeled_value is not None and not 0 <= unlabeled_value <= VOID:
            raise InputError(f"unlabeled_value must be None or in 0..255, got {unlabeled_value}.")
        if not 0 <= ignore_index <= 65535:
            raise InputError(
                f"ignore_index must be a stored mask value in 0..65535, got {ignore_index}."
            )
        self.ignore_index = ignore_index
        self.root = Path(root)
        self.splits = dict(splits)
        self.simulate = simulate
        self.unlabeled_value = unlabeled_value
        self.cam_dir = cam_dir
        self._image_index: dict[str, Path] | None = None
        self._checked_splits: set[Split] = set()

    # ------------------------------------------------------------------ subclass hooks
    @abstractmethod
    def find_images(self) -> dict[str, Path]:
        """List every image of the dataset (all splits).

        Returns:
            ``id -> image file``.
        """

    def has_test_split(self) -> bool:
        """Whether a test split is configured; without one, ``test`` evaluates the val split."""
        return self.splits["test"] is not None

    @abstractmethod
    def split_records(self, split: Literal["train", "val", "test"]) -> list[ImageRecord]:
        """List the images of a split, with the paths of their dense masks.

        Args:
            split: "train", "val" or "test" (prediction uses the test images).

        Returns:
            The split's records (mask files may not exist for training images).

        Raises:
            FileNotFoundError: If a folder or list is missing or a listed image does not exist.
            ValueError: If the split is empty.
        """

    def native_weak_labels(
        self, form: WeakLabelForm, names: Sequence[str]
    ) -> WeakLabelReader | None:
        """Return the reader of the dataset's own files of a weak-label form.

        Called for every form but "full" and "image" when ``simulate`` is False.

        Args:
            form: The weak-label form.
            names: The training ids.

        Returns:
            The reader, or None to simulate the form from the dense masks.

        Raises:
            ValueError: If the dataset has no files of this form (the default).
        """
        del names
        raise InputError(
            f"{type(self).__name__} has no {form!r} label files to read; set `simulate: true` "
            "to derive them from the dense masks."
        )

    def train_forms(self, records: Sequence[ImageRecord]) -> dict[str, WeakLabelForm] | None:
        """Each training image's weak-label form, or None when all have ``weak_label``'s one.

        Default: dealt out from the mix of ``weak_label`` by
        :func:`~agmm_lightning.weak_labels.assign_forms` (``seed`` and the split's ids).

        Args:
            records: The training split's images.

        Returns:
            ``image id -> form``, or None for a single form.
        """
        mix = form_mix(self.weak_label)
        if mix is None:
            return None
        return assign_forms([record.name for record in records], mix, self.seed)

    def image_tags(self, names: Sequence[str]) -> TagReader | None:
        """Return where the tags of ``weak_label="image"`` come from (default: the masks).

        Args:
            names: The training ids.

        Returns:
            The tag reader, or None to take the classes of the CAM pseudo labels.
        """
        del names
        return MaskTags(self.num_classes)

    def cam_folder(self) -> Path | None:
        """Return the folder of CAM pseudo labels for ``weak_label="image"`` (default: ``cam_dir``).

        Returns:
            The folder, or None to train on tags alone.
        """
        return None if self.cam_dir is None else self.path(self.cam_dir)

    def mask_decoder(self) -> LabelDecoder:
        """Return how mask PNG values map to class indices with 255 void (default: as stored).

        Returns:
            A picklable decoder (a module-level function or a ``functools.partial`` of one), as
            DataLoader workers may receive a pickled copy of the dataset.
        """
        return identity_mask

    # -------------------------------------------------------------------- shared logic
    def image_index(self) -> dict[str, Path]:
        """Return every image of the dataset, ``id -> file`` (listed once, then cached).

        Raises:
            FileNotFoundError: If ``root`` does not exist.
        """
        if self._image_index is None:
            require_directory(self.root, "root", self.layout)
            self._image_index = self.find_images()
        return self._image_index

    def path(self, option_value: str) -> Path:
        """Resolve a path option: relative to ``root`` unless absolute.

        Args:
            option_value: The option's value.

        Returns:
            The path.
        """
        return self.root / option_value

    def table_tags(self, tags_file: str, names: Sequence[str]) -> TableTags:
        """Tags read from a ``cls_labels_onehot.npy`` table, checked against the split.

        Args:
            tags_file: The table (the ``tags_file`` option), relative to ``root`` unless absolute.
            names: The training ids.

        Returns:
            The tag reader.
        """
        path = self.path(tags_file)
        table = read_onehot_tags(path, self.num_classes, "tags_file")

        def place(name: str) -> str:
            return f"{path} [{name!r}]"

        require_entries(
            names, table, self.image_index(), place=place, kind="tag entry", option="tags_file"
        )
        return TableTags(table)

    def label_files(
        self,
        directory: Path,
        option: str,
        names: Sequence[str],
        *,
        suffixes: Sequence[str] = (".png",),
    ) -> LabelFiles:
        """Index a folder of per-image label files, checked against the images.

        Args:
            directory: The folder.
            option: The option that names it.
            names: The training ids, each of which needs a file.
            suffixes: Accepted file endings after the image id.

        Returns:
            The indexed files (see :func:`~agmm_lightning.data.readers.index_label_files`).
        """
        return index_label_files(
            directory, suffixes, option=option, known=self.image_index(), needed=names
        )

    def png_weak_labels(
        self,
        directory: Path,
        option: str,
        names: Sequence[str],
        *,
        suffixes: Sequence[str] = (".png",),
        decode: LabelDecoder | None = None,
        as_points: bool = False,
        fix: str = "Set `unlabeled_value` to the value that marks unlabelled pixels.",
    ) -> RasterWeakLabels:
        """Build the reader of a folder of weak-label PNGs (checked against the images).

        Args:
            directory: The folder.
            option: The option that names it.
            names: The training ids.
            suffixes: Accepted file endings after the image id.
            decode: Raw values -> target; default: class indices plus ``unlabeled_value``.
            as_points: Read the rasters as clicks.
            fix: What to do about out-of-range values, for the message.

        Returns:
            The reader.
        """
        files = self.label_files(directory, option, names, suffixes=suffixes)
        if decode is None:
            if self.unlabeled_value is not None and self.unlabeled_value < self.num_classes:
                raise InputError(
                    f"unlabeled_value={self.unlabeled_value} is a class index; expected "
                    f"{self.num_classes} (C), 255 or None (detect)."
                )
            decode = partial(
                unlabeled_to_target,
                num_classes=self.num_classes,
                unlabeled_value=self.unlabeled_value,
            )
        return RasterWeakLabels(files, self.num_classes, decode, as_points=as_points, fix=fix)

    def setup(self, stage: str) -> None:
        """Build the stage's datasets and read the headers of every file they use.

        A missing or unreadable file, or a label whose size differs from its image, fails here,
        in seconds, rather than when the DataLoader reaches it, and all such files are listed
        together. ``agmm check-data`` decodes every file for a full check.

        Args:
            stage: "fit", "validate", "test" or "predict".

        Raises:
            InputError: Listing the files that cannot be used.
        """
        super().setup(stage)
        rank_zero = self.trainer is None or self.trainer.is_global_zero
        for split in STAGE_SPLITS[stage]:
            if split in self._checked_splits:
                continue
            dataset = self._dataset(split)
            problems = read_headers(cast(FileDataset, dataset), split, progress=rank_zero)
            if problems:
                raise InputError(
                    f"{summarize(problems, f'the {split} split')}\nReplace or remove them; "
                    "`agmm check-data --config <your config>` decodes every file and lists all "
                    "that fail."
                )
            self._checked_splits.add(split)

    def build_dataset(self, split: Split) -> FileDataset:
        """Build the dataset of one split, checking its folders, lists and label files.

        Args:
            split: "train", "val", "test" or "predict" (the ``predict_split`` images: the test
                images without masks, or the training images with their tags).

        Returns:
            The split's dataset.

        Raises:
            FileNotFoundError: If a folder, list, image, needed mask or weak-label file is
                missing.
            ValueError: If a split is empty or a weak-label file belongs to no image.
        """
        self.image_index()
        listed = self.predict_split if split == "predict" else split
        if listed == "test" and not self.has_test_split():
            listed = "val"
        records = self.split_records(listed)
        mode = self.mode(split)
        labelled = mode in ("train", "tagged")
        forms = self.train_forms(records) if mode == "train" else None
        weak_labels = self._train_weak_labels(records, forms) if labelled else None
        masks_needed: bool | dict[str, str]
        if isinstance(weak_labels, MixedWeakLabels):  # the images whose form needs the mask
            masks_needed = {
                record.name: weak_labels.forms[record.name]
                for record in records
                if weak_labels.needs_mask(record.name)
            }
        else:
            masks_needed = mode == "eval" or (
                labelled and (weak_labels is None or weak_labels.needs_mask)
            )
        decode_mask = self.mask_decoder()
        if decode_mask is identity_mask and self.ignore_index < self.num_classes:
            raise InputError(
                f"ignore_index={self.ignore_index} is a class index (0..{self.num_classes - 1}): "
                "set it to the value the masks mark void pixels with."
            )
        return FileDataset(
            self._attach_masks(records, split, required=masks_needed),
            self.num_classes,
            decode_mask=decode_mask,
            mask_fix=self.mask_fix,
            weak_labels=weak_labels,
            in_channels=self.in_channels,
            ignore_index=self.ignore_index,
            mode=mode,
            transform=self.transform(split),
            weak_label=self.weak_label,
            seed=self.seed,
            simulation=self.simulation,
            forms=forms,
        )

    def training_images(self) -> Iterator[np.ndarray]:
        """The training split's images as read, for ``mean``/``std`` ``"auto"``.

        An image that cannot be read is left out with a warning (the header check at ``setup``
        and training deal with it as with any bad file).

        Raises:
            InputError: Listing the problems, if no training image can be read.
        """
        records = self.split_records("train")
        problems = []
        show = len(records) >= PROGRESS_FROM
        for record in track_progress(records, "Computing the training images' mean and std", show):
            try:
                yield read_image(record.image, self.in_channels)
            except InputError as error:
                problems.append(str(error))
        if len(problems) == len(records):
            raise InputError(
                f"{summarize(problems, 'the train split')}\nmean/std 'auto' reads the training "
                "images: fix them, or give `mean` and `std` as numbers."
            )
        if problems:
            warnings.warn(
                f"mean/std 'auto' left out {len(problems)} training image(s) it could not read, "
                f"e.g. {problems[0]}",
                stacklevel=1,
            )

    def _train_weak_labels(
        self, records: Sequence[ImageRecord], forms: Mapping[str, WeakLabelForm] | None
    ) -> WeakLabelReader | MixedWeakLabels | None:
        """The reader of the training weak labels, or None to simulate them from the masks.

        With per-image ``forms``, one reader per form, each checked against its images only.
        """
        names = [record.name for record in records]
        if forms is None:
            return self._form_reader(cast(WeakLabelForm, self.weak_label), names)
        readers: dict[str, WeakLabelReader | None] = {
            form: self._form_reader(form, [name for name in names if forms[name] == form])
            for form in sorted(set(forms.values()))
        }
        return MixedWeakLabels(forms, readers)

    def _form_reader(self, form: WeakLabelForm, names: Sequence[str]) -> WeakLabelReader | None:
        """The reader of one form's labels of images ``names``, or None to simulate them."""
        if form == "full" or self.simulate:
            return None
        if form == "image":
            folder = self.cam_folder()
            cam = None if folder is None else self.png_weak_labels(folder, "cam_dir", names)
            return ImageLevelWeakLabels(self.image_tags(names), cam, self.num_classes)
        return self.native_weak_labels(form, names)

    def _attach_masks(
        self, records: Sequence[ImageRecord], split: Split, *, required: bool | Mapping[str, str]
    ) -> list[ImageRecord]:
        """Drop mask paths that do not exist, or raise if the split needs them.

        ``required`` is True, False, or the images that need theirs (id -> weak-label form).
        """
        candidates = [record.mask for record in records if record.mask is not None]
        present = set(compress(candidates, existing_files(candidates)))
        missing = [record for record in records if record.mask not in present]
        if not isinstance(required, bool):
            missing_needed = [record for record in missing if record.name in required]
            if missing_needed:
                record = missing_needed[0]
                example = record.mask or f"the dense mask of {record.image}"
                raise MissingInputError(
                    f"{example}: dense mask not found ({len(missing_needed)} {split} image(s) "
                    f"whose weak labels need their masks have none, e.g. "
                    f"{[r.name for r in missing_needed[:5]]}); the form of {record.name!r} is "
                    f"{required[record.name]!r}, simulated from (or using) the dense mask. Add "
                    f"the masks, or that form's label files. {self.mask_fix}"
                )
            required = False
        if missing and required:
            mask = missing[0].mask
            example = f"{mask}" if mask is not None else f"the dense mask of {missing[0].image}"
            if mask is not None and not mask.parent.is_dir():
                example = f"{mask.parent}: directory not found, so {example}"
            why = "evaluation" if self.mode(split) == "eval" else f"weak_label={self.weak_label!r}"
            raise MissingInputError(
                f"{example}: dense mask not found ({len(missing)} {split} image(s) have none); "
                f"{why} needs the dense masks. {self.mask_fix}"
            )
        return [
            record if record.mask in present else replace(record, mask=None) for record in records
        ]
