"""Sliding-window and multi-scale + flip inference (METHOD §6)."""

import pytest
import torch
import torch.nn.functional as F

from agmm_lightning.inference import infer_logits, sliding_window_logits


def blur(images):
    """A model whose output at a pixel depends on its neighbours (so windows matter)."""
    return F.avg_pool2d(images, 5, stride=1, padding=2, count_include_pad=False)


def reference_sliding_window(logits_fn, images, tile, stride):
    """One window at a time, written out plainly."""
    height, width = images.shape[-2:]
    tops = sorted({*range(0, max(height - tile, 0), stride), max(height - tile, 0)})
    lefts = sorted({*range(0, max(width - tile, 0), stride), max(width - tile, 0)})
    total = torch.zeros_like(images)
    count = torch.zeros_like(images[:, :1])
    for top in tops:
        for left in lefts:
            window = (..., slice(top, top + tile), slice(left, left + tile))
            total[window] += logits_fn(images[window])
            count[window] += 1
    return total / count


@pytest.mark.parametrize(("size", "tile", "stride"), [((37, 70), 16, 11), ((20, 64), 32, 32)])
def test_batched_windows_equal_one_window_at_a_time(size, tile, stride):
    images = torch.randn(2, 3, *size)
    expected = reference_sliding_window(blur, images, tile, stride)
    torch.testing.assert_close(sliding_window_logits(blur, images, tile, stride), expected)


def test_windows_are_run_in_batches():
    calls = []

    def counting(images):
        calls.append(images.shape[0])
        return images

    sliding_window_logits(counting, torch.randn(2, 3, 64, 64), tile=16, stride=16)
    assert sum(calls) == 2 * 16 and max(calls) > 2  # 16 windows, several per forward pass


def test_a_pointwise_model_gives_the_whole_image_result():
    images = torch.randn(1, 3, 50, 41)
    torch.testing.assert_close(sliding_window_logits(torch.tanh, images, 16, 7), images.tanh())
    flipped = infer_logits(torch.tanh, images, tile=16, stride=7, flip=True)
    torch.testing.assert_close(flipped, images.tanh())


def test_a_stride_beyond_the_tile_is_refused():
    with pytest.raises(ValueError, match="1 <= stride <= tile"):
        sliding_window_logits(torch.tanh, torch.randn(1, 3, 32, 32), tile=8, stride=9)
