"""Float32 arithmetic inside mixed-precision training.

Under ``torch.autocast`` (Lightning's ``bf16-mixed`` and ``16-mixed``) matrix products run in half
precision even on float32 inputs. The mixtures' quadratic log-densities lose tens of nats that
way, pixel counts overflow float16 above 65,504, and in-place products of mixed dtypes fail. The
network runs in half; everything AGMM computes from its outputs runs in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["float32_math", "float32_method", "in_float32"]

Result = TypeVar("Result")


def float32_math(device: torch.device) -> torch.autocast:
    """A context in which autocast is off on ``device``: float32 tensors stay float32.

    Args:
        device: The device the computation runs on.

    Returns:
        The context manager.
    """
    return torch.autocast(device.type, enabled=False)


def in_float32(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The floating tensors upcast to float32 (float64 and integer tensors are left alone)."""
    return tuple(
        t.float() if t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors
    )


def float32_method(method: Callable[..., Result]) -> Callable[..., Result]:
    """Run a method of a module with buffers (such as ``ClassMixtures``) with autocast off."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Result:
        device = next(self.buffers()).device
        with float32_math(device):
            return method(self, *args, **kwargs)

    return wrapper
