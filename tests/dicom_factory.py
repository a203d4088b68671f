"""Small real DICOM files for tests, written with pydicom.

``write_ct_series`` writes a classic CT series (one file per slice) whose geometry, headers and
encoding are set by keyword (see :class:`CTSpec`); ``write_enhanced_ct`` writes the same content
as one Enhanced CT multi-frame file; ``write_sr`` and ``write_garbage`` give the non-image and
non-DICOM neighbours a real folder has. Each writer returns what a test needs to check a loader:
the paths and the expected HU volume in order of ascending position along the slice normal.

Pixel encodings: native (explicit/implicit little endian, deflated), RLE, JPEG-LS and JPEG 2000
through pydicom's encoders (``pydicom``/``pyjpegls``/``pylibjpeg-openjpeg``), and JPEG lossless
(process 14, first-order prediction) through :func:`encode_jpeg_lossless` here, since pydicom has
no encoder for it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    BasicTextSRStorage,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)

NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
ENCODER_PLUGINS = {
    RLELossless: "pydicom",
    JPEGLSLossless: "pyjpegls",
    JPEG2000Lossless: "pylibjpeg",
}
"""Transfer syntaxes written by pydicom's ``compress`` (with this plugin)."""
COMPRESSED_SYNTAXES = (*ENCODER_PLUGINS, JPEGLosslessSV1)


@dataclass(frozen=True)
class CTSpec:
    """Everything about a synthetic CT series that tests vary. Slice ``k`` (0-based) sits at
    ``origin + k * spacing * normal`` (plus ``shear_deg``/``position_offsets_mm``), with
    ``normal = cross(row, col)`` of ``orientation`` after ``tilt_deg``."""

    n_slices: int = 24
    shape: tuple[int, int] = (32, 32)
    """(rows, columns)"""
    spacing: float = 2.0
    """Step between slice positions (mm), along the table for a tilted gantry."""
    pixel_spacing: tuple[float, float] = (0.7, 0.7)
    """DICOM order: (between rows, between columns)."""
    thickness: float | None = None
    """SliceThickness; None writes ``spacing``."""
    origin: tuple[float, float, float] = (-11.2, -30.0, -300.0)
    orientation: tuple[float, ...] = AXIAL
    tilt_deg: float = 0.0
    """Gantry tilt: the image plane turns about the row direction while positions still
    advance along the untilted normal (the table), so positions are sheared against the
    tilted normal by this angle."""
    gantry_tilt_tag: float | None = None
    """GantryDetectorTilt written; None leaves the tag out."""
    shear_deg: float = 0.0
    """GE-style shear: the plane stays, positions also advance along the column direction."""
    position_offsets_mm: dict[int, float] = field(default_factory=dict)
    """Extra displacement along the slice direction for some slice indices."""
    gaps: tuple[int, ...] = ()
    """Slice indices not written (missing slices)."""
    modality: str | None = "CT"
    sop_class_uid: str = CTImageStorage
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    series_uid: str | None = None
    """None: a new UID."""
    study_uid: str = "1.2.826.0.1.3680043.8.498.1"
    series_description: str = "Chest 1.0 lung"
    kernel: str | None = "LUNG"
    patient_id: str = "P001"
    patient_name: str = "Test^Patient"
    patient_sex: str = "M"
    patient_age: str | None = "052Y"
    patient_birth_date: str = "19680101"
    study_date: str = "20200201"
    acquisition_time: str = "102231.250"
    manufacturer: str = "ACME"
    kvp: float = 120.0
    transfer_syntax: str = ExplicitVRLittleEndian
    slope: float = 1.0
    intercept: float = -1024.0
    signed: bool = False
    """PixelRepresentation 1 (int16 stored values)."""
    bits_stored: int = 16
    padding_value: int | None = None
    """PixelPaddingValue written (stored-value units); the pixels come from ``hu``."""
    hu: np.ndarray | None = None
    """HU volume (n_slices, rows, cols) before ``gaps``; None: :func:`phantom_hu`."""
    pixels: bool = True
    """False leaves PixelData out."""
    file_names: str = "ordered"
    """``ordered`` (IM0001.dcm... by position), ``shuffled`` (names and InstanceNumbers in a
    random order) or ``reversed`` (InstanceNumber 1 at the top)."""
    seed: int = 0


