"""What the dashboard shows, read from the store as small frozen records (no widgets here).

Every function takes the :class:`~appliance.store.Store` and returns plain data, so the screens
only lay out and the tests can check the numbers without a terminal. The serial comparison is
computed here with :func:`appliance.pipeline.serial.compare` from the patient's current results
and onset date, so an onset entered a moment ago counts at once (the daemon's stored copy is
refreshed only when a new result lands).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

import numpy as np

from appliance.config import Config
from appliance.labels import Lobe, Opacity
from appliance.pipeline.quantify import REGIONS
from appliance.pipeline.serial import compare
from appliance.store import JobStage, JobState, Patient, Store

RECENT_RESULTS = 30
RECENT_SERIES = 20
RECENT_FAILURES = 10
PROGRESS_STAGES = (JobStage.LOAD, JobStage.LOBES, JobStage.OPACITY, JobStage.WRITE)
"""The stages a running job passes through, in order (the per-stage progress bar)."""
PREVIEW_MAX_PIXELS = 256
"""CT and masks are kept at most this many pixels wide in memory: a terminal shows fewer."""


def _rows(store: Store, sql: str, params: tuple = ()) -> list[tuple]:
    # Dashboard-only listings (series, latest results) in the dashboard's own shape.
    return store.read(sql, params)


# ----------------------------------------------------------------------------- change marker


def change_marker(store: Store) -> tuple:
    """Cheap fingerprint of what the dashboard shows: the last event (jobs queued, started,
    finished, results, reviews, patient edits), instances received, running jobs' stages."""
    return tuple(_rows(store, """SELECT (SELECT MAX(id) FROM events),
                                        (SELECT COALESCE(SUM(instance_count), 0) FROM series),
                                        (SELECT group_concat(id || ':' || stage) FROM jobs
                                         WHERE state = 'running')""")[0])


# ----------------------------------------------------------------------------- overview


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    patient_id: str
    description: str | None
    instances: int
    last_instance_at: float
    status: str
    """receiving (no job covers every instance yet), queued, the running job's stage, done,
    failed."""


@dataclass(frozen=True)
class JobRow:
    job_id: int
    patient_id: str
    series_uid: str
    state: JobState
    stage: str
    reason: str | None
    attempts: int

    @property
    def stage_index(self) -> int:
        """1..4 along PROGRESS_STAGES for a running job, 0 before the first stage."""
        known = JobStage.of(self.stage)
        return PROGRESS_STAGES.index(known) + 1 if known in PROGRESS_STAGES else 0


@dataclass(frozen=True)
class ResultRow:
    result_id: int
    series_uid: str
    patient_id: str
    acquired_at: str | None
    created_at: float
    plo_whole: float | None
    severity_score: int | None
    qa_ok: bool
    qa_codes: tuple[str, ...]
    trend: str | None
    """progressing, improving, stable; None for a baseline."""
    delta_prev_pts: float | None
    change_prev_pct: float | None
    review_score: int | None
    """The latest review's 0-5 score, None when not reviewed."""


@dataclass(frozen=True)
class Alert:
    kind: str
    """plo, progression, qa or failed."""
    text: str
    patient_id: str
    result_id: int | None = None


@dataclass(frozen=True)
class Overview:
    series: list[SeriesRow]
    jobs: list[JobRow]
    """Running, then queued (oldest first), then recent failures."""
    counts: dict[JobState, int]
    results: list[ResultRow]
    alerts: list[Alert]


def _job_rows(store: Store) -> list[JobRow]:
    out = []
    for state, limit in ((JobState.RUNNING, 100), (JobState.QUEUED, 100),
                         (JobState.FAILED, RECENT_FAILURES)):
        jobs = store.jobs(state=state, limit=limit)
        if state == JobState.QUEUED:
            jobs = list(reversed(jobs))  # next to run first
        out += [JobRow(j.id, j.patient_id, j.series_uid, j.state, j.stage, j.reason, j.attempts)
                for j in jobs]
    return out


