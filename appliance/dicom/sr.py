"""DICOM measurement report (SR, TID 1500) of a result: volumes, PLO and severity per region.

A Comprehensive 3D SR whose imaging measurements are:

- one volumetric ROI group (TID 1411) per lobe, referencing the lobe's segment of the SEG
  (ReferencedSegment, with the source series) and carrying the SEG segment's TrackingUID:
  lung volume, opacity / ground-glass / consolidation volumes and percentages, mean lung
  attenuation and the lobe's severity score (0-5);
- one volumetric ROI group per opacity segment (ground-glass, consolidation): its volume and
  its percentage of the whole lung;
- one measurement group (TID 1501) each for the right lung, the left lung and both lungs,
  which are unions of segments: the same figures, and the total severity score (0-25) on the
  whole lung.

Values are the result's numbers at full precision (NumericValue as DS for display and
FloatingPointValue, PS3.3 C.18.1, for the exact figure); a figure that is null in the result
(PLO of a region without lung) is left out rather than written as a number. Standard concepts
where DICOM has them: SCT 118565006 "Volume", DCM 112031 "Attenuation Coefficient" with
derivation SCT 373098007 "Mean", UCUM units (``ml``, ``%``, ``[hnsf'U]``, ``{score}``). PLO, the
opacity volumes and the severity scores have no standard code; they use the private scheme
``99APPLIANCE`` (PS3.16 8.2: designators starting with "99" are private), declared in the
Coding Scheme Identification Sequence.

The observer is a device (this software), algorithm identification (TID 4019) names the
models with family DCM 123110 "Artificial Intelligence", and the document is left unverified
and preliminary: it is AI output for review, not a diagnosis.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from appliance.dicom.seg import (
    ANATOMICAL_STRUCTURE,
    ARTIFICIAL_INTELLIGENCE,
    LEFT,
    LUNG,
    RIGHT,
    RIGHT_AND_LEFT,
    SEGMENT_BY_NAME,
    SEGMENTS,
    Equipment,
    SegmentSpec,
    model_of,
    tracking_uid,
)

SR_SERIES_NUMBER = 9802
SCHEME = "99APPLIANCE"
"""Private coding scheme for the concepts DICOM has no code for."""

VOLUME = Code("118565006", "SCT", "Volume")
ATTENUATION_COEFFICIENT = Code("112031", "DCM", "Attenuation Coefficient")
MEAN = Code("373098007", "SCT", "Mean")
OPACITY_VOLUME = Code("OPACITY-ML", SCHEME, "Volume of lung opacity")
GGO_VOLUME = Code("GGO-ML", SCHEME, "Volume of ground-glass opacity")
CONSOLIDATION_VOLUME = Code("CONS-ML", SCHEME, "Volume of consolidation")
PLO = Code("PLO", SCHEME, "Percentage of lung opacification")
GGO_PERCENT = Code("GGO-PCT", SCHEME, "Percentage of lung with ground-glass opacity")
CONSOLIDATION_PERCENT = Code("CONS-PCT", SCHEME, "Percentage of lung with consolidation")
LOBE_SEVERITY = Code("LOBE-SCORE", SCHEME, "Lobe CT severity score")
SEVERITY_SCORE = Code("CT-SCORE", SCHEME, "CT severity score")
CT_CHEST = Code("24627-2", "LN", "CT Chest")
"""Procedure reported (CID 100 is baseline; LOINC's chest CT)."""

ML = Code("ml", "UCUM", "milliliter")
PERCENT = codes.UCUM.Percent
HOUNSFIELD_UNIT = codes.UCUM.HounsfieldUnit
SCORE = Code("{score}", "UCUM", "score")

REGION_FIELDS: tuple[tuple[str, Code, Code, str], ...] = (
    ("lung_ml", VOLUME, ML, "lobes"),
    ("opacity_ml", OPACITY_VOLUME, ML, "opacity"),
    ("ggo_ml", GGO_VOLUME, ML, "opacity"),
    ("consolidation_ml", CONSOLIDATION_VOLUME, ML, "opacity"),
    ("plo_pct", PLO, PERCENT, "opacity"),
    ("ggo_pct", GGO_PERCENT, PERCENT, "opacity"),
    ("consolidation_pct", CONSOLIDATION_PERCENT, PERCENT, "opacity"),
    ("mean_lung_hu", ATTENUATION_COEFFICIENT, HOUNSFIELD_UNIT, "lobes"),
    ("severity", LOBE_SEVERITY, SCORE, "opacity"),
)
"""Region field of the result -> measurement concept, unit and the model (mask) it rests on.
Groups name the lobe model; measurements resting on the opacity model name it too."""
SIDE_SITES = {
    "right": ("Right lung", hd.sr.FindingSite(LUNG, laterality=RIGHT)),
    "left": ("Left lung", hd.sr.FindingSite(LUNG, laterality=LEFT)),
    "whole": ("Both lungs", hd.sr.FindingSite(LUNG, laterality=RIGHT_AND_LEFT)),
}
OPACITY_FIELDS = {"GGO": ("ggo_ml", "ggo_pct"),
                  "CONSOLIDATION": ("consolidation_ml", "consolidation_pct")}


def measurement_concept(field: str) -> Code:
    """The concept name under which a region field of the result is reported."""
    for name, concept, _, _ in REGION_FIELDS:
        if name == field:
            return concept
    raise ValueError(f"`field` must be one of {[f[0] for f in REGION_FIELDS]}, got {field!r}")


def _measurement(concept: Code, value: float, unit: Code,
                 algorithm: hd.sr.AlgorithmIdentification | None) -> hd.sr.Measurement:
    derivation = MEAN if concept == ATTENUATION_COEFFICIENT else None
    return hd.sr.Measurement(name=concept, value=float(value), unit=unit, derivation=derivation,
                             algorithm_id=algorithm)


def _region_measurements(region: dict, opacity_algorithm: hd.sr.AlgorithmIdentification,
                         ) -> list[hd.sr.Measurement]:
    """The region's figures; those resting on the opacity model name it (the group names the
    lobe model)."""
    return [_measurement(concept, region[field], unit,
                         opacity_algorithm if model == "opacity" else None)
            for field, concept, unit, model in REGION_FIELDS if region.get(field) is not None]


def _algorithm(result: dict, mask: str) -> hd.sr.AlgorithmIdentification:
    entry = model_of(result, mask)
    return hd.sr.AlgorithmIdentification(name=str(entry["name"]), version=str(entry["version"]),
                                         family=ARTIFICIAL_INTELLIGENCE)


def _site(spec: SegmentSpec) -> hd.sr.FindingSite:
    return hd.sr.FindingSite(spec.property_type, laterality=spec.laterality)


def _segment_group(
    spec: SegmentSpec, measurements: list[hd.sr.Measurement], seg: Dataset, source_series_uid: str,
    result: dict, finding_sites: list[hd.sr.FindingSite],
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid(seg.SOPInstanceUID, spec.number), identifier=spec.label),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
            segment_number=spec.number,
            source_series=hd.sr.SourceSeriesForSegmentation(source_series_uid)),
        finding_type=spec.property_type,
        finding_category=spec.category,
        algorithm_id=_algorithm(result, spec.mask),
        finding_sites=finding_sites,
        measurements=measurements,
    )


