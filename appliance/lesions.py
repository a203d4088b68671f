"""COVID-19 pneumonia lesions: one model for phantoms and for insertion into real scans.

A patient's disease is a set of lesions (ellipsoids flattened against the pleura, with irregular
margins from a smooth random field) and a course in days. Everything is planned on a coarse
*lattice* of the lungs (about 3.5 mm; a lung mask, the distance to the pleura and, when known,
the lobes) and interpolated to the scan grid, so a phantom has the same lesions at every grid.

* Placement follows the radiology of COVID-19 pneumonia: bilateral, multifocal, peripheral and
  subpleural, posterior (dependent) and lower-lobe predominant.
* Extent: a level field ``D = max_i(f_i + b_i(t)) + noise``; the threshold is chosen so that
  the lesions cover the whole-lung percentage of opacification (PLO) drawn for the severity
  (the paper's clinical types: ``mild`` has no CT findings, like ``none``; moderate 1-10 %,
  severe 15-45 %, critical 35-65 %). The deepest part of the lesions, a share that grows
  towards the peak of the illness, is consolidation.
* Course (``day`` after the baseline scan): extent rises to a peak about 13 days after symptom
  onset and then resolves; lesions appear, grow and merge, consolidate near the peak, turn
  back to ground glass and shrink or vanish later. Crazy paving (reticulation over ground glass)
  is strongest in the progressive phase.
* Density: ground glass -790 to -360 HU with a mottled texture, vessels still visible through
  it (denser voxels are left alone); consolidation -70 to +40 HU with air bronchograms (airway
  lumens keep their air).

:func:`insert_lesions` applies the model to a real scan: only voxels inside the returned label
mask change, and every labelled voxel lies inside the given lung mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SEVERITIES = ("none", "mild", "moderate", "severe", "critical")
PLO_RANGE_PCT: dict[str, tuple[float, float]] = {
    "none": (0.0, 0.0),
    "mild": (0.0, 0.0),
    "moderate": (1.0, 10.0),
    "severe": (15.0, 45.0),
    "critical": (35.0, 65.0),
}
"""Whole-lung PLO at the baseline scan (day 0) per clinical type."""
CONSOLIDATION_PEAK_SHARE: dict[str, tuple[float, float]] = {
    "moderate": (0.10, 0.30),
    "severe": (0.25, 0.45),
    "critical": (0.35, 0.55),
}
"""Share of the opacity that is consolidation at the peak of the illness."""
LESION_COUNT: dict[str, tuple[int, int]] = {
    "moderate": (2, 6),
    "severe": (6, 13),
    "critical": (10, 20),
}
LESION_RADIUS_MM: dict[str, tuple[float, float]] = {
    "moderate": (10.0, 30.0),
    "severe": (18.0, 45.0),
    "critical": (25.0, 60.0),
}
LOBE_WEIGHT = np.array([0.0, 0.7, 0.55, 1.5, 0.8, 1.5])
"""Relative chance of a lesion per lobe label (lower lobes predominate)."""
LATTICE_MM = 3.5
"""Spacing of the planning lattice."""
MAX_PLO_PCT = 85.0
HU_TOP = 60.0
"""Voxels at or above this are left alone (vessels, walls); the shift fades in below it."""
GGO_FAINT_HU, GGO_DENSE_HU = -720.0, -380.0
"""Ground-glass core density of the faintest and the densest lesions."""
GGO_EDGE_SHARE = 0.25
"""At the labelled margin a lesion adds this share of its core density (margins are hazy)."""
CONS_LOW_HU, CONS_HIGH_HU = -80.0, 35.0
DENSITY_RANGE: dict[str, tuple[float, float]] = {
    "moderate": (0.0, 0.6),
    "severe": (0.15, 0.85),
    "critical": (0.3, 1.0),
}
"""Per-lesion density (0 faintest, 1 densest ground glass) per clinical type."""

_TAG_LESIONS = 5


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, *keys]))


def _check_severity(severity: object) -> str:
    if severity not in SEVERITIES:
        raise ValueError(f"`severity` must be one of {SEVERITIES}, got {severity!r}")
    return str(severity)


# ============================================================================ course


@dataclass(frozen=True)
class Course:
    """The disease over time for one patient (days; day 0 is the baseline scan)."""

    severity: str
    onset_days: float
    """Days from symptom onset to the baseline scan."""
    peak_days: float
    """Days from symptom onset to the largest extent (about 13)."""
    baseline_plo_pct: float
    consolidation_peak: float
    sharpness: float = 1.2

    def days_since_onset(self, day: float) -> float:
        return self.onset_days + float(day)

    def _h(self, t: float) -> float:
        x = max(t, 0.05) / self.peak_days
        return x**self.sharpness * math.exp(self.sharpness * (1.0 - x))

    def plo_pct(self, day: float) -> float:
        """Target whole-lung PLO on ``day`` (0 for none/mild)."""
        if self.baseline_plo_pct <= 0:
            return 0.0
        t = self.days_since_onset(day)
        return min(MAX_PLO_PCT, self.baseline_plo_pct * self._h(t) / self._h(self.onset_days))

    def consolidation_share(self, day: float) -> float:
        t = self.days_since_onset(day)
        return self.consolidation_peak * (
            0.15 + 0.85 * math.exp(-(((t - self.peak_days - 1.0) / 7.0) ** 2))
        )

    def crazy_paving(self, day: float) -> float:
        """Strength of crazy paving: the progressive phase (about days 5-13)."""
        t = self.days_since_onset(day)
        return math.exp(-(((t - 9.0) / 5.0) ** 2))


def disease_course(seed: int, severity: str) -> Course:
    """The course drawn for (seed, severity)."""
    severity = _check_severity(severity)
    r = _rng(seed, _TAG_LESIONS, 1, SEVERITIES.index(severity))
    lo, hi = PLO_RANGE_PCT[severity]
    plo = float(r.uniform(lo, hi)) if hi > 0 else 0.0
    c_lo, c_hi = CONSOLIDATION_PEAK_SHARE.get(severity, (0.0, 0.0))
    return Course(
        severity=severity,
        onset_days=float(r.uniform(3.0, 8.0)),
        peak_days=float(r.uniform(11.0, 15.0)),
        baseline_plo_pct=plo,
        consolidation_peak=float(r.uniform(c_lo, c_hi)) if c_hi > 0 else 0.0,
    )


# ============================================================================ lattice and field


@dataclass(frozen=True)
class Lattice:
    """The lungs on a coarse grid: point (i, j, k) sits at origin + (i, j, k) * step (mm, z y x),
    axis 0 towards the head, axis 1 towards the back (canonical orientation)."""

    origin: tuple[float, float, float]
    step: tuple[float, float, float]
    lung: np.ndarray
    """bool"""
    pleura_mm: np.ndarray
    """distance to the lung boundary (mm), 0 outside the lung"""
    lobes: np.ndarray | None = None
    """uint8 0-5 when known (phantoms)"""
    baseline_hu: np.ndarray | None = None
    """normal parenchyma HU around each point (real scans); None for phantoms"""

    def coords(self, axis: int) -> np.ndarray:
        return self.origin[axis] + np.arange(self.lung.shape[axis]) * self.step[axis]


@dataclass(frozen=True)
class Lesion:
    centre: tuple[float, float, float]
    """mm (z, y, x) in the lattice's frame"""
    radii: tuple[float, float, float]
    axes: tuple[tuple[float, float, float], ...]
    """unit vectors of the three radii (rows)"""
    onset: float
    """days since symptom onset"""
    peak: float
    crazy: bool


