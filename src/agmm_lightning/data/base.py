"""Shared dataset and DataModule machinery: sample assembly, seeded loaders, DDP evaluation.

A concrete dataset only says how to read image ``index`` (its name, RGB image and dense mask);
:class:`WeakLabelDataset` turns that into the sample dicts of METHOD §1, simulating the weak label
from the dense mask with a generator seeded by (seed, image name), so an image keeps the same
weak label in every epoch, worker and split order. A concrete DataModule only says how to build
the dataset of each split.
"""

from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sized
from functools import partial
from typing import Any, Literal, cast, get_args

import albumentations as A
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.loops.progress import _ProcessedTracker
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data.distributed import DistributedSampler

from agmm_lightning.data.pixels import (
    Normalization,
    check_normalization,
    default_normalization,
    image_statistics,
)
from agmm_lightning.data.transforms import (
    build_eval_sample,
    build_train_sample,
    eval_transform,
    reseed_transform,
    sample_seed,
    seed_worker,
    train_transform,
)
from agmm_lightning.errors import InputError
from agmm_lightning.weak_labels import (
    SimulationOptions,
    WeakLabel,
    WeakLabelForm,
    WeakLabelOption,
    assign_forms,
    check_form,
    form_mix,
)
from agmm_lightning.weak_labels.forms import simulate_weak_label, weak_label_rng

Split = Literal["train", "val", "test", "predict"]
Mode = Literal["train", "eval", "predict", "tagged"]
PredictSplit = Literal["test", "train"]
ChannelStatistics = tuple[float, ...] | Literal["auto"] | None
"""A ``mean`` or ``std`` option: one value per channel, ``"auto"`` or None (the default)."""

STAGE_SPLITS: dict[str, tuple[Split, ...]] = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
}
"""The splits each Trainer stage reads."""

__all__ = [
    "STAGE_SPLITS",
    "AGMMDataModule",
    "ChannelStatistics",
    "Mode",
    "PredictSplit",
    "SampleIndex",
    "Split",
    "WeakLabelDataset",
]


