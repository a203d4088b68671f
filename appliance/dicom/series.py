"""Files -> the chosen CT series -> a Volume in HU, or a refusal that says why.

Two passes, so that a folder holding many series only pays for decoding the one analysed:

1. Header pass: every file is read with ``stop_before_pixels=True``. Files that are not DICOM
   (no ``DICM`` prefix; raw datasets without a preamble count as not DICOM) are skipped, as are
   instances without an image (SR, KO, PR...) and LOCALIZER images. Every remaining frame (one
   per classic CT file, one per frame of an Enhanced CT file) is grouped by SeriesInstanceUID.
2. The series is chosen by :class:`SelectionRules` (data, not code), its geometry is checked
   (never mended: see the refusals below), and only its pixels are decoded, in parallel.

Geometry follows :mod:`appliance.volume`: axis 0 = slices sorted by ascending position along the
slice normal ``cross(row_dir, col_dir)`` (never by InstanceNumber or file name), axis 1 = rows,
axis 2 = columns. DICOM ``ImageOrientationPatient[0:3]`` is the direction along a row (the one in
which the column index grows) and ``PixelSpacing`` is ``[between rows, between columns]``; hence
``direction = (normal, IOP[3:6], IOP[0:3])`` and ``spacing = (slice step, PixelSpacing[0],
PixelSpacing[1])``. A standard axial series gives the canonical direction.

Refusals (:class:`SeriesRefused`, one line each, CLI exit 2): path missing, empty folder, no
DICOM, no image, no pixel data, undecodable pixel data, not CT, series asked for not found,
only localizers, not grayscale, image sizes or pixel spacings differing within the series,
mixed orientations, non-axial (coronal, sagittal or oblique beyond
``SelectionRules.max_axial_deviation_deg``), gantry tilt over ``max_tilt_deg`` (from
GantryDetectorTilt or from slice positions sheared against the normal), fewer than
``min_slices`` slices, missing slices (a gap over ``max_gap_factor`` x the median spacing),
irregular spacing, and different images at the same position (identical duplicates are dropped).

Headers without a Modality tag (lungmask's LIDC pair) are accepted as CT when their SOP class is
a CT one; the checks above then decide (that pair is refused for having 2 slices).
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import pixel_array
from pydicom.pixels.decoders.base import get_decoder
from pydicom.sequence import Sequence as Sequence_
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    JPEGLSLossless,
    JPEGLSNearLossless,
    LegacyConvertedEnhancedCTImageStorage,
)

from appliance.volume import Volume

CT_SOP_CLASSES = frozenset(
    {CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage}
)
"""SOP classes taken as modality CT when a header has no Modality tag."""

PREFERRED_DECODERS: dict[str, tuple[str, ...]] = {
    JPEGLSLossless: ("pyjpegls", "pylibjpeg"),
    JPEGLSNearLossless: ("pyjpegls", "pylibjpeg"),
}
"""Decoder plugin preference per transfer syntax, first available wins; others use pydicom's
order. pyjpegls (CharLS) decodes JPEG-LS about 3x faster than pylibjpeg-libjpeg (normal002,
167 slices 512x512: 1.3 s against 4.3 s on one thread)."""

_PARSE_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, struct.error)
"""What pydicom raises on files that are not (complete) DICOM."""


class SeriesRefused(Exception):
    """Input that cannot be analysed; str(exc) is a one-line reason for the user (CLI exit 2)."""


@dataclass(frozen=True)
class SelectionRules:
    """Which series is analysed and what it must satisfy; defaults suit chest CT.

    Selection among several series: only images of an accepted modality, not LOCALIZER; then
    prefer, in this order, series with at least ``min_slices`` slices, axial ones, ORIGINAL
    and PRIMARY ones, the thinnest reconstruction (SliceThickness, else the slice spacing), a
    lung kernel, the most slices; ties go to the smallest SeriesInstanceUID.
    """

    modalities: tuple[str, ...] = ("CT",)
    """Accepted Modality values (a missing tag counts as CT for CT SOP classes)."""
    min_slices: int = 20
    """Fewer distinct slice positions than this is refused."""
    max_gap_factor: float = 1.5
    """A step over this many times the median spacing means missing slices."""
    max_spacing_deviation: float = 0.2
    """Any other step differing from the median by more than this fraction is irregular."""
    max_tilt_deg: float = 5.0
    """Gantry tilt limit, from GantryDetectorTilt and from slice positions vs. the normal."""
    max_axial_deviation_deg: float = 30.0
    """Largest angle between the slice normal and the patient's head-foot axis still taken as
    axial. Coronal and sagittal series (90 degrees) are refused; oblique axial reconstructions
    within the limit load with their true direction for the pipeline to reorient."""
    orientation_tolerance: float = 1e-3
    """Largest difference between ImageOrientationPatient components still the same plane."""
    pixel_spacing_tolerance: float = 1e-3
    """Largest relative difference between PixelSpacing values still the same spacing."""
    duplicate_tolerance_mm: float = 0.01
    """Slices closer than this along the normal are at the same position."""
    lung_kernel_words: tuple[str, ...] = (
        "LUNG", "L", "B60", "B70", "B80", "I70", "BL57", "BL64", "BR60", "BR64", "BR69",
        "FC51", "FC52", "FC53", "FC55", "FC56", "FC83", "FC86", "YA", "YB", "YC", "YD",
    )  # fmt: skip
    """ConvolutionKernel words meaning a lung kernel (GE LUNG; Siemens B60-B80, I70, Bl/Br;
    Canon FC5x/FC8x; Philips L, YA-YD). A kernel matches when one of its words (split on
    non-alphanumerics, upper case) equals an entry, or starts with an entry of 3 or more
    characters (``B70f`` matches ``B70``; ``L`` only matches ``L``)."""
    air_hu: int = -1024
    """Value given to padding outside the field of view."""
    padding_hu_max: int = -2000
    """HU at or below this are padding (GE -3024, Toshiba -2048), like PixelPaddingValue."""
    hu_range: tuple[int, int] = (-1024, 3071)
    """HU are clipped to this range (the 12-bit CT range)."""

    def __post_init__(self) -> None:
        if not self.modalities or not all(isinstance(m, str) and m for m in self.modalities):
            raise ValueError(f"`modalities` must be non-empty strings, got {self.modalities!r}")
        if not isinstance(self.min_slices, int) or self.min_slices < 1:
            raise ValueError(f"`min_slices` must be an integer >= 1, got {self.min_slices!r}")
        if not self.max_gap_factor > 1:
            raise ValueError(f"`max_gap_factor` must be > 1, got {self.max_gap_factor!r}")
        if not 0 < self.max_spacing_deviation < self.max_gap_factor - 1:
            raise ValueError(
                "`max_spacing_deviation` must be > 0 and < max_gap_factor - 1, "
                f"got {self.max_spacing_deviation!r}"
            )
        for name in ("max_tilt_deg", "max_axial_deviation_deg"):
            value = getattr(self, name)
            if not 0 <= value < 90:
                raise ValueError(f"`{name}` must be in [0, 90) degrees, got {value!r}")
        for name in ("orientation_tolerance", "pixel_spacing_tolerance", "duplicate_tolerance_mm"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"`{name}` must be > 0, got {value!r}")
        lo, hi = self.hu_range
        if not lo < hi:
            raise ValueError(f"`hu_range` must be (low, high) with low < high, got {self.hu_range}")
        if not lo <= self.air_hu <= hi:
            raise ValueError(f"`air_hu` must lie inside `hu_range`, got {self.air_hu}")

    def is_lung_kernel(self, kernel: str | None) -> bool:
        """Whether a ConvolutionKernel value names a lung kernel (see ``lung_kernel_words``)."""
        if not kernel:
            return False
        words = [w for w in "".join(c if c.isalnum() else " " for c in kernel).upper().split()]
        entries = [e.upper() for e in self.lung_kernel_words]
        return any(w == e or (len(e) >= 3 and w.startswith(e)) for w in words for e in entries)


@dataclass(frozen=True)
class SeriesInfo:
    """What the rest of the appliance needs to know about the loaded series.

    Dates are ISO (``2020-03-05``); ``acquired_at`` is ``2020-03-05T14:56:25`` from the
    earliest AcquisitionDateTime, else AcquisitionDate/Time, else SeriesDate/Time, else
    StudyDate/Time (a date alone when no time is recorded). The per-slice tuples follow axis 0
    of the volume; for an Enhanced CT file ``files`` and ``sop_instance_uids`` repeat and
    ``frame_numbers`` gives the 1-based frame (None for single-frame instances).
    """

    patient_id: str
    patient_name: str
    patient_sex: str | None
    patient_age_years: int | None
    patient_birth_date: str | None
    study_instance_uid: str
    series_instance_uid: str
    study_date: str | None
    acquired_at: str | None
    manufacturer: str | None
    kernel: str | None
    kvp: float | None
    slice_thickness_mm: float | None
    series_description: str | None
    sop_instance_uids: tuple[str, ...]
    sop_class_uid: str
    files: tuple[str, ...]
    frame_numbers: tuple[int | None, ...] = ()
    modality: str | None = None
    series_number: int | None = None
    frame_of_reference_uid: str | None = None
    accession_number: str | None = None
    image_type: tuple[str, ...] = ()


@dataclass(frozen=True, eq=False)
class _Frame:
    """One image plane found by the header pass (a classic file or a frame of an Enhanced one)."""

    path: str
    index: int | None  # 0-based frame in a multi-frame file; None for a single-frame file
    ds: Dataset  # header only, shared by the frames of one file
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str | None
    image_type: tuple[str, ...]
    rows: int
    cols: int
    samples: int
    position: np.ndarray | None
    orientation: np.ndarray | None
    pixel_spacing: tuple[float, float] | None
    slope: float
    intercept: float
    thickness: float | None
    kernel: str | None
    tilt: float | None

    @property
    def has_geometry(self) -> bool:
        return (
            self.position is not None
            and self.orientation is not None
            and self.pixel_spacing is not None
        )

    @property
    def normal(self) -> np.ndarray:
        assert self.orientation is not None
        n = np.cross(self.orientation[:3], self.orientation[3:])
        return n / np.linalg.norm(n)


@dataclass
class _Scan:
    """What the header pass found, for the refusal messages."""

    files: int = 0
    not_dicom: int = 0
    non_image: Counter[str] = field(default_factory=Counter)
    localizer_series: set[str] = field(default_factory=set)
    no_geometry: int = 0
    localizers: int = 0


def load_series(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    rules: SelectionRules = SelectionRules(),
    series_uid: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    threads: int = 2,
) -> tuple[Volume, SeriesInfo]:
    """Load the CT series in ``source`` (a folder searched recursively, a file or a list of
    files) as HU, or raise :class:`SeriesRefused` with a one-line reason.

    ``series_uid`` forces a series instead of the rules' choice. ``progress(done, total)`` is
    called from the calling thread as slices are decoded. ``threads`` decoder threads run at once.
    The array is int16 when every RescaleSlope/Intercept is integral (exact, half the memory of
    float32), else float32; padding and HU at or below ``rules.padding_hu_max`` become
    ``rules.air_hu`` and everything is clipped to ``rules.hu_range``.
    """
    if not isinstance(rules, SelectionRules):
        raise TypeError(f"`rules` must be a SelectionRules, got {type(rules).__name__}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"`threads` must be a positive integer, got {threads!r}")
    if series_uid is not None and not isinstance(series_uid, str):
        raise TypeError(f"`series_uid` must be a str or None, got {type(series_uid).__name__}")
    paths, where = _list_files(source)
    with warnings.catch_warnings():
        # Scanner data are often slightly invalid (UUIDs as UIDs...): read them, don't warn.
        # Set here, in the calling thread: catch_warnings is not thread-safe.
        warnings.simplefilter("ignore")
        scan = _Scan()
        frames = _header_pass(paths, scan)
        chosen = _choose_series(frames, scan, where, rules, series_uid)
        plan = _check_geometry(chosen, rules)
        array = _decode(plan, rules, threads, progress)
        return _make_volume(plan, array), _make_info(plan)


# ----------------------------------------------------------------------------- files


def _list_files(source: object) -> tuple[list[str], str]:
    """The files to read and a short name of the source for messages."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise SeriesRefused(f"path not found: {path}")
        if path.is_dir():
            files = sorted(
                os.path.join(root, name)
                for root, _dirs, names in os.walk(path)
                for name in names
                if os.path.isfile(os.path.join(root, name))
            )
            if not files:
                raise SeriesRefused(f"folder {path} is empty")
            return files, f"folder {path}"
        return [str(path)], f"file {path}"
    if isinstance(source, Sequence):
        if not source:
            raise SeriesRefused("no files given")
        files = []
        for item in source:
            if not isinstance(item, (str, os.PathLike)):
                raise TypeError(f"`source` items must be paths, got {type(item).__name__}")
            if not Path(item).is_file():
                raise SeriesRefused(f"file not found: {item}")
            files.append(str(item))
        return files, f"the {len(files)} files given"
    raise TypeError(f"`source` must be a path or a sequence of paths, got {type(source).__name__}")


