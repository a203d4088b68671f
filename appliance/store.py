"""The appliance's state: SQLite in WAL mode, versioned migrations, and every query.

One database per state directory (``<state_dir>/appliance.db``). Writers are the daemon's
processes (the SCP records instances, the stabiliser queues jobs, workers claim and finish
them, the supervisor requeues the jobs of dead workers, the sender and ``appliance send``
record deliveries); the dashboard, ``appliance status``
and ``appliance history`` open it read-only (:meth:`Store.open` with ``readonly=True``).

Migrations are numbered by ``PRAGMA user_version``: ``MIGRATIONS[i]`` takes a database from
version ``i`` to ``i + 1``, applied in one transaction each, so re-opening is idempotent and a
database from a newer release is refused rather than misread.

Jobs move queued -> running -> done | failed. A claim is one ``BEGIN IMMEDIATE`` transaction;
partial unique indexes allow at most one queued and one running job per series, so a series is
never analysed twice at once whatever the processes do. Every state change writes a row to the
append-only ``events`` table (triggers refuse UPDATE and DELETE there), keyed by
:class:`EventKind`.

The outbox holds one row per (result, destination, file): pending until the peer stores the
file (sent) or refuses it for good or the attempts run out (failed). A sender takes rows with a
lease (:meth:`Store.claim_outbox`), so the daemon's sender and `appliance send` never send the
same row at once; a failed attempt schedules the next by
:func:`appliance.dicom.send.next_attempt_delay`.

Times are seconds since the epoch (``time.time()``); dates are ISO strings.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.pipeline.serial import ScanPoint

if TYPE_CHECKING:
    from appliance.dicom.send import RetryPolicy

DB_NAME = "appliance.db"
BUSY_TIMEOUT_S = 30.0
"""How long a statement waits for another process's write lock before failing."""


class StoreError(RuntimeError):
    """The database cannot be used (missing, newer schema, read-only misuse); one-line reason."""


class JobLost(StoreError):
    """The job is no longer running under this worker (it was requeued or finished elsewhere)."""


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


class JobKind(StrEnum):
    ANALYSIS = "analysis"
    REANALYSIS = "reanalysis"
    """Instances arrived after the series had been queued for analysis: analysed again."""


class JobStage(StrEnum):
    """Where a job is (or was when it failed); the analysis reports load, lobes, opacity."""

    QUEUED = "queued"
    CLAIMED = "claimed"
    LOAD = "load"
    LOBES = "lobes"
    OPACITY = "opacity"
    WRITE = "write"
    DONE = "done"

    @classmethod
    def of(cls, name: str) -> JobStage | None:
        try:
            return cls(name)
        except ValueError:
            return None


class ClinicalType(StrEnum):
    """Clinical type of the patient (Huang et al. 2020), recorded by staff, editable later."""

    MILD = "mild"
    MODERATE = "moderate"
    SEVERE = "severe"
    CRITICAL = "critical"


class EventKind(StrEnum):
    DAEMON_STARTED = "daemon_started"
    DAEMON_STOPPED = "daemon_stopped"
    ASSOCIATION_REJECTED = "association_rejected"
    SERIES_RECEIVED = "series_received"
    INSTANCE_DUPLICATE = "instance_duplicate"
    INSTANCE_REFUSED = "instance_refused"
    JOB_QUEUED = "job_queued"
    LATE_INSTANCES = "late_instances"
    JOB_STARTED = "job_started"
    JOB_DONE = "job_done"
    JOB_FAILED = "job_failed"
    JOB_RETRY = "job_retry"
    """The job's attempt was lost (worker died, hung or failed unexpectedly); queued again."""
    JOB_REQUEUED = "job_requeued"
    """The job was interrupted by a shutdown or a restart; queued again."""
    WORKER_STARTED = "worker_started"
    WORKER_DIED = "worker_died"
    WORKER_HUNG = "worker_hung"
    PROCESS_RESTARTED = "process_restarted"
    SERIAL_UPDATED = "serial_updated"
    PATIENT_EDITED = "patient_edited"
    REVIEW_ADDED = "review_added"
    SERIES_PURGED = "series_purged"
    OUTPUTS_QUEUED = "outputs_queued"
    """A result's DICOM outputs were put in the outbox for one or more destinations."""
    OUTPUTS_SENT = "outputs_sent"
    OUTPUTS_RETRY = "outputs_retry"
    """A delivery attempt failed for a transient reason; the files wait for the next one."""
    OUTPUTS_FAILED = "outputs_failed"
    """Files given up on (refused by the peer, unreadable, out of attempts), or a result's
    outputs that could not be written."""
    OUTPUTS_REQUEUED = "outputs_requeued"
    """Staff asked for a result's files to be sent again (`appliance send RESULT_ID`)."""


class OutboxState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


