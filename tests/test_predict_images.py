"""Segmenting any images: `agmm predict --data=<folder>` and `AGMMSegmenter.segment`."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agmm_lightning import AGMMSegmenter
from agmm_lightning.callbacks import colorize
from agmm_lightning.cli import folder_shorthand, main
from agmm_lightning.data import ImageFolderDataModule
from agmm_lightning.errors import InputError

CONFIG = str(Path(__file__).parent / "conf" / "demo.yaml")
IMAGES = Path(__file__).parent / "data" / "folder" / "images"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of the tiny demo model after two steps."""
    root = tmp_path_factory.mktemp("run")
    main(
        [
            "fit",
            "--config",
            CONFIG,
            f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=2",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
        ]
    )
    return root / "checkpoints" / "last.ckpt"


@pytest.fixture
def photos(tmp_path) -> Path:
    """A plain folder of images of several sizes, one in a sub-folder, no masks, no splits."""
    folder = tmp_path / "photos"
    shutil.copytree(IMAGES, folder)
    (folder / "more").mkdir()
    shutil.copy(IMAGES / "a.png", folder / "more" / "again.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_predict_on_a_plain_folder_writes_index_and_colour_pngs_and_a_list(
    tmp_path, checkpoint, photos, capsys
):
    out = tmp_path / "out"
    main(
        [
            "predict",
            f"--ckpt_path={checkpoint}",
            f"--data={photos}",
            f"--trainer.default_root_dir={out}",
            "--trainer.logger=false",
        ]
    )
    assert "Predictions of 5 images written" in capsys.readouterr().out
    listing = (out / "predictions" / "predictions.csv").read_text().splitlines()
    names = ["a", "b", "c", "d", "more/again"]
    assert listing == ["name,index_png,color_png"] + [
        f"{name},{name}.png,color/{name}.png" for name in names
    ]
    model = AGMMSegmenter.load_from_checkpoint(checkpoint, map_location="cpu")
    for name in names:
        source = next(photos.glob(f"{name}.*"))
        indices = Image.open(out / "predictions" / f"{name}.png")
        assert indices.mode == "P" and indices.size == Image.open(source).size
        colours = np.array(Image.open(out / "predictions" / "color" / f"{name}.png"))
        assert (colours == colorize(np.array(indices), 6)).all()
        assert (np.array(indices) == model.segment(source).numpy()).all()


def test_model_options_given_with_the_checkpoint_alone_are_applied(tmp_path, checkpoint, photos):
    out = tmp_path / "out"
    main(
        [
            "predict",
            f"--ckpt_path={checkpoint}",
            "--data",
            str(photos),
            "--model.init_args.tile_size",
            "16",
            f"--trainer.default_root_dir={out}",
            "--trainer.logger=false",
        ]
    )
    tiled = AGMMSegmenter.load_from_checkpoint(checkpoint, map_location="cpu", tile_size=16)
    whole = AGMMSegmenter.load_from_checkpoint(checkpoint, map_location="cpu")
    written = np.array(Image.open(out / "predictions" / "a.png"))
    assert (written == tiled.segment(photos / "a.png").numpy()).all()
    assert not (written == whole.segment(photos / "a.png").numpy()).all()


def test_segment_takes_a_path_pil_image_array_or_tensor_alike(checkpoint):
    model = AGMMSegmenter.load_from_checkpoint(checkpoint, map_location="cpu")
    assert model.class_names == ["background", "disc", "square", "triangle", "ring", "bar"]
    path = IMAGES / "c.png"
    pixels = np.array(Image.open(path).convert("RGB"))
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)
    labels = model.segment(path)
    assert labels.shape == pixels.shape[:2] and labels.dtype == torch.int64
    for same in (Image.open(path), pixels, tensor, tensor.float() / 255):
        assert torch.equal(model.segment(same), labels)
    batch = model.segment(torch.stack([tensor, tensor.flip(-1)]))
    assert batch.shape == (2, *labels.shape) and torch.equal(batch[0], labels)
    assert model.training  # segment() leaves the mode as it found it


def test_segment_reads_every_dtype_by_one_rule_and_takes_lists(checkpoint):
    """Integers are 0..255 whatever their dtype; floats 0..1, or 0..255 when above 1."""
    model = AGMMSegmenter.load_from_checkpoint(checkpoint, map_location="cpu")
    pixels = np.array(Image.open(IMAGES / "c.png").convert("RGB"))
    labels = model.segment(pixels)
    for same in (
        pixels.astype(np.float32),
        pixels.astype(np.int64),
        pixels.astype(np.uint16),
        pixels.astype(np.float64) / 255,
        torch.from_numpy(pixels).permute(2, 0, 1).double(),
    ):
        assert torch.equal(model.segment(same), labels)
    maps = model.segment([IMAGES / "c.png", pixels, IMAGES / "a.png"])
    assert isinstance(maps, list) and len(maps) == 3
    assert torch.equal(maps[0], labels) and torch.equal(maps[1], labels)
    assert torch.equal(maps[2], model.segment(IMAGES / "a.png"))


