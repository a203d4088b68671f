"""Sending results: the retry policy, status classification, and real C-STOREs to a real Orthanc.

The Orthanc tests skip (with the reason) only when the Orthanc binary is not installed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from appliance.analysis import Analysis
from appliance.dicom.outputs import write_dicom_outputs
from appliance.dicom.send import (
    DEFAULT_RETRY,
    CStoreStatus,
    Destination,
    Outcome,
    RetryPolicy,
    classify_status,
    describe_status,
    next_attempt_delay,
    send_files,
)
from appliance.dicom.series import load_series
from tests import dicom_factory as factory
from tests.orthanc import HOST, find_orthanc, free_port, needs_orthanc, start_orthanc
from tests.test_dicom_outputs import make_result, synthetic_masks

TIMEOUT_S = 30.0  # generous: on a loaded 2-core machine Orthanc took over 5 s to answer (RETRY, not the rejection)


# ----------------------------------------------------------------------------- pure parts


def test_backoff_grows_exponentially_up_to_the_cap():
    delays = [next_attempt_delay(n) for n in range(1, 12)]
    assert delays[:4] == [30.0, 60.0, 120.0, 240.0]
    assert delays == sorted(delays) and max(delays) == DEFAULT_RETRY.max_s == 3600.0
    assert next_attempt_delay(10_000) == 3600.0
    quick = RetryPolicy(base_s=1.0, factor=3.0, max_s=10.0)
    assert [next_attempt_delay(n, quick) for n in (1, 2, 3, 4)] == [1.0, 3.0, 9.0, 10.0]
    with pytest.raises(ValueError, match="`attempts` must be >= 1"):
        next_attempt_delay(0)
    with pytest.raises(TypeError, match="`attempts` must be an int, got float"):
        next_attempt_delay(1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`max_s` must be >= base_s"):
        RetryPolicy(base_s=10.0, max_s=5.0)


@pytest.mark.parametrize(("code", "outcome"), [
    (CStoreStatus.SUCCESS, Outcome.SENT),
    (0xB000, Outcome.WARNING),  # coercion of data elements
    (0xB007, Outcome.WARNING),  # data set does not match SOP class
    (CStoreStatus.OUT_OF_RESOURCES, Outcome.RETRY),
    (0xA701, Outcome.RETRY),
    (CStoreStatus.RESOURCE_LIMITATION, Outcome.RETRY),
    (CStoreStatus.CANCEL, Outcome.RETRY),
    (0xA900, Outcome.FAILED),  # data set does not match SOP class
    (0xC000, Outcome.FAILED),  # cannot understand
    (CStoreStatus.SOP_CLASS_NOT_SUPPORTED, Outcome.FAILED),
    (CStoreStatus.NOT_AUTHORIZED, Outcome.FAILED),
])
def test_statuses_map_to_outcomes(code, outcome):
    assert classify_status(int(code)) is outcome
    assert outcome.delivered == (outcome in (Outcome.SENT, Outcome.WARNING))
    assert describe_status(int(code)).startswith(f"0x{int(code):04X} ")


def test_destinations_are_checked():
    dest = Destination.parse("PACS@10.0.0.5:104", timeout_s=2.0)
    assert (dest.ae_title, dest.host, dest.port, dest.timeout_s) == ("PACS", "10.0.0.5", 104, 2.0)
    assert str(dest) == "PACS@10.0.0.5:104"
    with pytest.raises(ValueError, match="`destination` must look like AE@host:port"):
        Destination.parse("PACS:104")
    with pytest.raises(ValueError, match="`ae_title` must be 1 to 16 printable ASCII"):
        Destination("A" * 17, "pacs", 104)
    with pytest.raises(ValueError, match="`calling_ae_title` must be 1 to 16"):
        Destination("PACS", "pacs", 104, calling_ae_title="   ")
    with pytest.raises(ValueError, match="`port` must be in 1..65535, got 0"):
        Destination("PACS", "pacs", 0)
    with pytest.raises(TypeError, match="`port` must be an int, got str"):
        Destination("PACS", "pacs", "104")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`files` must be a sequence of paths"):
        send_files(dest, "/tmp/a.dcm")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- with Orthanc


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[Analysis, list[Path]]:
    """The DICOM outputs (SEG, SR, three key images) of a small series."""
    tmp = tmp_path_factory.mktemp("send")
    factory.write_ct_series(tmp / "ct", n_slices=22, patient_id="SEND01")
    volume, info = load_series(tmp / "ct")
    lobes, opacity = synthetic_masks(volume.array)
    analysis = Analysis(make_result(volume, info, lobes, opacity), lobes, opacity, volume, info)
    return analysis, write_dicom_outputs(analysis, tmp / "out")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    if find_orthanc() is None:
        pytest.skip("Orthanc binary not installed (apt-get install orthanc)")
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"), ae_title="ORTHANC")
    yield server
    server.stop()


def destination(port: int, ae_title: str = "ORTHANC") -> Destination:
    return Destination(ae_title, HOST, port, timeout_s=TIMEOUT_S)


@needs_orthanc
def test_results_arrive_in_orthanc(results, orthanc):
    analysis, paths = results
    report = send_files(destination(orthanc.dicom_port), paths)
    assert report.ok and report.association_error is None, report.summary()
    assert [f.path for f in report.files] == paths
    assert all(f.outcome is Outcome.SENT and f.status == 0 for f in report.files)
    ours = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}
    assert {f.sop_instance_uid for f in report.files} == set(ours)
    stored = {}
    for orthanc_id in orthanc.instances():
        tags = orthanc.instance_tags(orthanc_id)
        if tags["SOPInstanceUID"] in ours:
            stored[tags["SOPInstanceUID"]] = tags
    assert set(stored) == set(ours)
    for tags in stored.values():
        assert tags["StudyInstanceUID"] == analysis.info.study_instance_uid
        assert tags["PatientID"] == "SEND01"
    # one series per modality, holding what we sent
    series = {orthanc.get(f"/instances/{i}")["ParentSeries"] for i in orthanc.instances()
              if orthanc.instance_tags(i)["SOPInstanceUID"] in ours}
    modalities = {}
    for sid in series:
        info = orthanc.get(f"/series/{sid}")
        modalities[info["MainDicomTags"]["Modality"]] = len(info["Instances"])
    assert modalities == {"SEG": 1, "SR": 1, "OT": 3}


@needs_orthanc
def test_rejection_and_unreadable_files_are_permanent_failures(results, orthanc, tmp_path):
    _, paths = results
    report = send_files(destination(orthanc.dicom_port, "NOT_ORTHANC"), paths[:2])
    assert [f.outcome for f in report.files] == [Outcome.FAILED] * 2
    assert "Called AE title not recognised" in report.association_error
    assert "NOT_ORTHANC@" in report.files[0].message
    garbage = factory.write_garbage(tmp_path / "garbage.dcm")
    report = send_files(destination(orthanc.dicom_port), [garbage, paths[1]])
    assert [f.outcome for f in report.files] == [Outcome.FAILED, Outcome.SENT]
    assert report.files[0].message.startswith(f"cannot read {garbage}")
    assert report.summary().endswith("1 of 2 delivered, 0 to retry, 1 failed")
    with pytest.raises(ValueError, match="`files` must not list an instance twice"):
        send_files(destination(orthanc.dicom_port), [paths[0], paths[1], paths[0]])


@needs_orthanc
def test_a_fast_rejection_is_never_reported_as_an_abort(results, orthanc):
    """pynetdicom alone reports about 1 in 30 of Orthanc's rejections as aborts (a race in its
    requestor); 60 in a row all come out as rejections only because the sender asks again."""
    _, paths = results
    reports = [send_files(destination(orthanc.dicom_port, "NOT_ORTHANC"), paths[:1]) for _ in range(60)]
    assert [r.files[0].outcome for r in reports] == [Outcome.FAILED] * 60
    assert all("Called AE title not recognised" in r.association_error for r in reports)


@needs_orthanc
def test_down_then_up_delivers_every_file_once(results, tmp_path):
    """The outbox's loop: attempt, wait next_attempt_delay, resend only what is to retry."""
    _, paths = results
    port = free_port()
    dest = destination(port)
    first = send_files(dest, paths)
    assert first.to_retry == first.files and not first.delivered
    assert f"cannot connect to {HOST}:{port}" in first.association_error
    assert "refused" in first.association_error.lower()
    assert all(f.message == first.association_error for f in first.files)
    assert next_attempt_delay(1) > 0

    with start_orthanc(tmp_path / "orthanc", dicom_port=port) as server:
        pending = [f.path for f in first.to_retry]
        second = send_files(dest, pending)
        assert second.ok and len(second.delivered) == len(paths), second.summary()
        third_round = [f.path for f in second.to_retry]
        assert third_round == []  # nothing left: the outbox sends nothing more
        assert len(server.instances()) == len(paths)
        assert len(server.changes("NewInstance")) == len(paths)
        # A resend would show: Orthanc (OverwriteInstances) stamps each reception.
        received = {i: server.get(f"/instances/{i}/metadata?expand")["ReceptionDate"]
                    for i in server.instances()}
        time.sleep(1.1)  # ReceptionDate has one-second resolution
        again = send_files(dest, paths[:1])
        assert again.ok
        after = {i: server.get(f"/instances/{i}/metadata?expand")["ReceptionDate"]
                 for i in server.instances()}
        changed = [i for i in after if after[i] != received[i]]
        assert len(changed) == 1 and len(after) == len(paths)
