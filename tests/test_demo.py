"""`appliance demo --headless`: the newcomer's first command, end to end with the shipped models."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.store import JobState, Store
from tests.paths import ROOT

DEMO_PATIENTS = 3
SCANS_PER_PATIENT = 2  # baseline + one follow-up each


@pytest.mark.slow
@pytest.mark.e2e
def test_headless_demo_reports_every_scan_and_the_serial_change(tmp_path):
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "appliance.cli", "demo", "--headless", "--workdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    store = Store.open(tmp_path / "state" / "appliance.db", readonly=True)
    try:
        counts = store.job_counts()
        assert counts.get(JobState.DONE, 0) == DEMO_PATIENTS * SCANS_PER_PATIENT, counts
        assert not counts.get(JobState.FAILED), counts
        patients = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("Patient ")}
        assert len(patients) == DEMO_PATIENTS, proc.stdout
        for pid in patients:
            scans = store.scans(pid)
            assert len(scans) == SCANS_PER_PATIENT
            comparison = store.serial(pid)
            assert comparison, f"no serial comparison for {pid}"
    finally:
        store.close()
    # the printed history shows the change against baseline, and the phantom truth beside it
    assert proc.stdout.count("truth") >= DEMO_PATIENTS, proc.stdout
    assert elapsed < 300


@pytest.mark.slow
def test_a_killed_demo_leaves_no_daemon_behind(tmp_path):
    demo = subprocess.Popen([sys.executable, "-m", "appliance.cli", "demo", "--headless", "--workdir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    children = Path(f"/proc/{demo.pid}/task/{demo.pid}/children")
    deadline = time.monotonic() + 60
    daemon_pid = None
    while daemon_pid is None and time.monotonic() < deadline:
        pids = [int(p) for p in children.read_text().split()] if children.exists() else []
        daemon_pid = next((p for p in pids if "serve" in Path(f"/proc/{p}/cmdline").read_text(errors="ignore")), None)
        time.sleep(0.2)
    assert daemon_pid is not None, "the demo started no daemon"
    demo.kill()
    demo.wait(10)
    deadline = time.monotonic() + 60
    while _running(daemon_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _running(daemon_pid), "the daemon outlived the killed demo"


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited orphan may wait a while to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
