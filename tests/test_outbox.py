"""The outbox in appliance.store on real SQLite files: the migration from the first schema,
idempotent enqueueing, leases, the backoff schedule, terminal states, re-sends, the delivery
summaries, and state that survives closing and reopening the database."""

from __future__ import annotations

import sqlite3

import pytest

from appliance.dicom.send import RetryPolicy, next_attempt_delay
from appliance.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    EventKind,
    InstanceRecord,
    OutboxState,
    Store,
)

PACS = "PACS@10.0.0.5:104"
ARCHIVE = "ARCHIVE@10.0.0.6:11112"
FILES = ["results/1.2.3.1/dicom/seg_1.dcm", "results/1.2.3.1/dicom/sr_2.dcm",
         "results/1.2.3.1/dicom/key1_3.dcm"]
QUICK = RetryPolicy(base_s=10.0, factor=2.0, max_s=60.0)


@pytest.fixture
def db(tmp_path):
    return tmp_path / "state" / "appliance.db"


@pytest.fixture
def store(db):
    with Store.open(db) as s:
        yield s


def stored_result(store: Store, series: str = "1.2.3.1", patient: str = "P1",
                  at: float = 1000.0) -> int:
    """A result in the store the way the daemon makes one: instance, job, claim, complete."""
    store.add_instance(InstanceRecord(
        sop_instance_uid=f"{series}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_uid=series, study_uid="1.2.3", patient_id=patient, path=f"x/{series}.dcm",
        size=10, received_at=at))
    job_id = store.queue_job(series, now=at)
    assert store.claim_job("w", at, 60.0) is not None
    return store.complete_job(job_id, "w", {"regions": {"whole": {"plo_pct": 1.0}}},
                              result_path=None, lobes_path=None, opacity_path=None, nbytes=0,
                              now=at)


def test_the_outbox_migration_keeps_an_existing_database(db):
    # a database made by the release before the outbox (schema 1), with a patient in it
    db.parent.mkdir(parents=True)
    conn = sqlite3.connect(db, isolation_level=None)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO patients (patient_id, created_at, updated_at) VALUES ('P0', 0, 0)")
    conn.close()
    with Store.open(db) as s:
        assert s.schema_version == SCHEMA_VERSION >= 2
        assert s.patient("P0") is not None and s.outbox_items() == []
        result_id = stored_result(s)
        assert s.enqueue_outputs(result_id, [PACS], FILES, now=1.0) == 3
    with Store.open(db) as again:  # reopening applies nothing twice
        assert again.schema_version == SCHEMA_VERSION
        assert len(again.outbox_items()) == 3


def test_enqueue_is_idempotent(store):
    result_id = stored_result(store)
    assert store.enqueue_outputs(result_id, [PACS, ARCHIVE], FILES, now=5.0) == 6
    assert store.enqueue_outputs(result_id, [PACS, ARCHIVE], FILES, now=6.0) == 0
    assert store.enqueue_outputs(result_id, [PACS], [*FILES, "extra.dcm"], now=7.0) == 1
    items = store.outbox_items()
    assert len(items) == 7
    assert {(i.state, i.attempts, i.deliveries) for i in items} == {(OutboxState.PENDING, 0, 0)}
    assert [i.created_at for i in items] == [5.0] * 6 + [7.0]
    # the database itself refuses a second row for the same result, destination and file
    with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"), store.transaction() as c:
        c.execute("INSERT INTO outbox (result_id, destination, path, state, created_at, "
                  "next_attempt_at) VALUES (?, ?, ?, 'pending', 0, 0)", (result_id, PACS, FILES[0]))
    queued = store.events(kind=EventKind.OUTPUTS_QUEUED)
    assert [e.detail for e in queued] == [f"result {result_id}: 6 file(s) for {PACS}, {ARCHIVE}",
                                          f"result {result_id}: 1 file(s) for {PACS}"]
    assert queued[0].series_uid == "1.2.3.1" and queued[0].patient_id == "P1"


def test_enqueue_checks_its_arguments(store):
    result_id = stored_result(store)
    with pytest.raises(ValueError, match="`result_id` must name a stored result, got 99"):
        store.enqueue_outputs(99, [PACS], FILES)
    with pytest.raises(TypeError, match="`destinations` must be a sequence of non-empty str"):
        store.enqueue_outputs(result_id, PACS, FILES)  # a single string, not a list
    with pytest.raises(TypeError, match="`paths` must be a sequence of non-empty str"):
        store.enqueue_outputs(result_id, [PACS], ["ok.dcm", ""])
    with pytest.raises(TypeError, match="`result_id` must be an int, got str"):
        store.enqueue_outputs("1", [PACS], FILES)  # type: ignore[arg-type]
    assert store.outbox_items() == []


