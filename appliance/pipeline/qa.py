"""Quality checks on a finished analysis (DESIGN.md, "QA flags"). Flags never stop a result:
the result is stored and shown, marked for review, with every reason spelled out."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum

import numpy as np

from appliance.config import QAConfig
from appliance.labels import LEFT_LOBES, RIGHT_LOBES, Lobe
from appliance.pipeline.geometry import bounding_box, members

EDGE_SLICE_MIN_MM2 = 100.0
"""TRUNCATED: more lung than this on the first or last slice means the lungs were cut off."""
LOBE_PRESENT_ML = 1.0
"""LATERALITY: a lobe counts as present on a side above this volume."""


class Flag(StrEnum):
    LUNG_VOLUME = "LUNG_VOLUME"
    LOBE_TINY = "LOBE_TINY"
    LR_IMBALANCE = "LR_IMBALANCE"
    LOW_CONFIDENCE = "LOW_CONFIDENCE"
    CLASSICAL_DISAGREEMENT = "CLASSICAL_DISAGREEMENT"
    TRUNCATED = "TRUNCATED"
    LATERALITY = "LATERALITY"
    MOTION = "MOTION"
    NO_LUNG = "NO_LUNG"


@dataclass(frozen=True)
class QAFlag:
    code: str
    region: str | None
    message: str
    value: float | None
    limit: float | None


@dataclass(frozen=True)
class QAInputs:
    """What the checks need besides the quantification, all on the canonical scan grid."""

    lobes: np.ndarray
    spacing: tuple[float, float, float]
    confidence: float | None
    confidence_limit: float
    classical_lung_ml: float | None
    motion_score: float | None


def run_checks(regions: dict[str, dict], inputs: QAInputs, cfg: QAConfig) -> dict:
    """{"ok": bool, "flags": [...]} as in the result contract."""
    flags: list[QAFlag] = []
    whole = regions["whole"]["lung_ml"]
    lo, hi = cfg.lung_volume_ml
    if whole <= 0:
        flags.append(QAFlag(Flag.NO_LUNG, "whole", "no lung was segmented", 0.0, None))
    elif not lo <= whole <= hi:
        flags.append(QAFlag(Flag.LUNG_VOLUME, "whole",
                            f"whole lung is {whole / 1000:.2f} L (expected {lo / 1000:.1f}-{hi / 1000:.1f} L)",
                            whole, lo if whole < lo else hi))
    for lobe in Lobe:
        ml = regions[lobe.name]["lung_ml"]
        pct = 100.0 * ml / whole if whole > 0 else 0.0
        if pct < cfg.lobe_min_pct:
            what = "absent" if ml <= 0 else f"{pct:.1f}% of lung volume"
            flags.append(QAFlag(Flag.LOBE_TINY, lobe.name,
                                f"{lobe.name} is {what} (expected >= {cfg.lobe_min_pct:g}%)",
                                pct, cfg.lobe_min_pct))
    if whole > 0:
        right = 100.0 * regions["right"]["lung_ml"] / whole
        rlo, rhi = cfg.right_fraction_pct
        if not rlo <= right <= rhi:
            flags.append(QAFlag(Flag.LR_IMBALANCE, "right",
                                f"right lung is {right:.1f}% of the total (expected {rlo:g}-{rhi:g}%)",
                                right, rlo if right < rlo else rhi))
    limit = cfg.min_confidence or inputs.confidence_limit
    if inputs.confidence is not None and limit > 0 and inputs.confidence < limit:
        flags.append(QAFlag(Flag.LOW_CONFIDENCE, "whole",
                            f"mean model confidence in the lung is {inputs.confidence:.3f} (limit {limit:.3f})",
                            inputs.confidence, limit))
    if inputs.classical_lung_ml is not None and whole > 0:
        # Thresholds miss consolidated lung, so the model may exceed the classical lung by its opacity.
        diff = whole - inputs.classical_lung_ml
        allowance = regions["whole"]["opacity_ml"] if diff > 0 else 0.0
        excess = 100.0 * max(abs(diff) - allowance, 0.0) / whole
        if excess > cfg.classical_max_disagreement_pct:
            flags.append(QAFlag(Flag.CLASSICAL_DISAGREEMENT, "whole",
                                f"model lung {whole:.0f} ml vs HU-threshold lung {inputs.classical_lung_ml:.0f} ml "
                                f"({excess:.1f}% beyond the opacity allowance)",
                                excess, cfg.classical_max_disagreement_pct))
    flags += _truncation(inputs)
    flags += _laterality(inputs, regions)
    if inputs.motion_score is not None and inputs.motion_score > cfg.motion_max_score:
        flags.append(QAFlag(Flag.MOTION, "whole",
                            f"lung outline jumps between slices (motion score {inputs.motion_score:.2f})",
                            inputs.motion_score, cfg.motion_max_score))
    return {"ok": not flags, "flags": [asdict(f) | {"code": str(f.code)} for f in flags]}


def _truncation(inputs: QAInputs) -> list[QAFlag]:
    lung = inputs.lobes > 0
    pixel_mm2 = inputs.spacing[1] * inputs.spacing[2]
    out = []
    for name, k in (("first", 0), ("last", lung.shape[0] - 1)):
        area = float(lung[k].sum()) * pixel_mm2
        if area > EDGE_SLICE_MIN_MM2:
            end = "apex" if k == lung.shape[0] - 1 else "bases"
            out.append(QAFlag(Flag.TRUNCATED, "whole",
                              f"lung touches the {name} slice ({area:.0f} mm2): {end} may be cut off",
                              area, EDGE_SLICE_MIN_MM2))
    return out


def _laterality(inputs: QAInputs, regions: dict[str, dict]) -> list[QAFlag]:
    """In the canonical grid axis 2 increases towards the patient's left."""
    out = []
    box = bounding_box(inputs.lobes, margin=0)
    if box is None:
        return []
    lobes = inputs.lobes[box]  # the lung box: a fraction of the scan
    cols = np.arange(box[2].start, box[2].stop, dtype=np.float64)

    def mean_col(labels: tuple[Lobe, ...]) -> float | None:
        per_col = members(lobes, [int(lb) for lb in labels], max(Lobe) + 1).sum(axis=(0, 1))
        total = per_col.sum()
        return float((per_col * cols).sum() / total) if total else None

    right, left = mean_col(RIGHT_LOBES), mean_col(LEFT_LOBES)
    if right is not None and left is not None and right > left:
        out.append(QAFlag(Flag.LATERALITY, "right",
                          "the lung labelled right lies on the patient's left by the DICOM geometry",
                          None, None))
    n_right = sum(regions[lb.name]["lung_ml"] > LOBE_PRESENT_ML for lb in RIGHT_LOBES)
    n_left = sum(regions[lb.name]["lung_ml"] > LOBE_PRESENT_ML for lb in LEFT_LOBES)
    if n_right < n_left:
        out.append(QAFlag(Flag.LATERALITY, "right",
                          f"the right lung has {n_right} lobes, fewer than the left's {n_left}",
                          float(n_right), float(n_left)))
    return out


def motion_score(lung: np.ndarray, spacing: tuple[float, float, float]) -> float | None:
    """Breathing/motion: the lung cross-section changes smoothly along z in a still scan; a
    motion artefact makes it jump. Score = largest second difference of the slice areas,
    relative to the largest area (0 = smooth)."""
    area = lung.sum(axis=(1, 2)).astype(np.float64)
    present = np.flatnonzero(area > 0)
    if present.size < 5:
        return None
    a = area[present[0] : present[-1] + 1]
    d2 = np.abs(a[:-2] - 2 * a[1:-1] + a[2:])
    # Normalise to a 2 mm slice so thin and thick reconstructions compare.
    scale = (2.0 / spacing[0]) ** 2
    return float(min(d2.max() * scale / a.max(), 10.0))
