"""`appliance analyze` as a user runs it: exit codes, one-line refusals, the JSON contract."""

import json
import os
import subprocess
import sys

import pytest

from appliance.runtime.base import MODELS_DIR, load_manifest
from tests.onnx_models import write_models
from tests.paths import REAL

needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real scans not present at {REAL}")


def run_cli(*args, models=None, timeout=300):
    env = dict(os.environ)
    if models is not None:
        env["APPLIANCE_ANALYSIS__MODELS_DIR"] = str(models)
    return subprocess.run([sys.executable, "-m", "appliance.cli", *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def test_models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"), lobes_tile=(64, 64, 64), opacity_tile=(32, 64, 64),
                        lobes_spacing=(4.0, 4.0, 4.0), opacity_spacing=(2.0, 2.0, 2.0))


def assert_refused(proc, match):
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("appliance:")]
    assert len(lines) == 1 and match in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_missing_path(tmp_path, test_models):
    assert_refused(run_cli("analyze", tmp_path / "nope", models=test_models), "does not exist")


def test_empty_folder(tmp_path, test_models):
    assert_refused(run_cli("analyze", tmp_path, models=test_models), "is empty")


def test_garbage_files(tmp_path, test_models):
    for i in range(3):
        (tmp_path / f"f{i}.dcm").write_bytes(os.urandom(2000))
    assert_refused(run_cli("analyze", tmp_path, models=test_models), "not DICOM")


def test_unavailable_backend_by_name(tmp_path, test_models):
    assert_refused(run_cli("analyze", tmp_path, "--backend", "tensorrt", models=test_models),
                   "backend tensorrt is unavailable")


def test_bad_config_key(tmp_path, test_models):
    cfg = tmp_path / "a.toml"
    cfg.write_text("[analysis]\nthreds = 2\n")
    assert_refused(run_cli("analyze", tmp_path, "--config", cfg, models=test_models), "unknown key")


@needs_real
def test_abdomen_series_has_no_lungs(test_models):
    """20 slices of upper abdomen (a sliver of lung base at most): refused by lung volume."""
    proc = run_cli("analyze", REAL / "totalsegmentator-examples" / "abdomen-ct-dicom-20", models=test_models)
    assert_refused(proc, "no lungs found")


@needs_real
def test_tcia_single_slices_are_refused(tmp_path, test_models):
    folder = tmp_path / "tcia"
    folder.mkdir()
    for f in sorted((REAL / "tcia-covid").rglob("*.dcm")):
        (folder / f"{f.parent.parent.name}-{f.parent.name}-{f.name}").symlink_to(f)
    proc = run_cli("analyze", folder, models=test_models)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


@needs_real
def test_json_contract_with_test_models_and_masks(tmp_path, test_models):
    proc = run_cli("analyze", REAL / "covid-ct-md" / "covid-P001", "--json", "--save-masks", tmp_path / "m",
                   models=test_models)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["schema_version"] == 1 and result["intended_use"].endswith("not a diagnosis")
    assert result["scan"]["shape"] == [148, 512, 512]
    whole = result["regions"]["whole"]
    assert whole["ggo_pct"] + whole["consolidation_pct"] == pytest.approx(whole["plo_pct"])
    assert set(result["timings_s"]) >= {"load", "lobes", "opacity", "postprocess", "quantify", "total"}
    opacity_model = result["models"][1]
    assert opacity_model["name"] == "opacity" and opacity_model["class_weights"] is None  # test models: none
    assert 0 < opacity_model["burden_pct"] < 100  # the threshold model calls P001's lesions and more
    import nibabel as nib

    lobes = nib.load(result["masks"]["lobes"])
    assert lobes.shape == (148, 512, 512)
    assert "load" in proc.stderr  # progress went to stderr


SHIPPED = (MODELS_DIR / "manifest.json").exists()
REAL_CASES = ["normal-normal001", "normal-normal002", "covid-P001", "cap-cap001"]


@pytest.fixture(scope="module")
def shipped_results():
    out = {}
    for case in REAL_CASES:
        proc = run_cli("analyze", REAL / "covid-ct-md" / case, "--json")
        assert proc.returncode == 0, f"{case}: {proc.stderr[-2000:]}"
        out[case] = json.loads(proc.stdout)
    return out


@needs_real
@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED, reason="no shipped models in appliance/models")
def test_real_scans_run_with_shipped_models(shipped_results):
    for case, result in shipped_results.items():
        assert result["schema_version"] == 1, case
        assert [m["name"] for m in result["models"]] == ["lobes", "opacity"]
        # the weights the burden chose are on record; none of these scans is heavily diseased
        burden, weights = result["models"][1]["burden_pct"], result["models"][1]["class_weights"]
        spec = load_manifest()["opacity"]
        assert weights == list(spec.class_weights_for(burden)) == list(spec.class_weights), (case, burden)
        assert set(result["regions"]) == {"whole", "right", "left", "RUL", "RML", "RLL", "LUL", "LLL"}
        assert result["timings_s"]["total"] > 0


@needs_real
@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED, reason="no shipped models in appliance/models")
def test_real_scans_have_plausible_lung_and_lobe_volumes(shipped_results):
    for case, result in shipped_results.items():
        regions = result["regions"]
        assert 2000 < regions["whole"]["lung_ml"] < 9500, case
        # every lobe found, each a plausible share of the lung (healthy adults: RML ~5-12%, others ~15-30%)
        for lobe in ("RUL", "RML", "RLL", "LUL", "LLL"):
            share = 100 * regions[lobe]["lung_ml"] / regions["whole"]["lung_ml"]
            assert 4 < share < 40, (case, lobe, share)
        if case.startswith("normal"):
            assert regions["whole"]["plo_pct"] < 3, case


@pytest.mark.parametrize("setting, expected", [(None, "False"), ("1", "True"), ("0", "False")])
def test_the_cli_uses_small_pages_unless_told_otherwise(setting, expected):
    env = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    if setting is not None:
        env["NUMPY_MADVISE_HUGEPAGE"] = setting
    code = ("import numpy, os; from appliance.cli import prefer_small_pages; prefer_small_pages(); "
            "from numpy._core.multiarray import _get_madvise_hugepage; "
            "print(_get_madvise_hugepage(), os.environ['NUMPY_MADVISE_HUGEPAGE'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [expected, setting or "0"]
