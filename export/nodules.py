"""Small round ground-glass nodules added to opacity training sources.

The generator's lesions (`appliance.lesions`) are large subpleural patches (radius 10-60 mm):
the typical COVID-19 pattern. Early and mild disease also shows small (5-20 mm) round
ground-glass nodules away from the pleura. With none of them in training, opacity 0.4.0 gives a
clearly visible 12 mm nodule of about -400 HU a foreground probability under 1% (covid-P001's
right upper lobe, MODEL_CARD.md). The nodules use the generator's ground-glass density model:
a core between its faintest and densest ground glass, a hazy labelled margin at
GGO_EDGE_SHARE of the core density, a patchy texture, and vessels left visible.

Only the training stream uses this (`--nodules`); the evaluation phantoms are unchanged.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from appliance.lesions import GGO_DENSE_HU, GGO_EDGE_SHARE, GGO_FAINT_HU, HU_TOP

NODULE_COUNT = (1, 6)
NODULE_RADIUS_MM = (2.5, 10.0)
"""Radius range (log-uniform): 5-20 mm nodules."""
PARENCHYMA_HU = -860.0
"""Normal lung density when the neighbourhood has no aerated voxel to measure it from."""


def add_nodules(rng: np.random.Generator, hu: np.ndarray, label: np.ndarray, lung: np.ndarray,
                spacing: tuple[float, float, float], count: tuple[int, int] = NODULE_COUNT,
                radius_mm: tuple[float, float] = NODULE_RADIUS_MM) -> int:
    """In place: add ground-glass nodules (label 1) inside ``lung`` where ``label`` is still 0.
    Returns the number of voxels labelled."""
    candidates = np.flatnonzero(lung & (label == 0))
    if not candidates.size:
        return 0
    sp = np.asarray(spacing, dtype=np.float64)
    added = 0
    for _ in range(int(rng.integers(count[0], count[1] + 1))):
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
        ramp = np.clip(level / 0.3, 0.0, 1.0) ** 0.8
        patch = 0.72 + 0.28 * np.tanh(1.6 * texture)
        target = base + (core - base) * (GGO_EDGE_SHARE + (1.0 - GGO_EDGE_SHARE) * ramp) * patch
        # vessels and walls denser than the target stay visible (as in LesionField.apply)
        fade = np.clip((HU_TOP - block) / (HU_TOP - base), 0.0, 1.0)
        shifted = block + np.maximum((target - base) * fade, 0.0)
        block = np.where(inside, shifted, block)
        hu[box] = np.rint(block).astype(hu.dtype)
        label[box][inside] = 1
        added += int(inside.sum())
    return added
