"""appliance.dicom.series: real DICOM written by pydicom (tests/dicom_factory.py) and the real
scans in /work/shared/data/real (skipped where that folder is absent)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.uid import (
    UID,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)

from appliance.dicom.series import SelectionRules, SeriesInfo, SeriesRefused, load_series
from appliance.volume import CANONICAL_DIRECTION
from tests import dicom_factory as factory
from tests.dicom_factory import AXIAL, CORONAL, SAGITTAL, phantom_hu
from tests.paths import REAL  # noqa: E402

needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real scans not present at {REAL}")
RULES = SelectionRules()


def expected_hu(hu: np.ndarray, rules: SelectionRules = RULES) -> np.ndarray:
    """The loader's HU convention applied to the factory's exact HU."""
    out = np.where(hu <= rules.padding_hu_max, rules.air_hu, hu)
    return np.clip(out, *rules.hu_range)


def rotation_about_x(deg: float) -> tuple[float, ...]:
    t = math.radians(deg)
    return (1.0, 0.0, 0.0, 0.0, math.cos(t), math.sin(t))


def one_line(exc: pytest.ExceptionInfo[SeriesRefused]) -> str:
    text = str(exc.value)
    assert text and "\n" not in text
    return text


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("file_names", ["ordered", "shuffled", "reversed"])
def test_axial_series_sorted_by_position_with_dicom_spacing(tmp_path, file_names):
    written = factory.write_ct_series(
        tmp_path, shape=(20, 28), pixel_spacing=(0.5, 0.8), spacing=1.25, file_names=file_names
    )
    volume, info = load_series(tmp_path)
    assert volume.shape == (24, 20, 28)
    assert volume.array.dtype == np.int16
    assert volume.spacing == pytest.approx((1.25, 0.5, 0.8))
    assert volume.origin == pytest.approx(tuple(written.positions[0]))
    np.testing.assert_allclose(volume.direction, CANONICAL_DIRECTION, atol=1e-9)
    np.testing.assert_array_equal(volume.array, expected_hu(written.hu))
    assert info.files == tuple(str(p) for p in written.paths)
    assert info.sop_instance_uids == written.sop_instance_uids
    assert info.frame_numbers == (None,) * 24


@pytest.mark.parametrize(
    "orientation",
    [
        AXIAL,
        (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
        (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
        rotation_about_x(20),
    ],
    ids=["HFS", "flipped-rows", "prone", "oblique-20"],
)
def test_voxel_positions_match_the_dicom_definition(tmp_path, orientation):
    """Voxel (k, i, j) sits at IPP_k + j * col_spacing * IOP[0:3] + i * row_spacing * IOP[3:6]."""
    factory.write_ct_series(
        tmp_path, shape=(20, 28), pixel_spacing=(0.5, 0.8), orientation=orientation,
        file_names="shuffled",
    )  # fmt: skip
    volume, info = load_series(tmp_path)
    iop = np.array(orientation)
    normal = np.cross(iop[:3], iop[3:])
    ipps = np.array([pydicom.dcmread(f).ImagePositionPatient for f in info.files], dtype=float)
    assert np.all(np.diff(ipps @ normal) > 0), "axis 0 must ascend along the slice normal"
    for k, i, j in [(0, 0, 0), (5, 3, 7), (23, 19, 27), (11, 0, 27)]:
        truth = ipps[k] + j * 0.8 * iop[:3] + i * 0.5 * iop[3:]
        np.testing.assert_allclose(volume.position((k, i, j)), truth, atol=1e-3)


def test_oblique_within_limit_keeps_its_true_direction(tmp_path):
    factory.write_ct_series(tmp_path, orientation=rotation_about_x(20))
    volume, _ = load_series(tmp_path)
    t = math.radians(20)
    np.testing.assert_allclose(volume.direction[0], [0, -math.sin(t), math.cos(t)], atol=1e-6)
    np.testing.assert_allclose(volume.direction[1], [0, math.cos(t), math.sin(t)], atol=1e-6)
    assert volume.spacing[0] == pytest.approx(2.0)


def test_small_gantry_tilt_loads_with_spacing_along_the_normal(tmp_path):
    factory.write_ct_series(tmp_path, tilt_deg=3.0)
    volume, _ = load_series(tmp_path)
    assert volume.spacing[0] == pytest.approx(2.0 * math.cos(math.radians(3.0)), rel=1e-4)


# ----------------------------------------------------------------------------- pixels


@pytest.mark.parametrize(
    ("syntax", "signed"),
    [(s, False) for s in (*factory.NATIVE_SYNTAXES, *factory.COMPRESSED_SYNTAXES)]
    + [(JPEGLSLossless, True), (JPEG2000Lossless, True), (JPEGLosslessSV1, True)],
    ids=lambda v: UID(v).keyword if isinstance(v, str) else ("signed" if v else "unsigned"),
)
def test_transfer_syntaxes_decode_to_the_same_hu(tmp_path, syntax, signed):
    extra = {"signed": True, "intercept": 0.0} if signed else {}
    written = factory.write_ct_series(tmp_path, transfer_syntax=syntax, **extra)
    assert pydicom.dcmread(written.paths[0]).file_meta.TransferSyntaxUID == syntax
    volume, _ = load_series(tmp_path)
    np.testing.assert_array_equal(volume.array, expected_hu(written.hu))


def test_rescale_with_fractional_slope_gives_exact_float32(tmp_path):
    hu = phantom_hu(24, (32, 32))
    hu[:, ::2, :] += 0.5
    written = factory.write_ct_series(tmp_path, hu=hu, slope=0.5, intercept=-1100.0)
    volume, _ = load_series(tmp_path)
    assert volume.array.dtype == np.float32
    assert np.any(written.hu % 1 == 0.5), "the test needs half-HU values"
    np.testing.assert_array_equal(volume.array, expected_hu(written.hu).astype(np.float32))


def test_rescale_with_integral_slope_gives_int16(tmp_path):
    written = factory.write_ct_series(tmp_path, slope=2.0, intercept=-2048.0)
    volume, _ = load_series(tmp_path)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, expected_hu(written.hu))


def test_padding_values_become_air_and_hu_is_clipped(tmp_path):
    hu = phantom_hu(24, (32, 32))
    hu[:, -4:, :4] = -3024.0  # GE outside-FOV, also PixelPaddingValue below
    hu[:, -4:, -4:] = -2048.0  # Toshiba outside-FOV, no tag needed
    hu[:, 12, 12] = 4000.0  # above the 12-bit range: clipped
    factory.write_ct_series(
        tmp_path, hu=hu, signed=True, intercept=-1024.0, padding_value=-2000
    )
    volume, _ = load_series(tmp_path)
    assert np.all(volume.array[:, -4:, :4] == -1024)
    assert np.all(volume.array[:, -4:, -4:] == -1024)
    assert np.all(volume.array[:, 12, 12] == 3071)
    inside = np.ones(hu.shape, bool)
    inside[:, -4:, :4] = inside[:, -4:, -4:] = inside[:, 12, 12] = False
    np.testing.assert_array_equal(volume.array[inside], np.clip(hu[inside], -1024, 3071))


def test_pixel_padding_value_is_air_even_above_the_padding_hu(tmp_path):
    """With a wide HU range, only PixelPaddingValue marks -1500 as padding; -1200 stays."""
    rules = SelectionRules(hu_range=(-3000, 3071), padding_hu_max=-2500)
    hu = phantom_hu(24, (32, 32))
    hu[:, :2, :] = -1500.0
    hu[:, 2, :] = -1200.0
    factory.write_ct_series(tmp_path, hu=hu, signed=True, intercept=0.0, padding_value=-1500)
    volume, _ = load_series(tmp_path, rules=rules)
    assert np.all(volume.array[:, :2, :] == -1024)
    assert np.all(volume.array[:, 2, :] == -1200)


def test_progress_reports_every_slice_and_threads_are_checked(tmp_path):
    factory.write_ct_series(tmp_path, n_slices=21)
    calls: list[tuple[int, int]] = []
    volume, _ = load_series(tmp_path, progress=lambda done, total: calls.append((done, total)),
                            threads=3)  # fmt: skip
    assert calls[0] == (0, 21) and calls[-1] == (21, 21)
    assert [d for d, _ in calls] == list(range(22))
    single, _ = load_series(tmp_path, threads=1)
    np.testing.assert_array_equal(single.array, volume.array)
    with pytest.raises(ValueError, match="`threads` must be a positive integer, got 0"):
        load_series(tmp_path, threads=0)
    with pytest.raises(TypeError, match="`rules` must be a SelectionRules"):
        load_series(tmp_path, rules={"min_slices": 3})  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- Enhanced CT


@pytest.mark.parametrize("per_frame", [False, True], ids=["shared-orientation", "per-frame"])
def test_enhanced_ct_multiframe_loads_like_classic(tmp_path, per_frame):
    order = list(np.random.default_rng(3).permutation(24))
    enhanced = factory.write_enhanced_ct(
        tmp_path / "enh" / "ct.dcm", frame_order=order, orientation_per_frame=per_frame,
        pixel_spacing=(0.6, 0.9), transfer_syntax=RLELossless, series_uid="1.2.3.4.5",
    )  # fmt: skip
    classic = factory.write_ct_series(tmp_path / "classic", pixel_spacing=(0.6, 0.9))
    volume, info = load_series(tmp_path / "enh")
    reference, _ = load_series(tmp_path / "classic")
    np.testing.assert_array_equal(volume.array, expected_hu(enhanced.hu))
    np.testing.assert_array_equal(volume.array, reference.array)
    assert volume.spacing == reference.spacing == pytest.approx((2.0, 0.6, 0.9))
    assert volume.origin == reference.origin
    np.testing.assert_allclose(volume.direction, reference.direction)
    assert info.frame_numbers == enhanced.frame_numbers
    assert info.frame_numbers[0] == order.index(0) + 1
    assert info.files == (str(tmp_path / "enh" / "ct.dcm"),) * 24
    assert set(info.sop_instance_uids) == {enhanced.sop_instance_uids[0]}
    assert info.series_instance_uid == "1.2.3.4.5"
    assert (info.kernel, info.kvp, info.slice_thickness_mm) == ("LUNG", 120.0, 2.0)
    assert info.acquired_at == "2020-02-01T10:22:31"
    assert classic.series_uid != info.series_instance_uid


# ----------------------------------------------------------------------------- selection


def test_localizers_and_non_images_are_ignored(tmp_path):
    written = factory.write_ct_series(tmp_path / "ct")
    factory.write_ct_slice(  # a localizer inside the same series
        tmp_path / "ct" / "scout.dcm", written, 0, orientation=CORONAL,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )  # fmt: skip
    factory.write_ct_series(tmp_path / "scout", n_slices=2, orientation=CORONAL,
                            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))  # fmt: skip
    factory.write_sr(tmp_path / "sr.dcm")
    factory.write_garbage(tmp_path / "notes.txt", text="not dicom")
    factory.write_garbage(tmp_path / "ct" / "DICOMDIR.bak")
    volume, info = load_series(tmp_path)
    assert info.series_instance_uid == written.series_uid
    np.testing.assert_array_equal(volume.array, expected_hu(written.hu))


def test_the_thin_lung_kernel_series_is_chosen_and_series_uid_forces_another(tmp_path):
    thick = factory.write_ct_series(tmp_path / "a", spacing=5.0, kernel="STANDARD")
    soft = factory.write_ct_series(tmp_path / "b", n_slices=40, spacing=1.0, kernel="B31f")
    lung = factory.write_ct_series(tmp_path / "c", n_slices=30, spacing=1.0, kernel="B70f")
    derived = factory.write_ct_series(tmp_path / "d", n_slices=50, spacing=1.0, kernel="LUNG",
                                      image_type=("DERIVED", "SECONDARY", "AXIAL"))  # fmt: skip
    factory.write_sr(tmp_path / "report.dcm")
    _, info = load_series(tmp_path)
    assert info.series_instance_uid == lung.series_uid
    assert info.kernel == "B70f"
    for forced in (thick, soft, derived):
        volume, info = load_series(tmp_path, series_uid=forced.series_uid)
        assert info.series_instance_uid == forced.series_uid
        assert volume.shape[0] == forced.spec.n_slices


def test_a_full_series_beats_a_thinner_partial_one(tmp_path):
    full = factory.write_ct_series(tmp_path, spacing=2.0)
    factory.write_ct_series(tmp_path / "partial", n_slices=5, spacing=0.5)
    _, info = load_series(tmp_path)
    assert info.series_instance_uid == full.series_uid


def test_identical_duplicate_files_are_dropped(tmp_path):
    written = factory.write_ct_series(tmp_path)
    shutil.copy(written.paths[5], tmp_path / "copy-of-6.dcm")
    factory.write_ct_slice(tmp_path / "same-pixels-new-uid.dcm", written, 9)
    volume, info = load_series(tmp_path)
    assert volume.shape[0] == 24
    np.testing.assert_array_equal(volume.array, expected_hu(written.hu))
    assert len(set(info.files)) == 24


def test_missing_modality_is_ct_when_the_sop_class_is_ct(tmp_path):
    written = factory.write_ct_series(tmp_path / "ct", modality=None)
    _, info = load_series(tmp_path / "ct")
    assert info.modality == "CT" and info.series_instance_uid == written.series_uid
    factory.write_ct_series(tmp_path / "mr", modality=None, sop_class_uid=MRImageStorage)
    with pytest.raises(SeriesRefused, match=r"^not CT: no CT series in folder .*no Modality"):
        load_series(tmp_path / "mr")


def test_series_info_fields(tmp_path):
    written = factory.write_ct_series(tmp_path, kernel="FC86", series_description="Lung 1.0")
    _, info = load_series(tmp_path)
    assert isinstance(info, SeriesInfo)
    assert (info.patient_id, info.patient_name, info.patient_sex) == ("P001", "Test^Patient", "M")
    assert (info.patient_age_years, info.patient_birth_date) == (52, "1968-01-01")
    assert (info.study_date, info.acquired_at) == ("2020-02-01", "2020-02-01T10:22:31")
    assert info.study_instance_uid == written.spec.study_uid
    assert (info.manufacturer, info.kernel, info.kvp) == ("ACME", "FC86", 120.0)
    assert (info.slice_thickness_mm, info.series_description) == (2.0, "Lung 1.0")
    assert info.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert info.frame_of_reference_uid == written.spec.study_uid + ".9"
    factory.write_ct_series(tmp_path / "x", patient_age=None, patient_birth_date="19680615")
    _, info = load_series(tmp_path / "x")
    assert info.patient_age_years == 51  # birthday after the study date


def test_selection_rules_are_validated_and_match_lung_kernels():
    with pytest.raises(ValueError, match="`min_slices` must be an integer >= 1, got 0"):
        SelectionRules(min_slices=0)
    with pytest.raises(ValueError, match="`max_gap_factor` must be > 1"):
        SelectionRules(max_gap_factor=1.0)
    with pytest.raises(ValueError, match="`max_axial_deviation_deg` must be in"):
        SelectionRules(max_axial_deviation_deg=90)
    lung = ["LUNG", "B70f", "Br64d\\3", "L", "FC86", "YA", "I70f", "Bl57d"]
    other = ["STANDARD", "B31f", "Br38f\\3", "D40s", "FC17", "LA", "SOFT", None, ""]
    assert all(RULES.is_lung_kernel(k) for k in lung)
    assert not any(RULES.is_lung_kernel(k) for k in other)


# ----------------------------------------------------------------------------- refusals


def test_refuses_missing_path_empty_folder_and_files_that_are_not_dicom(tmp_path):
    with pytest.raises(SeriesRefused, match=r"^path not found: .*nowhere$"):
        load_series(tmp_path / "nowhere")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(SeriesRefused, match=r"^folder .*empty is empty$"):
        load_series(tmp_path / "empty")
    for i in range(3):
        factory.write_garbage(tmp_path / "junk" / f"f{i}.dcm", seed=i)
    with pytest.raises(SeriesRefused, match=r"^not DICOM: none of the 3 files in folder .*junk"):
        load_series(tmp_path / "junk")
    with pytest.raises(SeriesRefused, match=r"^not DICOM: .*f0\.dcm is not a DICOM file$"):
        load_series(tmp_path / "junk" / "f0.dcm")
    with pytest.raises(SeriesRefused, match="^no files given$"):
        load_series([])
    with pytest.raises(SeriesRefused, match=r"^file not found: .*gone\.dcm$"):
        load_series([tmp_path / "junk" / "f0.dcm", tmp_path / "gone.dcm"])
    with pytest.raises(TypeError, match="`source` must be a path or a sequence of paths"):
        load_series(42)  # type: ignore[arg-type]


def test_a_list_of_files_loads_like_the_folder(tmp_path):
    written = factory.write_ct_series(tmp_path, file_names="shuffled")
    factory.write_garbage(tmp_path / "junk.bin")
    volume, info = load_series([*written.paths[::-1], tmp_path / "junk.bin"])
    np.testing.assert_array_equal(volume.array, expected_hu(written.hu))
    assert info.files == tuple(str(p) for p in written.paths)


def test_refuses_a_folder_without_images(tmp_path):
    factory.write_sr(tmp_path / "a.dcm")
    factory.write_sr(tmp_path / "b.dcm")
    factory.write_garbage(tmp_path / "c.bin")
    with pytest.raises(SeriesRefused) as exc:
        load_series(tmp_path)
    assert one_line(exc) == (
        f"no usable image series in folder {tmp_path}: 2 without an image "
        "(2 Basic Text SR Storage); 1 non-DICOM files"
    )


def test_refuses_only_localizers(tmp_path):
    scout = factory.write_ct_series(
        tmp_path, n_slices=2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")
    )
    with pytest.raises(SeriesRefused, match=r"^no usable image series .*2 localizer images$"):
        load_series(tmp_path)
    with pytest.raises(SeriesRefused, match=r"holds only localizer images$"):
        load_series(tmp_path, series_uid=scout.series_uid)


def test_refuses_missing_pixel_data(tmp_path):
    written = factory.write_ct_series(tmp_path, pixels=False)
    with pytest.raises(SeriesRefused) as exc:
        load_series(tmp_path)
    assert one_line(exc).startswith("no pixel data: ")
    assert written.series_uid in str(exc.value)


def test_refuses_undecodable_pixel_data(tmp_path):
    written = factory.write_ct_series(tmp_path, transfer_syntax=JPEGLSLossless)
    ds = pydicom.dcmread(written.paths[7])
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7\x00\x0bnot a codestream"])
    ds.save_as(written.paths[7])
    with pytest.raises(SeriesRefused) as exc:
        load_series(tmp_path)
    assert one_line(exc).startswith(
        f"cannot decode the pixel data of {written.paths[7]} (JPEG-LS Lossless Image Compression)"
    )
    assert "pyjpegls: " in str(exc.value)  # the decoder's own reason is kept


def test_refuses_series_that_are_not_ct(tmp_path):
    mr = factory.write_ct_series(tmp_path / "mr", modality="MR", sop_class_uid=MRImageStorage)
    with pytest.raises(SeriesRefused) as exc:
        load_series(tmp_path / "mr")
    assert one_line(exc) == (
        f"not CT: no CT series in folder {tmp_path / 'mr'}; found series {mr.series_uid} "
        "(MR, 24 images)"
    )
    factory.write_ct_series(tmp_path / "ct")
    with pytest.raises(SeriesRefused, match=rf"^not CT: series {mr.series_uid} is MR$"):
        load_series(tmp_path, series_uid=mr.series_uid)
    with pytest.raises(SeriesRefused, match=r"^series 9\.9\.9 not found in folder .*series found"):
        load_series(tmp_path, series_uid="9.9.9")


def test_refuses_too_few_slices(tmp_path):
    written = factory.write_ct_series(tmp_path / "one", n_slices=12)
    with pytest.raises(SeriesRefused) as exc:
        load_series(tmp_path / "one")
    assert one_line(exc) == (
        f"too few slices: series {written.series_uid} has 12, fewer than the 20 needed"
    )
    volume, _ = load_series(tmp_path / "one", rules=SelectionRules(min_slices=12))
    assert volume.shape[0] == 12
    factory.write_ct_series(tmp_path / "two" / "a", n_slices=3)
    factory.write_ct_series(tmp_path / "two" / "b", n_slices=5)
    with pytest.raises(SeriesRefused, match=r"^too few slices: 2 series in .*none with 20 or more"):
        load_series(tmp_path / "two")


def test_refuses_missing_slices(tmp_path):
    written = factory.write_ct_series(tmp_path, gaps=(10,))
    with pytest.raises(SeriesRefused) as exc:
        load_series(tmp_path)
    assert one_line(exc) == (
        f"series {written.series_uid} has a gap of 4.0 mm between slices 10 and 11 of 23 "
        "(median spacing 2.0 mm): missing slices"
    )


def test_refuses_irregular_spacing(tmp_path):
    factory.write_ct_series(tmp_path, position_offsets_mm={10: 0.6})
    with pytest.raises(SeriesRefused, match=r"irregular slice spacing: 2\.60 mm between slices "
                       r"10 and 11 of 24 \(median spacing 2\.00 mm\)$"):  # fmt: skip
        load_series(tmp_path)


def test_refuses_different_images_at_one_position(tmp_path):
    written = factory.write_ct_series(tmp_path)
    other = written.spec.hu if written.spec.hu is not None else phantom_hu(24, (32, 32))
    factory.write_ct_slice(tmp_path / "z.dcm", written, 5, hu=other + 10.0)
    with pytest.raises(SeriesRefused) as exc:
        load_series(tmp_path)
    assert one_line(exc).startswith(
        f"series {written.series_uid} has different images at the same position (slice 6, "
        "-290.0 mm along the normal): "
    )


def test_refuses_mixed_orientations(tmp_path):
    written = factory.write_ct_series(tmp_path)
    factory.write_ct_slice(written.paths[3], written, 3, orientation=rotation_about_x(10))
    with pytest.raises(SeriesRefused, match=r"mixes 2 slice orientations \(slice normals up to "
                       r"10\.0 degrees apart\)$"):  # fmt: skip
        load_series(tmp_path)


@pytest.mark.parametrize(
    ("orientation", "angle", "plane"),
    [(CORONAL, "90.0", "coronal"), (SAGITTAL, "90.0", "sagittal"),
     (rotation_about_x(40), "40.0", "oblique axial")],
)  # fmt: skip
def test_refuses_non_axial_series(tmp_path, orientation, angle, plane):
    written = factory.write_ct_series(tmp_path, orientation=orientation)
    with pytest.raises(SeriesRefused) as exc:
        load_series(tmp_path)
    assert one_line(exc) == (
        f"series {written.series_uid} is not axial: its slice normal is {angle} degrees from "
        f"the head-foot axis ({plane}); only axial series (within 30 degrees) are analysed"
    )


@pytest.mark.parametrize(
    ("kwargs", "degrees", "source"),
    [({"tilt_deg": 10.0}, "10.0", "slice positions"),
     ({"shear_deg": 8.0}, "8.0", "slice positions"),
     ({"gantry_tilt_tag": -12.0}, "12.0", "GantryDetectorTilt")],
)  # fmt: skip
def test_refuses_gantry_tilt(tmp_path, kwargs, degrees, source):
    factory.write_ct_series(tmp_path, **kwargs)
    with pytest.raises(SeriesRefused) as exc:
        load_series(tmp_path)
    assert f"has a gantry tilt of {degrees} degrees ({source}" in one_line(exc)
    assert one_line(exc).endswith("at most 5 is accepted")


def test_refuses_mixed_image_sizes_and_pixel_spacings(tmp_path):
    written = factory.write_ct_series(tmp_path / "size")
    factory.write_ct_slice(written.paths[4], written, 4, shape=(16, 16),
                           hu=phantom_hu(24, (16, 16)))  # fmt: skip
    with pytest.raises(SeriesRefused, match=r"mixes image sizes: 32x32 \(23 slices\) and "
                       r"16x16 \(1 slice\)$"):  # fmt: skip
        load_series(tmp_path / "size")
    written = factory.write_ct_series(tmp_path / "spacing")
    factory.write_ct_slice(written.paths[4], written, 4, pixel_spacing=(0.8, 0.8))
    with pytest.raises(SeriesRefused, match=r"mixes pixel spacings: 0\.700x0\.700 mm and "
                       r"0\.800x0\.800 mm$"):  # fmt: skip
        load_series(tmp_path / "spacing")


# ----------------------------------------------------------------------------- real scans

COVID_CT_MD = ["covid-P001", "normal-normal001", "normal-normal002", "cap-cap001"]


def header_geometry(folder: Path) -> tuple[int, tuple[float, float, float], float]:
    """Slice count, spacing and lowest z, read independently from the headers."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    z = np.sort([float(h.ImagePositionPatient[2]) for h in headers])
    ps = [float(v) for v in headers[0].PixelSpacing]
    return len(headers), (float(np.median(np.diff(z))), ps[0], ps[1]), float(z[0])


