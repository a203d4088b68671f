"""appliance.research on a real SQLite store filled with phantom patients of known truth.

The truth of each scan is :func:`appliance.pipeline.quantify.quantify` on a small phantom's
exact masks (:func:`appliance.phantom.synthesize`, the model behind `appliance phantom`), for
``N_PER_TYPE`` patients of each clinical type with a baseline and two follow-ups on the
phantom's own course. The stored results are that truth with a bounded error: every lobe's
opacity volume moves by at most ``EPS`` percentage points of the lobe's lung volume, so every
region's PLO (lobes, sides, whole: volume-weighted averages of the lobes) is within ``EPS`` of
the truth. The results go in through the store's real job path (instance, job, claim, complete).

What the cohort report must then satisfy, each computed here with scipy/numpy independently:
on the stored values, every number exactly (the right test chosen by the normality rule, the
right pairs and groups); against the truth, medians, quartiles and means within ``EPS``, the
fitted curve within ``EPS * sqrt(n)`` (a least-squares fit is a projection), and the same
conclusion (p < alpha) wherever the truth's p-value is far from alpha.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats as sps

from appliance import phantom as ph
from appliance.cli import main
from appliance.phantom_cli import study_days
from appliance.pipeline.quantify import REGIONS, lobe_severity, quantify
from appliance.research import csv_export
from appliance.research import stats as rstats
from appliance.research.cohort import GROUPS, PAIRS, TIME_POINTS
from appliance.store import InstanceRecord, Store

EPS = 0.05
"""Largest error added to any region's PLO (percentage points)."""
ALPHA = 0.05
FAR = 5.0
"""A p-value is 'far from alpha' below alpha / FAR or above alpha * FAR."""
N_PER_TYPE = 6
TYPES = ("mild", "moderate", "severe", "critical")
SHAPE, SPACING = (40, 64, 64), (9.0, 7.0, 7.0)
"""A small grid (about 0.2 s per phantom) that still holds the whole chest."""
BASE_DATE = date(2020, 2, 1)
LOBES = REGIONS[3:]
SIDES = {"right": ("RUL", "RML", "RLL"), "left": ("LUL", "LLL")}
FLAGGED = ("LOBE_TINY", "LOBE_TINY", "MOTION")


@dataclass
class Scan:
    patient_id: str
    clinical_type: str | None
    index: int
    when: str
    truth: dict
    stored: dict
    result_id: int = 0


@dataclass
class Cohort:
    state: Path
    scans: list[Scan] = field(default_factory=list)
    onset: dict[str, date | None] = field(default_factory=dict)

    def plo(self, which: str, region: str, tp: int, group: str) -> list[float]:
        vals = [getattr(s, which)["regions"][region]["plo_pct"] for s in self.scans
                if s.index == tp and (group == "all" or s.clinical_type == group)]
        return [v for v in vals if v is not None]

    def pairs(self, which: str, region: str, a: int, b: int, group: str):
        by = {(s.patient_id, s.index): getattr(s, which)["regions"][region]["plo_pct"]
              for s in self.scans if group == "all" or s.clinical_type == group}
        out = [(by[(p, a)], by[(p, b)]) for p, i in by if i == a and (p, b) in by]
        out = [(x, y) for x, y in out if x is not None and y is not None]
        return [x for x, _ in out], [y for _, y in out]


# ----------------------------------------------------------------------------- building the store


def _fields(lung: float, ggo: float, cons: float, hu: float | None) -> dict:
    def pct(part: float) -> float | None:
        return 100.0 * part / lung if lung > 0 else None

    return {"lung_ml": lung, "opacity_ml": ggo + cons, "ggo_ml": ggo, "consolidation_ml": cons,
            "plo_pct": pct(ggo + cons), "ggo_pct": pct(ggo), "consolidation_pct": pct(cons),
            "mean_lung_hu": hu}


