"""`appliance export csv`: one row per analysed scan, for statistics packages and spreadsheets.

Rows are ordered by patient id, then by acquisition time. ``--since YYYY-MM-DD`` keeps the scans
whose study date is on or after that day; the serial columns still compare with the patient's
real baseline and previous scan, filtered out or not. An empty store (or a filter that keeps
nothing) writes the header alone, says so on stderr and exits 0.

Format: UTF-8, comma-separated, a header row, ``\\n`` line ends. An empty cell means unknown or
not applicable (null in the result JSON). Numbers are written at full precision (Python's
shortest repr), so they read back exactly; rounding is for display only. Booleans are
``true``/``false``.

Columns, in this order (the names are stable; new columns are only ever appended):

============================== ==============================================================
column                         meaning
============================== ==============================================================
patient_id                     DICOM Patient ID
series_uid                     Series Instance UID of the analysed series
result_id                      the store's id of the result (its latest analysis)
study_date                     YYYY-MM-DD of acquisition (of analysis when no acquisition time)
study_time                     HH:MM:SS, likewise
acquired_at                    acquisition date-time as in the result (empty when unknown)
scan_index                     0 for the patient's baseline (first scan), 1, 2... after it
time_point                     ``baseline``, ``follow-up 1``, ``follow-up 2``...
onset_date                     symptom onset date recorded by staff (YYYY-MM-DD)
days_since_onset               whole days from onset to the study date
clinical_type                  mild, moderate, severe or critical (recorded by staff)
days_since_baseline            days (fractional) since the baseline scan
days_since_previous            days (fractional) since the previous scan; empty for the baseline
<region>_plo_pct               percentage of lung opacification of the region
<region>_lung_ml               lung volume of the region (ml)
<region>_opacity_ml            opacity (GGO + consolidation) volume of the region (ml)
<region>_ggo_pct               ground-glass volume, percent of the region's lung volume
<region>_consolidation_pct     consolidation volume, percent of the region's lung volume
<lobe>_severity                Pan et al. lobe score 0-5
severity_score                 CT severity score, sum of the five lobe scores (0-25)
qa_ok                          true when no QA flag was raised
qa_flags                       the QA flag codes raised, ``;``-separated, first seen first
review_score                   latest reviewer score 0-5 (empty when never reviewed)
review_count                   number of reviews of the result
<region>_delta_pts_vs_baseline PLO change against the baseline in percentage points
<region>_change_pct_vs_baseline 100 x delta / baseline PLO; empty when the baseline PLO is
                               below the involvement minimum (DESIGN.md, serial comparison)
<region>_delta_pts_vs_previous PLO change against the previous scan in points
<region>_change_pct_vs_previous 100 x delta / previous PLO, likewise
trend                          progressing, improving or stable (whole lung against the
                               previous scan); empty for the baseline
============================== ==============================================================

``<region>`` runs over ``whole, right, left, RUL, RML, RLL, LUL, LLL`` and ``<lobe>`` over
``RUL, RML, RLL, LUL, LLL``: all ``<region>_`` measurement columns of one region come together
(plo, lung, opacity, ggo, consolidation), region after region, then the lobe severities; the
serial columns likewise come region by region (the four change columns of one region together).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from datetime import date
from typing import TextIO

from appliance.pipeline.quantify import REGIONS
from appliance.research.dataset import ScanRow

LOBES = REGIONS[3:]
MEASURES = ("plo_pct", "lung_ml", "opacity_ml", "ggo_pct", "consolidation_pct")
CHANGES = (("delta_pts", "vs_baseline"), ("change_pct", "vs_baseline"),
           ("delta_pts", "vs_previous"), ("change_pct", "vs_previous"))

COLUMNS: tuple[str, ...] = (
    "patient_id", "series_uid", "result_id", "study_date", "study_time", "acquired_at",
    "scan_index", "time_point", "onset_date", "days_since_onset", "clinical_type",
    "days_since_baseline", "days_since_previous",
    *(f"{region}_{m}" for region in REGIONS for m in MEASURES),
    *(f"{lobe}_severity" for lobe in LOBES),
    "severity_score", "qa_ok", "qa_flags", "review_score", "review_count",
    *(f"{region}_{field}_{against}" for region in REGIONS for field, against in CHANGES),
    "trend",
)


def _cell(value: object) -> object:
    """None -> empty, bool -> true/false; numbers unchanged (csv writes repr: exact)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


def row_values(row: ScanRow) -> dict[str, object]:
    """The row's cells by column name (Python values, before CSV formatting)."""
    result, serial, patient = row.scan.result, row.serial, row.patient
    regions = result.get("regions", {})
    qa = result.get("qa", {})
    out: dict[str, object] = {
        "patient_id": patient.patient_id,
        "series_uid": row.scan.series_uid,
        "result_id": row.scan.result_id,
        "study_date": row.when.date().isoformat(),
        "study_time": row.when.time().replace(microsecond=0).isoformat(),
        "acquired_at": row.scan.acquired_at,
        "scan_index": serial["index"],
        "time_point": serial["role"],
        "onset_date": patient.onset_date,
        "days_since_onset": serial["days_since_onset"],
        "clinical_type": patient.clinical_type.value if patient.clinical_type else None,
        "days_since_baseline": serial["days_since_baseline"],
        "days_since_previous": serial["days_since_previous"],
    }
    for region in REGIONS:
        r = regions.get(region, {})
        for m in MEASURES:
            out[f"{region}_{m}"] = r.get(m)
    for lobe in LOBES:
        out[f"{lobe}_severity"] = regions.get(lobe, {}).get("severity")
    out["severity_score"] = result.get("severity_score")
    out["qa_ok"] = bool(qa.get("ok")) if "ok" in qa else None
    out["qa_flags"] = ";".join(dict.fromkeys(f.get("code", "?") for f in qa.get("flags", [])))
    out["review_score"] = row.review_score
    out["review_count"] = row.review_count
    for region in REGIONS:
        for field, against in CHANGES:
            change = (serial.get(against) or {}).get(region) or {}
            out[f"{region}_{field}_{against}"] = change.get(field)
    out["trend"] = serial.get("trend")
    return out


def select_since(rows: Iterable[ScanRow], since: date | None) -> list[ScanRow]:
    """The rows whose study date is on or after ``since`` (all of them when None)."""
    return [r for r in rows if since is None or r.when.date() >= since]


def write_csv(rows: Iterable[ScanRow], stream: TextIO) -> int:
    """Header and one line per row; returns the number of rows written."""
    writer = csv.DictWriter(stream, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    n = 0
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row_values(row).items()})
        n += 1
    return n