def _header_pass(paths: list[str], scan: _Scan) -> list[_Frame]:
    frames: list[_Frame] = []
    for path in paths:
        scan.files += 1
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except _PARSE_ERRORS:
            scan.not_dicom += 1
            continue
        if "Rows" not in ds or "Columns" not in ds:
            scan.non_image[_sop_class(ds).name or "unknown SOP class"] += 1
            continue
        for frame in _frames_of(path, ds):
            if "LOCALIZER" in frame.image_type:
                scan.localizers += 1
                scan.localizer_series.add(frame.series_uid)
            elif not frame.has_geometry:
                scan.no_geometry += 1
            else:
                frames.append(frame)
    return frames


def _frames_of(path: str, ds: Dataset) -> list[_Frame]:
    """One _Frame per image plane, reading Enhanced CT functional groups when present."""
    sop_class = _sop_class(ds)
    modality = _text(ds, "Modality") or ("CT" if sop_class in CT_SOP_CLASSES else None)
    common = dict(
        path=path,
        ds=ds,
        series_uid=_text(ds, "SeriesInstanceUID") or "",
        sop_uid=_text(ds, "SOPInstanceUID")
        or _text(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPInstanceUID")
        or "",
        sop_class_uid=str(sop_class),
        modality=modality,
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        samples=int(ds.get("SamplesPerPixel") or 1),
    )
    top_type = tuple(str(v).upper() for v in _values(ds.get("ImageType")))
    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        return [
            _Frame(
                index=None,
                image_type=top_type,
                position=_floats(ds.get("ImagePositionPatient"), 3),
                orientation=_floats(ds.get("ImageOrientationPatient"), 6),
                pixel_spacing=_spacing(ds.get("PixelSpacing")),
                slope=_float(ds.get("RescaleSlope"), 1.0),
                intercept=_float(ds.get("RescaleIntercept"), 0.0),
                thickness=_float(ds.get("SliceThickness"), None),
                kernel=_kernel(ds.get("ConvolutionKernel")),
                tilt=_float(ds.get("GantryDetectorTilt"), None),
                **common,
            )
        ]
    n_frames = int(ds.get("NumberOfFrames") or 1)
    shared = _first(ds.get("SharedFunctionalGroupsSequence")) or Dataset()
    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    frames = []
    for i in range(n_frames):
        own = per_frame[i] if i < len(per_frame) else Dataset()

        def group(keyword: str, own: Dataset = own) -> Dataset:
            return _first(own.get(keyword)) or _first(shared.get(keyword)) or Dataset()

        measures = group("PixelMeasuresSequence")
        rescale = group("PixelValueTransformationSequence")
        frame_type = group("CTImageFrameTypeSequence").get("FrameType")
        kernel = group("CTReconstructionSequence").get("ConvolutionKernel")
        tilt = group("CTAcquisitionDetailsSequence").get("GantryDetectorTilt")
        frames.append(
            _Frame(
                index=i,
                image_type=tuple(str(v).upper() for v in _values(frame_type)) or top_type,
                position=_floats(group("PlanePositionSequence").get("ImagePositionPatient"), 3),
                orientation=_floats(
                    group("PlaneOrientationSequence").get("ImageOrientationPatient"), 6
                ),
                pixel_spacing=_spacing(measures.get("PixelSpacing")),
                slope=_float(rescale.get("RescaleSlope"), _float(ds.get("RescaleSlope"), 1.0)),
                intercept=_float(
                    rescale.get("RescaleIntercept"), _float(ds.get("RescaleIntercept"), 0.0)
                ),
                thickness=_float(measures.get("SliceThickness"), None),
                kernel=_kernel(kernel) or _kernel(ds.get("ConvolutionKernel")),
                tilt=_float(tilt, _float(ds.get("GantryDetectorTilt"), None)),
                **common,
            )
        )
    return frames


# ----------------------------------------------------------------------------- selection


def _choose_series(
    frames: list[_Frame], scan: _Scan, where: str, rules: SelectionRules, series_uid: str | None
) -> list[_Frame]:
    """The frames of the series to analyse, or a refusal naming what was found instead."""
    series: dict[str, list[_Frame]] = {}
    for frame in frames:
        series.setdefault(frame.series_uid, []).append(frame)
    if series_uid is not None:
        if series_uid not in series and series_uid in scan.localizer_series:
            raise SeriesRefused(f"series {series_uid} holds only localizer images")
        if series_uid not in series:
            found = ", ".join(sorted(_label(u) for u in series)) or "none with images"
            raise SeriesRefused(f"series {series_uid} not found in {where} (series found: {found})")
        chosen = series[series_uid]
        _check_modality(chosen, rules)
        return chosen
    if not series:
        raise SeriesRefused(_nothing_usable(scan, where))
    accepted = {u: f for u, f in series.items() if f[0].modality in rules.modalities}
    if not accepted:
        found = ", ".join(
            f"{_name(u)} ({f[0].modality or 'no Modality'}, {len(f)} images)"
            for u, f in sorted(series.items())
        )
        wanted = "/".join(rules.modalities)
        raise SeriesRefused(f"not {wanted}: no {wanted} series in {where}; found {found}")

    def rank(uid: str) -> tuple:
        group = accepted[uid]
        first = group[0]
        n_positions = _count_positions(group, rules)
        thickness = first.thickness or _median_step(group) or math.inf
        return (
            n_positions >= rules.min_slices,
            _axial_deviation_deg(first) <= rules.max_axial_deviation_deg,
            first.image_type[:2] == ("ORIGINAL", "PRIMARY"),
            -round(thickness, 1),
            rules.is_lung_kernel(first.kernel),
            n_positions,
        )

    best = max(sorted(accepted), key=rank)  # max keeps the first of equals: the smallest UID
    chosen = accepted[best]
    if len(accepted) > 1 and _count_positions(chosen, rules) < rules.min_slices:
        n = _count_positions(chosen, rules)
        raise SeriesRefused(
            f"too few slices: {len(series)} series in {where}, none with {rules.min_slices} or "
            f"more slices (the best, {_name(best)}, has {n})"
        )
    return chosen


def _nothing_usable(scan: _Scan, where: str) -> str:
    if scan.not_dicom == scan.files:
        if scan.files == 1 and where.startswith("file "):
            return f"not DICOM: {where[5:]} is not a DICOM file"
        return f"not DICOM: none of the {scan.files} files in {where} is a DICOM file"
    parts = []
    if scan.non_image:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(scan.non_image.items()))
        parts.append(f"{sum(scan.non_image.values())} without an image ({kinds})")
    if scan.localizers:
        parts.append(f"{scan.localizers} localizer images")
    if scan.no_geometry:
        parts.append(f"{scan.no_geometry} images without position/orientation")
    if scan.not_dicom:
        parts.append(f"{scan.not_dicom} non-DICOM files")
    return f"no usable image series in {where}: " + "; ".join(parts)