def with_error(truth: dict, rng: np.random.Generator) -> dict:
    """The truth with each lobe's opacity moved by at most EPS points of its lung volume (same
    GGO/consolidation split); sides and whole summed from the lobes, as quantify does."""
    regions = {}
    for lobe in LOBES:
        t = truth["regions"][lobe]
        lung, opacity = t["lung_ml"], t["opacity_ml"]
        new = max(0.0, opacity + rng.uniform(-EPS, EPS) * lung / 100.0)
        ggo, cons = ((t["ggo_ml"] * new / opacity, t["consolidation_ml"] * new / opacity)
                     if opacity > 0 else (new, 0.0))
        regions[lobe] = _fields(lung, ggo, cons, t["mean_lung_hu"])
        regions[lobe]["severity"] = lobe_severity(regions[lobe]["plo_pct"])
    for side, lobes in {**SIDES, "whole": LOBES}.items():
        regions[side] = _fields(*(sum(regions[lb][k] for lb in lobes)
                                  for k in ("lung_ml", "ggo_ml", "consolidation_ml")),
                                truth["regions"][side]["mean_lung_hu"])
    return {"regions": {r: regions[r] for r in REGIONS},
            "severity_score": sum(regions[lb]["severity"] for lb in LOBES)}


def phantom_truth(seed: int, severity: str, day: int) -> tuple[dict, float]:
    p = ph.synthesize(seed, severity, spacing=SPACING, shape=SHAPE, day=day)
    return quantify(p.lobes, p.opacity, float(np.prod(p.spacing)) / 1000.0, hu=p.hu), \
        p.meta["days_since_onset"]


def result_json(pid: str, series: str, when: str, stored: dict, flags=()) -> dict:
    return {"schema_version": 1, "software": {"name": "appliance", "version": "test"},
            "intended_use": "research and triage support; not a diagnosis",
            "scan": {"patient_id": pid, "series_instance_uid": series, "acquired_at": when},
            **stored,
            "qa": {"ok": not flags, "flags": [{"code": c, "message": c} for c in flags]}}


def insert(store: Store, scan: Scan, series: str, flags=()) -> int:
    store.add_instance(InstanceRecord(
        sop_instance_uid=f"{series}.1", sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_uid=series, study_uid=f"{series}.0", patient_id=scan.patient_id,
        path=f"{series}/1.dcm", size=1, received_at=1000.0, modality="CT"))
    job = store.queue_job(series, now=1001.0)
    store.claim_job("test", now=1002.0, lease_s=60)
    return store.complete_job(job, "test", result_json(scan.patient_id, series, scan.when,
                                                       scan.stored, flags),
                              result_path=None, lobes_path=None, opacity_path=None, nbytes=0,
                              now=1003.0)


def build(state: Path, plan: list[tuple[str, str | None, int, int, bool]], seed0: int = 1) -> Cohort:
    """plan: (patient id, clinical type or None, phantom seed, number of scans, onset known)."""
    cohort = Cohort(state)
    rng = np.random.default_rng(seed0)
    with Store.open(state / "appliance.db") as store:
        for k, (pid, ctype, seed, n_scans, with_onset) in enumerate(plan):
            severity = ctype or "moderate"
            days = study_days(seed, n_scans - 1)
            base = BASE_DATE + timedelta(days=k)
            onset_days = None
            for i, day in enumerate(days):
                truth, since_onset = phantom_truth(seed, severity, day)
                onset_days = since_onset if i == 0 else onset_days
                when = f"{base + timedelta(days=day)}T{9 + i:02d}:15:00"
                scan = Scan(pid, ctype, i, when, truth, with_error(truth, rng))
                flags = FLAGGED if (k, i) == (0, 1) else ()
                scan.result_id = insert(store, scan, f"1.2.826.0.1.{seed}.{i}", flags)
                cohort.scans.append(scan)
            onset = base - timedelta(days=round(onset_days)) if with_onset else None
            cohort.onset[pid] = onset
            store.update_patient(pid, onset_date=onset, clinical_type=ctype)
    return cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Cohort:
    plan = [(f"{t.upper()[:3]}{j}", t, 100 * (i + 1) + j, 3, True)
            for i, t in enumerate(TYPES) for j in range(N_PER_TYPE)]
    plan[-1] = (plan[-1][0], "critical", plan[-1][2], 4, True)  # a third follow-up
    plan.append(("UNTYPED", None, 999, 1, False))  # no clinical type, no onset, baseline only
    c = build(tmp_path_factory.mktemp("state"), plan)
    with Store.open(c.state / "appliance.db") as store:
        first = c.scans[0].result_id
        store.add_review(first, 2, "Dr. A", now=2000.0)
        store.add_review(first, 4, "Dr. B", now=2001.0)
    return c


