"""Clean-up of the model labels on the scan grid: one component per lobe, holes, opacity in lung."""

from __future__ import annotations

import cc3d
import edt
import numpy as np
from scipy import ndimage

from appliance.pipeline.classical import AIR_THRESHOLD_HU
from appliance.pipeline.geometry import ball, bounding_box, members


def clean_lobes(lobes: np.ndarray, min_hole_fill_voxels: int = 1) -> np.ndarray:
    """Keep the largest connected piece of each lobe, then give enclosed holes of the lung the
    most common lobe label around them. Works inside the lung bounding box for speed."""
    box = bounding_box(lobes > 0, margin=(1, 1, 1))
    if box is None:
        return lobes
    out = lobes.copy()
    sub = out[box]
    comp, n = cc3d.connected_components(sub, connectivity=26, return_N=True)
    if n:
        sizes = np.bincount(comp.ravel(), minlength=n + 1)
        # label of each component = the lobe label of any of its voxels
        comp_label = np.zeros(n + 1, dtype=np.uint8)
        comp_label[comp.ravel()] = sub.ravel()
        keep = np.zeros(n + 1, dtype=bool)
        for lab in np.unique(comp_label[1:]):
            ids = np.flatnonzero(comp_label == lab)
            ids = ids[ids > 0]
            if ids.size:
                keep[ids[np.argmax(sizes[ids])]] = True
        sub[~keep[comp]] = 0
    _fill_holes(sub, min_hole_fill_voxels)
    return out


def _fill_holes(sub: np.ndarray, min_voxels: int) -> None:
    """In place: background pockets enclosed by lung take the majority label of their rim."""
    background = sub == 0
    holes, n = cc3d.connected_components(background.astype(np.uint8), connectivity=6, return_N=True)
    if n <= 1:
        return
    border_ids = np.unique(np.concatenate([
        holes[0].ravel(), holes[-1].ravel(), holes[:, 0].ravel(), holes[:, -1].ravel(),
        holes[:, :, 0].ravel(), holes[:, :, -1].ravel(),
    ]))
    enclosed = np.setdiff1d(np.arange(1, n + 1), border_ids)
    if enclosed.size == 0:
        return
    slices = ndimage.find_objects(holes)
    for hid in enclosed:
        sl = slices[hid - 1]
        if sl is None:
            continue
        grown = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        region = holes[grown] == hid
        if region.sum() < min_voxels:
            continue
        rim = ndimage.binary_dilation(region) & ~region
        labels = sub[grown][rim]
        labels = labels[labels > 0]
        if labels.size:
            sub[grown][region] = np.bincount(labels).argmax()


MAX_ADDED_FRACTION = 0.5
"""Dense opacity that stage 1 left out is at most a part of the lung it found (critical
phantoms: well under this); more than half as much again means stage 2 is calling the chest wall
consolidation (seen with per-voxel test models on 18 mm slices), so nothing is added."""


ADDED_MIN_RADIUS_MM = 5.0
"""Lung taken back from stage 2 must hold a ball of this radius (an opening): beside subpleural
consolidation stage 2 paints a shell of "consolidation" a few mm into the chest wall, while
consolidated lung that stage 1 left out is bulky. On the calibration sources the mean per-lobe
PLO error was 1.353 without the opening, 1.339/1.330 at 2/3 mm, 1.324/1.320/1.320/1.324 at
4/5/6/8 mm and 1.341 adding nothing (an erosion that counts the lung beside a piece as inside
it, so that only the outer face is eroded, kept more of the shell: 1.338 at 5 mm)."""


