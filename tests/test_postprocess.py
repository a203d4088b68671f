"""Clean-up of model labels: lobe components and holes, opacity confined to the lung, and dense
opacity that stage 1 left out taken back into the lung."""

from __future__ import annotations

import numpy as np

from appliance.pipeline.postprocess import (
    add_opacified_lung,
    clean_lobes,
    clean_opacity,
    combine,
    trim_lung_border,
)

COARSE = (6.0, 6.0, 6.0)
"""Voxels wider than the added-lung opening's 5 mm radius: the opening leaves these pieces whole."""


def two_lobes(shape=(20, 30, 40)) -> np.ndarray:
    """Lobe 1 in the left half of x, lobe 4 in the right half, inside a box of air."""
    lobes = np.zeros(shape, np.uint8)
    lobes[4:16, 5:25, 5:19] = 1
    lobes[4:16, 5:25, 21:35] = 4
    return lobes


def test_clean_lobes_keeps_the_largest_piece_of_each_lobe_and_fills_enclosed_holes():
    lobes = two_lobes()
    lobes[0:2, 0:2, 0:2] = 1  # a stray speck of lobe 1 far away
    lobes[8:10, 10:12, 10:12] = 0  # a hole inside lobe 1
    out = clean_lobes(lobes)
    assert out[0:2, 0:2, 0:2].max() == 0
    assert (out[8:10, 10:12, 10:12] == 1).all()
    assert (out[4:16, 5:25, 21:35] == 4).all()
    assert lobes[8, 10, 10] == 0  # the input is left alone


def test_clean_opacity_keeps_opacity_in_the_lung_and_drops_small_specks():
    lobes = two_lobes()
    opacity = np.zeros_like(lobes)
    opacity[6:12, 8:16, 8:16] = 2  # a lesion in lobe 1
    opacity[10, 20, 30] = 1  # one-voxel speck in lobe 4
    opacity[1, 1, 1] = 1  # outside the lung
    out = clean_opacity(opacity, lobes)
    assert out[1, 1, 1] == 0 and out[10, 20, 30] == 1
    assert (out[6:12, 8:16, 8:16] == 2).all()
    assert clean_opacity(opacity, lobes, min_voxels=5)[10, 20, 30] == 0


def test_dense_opacity_touching_the_lung_joins_the_nearest_lobe():
    lobes = two_lobes()
    truth = lobes.copy()
    lobes[4:16, 5:12, 5:14] = 0  # stage 1 missed a consolidated corner of lobe 1
    opacity = np.zeros_like(lobes)
    opacity[4:16, 5:14, 5:15] = 2  # stage 2 found it (and a little of the lung beside it)
    opacity[0:2, 27:30, 30:40] = 2  # opacity not touching the lung (e.g. chest wall): not lung
    out = add_opacified_lung(lobes, opacity, COARSE)
    assert (out == truth).all()
    assert (lobes[4:16, 5:12, 5:14] == 0).all()  # the input is left alone


def test_opacity_between_two_lobes_is_shared_by_distance():
    lobes = two_lobes()
    lobes[4:16, 5:25, 15:25] = 0  # a consolidated band across the border of lobes 1 and 4
    opacity = np.zeros_like(lobes)
    opacity[4:16, 5:25, 15:25] = 2
    out = add_opacified_lung(lobes, opacity, COARSE)
    assert (out[4:16, 5:25, 15:19] == 1).all()
    assert (out[4:16, 5:25, 21:25] == 4).all()
    assert (out[4:16, 5:25, 15:25] > 0).all()


def test_nothing_to_add_leaves_the_lobes_as_they_are():
    lobes = two_lobes()
    opacity = np.zeros_like(lobes)
    opacity[6:10, 8:12, 8:12] = 1  # inside the lung already
    assert (add_opacified_lung(lobes, opacity, COARSE) == lobes).all()
    assert (add_opacified_lung(np.zeros_like(lobes), np.zeros_like(lobes), COARSE) == 0).all()


