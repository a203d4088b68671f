"""Sending results to PACS: a C-STORE SCU and the retry policy the outbox follows.

The durable outbox (a table in :mod:`appliance.store`) owns the queue; this module owns one
delivery attempt and the arithmetic of the next one:

- :func:`send_files` sends a list of files to one :class:`Destination` over one association
  and returns a :class:`SendReport` with an :class:`Outcome` per file. It never raises for
  network or peer trouble (those are outcomes); it raises only for bad arguments.
- :class:`Outcome` says what the outbox does next: ``SENT`` and ``WARNING`` are delivered
  (done), ``RETRY`` is a transient failure (association refused or lost, peer out of
  resources: try again later), ``FAILED`` is permanent (the peer refused this instance, or
  the file is unreadable: retrying would fail the same way; mark it failed with the message).
- :func:`next_attempt_delay` is the pure backoff policy: exponential from ``base_s``, capped.

Each file is sent at most once per call, so an outbox that resends only the files whose last
outcome was ``RETRY`` sends nothing twice (a file whose C-STORE response was lost in an abort
is the exception DICOM cannot avoid: it is ``RETRY`` and PACS receives the same SOP Instance
UID again, which PACS treats as the same instance).
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category

AE_TITLE_MAX = 16
"""DICOM AE titles are at most 16 characters (PS3.5, VR AE)."""
MAX_CONTEXTS = 128
"""Presentation contexts one association may propose (PS3.8: odd IDs 1-255)."""
NATIVE_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
"""Also proposed for every SOP class; pynetdicom converts between native syntaxes."""
_READ_ERRORS = (InvalidDicomError, OSError, EOFError, ValueError, KeyError)
ASSOCIATE_ATTEMPTS = 3
QUICK_FAILURE_S = 1.0
"""pynetdicom 3.0 reports a fast rejection as an abort now and then (about 1 in 30 against a
local Orthanc): its requestor checks the transport after the peer has answered and closed it.
An association that ends that fast without an answer is asked again, up to ASSOCIATE_ATTEMPTS
times; one that timed out is not."""


class CStoreStatus(IntEnum):
    """C-STORE response statuses the outcome depends on (PS3.4 B.2.3, PS3.7 C)."""

    SUCCESS = 0x0000
    INVALID_SOP_INSTANCE = 0x0117
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    DUPLICATE_INVOCATION = 0x0210
    RESOURCE_LIMITATION = 0x0213
    OUT_OF_RESOURCES = 0xA700
    """Start of the A7xx range: refused, out of resources (transient)."""
    OUT_OF_RESOURCES_END = 0xA7FF
    CANCEL = 0xFE00


TRANSIENT_STATUSES = frozenset(
    {CStoreStatus.DUPLICATE_INVOCATION, CStoreStatus.RESOURCE_LIMITATION, CStoreStatus.CANCEL}
)


class Outcome(StrEnum):
    """What happened to one file, and so what the outbox does with it."""

    SENT = "sent"
    """Stored (success status)."""
    WARNING = "warning"
    """Stored with a warning status (coercion, elements discarded): delivered."""
    RETRY = "retry"
    """Not delivered, transient: try again after :func:`next_attempt_delay`."""
    FAILED = "failed"
    """Not delivered, permanent: retrying cannot help."""

    @property
    def delivered(self) -> bool:
        return self in (Outcome.SENT, Outcome.WARNING)

    @property
    def retryable(self) -> bool:
        return self is Outcome.RETRY


def check_ae_title(name: str, value: object) -> str:
    """An AE title: 1-16 printable ASCII characters, no backslash, not only spaces."""
    if not isinstance(value, str):
        raise TypeError(f"`{name}` must be a str, got {type(value).__name__}")
    if not (0 < len(value.strip()) and len(value) <= AE_TITLE_MAX) or "\\" in value \
            or not value.isascii() or not value.isprintable():
        raise ValueError(f"`{name}` must be 1 to {AE_TITLE_MAX} printable ASCII characters "
                         f"without a backslash, got {value!r}")
    return value


@dataclass(frozen=True)
class Destination:
    """A DICOM peer that stores what we send (PACS, a router, a viewer)."""

    ae_title: str
    """The peer's AE title (Called AE)."""
    host: str
    port: int
    calling_ae_title: str = "APPLIANCE"
    """Our AE title as the peer sees it (Calling AE); PACS usually allow-list it."""
    timeout_s: float = 30.0
    """Limit for connecting, for association negotiation and for each C-STORE response."""
    max_pdu: int = 0
    """Largest PDU we accept from the peer (0: no limit)."""

    def __post_init__(self) -> None:
        check_ae_title("ae_title", self.ae_title)
        check_ae_title("calling_ae_title", self.calling_ae_title)
        if not isinstance(self.host, str) or not self.host.strip():
            raise ValueError(f"`host` must be a host name or address, got {self.host!r}")
        if isinstance(self.port, bool) or not isinstance(self.port, int):
            raise TypeError(f"`port` must be an int, got {type(self.port).__name__}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"`port` must be in 1..65535, got {self.port}")
        if not self.timeout_s > 0:
            raise ValueError(f"`timeout_s` must be > 0, got {self.timeout_s!r}")
        if self.max_pdu < 0:
            raise ValueError(f"`max_pdu` must be >= 0, got {self.max_pdu}")

    @classmethod
    def parse(cls, text: str, **kwargs: object) -> Destination:
        """``AE@host:port`` (the form used in config and on the command line)."""
        ae, at, address = text.partition("@")
        host, colon, port = address.rpartition(":")
        if not at or not colon or not port.isdigit():
            raise ValueError(f"`destination` must look like AE@host:port, got {text!r}")
        return cls(ae_title=ae, host=host.strip("[]"), port=int(port), **kwargs)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class FileStatus:
    """The outcome of one file."""

    path: Path
    outcome: Outcome
    message: str
    """One line for logs and the outbox table: what happened and why."""
    status: int | None = None
    """The peer's C-STORE status, when it answered."""
    sop_instance_uid: str | None = None
    sop_class_uid: str | None = None


@dataclass(frozen=True)
class SendReport:
    """One delivery attempt of some files to one destination."""

    destination: Destination
    files: tuple[FileStatus, ...]
    association_error: str | None = None
    """Why no association could be used (then every readable file is ``RETRY`` or
    ``FAILED`` with this reason); None when one was established."""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Every file delivered."""
        return all(f.outcome.delivered for f in self.files)

    def with_outcome(self, *outcomes: Outcome) -> tuple[FileStatus, ...]:
        return tuple(f for f in self.files if f.outcome in outcomes)

    @property
    def delivered(self) -> tuple[FileStatus, ...]:
        return self.with_outcome(Outcome.SENT, Outcome.WARNING)

    @property
    def to_retry(self) -> tuple[FileStatus, ...]:
        return self.with_outcome(Outcome.RETRY)

    @property
    def failed(self) -> tuple[FileStatus, ...]:
        return self.with_outcome(Outcome.FAILED)

    def summary(self) -> str:
        text = (f"{self.destination}: {len(self.delivered)} of {len(self.files)} delivered, "
                f"{len(self.to_retry)} to retry, {len(self.failed)} failed")
        return text + (f" ({self.association_error})" if self.association_error else "")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base_s * factor ** (attempts - 1)`` seconds, at most ``max_s``."""

    base_s: float = 30.0
    """Wait after the first failed attempt."""
    factor: float = 2.0
    max_s: float = 3600.0
    """Longest wait: PACS down for a night is retried hourly, not every few days."""

    def __post_init__(self) -> None:
        if not self.base_s > 0:
            raise ValueError(f"`base_s` must be > 0, got {self.base_s!r}")
        if not self.factor >= 1:
            raise ValueError(f"`factor` must be >= 1, got {self.factor!r}")
        if not self.max_s >= self.base_s:
            raise ValueError(f"`max_s` must be >= base_s ({self.base_s}), got {self.max_s!r}")


DEFAULT_RETRY = RetryPolicy()


def next_attempt_delay(attempts: int, policy: RetryPolicy = DEFAULT_RETRY) -> float:
    """Seconds to wait before the next attempt after ``attempts`` failed ones (>= 1)."""
    if isinstance(attempts, bool) or not isinstance(attempts, int):
        raise TypeError(f"`attempts` must be an int, got {type(attempts).__name__}")
    if attempts < 1:
        raise ValueError(f"`attempts` must be >= 1 (failed attempts so far), got {attempts}")
    exponent = min(attempts - 1, 64)  # beyond this the cap has long been reached
    return float(min(policy.max_s, policy.base_s * policy.factor ** exponent))


def classify_status(code: int) -> Outcome:
    """A C-STORE response status -> the file's outcome."""
    category = code_to_category(code)
    if category == "Success":
        return Outcome.SENT
    if category == "Warning":
        return Outcome.WARNING
    if code in TRANSIENT_STATUSES or (
        CStoreStatus.OUT_OF_RESOURCES <= code <= CStoreStatus.OUT_OF_RESOURCES_END
    ):
        return Outcome.RETRY
    return Outcome.FAILED


def describe_status(code: int) -> str:
    """``0xA700 Failure: Refused: Out of Resources`` style text for a status code."""
    category, text = STORAGE_SERVICE_CLASS_STATUS.get(code, (code_to_category(code), ""))
    return f"0x{code:04X} {category}" + (f": {text}" if text else "")


@dataclass
class _Item:
    path: Path
    header: Dataset | None = None
    error: str | None = None
    status: FileStatus | None = field(default=None)


def _read_header(path: Path) -> _Item:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        meta = ds.file_meta
        _ = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID), str(ds.SOPInstanceUID))
    except _READ_ERRORS as exc:
        return _Item(path, error=f"cannot read {path}: {exc}")
    except AttributeError as exc:
        return _Item(path, error=f"{path} is not a DICOM file with meta information: {exc}")
    return _Item(path, header=ds)


