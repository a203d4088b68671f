"""appliance.tui: the dashboard driven with Textual's pilot against a real SQLite store filled
through the Store API with phantom scans (real DICOM in the spool, real NIfTI masks, results
quantified by appliance.pipeline from the phantom's exact truth): navigation, live updates,
reviews and patient inputs written back, alerts, the slice preview; snapshots of the three
screens at 80x24 and 160x48; the CLI's refusal without a store."""

from __future__ import annotations

import asyncio
import functools
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from textual.widgets import DataTable, Input, Static

from appliance import phantom
from appliance.config import ConfigError, load_config
from appliance.daemon import Paths, update_serial
from appliance.dicom.receive import Spool
from appliance.nifti import save_mask
from appliance.pipeline import qa
from appliance.pipeline.quantify import REGIONS, quantify
from appliance.store import ClinicalType, InstanceRecord, JobStage, Store
from appliance.tui import make_app
from appliance.tui.chart import draw_chart
from appliance.tui.data import load_preview, scan_view
from appliance.tui.overview import OverviewScreen
from appliance.tui.patient import PatientScreen
from appliance.tui.preview import SlicePreview
from appliance.tui.scan import ScanScreen
from appliance.volume import Volume
from tests import dicom_factory as factory

ROOT = Path(__file__).resolve().parents[1]
T0 = datetime(2020, 2, 1, 9, 0, tzinfo=UTC).timestamp()
DAY = 86400.0
UID = "1.2.826.0.1.3680043.8.498.77"
SPACING = (12.0, 7.0, 7.0)
SHAPE = (28, 48, 56)
SIZES = {"80x24": (80, 24), "160x48": (160, 48)}


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """Times on screen are local: pin the zone so that snapshots match on any machine."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# ----------------------------------------------------------------------------- seeded store


def _instance(series_uid: str, study_uid: str, patient: str, n: int, rel: str, size: int,
              at: float, description: str) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=f"{series_uid}.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_uid=series_uid, study_uid=study_uid, patient_id=patient, path=rel, size=size,
        received_at=at, calling_aet="CT1", source="10.0.3.7", patient_name=f"Demo^{patient}",
        patient_sex="F", patient_birth_date="19610304", modality="CT",
        series_description=description)


def add_scan(store: Store, paths: Paths, work: Path, *, patient: str, number: int, seed: int,
             severity: str, day: int, slices: int = SHAPE[0]) -> int:
    """A phantom scan spooled as real DICOM, analysed from its exact truth (quantify and QA
    as the pipeline runs them), its masks saved as the daemon saves them, and the result and
    the serial comparison stored through the job life cycle. Returns the result id."""
    ph = phantom.synthesize(seed, severity, spacing=SPACING, shape=(slices, *SHAPE[1:]), day=day)
    series_uid, study_uid = f"{UID}.{number}.2", f"{UID}.{number}.1"
    acquired = datetime.fromtimestamp(T0 + day * DAY, UTC).replace(tzinfo=None)
    written = factory.write_ct_series(
        work / series_uid, n_slices=slices, shape=SHAPE[1:], pixel_spacing=SPACING[1:],
        spacing=SPACING[0], hu=ph.hu.astype(float), patient_id=patient, series_uid=series_uid,
        study_uid=study_uid, study_date=acquired.strftime("%Y%m%d"),
        acquisition_time=acquired.strftime("%H%M%S"), seed=seed)
    spool = Spool(paths.spool)
    at = T0 + day * DAY + 60
    for n, path in enumerate(written.paths):
        rel = spool.relpath(study_uid, series_uid, f"{series_uid}.{n}")
        blob = path.read_bytes()
        spool.write(rel, blob)
        store.add_instance(_instance(series_uid, study_uid, patient, n, rel, len(blob), at,
                                     "Chest 2.5 lung"))
    job_id = store.queue_job(series_uid, now=at + 10)
    claim = store.claim_job("w0", now=at + 11, lease_s=60)
    assert claim is not None and claim.job.id == job_id
    q = quantify(ph.lobes, ph.opacity, float(np.prod(SPACING)) / 1000, ph.hu)
    checks = qa.run_checks(q["regions"], qa.QAInputs(ph.lobes, SPACING, None, 0.0, None, None),
                           load_config(env={}).qa)
    folder = paths.result_dir(series_uid)
    volume = Volume(ph.hu, SPACING)
    masks = {k: save_mask(folder / f"{k}.nii.gz", m, volume)
             for k, m in (("lobes", ph.lobes), ("opacity", ph.opacity))}
    result = {
        "schema_version": 1,
        "scan": {"patient_id": patient, "series_instance_uid": series_uid,
                 "study_instance_uid": study_uid, "acquired_at": acquired.isoformat(),
                 "manufacturer": "ACME", "kernel": "LUNG", "shape": [slices, *SHAPE[1:]],
                 "spacing_mm": list(SPACING), "slice_thickness_mm": SPACING[0]},
        **q, "qa": checks, "masks": {k: str(p) for k, p in masks.items()},
    }
    rel = {k: str(p.relative_to(paths.state)) for k, p in masks.items()}
    result_id = store.complete_job(job_id, "w0", result, result_path=None, lobes_path=rel["lobes"],
                                   opacity_path=rel["opacity"], nbytes=1, now=at + 30)
    update_serial(store, patient, load_config(env={}), now=at + 30)
    return result_id


def seed_state(state: Path, work: Path) -> dict:
    """Three analysed patients (one stable then improving, one progressing with high PLO and a
    QA failure, one mild), a refused series, a running job, a queued job, a series still
    arriving. Every time is fixed."""
    paths = Paths(state)
    paths.make()
    ids: dict = {}
    with Store.open(paths.db) as store:
        ids["p1"] = [add_scan(store, paths, work, patient="P001", number=10 + i, seed=12,
                              severity="moderate", day=d) for i, d in enumerate((0, 8, 28))]
        store.update_patient("P001", onset_date="2020-01-27", clinical_type="moderate", now=T0)
        update_serial(store, "P001", load_config(env={}), now=T0 + 29 * DAY)
        ids["p2"] = [add_scan(store, paths, work, patient="P002", number=20, seed=13,
                              severity="severe", day=1),
                     add_scan(store, paths, work, patient="P002", number=21, seed=13,
                              severity="severe", day=6, slices=20)]
        ids["p3"] = [add_scan(store, paths, work, patient="P003", number=30, seed=14,
                              severity="moderate", day=29)]
        at = T0 + 30 * DAY
        for number, patient, n, stage in ((40, "P004", 5, "failed"), (41, "P005", 40, "running"),
                                          (42, "P006", 40, "queued"), (43, "P007", 12, None)):
            series, study = f"{UID}.{number}.2", f"{UID}.{number}.1"
            for k in range(n):
                store.add_instance(_instance(series, study, patient, k, f"x/{series}/{k}.dcm", 1000,
                                             at + number, f"Chest {number}"))
            if stage is None:
                continue
            job_id = store.queue_job(series, now=at + number + 5)
            if stage == "queued":
                continue
            store.claim_job("w0", now=at + number + 6, lease_s=3600)
            if stage == "failed":
                store.fail_job(job_id, "w0", "refused: 5 usable slices (need at least 20)",
                               at + number + 7, JobStage.LOAD)
                ids["failed_job"] = job_id
            else:
                store.heartbeat(job_id, "w0", at + number + 8, 3600, JobStage.OPACITY)
                ids["running_job"] = job_id
    return ids


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("tui")
    ids = seed_state(root / "state", root / "dicom")
    return root / "state", ids


@pytest.fixture
def state(template, tmp_path) -> tuple[Path, dict]:
    """A private copy of the seeded state directory (tests write reviews and edits)."""
    src, ids = template
    dst = tmp_path / "state"
    shutil.copytree(src, dst)
    return dst, ids


@pytest.fixture
def app_store(state):
    """The dashboard's own read-only store, as `appliance dashboard` opens it."""
    path, ids = state
    with Store.open(path / "appliance.db", readonly=True) as store:
        yield store, ids, path


