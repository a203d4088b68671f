"""Sliding-window inference on a model grid: plan the tiles, batch them, blend the outputs.

Models have static tile shapes (and, for TensorRT profiles, often a fixed batch size), while
volumes come in any shape. :func:`sliding_window` pads a volume that is smaller than a tile,
runs every planned tile through ``infer`` in batches of exactly ``batch_size`` (padding the last
batch with all-zero tiles whose outputs are dropped), and blends overlapping outputs with a
Gaussian (or constant) importance map: out = sum_t w_t * y_t / sum_t w_t per voxel. With a model
that works voxel by voxel the result therefore equals running it on the whole volume; with a
receptive field, tile borders (which lack context) weigh little, except where a tile touches the
volume's own edge: there its Gaussian is flat towards the edge, since no tile sees those voxels
with more context.
"""

from __future__ import annotations

import difflib
import enum
import math
from collections.abc import Callable, Sequence

import numpy as np

SIGMA_SCALE = 0.125
"""Gaussian blending: sigma as a fraction of the tile size (nnU-Net's and MONAI's choice)."""
MIN_WEIGHT = 1e-3
"""Gaussian blending: floor of each axis profile (see :func:`gaussian_importance`)."""

Infer = Callable[[np.ndarray], np.ndarray]
Tile = tuple[slice, slice, slice]


class Blend(enum.StrEnum):
    """How overlapping tile outputs are weighted."""

    GAUSSIAN = "gaussian"
    """Centre of a tile counts most (its border sees the least context)."""
    CONSTANT = "constant"
    """Every voxel of every tile counts the same."""

    @classmethod
    def parse(cls, value: str | Blend) -> Blend:
        if isinstance(value, Blend):
            return value
        if not isinstance(value, str):
            raise TypeError(f"`blend` must be a string, got {type(value).__name__}")
        try:
            return cls(value.lower())
        except ValueError:
            valid = [b.value for b in cls]
            near = difflib.get_close_matches(value.lower(), valid, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"`blend` must be one of {valid}, got {value!r}{hint}") from None


def _shape3(value: Sequence[int], name: str) -> tuple[int, int, int]:
    try:
        out = tuple(int(v) for v in value)
        ok = len(out) == 3 and all(o == v and o >= 1 for o, v in zip(out, value, strict=True))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"`{name}` must be three positive integers, got {value!r}")
    return out  # type: ignore[return-value]


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1