def _series_rows(store: Store) -> list[SeriesRow]:
    rows = _rows(store, """SELECT s.series_uid, s.patient_id, s.description, s.instance_count,
                                  s.last_instance_at, j.state, j.stage, j.instance_count
                           FROM series s LEFT JOIN jobs j ON j.id =
                                (SELECT MAX(id) FROM jobs x WHERE x.series_uid = s.series_uid)
                           ORDER BY s.last_instance_at DESC LIMIT ?""", (RECENT_SERIES,))
    out = []
    for uid, pid, desc, n, last, state, stage, covered in rows:
        if state is None or (state in ("done", "failed") and n > covered):
            status = "receiving"
        elif state == "running":
            status = f"running: {stage}"
        else:
            status = state
        out.append(SeriesRow(uid, pid, desc, int(n), float(last), status))
    return out


def serial_entries(store: Store, config: Config, patient_id: str) -> dict[str, dict]:
    """The patient's serial comparison (DESIGN.md), keyed by series UID."""
    points, onset = store.serial_points(patient_id)
    entries = compare(points, config.serial, config.analysis.involvement_min_pct, onset)
    return {e["key"]: e for e in entries}


def _whole_vs_previous(entry: dict | None) -> tuple[str | None, float | None, float | None]:
    if not entry or not entry.get("vs_previous"):
        return None, None, None
    whole = entry["vs_previous"]["whole"]
    return entry["trend"], whole["delta_pts"], whole["change_pct"]


def _qa_codes(result: dict) -> tuple[str, ...]:
    return tuple(dict.fromkeys(str(f.get("code")) for f in result.get("qa", {}).get("flags", [])))


def _result_rows(store: Store, config: Config) -> list[ResultRow]:
    rows = _rows(store, """SELECT r.id, r.series_uid, r.patient_id, r.acquired_at, r.created_at,
                                  r.plo_whole, r.severity_score, r.qa_ok, r.result_json,
                                  (SELECT v.score FROM reviews v WHERE v.result_id = r.id
                                   ORDER BY v.id DESC LIMIT 1)
                           FROM results r
                           WHERE r.id = (SELECT MAX(id) FROM results x
                                         WHERE x.series_uid = r.series_uid)
                           ORDER BY r.created_at DESC, r.id DESC LIMIT ?""", (RECENT_RESULTS,))
    serials: dict[str, dict[str, dict]] = {}
    out = []
    for rid, uid, pid, acquired, created, plo, severity, qa_ok, text, score in rows:
        if pid not in serials:
            serials[pid] = serial_entries(store, config, pid)
        trend, delta, change = _whole_vs_previous(serials[pid].get(uid))
        out.append(ResultRow(rid, uid, pid, acquired, created, plo, severity, bool(qa_ok),
                             _qa_codes(json.loads(text)), trend, delta, change, score))
    return out


def alerts_of(results: list[ResultRow], jobs: list[JobRow], config: Config) -> list[Alert]:
    """High whole-lung PLO, progression beyond the threshold, QA failures, failed jobs."""
    cfg = config.dashboard
    out = []
    for r in results:
        when = (r.acquired_at or "")[:16].replace("T", " ")
        if r.plo_whole is not None and r.plo_whole > cfg.alert_plo_pct:
            out.append(Alert("plo", f"PLO {fmt_pct(r.plo_whole)}% > {cfg.alert_plo_pct:g}%  "
                                    f"{r.patient_id}  {when}", r.patient_id, r.result_id))
        if r.delta_prev_pts is not None and r.delta_prev_pts >= cfg.alert_progress_pts:
            out.append(Alert("progression", f"progression {r.delta_prev_pts:+.1f} pts vs previous "
                                            f"(≥ {cfg.alert_progress_pts:g})  {r.patient_id}  "
                                            f"{when}", r.patient_id, r.result_id))
        if not r.qa_ok:
            out.append(Alert("qa", f"QA failed: {', '.join(r.qa_codes) or '?'}  {r.patient_id}  "
                                   f"{when}", r.patient_id, r.result_id))
    for j in jobs:
        if j.state == JobState.FAILED:
            out.append(Alert("failed", f"job {j.job_id} failed at {j.stage}: {j.reason}  "
                                       f"{j.patient_id}", j.patient_id))
    return out


def overview(store: Store, config: Config) -> Overview:
    results = _result_rows(store, config)
    jobs = _job_rows(store)
    return Overview(_series_rows(store), jobs, store.job_counts(), results,
                    alerts_of(results, jobs, config))


