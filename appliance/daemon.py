"""`appliance serve`: the supervisor of the receiving appliance.

Processes (multiprocessing, spawn), each restarted by the supervisor when it dies or hangs:

- **scp**: the C-STORE SCP (:mod:`appliance.dicom.receive`) writing the spool and the store.
  Nothing else runs in it, so analysis can never interrupt receiving.
- **stabiliser**: turns quiet series into jobs (:class:`Stabiliser`) and applies retention.
- **workers** (``daemon.workers``): each opens and warms the models once, then claims jobs in
  transactions and runs :class:`appliance.analysis.Analyzer` on them (:class:`Worker`). Once
  a job's result is stored, its DICOM SEG, SR and key images are written under
  ``results/<series>/dicom/`` and put in the outbox for every ``send.destinations`` entry
  (not written when there is none).
- **sender**: delivers the outbox (:func:`appliance.delivery.deliver`), retrying with backoff.
  A destination that is down delays only its own files: receiving and analysis never wait
  for it.

The supervisor starts the SCP first and tells systemd READY=1 once it listens; it sends
WATCHDOG=1 from its loop while the children's heartbeats are fresh, and STATUS= with the queue.
A worker that dies (crash, OOM kill) or hangs (no heartbeat for three periods, or a job over
``job_timeout_s``) is killed and replaced, and its job is retried until ``max_attempts`` attempts,
then failed with the reason. Refused input (a bad series) fails at once with its reason.

Crash safety: jobs are claimed in transactions and at most one job per series runs (a unique
index); children die with the supervisor (PR_SET_PDEATHSIG) and hold a shared lock that a new
supervisor waits for, so after ``kill -9`` at any moment a restart finds no process of the old
run alive and requeues every job left 'running' (counted as an attempt, so a scan that kills
the daemon cannot loop). Acknowledged instances are on disk and in the store before success.

SIGTERM (cooperative): workers finish their job within ``shutdown_grace_s`` or the job is
requeued without counting the attempt; the sender finishes its association within the same
grace (or is killed: its rows are taken again when their lease ends); then the stabiliser
stops; then the SCP stops.

Fault injection for tests (never set in production): ``APPLIANCE_FAULTS`` lists faults, each
optionally for one patient: ``worker_exit`` (the worker exits mid-job), ``worker_hang`` (it
stops making progress), e.g. ``APPLIANCE_FAULTS=worker_exit@P9,worker_hang@P8``.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

from appliance.config import Config, DaemonConfig
from appliance.dicom.receive import Spool, safe_name, write_durably
from appliance.sdnotify import Notifier
from appliance.store import (
    Claim,
    EventKind,
    Job,
    JobLost,
    JobStage,
    JobState,
    OutboxState,
    Store,
    StoreError,
)

log = logging.getLogger(__name__)

FAULTS_ENV = "APPLIANCE_FAULTS"
EXIT_FAULT = 70
"""Exit code of a worker that the ``worker_exit`` fault stopped."""
EXIT_SCP_BIND = 3
"""Exit code of an SCP that could not listen (port in use, no permission)."""
HANG_PERIODS = 3
"""A child whose heartbeat is older than this many heartbeat periods is taken as frozen."""
MAX_RESTART_DELAY_S = 30.0
HEALTHY_RUN_S = 60.0
"""A child that ran this long before dying restarts without delay."""
SENDER = "daemon"
"""Holder of the outbox rows the daemon's sender takes (one sender per state directory)."""
LOCK_FILE = "daemon.lock"
PROCESSES_LOCK_FILE = "processes.lock"


# ----------------------------------------------------------------------------- paths, faults