class LesionField:
    """The lesions of one patient on one day, sampled on any grid in the lattice's frame.

    Channels on the lattice: 0 level (> 0 inside a lesion), 1 core (> 0 consolidation),
    2 texture, 3 reticulation field (crazy paving where it crosses 0), 4 crazy-paving weight,
    5 density of the lesion (0-1), 6 baseline HU (real scans only).
    """

    def __init__(
        self,
        lattice: Lattice,
        data: np.ndarray,
        box: tuple[np.ndarray, np.ndarray],
        lesions: tuple[Lesion, ...],
        plo_pct: float,
        consolidation_share: float,
    ) -> None:
        self.lattice = lattice
        self.data = data
        self.lo = np.asarray(lattice.origin, dtype=np.float64)
        self.step = np.asarray(lattice.step, dtype=np.float64)
        self.box_lo, self.box_hi = box
        self.lesions = lesions
        self.plo_pct = plo_pct
        self.consolidation_share = consolidation_share

    def block_range(self, axis: int, coords: np.ndarray) -> tuple[int, int]:
        """Index range of sorted ``coords`` that can hold lesions along ``axis``."""
        a = int(np.searchsorted(coords, self.box_lo[axis]))
        b = int(np.searchsorted(coords, self.box_hi[axis], side="right"))
        return a, max(a, b)

    def apply(
        self,
        hu: np.ndarray,
        lung: np.ndarray,
        z: np.ndarray,
        y: np.ndarray,
        x: np.ndarray,
        *,
        baseline: np.ndarray | float | None = None,
        air: np.ndarray | None = None,
    ) -> np.ndarray:
        """Change ``hu`` (float32 block, in place) inside the lesions that lie in ``lung`` and
        return their labels (uint8 0-2). ``z, y, x`` are the block's coordinates (mm, sorted),
        ``baseline`` the normal parenchyma HU (default: the lattice's estimate), ``air`` the
        airway lumen occupancy 0-1 (air bronchograms keep it)."""
        labels = np.zeros(hu.shape, np.uint8)
        rz = self.block_range(0, z)
        ry = self.block_range(1, y)
        rx = self.block_range(2, x)
        if rz[1] <= rz[0] or ry[1] <= ry[0] or rx[1] <= rx[0]:
            return labels
        sl = (slice(*rz), slice(*ry), slice(*rx))
        lung_b = lung[sl]
        if not lung_b.any():
            return labels
        ch = _interp3(self.data, self.lo, self.step, z[sl[0]], y[sl[1]], x[sl[2]])
        level = ch[0]
        inside = (level > 0) & lung_b
        if not inside.any():
            return labels
        f32 = np.float32
        lev = level[inside]
        core = ch[1][inside]
        tex = ch[2][inside]
        ret = ch[3][inside]
        crazy = ch[4][inside]
        dens = ch[5][inside]
        if baseline is None:
            base = ch[6][inside] if self.data.shape[0] > 6 else np.full(lev.shape, f32(-860.0))
        elif np.isscalar(baseline):
            base = np.full(lev.shape, f32(baseline))
        else:
            base = np.broadcast_to(baseline, hu.shape)[sl][inside].astype(np.float32)
        # ground glass: hazy margin, patchy (lobular) density, per-lesion strength, crazy paving
        ramp = _ramp(lev)
        t_core = f32(GGO_FAINT_HU) + f32(GGO_DENSE_HU - GGO_FAINT_HU) * dens
        t_ggo = _ground_glass(base, t_core, ramp, tex)
        septa = np.exp(-((ret / f32(0.16)) ** 2)) * crazy
        t_ggo = t_ggo + f32(260.0) * septa * (f32(0.3) + f32(0.7) * ramp)
        c_ramp = np.clip(core / f32(0.08), 0.0, 1.0)
        t_cons = f32(CONS_LOW_HU) + f32(CONS_HIGH_HU - CONS_LOW_HU) * c_ramp + f32(20.0) * tex
        mix = np.clip(core / f32(0.02) + f32(0.5), 0.0, 1.0)
        target = t_ggo + (t_cons - t_ggo) * mix
        block = hu[sl]
        old = block[inside]
        # vessels and walls (denser than the target) stay visible: the shift fades towards HU_TOP
        shift = _vessel_kept_shift(old, base, target)
        if air is not None:
            shift *= f32(1.0) - np.broadcast_to(air, hu.shape)[sl][inside].astype(np.float32)
        block[inside] = old + np.maximum(shift, f32(0.0))
        lab = np.where(core > 0, np.uint8(2), np.uint8(1))
        labels[sl][inside] = lab
        return labels


