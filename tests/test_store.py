"""appliance.store on real SQLite files: migrations, instances, the job life cycle (claims in
transactions, one running job per series, bounded retries), serial comparisons, reviews,
append-only events, read-only readers, and claims from several real processes at once."""

from __future__ import annotations

import multiprocessing as mp
import sqlite3
import time
from pathlib import Path

import pytest

from appliance.config import load_config
from appliance.daemon import update_serial
from appliance.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    ClinicalType,
    EventKind,
    InstanceRecord,
    JobKind,
    JobLost,
    JobState,
    Store,
    StoreError,
)

REGIONS = ("whole", "right", "left", "RUL", "RML", "RLL", "LUL", "LLL")


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "state" / "appliance.db"


@pytest.fixture
def store(db):
    with Store.open(db) as s:
        yield s


def record(n: int, series: str = "1.2.3.1", patient: str = "P1", at: float = 1000.0,
           study: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{series}.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_uid=series, study_uid=study, patient_id=patient, path=f"{study}/{series}/{n}.dcm",
        size=1000 + n, received_at=at, calling_aet="CT1", source="127.0.0.1",
        patient_name="Doe^J", patient_sex="F", modality="CT",
    )


def fake_result(plo: float, acquired: str) -> dict:
    return {"scan": {"acquired_at": acquired},
            "regions": {r: {"plo_pct": plo + i} for i, r in enumerate(REGIONS)},
            "severity_score": 3, "qa": {"ok": True, "flags": []}}


def tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


# ----------------------------------------------------------------------------- schema


def test_migrations_from_an_empty_database_and_idempotent_reopen(db):
    with Store.open(db) as s:
        assert s.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
        s.add_instance(record(1))
    assert {"patients", "studies", "series", "instances", "jobs", "results", "reviews",
            "serial_comparisons", "events"} <= tables(db)
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Store.open(db) as again:  # re-open: nothing applied twice, data kept
        assert again.schema_version == SCHEMA_VERSION
        assert again.instance_count() == 1