def _contexts(items: list[_Item]) -> dict[str, list[str]]:
    by_class: dict[str, list[str]] = {}
    for item in items:
        if item.header is None:
            continue
        sop_class = str(item.header.file_meta.MediaStorageSOPClassUID)
        syntaxes = by_class.setdefault(sop_class, [])
        for ts in (str(item.header.file_meta.TransferSyntaxUID), *NATIVE_SYNTAXES):
            if ts not in syntaxes:
                syntaxes.append(ts)
    if len(by_class) > MAX_CONTEXTS:
        raise ValueError(f"`files` must hold at most {MAX_CONTEXTS} SOP classes per call, "
                         f"got {len(by_class)}")
    return by_class


def _why_not_connected(dest: Destination) -> str:
    """The OS's reason the peer cannot be reached (pynetdicom only logs it)."""
    try:
        with socket.create_connection((dest.host, dest.port), timeout=dest.timeout_s):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"cannot connect to {dest.host}:{dest.port}: {reason}"
    return (f"connected to {dest.host}:{dest.port}, but the association was aborted or not "
            f"answered within {dest.timeout_s:g} s")


def _association_error(assoc: Association, dest: Destination) -> tuple[str, Outcome]:
    if assoc.is_rejected:
        rsp = assoc.acceptor.primitive
        permanent = rsp is not None and rsp.result == 0x01
        detail = (f"{rsp.result_str}, {rsp.source_str}: {rsp.reason_str}"
                  if rsp is not None else "no details")
        return (f"association rejected by {dest} ({detail})",
                Outcome.FAILED if permanent else Outcome.RETRY)
    return f"no association with {dest}: {_why_not_connected(dest)}", Outcome.RETRY


