"""Quantification exactly as the result contract in DESIGN.md: volumes, PLO, severity."""

from __future__ import annotations

import math

import numpy as np

from appliance.labels import LEFT_LOBES, RIGHT_LOBES, Lobe, Opacity
from appliance.pipeline.geometry import bounding_box

CHUNK_VOXELS = 1 << 22
REGIONS = ("whole", "right", "left", "RUL", "RML", "RLL", "LUL", "LLL")
SEVERITY_BOUNDS = ((5.0, True), (25.0, False), (50.0, True), (75.0, False))
"""Pan et al. bands above the involvement minimum: (upper bound, bound belongs to the lower band)."""


def lobe_severity(plo_pct: float | None, involvement_min_pct: float = 0.1) -> int:
    """Pan et al. (Radiology 2020) lobe score: 0 below the involvement minimum, 1 below 5%,
    2 for 5-25% inclusive, 3 above 25 and below 50, 4 for 50-75% inclusive, 5 above 75."""
    if plo_pct is None or plo_pct < involvement_min_pct:
        return 0
    if plo_pct < 5.0:
        return 1
    if plo_pct <= 25.0:
        return 2
    if plo_pct < 50.0:
        return 3
    if plo_pct <= 75.0:
        return 4
    return 5


def _region_fields(
    lung_n: int, ggo_n: int, cons_n: int, hu_sum: float | None, voxel_ml: float
) -> dict[str, float | None]:
    lung_ml = lung_n * voxel_ml
    ggo_ml = ggo_n * voxel_ml
    cons_ml = cons_n * voxel_ml
    opacity_ml = ggo_ml + cons_ml

    def pct(part: float) -> float | None:
        return 100.0 * part / lung_ml if lung_ml > 0 else None

    mean_hu = hu_sum / lung_n if (hu_sum is not None and lung_n > 0) else None
    return {
        "lung_ml": lung_ml,
        "opacity_ml": opacity_ml,
        "ggo_ml": ggo_ml,
        "consolidation_ml": cons_ml,
        "plo_pct": pct(opacity_ml),
        "ggo_pct": pct(ggo_ml),
        "consolidation_pct": pct(cons_ml),
        "mean_lung_hu": mean_hu,
    }


def quantify(
    lobes: np.ndarray,
    opacity: np.ndarray,
    voxel_ml: float,
    hu: np.ndarray | None = None,
    involvement_min_pct: float = 0.1,
) -> dict:
    """Per lobe, per side and whole lung figures plus the CT severity score (0-25).

    `lobes` holds labels 0-5, `opacity` 0-2; opacity outside the lobes is ignored (opacity exists
    only inside the lungs). Volumes are voxel counts times `voxel_ml`.
    """
    if lobes.shape != opacity.shape:
        raise ValueError(f"`opacity` must have the shape of `lobes` {lobes.shape}, got {opacity.shape}")
    if hu is not None and hu.shape != lobes.shape:
        raise ValueError(f"`hu` must have the shape of `lobes` {lobes.shape}, got {hu.shape}")
    if not (voxel_ml > 0 and math.isfinite(voxel_ml)):
        raise ValueError(f"`voxel_ml` must be a positive number, got {voxel_ml}")
    if lobes.max(initial=0) > max(Lobe) or opacity.max(initial=0) > max(Opacity):
        raise ValueError("`lobes` must hold labels 0-5 and `opacity` labels 0-2")
    # Only the lung box counts (label 0 is never reported): a fraction of the scan.
    box = bounding_box(lobes, margin=0) if lobes.ndim == 3 else None
    if box is None:
        box = (slice(None),) * lobes.ndim
    lob = lobes[box].ravel().astype(np.uint8, copy=False)
    opa = opacity[box].ravel().astype(np.uint8, copy=False)
    # One pass over the voxels, in chunks so a 300x512x512 scan needs no int64/float64 copies.
    counts = np.zeros(18, dtype=np.int64)
    hu_sums = np.zeros(6, dtype=np.float64) if hu is not None else None
    hu_flat = hu[box].ravel() if hu is not None else None
    for start in range(0, lob.size, CHUNK_VOXELS):
        sl = slice(start, start + CHUNK_VOXELS)
        pair = lob[sl] * np.uint8(3) + opa[sl]
        counts += np.bincount(pair, minlength=18)
        if hu_sums is not None:
            hu_sums += np.bincount(lob[sl], weights=hu_flat[sl], minlength=6)
    counts = counts.reshape(6, 3)

    def fields(labels: tuple[int, ...]) -> dict:
        idx = list(labels)
        c = counts[idx].sum(axis=0)
        hs = float(hu_sums[idx].sum()) if hu_sums is not None else None
        return _region_fields(int(c.sum()), int(c[1]), int(c[2]), hs, voxel_ml)

    regions: dict[str, dict] = {
        "whole": fields(tuple(int(lb) for lb in Lobe)),
        "right": fields(tuple(int(lb) for lb in RIGHT_LOBES)),
        "left": fields(tuple(int(lb) for lb in LEFT_LOBES)),
    }
    score = 0
    for lobe in Lobe:
        r = fields((int(lobe),))
        r["severity"] = lobe_severity(r["plo_pct"], involvement_min_pct)
        score += r["severity"]
        regions[lobe.name] = r
    return {"regions": regions, "severity_score": score}
