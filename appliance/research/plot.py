"""Whole-lung PLO against days since symptom onset, with the cubic fit (PNG).

matplotlib's Agg canvas is used directly (no pyplot): no display, no global figure state, safe
in a daemon or a test run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appliance import INTENDED_USE

TYPE_COLOURS = {"mild": "#2b8cbe", "moderate": "#41ab5d", "severe": "#fd8d3c",
                "critical": "#d7301f", None: "#969696"}
SIZE_IN, DPI = (7.0, 4.8), 120


def plot_onset(fit: dict, path: Path) -> Path:
    """Write the scatter (coloured by clinical type) and, when it was computed, the fitted
    curve; the fit's status is printed on the figure when it could not be computed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=SIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    points = fit["points"]
    for ctype, colour in TYPE_COLOURS.items():
        mine = [p for p in points if p["clinical_type"] == ctype]
        if mine:
            ax.scatter([p["days_since_onset"] for p in mine], [p["plo_pct"] for p in mine],
                       s=22, color=colour, alpha=0.85, label=ctype or "type unknown",
                       edgecolors="none")
    if fit["coefficients"] is not None:
        xs = np.array([p["days_since_onset"] for p in points], dtype=float)
        grid = np.linspace(xs.min(), xs.max(), 200)
        r2 = fit["r_squared"]
        label = "cubic fit" + (f", R² = {r2:.3f}" if r2 is not None else "")
        ax.plot(grid, np.polyval(fit["coefficients"], grid), color="black", linewidth=1.5,
                label=label)
    else:
        ax.text(0.5, 0.5, f"no fit: {fit['status']}" if points else "no scan with a known onset date",
                transform=ax.transAxes, ha="center", va="center", wrap=True)
    ax.set_xlabel("days since symptom onset")
    ax.set_ylabel("whole-lung PLO (%)")
    ax.set_title(f"PLO versus days since onset (n = {len(points)} scans)")
    ax.grid(True, alpha=0.3)
    if points:
        ax.legend(loc="best", fontsize="small")
    fig.text(0.01, 0.01, f"Intended use: {INTENDED_USE}.", fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
