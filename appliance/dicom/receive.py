"""The DICOM receiver: a C-STORE SCP (and Verification) that spools CT instances.

The C-STORE handler stays small: it reads the few headers it needs, writes the instance as
received (temporary file, fsync, atomic rename, fsync of the folder) into the spool, records it
in the store, and only then answers success. It never runs analysis and never lets an exception
escape into pynetdicom: every outcome is a :class:`StoreStatus`.

Spool layout: ``<spool>/<study>/<series>/<sop instance>.dcm``, each part derived from the UID
by :func:`safe_name` (a well-formed UID as is, anything else as a hash), so a hostile UID can
never name a path outside the spool.

Access: associations are rejected (A-ASSOCIATE-RJ, permanent) when called to another AE title,
from a calling AE title or a source address outside the configured allow-lists, or (transient)
beyond ``max_associations``. Only CT Image Storage, Enhanced CT Image Storage and Verification
are negotiated; other SOP classes are refused in the association negotiation.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import os
import re
import sqlite3
import struct
import threading
import time
import warnings
from collections.abc import Callable
from enum import IntEnum
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from appliance.config import DicomConfig
from appliance.store import EventKind, InstanceRecord, Store

log = logging.getLogger(__name__)

ACCEPTED_SOP_CLASSES = (CTImageStorage, EnhancedCTImageStorage)
TRANSFER_SYNTAXES = (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian, JPEGLosslessSV1, JPEGLossless, JPEGLSLossless, JPEG2000Lossless,
    RLELossless,
)  # fmt: skip
"""Native and lossless syntaxes, all of which the series loader decodes; a scanner offering
only lossy ones is refused in the negotiation rather than analysed on degraded pixels."""
OUT_OF_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_PARSE_ERRORS = (InvalidDicomError, EOFError, OSError, ValueError, struct.error, KeyError)
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
UID_MAX = 64


class StoreStatus(IntEnum):
    """C-STORE response statuses we answer (PS3.4 Annex B.2.3 and PS3.7 Annex C)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    """Refused: out of resources (the spool's disk is full or below its reserve)."""
    INSTANCE_TOO_LARGE = 0xA701
    """Refused: out of resources, the instance is over ``max_instance_mb``."""
    DATASET_MISMATCH = 0xA900
    """Error: data set does not match SOP class (not CT, or required UIDs missing)."""
    CANNOT_UNDERSTAND = 0xC000
    """Error: cannot understand (the data set does not parse)."""
    PROCESSING_FAILURE = 0x0110
    """Failure: processing failure (an unexpected error here; the sender should retry)."""


class Reject(IntEnum):
    """A-ASSOCIATE-RJ diagnostics for service-user rejections (PS3.8 9.3.4)."""

    NO_REASON = 0x01
    CALLING_AE_NOT_RECOGNISED = 0x03


