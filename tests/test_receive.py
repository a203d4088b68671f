"""appliance.dicom.receive: the C-STORE SCP on a real loopback socket, fed by real pynetdicom
associations and by dcmtk's echoscu/storescu, into a real spool and a real SQLite store."""

from __future__ import annotations

import errno
import shutil
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import MRImageStorage
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, EnhancedCTImageStorage, Verification

from appliance.config import ConfigError, DicomConfig, load_config
from appliance.dicom.receive import (
    AccessPolicy,
    Reject,
    Spool,
    StorageSCP,
    StoreStatus,
    safe_name,
    write_durably,
)
from appliance.store import EventKind, Store
from tests import dicom_factory as factory

HOST = "127.0.0.1"
AET = "APPLIANCE"
needs_dcmtk = pytest.mark.skipif(shutil.which("storescu") is None,
                                 reason="dcmtk (storescu, echoscu) is not installed")


class Receiver:
    """A started SCP with its store and spool, for one test."""

    def __init__(self, tmp: Path, write_file=write_durably, **config: object) -> None:
        self.config = DicomConfig(port=0, bind_address=HOST, min_free_mb=0,
                                  **config)  # type: ignore[arg-type]
        self.store = Store.open(tmp / "state" / "appliance.db")
        self.spool = Spool(tmp / "state" / "spool", write_file=write_file)
        self.scp = StorageSCP(self.config, self.spool, self.store)
        self.port = self.scp.start()

    def close(self) -> None:
        self.scp.stop()
        self.store.close()


@pytest.fixture
def receiver(tmp_path):
    rx = Receiver(tmp_path)
    yield rx
    rx.close()


def associate(port: int, aet: str = "SCANNER", contexts=(CTImageStorage, EnhancedCTImageStorage,
                                                         Verification)):
    ae = AE(ae_title=aet)
    for context in contexts:
        ae.add_requested_context(context)
    return ae.associate(HOST, port, ae_title=AET)


def send(port: int, datasets, aet: str = "SCANNER") -> list[int]:
    """C-STORE each dataset (or file) in one association; the statuses answered."""
    assoc = associate(port, aet)
    assert assoc.is_established
    try:
        out = []
        for item in datasets:
            ds = pydicom.dcmread(item) if isinstance(item, (str, Path)) else item
            out.append(int(assoc.send_c_store(ds).Status))
        return out
    finally:
        assoc.release()


def small_series(folder: Path, n: int = 4, **kwargs):
    return factory.write_ct_series(folder, n_slices=n, shape=(16, 16), **kwargs)


# ----------------------------------------------------------------------------- units