def add_opacified_lung(lobes: np.ndarray, opacity: np.ndarray, spacing: tuple[float, float, float],
                       min_radius_mm: float = ADDED_MIN_RADIUS_MM) -> np.ndarray:
    """Stage 1 sees the chest at 5 mm, where dense consolidation looks like the soft tissue
    around the lung and is left out of it. Stage 2 still calls it opacity (it runs on the lung
    box): opacity that stage 1 left out, holds consolidation, touches the lung and is thick
    enough to hold a ball of `min_radius_mm` is lung, of the nearest lobe."""
    box = bounding_box((lobes > 0) | (opacity > 0), margin=(1, 1, 1))
    if box is None:
        return lobes
    out = lobes.copy()
    sub, candidate = out[box], (opacity[box] > 0) & (out[box] == 0)
    if not candidate.any():
        return out
    # Candidate pieces that hold consolidation (what stage 1 misses; ground glass alone it sees
    # as lung, so ground glass outside its lung is partial volume of the chest wall or of thick
    # slices) and that are connected to the lung, found by one labelling of both together.
    pieces, n_pieces = cc3d.connected_components(candidate, connectivity=26, return_N=True)
    dense = np.unique(pieces[candidate & (opacity[box] == 2)])
    joined, n_joined = cc3d.connected_components((sub > 0) | candidate, connectivity=26, return_N=True)
    lung_ids = np.unique(joined[sub > 0])
    add = (members(pieces, dense[dense > 0], n_pieces + 1)
           & members(joined, lung_ids[lung_ids > 0], n_joined + 1))
    del joined, pieces
    if int(add.sum()) > MAX_ADDED_FRACTION * int((sub > 0).sum()):
        return out  # not lung that stage 1 missed: stage 2 is reading the chest wall
    add = _opened(add, spacing, min_radius_mm)
    _join_nearest_lobe(sub, add)
    return out


def _join_nearest_lobe(lobes: np.ndarray, add: np.ndarray) -> None:
    """In place: each voxel of `add` takes the label of the nearest lobe voxel, searched near the
    additions on a grid halved in plane (a lobe is tens of mm across; the halved grid makes the
    search four times cheaper)."""
    near = bounding_box(add, margin=(4, 8, 8))
    if near is None:
        return
    region, grow = lobes[near], add[near]
    coarse = region[:, ::2, ::2]
    if not coarse.any():
        return
    index = ndimage.distance_transform_edt(coarse == 0, return_distances=False, return_indices=True)
    z, y, x = np.nonzero(grow)
    cy, cx = y // 2, x // 2
    region[z, y, x] = coarse[index[0][z, cy, cx], index[1][z, cy, cx], index[2][z, cy, cx]]


AERATED_MIN_RADIUS_MM = 3.0
"""Aerated lung taken back must hold a ball of this radius: the opening breaks the thin
partial-volume leaks through the diaphragm to gastric and colonic gas, and leaves out the thin
shell at the pleura that the border trim below is about (growing into it hurt PLO)."""
AERATED_SEARCH_MM = 15.0
"""How far outside stage 1's lung box aerated lung is looked for."""
AERATED_GRID_MM = 2.0
"""The search's grid: missed pieces are centimetres across, and 2 mm keeps it under a second."""
AIRWAY_MEDIAN_HU = -900.0
"""Pieces whose median HU is below this are air, not parenchyma: the trachea, main bronchi and
bowel gas (median -920 to -970 HU on the real scans) against lung (-760 to -870)."""
GROUND_GLASS_MEDIAN_HU = -700.0
"""Pieces whose median HU is above this are mostly ground glass: stage 1 takes diseased lung in
itself, so this step only takes back lung that is mostly aerated (a lesion at -500 HU that
stage 1 left out is stage 2's and the opacity rules' business, not a missed recess)."""
MIN_CONTACT_SHARE = 0.04
"""A piece of missed lung lies against the lung along a face: on the real scans 5-30% of its
voxels (on the 2 mm grid) touch stage 1's lung, 6.6% for cap-cap001's 224 ml recess. Bowel gas
and airways meet it through a few voxels only (0.8-3.2%)."""
MAX_AERATED_FRACTION = 0.3
"""More aerated lung than this share of stage 1's lung is not lung stage 1 missed but a wrong
reading (a gas-filled bowel loop or outside air); nothing is added."""