def _check_modality(frames: list[_Frame], rules: SelectionRules) -> None:
    modality = frames[0].modality
    if modality not in rules.modalities:
        raise SeriesRefused(
            f"not {'/'.join(rules.modalities)}: {_name(frames[0].series_uid)} is "
            f"{modality or 'without Modality'}"
        )


# ----------------------------------------------------------------------------- geometry


@dataclass(eq=False)
class _Plan:
    """The checked series: slices in axis-0 order, duplicates set aside for the pixel check."""

    uid: str
    slices: list[_Frame]
    duplicates: list[tuple[int, _Frame]]  # (axis-0 index it duplicates, frame)
    normal: np.ndarray
    step: float


def _check_geometry(frames: list[_Frame], rules: SelectionRules) -> _Plan:
    """Everything that can be refused from headers alone, before any decoding."""
    uid = frames[0].series_uid
    name = _name(uid)
    sizes = Counter((f.rows, f.cols) for f in frames)
    if len(sizes) > 1:
        listed = " and ".join(
            f"{r}x{c} ({n} slice{'s' if n > 1 else ''})" for (r, c), n in sizes.most_common()
        )
        raise SeriesRefused(f"{name} mixes image sizes: {listed}")
    if frames[0].samples != 1:
        raise SeriesRefused(f"{name} is not grayscale (SamplesPerPixel {frames[0].samples})")
    ref = frames[0].pixel_spacing
    assert ref is not None
    for f in frames:
        assert f.pixel_spacing is not None
        if not np.allclose(f.pixel_spacing, ref, rtol=rules.pixel_spacing_tolerance, atol=0):
            raise SeriesRefused(
                f"{name} mixes pixel spacings: {ref[0]:.3f}x{ref[1]:.3f} mm and "
                f"{f.pixel_spacing[0]:.3f}x{f.pixel_spacing[1]:.3f} mm"
            )
    orientations = np.array([f.orientation for f in frames])
    if np.abs(orientations - orientations[0]).max() > rules.orientation_tolerance:
        normals = np.array([f.normal for f in frames])
        angle = max(_angle_deg(normals[0], n) for n in normals)
        n_planes = len({tuple(np.round(o, 2)) for o in orientations})
        raise SeriesRefused(
            f"{name} mixes {n_planes} slice orientations (slice normals up to {angle:.1f} "
            "degrees apart)"
        )
    deviation = _axial_deviation_deg(frames[0])
    if deviation > rules.max_axial_deviation_deg:
        raise SeriesRefused(
            f"{name} is not axial: its slice normal is {deviation:.1f} degrees from the "
            f"head-foot axis ({_plane(frames[0].normal)}); only axial series (within "
            f"{rules.max_axial_deviation_deg:g} degrees) are analysed"
        )
    tilts = [abs(f.tilt) for f in frames if f.tilt is not None]
    if tilts and max(tilts) > rules.max_tilt_deg:
        raise SeriesRefused(
            f"{name} has a gantry tilt of {max(tilts):.1f} degrees (GantryDetectorTilt); "
            f"at most {rules.max_tilt_deg:g} is accepted"
        )

    normal = frames[0].normal
    ordered = sorted(frames, key=lambda f: (float(f.position @ normal), f.path, f.index or 0))
    slices: list[_Frame] = []
    duplicates: list[tuple[int, _Frame]] = []
    for f in ordered:
        if slices and float((f.position - slices[-1].position) @ normal) < (
            rules.duplicate_tolerance_mm
        ):
            duplicates.append((len(slices) - 1, f))
        else:
            slices.append(f)
    if len(slices) < rules.min_slices:
        raise SeriesRefused(
            f"too few slices: {name} has {len(slices)}, fewer than the {rules.min_slices} needed"
        )

    if len(slices) == 1:  # only with min_slices=1: the nominal spacing
        ds = slices[0].ds
        step = _float(ds.get("SpacingBetweenSlices"), None) or slices[0].thickness or 1.0
        return _Plan(uid, slices, duplicates, normal, step)
    offset = slices[-1].position - slices[0].position
    shear = _angle_deg(offset, normal)
    if shear > rules.max_tilt_deg:
        raise SeriesRefused(
            f"{name} has a gantry tilt of {shear:.1f} degrees (slice positions advance at that "
            f"angle to the slice normal); at most {rules.max_tilt_deg:g} is accepted"
        )
    along = np.array([float(f.position @ normal) for f in slices])
    steps = np.diff(along)
    step = float(np.median(steps))
    for i, s in enumerate(steps):
        where = f"between slices {i + 1} and {i + 2} of {len(slices)}"
        if s > rules.max_gap_factor * step:
            raise SeriesRefused(
                f"{name} has a gap of {s:.1f} mm {where} (median spacing {step:.1f} mm): "
                "missing slices"
            )
        if abs(s - step) > rules.max_spacing_deviation * step:
            raise SeriesRefused(
                f"{name} has irregular slice spacing: {s:.2f} mm {where} (median spacing "
                f"{step:.2f} mm)"
            )
    return _Plan(uid, slices, duplicates, normal, step)