@dataclass(frozen=True)
class Paths:
    """Where things live under the state directory (DESIGN.md, "Store and state")."""

    state: Path

    @property
    def db(self) -> Path:
        return self.state / "appliance.db"

    @property
    def spool(self) -> Path:
        return self.state / "spool"

    @property
    def results(self) -> Path:
        return self.state / "results"

    def result_dir(self, series_uid: str) -> Path:
        return self.results / safe_name(series_uid)

    def outputs_dir(self, series_uid: str) -> Path:
        """The DICOM outputs of the series' results (names carry their SOP Instance UIDs)."""
        return self.result_dir(series_uid) / "dicom"

    def make(self) -> None:
        for folder in (self.state, self.spool, self.results):
            folder.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class Faults:
    """Faults injected by tests through ``APPLIANCE_FAULTS`` (see the module docstring)."""

    entries: tuple[tuple[str, str | None], ...] = ()

    KNOWN = ("worker_exit", "worker_hang")

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Faults:
        text = (os.environ if env is None else env).get(FAULTS_ENV, "")
        entries = []
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, patient = item.partition("@")
            if name not in cls.KNOWN:
                raise ValueError(f"`{FAULTS_ENV}` entries must be one of {', '.join(cls.KNOWN)} "
                                 f"(optionally @PATIENT_ID), got {item!r}")
            entries.append((name, patient or None))
        return cls(tuple(entries))

    def hits(self, name: str, patient_id: str | None) -> bool:
        return any(n == name and (p is None or p == patient_id) for n, p in self.entries)


# ----------------------------------------------------------------------------- stabiliser


class Stabiliser:
    """Queues a job for every series that has gone quiet (and runs retention now and then)."""

    def __init__(self, store: Store, cfg: DaemonConfig, paths: Paths) -> None:
        self.store = store
        self.cfg = cfg
        self.paths = paths
        self.next_retention = 0.0

    def tick(self, now: float) -> list[int]:
        """One pass; returns the ids of the jobs queued."""
        queued = []
        for ready in self.store.ready_series(now, self.cfg.stable_seconds,
                                             self.cfg.release_settle_s):
            job_id = self.store.queue_job(ready.series_uid, now)
            if job_id is not None:
                log.info("series %s stable with %d instances: job %d queued%s", ready.series_uid,
                         ready.instance_count, job_id, " (re-analysis)" if ready.has_jobs else "")
                queued.append(job_id)
        if now >= self.next_retention:
            apply_retention(self.store, self.paths, self.cfg, now)
            self.next_retention = now + self.cfg.retention_check_s
        return queued


def apply_retention(store: Store, paths: Paths, cfg: DaemonConfig, now: float) -> list[str]:
    """Delete the spool and result files of series older than ``retention_days``, then of the
    oldest series while spool plus results exceed ``max_disk_gb``; never of a series with a
    queued or running job. The database keeps every result. Returns the series purged."""
    candidates = store.purge_candidates()
    purged: list[str] = []
    if cfg.retention_days > 0:
        cutoff = now - cfg.retention_days * 86400
        for c in candidates:
            if c.last_activity < cutoff and _purge(store, paths, c.series_uid,
                                                   f"older than {cfg.retention_days:g} days", now):
                purged.append(c.series_uid)
    if cfg.max_disk_gb > 0:
        limit = int(cfg.max_disk_gb * 1024**3)
        used = store.stored_bytes()
        for c in candidates:
            if used <= limit:
                break
            if c.series_uid in purged:
                continue
            why = f"spool and results use {used / 1024**3:.3f} GB, over {cfg.max_disk_gb:g} GB"
            if _purge(store, paths, c.series_uid, why, now):
                purged.append(c.series_uid)
                used -= c.bytes
    return purged


def _purge(store: Store, paths: Paths, series_uid: str, why: str, now: float) -> bool:
    spool = Spool(paths.spool)
    files = store.series_files(series_uid)
    if not store.mark_purged(series_uid, files, why, now):
        return False
    folders = set()
    for rel in files:
        path = spool.path(rel)
        path.unlink(missing_ok=True)
        folders.add(path.parent)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        for f in (folder, folder.parent):  # the series folder, then its study folder if empty
            if f != spool.root and f.is_dir() and not any(f.iterdir()):
                f.rmdir()
    shutil.rmtree(paths.result_dir(series_uid), ignore_errors=True)
    log.info("retention: series %s purged (%s)", series_uid, why)
    return True


# ----------------------------------------------------------------------------- worker


def update_serial(store: Store, patient_id: str, config: Config, now: float) -> list[dict]:
    """Recompute and store the patient's serial comparison from their current results."""
    from appliance.pipeline.serial import compare

    points, onset = store.serial_points(patient_id)
    comparison = compare(points, config.serial, config.analysis.involvement_min_pct, onset)
    store.save_serial(patient_id, comparison, now)
    return comparison


