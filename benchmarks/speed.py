"""What the methods cost per training step, and how the OEM step grows with the problem size.

1. One training step (forward, backward, optimizer step and, for ``agmm``, the OEM refit) of each
   method on the same batch, as a ratio to the ``baseline`` step measured in the same run, and its
   peak memory as a ratio to the baseline's, at the shapes users train at: ``demo`` (Unet/resnet18,
   8 × 80², C=6), ``voc`` (DeepLabV3+/resnet101, 16 × 321², C=21) and ``ade`` (DeepLabV3+/resnet101,
   16 × 512², C=150), in float32 (``32``) and ``bf16-mixed``. A CPU runs the same shapes with a
   smaller batch (the table says which). cvpr and agmm run twice, their kernel block's pixel terms
   eager (``fused="eager"``) and compiled (``fused="compile"``), side by side in the same run, and
   the table says which of the two ``fused="auto"``, the default, picks at each shape. Every
   variant takes two steps before it is measured, so compiling is not counted.
2. The CVPR loss block against the broadcast formulation (``bench_core.py``'s measurement).
3. Scaling of one OEM step (E-step, posterior, statistics, update) with classes (21→150),
   components (1→8), embedding size (32→256) and image side (256→1024 at stride 4), one at a time
   from C=21, K=4, D=64, 512²; the slope of log time against log size is fitted per curve (1 =
   linear). Written as a PNG beside ``--out``.

Every measurement runs on the CPU, and on CUDA too when a GPU is present. ``--profile`` adds the
operators that make up cvpr's and agmm's extra time at the last setup and first precision named.
``--quick`` shrinks every size for CI smoke runs.

Run: ``python benchmarks/speed.py [--setups demo voc ade] [--precisions 32 bf16-mixed]
[--profile] [--out results/speed.md] [--quick]``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
from pathlib import Path

import matplotlib
import torch
from _measure import (
    best_seconds,
    in_fresh_process,
    peak_memory_mib,
    release_freed_memory,
    resident_mib,
    wall_seconds,
)
from _runs import OTHER_COLOURS, legend_outside, publish
from bench_core import click_target, loss_block
from torch.profiler import ProfilerActivity, profile

from agmm_lightning.agmm import AGMMModel, ClassMixtures, OEMOptions, build_network
from agmm_lightning.agmm.bands import EAGER, Fused, band_functions, fused_pixel_terms

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator  # noqa: E402

METHODS = ("baseline", "cvpr", "agmm")
# Each method with how its pixel terms run; the baseline has none, so it runs once.
VARIANTS: tuple[tuple[str, Fused], ...] = (
    ("baseline", "eager"),
    ("cvpr", "eager"),
    ("cvpr", "compile"),
    ("agmm", "eager"),
    ("agmm", "compile"),
)
WARMUP_STEPS = 2  # the mixtures' first fit, and every compilation (all in the first step)
PRECISIONS = ("32", "bf16-mixed")
# Each setup: network, classes, image side, the batch on a GPU and the smaller one on a CPU.
SETUPS = {
    "demo": {"arch": "Unet", "encoder": "resnet18", "classes": 6, "size": 80, "batch": 8},
    "voc": {"arch": "DeepLabV3Plus", "encoder": "resnet101", "classes": 21, "size": 321},
    "ade": {"arch": "DeepLabV3Plus", "encoder": "resnet101", "classes": 150, "size": 512},
}
GPU_BATCH, CPU_BATCH = 16, 2
QUICK_SETUP = {"arch": "Unet", "encoder": "tu-test_resnet", "size": 32, "batch": 2}
BASE = {"classes": 21, "components": 4, "dim": 64, "side": 512}
CURVES = {
    "classes": [21, 50, 100, 150],
    "components": [1, 2, 4, 8],
    "dim": [32, 64, 128, 256],
    "side": [256, 512, 768, 1024],
}
QUICK_CURVES = {name: values[:2] for name, values in CURVES.items()}
PROFILE_ROWS = 12


def shape(name: str, device: torch.device, quick: bool) -> dict:
    """The network, classes, side and batch of a setup on a device (tiny with ``quick``)."""
    setup = SETUPS[name] | (QUICK_SETUP if quick else {})
    batch = setup.get("batch", GPU_BATCH if device.type == "cuda" else CPU_BATCH)
    return setup | {"batch": batch}


def auto_choice(setup: dict, device: torch.device) -> Fused:
    """What ``fused="auto"`` runs at a setup's ``[B, C, H, W]`` logits: the library's own rule,
    asked of an expanded scalar of that shape, which takes no memory."""
    logits = torch.empty((), device=device).expand(
        setup["batch"], setup["classes"], setup["size"], setup["size"]
    )
    with fused_pixel_terms("auto"):
        return "eager" if band_functions(logits) is EAGER else "compile"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast of a Lightning precision flag (``32`` or ``bf16-mixed``)."""
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def training_step(method: str, fused: Fused, setup: dict, precision: str, device: torch.device):
    """A closure running one full training step of ``method`` on a fixed batch with clicks."""
    gen = torch.Generator().manual_seed(0)
    classes, batch, size = setup["classes"], setup["batch"], setup["size"]
    network = build_network(setup["arch"], setup["encoder"], None, classes)
    model = AGMMModel(network, classes, method, OEMOptions(warmup_steps=0), fused=fused)
    model = model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = click_target(batch, size, classes, 4, gen)
    data = {
        "image": torch.randn(batch, 3, size, size, generator=gen),
        "target": target,
        "image_classes": torch.ones(batch, classes),
    }
    data = {key: value.to(device) for key, value in data.items()}

    def step() -> None:
        with autocast(device, precision):
            losses, _ = model.losses(data)
        optimizer.zero_grad()
        sum(losses.terms.values()).backward()
        optimizer.step()
        if losses.stats is not None:
            model.mixtures.update(losses.stats)

    return step


