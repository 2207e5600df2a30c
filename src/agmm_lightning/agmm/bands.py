"""The pixel terms of CVPR mode's kernel block on one band of rows, eager or fused.

:mod:`~agmm_lightning.agmm.cvpr` takes the softmax over every class at label resolution a band of
rows at a time, in its forward and again in its backward. Eagerly, each band costs about a dozen
passes over ``[B, C, rows, W]`` memory: the softmax and its contiguous copy of the band,
``log(1 - P)``, the gathers at the slots' classes and the absent term; in backward the softmax
again, the absent gradient, the slots' scatter, the softmax backward, the cells' gradient and a
copy into the logits' dtype. The same formulas written plainly are compiled by ``torch.compile``
(Inductor: C++/OpenMP on a CPU, Triton on a GPU) into a few loops that read the band of logits
and write only what is kept: the ``[B, S, rows, W]`` maps of the slots and, in backward, the
band's gradient.

The choice (:data:`Fused`) is set with :func:`fused_pixel_terms`. Where compiling is not possible
(no C++ compiler, no Triton, a Python that TorchDynamo does not support) the first attempt warns
once and the eager functions serve from then on.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Literal, NamedTuple, get_args

import torch
from torch import Tensor
from torch._dynamo.exc import BackendCompilerFailed

from agmm_lightning.agmm.losses import EPS
from agmm_lightning.errors import check_choice

__all__ = ["AUTO_MIN_ELEMENTS", "BandFunctions", "Fused", "band_functions", "fused_pixel_terms"]

Fused = Literal["auto", "eager", "compile"]
"""How the pixel terms run: ``"eager"`` (PyTorch operators), ``"compile"`` (``torch.compile``) or
``"auto"`` (compiled where that measures faster: on a CPU, logits of at least
:data:`AUTO_MIN_ELEMENTS`)."""

AUTO_MIN_ELEMENTS = 2**21
"""Elements of the ``[B, C, H, W]`` logits from which ``"auto"`` compiles on a CPU."""

RECOMPILE_LIMIT = 32
"""Compiled variants each band function may hold. One compiles per dtype, per set of gradients
asked for and per size 0 or 1 (sizes are dynamic otherwise): a training run needs two or three,
a process that trains several setups in turn more than dynamo's default limit of 8."""

_mode: ContextVar[Fused] = ContextVar("fused_pixel_terms", default="auto")


@contextlib.contextmanager
def fused_pixel_terms(mode: Fused) -> Iterator[None]:
    """Within the context, the kernel block's pixel terms run as ``mode`` says (:data:`Fused`).

    Raises:
        InputError: For a mode not in :data:`Fused`.
    """
    check_choice("fused", mode, get_args(Fused))
    token = _mode.set(mode)
    try:
        yield
    finally:
        _mode.reset(token)


class ForwardBand(NamedTuple):
    """What the forward reads on one band of rows.

    Attributes:
        logits: ``[B, C, r, W]`` logits, any floating dtype.
        slot_class: ``[B, S, r, W]`` class of each slot.
        forbidden: ``[B, C]`` classes absent from each image, or ``[B, C, r, W]`` per pixel.
    """

    logits: Tensor
    slot_class: Tensor
    forbidden: Tensor


class ForwardOut(NamedTuple):
    """Where the forward writes one band: views of the full maps.

    Attributes:
        slot_probs: ``[B, S, r, W]`` softmax at each slot's class.
        slot_log_not: ``[B, S, r, W]`` ``log(1 - P + 1e-6)`` at each slot's class.
        absent: ``[B, r, W]`` ``sum_c forbidden_c log(1 - P_c + 1e-6)``.
    """

    slot_probs: Tensor
    slot_log_not: Tensor
    absent: Tensor


class BackwardBand(NamedTuple):
    """What the backward reads on one band of rows (None: that gradient is not asked for).

    Attributes:
        logits: ``[B, C, r, W]`` logits, any floating dtype.
        slot_class: ``[B, S, r, W]`` class of each slot.
        slot_grad: ``[B, S, r, W]`` ``P dL/dP`` of the slot terms at each slot's class.
        absent: The absent term's ``forbidden`` (as in :class:`ForwardBand`) and its
            ``[B, 1, r, W]`` weight per pixel, the loss's gradient included.
        cell_grad: ``[B, C, r / cr, W]`` gradient of each cell's mean logit over the cell's
            area, repeated over the cell's columns: added to each of the cell's rows.
    """

    logits: Tensor
    slot_class: Tensor
    slot_grad: Tensor | None
    absent: tuple[Tensor, Tensor] | None
    cell_grad: Tensor | None


class BandFunctions(NamedTuple):
    """The forward ``(band, out, dtype)`` and backward ``(band, out, dtype)`` of one band."""

    forward: Callable[[ForwardBand, ForwardOut, torch.dtype], None]
    backward: Callable[[BackwardBand, Tensor, torch.dtype], None]


def _per_pixel(forbidden: Tensor) -> Tensor:
    """``[B, C]`` forbidden classes as ``[B, C, 1, 1]``; a ``[B, C, r, W]`` band as it is."""
    return forbidden[..., None, None] if forbidden.ndim == 2 else forbidden