class Worker:
    """Claims jobs and analyses them with models opened once (``open`` loads and warms up)."""

    def __init__(self, config: Config, paths: Paths, store: Store, name: str,
                 faults: Faults = Faults(), heartbeat: Callable[[], None] | None = None) -> None:
        self.config = config
        self.paths = paths
        self.store = store
        self.name = name
        self.faults = faults
        self.spool = Spool(paths.spool)
        self.analyzer: Any = None
        self._beat = heartbeat or (lambda: None)
        self.job_id: int | None = None
        self.stage: JobStage | None = None

    @property
    def lease_s(self) -> float:
        return HANG_PERIODS * self.config.daemon.heartbeat_s

    def open(self) -> None:
        import numpy as np

        from appliance.analysis import Analyzer

        self.analyzer = Analyzer(self.config)
        for key, runner in self.analyzer.runners.items():  # warm-up: first call pays the setup
            tile = self.analyzer.specs[key].tile_shape
            runner.infer(np.zeros((self.config.analysis.batch_size, 1, *tile), np.float32))
        log.info("worker %s ready (%s)", self.name, self.analyzer.backend_name)

    def close(self) -> None:
        if self.analyzer is not None:
            self.analyzer.close()
            self.analyzer = None

    def run_once(self) -> bool:
        """Claim and run one job; False when the queue had none for us."""
        claim = self.store.claim_job(self.name, time.time(), self.lease_s)
        if claim is None:
            return False
        self.run(claim)
        return True

    def _progress(self, stage: str, done: int, total: int) -> None:
        self._beat()
        known = JobStage.of(stage)
        if known is not None and known != self.stage:
            self._set_stage(known)

    def _set_stage(self, stage: JobStage) -> None:
        self.stage = stage
        if self.job_id is not None:
            self.store.heartbeat(self.job_id, self.name, time.time(), self.lease_s, stage)

    def run(self, claim: Claim) -> None:
        from appliance.dicom.series import SeriesRefused

        job, cfg = claim.job, self.config.daemon
        self.job_id, self.stage = job.id, None
        log.info("job %d: %s of series %s (%d files, attempt %d)", job.id, job.kind.value,
                 job.series_uid, len(claim.files), job.attempts)
        try:
            self._set_stage(JobStage.LOAD)
            self._inject_faults(job.patient_id)
            files = [self.spool.path(f) for f in claim.files]
            try:
                analysis = self.analyzer.analyze(files, progress=self._progress)
            except SeriesRefused as exc:
                log.warning("job %d refused: %s", job.id, exc)
                self.store.fail_job(job.id, self.name, f"refused: {exc}", time.time())
                return
            except Exception as exc:  # noqa: BLE001 - recorded as the job's reason and retried
                log.exception("job %d failed at stage %s", job.id, self.stage)
                self.store.retry_or_fail(job.id, f"{type(exc).__name__}: {exc}",
                                         cfg.max_attempts, time.time(), worker=self.name)
                return
            self._set_stage(JobStage.WRITE)
            try:
                written = write_result(analysis, self.paths, job.series_uid)
            except OSError as exc:
                self.store.retry_or_fail(job.id, f"writing the result failed: {exc}",
                                         cfg.max_attempts, time.time(), worker=self.name)
                return
            now = time.time()
            with self.store.transaction():
                result_id = self.store.complete_job(job.id, self.name, analysis.result, now=now,
                                                    **written)
                update_serial(self.store, job.patient_id, self.config, now)
            whole = analysis.result["regions"]["whole"]["plo_pct"]
            log.info("job %d done: result %d, whole-lung PLO %s%%", job.id, result_id, whole)
            self.write_outputs(analysis, job, result_id)
        except JobLost as exc:
            log.warning("job %d: %s; its outcome is discarded", job.id, exc)
        finally:
            self.job_id = None

    def write_outputs(self, analysis: Any, job: Job, result_id: int) -> list[Path]:
        """The stored result's DICOM SEG, SR and key images, put in the outbox for every
        ``send.destinations`` entry; nothing when there is none (they exist to be sent, and
        cost seconds and megabytes per scan; `appliance analyze --dicom-out` writes them on
        demand). This runs after the result is stored, so the dashboard shows it at once: the
        outputs take seconds (the SR alone about one) where the models take a fraction of that
        on a GPU. A failure costs the outputs, never the result: it is recorded as an
        OUTPUTS_FAILED event."""
        from appliance.dicom.outputs import write_dicom_outputs

        destinations = self.config.send.destinations
        if not destinations:
            return []
        try:
            outputs = write_dicom_outputs(analysis, self.paths.outputs_dir(job.series_uid))
        except Exception as exc:  # noqa: BLE001 - recorded as an event; the result is kept
            log.exception("result %d: the DICOM outputs could not be written", result_id)
            self.store.add_event(EventKind.OUTPUTS_FAILED, series_uid=job.series_uid,
                                 job_id=job.id, patient_id=job.patient_id,
                                 detail=f"result {result_id}: writing the DICOM outputs failed: "
                                        f"{type(exc).__name__}: {exc}")
            return []
        with self.store.transaction():
            self.store.add_output_bytes(result_id, sum(p.stat().st_size for p in outputs))
            self.store.enqueue_outputs(result_id, destinations,
                                       [str(p.relative_to(self.paths.state)) for p in outputs],
                                       time.time())
        log.info("result %d: %d DICOM output(s) written, queued for %s", result_id, len(outputs),
                 ", ".join(destinations))
        return outputs

    def _inject_faults(self, patient_id: str) -> None:
        if self.faults.hits("worker_exit", patient_id):
            log.error("fault injected: worker_exit")
            logging.shutdown()
            os._exit(EXIT_FAULT)
        if self.faults.hits("worker_hang", patient_id):
            log.error("fault injected: worker_hang")
            while True:
                time.sleep(3600)