def config(**dashboard: str):
    return load_config(env={f"APPLIANCE_DASHBOARD__{k.upper()}": v for k, v in dashboard.items()})


def table_text(app, selector: str) -> list[str]:
    table = app.screen.query_one(selector, DataTable)
    return [" | ".join(str(c) for c in table.get_row_at(i)) for i in range(table.row_count)]


def static_text(app, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).render())


def pilot_test(test):
    """Run an async pilot test in its own event loop (no asyncio plugin needed)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        asyncio.run(test(*args, **kwargs))

    return run


async def wait_until(pilot, check, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await pilot.pause(0.05)
    raise AssertionError(f"condition not met within {timeout} s")


# ----------------------------------------------------------------------------- behaviour


@pilot_test
async def test_overview_shows_results_queue_series_and_alerts(app_store):
    store, ids, _ = app_store
    app = make_app(config(), store)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        assert isinstance(app.screen, OverviewScreen)
        results = table_text(app, "#results")
        assert len(results) == 6
        # newest analysis first: P003, then P002's follow-up with its trend, QA and PLO alert
        assert results[0].startswith("2020-03-01 09:00 | P003")
        assert results[1] == "2020-02-29 09:00 | P001 | 2.4 | 3 | ▼ -3.2 | ✓ ok | –"
        assert results[2] == "2020-02-09 09:00 | P001 | 5.6 | 6 | = +1.3 | ✓ ok | –"
        assert results[3] == "2020-02-07 09:00 | P002 | 48.4 ! | 18 | ▲ +17.4 | ! TRUNCATED | –"
        assert results[4] == "2020-02-02 09:00 | P002 | 30.9 ! | 13 | base | ✓ ok | –"
        assert results[5] == "2020-02-01 09:00 | P001 | 4.3 | 5 | base | ✓ ok | –"
        alerts = static_text(app, "#alerts").splitlines()
        assert [line.strip() for line in alerts] == [
            "! PLO 48.4% > 25%  P002  2020-02-07 09:00",
            "▲ progression +17.4 pts vs previous (≥ 5)  P002  2020-02-07 09:00",
            "! QA failed: TRUNCATED  P002  2020-02-07 09:00",
            "! PLO 30.9% > 25%  P002  2020-02-02 09:00",
            f"✗ job {ids['failed_job']} failed at load: refused: 5 usable slices (need at least "
            "20)  P004"]
        queue = table_text(app, "#queue")
        assert queue == [f"{ids['running_job']} | P005 | ▰▰▰▱ opacity",
                         f"{ids['running_job'] + 1} | P006 | queued",
                         f"{ids['failed_job']} | P004 | ✗ failed at load: refused: 5 usable "
                         "slices (need at least 20)"]
        series = table_text(app, "#series")
        assert series[:4] == ["P007 | 12 | receiving | Chest 43", "P006 | 40 | queued | Chest 42",
                              "P005 | 40 | running: opacity | Chest 41",
                              "P004 | 5 | failed | Chest 40"]
        assert series[4:] == ["P003 | 28 | done | Chest 2.5 lung"] + [
            f"{p} | {n} | done | Chest 2.5 lung" for p, n in
            (("P001", 28), ("P001", 28), ("P002", 20), ("P002", 28), ("P001", 28))]


@pilot_test
async def test_alert_thresholds_come_from_the_config(app_store):
    store, _, _ = app_store
    app = make_app(config(alert_plo_pct="50", alert_progress_pts="30"), store)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        alerts = static_text(app, "#alerts")
        assert "PLO" not in alerts and "progression" not in alerts
        assert "QA failed" in alerts and "failed at load" in alerts
        app2 = config(alert_plo_pct="4")
        assert app2.dashboard.alert_plo_pct == 4.0
    with pytest.raises(ConfigError, match=r"`dashboard.refresh_s` must be > 0, got 0.0"):
        config(refresh_s="0")


@pilot_test
async def test_navigation_between_the_three_screens(app_store):
    store, ids, _ = app_store
    app = make_app(config(), store)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.pause()
        await pilot.press("enter")  # the newest result: P003's scan
        assert isinstance(app.screen, ScanScreen) and app.screen.result_id == ids["p3"][0]
        await pilot.press("escape")
        await pilot.press("down", "down", "down", "p")  # P002's follow-up -> its patient
        assert isinstance(app.screen, PatientScreen) and app.screen.patient_id == "P002"
        assert len(table_text(app, "#scans")) == 2
        await pilot.press("enter")  # the highlighted (latest) scan
        assert isinstance(app.screen, ScanScreen) and app.screen.result_id == ids["p2"][1]
        await pilot.press("p")
        assert isinstance(app.screen, PatientScreen)
        await pilot.press("escape", "escape")
        assert isinstance(app.screen, PatientScreen)
        await pilot.press("o")
        assert isinstance(app.screen, OverviewScreen) and len(app.screen_stack) == 1


@pilot_test
async def test_patient_screen_serial_changes_and_chart(app_store):
    store, ids, _ = app_store
    app = make_app(config(), store)
    async with app.run_test(size=(160, 48)) as pilot:
        app.open_patient("P001")
        await pilot.pause()
        scans = table_text(app, "#scans")
        assert [row.split(" | ")[:6] for row in scans] == [
            ["0", "2020-02-01 09:00", "5", "4.3", "base", "✓ ok"],
            ["1", "2020-02-09 09:00", "13", "5.6", "= +1.3", "✓ ok"],
            ["2", "2020-02-29 09:00", "33", "2.4", "▼ -3.2", "✓ ok"]]
        changes = table_text(app, "#changes")  # the latest scan is highlighted
        assert changes[0] == "whole | 2.4 | -1.9 (-44%) | -3.2 (-57%)"
        assert [row.split(" | ")[0] for row in changes] == list(REGIONS)
        await pilot.press("up")
        assert table_text(app, "#changes")[0] == "whole | 5.6 | +1.3 (+30%) | +1.3 (+30%)"
        chart = app.screen.query_one("#chart")
        assert chart.border_title == "Whole-lung PLO % by day since onset"
        assert [(d, round(v, 1)) for d, v in chart.points] == [(5.0, 4.3), (13.0, 5.6),
                                                                  (33.0, 2.4)]
        drawn = str(chart.render())
        assert drawn.count("●") == 3 and "33" in drawn


@pilot_test
async def test_live_update_when_a_result_lands(app_store, tmp_path):
    store, _, path = app_store
    app = make_app(config(refresh_s="0.2"), store)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        assert len(table_text(app, "#results")) == 6
        with Store.open(path / "appliance.db") as writer:  # the daemon, in another connection
            writer.claim_job("w1", now=T0 + 35 * DAY, lease_s=3600)  # P006's queued job starts
            await wait_until(pilot, lambda: table_text(app, "#queue")[0].endswith(
                "P006 | ▱▱▱▱ claimed"), timeout=1.0)
            started = time.monotonic()
            new_id = add_scan(writer, Paths(path), tmp_path, patient="P009", number=90, seed=12,
                              severity="moderate", day=35)
            written = time.monotonic()
        await wait_until(pilot, lambda: len(table_text(app, "#results")) == 7, timeout=2.0)
        assert time.monotonic() - written < 1.0, f"seen {time.monotonic() - started:.2f} s later"
        assert table_text(app, "#results")[0].startswith("2020-03-07 09:00 | P009")
        results = app.screen.query_one("#results", DataTable)
        assert results.get_row_index(str(new_id)) == 0
        assert results.cursor_row == 0  # a cursor on the newest row follows the newest
        # a cursor the user moved down stays on its row when a newer result lands above it
        results.move_cursor(row=2, animate=False)
        chosen = results.coordinate_to_cell_key(results.cursor_coordinate).row_key.value
        with Store.open(path / "appliance.db") as writer:
            add_scan(writer, Paths(path), tmp_path, patient="P010", number=91, seed=13,
                     severity="moderate", day=36)
        await wait_until(pilot, lambda: len(table_text(app, "#results")) == 8, timeout=2.0)
        assert results.cursor_row == 3
        assert results.coordinate_to_cell_key(results.cursor_coordinate).row_key.value == chosen
        # a series growing while it arrives: the instance count follows
        with Store.open(path / "appliance.db") as writer:
            series, study = f"{UID}.43.2", f"{UID}.43.1"
            writer.add_instance(_instance(series, study, "P007", 99, "x/99.dcm", 1, T0 + 40 * DAY,
                                          "Chest 43"))
        await wait_until(pilot, lambda: table_text(app, "#series")[0]
                         == "P007 | 13 | receiving | Chest 43", timeout=1.0)


@pilot_test
async def test_review_score_is_saved_in_the_store(app_store):
    store, ids, _ = app_store
    result_id = ids["p2"][1]
    app = make_app(config(), store)
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_scan(result_id)
        await pilot.pause()
        await pilot.press("r")
        await pilot.press("ctrl+s")  # no score yet: refused in the dialog, nothing written
        assert "enter a score from 0 to 5" in static_text(app, "#error")
        await pilot.press("7", "3", "enter")  # 7 is not a score: the field keeps only 3
        assert app.screen.query_one("#score", Input).value == "3"
        await pilot.press(*"Dr Lee", "enter", *"lobes ok", "enter")
        await pilot.pause()
        assert isinstance(app.screen, ScanScreen)
        assert [(r["score"], r["reviewer"], r["comment"]) for r in store.reviews(result_id)] == [
            (3, "Dr Lee", "lobes ok")]
        assert "review 3/5 by Dr Lee" in static_text(app, "#qa")
        assert "✓ review 3/5 by Dr Lee" in static_text(app, "#scan-info")
        await pilot.press("r")  # the name is offered again
        assert app.screen.query_one("#reviewer", Input).value == "Dr Lee"
        await pilot.press("escape")
    assert len(store.reviews(result_id)) == 1


@pilot_test
async def test_onset_and_clinical_type_are_saved(app_store):
    store, _, _ = app_store
    app = make_app(config(), store)
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_patient("P002")
        await pilot.pause()
        assert "onset not recorded" in static_text(app, "#patient-info")
        await pilot.press("e")
        await pilot.press(*"2020-13-45", "ctrl+s")
        assert "`onset_date` must be an ISO date" in static_text(app, "#error")
        assert store.patient("P002").onset_date is None
        onset = app.screen.query_one("#onset", Input)
        onset.value = ""
        onset.focus()
        await pilot.press(*"2020-01-30", "enter")  # on to the clinical types
        await pilot.press("down", "down", "space", "ctrl+s")  # severe
        await pilot.pause()
        assert isinstance(app.screen, PatientScreen)
        patient = store.patient("P002")
        assert (patient.onset_date, patient.clinical_type) == ("2020-01-30", ClinicalType.SEVERE)
        info = static_text(app, "#patient-info")
        assert "onset 2020-01-30" in info and "clinical type severe" in info
        # days now count from the onset
        assert [row.split(" | ")[2] for row in table_text(app, "#scans")] == ["3", "8"]


@pilot_test
async def test_slice_preview_scrolls_and_reads_without_colour(app_store):
    store, ids, _ = app_store
    app = make_app(config(), store)
    async with app.run_test(size=(160, 48)) as pilot:
        app.open_scan(ids["p2"][0])
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        widget = app.screen.query_one("#preview", SlicePreview)
        assert widget.preview is not None and widget.preview.hu is not None  # CT + masks
        start = widget.index
        assert start == int(np.argmax((widget.preview.opacity > 0).sum(axis=(1, 2))))
        assert widget.border_title == f"Axial slice {start + 1}/28"
        await pilot.press("up", "up", "down")
        assert widget.index == start + 1
        await pilot.press("pagedown", "pagedown", "pagedown")
        assert widget.index == 0 and widget.border_title == "Axial slice 1/28"
        await pilot.press("pageup", "pageup")
        coloured = widget.render()
        assert "▀" in coloured.plain and any(span.style for span in coloured.spans)
        await pilot.press("m")
        symbols = widget.render().plain
        assert "▒" in symbols and "·" in symbols and any(d in symbols for d in "12345")
        assert "▒ GGO  █ consolidation" in static_text(app, "#legend")


@pilot_test
async def test_preview_says_why_masks_are_missing(app_store):
    store, ids, path = app_store
    view = scan_view(store, load_config(env={}), ids["p1"][0])
    view.masks["opacity"].unlink()
    app = make_app(config(), store)
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_scan(ids["p1"][0])
        await pilot.pause()
        assert "No preview: mask files missing" in str(app.screen.query_one("#preview").render())
    # the CT deleted, masks kept: masks alone, and the panel says so
    view = scan_view(store, load_config(env={}), ids["p1"][1])
    view.ct_files[0].unlink()
    preview = load_preview(scan_view(store, load_config(env={}), ids["p1"][1]))
    assert preview.hu is None and preview.note == "CT images no longer kept: masks only"
    # retention purged the series: the store no longer points at masks
    with Store.open(path / "appliance.db") as writer:
        assert writer.mark_purged(view.series_uid, writer.series_files(view.series_uid),
                                  "retention test", T0 + 60 * DAY)
    app = make_app(config(), store)
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_scan(ids["p1"][1])
        await pilot.pause()
        assert str(app.screen.query_one("#preview").render()) == \
            "No preview: masks deleted by retention."


@pilot_test
async def test_without_colour_the_preview_starts_in_symbols(app_store, monkeypatch):
    store, ids, _ = app_store
    monkeypatch.setenv("NO_COLOR", "1")
    app = make_app(config(), store)
    async with app.run_test(size=(80, 24)) as pilot:
        app.open_scan(ids["p2"][0])
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()
        widget = app.screen.query_one("#preview", SlicePreview)
        assert widget.symbols and "▒" in widget.render().plain
        assert "▒ GGO" in static_text(app, "#legend")


def test_chart_marks_points_and_the_alert_threshold():
    text = draw_chart([(0.0, 10.0), (10.0, 40.0)], width=40, height=10, threshold=25.0).plain
    rows = text.splitlines()
    assert rows[0].startswith("   50┤")
    point_rows = [i for i, r in enumerate(rows) if "●" in r]
    assert len(point_rows) == 2 and point_rows[0] < point_rows[1]  # 40% above 10%
    assert any("┄" in r and "! 25%" in r for r in rows)
    assert rows[-1].split() == ["0", "10"]
    assert draw_chart([], 40, 10).plain == "no analysed scans"


def test_make_app_checks_its_arguments(tmp_path):
    with pytest.raises(TypeError, match="`store` must be a Store, got str"):
        make_app(load_config(env={}), "appliance.db")


def test_cli_without_a_store_refuses_with_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "appliance.cli", "dashboard", "--state-dir",
                          str(tmp_path / "none")], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"appliance: no database at {tmp_path / 'none' / 'appliance.db'} (has the daemon run "
        "with this state dir?)"]


# ----------------------------------------------------------------------------- snapshots


@pytest.mark.parametrize("size", list(SIZES))
def test_snapshot_overview(snap_compare, app_store, size):
    store, _, _ = app_store
    assert snap_compare(make_app(config(), store), terminal_size=SIZES[size])


@pytest.mark.parametrize("size", list(SIZES))
def test_snapshot_patient(snap_compare, app_store, size):
    store, _, _ = app_store

    async def open_patient(pilot):
        pilot.app.open_patient("P001")
        await pilot.pause()

    assert snap_compare(make_app(config(), store), terminal_size=SIZES[size],
                        run_before=open_patient)


def test_snapshot_scan_80x24(snap_compare, app_store):
    """The scan screen with its colour slice preview."""
    store, ids, _ = app_store

    async def open_scan(pilot):
        pilot.app.open_scan(ids["p2"][1])
        await pilot.pause()
        await pilot.app.workers.wait_for_complete()
        await pilot.pause()

    assert snap_compare(make_app(config(), store), terminal_size=SIZES["80x24"],
                        run_before=open_scan)


def test_snapshot_scan_160x48_after_retention(snap_compare, app_store):
    """The wide scan screen of a series whose files retention deleted: figures, QA and review
    stay, the preview panel says why it is empty (a full-size image snapshot would be 1 MB)."""
    store, ids, path = app_store
    uid = store.scans("P001")[0].series_uid
    with Store.open(path / "appliance.db") as writer:
        assert writer.mark_purged(uid, writer.series_files(uid), "retention", T0 + 60 * DAY)

    async def open_scan(pilot):
        pilot.app.open_scan(ids["p1"][0])
        await pilot.pause()

    assert snap_compare(make_app(config(), store), terminal_size=SIZES["160x48"],
                        run_before=open_scan)
