"""Serial comparison of one patient's scans (DESIGN.md, "Serial comparison"; Huang et al. Table 2).

Scans are ordered by acquisition time; the first is the baseline. Every region is compared
against the baseline and against the previous scan.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime

from appliance.config import SerialConfig
from appliance.pipeline.quantify import REGIONS


@dataclass(frozen=True)
class ScanPoint:
    """What the comparison needs of one analysed scan."""

    key: str
    acquired_at: datetime
    plo: dict[str, float | None]  # region -> plo_pct


def change(earlier: float | None, later: float | None, involvement_min_pct: float) -> dict:
    """delta_pts (later - earlier), change_pct (100 x delta / earlier; null when the earlier PLO
    is below the involvement minimum) and new_involvement."""
    if earlier is None or later is None:
        return {"delta_pts": None, "change_pct": None, "new_involvement": False}
    delta = later - earlier
    if earlier < involvement_min_pct:
        return {"delta_pts": delta, "change_pct": None, "new_involvement": later >= involvement_min_pct}
    return {"delta_pts": delta, "change_pct": 100.0 * delta / earlier, "new_involvement": False}


def trend(c: dict, cfg: SerialConfig) -> str:
    """progressing / improving / stable on the whole lung against the previous scan."""
    d, pct = c["delta_pts"], c["change_pct"]
    if d is None:
        return "stable"
    if c["new_involvement"] or (d >= cfg.progress_delta_pts and pct is not None and pct >= cfg.progress_change_pct):
        return "progressing"
    if d <= cfg.improve_delta_pts and pct is not None and pct <= cfg.improve_change_pct:
        return "improving"
    return "stable"


def compare(
    scans: list[ScanPoint], cfg: SerialConfig = SerialConfig(), involvement_min_pct: float = 0.1,
    onset: date | None = None,
) -> list[dict]:
    """One entry per scan in time order: index, days since baseline/previous/onset, changes, trend."""
    ordered = sorted(scans, key=lambda s: s.acquired_at)
    out = []
    for i, scan in enumerate(ordered):
        base, prev = ordered[0], ordered[i - 1] if i else None
        entry: dict = {
            "key": scan.key,
            "index": i,
            "role": "baseline" if i == 0 else f"follow-up {i}",
            "days_since_baseline": (scan.acquired_at - base.acquired_at).total_seconds() / 86400,
            "days_since_previous": (scan.acquired_at - prev.acquired_at).total_seconds() / 86400 if prev else None,
            "days_since_onset": (scan.acquired_at.date() - onset).days if onset else None,
        }
        if prev is not None:
            entry["vs_baseline"] = {r: change(base.plo.get(r), scan.plo.get(r), involvement_min_pct) for r in REGIONS}
            entry["vs_previous"] = {r: change(prev.plo.get(r), scan.plo.get(r), involvement_min_pct) for r in REGIONS}
            entry["trend"] = trend(entry["vs_previous"]["whole"], cfg)
        else:
            entry["vs_baseline"] = entry["vs_previous"] = None
            entry["trend"] = None
        out.append(entry)
    return out