# ----------------------------------------------------------------------------- patient


@dataclass(frozen=True)
class ScanEntry:
    result_id: int
    series_uid: str
    acquired_at: str | None
    plo: dict[str, float | None]
    severity_score: int | None
    qa_ok: bool
    qa_codes: tuple[str, ...]
    serial: dict
    """This scan's entry of the serial comparison (role, days, vs_baseline, vs_previous, trend)."""
    review_score: int | None


@dataclass(frozen=True)
class PatientView:
    patient: Patient
    scans: list[ScanEntry]
    """In time order; the first is the baseline."""

    @property
    def onset(self) -> date | None:
        return date.fromisoformat(self.patient.onset_date) if self.patient.onset_date else None

    def chart_points(self) -> list[tuple[float, float]]:
        """(days, whole-lung PLO): days since onset when recorded, else since the baseline."""
        key = "days_since_onset" if self.onset else "days_since_baseline"
        return [(float(s.serial[key]), s.plo["whole"]) for s in self.scans
                if s.plo.get("whole") is not None and s.serial.get(key) is not None]


def patient_view(store: Store, config: Config, patient_id: str) -> PatientView | None:
    patient = store.patient(patient_id)
    if patient is None:
        return None
    serial = serial_entries(store, config, patient_id)
    scans = []
    for scan in store.scans(patient_id):
        entry = serial.get(scan.series_uid, {})
        reviews = store.reviews(scan.result_id)
        r = scan.result
        scans.append(ScanEntry(
            scan.result_id, scan.series_uid, scan.acquired_at,
            {name: r.get("regions", {}).get(name, {}).get("plo_pct") for name in REGIONS},
            r.get("severity_score"), bool(r.get("qa", {}).get("ok")), _qa_codes(r), entry,
            reviews[-1]["score"] if reviews else None))
    scans.sort(key=lambda s: s.serial.get("index", 0))
    return PatientView(patient, scans)


# ----------------------------------------------------------------------------- scan


@dataclass(frozen=True)
class ScanView:
    result_id: int
    series_uid: str
    patient_id: str
    acquired_at: str | None
    result: dict
    serial: dict
    reviews: list[dict]
    masks: dict[str, Path] = field(default_factory=dict)
    """lobes and opacity NIfTI files when both are on disk."""
    masks_note: str | None = None
    """Why there is no preview (masks never written, deleted by retention, missing)."""
    ct_files: list[Path] = field(default_factory=list)
    """The series' spooled DICOM files, when every one is still kept."""


def scan_view(store: Store, config: Config, result_id: int) -> ScanView | None:
    rows = _rows(store, "SELECT series_uid, patient_id, acquired_at, result_json, lobes_path, "
                        "opacity_path FROM results WHERE id = ?", (result_id,))
    if not rows:
        return None
    uid, pid, acquired, text, lobes_rel, opacity_rel = rows[0]
    result = json.loads(text)
    state = store.path.parent
    masks, note = {}, None
    if lobes_rel and opacity_rel:
        masks = {"lobes": state / lobes_rel, "opacity": state / opacity_rel}
        missing = [str(p) for p in masks.values() if not p.is_file()]
        if missing:
            masks, note = {}, f"mask files missing: {', '.join(missing)}"
    else:
        purged = _rows(store, "SELECT purged_at FROM series WHERE series_uid = ?", (uid,))
        note = ("masks deleted by retention" if purged and purged[0][0] is not None
                else "no masks were saved with this result")
    spool = state / "spool"
    files = [spool / rel for rel in store.series_files(uid)]
    if not files or not all(f.is_file() for f in files):
        files = []
    serial = serial_entries(store, config, pid).get(uid, {})
    return ScanView(result_id, uid, pid, acquired, result, serial, store.reviews(result_id),
                    masks, note, files)