def write_result(analysis: Any, paths: Paths, series_uid: str) -> dict[str, Any]:
    """result.json and the masks (NIfTI) under results/<series>/, each replaced atomically;
    returns the store's path fields (relative to the state directory) and the bytes written."""
    import json

    from appliance.nifti import save_mask

    folder = paths.result_dir(series_uid)
    folder.mkdir(parents=True, exist_ok=True)
    masks = {}
    for key, mask in (("lobes", analysis.lobes), ("opacity", analysis.opacity)):
        final = folder / f"{key}.nii.gz"
        tmp = folder / f".{key}.{os.getpid()}.tmp.nii.gz"
        save_mask(tmp, mask, analysis.volume)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        masks[key] = final
    analysis.result["masks"] = {k: str(p) for k, p in masks.items()}
    result_path = folder / "result.json"
    write_durably(result_path, json.dumps(analysis.result, indent=2).encode())
    nbytes = sum(p.stat().st_size for p in (result_path, *masks.values()))
    rel = lambda p: str(p.relative_to(paths.state))  # noqa: E731
    return {"result_path": rel(result_path), "lobes_path": rel(masks["lobes"]),
            "opacity_path": rel(masks["opacity"]), "nbytes": nbytes}


# ----------------------------------------------------------------------------- child processes


