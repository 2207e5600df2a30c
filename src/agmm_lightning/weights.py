"""Encoder weights from local files, for clusters whose compute nodes have no network.

A file saved by ``torch.save`` (or ``.safetensors``) from timm, torchvision, smp or a Lightning
checkpoint is matched to an smp encoder first by name, modulo wrapper prefixes, and otherwise by
position, when the file lists the same tensor shapes in the same order under other names.
"""

from __future__ import annotations

import importlib.util
import logging
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from agmm_lightning.errors import InputError

__all__ = ["load_encoder_weights", "read_state_dict", "split_weights"]

logger = logging.getLogger(__name__)

# Keys under which checkpoints nest the state dict (Lightning, timm/DeiT training scripts, ...).
_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")
# Leading key parts that wrappers add: DDP (module.), segmenter checkpoints, smp models and
# timm-universal encoders (model., network., encoder.), detection-style backbones (backbone.),
# torch.compile (_orig_mod.).
_WRAPPER_PREFIXES = ("module.", "model.", "network.", "encoder.", "backbone.", "_orig_mod.")


def split_weights(weights: str | None) -> tuple[str | None, str | None]:
    """Split an ``encoder_weights`` value into what smp downloads and what is read from disk.

    Args:
        weights: None, ``"imagenet"``, or the path of a local weights file.

    Returns:
        ``(weights for smp, local file)``: ``(None, path)`` for a file, ``(weights, None)`` else.
    """
    if weights is None or weights == "imagenet":
        return weights, None
    return None, weights


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read the tensors of a weights file, unwrapped from the checkpoint that holds them.

    Args:
        path: A ``torch.save`` file (``.pth``, ``.pt``, ``.bin``, ``.ckpt``, ...) or a
            ``.safetensors`` file.

    Returns:
        The file's tensors by key, in the file's order.

    Raises:
        ValueError: If the file is missing, unreadable, or holds no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"encoder_weights={str(path)!r} is neither 'imagenet', None, nor an existing file"
        )
    if path.suffix == ".safetensors":
        state: object = _read_safetensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            raise InputError(
                f"{path} is not a torch.save file of tensors readable with weights_only=True "
                f"({str(error).splitlines()[0]}); save the encoder's state_dict() instead"
            ) from error
    tensors = _unwrap(state)
    if not tensors:
        raise InputError(f"{path} holds no tensors (expected a state dict, optionally nested)")
    return tensors


def _unwrap(state: object) -> dict[str, Tensor]:
    """The tensors of the innermost state dict of a (possibly nested) checkpoint."""
    while isinstance(state, Mapping):
        containers = [state[key] for key in _CONTAINER_KEYS if isinstance(state.get(key), Mapping)]
        if not containers:
            return {str(key): value for key, value in state.items() if isinstance(value, Tensor)}
        state = containers[0]
    return {}


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if importlib.util.find_spec("safetensors") is None:
        raise InputError(f"{path} is a .safetensors file: install the 'safetensors' package")
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


def _canonical(key: str) -> str:
    """The key without the wrapper prefixes in front of it."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _match_by_name(
    expected: Mapping[str, Tensor], found: Mapping[str, Tensor]
) -> dict[str, Tensor] | None:
    """The file's tensors under the encoder's keys, when every key is there by name.

    Returns:
        The state dict to load, or None when some encoder key has no namesake in the file.

    Raises:
        ValueError: If a namesake has another shape, or several file keys name one encoder key.
    """
    by_name: dict[str, list[str]] = {}
    for key in found:
        by_name.setdefault(_canonical(key), []).append(key)
    sources = {key: by_name.get(_canonical(key), []) for key in expected}
    if not all(sources.values()):
        return None
    matched = {}
    for key, (source, *others) in sources.items():
        if others:
            raise InputError(f"the file's keys {[source, *others]} all name the encoder's {key!r}")
        if found[source].shape != expected[key].shape:
            raise InputError(
                f"key {source!r} has shape {list(found[source].shape)}, "
                f"the encoder's {key!r} has {list(expected[key].shape)}"
            )
        matched[key] = found[source]
    return matched


def _match_by_position(
    expected: Mapping[str, Tensor], found: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The file's tensors in order under the encoder's keys, when all their shapes agree.

    Raises:
        ValueError: Naming the first position whose shapes differ, or a count mismatch.
    """
    found_items = list(found.items())
    for position, (key, tensor) in enumerate(expected.items()):
        if position >= len(found_items):
            raise InputError(
                f"the file has {len(found_items)} tensors, the encoder {len(expected)}: "
                f"nothing for the encoder's {key!r} {list(tensor.shape)}"
            )
        found_key, found_tensor = found_items[position]
        if found_tensor.shape != tensor.shape:
            raise InputError(
                f"first mismatch at tensor {position}: the file's {found_key!r} "
                f"{list(found_tensor.shape)} against the encoder's {key!r} {list(tensor.shape)}"
            )
    if len(found_items) != len(expected):
        raise InputError(
            f"the file has {len(found_items)} tensors, the encoder {len(expected)}; the first "
            f"extra one is {found_items[len(expected)][0]!r}"
        )
    return {key: tensor for key, (_, tensor) in zip(expected, found_items, strict=False)}


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> None:
    """Load a local weights file into an encoder, by name or else by position.

    Names are compared without wrapper prefixes (``module.``, ``model.``, ``encoder.``,
    ``backbone.``), so a timm or torchvision classifier's state dict, an smp model's or an
    ``AGMMSegmenter`` checkpoint all fit the matching encoder; tensors the encoder lacks (a
    classifier head, a decoder) are ignored. When the names differ but the file lists exactly
    the encoder's tensor shapes in the encoder's order, the tensors are taken by position (not
    for ``.safetensors`` files, which store their tensors sorted by name).

    Args:
        encoder: The encoder, e.g. ``smp_model.encoder``.
        path: The weights file (see :func:`read_state_dict`).

    Raises:
        ValueError: If the file cannot be read or does not fit the encoder; the message names the
            file and the first mismatching key and shape.
    """
    path = Path(path)
    found = read_state_dict(path)
    expected = encoder.state_dict()
    try:
        matched = _match_by_name(expected, found)
        if matched is None and path.suffix == ".safetensors":
            names = {_canonical(key) for key in found}
            missing = next(key for key in expected if _canonical(key) not in names)
            raise InputError(
                f"the encoder's {missing!r} is not in the file (.safetensors files store their "
                "tensors sorted by name, so they are only matched by name)"
            )
        if matched is None:
            matched = _match_by_position(expected, found)
            logger.info(
                "%s: key names differ from the encoder's; loaded its %d tensors by position",
                path,
                len(matched),
            )
    except ValueError as error:
        raise InputError(
            f"{path} does not fit the encoder ({type(encoder).__name__}): {error}"
        ) from error
    ignored = len(found) - len(matched)
    if ignored:
        logger.info("%s: ignored %d tensors the encoder does not have", path, ignored)
    encoder.load_state_dict(matched)