def _check_overlap(overlap: float) -> float:
    if not _is_number(overlap):
        raise TypeError(f"`overlap` must be a number, got {type(overlap).__name__}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"`overlap` must be in [0, 1), got {overlap}")
    return float(overlap)


def _check_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> None:
    if mask is None:
        return
    if not isinstance(mask, np.ndarray) or mask.dtype != bool:
        got = mask.dtype if isinstance(mask, np.ndarray) else type(mask).__name__
        raise TypeError(f"`mask` must be a boolean numpy array, got {got}")
    if mask.shape != tuple(shape):
        raise ValueError(f"`mask` must have the image's shape {tuple(shape)}, got {mask.shape}")


def _axis_starts(n: int, t: int, overlap: float) -> list[int]:
    """Tile starts along one axis: first at 0, last at n - t, evenly spread, steps at most
    t * (1 - overlap) (so neighbours overlap by at least ``overlap`` of a tile)."""
    if n <= t:
        return [0]
    step = max(t * (1.0 - overlap), 1.0)
    count = math.ceil((n - t) / step - 1e-9) + 1
    return sorted({int(round(s)) for s in np.linspace(0, n - t, count)})


def plan_tiles(
    shape: Sequence[int], tile: Sequence[int], overlap: float, mask: np.ndarray | None = None
) -> list[Tile]:
    """Tiles (as slices) whose union covers every voxel of ``shape``.

    Along an axis shorter than the tile there is one tile, ``slice(0, tile)``, reaching past the
    end: the caller pads (as :func:`sliding_window` does). With ``mask`` (boolean, of ``shape``),
    tiles holding no True voxel are left out.
    """
    shape, tile = _shape3(shape, "shape"), _shape3(tile, "tile")
    overlap = _check_overlap(overlap)
    _check_mask(mask, shape)
    starts = [_axis_starts(n, t, overlap) for n, t in zip(shape, tile, strict=True)]
    tiles = [
        (slice(a, a + tile[0]), slice(b, b + tile[1]), slice(c, c + tile[2]))
        for a in starts[0] for b in starts[1] for c in starts[2]
    ]
    if mask is None:
        return tiles
    if not mask.any():
        return []
    return [t for t in tiles if mask[t].any()]


def gaussian_importance(
    tile: Sequence[int], sigma_scale: float = 0.125, min_weight: float = 1e-3
) -> np.ndarray:
    """Blending weights for one tile: a Gaussian centred on the tile (sigma = sigma_scale *
    tile size per axis), peak 1, float32 of shape ``tile``.

    Each axis profile is floored at ``min_weight`` before the profiles are multiplied (so the
    smallest weight is ``min_weight ** 3``), which keeps every weight positive. Flooring the
    product instead would give every tile the same weight where the corners of tiles meet and
    undo the blending there.
    """
    tile = _shape3(tile, "tile")
    _check_importance(sigma_scale, min_weight)
    return _importance(tile, sigma_scale, min_weight, ((False, False),) * 3)


def _check_importance(sigma_scale: float, min_weight: float) -> None:
    if not _is_number(sigma_scale) or sigma_scale <= 0:
        raise ValueError(f"`sigma_scale` must be a positive number, got {sigma_scale!r}")
    if not _is_number(min_weight) or not 0 < min_weight <= 1:
        raise ValueError(f"`min_weight` must be in (0, 1], got {min_weight!r}")


def _importance(
    tile: tuple[int, int, int], sigma_scale: float, min_weight: float,
    open_edges: Sequence[tuple[bool, bool]],
) -> np.ndarray:
    """Gaussian weights; along an axis where the tile touches the volume's start (end), the half
    of the profile towards that edge is 1: no other tile sees those voxels with more context."""
    profiles = []
    for t, (at_start, at_end) in zip(tile, open_edges, strict=True):
        x = np.arange(t) - (t - 1) / 2.0
        p = np.exp(-0.5 * (x / (sigma_scale * t)) ** 2)
        p /= p.max()
        if at_start:
            p[x < 0] = 1.0
        if at_end:
            p[x > 0] = 1.0
        profiles.append(np.maximum(p, min_weight))
    w = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return w.astype(np.float32)


def sliding_window(
    image: np.ndarray,
    tile: Sequence[int],
    overlap: float,
    infer: Infer,
    n_classes: int,
    batch_size: int = 2,
    mask: np.ndarray | None = None,
    blend: str | Blend = "gaussian",
    pad_value: float = 0.0,
    progress: Callable[[int, int], None] | None = None,
    out_of_mask: np.ndarray | Sequence[float] | None = None,
) -> np.ndarray:
    """Run ``infer`` tile by tile over a 3D ``image``; (n_classes, *image.shape) float32 blend.

    ``infer`` takes (batch_size, 1, *tile) float32 and returns (batch_size, n_classes, *tile).
    Tiles without a True voxel of ``mask`` are skipped; voxels no tile covers get
    ``out_of_mask`` (one value per class, default zeros). ``progress(done, total)`` is called
    after each batch with tile counts.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        got = f"shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"`image` must be a 3D numpy array, got {got}")
    tile = _shape3(tile, "tile")
    overlap = _check_overlap(overlap)
    if not callable(infer):
        raise TypeError(f"`infer` must be callable, got {type(infer).__name__}")
    if not _is_count(n_classes):
        raise ValueError(f"`n_classes` must be a positive integer, got {n_classes!r}")
    if not _is_count(batch_size):
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
    _check_mask(mask, image.shape)
    mode = Blend.parse(blend)
    if not np.isfinite(pad_value):
        raise ValueError(f"`pad_value` must be a finite number, got {pad_value!r}")
    fill = np.zeros(n_classes, np.float32)
    if out_of_mask is not None:
        fill = np.asarray(out_of_mask, dtype=np.float32)
        if fill.shape != (n_classes,):
            raise ValueError(
                f"`out_of_mask` must have one value per class ({n_classes}), got shape {fill.shape}"
            )

    # pad (centred) to at least one tile along every axis
    shape = image.shape
    padded_shape = tuple(max(n, t) for n, t in zip(shape, tile, strict=True))
    before = tuple((p - n) // 2 for p, n in zip(padded_shape, shape, strict=True))
    inner = tuple(slice(b, b + n) for b, n in zip(before, shape, strict=True))
    if padded_shape == shape:
        source = image
        source_mask = mask
    else:
        source = np.full(padded_shape, pad_value, np.float32)
        source[inner] = image
        source_mask = None
        if mask is not None:
            source_mask = np.zeros(padded_shape, bool)
            source_mask[inner] = mask

    tiles = plan_tiles(padded_shape, tile, overlap, mask=source_mask)
    constant = np.ones(tile, np.float32)
    gaussians: dict[tuple[tuple[bool, bool], ...], np.ndarray] = {}

    def weights_for(t: Tile) -> np.ndarray:
        if mode is Blend.CONSTANT:
            return constant
        edges = tuple((s.start == 0, s.stop == n) for s, n in zip(t, padded_shape, strict=True))
        if edges not in gaussians:
            gaussians[edges] = _importance(tile, SIGMA_SCALE, MIN_WEIGHT, edges)
        return gaussians[edges]

    total = np.zeros((n_classes,) + padded_shape, np.float32)
    weight_sum = np.zeros(padded_shape, np.float32)
    batch = np.empty((batch_size, 1) + tile, np.float32)
    scaled = np.empty((n_classes,) + tile, np.float32)
    expected = (batch_size, n_classes) + tile

    for first in range(0, len(tiles), batch_size):
        group = tiles[first:first + batch_size]
        for i, t in enumerate(group):
            batch[i, 0] = source[t]
        batch[len(group):] = 0.0  # padding tiles: computed, then dropped
        out = np.asarray(infer(batch))
        if out.shape != expected:
            raise ValueError(f"`infer` must return shape {expected}, got {out.shape}")
        for i, t in enumerate(group):
            weights = weights_for(t)
            if mode is Blend.GAUSSIAN:
                np.multiply(out[i], weights, out=scaled)
                total[(slice(None),) + t] += scaled
            else:
                total[(slice(None),) + t] += out[i]
            weight_sum[t] += weights
        if progress is not None:
            progress(first + len(group), len(tiles))

    covered = weight_sum > 0
    np.divide(total, weight_sum, out=total, where=covered)
    if not covered.all():
        total[:, ~covered] = fill[:, None]
    if padded_shape == shape:
        return total
    return np.ascontiguousarray(total[(slice(None),) + inner])