def cpu_training_peak_mib(method: str, fused: Fused, setup: dict, precision: str) -> float:
    """Peak resident memory of three training steps beyond the built model (in a fresh process).

    A first copy of the model takes the warm-up steps, so that compiling and what it keeps are
    not counted; it is freed and its pages handed back to the system, then a second copy is
    measured from its first step (the optimizer's state included), as in training.
    """
    cpu = torch.device("cpu")
    warm = training_step(method, fused, setup, precision, cpu)
    for _ in range(WARMUP_STEPS):
        warm()
    del warm
    release_freed_memory()
    step = training_step(method, fused, setup, precision, cpu)
    return resident_mib(lambda: [step() for _ in range(3)])


def step_rows(
    device: torch.device, setup: dict, precision: str, repeats: int
) -> dict[tuple[str, Fused], tuple[float, float]]:
    """Seconds and peak MiB of each variant's training step (:data:`VARIANTS`).

    The variants take turns within every repeat, so a slow spell of a shared machine hits all of
    them alike; each keeps its fastest time.
    """
    steps = {v: training_step(*v, setup, precision, device) for v in VARIANTS}
    memory = {}
    for variant, step in steps.items():
        for _ in range(WARMUP_STEPS):
            step()
        if device.type == "cuda":
            memory[variant] = peak_memory_mib(step, device)
        else:
            memory[variant] = in_fresh_process(cpu_training_peak_mib, *variant, setup, precision)
    seconds = dict.fromkeys(VARIANTS, math.inf)
    for _ in range(repeats):
        for variant, step in steps.items():
            seconds[variant] = min(seconds[variant], wall_seconds(step, device))
    return {variant: (seconds[variant], memory[variant]) for variant in VARIANTS}


def step_table(measured: dict, quick: bool) -> list[str]:
    """Markdown rows: per setup, precision and device, each variant's step time and peak memory
    as ratios to the baseline's."""
    names = [f"{method} {fused}" for method, fused in VARIANTS[1:]]
    lines = [
        "| setup | precision | device, batch | auto picks | baseline step, peak memory | "
        + " | ".join(names)
        + " |",
        "|---" * (5 + len(names)) + "|",
    ]
    for (name, precision, kind), rows in measured.items():
        setup = shape(name, torch.device(kind), quick)
        base_seconds, base_memory = rows[VARIANTS[0]]
        cells = [auto_choice(setup, torch.device(kind))]
        cells.append(f"{1e3 * base_seconds:.0f} ms, {base_memory:.0f} MiB")
        for variant in VARIANTS[1:]:
            seconds, memory = rows[variant]
            cells.append(f"{seconds / base_seconds:.2f}×, {memory / base_memory:.2f}×")
        lines.append(
            f"| {name}: {setup['arch']}/{setup['encoder']}, {setup['size']}², "
            f"C={setup['classes']} | {precision} | {kind.upper()}, {setup['batch']} | "
            + " | ".join(cells)
            + " |"
        )
    return lines


