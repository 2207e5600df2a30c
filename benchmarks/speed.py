"""What the methods cost per training step, and how the OEM step grows with the problem size.

1. One training step (forward, backward, optimizer step and, for ``agmm``, the OEM refit the
   callback applies) of each method on the same batch, as a ratio to the ``baseline`` step
   measured in the same run, with its peak memory. On a GPU also absolute times and images/s.
2. The CVPR loss block against the broadcast formulation (``bench_core.py``'s measurement).
3. Scaling of one OEM step (E-step, posterior, statistics, update) with classes (21→150),
   components (1→8), embedding size (32→256) and image side (256→1024 at stride 4), one at a time
   from C=21, K=4, D=64, 512²; the slope of log time against log size is fitted per curve (1 =
   linear). Written as a PNG beside ``--out``.

Every measurement runs on the CPU; on a machine with CUDA the GPU column is filled too, otherwise
it says that no GPU was available. ``--quick`` shrinks every size for CI smoke runs.

Run: ``python benchmarks/speed.py [--out results/speed.md] [--quick]``.
"""

from __future__ import annotations

import argparse
import math
import platform
from pathlib import Path

import matplotlib
import torch
from _measure import best_seconds, in_fresh_process, peak_memory_mib, resident_mib
from bench_core import click_target, loss_block

from agmm_lightning.agmm import AGMMModel, ClassMixtures, OEMOptions, build_network

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METHODS = ("baseline", "cvpr", "agmm")
STEP = {"arch": "Unet", "encoder": "resnet18", "num_classes": 6, "batch": 8, "size": 80}
QUICK_STEP = {"arch": "Unet", "encoder": "tu-test_resnet", "num_classes": 6, "batch": 2, "size": 32}
BASE = {"classes": 21, "components": 4, "dim": 64, "side": 512}
CURVES = {
    "classes": [21, 50, 100, 150],
    "components": [1, 2, 4, 8],
    "dim": [32, 64, 128, 256],
    "side": [256, 512, 768, 1024],
}
QUICK_CURVES = {name: values[:2] for name, values in CURVES.items()}


def training_step(method: str, setup: dict, device: torch.device):
    """A closure running one full training step of ``method`` on a fixed batch with clicks."""
    gen = torch.Generator().manual_seed(0)
    classes, batch, size = setup["num_classes"], setup["batch"], setup["size"]
    network = build_network(setup["arch"], setup["encoder"], None, classes)
    model = AGMMModel(network, classes, method, OEMOptions(warmup_steps=0)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = click_target(batch, size, classes, 4, gen)
    data = {
        "image": torch.randn(batch, 3, size, size, generator=gen),
        "target": target,
        "image_classes": torch.ones(batch, classes),
    }
    data = {key: value.to(device) for key, value in data.items()}

    def step() -> None:
        losses, _ = model.losses(data)
        optimizer.zero_grad()
        sum(losses.terms.values()).backward()
        optimizer.step()
        if losses.stats is not None:
            model.mixtures.update(losses.stats)

    return step


def cpu_training_peak_mib(method: str, setup: dict) -> float:
    """Peak resident memory of three training steps beyond the built model (in a fresh process)."""
    step = training_step(method, setup, torch.device("cpu"))
    return resident_mib(lambda: [step() for _ in range(3)])


def step_rows(device: torch.device, setup: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Seconds and peak MiB of each method's training step.

    The methods take turns within every repeat, so a slow spell of a shared machine hits all of
    them alike; each keeps its fastest time.
    """
    steps = {method: training_step(method, setup, device) for method in METHODS}
    memory = {}
    for method, step in steps.items():
        step()  # initialise the mixtures before timing
        if device.type == "cuda":
            memory[method] = peak_memory_mib(step, device)
        else:
            memory[method] = in_fresh_process(cpu_training_peak_mib, method, setup)
    seconds = {method: math.inf for method in METHODS}
    for _ in range(repeats):
        for method, step in steps.items():
            seconds[method] = min(seconds[method], best_seconds(step, device, repeats=1))
    return {method: (seconds[method], memory[method]) for method in METHODS}


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
    """Log-log curves with their fitted slopes, one panel per size, one line per device."""
    figure, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.0))
    for axis, (name, values) in zip(axes, curves.items(), strict=True):
        for device, times in measured.items():
            fitted = slope(name, values, times[name])
            ms = [1e3 * t for t in times[name]]
            axis.loglog(values, ms, "o-", label=f"{device}: slope {fitted:.2f}")
        axis.set_xlabel(name if name != "side" else "image side (px)")
        axis.set_xticks(values, [str(v) for v in values])
        axis.minorticks_off()
        axis.legend(fontsize="small")
    axes[0].set_ylabel("OEM step (ms)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for CI smoke runs")
    parser.add_argument("--out", type=Path, default=None, help="Markdown file; PNG beside it")
    args = parser.parse_args()
    setup = QUICK_STEP if args.quick else STEP
    curves = QUICK_CURVES if args.quick else CURVES
    repeats = 1 if args.quick else 5
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    gpu_name = torch.cuda.get_device_name() if len(devices) > 1 else None

    steps = {device.type: step_rows(device, setup, repeats) for device in devices}
    blocks = {device.type: loss_block(device, repeats) for device in devices}
    measured = {device.type: scaling(device, curves, repeats) for device in devices}

    def gpu(text) -> str:
        return text() if gpu_name else "no GPU in this run"

    lines = [
        f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"GPU: {gpu_name or 'none available'}; torch {torch.__version__}.",
        "",
        f"Training step: {setup['arch']}/{setup['encoder']}, batch {setup['batch']} × "
        f"{setup['size']}², C={setup['num_classes']}, 4 clicks per image, the labelled and the "
        "confident unlabelled pixels (posterior >= 0.9) in the OEM fitting set, as in training.",
        "",
        "| measurement | CPU | GPU |",
        "|---|---|---|",
    ]
    base_cpu = steps["cpu"]["baseline"][0]
    for method in METHODS:
        seconds, memory = steps["cpu"][method]
        lines.append(
            f"| {method} step: time vs baseline, peak memory | {seconds / base_cpu:.2f}× "
            f"({1e3 * seconds:.0f} ms), {memory:.0f} MiB | "
            + gpu(
                lambda m=method: (
                    f"{steps['cuda'][m][0] / steps['cuda']['baseline'][0]:.2f}× "
                    f"({1e3 * steps['cuda'][m][0]:.1f} ms, "
                    f"{setup['batch'] / steps['cuda'][m][0]:.0f} images/s), "
                    f"{steps['cuda'][m][1]:.0f} MiB"
                )
            )
            + " |"
        )

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
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        plot(curves, measured, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