@pytest.fixture(scope="module")
def report(cohort, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("report")
    assert main(["cohort", "report", "--state-dir", str(cohort.state), "--out", str(out)]) == 0
    return out, json.loads((out / "stats.json").read_text())


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "appliance.cli", *args], capture_output=True,
                          text=True, timeout=120)


def export(capsys, *args: str) -> tuple[list[str], list[dict], str]:
    capsys.readouterr()
    assert main(["export", "csv", *args]) == 0
    captured = capsys.readouterr()
    reader = csv.DictReader(io.StringIO(captured.out))
    rows = list(reader)
    return list(reader.fieldnames or []), rows, captured.err


# ----------------------------------------------------------------------------- CSV


def expected_columns() -> list[str]:
    cols = ["patient_id", "series_uid", "result_id", "study_date", "study_time", "acquired_at",
            "scan_index", "time_point", "onset_date", "days_since_onset", "clinical_type",
            "days_since_baseline", "days_since_previous"]
    for r in REGIONS:
        cols += [f"{r}_plo_pct", f"{r}_lung_ml", f"{r}_opacity_ml", f"{r}_ggo_pct",
                 f"{r}_consolidation_pct"]
    cols += [f"{lb}_severity" for lb in LOBES]
    cols += ["severity_score", "qa_ok", "qa_flags", "review_score", "review_count"]
    for r in REGIONS:
        cols += [f"{r}_delta_pts_vs_baseline", f"{r}_change_pct_vs_baseline",
                 f"{r}_delta_pts_vs_previous", f"{r}_change_pct_vs_previous"]
    return cols + ["trend"]


def test_csv_columns_are_the_documented_stable_names():
    assert list(csv_export.COLUMNS) == expected_columns()
    doc = csv_export.__doc__
    for col in csv_export.COLUMNS:
        head, _, rest = col.partition("_")
        template = (f"<lobe>_{rest}" if head in LOBES and rest == "severity"
                    else f"<region>_{rest}" if head in REGIONS else col)
        assert f"\n{template} " in doc, f"column {col} is not documented as {template}"