def _child_setup(role: str, parent_pid: int, log_level: str, state: Path) -> Any:
    """Common start of every child: die with the supervisor, leave signals to it, log to
    stdout, and hold the shared process lock (a new supervisor waits for it)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the orphan check in the loops does the same, later
    if os.getppid() != parent_pid:
        os._exit(1)  # the supervisor died before we could ask to die with it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _setup_logging(log_level, role)
    lock = open(state / PROCESSES_LOCK_FILE, "a")  # noqa: SIM115 - held until the process ends
    fcntl.flock(lock, fcntl.LOCK_SH)
    return lock


def _setup_logging(level: str, role: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stdout,
                        format=f"%(levelname)s {role} %(name)s: %(message)s", force=True)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # a line per copied module


def _orphaned(parent_pid: int) -> bool:
    return os.getppid() != parent_pid


def announce_ready(ready: MpEvent, heartbeat: Any) -> None:
    """Beat, then report ready: the supervisor measures silence from the last beat once a child
    is ready, and starting (imports, models, the database) can outlast the hang limit on a busy
    machine; without this beat a slow start reads as a hang and the child is replaced."""
    heartbeat.value = time.time()
    ready.set()


def scp_main(config: Config, state: str, parent_pid: int, stop: MpEvent, ready: MpEvent,
             heartbeat: Any, port: Any) -> None:
    from appliance.dicom.receive import StorageSCP

    paths = Paths(Path(state))
    _lock = _child_setup("scp", parent_pid, config.general.log_level, paths.state)
    with Store.open(paths.db) as store:
        scp = StorageSCP(config.dicom, Spool(paths.spool), store)
        try:
            port.value = scp.start()
        except OSError as exc:
            log.error("the SCP cannot listen on %s:%d: %s", config.dicom.bind_address or "*",
                      config.dicom.port, exc)
            sys.exit(EXIT_SCP_BIND)
        announce_ready(ready, heartbeat)
        try:
            while not stop.wait(0.25) and not _orphaned(parent_pid):
                heartbeat.value = time.time()
        finally:
            scp.stop()


def stabiliser_main(config: Config, state: str, parent_pid: int, stop: MpEvent, ready: MpEvent,
                    heartbeat: Any) -> None:
    paths = Paths(Path(state))
    _lock = _child_setup("stabiliser", parent_pid, config.general.log_level, paths.state)
    with Store.open(paths.db) as store:
        stabiliser = Stabiliser(store, config.daemon, paths)
        announce_ready(ready, heartbeat)
        while not _orphaned(parent_pid):
            heartbeat.value = time.time()
            stabiliser.tick(time.time())
            if stop.wait(config.daemon.poll_s):
                break


def sender_main(config: Config, state: str, parent_pid: int, stop: MpEvent, ready: MpEvent,
                heartbeat: Any) -> None:
    """Deliver the outbox in a loop. While an association is under way (it may wait up to
    ``send.timeout_s`` per step for a peer that does not answer) a pulse thread keeps the
    heartbeat for as long as the rows' lease; past it the supervisor sees a hung sender."""
    from appliance.delivery import Settings, deliver

    paths = Paths(Path(state))
    _lock = _child_setup("sender", parent_pid, config.general.log_level, paths.state)
    # each failed attempt is logged once by appliance.delivery, with the reason
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    settings = Settings.from_config(config)
    busy_until = [0.0]
    done = threading.Event()

    def pulse() -> None:
        while not done.wait(config.daemon.heartbeat_s):
            if time.time() < busy_until[0]:
                heartbeat.value = time.time()

    def before_send(lease_s: float) -> None:
        heartbeat.value = time.time()
        busy_until[0] = time.time() + lease_s

    with Store.open(paths.db) as store:
        announce_ready(ready, heartbeat)
        thread = threading.Thread(target=pulse, name="heartbeat", daemon=True)
        thread.start()
        try:
            while not _orphaned(parent_pid):
                heartbeat.value = time.time()
                try:
                    deliver(store, paths.state, settings, holder=SENDER,
                            before_send=before_send, stop=stop.is_set)
                except sqlite3.OperationalError as exc:  # database busy beyond the timeout
                    log.warning("outbox: %s; trying again", exc)
                busy_until[0] = 0.0
                if stop.wait(config.daemon.poll_s):
                    break
        finally:
            done.set()
            thread.join()


def worker_main(config: Config, state: str, parent_pid: int, stop: MpEvent, ready: MpEvent,
                heartbeat: Any, name: str) -> None:
    paths = Paths(Path(state))
    _lock = _child_setup(f"worker {name}", parent_pid, config.general.log_level, paths.state)
    cfg = config.daemon

    def beat() -> None:
        heartbeat.value = time.time()

    with Store.open(paths.db) as store:
        worker = Worker(config, paths, store, name, Faults.from_env(), beat)
        beat()
        worker.open()
        store.add_event(EventKind.WORKER_STARTED, detail=f"{name} pid {os.getpid()}")
        announce_ready(ready, heartbeat)
        done = threading.Event()

        def pulse() -> None:
            # proves the process is alive (not frozen) and keeps the job's lease visible
            while not done.wait(cfg.heartbeat_s):
                beat()
                job_id = worker.job_id
                if job_id is None:
                    continue
                try:
                    store.heartbeat(job_id, name, time.time(), worker.lease_s)
                except sqlite3.Error as exc:  # the lease is for display; liveness is beat()
                    log.warning("could not record the heartbeat of job %d: %s", job_id, exc)

        thread = threading.Thread(target=pulse, name="heartbeat", daemon=True)
        thread.start()
        try:
            while not stop.is_set() and not _orphaned(parent_pid):
                beat()
                if not worker.run_once():
                    stop.wait(cfg.poll_s)
        finally:
            done.set()
            thread.join()
            worker.close()


