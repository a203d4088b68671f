"""DICOM outputs (SEG, SR, key images): valid by dciodvfy and equal to the analysis on reading.

The analyses are built from real series written by ``tests/dicom_factory.py`` and loaded by
the series loader, with masks drawn on the phantom's lungs and the figures from the real
quantification; one test runs the real Analyzer with the tiny threshold models. dciodvfy
(dicom3tools) checks every written object: its warnings are printed (``pytest -s`` or the
report of a failing test shows them) and any "Error" line fails the test.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from appliance import INTENDED_USE
from appliance.analysis import Analysis, Analyzer
from appliance.config import load_config
from appliance.dicom import capture
from appliance.dicom.outputs import output_uids, result_digest, write_dicom_outputs
from appliance.dicom.seg import (
    ARTIFICIAL_INTELLIGENCE,
    LEFT,
    RIGHT,
    SEGMENT_BY_NAME,
    SEGMENTS,
    tracking_uid,
)
from appliance.dicom.series import load_series
from appliance.dicom.sr import (
    OPACITY_FIELDS,
    PERCENT,
    REGION_FIELDS,
    SEVERITY_SCORE,
    SIDE_SITES,
    VOLUME,
    measurement_concept,
)
from appliance.labels import Lobe, Opacity
from appliance.pipeline.quantify import quantify
from tests import dicom_factory as factory
from tests.onnx_models import write_models

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy not installed (apt-get install dicom3tools)")
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
MODELS = [{"name": "lobes", "version": "1.2.0", "sha256": "a" * 64},
          {"name": "opacity", "version": "2.0.1", "sha256": "b" * 64}]


# ----------------------------------------------------------------------------- helpers


def synthetic_masks(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lobes on the phantom's aerated lungs (right = low columns), split along the slices;
    ground-glass in RUL and RLL, consolidation in LUL. The first and last two slices hold no
    lung, so their frames are empty."""
    n, rows, cols = hu.shape
    lung = hu < -500
    lung[:2] = lung[-2:] = False
    k = np.arange(n)[:, None, None]
    right = np.arange(cols)[None, None, :] < cols // 2
    lobes = np.zeros(hu.shape, np.uint8)
    lobes[lung & right & (k < n // 3)] = Lobe.RLL
    lobes[lung & right & (k >= n // 3) & (k < n // 2)] = Lobe.RML
    lobes[lung & right & (k >= n // 2)] = Lobe.RUL
    lobes[lung & ~right & (k < n // 2)] = Lobe.LLL
    lobes[lung & ~right & (k >= n // 2)] = Lobe.LUL
    opacity = np.zeros(hu.shape, np.uint8)
    box = np.zeros(hu.shape, bool)
    box[3:6, rows // 3:rows // 2, : cols // 2] = True  # RLL
    box[n - 6:n - 4, rows // 3:rows // 2, : cols // 2] = True  # RUL
    opacity[box & (lobes > 0)] = Opacity.GGO
    cons = np.zeros(hu.shape, bool)
    cons[n - 8:n - 5, rows // 2:2 * rows // 3, cols // 2:] = True  # LUL
    opacity[cons & (lobes > 0)] = Opacity.CONSOLIDATION
    return lobes, opacity


def make_result(volume, info, lobes, opacity) -> dict:
    q = quantify(lobes, opacity, volume.voxel_ml, hu=volume.array)
    return {
        "schema_version": 1,
        "software": {"name": "appliance", "version": "0.1.0"},
        "intended_use": INTENDED_USE,
        "scan": {"patient_id": info.patient_id, "study_instance_uid": info.study_instance_uid,
                 "series_instance_uid": info.series_instance_uid, "shape": list(volume.shape)},
        "regions": q["regions"],
        "severity_score": q["severity_score"],
        "qa": {"ok": False, "flags": [{"code": "LOBE_TINY", "region": "RML"}]},
        "models": MODELS,
    }


def analysis_of(folder: Path, masks=synthetic_masks) -> Analysis:
    volume, info = load_series(folder)
    lobes, opacity = masks(volume.array)
    return Analysis(make_result(volume, info, lobes, opacity), lobes, opacity, volume, info)


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(error lines, warning lines) of dciodvfy on one file."""
    run = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    return errors, warnings


def check_with_dciodvfy(paths: list[Path]) -> None:
    problems = []
    for path in paths:
        errors, warnings = dciodvfy(path)
        kind = path.name.split("_")[0]
        for line in sorted(set(warnings)):
            print(f"dciodvfy {kind}: {line} (x{warnings.count(line)})")
        problems += [f"{path.name}: {line}" for line in errors]
    assert problems == []


def by_kind(paths: list[Path]) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in paths:
        out.setdefault(re.sub(r"\d+$", "", p.name.split("_")[0]), []).append(p)
    return out


@pytest.fixture(scope="module")
def classic(tmp_path_factory) -> tuple[Analysis, list[Path]]:
    """A classic CT series (shuffled file names and instance numbers: axis 0 is not the file
    order) and its outputs."""
    tmp = tmp_path_factory.mktemp("classic")
    factory.write_ct_series(tmp / "ct", n_slices=24, file_names="shuffled", seed=3)
    analysis = analysis_of(tmp / "ct")
    return analysis, write_dicom_outputs(analysis, tmp / "out", device_serial_number="test-box")


@pytest.fixture(scope="module")
def enhanced(tmp_path_factory) -> tuple[Analysis, list[Path]]:
    """One Enhanced CT file whose frames are stored out of position order, and its outputs."""
    tmp = tmp_path_factory.mktemp("enhanced")
    order = np.random.default_rng(5).permutation(22)
    factory.write_enhanced_ct(tmp / "ct" / "enhanced.dcm", n_slices=22, frame_order=order)
    analysis = analysis_of(tmp / "ct")
    return analysis, write_dicom_outputs(analysis, tmp / "out", device_serial_number="test-box")


# ----------------------------------------------------------------------------- validity


@needs_dciodvfy
def test_every_output_passes_dciodvfy(classic, enhanced):
    for _, paths in (classic, enhanced):
        kinds = by_kind(paths)
        assert sorted(kinds) == ["key", "seg", "sr"] and len(kinds["key"]) == 3
        check_with_dciodvfy(paths)


def test_outputs_are_new_series_of_the_source_study(classic):
    analysis, paths = classic
    info = analysis.info
    datasets = [pydicom.dcmread(p) for p in paths]
    classes = [str(d.SOPClassUID) for d in datasets]
    assert classes == [SEG_STORAGE, COMPREHENSIVE_3D_SR] + [SC_STORAGE] * 3
    for d in datasets:
        assert d.StudyInstanceUID == info.study_instance_uid
        assert d.PatientID == info.patient_id and str(d.PatientName) == info.patient_name
        assert d.SeriesInstanceUID != info.series_instance_uid
        assert d.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert len({d.SeriesInstanceUID for d in datasets}) == 3  # SEG, SR, key images
    for d in datasets[:2]:
        assert (d.Manufacturer, d.SoftwareVersions) == ("appliance", "0.1.0")
        assert d.DeviceSerialNumber == "test-box"
    assert all("not for diagnosis" in d.SeriesDescription for d in datasets)
    assert not list(paths[0].parent.glob("*.part"))  # written atomically


# ----------------------------------------------------------------------------- SEG


def seg_pixels_by_instance(seg: hd.seg.Segmentation, info) -> np.ndarray:
    return seg.get_pixels_by_source_instance(
        source_sop_instance_uids=list(info.sop_instance_uids),
        segment_numbers=[s.number for s in SEGMENTS],
        assert_missing_frames_are_empty=False,
    )


def expected_stack(analysis: Analysis) -> np.ndarray:
    return np.stack([(analysis.lobes if s.mask == "lobes" else analysis.opacity) == s.value
                     for s in SEGMENTS], axis=-1)


def test_seg_holds_every_frame_and_equals_the_masks(classic):
    analysis, paths = classic
    info, n = analysis.info, analysis.volume.shape[0]
    seg = hd.seg.segread(paths[0])
    assert seg.SegmentationType == "BINARY"
    assert int(seg.NumberOfFrames) == n * len(SEGMENTS)  # empty frames kept
    expected = expected_stack(analysis)
    assert not expected[0].any() and expected.any(axis=(0, 1, 2)).all()  # empty and full frames
    pixels = seg_pixels_by_instance(seg, info)
    assert pixels.shape == expected.shape
    for k in range(n):  # frame by frame, so a failure names the slice
        assert np.array_equal(pixels[k], expected[k]), f"slice {k}"
    referenced = {i.ReferencedSOPInstanceUID
                  for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert referenced == set(info.sop_instance_uids)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == info.series_instance_uid


def test_seg_frame_positions_are_the_source_slices(classic):
    analysis, paths = classic
    seg = pydicom.dcmread(paths[0])
    positions = {}
    for path in analysis.info.files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        positions[ds.SOPInstanceUID] = [float(v) for v in ds.ImagePositionPatient]
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        at = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert at == pytest.approx(positions[source], abs=1e-4)


def test_seg_segments_are_coded(classic):
    _, paths = classic
    seg = pydicom.dcmread(paths[0])
    items = {int(s.SegmentNumber): s for s in seg.SegmentSequence}
    assert sorted(items) == [1, 2, 3, 4, 5, 6, 7]
    expected_codes = {1: ("45653009", "24028007"), 2: ("72481006", None),
                      3: ("90572001", "24028007"), 4: ("45653009", "7771000"),
                      5: ("90572001", "7771000"), 6: ("112120", None), 7: ("9656002", None)}
    for number, (code, side) in expected_codes.items():
        item = items[number]
        prop = item.SegmentedPropertyTypeCodeSequence[0]
        assert prop.CodeValue == code
        modifier = prop.get("SegmentedPropertyTypeModifierCodeSequence")
        assert (modifier[0].CodeValue if modifier else None) == side
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        family = algo.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == (
            ARTIFICIAL_INTELLIGENCE.value, "DCM")
        model = MODELS[0] if number <= 5 else MODELS[1]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == (model["name"], model["version"])
        assert item.TrackingUID == tracking_uid(seg.SOPInstanceUID, number)
    assert items[2].SegmentLabel == "Right middle lobe"
    assert RIGHT.value != LEFT.value


def test_seg_of_enhanced_ct_follows_its_frames(enhanced):
    analysis, paths = enhanced
    info = analysis.info
    assert len(set(info.files)) == 1 and info.frame_numbers != tuple(range(1, 23))
    seg = hd.seg.segread(paths[0])
    assert int(seg.NumberOfFrames) == 22 * len(SEGMENTS)
    pixels = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=info.sop_instance_uids[0],
        source_frame_numbers=list(info.frame_numbers),
        segment_numbers=[s.number for s in SEGMENTS],
        assert_missing_frames_are_empty=False,
    )
    expected = expected_stack(analysis)
    for k in range(expected.shape[0]):
        assert np.array_equal(pixels[k], expected[k]), f"slice {k} (frame {info.frame_numbers[k]})"
    _, _, _, slices = capture.choose(analysis.volume, analysis.lobes, analysis.opacity)
    for path, key in zip(by_kind(paths)["key"], slices, strict=True):
        ref = pydicom.dcmread(path).SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == info.sop_instance_uids[0]
        assert ref.ReferencedFrameNumber == info.frame_numbers[key.scan]


# ----------------------------------------------------------------------------- SR


def measurements(group) -> dict[tuple[str, str], float]:
    return {(m.name.value, m.name.scheme_designator): m.value for m in group.get_measurements()}


def algorithm_names(item) -> list[str]:
    """Algorithm Name items directly under one content item."""
    return [c.TextValue for c in item.get("ContentSequence", [])
            if c.ConceptNameCodeSequence[0].CodeMeaning == "Algorithm Name"]


def code_key(code) -> tuple[str, str]:
    return (code.value, code.scheme_designator)


def expected_region(region: dict) -> dict[tuple[str, str], float]:
    return {code_key(concept): region[field] for field, concept, _, _ in REGION_FIELDS
            if region.get(field) is not None}


def test_sr_measurements_equal_the_result(classic):
    analysis, paths = classic
    result = analysis.result
    seg = pydicom.dcmread(paths[0])
    sr = hd.sr.srread(paths[1])
    report = sr.content
    groups = report.get_volumetric_roi_measurement_groups()
    by_segment = {n: g for g in groups for n in g.referenced_segment.referenced_segment_numbers}
    assert sorted(by_segment) == [1, 2, 3, 4, 5, 6, 7]
    for spec in SEGMENTS:
        group = by_segment[spec.number]
        ref = group.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_sop_class_uid == SEG_STORAGE
        assert group.tracking_uid == tracking_uid(seg.SOPInstanceUID, spec.number)
        got = measurements(group)
        if spec.mask == "lobes":
            assert got == expected_region(result["regions"][spec.name])
        else:
            ml, pct = OPACITY_FIELDS[spec.name]
            whole = result["regions"]["whole"]
            assert got == {code_key(VOLUME): whole[ml],
                           code_key(measurement_concept(pct)): whole[pct]}
    image_groups = report.get_image_measurement_groups()
    labels = {label: key for key, (label, _) in SIDE_SITES.items()}
    assert sorted(g.tracking_identifier for g in image_groups) == sorted(labels)
    for group in image_groups:
        key = labels[group.tracking_identifier]
        expected = expected_region(result["regions"][key])
        if key == "whole":
            expected[code_key(SEVERITY_SCORE)] = result["severity_score"]
        assert measurements(group) == expected
    rul = by_segment[SEGMENT_BY_NAME["RUL"].number]
    assert algorithm_names(rul[0]) == ["lobes"]  # the group's own
    own = {m.name.meaning: algorithm_names(m[0]) for m in rul.get_measurements()}
    assert own["Volume"] == [] and own["Attenuation Coefficient"] == []  # the lobe model's
    assert own["Percentage of lung opacification"] == ["opacity"]
    units = {m.unit.value for g in groups for m in g.get_measurements()}
    assert units == {"ml", PERCENT.value, "[hnsf'U]", "{score}"}


def test_sr_references_the_seg_and_the_sources_and_is_unverified(classic):
    analysis, paths = classic
    ds = pydicom.dcmread(paths[1])
    seg = pydicom.dcmread(paths[0])
    evidence = {i.ReferencedSOPInstanceUID
                for s in ds.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == set(analysis.info.sop_instance_uids) | {seg.SOPInstanceUID}
    assert (ds.CompletionFlag, ds.VerificationFlag, ds.PreliminaryFlag) == (
        "COMPLETE", "UNVERIFIED", "PRELIMINARY")
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    schemes = {i.CodingSchemeDesignator for i in ds.CodingSchemeIdentificationSequence}
    assert "99APPLIANCE" in schemes


def test_sr_leaves_out_figures_that_are_null(tmp_path):
    factory.write_ct_series(tmp_path / "ct", n_slices=22)

    def without_lll(hu):
        lobes, opacity = synthetic_masks(hu)
        opacity[lobes == Lobe.LLL] = 0
        lobes[lobes == Lobe.LLL] = 0
        return lobes, opacity

    analysis = analysis_of(tmp_path / "ct", without_lll)
    lll = analysis.result["regions"]["LLL"]
    assert lll["lung_ml"] == 0 and lll["plo_pct"] is None
    paths = write_dicom_outputs(analysis, tmp_path / "out")
    sr = hd.sr.srread(paths[1])
    [group] = sr.content.get_volumetric_roi_measurement_groups(
        tracking_uid=tracking_uid(str(pydicom.dcmread(paths[0]).SOPInstanceUID), Lobe.LLL))
    got = measurements(group)
    assert got == expected_region(lll) and code_key(measurement_concept("plo_pct")) not in got
    assert got[code_key(VOLUME)] == 0.0


# ----------------------------------------------------------------------------- key images


def test_key_images_show_the_overlay_and_reference_their_slices(classic):
    analysis, paths = classic
    images = [pydicom.dcmread(p) for p in by_kind(paths)["key"]]
    info = analysis.info
    canonical, lobes_c, opacity_c, slices = capture.choose(analysis.volume, analysis.lobes,
                                                           analysis.opacity)
    assert [s.zone for s in slices] == ["upper", "middle", "lower"]
    assert [bool(opacity_c[s.canonical].any()) for s in slices] == [True, False, True]
    for ds, key in zip(images, slices, strict=True):
        assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.BitsAllocated) == ("RGB", 3, 8)
        assert ds.BurnedInAnnotation == "YES" and "not a diagnosis" in ds.ImageComments
        assert list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref == info.sop_instance_uids[key.scan]
        rgb = ds.pixel_array
        assert rgb.shape[0] == capture.PANEL_PX and rgb.shape[2] == 3
        panel = np.asarray(capture.ct_panel(canonical.array[key.canonical], lobes_c[key.canonical],
                                            opacity_c[key.canonical], canonical.spacing[1:]))
        assert np.array_equal(rgb[:, : panel.shape[1]], panel)  # that slice, with its overlay
        grey = panel.max(axis=2) == panel.min(axis=2)
        assert not grey.all()
        legend = rgb[:, panel.shape[1] + 4:]
        assert legend.shape[1] == capture.LEGEND_PX and legend.any()


def test_key_slices_pick_the_most_opacified_slice_of_each_zone():
    lobes = np.zeros((30, 8, 8), np.uint8)
    lobes[3:27, 2:6, 2:6] = Lobe.RUL
    opacity = np.zeros_like(lobes)
    opacity[22, 2:5, 2:5] = Opacity.GGO  # upper zone, 9 voxels
    opacity[24, 2:4, 2:4] = Opacity.GGO  # upper zone, 4 voxels
    opacity[5, 2, 2] = Opacity.CONSOLIDATION  # lower zone
    picked = capture.key_slices(lobes, opacity)
    assert [z for _, z in picked] == ["upper", "middle", "lower"]
    upper, middle, lower = (k for k, _ in picked)
    assert upper == 22 and lower == 5
    assert 11 <= middle <= 18 and not opacity[middle].any()
    assert capture.key_slices(np.zeros((5, 4, 4), np.uint8), np.zeros((5, 4, 4), np.uint8)) == [
        (2, "middle")]
    with pytest.raises(ValueError, match="`count` must be >= 1"):
        capture.key_slices(lobes, opacity, 0)


# ----------------------------------------------------------------------------- UIDs, strictness


def test_uids_follow_the_result(classic, tmp_path):
    analysis, paths = classic
    again = write_dicom_outputs(analysis, tmp_path / "again", device_serial_number="test-box")
    assert [p.name for p in again] == [p.name for p in paths]  # same result, same instances
    changed = dataclasses.replace(analysis, result={**analysis.result, "severity_score": 25})
    assert result_digest(changed.result) != result_digest(analysis.result)
    assert output_uids(changed.result).seg_instance != output_uids(analysis.result).seg_instance
    assert len(set(dataclasses.astuple(output_uids(analysis.result))[:5])) == 5


def test_invalid_values_are_refused_not_written(classic, tmp_path):
    analysis, _ = classic
    long_name = {**analysis.result, "software": {"name": "x" * 80, "version": "0.1.0"}}
    with pytest.raises(ValueError, match="exceeds the maximum length of 64"):
        write_dicom_outputs(dataclasses.replace(analysis, result=long_name), tmp_path / "bad")
    assert not list((tmp_path / "bad").glob("*.dcm"))
    with pytest.raises(ValueError, match=r"`result\['models'\]` must name a 'opacity' model"):
        write_dicom_outputs(dataclasses.replace(
            analysis, result={**analysis.result, "models": MODELS[:1]}), tmp_path / "bad")
    with pytest.raises(ValueError, match="`analysis.lobes` must have the series' shape"):
        write_dicom_outputs(dataclasses.replace(analysis, lobes=analysis.lobes[1:]),
                            tmp_path / "bad")
    with pytest.raises(TypeError, match="`analysis` must be an Analysis"):
        write_dicom_outputs(analysis.result, tmp_path / "bad")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- real Analyzer


def chest_hu(n: int) -> np.ndarray:
    """A body filling the field, one aerated lung, a ground-glass cube: the threshold models
    find lung below -450 HU and ground-glass in -750..-300 HU."""
    rows = cols = 48
    r = (np.arange(rows)[:, None] + 0.5) / rows - 0.5
    c = (np.arange(cols)[None, :] + 0.5) / cols - 0.5
    img = np.full((rows, cols), 40.0)
    img[(r / 0.35) ** 2 + (c / 0.42) ** 2 <= 1] = -850.0
    hu = np.repeat(img[None], n, axis=0)
    hu[[0, -1]] = 40.0
    hu[6:11, 20:25, 14:19] = -500.0
    return hu + np.random.default_rng(0).integers(-10, 11, size=hu.shape)


@needs_dciodvfy
def test_outputs_of_a_real_analysis(tmp_path):
    models = write_models(tmp_path / "models")
    factory.write_ct_series(tmp_path / "ct", n_slices=24, shape=(48, 48), pixel_spacing=(6.0, 6.0),
                            spacing=10.0, hu=chest_hu(24))
    config = load_config(env={"APPLIANCE_ANALYSIS__MODELS_DIR": str(models),
                              "APPLIANCE_ANALYSIS__BACKEND": "onnxruntime",
                              "APPLIANCE_ANALYSIS__THREADS": "1"})
    with Analyzer(config) as analyzer:
        analysis = analyzer.analyze(tmp_path / "ct")
    assert analysis.result["regions"]["whole"]["ggo_ml"] > 0
    paths = write_dicom_outputs(analysis, tmp_path / "out")
    check_with_dciodvfy(paths)
    seg = hd.seg.segread(paths[0])
    assert np.array_equal(seg_pixels_by_instance(seg, analysis.info), expected_stack(analysis))
    sr = hd.sr.srread(paths[1])
    [rul] = sr.content.get_volumetric_roi_measurement_groups(
        tracking_uid=tracking_uid(str(seg.SOPInstanceUID), SEGMENT_BY_NAME["RUL"].number))
    assert measurements(rul) == expected_region(analysis.result["regions"]["RUL"])
    assert [m["version"] for m in analysis.result["models"]] == ["0.0.0-test"] * 2