def _count_positions(frames: list[_Frame], rules: SelectionRules) -> int:
    normal = frames[0].normal
    along = np.sort([float(f.position @ normal) for f in frames])
    return 1 + int(np.count_nonzero(np.diff(along) >= rules.duplicate_tolerance_mm))


def _median_step(frames: list[_Frame]) -> float | None:
    normal = frames[0].normal
    steps = np.diff(np.unique(np.round([float(f.position @ normal) for f in frames], 3)))
    return float(np.median(steps)) if steps.size else None


def _axial_deviation_deg(frame: _Frame) -> float:
    """Angle between the slice normal and the z axis, whichever way either points."""
    return math.degrees(math.acos(min(1.0, abs(float(frame.normal[2])))))


def _angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    """Angle between two lines (sign ignored), in degrees."""
    cos = abs(float(a @ b)) / (float(np.linalg.norm(a)) * float(np.linalg.norm(b)))
    return math.degrees(math.acos(min(1.0, cos)))


def _plane(normal: np.ndarray) -> str:
    return ("sagittal", "coronal", "oblique axial")[int(np.argmax(np.abs(normal)))]


# ----------------------------------------------------------------------------- pixels


def _decode(
    plan: _Plan,
    rules: SelectionRules,
    threads: int,
    progress: Callable[[int, int], None] | None,
) -> np.ndarray:
    """Decode the plan's slices into one array, HU, padding as air; check duplicates."""
    frames = plan.slices + [f for _, f in plan.duplicates]
    exact = all(_integral(f.slope) and _integral(f.intercept) for f in frames)
    dtype = np.int16 if exact else np.float32
    first = plan.slices[0]
    out = np.empty((len(plan.slices), first.rows, first.cols), dtype=dtype)
    plugins = {f.path: _plugin(f.ds) for f in frames}
    multi = _read_multiframe_files(frames)

    def job(frame: _Frame) -> np.ndarray:
        return _to_hu(_raw_pixels(frame, plugins[frame.path], multi), frame, rules, dtype)

    total = len(frames)
    if progress is not None:
        progress(0, total)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        futures = {pool.submit(job, f): k for k, f in enumerate(plan.slices)}
        done = 0
        for future in as_completed(futures):
            out[futures[future]] = future.result()
            done += 1
            if progress is not None:
                progress(done, total)
    for k, frame in plan.duplicates:
        other = job(frame)
        done += 1
        if progress is not None:
            progress(done, total)
        if not np.array_equal(other, out[k]):
            kept = plan.slices[k]
            along = float(kept.position @ plan.normal)
            raise SeriesRefused(
                f"{_name(plan.uid)} has different images at the same position (slice {k + 1}, "
                f"{along:.1f} mm along the normal): {_where(kept)} and {_where(frame)}"
            )
    return out


