"""Sliding-window tiling: plans cover the volume, a per-voxel model gives the whole-volume answer
whatever the shape, overlap, blend and batch size, batch padding never leaks, masks skip tiles."""

import itertools
import math

import numpy as np
import pytest
from scipy import ndimage

from appliance.pipeline.tiling import gaussian_importance, plan_tiles, sliding_window

TILE = (16, 16, 16)
SHAPES = [
    (37, 45, 29),  # no axis divides by the tile
    (32, 48, 16),  # every axis divides
    (7, 9, 5),  # smaller than a tile on every axis
    (20, 11, 40),  # smaller on one axis only
]


def per_voxel(batch: np.ndarray) -> np.ndarray:
    """A fake model that works voxel by voxel: x -> [x + 1, 2x]."""
    x = batch[:, 0]
    return np.stack([x + 1.0, 2.0 * x], axis=1)


def whole_volume(image: np.ndarray) -> np.ndarray:
    return np.stack([image + 1.0, 2.0 * image]).astype(np.float32)


def coverage(shape, tiles) -> np.ndarray:
    count = np.zeros(shape, int)
    for t in tiles:
        count[t] += 1
    return count


def random_image(shape, seed=0, low=1.0, high=2.0) -> np.ndarray:
    """Values in [low, high): never zero, so an all-zero tile can only be batch padding."""
    return np.random.default_rng(seed).uniform(low, high, shape).astype(np.float32)


# ----------------------------------------------------------------------------- plans


@pytest.mark.parametrize("shape", SHAPES + [(16, 16, 16), (17, 100, 33)])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_plan_covers_every_voxel_with_the_asked_overlap(shape, overlap):
    tiles = plan_tiles(shape, TILE, overlap)
    padded = tuple(max(n, t) for n, t in zip(shape, TILE, strict=True))
    assert coverage(padded, tiles).min() >= 1
    for axis, (n, t) in enumerate(zip(shape, TILE, strict=True)):
        starts = sorted({tl[axis].start for tl in tiles})
        assert starts[0] == 0
        assert all(tl[axis].stop - tl[axis].start == t for tl in tiles)
        if n <= t:
            assert starts == [0]
            continue
        assert starts[-1] == n - t  # the last tile ends at the edge, not past it
        steps = np.diff(starts)
        assert steps.max() <= math.ceil(t * (1 - overlap))  # neighbours overlap enough
        assert steps.max() - steps.min() <= 1  # evenly spread


def test_plan_without_overlap_on_a_dividing_shape_tiles_exactly():
    tiles = plan_tiles((32, 48, 16), TILE, 0.0)
    assert len(tiles) == 2 * 3 * 1
    assert coverage((32, 48, 16), tiles).max() == 1


def test_plan_with_mask_keeps_only_tiles_with_a_true_voxel():
    shape = (40, 40, 40)
    mask = np.zeros(shape, bool)
    mask[3, 5, 7] = True
    everything = plan_tiles(shape, TILE, 0.5)
    kept = plan_tiles(shape, TILE, 0.5, mask=mask)
    assert 0 < len(kept) < len(everything)
    assert kept == [t for t in everything if mask[t].any()]
    assert plan_tiles(shape, TILE, 0.5, mask=np.zeros(shape, bool)) == []


# ----------------------------------------------------------------------------- importance map


def test_gaussian_importance_peaks_in_the_centre_and_stays_positive():
    w = gaussian_importance((16, 20, 9), sigma_scale=0.125, min_weight=1e-3)
    assert w.shape == (16, 20, 9) and w.dtype == np.float32
    assert w.max() == pytest.approx(1.0, abs=0.02)
    assert np.unravel_index(np.argmax(w), w.shape) in itertools.product((7, 8), (9, 10), (4,))
    assert w.min() >= 1e-9 * 0.999  # each axis profile is floored at min_weight
    np.testing.assert_allclose(w, w[::-1, ::-1, ::-1], rtol=1e-6)  # symmetric
    assert w[0, 10, 4] < 0.01 < w[4, 10, 4]


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("blend", ["gaussian", "constant"])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_per_voxel_model_gives_the_whole_volume_answer(shape, overlap, blend, batch_size):
    image = random_image(shape)
    out = sliding_window(image, TILE, overlap, per_voxel, 2, batch_size=batch_size, blend=blend)
    assert out.shape == (2,) + shape and out.dtype == np.float32
    np.testing.assert_allclose(out, whole_volume(image), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 5, 8])
