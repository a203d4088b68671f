"""Classical HU-threshold second opinion: a lung mask and an opacity estimate without any model.

Used by QA (CLASSICAL_DISAGREEMENT), by the "no lungs found" refusal, and as the lung-boundary
reference on real scans that have no manual masks. Works on any grid; callers that only need
volumes pass a downsampled image (about 1.5-2 mm) to keep it fast.
"""

from __future__ import annotations

import cc3d
import numpy as np
from scipy import ndimage

from appliance.pipeline.geometry import ball, members

AIR_THRESHOLD_HU = -400.0
"""Lung parenchyma is below this; soft tissue and bone are above."""
GGO_RANGE_HU = (-750.0, -300.0)
CONSOLIDATION_RANGE_HU = (-300.0, 100.0)
SECOND_LUNG_MIN_FRACTION = 0.15
"""A second air component counts as a lung when at least this fraction of the largest one."""


def lung_mask(
    hu: np.ndarray, spacing: tuple[float, float, float], *, min_component_ml: float = 50.0
) -> np.ndarray:
    """Boolean lung mask (both lungs, vessels filled in, main airways mostly included).

    Air below AIR_THRESHOLD_HU that does not touch the in-plane image border (outside air, the
    table) is kept; of its 3D components the largest, and a second one when it is big enough
    (the lungs separate, or join through the trachea). Holes (vessels) are filled per slice.
    Dense consolidation is above the threshold and so is missed: callers allow for that.
    """
    if hu.ndim != 3:
        raise ValueError(f"`hu` must be 3D, got shape {hu.shape}")
    air = hu < AIR_THRESHOLD_HU
    # Remove air connected to the in-plane border on each slice (outside the body).
    outside = np.zeros_like(air)
    for k in range(air.shape[0]):
        labels, n = ndimage.label(air[k])
        border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        outside[k] = members(labels, border[border > 0], n + 1)
    inner = air & ~outside
    labels = cc3d.connected_components(inner.astype(np.uint8), connectivity=6)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    voxel_ml = float(np.prod(spacing)) / 1000.0
    order = np.argsort(counts)[::-1]
    keep = []
    for lab in order[:2]:
        if counts[lab] * voxel_ml < min_component_ml:
            break
        if keep and counts[lab] < SECOND_LUNG_MIN_FRACTION * counts[keep[0]]:
            break
        keep.append(int(lab))
    mask = members(labels, keep, len(counts)) if keep else np.zeros(hu.shape, dtype=bool)
    if not mask.any():
        return mask
    # Close small gaps at the pleura and fill vessels in the lung, slice by slice.
    mask = ndimage.binary_closing(mask, structure=ball(2.0, spacing), border_value=0) | mask
    for k in range(mask.shape[0]):
        if mask[k].any():
            mask[k] = ndimage.binary_fill_holes(mask[k])
    return mask


def opacity_mask(hu: np.ndarray, lung: np.ndarray) -> np.ndarray:
    """Opacity labels 0-2 from HU ranges inside a lung mask (a crude second opinion: vessels
    inside the lung fall in the same ranges, so small components are removed)."""
    out = np.zeros(hu.shape, dtype=np.uint8)
    ggo = lung & (hu >= GGO_RANGE_HU[0]) & (hu < GGO_RANGE_HU[1])
    cons = lung & (hu >= CONSOLIDATION_RANGE_HU[0]) & (hu < CONSOLIDATION_RANGE_HU[1])
    any_op = ndimage.binary_opening(ggo | cons, iterations=1)
    out[any_op & ggo] = 1
    out[any_op & cons] = 2
    return out


def lung_volume_ml(hu: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """Classical lung volume in millilitres."""
    return float(lung_mask(hu, spacing).sum()) * float(np.prod(spacing)) / 1000.0
