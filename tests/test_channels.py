"""Images beyond 8-bit RGB: channel counts, 16-bit depth, per-channel normalisation, void value."""

from __future__ import annotations

import shutil
from pathlib import Path

import albumentations as A
import cv2
import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import DATA, TINY_ENCODER, copy_fixture, tiny_trainer
from PIL import Image

from agmm_lightning import AGMMSegmenter
from agmm_lightning.cli import main
from agmm_lightning.data import FolderDataModule
from agmm_lightning.data.io import image_header, read_image
from agmm_lightning.data.pixels import IMAGENET_MEAN, IMAGENET_STD
from agmm_lightning.data.transforms import build_eval_sample, eval_transform
from agmm_lightning.errors import InputError

FOLDER_IMAGES = DATA / "folder" / "images"


def folder_dataset(root: Path, images: list[np.ndarray], masks: list[np.ndarray], train: int):
    """A folder-layout dataset: the first ``train`` images train, the rest validate."""
    for sub in ("images", "masks", "splits"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    names = [f"slice_{index:02d}" for index in range(len(images))]
    for name, image, mask in zip(names, images, masks, strict=True):
        Image.fromarray(image).save(root / "images" / f"{name}.png")
        Image.fromarray(mask).save(root / "masks" / f"{name}.png")
    (root / "splits" / "train.txt").write_text("\n".join(names[:train]) + "\n")
    (root / "splits" / "val.txt").write_text("\n".join(names[train:]) + "\n")
    (root / "classes.txt").write_text("background\nbright\n")
    return root


def rectangles(count: int, size: int = 32, seed: int = 0) -> list[np.ndarray]:
    """Masks of one random rectangle of class 1 on background 0."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(count):
        mask = np.zeros((size, size), np.uint8)
        top, left = rng.integers(0, size // 2, 2)
        height, width = rng.integers(size // 4, size // 2 + 1, 2)
        mask[top : top + height, left : left + width] = 1
        masks.append(mask)
    return masks


def grey16(masks: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """16-bit slices whose classes differ only above 255: 1000 and 1200, with noise."""
    rng = np.random.default_rng(seed)
    return [
        (np.where(mask == 1, 1200, 1000) + rng.integers(-20, 21, mask.shape)).astype(np.uint16)
        for mask in masks
    ]


def train_and_validate(
    root: Path, tmp_path: Path, **data_options
) -> tuple[AGMMSegmenter, pl.Trainer, float]:
    """Full supervision for 60 steps of a one-channel U-Net; the val mIoU."""
    pl.seed_everything(0)
    options = {"weak_label": "full", "in_channels": 1, "batch_size": 4, "crop_size": 32}
    data = FolderDataModule(str(root), **(options | data_options))
    model = AGMMSegmenter(
        num_classes=2,
        arch="Unet",
        encoder=TINY_ENCODER,
        in_channels=1,
        method="baseline",
        optimizer="adamw",
        lr=0.01,
        backbone_lr_multiplier=1.0,
    )
    trainer = tiny_trainer(
        tmp_path, max_steps=60, num_sanity_val_steps=0, check_val_every_n_epoch=10**6
    )
    trainer.fit(model, data)
    (metrics,) = trainer.validate(model, data, verbose=False)
    return model, trainer, metrics["val_miou"]


# ------------------------------------------------------------------------- reading files
def test_a_16bit_grey_png_is_read_whole_and_divided_by_65535(tmp_path: Path) -> None:
    values = np.array([[0, 255, 256, 1000], [1200, 4095, 40000, 65535]], np.uint16)
    path = tmp_path / "slice.png"
    Image.fromarray(values).save(path)
    assert image_header(path) == (2, 4, 1, 16)
    grey = read_image(path, in_channels=1)
    assert grey.shape == (2, 4, 1) and grey.dtype == np.float32
    np.testing.assert_array_equal(grey[..., 0], values.astype(np.float32) / np.float32(65535))
    rgb = read_image(path)  # three channels: the grey repeated at full depth
    assert rgb.shape == (2, 4, 3) and (rgb == grey).all()
    # What `convert("RGB")` made of it before: everything above 255 clipped to one value.
    assert len(np.unique(np.array(Image.open(path).convert("RGB"))[1])) == 1


def test_a_16bit_colour_png_is_read_whole_in_rgb_order(tmp_path: Path) -> None:
    rgb = np.stack([np.full((3, 5), value, np.uint16) for value in (300, 30000, 65535)], -1)
    path = tmp_path / "colour.png"
    cv2.imwrite(str(path), rgb[..., ::-1])  # OpenCV writes BGR
    assert image_header(path).bits == 16
    pixels = read_image(path)
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels, rgb.astype(np.float32) / np.float32(65535))


@pytest.mark.parametrize("name", ["a.png", "c.png", "d.jpg"])  # RGB PNG, grey PNG, JPEG
def test_8bit_images_are_read_and_normalised_as_before(name: str) -> None:
    path = FOLDER_IMAGES / name
    pixels = read_image(path)
    expected = np.array(Image.open(path).convert("RGB"))
    assert pixels.dtype == np.uint8 and (pixels == expected).all()
    sample = build_eval_sample(eval_transform(), pixels, name=name)
    reference = A.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)(image=expected)["image"]
    assert torch.equal(sample["image"], torch.from_numpy(reference.transpose(2, 0, 1).copy()))


def test_other_channel_counts_take_images_of_exactly_that_many(tmp_path: Path) -> None:
    rgba = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    Image.fromarray(rgba[..., :2]).save(tmp_path / "la.png")
    assert (read_image(tmp_path / "rgba.png", 4) == rgba).all()
    assert (read_image(tmp_path / "la.png", 2) == rgba[..., :2]).all()
    assert read_image(FOLDER_IMAGES / "c.png", 1).shape == (40, 56, 1)
    assert (read_image(tmp_path / "rgba.png") == rgba[..., :3]).all()  # 3: alpha dropped
    with pytest.raises(InputError) as error:
        read_image(FOLDER_IMAGES / "a.png", 1)
    message = str(error.value)
    assert message.startswith(f"{FOLDER_IMAGES / 'a.png'}: a colour image of 3 channel(s)")
    assert "in_channels=1" in message and "Set the data's `in_channels: 3`" in message


# ------------------------------------------------------------------------------ training
def test_a_16bit_grey_dataset_tells_apart_classes_that_differ_above_255(tmp_path: Path) -> None:
    masks = rectangles(12)
    root = folder_dataset(tmp_path / "grey16", grey16(masks), masks, train=8)
    model, trainer, miou = train_and_validate(root, tmp_path)
    # The same slices cut to 8 bits are blank (1000 and 1200 both become 255): nothing to learn.
    clipped = folder_dataset(
        tmp_path / "clipped",
        [np.clip(image, 0, 255).astype(np.uint8) for image in grey16(masks)],
        masks,
        train=8,
    )
    _, _, clipped_miou = train_and_validate(clipped, tmp_path, mean=(0.5,), std=(0.25,))
    assert miou > 0.7 and miou > clipped_miou + 0.2, (miou, clipped_miou)
    # The model took the data's statistics ("auto" for one channel), and so does its checkpoint.
    data = FolderDataModule(str(root), weak_label="full", in_channels=1)
    assert model.normalization == data.normalization
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    loaded = AGMMSegmenter.load_from_checkpoint(tmp_path / "model.ckpt", map_location="cpu")
    assert loaded.normalization == data.normalization and loaded.hparams["in_channels"] == 1
    path = root / "images" / "slice_10.png"
    labels = loaded.segment(path)
    assert (labels.numpy() == masks[10]).mean() > 0.9
    as_floats = np.array(Image.open(path)).astype(np.float32) / 65535
    assert torch.equal(loaded.segment(as_floats), labels)


def test_a_4_channel_dataset_trains(tmp_path: Path) -> None:
    masks = rectangles(6, seed=1)
    rng = np.random.default_rng(1)
    images = [
        np.where(mask[..., None] == 1, 200, 60).astype(np.uint8) + rng.integers(0, 20, (32, 32, 4))
        for mask in masks
    ]
    images = [image.astype(np.uint8) for image in images]
    root = folder_dataset(tmp_path / "rgba", images, masks, train=4)
    data = FolderDataModule(str(root), weak_label="full", in_channels=4, batch_size=2, crop_size=32)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["image"].shape == (2, 4, 32, 32)
    model = AGMMSegmenter(num_classes=2, arch="Unet", encoder=TINY_ENCODER, in_channels=4)
    before = model.model.network.encoder.state_dict()
    first = next(value for key, value in before.items() if value.ndim == 4)
    assert first.shape[1] == 4  # the first convolution takes four channels
    tiny_trainer(tmp_path, max_steps=2, limit_val_batches=1).fit(model, data)
    assert model.hparams["mean"] == data.mean and len(data.mean) == 4
    labels = model.segment(root / "images" / "slice_05.png")
    assert labels.shape == (32, 32)
    assert model.segment(torch.rand(2, 4, 32, 32)).shape == (2, 32, 32)
    with pytest.raises(InputError, match=r"Expected an image of 4 channel\(s\)"):
        model.segment(torch.rand(3, 32, 32))


# ------------------------------------------------------------------------- normalisation
def test_mean_and_std_auto_are_those_of_the_training_split(tmp_path: Path) -> None:
    data = FolderDataModule(str(DATA / "folder"), mean="auto", std="auto")
    train = [
        np.array(Image.open(FOLDER_IMAGES / f"{name}.png").convert("RGB")) / 255
        for name in ("a", "b", "c")  # splits/train.txt; d (validation) is not counted
    ]
    pixels = np.concatenate([image.reshape(-1, 3) for image in train])
    np.testing.assert_allclose(data.mean, pixels.mean(0), rtol=1e-10)
    np.testing.assert_allclose(data.std, pixels.std(0), rtol=1e-10)
    assert FolderDataModule(str(DATA / "folder")).normalization == (IMAGENET_MEAN, IMAGENET_STD)
    # The samples are normalised with them: the training images come out standardised.
    normalize = data.transform("val")
    normalized = np.concatenate(
        [
            normalize(image=read_image(FOLDER_IMAGES / f"{name}.png"))["image"].reshape(-1, 3)
            for name in ("a", "b", "c")
        ]
    )
    np.testing.assert_allclose(normalized.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(normalized.std(0), 1, atol=1e-4)
    with pytest.raises(InputError, match=r"mean=\[0\.5\] has 1 value\(s\) but in_channels=3"):
        FolderDataModule(str(DATA / "folder"), mean=(0.5,))


# ------------------------------------------------------------------------------- masks
def test_ignore_index_maps_a_custom_void_value_to_255(tmp_path: Path) -> None:
    folder = copy_fixture("folder", tmp_path)
    path = folder / "masks" / "a.png"
    mask = np.array(Image.open(path))
    mask[mask == 255] = 2
    mask[:2, :3] = 200  # this dataset's void
    Image.fromarray(mask).save(path)
    data = FolderDataModule(str(folder), weak_label="full", ignore_index=200)
    _, _, read = data.build_dataset("train").load(0)  # a is the first training image
    expected = np.where(mask == 200, 255, mask)
    assert (read == expected).all()
    # With the default (255) the same file holds a value out of range, named with the fix.
    with pytest.raises(InputError, match=r"a\.png: stored values \[200\] are out of range"):
        FolderDataModule(str(folder), weak_label="full").build_dataset("train").load(0)
    # With another void value, a stored 255 is no longer void but a class value out of range.
    mask[5, 5] = 255
    Image.fromarray(mask).save(path)
    with pytest.raises(
        InputError, match=r"stored values \[255\] .* or 200 \(void, `ignore_index`\)"
    ):
        data.build_dataset("train").load(0)
    with pytest.raises(InputError, match="ignore_index=1 is a class index"):
        FolderDataModule(str(folder), ignore_index=1).build_dataset("train")


# ---------------------------------------------------------------- channels before training
def test_a_channel_mismatch_is_reported_before_training_naming_every_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = copy_fixture("folder", tmp_path)  # a, b and d are RGB, c is grey
    data = FolderDataModule(str(folder), in_channels=1, mean=(0.5,), std=(0.25,))
    with pytest.raises(InputError) as error:
        data.setup("fit")
    message = str(error.value)
    assert message.startswith("2 problem(s) with the files of the train split:")
    for name in ("a.png", "b.png"):
        assert f"{folder / 'images' / name}: a colour image of 3 channel(s), but in_channels=1" in (
            message
        )
    assert "Set the data's `in_channels: 3`" in message
    config = tmp_path / "grey.yaml"
    config.write_text(
        "model:\n  class_path: agmm_lightning.AGMMSegmenter\n  init_args:\n"
        f"    arch: Unet\n    encoder: {TINY_ENCODER}\n"
        "data:\n  class_path: agmm_lightning.data.FolderDataModule\n  init_args:\n"
        f"    root: {folder}\n    in_channels: 1\n    crop_size: 32\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["check-data", "--config", str(config)])
    assert exit_info.value.code == 1
    report = capsys.readouterr().err
    assert "3 problem(s)" in report and "[val] " + str(folder / "images" / "d.jpg") in report


# ------------------------------------------------------------------- the CLI and checkpoints
def test_the_cli_links_channels_and_statistics_and_a_checkpoint_predicts_with_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    masks = rectangles(6, seed=2)
    root = folder_dataset(tmp_path / "grey16", grey16(masks, seed=2), masks, train=4)
    run = tmp_path / "run"
    common = ["--trainer.logger=false", "--trainer.enable_progress_bar=false"]
    main(
        [
            "fit",
            "--model=agmm_lightning.AGMMSegmenter",
            "--model.init_args.arch=Unet",
            f"--model.init_args.encoder={TINY_ENCODER}",
            "--data=agmm_lightning.data.FolderDataModule",
            f"--data.init_args.root={root}",
            "--data.init_args.weak_label=full",
            "--data.init_args.in_channels=1",
            "--data.init_args.batch_size=2",
            "--data.init_args.crop_size=32",
            "--trainer.max_steps=1",
            f"--trainer.default_root_dir={run}",
            *common,
        ]
    )
    checkpoint = run / "checkpoints" / "last.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"]
    data = FolderDataModule(str(root), in_channels=1)
    assert saved["in_channels"] == 1 and tuple(saved["mean"]) == data.mean
    assert tuple(saved["std"]) == data.std
    # A plain folder of 16-bit images takes the checkpoint's channels and normalisation.
    photos = tmp_path / "photos"
    shutil.copytree(root / "images", photos)
    out = tmp_path / "predicted"
    main(
        [
            "predict",
            f"--ckpt_path={checkpoint}",
            f"--data={photos}",
            f"--trainer.default_root_dir={out}",
            *common,
        ]
    )
    model = AGMMSegmenter.load_from_checkpoint(checkpoint, map_location="cpu")
    written = np.array(Image.open(out / "predictions" / "slice_05.png"))
    assert (written == model.segment(photos / "slice_05.png").numpy()).all()
    # A config asking for another channel count than the checkpoint's is refused in one line.
    with pytest.raises(SystemExit):
        main(
            [
                "predict",
                f"--ckpt_path={checkpoint}",
                f"--data={photos}",
                "--data.in_channels=3",
                *common,
            ]
        )
    assert "holds a model with in_channels=1" in capsys.readouterr().err
