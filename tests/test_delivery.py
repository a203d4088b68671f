"""Delivery of results to PACS: the daemon's worker writes the DICOM outputs of a real analysis
(tiny threshold models, tests/onnx_models.py) and queues them; the daemon-side sender
(appliance.delivery) sends them to a real Orthanc (tests/orthanc.py), found there through its
REST API; a destination that is down is retried with backoff and delivered once it is up, with
nothing sent twice; `appliance send` and `appliance status`; and the real `appliance serve`.

The Orthanc tests skip, with the reason, only when the Orthanc binary is not installed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest

from appliance import cli, daemon_cli
from appliance.config import load_config
from appliance.daemon import SENDER, Paths, Stabiliser, Worker
from appliance.delivery import Settings, deliver
from appliance.store import EventKind, JobState, OutboxState, Store
from tests.orthanc import HOST, free_port, needs_orthanc, start_orthanc
from tests.test_daemon import send, settled, spool_series, wait_for, write_chest
from tests.test_dicom_outputs import (
    COMPREHENSIVE_3D_SR,
    DCIODVFY,
    SC_STORAGE,
    SEG_STORAGE,
    check_with_dciodvfy,
)

EXPECTED_CLASSES = {SEG_STORAGE: 1, COMPREHENSIVE_3D_SR: 1, SC_STORAGE: 3}
FILES = sum(EXPECTED_CLASSES.values())


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    from tests.onnx_models import write_models

    return write_models(tmp_path_factory.mktemp("models"))


def destination(port: int, ae: str = "ORTHANC") -> str:
    return f"{ae}@{HOST}:{port}"


def analysed(tmp: Path, models: Path, dest_port: int | None, patient: str = "D1"):
    """A state directory where the daemon's stabiliser and worker (in this process) analysed one
    phantom chest series, configured to send to ``dest_port`` (None: no destination). Returns
    (config, paths, store, result_id, the written series)."""
    config = load_config(env={"APPLIANCE_ANALYSIS__MODELS_DIR": str(models),
                              "APPLIANCE_ANALYSIS__BACKEND": "onnxruntime",
                              "APPLIANCE_ANALYSIS__THREADS": "1",
                              "APPLIANCE_SEND__DESTINATIONS": (destination(dest_port)
                                                               if dest_port else ""),
                              "APPLIANCE_SEND__TIMEOUT_S": "5",
                              "APPLIANCE_SEND__RETRY_BASE_S": "10"})
    paths = Paths(tmp / "state")
    paths.make()
    store = Store.open(paths.db)
    series = write_chest(tmp / "ct", patient, ggo=4)
    spool_series(store, paths, series, at=100.0)
    Stabiliser(store, config.daemon, paths).tick(now=200.0)
    worker = Worker(config, paths, store, "local-w0")
    worker.open()
    try:
        assert worker.run_once()
    finally:
        worker.close()
    [job] = store.jobs(series_uid=series.series_uid)
    assert job.state == JobState.DONE, job.reason
    [result] = store.results_of(series.series_uid)
    return config, paths, store, result.result_id, series


def in_orthanc(server) -> dict[str, dict]:
    """SOP Instance UID -> simplified tags of every instance Orthanc holds."""
    out = {}
    for orthanc_id in server.instances():
        tags = server.instance_tags(orthanc_id)
        out[tags["SOPInstanceUID"]] = tags
    return out


class Clock:
    """The time the outbox sees; tests move it instead of waiting out the backoff."""

    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


# ----------------------------------------------------------------------------- in process


@needs_orthanc
def test_daemon_outputs_pass_dciodvfy_and_arrive_in_orthanc(models_dir, tmp_path):
    server = start_orthanc(tmp_path / "orthanc")
    try:
        config, paths, store, result_id, series = analysed(tmp_path, models_dir, server.dicom_port)
        with store:
            files = sorted(paths.outputs_dir(series.series_uid).glob("*.dcm"))
            assert len(files) == FILES
            with sqlite3.connect(paths.db) as conn:
                [(nbytes,)] = conn.execute("SELECT bytes FROM results WHERE id = ?", (result_id,))
            assert nbytes > sum(p.stat().st_size for p in files)  # counted for retention
            if DCIODVFY is not None:
                check_with_dciodvfy(files)  # warnings are printed (pytest -s), errors fail
            items = store.outbox_items(result_id=result_id)
            assert sorted(i.path for i in items) == sorted(
                str(p.relative_to(paths.state)) for p in files)
            assert {(i.destination, i.state) for i in items} == {
                (destination(server.dicom_port), OutboxState.PENDING)}

            [attempt] = deliver(store, paths.state, Settings.from_config(config), holder=SENDER)
            assert attempt.ok and attempt.delivered == FILES, attempt.summary()
            assert deliver(store, paths.state, Settings.from_config(config), holder=SENDER) == []  # nothing left

            ours = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
            stored = in_orthanc(server)
            assert set(stored) == ours
            assert Counter(t["SOPClassUID"] for t in stored.values()) == EXPECTED_CLASSES
            assert {t["StudyInstanceUID"] for t in stored.values()} == {series.spec.study_uid}
            assert {t["PatientID"] for t in stored.values()} == {"D1"}
            assert len(server.changes("NewInstance")) == FILES
            items = store.outbox_items(result_id=result_id)
            assert {(i.state, i.attempts, i.deliveries) for i in items} == {(OutboxState.SENT, 1, 1)}
            [sent] = store.events(kind=EventKind.OUTPUTS_SENT)
            assert sent.detail == (f"result {result_id} to {destination(server.dicom_port)}: "
                                   f"{FILES} file(s) sent")

            # what `appliance status --json` shows
            delivery = json.loads(json.dumps(daemon_cli.status_report(store)))["delivery"]
        [dest] = delivery["destinations"]
        assert (dest["destination"], dest["state"], dest["sent"]) == (
            destination(server.dicom_port), "sent", FILES)
        assert delivery["outbox"] == {"pending": 0, "sent": FILES, "failed": 0}
        assert delivery["undelivered"] == []
    finally:
        server.stop()


@needs_orthanc
def test_a_destination_that_is_down_is_retried_then_delivered_once(models_dir, tmp_path, capsys):
    port = free_port()  # nothing listens there yet
    config, paths, store, result_id, _ = analysed(tmp_path, models_dir, port)
    settings = Settings.from_config(config)
    t0 = time.time()  # after the worker queued the files
    clock = Clock(t0)
    with store:
        [first] = deliver(store, paths.state, settings, holder=SENDER, now=clock)
        assert (first.delivered, first.to_retry, first.failed) == (0, FILES, 0)
        assert f"cannot connect to {HOST}:{port}" in first.error
        clock.t = t0 + 9.0
        assert deliver(store, paths.state, settings, holder=SENDER, now=clock) == []  # backoff: 10 s
        clock.t = t0 + 10.0
        [second] = deliver(store, paths.state, settings, holder=SENDER, now=clock)
        assert second.to_retry == FILES
        items = store.outbox_items(result_id=result_id)
        assert {(i.state, i.attempts, i.next_attempt_at) for i in items} == {
            (OutboxState.PENDING, 2, t0 + 30.0)}  # then 20 s
        assert all(f"cannot connect to {HOST}:{port}" in i.last_error for i in items)

        assert daemon_cli.main(["status", "--state-dir", str(paths.state)]) == 0
        text = capsys.readouterr().out
        assert f"Delivery: {FILES} pending, 0 sent, 0 failed" in text
        assert f"result {result_id}" in text and "last error: no association" in text

        server = start_orthanc(tmp_path / "orthanc", dicom_port=port)
        try:
            clock.t = t0 + 30.0
            [third] = deliver(store, paths.state, settings, holder=SENDER, now=clock)
            assert third.ok and third.delivered == FILES, third.summary()
            clock.t = t0 + 1e7
            assert deliver(store, paths.state, settings, holder=SENDER, now=clock) == []
            items = store.outbox_items(result_id=result_id)
            assert {(i.state, i.attempts, i.deliveries, i.sent_at) for i in items} == {
                (OutboxState.SENT, 3, 1, t0 + 30.0)}
            assert len(server.instances()) == FILES
            assert len(server.changes("NewInstance")) == FILES  # none received twice
            assert Counter(t["SOPClassUID"] for t in in_orthanc(server).values()) == \
                EXPECTED_CLASSES
        finally:
            server.stop()
        retries = store.events(kind=EventKind.OUTPUTS_RETRY)
        assert len(retries) == 2 and "cannot connect" in retries[0].detail
        assert len(store.events(kind=EventKind.OUTPUTS_SENT)) == 1


@needs_orthanc
def test_appliance_send_exit_codes_and_summaries(models_dir, tmp_path, capsys):
    port = free_port()  # nobody listens there yet
    _config, paths, store, result_id, _ = analysed(tmp_path, models_dir, port)
    store.close()
    conf = tmp_path / "appliance.toml"
    conf.write_text("[send]\ntimeout_s = 30.0\n")  # rows name the destination; generous timeout for a loaded machine
    dest = destination(port)

    def run(*args: str, state: Path = paths.state) -> tuple[int, str, str]:
        code = cli.main(["send", *args, "--config", str(conf), "--state-dir", str(state)])
        out, err = capsys.readouterr()
        return code, out, err

    def rows(**filters):
        with Store.open(paths.db, readonly=True) as s:
            return s.outbox_items(result_id=result_id, **filters)

    code, out, err = run("--all-pending")
    assert code == 1
    assert out.startswith(f"{dest}: 0 of {FILES} delivered, {FILES} to retry, 0 failed "
                          f"(no association with {dest}: cannot connect")
    assert len(out.splitlines()) == 1
    assert {(i.destination, i.state, i.attempts) for i in rows()} == {
        (dest, OutboxState.PENDING, 1)}

    server = start_orthanc(tmp_path / "orthanc", dicom_port=port)
    try:
        # sent now, although the backoff would wait 30 s
        assert run("--all-pending")[:2] == (0, f"{dest}: {FILES} of {FILES} delivered, "
                                               "0 to retry, 0 failed\n")
        assert run("--all-pending")[:2] == (0, "nothing pending\n")
        assert {(i.state, i.deliveries) for i in rows()} == {(OutboxState.SENT, 1)}
        # a result sent again on request: the same instances, which PACS replaces
        assert run(str(result_id))[:2] == (0, f"{dest}: {FILES} of {FILES} delivered, "
                                              "0 to retry, 0 failed\n")
        assert {(i.state, i.deliveries) for i in rows()} == {(OutboxState.SENT, 2)}
        assert len(server.instances()) == FILES
        assert Counter(t["SOPClassUID"] for t in in_orthanc(server).values()) == \
            EXPECTED_CLASSES
        # a peer that refuses us: permanent failures, exit 1
        wrong = destination(port, "NOT_ORTHANC")
        code, out, _ = run(str(result_id), "--to", wrong)
        assert code == 1 and out.startswith(f"{wrong}: 0 of {FILES} delivered, 0 to retry, "
                                            f"{FILES} failed (association rejected")
        assert {i.state for i in rows(destination=wrong)} == {OutboxState.FAILED}
        assert {i.state for i in rows(destination=dest)} == {OutboxState.SENT}
    finally:
        server.stop()

    # without a destination the daemon writes no outputs, so there is nothing to send
    *_, plain_store, plain_id, plain = analysed(tmp_path / "plain", models_dir, None)
    with plain_store:
        assert plain_store.outbox_items() == []
    assert not Paths(tmp_path / "plain" / "state").outputs_dir(plain.series_uid).exists()
    code, out, err = run(str(plain_id), "--to", dest, state=tmp_path / "plain" / "state")
    assert (code, out) == (2, "")
    assert err.startswith(f"appliance: result {plain_id} has no DICOM outputs: no destination "
                          "was configured when it was analysed")
    # bad input: exit 2 with one line
    for args, message in [((str(result_id + 100),), f"no result {result_id + 100} in the store"),
                          (("--all-pending", "--to", "nowhere"), "--to: `destination` must look "
                                                                 "like AE@host:port")]:
        code, out, err = run(*args)
        assert (code, out) == (2, "") and err.startswith(f"appliance: {message}")
        assert len(err.splitlines()) == 1
    code, out, err = run("1", state=tmp_path / "empty")
    assert code == 2 and err.startswith("appliance: no database at")


def test_files_gone_from_disk_fail_for_good_without_a_peer(tmp_path):
    """Retention removed the files (or a path is wrong): no association is tried, each row is
    failed with the reason at the first attempt, and the result's event says so."""
    from tests.test_outbox import stored_result

    state = tmp_path / "state"
    with Store.open(state / "appliance.db") as store:
        result_id = stored_result(store)
        dest = destination(free_port())
        store.enqueue_outputs(result_id, [dest], ["results/x/seg_1.dcm", "results/x/sr_2.dcm"])
        settings = Settings.from_config(load_config(env={}))
        [attempt] = deliver(store, state, settings, holder=SENDER)
        assert (attempt.delivered, attempt.to_retry, attempt.failed) == (0, 0, 2)
        assert attempt.error.startswith(f"cannot read {state / 'results/x/seg_1.dcm'}")
        items = store.outbox_items()
        assert {(i.state, i.attempts) for i in items} == {(OutboxState.FAILED, 1)}
        [event] = store.events(kind=EventKind.OUTPUTS_FAILED)
        assert event.detail.startswith(f"result {result_id} to {dest}: 2 file(s) failed: "
                                       "cannot read")


