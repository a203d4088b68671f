"""Colours and symbols: the Okabe-Ito colour-blind-safe palette (as appliance.render uses), and a
symbol beside every colour so that each state reads on a monochrome terminal too."""

from __future__ import annotations

from rich.text import Text

from appliance.tui.data import fmt_pct

ORANGE = "#E69F00"
SKY = "#56B4E9"
GREEN = "#009E73"
YELLOW = "#F0E442"
BLUE = "#0072B2"
VERMILLION = "#D55E00"
PURPLE = "#CC79A7"

ALERT = f"bold {VERMILLION}"
GOOD = GREEN

TRENDS = {
    "progressing": ("▲", f"bold {VERMILLION}"),
    "improving": ("▼", f"bold {GREEN}"),
    "stable": ("=", ""),
}
"""Trend of the whole lung against the previous scan: symbol and style."""


def trend_text(trend: str | None, delta_pts: float | None = None) -> Text:
    """'▲ +6.3' (progressing), '▼ -4.0' (improving), '= +0.4' (stable), 'base' (baseline)."""
    if trend is None:
        return Text("base", style="dim")
    symbol, style = TRENDS.get(trend, ("?", ""))
    delta = "" if delta_pts is None else f" {delta_pts:+.1f}"
    return Text(f"{symbol}{delta}", style=style)


def qa_text(ok: bool, codes: tuple[str, ...] | list[str]) -> Text:
    if ok:
        return Text("✓ ok", style=GOOD)
    return Text("! " + (",".join(codes) or "failed"), style=ALERT)


def plo_text(plo: float | None, alert_above: float | None = None, unit: str = "") -> Text:
    """PLO with one decimal (two below 1%), marked '!' when above the alert threshold."""
    if plo is not None and alert_above is not None and plo > alert_above:
        return Text(f"{fmt_pct(plo)}{unit} !", style=ALERT)
    return Text(fmt_pct(plo) + ("" if plo is None else unit))


def change_text(delta_pts: float | None, change_pct: float | None, new: bool = False) -> Text:
    """Change between two scans: points and percent (Huang et al. Table 2)."""
    if delta_pts is None:
        return Text("–", style="dim")
    pct = "new" if new else ("n/a" if change_pct is None else f"{change_pct:+.0f}%")
    style = f"{VERMILLION}" if delta_pts > 0 else (GREEN if delta_pts < 0 else "")
    return Text(f"{delta_pts:+.1f} ({pct})", style=style)


def review_text(score: int | None) -> Text:
    return Text("–", style="dim") if score is None else Text(f"{score}/5")
