"""DICOM Segmentation of a result: the five lobes and the two opacity classes, seven segments.

One BINARY Segmentation instance (lobes and opacities overlap: opacity lies inside a lobe, so a
label map cannot hold both) on the source series' own grid: one frame per source slice and
segment, **empty frames kept** (viewers misplace segmentations whose empty frames were omitted),
every source instance referenced. Segment numbers are fixed so that SR references and readers
can rely on them: 1-5 are the lobe labels of :class:`appliance.labels.Lobe`, 6 is ground-glass
opacity and 7 consolidation.

Coded concepts follow the DICOM standard (PS3.16) where it has them:

- lobes: CID 6170 "Lobe of Lung" (also in CID 7151/7155, the segmentation property types):
  SCT 45653009 "Upper lobe of lung", 72481006 "Middle lobe of right lung", 90572001 "Lower lobe
  of lung", with the side as SegmentedPropertyTypeModifierCodeSequence from CID 244 "Laterality"
  (SCT 24028007 Right, 7771000 Left). CID 6170 notes that the middle lobe is unpaired, so it has
  no laterality modifier. (The pre-coordinated SNOMED concepts such as 42400003 "Upper lobe of
  right lung" or 41224006 "Lower lobe of left lung" are not in any DICOM context group.)
- ground-glass opacity: DCM 112120 "Ground glass opacity", CID 6102 "Chest Finding or Feature
  Modifier" and CID 6104 "Abnormal Opacity Finding or Feature".
- consolidation: no DICOM context group has it; SCT 9656002 "Consolidation" (morphologic
  abnormality), the code HL7's own example uses for lung consolidation.
- categories, CID 7150: SCT 91723000 "Anatomical Structure" (lobes) and SCT 49755003
  "Morphologically Abnormal Structure" (opacities).

Algorithm identification per segment: the model that produced it (name and version from the
result's ``models``), SegmentAlgorithmType AUTOMATIC and algorithm family DCM 123110 "Artificial
Intelligence" (CID 7162), which is how a SEG says it is AI output.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from appliance.labels import Lobe, Opacity

ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
"""CID 7150 Segmentation Property Category."""
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
"""CID 7150 Segmentation Property Category."""
UPPER_LOBE = Code("45653009", "SCT", "Upper lobe of lung")
"""CID 6170 Lobe of Lung; CID 7155 Thoracic Segmentation Types."""
MIDDLE_LOBE = Code("72481006", "SCT", "Middle lobe of right lung")
"""CID 6170; unpaired, so no laterality modifier."""
LOWER_LOBE = Code("90572001", "SCT", "Lower lobe of lung")
"""CID 6170 Lobe of Lung; CID 7155 Thoracic Segmentation Types."""
LUNG = Code("39607008", "SCT", "Lung")
"""CID 7155; the finding site of whole-lung and per-side figures in the SR."""
RIGHT = Code("24028007", "SCT", "Right")
"""CID 244 Laterality."""
LEFT = Code("7771000", "SCT", "Left")
"""CID 244 Laterality."""
RIGHT_AND_LEFT = Code("51440002", "SCT", "Right and left")
"""CID 244 Laterality (both lungs)."""
GROUND_GLASS_OPACITY = Code("112120", "DCM", "Ground glass opacity")
"""CID 6102 Chest Finding or Feature Modifier; CID 6104 Abnormal Opacity Finding or Feature."""
CONSOLIDATION = Code("9656002", "SCT", "Consolidation")
"""SNOMED CT morphologic abnormality; no DICOM context group lists consolidation."""
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")
"""CID 7162 Algorithm Family."""

SEG_SERIES_NUMBER = 9801
"""Series numbers of the outputs: high, so that they sort after the scanner's series."""


@dataclass(frozen=True)
class SegmentSpec:
    """One segment: where its voxels come from and how it is coded."""

    number: int
    """SegmentNumber in the SEG (fixed; the SR refers to it)."""
    name: str
    """Short label, the result's region key (RUL...) or GGO / CONSOLIDATION."""
    label: str
    """SegmentLabel shown by viewers."""
    category: Code
    property_type: Code
    laterality: Code | None
    mask: str
    """Which mask of the analysis holds it: ``lobes`` or ``opacity``."""
    value: int
    """The label value in that mask."""
    colour: tuple[int, int, int]
    """RGB display colour (as in :mod:`appliance.render`)."""


def _lobe(lobe: Lobe, label: str, code: Code, side: Code | None, colour) -> SegmentSpec:
    return SegmentSpec(int(lobe), lobe.name, label, ANATOMICAL_STRUCTURE, code, side, "lobes",
                       int(lobe), colour)


