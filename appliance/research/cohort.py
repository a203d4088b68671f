"""The paper's analysis (Huang et al. 2020) on the store's scans, as one JSON-ready dict.

Time points: a patient's first scan is the baseline, the second the first follow-up, the third
the second follow-up (the serial comparison's order); later scans are counted but take no part
in the time-point statistics (they do appear in the PLO-versus-onset fit). Scans whose region
PLO is null (no lung found) are left out of that region's figures and counted.

For every region (whole, right, left, the five lobes):

* ``summaries``: PLO per time point and group (all patients, then each clinical type), reported
  as mean (SD) or median (IQR) by the Shapiro-Wilk rule of :mod:`appliance.research.stats`;
* ``paired``: baseline vs first follow-up, first vs second follow-up, baseline vs second
  follow-up, over the patients who have both, for all patients and per clinical type (paired
  t-test or Wilcoxon signed-rank by the normality of the differences);
* ``across_types``: per time point, the clinical types compared (one-way ANOVA or
  Kruskal-Wallis, then Bonferroni-corrected pairwise Welch t or Mann-Whitney U tests).

``onset_fit``: whole-lung PLO of every scan with a known onset date against days since onset,
with a cubic polynomial fit and its R².
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from appliance import INTENDED_USE, __version__
from appliance.pipeline.quantify import REGIONS
from appliance.research import stats
from appliance.research.dataset import ScanRow
from appliance.store import ClinicalType

TIME_POINTS = ("baseline", "follow-up 1", "follow-up 2")
"""The serial comparison's roles of the first three scans."""
TIME_POINT_NAMES = {"baseline": "baseline", "follow-up 1": "first follow-up",
                    "follow-up 2": "second follow-up"}
PAIRS = (("baseline", "follow-up 1"), ("follow-up 1", "follow-up 2"), ("baseline", "follow-up 2"))
ALL = "all"
GROUPS = (ALL, *(t.value for t in ClinicalType))


@dataclass
class _Patient:
    clinical_type: str | None
    plo: dict[str, dict[str, float | None]] = field(default_factory=dict)
    """time point -> region -> PLO."""


def _patients(rows: Sequence[ScanRow]) -> dict[str, _Patient]:
    out: dict[str, _Patient] = {}
    for row in rows:
        ct = row.patient.clinical_type
        p = out.setdefault(row.patient.patient_id, _Patient(ct.value if ct else None))
        if row.serial["role"] in TIME_POINTS:
            p.plo[row.serial["role"]] = row.plo
    return out


def _in_group(p: _Patient, group: str) -> bool:
    return group == ALL or p.clinical_type == group


def _values(patients: dict[str, _Patient], region: str, tp: str, group: str) -> list[float]:
    vals = (p.plo.get(tp, {}).get(region) for p in patients.values() if _in_group(p, group))
    return [v for v in vals if v is not None]


def _pairs(patients: dict[str, _Patient], region: str, a: str, b: str,
           group: str) -> tuple[list[float], list[float]]:
    before, after = [], []
    for p in patients.values():
        if not _in_group(p, group):
            continue
        x, y = p.plo.get(a, {}).get(region), p.plo.get(b, {}).get(region)
        if x is not None and y is not None:
            before.append(x)
            after.append(y)
    return before, after


def counts(rows: Sequence[ScanRow]) -> dict:
    patients = _patients(rows)
    return {
        "patients": len(patients),
        "scans": len(rows),
        "patients_by_type": {g: sum(_in_group(p, g) for p in patients.values()) for g in GROUPS},
        "patients_without_type": sum(p.clinical_type is None for p in patients.values()),
        "patients_without_onset": len({r.patient.patient_id for r in rows
                                       if not r.patient.onset_date}),
        "scans_after_second_follow_up": sum(r.serial["index"] >= len(TIME_POINTS) for r in rows),
        "scans_without_whole_plo": sum(r.plo.get("whole") is None for r in rows),
        "scans_with_qa_flags": sum(not r.scan.result.get("qa", {}).get("ok", False) for r in rows),
    }


def onset_points(rows: Sequence[ScanRow]) -> list[dict]:
    """(days since onset, whole-lung PLO, clinical type) of every scan that has both numbers."""
    return [{"patient_id": r.patient.patient_id, "days_since_onset": r.serial["days_since_onset"],
             "plo_pct": r.plo.get("whole"),
             "clinical_type": r.patient.clinical_type.value if r.patient.clinical_type else None}
            for r in rows
            if r.serial["days_since_onset"] is not None and r.plo.get("whole") is not None]


def analyse(rows: Sequence[ScanRow], alpha: float = stats.ALPHA,
            now: datetime | None = None) -> dict:
    """Every number of the report (see the module docstring)."""
    patients = _patients(rows)
    summaries, paired, across = [], [], []
    for region in REGIONS:
        for tp in TIME_POINTS:
            for group in GROUPS:
                summaries.append({"region": region, "time_point": tp, "group": group,
                                  **stats.describe(_values(patients, region, tp, group), alpha)})
        for group in GROUPS:
            for a, b in PAIRS:
                before, after = _pairs(patients, region, a, b, group)
                paired.append({"region": region, "group": group, "from": a, "to": b,
                               **stats.paired(before, after, alpha)})
        for tp in TIME_POINTS:
            groups = {t.value: _values(patients, region, tp, t.value) for t in ClinicalType}
            across.append({"region": region, "time_point": tp, **stats.across(groups, alpha)})
    points = onset_points(rows)
    fit = stats.cubic_fit([p["days_since_onset"] for p in points], [p["plo_pct"] for p in points])
    return {
        "intended_use": INTENDED_USE,
        "software": {"name": "appliance", "version": __version__},
        "generated_at": (now or datetime.now()).isoformat(timespec="seconds"),
        "method": {
            "alpha": alpha,
            "normality_test": stats.SHAPIRO,
            "rule": (f"a sample is normal when {stats.SHAPIRO} gives p >= alpha; normal samples "
                     f"are reported as {stats.MEAN_SD} and compared with {stats.PAIRED_T} / "
                     f"{stats.ANOVA} / {stats.WELCH_T}, others as {stats.MEDIAN_IQR} with "
                     f"{stats.WILCOXON} / {stats.KRUSKAL} / {stats.MANN_WHITNEY}; samples under "
                     f"{stats.MIN_N} values or with all values equal are not tested for "
                     "normality and take the rank-based branch"),
            "paired_rule": "the normality of the paired differences (later minus earlier) decides",
            "across_rule": "ANOVA only when every clinical type's sample is normal",
            "multiple_comparisons": "Bonferroni: pairwise p times the number of pairs tested, at most 1",
            "min_n": stats.MIN_N,
            "time_points": {tp: TIME_POINT_NAMES[tp] for tp in TIME_POINTS},
            "quartiles": "numpy.percentile, linear interpolation",
        },
        "counts": counts(rows),
        "regions": list(REGIONS),
        "groups": list(GROUPS),
        "summaries": summaries,
        "paired": paired,
        "across_types": across,
        "onset_fit": {**fit, "x": "days_since_onset", "y": "whole_plo_pct", "points": points},
    }
