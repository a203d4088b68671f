"""The opacity calibration's arithmetic, its manifest write and its refusals (the calibration
run itself takes minutes on the shipped models: `python -m export.calibrate`)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("torch")

from appliance.runtime import load_manifest  # noqa: E402
from export.calibrate import choose_weights, main, plo, score, write_weights  # noqa: E402
from tests.onnx_models import write_models  # noqa: E402


def lung_with_lesion():
    lobes = np.zeros((10, 20, 20), np.uint8)
    lobes[:, :, :10] = 1  # RUL: 2,000 voxels
    lobes[:, :, 10:] = 4  # LUL: 2,000 voxels
    opacity = np.zeros_like(lobes)
    opacity[:5, :, :10] = 1  # half of RUL
    return lobes, opacity


def test_plo_per_lobe_and_whole():
    lobes, opacity = lung_with_lesion()
    p = plo(lobes, opacity)
    assert p["whole"] == pytest.approx(25.0) and p["RUL"] == pytest.approx(50.0)
    assert p["LUL"] == 0.0 and p["RML"] == 0.0  # an empty lobe counts as 0


def test_score_of_a_phantom_and_of_a_real_scan():
    lobes, truth = lung_with_lesion()
    under = truth.copy()
    under[:4] = 0  # the model found 1 of 5 slabs: RUL 10% instead of 50%
    s = score(lobes, lobes > 0, truth, lobes, under)
    assert s["error"] == pytest.approx(40.0 / 5)  # mean over the five lobes
    assert s["max_lobe_error"] == pytest.approx(40.0) and s["whole_error"] == pytest.approx(20.0)
    assert s["opacity_dice"] == pytest.approx(2 * 400 / (2000 + 400))
    real = score(None, lobes > 0, truth, lobes, under)  # no lobe labels: whole-lung error
    assert real["error"] == pytest.approx(20.0) and "max_lobe_error" not in real


def test_write_weights_stores_a_weight_the_runtime_reads(tmp_path):
    models = write_models(tmp_path / "models")
    write_weights(models, 0.4)
    assert load_manifest(models)["opacity"].class_weights == (0.4, 1.0, 1.0)
    assert json.loads((models / "manifest.json").read_text())["models"]["lobes"].get("class_weights") is None


WEIGHTS = (1.0, 0.4, 0.2)


def test_one_weight_serves_all_unless_heavy_scans_want_another():
    light = {1.0: 2.0, 0.4: 1.5, 0.2: 1.0}  # the faint rim: the low weight wins
    heavy = {1.0: 2.0, 0.4: 0.5, 0.2: 1.5}  # most of the lung diseased: the low weight over-calls
    errors, burdens = [light] * 6 + [heavy] * 3, [1.0, 2, 5, 10, 20, 30, 41, 45, 50]
    chosen = choose_weights(errors, burdens, WEIGHTS)
    assert chosen["background_weight"] == 0.2
    assert chosen["heavy"] == {"foreground_pct": [30, 41], "background_weight": 0.4, "sources_above": 3}
    assert chosen["objective"] == pytest.approx((6 * 1.0 + 3 * 0.5) / 9)
    # too few sources to hold three on each side of a threshold: one weight for all, the best
    few = choose_weights([light] * 3 + [heavy] * 2, [1.0, 2, 5, 41, 45], WEIGHTS)
    assert few["heavy"] is None and few["background_weight"] == 0.4
    assert few["objective"] == pytest.approx((3 * 1.5 + 2 * 0.5) / 5)
    # the heavy sources agree with the rest: no rule
    assert choose_weights([light] * 9, burdens, WEIGHTS)["heavy"] is None
    # a split by burden must separate different burdens
    tied = choose_weights([light] * 6 + [heavy] * 3, [10.0] * 9, WEIGHTS)
    assert tied["heavy"] is None


def test_write_weights_stores_the_heavy_rule_the_runtime_reads(tmp_path):
    models = write_models(tmp_path / "models")
    write_weights(models, 0.2, {"foreground_pct": [30.0, 41.0], "background_weight": 0.4, "sources_above": 3})
    spec = load_manifest(models)["opacity"]
    assert spec.class_weights == (0.2, 1.0, 1.0)
    assert spec.heavy_class_weights == ((30.0, 41.0), (0.4, 1.0, 1.0))
    assert spec.class_weights_for(None) == (0.2, 1.0, 1.0)
    assert spec.class_weights_for(30.0) == (0.2, 1.0, 1.0)
    assert spec.class_weights_for(35.5) == pytest.approx((0.3, 1.0, 1.0))  # the ramp: no jump
    assert spec.class_weights_for(41.0) == (0.4, 1.0, 1.0) == spec.class_weights_for(90.0)
    write_weights(models, 0.3)  # a later calibration without a rule removes the old one
    spec = load_manifest(models)["opacity"]
    assert spec.heavy_class_weights is None and spec.class_weights_for(90.0) == (0.3, 1.0, 1.0)


def test_bad_arguments_are_refused(capsys):
    assert main(["--phantoms", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err