# ----------------------------------------------------------------------------- supervisor


@dataclass
class Child:
    """One supervised process and what the supervisor knows of it."""

    role: str
    name: str
    target: Callable[..., None]
    index: int = 0
    generation: int = 0
    process: SpawnProcess | None = None
    stop: MpEvent | None = None
    ready: MpEvent | None = None
    heartbeat: Any = None
    started_at: float = 0.0
    failures: int = 0
    restart_at: float = 0.0
    extra: tuple = field(default_factory=tuple)


class Supervisor:
    def __init__(self, config: Config, state_dir: Path, notifier: Notifier | None = None) -> None:
        self.config = config
        self.paths = Paths(Path(state_dir).resolve())
        self.notifier = notifier or Notifier()
        self.ctx = mp.get_context("spawn")
        self.run_id = uuid.uuid4().hex[:8]
        self.stopping = False
        self.store: Store | None = None
        self.port = self.ctx.Value("i", 0, lock=False)
        self.scp = Child("scp", "scp", scp_main)
        self.stabiliser = Child("stabiliser", "stabiliser", stabiliser_main)
        self.sender = Child("sender", "sender", sender_main)
        self.workers = [Child("worker", "", worker_main, index=i)
                        for i in range(config.daemon.workers)]
        self._last_status = ""
        self._last_watchdog = 0.0

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        self.paths.make()
        lock = open(self.paths.state / LOCK_FILE, "a+")  # noqa: SIM115 - held while we run
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.error("another appliance daemon is running on %s", self.paths.state)
            lock.close()
            return 2
        try:
            return self._run()
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()

    def _run(self) -> int:
        cfg = self.config.daemon
        self._wait_for_old_processes()
        self._remove_partial_files()
        self.store = store = Store.open(self.paths.db)
        now = time.time()
        for done in store.recover_running("interrupted: the daemon stopped while it ran",
                                          cfg.max_attempts, now):
            log.warning("job %d of series %s was interrupted by a restart: %s", done.job_id,
                        done.series_uid, done.state.value)
        store.add_event(EventKind.DAEMON_STARTED, detail=f"run {self.run_id} pid {os.getpid()}")
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._start(self.scp, self.port)
            if not self._wait_ready(self.scp):
                log.error("the DICOM SCP did not start; see the messages above")
                self._stop_children()
                return 1
            port = self.port.value
            log.info("appliance daemon running: state %s, AE %s on port %d, %d worker(s)",
                     self.paths.state, self.config.dicom.ae_title, port, cfg.workers)
            self.notifier.ready(self._status_text())
            self._start(self.stabiliser)
            self._start(self.sender)
            for worker in self.workers:
                self._start(worker)
            while not self.stopping:
                self._tick()
                time.sleep(min(0.25, cfg.heartbeat_s / 2))
            self.notifier.stopping("stopping: finishing the running job")
            log.info("stopping: workers finish or requeue their job, then the SCP stops")
            self._stop_children()
            store.add_event(EventKind.DAEMON_STOPPED, detail=f"run {self.run_id}")
            log.info("appliance daemon stopped")
            return 0
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._kill_all()
            store.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _wait_for_old_processes(self) -> None:
        """Block until no child of an earlier run holds the process lock (they die with their
        supervisor; this covers the moment between its death and theirs)."""
        deadline = time.monotonic() + self.config.daemon.start_timeout_s
        with open(self.paths.state / PROCESSES_LOCK_FILE, "a") as fh:
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(fh, fcntl.LOCK_UN)
                    return
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreError(f"processes of an earlier run still hold "
                                         f"{self.paths.state / PROCESSES_LOCK_FILE}") from None
                    time.sleep(0.1)

    def _remove_partial_files(self) -> None:
        """Temporary files of writes a crash interrupted (never acknowledged, never recorded)."""
        for folder in (self.paths.spool, self.paths.results):
            for tmp in folder.rglob(".*.tmp*"):
                log.info("removing %s, left by an interrupted write", tmp)
                tmp.unlink(missing_ok=True)

    # ------------------------------------------------------------------ children

    def _start(self, child: Child, *extra: Any) -> None:
        child.generation += 1
        if child.role == "sender" and self.store is not None:
            # no sender of ours is alive: what an earlier one held is free to send now
            released = self.store.release_leases(SENDER)
            if released:
                log.info("outbox: %d file(s) held by a stopped sender released", released)
        if child.role == "worker":
            child.name = f"{self.run_id}-w{child.index}.{child.generation}"
            extra = (child.name,)
        elif extra:
            child.extra = extra
        else:
            extra = child.extra
        child.stop, child.ready = self.ctx.Event(), self.ctx.Event()
        child.heartbeat = self.ctx.Value("d", time.time(), lock=False)
        child.process = self.ctx.Process(
            target=child.target, name=child.name,
            args=(self.config, str(self.paths.state), os.getpid(), child.stop, child.ready,
                  child.heartbeat, *extra),
        )
        child.process.start()
        child.started_at = time.time()
        log.info("started %s (pid %d)", child.name, child.process.pid)

    def _wait_ready(self, child: Child) -> bool:
        assert child.ready is not None and child.process is not None
        deadline = time.monotonic() + self.config.daemon.start_timeout_s
        while time.monotonic() < deadline:
            if child.ready.wait(0.1):
                return True
            if not child.process.is_alive():
                return False
        return False

    def _tick(self) -> None:
        now = time.time()
        healthy = True
        for child in (self.scp, self.stabiliser, self.sender, *self.workers):
            if child.process is None:
                if now >= child.restart_at:
                    self._start(child)
                continue
            problem = self._problem(child, now)
            if problem is not None:
                healthy = False
                self._replace(child, problem, now)
        self._notify(now, healthy)

    def _problem(self, child: Child, now: float) -> tuple[EventKind, str] | None:
        """Why the child must be replaced, or None while it is fine."""
        assert child.process is not None and child.ready is not None
        cfg = self.config.daemon
        if not child.process.is_alive():
            return EventKind.WORKER_DIED, _exit_reason(child.name, child.process.exitcode)
        if not child.ready.is_set():
            if now - child.started_at > cfg.start_timeout_s:
                return EventKind.WORKER_HUNG, (f"{child.name} did not start within "
                                               f"{cfg.start_timeout_s:g} s")
            return None
        silent = now - child.heartbeat.value
        if silent > HANG_PERIODS * cfg.heartbeat_s:
            return EventKind.WORKER_HUNG, f"{child.name} sent no heartbeat for {silent:.0f} s"
        if child.role == "worker":
            assert self.store is not None
            for job in self.store.running_jobs(worker=child.name):
                if job.started_at is not None and now - job.started_at > cfg.job_timeout_s:
                    return EventKind.WORKER_HUNG, (
                        f"{child.name} hung: job {job.id} ran over {cfg.job_timeout_s:g} s "
                        f"(stage {job.stage})")
        return None

    def _replace(self, child: Child, problem: tuple[EventKind, str], now: float) -> None:
        kind, reason = problem
        assert child.process is not None and self.store is not None
        log.error("%s; replacing it", reason)
        if child.process.is_alive():
            child.process.kill()
        child.process.join(10)
        # a child that had started (a job killed it, or it hung) restarts at once: its job's
        # attempts bound that; one that dies while starting backs off (missing models...)
        started = child.ready is not None and child.ready.is_set()
        lived = now - child.started_at
        child.failures = 0 if started or lived > HEALTHY_RUN_S else child.failures + 1
        delay = 0.0 if child.failures == 0 else min(MAX_RESTART_DELAY_S,
                                                    0.5 * 2 ** (child.failures - 1))
        child.restart_at = now + delay
        event = kind if child.role == "worker" else EventKind.PROCESS_RESTARTED
        self.store.add_event(event, detail=reason)
        if child.role == "worker":
            self._settle_jobs(child.name, reason)
        child.process = None
        if delay == 0:
            self._start(child)

    def _settle_jobs(self, worker: str, reason: str, count_attempt: bool = True) -> None:
        """The jobs a dead worker was running: retried, or failed after max_attempts."""
        assert self.store is not None
        for job in self.store.running_jobs(worker=worker):
            done = self.store.retry_or_fail(job.id, reason, self.config.daemon.max_attempts,
                                            time.time(), worker=worker,
                                            count_attempt=count_attempt)
            if done is not None:
                log.warning("job %d of series %s: %s (%d attempt(s))", done.job_id,
                            done.series_uid, done.state.value, done.attempts)

    def _status_text(self) -> str:
        assert self.store is not None
        counts = self.store.job_counts()
        outbox = self.store.outbox_counts()
        text = (f"listening on {self.port.value}; {counts[JobState.QUEUED]} queued, "
                f"{counts[JobState.RUNNING]} running; {counts[JobState.DONE]} done, "
                f"{counts[JobState.FAILED]} failed")
        if outbox[OutboxState.PENDING] or outbox[OutboxState.FAILED]:
            text += (f"; outbox {outbox[OutboxState.PENDING]} pending, "
                     f"{outbox[OutboxState.FAILED]} failed")
        return text

    def _notify(self, now: float, healthy: bool) -> None:
        if not self.notifier.enabled:
            return
        period = self.config.daemon.heartbeat_s
        if self.notifier.watchdog_s:
            period = min(period, self.notifier.watchdog_s / 2)
        if healthy and now - self._last_watchdog >= period:
            self.notifier.watchdog()
            self._last_watchdog = now
        text = self._status_text()
        if text != self._last_status:
            self.notifier.status(text)
            self._last_status = text

    def _stop_children(self) -> None:
        """Workers and the sender first (finish the job or the association within the grace,
        else requeue the job), then the stabiliser, then the SCP."""
        cfg = self.config.daemon
        for child in (*self.workers, self.sender):
            if child.stop is not None:
                child.stop.set()
        deadline = time.monotonic() + cfg.shutdown_grace_s
        if self.sender.process is not None:
            self.sender.process.join(max(0.0, deadline - time.monotonic()))
            if self.sender.process.is_alive():
                log.warning("the sender did not finish within %g s; its files are sent again "
                            "when their lease ends", cfg.shutdown_grace_s)
                self.sender.process.kill()
                self.sender.process.join(10)
            self.sender.process = None
        for child in self.workers:
            if child.process is not None:
                child.process.join(max(0.0, deadline - time.monotonic()))
                if child.process.is_alive():
                    log.warning("%s did not finish within %g s: its job is requeued", child.name,
                                cfg.shutdown_grace_s)
                    child.process.kill()
                    child.process.join(10)
                self._settle_jobs(child.name, "requeued: the daemon was stopped",
                                  count_attempt=False)
                child.process = None
        for child in (self.stabiliser, self.scp):
            if child.process is None:
                continue
            assert child.stop is not None
            child.stop.set()
            child.process.join(self.config.dicom.network_timeout_s + 5)
            if child.process.is_alive():
                child.process.kill()
                child.process.join(10)
            child.process = None

    def _kill_all(self) -> None:
        for child in (*self.workers, self.sender, self.stabiliser, self.scp):
            if child.process is not None and child.process.is_alive():
                child.process.kill()
                child.process.join(10)


def _exit_reason(name: str, code: int | None) -> str:
    if code is not None and code < 0:
        try:
            sig = signal.Signals(-code).name
        except ValueError:
            sig = f"signal {-code}"
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"{name} was killed by {sig}{hint}"
    return f"{name} exited with code {code}"


def serve(config: Config, state_dir: str | Path | None = None,
          notifier: Notifier | None = None) -> int:
    """Run the daemon until SIGTERM/SIGINT; the exit code (0 after a clean stop)."""
    if not isinstance(config, Config):
        raise TypeError(f"`config` must be a Config, got {type(config).__name__}")
    state = Path(state_dir if state_dir is not None else config.general.state_dir)
    return Supervisor(config, state, notifier).run()