def measurement_groups(result: dict, seg: Dataset, source_series_uid: str) -> list:
    """TID 1500 imaging measurements: lobes, opacity segments, then right, left, both lungs."""
    regions = result["regions"]
    lobe_algorithm = _algorithm(result, "lobes")
    opacity_algorithm = _algorithm(result, "opacity")
    groups: list = []
    for spec in SEGMENTS:
        if spec.mask == "lobes":
            groups.append(_segment_group(
                spec, _region_measurements(regions[spec.name], opacity_algorithm), seg,
                source_series_uid, result, [_site(spec)]))
    whole = regions["whole"]
    for name, (ml_field, pct_field) in OPACITY_FIELDS.items():
        spec = SEGMENT_BY_NAME[name]
        items = [_measurement(VOLUME, whole[ml_field], ML, None)]
        if whole.get(pct_field) is not None:
            items.append(_measurement(measurement_concept(pct_field), whole[pct_field], PERCENT,
                                      None))
        groups.append(_segment_group(spec, items, seg, source_series_uid, result,
                                     [SIDE_SITES["whole"][1]]))
    for key in ("right", "left", "whole"):
        label, site = SIDE_SITES[key]
        items = _region_measurements(regions[key], opacity_algorithm)
        if key == "whole":
            items.append(_measurement(SEVERITY_SCORE, result["severity_score"], SCORE,
                                      opacity_algorithm))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=generate_uid(entropy_srcs=[seg.SOPInstanceUID, "region", key]),
                identifier=label),
            finding_type=LUNG,
            finding_category=ANATOMICAL_STRUCTURE,
            finding_sites=[site],
            algorithm_id=lobe_algorithm,
            measurements=items,
        ))
    return groups


def device_observer(equipment: Equipment) -> hd.sr.ObserverContext:
    """This software as the SR's observer (TID 1004), with a UID stable for this machine."""
    uid = generate_uid(entropy_srcs=[equipment.manufacturer, equipment.model_name,
                                     equipment.device_serial_number])
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid, name=equipment.model_name, manufacturer_name=equipment.manufacturer,
            model_name=equipment.model_name, serial_number=equipment.device_serial_number),
    )


def build_report(
    *,
    result: dict,
    seg: Dataset,
    sources: Sequence[Dataset],
    series_instance_uid: str,
    sop_instance_uid: str,
    equipment: Equipment,
    series_number: int = SR_SERIES_NUMBER,
    series_description: str = "AI lung opacity measurements (not for diagnosis)",
) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 report of one result, referencing ``seg`` (its segments) and the sources
    (image library and evidence)."""
    if not sources:
        raise ValueError("`sources` must hold the source images' headers, got none")
    if seg.get("Modality") != "SEG":
        raise ValueError(
            f"`seg` must be a Segmentation dataset, got Modality {seg.get('Modality')}")
    source_series_uid = str(sources[0].SeriesInstanceUID)
    # highdicom describes library entries from classic image headers only (PixelSpacing etc.
    # at the top level); an Enhanced CT source is still referenced as evidence and by the SEG.
    multi_frame = any(int(s.get("NumberOfFrames") or 1) > 1 for s in sources)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=device_observer(equipment)),
        procedure_reported=CT_CHEST,
        imaging_measurements=measurement_groups(result, seg, source_series_uid),
        referenced_images=None if multi_frame else list(sources),
    )
    return hd.sr.Comprehensive3DSR(
        evidence=[*sources, seg],
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=equipment.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_version,
        device_serial_number=equipment.device_serial_number,
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=SCHEME, name="Appliance local concepts",
            responsible_organization=equipment.manufacturer)],
    )