def send_files(destination: Destination, files: Sequence[str | os.PathLike]) -> SendReport:
    """C-STORE each file to ``destination`` over one association; see the module docstring.

    The report lists the files in the order given. Unreadable files are ``FAILED`` without
    stopping the others; a file is read whole only when its turn comes.
    """
    if not isinstance(destination, Destination):
        raise TypeError(f"`destination` must be a Destination, got {type(destination).__name__}")
    if isinstance(files, (str, os.PathLike)):
        raise TypeError("`files` must be a sequence of paths, got a single path")
    start = time.monotonic()
    items = [_read_header(Path(f)) for f in files]
    seen: dict[str, Path] = {}
    for item in items:
        if item.header is not None:
            uid = str(item.header.SOPInstanceUID)
            if uid in seen:
                raise ValueError(f"`files` must not list an instance twice: {uid} is in "
                                 f"{seen[uid]} and {item.path}")
            seen[uid] = item.path
    for item in items:
        if item.error is not None:
            item.status = FileStatus(item.path, Outcome.FAILED, item.error)
    readable = [i for i in items if i.header is not None]
    association_error = None
    if readable:
        association_error = _send(destination, readable)
    return SendReport(destination, tuple(i.status for i in items if i.status is not None),
                      association_error, time.monotonic() - start)


