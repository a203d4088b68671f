"""`appliance demo`: phantom patients pushed to a real daemon over DICOM, results as they land.

With no arguments: a temporary state directory on the embedded defaults (SQLite, ONNX Runtime
on the CPU), `appliance serve` started as a child process on a free loopback port, three phantom
patients (mild, moderate, severe; a baseline and a follow-up each) written as DICOM and sent
with C-STORE like a scanner would, then each patient's history (PLO per region and the serial
change) printed as the results arrive. `--headless` is the same without a terminal dashboard.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATIENTS = (("mild", 11), ("moderate", 12), ("severe", 13))
"""(severity, seed) of the demo patients."""
DEMO_SLICES = 120
PR_SET_PDEATHSIG = 1
"""prctl option: the signal a process gets when its parent dies (linux/prctl.h)."""
DEMO_THICKNESS_MM = 2.5
"""Small but clinical-looking series (2.5 mm slices) so the demo runs in a few minutes on a CPU."""
RESULT_TIMEOUT_S = 900.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_sink = None
"""Where progress goes while the dashboard holds the terminal (None: stderr)."""


def _say(message: str) -> None:
    if _sink is not None:
        _sink(message)
        return
    print(f"demo: {message}", file=sys.stderr, flush=True)


def _write_patients(root: Path) -> list[tuple[str, Path, str]]:
    """Phantom DICOM per patient; returns (severity, folder, the truth line to show)."""
    import contextlib
    import io
    import json

    from appliance import phantom_cli

    out = []
    for severity, seed in PATIENTS:
        folder = root / f"{severity}-{seed}"
        args = argparse.Namespace(
            outdir=str(folder), seed=seed, severity=severity, slices=DEMO_SLICES,
            thickness=DEMO_THICKNESS_MM, follow_up=1, insert_into=None, motion=False,
        )
        summary = io.StringIO()
        with contextlib.redirect_stdout(summary):
            if phantom_cli.run(args) != 0:
                raise RuntimeError(f"phantom generation failed for {severity} patient {seed}")
        studies = json.loads(summary.getvalue())["studies"]
        truth = ", ".join(f"day {st['day']}: {st['plo_pct']:.2f}%" for st in studies)
        out.append((severity, folder, f"phantom truth, whole-lung PLO: {truth}"))
    return out


def _dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.dcm") if p.is_file())


def _stop_with_parent() -> None:
    """In the daemon's process before it starts: SIGTERM it when the demo dies, even by SIGKILL
    (the `finally` below cannot run then), so a killed demo leaves no daemon behind (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the `finally` still stops it on any ordinary exit


def _wait_for_scp(port: int, proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    from pynetdicom import AE

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the daemon exited early with status {proc.returncode}")
        try:  # a plain connect first: pynetdicom logs every refused association as an ERROR
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        except OSError:
            time.sleep(0.5)
            continue
        ae = AE(ae_title="DEMO")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="APPLIANCE")
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.5)
    raise RuntimeError("the daemon did not start listening in time")


def _patient_ids(folder: Path) -> set[str]:
    import pydicom

    ids = set()
    for f in _dicom_files(folder)[:1]:
        ids.add(str(pydicom.dcmread(f, stop_before_pixels=True).PatientID))
    return ids


