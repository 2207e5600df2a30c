"""Bad data is found before training (header reads at setup, `agmm check-data`), and a file that
fails only when decoded mid-run costs one sample, not the run."""

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agmm_lightning.cli import main
from agmm_lightning.data import FolderDataModule
from agmm_lightning.data.io import read_id_list
from agmm_lightning.errors import InputError

DATA = Path(__file__).parent / "data"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "folder"
    shutil.copytree(DATA / "folder", root)
    return root


def truncate(path: Path, keep: float = 0.5) -> None:
    """Cut a file short: its header still reads, its pixels no longer decode."""
    content = path.read_bytes()
    path.write_bytes(content[: int(len(content) * keep)])


def resize_mask(path: Path) -> None:
    mask = Image.open(path)
    mask.resize((mask.width + 3, mask.height)).save(path)


def test_setup_lists_every_bad_header_of_the_splits_in_use(folder: Path) -> None:
    (folder / "images" / "a.png").write_bytes(b"not an image")
    resize_mask(folder / "masks" / "c.png")  # c is the last training id
    resize_mask(folder / "masks" / "d.png")  # d is the only validation id
    data = FolderDataModule(str(folder))
    with pytest.raises(InputError) as error:
        data.setup("fit")
    message = str(error.value)
    assert message.startswith("2 problem(s) with the files of the train split:")
    assert "a.png: not a readable image" in message
    assert "c.png: size 59x40 (WxH) differs from its image" in message
    assert "agmm check-data" in message
    (folder / "images" / "a.png").write_bytes((DATA / "folder" / "images" / "a.png").read_bytes())
    shutil.copy(DATA / "folder" / "masks" / "c.png", folder / "masks" / "c.png")
    with pytest.raises(
        InputError, match=r"(?s)1 problem\(s\) with the files of the val split:.*d\.png"
    ):
        FolderDataModule(str(folder)).setup("fit")


def test_a_weak_label_png_of_another_size_fails_at_setup(folder: Path) -> None:
    resize_mask(folder / "weak" / "point" / "b.png")
    with pytest.raises(InputError, match=r"weak/point/b\.png: size .* differs from its image"):
        FolderDataModule(str(folder), weak_label="point").setup("fit")


def test_a_good_dataset_passes_setup(folder: Path) -> None:
    data = FolderDataModule(str(folder), weak_label="scribble")
    data.setup("fit")
    data.setup("test")
    assert {"train", "val", "test"} <= set(data.datasets)


def test_a_training_image_that_fails_to_decode_is_replaced_with_a_warning(folder: Path) -> None:
    truncate(folder / "images" / "b.png")
    dataset = FolderDataModule(str(folder), crop_size=32).build_dataset("train")
    with pytest.warns(UserWarning, match=r"b\.png: the image is corrupt.*next image instead"):
        sample = dataset[1]
    assert sample["name"] == "c"


def test_a_validation_image_that_fails_to_decode_is_left_out_of_the_metrics(folder: Path) -> None:
    jpeg = folder / "images" / "d.jpg"
    Image.open(jpeg).save(folder / "images" / "d.png")
    jpeg.unlink()
    truncate(folder / "images" / "d.png")
    dataset = FolderDataModule(str(folder)).build_dataset("val")
    with pytest.warns(UserWarning, match=r"d\.png: the image is corrupt.*left out of the metrics"):
        sample = dataset[0]
    assert (sample["mask"] == 255).all()
    assert sample["image"].shape[1:] == (40, 56)
    assert "d.png: the image is corrupt" in sample["left_out"]