def test_claims_take_due_rows_once_until_the_lease_ends(store):
    result_id = stored_result(store)
    store.enqueue_outputs(result_id, [PACS, ARCHIVE], FILES, now=100.0)
    assert store.claim_outbox(99.0, 30.0, holder="daemon") == []  # not due yet
    assert store.pending_destinations(100.0) == [ARCHIVE, PACS]
    first = store.claim_outbox(100.0, 30.0, holder="daemon", destination=PACS)
    assert [i.path for i in first] == FILES
    assert {(i.lease_until, i.leased_by) for i in first} == {(130.0, "daemon")}
    # `appliance send` (due or not) never takes what the daemon's sender holds
    assert store.claim_outbox(110.0, 30.0, holder="cli:1", due_only=False, destination=PACS) == []
    assert store.pending_destinations(110.0) == [ARCHIVE]
    # the sender died: its rows are taken again when the lease ends
    again = store.claim_outbox(130.0, 30.0, holder="cli:1", destination=PACS)
    assert [i.id for i in again] == [i.id for i in first]
    assert {i.leased_by for i in again} == {"cli:1"}
    # ... or at once when the supervisor gives back what its dead sender held
    arch = store.claim_outbox(131.0, 30.0, holder="daemon", destination=ARCHIVE)
    assert store.release_leases("daemon") == 3
    assert {(i.lease_until, i.leased_by) for i in store.outbox_items(destination=ARCHIVE)} == {
        (None, None)}
    assert [i.id for i in store.claim_outbox(132.0, 30.0, holder="daemon", limit=2)] == [
        i.id for i in arch[:2]]
    # a lease can follow the number of rows taken (one C-STORE response per file)
    [last] = store.claim_outbox(133.0, lambda n: 10.0 * n + 5.0, holder="daemon")
    assert last.lease_until == 133.0 + 15.0
    with pytest.raises(ValueError, match="`lease_s` must be > 0"):
        store.claim_outbox(100.0, 0.0, holder="daemon")
    with pytest.raises(ValueError, match="`holder` must name the sender"):
        store.claim_outbox(100.0, 1.0, holder="")


def test_failed_attempts_follow_the_backoff_schedule_then_give_up(store):
    result_id = stored_result(store)
    store.enqueue_outputs(result_id, [PACS], FILES[:1], now=0.0)
    now, waits = 0.0, []
    for _attempt in range(4):
        [item] = store.claim_outbox(now, 30.0, holder="daemon")
        item = store.mark_failed(item.id, "cannot connect: Connection refused", now, retry=True,
                                 policy=QUICK, max_attempts=5)
        assert item.state is OutboxState.PENDING and item.lease_until is None
        waits.append(item.next_attempt_at - now)
        assert store.claim_outbox(item.next_attempt_at - 0.5, 30.0, holder="daemon") == []  # not before its time
        now = item.next_attempt_at
    assert waits == [10.0, 20.0, 40.0, 60.0]  # doubling, capped at max_s
    assert waits == [next_attempt_delay(n, QUICK) for n in (1, 2, 3, 4)]
    [item] = store.claim_outbox(now, 30.0, holder="daemon")
    item = store.mark_failed(item.id, "cannot connect: Connection refused", now, retry=True,
                             policy=QUICK, max_attempts=5)
    assert (item.state, item.attempts) == (OutboxState.FAILED, 5)
    assert item.last_error == "cannot connect: Connection refused (gave up after 5 attempts)"
    assert store.claim_outbox(now + 1e6, 30.0, holder="daemon") == []


def test_a_permanent_failure_fails_at_once_and_a_success_is_final(store):
    result_id = stored_result(store)
    store.enqueue_outputs(result_id, [PACS], FILES[:2], now=0.0)
    seg, sr = store.claim_outbox(0.0, 30.0, holder="daemon")
    refused = store.mark_failed(seg.id, "failed: 0x0122 Failure: SOP class not supported", 1.0,
                                retry=False)
    assert (refused.state, refused.attempts) == (OutboxState.FAILED, 1)
    sent = store.mark_sent(sr.id, 2.0)
    assert (sent.state, sent.attempts, sent.deliveries, sent.sent_at) == (OutboxState.SENT, 1, 1,
                                                                          2.0)
    assert store.claim_outbox(1e9, 30.0, holder="daemon", due_only=False) == []
    with pytest.raises(ValueError, match="`error` must be a non-empty message"):
        store.mark_failed(seg.id, "", 3.0, retry=True)
    with pytest.raises(ValueError, match="`item_id` must name an outbox row, got 999"):
        store.mark_sent(999, 3.0)