def test_safe_name_keeps_good_uids_and_hashes_anything_else():
    assert safe_name("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    for hostile in ("../../etc/passwd", "..", "/abs", "a/b", "1.2/../3", "", "1" * 65, "1..2"):
        name = safe_name(hostile)
        assert name.startswith("x") and name.isalnum() and len(name) == 41, hostile
    assert safe_name("../a") != safe_name("../b")
    with pytest.raises(TypeError, match="`uid` must be a str"):
        safe_name(None)  # type: ignore[arg-type]


def test_spool_path_refuses_anything_outside(tmp_path):
    spool = Spool(tmp_path / "spool")
    assert spool.path("1.2/3.4/5.dcm").is_relative_to(spool.root)
    for bad in ("../x.dcm", "/etc/passwd", "a/../../x", "."):
        with pytest.raises(ValueError, match="must stay inside the spool"):
            spool.path(bad)


def test_access_policy():
    open_door = AccessPolicy((), ())
    assert open_door.refusal("ANY", "192.0.2.7") is None
    policy = AccessPolicy(("CT1", "CT2 "), ("10.1.0.0/16", "127.0.0.1", "::1"))
    assert policy.refusal("CT2", "10.1.3.4") is None
    assert policy.refusal("CT1", "::ffff:127.0.0.1") is None
    assert policy.refusal("CT1", "::1") is None
    assert policy.refusal("CT3", "10.1.3.4")[0] == Reject.CALLING_AE_NOT_RECOGNISED
    assert "10.2.0.1 not allowed" in policy.refusal("CT1", "10.2.0.1")[1]


# ----------------------------------------------------------------------------- network


def test_echo_with_pynetdicom_and_echoscu(receiver):
    assoc = associate(receiver.port)
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == receiver.config.max_pdu
    assert assoc.send_c_echo().Status == StoreStatus.SUCCESS
    assoc.release()
    if shutil.which("echoscu"):
        done = subprocess.run(["echoscu", "-aet", "SCANNER", "-aec", AET, HOST,
                               str(receiver.port)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr


def test_store_series_is_spooled_and_recorded(receiver, tmp_path):
    series = small_series(tmp_path / "in", n=5)
    statuses = send(receiver.port, series.paths)
    assert statuses == [StoreStatus.SUCCESS] * 5
    store, spool = receiver.store, receiver.spool
    assert store.instance_count(series.series_uid) == 5
    row = store.series_row(series.series_uid)
    assert row["instance_count"] == 5 and row["patient_id"] == "P001"
    assert row["released_at"] is not None and row["released_at"] >= row["last_instance_at"]
    for path, uid in zip(series.paths, series.sop_instance_uids, strict=True):
        rel = store.instance_path(uid)
        assert rel == f"{series.spec.study_uid}/{series.series_uid}/{uid}.dcm"
        stored = pydicom.dcmread(spool.path(rel))
        sent = pydicom.dcmread(path)
        assert stored.SOPInstanceUID == uid and stored.PixelData == sent.PixelData
    assert not list(spool.root.rglob("*.tmp"))
    kinds = [e.kind for e in store.events()]
    assert kinds.count(EventKind.SERIES_RECEIVED) == 1


def test_enhanced_ct_is_accepted(receiver, tmp_path):
    written = factory.write_enhanced_ct(tmp_path / "enh.dcm", n_slices=6, shape=(16, 16))
    assert send(receiver.port, [written.paths[0]]) == [StoreStatus.SUCCESS]
    assert receiver.store.instance_count(written.series_uid) == 1


@needs_dcmtk
def test_storescu_sends_a_folder(receiver, tmp_path):
    series = small_series(tmp_path / "in", n=4, transfer_syntax=factory.JPEGLSLossless)
    done = subprocess.run(
        ["storescu", "-xt", "-aet", "SCANNER", "-aec", AET, "+sd", "+r", HOST, str(receiver.port),
         str(tmp_path / "in")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert receiver.store.instance_count(series.series_uid) == 4
    rel = receiver.store.instance_path(series.sop_instance_uids[0])
    stored = pydicom.dcmread(receiver.spool.path(rel))
    assert stored.file_meta.TransferSyntaxUID == factory.JPEGLSLossless  # kept as sent


def test_other_sop_classes_are_refused_in_negotiation(receiver, tmp_path):
    assoc = associate(receiver.port, contexts=(MRImageStorage, CTImageStorage))
    assert assoc.is_established
    accepted = {str(c.abstract_syntax) for c in assoc.accepted_contexts}
    rejected = {str(c.abstract_syntax) for c in assoc.rejected_contexts}
    assert accepted == {CTImageStorage} and rejected == {MRImageStorage}
    mr = pydicom.dcmread(small_series(tmp_path / "mr", n=1).paths[0])
    mr.SOPClassUID = MRImageStorage
    with pytest.raises(ValueError, match="No presentation context"):
        assoc.send_c_store(mr)
    assoc.release()
    assert receiver.store.instance_count() == 0


@needs_dcmtk
def test_storescu_of_an_mr_file_is_refused(receiver, tmp_path):
    path = small_series(tmp_path / "mr", n=1).paths[0]
    ds = pydicom.dcmread(path)
    ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.save_as(path)
    done = subprocess.run(["storescu", "-aet", "SCANNER", "-aec", AET, HOST, str(receiver.port),
                           str(path)], capture_output=True, text=True, timeout=30)
    assert done.returncode != 0
    assert "presentation context" in (done.stdout + done.stderr).lower()
    assert receiver.store.instance_count() == 0


def test_missing_series_uid_is_a_dataset_mismatch(receiver, tmp_path):
    ds = pydicom.dcmread(small_series(tmp_path / "in", n=1).paths[0])
    del ds.SeriesInstanceUID
    assert send(receiver.port, [ds]) == [StoreStatus.DATASET_MISMATCH]
    assert receiver.store.instance_count() == 0
    refused = receiver.store.events(kind=EventKind.INSTANCE_REFUSED)
    assert refused and "0xA900" in refused[-1].detail


def test_disallowed_calling_ae_title_is_rejected(tmp_path):
    rx = Receiver(tmp_path, allowed_calling_aets=("CT1",))
    try:
        bad = associate(rx.port, aet="INTRUDER")
        assert bad.is_rejected and not bad.is_established
        assert bad.acceptor.primitive.diagnostic == Reject.CALLING_AE_NOT_RECOGNISED
        good = associate(rx.port, aet="CT1")
        assert good.is_established
        good.release()
        if shutil.which("echoscu"):
            done = subprocess.run(["echoscu", "-aet", "INTRUDER", "-aec", AET, HOST,
                                   str(rx.port)], capture_output=True, text=True, timeout=30)
            assert done.returncode != 0 and "Calling AE Title Not Recognized" in done.stderr
        events = rx.store.events(kind=EventKind.ASSOCIATION_REJECTED)
        assert len(events) >= 1 and "INTRUDER" in events[0].detail
    finally:
        rx.close()


def test_called_ae_title_must_be_ours(receiver):
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    assoc = ae.associate(HOST, receiver.port, ae_title="SOMEONE_ELSE")
    assert assoc.is_rejected


def test_disallowed_source_address_is_rejected(tmp_path):
    rx = Receiver(tmp_path, allowed_hosts=("10.0.0.0/8",))
    try:
        assoc = associate(rx.port)
        assert assoc.is_rejected
    finally:
        rx.close()
    rx = Receiver(tmp_path / "b", allowed_hosts=("127.0.0.0/8",))
    try:
        assoc = associate(rx.port)
        assert assoc.is_established
        assoc.release()
    finally:
        rx.close()


def test_max_associations(tmp_path):
    rx = Receiver(tmp_path, max_associations=1)
    try:
        first = associate(rx.port)
        assert first.is_established
        second = associate(rx.port)
        assert second.is_rejected
        first.release()
    finally:
        rx.close()


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_hostile_uids_stay_in_the_spool(receiver, tmp_path):
    ds = pydicom.dcmread(small_series(tmp_path / "in", n=1).paths[0])
    ds.StudyInstanceUID = "../../../../../../tmp"
    ds.SeriesInstanceUID = "../../../../escaped"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "../../../../evil"
    assert send(receiver.port, [ds]) == [StoreStatus.SUCCESS]
    rel = receiver.store.instance_path("../../../../evil")
    assert ".." not in rel and rel.count("/") == 2
    path = receiver.spool.path(rel)
    assert path.is_file() and path.is_relative_to(receiver.spool.root)
    files = [p for p in (tmp_path / "state").rglob("*") if p.is_file() and p.suffix == ".dcm"]
    assert files == [path]
    assert not (tmp_path / "escaped").exists() and not Path("/evil.dcm").exists()
    assert pydicom.dcmread(path).SeriesInstanceUID == "../../../../escaped"


def test_duplicate_instance_is_idempotent(receiver, tmp_path):
    series = small_series(tmp_path / "in", n=2)
    assert send(receiver.port, series.paths) == [0, 0]
    rel = receiver.store.instance_path(series.sop_instance_uids[0])
    before = receiver.spool.path(rel).stat()
    row_before = receiver.store.series_row(series.series_uid)
    assert send(receiver.port, series.paths[:1]) == [StoreStatus.SUCCESS]
    assert receiver.store.instance_count(series.series_uid) == 2
    row = receiver.store.series_row(series.series_uid)
    assert row["instance_count"] == 2 and row["last_instance_at"] == row_before["last_instance_at"]
    assert receiver.spool.path(rel).stat().st_mtime_ns == before.st_mtime_ns  # not rewritten
    dup = receiver.store.events(kind=EventKind.INSTANCE_DUPLICATE)
    assert [e.detail for e in dup] == [series.sop_instance_uids[0]]


def test_out_of_space_answers_a700_and_keeps_serving(tmp_path):
    failures = {"left": 1}

    def disk_full_once(path: Path, data: bytes) -> None:
        if failures["left"]:
            failures["left"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        write_durably(path, data)

    rx = Receiver(tmp_path, write_file=disk_full_once)
    try:
        series = small_series(tmp_path / "in", n=2)
        assert send(rx.port, series.paths) == [StoreStatus.OUT_OF_RESOURCES, StoreStatus.SUCCESS]
        assert rx.store.instance_path(series.sop_instance_uids[0]) is None  # not acknowledged
        assert not list(rx.spool.root.rglob("*.tmp"))
        assert send(rx.port, series.paths[:1]) == [StoreStatus.SUCCESS]  # the sender retries
        assert rx.store.instance_count(series.series_uid) == 2
        assoc = associate(rx.port)
        assert assoc.send_c_echo().Status == 0
        assoc.release()
        refused = rx.store.events(kind=EventKind.INSTANCE_REFUSED)
        assert len(refused) == 1 and "0xA700" in refused[0].detail
    finally:
        rx.close()


def test_reserve_below_min_free_answers_out_of_resources(tmp_path):
    rx = Receiver(tmp_path)
    try:
        rx.scp.min_free = rx.spool.free_bytes() * 2  # more than the disk has
        series = small_series(tmp_path / "in", n=1)
        assert send(rx.port, series.paths) == [StoreStatus.OUT_OF_RESOURCES]
    finally:
        rx.close()


def test_instance_over_the_size_limit_is_refused(tmp_path):
    rx = Receiver(tmp_path, max_instance_mb=0.001)
    try:
        series = small_series(tmp_path / "in", n=1)
        assert send(rx.port, series.paths) == [StoreStatus.INSTANCE_TOO_LARGE]
        assert rx.store.instance_count() == 0
    finally:
        rx.close()


def test_an_unexpected_error_becomes_a_status(receiver, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(receiver.store, "add_instance", broken)
    series = small_series(tmp_path / "in", n=1)
    assert send(receiver.port, series.paths) == [StoreStatus.PROCESSING_FAILURE]
    monkeypatch.undo()
    assert send(receiver.port, series.paths) == [StoreStatus.SUCCESS]


def test_concurrent_associations_all_recorded(tmp_path):
    rx = Receiver(tmp_path, max_associations=4)
    try:
        batches = [small_series(tmp_path / f"in{i}", n=3, seed=i) for i in range(3)]
        results: dict[int, list[int]] = {}
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, send(rx.port, batches[i].paths))) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(results[i] == [0, 0, 0] for i in range(3))
        assert rx.store.instance_count() == 9
    finally:
        rx.close()


# ----------------------------------------------------------------------------- config


def test_dicom_and_daemon_config_sections(tmp_path):
    f = tmp_path / "a.toml"
    f.write_text('[dicom]\nallowed_calling_aets = ["CT1", "CT2"]\nallowed_hosts = ["10.0.0.0/8"]\n'
                 '[daemon]\nstable_seconds = 2.5\nworkers = 2\n')
    config = load_config(f, env={"APPLIANCE_DICOM__PORT": "104"})
    assert config.dicom.allowed_calling_aets == ("CT1", "CT2")
    assert config.dicom.allowed_hosts == ("10.0.0.0/8",) and config.dicom.port == 104
    assert (config.daemon.stable_seconds, config.daemon.workers) == (2.5, 2)
    env = load_config(env={"APPLIANCE_DICOM__ALLOWED_CALLING_AETS": "A, B",
                           "APPLIANCE_DICOM__ALLOWED_HOSTS": ""})
    assert env.dicom.allowed_calling_aets == ("A", "B") and env.dicom.allowed_hosts == ()


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"APPLIANCE_DICOM__AE_TITLE": "A" * 17}, r"`dicom.ae_title` must be 1 to 16 printable"),
        ({"APPLIANCE_DICOM__ALLOWED_HOSTS": "scanner.local"},
         r"`dicom.allowed_hosts` must hold IP addresses or networks, got 'scanner.local'"),
        ({"APPLIANCE_DICOM__PORT": "70000"}, r"`dicom.port` must be in 0..65535, got 70000"),
        ({"APPLIANCE_DICOM__MAX_PDU": "100"}, r"`dicom.max_pdu` must be 0 \(unlimited\) or 4096"),
        ({"APPLIANCE_DAEMON__STABLE_SECONDS": "0"}, r"`daemon.stable_seconds` must be > 0"),
        ({"APPLIANCE_DAEMON__MAX_ATTEMPTS": "0"}, r"`daemon.max_attempts` must be >= 1, got 0"),
        ({"APPLIANCE_DAEMON__STABLE_SECOND": "1"}, r"did you mean 'stable_seconds'"),
    ],
)
def test_bad_dicom_and_daemon_config_is_refused(env, match):
    with pytest.raises(ConfigError, match=match):
        load_config(env=env)