def op_seconds(step, device: torch.device) -> dict[str, float]:
    """Self time of each operator in one call of ``step`` (device time on a GPU), in seconds."""
    for _ in range(WARMUP_STEPS):
        step()
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    with profile(activities=[activity]) as profiler:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    attribute = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {event.key: getattr(event, attribute) / 1e6 for event in profiler.key_averages()}


def profile_table(device: torch.device, name: str, precision: str, quick: bool) -> list[str]:
    """Markdown rows: the operators that make cvpr's and agmm's extra time over the baseline,
    their pixel terms as ``fused="auto"`` runs them."""
    setup = shape(name, device, quick)
    ops = {
        m: op_seconds(training_step(m, "auto", setup, precision, device), device) for m in METHODS
    }
    extra = {
        method: {op: t - ops["baseline"].get(op, 0.0) for op, t in ops[method].items()}
        for method in METHODS[1:]
    }
    total = {method: sum(times.values()) for method, times in ops.items()}
    top = sorted(extra["agmm"], key=lambda op: -abs(extra["agmm"][op]))[:PROFILE_ROWS]
    lines = [
        f"Extra time per step over the baseline by operator: {name}, {precision}, "
        f"{device.type.upper()}, batch {setup['batch']}, fused=auto "
        f"({auto_choice(setup, device)}; baseline {1e3 * total['baseline']:.0f} "
        f"ms of operator time; cvpr {1e3 * (total['cvpr'] - total['baseline']):+.0f} ms, "
        f"agmm {1e3 * (total['agmm'] - total['baseline']):+.0f} ms).",
        "",
        "| operator | cvpr extra (ms) | agmm extra (ms) |",
        "|---|---|---|",
    ]
    for op in top:
        cvpr = 1e3 * extra["cvpr"].get(op, -ops["baseline"].get(op, 0.0))
        lines.append(f"| `{op}` | {cvpr:+.0f} | {1e3 * extra['agmm'][op]:+.0f} |")
    return lines