def test_state_survives_reopening_the_database(db):
    with Store.open(db) as s:
        result_id = stored_result(s)
        s.enqueue_outputs(result_id, [PACS], FILES, now=0.0)
        seg, sr, key = s.claim_outbox(0.0, 30.0, holder="daemon")
        s.mark_sent(seg.id, 1.0)
        s.mark_failed(sr.id, "connection lost", 1.0, retry=True, policy=QUICK)
        s.mark_failed(key.id, "refused", 1.0, retry=False)
    with Store.open(db, readonly=True) as r:  # what `appliance status` and the dashboard see
        seg, sr, key = r.outbox_items(result_id=result_id)
        assert (seg.state, seg.deliveries, seg.sent_at) == (OutboxState.SENT, 1, 1.0)
        assert (sr.state, sr.attempts, sr.last_error, sr.next_attempt_at) == (
            OutboxState.PENDING, 1, "connection lost", 11.0)
        assert (key.state, key.last_error) == (OutboxState.FAILED, "refused")
        assert r.outbox_counts() == {OutboxState.PENDING: 1, OutboxState.SENT: 1,
                                     OutboxState.FAILED: 1}
    with Store.open(db) as s:  # and the writer carries on where it was
        [due] = s.claim_outbox(11.0, 30.0, holder="daemon")
        assert due.id == sr.id and due.attempts == 1
        assert s.mark_sent(due.id, 12.0).attempts == 2


def test_requeue_sends_a_result_again(store):
    result_id = stored_result(store)
    other = stored_result(store, series="1.2.3.2", patient="P2")
    store.enqueue_outputs(result_id, [PACS, ARCHIVE], FILES, now=0.0)
    store.enqueue_outputs(other, [PACS], FILES[:1], now=0.0)
    for item in store.claim_outbox(0.0, 30.0, holder="daemon", result_id=result_id, destination=PACS):
        store.mark_sent(item.id, 1.0)
    for item in store.claim_outbox(0.0, 30.0, holder="daemon", result_id=result_id, destination=ARCHIVE):
        store.mark_failed(item.id, "refused", 1.0, retry=False)
    assert store.requeue_outputs(result_id, [PACS], now=50.0) == 3
    items = store.outbox_items(result_id=result_id, destination=PACS)
    assert {(i.state, i.attempts, i.deliveries, i.next_attempt_at) for i in items} == {
        (OutboxState.PENDING, 0, 1, 50.0)}
    assert {i.state for i in store.outbox_items(destination=ARCHIVE)} == {OutboxState.FAILED}
    assert store.requeue_outputs(result_id, now=60.0) == 6  # every destination
    assert store.outbox_items(result_id=other)[0].next_attempt_at == 0.0  # untouched
    [event] = store.events(kind=EventKind.OUTPUTS_REQUEUED, limit=1)
    assert event.detail == f"result {result_id}: 6 file(s) to send again"
    with pytest.raises(ValueError, match="`result_id` must name a stored result"):
        store.requeue_outputs(404)


def test_delivery_summaries_per_result_and_per_destination(store):
    r1 = stored_result(store)
    r2 = stored_result(store, series="1.2.3.2", patient="P2")
    store.enqueue_outputs(r1, [PACS, ARCHIVE], FILES, now=0.0)
    store.enqueue_outputs(r2, [PACS], FILES, now=0.0)
    for item in store.claim_outbox(0.0, 30.0, holder="daemon", result_id=r1, destination=PACS):
        store.mark_sent(item.id, 5.0)
    a, b, c = store.claim_outbox(0.0, 30.0, holder="daemon", result_id=r1, destination=ARCHIVE)
    store.mark_sent(a.id, 5.0)
    store.mark_failed(b.id, "association rejected", 5.0, retry=True, policy=QUICK)
    store.mark_failed(c.id, "0x0122 SOP class not supported", 6.0, retry=False)
    r2_items = store.claim_outbox(0.0, 30.0, holder="daemon", result_id=r2)
    store.mark_failed(r2_items[0].id, "cannot connect", 7.0, retry=True, policy=QUICK)

    by_result = {(d.result_id, d.destination): d for d in store.deliveries()}
    assert list(by_result) == [(r1, ARCHIVE), (r1, PACS), (r2, PACS)]
    done = by_result[(r1, PACS)]
    assert (done.state, done.files, done.sent, done.sent_at, done.last_error) == (
        OutboxState.SENT, 3, 3, 5.0, None)
    mixed = by_result[(r1, ARCHIVE)]
    assert (mixed.state, mixed.sent, mixed.pending, mixed.failed) == (OutboxState.FAILED, 1, 1, 1)
    assert mixed.next_attempt_at == 15.0 and mixed.sent_at is None
    waiting = by_result[(r2, PACS)]
    assert (waiting.state, waiting.pending, waiting.attempts, waiting.last_error) == (
        OutboxState.PENDING, 3, 1, "cannot connect")
    assert waiting.next_attempt_at == 0.0  # two files never tried: due at once
    assert [d.destination for d in store.deliveries([r2])] == [PACS]

    totals = {d.destination: d for d in store.deliveries_by_destination()}
    assert totals[PACS].result_id is None
    assert (totals[PACS].files, totals[PACS].sent, totals[PACS].pending) == (6, 3, 3)
    assert (totals[ARCHIVE].files, totals[ARCHIVE].failed) == (3, 1)