def _ramp(level):
    """0 at a lesion's labelled margin, 1 from 0.3 inside it (a hazy edge)."""
    return np.clip(level / 0.3, 0.0, 1.0) ** 0.8


def _ground_glass(base, core, ramp, texture):
    """Ground-glass HU: GGO_EDGE_SHARE of the core density at the margin, patchy (lobular)."""
    patch = 0.72 + 0.28 * np.tanh(1.6 * texture)
    return base + (core - base) * (GGO_EDGE_SHARE + (1.0 - GGO_EDGE_SHARE) * ramp) * patch


def _vessel_kept_shift(old, base, target):
    """The HU to add: vessels and walls (denser than the target) stay visible, as the shift
    fades towards HU_TOP."""
    return (target - base) * np.clip((HU_TOP - old) / (HU_TOP - base), 0.0, 1.0)


def _interp_weights(c: np.ndarray, lo: float, step: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    f = (np.asarray(c, dtype=np.float64) - lo) / step
    i = np.clip(np.floor(f).astype(np.int64), 0, max(n - 2, 0))
    w = np.clip(f - i, 0.0, 1.0).astype(np.float32)
    if n < 2:
        return i, np.zeros_like(w)
    return i, w


def _interp3(data: np.ndarray, lo, step, z, y, x) -> np.ndarray:
    """Separable linear interpolation of ``data`` (C, nz, ny, nx) at the grid z x y x x."""
    iz, wz = _interp_weights(z, lo[0], step[0], data.shape[1])
    jz = np.minimum(iz + 1, data.shape[1] - 1)
    a = data[:, iz] * (1 - wz)[None, :, None, None] + data[:, jz] * wz[None, :, None, None]
    iy, wy = _interp_weights(y, lo[1], step[1], data.shape[2])
    jy = np.minimum(iy + 1, data.shape[2] - 1)
    a = a[:, :, iy] * (1 - wy)[None, None, :, None] + a[:, :, jy] * wy[None, None, :, None]
    ix, wx = _interp_weights(x, lo[2], step[2], data.shape[3])
    jx = np.minimum(ix + 1, data.shape[3] - 1)
    return a[..., ix] * (1 - wx) + a[..., jx] * wx


# ============================================================================ planning


def _smooth_noise(r: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    n = r.standard_normal(shape).astype(np.float32)
    n = ndimage.gaussian_filter(n, sigma, mode="nearest")
    return n / (n.std() + 1e-6)


def _draw_lesions(
    r: np.random.Generator, lat: Lattice, severity: str, course: Course
) -> list[Lesion]:
    """Centres weighted towards the pleura, the back and the lower lobes; both lungs."""
    idx = np.argwhere(lat.lung)
    if len(idx) == 0:
        return []
    pos = np.asarray(lat.origin) + idx * np.asarray(lat.step)
    d = lat.pleura_mm[lat.lung]
    # posterior (axis 1 grows backwards), inferior (axis 0 grows upwards), within the lungs
    span = np.maximum(pos.max(0) - pos.min(0), 1.0)
    rel = (pos - pos.min(0)) / span
    # peripheral: near the costal pleura and away from the midline (not the mediastinal pleura)
    mid = np.median(pos[:, 2])
    lateral = np.abs(pos[:, 2] - mid) / max(float(np.abs(pos[:, 2] - mid).max()), 1.0)
    w = np.exp(-d / 9.0) * np.exp(1.4 * rel[:, 1]) * np.exp(1.5 * lateral)
    if lat.lobes is not None:
        w *= LOBE_WEIGHT[lat.lobes[lat.lung]]
        right = np.isin(lat.lobes[lat.lung], (1, 2, 3))
    else:
        w *= np.exp(-1.3 * rel[:, 0])
        right = pos[:, 2] < np.median(pos[:, 2])
    w = np.where(d < 1.0, w * 0.3, w)
    lo, hi = LESION_COUNT[severity]
    n = int(r.integers(lo, hi + 1))
    r_lo, r_hi = LESION_RADIUS_MM[severity]
    sides = r.random(n) < 0.5
    if n >= 2 and r.random() < 0.85:  # bilateral
        sides[0], sides[1] = True, False
    grad = np.stack(np.gradient(lat.pleura_mm, *lat.step), axis=-1)
    out = []
    t0 = course.onset_days
    for i in range(n):
        pick = right == bool(sides[i])
        if not pick.any():
            pick = np.ones_like(right)
        wi = np.where(pick, w, 0.0)
        k = int(r.choice(len(wi), p=wi / wi.sum()))
        c = pos[k] + r.uniform(-0.5, 0.5, 3) * np.asarray(lat.step)
        normal = grad[tuple(idx[k])]
        nn = float(np.linalg.norm(normal))
        normal = normal / nn if nn > 1e-6 else np.array([0.0, 1.0, 0.0])
        a1 = np.cross(normal, [1.0, 0.0, 0.0])
        if np.linalg.norm(a1) < 0.1:
            a1 = np.cross(normal, [0.0, 1.0, 0.0])
        a1 /= np.linalg.norm(a1)
        a2 = np.cross(normal, a1)
        ang = r.uniform(0, math.pi)
        a1, a2 = math.cos(ang) * a1 + math.sin(ang) * a2, -math.sin(ang) * a1 + math.cos(ang) * a2
        rad = math.exp(r.uniform(math.log(r_lo), math.log(r_hi)))
        radii = (rad, rad * r.uniform(0.6, 1.1), rad * r.uniform(0.4, 0.7))
        late = r.random() < 0.3
        onset = (
            r.uniform(t0 + 1.0, course.peak_days) if late else r.uniform(0.0, max(t0 - 1.0, 0.5))
        )
        out.append(
            Lesion(
                tuple(c),
                radii,
                (tuple(a1), tuple(a2), tuple(normal)),
                onset,
                course.peak_days + r.normal(0, 2.0),
                bool(r.random() < 0.5),
            )
        )
    return out


def _activity(les: Lesion, t: float) -> float | None:
    """Offset b_i(t) of a lesion's level (None when absent on that day)."""
    if t <= les.onset:
        return None
    span = max(les.peak - les.onset, 2.0)
    x = (t - les.onset) / span
    h = x * math.exp(1.0 - x)
    if h < 0.15:
        return None
    return 0.35 * math.log(h)


def plan(seed: int, severity: str, lattice: Lattice, day: int = 0) -> LesionField | None:
    """The lesions of (seed, severity) on ``day`` over ``lattice``; None when there are none."""
    severity = _check_severity(severity)
    course = disease_course(seed, severity)
    target = course.plo_pct(day)
    if target <= 0 or not lattice.lung.any():
        return None
    r = _rng(seed, _TAG_LESIONS, 2, SEVERITIES.index(severity))
    lesions = _draw_lesions(r, lattice, severity, course)
    t = course.days_since_onset(day)
    shape = lattice.lung.shape
    noise_sigma = 6.0 / float(np.mean(lattice.step))
    margin = _smooth_noise(r, shape, noise_sigma)
    texture = _smooth_noise(r, shape, 1.0)
    reticulation = _smooth_noise(r, shape, 2.2 / float(np.mean(lattice.step)) * 1.6)
    level = np.full(shape, -10.0, np.float32)
    crazy_w = np.zeros(shape, np.float32)
    density = np.zeros(shape, np.float32)
    d_lo, d_hi = DENSITY_RANGE[severity]
    strength = r.uniform(d_lo, d_hi, len(lesions)).astype(np.float32)
    growth = min(
        1.0, max(0.0, (t - course.onset_days) / max(course.peak_days - course.onset_days, 1.0))
    )
    coords = [lattice.coords(i) for i in range(3)]
    for i, les in enumerate(lesions):
        b = _activity(les, t)
        if b is None:
            continue
        # over the whole lattice: the threshold may reach far from the centres
        dz = (coords[0] - les.centre[0])[:, None, None].astype(np.float32)
        dy = (coords[1] - les.centre[1])[None, :, None].astype(np.float32)
        dx = (coords[2] - les.centre[2])[None, None, :].astype(np.float32)
        acc = None
        for ax, rad in zip(les.axes, les.radii, strict=True):
            u = (
                dz * np.float32(ax[0] / rad)
                + dy * np.float32(ax[1] / rad)
                + dx * np.float32(ax[2] / rad)
            )
            acc = u * u if acc is None else acc + u * u
        f = np.float32(1.0 + b) - np.sqrt(acc)
        # lesions get denser towards the peak of the illness
        d_i = np.float32(min(1.0, strength[i] + 0.3 * growth))
        np.copyto(density, d_i, where=f > level)
        np.maximum(level, f, out=level)
        if les.crazy:
            np.maximum(crazy_w, np.clip(f + np.float32(0.5), 0.0, 1.0), out=crazy_w)
    level += 0.28 * margin
    vals = level[lattice.lung]
    tau = float(np.quantile(vals, 1.0 - target / 100.0))
    level -= tau
    share = course.consolidation_share(day)
    inside = level[lattice.lung]
    inside = inside[inside > 0]
    if len(inside) == 0:
        return None
    # consolidation: the deep, dependent and subpleural parts of the lesions, irregular
    pleura = np.clip(1.0 - lattice.pleura_mm / 15.0, 0.0, 1.0).astype(np.float32)
    back = np.linspace(0.0, 1.0, shape[1], dtype=np.float32)[None, :, None]
    core_f = level + 0.18 * _smooth_noise(r, shape, noise_sigma * 0.7) + 0.08 * pleura + 0.06 * back
    in_core = core_f[lattice.lung & (level > 0)]
    delta = float(np.quantile(in_core, 1.0 - share)) if share > 0 else float(in_core.max() + 1.0)
    core = np.minimum(core_f - delta, level)
    crazy = crazy_w * np.float32(course.crazy_paving(day))
    chans = [level, core, texture, reticulation, crazy, density]
    if lattice.baseline_hu is not None:
        chans.append(lattice.baseline_hu.astype(np.float32))
    data = np.stack(chans).astype(np.float32)
    # bounding box of the lesions (mm), one lattice step of margin for the interpolation
    pos = np.argwhere(level > 0)
    if len(pos) == 0:
        return None
    step = np.asarray(lattice.step)
    lo = np.asarray(lattice.origin) + (pos.min(0) - 1) * step
    hi = np.asarray(lattice.origin) + (pos.max(0) + 1) * step
    return LesionField(lattice, data, (lo, hi), tuple(lesions), target, share)


# ============================================================================ real scans


def lung_mask(hu: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Lung mask of a real scan: the project's classical mask (HU threshold + morphology)."""
    from appliance.pipeline.classical import lung_mask as classical

    return classical(hu, spacing)


def real_lattice(hu: np.ndarray, lung: np.ndarray, spacing: tuple[float, float, float]) -> Lattice:
    """Lattice of a real scan's lungs (index-space millimetres: voxel (0,0,0) at 0)."""
    f = [max(1, int(round(LATTICE_MM / s))) for s in spacing]
    shape = [int(math.ceil(n / k)) for n, k in zip(lung.shape, f, strict=True)]
    pad = [(0, sh * k - n) for sh, k, n in zip(shape, f, lung.shape, strict=True)]
    lp = np.pad(lung.astype(np.float32), pad)
    blocks = lp.reshape(shape[0], f[0], shape[1], f[1], shape[2], f[2])
    frac = blocks.mean(axis=(1, 3, 5))
    lat_lung = frac >= 0.5
    step = tuple(float(k * s) for k, s in zip(f, spacing, strict=True))
    origin = tuple(float((k - 1) / 2.0 * s) for k, s in zip(f, spacing, strict=True))
    pleura = ndimage.distance_transform_edt(lat_lung, sampling=step).astype(np.float32)
    # normal parenchyma around each point: mean of lung HU clipped to the aerated range
    hp = np.pad(np.clip(hu.astype(np.float32), -1000.0, -700.0) * lung, pad)
    sums = hp.reshape(shape[0], f[0], shape[1], f[1], shape[2], f[2]).sum(axis=(1, 3, 5))
    counts = blocks.sum(axis=(1, 3, 5))
    num = ndimage.gaussian_filter(sums, 2.0)
    den = ndimage.gaussian_filter(counts, 2.0)
    glob = float(np.median(np.clip(hu[lung], -1000, -700))) if lung.any() else -860.0
    base = np.where(den > 0.5, num / np.maximum(den, 1e-6), glob).astype(np.float32)
    return Lattice(origin, step, lat_lung, pleura, None, base)


def insert_lesions(
    hu: np.ndarray,
    lung: np.ndarray,
    spacing,
    *,
    seed: int,
    severity: str,
    lobes: np.ndarray | None = None,
    day: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Lesions of (seed, severity, day) placed inside ``lung`` of a scan in canonical orientation.

    Returns (new hu, opacity labels 0-2). Only voxels with a label change; labels lie inside
    ``lung``. ``lobes`` (0-5), when given, steer the lesions towards the lower lobes. The input
    is not modified; the output has its dtype (integers are rounded).
    """
    severity = _check_severity(severity)
    if not isinstance(hu, np.ndarray) or hu.ndim != 3:
        raise ValueError(f"`hu` must be a 3D array, got {getattr(hu, 'shape', type(hu).__name__)}")
    if not isinstance(lung, np.ndarray) or lung.shape != hu.shape:
        raise ValueError(
            f"`lung` must be an array of shape {hu.shape}, got {getattr(lung, 'shape', None)}"
        )
    if lobes is not None and (not isinstance(lobes, np.ndarray) or lobes.shape != hu.shape):
        raise ValueError(f"`lobes` must be None or an array of shape {hu.shape}")
    sp = tuple(float(s) for s in spacing)
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"`spacing` must be three positive numbers, got {spacing!r}")
    if isinstance(day, bool) or not isinstance(day, (int, np.integer)) or day < 0:
        raise ValueError(f"`day` must be a non-negative int, got {day!r}")
    lung = lung.astype(bool, copy=False)
    labels = np.zeros(hu.shape, np.uint8)
    new = hu.copy()
    lat = real_lattice(hu, lung, sp)
    if lobes is not None:
        lat = _with_lobes(lat, lobes, sp)
    field = plan(int(seed), severity, lat, day)
    if field is None:
        return new, labels
    z = np.arange(hu.shape[0]) * sp[0]
    y = np.arange(hu.shape[1]) * sp[1]
    x = np.arange(hu.shape[2]) * sp[2]
    k0, k1 = field.block_range(0, z)
    step = max(1, int(2**20 // (hu.shape[1] * hu.shape[2])))
    for a in range(k0, k1, step):
        b = min(k1, a + step)
        block = hu[a:b].astype(np.float32)
        air = np.clip((np.float32(-930.0) - block) / np.float32(50.0), 0.0, 1.0)
        lab = field.apply(block, lung[a:b], z[a:b], y, x, air=air)
        m = lab > 0
        if not m.any():
            continue
        labels[a:b] = lab
        vals = block[m]
        if np.issubdtype(hu.dtype, np.integer):
            info = np.iinfo(hu.dtype)
            vals = np.clip(np.rint(vals), info.min, info.max)
        new[a:b][m] = vals.astype(hu.dtype)
    return new, labels


def _with_lobes(lat: Lattice, lobes: np.ndarray, spacing) -> Lattice:
    f = [max(1, int(round(lat.step[i] / spacing[i]))) for i in range(3)]
    sub = lobes[f[0] // 2 :: f[0], f[1] // 2 :: f[1], f[2] // 2 :: f[2]]
    sub = sub[: lat.lung.shape[0], : lat.lung.shape[1], : lat.lung.shape[2]]
    full = np.zeros(lat.lung.shape, np.uint8)
    full[: sub.shape[0], : sub.shape[1], : sub.shape[2]] = sub
    full = np.where(lat.lung, full, 0).astype(np.uint8)
    return Lattice(lat.origin, lat.step, lat.lung, lat.pleura_mm, full, lat.baseline_hu)


# ============================================================================ phantoms


def phantom_lattice(
    lung_sdf_grid, lo: tuple[float, float, float], hi: tuple[float, float, float]
) -> Lattice:
    """Lattice for a phantom from its analytic lung: ``lung_sdf_grid(z, y, x) -> (sdf, lobes)`` on
    the grid of three 1D axes, over the box ``lo``-``hi`` (mm, z y x, patient frame)."""
    step = (LATTICE_MM,) * 3
    shape = tuple(int(math.ceil((b - a) / LATTICE_MM)) + 1 for a, b in zip(lo, hi, strict=True))
    axes = [lo[i] + np.arange(shape[i]) * LATTICE_MM for i in range(3)]
    sdf, lobes = lung_sdf_grid(*axes)
    lung = sdf < 0
    return Lattice(
        tuple(float(v) for v in lo),
        step,
        lung,
        np.where(lung, -sdf, 0).astype(np.float32),
        lobes.astype(np.uint8),
        None,
    )


# ============================================================================ small nodules

# The lesions above are large subpleural patches (radius 10-60 mm): the typical COVID-19
# pattern. Early and mild disease also shows small (5-20 mm) round ground-glass nodules away
# from the pleura; with none of them in training, opacity 0.4.0 gave a clearly visible 12 mm
# nodule of about -400 HU a foreground probability under 1% (covid-P001's right upper lobe,
# MODEL_CARD.md). The opacity training stream adds them to a share of its sources
# (`export.train --nodules`) and the evaluation inserts them into a held-out real scan; the
# phantoms themselves are unchanged. Same ground-glass model as LesionField.apply: a core
# between the faintest and densest ground glass, a hazy labelled margin at GGO_EDGE_SHARE of
# the core density, a patchy texture, vessels left visible.
NODULE_COUNT = (1, 6)
NODULE_RADIUS_MM = (2.5, 10.0)
"""Radius range (log-uniform): 5-20 mm nodules."""
PARENCHYMA_HU = -860.0
"""Normal lung density when the neighbourhood has no aerated voxel to measure it from."""


def add_nodules(rng: np.random.Generator, hu: np.ndarray, label: np.ndarray, lung: np.ndarray,
                spacing: tuple[float, float, float], count: tuple[int, int] = NODULE_COUNT,
                radius_mm: tuple[float, float] = NODULE_RADIUS_MM, ids: np.ndarray | None = None) -> int:
    """In place: add ground-glass nodules (label 1) inside ``lung`` where ``label`` is still 0.
    Returns the number of voxels labelled; ``ids``, when given, gets each nodule's number (1, 2,
    ...): vessels that are not ``lung`` can cut one nodule into several pieces."""
    candidates = np.flatnonzero(lung & (label == 0))
    if not candidates.size:
        return 0
    sp = np.asarray(spacing, dtype=np.float64)
    added = 0
    for number in range(1, int(rng.integers(count[0], count[1] + 1)) + 1):
        centre = np.array(np.unravel_index(candidates[rng.integers(candidates.size)], hu.shape))
        radius = float(np.exp(rng.uniform(np.log(radius_mm[0]), np.log(radius_mm[1]))))
        radii_vox = radius * rng.uniform(0.8, 1.2, 3) / sp
        half = np.ceil(1.3 * radii_vox).astype(int) + 1
        lo = np.maximum(centre - half, 0)
        hi = np.minimum(centre + half + 1, hu.shape)
        box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        grids = np.ogrid[box]
        dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii_vox, strict=True))
        shape = dist.shape
        # irregular margin and lobular texture: smooth random fields over the box
        margin = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5, mode="nearest")
        margin /= max(float(margin.std()), 1e-6)
        texture = ndimage.gaussian_filter(rng.standard_normal(shape), 1.0, mode="nearest")
        texture /= max(float(texture.std()), 1e-6)
        level = 1.0 - np.sqrt(dist) * (1.0 + 0.12 * margin)
        inside = (level > 0) & lung[box] & (label[box] == 0)
        if not inside.any():
            continue
        block = hu[box].astype(np.float32)
        aerated = block[lung[box] & (block < -600)]
        base = float(np.median(aerated)) if aerated.size else PARENCHYMA_HU
        core = rng.uniform(GGO_FAINT_HU, GGO_DENSE_HU)
        target = _ground_glass(base, core, _ramp(level), texture)
        shifted = block + np.maximum(_vessel_kept_shift(block, base, target), 0.0)
        block = np.where(inside, shifted, block)
        hu[box] = np.rint(block).astype(hu.dtype)
        label[box][inside] = 1
        if ids is not None:
            ids[box][inside] = number
        added += int(inside.sum())
    return added