class WeakLabelDataset(Dataset[dict[str, Any]], ABC):
    """Base dataset that turns (name, image, dense mask) into the sample dicts of METHOD §1.

    Subclasses implement :meth:`__len__` and :meth:`load`; datasets with ready-made weak-label
    files override :meth:`weak_label`.

    Args:
        num_classes: Number of classes C.
        mode: "train" (augmented, weak label), "eval" (full image and dense mask), "predict"
            (full image only) or "tagged" (full image, its tags as ``image_classes`` and its dense
            mask when there is one: what the CAM stage labels).
        transform: The albumentations pipeline (see :mod:`agmm_lightning.data.transforms`).
        weak_label: Form of the training label, or a mix ``form -> fraction``: each image's form
            is then dealt out by :func:`~agmm_lightning.weak_labels.assign_forms` from the seed
            and the split's names, and every training sample carries ``form`` and ``allowed``.
        seed: Seed of the weak-label simulation.
        simulation: How weak labels are simulated and boxes read.
        forms: Each image's form, given (a manifest) instead of dealt out from a mix; makes the
            dataset mixed like a mix does.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        mode: Mode,
        transform: A.BaseCompose,
        weak_label: WeakLabelOption = "point",
        seed: int = 0,
        simulation: SimulationOptions | None = None,
        forms: Mapping[str, WeakLabelForm] | None = None,
    ) -> None:
        self.mix = form_mix(weak_label)
        self.num_classes = num_classes
        self.mode = mode
        self.transform = transform
        self.weak_label_form = weak_label
        self.seed = seed
        self.simulation = simulation or SimulationOptions()
        self._forms = None if forms is None else dict(forms)

    @property
    def mixed(self) -> bool:
        """Whether images of the dataset may differ in form (a mix, or forms given per image)."""
        return self.mix is not None or self._forms is not None

    def forms_present(self) -> list[WeakLabelForm]:
        """The weak-label forms of a mixed dataset's images, sorted; empty for a single form."""
        if not self.mixed:
            return []
        return sorted({self.form(name) for name in self.image_names()})

    def image_names(self) -> list[str]:
        """The names of the split's images (default: :meth:`load` each; subclasses list them)."""
        return [self.load(index)[0] for index in range(len(self))]

    def form(self, name: str) -> WeakLabelForm:
        """The weak-label form of image ``name``.

        Raises:
            InputError: If the image has no form (not in the manifest's list).
        """
        if not self.mixed:
            return cast(WeakLabelForm, self.weak_label_form)
        if self._forms is None:
            self._forms = assign_forms(
                self.image_names(), cast(Mapping[WeakLabelForm, float], self.mix), self.seed
            )
        if name not in self._forms:
            raise InputError(f"Image {name!r} has no weak-label form in the split's forms.")
        return self._forms[name]

    @abstractmethod
    def __len__(self) -> int:
        """Return the number of images."""

    @abstractmethod
    def load(self, index: int) -> tuple[str, np.ndarray, np.ndarray | None]:
        """Read one image.

        Args:
            index: Position in the split.

        Returns:
            The image's name, its pixels [H,W,C] (uint8 for 8-bit images, float32 in 0..1 for
            deeper ones, see :mod:`agmm_lightning.data.pixels`) and its dense class-index mask
            [H,W] (255 void) or None when the split has no dense ground truth.
        """

    def weak_label(self, name: str, mask: np.ndarray | None) -> WeakLabel:
        """Return the training weak label of an image (default: simulated from its dense mask).

        Args:
            name: The image's identifier.
            mask: Its dense mask, or None.

        Returns:
            The weak label.

        Raises:
            ValueError: If there is no dense mask to simulate from.
        """
        form = self.form(name)
        if mask is None:
            raise InputError(
                f"Image {name!r} has no dense mask to simulate a {form!r} label "
                "from; provide ready-made weak labels or dense masks."
            )
        rng = weak_label_rng(self.seed, name)
        return simulate_weak_label(mask, form, self.num_classes, rng, self.simulation)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Return the sample dict of image ``index`` for this dataset's mode.

        A training :class:`SampleIndex` seeds the augmentation from ``(seed, epoch, index)``.
        """
        if isinstance(index, SampleIndex):
            reseed_transform(self.transform, sample_seed(self.seed, index.epoch, index))
        name, image, mask = self.load(index)
        if self.mode == "predict":
            return build_eval_sample(self.transform, image, name=name)
        if self.mode == "tagged":
            tags = self.weak_label(name, mask).tags
            if tags is None:
                raise InputError(
                    f"Image {name!r} has no image-level tags; predicting on tagged training "
                    "images needs weak_label='image'."
                )
            return build_eval_sample(
                self.transform, image, name=name, mask=mask, image_classes=tags
            )
        if self.mode == "eval":
            if mask is None:
                raise InputError(f"Evaluation needs a dense mask, but image {name!r} has none.")
            return build_eval_sample(self.transform, image, name=name, mask=mask)
        return build_train_sample(
            self.transform,
            image,
            self.num_classes,
            name=name,
            label=self.weak_label(name, mask),
            mask=mask,
            box_core_fraction=self.simulation.box_core_fraction,
            form=self.form(name) if self.mixed else None,
        )


class SampleIndex(int):
    """A training sample's index that also carries its epoch.

    The dataset seeds the sample's augmentation from ``(seed, epoch, index)``, so it depends on
    nothing else (not on the worker that draws it, nor on the samples before it) and a resumed
    run draws what it would have.
    """

    epoch: int

    def __new__(cls, index: int, epoch: int) -> SampleIndex:
        """The index ``index`` of epoch ``epoch``."""
        value = super().__new__(cls, index)
        value.epoch = epoch
        return value

    def __getnewargs__(self) -> tuple[int, int]:  # type: ignore[override]
        """Both numbers, so that the index reaches DataLoader workers whole."""
        return int(self), self.epoch


class EpochShuffleSampler(DistributedSampler):
    """Training order: a permutation that depends only on ``(seed, epoch)``, dealt out to ranks.

    Rank ``r`` of ``world_size`` takes positions ``r, r + world_size, ...`` of the epoch's
    permutation, so the global batches under DDP are those of one process with the global batch
    size. Being a ``DistributedSampler``, it is used by Lightning as it is (not wrapped in a
    re-shuffling one), and Lightning calls :meth:`set_epoch` at the start of every epoch. The
    indices are :class:`SampleIndex` values that carry the epoch.

    A run resumed mid-epoch goes on from where it stopped (:meth:`resume`), so it trains on what
    the uninterrupted run would have.

    Args:
        size: Number of samples.
        seed: Seed of the permutations.
        rank: This process's rank.
        world_size: Number of processes.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        dataset = cast(Dataset[int], range(size))
        super().__init__(dataset, num_replicas=world_size, rank=rank, seed=seed, drop_last=True)
        self.size = size
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch`` (from its start, unless it is the resumed one)."""
        if epoch != self.epoch:
            self.start = 0
        self.epoch = epoch

    def resume(self, epoch: int, consumed: int) -> None:
        """Start in ``epoch`` after the first ``consumed`` samples of its global order."""
        self.epoch = epoch
        self.start = consumed // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)[: self.total_size]
        mine = order[self.rank :: self.num_replicas][self.start :].tolist()
        return iter([SampleIndex(index, self.epoch) for index in mine])


class AGMMDataModule(LightningDataModule, ABC):
    """Base DataModule: builds one dataset per split and the DataLoaders around them.

    Subclasses implement :meth:`build_dataset`, set :attr:`classes` (or override
    :attr:`class_names`), and
    override :attr:`eval_batch_size` when all evaluation images share one size.

    Args:
        batch_size: Training images per batch (per device).
        crop_size: Side of the square training crop, in pixels.
        num_workers: DataLoader worker processes (0 loads in the main process).
        seed: Seed of shuffling, augmentation and weak-label simulation.
        weak_label: Form of the training label (METHOD §4), or a mix of forms with the fraction
            of the images each labels, e.g. ``{point: 0.6, box: 0.3, full: 0.1}`` (fractions
            summing to 1): each image's form is then dealt out from ``seed`` and the split's
            image names (the same every epoch and worker), and every training sample carries its
            ``form`` and an ``allowed`` map, so that batches of mixed forms collate.
        augment: Random scale, flip and colour jitter on training crops (False keeps only the
            random crop and normalisation).
        predict_split: Images of ``predict``: "test", or "train" with each image's tags as
            ``image_classes`` (and its dense mask when there is one), which the CAM stage
            (:class:`~agmm_lightning.tasks.cam.CAMClassifier`) turns into pseudo labels. "train"
            needs ``weak_label="image"``.
        points_per_segment: Clicks per connected segment of simulated points.
        block_fraction: Fraction of the image covered by simulated blocks.
        box_core_fraction: Central fraction of each box labelled with its class.
        in_channels: Channels of the images the network takes (the model takes it from the
            data). 3 converts every image to RGB; other counts need images of exactly as many
            channels (grey 1, grey + alpha 2, RGBA 4).
        mean: Per-channel mean of the pixels scaled to 0..1 (8-bit /255, 16-bit /65535),
            subtracted at normalisation; ``"auto"`` computes it over the training split's
            images; None is ImageNet's for three channels and ``"auto"`` for other counts. The
            model takes it from the data, so its checkpoints normalise as training did.
        std: Per-channel standard deviation, likewise.

    Raises:
        ValueError: If a size or count is out of range, ``weak_label`` is unknown, or
            ``predict_split="train"`` comes without ``weak_label="image"``.
    """

    def __init__(
        self,
        batch_size: int = 8,
        crop_size: int = 320,
        num_workers: int = 0,
        seed: int = 0,
        weak_label: WeakLabelOption = "point",
        augment: bool = True,
        predict_split: PredictSplit = "test",
        points_per_segment: int = 1,
        block_fraction: float = 0.1,
        box_core_fraction: float = 0.0,
        in_channels: int = 3,
        mean: ChannelStatistics = None,
        std: ChannelStatistics = None,
    ) -> None:
        super().__init__()
        for name, option in (("mean", mean), ("std", std)):
            if isinstance(option, str) and option != "auto":
                raise InputError(f"{name} must be numbers (one per channel), 'auto' or None.")
        check_normalization(
            None if mean in (None, "auto") else cast(tuple[float, ...], mean),
            None if std in (None, "auto") else cast(tuple[float, ...], std),
            in_channels,
        )
        if batch_size < 1 or crop_size < 1 or num_workers < 0:
            raise InputError(
                "Expected batch_size >= 1, crop_size >= 1 and num_workers >= 0, got "
                f"{batch_size}, {crop_size} and {num_workers}."
            )
        check_form(weak_label)
        self.simulation = SimulationOptions(points_per_segment, block_fraction, box_core_fraction)
        self.simulation.check(weak_label)
        if predict_split not in get_args(PredictSplit):
            raise InputError(f"predict_split must be 'test' or 'train', got {predict_split!r}.")
        if predict_split == "train" and weak_label != "image":
            raise InputError(
                "predict_split='train' predicts with the training images' tags, which "
                f"weak_label='image' reads; got weak_label={weak_label!r}."
            )
        # The class count, channels and normalisation are the model's hyper-parameters: a data
        # option that leaves them to the data (None, "auto") would clash with the model's when
        # the Trainer merges both modules'.
        self.save_hyperparameters(ignore=["num_classes", "in_channels", "mean", "std"])
        self.batch_size = batch_size
        self.crop_size = crop_size
        self.num_workers = num_workers
        self.seed = seed
        self.weak_label = weak_label
        self.augment = augment
        self.predict_split = predict_split
        self._in_channels = in_channels
        self._statistics_options = (mean, std)
        self._normalization: Normalization | None = None
        self.datasets: dict[Split, Dataset[dict[str, Any]]] = {}
        self._resume_position: tuple[int, int] | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes C (the target map's unlabelled value)."""
        return len(self.class_names)

    classes: tuple[str, ...] = ()
    """Class names of a dataset whose classes are fixed, index = class id."""

    @property
    def class_names(self) -> list[str]:
        """Name of each class, index i = class i."""
        return list(self.classes)

    @property
    def eval_batch_size(self) -> int:
        """Validation/test/predict batch size: 1, since image sizes may differ."""
        return 1

    @property
    def in_channels(self) -> int:
        """Channels of the images the network takes, linked to the model."""
        return self._in_channels

    @property
    def normalization(self) -> Normalization:
        """Per-channel ``(mean, std)`` of the 0..1 pixels, computed once when ``"auto"``.

        Raises:
            InputError: If the statistics are ``"auto"`` and the training images cannot be read.
        """
        if self._normalization is None:
            mean, std = self._statistics_options
            default = default_normalization(self._in_channels)
            if default is None:  # no default for this channel count: compute what is not given
                mean, std = ("auto" if mean is None else mean), ("auto" if std is None else std)
            computed: Normalization | None = None
            if "auto" in (mean, std):
                computed = image_statistics(self.training_images(), self._in_channels)
                rank_zero_info(
                    f"Per-channel mean {_rounded(computed[0])} and std {_rounded(computed[1])} of "
                    f"the training images of {type(self).__name__} (give them as `mean` and "
                    "`std` to skip this pass)."
                )

            def resolved(option: ChannelStatistics, index: int) -> tuple[float, ...]:
                if option == "auto":
                    return cast(Normalization, computed)[index]
                if option is None:
                    return cast(Normalization, default)[index]
                return tuple(float(value) for value in option)

            self._normalization = (resolved(mean, 0), resolved(std, 1))
        return self._normalization

    @property
    def mean(self) -> tuple[float, ...] | None:
        """Per-channel mean of the normalisation (:attr:`normalization`), linked to the model."""
        return self.normalization[0]

    @property
    def std(self) -> tuple[float, ...] | None:
        """Per-channel standard deviation of the normalisation, linked to the model."""
        return self.normalization[1]

    def training_images(self) -> Iterable[np.ndarray]:
        """The training split's images as read ([H,W,C]), for ``mean``/``std`` ``"auto"``.

        Raises:
            InputError: If the DataModule has no training images (the default).
        """
        raise InputError(
            f"{type(self).__name__} has no training images to compute mean and std from: give "
            "`mean` and `std` as numbers (one per channel)."
        )

    @abstractmethod
    def build_dataset(self, split: Split) -> Dataset[dict[str, Any]]:
        """Build the dataset of one split.

        Args:
            split: "train", "val", "test" or "predict"; use :meth:`mode` and :meth:`transform`
                to configure it.

        Returns:
            A dataset yielding the sample dicts of METHOD §1.
        """

    def mode(self, split: Split) -> Mode:
        """Return the sample mode of a split.

        Args:
            split: The split.

        Returns:
            "train", "eval" (val and test), and for "predict": "predict", or "tagged" when
            ``predict_split="train"``.
        """
        modes: dict[Split, Mode] = {
            "train": "train",
            "val": "eval",
            "test": "eval",
            "predict": "tagged" if self.predict_split == "train" else "predict",
        }
        return modes[split]

    def transform(self, split: Split) -> A.Compose:
        """Return the augmentation pipeline of a split.

        Args:
            split: The split.

        Returns:
            The seeded training pipeline for "train", normalisation only otherwise.
        """
        mean, std = self.normalization
        if split == "train" and not self.augment:
            return train_transform(
                self.crop_size,
                (1.0, 1.0),
                flip_probability=0,
                color_jitter=0,
                seed=self.seed,
                mean=mean,
                std=std,
            )
        if split == "train":
            return train_transform(self.crop_size, seed=self.seed, mean=mean, std=std)
        return eval_transform(mean, std)

    def setup(self, stage: str) -> None:
        """Build the datasets the stage needs.

        Args:
            stage: "fit", "validate", "test" or "predict".
        """
        for split in STAGE_SPLITS[stage]:
            self._dataset(split)

    def state_dict(self) -> dict[str, int]:
        """The position of training in its data, saved in checkpoints.

        The epoch, and the samples of it already trained on (all ranks together; 0 once the
        epoch is over), so that a run resumed from a mid-epoch checkpoint goes on from there.
        """
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        epochs = cast(_ProcessedTracker, trainer.fit_loop.epoch_progress.current)
        batches = cast(_ProcessedTracker, trainer.fit_loop.epoch_loop.batch_progress.current)
        mid_epoch = epochs.started > epochs.processed
        consumed = batches.processed * self.batch_size * trainer.world_size if mid_epoch else 0
        return {"epoch": epochs.processed, "consumed": consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Resume the training data where a checkpoint's run stopped (:meth:`state_dict`)."""
        if state_dict:
            self._resume_position = (state_dict["epoch"], state_dict["consumed"])
            # Lightning warns that a DataLoader without a state cannot resume mid-epoch; this
            # DataModule's state resumes it exactly.
            warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before")

    def train_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Shuffled, seeded training batches of ``batch_size`` (incomplete last batch dropped).

        Returns:
            The training DataLoader.

        Raises:
            ValueError: If the training split has fewer images than one batch.
        """
        dataset = self._dataset("train")
        size = len(cast(Sized, dataset))
        if size < self.batch_size:
            raise InputError(
                f"The training split has {size} images, fewer than one batch "
                f"(batch_size={self.batch_size}); lower batch_size or add images."
            )
        return self._loader(dataset, self.batch_size, train=True)

    def val_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Return the validation DataLoader (full images, in order)."""
        return self._loader(self._dataset("val"), self.eval_batch_size)

    def test_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Return the test DataLoader (full images, in order)."""
        return self._loader(self._dataset("test"), self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader[dict[str, Any]]:
        """Return the prediction DataLoader (full images of ``predict_split``, in order)."""
        return self._loader(self._dataset("predict"), self.eval_batch_size)

    def _dataset(self, split: Split) -> Dataset[dict[str, Any]]:
        """Return the dataset of a split, building it if ``setup`` has not."""
        if split not in self.datasets:
            self.datasets[split] = self.build_dataset(split)
        return self.datasets[split]

    def _loader(
        self,
        dataset: Dataset[dict[str, Any]],
        batch_size: int,
        *,
        train: bool = False,
    ) -> DataLoader[dict[str, Any]]:
        """Wrap a dataset in a DataLoader; training loaders shuffle (seeded) and drop_last.

        Under DDP, evaluation loaders deal the images out to the ranks without padding: the
        sampler Lightning would add repeats images to even out the ranks, and a repeated image
        would count twice in the whole-split confusion matrix.
        """
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        world_size = trainer.world_size if trainer is not None else 1
        # The generator also draws the workers' base seed, so augmentations follow `seed` too.
        generator = torch.Generator().manual_seed(self.seed) if train else None
        sampler: Sampler[int] | None = None
        if train:
            sampler = EpochShuffleSampler(len(cast(Sized, dataset)), self.seed, rank, world_size)
            if self._resume_position is not None:
                sampler.resume(*self._resume_position)
                self._resume_position = None
        elif world_size > 1:
            sampler = UnrepeatedDistributedSampler(
                dataset, num_replicas=world_size, rank=rank, shuffle=False
            )
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            drop_last=train,
            generator=generator,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            # The rank is read here: a worker started by spawn or forkserver cannot know it.
            worker_init_fn=partial(seed_worker, rank=rank),
        )


def _rounded(values: tuple[float, ...]) -> list[float]:
    return [round(value, 4) for value in values]
