"""Geometry between the scan grid and the model grids: reorientation, boxes, resampling.

Three grids meet here:

- the **scan grid**: the loaded series, axes in whatever order and sense DICOM gave them;
- the **canonical grid**: the same voxels with axes permuted and flipped into the canonical
  orientation of :mod:`appliance.volume` (no interpolation, so masks map back exactly);
- a **model grid** (:class:`Grid`): a box of the canonical grid resampled to the model's spacing.

Voxel-centre convention (used by every function here, so that going to the model grid and back
lands on the same place): along each axis, with ``r = dst_spacing / src_spacing`` (scan voxels per
model voxel), the centre of model voxel ``i`` sits at scan index::

    x(i) = box.start + (i + 0.5) * r - 0.5

i.e. the first model voxel's outer face coincides with the outer face of the box's first scan
voxel. Conversely a scan voxel ``x`` sits at model coordinate ``u(x) = (x - box.start + 0.5) / r
- 0.5``. The model grid keeps the model's spacing exactly; since its shape is rounded, its far
face may lie up to half a model voxel inside or outside the box. Values beyond the data are the
nearest edge value (clamped coordinates) in both directions.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from appliance.volume import CANONICAL_DIRECTION, Volume

MAX_OBLIQUE_DEG = 5.0
"""Largest angle between a scan axis and its canonical axis that :func:`to_canonical` accepts."""

_BOUNDARY = np.uint8(255)


# ----------------------------------------------------------------------------- reorientation


@dataclass(frozen=True)
class Reorientation:
    """How a scan grid maps onto the canonical grid: an axis permutation, then flips.

    Canonical axis ``k`` is scan axis ``perm[k]``, reversed when ``flip[k]``. Pure index
    shuffling, so :meth:`undo` is the exact inverse of :meth:`apply`.
    """

    perm: tuple[int, int, int] = (0, 1, 2)
    flip: tuple[bool, bool, bool] = (False, False, False)
    scan_shape: tuple[int, int, int] | None = None
    """Shape of the scan array, checked by :meth:`apply` and :meth:`undo` when known."""

    def __post_init__(self) -> None:
        if sorted(self.perm) != [0, 1, 2]:
            raise ValueError(f"`perm` must be a permutation of (0, 1, 2), got {self.perm}")
        if len(self.flip) != 3:
            raise ValueError(f"`flip` must have three entries, got {self.flip}")
        object.__setattr__(self, "perm", tuple(int(p) for p in self.perm))
        object.__setattr__(self, "flip", tuple(bool(f) for f in self.flip))

    @property
    def is_identity(self) -> bool:
        return self.perm == (0, 1, 2) and not any(self.flip)

    @property
    def canonical_shape(self) -> tuple[int, int, int] | None:
        if self.scan_shape is None:
            return None
        return tuple(self.scan_shape[p] for p in self.perm)  # type: ignore[return-value]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Scan grid -> canonical grid, for a 3D array or a 4D one with a leading channel axis.

        Returns a C-contiguous array; the input itself when the scan is already canonical.
        """
        lead = self._lead(array, self.scan_shape, "scan")
        if self.is_identity:
            return array
        out = np.transpose(array, tuple(range(lead)) + tuple(lead + p for p in self.perm))
        axes = tuple(lead + k for k in range(3) if self.flip[k])
        if axes:
            out = np.flip(out, axis=axes)
        return np.ascontiguousarray(out)

    def undo(self, array: np.ndarray) -> np.ndarray:
        """Canonical grid -> the scan's own grid (exact inverse of :meth:`apply`)."""
        lead = self._lead(array, self.canonical_shape, "canonical")
        if self.is_identity:
            return array
        axes = tuple(lead + k for k in range(3) if self.flip[k])
        out = np.flip(array, axis=axes) if axes else array
        inverse = tuple(int(k) for k in np.argsort(self.perm))
        out = np.transpose(out, tuple(range(lead)) + tuple(lead + k for k in inverse))
        return np.ascontiguousarray(out)

    @staticmethod
    def _lead(array: np.ndarray, shape: tuple[int, int, int] | None, grid: str) -> int:
        if not isinstance(array, np.ndarray):
            raise TypeError(f"`array` must be a numpy array, got {type(array).__name__}")
        if array.ndim not in (3, 4):
            raise ValueError(f"`array` must be 3D or 4D (channel first), got shape {array.shape}")
        lead = array.ndim - 3
        if shape is not None and array.shape[lead:] != tuple(shape):
            raise ValueError(
                f"`array` must have the {grid} grid's shape {tuple(shape)} in its last three "
                f"axes, got {array.shape}"
            )
        return lead


