"""Receive throughput of the appliance's C-STORE SCP beside dcmtk's storescp; prints JSON.

    python benchmarks/receive.py [--repeats 3] [--slices 300] [--series DIR] [--workdir DIR]

One phantom CT series (`appliance phantom`, 512 x 512, ``--slices`` slices, Explicit VR Little
Endian) is sent, in the same run, to three receivers on loopback:

- **appliance**: `appliance serve` as a subprocess on a free port with a fresh ``--state-dir``
  per run (every instance fsynced into the spool and committed to SQLite before success);
  the stabiliser's timers are set to an hour so no analysis starts during the measurement.
- **storescp**: dcmtk's `storescp --fork` writing to a fresh folder (no fsync), with the same
  maximum PDU as the appliance (65536 bytes), as installed. Debian's dcmtk 3.6.7 leaves Nagle's
  algorithm on for accepted connections and writes each C-STORE response in two ``write`` calls,
  so every response waits for the sender's delayed ACK (about 40 ms on Linux);
- **storescp-nodelay**: the same with ``TCP_NODELAY=1`` in its environment (dcmtk then sets
  TCP_NODELAY), which removes that stall: the fair comparison of the receive paths.

Senders: the same pynetdicom code for all (one association, and the files split into four
contiguous parts over four concurrent associations), streaming each file as stored
(``STORE_SEND_CHUNKED_DATASET``, so the sender does not decode and re-encode); and dcmtk's
`storescu` over one association. A run's clock starts just before the first association request
and stops when every instance is acknowledged and the main thread has confirmed all of them in
the receiver's record (the appliance's store; storescp's output folder). ``ack_s`` is the time to
the last acknowledgement alone. Median of ``--repeats`` runs; the cases are interleaved within a
repeat so that background load falls on every receiver alike. A run that fails (an association
lost, an instance refused or not recorded) is listed under ``failed_runs`` with the receiver's log
tail and left out of the median. Progress goes to stderr. Figures go into notes, never into
assertions. MB is 10^6 bytes of DICOM files (meta header included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
AET = "APPLIANCE"
CALLING_AET = "BENCH"
PDU = 65536
"""The appliance's default ``dicom.max_pdu``; storescp is given the same."""
PARALLEL = 4
START_TIMEOUT_S = 180.0
RECORD_TIMEOUT_S = 60.0
QUIET_FOREVER_S = 3600.0
"""Stabiliser timers for the benchmark daemon: no job is queued while we measure."""


def say(message: str) -> None:
    print(f"receive: {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def echo_ok(port: int) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=CALLING_AET)
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, port, ae_title=AET)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return status is not None and int(status.Status) == 0


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"receive: {what}: the receiver exited with status {proc.returncode}")
        if check():
            return
        time.sleep(0.1)
    raise SystemExit(f"receive: timed out after {timeout:g} s waiting for {what}")


# ----------------------------------------------------------------------------- receivers


class Receiver:
    """A receiver running in a subprocess; ``count()`` is how many instances it has recorded."""

    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log = None

    def start(self) -> Receiver:
        raise NotImplementedError

    def count(self) -> int:
        raise NotImplementedError

    def log_tail(self, chars: int = 600) -> str:
        if self.log is None:
            return ""
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        if self.log is not None:
            self.log.close()
        shutil.rmtree(self.work, ignore_errors=True)


class ApplianceReceiver(Receiver):
    name = "appliance"

    def start(self) -> ApplianceReceiver:
        self.work.mkdir(parents=True)
        self.state = self.work / "state"
        config = self.work / "appliance.toml"
        config.write_text("\n".join([
            "[general]", 'log_level = "WARNING"',
            "[dicom]", f"port = {self.port}", f'bind_address = "{HOST}"', f"max_pdu = {PDU}",
            f"max_associations = {PARALLEL}",
            "[daemon]", f"stable_seconds = {QUIET_FOREVER_S}",
            f"release_settle_s = {QUIET_FOREVER_S}", "retention_days = 0.0", "workers = 1",
        ]) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        self.log = open(self.work / "daemon.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "serve", "--config", str(config),
             "--state-dir", str(self.state)],
            cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: echo_ok(self.port), START_TIMEOUT_S, "the appliance SCP", self.proc)
        # the worker loads and warms its models at start: let it finish so it does not compete
        wait_until(self._worker_ready, START_TIMEOUT_S, "the appliance worker", self.proc)
        return self

    def _worker_ready(self) -> bool:
        from appliance.store import EventKind, Store, StoreError

        try:
            with Store.open(self.state / "appliance.db", readonly=True) as store:
                return bool(store.events(kind=EventKind.WORKER_STARTED, limit=1))
        except StoreError:
            return False

    def count(self) -> int:
        from appliance.store import Store

        with Store.open(self.state / "appliance.db", readonly=True) as store:
            return store.instance_count()


