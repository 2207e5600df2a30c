"""smp encoders and networks by name, with their ``encoder_weights``: the one builder of both.

``encoder_weights`` means the same everywhere: None (random), ``"imagenet"`` (downloaded by smp
or timm, or read from the Hugging Face cache when ``HF_HUB_OFFLINE=1``) or the path of a local
file, read by :func:`agmm_lightning.weights.load_encoder_weights` once the module is built (for
clusters whose compute nodes have no network). The AGMM network (:func:`build_network`) and the
CAM classifier's encoder (:func:`build_encoder`) are both built through
:func:`build_with_encoder_weights`, so both check the name and read local files alike. Pure torch:
no Lightning here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

import segmentation_models_pytorch as smp
import timm
from torch import nn

from agmm_lightning.errors import InputError
from agmm_lightning.weights import load_encoder_weights, split_weights

__all__ = ["build_encoder", "build_network", "build_with_encoder_weights", "check_encoder"]

Built = TypeVar("Built", bound=nn.Module)


def check_encoder(encoder: str) -> None:
    """Raise an InputError unless ``encoder`` names an smp encoder or ``tu-<timm model>``."""
    known = (
        timm.is_model(encoder[3:])
        if encoder.startswith("tu-")
        else encoder in smp.encoders.get_encoder_names()
    )
    if not known:
        raise InputError(
            f"encoder={encoder!r} is neither an smp encoder (smp.encoders.get_encoder_names()) "
            "nor 'tu-<timm model>'"
        )


def build_with_encoder_weights(
    encoder: str, encoder_weights: str | None, construct: Callable[[str | None], Built]
) -> Built:
    """Build an smp encoder, or a model around one, with the weights ``encoder_weights`` names.

    smp downloads what it can (None or ``"imagenet"``, passed to ``construct``); a local file is
    loaded afterwards into the encoder (the built module itself, or its ``encoder`` for an smp
    segmentation model).

    Args:
        encoder: An smp encoder name or ``tu-<timm model>`` (checked before anything is built).
        encoder_weights: None, ``"imagenet"`` or the path of a local weights file.
        construct: Builds the module given the weights for smp: None or ``"imagenet"``.

    Returns:
        The module, its encoder holding the requested weights.

    Raises:
        InputError: For an unknown encoder, or a weights file that is missing, unreadable or
            does not fit the encoder.
    """
    check_encoder(encoder)
    downloaded, local = split_weights(encoder_weights)
    built = construct(downloaded)
    if local is not None:
        target = built.encoder if isinstance(built, smp.base.SegmentationModel) else built
        load_encoder_weights(cast(nn.Module, target), local)
    return built


def build_encoder(
    name: str, weights: str | None, output_stride: int = 32, in_channels: int = 3
) -> nn.Module:
    """Build an smp encoder alone (for a classifier), with its weights.

    Args:
        name: An smp encoder name or ``tu-<timm model>``.
        weights: None, ``"imagenet"`` or a local weights file (see the module docstring).
        output_stride: 8, 16 or 32 (the last stages are dilated below 32).
        in_channels: Channels of the input images (smp adapts the first convolution of
            ``"imagenet"`` weights to other counts).

    Returns:
        The encoder: ``encoder(images)`` is its list of feature maps, the last of
        ``encoder.out_channels[-1]`` channels.

    Raises:
        InputError: For an unknown encoder, or a weights file that does not fit.
    """
    return build_with_encoder_weights(
        name,
        weights,
        lambda downloaded: smp.encoders.get_encoder(
            name, in_channels=in_channels, weights=downloaded, output_stride=output_stride
        ),
    )


def build_network(
    arch: str, encoder: str, encoder_weights: str | None, num_classes: int, in_channels: int = 3
) -> smp.base.SegmentationModel:
    """Build an smp encoder-decoder by name, its encoder with the requested weights.

    Args:
        arch: An smp architecture name (``Unet``, ``DeepLabV3Plus``, ...).
        encoder: An smp encoder name or ``tu-<timm model>``.
        encoder_weights: None, ``"imagenet"`` or a local weights file (see the module
            docstring).
        num_classes: Output classes of the segmentation head.
        in_channels: Channels of the input images (smp adapts the first convolution of
            ``"imagenet"`` weights to other counts).

    Returns:
        The model.

    Raises:
        InputError: For an unknown architecture or encoder, or a weights file that is unreadable
            or does not fit the encoder.
    """
    # smp's own registry of architectures, the one create_model looks names up in.
    if arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        architectures = sorted(m.__name__ for m in smp.MODEL_ARCHITECTURES_MAPPING.values())
        raise InputError(f"arch={arch!r} is not an smp architecture; choose one of {architectures}")
    return build_with_encoder_weights(
        encoder,
        encoder_weights,
        lambda downloaded: cast(
            smp.base.SegmentationModel,
            smp.create_model(
                arch,
                encoder_name=encoder,
                encoder_weights=downloaded,
                in_channels=in_channels,
                classes=num_classes,
            ),
        ),
    )