def to_canonical(
    volume: Volume, max_oblique_deg: float = MAX_OBLIQUE_DEG
) -> tuple[Volume, Reorientation]:
    """Permute and flip a volume's axes into the canonical orientation, without interpolation.

    The returned volume keeps the true geometry: its direction rows are the scan's own (so a
    slightly oblique scan stays slightly oblique) and its origin is the patient position of the
    voxel that became index (0, 0, 0). Refuses (ValueError) directions that are not within
    ``max_oblique_deg`` of an axis permutation: those would need interpolation.
    """
    d = np.asarray(volume.direction, dtype=float)
    norms = np.linalg.norm(d, axis=1)
    if np.any(np.abs(norms - 1.0) > 1e-3):
        raise ValueError(
            f"`volume.direction` rows must be unit vectors, got norms {norms.round(4)}"
        )
    # canonical axis k points along one patient axis (LPS component); invert that map
    canonical_axis_of_component = {int(np.argmax(np.abs(row))): k
                                   for k, row in enumerate(CANONICAL_DIRECTION)}
    perm = [-1, -1, -1]
    flip = [False, False, False]
    worst = 0.0
    for n, row in enumerate(d):
        j = int(np.argmax(np.abs(row)))
        k = canonical_axis_of_component[j]
        if perm[k] != -1:
            raise ValueError(
                f"`volume.direction` must map the array axes onto distinct patient axes, got "
                f"axes {perm[k]} and {n} both along patient axis {'xyz'[j]}: {d.round(3).tolist()}"
            )
        perm[k] = n
        flip[k] = bool(row[j] < 0)
        worst = max(worst, float(np.degrees(np.arccos(min(1.0, abs(row[j]) / norms[n])))))
    if worst > max_oblique_deg:
        raise ValueError(
            f"oblique scan: an image axis lies {worst:.1f} degrees from the nearest patient axis; "
            f"at most {max_oblique_deg:g} is accepted without resampling "
            f"(direction {d.round(3).tolist()})"
        )
    reo = Reorientation(tuple(perm), tuple(flip), volume.shape)  # type: ignore[arg-type]
    corner = [0.0, 0.0, 0.0]
    for k in range(3):
        if flip[k]:
            corner[perm[k]] = volume.shape[perm[k]] - 1
    origin = volume.position(tuple(corner))  # type: ignore[arg-type]
    direction = np.stack([d[perm[k]] * (-1.0 if flip[k] else 1.0) for k in range(3)])
    spacing = tuple(volume.spacing[p] for p in perm)
    canonical = Volume(reo.apply(volume.array), spacing, tuple(origin), direction)  # type: ignore[arg-type]
    return canonical, reo


# ----------------------------------------------------------------------------- boxes


def bounding_box(
    mask: np.ndarray, margin: int | Sequence[int] = (0, 0, 0)
) -> tuple[slice, slice, slice] | None:
    """Smallest box holding every True voxel, grown by ``margin`` voxels per axis and clipped to
    the array; None when the mask is empty."""
    if not isinstance(mask, np.ndarray) or mask.ndim != 3:
        raise ValueError(f"`mask` must be a 3D numpy array, got {_describe(mask)}")
    m = _three_ints(margin, "margin", minimum=0)
    mask = mask if mask.dtype == bool else mask != 0
    any_rows = mask.any(axis=0)  # (rows, columns): one full pass
    planes = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(axis=1))  # second pass
    if planes.size == 0:
        return None
    rows = np.flatnonzero(any_rows.any(axis=1))
    cols = np.flatnonzero(any_rows.any(axis=0))
    box = []
    for idx, grow, n in zip((planes, rows, cols), m, mask.shape, strict=True):
        box.append(slice(max(int(idx[0]) - grow, 0), min(int(idx[-1]) + 1 + grow, n)))
    return tuple(box)  # type: ignore[return-value]