@dataclass(frozen=True)
class Preview:
    """Axial slices for the terminal preview: masks, and CT in HU when the images are kept."""

    lobes: np.ndarray
    opacity: np.ndarray
    hu: np.ndarray | None
    note: str | None
    """Why the CT is not shown (images deleted, unreadable), else None."""

    @property
    def slices(self) -> int:
        return int(self.lobes.shape[0])

    def default_slice(self) -> int:
        """The slice with the most opacity, else the most lung, else the middle."""
        for mask in (self.opacity > 0, self.lobes > 0):
            per_slice = mask.sum(axis=(1, 2))
            if per_slice.any():
                return int(np.argmax(per_slice))
        return self.slices // 2


def _shrink(array: np.ndarray, step: int, labels: bool) -> np.ndarray:
    """Every ``step``-th pixel in-plane; for opacity labels the maximum of each block, so a
    small lesion is not lost."""
    if step == 1:
        return array
    if not labels:
        return array[:, ::step, ::step]
    n, h, w = array.shape
    padded = np.zeros((n, -(-h // step) * step, -(-w // step) * step), array.dtype)
    padded[:, :h, :w] = array
    return padded.reshape(n, padded.shape[1] // step, step, padded.shape[2] // step,
                          step).max(axis=(2, 4))


def load_preview(view: ScanView, threads: int = 1) -> Preview:
    """Read the masks (and the CT when kept); slow for a big series: call from a worker thread.
    Raises OSError or ValueError with a one-line reason when the masks cannot be used."""
    import nibabel as nib

    if not view.masks:
        raise ValueError(view.masks_note or "no masks")
    lobes = np.asarray(nib.load(str(view.masks["lobes"])).dataobj, dtype=np.uint8)
    opacity = np.asarray(nib.load(str(view.masks["opacity"])).dataobj, dtype=np.uint8)
    if lobes.ndim != 3 or lobes.shape != opacity.shape:
        raise ValueError(f"masks do not match: lobes {lobes.shape}, opacity {opacity.shape}")
    if lobes.max(initial=0) > max(Lobe) or opacity.max(initial=0) > max(Opacity):
        raise ValueError("masks hold labels other than lobes 0-5 and opacity 0-2")
    hu, note = None, "CT images no longer kept: masks only"
    if view.ct_files:
        from appliance.dicom.series import SeriesRefused, load_series

        try:
            volume, _info = load_series([str(f) for f in view.ct_files],
                                        series_uid=view.series_uid, threads=threads)
            if volume.shape == lobes.shape:
                hu, note = volume.array, None
            else:
                note = f"CT {volume.shape} does not match the masks {lobes.shape}: masks only"
        except (SeriesRefused, OSError) as exc:
            note = f"CT not readable ({exc}): masks only"
    box = _lung_box(lobes)
    lobes, opacity = lobes[box], opacity[box]
    hu = None if hu is None else hu[box]
    step = max(1, -(-max(lobes.shape[1:]) // PREVIEW_MAX_PIXELS))
    return Preview(_shrink(lobes, step, labels=False), _shrink(opacity, step, labels=True),
                   None if hu is None else _shrink(hu, step, labels=False), note)


def _lung_box(lobes: np.ndarray) -> tuple[slice, ...]:
    """Every slice, cropped in-plane to the lungs of the whole scan plus a margin, so that the
    terminal's few pixels go to the lungs (the same crop on every slice keeps them aligned)."""
    rows, cols = np.flatnonzero(lobes.any(axis=(0, 2))), np.flatnonzero(lobes.any(axis=(0, 1)))
    if not rows.size:
        return (slice(None),) * 3
    out = [slice(None)]
    for found, n in ((rows, lobes.shape[1]), (cols, lobes.shape[2])):
        margin = max(2, (found[-1] - found[0]) // 10)
        out.append(slice(max(0, found[0] - margin), min(n, found[-1] + 1 + margin)))
    return tuple(out)


# ----------------------------------------------------------------------------- formatting


def fmt_pct(value: float | None) -> str:
    """One decimal, two below 1% (DESIGN.md); n/a when undefined."""
    if value is None:
        return "n/a"
    return f"{value:.2f}" if abs(value) < 1 else f"{value:.1f}"


def fmt_when(text: str | None) -> str:
    """An ISO acquisition time as 'YYYY-MM-DD HH:MM'."""
    if not text:
        return "?"
    try:
        return datetime.fromisoformat(text).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return text[:16]


def fmt_epoch(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M") if t else "-"
