"""The store's analysed scans as research rows: one per scan, in patient and time order.

Each patient's current results (the latest result of each series, :meth:`Store.scans`) are
compared again with :func:`appliance.pipeline.serial.compare` and the configured thresholds,
so the serial figures follow the current onset date even when it was edited after the last
analysis. A scan without an acquisition time counts from when it was analysed, as in the
daemon's comparison (:meth:`Store.serial_points`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from appliance.config import Config
from appliance.pipeline.serial import compare
from appliance.store import Patient, ScanResult, Store


@dataclass(frozen=True)
class ScanRow:
    """One analysed scan with what the exports need around it."""

    patient: Patient
    scan: ScanResult
    when: datetime
    """Acquisition time, or the analysis time when the scan has none (naive, as compared)."""
    serial: dict
    """The scan's entry of the serial comparison (index, role, days, vs_baseline, vs_previous)."""
    review_score: int | None
    """The latest review's 0-5 score, None when never reviewed."""
    review_count: int

    @property
    def plo(self) -> dict[str, float | None]:
        return {name: r.get("plo_pct") for name, r in self.scan.result.get("regions", {}).items()}


def patient_ids(store: Store) -> list[str]:
    """Patients with at least one result."""
    return store.patient_ids()


def load_rows(store: Store, config: Config) -> list[ScanRow]:
    """Every patient's current scans, ordered by patient id, then by time."""
    rows: list[ScanRow] = []
    for pid in patient_ids(store):
        patient = store.patient(pid)
        if patient is None:  # results reference patients by foreign key; cannot happen
            continue
        points, onset = store.serial_points(pid)
        entries = {e["key"]: e for e in compare(points, config.serial,
                                                config.analysis.involvement_min_pct, onset)}
        when = {p.key: p.acquired_at for p in points}
        scans = sorted(store.scans(pid), key=lambda s: entries[s.series_uid]["index"])
        for scan in scans:
            reviews = store.reviews(scan.result_id)
            rows.append(ScanRow(patient=patient, scan=scan, when=when[scan.series_uid],
                                serial=entries[scan.series_uid],
                                review_score=reviews[-1]["score"] if reviews else None,
                                review_count=len(reviews)))
    return rows