def ball(radius_mm: float, spacing: tuple[float, float, float]) -> np.ndarray:
    """Boolean ball of `radius_mm` on a grid of `spacing` (z, y, x), at least one voxel each way."""
    r = [max(1, int(round(radius_mm / s))) for s in spacing]
    zz, yy, xx = np.ogrid[-r[0] : r[0] + 1, -r[1] : r[1] + 1, -r[2] : r[2] + 1]
    d = (zz * spacing[0]) ** 2 + (yy * spacing[1]) ** 2 + (xx * spacing[2]) ** 2
    return d <= radius_mm**2


def members(labels: np.ndarray, ids: Sequence[int] | np.ndarray, n_labels: int | None = None) -> np.ndarray:
    """Boolean mask of the voxels of an integer label map whose label is in ``ids``, through a
    lookup table: one gather, where np.isin sorts the whole array. ``n_labels`` (the largest
    label + 1, when the caller knows it) saves a pass over ``labels``."""
    ids = np.asarray(ids, dtype=np.int64).ravel()
    size = int(labels.max(initial=0)) + 1 if n_labels is None else int(n_labels)
    table = np.zeros(max(size, int(ids.max(initial=0)) + 1), dtype=bool)
    table[ids] = True
    return table[labels]


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"shape {value.shape}"
    return type(value).__name__


def _three_ints(value: int | Sequence[int], name: str, minimum: int) -> tuple[int, int, int]:
    if isinstance(value, (int, np.integer)):
        value = (int(value),) * 3
    try:
        out = tuple(int(v) for v in value)
        ok = len(out) == 3 and all(int(v) == v for v in value)
    except (TypeError, ValueError):
        ok = False
    if not ok or min(out) < minimum:
        raise ValueError(f"`{name}` must be three integers >= {minimum}, got {value!r}")
    return out  # type: ignore[return-value]


