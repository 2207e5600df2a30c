"""The kernel block's pixel terms compiled by torch.compile against the eager ones.

The compiled tests compile a handful of small graphs (seconds each on a CPU); the shapes are just
large enough for several bands of rows, with a shorter last band, as in training.
"""

import os
import shutil
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from helpers import tiny_data, tiny_network
from test_cvpr_losses import box_case, make_case
from torch._dynamo.utils import counters

from agmm_lightning.agmm import AGMMModel, bands, cvpr, cvpr_agmm_losses
from agmm_lightning.agmm.bands import AUTO_MIN_ELEMENTS, EAGER, band_functions, fused_pixel_terms
from agmm_lightning.errors import InputError

needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler for Inductor"
)
KERNEL_TERMS = ("gmm_to_pred", "label_to_gmm", "separation")
ALL_TERMS = ("seg", *KERNEL_TERMS, "absent")


def run_losses(mode, features, logits, target, num_classes, terms, **kwargs):
    """The losses under ``mode`` and the gradients of a weighted sum of ``terms`` (plus the cell
    logits against fixed weights, if returned) with respect to the features and the logits."""
    features = features.detach().clone().requires_grad_()
    logits = logits.detach().clone().requires_grad_()
    with fused_pixel_terms(mode):
        losses = cvpr_agmm_losses(features, logits, target, num_classes, **kwargs)
    total = sum((index + 1) * losses[name] for index, name in enumerate(terms))
    if "cell_logits" in losses:
        cells = losses["cell_logits"]
        weights = torch.randn(cells.shape, generator=torch.Generator().manual_seed(0))
        total = total + (cells * weights).sum()
    total.backward()
    return losses, features.grad, logits.grad


def assert_compiled_equals_eager(*args, logit_tolerance, **kwargs):
    """Equal losses and feature gradients to float32 tolerance, and logit gradients within
    ``logit_tolerance`` (they are about 1e-6: the losses average over every pixel)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager fails the test
        compiled = run_losses("compile", *args, **kwargs)
    assert bands._COMPILED.functions is not None and not bands._COMPILED.failed
    eager = run_losses("eager", *args, **kwargs)
    (ours, our_features, our_logits), (theirs, their_features, their_logits) = compiled, eager
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(our_features, their_features, rtol=1e-5, atol=1e-7)
    assert our_logits.dtype == their_logits.dtype
    torch.testing.assert_close(our_logits, their_logits, **logit_tolerance)


def several_bands(logits: torch.Tensor, multiple: int = 1) -> bool:
    rows = cvpr._row_chunks(logits, multiple)
    return len(rows) > 1 and rows[-1].stop - rows[-1].start < rows[0].stop - rows[0].start


def clicks_case():
    """Clicks and random tags in float32, with the logits averaged per 8-pixel feature cell."""
    features, logits, target = make_case(0, 2, 4, (41, 41), (328, 328), 5, "clicks")
    assert several_bands(logits, multiple=8)
    tags = (torch.rand(2, 5, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    options = {"image_classes": tags, "with_cell_logits": True}
    return features.float(), logits.float(), target, 5, options


def boxes_case():
    """bfloat16 logits under mixed precision, per-pixel forbidden classes and kept parts."""
    features, logits, target, allowed = box_case(label_size=(384, 384), feat_size=(48, 48))
    assert several_bands(logits)
    tags = allowed.flatten(2).any(2).float()
    options = {"image_classes": tags, "allowed": allowed}
    return features.float(), logits.bfloat16(), target, 4, options


FLOAT32_LOGITS = {"rtol": 1e-5, "atol": 1e-11}
# Both paths round float32 gradients equal to float tolerance to bfloat16, whose unit in the last
# place is up to 2**-7 of a value: rtol as torch's default for bfloat16.
BFLOAT16_LOGITS = {"rtol": 1.6e-2, "atol": 1e-10}


@needs_compiler
@pytest.mark.parametrize(
    ("case", "terms", "logit_tolerance"),
    [
        (clicks_case, ALL_TERMS, FLOAT32_LOGITS),
        # OEM mode backpropagates only the kernel terms and the cell logits: no absent gradient.
        (clicks_case, KERNEL_TERMS, FLOAT32_LOGITS),
        (boxes_case, ALL_TERMS, BFLOAT16_LOGITS),
    ],
    ids=["float32_all_terms", "float32_oem_terms", "bfloat16_boxes"],
)
def test_compiled_equals_eager(case, terms, logit_tolerance):
    features, logits, target, num_classes, options = case()
    assert_compiled_equals_eager(
        features, logits, target, num_classes, terms, logit_tolerance=logit_tolerance, **options
    )


def test_auto_compiles_large_logits_on_a_cpu_only():
    assert band_functions(torch.empty(AUTO_MIN_ELEMENTS - 1)) is EAGER
    assert band_functions(torch.empty(AUTO_MIN_ELEMENTS)) is not EAGER
    assert band_functions(torch.empty(AUTO_MIN_ELEMENTS, device="meta")) is EAGER
    with fused_pixel_terms("eager"):
        assert band_functions(torch.empty(AUTO_MIN_ELEMENTS)) is EAGER
    with fused_pixel_terms("compile"):
        assert band_functions(torch.empty(1)) is not EAGER
    assert band_functions(torch.empty(1)) is EAGER  # the context is left as it was


def test_unknown_mode_is_an_input_error():
    with pytest.raises(InputError, match="fused"), fused_pixel_terms("fast"):  # type: ignore[arg-type]
        pass
    with pytest.raises(InputError, match="fused"):
        AGMMModel(torch.nn.Identity(), 3, "cvpr", fused="fast")  # type: ignore[arg-type]


FALLBACK = """
import warnings
import torch
from test_cvpr_losses import make_case
from agmm_lightning.agmm import cvpr_agmm_losses
from agmm_lightning.agmm.bands import fused_pixel_terms

