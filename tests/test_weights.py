"""Offline encoder weights: timm / torchvision / smp / Lightning files, by name or by position."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from helpers import TINY_ENCODER, tiny_classifier, tiny_segmenter
from safetensors.torch import save_file
from torch import Tensor

from agmm_lightning import AGMMSegmenter
from agmm_lightning.encoders import build_encoder
from agmm_lightning.weights import load_encoder_weights


@pytest.fixture(scope="module")
def timm_weights() -> dict[str, Tensor]:
    """A trained-looking classifier: timm's test_resnet with random, non-default tensors."""
    torch.manual_seed(1)
    model = timm.create_model("test_resnet")
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.normal_()
    return model.state_dict()


def assert_encoder_holds(model: AGMMSegmenter, weights: dict[str, Tensor]) -> None:
    encoder = model.model.network.encoder.state_dict()
    assert len(encoder) == len(weights) - 2  # the classifier head (fc) is not in the encoder
    for key, tensor in encoder.items():
        torch.testing.assert_close(tensor, weights[key.removeprefix("model.")], rtol=0, atol=0)


def torch_file(transform: Callable[[dict[str, Tensor]], object]) -> Callable:
    def write(weights: dict[str, Tensor], path: Path) -> Path:
        torch.save(transform(weights), path.with_suffix(".pth"))
        return path.with_suffix(".pth")

    return write


def safetensors_file(weights: dict[str, Tensor], path: Path) -> Path:
    save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(path.with_suffix(".safetensors"))
    )
    return path.with_suffix(".safetensors")


WRITERS = {
    "timm": torch_file(lambda w: w),
    "ddp_checkpoint": torch_file(
        lambda w: {"state_dict": {f"module.{k}": v for k, v in w.items()}}
    ),
    "training_script": torch_file(lambda w: {"model": w, "epoch": 90}),
    "smp_encoder": torch_file(lambda w: {f"encoder.model.{k}": v for k, v in w.items()}),
    "backbone": torch_file(lambda w: {f"backbone.{k}": v for k, v in w.items()}),
    "safetensors": safetensors_file,
}


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_encoder_weights_load_by_name(writer, timm_weights, tmp_path) -> None:
    path = writer(timm_weights, tmp_path / "weights")
    assert_encoder_holds(tiny_segmenter(encoder_weights=str(path)), timm_weights)


def test_the_encoder_of_a_segmenter_checkpoint_loads(timm_weights, tmp_path) -> None:
    trained = tiny_segmenter(encoder_weights=str(WRITERS["timm"](timm_weights, tmp_path / "w")))
    checkpoint = tmp_path / "segmenter.ckpt"
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": {}}, checkpoint)
    assert_encoder_holds(tiny_segmenter(encoder_weights=str(checkpoint)), timm_weights)


def test_renamed_keys_load_by_position_with_a_note(timm_weights, tmp_path, caplog) -> None:
    encoder_keys = list(tiny_segmenter().model.network.encoder.state_dict())
    renamed = {
        f"layer_{i}": timm_weights[k.removeprefix("model.")] for i, k in enumerate(encoder_keys)
    }
    path = tmp_path / "renamed.pth"
    torch.save(renamed, path)
    with caplog.at_level(logging.INFO, logger="agmm_lightning.weights"):
        model = tiny_segmenter(encoder_weights=str(path))
    assert_encoder_holds(model, timm_weights)
    assert "by position" in caplog.text


def test_weights_of_another_architecture_name_the_first_mismatch(tmp_path) -> None:
    other = timm.create_model("test_efficientnet").state_dict()
    path = tmp_path / "efficientnet.pth"
    torch.save(other, path)
    encoder = tiny_segmenter().model.network.encoder
    expected = list(encoder.state_dict().items())
    position = next(
        i
        for i, (a, b) in enumerate(zip(expected, other.values(), strict=False))
        if a[1].shape != b.shape
    )
    with pytest.raises(
        ValueError, match=r"does not fit the encoder \(TimmUniversalEncoder\)"
    ) as error:
        load_encoder_weights(encoder, path)
    message = str(error.value)
    assert str(path) in message and f"first mismatch at tensor {position}" in message
    assert list(other)[position] in message and expected[position][0] in message


def test_a_namesake_of_another_shape_is_named(timm_weights, tmp_path) -> None:
    wrong = dict(timm_weights, **{"layer1.0.conv1.weight": torch.zeros(1, 1, 1, 1)})
    path = WRITERS["timm"](wrong, tmp_path / "wrong")
    with pytest.raises(ValueError, match=r"'layer1.0.conv1.weight' has shape \[1, 1, 1, 1\]"):
        tiny_segmenter(encoder_weights=str(path))


def test_a_safetensors_file_is_never_matched_by_position(timm_weights, tmp_path) -> None:
    encoder_keys = list(tiny_segmenter().model.network.encoder.state_dict())
    renamed = {
        f"t{i:03d}": timm_weights[k.removeprefix("model.")] for i, k in enumerate(encoder_keys)
    }
    path = safetensors_file(renamed, tmp_path / "renamed")
    with pytest.raises(ValueError, match="only matched by name"):
        tiny_segmenter(encoder_weights=str(path))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "neither 'imagenet', None, nor an existing file"),
        ({"epoch": 3}, "holds no tensors"),
        (b"not a torch file", "not a torch.save file"),
    ],
)
def test_unreadable_files_are_reported(content, message, tmp_path) -> None:
    path = tmp_path / "weights.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(ValueError, match=message):
        tiny_segmenter(encoder_weights=str(path))


@pytest.mark.parametrize("writer", ["ddp_checkpoint", "safetensors"])
def test_the_cam_encoder_reads_the_files_the_segmenter_reads(writer, timm_weights, tmp_path):
    path = str(WRITERS[writer](timm_weights, tmp_path / "weights"))
    segmenter = tiny_segmenter(encoder_weights=path).model.network.encoder.state_dict()
    classifier = tiny_classifier(encoder_weights=path)
    # The same builder: the same tensors whether the encoder stands alone (dilated) or not.
    for encoder in (classifier.model.encoder, build_encoder(TINY_ENCODER, path, 32)):
        loaded = encoder.state_dict()
        assert loaded.keys() == segmenter.keys()
        for key, tensor in segmenter.items():
            torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)


def test_a_cam_encoder_file_that_does_not_fit_is_named(tmp_path) -> None:
    path = tmp_path / "efficientnet.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    with pytest.raises(ValueError, match=r"efficientnet\.pth does not fit the encoder"):
        tiny_classifier(encoder_weights=str(path))