def add_aerated_lung(lobes: np.ndarray, hu: np.ndarray, spacing: tuple[float, float, float],
                     min_radius_mm: float = AERATED_MIN_RADIUS_MM) -> np.ndarray:
    """On real scans stage 1 can leave aerated lung out at the bases (cap-cap001: the left
    costophrenic recess and the lung beside the heart apex, about 210 ml, 2 cm thick). Aerated
    voxels near the lung that stage 1 left out, thick enough to hold a ball of
    `min_radius_mm`, lying against the lung along a face and with the median HU of aerated
    parenchyma (not of air, not of ground glass), are lung, of the nearest lobe. The search
    runs on a grid of about 2 mm."""
    lung = lobes > 0
    box = bounding_box(lung, margin=tuple(int(round(AERATED_SEARCH_MM / s)) for s in spacing))
    if box is None:
        return lobes
    steps = tuple(max(1, int(round(AERATED_GRID_MM / s))) for s in spacing)
    grid = tuple(slice(None, None, k) for k in steps)
    sub, h = lobes[box], hu[box]
    coarse_lobes, coarse_hu = np.ascontiguousarray(sub[grid]), np.ascontiguousarray(h[grid])
    coarse_air = (coarse_hu < AIR_THRESHOLD_HU) & (coarse_lobes == 0)
    # An opening by a ball (a few voxels wide on this grid: cheaper than distance transforms).
    structure = ball(min_radius_mm, tuple(s * k for s, k in zip(spacing, steps, strict=True)))
    thick = ndimage.binary_opening(coarse_air, structure=structure)
    if not thick.any():
        return lobes
    pieces, n = cc3d.connected_components(thick, connectivity=26, return_N=True)
    labels = pieces[thick]
    sizes = np.bincount(labels, minlength=n + 1)
    # Lung, not airway or bowel: a share of the piece lies against the lung, and its median HU
    # is that of aerated parenchyma (between air and ground glass).
    beside_lung = ndimage.binary_dilation(coarse_lobes > 0, structure=np.ones((3, 3, 3), bool)) & thick
    contact = np.bincount(pieces[beside_lung], minlength=n + 1)
    above_air = np.bincount(labels, weights=coarse_hu[thick] >= AIRWAY_MEDIAN_HU, minlength=n + 1)
    above_aerated = np.bincount(labels, weights=coarse_hu[thick] > GROUND_GLASS_MEDIAN_HU, minlength=n + 1)
    keep = np.flatnonzero((contact >= MIN_CONTACT_SHARE * sizes) & (above_air >= 0.5 * sizes)
                          & (above_aerated < 0.5 * sizes))  # label 0 has size 0: never kept
    if keep.size == 0:
        return lobes
    kept = members(pieces, keep, n + 1)
    if int(kept.sum()) * int(np.prod(steps)) > MAX_AERATED_FRACTION * int(lung.sum()):
        return lobes
    # Nearest lobe on the coarse grid, then back to the scan grid within the kept pieces' box
    # (each coarse voxel covers its block of scan voxels; only aerated ones join).
    _join_nearest_lobe(coarse_lobes, kept)
    kept_box = bounding_box(kept)
    joined_labels = np.where(kept[kept_box], coarse_lobes[kept_box], 0)
    for axis, k in enumerate(steps):
        joined_labels = np.repeat(joined_labels, k, axis=axis)
    fine = tuple(slice(b.start * k, min(b.stop * k, m)) for b, k, m in zip(kept_box, steps, sub.shape, strict=True))
    joined_labels = joined_labels[tuple(slice(0, f.stop - f.start) for f in fine)]
    out = lobes.copy()
    region = out[box][fine]
    take = (joined_labels > 0) & (h[fine] < AIR_THRESHOLD_HU) & (region == 0)
    region[take] = joined_labels[take]
    return out