@pytest.mark.parametrize(
    ("pixels", "message"),
    [
        (np.full((8, 8, 3), 4095, np.uint16), r"got values in 0\.\.4095|got values in 4095"),
        (np.full((8, 8, 3), -1.0, np.float32), "got values in -1"),
        (np.zeros((8, 8, 3), bool), "bool"),
    ],
)
def test_segment_refuses_pixels_outside_both_scales_in_one_line(checkpoint, pixels, message):
    model = AGMMSegmenter.load_from_checkpoint(checkpoint, map_location="cpu")
    with pytest.raises(InputError, match=message) as error:
        model.segment(pixels)
    assert "\n" not in str(error.value)


def test_segment_refuses_what_is_not_an_rgb_image(checkpoint):
    model = AGMMSegmenter.load_from_checkpoint(checkpoint, map_location="cpu")
    with pytest.raises(InputError, match=r"Expected an RGB image.*\(4, 8, 8\)"):
        model.segment(torch.zeros(4, 8, 8))


def test_a_folder_without_images_is_named_before_predicting(tmp_path):
    (tmp_path / "empty").mkdir()
    data = ImageFolderDataModule(str(tmp_path / "empty"))
    with pytest.raises(InputError, match="empty: no image found"):
        data.setup("predict")
    with pytest.raises(InputError, match="serves `predict` only"):
        data.setup("fit")


def test_only_a_folder_given_to_data_is_spelt_out(tmp_path):
    assert folder_shorthand(["predict", f"--data={tmp_path}"]) == [
        "predict",
        "--data=agmm_lightning.data.ImageFolderDataModule",
        f"--data.root={tmp_path}",
    ]
    assert folder_shorthand(["fit", "--data", "FolderDataModule"]) == [
        "fit",
        "--data=FolderDataModule",
    ]


def test_images_sharing_a_stem_keep_distinct_outputs(tmp_path, checkpoint, photos):
    Image.open(photos / "a.png").convert("RGB").save(photos / "a.jpg")
    out = tmp_path / "out"
    predict = ["predict", f"--ckpt_path={checkpoint}", f"--data={photos}"]
    main([*predict, f"--trainer.default_root_dir={out}", "--trainer.logger=false"])
    listing = (out / "predictions" / "predictions.csv").read_text().splitlines()
    names = sorted(line.split(",")[0] for line in listing[1:])
    assert names == ["a.jpg", "a.png", "b", "c", "d", "more/again"]
    assert (out / "predictions" / "a.jpg.png").is_file()
    assert (out / "predictions" / "a.png.png").is_file()


def test_an_unreadable_image_is_skipped_listed_and_fails_the_command(
    tmp_path, checkpoint, photos, capsys
):
    (photos / "b.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    predict = ["predict", f"--ckpt_path={checkpoint}", f"--data={photos}"]
    with pytest.raises(SystemExit) as exit_info, pytest.warns(UserWarning, match="b.png"):
        main([*predict, f"--trainer.default_root_dir={out}", "--trainer.logger=false"])
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert "Predictions of 4 images written" in captured.out
    lines = captured.err.strip().splitlines()
    assert lines[0] == "error: 1 image(s) could not be read and were skipped:"
    assert "b.png" in lines[1] and "split" not in captured.err
    written = {line.split(",")[0] for line in (out / "predictions" / "predictions.csv").open()}
    assert written == {"name", "a", "c", "d", "more/again"}


@pytest.mark.parametrize(
    ("data", "ckpt", "message"),
    [
        ("{images}/a.png", "{ckpt}", "--data={images}/a.png: a file, not a folder of images"),
        ("{tmp}/missing", "{ckpt}", "--data={tmp}/missing: no such folder"),
        ("{images}", "{tmp}/none.ckpt", "--ckpt_path={tmp}/none.ckpt: file not found"),
    ],
)
def test_predict_mistakes_are_one_line(tmp_path, checkpoint, capsys, data, ckpt, message):
    values = {"images": IMAGES, "tmp": tmp_path, "ckpt": checkpoint}
    args = ["predict", f"--ckpt_path={ckpt.format(**values)}", f"--data={data.format(**values)}"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code != 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {message.format(**values)}")