def _plugin(ds: Dataset) -> str:
    tsyntax = UID(_text(getattr(ds, "file_meta", Dataset()), "TransferSyntaxUID") or "")
    for plugin in PREFERRED_DECODERS.get(tsyntax, ()):
        if plugin in get_decoder(tsyntax).available_plugins:
            return plugin
    return ""


def _read_multiframe_files(frames: list[_Frame]) -> dict[str, Dataset]:
    """Multi-frame files read once, whole, in this thread; their frames decode in parallel."""
    out: dict[str, Dataset] = {}
    for f in frames:
        if f.index is not None and f.path not in out:
            ds = _read_whole(f)
            for tag in ds.keys():  # convert raw elements here, not concurrently in the workers
                _ = ds[tag]
            out[f.path] = ds
    return out


def _raw_pixels(frame: _Frame, plugin: str, multi: dict[str, Dataset]) -> np.ndarray:
    if frame.index is None:
        ds = _read_whole(frame)
        index = None
    else:
        ds, index = multi[frame.path], frame.index
    try:
        arr = pixel_array(ds, index=index, decoding_plugin=plugin)
    except (ValueError, RuntimeError) as exc:
        tsyntax = UID(ds.file_meta.TransferSyntaxUID).name
        raise SeriesRefused(
            f"cannot decode the pixel data of {_where(frame)} ({tsyntax}): {_first_line(exc)}"
        ) from exc
    if arr.shape != (frame.rows, frame.cols):
        raise SeriesRefused(
            f"{_where(frame)} decodes to shape {arr.shape}, not {frame.rows}x{frame.cols}"
        )
    return arr