def test_a_metric_over_part_of_a_split_says_so_and_fails_the_command(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A validation mask with a class classes.txt does not list: fit reports the table over the
    other images, says how many were left out and why, and exits non-zero."""
    mask = np.array(Image.open(folder / "masks" / "d.png"))
    mask[0, 0] = 3  # classes.txt lists 3 classes, 0..2
    Image.fromarray(mask).save(folder / "masks" / "d.png")
    with pytest.raises(SystemExit) as exit_info, pytest.warns(UserWarning):
        main(["fit", "--config", config(tmp_path, folder), "--trainer.max_epochs=1"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "Per-class IoU (%), val, epoch 0, 1 image(s) LEFT OUT:" in captured.out
    first = captured.err.strip().splitlines()[0]
    assert first == (
        "error: 1 image(s) of the val split could not be read and were left out of its metrics, "
        "which cover the rest:"
    )
    assert "masks/d.png: stored values [3] are out of range" in captured.err
    assert "classes.txt lists 3 classes (0..2): add the missing ones" in captured.err


def config(tmp_path: Path, root: Path, weak_label: str = "point") -> str:
    path = tmp_path / "folder.yaml"
    path.write_text(
        "model:\n  class_path: agmm_lightning.AGMMSegmenter\n  init_args:\n"
        "    arch: Unet\n    encoder: tu-test_resnet\n"
        "data:\n  class_path: agmm_lightning.data.FolderDataModule\n  init_args:\n"
        f"    root: {root}\n    weak_label: {weak_label}\n    batch_size: 2\n    crop_size: 32\n"
        "trainer:\n  accelerator: cpu\n  logger: false\n  enable_progress_bar: false\n"
        f"  default_root_dir: {tmp_path / 'run'}\n"
    )
    return str(path)


def test_check_data_decodes_everything_and_lists_every_bad_file(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncate(folder / "images" / "c.png")  # the last training image: header fine, pixels not
    mask = np.array(Image.open(folder / "masks" / "b.png"))
    mask[0, 0] = 7  # out of range for 3 classes
    Image.fromarray(mask).save(folder / "masks" / "b.png")
    truncate(folder / "weak" / "scribble" / "a.png")
    with pytest.raises(SystemExit) as exit_info:
        main(["check-data", "--config", config(tmp_path, folder, "scribble")])
    assert exit_info.value.code == 1
    report = capsys.readouterr().err
    assert "3 train, 1 val images of FolderDataModule" in report and "3 problem(s)" in report
    assert "[train] " + str(folder / "images" / "c.png") + ": the image is corrupt" in report
    assert "masks/b.png: stored values [7] are out of range" in report
    assert "classes.txt lists 3 classes (0..2)" in report
    assert "weak/scribble/a.png: the label PNG is corrupt" in report


def test_check_data_of_a_good_dataset(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["check-data", "--config", config(tmp_path, folder)])
    assert exit_info.value.code == 0
    assert "every file decodes" in capsys.readouterr().out


def test_a_bad_dataset_ends_fit_with_a_message_and_no_traceback(
    tmp_path: Path, folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    resize_mask(folder / "masks" / "c.png")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config(tmp_path, folder), "--trainer.max_steps=1"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "error: 1 problem(s) with the files of the train split:" in err
    assert "Traceback" not in err
    shutil.rmtree(folder / "images")
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", config(tmp_path, folder), "--trainer.max_steps=1"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "images: directory not found" in err
    assert "Traceback" not in err


def test_an_id_with_a_space_is_refused_naming_the_line(tmp_path: Path) -> None:
    listing = tmp_path / "train.txt"
    listing.write_text("a\nJPEGImages/b.jpg SegmentationClass/b.png\nmy image\n")
    with pytest.raises(InputError, match=r"train\.txt, line 3: 'my image' is not one id"):
        read_id_list(listing, "train_split")
    listing.write_text("a\nJPEGImages/b.jpg SegmentationClass/b.png\n")
    assert read_id_list(listing, "train_split") == ["a", "b"]


def test_a_bad_forms_manifest_is_refused_at_setup_listing_every_line(folder: Path) -> None:
    manifest = folder / "splits" / "train_forms.txt"
    manifest.write_text("a polygon\nb point extra\nzz point\na point\n")
    with pytest.raises(InputError) as caught:
        FolderDataModule(str(folder)).setup("fit")
    message = str(caught.value)
    assert f"{manifest}, line 1: unknown form 'polygon' for image 'a'" in message
    assert f"{manifest}, line 2: 'b point extra' is not '<image id> <form>'" in message
    assert f"{manifest}, line 3: image 'zz' is not in the training split" in message
    assert f"{manifest}: no line for training image 'c'" in message
    assert "no line for training image 'a'" not in message  # line 4 gives it a form
    assert "remove" in message and "'<image id> <form>'" in message


def test_a_missing_label_file_of_an_images_form_is_found_at_setup(folder: Path) -> None:
    (folder / "splits" / "train_forms.txt").write_text("a scribble\nb point\nc block\n")
    FolderDataModule(str(folder)).setup("fit")  # every file is there
    (folder / "weak" / "point" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"weak/point/b\.png: weak-label file not found"):
        FolderDataModule(str(folder)).setup("fit")


def test_only_the_images_whose_form_needs_a_mask_need_one(folder: Path) -> None:
    (folder / "splits" / "train_forms.txt").write_text("a full\nb point\nc point\n")
    (folder / "masks" / "b.png").unlink()
    FolderDataModule(str(folder)).setup("fit")  # b's points are read from weak/point/
    (folder / "masks" / "a.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"masks/a\.png: dense mask not found.*'full'"):
        FolderDataModule(str(folder)).setup("fit")