def safe_name(uid: str) -> str:
    """A file or folder name for a UID: the UID itself when it is a well-formed DICOM UID
    (digits and dots, at most 64 characters), otherwise ``x`` and a SHA-256 prefix, which can
    never be ``..``, contain a separator or collide with a well-formed UID."""
    if not isinstance(uid, str):
        raise TypeError(f"`uid` must be a str, got {type(uid).__name__}")
    if len(uid) <= UID_MAX and _UID.fullmatch(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def write_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that after a crash either the old file or the whole new
    one is there: temporary file in the same folder, fsync, rename over, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Received instances on disk. ``write_file`` is the seam tests use to inject disk errors."""

    def __init__(self, root: str | Path,
                 write_file: Callable[[Path, bytes], None] = write_durably) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._write_file = write_file

    def relpath(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> str:
        return "/".join((safe_name(study_uid), safe_name(series_uid),
                         safe_name(sop_instance_uid) + ".dcm"))

    def path(self, relpath: str) -> Path:
        """The absolute path of a spool-relative one; refuses anything outside the spool."""
        path = (self.root / relpath).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise ValueError(f"`relpath` must stay inside the spool {self.root}, got {relpath!r}")
        return path

    def write(self, relpath: str, data: bytes) -> Path:
        path = self.path(relpath)
        self._write_file(path, data)
        return path

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize


class AccessPolicy:
    """Who may associate: calling AE titles and source networks (empty list: anyone)."""

    def __init__(self, calling_aets: tuple[str, ...], hosts: tuple[str, ...]) -> None:
        self.calling_aets = frozenset(t.strip() for t in calling_aets)
        self.networks = tuple(ipaddress.ip_network(h.strip(), strict=False) for h in hosts)

    def refusal(self, calling_aet: str, address: str) -> tuple[Reject, str] | None:
        """None when allowed, else the rejection diagnostic and a reason for the log."""
        if self.calling_aets and calling_aet.strip() not in self.calling_aets:
            return Reject.CALLING_AE_NOT_RECOGNISED, f"calling AE title {calling_aet!r} not allowed"
        if self.networks:
            try:
                ip = ipaddress.ip_address(address.split("%")[0])
            except ValueError:
                return Reject.NO_REASON, f"source address {address!r} is not an IP address"
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if not any(ip.version == n.version and ip in n for n in self.networks):
                return Reject.NO_REASON, f"source address {address} not allowed"
        return None


class _Refusal(Exception):
    """An instance we answer with a failure status (raised inside the handler only)."""

    def __init__(self, status: StoreStatus, why: str, series_uid: str | None = None) -> None:
        super().__init__(why)
        self.status, self.why, self.series_uid = status, why, series_uid


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


class StorageSCP:
    """The receiver. ``start()`` listens (returns the port), ``stop()`` stops listening and
    waits for the running associations to end. One Store connection, shared under its lock."""

    def __init__(self, config: DicomConfig, spool: Spool, store: Store, *,
                 clock: Callable[[], float] = time.time) -> None:
        if not isinstance(config, DicomConfig):
            raise TypeError(f"`config` must be a DicomConfig, got {type(config).__name__}")
        self.config = config
        self.spool = spool
        self.store = store
        self.clock = clock
        self.policy = AccessPolicy(config.allowed_calling_aets, config.allowed_hosts)
        self.max_bytes = int(config.max_instance_mb * 1024 * 1024)
        self.min_free = int(config.min_free_mb * 1024 * 1024)
        self._server: ThreadedAssociationServer | None = None
        self._touched: dict[int, set[str]] = {}
        self._touched_lock = threading.Lock()
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        c = self.config
        ae = AE(ae_title=c.ae_title)
        ae.require_called_aet = True
        ae.maximum_associations = c.max_associations
        ae.maximum_pdu_size = c.max_pdu
        ae.network_timeout = c.network_timeout_s
        ae.dimse_timeout = c.dimse_timeout_s
        ae.acse_timeout = c.network_timeout_s
        for sop_class in ACCEPTED_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        return ae

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SCP is not listening")
        return int(self._server.server_address[1])

    def start(self) -> int:
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_ended),
            (evt.EVT_CONN_CLOSE, self._on_ended),
        ]
        self._server = self.ae.start_server((self.config.bind_address, self.config.port),
                                            block=False, evt_handlers=handlers)
        log.info("DICOM SCP %s listening on port %d", self.config.ae_title, self.port)
        return self.port

    def stop(self) -> None:
        """Stop accepting associations, then wait for those running to finish."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        deadline = time.monotonic() + self.config.network_timeout_s
        while any(a.is_alive() for a in self.ae.active_associations):
            if time.monotonic() > deadline:
                for assoc in self.ae.active_associations:
                    assoc.abort()
                break
            time.sleep(0.05)
        self.ae.shutdown()
        log.info("DICOM SCP stopped")

    # ------------------------------------------------------------------ handlers

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        calling = assoc.requestor.primitive.calling_ae_title
        address = str(assoc.requestor.address)
        refusal = self.policy.refusal(calling, address)
        if refusal is None:
            return
        diagnostic, why = refusal
        log.warning("association from %s (%s) rejected: %s", calling, address, why)
        assoc.acse.send_reject(0x01, 0x01, int(diagnostic))
        assoc.kill()
        try:
            self.store.add_event(EventKind.ASSOCIATION_REJECTED, detail=why)
        except sqlite3.Error as exc:  # the rejection stands; only its record is missing
            log.warning("could not record the rejection: %s", exc)

    def _on_store(self, event: evt.Event) -> int:
        """pynetdicom's C-STORE handler: any failure becomes a status, never an exception."""
        try:
            return int(self._store_instance(event))
        except Exception:  # noqa: BLE001 - answered as a processing failure, logged with trace
            log.exception("C-STORE failed unexpectedly; answered 0x%04X",
                          StoreStatus.PROCESSING_FAILURE)
            return int(StoreStatus.PROCESSING_FAILURE)

    def _store_instance(self, event: evt.Event) -> StoreStatus:
        """Headers, spool file, store row, in that order; success only after all three."""
        data = event.encoded_dataset(include_meta=True)
        requestor = event.assoc.requestor
        try:
            rec = self._record(data, requestor.ae_title, str(requestor.address))
            self._spool(rec, data)
            new = self.store.add_instance(rec)
        except _Refusal as refusal:
            return self._refuse(refusal.status, refusal.why, refusal.series_uid)
        except sqlite3.OperationalError as exc:
            full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
            return self._refuse(StoreStatus.OUT_OF_RESOURCES if full
                                else StoreStatus.PROCESSING_FAILURE, f"store failed: {exc}")
        with self._touched_lock:
            self._touched.setdefault(id(event.assoc), set()).add(rec.series_uid)
        if not new:
            log.info("duplicate instance %s (already stored)", rec.sop_instance_uid)
        return StoreStatus.SUCCESS

    def _record(self, data: bytes, calling: str, source: str) -> InstanceRecord:
        """What the store needs from the headers; raises _Refusal for what we do not take."""
        if len(data) > self.max_bytes:
            raise _Refusal(StoreStatus.INSTANCE_TOO_LARGE, f"{len(data)} bytes from {calling} "
                           f"over the {self.config.max_instance_mb:g} MB limit")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # scanner data are often slightly invalid
                ds = pydicom.dcmread(BytesIO(data), stop_before_pixels=True)
        except _PARSE_ERRORS as exc:
            raise _Refusal(StoreStatus.CANNOT_UNDERSTAND, f"unreadable data set: {exc}") from None
        sop_class = _text(ds, "SOPClassUID")
        sop_uid, series_uid, study_uid = (_text(ds, k) for k in (
            "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"))
        if sop_class not in ACCEPTED_SOP_CLASSES:
            raise _Refusal(StoreStatus.DATASET_MISMATCH, f"SOP class {sop_class} is not CT")
        if not (sop_uid and series_uid and study_uid):
            raise _Refusal(StoreStatus.DATASET_MISMATCH, "SOP instance, series or study UID "
                                                         "missing")
        return InstanceRecord(
            sop_instance_uid=sop_uid, sop_class_uid=sop_class, series_uid=series_uid,
            study_uid=study_uid, patient_id=_text(ds, "PatientID") or "",
            path=self.spool.relpath(study_uid, series_uid, sop_uid), size=len(data),
            received_at=self.clock(), calling_aet=calling, source=source,
            patient_name=_text(ds, "PatientName"), patient_sex=_text(ds, "PatientSex"),
            patient_birth_date=_text(ds, "PatientBirthDate"), study_date=_text(ds, "StudyDate"),
            accession_number=_text(ds, "AccessionNumber"), modality=_text(ds, "Modality"),
            series_description=_text(ds, "SeriesDescription"),
            series_number=_int(ds.get("SeriesNumber")),
        )

    def _spool(self, rec: InstanceRecord, data: bytes) -> None:
        """Write the file unless this instance is already stored (a duplicate is not
        rewritten); raises _Refusal when the disk is full or below its reserve."""
        known = self.store.instance_path(rec.sop_instance_uid)
        if known is not None and self.spool.path(known).is_file():
            return
        if self.spool.free_bytes() < len(data) + self.min_free:
            raise _Refusal(StoreStatus.OUT_OF_RESOURCES,
                           f"less than {self.config.min_free_mb:g} MB free in the spool",
                           rec.series_uid)
        try:
            self.spool.write(rec.path, data)
        except OSError as exc:
            status = (StoreStatus.OUT_OF_RESOURCES if exc.errno in OUT_OF_SPACE_ERRNOS
                      else StoreStatus.PROCESSING_FAILURE)
            raise _Refusal(status, f"spool write failed: {exc}", rec.series_uid) from None

    def _refuse(self, status: StoreStatus, why: str, series_uid: str | None = None) -> StoreStatus:
        log.warning("C-STORE refused with 0x%04X (%s): %s", status, status.name, why)
        try:
            self.store.add_event(EventKind.INSTANCE_REFUSED, series_uid=series_uid,
                                 detail=f"0x{status:04X} {status.name}: {why}")
        except sqlite3.Error as exc:  # e.g. the disk is full: the status already says it
            log.warning("could not record the refusal: %s", exc)
        return status

    def _on_released(self, event: evt.Event) -> None:
        with self._touched_lock:
            series = self._touched.pop(id(event.assoc), set())
        if not series:
            return
        try:
            self.store.mark_released(sorted(series), self.clock())
        except sqlite3.Error as exc:  # the series then completes by the quiet timer instead
            log.warning("could not record the release of %d series: %s", len(series), exc)

    def _on_ended(self, event: evt.Event) -> None:
        # aborted or closed without release: the series complete by the quiet timer
        with self._touched_lock:
            self._touched.pop(id(event.assoc), None)


def _int(value: object) -> int | None:
    try:
        return int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