def test_batches_are_always_full_and_their_padding_never_leaks(batch_size):
    """The model returns NaN for all-zero tiles (batch padding); the image has no zero."""
    image = random_image((37, 45, 29), seed=1)
    seen_batches = []

    def garbage_for_padding(batch):
        seen_batches.append(batch.shape)
        out = per_voxel(batch)
        padding = ~batch.reshape(batch.shape[0], -1).any(axis=1)
        out[padding] = np.nan
        return out

    out = sliding_window(image, TILE, 0.25, garbage_for_padding, 2, batch_size=batch_size)
    n_tiles = len(plan_tiles(image.shape, TILE, 0.25))
    assert n_tiles % batch_size or batch_size == 1  # 36 tiles: the last batch really is padded
    assert seen_batches == [(batch_size, 1) + TILE] * math.ceil(n_tiles / batch_size)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, whole_volume(image), rtol=1e-5, atol=1e-6)


def test_small_volume_is_padded_with_pad_value_and_cropped_back():
    image = random_image((7, 20, 5), seed=2)
    seen = []

    def record(batch):
        seen.append(batch.copy())
        return per_voxel(batch)

    out = sliding_window(image, TILE, 0.5, record, 2, batch_size=1, pad_value=-7.0)
    assert out.shape == (2, 7, 20, 5)
    np.testing.assert_allclose(out, whole_volume(image), rtol=1e-5)
    tiles = np.concatenate(seen)
    assert (tiles == -7.0).any()  # the padding reached the model ...
    assert np.isin(image, tiles).all()  # ... and every voxel of the image did too


def test_progress_counts_tiles_up_to_the_total():
    calls = []
    image = random_image((37, 45, 29))
    sliding_window(image, TILE, 0.5, per_voxel, 2, batch_size=4,
                   progress=lambda done, total: calls.append((done, total)))
    total = len(plan_tiles(image.shape, TILE, 0.5))
    assert calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted({d for d, _ in calls})
    assert len(calls) == math.ceil(total / 4)


# ----------------------------------------------------------------------------- receptive field


def mean3(batch: np.ndarray) -> np.ndarray:
    """A model with a receptive field: the 3x3x3 mean (edges repeated) of each tile."""
    return np.stack([ndimage.uniform_filter(tile[0], 3, mode="nearest") for tile in batch])[:, None]


def test_receptive_field_error_is_small_and_shrinks_with_overlap():
    """Unit-variance white noise through a 3x3x3 mean: with Gaussian blending the largest
    deviation from the whole-volume answer is under 0.02 at overlap 0.25 and under 0.003 from
    overlap 0.5 on (it is 0.5 at overlap 0, where tile borders have no neighbour to lean on)."""
    image = np.random.default_rng(3).normal(size=(40, 52, 45)).astype(np.float32)
    whole = ndimage.uniform_filter(image, 3, mode="nearest")
    errors = {}
    for overlap in (0.0, 0.25, 0.5, 0.75):
        out = sliding_window(image, TILE, overlap, mean3, 1, batch_size=2)[0]
        errors[overlap] = float(np.abs(out - whole).max())
    assert errors[0.25] < 0.02
    assert errors[0.5] < 0.003 and errors[0.75] < 0.003
    assert errors[0.0] > errors[0.25] > errors[0.5]
    assert errors[0.75] <= errors[0.5] * 1.1
    # constant blending averages tile borders in with full weight: worse at every overlap
    for overlap in (0.25, 0.5):
        out = sliding_window(image, TILE, overlap, mean3, 1, blend="constant")[0]
        assert np.abs(out - whole).max() > 10 * errors[overlap]


# ----------------------------------------------------------------------------- masks


def test_mask_skips_tiles_and_fills_uncovered_voxels_with_out_of_mask():
    shape = (48, 48, 48)
    image = random_image(shape, seed=4)
    mask = np.zeros(shape, bool)
    mask[2:10, 3:12, 30:40] = True
    calls = []

    def counting(batch):
        calls.append(1)
        return per_voxel(batch)

    fill = np.array([1.0, 0.0], np.float32)
    out = sliding_window(image, TILE, 0.0, counting, 2, batch_size=1, mask=mask, out_of_mask=fill)
    kept = plan_tiles(shape, TILE, 0.0, mask=mask)
    assert len(calls) == len(kept) < len(plan_tiles(shape, TILE, 0.0))
    covered = coverage(shape, kept) > 0
    assert covered[mask].all()
    expected = whole_volume(image)
    np.testing.assert_allclose(out[:, covered], expected[:, covered], rtol=1e-5)
    assert (out[0, ~covered] == 1.0).all() and (out[1, ~covered] == 0.0).all()
    # default: zeros; an empty mask runs no tile at all
    out = sliding_window(image, TILE, 0.0, counting, 2, mask=np.zeros(shape, bool))
    assert len(calls) == len(kept) and not out.any()