def _read_whole(frame: _Frame) -> Dataset:
    try:
        ds = pydicom.dcmread(frame.path)
    except _PARSE_ERRORS as exc:
        raise SeriesRefused(f"cannot read {frame.path}: {_first_line(exc)}") from exc
    if "PixelData" not in ds:
        raise SeriesRefused(f"no pixel data: {_where(frame)} of {_name(frame.series_uid)}")
    return ds


def _to_hu(raw: np.ndarray, frame: _Frame, rules: SelectionRules, dtype: type) -> np.ndarray:
    """Stored values -> HU; PixelPaddingValue (range) and HU <= padding_hu_max -> air; clip."""
    padding = _padding_mask(raw, frame.ds)
    if dtype is np.int16:
        hu = raw.astype(np.int32) * round(frame.slope) + round(frame.intercept)
    else:
        hu = raw.astype(np.float32) * np.float32(frame.slope) + np.float32(frame.intercept)
    if padding is not None:
        hu[padding] = rules.air_hu
    hu[hu <= rules.padding_hu_max] = rules.air_hu
    np.clip(hu, rules.hu_range[0], rules.hu_range[1], out=hu)
    return hu.astype(dtype, copy=False)


def _padding_mask(raw: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Pixels equal to PixelPaddingValue, or between it and PixelPaddingRangeLimit."""
    value = ds.get("PixelPaddingValue")
    if value is None or isinstance(value, bytes):
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    bits = int(ds.get("BitsAllocated") or 16)
    ends = [int(value)] + ([int(limit)] if isinstance(limit, int) else [])
    if raw.dtype.kind == "u":  # a negative value written for unsigned data: same bits
        ends = [e & ((1 << bits) - 1) for e in ends]
    elif raw.dtype.kind == "i":  # a large unsigned value written for signed data
        ends = [e - (1 << bits) if e >= 1 << (bits - 1) else e for e in ends]
    lo, hi = min(ends), max(ends)
    return (raw >= lo) & (raw <= hi)


# ----------------------------------------------------------------------------- results


def _make_volume(plan: _Plan, array: np.ndarray) -> Volume:
    first = plan.slices[0]
    assert first.orientation is not None and first.pixel_spacing is not None
    row_dir = first.orientation[:3] / np.linalg.norm(first.orientation[:3])
    col_dir = first.orientation[3:] / np.linalg.norm(first.orientation[3:])
    return Volume(
        array=array,
        spacing=(plan.step, first.pixel_spacing[0], first.pixel_spacing[1]),
        origin=tuple(float(v) for v in first.position),  # type: ignore[arg-type]
        direction=np.stack([plan.normal, col_dir, row_dir]),
    )


def _make_info(plan: _Plan) -> SeriesInfo:
    first = plan.slices[0]
    ds = first.ds
    datasets = list({id(f.ds): f.ds for f in plan.slices}.values())
    acquired = [a for a in (_acquired(d) for d in datasets) if a]
    acquired_at = min(acquired) if acquired else (
        _date_time(ds.get("SeriesDate"), ds.get("SeriesTime"))
        or _date_time(ds.get("StudyDate"), ds.get("StudyTime"))
    )
    study_date = _date(ds.get("StudyDate"))
    birth = _date(ds.get("PatientBirthDate"))
    kvp = _float(ds.get("KVP"), None)
    if kvp is None and "SharedFunctionalGroupsSequence" in ds:
        xray = _first(_first(ds.SharedFunctionalGroupsSequence).get("CTXRayDetailsSequence"))
        kvp = _float(xray.get("KVP"), None) if xray else None
    series_number = ds.get("SeriesNumber")
    return SeriesInfo(
        patient_id=_text(ds, "PatientID") or "",
        patient_name=str(ds.get("PatientName") or ""),
        patient_sex=(_text(ds, "PatientSex") or "").upper() or None,
        patient_age_years=_age_years(ds.get("PatientAge"), birth, study_date or acquired_at),
        patient_birth_date=birth,
        study_instance_uid=_text(ds, "StudyInstanceUID") or "",
        series_instance_uid=plan.uid,
        study_date=study_date,
        acquired_at=acquired_at,
        manufacturer=_text(ds, "Manufacturer"),
        kernel=first.kernel,
        kvp=kvp,
        slice_thickness_mm=first.thickness,
        series_description=_text(ds, "SeriesDescription"),
        sop_instance_uids=tuple(f.sop_uid for f in plan.slices),
        sop_class_uid=first.sop_class_uid,
        files=tuple(f.path for f in plan.slices),
        frame_numbers=tuple(None if f.index is None else f.index + 1 for f in plan.slices),
        modality=first.modality,
        series_number=int(series_number) if series_number not in (None, "") else None,
        frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"),
        accession_number=_text(ds, "AccessionNumber"),
        image_type=first.image_type,
    )


def _acquired(ds: Dataset) -> str | None:
    dt = _text(ds, "AcquisitionDateTime")
    if dt and len(dt) >= 8:
        return _date_time(dt[:8], dt[8:].split("+")[0].split("-")[0] or None)
    return _date_time(ds.get("AcquisitionDate"), ds.get("AcquisitionTime"))


def _date(value: object) -> str | None:
    text = str(value or "").strip().replace("-", "").replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    return f"{text[:4]}-{text[4:6]}-{text[6:]}"


def _date_time(date: object, time: object) -> str | None:
    day = _date(date)
    if day is None:
        return None
    text = str(time or "").strip().replace(":", "").split(".")[0]
    if len(text) < 2 or not text.isdigit():
        return day
    text = (text + "0000")[:6]
    return f"{day}T{text[:2]}:{text[2:4]}:{text[4:6]}"


def _age_years(age: object, birth: str | None, on: str | None) -> int | None:
    """PatientAge (``039Y``; months, weeks, days give 0), else from the birth date."""
    text = str(age or "").strip().upper()
    if len(text) == 4 and text[:3].isdigit() and text[3] in "YMWD":
        return int(text[:3]) // {"Y": 1, "M": 12, "W": 52, "D": 365}[text[3]]
    if birth and on:
        years = int(on[:4]) - int(birth[:4])
        return years - (1 if on[5:10] < birth[5:10] else 0)
    return None


# ----------------------------------------------------------------------------- small helpers


def _sop_class(ds: Dataset) -> UID:
    return UID(
        _text(ds, "SOPClassUID")
        or _text(getattr(ds, "file_meta", Dataset()), "MediaStorageSOPClassUID")
        or ""
    )


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _values(value: object) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, MultiValue, Sequence_)):
        return list(value)
    return [value]


def _first(sequence: object) -> Dataset | None:
    items = _values(sequence)
    return items[0] if items else None


def _float(value: object, default: float | None) -> float | None:
    items = _values(value)
    if not items:
        return default
    try:
        result = float(items[0])
    except (TypeError, ValueError):
        return default
    return result if math.isfinite(result) else default


def _floats(value: object, n: int) -> np.ndarray | None:
    items = _values(value)
    if len(items) != n:
        return None
    try:
        arr = np.array([float(v) for v in items], dtype=float)
    except (TypeError, ValueError):
        return None
    if not np.isfinite(arr).all():
        return None
    if n == 6 and not (
        np.linalg.norm(arr[:3]) > 0.5
        and np.linalg.norm(arr[3:]) > 0.5
        and np.linalg.norm(np.cross(arr[:3], arr[3:])) > 0.5
    ):
        return None  # not two perpendicular direction cosines
    return arr


def _spacing(value: object) -> tuple[float, float] | None:
    arr = _floats(value, 2)
    if arr is None or (arr <= 0).any():
        return None
    return float(arr[0]), float(arr[1])


def _kernel(value: object) -> str | None:
    items = [str(v).strip() for v in _values(value) if str(v).strip()]
    return "\\".join(items) or None


def _integral(x: float) -> bool:
    return abs(x - round(x)) < 1e-6


def _name(uid: str) -> str:
    return f"series {uid}" if uid else "the series without a SeriesInstanceUID"


def _label(uid: str) -> str:
    return uid or "(no SeriesInstanceUID)"


def _first_line(exc: BaseException) -> str:
    """An exception's message on one line (pydicom lists each plugin's error on its own)."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def _where(frame: _Frame) -> str:
    return frame.path if frame.index is None else f"{frame.path} frame {frame.index + 1}"