# ----------------------------------------------------------------------------- schema

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 0 -> 1
        """CREATE TABLE patients (
            patient_id TEXT PRIMARY KEY,
            patient_name TEXT,
            sex TEXT,
            birth_date TEXT,
            onset_date TEXT,
            clinical_type TEXT CHECK (clinical_type IN ('mild', 'moderate', 'severe', 'critical')),
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE studies (
            study_uid TEXT PRIMARY KEY,
            patient_id TEXT NOT NULL REFERENCES patients(patient_id),
            study_date TEXT,
            accession_number TEXT,
            created_at REAL NOT NULL
        )""",
        """CREATE TABLE series (
            series_uid TEXT PRIMARY KEY,
            study_uid TEXT NOT NULL REFERENCES studies(study_uid),
            patient_id TEXT NOT NULL REFERENCES patients(patient_id),
            modality TEXT,
            description TEXT,
            series_number INTEGER,
            instance_count INTEGER NOT NULL DEFAULT 0,
            first_instance_at REAL NOT NULL,
            last_instance_at REAL NOT NULL,
            released_at REAL,
            purged_at REAL
        )""",
        """CREATE TABLE instances (
            sop_instance_uid TEXT PRIMARY KEY,
            series_uid TEXT NOT NULL REFERENCES series(series_uid),
            sop_class_uid TEXT NOT NULL,
            path TEXT NOT NULL,
            size INTEGER NOT NULL,
            received_at REAL NOT NULL,
            calling_aet TEXT,
            source TEXT,
            purged_at REAL
        )""",
        "CREATE INDEX instances_series ON instances(series_uid)",
        """CREATE TABLE jobs (
            id INTEGER PRIMARY KEY,
            series_uid TEXT NOT NULL REFERENCES series(series_uid),
            kind TEXT NOT NULL CHECK (kind IN ('analysis', 'reanalysis')),
            state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed')),
            stage TEXT NOT NULL,
            reason TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            instance_count INTEGER NOT NULL,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            worker TEXT,
            heartbeat_at REAL,
            lease_until REAL
        )""",
        "CREATE UNIQUE INDEX jobs_one_queued ON jobs(series_uid) WHERE state = 'queued'",
        "CREATE UNIQUE INDEX jobs_one_running ON jobs(series_uid) WHERE state = 'running'",
        "CREATE INDEX jobs_state ON jobs(state, id)",
        """CREATE TABLE results (
            id INTEGER PRIMARY KEY,
            job_id INTEGER NOT NULL UNIQUE REFERENCES jobs(id),
            series_uid TEXT NOT NULL REFERENCES series(series_uid),
            patient_id TEXT NOT NULL REFERENCES patients(patient_id),
            acquired_at TEXT,
            created_at REAL NOT NULL,
            plo_whole REAL,
            severity_score INTEGER,
            qa_ok INTEGER NOT NULL,
            result_json TEXT NOT NULL,
            result_path TEXT,
            lobes_path TEXT,
            opacity_path TEXT,
            bytes INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX results_patient ON results(patient_id)",
        "CREATE INDEX results_series ON results(series_uid)",
        """CREATE TABLE reviews (
            id INTEGER PRIMARY KEY,
            result_id INTEGER NOT NULL REFERENCES results(id),
            score INTEGER NOT NULL CHECK (score BETWEEN 0 AND 5),
            reviewer TEXT NOT NULL,
            comment TEXT,
            reviewed_at REAL NOT NULL
        )""",
        """CREATE TABLE serial_comparisons (
            patient_id TEXT PRIMARY KEY REFERENCES patients(patient_id),
            computed_at REAL NOT NULL,
            comparison_json TEXT NOT NULL
        )""",
        """CREATE TABLE events (
            id INTEGER PRIMARY KEY,
            at REAL NOT NULL,
            kind TEXT NOT NULL,
            series_uid TEXT,
            job_id INTEGER,
            patient_id TEXT,
            detail TEXT
        )""",
        "CREATE INDEX events_series ON events(series_uid)",
        """CREATE TRIGGER events_no_update BEFORE UPDATE ON events
           BEGIN SELECT RAISE(ABORT, 'events are append-only'); END""",
        """CREATE TRIGGER events_no_delete BEFORE DELETE ON events
           BEGIN SELECT RAISE(ABORT, 'events are append-only'); END""",
    ),
    (  # 1 -> 2: the outbox, one row per (result, destination, file)
        """CREATE TABLE outbox (
            id INTEGER PRIMARY KEY,
            result_id INTEGER NOT NULL REFERENCES results(id),
            destination TEXT NOT NULL,
            path TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
            attempts INTEGER NOT NULL DEFAULT 0,
            deliveries INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            next_attempt_at REAL NOT NULL,
            lease_until REAL,
            leased_by TEXT,
            last_error TEXT,
            sent_at REAL,
            UNIQUE (result_id, destination, path)
        )""",
        "CREATE INDEX outbox_due ON outbox(state, next_attempt_at)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance, as the SCP records it (``path`` relative to the spool)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    patient_id: str
    path: str
    size: int
    received_at: float
    calling_aet: str | None = None
    source: str | None = None
    patient_name: str | None = None
    patient_sex: str | None = None
    patient_birth_date: str | None = None
    study_date: str | None = None
    accession_number: str | None = None
    modality: str | None = None
    series_description: str | None = None
    series_number: int | None = None


@dataclass(frozen=True)
class ReadySeries:
    """A series with instances no job has covered yet, quiet long enough to be analysed."""

    series_uid: str
    instance_count: int
    covered: int
    """Instances covered by the series' jobs so far (0 when it never had one)."""
    has_jobs: bool


@dataclass(frozen=True)
class Job:
    id: int
    series_uid: str
    patient_id: str
    kind: JobKind
    state: JobState
    stage: str
    reason: str | None
    attempts: int
    instance_count: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    worker: str | None
    heartbeat_at: float | None
    lease_until: float | None


@dataclass(frozen=True)
class Claim:
    """A job just claimed by a worker, with the spool-relative files to analyse."""

    job: Job
    files: tuple[str, ...]


@dataclass(frozen=True)
class Interrupted:
    """What became of a running job whose attempt was interrupted."""

    job_id: int
    series_uid: str
    state: JobState
    attempts: int


@dataclass(frozen=True)
class Patient:
    patient_id: str
    patient_name: str | None
    sex: str | None
    birth_date: str | None
    onset_date: str | None
    clinical_type: ClinicalType | None


@dataclass(frozen=True)
class ScanResult:
    """The current (latest) result of one of a patient's series."""

    result_id: int
    job_id: int
    series_uid: str
    acquired_at: str | None
    created_at: float
    result: dict
    result_path: str | None


@dataclass(frozen=True)
class Event:
    id: int
    at: float
    kind: EventKind
    series_uid: str | None
    job_id: int | None
    patient_id: str | None
    detail: str | None


@dataclass(frozen=True)
class OutboxItem:
    """One file of a result waiting for (or done with) one destination."""

    id: int
    result_id: int
    destination: str
    """``AE@host:port``, as :meth:`appliance.dicom.send.Destination.parse` reads it."""
    path: str
    """Relative to the state directory (absolute when it lies outside)."""
    state: OutboxState
    attempts: int
    """Delivery attempts so far, failed or not."""
    deliveries: int
    """Times the peer stored it: 1 once sent; a requested re-send adds one."""
    created_at: float
    next_attempt_at: float
    lease_until: float | None
    """While a sender holds it: nobody else sends it before this time."""
    leased_by: str | None
    """The sender holding it (``daemon``, ``cli:<pid>``)."""
    last_error: str | None
    sent_at: float | None


@dataclass(frozen=True)
class Delivery:
    """Where the files of one result stand with one destination (dashboard, status)."""

    result_id: int | None
    """None in a summary over every result (:meth:`Store.deliveries_by_destination`)."""
    destination: str
    files: int
    sent: int
    pending: int
    failed: int
    attempts: int
    """The most attempts any of the files has had."""
    last_error: str | None
    """The latest error of a file not delivered yet (None once every file is sent)."""
    next_attempt_at: float | None
    """The earliest next attempt of a pending file."""
    sent_at: float | None
    """When the last file was delivered, once all are."""

    @property
    def state(self) -> OutboxState:
        """failed when any file failed for good, sent when all are, else pending."""
        if self.failed:
            return OutboxState.FAILED
        return OutboxState.SENT if self.sent == self.files else OutboxState.PENDING


_OUTBOX_COLUMNS = ("id, result_id, destination, path, state, attempts, deliveries, created_at, "
                   "next_attempt_at, lease_until, leased_by, last_error, sent_at")


def _outbox_item(row: sqlite3.Row | tuple) -> OutboxItem:
    values = list(row)
    values[4] = OutboxState(values[4])
    return OutboxItem(*values)


@dataclass(frozen=True)
class PurgeCandidate:
    series_uid: str
    last_activity: float
    bytes: int


_JOB_COLUMNS = (
    "j.id, j.series_uid, s.patient_id, j.kind, j.state, j.stage, j.reason, j.attempts, "
    "j.instance_count, j.created_at, j.started_at, j.finished_at, j.worker, j.heartbeat_at, "
    "j.lease_until"
)


def _job(row: sqlite3.Row | tuple) -> Job:
    values = list(row)
    values[3], values[4] = JobKind(values[3]), JobState(values[4])
    return Job(*values)


# ----------------------------------------------------------------------------- the store