def test_mask_on_a_volume_smaller_than_the_tile():
    image = random_image((5, 30, 7), seed=5)
    mask = np.zeros(image.shape, bool)
    mask[1, 2, 3] = True
    out = sliding_window(image, TILE, 0.5, per_voxel, 2, mask=mask)
    covered = out.any(axis=0)
    assert covered[mask].all() and not covered.all()
    np.testing.assert_allclose(out[:, covered], whole_volume(image)[:, covered], rtol=1e-5)


# ----------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"overlap": 1.2}, ValueError, r"`overlap` must be in \[0, 1\), got 1.2"),
        ({"overlap": -0.1}, ValueError, r"`overlap` must be in \[0, 1\), got -0.1"),
        ({"overlap": "half"}, TypeError, r"`overlap` must be a number, got str"),
        ({"tile": (16, 16)}, ValueError, r"`tile` must be three positive integers, got \(16, 16\)"),
        ({"tile": (16, 0, 16)}, ValueError, r"`tile` must be three positive integers"),
        ({"tile": (16, 8.5, 16)}, ValueError, r"`tile` must be three positive integers"),
        ({"blend": "gausian"}, ValueError, r"`blend` must be one of \['gaussian', 'constant'\], "
                                           r"got 'gausian' \(did you mean 'gaussian'\?\)"),
        ({"blend": "median"}, ValueError, r"`blend` must be one of \[.*\], got 'median'$"),
        ({"n_classes": 0}, ValueError, r"`n_classes` must be a positive integer, got 0"),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be a positive integer, got 0"),
        ({"mask": np.ones((4, 4, 4), bool)}, ValueError, r"`mask` must have the image's shape"),
        ({"mask": np.ones((20, 20, 20), np.uint8)}, TypeError,
         r"`mask` must be a boolean numpy array, got uint8"),
        ({"out_of_mask": [1.0]}, ValueError, r"`out_of_mask` must have one value per class \(2\)"),
        ({"infer": "model"}, TypeError, r"`infer` must be callable"),
        ({"infer": lambda b: b}, ValueError, r"`infer` must return shape \(2, 2, 16, 16, 16\), "
                                             r"got \(2, 1, 16, 16, 16\)"),
    ],
)
def test_sliding_window_argument_errors(kwargs, error, match):
    args = {"image": random_image((20, 20, 20)), "tile": TILE, "overlap": 0.5, "infer": per_voxel,
            "n_classes": 2}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        sliding_window(**args)


def test_plan_and_importance_argument_errors():
    with pytest.raises(ValueError, match=r"`shape` must be three positive integers"):
        plan_tiles((10, 10), TILE, 0.5)
    with pytest.raises(ValueError, match=r"`overlap` must be in \[0, 1\), got 1.0"):
        plan_tiles((10, 10, 10), TILE, 1.0)
    with pytest.raises(ValueError, match=r"`mask` must have the image's shape \(10, 10, 10\)"):
        plan_tiles((10, 10, 10), TILE, 0.5, mask=np.ones((10, 10, 9), bool))
    with pytest.raises(ValueError, match=r"`sigma_scale` must be a positive number, got 0"):
        gaussian_importance(TILE, sigma_scale=0)
    with pytest.raises(ValueError, match=r"`min_weight` must be in \(0, 1\], got 0"):
        gaussian_importance(TILE, min_weight=0)


# ----------------------------------------------------------------------------- model-grid size


def test_model_grid_sized_volume_with_a_batch_of_four():
    """The lobe stage's size: a (100, 120, 120) grid, 64^3 tiles at overlap 0.5."""
    image = random_image((100, 120, 120), seed=6)
    tile = (64, 64, 64)
    out = sliding_window(image, tile, 0.5, per_voxel, 2, batch_size=4)
    np.testing.assert_allclose(out, whole_volume(image), rtol=1e-5, atol=1e-6)