def test_csv_one_row_per_scan_and_numbers_round_trip_exactly(cohort, capsys):
    header, rows, _ = export(capsys, "--state-dir", str(cohort.state))
    assert header == expected_columns()
    assert len(rows) == len(cohort.scans)
    by_result = {int(r["result_id"]): r for r in rows}
    assert set(by_result) == {s.result_id for s in cohort.scans}
    baseline = {s.patient_id: s for s in cohort.scans if s.index == 0}
    for scan in cohort.scans:
        row = by_result[scan.result_id]
        assert row["patient_id"] == scan.patient_id
        assert (row["study_date"], row["study_time"]) == tuple(scan.when.split("T"))
        assert int(row["scan_index"]) == scan.index
        assert row["time_point"] == ("baseline" if scan.index == 0 else f"follow-up {scan.index}")
        assert row["clinical_type"] == (scan.clinical_type or "")
        onset = cohort.onset[scan.patient_id]
        assert row["days_since_onset"] == (
            "" if onset is None else str((date.fromisoformat(scan.when[:10]) - onset).days))
        for region in REGIONS:
            stored = scan.stored["regions"][region]
            for m in csv_export.MEASURES:
                cell, value = row[f"{region}_{m}"], stored[m]
                assert (cell == "") if value is None else float(cell) == value, (region, m)
            delta = row[f"{region}_delta_pts_vs_baseline"]
            base = baseline[scan.patient_id].stored["regions"][region]["plo_pct"]
            if scan.index == 0 or base is None or stored["plo_pct"] is None:
                assert delta == ""
            else:
                assert float(delta) == stored["plo_pct"] - base
        for lobe in LOBES:
            assert int(row[f"{lobe}_severity"]) == scan.stored["regions"][lobe]["severity"]
        assert int(row["severity_score"]) == scan.stored["severity_score"]
    first, flagged = cohort.scans[0], cohort.scans[1]
    assert by_result[first.result_id]["review_score"] == "4"  # the later of two reviews
    assert by_result[first.result_id]["review_count"] == "2"
    assert by_result[cohort.scans[2].result_id]["review_score"] == ""
    assert by_result[flagged.result_id]["qa_ok"] == "false"
    assert by_result[flagged.result_id]["qa_flags"] == "LOBE_TINY;MOTION"
    assert by_result[first.result_id]["qa_ok"] == "true"
    assert by_result[first.result_id]["trend"] == ""
    assert by_result[flagged.result_id]["trend"] in {"progressing", "improving", "stable"}


def test_csv_since_filters_by_study_date_and_keeps_the_real_baseline(cohort, capsys, tmp_path):
    since = BASE_DATE + timedelta(days=12)
    _, rows, _ = export(capsys, "--state-dir", str(cohort.state), "--since", since.isoformat())
    expected = {s.result_id for s in cohort.scans if date.fromisoformat(s.when[:10]) >= since}
    assert 0 < len(expected) < len(cohort.scans)
    assert {int(r["result_id"]) for r in rows} == expected
    # a follow-up whose baseline was filtered out still compares with that baseline
    assert any(r["scan_index"] != "0" and r["whole_delta_pts_vs_baseline"] != "" for r in rows)
    out = tmp_path / "sub" / "scans.csv"
    assert main(["export", "csv", "--state-dir", str(cohort.state), "--since", since.isoformat(),
                 "-o", str(out)]) == 0
    assert "wrote" in capsys.readouterr().err
    assert len(list(csv.DictReader(out.open()))) == len(expected)
    assert [p.name for p in out.parent.iterdir()] == ["scans.csv"]  # no temporary left behind


def test_bad_since_is_refused_in_one_line(cohort):
    proc = run_cli("export", "csv", "--state-dir", str(cohort.state), "--since", "2020-13-45")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "appliance: --since must be a date YYYY-MM-DD, got '2020-13-45'"
    assert proc.stdout == ""