class Store:
    """A connection to the state database. Writers: ``Store.open(path)`` (creates and migrates);
    readers: ``Store.open(path, readonly=True)``. Safe to share between threads (one lock)."""

    def __init__(self, conn: sqlite3.Connection, path: Path, readonly: bool) -> None:
        self._conn = conn
        self.path = path
        self.readonly = readonly
        self._lock = threading.RLock()
        self._depth = 0

    @classmethod
    def open(cls, path: str | Path, *, readonly: bool = False) -> Store:
        """Open (and for a writer create and migrate) the database at ``path``; a folder means
        its ``appliance.db``."""
        if not isinstance(path, (str, Path)):
            raise TypeError(f"`path` must be a str or Path, got {type(path).__name__}")
        path = Path(path)
        if path.is_dir():
            path = path / DB_NAME
        if readonly:
            if not path.is_file():
                raise StoreError(f"no database at {path} (has the daemon run with this state dir?)")
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S,
                                   isolation_level=None, check_same_thread=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys = ON")
        store = cls(conn, path, readonly)
        try:
            if readonly:
                version = store.schema_version
                if version != SCHEMA_VERSION:
                    raise StoreError(f"database {path} has schema version {version}, this "
                                     f"software reads {SCHEMA_VERSION}; start the daemon to "
                                     "migrate it")
            else:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if mode.lower() != "wal":
                    raise StoreError(f"database {path} cannot use WAL journaling (got {mode})")
                # FULL: a committed transaction survives power loss; an acknowledged instance
                # must not be lost.
                conn.execute("PRAGMA synchronous = FULL")
                store.migrate()
        except BaseException:
            conn.close()
            raise
        return store

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def migrate(self) -> int:
        """Apply pending migrations, each in its own transaction; returns the new version."""
        with self.transaction():
            version = self.schema_version
            if version > SCHEMA_VERSION:
                raise StoreError(f"database {self.path} has schema version {version}, newer than "
                                 f"this software's {SCHEMA_VERSION}; refusing to touch it")
        while version < SCHEMA_VERSION:
            with self.transaction():
                # re-read inside the write lock: another process may have migrated meanwhile
                version = self.schema_version
                if version >= SCHEMA_VERSION:
                    break
                for statement in MIGRATIONS[version]:
                    self._conn.execute(statement)
                version += 1
                self._conn.execute(f"PRAGMA user_version = {version}")
        return version

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: takes the write lock at once, so a
        read-then-write inside cannot race another process). Nested use joins the outer one."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            if self.readonly:
                raise StoreError("this store was opened read-only")
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
            except BaseException:
                self._depth = 0
                self._conn.execute("ROLLBACK")
                raise
            self._depth = 0
            self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def read(self, sql: str, params: Sequence[object] = ()) -> list[tuple]:
        """Rows of one read-only SELECT, for views (dashboard, research) that list what the
        store holds in their own shape; anything that writes is refused."""
        if not sql.lstrip().upper().startswith(("SELECT", "WITH")):
            raise ValueError(f"`sql` must be a read-only SELECT, got {sql.split(None, 1)[0]!r}")
        return self._query(sql, params)

    def patient_ids(self) -> list[str]:
        """Patients with at least one result, in order."""
        return [r[0] for r in self._query("SELECT DISTINCT patient_id FROM results ORDER BY patient_id")]

    def _event(self, kind: EventKind, *, series_uid: str | None = None, job_id: int | None = None,
               patient_id: str | None = None, detail: str | None = None,
               at: float | None = None) -> None:
        self._conn.execute(
            "INSERT INTO events (at, kind, series_uid, job_id, patient_id, detail) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (time.time() if at is None else at, EventKind(kind).value, series_uid, job_id,
             patient_id, detail),
        )

    def add_event(self, kind: EventKind, *, series_uid: str | None = None,
                  job_id: int | None = None, patient_id: str | None = None,
                  detail: str | None = None, at: float | None = None) -> None:
        """Append one event (its own transaction unless inside one)."""
        if not isinstance(kind, EventKind):
            raise TypeError(f"`kind` must be an EventKind, got {type(kind).__name__}")
        with self.transaction():
            self._event(kind, series_uid=series_uid, job_id=job_id, patient_id=patient_id,
                        detail=detail, at=at)

    # ------------------------------------------------------------------ receiving

    def instance_path(self, sop_instance_uid: str) -> str | None:
        """The spool-relative path of an instance already recorded, else None."""
        rows = self._query("SELECT path FROM instances WHERE sop_instance_uid = ?",
                           (sop_instance_uid,))
        return rows[0][0] if rows else None

    def add_instance(self, rec: InstanceRecord) -> bool:
        """Record a received instance (and its patient, study and series); False when the SOP
        Instance UID was already recorded (a duplicate changes nothing but an event)."""
        if not isinstance(rec, InstanceRecord):
            raise TypeError(f"`rec` must be an InstanceRecord, got {type(rec).__name__}")
        now = rec.received_at
        with self.transaction() as c:
            known = c.execute("SELECT purged_at FROM instances WHERE sop_instance_uid = ?",
                              (rec.sop_instance_uid,)).fetchone()
            if known is not None and known[0] is None:
                self._event(EventKind.INSTANCE_DUPLICATE, series_uid=rec.series_uid,
                            patient_id=rec.patient_id, detail=rec.sop_instance_uid, at=now)
                return False
            c.execute(
                "INSERT INTO patients (patient_id, patient_name, sex, birth_date, created_at, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(patient_id) DO UPDATE SET "
                "patient_name = COALESCE(excluded.patient_name, patient_name), "
                "sex = COALESCE(excluded.sex, sex), "
                "birth_date = COALESCE(excluded.birth_date, birth_date)",
                (rec.patient_id, rec.patient_name, rec.patient_sex, rec.patient_birth_date, now,
                 now),
            )
            c.execute(
                "INSERT INTO studies (study_uid, patient_id, study_date, accession_number, "
                "created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT(study_uid) DO NOTHING",
                (rec.study_uid, rec.patient_id, rec.study_date, rec.accession_number, now),
            )
            new_series = c.execute(
                "INSERT INTO series (series_uid, study_uid, patient_id, modality, description, "
                "series_number, instance_count, first_instance_at, last_instance_at) "
                "VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?) ON CONFLICT(series_uid) DO NOTHING",
                (rec.series_uid, rec.study_uid, rec.patient_id, rec.modality,
                 rec.series_description, rec.series_number, now, now),
            ).rowcount
            c.execute(
                "UPDATE series SET instance_count = instance_count + 1, purged_at = NULL, "
                "last_instance_at = MAX(last_instance_at, ?) WHERE series_uid = ?",
                (now, rec.series_uid),
            )
            # an instance sent again after retention deleted its file is stored anew
            c.execute(
                "INSERT INTO instances (sop_instance_uid, series_uid, sop_class_uid, path, size, "
                "received_at, calling_aet, source) VALUES (?, ?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(sop_instance_uid) DO UPDATE SET series_uid = excluded.series_uid, "
                "sop_class_uid = excluded.sop_class_uid, path = excluded.path, "
                "size = excluded.size, received_at = excluded.received_at, "
                "calling_aet = excluded.calling_aet, source = excluded.source, purged_at = NULL",
                (rec.sop_instance_uid, rec.series_uid, rec.sop_class_uid, rec.path, rec.size,
                 now, rec.calling_aet, rec.source),
            )
            if new_series:
                self._event(EventKind.SERIES_RECEIVED, series_uid=rec.series_uid,
                            patient_id=rec.patient_id, at=now,
                            detail=f"from {rec.calling_aet or '?'} at {rec.source or '?'}")
        return True

    def mark_released(self, series_uids: Sequence[str], at: float) -> None:
        """The association that delivered instances of these series was released."""
        with self.transaction() as c:
            c.executemany("UPDATE series SET released_at = ? WHERE series_uid = ?",
                          [(at, uid) for uid in series_uids])

    # ------------------------------------------------------------------ stabiliser

    def ready_series(self, now: float, stable_s: float, settle_s: float) -> list[ReadySeries]:
        """Series holding instances no job covers yet, and quiet: no instance for ``stable_s``,
        or released after their last instance and quiet for ``settle_s`` since the release."""
        rows = self._query(
            """SELECT s.series_uid, s.instance_count,
                      COALESCE((SELECT MAX(j.instance_count) FROM jobs j
                                WHERE j.series_uid = s.series_uid), 0),
                      EXISTS (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid)
               FROM series s
               WHERE s.instance_count > COALESCE((SELECT MAX(j.instance_count) FROM jobs j
                                                  WHERE j.series_uid = s.series_uid), 0)
                 AND (s.last_instance_at <= ?
                      OR (s.released_at >= s.last_instance_at AND s.released_at <= ?))
               ORDER BY s.last_instance_at""",
            (now - stable_s, now - settle_s),
        )
        return [ReadySeries(uid, n, covered, bool(has)) for uid, n, covered, has in rows]

    def queue_job(self, series_uid: str, now: float | None = None) -> int | None:
        """Queue a job for the series with its current instance count; returns the job id, or
        None when a queued job already exists (it then covers the new count) or nothing new
        arrived. A series that already had a job gets a re-analysis, recorded as such."""
        now = time.time() if now is None else now
        with self.transaction() as c:
            row = c.execute("SELECT instance_count, patient_id FROM series WHERE series_uid = ?",
                            (series_uid,)).fetchone()
            if row is None:
                raise StoreError(f"no series {series_uid} in the store")
            count, patient_id = row
            queued = c.execute("SELECT id FROM jobs WHERE series_uid = ? AND state = 'queued'",
                               (series_uid,)).fetchone()
            if queued:
                c.execute("UPDATE jobs SET instance_count = MAX(instance_count, ?) WHERE id = ?",
                          (count, queued[0]))
                return None
            prev = c.execute("SELECT id, instance_count FROM jobs WHERE series_uid = ? "
                             "ORDER BY id DESC LIMIT 1", (series_uid,)).fetchone()
            if prev is not None and prev[1] >= count:
                return None
            kind = JobKind.REANALYSIS if prev else JobKind.ANALYSIS
            job_id = c.execute(
                "INSERT INTO jobs (series_uid, kind, state, stage, instance_count, created_at) "
                "VALUES (?, ?, 'queued', 'queued', ?, ?)",
                (series_uid, kind.value, count, now),
            ).lastrowid
            assert job_id is not None
            if prev:
                self._event(EventKind.LATE_INSTANCES, series_uid=series_uid, job_id=job_id,
                            patient_id=patient_id, at=now,
                            detail=f"{count - prev[1]} instance(s) after job {prev[0]}; "
                                   f"re-analysis queued")
            self._event(EventKind.JOB_QUEUED, series_uid=series_uid, job_id=job_id,
                        patient_id=patient_id, at=now, detail=f"{kind.value}, {count} instances")
            return int(job_id)

    # ------------------------------------------------------------------ workers

    def claim_job(self, worker: str, now: float, lease_s: float) -> Claim | None:
        """Take the oldest queued job whose series has no running job, in one transaction."""
        with self.transaction() as c:
            row = c.execute(
                """SELECT j.id FROM jobs j WHERE j.state = 'queued' AND NOT EXISTS
                   (SELECT 1 FROM jobs r WHERE r.series_uid = j.series_uid AND r.state = 'running')
                   ORDER BY j.id LIMIT 1"""
            ).fetchone()
            if row is None:
                return None
            job_id = row[0]
            files = tuple(r[0] for r in c.execute(
                "SELECT i.path FROM instances i JOIN jobs j ON j.series_uid = i.series_uid "
                "WHERE j.id = ? AND i.purged_at IS NULL ORDER BY i.received_at, "
                "i.sop_instance_uid", (job_id,)))
            c.execute(
                "UPDATE jobs SET state = 'running', stage = 'claimed', attempts = attempts + 1, "
                "worker = ?, started_at = ?, heartbeat_at = ?, lease_until = ?, reason = NULL, "
                "instance_count = MAX(instance_count, ?) WHERE id = ?",
                (worker, now, now, now + lease_s, len(files), job_id),
            )
            job = self._job(job_id)
            self._event(EventKind.JOB_STARTED, series_uid=job.series_uid, job_id=job_id,
                        patient_id=job.patient_id, at=now,
                        detail=f"attempt {job.attempts} by {worker}, {len(files)} files")
            return Claim(job, files)

    def _job(self, job_id: int) -> Job:
        row = self._conn.execute(
            f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN series s ON s.series_uid = j.series_uid "
            "WHERE j.id = ?", (job_id,)).fetchone()
        if row is None:
            raise StoreError(f"no job {job_id} in the store")
        return _job(row)

    def job(self, job_id: int) -> Job:
        with self._lock:
            return self._job(job_id)

    def _owned(self, c: sqlite3.Connection, job_id: int, worker: str) -> bool:
        return c.execute("SELECT 1 FROM jobs WHERE id = ? AND state = 'running' AND worker = ?",
                         (job_id, worker)).fetchone() is not None

    def heartbeat(self, job_id: int, worker: str, now: float, lease_s: float,
                  stage: JobStage | None = None) -> bool:
        """Extend the job's lease (and record its stage); False when it is no longer ours."""
        with self.transaction() as c:
            if stage is None:
                cur = c.execute("UPDATE jobs SET heartbeat_at = ?, lease_until = ? WHERE id = ? "
                                "AND state = 'running' AND worker = ?",
                                (now, now + lease_s, job_id, worker))
            else:
                cur = c.execute("UPDATE jobs SET heartbeat_at = ?, lease_until = ?, stage = ? "
                                "WHERE id = ? AND state = 'running' AND worker = ?",
                                (now, now + lease_s, JobStage(stage).value, job_id, worker))
            return cur.rowcount == 1

    def complete_job(self, job_id: int, worker: str, result: dict, *, result_path: str | None,
                     lobes_path: str | None, opacity_path: str | None, nbytes: int,
                     now: float) -> int:
        """Store the result and mark the job done; raises JobLost when the job is no longer
        running under ``worker`` (then nothing is written). Returns the result id."""
        with self.transaction() as c:
            if not self._owned(c, job_id, worker):
                raise JobLost(f"job {job_id} is no longer running under {worker}")
            job = self._job(job_id)
            whole = result.get("regions", {}).get("whole", {})
            result_id = c.execute(
                "INSERT INTO results (job_id, series_uid, patient_id, acquired_at, created_at, "
                "plo_whole, severity_score, qa_ok, result_json, result_path, lobes_path, "
                "opacity_path, bytes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job_id, job.series_uid, job.patient_id, result.get("scan", {}).get("acquired_at"),
                 now, whole.get("plo_pct"), result.get("severity_score"),
                 int(bool(result.get("qa", {}).get("ok"))), json.dumps(result), result_path,
                 lobes_path, opacity_path, nbytes),
            ).lastrowid
            c.execute("UPDATE jobs SET state = 'done', stage = 'done', finished_at = ?, "
                      "reason = NULL, lease_until = NULL WHERE id = ?", (now, job_id))
            self._event(EventKind.JOB_DONE, series_uid=job.series_uid, job_id=job_id,
                        patient_id=job.patient_id, at=now,
                        detail=f"PLO {whole.get('plo_pct')}, result {result_id}")
            assert result_id is not None
            return int(result_id)

    def fail_job(self, job_id: int, worker: str, reason: str, now: float,
                 stage: JobStage | None = None) -> None:
        """The job failed for good (refused input, or its last attempt); raises JobLost when
        it is no longer running under ``worker``."""
        with self.transaction() as c:
            if not self._owned(c, job_id, worker):
                raise JobLost(f"job {job_id} is no longer running under {worker}")
            self._finish_failed(c, job_id, reason, now, stage)

    def _finish_failed(self, c: sqlite3.Connection, job_id: int, reason: str, now: float,
                       stage: JobStage | None = None) -> None:
        if stage is not None:
            c.execute("UPDATE jobs SET stage = ? WHERE id = ?", (JobStage(stage).value, job_id))
        c.execute("UPDATE jobs SET state = 'failed', reason = ?, finished_at = ?, "
                  "lease_until = NULL WHERE id = ?", (reason, now, job_id))
        job = self._job(job_id)
        self._event(EventKind.JOB_FAILED, series_uid=job.series_uid, job_id=job_id,
                    patient_id=job.patient_id, at=now,
                    detail=f"stage {job.stage}, attempt {job.attempts}: {reason}")

    def retry_or_fail(self, job_id: int, reason: str, max_attempts: int, now: float, *,
                      worker: str | None = None, count_attempt: bool = True) -> Interrupted | None:
        """A running job's attempt was lost: queue it again, or fail it with ``reason`` when it
        has had ``max_attempts`` attempts. ``count_attempt=False`` (a shutdown or restart that
        was not the job's doing) gives the attempt back. ``worker`` restricts to that worker's
        job. None when the job was not running (under ``worker``)."""
        with self.transaction() as c:
            row = c.execute("SELECT worker, attempts FROM jobs WHERE id = ? AND state = 'running'",
                            (job_id,)).fetchone()
            if row is None or (worker is not None and row[0] != worker):
                return None
            attempts = row[1] if count_attempt else max(0, row[1] - 1)
            if count_attempt and attempts >= max_attempts:
                self._finish_failed(c, job_id, f"{reason} (attempt {attempts} of {max_attempts})",
                                    now)
                state = JobState.FAILED
            else:
                c.execute("UPDATE jobs SET state = 'queued', attempts = ?, worker = NULL, "
                          "lease_until = NULL, reason = ? WHERE id = ?", (attempts, reason, job_id))
                job = self._job(job_id)
                kind = EventKind.JOB_RETRY if count_attempt else EventKind.JOB_REQUEUED
                self._event(kind, series_uid=job.series_uid, job_id=job_id,
                            patient_id=job.patient_id, at=now,
                            detail=f"stage {job.stage}, after attempt {row[1]}: {reason}")
                state = JobState.QUEUED
            series_uid = self._job(job_id).series_uid
            return Interrupted(job_id, series_uid, state, attempts)

    def running_jobs(self, worker: str | None = None) -> list[Job]:
        sql = (f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN series s ON s.series_uid = j.series_uid "
               "WHERE j.state = 'running'")
        params: tuple = ()
        if worker is not None:
            sql += " AND j.worker = ?"
            params = (worker,)
        return [_job(r) for r in self._query(sql + " ORDER BY j.id", params)]

    def recover_running(self, reason: str, max_attempts: int, now: float) -> list[Interrupted]:
        """At start-up (no worker of ours alive): every job still 'running' was interrupted;
        each interruption counts as an attempt, so a scan that kills the daemon cannot loop."""
        out = []
        for job in self.running_jobs():
            done = self.retry_or_fail(job.id, reason, max_attempts, now)
            if done is not None:
                out.append(done)
        return out

    def series_patient(self, series_uid: str) -> str | None:
        rows = self._query("SELECT patient_id FROM series WHERE series_uid = ?", (series_uid,))
        return rows[0][0] if rows else None

    # ------------------------------------------------------------------ serial comparison

    def serial_points(self, patient_id: str) -> tuple[list[ScanPoint], date | None]:
        """The patient's current results (latest per series) as comparison points, and the
        onset date. A scan without an acquisition time counts from when it was analysed."""
        points = []
        for scan in self.scans(patient_id):
            when = _parse_datetime(scan.acquired_at) or datetime.fromtimestamp(
                scan.created_at, tz=UTC).replace(tzinfo=None)
            plo = {name: region.get("plo_pct")
                   for name, region in scan.result.get("regions", {}).items()}
            points.append(ScanPoint(key=scan.series_uid, acquired_at=when, plo=plo))
        patient = self.patient(patient_id)
        onset = date.fromisoformat(patient.onset_date) if patient and patient.onset_date else None
        return points, onset

    def save_serial(self, patient_id: str, comparison: list[dict], now: float) -> None:
        with self.transaction() as c:
            c.execute(
                "INSERT INTO serial_comparisons (patient_id, computed_at, comparison_json) "
                "VALUES (?, ?, ?) ON CONFLICT(patient_id) DO UPDATE SET "
                "computed_at = excluded.computed_at, comparison_json = excluded.comparison_json",
                (patient_id, now, json.dumps(comparison)),
            )
            self._event(EventKind.SERIAL_UPDATED, patient_id=patient_id, at=now,
                        detail=f"{len(comparison)} scan(s)")

    def serial(self, patient_id: str) -> list[dict] | None:
        rows = self._query("SELECT comparison_json FROM serial_comparisons WHERE patient_id = ?",
                           (patient_id,))
        return json.loads(rows[0][0]) if rows else None

    # ------------------------------------------------------------------ patients, reviews

    def patient(self, patient_id: str) -> Patient | None:
        rows = self._query("SELECT patient_id, patient_name, sex, birth_date, onset_date, "
                           "clinical_type FROM patients WHERE patient_id = ?", (patient_id,))
        if not rows:
            return None
        *values, clinical = rows[0]
        return Patient(*values, ClinicalType(clinical) if clinical else None)

    def update_patient(self, patient_id: str, *, onset_date: date | str | None = None,
                       clinical_type: ClinicalType | str | None = None,
                       now: float | None = None) -> None:
        """Record or correct the symptom onset date and the clinical type (staff edits)."""
        now = time.time() if now is None else now
        changes: dict[str, str] = {}
        if onset_date is not None:
            if isinstance(onset_date, str):
                try:
                    onset_date = date.fromisoformat(onset_date)
                except ValueError:
                    raise ValueError(f"`onset_date` must be an ISO date (YYYY-MM-DD), "
                                     f"got {onset_date!r}") from None
            if not isinstance(onset_date, date):
                raise TypeError(f"`onset_date` must be a date or ISO string, "
                                f"got {type(onset_date).__name__}")
            changes["onset_date"] = onset_date.isoformat()
        if clinical_type is not None:
            try:
                changes["clinical_type"] = ClinicalType(clinical_type).value
            except ValueError:
                raise ValueError(f"`clinical_type` must be one of "
                                 f"{', '.join(t.value for t in ClinicalType)}, "
                                 f"got {clinical_type!r}") from None
        if not changes:
            return
        with self.transaction() as c:
            sets = ", ".join(f"{k} = ?" for k in changes)
            cur = c.execute(f"UPDATE patients SET {sets}, updated_at = ? WHERE patient_id = ?",
                            (*changes.values(), now, patient_id))
            if cur.rowcount != 1:
                raise ValueError(f"`patient_id` must name a known patient, got {patient_id!r}")
            self._event(EventKind.PATIENT_EDITED, patient_id=patient_id, at=now,
                        detail=", ".join(f"{k}={v}" for k, v in changes.items()))

    def add_review(self, result_id: int, score: int, reviewer: str, comment: str | None = None,
                   now: float | None = None) -> int:
        """A reviewer's 0-5 score of a result."""
        if isinstance(score, bool) or not isinstance(score, int) or not 0 <= score <= 5:
            raise ValueError(f"`score` must be an integer 0..5, got {score!r}")
        if not isinstance(reviewer, str) or not reviewer.strip():
            raise ValueError(f"`reviewer` must be a non-empty name, got {reviewer!r}")
        now = time.time() if now is None else now
        with self.transaction() as c:
            row = c.execute("SELECT series_uid, patient_id FROM results WHERE id = ?",
                            (result_id,)).fetchone()
            if row is None:
                raise ValueError(f"`result_id` must name a stored result, got {result_id!r}")
            review_id = c.execute(
                "INSERT INTO reviews (result_id, score, reviewer, comment, reviewed_at) "
                "VALUES (?, ?, ?, ?, ?)", (result_id, score, reviewer.strip(), comment, now),
            ).lastrowid
            self._event(EventKind.REVIEW_ADDED, series_uid=row[0], patient_id=row[1], at=now,
                        detail=f"result {result_id}: score {score} by {reviewer.strip()}")
            assert review_id is not None
            return int(review_id)

    def reviews(self, result_id: int) -> list[dict]:
        rows = self._query("SELECT id, score, reviewer, comment, reviewed_at FROM reviews "
                           "WHERE result_id = ? ORDER BY id", (result_id,))
        keys = ("id", "score", "reviewer", "comment", "reviewed_at")
        return [dict(zip(keys, r, strict=True)) for r in rows]

    # ------------------------------------------------------------------ readers

    def scans(self, patient_id: str) -> list[ScanResult]:
        """The patient's series with their latest result, in order of acquisition."""
        rows = self._query(
            """SELECT r.id, r.job_id, r.series_uid, r.acquired_at, r.created_at, r.result_json,
                      r.result_path
               FROM results r
               WHERE r.patient_id = ? AND r.id = (SELECT MAX(id) FROM results x
                                                  WHERE x.series_uid = r.series_uid)
               ORDER BY COALESCE(r.acquired_at, ''), r.created_at""",
            (patient_id,),
        )
        return [ScanResult(rid, jid, uid, acq, created, json.loads(text), path)
                for rid, jid, uid, acq, created, text, path in rows]

    def results_of(self, series_uid: str) -> list[ScanResult]:
        """Every result of a series, oldest first (a re-analysis adds one)."""
        rows = self._query("SELECT id, job_id, series_uid, acquired_at, created_at, result_json, "
                           "result_path FROM results WHERE series_uid = ? ORDER BY id",
                           (series_uid,))
        return [ScanResult(rid, jid, uid, acq, created, json.loads(text), path)
                for rid, jid, uid, acq, created, text, path in rows]

    def job_counts(self) -> dict[JobState, int]:
        counts = dict(self._query("SELECT state, COUNT(*) FROM jobs GROUP BY state"))
        return {state: int(counts.get(state.value, 0)) for state in JobState}

    def jobs(self, *, limit: int = 20, state: JobState | None = None,
             series_uid: str | None = None) -> list[Job]:
        """Most recent first."""
        where, params = [], []
        if state is not None:
            where.append("j.state = ?")
            params.append(JobState(state).value)
        if series_uid is not None:
            where.append("j.series_uid = ?")
            params.append(series_uid)
        sql = (f"SELECT {_JOB_COLUMNS} FROM jobs j JOIN series s ON s.series_uid = j.series_uid "
               + (f"WHERE {' AND '.join(where)} " if where else "")
               + "ORDER BY COALESCE(j.finished_at, j.started_at, j.created_at) DESC, j.id DESC "
               "LIMIT ?")
        return [_job(r) for r in self._query(sql, (*params, limit))]

    def series_row(self, series_uid: str) -> dict | None:
        with self._lock:
            cur = self._conn.execute("SELECT * FROM series WHERE series_uid = ?", (series_uid,))
            row = cur.fetchone()
            if row is None:
                return None
            return dict(zip([d[0] for d in cur.description], row, strict=True))

    def instance_count(self, series_uid: str | None = None) -> int:
        if series_uid is None:
            return int(self._query("SELECT COUNT(*) FROM instances")[0][0])
        return int(self._query("SELECT COUNT(*) FROM instances WHERE series_uid = ?",
                               (series_uid,))[0][0])

    def events(self, *, limit: int = 100, kind: EventKind | None = None,
               series_uid: str | None = None) -> list[Event]:
        """Oldest first among the ``limit`` most recent matching events."""
        where, params = [], []
        if kind is not None:
            where.append("kind = ?")
            params.append(EventKind(kind).value)
        if series_uid is not None:
            where.append("series_uid = ?")
            params.append(series_uid)
        rows = self._query(
            "SELECT id, at, kind, series_uid, job_id, patient_id, detail FROM events "
            + (f"WHERE {' AND '.join(where)} " if where else "") + "ORDER BY id DESC LIMIT ?",
            (*params, limit),
        )
        return [Event(i, at, EventKind(k), s, j, p, d) for i, at, k, s, j, p, d in reversed(rows)]

    # ------------------------------------------------------------------ outbox

    def result(self, result_id: int) -> ScanResult | None:
        """One stored result by id."""
        rows = self._query("SELECT id, job_id, series_uid, acquired_at, created_at, result_json, "
                           "result_path FROM results WHERE id = ?", (result_id,))
        if not rows:
            return None
        rid, jid, uid, acq, created, text, path = rows[0]
        return ScanResult(rid, jid, uid, acq, created, json.loads(text), path)

    def enqueue_outputs(self, result_id: int, destinations: Sequence[str], paths: Sequence[str],
                        now: float | None = None) -> int:
        """Put the result's files (``paths``, relative to the state directory) in the outbox for
        every destination; returns the rows added. Idempotent: a (result, destination, file)
        already there is left as it is (a unique constraint), so nothing is queued twice."""
        _check_int("result_id", result_id)
        for name, values in (("destinations", destinations), ("paths", paths)):
            if isinstance(values, str) or not all(isinstance(v, str) and v for v in values):
                raise TypeError(f"`{name}` must be a sequence of non-empty str, got {values!r}")
        now = time.time() if now is None else now
        with self.transaction() as c:
            owner = self._result_owner(result_id)
            added = 0
            for destination in destinations:
                for path in paths:
                    added += c.execute(
                        "INSERT INTO outbox (result_id, destination, path, state, created_at, "
                        "next_attempt_at) VALUES (?, ?, ?, 'pending', ?, ?) "
                        "ON CONFLICT(result_id, destination, path) DO NOTHING",
                        (result_id, destination, path, now, now)).rowcount
            if added:
                self._event(EventKind.OUTPUTS_QUEUED, **owner, at=now,
                            detail=f"result {result_id}: {added} file(s) for "
                                   f"{', '.join(destinations)}")
            return added

    def add_output_bytes(self, result_id: int, nbytes: int) -> None:
        """Count the result's DICOM outputs in its bytes on disk (retention by disk usage)."""
        with self.transaction() as c:
            self._result_owner(result_id)
            c.execute("UPDATE results SET bytes = bytes + ? WHERE id = ?", (int(nbytes), result_id))

    def _result_owner(self, result_id: int) -> dict[str, str]:
        row = self._conn.execute("SELECT series_uid, patient_id FROM results WHERE id = ?",
                                 (result_id,)).fetchone()
        if row is None:
            raise ValueError(f"`result_id` must name a stored result, got {result_id!r}")
        return {"series_uid": row[0], "patient_id": row[1]}

    def claim_outbox(self, now: float, lease_s: float | Callable[[int], float], *, holder: str,
                     due_only: bool = True, result_id: int | None = None,
                     destination: str | None = None, limit: int = 500) -> list[OutboxItem]:
        """Take pending items that no sender holds, and hold them for ``holder`` for ``lease_s``
        seconds (or ``lease_s(n)`` for the n items taken) so that no other sender (the
        daemon's, `appliance send`) sends them meanwhile; a sender that dies leaves them to be
        taken again when the lease ends, or when :meth:`release_leases` gives its items back.
        ``due_only`` takes only those whose next attempt is due (False: `appliance send` sends
        now)."""
        if not callable(lease_s) and not lease_s > 0:
            raise ValueError(f"`lease_s` must be > 0, got {lease_s!r}")
        if not isinstance(holder, str) or not holder:
            raise ValueError(f"`holder` must name the sender, got {holder!r}")
        where = ["state = 'pending'", "(lease_until IS NULL OR lease_until <= ?)"]
        params: list[object] = [now]
        if due_only:
            where.append("next_attempt_at <= ?")
            params.append(now)
        if result_id is not None:
            where.append("result_id = ?")
            params.append(result_id)
        if destination is not None:
            where.append("destination = ?")
            params.append(destination)
        with self.transaction() as c:
            ids = [r[0] for r in c.execute(
                f"SELECT id FROM outbox WHERE {' AND '.join(where)} "
                "ORDER BY next_attempt_at, id LIMIT ?", (*params, limit))]
            until = now + (lease_s(len(ids)) if callable(lease_s) else lease_s)
            c.executemany("UPDATE outbox SET lease_until = ?, leased_by = ? WHERE id = ?",
                          [(until, holder, i) for i in ids])
            return [self._outbox_item(i) for i in ids]

    def pending_destinations(self, now: float, *, due_only: bool = True,
                             result_id: int | None = None) -> list[str]:
        """Destinations with pending rows no sender holds (due ones only, by default)."""
        sql = ("SELECT DISTINCT destination FROM outbox WHERE state = 'pending' "
               "AND (lease_until IS NULL OR lease_until <= ?)")
        params: list[object] = [now]
        if due_only:
            sql += " AND next_attempt_at <= ?"
            params.append(now)
        if result_id is not None:
            sql += " AND result_id = ?"
            params.append(result_id)
        return [r[0] for r in self._query(sql + " ORDER BY destination", params)]

    def _outbox_item(self, item_id: int) -> OutboxItem:
        row = self._conn.execute(f"SELECT {_OUTBOX_COLUMNS} FROM outbox WHERE id = ?",
                                 (item_id,)).fetchone()
        if row is None:
            raise ValueError(f"`item_id` must name an outbox row, got {item_id!r}")
        return _outbox_item(row)

    def mark_sent(self, item_id: int, now: float) -> OutboxItem:
        """The peer stored the file: sent, one more delivery, the lease released."""
        with self.transaction() as c:
            self._outbox_item(item_id)
            c.execute("UPDATE outbox SET state = 'sent', attempts = attempts + 1, "
                      "deliveries = deliveries + 1, sent_at = ?, lease_until = NULL, "
                      "leased_by = NULL WHERE id = ?",
                      (now, item_id))
            return self._outbox_item(item_id)

    def mark_failed(self, item_id: int, error: str, now: float, *, retry: bool,
                    policy: RetryPolicy | None = None, max_attempts: int = 50) -> OutboxItem:
        """An attempt failed with ``error``. ``retry`` (a transient failure) schedules the next
        attempt after :func:`appliance.dicom.send.next_attempt_delay` of the attempts so far,
        until ``max_attempts``; otherwise, or then, the item is failed for good."""
        from appliance.dicom.send import DEFAULT_RETRY, next_attempt_delay

        if not isinstance(error, str) or not error:
            raise ValueError(f"`error` must be a non-empty message, got {error!r}")
        if max_attempts < 1:
            raise ValueError(f"`max_attempts` must be >= 1, got {max_attempts!r}")
        with self.transaction() as c:
            attempts = self._outbox_item(item_id).attempts + 1
            if retry and attempts < max_attempts:
                delay = next_attempt_delay(attempts, policy or DEFAULT_RETRY)
                c.execute("UPDATE outbox SET attempts = ?, last_error = ?, next_attempt_at = ?, "
                          "lease_until = NULL, leased_by = NULL WHERE id = ?",
                          (attempts, error, now + delay, item_id))
            else:
                if retry:
                    error = f"{error} (gave up after {attempts} attempts)"
                c.execute("UPDATE outbox SET state = 'failed', attempts = ?, last_error = ?, "
                          "lease_until = NULL, leased_by = NULL WHERE id = ?",
                          (attempts, error, item_id))
            return self._outbox_item(item_id)

    def release_leases(self, holder: str) -> int:
        """Give back, without counting an attempt, every item ``holder`` holds: the supervisor
        calls it for its sender once that process is gone (killed or dead), so the files do not
        wait for the lease to end. Returns the items released."""
        with self.transaction() as c:
            return c.execute("UPDATE outbox SET lease_until = NULL, leased_by = NULL "
                             "WHERE leased_by = ?", (holder,)).rowcount

    def requeue_outputs(self, result_id: int, destinations: Sequence[str] | None = None,
                        now: float | None = None) -> int:
        """Send a result's files again (`appliance send RESULT_ID`): its rows (for
        ``destinations``, or all) become pending and due now with their attempts reset, whatever
        their state. Returns the rows requeued."""
        _check_int("result_id", result_id)
        now = time.time() if now is None else now
        with self.transaction() as c:
            owner = self._result_owner(result_id)
            sql = ("UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ? "
                   "WHERE result_id = ?")
            params: list[object] = [now, result_id]
            if destinations is not None:
                sql += f" AND destination IN ({', '.join('?' * len(destinations))})"
                params += list(destinations)
            count = c.execute(sql, params).rowcount
            if count:
                self._event(EventKind.OUTPUTS_REQUEUED, **owner, at=now,
                            detail=f"result {result_id}: {count} file(s) to send again")
            return count

    def outbox_event(self, kind: EventKind, result_id: int, detail: str, now: float) -> None:
        """An OUTPUTS_* event about a result (its series and patient filled in)."""
        with self.transaction():
            self._event(kind, **self._result_owner(result_id), at=now, detail=detail)

    def outbox_items(self, *, result_id: int | None = None, destination: str | None = None,
                     state: OutboxState | None = None) -> list[OutboxItem]:
        where, params = [], []
        for column, value in (("result_id", result_id), ("destination", destination),
                              ("state", None if state is None else OutboxState(state).value)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        rows = self._query(f"SELECT {_OUTBOX_COLUMNS} FROM outbox "
                           + (f"WHERE {' AND '.join(where)} " if where else "") + "ORDER BY id",
                           params)
        return [_outbox_item(r) for r in rows]

    def outbox_counts(self) -> dict[OutboxState, int]:
        counts = dict(self._query("SELECT state, COUNT(*) FROM outbox GROUP BY state"))
        return {state: int(counts.get(state.value, 0)) for state in OutboxState}

    def deliveries(self, result_ids: Sequence[int] | None = None) -> list[Delivery]:
        """Per result and destination: how many files are sent, pending, failed, and the latest
        error (for the dashboard and `appliance status`). All results when ``result_ids`` is
        None; ordered by result, then destination."""
        return self._deliveries(("result_id",), result_ids)

    def deliveries_by_destination(self) -> list[Delivery]:
        """The same over all results, one per destination (``result_id`` None)."""
        return self._deliveries((), None)

    def _deliveries(self, by: tuple[str, ...], result_ids: Sequence[int] | None) -> list[Delivery]:
        keys = ", ".join((*by, "destination"))
        where, params = "", []
        if result_ids is not None:
            where = f"WHERE o.result_id IN ({', '.join('?' * len(result_ids))})"
            params = list(result_ids)
        match = " AND ".join(f"x.{k} = o.{k}" for k in (*by, "destination"))
        rows = self._query(
            f"""SELECT {', '.join(f'o.{k}' for k in (*by, 'destination'))}, COUNT(*),
                       SUM(o.state = 'sent'), SUM(o.state = 'pending'), SUM(o.state = 'failed'),
                       MAX(o.attempts),
                       (SELECT x.last_error FROM outbox x WHERE {match} AND x.state != 'sent'
                        AND x.last_error IS NOT NULL ORDER BY x.attempts DESC, x.id DESC LIMIT 1),
                       MIN(CASE WHEN o.state = 'pending' THEN o.next_attempt_at END),
                       CASE WHEN SUM(o.state != 'sent') = 0 THEN MAX(o.sent_at) END
                FROM outbox o {where} GROUP BY {keys} ORDER BY {keys}""", params)
        out = []
        for row in rows:
            result_id = row[0] if by else None
            rest = row[1:] if by else row
            dest, files, sent, pending, failed, attempts, error, next_at, sent_at = rest
            out.append(Delivery(result_id, dest, int(files), int(sent), int(pending), int(failed),
                                int(attempts), error, next_at, sent_at))
        return out

    # ------------------------------------------------------------------ retention

    def purge_candidates(self) -> list[PurgeCandidate]:
        """Series with files on disk and no queued or running job, oldest activity first."""
        rows = self._query(
            """SELECT s.series_uid,
                      MAX(s.last_instance_at, COALESCE((SELECT MAX(r.created_at) FROM results r
                                                        WHERE r.series_uid = s.series_uid), 0)),
                      COALESCE((SELECT SUM(i.size) FROM instances i
                                WHERE i.series_uid = s.series_uid AND i.purged_at IS NULL), 0)
                      + COALESCE((SELECT SUM(r.bytes) FROM results r
                                  WHERE r.series_uid = s.series_uid), 0)
               FROM series s
               WHERE (s.purged_at IS NULL OR EXISTS (SELECT 1 FROM results r
                      WHERE r.series_uid = s.series_uid AND r.bytes > 0)) AND NOT EXISTS
                     (SELECT 1 FROM jobs j WHERE j.series_uid = s.series_uid
                      AND j.state IN ('queued', 'running'))
               ORDER BY 2"""
        )
        return [PurgeCandidate(uid, float(at), int(n)) for uid, at, n in rows]

    def stored_bytes(self) -> int:
        """Bytes of spool files and result files not yet purged (as recorded)."""
        row = self._query(
            """SELECT COALESCE((SELECT SUM(size) FROM instances WHERE purged_at IS NULL), 0),
                      COALESCE((SELECT SUM(bytes) FROM results), 0)"""
        )[0]
        return int(row[0]) + int(row[1])

    def series_files(self, series_uid: str) -> list[str]:
        """Spool-relative paths of the series' instances whose files are kept."""
        return [r[0] for r in self._query("SELECT path FROM instances WHERE series_uid = ? "
                                          "AND purged_at IS NULL ORDER BY path", (series_uid,))]

    def result_dirs(self, series_uid: str) -> list[str]:
        rows = self._query("SELECT DISTINCT result_path FROM results WHERE series_uid = ? "
                           "AND result_path IS NOT NULL", (series_uid,))
        return [str(Path(r[0]).parent) for r in rows]

    def mark_purged(self, series_uid: str, files: Sequence[str], why: str, now: float) -> bool:
        """Record, before deleting them, that the series' spool ``files`` and result files
        go (the results stay in the database). False when a job was queued for the series
        meanwhile: then nothing is marked and nothing may be deleted."""
        with self.transaction() as c:
            busy = c.execute("SELECT 1 FROM jobs WHERE series_uid = ? AND state IN "
                             "('queued', 'running')", (series_uid,)).fetchone()
            if busy:
                return False
            c.execute("UPDATE series SET purged_at = ? WHERE series_uid = ?", (now, series_uid))
            c.executemany("UPDATE instances SET purged_at = ? WHERE series_uid = ? AND path = ?",
                          [(now, series_uid, f) for f in files])
            c.execute("UPDATE results SET bytes = 0, lobes_path = NULL, opacity_path = NULL "
                      "WHERE series_uid = ?", (series_uid,))
            self._event(EventKind.SERIES_PURGED, series_uid=series_uid, at=now, detail=why,
                        patient_id=self.series_patient(series_uid))
            return True


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")


def _parse_datetime(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None
