"""QA flags raised from masks and figures built to trip (or not trip) each check."""

import numpy as np

from appliance.config import QAConfig
from appliance.labels import Lobe
from appliance.pipeline.qa import QAInputs, motion_score, run_checks
from appliance.pipeline.quantify import quantify

SPACING = (2.0, 2.0, 2.0)
VOXEL_ML = 0.008


def synthetic_lobes(shape=(60, 40, 80), right_cols=(5, 35), left_cols=(45, 75), z=(5, 55)):
    """Two box lungs, right at low columns (patient right, canonical grid), split into lobes."""
    lobes = np.zeros(shape, np.uint8)
    z0, z1 = z
    zm = (z0 + z1) // 2
    r0, r1 = right_cols
    l0, l1 = left_cols
    lobes[z0:zm, 5:35, r0:r1] = Lobe.RLL
    lobes[zm:z1, 5:35, r0:r1] = Lobe.RUL
    lobes[zm - 6 : zm + 4, 5:20, r0:r1] = Lobe.RML
    lobes[z0:zm, 5:35, l0:l1] = Lobe.LLL
    lobes[zm:z1, 5:35, l0:l1] = Lobe.LUL
    return lobes


def check(lobes, cfg=QAConfig(), **kw):
    q = quantify(lobes, np.zeros_like(lobes), VOXEL_ML)
    inputs = QAInputs(lobes=lobes, spacing=SPACING, confidence=kw.get("confidence", 0.95),
                      confidence_limit=kw.get("limit", 0.8), classical_lung_ml=kw.get("classical"),
                      motion_score=kw.get("motion"))
    out = run_checks(q["regions"], inputs, cfg)
    return out, {f["code"] for f in out["flags"]}, q


def test_clean_lungs_pass():
    lobes = synthetic_lobes()
    whole = quantify(lobes, np.zeros_like(lobes), VOXEL_ML)["regions"]["whole"]["lung_ml"]
    out, codes, _ = check(lobes, QAConfig(lung_volume_ml=(100.0, 9500.0)), classical=whole)
    assert codes == set() and out["ok"] is True


def test_volume_truncation_and_tiny_lobe():
    lobes = synthetic_lobes(z=(0, 60))  # touches first and last slice
    lobes[lobes == Lobe.RML] = Lobe.RUL  # RML absent
    out, codes, _ = check(lobes)
    assert {"LUNG_VOLUME", "TRUNCATED", "LOBE_TINY"} <= codes
    assert "LATERALITY" not in codes  # two lobes each side is not fewer on the right
    assert out["ok"] is False
    tiny = [f for f in out["flags"] if f["code"] == "LOBE_TINY"]
    assert tiny[0]["region"] == "RML" and "absent" in tiny[0]["message"]


def test_laterality_fewer_right_lobes():
    lobes = synthetic_lobes()
    lobes[np.isin(lobes, [Lobe.RML, Lobe.RLL])] = Lobe.RUL
    _, codes, _ = check(lobes, QAConfig(lung_volume_ml=(100.0, 9500.0)))
    assert "LATERALITY" in codes


def test_laterality_swapped_sides():
    lobes = synthetic_lobes()
    swapped = lobes[:, :, ::-1].copy()  # right lobes now at the patient's left
    _, codes, _ = check(swapped, QAConfig(lung_volume_ml=(100.0, 9500.0)))
    assert "LATERALITY" in codes


def test_imbalance_confidence_classical_motion():
    lobes = synthetic_lobes(right_cols=(5, 35), left_cols=(45, 52))
    _, codes, q = check(lobes, QAConfig(lung_volume_ml=(100.0, 9500.0)), confidence=0.5, limit=0.8,
                        classical=10.0, motion=0.9)
    assert {"LR_IMBALANCE", "LOW_CONFIDENCE", "CLASSICAL_DISAGREEMENT", "MOTION"} <= codes


def test_classical_disagreement_allows_for_opacity():
    lobes = synthetic_lobes()
    opacity = np.where(lobes == Lobe.RLL, 2, 0).astype(np.uint8)
    q = quantify(lobes, opacity, VOXEL_ML)
    whole = q["regions"]["whole"]
    # the thresholds miss the consolidated lobe: classical = lung minus consolidation
    inputs = QAInputs(lobes=lobes, spacing=SPACING, confidence=None, confidence_limit=0,
                      classical_lung_ml=whole["lung_ml"] - whole["opacity_ml"], motion_score=None)
    codes = {f["code"] for f in run_checks(q["regions"], inputs, QAConfig(lung_volume_ml=(1.0, 1e5)))["flags"]}
    assert "CLASSICAL_DISAGREEMENT" not in codes


def test_motion_score_sees_a_jump():
    lung = np.zeros((40, 30, 30), bool)
    for k in range(5, 35):
        r = 5 + k // 4
        lung[k, 15 - r // 2 : 15 + r // 2, 15 - r // 2 : 15 + r // 2] = True
    smooth = motion_score(lung, (2.0, 1.0, 1.0))
    lung[20] = np.roll(lung[20], 8, axis=1) & False  # a slice where the lung vanishes
    jumpy = motion_score(lung, (2.0, 1.0, 1.0))
    assert smooth < 0.35 < jumpy
