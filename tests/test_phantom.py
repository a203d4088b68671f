"""Phantom, lesion model, CT writer and `appliance phantom`: truth consistency, reproducibility,
insertion that changes only the inserted voxels, DICOM that reads back with exact geometry."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest

from appliance import lesions, phantom
from appliance.cli import build_parser, main
from appliance.dicom import ct_writer
from appliance.dicom.series import load_series
from appliance.labels import Lobe
from appliance.phantom_cli import run
from appliance.pipeline.quantify import quantify

COARSE = {"spacing": (6.0, 6.0, 6.0), "shape": (64, 64, 64)}
"""A whole chest (384 mm cube) in 0.26 M voxels: fast, and every lobe is present."""


@pytest.fixture(scope="module")
def coarse_severe() -> phantom.Phantom:
    return phantom.synthesize(11, "severe", **COARSE)


# ----------------------------------------------------------------------------- array API


def test_same_seed_is_bit_identical_and_seeds_differ():
    a = phantom.synthesize(3, "moderate", **COARSE)
    b = phantom.synthesize(3, "moderate", **COARSE)
    c = phantom.synthesize(4, "moderate", **COARSE)
    for name in ("hu", "lobes", "opacity"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert a.meta == b.meta and a.origin == b.origin
    assert not np.array_equal(a.hu, c.hu)
    assert not np.array_equal(a.lobes, c.lobes)


def test_arrays_have_the_documented_types(coarse_severe):
    p = coarse_severe
    assert p.hu.dtype == np.int16 and p.lobes.dtype == np.uint8 and p.opacity.dtype == np.uint8
    assert p.hu.shape == p.lobes.shape == p.opacity.shape == COARSE["shape"]
    assert p.spacing == COARSE["spacing"]
    assert p.lobes.max() <= max(Lobe) and p.opacity.max() <= 2
    assert -1024 <= p.hu.min() and p.hu.max() <= 3071


def test_lobes_partition_the_lungs_with_plausible_anatomy(coarse_severe):
    p = coarse_severe
    voxel_ml = float(np.prod(p.spacing)) / 1000.0
    counts = np.bincount(p.lobes.ravel(), minlength=6)
    lung_ml = counts[1:].sum() * voxel_ml
    assert 3000 <= lung_ml <= 7500
    fractions = counts[1:] / counts[1:].sum()
    assert fractions.min() >= 0.03, fractions  # every lobe present and not tiny (QA LOBE_TINY)
    right = counts[1:4].sum() / counts[1:].sum()
    assert 0.40 <= right <= 0.70
    # canonical orientation: the right lung at low columns, upper lobes above lower lobes
    cols = {lobe: np.nonzero(p.lobes == lobe)[2].mean() for lobe in Lobe}
    rows = {lobe: np.nonzero(p.lobes == lobe)[0].mean() for lobe in Lobe}
    assert max(cols[Lobe.RUL], cols[Lobe.RML], cols[Lobe.RLL]) < min(cols[Lobe.LUL], cols[Lobe.LLL])
    assert rows[Lobe.RUL] > rows[Lobe.RLL] and rows[Lobe.LUL] > rows[Lobe.LLL]
    # lungs are air: their median is in the parenchyma range, the outside is mostly not lung
    assert -920 <= np.median(p.hu[(p.lobes > 0) & (p.opacity == 0)]) <= -780


def test_opacity_lies_inside_the_lungs_with_ggo_and_consolidation_densities(coarse_severe):
    p = coarse_severe
    assert p.opacity.any()
    assert not np.any((p.opacity > 0) & (p.lobes == 0))
    ggo = np.median(p.hu[p.opacity == 1])
    assert -780 <= ggo <= -250
    if (p.opacity == 2).sum() > 20:
        assert -250 <= np.median(p.hu[p.opacity == 2]) <= 120


@pytest.mark.parametrize(
    ("severity", "lo", "hi"),
    [
        ("none", 0.0, 0.0),
        ("mild", 0.0, 0.0),
        ("moderate", 0.5, 12.0),
        ("severe", 12.0, 50.0),
        ("critical", 30.0, 70.0),
    ],
)
def test_severity_sets_the_whole_lung_plo(severity, lo, hi):
    p = phantom.synthesize(21, severity, **COARSE)
    plo = 100.0 * (p.opacity > 0).sum() / (p.lobes > 0).sum()
    assert lo <= plo <= hi, plo
    lo_t, hi_t = lesions.PLO_RANGE_PCT[severity]
    assert lo_t <= p.meta["target_plo_pct"] <= hi_t


def test_same_patient_on_two_grids():
    a = phantom.synthesize(8, "none", **COARSE)
    b = phantom.synthesize(8, "none", spacing=(4.0, 4.0, 4.0), shape=(96, 96, 96))
    va = (a.lobes > 0).sum() * 6.0**3
    vb = (b.lobes > 0).sum() * 4.0**3
    assert abs(va - vb) / vb < 0.05
    for lobe in Lobe:
        fa = (a.lobes == lobe).sum() * 6.0**3 / va
        fb = (b.lobes == lobe).sum() * 4.0**3 / vb
        assert abs(fa - fb) < 0.03, lobe


def test_anatomy_varies_with_the_seed():
    vols = [(phantom.synthesize(s, "none", **COARSE).lobes > 0).sum() * 0.216 for s in range(6)]
    assert max(vols) - min(vols) > 300.0  # ml
    assert len({phantom.patient_summary(s)["body_width_mm"] for s in range(6)}) == 6


def test_course_rises_to_a_peak_near_day_13_and_resolves():
    course = lesions.disease_course(5, "severe")
    days = np.arange(0, 40)
    plo = np.array([course.plo_pct(d) for d in days])
    peak = days[int(np.argmax(plo))] + course.onset_days
    assert 10 <= peak <= 16
    assert plo[-1] < plo.max()
    assert course.plo_pct(0) == pytest.approx(course.baseline_plo_pct)
    assert lesions.disease_course(5, "none").plo_pct(10) == 0.0


def test_follow_up_changes_the_lesions_not_the_anatomy():
    a = phantom.synthesize(9, "moderate", **COARSE, day=0)
    b = phantom.synthesize(9, "moderate", **COARSE, day=8)
    assert np.array_equal(a.lobes, b.lobes)
    assert not np.array_equal(a.opacity, b.opacity)


def test_motion_and_thickness_change_the_image_and_keep_the_truth_consistent():
    base = phantom.synthesize(2, "moderate", spacing=(3.0, 3.0, 3.0), shape=(128, 128, 128))
    moved = phantom.synthesize(
        2, "moderate", spacing=(3.0, 3.0, 3.0), shape=(128, 128, 128), motion=True
    )
    thick = phantom.synthesize(
        2, "moderate", spacing=(3.0, 3.0, 3.0), shape=(128, 128, 128), thickness=7.5
    )
    assert not np.array_equal(base.hu, moved.hu)
    assert not np.array_equal(base.hu, thick.hu)
    assert moved.meta["motion"] and thick.meta["thickness"] == 7.5
    assert not np.any((moved.opacity > 0) & (moved.lobes == 0))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"severity": "fatal"}, ValueError, "`severity` must be one of"),
        ({"spacing": (1.0, 0.0, 1.0)}, ValueError, "`spacing` must be positive"),
        ({"shape": (10, 10)}, ValueError, "`shape` must be three numbers"),
        ({"day": -1}, ValueError, "`day` must be a non-negative int"),
        ({"thickness": 0.0}, ValueError, "`thickness` must be a number"),
    ],
)
def test_synthesize_refuses_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        phantom.synthesize(1, **{"severity": "none", **COARSE, **kwargs})


def test_synthesize_refuses_a_non_integer_seed():
    with pytest.raises(TypeError, match="`seed` must be an int"):
        phantom.synthesize("1")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- insertion


@pytest.fixture(scope="module")
def normal_scan() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    p = phantom.synthesize(30, "none", spacing=(4.0, 3.0, 3.0), shape=(80, 128, 128))
    return p.hu, p.lobes > 0, p.spacing


@pytest.mark.parametrize("severity", ["moderate", "critical"])
def test_insert_lesions_changes_only_voxels_inside_the_returned_mask(normal_scan, severity):
    hu, lung, spacing = normal_scan
    before = hu.copy()
    new, labels = lesions.insert_lesions(hu, lung, spacing, seed=4, severity=severity)
    assert np.array_equal(hu, before)  # the input is not modified
    assert new.dtype == hu.dtype and labels.dtype == np.uint8
    changed = new != hu
    assert changed.any()
    assert not np.any(changed & (labels == 0))
    assert not np.any((labels > 0) & ~lung)
    assert np.mean(new[changed] > hu[changed]) > 0.99  # lesions only add density
    again, labels2 = lesions.insert_lesions(hu, lung, spacing, seed=4, severity=severity)
    assert np.array_equal(again, new) and np.array_equal(labels2, labels)


def test_insert_lesions_none_and_mild_change_nothing(normal_scan):
    hu, lung, spacing = normal_scan
    for severity in ("none", "mild"):
        new, labels = lesions.insert_lesions(hu, lung, spacing, seed=1, severity=severity)
        assert np.array_equal(new, hu) and not labels.any()


def test_insert_lesions_refuses_mismatched_masks(normal_scan):
    hu, lung, spacing = normal_scan
    with pytest.raises(ValueError, match="`lung` must be an array of shape"):
        lesions.insert_lesions(hu, lung[:-1], spacing, seed=1, severity="severe")
    with pytest.raises(ValueError, match="`severity` must be one of"):
        lesions.insert_lesions(hu, lung, spacing, seed=1, severity="bad")


# ----------------------------------------------------------------------------- writer


def _header(**over) -> ct_writer.SeriesHeader:
    values = dict(
        patient_id="T1",
        patient_name="TEST^ONE",
        patient_sex="F",
        patient_birth_date="19600101",
        patient_age_years=60,
        study_instance_uid=ct_writer.uid_from("t", "study"),
        series_instance_uid=ct_writer.uid_from("t", "series"),
        frame_of_reference_uid=ct_writer.uid_from("t", "for"),
        study_date="20200301",
        study_time="101500",
        accession_number="A1",
        study_id="1",
        series_number=2,
        manufacturer="SIEMENS",
        kernel="B41s",
        kvp=120.0,
        slice_thickness=2.0,
    )
    values.update(over)
    return ct_writer.SeriesHeader(**values)


@pytest.mark.parametrize("manufacturer", sorted(ct_writer.VENDOR_STYLES))
def test_writer_round_trips_hu_and_geometry_for_every_vendor(tmp_path, manufacturer):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 2000, (21, 24, 20)).astype(np.int16)
    spacing, origin = (1.25, 0.6875, 0.703125), (-120.5, -99.25, -310.125)
    paths = ct_writer.write_ct_series(
        tmp_path, hu, spacing, origin, _header(manufacturer=manufacturer)
    )
    assert len(paths) == 21 and len(set(paths)) == 21
    vol, info = load_series(tmp_path)
    assert np.array_equal(vol.array, hu)
    assert np.allclose(vol.spacing, spacing, rtol=0, atol=1e-9)
    assert np.allclose(vol.origin, origin, rtol=0, atol=1e-9)
    assert np.allclose(vol.direction, np.eye(3)[[2, 1, 0]])
    assert info.manufacturer == manufacturer and info.patient_id == "T1"
    ds = pydicom.dcmread(paths[0])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.Modality == "CT"
    assert ds.RescaleType == "HU" and ds.ConvolutionKernel == "B41s"


def test_writer_refuses_hu_the_vendor_cannot_store(tmp_path):
    hu = np.full((2, 4, 4), -2000, np.int16)
    with pytest.raises(ValueError, match="`hu` must lie in"):
        ct_writer.write_ct_series(tmp_path, hu, (1, 1, 1), (0, 0, 0), _header())


# ----------------------------------------------------------------------------- CLI


def _run(argv: list[str]) -> int:
    return run(build_parser().parse_args(["phantom", *argv]))


def test_cli_writes_a_series_whose_truth_matches_its_quantification(tmp_path):
    out = tmp_path / "p"
    assert _run([str(out), "--seed", "7", "--severity", "severe", "--slices", "24"]) == 0
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 24
    vol, info = load_series(out)
    truth = json.loads((out / "truth.json").read_text())
    with np.load(out / "truth.npz") as z:
        lobes, opacity, spacing, origin = z["lobes"], z["opacity"], z["spacing"], z["origin"]
    assert lobes.shape == opacity.shape == vol.shape == (24, 512, 512)
    assert np.allclose(vol.spacing, spacing, rtol=0, atol=1e-9)
    assert np.allclose(vol.origin, origin, rtol=0, atol=1e-6)
    assert truth["voxel_ml"] == pytest.approx(vol.voxel_ml, rel=1e-12)
    q = quantify(lobes, opacity, truth["voxel_ml"], hu=vol.array)
    assert q["regions"] == truth["regions"] and q["severity_score"] == truth["severity_score"]
    assert not np.any((opacity > 0) & (lobes == 0))
    # the same synthesis reproduces the written pixels exactly
    p = phantom.synthesize(
        7,
        "severe",
        spacing=tuple(spacing),
        shape=(24, 512, 512),
        thickness=truth["scan"]["slice_thickness_mm"],
    )
    assert np.array_equal(p.hu, vol.array)
    assert info.patient_id == p.meta["patient_id"] and info.kernel == p.meta["kernel"]
    index = json.loads((out / "phantom.json").read_text())
    assert index["studies"][0]["plo_pct"] == truth["regions"]["whole"]["plo_pct"]


def test_cli_follow_up_writes_later_studies_of_the_same_patient(tmp_path):
    out = tmp_path / "serial"
    assert (
        main(
            [
                "phantom",
                str(out),
                "--seed",
                "12",
                "--severity",
                "moderate",
                "--slices",
                "20",
                "--follow-up",
                "2",
            ]
        )
        == 0
    )
    folders = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(folders) == 3
    infos = [load_series(f)[1] for f in folders]
    assert len({i.patient_id for i in infos}) == 1
    assert len({i.study_instance_uid for i in infos}) == 3
    dates = [i.study_date for i in infos]
    assert dates == sorted(dates) and len(set(dates)) == 3
    index = json.loads((out / "phantom.json").read_text())
    assert [s["day"] for s in index["studies"]] == sorted(s["day"] for s in index["studies"])


def test_cli_insert_into_changes_only_the_inserted_voxels(tmp_path):
    src = tmp_path / "normal"
    p = phantom.synthesize(31, "none", spacing=(5.0, 2.5, 2.5), shape=(64, 160, 160))
    ct_writer.write_ct_series(
        src, p.hu, p.spacing, p.origin, _header(manufacturer="GE MEDICAL SYSTEMS")
    )
    out = tmp_path / "inserted"
    assert _run([str(out), "--insert-into", str(src), "--seed", "3", "--severity", "severe"]) == 0
    before, _ = load_series(src)
    after, info = load_series(out)
    with np.load(out / "truth.npz") as z:
        opacity, lung = z["opacity"], z["lung"]
    changed = before.array != after.array
    assert changed.any()
    assert not np.any(changed & (opacity == 0))
    assert not np.any((opacity > 0) & ~lung)
    assert np.allclose(after.origin, before.origin) and after.spacing == pytest.approx(
        before.spacing
    )
    assert "DERIVED" in info.image_type
    truth = json.loads((out / "truth.json").read_text())
    plo = 100.0 * (opacity > 0).sum() / lung.sum()
    assert truth["regions"]["whole"]["plo_pct"] == pytest.approx(plo)
    assert 10.0 <= plo <= 50.0


def test_cli_refuses_bad_options(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "x"), "--slices", "3"]) == 2
    assert "--slices must be in" in capsys.readouterr().err
    assert main(["phantom", str(tmp_path / "x"), "--thickness", "5"]) == 2
    assert "--thickness must be in" in capsys.readouterr().err


@pytest.mark.slow
def test_full_size_series_reads_back_exactly(tmp_path):
    # its speed (under 30 s) is measured by benchmarks/phantom.py, not asserted here
    out = tmp_path / "full"
    assert _run([str(out), "--seed", "1", "--severity", "moderate"]) == 0
    vol, _info = load_series(out)
    with np.load(out / "truth.npz") as z:
        assert z["lobes"].shape == vol.shape == (300, 512, 512)
        assert np.allclose(vol.spacing, z["spacing"], rtol=0, atol=1e-9)
        assert np.allclose(vol.origin, z["origin"], rtol=0, atol=1e-6)
    truth = json.loads((out / "truth.json").read_text())
    assert 1.0 <= truth["regions"]["whole"]["plo_pct"] <= 10.5
    assert Path(out / "phantom.json").exists()
