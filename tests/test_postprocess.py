"""Clean-up of model labels: lobe components and holes, opacity confined to the lung, and aerated
lung and dense opacity that stage 1 left out taken back into the lung."""

from __future__ import annotations

import numpy as np

from appliance.pipeline import postprocess
from appliance.pipeline.postprocess import (
    MAX_AERATED_FRACTION,
    add_aerated_lung,
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


FINE = (2.0, 1.2, 1.2)
"""A scan-like grid: the aerated-lung search runs on it directly (no in-plane stride)."""


def chest_with_missed_lung():
    """Soft tissue with a lung block of two lobes (2 in x < 40, 3 beyond); stage 1 missed a
    12 mm slab of lobe 2 at the side. An airway of pure air leaves the lung's top, and a 1-voxel
    shell of aerated voxels lies along the lung's back."""
    hu = np.full((30, 60, 80), 40.0, np.float32)
    truth = np.zeros(hu.shape, np.uint8)
    truth[5:25, 10:50, 10:40] = 2
    truth[5:25, 10:50, 40:70] = 3
    hu[truth > 0] = -850.0
    hu[25:30, 26:34, 36:44] = -1000.0  # trachea-like tube on the lung's top
    hu[5:25, 50, 10:70] = -850.0  # thin shell behind the lung (partial volume at the pleura)
    hu[5:25, 54:60, 10:70] = -850.0  # aerated but apart from the lung (a bowel loop, say)
    stage1 = truth.copy()
    stage1[:, :, 10:20] = 0  # the missed slab, 12 mm thick
    return hu, truth, stage1


def test_aerated_lung_that_stage_1_missed_joins_the_nearest_lobe():
    hu, truth, stage1 = chest_with_missed_lung()
    out = add_aerated_lung(stage1, hu, FINE)
    # The slab is lung again, of the lobe beside it; the opening rounds off its edges (a ball
    # does not fit into a box's corners), so only most of it, and all of its inside, returns.
    slab = out[5:25, 10:50, 10:20]
    assert set(np.unique(slab)) == {0, 2} and (slab == 2).mean() > 0.9
    assert (out[7:23, 13:47, 13:20] == 2).all()
    assert (out[truth == 3] == 3).all() and (out[5:25, 10:50, 20:40] == 2).all()
    assert (out[25:30] == 0).all()  # the airway is air, not parenchyma
    assert (out[:, 50, 22:] == 0).all()  # a shell too thin to hold the 3 mm ball stays out
    assert (out[:, 54:60] == 0).all()  # aerated pieces that do not touch the lung stay out
    assert (stage1[:, :, 10:20] == 0).all()  # the input is left alone


def test_aerated_lung_is_not_added_when_it_would_be_most_of_the_lung():
    hu, _, stage1 = chest_with_missed_lung()
    small = np.zeros_like(stage1)
    small[10:20, 20:40, 45:60] = 3  # stage 1 found only a small part of the aerated block
    assert MAX_AERATED_FRACTION * (small > 0).sum() < 20 * 40 * 60
    out = add_aerated_lung(small, hu, FINE)
    assert (out == small).all()


def test_nothing_aerated_to_add_leaves_the_lobes_as_they_are():
    hu, truth, _ = chest_with_missed_lung()
    assert (add_aerated_lung(truth, hu, FINE) == truth).all()
    empty = np.zeros_like(truth)
    assert (add_aerated_lung(empty, hu, FINE) == empty).all()


def test_aerated_bowel_meeting_the_lung_at_one_end_stays_out(monkeypatch):
    """A gas-and-stool loop (parenchyma-like HU) that meets the lung only with its end."""
    hu, truth, _ = chest_with_missed_lung()
    hu[10:16, 20:26, 70:78] = -850.0  # the loop's end against lobe 3's side
    hu[10:16, 20:58, 72:78] = -850.0  # and its length, running away from the lung
    out = add_aerated_lung(truth, hu, FINE)
    assert (out == truth).all()
    monkeypatch.setattr(postprocess, "MIN_CONTACT_SHARE", 0.0)  # without the contact rule it would join
    assert (add_aerated_lung(truth, hu, FINE)[10:16, 30:58, 72:78] == 3).any()


def test_a_missed_ground_glass_slab_is_left_to_the_opacity_rules():
    """Stage 1 takes diseased lung in itself; a missed piece at ground-glass HU is not a recess."""
    hu, _, stage1 = chest_with_missed_lung()
    hu[5:25, 10:50, 10:20] = -500.0
    assert (add_aerated_lung(stage1, hu, FINE) == stage1).all()