def _opened(mask: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Morphological opening by a ball of `radius_mm` (erosion, then dilation back inside the
    mask), with distance transforms on the mask's bounding box."""
    box = bounding_box(mask, margin=(1, 1, 1))
    if box is None or radius_mm <= 0:
        return mask
    sub, anisotropy = mask[box], tuple(float(s) for s in spacing)
    core = edt.edt(sub, anisotropy=anisotropy, black_border=False, parallel=1) > radius_mm
    out = np.zeros_like(mask)
    if core.any():  # thin pieces only (the usual chest-wall shell): nothing survives
        near_core = edt.edt(~core, anisotropy=anisotropy, black_border=False, parallel=1)
        out[box] = sub & (near_core <= radius_mm)
    return out


BORDER_SHELL_MM = 3.0
"""How far inside stage 1's lung border the scan's HU may trim it (a 5 mm grid is off by up to
about half a voxel); 3 mm gave the best lung Dice of 2 and 3 mm on training-range phantoms."""
BORDER_TISSUE_HU = -500.0
"""Above this, a border voxel is soft tissue (chest wall, mediastinum, partial volume)."""


def trim_lung_border(lobes: np.ndarray, hu: np.ndarray, spacing: tuple[float, float, float],
                     opacity: np.ndarray, shell_mm: float = BORDER_SHELL_MM,
                     tissue_hu: float = BORDER_TISSUE_HU) -> np.ndarray:
    """Stage 1 draws the lung border on a 5 mm grid; on the scan grid it runs a few mm into the
    chest wall and mediastinum. Within `shell_mm` of that border, voxels at soft-tissue HU that
    stage 2 does not call opacity leave the lung; opacity stays (consolidation is lung).
    (Growing the border into aerated voxels outside it was tried too: it raised lung Dice a
    little more but made the PLO errors worse, and needs a nearest-lobe search.)"""
    box = bounding_box(lobes > 0, margin=(1, 1, 1))
    if box is None:
        return lobes
    out = lobes.copy()
    sub = out[box]
    depth = edt.edt(sub > 0, anisotropy=tuple(float(s) for s in spacing), black_border=False,
                    parallel=1)
    sub[(depth > 0) & (depth <= shell_mm) & (hu[box] > tissue_hu) & (opacity[box] == 0)] = 0
    return out


def clean_opacity(opacity: np.ndarray, lobes: np.ndarray, min_voxels: int = 0) -> np.ndarray:
    """Opacity exists only inside the lungs; optionally drop specks smaller than `min_voxels`."""
    out = np.where(lobes > 0, opacity, 0).astype(np.uint8)
    if min_voxels > 1 and out.any():
        box = bounding_box(out > 0)
        sub = out[box]
        comp = cc3d.connected_components(sub > 0, connectivity=26)
        sizes = np.bincount(comp.ravel())
        small = sizes < min_voxels
        small[0] = False
        sub[small[comp]] = 0
    return out


def combine(lobes: np.ndarray, opacity: np.ndarray, hu: np.ndarray,
            spacing: tuple[float, float, float], border_opacity: np.ndarray | None = None,
            ) -> tuple[np.ndarray, np.ndarray]:
    """Final lobes and opacity from the cleaned stage 1 lobes and stage 2's raw opacity: aerated
    lung and dense opacity that stage 1 left out join the lung, the border is trimmed to the
    scan's soft tissue, and opacity is confined to the lung. The analysis and the calibration share it.

    `border_opacity` is the stage 2 labelling the lung border follows (default `opacity`): the
    network's plain argmax, when `opacity` carries calibrated class weights that widen the
    opacity rim (see StageResult.decision_labels)."""
    border = opacity if border_opacity is None else border_opacity
    lobes = add_aerated_lung(lobes, hu, spacing)
    lobes = add_opacified_lung(lobes, border, spacing)
    lobes = trim_lung_border(lobes, hu, spacing, border)
    return lobes, clean_opacity(opacity, lobes)
