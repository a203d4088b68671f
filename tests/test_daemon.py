"""appliance.daemon: the real daemon (`python -m appliance.daemon_cli serve`) in real processes
on a free loopback port, fed by dcmtk's storescu/echoscu and pynetdicom, analysing with the tiny
threshold ONNX models (tests/onnx_models.py), its systemd notifications read from a real
AF_UNIX socket; plus in-process tests of the worker, the stabiliser and retention."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from appliance.config import DaemonConfig, load_config
from appliance.daemon import (
    PROCESSES_LOCK_FILE,
    Faults,
    Paths,
    Stabiliser,
    Worker,
    apply_retention,
)
from appliance.dicom.receive import Spool, write_durably
from appliance.sdnotify import Notifier
from appliance.store import EventKind, InstanceRecord, JobKind, JobState, Store
from tests import dicom_factory as factory
from tests.onnx_models import write_models

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    return write_models(tmp_path_factory.mktemp("models"))


def chest_hu(n: int, ggo: int, seed: int = 0) -> np.ndarray:
    """A body filling the field, one aerated lung inside, a ground-glass cube of side ``ggo``
    voxels; the threshold models find lung below -450 HU and GGO in -750..-300 HU."""
    rows = cols = 48
    r = (np.arange(rows)[:, None] + 0.5) / rows - 0.5
    c = (np.arange(cols)[None, :] + 0.5) / cols - 0.5
    img = np.full((rows, cols), 40.0)
    img[(r / 0.35) ** 2 + (c / 0.42) ** 2 <= 1] = -850.0
    hu = np.repeat(img[None], n, axis=0)
    hu[[0, -1]] = 40.0
    if ggo:
        hu[6:6 + ggo, 20:20 + ggo, 14:14 + ggo] = -500.0
    return hu + np.random.default_rng(seed).integers(-10, 11, size=hu.shape)


def write_chest(folder: Path, patient: str, *, n: int = 24, ggo: int = 0, day: str = "20200201",
                study: str | None = None, seed: int = 0) -> factory.WrittenSeries:
    return factory.write_ct_series(
        folder, n_slices=n, shape=(48, 48), pixel_spacing=(6.0, 6.0), spacing=10.0,
        hu=chest_hu(n, ggo, seed), patient_id=patient, study_date=day,
        study_uid=study or pydicom.uid.generate_uid(prefix=None), seed=seed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def send(port: int, paths, aet: str = "SCANNER") -> list[int]:
    ae = AE(ae_title=aet)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(HOST, port, ae_title="APPLIANCE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(pydicom.dcmread(p)).Status) for p in paths]
    finally:
        assoc.release()


def echo(port: int) -> int:
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title="APPLIANCE")
    if not assoc.is_established:
        return -1
    status = int(assoc.send_c_echo().Status)
    assoc.release()
    return status


def wait_for(check: Callable[[], object], timeout: float, what: str, daemon=None) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon is not None:
            daemon.read_messages()  # as systemd would: an unread socket fills up
        value = check()
        if value:
            return value
        if daemon is not None and daemon.proc.poll() is not None:
            pytest.fail(f"the daemon exited ({daemon.proc.returncode}) while waiting for {what}:"
                        f"\n{daemon.log()}")
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout} s waiting for {what}"
                + (f"\n{daemon.log()}" if daemon else ""))


class Daemon:
    """`appliance serve` in its own process, with a notify socket and a config file."""

    def __init__(self, tmp: Path, models: Path, port: int, faults: str = "",
                 **daemon_cfg: object) -> None:
        self.tmp, self.port, self.state = tmp, port, tmp / "state"
        settings = {"stable_seconds": 1.0, "release_settle_s": 0.2, "heartbeat_s": 0.5,
                    "poll_s": 0.2, "shutdown_grace_s": 5.0, "retention_days": 0.0,
                    **daemon_cfg}
        lines = ['[general]', 'log_level = "INFO"',
                 '[analysis]', 'backend = "onnxruntime"', 'threads = 1', f'models_dir = "{models}"',
                 '[dicom]', f'port = {port}', f'bind_address = "{HOST}"', 'min_free_mb = 0',
                 '[daemon]', *(f"{k} = {v}" for k, v in settings.items())]
        self.config = tmp / "appliance.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.faults = faults
        self.proc: subprocess.Popen | None = None
        self.messages: list[str] = []
        self.sock_path = tmp / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.settimeout(0.2)
        self.runs = 0

    def start(self, faults: str | None = None) -> Daemon:
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env.update(NOTIFY_SOCKET=str(self.sock_path), OMP_NUM_THREADS="1",
                   PYTHONPATH=str(ROOT), APPLIANCE_FAULTS=self.faults if faults is None else faults)
        self.runs += 1
        self.read_messages()
        self.messages.clear()  # wait for this run's READY, not an earlier one's
        self.logfile = open(self.tmp / f"daemon.{self.runs}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.daemon_cli", "serve", "--config", str(self.config),
             "--state-dir", str(self.state)],
            cwd=ROOT, env=env, stdout=self.logfile, stderr=subprocess.STDOUT)
        self.wait_message("READY=1", 60)
        return self

    def log(self) -> str:
        return "".join(p.read_text() for p in sorted(self.tmp.glob("daemon.*.log")))[-6000:]

    def read_messages(self) -> None:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                return

    def wait_message(self, text: str, timeout: float) -> str:
        def seen() -> str | None:
            self.read_messages()
            return next((m for m in self.messages if text in m), None)

        return wait_for(seen, timeout, f"notify {text!r}", self)  # type: ignore[return-value]

    def store(self) -> Store:
        return Store.open(self.state / "appliance.db", readonly=True)

    def query(self, fn: Callable[[Store], object]) -> object:
        with self.store() as s:
            return fn(s)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.logfile.close()
        return code

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        if self.proc is not None:
            self.logfile.close()
        self.sock.close()


@pytest.fixture
def daemon_factory(tmp_path, models_dir):
    made: list[Daemon] = []

    def make(**kwargs) -> Daemon:
        d = Daemon(tmp_path, models_dir, free_port(), **kwargs)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


def jobs_of(store: Store, series_uid: str):
    return store.jobs(series_uid=series_uid, limit=50)


def settled(d: Daemon, series_uids: list[str], states=(JobState.DONE, JobState.FAILED)):
    """True when each series has jobs and none of them is queued or running."""
    def check(s: Store) -> bool:
        for uid in series_uids:
            jobs = jobs_of(s, uid)
            if not jobs or any(j.state not in states for j in jobs):
                return False
        return True

    return d.query(check)


def processes_gone(state: Path) -> bool:
    """No process of a daemon run holds the shared lock any more."""
    with open(state / PROCESSES_LOCK_FILE, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(fh, fcntl.LOCK_UN)
        return True


def nobody_listens(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


# ----------------------------------------------------------------------------- units


def test_faults_from_env():
    faults = Faults.from_env({"APPLIANCE_FAULTS": "worker_exit@P9, worker_hang"})
    assert faults.hits("worker_exit", "P9") and not faults.hits("worker_exit", "P1")
    assert faults.hits("worker_hang", "anyone")
    assert not Faults.from_env({}).hits("worker_exit", "P9")
    with pytest.raises(ValueError, match="`APPLIANCE_FAULTS` entries must be one of worker_exit"):
        Faults.from_env({"APPLIANCE_FAULTS": "worker_explode"})


def test_notifier_sends_datagrams_to_the_socket(tmp_path):
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(2)
        notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "4000000",
                             "WATCHDOG_PID": str(os.getpid())})
        assert notifier.enabled and notifier.watchdog_s == 4.0
        assert notifier.ready("listening")
        assert sock.recv(100) == b"READY=1\nSTATUS=listening"
        assert notifier.watchdog() and sock.recv(100) == b"WATCHDOG=1"
        assert notifier.stopping() and sock.recv(100) == b"STOPPING=1"
        # a manager that does not read: messages are dropped, the sender never blocks
        results = [notifier.status(f"queue {i}") for i in range(3000)]
        assert results[0] and not all(results)
    assert not Notifier({}).ready()
    assert Notifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_s is None
    assert not Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}).status("x")


def test_notifier_abstract_socket():
    name = f"appliance-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        assert Notifier({"NOTIFY_SOCKET": "@" + name}).status("queue 3")
        assert sock.recv(100) == b"STATUS=queue 3"


def spool_series(store: Store, paths: Paths, series: factory.WrittenSeries, at: float) -> None:
    """Put a written series into the spool and the store as the SCP would."""
    spool = Spool(paths.spool)
    for path, uid in zip(series.paths, series.sop_instance_uids, strict=True):
        rel = spool.relpath(series.spec.study_uid, series.series_uid, uid)
        data = Path(path).read_bytes()
        spool.write(rel, data)
        store.add_instance(InstanceRecord(
            sop_instance_uid=uid, sop_class_uid=str(series.spec.sop_class_uid),
            series_uid=series.series_uid, study_uid=series.spec.study_uid,
            patient_id=series.spec.patient_id, path=rel, size=len(data), received_at=at))


@pytest.fixture
def local(tmp_path, models_dir):
    """An in-process worker and stabiliser on a real store, spool and the threshold models."""
    config = load_config(env={"APPLIANCE_ANALYSIS__MODELS_DIR": str(models_dir),
                              "APPLIANCE_ANALYSIS__BACKEND": "onnxruntime",
                              "APPLIANCE_ANALYSIS__THREADS": "1"})
    paths = Paths(tmp_path / "state")
    paths.make()
    store = Store.open(paths.db)
    worker = Worker(config, paths, store, "local-w0")
    worker.open()
    yield config, paths, store, worker, Stabiliser(store, config.daemon, paths)
    worker.close()
    store.close()


def test_worker_in_process_result_refusal_and_unexpected_error(local, tmp_path, monkeypatch):
    config, paths, store, worker, stabiliser = local
    good = write_chest(tmp_path / "good", "P1", ggo=4)
    short = write_chest(tmp_path / "short", "P2", n=5)
    spool_series(store, paths, good, at=100.0)
    spool_series(store, paths, short, at=100.0)
    assert stabiliser.tick(now=100.5) == []  # not quiet yet
    assert len(stabiliser.tick(now=200.0)) == 2
    assert worker.run_once() and worker.run_once() and not worker.run_once()
    [done] = store.jobs(series_uid=good.series_uid)
    [failed] = store.jobs(series_uid=short.series_uid)
    assert done.state == JobState.DONE and failed.state == JobState.FAILED
    assert failed.reason.startswith("refused: ") and "slices" in failed.reason
    assert failed.stage == "load" and failed.attempts == 1
    result = json.loads((paths.result_dir(good.series_uid) / "result.json").read_text())
    [scan] = store.scans("P1")
    assert scan.result == result and result["scan"]["series_instance_uid"] == good.series_uid
    lobes = np.asarray(nib.load(result["masks"]["lobes"]).dataobj)
    assert lobes.shape == tuple(result["scan"]["shape"]) == (24, 48, 48)
    assert 0 < (lobes > 0).mean() < 1
    assert store.serial("P1")[0]["role"] == "baseline"

    # an unexpected error inside the analysis: the reason is recorded and the job retried
    def broken(*args, **kwargs):
        raise RuntimeError("inference exploded")

    monkeypatch.setattr(worker.analyzer, "analyze", broken)
    late = write_chest(tmp_path / "late", "P3", ggo=2)
    spool_series(store, paths, late, at=300.0)
    stabiliser.tick(now=400.0)
    assert worker.run_once()
    [job] = store.jobs(series_uid=late.series_uid)
    assert job.state == JobState.QUEUED and job.reason == "RuntimeError: inference exploded"
    assert job.attempts == 1


def test_retention_by_age_and_by_disk_usage(local, tmp_path):
    config, paths, store, worker, stabiliser = local
    day = 86400.0
    old = write_chest(tmp_path / "old", "P1", n=3)
    mid = write_chest(tmp_path / "mid", "P1", n=3)
    busy = write_chest(tmp_path / "busy", "P1", n=3)
    spool_series(store, paths, old, at=1 * day)
    spool_series(store, paths, mid, at=5 * day)
    spool_series(store, paths, busy, at=0.5 * day)
    store.queue_job(busy.series_uid, now=6 * day)  # queued: never purged
    paths.result_dir(old.series_uid).mkdir(parents=True)
    write_durably(paths.result_dir(old.series_uid) / "result.json", b"{}")
    spool = Spool(paths.spool)

    def on_disk(series) -> bool:
        return all(spool.path(f).is_file() for f in store.series_files(series.series_uid)) \
            and bool(store.series_files(series.series_uid))

    by_age = DaemonConfig(retention_days=3.0)
    assert apply_retention(store, paths, by_age, now=6 * day) == [old.series_uid]
    assert not any(spool.root.glob(f"*/{old.series_uid}/*"))
    assert not paths.result_dir(old.series_uid).exists()
    assert store.series_files(old.series_uid) == [] and on_disk(mid) and on_disk(busy)
    assert store.series_row(old.series_uid)["purged_at"] == 6 * day
    by_disk = DaemonConfig(retention_days=0.0, max_disk_gb=1e-9)  # any byte is too much
    assert apply_retention(store, paths, by_disk, now=6 * day) == [mid.series_uid]
    assert on_disk(busy)
    purged = store.events(kind=EventKind.SERIES_PURGED)
    assert [e.series_uid for e in purged] == [old.series_uid, mid.series_uid]
    # an instance arriving after its series was purged is stored and counted again
    again = factory.write_ct_slice(tmp_path / "again.dcm", mid, 0)
    rel = spool.relpath(mid.spec.study_uid, mid.series_uid, "1.2.3.999")
    spool.write(rel, again.read_bytes())
    assert store.add_instance(InstanceRecord("1.2.3.999", str(mid.spec.sop_class_uid),
                                             mid.series_uid, mid.spec.study_uid, "P1", rel,
                                             size=100, received_at=7 * day))
    assert store.series_row(mid.series_uid)["purged_at"] is None
    assert store.series_files(mid.series_uid) == [rel]


# ----------------------------------------------------------------------------- the daemon


@pytest.mark.slow
def test_daemon_end_to_end(daemon_factory, tmp_path):
    d = daemon_factory().start()
    port = d.port
    base = write_chest(tmp_path / "base", "P1", ggo=2, day="20200201", seed=1)
    follow = write_chest(tmp_path / "follow", "P1", n=25, ggo=8, day="20200206", seed=2)
    bad = write_chest(tmp_path / "bad", "P2", n=5, seed=3)
    if shutil.which("storescu"):  # dcmtk, as a scanner would send
        done = subprocess.run(["echoscu", "-aet", "SCANNER", "-aec", "APPLIANCE", HOST,
                               str(port)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        done = subprocess.run(["storescu", "-aet", "SCANNER", "-aec", "APPLIANCE", "+sd", HOST,
                               str(port), str(tmp_path / "base")],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
    else:
        assert echo(port) == 0
        assert send(port, base.paths) == [0] * 24
    assert send(port, follow.paths[:24]) == [0] * 24
    assert send(port, bad.paths) == [0] * 5
    uids = [base.series_uid, follow.series_uid, bad.series_uid]
    wait_for(lambda: settled(d, uids), 60, "three series analysed", d)

    with d.store() as s:
        [bad_job] = jobs_of(s, bad.series_uid)
        assert bad_job.state == JobState.FAILED and bad_job.reason.startswith("refused:")
        for series in (base, follow):
            [job] = jobs_of(s, series.series_uid)
            assert job.state == JobState.DONE and job.kind == JobKind.ANALYSIS
            assert job.attempts == 1
            result_file = d.state / "results" / series.series_uid / "result.json"
            assert json.loads(result_file.read_text()) == s.results_of(series.series_uid)[0].result
            for mask in ("lobes", "opacity"):
                assert (result_file.parent / f"{mask}.nii.gz").is_file()

    # a late instance: the series is analysed again, recorded as a re-analysis
    assert send(port, follow.paths[24:]) == [0]
    wait_for(lambda: d.query(lambda s: len(s.results_of(follow.series_uid)) == 2), 60,
             "the re-analysis", d)
    with d.store() as s:
        jobs = jobs_of(s, follow.series_uid)
        assert sorted(j.kind for j in jobs) == [JobKind.ANALYSIS, JobKind.REANALYSIS]
        first, latest = s.results_of(follow.series_uid)
        assert first.result["scan"]["shape"][0] == 24 and latest.result["scan"]["shape"][0] == 25
        assert len(s.events(kind=EventKind.LATE_INSTANCES, series_uid=follow.series_uid)) == 1
        plo = {scan.series_uid: scan.result["regions"]["whole"]["plo_pct"]
               for scan in s.scans("P1")}
        serial = s.serial("P1")
    assert [e["key"] for e in serial] == [base.series_uid, follow.series_uid]
    assert serial[1]["days_since_baseline"] == pytest.approx(5.0)
    delta = serial[1]["vs_previous"]["whole"]["delta_pts"]
    assert delta == pytest.approx(plo[follow.series_uid] - plo[base.series_uid])
    assert delta > 0  # the follow-up has the larger ground-glass cube

    # the read-only commands while the daemon runs
    cli = [sys.executable, "-m", "appliance.daemon_cli"]
    where = ["--config", str(d.config), "--state-dir", str(d.state)]
    out = subprocess.run([*cli, "history", "P1", "--json", *where], capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    history = json.loads(out.stdout)
    assert [scan["series_uid"] for scan in history["scans"]] == [base.series_uid,
                                                                 follow.series_uid]
    assert history["scans"][1]["plo_pct"]["whole"] == plo[follow.series_uid]
    assert history["serial"] == serial
    out = subprocess.run([*cli, "status", "--json", *where], capture_output=True, text=True,
                         timeout=60, cwd=ROOT)
    report = json.loads(out.stdout)
    assert report["queue"] == {"queued": 0, "running": 0, "done": 3, "failed": 1}
    assert report["failures"][0]["series_uid"] == bad.series_uid
    table = subprocess.run([*cli, "history", "P1", *where], capture_output=True, text=True,
                           timeout=60, cwd=ROOT).stdout
    rows = [line for line in table.splitlines() if line[:2] in ("0 ", "1 ")]
    assert rows[0].rstrip().endswith("baseline") or "baseline  QA:" in rows[0]
    assert f"  {serial[1]['trend']}" in rows[1] and f"{delta:+.1f}" in rows[1]
    text = subprocess.run([*cli, "status", *where], capture_output=True, text=True,
                          timeout=60, cwd=ROOT).stdout
    assert "Jobs: 0 queued, 0 running, 3 done, 1 failed" in text
    assert "Failures:" in text and bad_job.reason in text
    missing = subprocess.run([*cli, "history", "NOBODY", *where], capture_output=True,
                             text=True, timeout=60, cwd=ROOT)
    assert missing.returncode == 2 and "no patient 'NOBODY'" in missing.stderr

    # systemd: READY, WATCHDOG and STATUS with the queue; SIGTERM stops cleanly
    d.wait_message("WATCHDOG=1", 10)
    d.wait_message("STATUS=listening on", 10)
    d.wait_message("0 queued, 0 running; 3 done, 1 failed", 10)
    # one daemon per state directory
    second = subprocess.run([*cli, "serve", *where], capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert second.returncode == 2 and "another appliance daemon is running" in second.stdout
    assert d.stop(signal.SIGTERM) == 0
    d.read_messages()
    assert any("STOPPING=1" in m for m in d.messages)
    assert processes_gone(d.state) and nobody_listens(port)
    with d.store() as s:
        assert s.events(limit=1)[0].kind == EventKind.DAEMON_STOPPED


@pytest.mark.slow
def test_sigterm_requeues_then_kill_9_then_restart_finishes_once(daemon_factory, tmp_path):
    d = daemon_factory(shutdown_grace_s=1.0)
    d.start(faults="worker_hang@P1")
    series = write_chest(tmp_path / "s", "P1", ggo=4)
    assert send(d.port, series.paths) == [0] * 24

    def running(s: Store):
        return [j for j in jobs_of(s, series.series_uid) if j.state == JobState.RUNNING]

    wait_for(lambda: d.query(running), 60, "the job to run", d)
    # SIGTERM while the job cannot finish: it is requeued, the attempt given back
    assert d.stop(signal.SIGTERM) == 0
    with d.store() as s:
        [job] = jobs_of(s, series.series_uid)
        assert (job.state, job.attempts) == (JobState.QUEUED, 0)
        assert s.events(kind=EventKind.JOB_REQUEUED)

    d.start(faults="worker_hang@P1")
    wait_for(lambda: d.query(running), 60, "the job to run again", d)
    d.proc.kill()  # kill -9 of the supervisor mid-job
    d.proc.wait(30)
    wait_for(lambda: processes_gone(d.state), 15, "the children to die with the supervisor")
    assert nobody_listens(d.port)
    with d.store() as s:
        assert s.instance_count(series.series_uid) == 24  # every acknowledged instance
        [job] = jobs_of(s, series.series_uid)
        assert job.state == JobState.RUNNING  # as the kill left it

    partial = d.state / "spool" / series.spec.study_uid / series.series_uid / ".x.dcm.1.2.tmp"
    partial.write_bytes(b"half an instance")  # as a write cut by the kill would leave it
    d.start(faults="")
    assert not partial.exists()
    wait_for(lambda: settled(d, [series.series_uid]), 60, "the job to finish", d)
    with d.store() as s:
        [job] = jobs_of(s, series.series_uid)
        assert job.state == JobState.DONE and job.attempts == 2
        assert len(s.results_of(series.series_uid)) == 1  # analysed once
        retries = s.events(kind=EventKind.JOB_RETRY)
        assert len(retries) == 1 and "interrupted" in retries[0].detail
    assert d.stop() == 0


@pytest.mark.slow
def _alive(pid: int) -> bool:
    """A running (not zombie) process: which worker is still alive depends on who took the retries."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def test_crashing_and_hanging_workers_are_replaced_retried_then_failed(daemon_factory, tmp_path):
    d = daemon_factory(workers=2, max_attempts=2, job_timeout_s=2.5)
    d.start(faults="worker_exit@PX,worker_hang@PY")
    crash = write_chest(tmp_path / "x", "PX", seed=1)
    hang = write_chest(tmp_path / "y", "PY", seed=2)
    fine = write_chest(tmp_path / "z", "PZ", seed=3)
    for series in (crash, hang, fine):
        assert send(d.port, series.paths) == [0] * 24
    uids = [crash.series_uid, hang.series_uid, fine.series_uid]
    wait_for(lambda: settled(d, uids), 90, "all three series settled", d)
    with d.store() as s:
        [crashed] = jobs_of(s, crash.series_uid)
        assert crashed.state == JobState.FAILED and crashed.attempts == 2
        assert "exited with code 70" in crashed.reason and "(attempt 2 of 2)" in crashed.reason
        assert crashed.stage == "load"
        [hung] = jobs_of(s, hang.series_uid)
        assert hung.state == JobState.FAILED and "ran over 2.5 s" in hung.reason
        [ok] = jobs_of(s, fine.series_uid)
        assert ok.state == JobState.DONE
        assert len(s.events(kind=EventKind.WORKER_DIED)) == 2
        assert len(s.events(kind=EventKind.WORKER_HUNG)) == 2
        started = s.events(kind=EventKind.WORKER_STARTED, limit=100)
    assert echo(d.port) == 0  # receiving never stopped

    # a frozen worker (no heartbeat) is replaced too
    pid = next(p for p in (int(e.detail.rsplit(" ", 1)[1]) for e in started) if _alive(p))
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: d.query(lambda s: any("no heartbeat" in (e.detail or "") for e in
                                           s.events(kind=EventKind.WORKER_HUNG))),
             30, "the frozen worker to be replaced", d)
    assert d.stop() == 0


def test_a_killed_scp_is_replaced_and_receives_again(daemon_factory, tmp_path):
    import re

    d = daemon_factory().start()
    before = write_chest(tmp_path / "a", "PA", seed=1)
    assert send(d.port, before.paths) == [0] * 24
    [pid] = [int(p) for p in re.findall(r"started scp \(pid (\d+)\)", d.log())]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: len(re.findall(r"started scp \(pid (\d+)\)", d.log())) == 2, 30,
             "a new SCP", d)
    wait_for(lambda: echo(d.port) == 0, 30, "the new SCP to answer C-ECHO", d)
    after = write_chest(tmp_path / "b", "PB", seed=2)
    assert send(d.port, after.paths) == [0] * 24
    wait_for(lambda: settled(d, [before.series_uid, after.series_uid]), 60, "both series analysed", d)
    with d.store() as s:
        assert any("scp" in (e.detail or "") for e in s.events(kind=EventKind.PROCESS_RESTARTED))
        assert all(j.state == JobState.DONE for uid in (before.series_uid, after.series_uid)
                   for j in jobs_of(s, uid))
    assert d.stop() == 0