SEGMENTS: tuple[SegmentSpec, ...] = (
    _lobe(Lobe.RUL, "Right upper lobe", UPPER_LOBE, RIGHT, (0, 114, 178)),
    _lobe(Lobe.RML, "Right middle lobe", MIDDLE_LOBE, None, (0, 158, 115)),
    _lobe(Lobe.RLL, "Right lower lobe", LOWER_LOBE, RIGHT, (86, 180, 233)),
    _lobe(Lobe.LUL, "Left upper lobe", UPPER_LOBE, LEFT, (204, 121, 167)),
    _lobe(Lobe.LLL, "Left lower lobe", LOWER_LOBE, LEFT, (230, 159, 0)),
    SegmentSpec(6, "GGO", "Ground-glass opacity", MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
                GROUND_GLASS_OPACITY, None, "opacity", int(Opacity.GGO), (240, 228, 66)),
    SegmentSpec(7, "CONSOLIDATION", "Consolidation", MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
                CONSOLIDATION, None, "opacity", int(Opacity.CONSOLIDATION), (213, 94, 0)),
)
"""The seven segments, in segment-number order."""
SEGMENT_BY_NAME = {s.name: s for s in SEGMENTS}
MODEL_OF_MASK = {"lobes": "lobes", "opacity": "opacity"}
"""Which entry of the result's ``models`` produced each mask."""


@dataclass(frozen=True)
class Equipment:
    """Who made the outputs: General Equipment of the SEG and SR, the SR's device observer."""

    manufacturer: str
    model_name: str
    software_version: str
    device_serial_number: str

    @classmethod
    def from_result(cls, result: dict, device_serial_number: str | None = None) -> Equipment:
        """The software named in the result; the serial is this machine's host name by default."""
        software = result.get("software") or {}
        name = str(software.get("name") or "appliance")
        version = str(software.get("version") or "unknown")
        return cls(manufacturer=name, model_name=name, software_version=version,
                   device_serial_number=device_serial_number or socket.gethostname() or "unknown")


TYPE2_STUDY_ATTRIBUTES = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber",
)
"""Patient and study attributes that derived objects copy and must carry (Type 2: present,
possibly empty). Scanners and test files sometimes leave them out."""


SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID",
               "FrameOfReferenceUID")
"""UIDs of a source that the outputs copy or reference; they must be valid."""


def source_headers(files: Sequence[str | os.PathLike]) -> list[Dataset]:
    """Headers of the source instances, once per file, in the order given (the order of
    ``SeriesInfo.files``: one per slice, or the one Enhanced CT file repeated). Every element
    is converted here, under the lenient reading mode (scanner data only warns). Missing Type 2
    patient and study attributes are added empty, so that the derived objects carry them; an
    empty SOP Class or Instance UID is taken from the file meta (as the series loader does);
    a missing Study or Series Instance UID, or any invalid UID (anonymisers sometimes write
    UUIDs), is refused (ValueError): the outputs could not join the study validly."""
    out: list[Dataset] = []
    seen: set[str] = set()
    for f in files:
        key = os.fspath(f)
        if key in seen:
            continue
        seen.add(key)
        ds = pydicom.dcmread(key, stop_before_pixels=True)
        for _ in ds.iterall():  # converts raw elements (and those inside sequences)
            pass
        meta = getattr(ds, "file_meta", Dataset())
        for keyword, fallback in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                  ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
            if not str(ds.get(keyword) or "").strip() and meta.get(fallback):
                setattr(ds, keyword, meta[fallback].value)  # as the series loader does
        for keyword in SOURCE_UIDS:
            value = str(ds.get(keyword) or "").strip()
            if not value and keyword != "FrameOfReferenceUID":
                raise ValueError(f"`files` must be instances with a {keyword}: {key} has none, so "
                                 "DICOM outputs cannot refer to it or join its study")
            if value and not UID(value).is_valid:
                raise ValueError(f"`files` must have valid UIDs: {key} has {keyword} {value!r} "
                                 "(a DICOM UID is digits and dots), which outputs would copy")
        for keyword in TYPE2_STUDY_ATTRIBUTES:
            if keyword not in ds:
                setattr(ds, keyword, "")
        out.append(ds)
    return out


def model_of(result: dict, mask: str) -> dict:
    """The result's ``models`` entry that produced ``mask`` (``lobes`` or ``opacity``)."""
    wanted = MODEL_OF_MASK[mask]
    for entry in result.get("models") or []:
        if entry.get("name") == wanted:
            return entry
    models = [m.get("name") for m in result.get("models") or []]
    raise ValueError(f"`result['models']` must name a {wanted!r} model, got {models}")