class StorescpReceiver(Receiver):
    name = "storescp"
    env: dict[str, str] = {}

    def start(self) -> StorescpReceiver:
        self.out = self.work / "received"
        self.out.mkdir(parents=True)
        self.log = open(self.work / "storescp.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            ["storescp", "--fork", "-aet", AET, "-pdu", str(PDU), "-dhl", "-od", str(self.out),
             str(self.port)], env={**os.environ, **self.env}, stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: echo_ok(self.port), START_TIMEOUT_S, self.name, self.proc)
        return self

    def count(self) -> int:
        return sum(1 for p in self.out.iterdir() if p.is_file() and p.stat().st_size > 0)


class StorescpNodelayReceiver(StorescpReceiver):
    name = "storescp-nodelay"
    env = {"TCP_NODELAY": "1"}  # dcmtk reads it: disable Nagle's algorithm on its sockets


# ----------------------------------------------------------------------------- senders


@dataclass
class Sent:
    start: float
    last_ack: float
    failures: list[str]


def send_pynetdicom(port: int, files: list[Path], parallel: int) -> Sent:
    """The files over ``parallel`` concurrent associations (contiguous parts), each file
    streamed as stored."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import CTImageStorage

    _config.STORE_SEND_CHUNKED_DATASET = True
    size = -(-len(files) // parallel)
    parts = [files[i:i + size] for i in range(0, len(files), size)]
    starts: list[float] = []
    acks: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    go = threading.Barrier(len(parts))

    def run(part: list[Path]) -> None:
        ae = AE(ae_title=CALLING_AET)
        ae.maximum_pdu_size = PDU
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        go.wait()
        t0 = last = time.perf_counter()
        bad = []
        assoc = ae.associate(HOST, port, ae_title=AET)
        if not assoc.is_established:
            bad.append("association not established")
        else:
            try:
                for n, path in enumerate(part):
                    if not assoc.is_established:
                        bad.append(f"association lost after {n} of {len(part)} instances")
                        break
                    rsp = assoc.send_c_store(path)
                    if rsp is None or "Status" not in rsp or int(rsp.Status) != 0:
                        bad.append(f"{path.name}: {rsp.get('Status') if rsp else 'no response'}")
                last = time.perf_counter()
            except (RuntimeError, OSError, ValueError) as exc:  # reported as the run's failure
                bad.append(f"{type(exc).__name__}: {exc}")
            finally:
                if assoc.is_established:
                    assoc.release()
        with lock:
            starts.append(t0)
            acks.append(last)
            failures.extend(bad)

    threads = [threading.Thread(target=run, args=(p,)) for p in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Sent(min(starts), max(acks), failures)


def send_storescu(port: int, files: list[Path], parallel: int) -> Sent:
    if parallel != 1:
        raise ValueError(f"`parallel` must be 1 for storescu, got {parallel}")
    t0 = time.perf_counter()
    done = subprocess.run(["storescu", "-aet", CALLING_AET, "-aec", AET, HOST, str(port),
                           *map(str, files)], capture_output=True, text=True)
    end = time.perf_counter()
    failures = [] if done.returncode == 0 else [f"storescu exit {done.returncode}: "
                                               f"{done.stderr.strip()[-300:]}"]
    return Sent(t0, end, failures)


SENDERS = {"pynetdicom": send_pynetdicom, "storescu": send_storescu}
RECEIVERS = {"appliance": ApplianceReceiver, "storescp": StorescpReceiver,
             "storescp-nodelay": StorescpNodelayReceiver}
CASES = [(r, "pynetdicom", 1) for r in RECEIVERS] + [(r, "pynetdicom", PARALLEL) for r in RECEIVERS] \
    + [(r, "storescu", 1) for r in RECEIVERS]


def run_case(work: Path, receiver: str, sender: str, parallel: int, files: list[Path]) -> dict:
    """One timed run on a fresh receiver: the seconds, or the reason it failed."""
    rx = RECEIVERS[receiver](work)
    try:
        rx.start()
        sent = SENDERS[sender](rx.port, files, parallel)
        if not sent.failures:
            try:
                wait_until(lambda: rx.count() >= len(files), RECORD_TIMEOUT_S,
                           f"{len(files)} instances recorded by {receiver}", rx.proc)
            except SystemExit as exc:
                sent.failures.append(str(exc))
        end = time.perf_counter()
        if not sent.failures and rx.count() != len(files):
            sent.failures.append(f"{rx.count()} instances recorded, {len(files)} sent")
        if sent.failures:
            return {"error": f"{len(sent.failures)} failure(s), first: {sent.failures[0]}; "
                             f"receiver log: {rx.log_tail()!r}"}
        return {"total_s": end - sent.start, "ack_s": sent.last_ack - sent.start}
    finally:
        rx.stop()


def series_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.glob("*.dcm") if p.is_file())
    if not files:
        raise SystemExit(f"receive: no .dcm files in {folder}")
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--slices", type=int, default=300, help="phantom slices (512 x 512)")
    parser.add_argument("--series", type=Path, help="send this folder of .dcm files instead")
    parser.add_argument("--workdir", type=Path, help="parent of the temporary folder (default: /tmp)")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    for tool in ("storescp", "storescu"):
        if shutil.which(tool) is None:
            raise SystemExit(f"receive: dcmtk's {tool} is not on PATH (apt install dcmtk)")
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="receive-bench-", dir=args.workdir))
    try:
        series = args.series
        if series is None:
            series = tmp / "series"
            say(f"writing a {args.slices}-slice 512x512 phantom to {series}")
            subprocess.run([sys.executable, "-m", "appliance.cli", "phantom", str(series), "--seed", "7",
                            "--slices", str(args.slices)], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        files = series_files(series)
        nbytes = sum(p.stat().st_size for p in files)
        runs: dict[tuple, list[dict]] = {case: [] for case in CASES}
        for k in range(args.repeats):
            for n, case in enumerate(CASES):
                receiver, sender, parallel = case
                r = run_case(tmp / f"rx-{k}-{n}", receiver, sender, parallel, files)
                runs[case].append(r)
                what = f"repeat {k + 1}/{args.repeats}: {receiver:<16} <- {sender:<10} x{parallel}"
                if "error" in r:
                    say(f"{what}: FAILED: {r['error']}")
                else:
                    say(f"{what}: {r['total_s']:.2f} s ({len(files) / r['total_s']:.0f} instances/s, "
                        f"{nbytes / 1e6 / r['total_s']:.1f} MB/s)")
        results = []
        for (receiver, sender, parallel), rs in runs.items():
            ok = [r for r in rs if "error" not in r]
            entry = {"receiver": receiver, "sender": sender, "associations": parallel,
                     "runs_s": [round(r["total_s"], 4) for r in ok],
                     "failed_runs": [r["error"] for r in rs if "error" in r]}
            if ok:
                total = statistics.median(r["total_s"] for r in ok)
                entry.update(median_s=total, median_ack_s=statistics.median(r["ack_s"] for r in ok),
                             instances_per_s=len(files) / total, mb_per_s=nbytes / 1e6 / total)
            results.append(entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    dcmtk = subprocess.run(["storescp", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    print(json.dumps({
        "benchmark": "receive",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "load_avg_1m_at_end": os.getloadavg()[0]},
        "series": {"source": str(args.series) if args.series else f"appliance phantom --seed 7 "
                   f"--slices {args.slices}", "instances": len(files), "bytes": nbytes},
        "repeats": args.repeats,
        "receivers": {
            "appliance": f"appliance serve, max_pdu {PDU}, fsync per instance, SQLite synchronous=FULL",
            "storescp": f"{dcmtk.strip('$ ')} --fork, -pdu {PDU}, no fsync, as installed (Nagle on)",
            "storescp-nodelay": "the same with TCP_NODELAY=1 in its environment (Nagle off)",
        },
        "senders": {"pynetdicom": "pynetdicom, files streamed as stored (STORE_SEND_CHUNKED_DATASET)",
                    "storescu": "dcmtk storescu, one association, file list on the command line"},
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