def _eager_forward(band: ForwardBand, out: ForwardOut, dtype: torch.dtype) -> None:
    """The forward in PyTorch operators, in place where it can be."""
    probs = band.logits.softmax(1, dtype=dtype)
    log_not_probs = torch.rsub(probs, 1 + EPS).log_()
    out.slot_probs.copy_(probs.gather(1, band.slot_class))
    out.slot_log_not.copy_(log_not_probs.gather(1, band.slot_class))
    if band.forbidden.ndim == 2:
        absent = torch.bmm(band.forbidden[:, None], log_not_probs.flatten(2))
        out.absent.copy_(absent.view_as(out.absent))
    else:
        out.absent.copy_((band.forbidden * log_not_probs).sum(1))


def _plain_forward(band: ForwardBand, out: ForwardOut, dtype: torch.dtype) -> None:
    """The forward written plainly, for Inductor to fuse."""
    probs = band.logits.softmax(1, dtype=dtype)
    log_not_probs = torch.log(1 + EPS - probs)
    forbidden = _per_pixel(band.forbidden)
    out.slot_probs.copy_(probs.gather(1, band.slot_class))
    out.slot_log_not.copy_(log_not_probs.gather(1, band.slot_class))
    out.absent.copy_((forbidden * log_not_probs).sum(1))


def _eager_backward(band: BackwardBand, out: Tensor, dtype: torch.dtype) -> None:
    """The backward in PyTorch operators, in place in ``out`` where its dtype allows."""
    probs = band.logits.softmax(1, dtype=dtype)
    grad = out if out.dtype == dtype else torch.empty_like(probs)
    # P_c dL/dP_c, first of absent: P_c (1 - t_c) / (1 - P_c + eps) on each valid pixel, as
    # P_c / (P_c - 1 - eps) times -(1 - t_c), which takes one pass fewer.
    if band.absent is None:
        grad.zero_()
    else:
        forbidden, weight = band.absent
        torch.div(probs, torch.sub(probs, 1 + EPS, out=grad), out=grad)
        grad.mul_(_per_pixel(forbidden)).mul_(weight)
    if band.slot_grad is not None:
        grad.scatter_add_(1, band.slot_class, band.slot_grad)
    # Softmax backward: dz_c = P_c dP_c - P_c sum_k P_k dP_k.
    grad.addcmul_(probs, grad.sum(1, keepdim=True), value=-1)
    if band.cell_grad is not None:
        batch, classes, _, width = grad.shape
        cells = band.cell_grad
        grad.view(batch, classes, cells.shape[2], -1, width).add_(cells[:, :, :, None])
    if grad is not out:
        out.copy_(grad)


def _plain_backward(band: BackwardBand, out: Tensor, dtype: torch.dtype) -> None:
    """The backward written plainly, for Inductor to fuse."""
    probs = band.logits.softmax(1, dtype=dtype)
    grad = torch.zeros_like(probs)
    if band.absent is not None:
        forbidden, weight = band.absent
        grad = probs / (probs - (1 + EPS)) * _per_pixel(forbidden) * weight
    if band.slot_grad is not None:
        grad = grad.scatter_add(1, band.slot_class, band.slot_grad)
    grad = grad - probs * grad.sum(1, keepdim=True)
    if band.cell_grad is not None:
        # Each row reads its cells' row: a gather along the rows keeps the columns contiguous,
        # which Inductor vectorises (a tiled view of the band would need a division per pixel).
        rows, cell_rows = grad.shape[2], band.cell_grad.shape[2]
        cell_of_row = torch.arange(rows, device=grad.device) // (rows // cell_rows)
        grad = grad + band.cell_grad[:, :, cell_of_row]
    out.copy_(grad)


EAGER = BandFunctions(_eager_forward, _eager_backward)


class _Compiled:
    """The plain band functions compiled on first use; the eager ones once compiling failed."""

    def __init__(self) -> None:
        self.functions: BandFunctions | None = None
        self.failed = False

    def forward(self, band: ForwardBand, out: ForwardOut, dtype: torch.dtype) -> None:
        self._run("forward", band, out, dtype)

    def backward(self, band: BackwardBand, out: Tensor, dtype: torch.dtype) -> None:
        self._run("backward", band, out, dtype)

    def _run(self, name: str, *args: object) -> None:
        functions = None if self.failed else self._compiled()
        if functions is not None:
            try:
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    getattr(functions, name)(*args)
                return
            except BackendCompilerFailed as error:  # no C++ compiler, no Triton
                self._fail(error)
        getattr(EAGER, name)(*args)

    def _compiled(self) -> BandFunctions | None:
        if self.functions is None:
            try:
                # Dynamic from the first call: bands, batches and slot counts vary without
                # recompiling (only sizes 0 and 1 get code of their own).
                self.functions = BandFunctions(
                    torch.compile(_plain_forward, dynamic=True),
                    torch.compile(_plain_backward, dynamic=True),
                )
            except RuntimeError as error:  # a Python that TorchDynamo does not support
                self._fail(error)
        return self.functions

    def _fail(self, error: Exception) -> None:
        self.failed = True
        message = str(error).strip().splitlines()[0]
        warnings.warn(
            f"The fused pixel terms of the kernel block could not be compiled "
            f"({type(error).__name__}: {message}); they run eagerly from now on "
            "(fused='eager' skips the attempt).",
            RuntimeWarning,
            stacklevel=2,
        )


_COMPILED = _Compiled()


def band_functions(logits: Tensor) -> BandFunctions:
    """The band functions for these logits under the current :func:`fused_pixel_terms` mode."""
    mode = _mode.get()
    if mode == "auto":
        large = logits.numel() >= AUTO_MIN_ELEMENTS
        mode = "compile" if logits.device.type == "cpu" and large else "eager"
    if mode == "eager":
        return EAGER
    return BandFunctions(_COMPILED.forward, _COMPILED.backward)