def run(args: argparse.Namespace) -> int:
    import logging


    logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    keep = args.workdir is not None
    work = Path(args.workdir) if keep else Path(tempfile.mkdtemp(prefix="appliance-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    state, scans = work / "state", work / "scans"
    port = _free_port()
    env = dict(os.environ, APPLIANCE_GENERAL__STATE_DIR=str(state), APPLIANCE_DICOM__PORT=str(port),
               APPLIANCE_DAEMON__STABLE_SECONDS="2", APPLIANCE_ANALYSIS__BACKEND="auto")
    headless = args.headless or not sys.stdout.isatty()
    if headless and not args.headless:
        _say("no terminal for the dashboard; showing the results table instead")
    _say(f"state directory {state}; starting the daemon on port {port}")
    daemon = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "--state-dir", str(state)],
                              env=env, stdout=subprocess.DEVNULL, stderr=open(work / "daemon.log", "w"),
                              preexec_fn=_stop_with_parent)
    try:
        _wait_for_scp(port, daemon)
        if not headless:
            return _with_dashboard(state, work, lambda: _push(scans, port, state, daemon))
        ids = _push(scans, port, state, daemon)
        for pid, truth in ids:
            sys.stdout.flush()
            subprocess.run([sys.executable, "-m", "appliance.cli", "history", pid, "--state-dir", str(state)],
                           env=env, check=False)
            print(truth + "\n", flush=True)
        return 0
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _push(scans: Path, port: int, state: Path, daemon: subprocess.Popen) -> list[tuple[str, str]]:
    """Write the phantoms, send them as a scanner would, wait for their results; returns
    (patient ID, truth line) per patient."""
    from appliance.dicom.send import Destination, send_files

    _say(f"writing {len(PATIENTS)} phantom patients (baseline + follow-up, {DEMO_SLICES} slices each)")
    patients = _write_patients(scans)
    dest = Destination("APPLIANCE", "127.0.0.1", port, calling_ae_title="DEMO_CT")
    expected = 0
    ids: list[tuple[str, str]] = []
    for severity, folder, truth in patients:
        files = _dicom_files(folder)
        report = send_files(dest, files)
        if not report.ok:
            raise RuntimeError(f"sending {severity} patient failed: {report.summary()}")
        _say(f"sent {len(files)} images of the {severity} patient")
        ids += [(pid, truth) for pid in sorted(_patient_ids(folder))]
        expected += len({p.parent for p in files})
    _wait_for_results(state, expected, daemon)
    return ids


def _with_dashboard(state: Path, work: Path, push) -> int:
    """The dashboard on the demo's state directory while ``push`` runs in a thread; progress
    goes to demo.log and to the dashboard's notifications (the terminal is the dashboard's)."""
    import logging
    import threading

    from appliance import tui
    from appliance.config import load_config

    global _sink
    log = open(work / "demo.log", "a")
    store = tui.open_store(state)
    app = tui.make_app(load_config(), store)
    failed: list[Exception] = []

    def sink(message: str) -> None:
        print(f"demo: {message}", file=log, flush=True)
        if app.is_running:
            app.call_from_thread(app.notify, message, timeout=8)

    def pusher() -> None:
        deadline = time.monotonic() + 10.0
        while not app.is_running and time.monotonic() < deadline:  # so that it hears the news
            time.sleep(0.05)
        try:
            push()
            _say("every series is analysed; q quits and stops the daemon")
        except Exception as exc:  # noqa: BLE001 - shown in the dashboard, then raised after it
            failed.append(exc)
            _say(f"failed: {exc}")

    root = logging.getLogger()
    handlers, root.handlers = root.handlers, [logging.StreamHandler(log)]
    _sink = sink
    try:
        threading.Thread(target=pusher, name="demo-push", daemon=True).start()
        app.run()
    finally:
        _sink, root.handlers = None, handlers
        store.close()
        log.close()
    if failed:
        raise RuntimeError(f"the demo failed: {failed[0]}")
    return 0


def _wait_for_results(state: Path, expected: int, daemon: subprocess.Popen) -> None:
    from appliance.store import JobState, Store, StoreError

    deadline = time.monotonic() + RESULT_TIMEOUT_S
    seen = -1
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with status {daemon.returncode}")
        try:
            with Store.open(state / "appliance.db", readonly=True) as store:
                counts = store.job_counts()
            done = counts.get(JobState.DONE, 0) + counts.get(JobState.FAILED, 0)
        except StoreError:
            done = 0
        if done != seen:
            _say(f"{done}/{expected} series analysed")
            seen = done
        if done >= expected:
            return
        time.sleep(1.0)
    raise RuntimeError(f"timed out waiting for {expected} results")