def oem_step_seconds(device: torch.device, classes, components, dim, side, repeats) -> float:
    """One OEM step on one image at stride 4, every pixel in the fitting set."""
    gen = torch.Generator().manual_seed(1)
    count = (side // 4) ** 2
    x = torch.nn.functional.normalize(torch.randn(count, dim, generator=gen), dim=1).to(device)
    prior = torch.rand(count, classes, generator=gen).softmax(1).to(device)
    mixtures = ClassMixtures(classes, dim, components).to(device)
    mixtures.update(mixtures.sufficient_statistics(x, prior))

    def step() -> None:
        expectation = mixtures.expectation(x)
        posterior = mixtures.posterior_from_log_likelihood(expectation.log_likelihood, prior)
        mixtures.update(mixtures.sufficient_statistics(x, posterior, expectation))

    return best_seconds(step, device, repeats)


def slope(name: str, sizes: list[float], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(size); the image side counts as pixels."""
    power = 2 if name == "side" else 1
    xs, ys = [power * math.log(s) for s in sizes], [math.log(t) for t in seconds]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    num = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True))
    return num / sum((x - mean_x) ** 2 for x in xs)


def scaling(device: torch.device, curves: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of the OEM step along each curve."""
    return {
        name: [oem_step_seconds(device, **(BASE | {name: v}), repeats=repeats) for v in values]
        for name, values in curves.items()
    }


def plot(curves: dict, measured: dict[str, dict[str, list[float]]], path: Path) -> None:
    """One log-log panel per size varied: the OEM step's time per device, a dotted line of linear
    growth through the first point, and in the title the exponent of each device's fit
    (:func:`slope`: time grows as size^exponent)."""
    figure, axes = plt.subplots(1, len(curves), figsize=(3.0 * len(curves), 3.4))
    colours = dict(zip(measured, OTHER_COLOURS, strict=False))
    for axis, (name, values) in zip(axes, curves.items(), strict=True):
        power = 2 if name == "side" else 1  # the side's exponent is against the pixels
        exponents = []
        for device, times in measured.items():
            ms = [1e3 * t for t in times[name]]
            axis.loglog(values, ms, "o-", color=colours[device], label=device)
            linear = [ms[0] * (v / values[0]) ** power for v in values]
            axis.loglog(values, linear, ":", color=colours[device], linewidth=1)
            exponents.append(f"{device} {slope(name, values, times[name]):.2f}")
        axis.set_title(f"exponent: {', '.join(exponents)}", fontsize="small")
        axis.set_xlabel(
            {
                "classes": "classes C",
                "components": "components per class K",
                "dim": "embedding size D",
                "side": "image side (px); exponent vs pixels",
            }.get(name, name)
        )
        axis.set_xticks(values, [str(v) for v in values])
        axis.xaxis.set_minor_locator(NullLocator())
        low = min(1e3 * min(times[name]) for times in measured.values())
        high = max(1e3 * max(times[name]) for times in measured.values())
        middle, half = math.sqrt(low * high), max(math.sqrt(high / low), math.sqrt(3)) * 1.2
        axis.set_ylim(middle / half, middle * half)  # flat curves look flat, with tick labels
        axis.yaxis.set_major_locator(LogLocator(subs=(1, 2, 3, 5, 7)))
        axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.yaxis.set_minor_locator(NullLocator())
        axis.grid(True, which="major", linewidth=0.3)
    axes[0].set_ylabel("one OEM step (ms)")
    axes[-1].plot([], [], ":", color="grey", label="linear growth")
    legend_outside(axes[-1])
    base = ", ".join(f"{k}={v}" for k, v in BASE.items())
    figure.suptitle(f"OEM step time, one size varied at a time from {base}", fontsize="medium")
    figure.tight_layout()
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setups", nargs="+", choices=list(SETUPS), default=list(SETUPS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI smoke runs")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file; PNG beside it")
    parser.add_argument(
        "--profile", action="store_true", help="also break the extra time down by operator"
    )
    args = parser.parse_args(argv)
    curves = QUICK_CURVES if args.quick else CURVES
    repeats = 1 if args.quick else 3
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    gpu_name = torch.cuda.get_device_name() if len(devices) > 1 else None

    steps = {
        (name, precision, device.type): step_rows(
            device, shape(name, device, args.quick), precision, repeats
        )
        for name in args.setups
        for precision in args.precisions
        for device in devices
    }
    blocks = {device.type: loss_block(device, repeats) for device in devices}
    measured = {device.type: scaling(device, curves, repeats) for device in devices}

    def gpu(text) -> str:
        return text() if gpu_name else "no GPU in this run"

    lines = [
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"GPU: {gpu_name or 'none available'}; torch {torch.__version__}.",
        "",
        "Training step: forward, backward, SGD step and the OEM refit, 4 clicks per image, the "
        "labelled and the confident unlabelled pixels (posterior >= 0.9) in the OEM fitting set, "
        f"as in training; after {WARMUP_STEPS} warm-up steps (compiling included), fastest of "
        f"{repeats} interleaved rounds. Peak memory: on a CPU the resident set's growth over "
        "three steps of a fresh model in a fresh process, after a first copy's warm-up steps; on "
        "a GPU the allocator's peak over one step. cvpr and agmm with their pixel terms eager "
        "and compiled (fused='eager', 'compile'); each cell: step time, peak memory as ratios to "
        "the baseline of the same run. auto picks: what fused='auto', the default, runs there.",
        "",
        *step_table(steps, args.quick),
        "",
        "| measurement | CPU | GPU |",
        "|---|---|---|",
    ]

    def block_cell(kind: str) -> str:
        (ours, ours_mem), (ref, ref_mem) = blocks[kind]["ours"], blocks[kind]["broadcast"]
        return (
            f"{ref / ours:.1f}× faster ({1e3 * ours:.0f} vs {1e3 * ref:.0f} ms), "
            f"{ref_mem / max(ours_mem, 1e-3):.1f}× leaner"
        )

    lines.append(
        "| CVPR losses vs broadcast, B=4, 321², 81²×256, C=21 | "
        f"{block_cell('cpu')} | {gpu(lambda: block_cell('cuda'))} |"
    )
    base = ", ".join(f"{k}={v}" for k, v in BASE.items())
    for name, values in curves.items():

        def curve_cell(kind: str, name=name, values=values) -> str:
            times = measured[kind][name]
            points = ", ".join(f"{1e3 * t:.1f}" for t in times)
            return f"slope {slope(name, values, times):.2f} ({points} ms)"

        lines.append(
            f"| OEM step vs {name} {values[0]}→{values[-1]} | {curve_cell('cpu')} | "
            f"{gpu(lambda c=curve_cell: c('cuda'))} |"
        )
    lines += [
        "",
        f"OEM step curves: one image at stride 4, from {base}, one size varied at a time; slope "
        "of log time against log size (against log pixels for the side; 1 = linear).",
    ]
    if args.profile:
        for device in devices:
            lines += ["", *profile_table(device, args.setups[-1], args.precisions[0], args.quick)]
    text = "\n".join(lines)
    publish(text, args.out)
    if args.out:
        plot(curves, measured, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