# ----------------------------------------------------------------------------- appliance serve


@pytest.mark.slow
@needs_orthanc
def test_serve_keeps_analysing_while_pacs_is_down_then_delivers(tmp_path, models_dir):
    from tests.test_daemon import ROOT, Daemon

    port = free_port()
    d = Daemon(tmp_path, models_dir, free_port())
    with open(d.config, "a") as fh:  # quick retries: the sender tries every second
        fh.write(f'[send]\ndestinations = ["{destination(port)}"]\ntimeout_s = 5.0\n'
                 'retry_base_s = 0.5\nretry_max_s = 1.0\n')
    server = None
    try:
        d.start()
        series = write_chest(tmp_path / "ct", "S1", ggo=4)
        assert send(d.port, series.paths) == [0] * 24
        wait_for(lambda: settled(d, [series.series_uid], (JobState.DONE,)), 90,
                 "the analysis, while PACS is down", d)

        def retried(s: Store) -> bool:
            items = s.outbox_items()
            return len(items) == FILES and all(i.attempts >= 2 and i.last_error for i in items)

        wait_for(lambda: d.query(retried), 60, "the outbox to retry", d)
        assert d.query(lambda s: s.outbox_counts()[OutboxState.SENT]) == 0
        out = subprocess.run([sys.executable, "-m", "appliance.daemon_cli", "status", "--json",
                              "--config", str(d.config), "--state-dir", str(d.state)],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        [pending] = json.loads(out.stdout)["delivery"]["undelivered"]
        assert (pending["destination"], pending["pending"], pending["state"]) == (
            destination(port), FILES, "pending")
        assert pending["attempts"] >= 2 and "cannot connect" in pending["last_error"]
        # the sender is a supervised process: killed in the middle of an attempt (its rows
        # held for an hour, as a sender holds them while it sends), it is replaced and what it
        # held is released at once
        held: set[int] = set()

        def hold(s: Store) -> bool:
            held.update(i.id for i in s.claim_outbox(time.time(), 3600.0, holder=SENDER,
                                                     due_only=False))
            return len(held) == FILES

        with Store.open(d.state / "appliance.db") as writer:
            wait_for(lambda: hold(writer), 30, "the rows held as the sender holds them", d)
        [pid] = re.findall(r"started sender \(pid (\d+)\)", d.log())
        os.kill(int(pid), signal.SIGKILL)
        wait_for(lambda: d.query(lambda s: any("sender was killed by SIGKILL" in (e.detail or "")
                                               for e in s.events(kind=EventKind.PROCESS_RESTARTED))),
                 30, "the sender to be replaced", d)
        wait_for(lambda: f"outbox: {FILES} file(s) held by a stopped sender released" in d.log(),
                 10, "the release to be logged", d)
        server = start_orthanc(tmp_path / "orthanc", dicom_port=port)
        wait_for(lambda: d.query(lambda s: s.outbox_counts()[OutboxState.SENT] == FILES), 60,
                 "delivery once PACS is up", d)
        with d.store() as s:
            items = s.outbox_items()
            assert {(i.state, i.deliveries) for i in items} == {(OutboxState.SENT, 1)}
            assert min(i.attempts for i in items) >= 3
        assert len(server.instances()) == FILES
        assert len(server.changes("NewInstance")) == FILES
        assert Counter(t["SOPClassUID"] for t in in_orthanc(server).values()) == EXPECTED_CLASSES
        assert d.stop(signal.SIGTERM) == 0
    finally:
        if server is not None:
            server.stop()
        d.close()