def test_trim_lung_border_drops_soft_tissue_at_the_border_but_keeps_opacity_and_deep_vessels():
    truth = two_lobes()
    hu = np.where(truth > 0, -850.0, 40.0)
    hu[10, 15, 12] = 40.0  # a vessel deep inside lobe 1 (far from the border)
    spacing = (2.0, 1.0, 1.0)
    grown = truth.copy()  # stage 1's border two voxels out into the chest wall along y
    grown[4:16, 3:5, 5:19] = 1
    grown[4:16, 25:27, 21:35] = 4
    opacity = np.zeros_like(truth)
    opacity[4:16, 3:5, 8:12] = 2  # consolidation reaching into what looks like chest wall
    out = trim_lung_border(grown, hu, spacing, opacity)
    assert (out[4:16, 25:27, 21:35] == 0).all()  # soft tissue outside lobe 4 trimmed
    assert (out[4:16, 3:5, 8:12] == 1).all()  # the consolidation stays lung, in its lobe
    assert (out[4:16, 3:5, 13:19] == 0).all()
    assert out[10, 15, 12] == 1  # deep vessel kept
    assert ((out > 0) == ((truth > 0) | (opacity > 0))).all()
    assert grown[4, 25, 21] == 4  # the input is left alone
    assert trim_lung_border(np.zeros_like(truth), hu, spacing, opacity).max() == 0


def test_only_pieces_holding_consolidation_join_the_lung():
    lobes = two_lobes()
    truth = lobes.copy()
    lobes[4:16, 5:10, 5:14] = 0  # stage 1 missed a consolidated corner of lobe 1 ...
    opacity = np.zeros_like(lobes)
    opacity[4:16, 5:8, 5:14] = 2
    opacity[4:16, 8:10, 5:14] = 1  # ... with its ground-glass rim: joins with it
    opacity[4:16, 25:28, 21:35] = 1  # ground glass alone outside lobe 4 (partial volume): not lung
    out = add_opacified_lung(lobes, opacity, COARSE)
    assert (out == truth).all()


def test_a_consolidated_chest_wall_is_not_taken_for_missed_lung():
    lobes = two_lobes()
    opacity = np.where(lobes == 0, 2, 0).astype(np.uint8)  # "consolidation" everywhere outside
    assert (add_opacified_lung(lobes, opacity, COARSE) == lobes).all()


def test_the_lung_border_follows_the_plain_argmax_not_the_widened_rim():
    lobes = two_lobes()
    truth = lobes.copy()
    lobes[4:16, 5:12, 5:14] = 0  # stage 1 missed a consolidated corner of lobe 1
    hu = np.where(truth > 0, -850.0, 40.0)
    hu[4:16, 5:12, 5:14] = 20.0
    plain = np.zeros_like(lobes)
    plain[4:16, 5:12, 5:14] = 2  # the network's own argmax: the consolidation
    widened = plain.copy()  # with the calibrated weights the rim grows both ways:
    widened[4:16, 12:14, 5:14] = 1  # faint ground glass inside the lung (wanted) ...
    widened[4:16, 3:5, 5:14] = 2  # ... and consolidation a few mm into the chest wall (not)
    final_lobes, final_opacity = combine(lobes, widened, hu, COARSE, plain)
    assert (final_lobes == truth).all()
    assert (final_opacity == np.where(truth > 0, widened, 0)).all()
    bled, _ = combine(lobes, widened, hu, COARSE)  # the border from the widened labels
    assert (bled[4:16, 3:5, 5:14] == 1).all()  # takes the chest wall in as lung


def test_a_thin_shell_of_consolidation_outside_the_lung_is_not_taken_for_lung():
    lobes = np.zeros((40, 60, 60), np.uint8)
    lobes[5:35, 10:50, 10:28] = 1
    lobes[5:35, 10:50, 32:50] = 4
    missed = np.zeros(lobes.shape, bool)
    missed[5:35, 10:25, 10:28] = True  # bulky consolidated lung that stage 1 left out
    opacity = np.where(missed, 2, 0).astype(np.uint8)
    opacity[5:35, 50:53, 32:50] = 2  # a 3 mm shell painted into the chest wall beside lobe 4
    stage1 = np.where(missed, 0, lobes).astype(np.uint8)
    out = add_opacified_lung(stage1, opacity, (1.0, 1.0, 1.0))
    assert (out[5:35, 50:53, 32:50] == 0).all()
    assert (out[10:30, 15:20, 15:23] == 1).all()  # the consolidated lung comes back ...
    assert (out[missed] == 1).mean() > 0.6  # ... all but its edges, rounded by the 5 mm ball
    assert (add_opacified_lung(stage1, opacity, (1.0, 1.0, 1.0), min_radius_mm=0.0)[5:35, 50:53, 32:50]
            == 4).all()  # without the opening the shell would join lobe 4
