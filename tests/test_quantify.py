"""Quantification on masks with known volumes: per lobe, per side, whole, and severity bands."""

import numpy as np
import pytest

from appliance.labels import Lobe
from appliance.pipeline.quantify import lobe_severity, quantify

VOXEL_ML = 0.002  # 2 mm^3 voxels


def make_masks(lobe_voxels: dict[Lobe, int], ggo: dict[Lobe, int], cons: dict[Lobe, int]):
    """Lay out each lobe as a contiguous run in a flat array; opacities at the start of each run."""
    total = sum(lobe_voxels.values()) + 100  # some background
    lobes = np.zeros(total, np.uint8)
    opacity = np.zeros(total, np.uint8)
    pos = 100
    for lobe, n in lobe_voxels.items():
        lobes[pos : pos + n] = lobe
        g, c = ggo.get(lobe, 0), cons.get(lobe, 0)
        opacity[pos : pos + g] = 1
        opacity[pos + g : pos + g + c] = 2
        pos += n
    return lobes.reshape(1, 1, -1), opacity.reshape(1, 1, -1)


def test_volumes_and_percentages_per_region():
    sizes = {Lobe.RUL: 1000, Lobe.RML: 400, Lobe.RLL: 1200, Lobe.LUL: 1100, Lobe.LLL: 1000}
    ggo = {Lobe.RLL: 300, Lobe.LLL: 100}
    cons = {Lobe.RLL: 60, Lobe.LUL: 11}
    lobes, opacity = make_masks(sizes, ggo, cons)
    q = quantify(lobes, opacity, VOXEL_ML)
    r = q["regions"]
    assert r["whole"]["lung_ml"] == pytest.approx(4700 * VOXEL_ML)
    assert r["right"]["lung_ml"] == pytest.approx(2600 * VOXEL_ML)
    assert r["left"]["lung_ml"] == pytest.approx(2100 * VOXEL_ML)
    assert r["RLL"]["ggo_ml"] == pytest.approx(300 * VOXEL_ML)
    assert r["RLL"]["consolidation_ml"] == pytest.approx(60 * VOXEL_ML)
    assert r["RLL"]["plo_pct"] == pytest.approx(100 * 360 / 1200)
    assert r["whole"]["plo_pct"] == pytest.approx(100 * 471 / 4700)
    assert r["right"]["plo_pct"] == pytest.approx(100 * 360 / 2600)
    assert r["left"]["plo_pct"] == pytest.approx(100 * 111 / 2100)
    for name, reg in r.items():
        assert reg["ggo_pct"] + reg["consolidation_pct"] == pytest.approx(reg["plo_pct"]), name
    assert r["RLL"]["severity"] == 3  # 30%
    assert r["LUL"]["severity"] == 1  # 1%
    assert r["RUL"]["severity"] == 0
    assert q["severity_score"] == 3 + 1 + 2  # LLL 10% -> 2


def test_opacity_outside_lung_is_ignored_and_mean_hu():
    lobes = np.zeros((2, 2, 2), np.uint8)
    lobes[0] = Lobe.RUL
    opacity = np.ones_like(lobes)  # GGO everywhere, also outside the lung
    hu = np.where(lobes > 0, -800.0, 40.0)
    r = quantify(lobes, opacity, 1.0, hu=hu)["regions"]
    assert r["whole"]["opacity_ml"] == 4.0
    assert r["whole"]["plo_pct"] == 100.0
    assert r["whole"]["mean_lung_hu"] == pytest.approx(-800.0)


def test_absent_region_has_null_percentages():
    lobes = np.full((2, 2, 2), Lobe.RUL, np.uint8)
    r = quantify(lobes, np.zeros_like(lobes), 1.0)["regions"]
    assert r["LLL"]["lung_ml"] == 0
    assert r["LLL"]["plo_pct"] is None and r["left"]["plo_pct"] is None
    assert r["LLL"]["severity"] == 0


@pytest.mark.parametrize(
    ("plo", "score"),
    [(0.0, 0), (0.0999, 0), (0.1, 1), (4.999, 1), (5.0, 2), (25.0, 2), (25.001, 3), (49.99, 3),
     (50.0, 4), (75.0, 4), (75.01, 5), (100.0, 5), (None, 0)],
)
def test_severity_band_boundaries(plo, score):
    assert lobe_severity(plo) == score


def test_severity_boundaries_from_voxel_counts():
    """The bands hold through the voxel arithmetic: exactly 5/25/50/75% of a 1000-voxel lobe."""
    for opaque, expected in [(1, 1), (50, 2), (250, 2), (251, 3), (500, 4), (750, 4), (751, 5)]:
        lobes, opacity = make_masks({Lobe.RML: 1000}, {Lobe.RML: opaque}, {})
        assert quantify(lobes, opacity, 1.0)["regions"]["RML"]["severity"] == expected, opaque


def test_involvement_minimum_is_configurable():
    lobes, opacity = make_masks({Lobe.RML: 1000}, {Lobe.RML: 2}, {})  # 0.2%
    assert quantify(lobes, opacity, 1.0)["regions"]["RML"]["severity"] == 1
    assert quantify(lobes, opacity, 1.0, involvement_min_pct=0.5)["regions"]["RML"]["severity"] == 0


def test_bad_arguments_are_named():
    lobes = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(ValueError, match="`opacity` must have the shape"):
        quantify(lobes, np.zeros((2, 2, 3), np.uint8), 1.0)
    with pytest.raises(ValueError, match="`voxel_ml` must be a positive"):
        quantify(lobes, lobes, 0.0)
    with pytest.raises(ValueError, match="labels 0-5"):
        quantify(lobes + 7, lobes, 1.0)