def test_a_newer_schema_is_refused(db):
    Store.open(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer than this software"):
        Store.open(db)
    with pytest.raises(StoreError, match=f"schema version {SCHEMA_VERSION + 1}"):
        Store.open(db, readonly=True)


def test_readers_are_read_only(db, store):
    store.add_instance(record(1))
    with pytest.raises(StoreError, match="no database at"):
        Store.open(db.parent / "missing.db", readonly=True)
    with Store.open(db, readonly=True) as reader:
        assert reader.instance_count() == 1
        with pytest.raises(StoreError, match="opened read-only"):
            reader.add_event(EventKind.DAEMON_STARTED)
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            reader._conn.execute("DELETE FROM instances")
        store.add_instance(record(2))  # a writer goes on while the reader is open
        assert reader.instance_count() == 2


def test_events_are_append_only(store):
    store.add_event(EventKind.DAEMON_STARTED, detail="x")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"), store.transaction() as c:
        c.execute("UPDATE events SET detail = 'y'")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"), store.transaction() as c:
        c.execute("DELETE FROM events")
    assert [e.detail for e in store.events()] == ["x"]
    with pytest.raises(TypeError, match="`kind` must be an EventKind"):
        store.add_event("daemon_started")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- instances, jobs


def test_instances_patients_series_and_duplicates(store):
    assert store.add_instance(record(1, at=10.0))
    assert store.add_instance(record(2, at=12.0))
    assert not store.add_instance(record(2, at=20.0))  # duplicate: nothing changes
    row = store.series_row("1.2.3.1")
    assert row["instance_count"] == 2 and row["first_instance_at"] == 10.0
    assert row["last_instance_at"] == 12.0
    assert store.patient("P1").patient_name == "Doe^J"
    kinds = [e.kind for e in store.events()]
    assert kinds == [EventKind.SERIES_RECEIVED, EventKind.INSTANCE_DUPLICATE]


def test_ready_after_quiet_time_or_release_then_settle(store):
    for n in range(3):
        store.add_instance(record(n, at=100.0 + n))
    assert store.ready_series(now=103.0, stable_s=5, settle_s=1) == []
    assert [r.series_uid for r in store.ready_series(now=107.0, stable_s=5, settle_s=1)] == \
        ["1.2.3.1"]
    store.mark_released(["1.2.3.1"], at=102.5)
    assert store.ready_series(now=103.0, stable_s=5, settle_s=1) == []  # settling
    ready = store.ready_series(now=103.6, stable_s=5, settle_s=1)
    assert len(ready) == 1 and ready[0].instance_count == 3 and not ready[0].has_jobs
    store.add_instance(record(3, at=104.0))  # arrived after the release: wait again
    assert store.ready_series(now=104.5, stable_s=5, settle_s=1) == []


def test_queue_claim_complete_and_late_instances_reanalysis(store):
    for n in range(3):
        store.add_instance(record(n, at=10.0))
    job_id = store.queue_job("1.2.3.1", now=20.0)
    assert store.queue_job("1.2.3.1", now=21.0) is None  # nothing new
    claim = store.claim_job("w1", now=22.0, lease_s=5)
    assert claim.job.id == job_id and claim.job.kind == JobKind.ANALYSIS
    assert claim.job.state == JobState.RUNNING and claim.job.attempts == 1
    assert len(claim.files) == 3 and claim.files[0].endswith(".dcm")
    assert store.claim_job("w2", now=22.0, lease_s=5) is None
    store.add_instance(record(3, at=23.0))  # late, while running
    late = store.queue_job("1.2.3.1", now=30.0)
    assert late is not None and store.job(late).kind == JobKind.REANALYSIS
    assert store.claim_job("w2", now=31.0, lease_s=5) is None  # its series is running
    rid = store.complete_job(job_id, "w1", fake_result(5.0, "2020-02-01T10:00:00"),
                             result_path="results/x/result.json", lobes_path=None,
                             opacity_path=None, nbytes=10, now=32.0)
    assert store.job(job_id).state == JobState.DONE
    second = store.claim_job("w2", now=33.0, lease_s=5)
    assert second.job.id == late and len(second.files) == 4
    store.complete_job(late, "w2", fake_result(7.0, "2020-02-01T10:00:00"), result_path=None,
                       lobes_path=None, opacity_path=None, nbytes=0, now=34.0)
    assert [r.result_id for r in store.results_of("1.2.3.1")] == [rid, rid + 1]
    assert [s.result["regions"]["whole"]["plo_pct"] for s in store.scans("P1")] == [7.0]
    late_events = store.events(kind=EventKind.LATE_INSTANCES)
    assert len(late_events) == 1 and "1 instance(s) after job" in late_events[0].detail


def test_a_queued_job_absorbs_more_instances(store):
    store.add_instance(record(1))
    job_id = store.queue_job("1.2.3.1", now=5.0)
    store.add_instance(record(2))
    assert store.queue_job("1.2.3.1", now=6.0) is None
    assert store.job(job_id).instance_count == 2
    assert store.ready_series(now=1e9, stable_s=1, settle_s=1) == []


def test_at_most_one_running_job_per_series_is_enforced_by_the_database(store):
    store.add_instance(record(1))
    store.queue_job("1.2.3.1", now=1.0)
    store.claim_job("w1", now=2.0, lease_s=5)
    with pytest.raises(sqlite3.IntegrityError), store.transaction() as c:
        c.execute("INSERT INTO jobs (series_uid, kind, state, stage, instance_count, created_at) "
                  "VALUES ('1.2.3.1', 'analysis', 'running', 'load', 1, 3.0)")


def test_retry_is_bounded_and_a_lost_job_cannot_be_completed(store):
    store.add_instance(record(1))
    job_id = store.queue_job("1.2.3.1", now=1.0)
    for attempt in (1, 2):
        claim = store.claim_job(f"w{attempt}", now=2.0, lease_s=5)
        assert claim.job.attempts == attempt
        done = store.retry_or_fail(job_id, "worker exited with code 70", 3, now=3.0,
                                   worker=f"w{attempt}")
        assert done.state == JobState.QUEUED
        with pytest.raises(JobLost):
            store.complete_job(job_id, f"w{attempt}", fake_result(1, "2020-01-01"),
                               result_path=None, lobes_path=None, opacity_path=None, nbytes=0,
                               now=4.0)
    store.claim_job("w3", now=5.0, lease_s=5)
    assert store.retry_or_fail(job_id, "boom", 3, now=6.0, worker="someone-else") is None
    done = store.retry_or_fail(job_id, "worker exited with code 70", 3, now=6.0, worker="w3")
    job = store.job(job_id)
    assert done.state == JobState.FAILED == job.state
    assert job.reason == "worker exited with code 70 (attempt 3 of 3)"
    assert [e.kind for e in store.events(kind=EventKind.JOB_RETRY)] == [EventKind.JOB_RETRY] * 2


def test_shutdown_requeue_gives_the_attempt_back_and_restart_recovery_counts_it(store):
    store.add_instance(record(1))
    job_id = store.queue_job("1.2.3.1", now=1.0)
    store.claim_job("w1", now=2.0, lease_s=5)
    store.retry_or_fail(job_id, "stopped", 3, now=3.0, worker="w1", count_attempt=False)
    assert store.job(job_id).attempts == 0 and store.job(job_id).state == JobState.QUEUED
    store.claim_job("w2", now=4.0, lease_s=5)
    recovered = store.recover_running("interrupted", 1, now=5.0)
    assert [(r.job_id, r.state) for r in recovered] == [(job_id, JobState.FAILED)]
    assert store.running_jobs() == []


def test_fail_job_keeps_stage_and_reason(store):
    store.add_instance(record(1))
    job_id = store.queue_job("1.2.3.1", now=1.0)
    store.claim_job("w1", now=2.0, lease_s=5)
    assert store.heartbeat(job_id, "w1", now=3.0, lease_s=5, stage="load")
    assert not store.heartbeat(job_id, "w9", now=3.0, lease_s=5)
    store.fail_job(job_id, "w1", "refused: fewer than 20 slices", now=4.0)
    job = store.jobs(state=JobState.FAILED)[0]
    assert (job.stage, job.reason) == ("load", "refused: fewer than 20 slices")
    assert store.job_counts()[JobState.FAILED] == 1


# ----------------------------------------------------------------------------- patients, serial


def test_patient_edits_reviews_and_serial_comparison(store):
    config = load_config(env={})
    for k, (plo, day) in enumerate([(10.0, "2020-02-01"), (20.0, "2020-02-05")]):
        series = f"1.2.3.{k + 1}"
        store.add_instance(record(1, series=series))
        job_id = store.queue_job(series, now=1.0)
        store.claim_job("w", now=2.0, lease_s=5)
        rid = store.complete_job(job_id, "w", fake_result(plo, f"{day}T09:00:00"),
                                 result_path=None, lobes_path=None, opacity_path=None, nbytes=0,
                                 now=3.0)
    store.update_patient("P1", onset_date="2020-01-25", clinical_type="severe")
    patient = store.patient("P1")
    assert (patient.onset_date, patient.clinical_type) == ("2020-01-25", ClinicalType.SEVERE)
    comparison = update_serial(store, "P1", config, now=4.0)
    assert store.serial("P1") == comparison
    follow = comparison[1]
    assert follow["key"] == "1.2.3.2" and follow["days_since_onset"] == 11
    assert follow["vs_previous"]["whole"]["delta_pts"] == pytest.approx(10.0)
    assert follow["vs_previous"]["whole"]["change_pct"] == pytest.approx(100.0)
    assert follow["trend"] == "progressing"
    assert store.patient_ids() == ["P1"]
    assert store.read("SELECT count(*) FROM results") == [(2,)]
    with pytest.raises(ValueError, match="read-only SELECT"):
        store.read("DELETE FROM results")
    review = store.add_review(rid, 4, "Dr. Who", "fine")
    assert store.reviews(rid)[0]["id"] == review and store.reviews(rid)[0]["score"] == 4
    with pytest.raises(ValueError, match="`score` must be an integer 0..5, got 6"):
        store.add_review(rid, 6, "Dr. Who")
    with pytest.raises(ValueError, match="`reviewer` must be a non-empty name"):
        store.add_review(rid, 3, " ")
    with pytest.raises(ValueError, match="`result_id` must name a stored result"):
        store.add_review(999, 3, "Dr. Who")
    with pytest.raises(ValueError, match="`clinical_type` must be one of mild, moderate"):
        store.update_patient("P1", clinical_type="terrible")
    with pytest.raises(ValueError, match="`onset_date` must be an ISO date"):
        store.update_patient("P1", onset_date="25/01/2020")
    with pytest.raises(ValueError, match="`patient_id` must name a known patient"):
        store.update_patient("P404", clinical_type="mild")


# ----------------------------------------------------------------------------- processes


def _claimer(path: str, name: str, out) -> None:
    with Store.open(path) as s:
        got = []
        while (claim := s.claim_job(name, time.time(), 30)) is not None:
            got.append(claim.job.id)
            s.complete_job(claim.job.id, name, fake_result(1.0, "2020-01-01"), result_path=None,
                           lobes_path=None, opacity_path=None, nbytes=0, now=time.time())
        out.put(got)


def test_claims_from_concurrent_processes_take_each_job_once(db, store):
    for k in range(24):
        store.add_instance(record(1, series=f"1.2.9.{k}"))
        store.queue_job(f"1.2.9.{k}", now=1.0)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claimer, args=(str(db), f"p{i}", out)) for i in range(3)]
    for p in procs:
        p.start()
    claimed = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    every = sorted(j for got in claimed for j in got)
    assert every == sorted(j.id for j in store.jobs(limit=100))  # each exactly once
    assert store.job_counts()[JobState.DONE] == 24
