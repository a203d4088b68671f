"""The cohort report's files: stats.json (every number), summary.md (Markdown tables) and the
plot. Display rounding follows DESIGN.md (one decimal, two below 1); stats.json keeps full
precision."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.research import stats
from appliance.research.cohort import GROUPS, TIME_POINT_NAMES, TIME_POINTS
from appliance.research.plot import plot_onset

STATS_JSON, SUMMARY_MD, PLOT_PNG = "stats.json", "summary.md", "plo_vs_onset.png"
REGION_NAMES = {"whole": "Whole lung", "right": "Right lung", "left": "Left lung"}


def _pct(value: float | None) -> str:
    if value is None:
        return "n/a"
    text = f"{value:.2f}" if abs(value) < 1 else f"{value:.1f}"
    return "0.00" if text == "-0.00" else text


def _p(value: float | None) -> str:
    if value is None:
        return "n/a"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def _stat(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _signed(value: float) -> str:
    return f"{'-' if value < 0 else '+'} {abs(value):.4g}"


def _summary_cell(s: dict) -> str:
    if s["n"] == 0:
        return "n/a"
    if s["reported"] == stats.MEAN_SD:
        return f"{_pct(s['mean'])} (SD {_pct(s['sd'])})"
    return f"{_pct(s['median'])} (IQR {_pct(s['q1'])}–{_pct(s['q3'])})"


def _normality_cell(norm: dict) -> str:
    if norm["p_value"] is None:
        return norm["status"]
    return f"{_p(norm['p_value'])} ({'normal' if norm['normal'] else 'not normal'})"


def _test_cell(t: dict) -> str:
    return t["test"] if t["status"] == stats.OK else t["status"]


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return out + [""]


def _region_section(data: dict, region: str) -> list[str]:
    name = REGION_NAMES.get(region, region)
    low = name.lower() if region in REGION_NAMES else region  # "whole lung", but "RML"
    lines = [f"## {name}", "", f"### PLO (%) by time point and clinical type: {low}", ""]
    rows = [(TIME_POINT_NAMES[s["time_point"]], s["group"], str(s["n"]), _summary_cell(s),
             s["reported"] if s["n"] else "", _normality_cell(s["normality"]))
            for s in data["summaries"] if s["region"] == region]
    lines += _table(("time point", "group", "n", "PLO %", "reported as", "Shapiro-Wilk p"), rows)

    lines += [f"### Change between time points (paired): {low}", ""]
    rows = []
    for t in data["paired"]:
        if t["region"] != region:
            continue
        normal = t["test"] == stats.PAIRED_T
        change = (f"mean {_pct(t['mean_difference'])}" if normal
                  else f"median {_pct(t['median_difference'])}")
        rows.append((t["group"], f"{TIME_POINT_NAMES[t['from']]} → {TIME_POINT_NAMES[t['to']]}",
                     str(t["n"]), change if t["n"] else "n/a", _test_cell(t), _stat(t["statistic"]),
                     _p(t["p_value"])))
    lines += _table(("group", "comparison", "n pairs", "change (points)", "test", "statistic", "p"),
                    rows)

    lines += [f"### Clinical types compared: {low}", ""]
    rows, pair_rows = [], []
    for t in data["across_types"]:
        if t["region"] != region:
            continue
        sizes = ", ".join(f"{k} {n}" for k, n in t["groups"].items())
        rows.append((TIME_POINT_NAMES[t["time_point"]], sizes, _test_cell(t), _stat(t["statistic"]),
                     _p(t["p_value"])))
        for pw in t["pairwise"]:
            pair_rows.append((TIME_POINT_NAMES[t["time_point"]], f"{pw['a']} vs {pw['b']}",
                              _test_cell(pw), _stat(pw["statistic"]), _p(pw["p_value"]),
                              _p(pw["p_bonferroni"])))
    lines += _table(("time point", "n per type", "test", "statistic", "p"), rows)
    if pair_rows:
        lines += _table(("time point", "pair", "test", "statistic", "p", "p (Bonferroni)"),
                        pair_rows)
    return lines


def summary_markdown(data: dict, plot_name: str = PLOT_PNG) -> str:
    c, m, fit = data["counts"], data["method"], data["onset_fit"]
    by_type = ", ".join(f"{g} {c['patients_by_type'][g]}" for g in GROUPS[1:])
    lines = [
        "# Cohort report: serial quantitative chest CT (Huang et al. 2020)",
        "",
        f"**Intended use: {data['intended_use']}.** Generated {data['generated_at']} by "
        f"{data['software']['name']} {data['software']['version']}; every number is in "
        f"`{STATS_JSON}`.",
        "",
        f"{c['patients']} patients ({by_type}; {c['patients_without_type']} without a clinical "
        f"type), {c['scans']} scans. Time points: "
        + ", ".join(f"{TIME_POINT_NAMES[tp]} = scan {i + 1}" for i, tp in enumerate(TIME_POINTS))
        + f" of each patient; {c['scans_after_second_follow_up']} later scans are only in the "
        f"onset plot. {c['scans_without_whole_plo']} scans have no whole-lung PLO (left out); "
        f"{c['scans_with_qa_flags']} scans carry QA flags (included).",
        "",
        f"Method (alpha {m['alpha']}): {m['rule']}. Paired tests: {m['paired_rule']}. "
        f"Across clinical types: {m['across_rule']}; pairwise tests are corrected by "
        f"{m['multiple_comparisons']}. A test with fewer than {m['min_n']} values in a group is "
        "reported as not enough data.",
        "",
        "## PLO versus days since onset",
        "",
        f"![whole-lung PLO versus days since onset]({plot_name})",
        "",
    ]
    if fit["coefficients"] is not None:
        a, b, cc, d = fit["coefficients"]
        r2 = "n/a" if fit["r_squared"] is None else f"{fit['r_squared']:.3f}"
        terms = f"{a:.4g}·t³ {_signed(b)}·t² {_signed(cc)}·t {_signed(d)}"
        lines.append(f"Cubic fit over {fit['n']} scans: PLO = {terms} (t in days since onset), "
                     f"R² = {r2}.")
    else:
        lines.append(f"Cubic fit: {fit['status']}.")
    lines.append("")
    for region in data["regions"]:
        lines += _region_section(data, region)
    return "\n".join(lines)


def write_report(data: dict, out: Path) -> dict[str, Path]:
    """stats.json, summary.md and the plot in ``out`` (created); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"stats": out / STATS_JSON, "summary": out / SUMMARY_MD, "plot": out / PLOT_PNG}
    data = {**data, "files": {k: p.name for k, p in paths.items()}}
    # allow_nan=False: a NaN that slipped through is a bug, not a number to write
    paths["stats"].write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    paths["summary"].write_text(summary_markdown(data, PLOT_PNG) + "\n")
    plot_onset(data["onset_fit"], paths["plot"])
    return paths
