"""Timing and peak-memory helpers shared by the benchmark scripts."""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 5) -> float:
    """Fastest wall time of ``fn`` over ``repeats`` calls after a warm-up (as ``timeit``).

    The minimum is the measurement least disturbed by other processes on a shared machine.
    """
    fn()
    synchronize(device)
    return min(wall_seconds(fn, device) for _ in range(repeats))


def wall_seconds(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``fn``, the device's queued work included."""
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_memory_mib(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory ``fn`` adds on top of what is already allocated, in MiB.

    CUDA: the allocator's peak. CPU: the process's peak resident set (Linux ``VmHWM``, reset
    through ``/proc/self/clear_refs``) minus the resident set before the call.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return resident_mib(fn)


def resident_mib(fn: Callable[[], object]) -> float:
    """Growth of the process's peak resident set while ``fn`` runs (Linux), in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def release_freed_memory() -> None:
    """Hand the pages of freed objects back to the system (glibc's ``malloc_trim``, Linux).

    Without it the allocator reuses them, and what runs next no longer grows the resident set.
    """
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def in_fresh_process(fn: Callable[..., float], *args: object) -> float:
    """``fn(*args)`` in a newly spawned process (``fn`` must be importable).

    In a process that already ran, the allocator reuses freed memory and the resident set no
    longer grows, so a CPU peak is only measurable from a clean start.
    """
    with ProcessPoolExecutor(1, multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()