def test_a_reader_that_stops_early_is_not_a_failure(cohort):
    # 74 rows of about 2.5 kB overflow the pipe's buffer, so the writer meets a closed pipe
    proc = subprocess.Popen([sys.executable, "-m", "appliance.cli", "export", "csv", "--state-dir",
                             str(cohort.state)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().startswith(b"patient_id,")
    proc.stdout.close()
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""


def test_empty_store_csv_is_header_only_exit_0_and_report_is_refused(tmp_path):
    Store.open(tmp_path / "appliance.db").close()
    proc = run_cli("export", "csv", "--state-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [",".join(expected_columns())]
    assert "no analysed scans" in proc.stderr
    proc = run_cli("cohort", "report", "--state-dir", str(tmp_path), "--out", str(tmp_path / "r"))
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("appliance: no analysed scans in ")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "r").exists()
    proc = run_cli("export", "csv", "--state-dir", str(tmp_path / "missing"))
    assert proc.returncode == 2 and proc.stderr.startswith("appliance: no database at ")


# ----------------------------------------------------------------------------- the cohort report


def rel_equal(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def shapiro_normal(x) -> bool:
    x = np.asarray(x, dtype=float)
    return bool(x.size >= 3 and np.ptp(x) > 0 and sps.shapiro(x).pvalue >= ALPHA)


def far(p: float | None) -> bool:
    return p is not None and (p < ALPHA / FAR or p > ALPHA * FAR)


def test_report_summaries_equal_scipy_on_the_stored_values_and_the_truth_within_eps(cohort, report):
    _, data = report
    assert data["method"]["alpha"] == ALPHA and "Shapiro-Wilk" in data["method"]["rule"]
    assert len(data["summaries"]) == len(REGIONS) * len(TIME_POINTS) * len(GROUPS)
    checked = 0
    for s in data["summaries"]:
        tp = TIME_POINTS.index(s["time_point"])
        stored = cohort.plo("stored", s["region"], tp, s["group"])
        truth = cohort.plo("truth", s["region"], tp, s["group"])
        assert s["n"] == len(stored) == len(truth)
        if not stored:
            assert s["median"] is None
            continue
        assert rel_equal(s["median"], float(np.median(stored)))
        assert rel_equal(s["mean"], float(np.mean(stored)))
        assert rel_equal(s["q1"], float(np.percentile(stored, 25)))
        assert s["reported"] == ("mean (SD)" if shapiro_normal(stored) else "median (IQR)")
        for key, value in (("median", np.median(truth)), ("mean", np.mean(truth)),
                           ("q1", np.percentile(truth, 25)), ("q3", np.percentile(truth, 75))):
            assert abs(s[key] - value) <= EPS + 1e-9, (s["region"], s["time_point"], s["group"], key)
        checked += 1
    assert checked >= len(REGIONS) * len(TIME_POINTS) * len(GROUPS) - 8  # lobes may be empty
    whole = {(s["time_point"], s["group"]): s for s in data["summaries"] if s["region"] == "whole"}
    assert whole[("baseline", "all")]["n"] == len(TYPES) * N_PER_TYPE + 1
    assert whole[("follow-up 2", "critical")]["n"] == N_PER_TYPE
    assert whole[("baseline", "critical")]["median"] > whole[("baseline", "moderate")]["median"]
    assert data["counts"]["scans_after_second_follow_up"] == 1
    assert data["counts"]["patients_without_type"] == 1
    assert data["counts"]["scans_with_qa_flags"] == 1


def _same_test(name: str, a, b, paired: bool):
    return {"paired t-test": lambda: sps.ttest_rel(b, a),
            "Wilcoxon signed-rank": lambda: sps.wilcoxon(b, a),
            "one-way ANOVA": lambda: sps.f_oneway(*a),
            "Kruskal-Wallis": lambda: sps.kruskal(*a),
            "Welch t-test": lambda: sps.ttest_ind(a, b, equal_var=False),
            "Mann-Whitney U": lambda: sps.mannwhitneyu(a, b, alternative="two-sided")}[name]()


def test_report_paired_tests_match_scipy_and_the_truths_conclusions(cohort, report):
    _, data = report
    far_seen, tested = {True: 0, False: 0}, 0
    for t in data["paired"]:
        a, b = TIME_POINTS.index(t["from"]), TIME_POINTS.index(t["to"])
        before, after = cohort.pairs("stored", t["region"], a, b, t["group"])
        assert t["n"] == len(before)
        if t["status"] != "ok":
            assert len(before) < 3 or not np.any(np.subtract(after, before)), t
            continue
        diffs = np.subtract(after, before)
        assert t["test"] == ("paired t-test" if shapiro_normal(diffs) else "Wilcoxon signed-rank")
        with np.errstate(all="ignore"):
            assert rel_equal(t["p_value"], float(_same_test(t["test"], before, after, True).pvalue))
        tested += 1
        tb, ta = cohort.pairs("truth", t["region"], a, b, t["group"])
        if not np.any(np.subtract(ta, tb)):
            continue  # e.g. mild patients: no opacity at any time, nothing to test in the truth
        with np.errstate(all="ignore"):
            p_truth = float(_same_test(t["test"], tb, ta, True).pvalue)
        if far(p_truth):
            assert (t["p_value"] < ALPHA) == (p_truth < ALPHA), (t, p_truth)
            far_seen[p_truth < ALPHA] += 1
    assert tested >= len(REGIONS) * len(PAIRS) * 3
    assert far_seen[True] >= 5 and far_seen[False] >= 5, far_seen  # the check is not vacuous


def test_report_across_types_and_bonferroni_match_scipy_and_the_truths_conclusions(cohort, report):
    _, data = report
    far_seen = {True: 0, False: 0}
    for t in data["across_types"]:
        tp = TIME_POINTS.index(t["time_point"])
        groups = {ty: cohort.plo("stored", t["region"], tp, ty) for ty in TYPES}
        truth = {ty: cohort.plo("truth", t["region"], tp, ty) for ty in TYPES}
        assert t["groups"] == {ty: len(v) for ty, v in groups.items()}
        if t["status"] != "ok":
            continue
        normal = all(shapiro_normal(v) for v in groups.values())
        assert t["test"] == ("one-way ANOVA" if normal else "Kruskal-Wallis")
        assert rel_equal(t["p_value"], float(_same_test(t["test"], list(groups.values()), None,
                                                        False).pvalue))
        p_truth = float(_same_test(t["test"], list(truth.values()), None, False).pvalue)
        if far(p_truth):
            assert (t["p_value"] < ALPHA) == (p_truth < ALPHA)
            far_seen[p_truth < ALPHA] += 1
        m = len(t["pairwise"])
        assert m == 6 and t["bonferroni_m"] == 6
        for pw in t["pairwise"]:
            p = float(_same_test(pw["test"], groups[pw["a"]], groups[pw["b"]], False).pvalue)
            assert rel_equal(pw["p_value"], p)
            assert rel_equal(pw["p_bonferroni"], min(1.0, p * m))
            with np.errstate(all="ignore"):
                pt = _same_test(pw["test"], truth[pw["a"]], truth[pw["b"]], False).pvalue
            if far(min(1.0, pt * m)):
                assert (pw["p_bonferroni"] < ALPHA) == (pt * m < ALPHA), (pw, pt)
                far_seen[pt * m < ALPHA] += 1
    whole = [t for t in data["across_types"] if t["region"] == "whole"]
    assert all(t["status"] == "ok" and t["p_value"] < 0.001 for t in whole)  # mild 0% vs critical
    assert far_seen[True] >= 10 and far_seen[False] >= 3, far_seen


def test_report_onset_fit_and_plot(cohort, report):
    out, data = report
    fit = data["onset_fit"]
    pts = [(s, cohort.onset[s.patient_id]) for s in cohort.scans if cohort.onset[s.patient_id]]
    x = np.array([(date.fromisoformat(s.when[:10]) - o).days for s, o in pts], dtype=float)
    y_stored = np.array([s.stored["regions"]["whole"]["plo_pct"] for s, _ in pts])
    y_truth = np.array([s.truth["regions"]["whole"]["plo_pct"] for s, _ in pts])
    assert fit["status"] == "ok" and fit["n"] == len(x) == len(cohort.scans) - 1
    assert sorted(zip(x, y_stored, strict=True)) == sorted(
        (p["days_since_onset"], p["plo_pct"]) for p in fit["points"])
    coef = np.polyfit(x, y_stored, 3)
    assert np.allclose(fit["coefficients"], coef, rtol=1e-9, atol=1e-12)
    r2 = 1 - np.sum((y_stored - np.polyval(coef, x)) ** 2) / np.sum((y_stored - y_stored.mean()) ** 2)
    assert rel_equal(fit["r_squared"], float(r2))
    truth_fit = np.polyval(np.polyfit(x, y_truth, 3), x)
    assert np.max(np.abs(np.polyval(coef, x) - truth_fit)) <= EPS * math.sqrt(len(x)) + 1e-9
    assert 0.0 <= fit["r_squared"] <= 1.0

    png = out / "plo_vs_onset.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (840, 576)
        rgb = np.asarray(im.convert("RGB"))
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50  # not blank: text, points, curve
    critical_red = np.all(np.abs(rgb.astype(int) - (0xD7, 0x30, 0x1F)) < 40, axis=-1)
    assert critical_red.sum() > 30  # the critical patients' points are drawn


def test_summary_markdown_tables(report):
    out, data = report
    md = (out / "summary.md").read_text()
    assert "Intended use: research and triage support; not a diagnosis." in md
    assert "![whole-lung PLO versus days since onset](plo_vs_onset.png)" in md
    for heading in ("## Whole lung", "## Right lung", "## Left lung", "## RUL", "## LLL"):
        assert heading in md
    assert "| time point | group | n | PLO % | reported as | Shapiro-Wilk p |" in md
    assert "Kruskal-Wallis" in md or "one-way ANOVA" in md
    assert "p (Bonferroni)" in md and "R² = " in md
    base = next(s for s in data["summaries"] if (s["region"], s["time_point"], s["group"])
                == ("whole", "baseline", "critical"))
    cell = (f"{base['mean']:.1f} (SD {base['sd']:.1f})" if base["reported"] == "mean (SD)"
            else f"{base['median']:.1f} (IQR {base['q1']:.1f}–{base['q3']:.1f})")
    assert f"| baseline | critical | {N_PER_TYPE} | {cell} | {base['reported']} |" in md


def test_too_few_scans_give_not_enough_data_never_a_crash(tmp_path):
    build(tmp_path, [("A1", "severe", 7, 2, True), ("B1", "moderate", 8, 1, False)])
    out = tmp_path / "report"
    proc = run_cli("cohort", "report", "--state-dir", str(tmp_path), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "stats.json").read_text())
    assert all(t["status"].startswith("not enough data (n=") for t in data["paired"])
    assert all(t["status"].startswith("not enough data (n=") for t in data["across_types"])
    assert data["onset_fit"]["status"].startswith("not enough data (n=2)")
    md = (out / "summary.md").read_text()
    assert "not enough data (n=" in md and "Cubic fit: not enough data" in md
    with Image.open(out / "plo_vs_onset.png") as im:
        assert im.size == (840, 576)


def test_stats_degenerate_samples():
    assert rstats.normality([1.0, 1.0, 1.0])["status"] == "not computable: all values are equal"
    assert rstats.normality([1.0, 2.0])["status"] == "not enough data (n=2)"
    d = rstats.describe([0.0, 0.0, 0.0, 0.0])
    assert d["reported"] == "median (IQR)" and d["median"] == 0.0 and d["sd"] == 0.0
    assert rstats.describe([])["status"] == "not enough data (n=0)"
    zero = rstats.paired([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert zero["status"] == "not computable: every paired difference is zero"
    assert zero["p_value"] is None
    shift = rstats.paired([1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0])  # constant difference
    assert shift["test"] == "Wilcoxon signed-rank" and shift["p_value"] is not None
    same = rstats.across({"a": [0.0] * 3, "b": [0.0] * 4})
    assert same["status"] == "not computable: all values are equal"
    few = rstats.across({"a": [1.0, 2.0], "b": [1.0, 2.0, 3.0], "c": []})
    assert few["status"] == "not enough data (n=a 2, b 3, c 0); needs 2 groups of at least 3"
    with pytest.raises(ValueError, match="`after` must have the length of `before`"):
        rstats.paired([1.0], [1.0, 2.0])
    json.dumps([zero, shift, same, few], allow_nan=False)