def algorithm_identification(result: dict, mask: str) -> hd.AlgorithmIdentificationSequence:
    """The model behind a mask, as a SEG AlgorithmIdentificationSequence (family: AI)."""
    entry = model_of(result, mask)
    parameters = {"sha256": str(entry["sha256"])} if entry.get("sha256") else None
    software = result.get("software") or {}
    return hd.AlgorithmIdentificationSequence(
        name=str(entry["name"]), family=ARTIFICIAL_INTELLIGENCE, version=str(entry["version"]),
        source=str(software.get("name") or "appliance"), parameters=parameters,
    )


def tracking_uid(seg_sop_instance_uid: str, segment_number: int) -> str:
    """TrackingUID of a segment, derived from the SEG's UID: the SR's measurement group of the
    segment carries the same one."""
    return generate_uid(entropy_srcs=[seg_sop_instance_uid, "segment", str(segment_number)])


def segment_descriptions(
    result: dict, seg_sop_instance_uid: str
) -> list[hd.seg.SegmentDescription]:
    """The seven SegmentDescriptions, with laterality modifiers and display colours."""
    out = []
    for spec in SEGMENTS:
        desc = hd.seg.SegmentDescription(
            segment_number=spec.number,
            segment_label=spec.label,
            segmented_property_category=spec.category,
            segmented_property_type=spec.property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_identification(result, spec.mask),
            tracking_id=spec.name,
            tracking_uid=tracking_uid(seg_sop_instance_uid, spec.number),
            display_color=hd.color.CIELabColor.from_rgb(*spec.colour),
        )
        if spec.laterality is not None:
            # PS3.3 C.8.20.2: Segmented Property Type Modifier Code Sequence sits inside the
            # type's item; highdicom's SegmentDescription has no argument for it.
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept.from_code(spec.laterality)
            ]
        out.append(desc)
    return out


def segment_stack(lobes: np.ndarray, opacity: np.ndarray) -> np.ndarray:
    """(slices, rows, cols, 7) uint8 binary array, segment ``n`` in channel ``n - 1``."""
    if lobes.shape != opacity.shape or lobes.ndim != 3:
        raise ValueError(f"`lobes` and `opacity` must be 3D of one shape, got {lobes.shape} and "
                         f"{opacity.shape}")
    out = np.empty((*lobes.shape, len(SEGMENTS)), dtype=np.uint8)
    for spec in SEGMENTS:
        mask = lobes if spec.mask == "lobes" else opacity
        np.equal(mask, spec.value, out=out[..., spec.number - 1])
    return out


def build_segmentation(
    *,
    lobes: np.ndarray,
    opacity: np.ndarray,
    result: dict,
    sources: Sequence[Dataset],
    frame_numbers: Sequence[int | None],
    series_instance_uid: str,
    sop_instance_uid: str,
    equipment: Equipment,
    series_number: int = SEG_SERIES_NUMBER,
    series_description: str = "AI lung lobes and opacities (not for diagnosis)",
) -> hd.seg.Segmentation:
    """The SEG of one analysis.

    ``lobes`` and ``opacity`` are on the loaded series' grid, axis 0 in the order of
    ``SeriesInfo.files`` / ``sop_instance_uids``. ``sources`` are the source headers: one per
    slice, in that order, for a classic series, or the single Enhanced CT dataset, with
    ``frame_numbers[k]`` the 1-based frame of slice ``k``.
    """
    if not sources:
        raise ValueError("`sources` must hold the source images' headers, got none")
    n = lobes.shape[0]
    if len(frame_numbers) != n:
        raise ValueError(f"`frame_numbers` must have one entry per slice ({n}), "
                         f"got {len(frame_numbers)}")
    stack = segment_stack(lobes, opacity)
    if len(sources) == 1 and int(sources[0].get("NumberOfFrames") or 1) > 1:
        # One multi-frame source: SEG frame i must be source frame i + 1.
        frames = int(sources[0].NumberOfFrames)
        order = [f for f in frame_numbers]
        if any(f is None for f in order) or sorted(order) != list(range(1, frames + 1)):
            raise ValueError(f"`frame_numbers` must be a permutation of 1..{frames} for a "
                             f"multi-frame source, got {list(order)}")
        by_frame = np.empty_like(stack)
        by_frame[[f - 1 for f in order]] = stack  # type: ignore[operator]
        stack = by_frame
    elif len(sources) != n:
        raise ValueError(f"`sources` must hold one header per slice ({n}), got {len(sources)}")
    return hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=stack,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segment_descriptions(result, sop_instance_uid),
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_version,
        device_serial_number=equipment.device_serial_number,
        content_label="LUNG_OPACITY",
        content_description="AI lobes and opacities; not a diagnosis",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=False,
        series_description=series_description,
    )