def _three_positive(value: Sequence[float], name: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(np.isfinite(v) and v > 0 for v in out):
        raise ValueError(f"`{name}` must be three positive numbers, got {value!r}")
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------- model grids


@dataclass(frozen=True)
class Grid:
    """A model grid laid over a box of the canonical scan grid (see the module docstring)."""

    box: tuple[slice, slice, slice]
    """The box in the canonical scan grid (unit-step slices with explicit bounds)."""
    src_spacing: tuple[float, float, float]
    """Scan spacing (mm)."""
    dst_spacing: tuple[float, float, float]
    """Model spacing (mm)."""
    shape: tuple[int, int, int]
    """Model-grid shape: round(box extent * src / dst), at least 1."""

    @property
    def box_shape(self) -> tuple[int, int, int]:
        return tuple(s.stop - s.start for s in self.box)  # type: ignore[return-value]

    @property
    def ratio(self) -> tuple[float, float, float]:
        """Scan voxels per model voxel along each axis (dst / src)."""
        return tuple(d / s for d, s in zip(self.dst_spacing, self.src_spacing, strict=True))  # type: ignore[return-value]

    def scan_coordinates(self, axis: int) -> np.ndarray:
        """Scan index (float64) of each model voxel centre along ``axis``."""
        r = self.ratio[axis]
        return self.box[axis].start + (np.arange(self.shape[axis]) + 0.5) * r - 0.5

    def model_coordinates(self, axis: int) -> np.ndarray:
        """Model coordinate (float64) of each scan voxel of the box along ``axis``."""
        r = self.ratio[axis]
        return (np.arange(self.box_shape[axis]) + 0.5) / r - 0.5


def make_grid(
    box: Sequence[slice], src_spacing: Sequence[float], dst_spacing: Sequence[float]
) -> Grid:
    """The model grid at ``dst_spacing`` over ``box`` of a scan at ``src_spacing``."""
    box = tuple(box)
    if len(box) != 3 or not all(isinstance(s, slice) for s in box):
        raise ValueError(f"`box` must be three slices, got {box!r}")
    for s in box:
        if (not isinstance(s.start, (int, np.integer)) or not isinstance(s.stop, (int, np.integer))
                or s.step not in (None, 1) or not 0 <= s.start < s.stop):
            raise ValueError(f"`box` must be unit-step slices with 0 <= start < stop, got {box!r}")
    box = tuple(slice(int(s.start), int(s.stop)) for s in box)
    src = _three_positive(src_spacing, "src_spacing")
    dst = _three_positive(dst_spacing, "dst_spacing")
    shape = tuple(
        max(1, int(np.floor((s.stop - s.start) * a / b + 0.5)))
        for s, a, b in zip(box, src, dst, strict=True)
    )
    return Grid(box, src, dst, shape)  # type: ignore[arg-type]


def _tent_integral(u: np.ndarray) -> np.ndarray:
    """Integral from -inf to u of the unit tent max(0, 1 - |t|)."""
    u = np.clip(u, -1.0, 1.0)
    return np.where(u < 0, 0.5 * (u + 1.0) ** 2, 1.0 - 0.5 * (1.0 - u) ** 2)


def _axis_weights(
    centres: np.ndarray, ratio: float, n: int, order: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (m, K) into an axis of length n and weights (m, K) summing to 1 per row.

    order 0: nearest. order 1: linear interpolation when upsampling (ratio <= 1); when
    downsampling, the linear interpolant averaged over a window of b = sqrt(ratio^2 - 1) scan
    voxels (a tent convolved with a box): continuous with linear interpolation at ratio 1,
    the same second moment as area averaging over the model voxel (OpenCV's INTER_AREA), and
    still exact on linear ramps away from the edges.
    """
    if order == 0:
        idx = np.clip(np.floor(centres + 0.5), 0, n - 1).astype(np.intp)[:, None]
        return idx, np.ones(idx.shape, np.float32)
    b = np.sqrt(max(ratio * ratio - 1.0, 0.0))
    if b < 1e-6:
        lo = np.floor(centres)
        frac = centres - lo
        j = lo[:, None] + np.arange(2)[None, :]
        w = np.stack([1.0 - frac, frac], axis=1)
    else:
        # the kernel's support is the open interval (c - b/2 - 1, c + b/2 + 1)
        first = np.floor(centres - b / 2 - 1.0) + 1.0
        j = first[:, None] + np.arange(int(np.ceil(b + 2.0)))[None, :]
        c = centres[:, None]
        w = (_tent_integral(c + b / 2 - j) - _tent_integral(c - b / 2 - j)) / b
    w /= w.sum(axis=1, keepdims=True)
    return np.clip(j, 0, n - 1).astype(np.intp), w.astype(np.float32)


def _resample_axis(x: np.ndarray, axis: int, idx: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted gather along one axis: out[..., i, ...] = sum_k w[i, k] * x[..., idx[i, k], ...]."""
    shape = [1] * x.ndim
    shape[axis] = idx.shape[0]
    out_shape = list(x.shape)
    out_shape[axis] = idx.shape[0]
    out = np.zeros(out_shape, np.float32)
    tmp = np.empty(out_shape, np.float32)
    gathered = np.empty(out_shape, x.dtype)
    for k in range(idx.shape[1]):
        np.take(x, idx[:, k], axis=axis, out=gathered)
        np.multiply(gathered, w[:, k].reshape(shape), out=tmp)
        out += tmp
    return out


def resample_image(image: np.ndarray, grid: Grid, order: int = 1) -> np.ndarray:
    """A canonical scan array (any real dtype) -> float32 array of ``grid.shape`` over grid.box.

    ``order=1`` is linear interpolation, anti-aliased when downsampling (see ``_axis_weights``);
    ``order=0`` is nearest neighbour (for label maps). Samples beyond the box use the scan's
    voxels there; beyond the array, the edge value.

    Separable, on the voxels the kernels reach, and plane by plane so that temporaries stay in
    cache: either each output plane is first mixed from its input planes (axis 0) and then
    resampled in-plane, or each input plane is resampled in-plane first and the small planes are
    mixed; whichever moves fewer values.
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise ValueError(f"`image` must be a 3D numpy array, got {_describe(image)}")
    if order not in (0, 1):
        raise ValueError(f"`order` must be 0 (nearest) or 1 (linear), got {order!r}")
    _check_box_inside(grid, image.shape, "image.shape")
    if image.dtype == bool:
        image = image.view(np.uint8)
    elif not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise TypeError(f"`image` must have a real numeric dtype, got {image.dtype}")
    weights = [_axis_weights(grid.scan_coordinates(a), grid.ratio[a], image.shape[a], order)
               for a in range(3)]
    # only the voxels the kernels reach (a view): a small box costs a small box
    reach = tuple(slice(int(idx.min()), int(idx.max()) + 1) for idx, _ in weights)
    image = image[reach]
    weights = [(idx - r.start, w) for (idx, w), r in zip(weights, reach, strict=True)]
    idx0, w0 = weights[0]
    # in-plane: the more shrinking axis first
    in_plane = sorted((1, 2), key=lambda a: grid.shape[a] / image.shape[a])

    def plane_resample(plane: np.ndarray) -> np.ndarray:
        for a in in_plane:
            plane = _resample_axis(plane, a - 1, *weights[a])
        return plane

    m0, n_plane = grid.shape[0], image.shape[1] * image.shape[2]
    used = np.unique(idx0)
    mix_first = m0 * idx0.shape[1] * n_plane + m0 * n_plane
    plane_first = used.size * n_plane + m0 * idx0.shape[1] * grid.shape[1] * grid.shape[2]
    out = np.empty(grid.shape, np.float32)
    if mix_first <= plane_first:
        mixed = np.empty(image.shape[1:], np.float32)
        tmp = np.empty(image.shape[1:], np.float32)
        for i in range(m0):
            np.multiply(image[idx0[i, 0]], w0[i, 0], out=mixed)
            for k in range(1, idx0.shape[1]):
                np.multiply(image[idx0[i, k]], w0[i, k], out=tmp)
                mixed += tmp
            out[i] = plane_resample(mixed)
    else:
        small = np.empty((image.shape[0],) + grid.shape[1:], np.float32)
        for j in used:
            small[j] = plane_resample(image[j])
        for i in range(m0):
            np.multiply(small[idx0[i, 0]], w0[i, 0], out=out[i])
            for k in range(1, idx0.shape[1]):
                out[i] += small[idx0[i, k]] * w0[i, k]
    return out


def _check_box_inside(grid: Grid, shape: Sequence[int], name: str) -> None:
    if len(shape) != 3 or any(s.stop > n for s, n in zip(grid.box, shape, strict=True)):
        raise ValueError(f"`{name}` must contain the grid's box {grid.box}, got {tuple(shape)}")


# ----------------------------------------------------------------------------- back to the scan


@dataclass(frozen=True)
class _AxisMap:
    """Per scan index of the box along one axis: the model cell (lower corner), its upper
    corner and the linear weight of the upper corner (clamped coordinates)."""

    lo: np.ndarray
    hi: np.ndarray
    w: np.ndarray


def _axis_map(u: np.ndarray, m: int) -> _AxisMap:
    u = np.clip(u, 0.0, m - 1)
    lo = np.minimum(np.floor(u), m - 1).astype(np.intp)
    hi = np.minimum(lo + 1, m - 1)
    return _AxisMap(lo, hi, (u - lo).astype(np.float32))


def labels_from_probabilities(
    probs: np.ndarray, grid: Grid, out_shape: Sequence[int]
) -> np.ndarray:
    """Model-grid class probabilities (C, *grid.shape) -> uint8 argmax labels on the canonical
    scan grid ``out_shape``, zeros outside ``grid.box``.

    Equal to trilinear upsampling of every class followed by argmax (clamped at the edges), but
    without ever holding (C, *out_shape): a scan voxel whose eight surrounding model voxels all
    have the same argmax label takes that label (a convex combination of vectors with the same
    largest component keeps it), so the labels of such "uniform cells" are upsampled by index
    gathers, and only voxels in mixed cells are trilinearly interpolated and compared. Voxels
    can differ from the full computation only at exact ties between classes.
    """
    if not isinstance(probs, np.ndarray) or probs.ndim != 4:
        raise ValueError(f"`probs` must be a 4D array (C, D, H, W), got {_describe(probs)}")
    if probs.shape[1:] != grid.shape:
        raise ValueError(f"`probs` must have shape (C, {grid.shape}), got {probs.shape}")
    n_classes = probs.shape[0]
    if not 1 <= n_classes <= 255:
        raise ValueError(f"`probs` must have 1 to 255 classes, got {n_classes}")
    out_shape = tuple(int(n) for n in out_shape)
    _check_box_inside(grid, out_shape, "out_shape")

    coarse = np.argmax(probs, axis=0).astype(np.uint8)
    m = grid.shape
    # cell (i, j, k) spans model voxels i..i+1 etc. (clamped at the far edge)
    padded = np.pad(coarse, [(0, 1)] * 3, mode="edge")
    uniform = np.ones(m, dtype=bool)
    for d in itertools.product((0, 1), repeat=3):
        if any(d):
            uniform &= padded[d[0]:d[0] + m[0], d[1]:d[1] + m[1], d[2]:d[2] + m[2]] == coarse
    cells = np.where(uniform, coarse, _BOUNDARY)

    maps = [_axis_map(grid.model_coordinates(a), m[a]) for a in range(3)]
    # gather along the last axis first so the final, largest gather copies whole planes
    box_labels = np.take(np.take(np.take(cells, maps[2].lo, axis=2), maps[1].lo, axis=1),
                         maps[0].lo, axis=0)
    mixed_planes = np.flatnonzero((cells == _BOUNDARY).any(axis=(1, 2)))
    if mixed_planes.size:
        _fill_boundary(box_labels, np.isin(maps[0].lo, mixed_planes), probs, maps)

    if box_labels.shape == out_shape:
        return box_labels
    out = np.zeros(out_shape, np.uint8)
    out[grid.box] = box_labels
    return out


def _fill_boundary(
    box_labels: np.ndarray, planes: np.ndarray, probs: np.ndarray, maps: list[_AxisMap]
) -> None:
    """In place: where ``box_labels`` holds the mixed-cell marker, trilinear interpolation of
    every class, then argmax. Plane by plane along axis 0 (only the ``planes`` flagged), which
    bounds memory by one plane: the two model planes around a scan plane are mixed once (all
    classes, channel last), then each voxel needs four gathers, not eight."""
    n_classes, m0, m1, m2 = probs.shape
    channel_last = np.ascontiguousarray(np.moveaxis(probs, 0, -1), dtype=np.float32)
    channel_last = channel_last.reshape(m0, m1 * m2, n_classes)
    mixed = np.empty((m1 * m2, n_classes), np.float32)
    lo1, hi1, w1 = maps[1].lo * m2, maps[1].hi * m2, maps[1].w
    lo2, hi2, w2 = maps[2].lo, maps[2].hi, maps[2].w
    for x0 in np.flatnonzero(planes):
        flat = box_labels[x0].reshape(-1)
        todo = np.flatnonzero(flat == _BOUNDARY)
        if todo.size == 0:
            continue
        lo, hi, w = maps[0].lo[x0], maps[0].hi[x0], maps[0].w[x0]
        np.multiply(channel_last[lo], 1.0 - w, out=mixed)
        if w > 0:
            mixed += channel_last[hi] * w
        x1, x2 = np.divmod(todo, box_labels.shape[2])
        a1, b1, v1 = lo1[x1], hi1[x1], w1[x1]
        a2, b2, v2 = lo2[x2], hi2[x2], w2[x2]
        u1, u2 = 1.0 - v1, 1.0 - v2
        acc = np.take(mixed, a1 + a2, axis=0)
        acc *= (u1 * u2)[:, None]
        for index, weight in ((a1 + b2, u1 * v2), (b1 + a2, v1 * u2), (b1 + b2, v1 * v2)):
            values = np.take(mixed, index, axis=0)
            values *= weight[:, None]
            acc += values
        flat[todo] = np.argmax(acc, axis=1)