@dataclass(frozen=True)
class WrittenSeries:
    """What was written, in order of ascending position along the slice normal."""

    series_uid: str
    paths: tuple[Path, ...]
    sop_instance_uids: tuple[str, ...]
    positions: np.ndarray
    """(n, 3) ImagePositionPatient per slice."""
    hu: np.ndarray
    """(n, rows, cols) float64: stored values x slope + intercept, exactly as written."""
    spec: CTSpec
    frame_numbers: tuple[int | None, ...] = ()


def phantom_hu(n_slices: int, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A small chest-like HU volume in which every slice, row and column differs: air around
    a soft-tissue body, two lungs whose HU changes with the slice, a bone mark on the
    patient's right-anterior side (low row and column indices) and integer noise."""
    rows, cols = shape
    r = (np.arange(rows)[:, None] + 0.5) / rows - 0.5
    c = (np.arange(cols)[None, :] + 0.5) / cols - 0.5
    rng = np.random.default_rng(seed)
    hu = np.empty((n_slices, rows, cols))
    for k in range(n_slices):
        img = np.full((rows, cols), -1000.0)
        img[(r / 0.42) ** 2 + (c / 0.46) ** 2 <= 1] = 40.0
        for side in (-0.2, 0.2):
            img[(r / 0.3) ** 2 + ((c - side) / 0.15) ** 2 <= 1] = -850.0 + 3 * k
        img[: max(1, rows // 8), : max(1, cols // 8)] = 700.0 + k
        hu[k] = img + rng.integers(-20, 21, size=(rows, cols))
    return hu


def write_ct_series(folder: str | Path, **kwargs: object) -> WrittenSeries:
    """Write a classic CT series (one file per slice) into ``folder``; see :class:`CTSpec`."""
    spec = CTSpec(**kwargs)  # type: ignore[arg-type]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = spec.series_uid or generate_uid()
    geometry = _geometry(spec)
    stored, hu = _stored_and_hu(spec)
    keep = [k for k in range(spec.n_slices) if k not in set(spec.gaps)]
    rng = np.random.default_rng(spec.seed + 1)
    numbers = list(range(1, len(keep) + 1))
    if spec.file_names == "shuffled":
        rng.shuffle(numbers)
    elif spec.file_names == "reversed":
        numbers.reverse()
    elif spec.file_names != "ordered":
        raise ValueError(
            f"`file_names` must be ordered, shuffled or reversed, got {spec.file_names!r}"
        )
    paths, uids = [], []
    for n, k in zip(numbers, keep, strict=True):
        ds = _ct_dataset(spec, series_uid, geometry, k, n)
        if spec.pixels:
            _set_pixels(ds, stored[k][None], spec)
        shuffled = spec.file_names == "shuffled"
        name = f"{rng.integers(1 << 40):x}.dcm" if shuffled else f"IM{n:04d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uids.append(ds.SOPInstanceUID)
    return WrittenSeries(
        series_uid=series_uid,
        paths=tuple(paths),
        sop_instance_uids=tuple(uids),
        positions=np.array([geometry.positions[k] for k in keep]),
        hu=hu[keep],
        spec=spec,
        frame_numbers=(None,) * len(keep),
    )


def write_ct_slice(path: str | Path, series: WrittenSeries, index: int, **changes: object) -> Path:
    """Write slice ``index`` of an existing series again (a new SOPInstanceUID) with some
    CTSpec fields changed, e.g. ``shape``, ``pixel_spacing``, ``orientation``, ``hu``, to make
    one odd slice; ``position`` (3 floats) overrides ImagePositionPatient."""
    position = changes.pop("position", None)
    spec = dataclasses.replace(
        series.spec, series_uid=series.series_uid, **changes  # type: ignore[arg-type]
    )
    geometry = _geometry(spec)
    stored, _ = _stored_and_hu(spec)
    ds = _ct_dataset(spec, series.series_uid, geometry, index, index + 1)
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]  # type: ignore[union-attr]
    if spec.pixels:
        _set_pixels(ds, stored[index][None], spec)
    ds.save_as(Path(path), enforce_file_format=True)
    return Path(path)


def write_enhanced_ct(
    path: str | Path,
    *,
    frame_order: Sequence[int] | None = None,
    orientation_per_frame: bool = False,
    **kwargs: object,
) -> WrittenSeries:
    """Write the series as one Enhanced CT file: shared PixelMeasures, PixelValueTransformation,
    CTImageFrameType (and PlaneOrientation unless ``orientation_per_frame``), per-frame
    PlanePosition. ``frame_order[j]`` is the slice index stored as frame ``j + 1``."""
    spec = CTSpec(sop_class_uid=EnhancedCTImageStorage, **kwargs)  # type: ignore[arg-type]
    series_uid = spec.series_uid or generate_uid()
    geometry = _geometry(spec)
    stored, hu = _stored_and_hu(spec)
    order = [int(k) for k in frame_order] if frame_order is not None else list(range(spec.n_slices))
    if sorted(order) != list(range(spec.n_slices)):
        raise ValueError(f"`frame_order` must be a permutation of range({spec.n_slices})")
    ds = _base_dataset(spec, series_uid, EnhancedCTImageStorage)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = spec.n_slices
    ds.AcquisitionDateTime = spec.study_date + spec.acquisition_time
    ds.ContentQualification = "PRODUCT"
    shared = Dataset()
    shared.PixelMeasuresSequence = [_item(PixelSpacing=list(spec.pixel_spacing),
                                          SliceThickness=spec.thickness or spec.spacing)]
    shared.PixelValueTransformationSequence = [
        _item(RescaleSlope=spec.slope, RescaleIntercept=spec.intercept, RescaleType="HU")
    ]
    shared.CTImageFrameTypeSequence = [_item(FrameType=list(spec.image_type) + ["NONE"])]
    shared.CTReconstructionSequence = [_item(ConvolutionKernel=spec.kernel or "")]
    shared.CTXRayDetailsSequence = [_item(KVP=spec.kvp)]
    if not orientation_per_frame:
        shared.PlaneOrientationSequence = [_item(ImageOrientationPatient=list(geometry.iop))]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for j, k in enumerate(order):
        item = Dataset()
        item.PlanePositionSequence = [_item(ImagePositionPatient=list(geometry.positions[k]))]
        item.FrameContentSequence = [
            _item(InStackPositionNumber=int(k) + 1, StackID="1", FrameAcquisitionNumber=j + 1)
        ]
        if orientation_per_frame:
            item.PlaneOrientationSequence = [_item(ImageOrientationPatient=list(geometry.iop))]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    if spec.pixels:
        _set_pixels(ds, stored[order], spec)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    frame_of = {k: j + 1 for j, k in enumerate(order)}
    return WrittenSeries(
        series_uid=series_uid,
        paths=(path,) * spec.n_slices,
        sop_instance_uids=(ds.SOPInstanceUID,) * spec.n_slices,
        positions=np.array(geometry.positions),
        hu=hu,
        spec=spec,
        frame_numbers=tuple(frame_of[k] for k in range(spec.n_slices)),
    )


def write_sr(path: str | Path, series_uid: str | None = None) -> Path:
    """A Basic Text SR instance: DICOM without an image, as PACS folders often hold."""
    ds = Dataset()
    ds.SOPClassUID = BasicTextSRStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "SR"
    ds.PatientID = "P001"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.file_meta = _meta(ds, ExplicitVRLittleEndian)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(Path(path), enforce_file_format=True)
    return Path(path)


def write_garbage(
    path: str | Path, size: int = 4096, seed: int = 0, text: str | None = None
) -> Path:
    """A file that is not DICOM: random bytes, or ``text``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if text is not None:
        path.write_text(text)
    else:
        path.write_bytes(np.random.default_rng(seed).bytes(size))
    return path


def encode_jpeg_lossless(image: np.ndarray, precision: int = 16) -> bytes:
    """JPEG lossless, process 14, selection value 1 (predict from the left; the row above in
    column 0; 2**(P-1) for the first sample), one component, point transform 0. The Huffman
    table gives all 17 difference categories a 5-bit code: valid, just not small."""
    if image.ndim != 2:
        raise ValueError(f"`image` must be 2D, got shape {image.shape}")
    if not 2 <= precision <= 16:
        raise ValueError(f"`precision` must be in 2..16, got {precision}")
    rows, cols = image.shape
    x = image.astype(np.int64) & ((1 << precision) - 1)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]
    pred[1:, 0] = x[:-1, 0]
    pred[1:, 1:] = x[1:, :-1]
    diff = (x - pred) % 65536
    diff = np.where(diff >= 32768, diff - 65536, diff).ravel()
    magnitude = np.abs(diff)
    ssss = np.zeros_like(magnitude)
    nonzero = magnitude > 0
    ssss[nonzero] = np.floor(np.log2(magnitude[nonzero])).astype(np.int64) + 1
    extra = np.where(diff >= 0, diff, diff - 1) & ((1 << ssss) - 1)
    extra = np.where(ssss == 16, 0, extra)  # category 16 (difference 32768) has no extra bits
    n_extra = np.where(ssss == 16, 0, ssss)
    codes = (ssss << n_extra) | extra  # 5-bit Huffman code (= category) then the extra bits
    lengths = 5 + n_extra
    width = int(lengths.max())
    shifts = lengths[:, None] - 1 - np.arange(width)[None, :]
    bits = (codes[:, None] >> np.maximum(shifts, 0)) & 1
    stream = bits[shifts >= 0].astype(np.uint8)
    stream = np.concatenate([stream, np.ones((-stream.size) % 8, dtype=np.uint8)])
    packed = np.packbits(stream).tobytes().replace(b"\xff", b"\xff\x00")

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    size = rows.to_bytes(2, "big") + cols.to_bytes(2, "big")
    sof3 = bytes([precision]) + size + b"\x01\x01\x11\x00"  # 1 component, 1x1 sampling
    counts = [0] * 16
    counts[4] = 17
    dht = b"\x00" + bytes(counts) + bytes(range(17))
    sos = b"\x01\x01\x00" + bytes([1, 0, 0])  # Ss = predictor 1, Se = 0, Ah/Al = 0
    return (
        b"\xff\xd8" + segment(0xC3, sof3) + segment(0xC4, dht) + segment(0xDA, sos)
        + packed + b"\xff\xd9"
    )  # fmt: skip


# ----------------------------------------------------------------------------- internals


@dataclass(frozen=True)
class _Geometry:
    iop: tuple[float, ...]
    positions: list[tuple[float, float, float]]


def _geometry(spec: CTSpec) -> _Geometry:
    row = np.array(spec.orientation[:3], dtype=float)
    col = np.array(spec.orientation[3:], dtype=float)
    table = np.cross(row, col)
    table /= np.linalg.norm(table)
    t = math.radians(spec.tilt_deg)
    tilted_col = math.cos(t) * col + math.sin(t) * table  # the plane turns about the row
    step = table + math.tan(math.radians(spec.shear_deg)) * col
    positions = []
    for k in range(spec.n_slices):
        along = k * spec.spacing + spec.position_offsets_mm.get(k, 0.0)
        p = np.array(spec.origin) + along * step
        positions.append(tuple(float(round(v, 4)) for v in p))
    iop = tuple(float(round(v, 6)) for v in (*row, *tilted_col))
    return _Geometry(iop, positions)


def _stored_and_hu(spec: CTSpec) -> tuple[np.ndarray, np.ndarray]:
    hu = spec.hu if spec.hu is not None else phantom_hu(spec.n_slices, spec.shape, spec.seed)
    if hu.shape != (spec.n_slices, *spec.shape):
        raise ValueError(f"`hu` must have shape {(spec.n_slices, *spec.shape)}, got {hu.shape}")
    stored = np.round((np.asarray(hu, dtype=float) - spec.intercept) / spec.slope)
    lo, hi = (-(1 << (spec.bits_stored - 1)), (1 << (spec.bits_stored - 1)) - 1) if spec.signed \
        else (0, (1 << spec.bits_stored) - 1)
    if stored.min() < lo or stored.max() > hi:
        raise ValueError(
            f"stored values {stored.min():.0f}..{stored.max():.0f} do not fit "
            f"{spec.bits_stored} bits (signed={spec.signed}); change intercept/slope/hu"
        )
    stored = stored.astype(np.int16 if spec.signed else np.uint16)
    return stored, stored.astype(float) * spec.slope + spec.intercept


def _item(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _meta(ds: Dataset, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    return meta


def _base_dataset(spec: CTSpec, series_uid: str, sop_class: str) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = spec.study_date
    ds.SeriesDate = spec.study_date
    ds.StudyTime = "101500"
    ds.SeriesTime = "102200"
    if spec.modality is not None:
        ds.Modality = spec.modality
    ds.Manufacturer = spec.manufacturer
    ds.SeriesDescription = spec.series_description
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = spec.patient_birth_date
    ds.PatientSex = spec.patient_sex
    if spec.patient_age is not None:
        ds.PatientAge = spec.patient_age
    ds.KVP = spec.kvp
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 3
    ds.FrameOfReferenceUID = spec.study_uid + ".9"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = spec.shape
    ds.BitsAllocated = 16
    ds.BitsStored = spec.bits_stored
    ds.HighBit = spec.bits_stored - 1
    ds.PixelRepresentation = int(spec.signed)
    if spec.padding_value is not None:
        ds.add_new("PixelPaddingValue", "SS" if spec.signed else "US", spec.padding_value)
    if spec.gantry_tilt_tag is not None:
        ds.GantryDetectorTilt = spec.gantry_tilt_tag
    ds.file_meta = _meta(ds, ExplicitVRLittleEndian)
    return ds


def _ct_dataset(spec: CTSpec, series_uid: str, geometry: _Geometry, k: int, number: int) -> Dataset:
    ds = _base_dataset(spec, series_uid, spec.sop_class_uid)
    ds.ImageType = list(spec.image_type)
    ds.AcquisitionDate = spec.study_date
    ds.AcquisitionTime = spec.acquisition_time
    ds.SliceThickness = spec.thickness or spec.spacing
    if spec.kernel is not None:
        ds.ConvolutionKernel = spec.kernel
    ds.InstanceNumber = number
    ds.ImagePositionPatient = list(geometry.positions[k])
    ds.ImageOrientationPatient = list(geometry.iop)
    ds.SliceLocation = geometry.positions[k][2]
    ds.PixelSpacing = list(spec.pixel_spacing)
    ds.RescaleIntercept = spec.intercept
    ds.RescaleSlope = spec.slope
    ds.RescaleType = "HU"
    return ds


def _set_pixels(ds: Dataset, stored: np.ndarray, spec: CTSpec) -> None:
    """Set PixelData from (frames, rows, cols) stored values in the spec's transfer syntax."""
    syntax = UID(spec.transfer_syntax)
    arr = stored if stored.shape[0] > 1 else stored[0]
    if syntax in NATIVE_SYNTAXES:
        ds.PixelData = np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<")).tobytes()
        ds["PixelData"].VR = "OW"
        ds.file_meta.TransferSyntaxUID = syntax
    elif syntax in ENCODER_PLUGINS:
        ds.compress(
            syntax, arr, encoding_plugin=ENCODER_PLUGINS[syntax], generate_instance_uid=False
        )
    elif syntax == JPEGLosslessSV1:
        frames = [encode_jpeg_lossless(f, spec.bits_stored) for f in stored]
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        raise ValueError(f"`transfer_syntax` {syntax.name} is not one this factory writes")