features, logits, target = make_case(0, 2, 4, (6, 6), (11, 11), 3, "clicks")
results = {}
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    for mode in ("compile", "compile", "eager"):
        with fused_pixel_terms(mode):
            losses = cvpr_agmm_losses(features, logits, target, 3)
        (gradient,) = torch.autograd.grad(losses["total"], logits)
        results.setdefault(mode, []).append((losses["total"], gradient))
messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
assert len(messages) == 1 and "could not be compiled" in messages[0], messages
for total, gradient in results["compile"]:
    assert torch.equal(total, results["eager"][0][0])
    assert torch.equal(gradient, results["eager"][0][1])
print("fell back")
"""


def test_without_a_compiler_warns_once_and_runs_eagerly(tmp_path):
    # A fresh process with no C++ compiler to find and an empty Inductor cache to read from.
    env = os.environ | {
        "CXX": str(tmp_path / "no-such-compiler"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "PYTHONPATH": os.path.dirname(__file__),
    }
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FALLBACK)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "fell back" in result.stdout


@needs_compiler
@pytest.mark.parametrize("method", ["cvpr", "agmm"])
def test_the_model_compiles_its_pixel_terms_only_when_fused_says(method):
    """``AGMMModel(fused=...)`` decides the path of its own losses: compiled frames appear with
    ``"compile"`` and none with ``"eager"`` (nor with ``"auto"`` at this small size)."""
    batch = next(iter(tiny_data(augment=False).train_dataloader()))
    compiled = {}
    for fused in ("eager", "auto", "compile"):
        model = AGMMModel(tiny_network(), 6, method, fused=fused)
        before = counters["frames"]["ok"]
        sum(model.losses(batch)[0].terms.values()).backward()
        compiled[fused] = counters["frames"]["ok"] > before
    assert compiled == {"eager": False, "auto": False, "compile": True}
