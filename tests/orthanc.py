"""A real Orthanc for tests: started on loopback ports with a temporary config, stopped after.

Orthanc is the PACS stand-in (DESIGN.md: real parts in tests). Debian/Ubuntu package
``orthanc`` installs the binary as ``/usr/sbin/Orthanc``; tests skip, with that reason, when it
is missing. No authentication, no plugins, storage in the test's temporary folder; the REST
API is read with urllib (no extra dependency).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
BINARY_CANDIDATES = ("Orthanc", "/usr/sbin/Orthanc", "/usr/local/sbin/Orthanc")
START_TIMEOUT_S = 30.0


def find_orthanc() -> str | None:
    """Path of the Orthanc binary, or None."""
    for name in BINARY_CANDIDATES:
        path = shutil.which(name) if os.sep not in name else (name if os.access(name, os.X_OK)
                                                                 else None)
        if path:
            return path
    return None


def free_port() -> int:
    """A TCP port free on loopback right now (another process may take it later)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


@dataclass
class Orthanc:
    """A running Orthanc; use :func:`start_orthanc` and call :meth:`stop` (or use ``with``)."""

    process: subprocess.Popen
    folder: Path
    ae_title: str
    dicom_port: int
    http_port: int
    log: Path
    _log_handle: object = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def get(self, path: str) -> object:
        """GET a REST path (``/instances``...) and decode its JSON."""
        with urllib.request.urlopen(self.url + path, timeout=10) as rsp:
            return json.loads(rsp.read())

    def instances(self) -> list[str]:
        """Orthanc's IDs of every stored instance."""
        return list(self.get("/instances"))  # type: ignore[arg-type]

    def instance_tags(self, orthanc_id: str) -> dict:
        """``/instances/<id>/simplified-tags``: keyword -> value."""
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))  # type: ignore[arg-type]

    def changes(self, kind: str) -> list[dict]:
        """Entries of ``/changes`` with ChangeType ``kind`` (e.g. NewInstance)."""
        out: list[dict] = []
        since = 0
        while True:
            page = self.get(f"/changes?since={since}&limit=1000")
            out += [c for c in page["Changes"] if c["ChangeType"] == kind]  # type: ignore[index]
            if page["Done"]:  # type: ignore[index]
                return out
            since = page["Last"]  # type: ignore[index]

    def stop(self, graceful: bool = False) -> None:
        """Stop Orthanc: killed by default (its storage is a throw-away test folder, and its
        graceful shutdown takes seconds); ``graceful`` sends SIGTERM and waits up to 10 s."""
        if self.process.poll() is None:
            if graceful:
                self.process.terminate()
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
            else:
                self.process.kill()
            self.process.wait(timeout=10)
        if self._log_handle is not None:
            self._log_handle.close()  # type: ignore[attr-defined]
            self._log_handle = None

    def __enter__(self) -> Orthanc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_orthanc(folder: Path, *, ae_title: str = "ORTHANC", dicom_port: int | None = None,
                  http_port: int | None = None) -> Orthanc:
    """Write ``folder/orthanc.json``, start Orthanc and wait until both its REST API answers
    and its DICOM port accepts connections. Raises RuntimeError (with the log's tail) if it
    does not come up."""
    binary = find_orthanc()
    if binary is None:
        raise RuntimeError("the Orthanc binary is not installed (apt-get install orthanc)")
    folder.mkdir(parents=True, exist_ok=True)
    dicom_port = dicom_port or free_port()
    http_port = http_port or free_port()
    storage = folder / "storage"
    config = {
        "Name": "appliance-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "Plugins": [],
        "StableAge": 1,
        "SaveJobs": False,
        "HttpDescribeErrors": True,
        "OverwriteInstances": True,
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    log = folder / "orthanc.log"
    handle = open(log, "wb")
    process = subprocess.Popen([binary, str(path)], stdout=handle, stderr=subprocess.STDOUT,
                               cwd=folder)
    server = Orthanc(process, folder, ae_title, dicom_port, http_port, log, handle)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        if _answers(server):
            return server
        time.sleep(0.1)
    server.stop()
    tail = log.read_text(errors="replace")[-2000:]
    raise RuntimeError(f"Orthanc did not start within {START_TIMEOUT_S:g} s "
                       f"(exit code {process.returncode}); log:\n{tail}")


def _answers(server: Orthanc) -> bool:
    try:
        server.get("/system")
        with socket.create_connection((HOST, server.dicom_port), timeout=1):
            return True
    except (urllib.error.URLError, ConnectionError, OSError, TimeoutError):
        return False


needs_orthanc = pytest.mark.skipif(
    find_orthanc() is None, reason="Orthanc binary not installed (apt-get install orthanc)")