@needs_real
@pytest.mark.parametrize("case", COVID_CT_MD)
def test_real_covid_ct_md_series(case):
    folder = REAL / "covid-ct-md" / case
    n, spacing, z0 = header_geometry(folder)
    volume, info = load_series(folder)
    assert volume.shape == (n, 512, 512)
    if case == "covid-P001":
        assert volume.shape == (148, 512, 512)
    assert volume.spacing == pytest.approx(spacing)
    assert volume.spacing[0] == pytest.approx(2.0)
    assert volume.origin[2] == pytest.approx(z0)
    np.testing.assert_allclose(volume.direction, CANONICAL_DIRECTION)
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
         for f in info.files]  # fmt: skip
    assert np.all(np.diff(z) > 0)
    middle = volume.array[n // 2]
    assert -1010 <= np.median(middle[(middle >= -1100) & (middle <= -900)]) <= -960
    assert -40 <= np.median(middle[(middle >= -100) & (middle <= 100)]) <= 40
    k = n // 3  # one slice against an independent decode
    ds = pydicom.dcmread(info.files[k])
    raw = pixel_array(ds).astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.array[k], np.clip(raw, -1024, 3071))
    assert info.patient_sex in ("M", "F") and info.kvp == 110.0


@needs_real
def test_real_abdomen_jpeg2000_overlapping_slices_loads():
    folder = REAL / "totalsegmentator-examples" / "abdomen-ct-dicom-20"
    volume, info = load_series(folder)
    assert volume.shape == (20, 512, 512)
    assert volume.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    assert info.slice_thickness_mm == 3.0
    assert info.series_instance_uid == ""  # anonymised away in the source
    assert len(set(info.sop_instance_uids)) == 20  # from the file meta information
    ts = pydicom.dcmread(info.files[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert ts == JPEG2000Lossless


@needs_real
def test_real_lidc_pair_without_modality():
    folder = REAL / "other" / "lungmask-testdata-lidc"
    with pytest.raises(SeriesRefused) as exc:
        load_series(folder)
    assert one_line(exc).startswith("too few slices: series ")
    assert one_line(exc).endswith("has 2, fewer than the 20 needed")
    volume, info = load_series(folder, rules=SelectionRules(min_slices=2))
    assert volume.shape == (2, 512, 512) and volume.spacing[0] == pytest.approx(1.0)
    assert info.modality == "CT" and volume.array.min() == -1024  # stored -2048: air


TCIA_PATIENTS = sorted((REAL / "tcia-covid" / "COVID-19-NY-SBU").glob("*/"))


@needs_real
@pytest.mark.parametrize("folder", TCIA_PATIENTS, ids=lambda p: p.name)
def test_real_tcia_single_slices_are_refused(folder):
    with pytest.raises(SeriesRefused) as exc:
        load_series(folder)
    assert one_line(exc).startswith("too few slices: 6 series in folder")
    with pytest.raises(SeriesRefused) as exc:
        load_series(folder / "coronal", rules=SelectionRules(min_slices=1))
    assert " is not axial: " in one_line(exc) and "(coronal)" in one_line(exc)


@needs_real
def test_real_ge_slice_padding_minus_3024_becomes_air():
    path = next(p for p in sorted((REAL / "tcia-covid").rglob("axial/*.dcm"))
                if pydicom.dcmread(p, stop_before_pixels=True).Manufacturer.startswith("GE"))
    ds = pydicom.dcmread(path)
    hu = pixel_array(ds).astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu.min() <= -3000, "the test needs a slice with -3024 padding"
    volume, _ = load_series(path, rules=SelectionRules(min_slices=1))
    np.testing.assert_array_equal(volume.array[0], np.clip(np.where(hu <= -2000, -1024, hu),
                                                           -1024, 3071))  # fmt: skip
    assert volume.spacing[0] == pytest.approx(float(ds.get("SpacingBetweenSlices") or 1.0))