def _status(item: _Item, outcome: Outcome, message: str, code: int | None = None) -> FileStatus:
    assert item.header is not None
    return FileStatus(item.path, outcome, message, code, str(item.header.SOPInstanceUID),
                      str(item.header.file_meta.MediaStorageSOPClassUID))


def _send(dest: Destination, items: list[_Item]) -> str | None:
    ae = AE(ae_title=dest.calling_ae_title)
    ae.connection_timeout = dest.timeout_s
    ae.acse_timeout = dest.timeout_s
    ae.dimse_timeout = dest.timeout_s
    ae.network_timeout = dest.timeout_s
    ae.maximum_pdu_size = dest.max_pdu
    for sop_class, syntaxes in _contexts(items).items():
        ae.add_requested_context(sop_class, syntaxes)
    assoc = _associate(ae, dest)
    if not assoc.is_established:
        reason, outcome = _association_error(assoc, dest)
        for item in items:
            item.status = _status(item, outcome, reason)
        return reason
    try:
        for n, item in enumerate(items):
            if not assoc.is_established:
                item.status = _status(
                    item, Outcome.RETRY,
                    f"association with {dest} lost after {n} of {len(items)} files")
                continue
            item.status = _store(assoc, item, dest)
    finally:
        if assoc.is_established:
            assoc.release()
    return None


def _associate(ae: AE, dest: Destination) -> Association:
    for _ in range(ASSOCIATE_ATTEMPTS):
        start = time.monotonic()
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        if assoc.is_established or assoc.is_rejected or time.monotonic() - start > QUICK_FAILURE_S:
            break
    return assoc


def _store(assoc: Association, item: _Item, dest: Destination) -> FileStatus:
    try:
        ds = pydicom.dcmread(item.path)
    except _READ_ERRORS as exc:
        return _status(item, Outcome.FAILED, f"cannot read {item.path}: {exc}")
    sop_class = UID(str(item.header.file_meta.MediaStorageSOPClassUID))  # type: ignore[union-attr]
    try:
        rsp = assoc.send_c_store(ds)
    except ValueError as exc:  # pynetdicom: no accepted presentation context for it
        return _status(item, Outcome.FAILED,
                       f"{dest} accepts no presentation context for {sop_class.name} in "
                       f"{UID(ds.file_meta.TransferSyntaxUID).name}: {exc}")
    code = rsp.get("Status") if rsp is not None else None
    if code is None:
        return _status(item, Outcome.RETRY,
                       f"no C-STORE response from {dest} within {dest.timeout_s:g} s "
                       "(timeout or association aborted)")
    outcome = classify_status(int(code))
    text = describe_status(int(code))
    comment = rsp.get("ErrorComment")
    if comment:
        text += f" ({comment})"
    return _status(item, outcome, f"{outcome.value}: {text}", int(code))
