"""One scan: per-region table, QA flags, reviews, and the axial slice preview with the opacity
and lobe overlay (masks read in a worker thread; the worker posts a message, never touches
widgets)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.table import Table
from rich.text import Text
from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Static

from appliance.pipeline.quantify import REGIONS
from appliance.tui import data
from appliance.tui.data import Preview, ScanView, fmt_epoch, fmt_pct, fmt_when
from appliance.tui.preview import SlicePreview, legend
from appliance.tui.theme import ALERT, GOOD, change_text, plo_text, trend_text

if TYPE_CHECKING:
    from appliance.tui.app import DashboardApp

ROW_ORDER = (*REGIONS[3:], "right", "left", "whole")
"""Lobes first (the paper's table order), then the sides and the whole lung."""


def _ml(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def regions_table(result: dict, alert_above: float) -> Table:
    table = Table(box=box.SIMPLE_HEAD, padding=0, show_edge=False)  # columns: one space apart
    for name in ("", "Lung", "Opac.", "PLO", "GGO", "Cons.", "Sev"):
        table.add_column(name, justify="right" if name else "left", no_wrap=True,
                         min_width=3 if name in ("", "Sev") else 5)
    regions = result.get("regions", {})
    for name in ROW_ORDER:
        r = regions.get(name, {})
        severity = r.get("severity")
        table.add_row(
            Text(name, style="bold" if name == "whole" else ""), _ml(r.get("lung_ml")),
            _ml(r.get("opacity_ml")),
            plo_text(r.get("plo_pct"), alert_above if name == "whole" else None),
            fmt_pct(r.get("ggo_pct")), fmt_pct(r.get("consolidation_pct")),
            "" if severity is None else str(severity))
    return table


class PreviewReady(Message):
    """The masks (and CT) of the open scan were read, or could not be."""

    def __init__(self, result_id: int, preview: Preview | None, message: str) -> None:
        super().__init__()
        self.result_id, self.preview, self.message = result_id, preview, message


class ScanScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("up", "slice(1)", "Slice ↑"),
        Binding("down", "slice(-1)", "Slice ↓"),
        Binding("pageup", "slice(10)", "+10", show=False),
        Binding("pagedown", "slice(-10)", "-10", show=False),
        Binding("m", "symbols", "Symbols/colour"),
        Binding("r", "review", "Review"),
        Binding("p", "patient", "Patient"),
    ]

    def __init__(self, result_id: int) -> None:
        super().__init__()
        self.result_id = result_id
        self.view: ScanView | None = None

    @property
    def dashboard(self) -> DashboardApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="scan-info")
        with Horizontal(id="scan-body"):
            with Vertical(id="scan-left"):
                yield Static(id="regions")
                yield Static(id="qa")
            with Vertical(id="scan-right"):
                yield SlicePreview(id="preview")
                yield Static(id="legend")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#regions").border_title = "Regions: ml, % of lung"
        self.query_one("#qa").border_title = "QA · review"
        preview = self.query_one("#preview", SlicePreview)
        preview.symbols = self.app.no_color
        self.reload()
        if self.view is None:
            preview.show(None, "no such result")
        elif not self.view.masks:
            preview.show(None, f"No preview: {self.view.masks_note}.")
        else:
            self._load_preview(self.view)
        self._update_preview_titles()

    def on_screen_resume(self) -> None:
        self.reload()

    def reload(self) -> None:
        app = self.dashboard
        view = self.view = data.scan_view(app.store, app.config, self.result_id)
        info = self.query_one("#scan-info", Static)
        if view is None:
            info.update(Text(f"no result {self.result_id} in the store", style=ALERT))
            return
        info.update(self._summary(view))
        self.query_one("#regions", Static).update(
            regions_table(view.result, app.config.dashboard.alert_plo_pct))
        self.query_one("#qa", Static).update(self._qa_and_reviews(view))

    def _summary(self, view: ScanView) -> Text:
        """Who and when, the review state; the figures and the trend; the acquisition."""
        r, serial = view.result, view.serial
        alert_above = self.dashboard.config.dashboard.alert_plo_pct
        text = Text()
        text.append(f"{view.patient_id}", style="bold")
        text.append(f"  {fmt_when(view.acquired_at)}  {serial.get('role', '')}")
        if serial.get("days_since_onset") is not None:
            text.append(f", day {serial['days_since_onset']:.0f} since onset")
        if view.reviews:
            last = view.reviews[-1]
            text.append(f"  ✓ review {last['score']}/5 by {last['reviewer']}")
        else:
            text.append("  not reviewed (r)", style="dim")
        text.append("\nPLO ")
        text.append_text(plo_text(r.get("regions", {}).get("whole", {}).get("plo_pct"), alert_above,
                                  "%"))
        text.append(f"  severity {r.get('severity_score', '?')}/25  ")
        prev = (serial.get("vs_previous") or {}).get("whole") or {}
        text.append_text(trend_text(serial.get("trend"), prev.get("delta_pts")))
        if serial.get("trend"):
            text.append(f" {serial['trend']}")
        base = (serial.get("vs_baseline") or {}).get("whole") or {}
        if base:
            text.append("  vs baseline ")
            text.append_text(change_text(base.get("delta_pts"), base.get("change_pct"),
                                         base.get("new_involvement", False)))
        scan = r.get("scan", {})
        shape = scan.get("shape") or ["?"]
        text.append(f"\n{scan.get('manufacturer') or '?'} · {scan.get('kernel') or '?'} · "
                    f"{shape[0]} slices · {scan.get('slice_thickness_mm') or '?'} mm · "
                    f"series …{view.series_uid[-16:]}", style="dim")
        return text

    def _qa_and_reviews(self, view: ScanView) -> Text:
        qa = view.result.get("qa", {})
        text = Text()
        if qa.get("ok"):
            text.append("✓ QA passed\n", style=GOOD)
        else:
            text.append("! QA failed: review before use\n", style=ALERT)
            by_code: dict[str, list[dict]] = {}
            for flag in qa.get("flags", []):
                by_code.setdefault(str(flag.get("code")), []).append(flag)
            for code, flags in by_code.items():
                regions = [str(f.get("region")) for f in flags]
                if len(flags) > 1 and len(set(regions)) == len(flags):
                    # e.g. every lobe tiny: name the regions, keep the panel short
                    text.append(f"! {code}", style=ALERT)
                    text.append(f" {', '.join(regions)}\n")
                    continue
                for flag in flags:
                    text.append(f"! {code}", style=ALERT)
                    text.append(f" {flag.get('message', '')}\n")
        if view.reviews:
            for rev in view.reviews[-3:]:
                text.append(f"✓ review {rev['score']}/5 by {rev['reviewer']} "
                            f"{fmt_epoch(rev['reviewed_at'])}")
                text.append(f" “{rev['comment']}”\n" if rev.get("comment") else "\n")
        else:
            text.append("not reviewed yet (r: score 0-5)", style="dim")
        return text.rstrip() or text

    @work(thread=True, exclusive=True, group="preview")
    def _load_preview(self, view: ScanView) -> None:
        try:
            preview = data.load_preview(view)
            message = preview.note or ""
        except (OSError, ValueError) as exc:
            preview, message = None, f"No preview: {exc}"
        self.post_message(PreviewReady(view.result_id, preview, message))

    def on_preview_ready(self, event: PreviewReady) -> None:
        widget = self.query_one("#preview", SlicePreview)
        widget.show(event.preview, event.message)
        self._update_preview_titles()

    def _update_preview_titles(self) -> None:
        widget = self.query_one("#preview", SlicePreview)
        legend_text = legend(widget.symbols)
        if widget.preview is not None:
            widget.border_title = f"Axial slice {widget.index + 1}/{widget.preview.slices}"
            widget.border_subtitle = "R ◂ ▸ L"
            if widget.preview.note:  # e.g. the CT images are gone: masks only
                legend_text = Text(widget.preview.note + "\n", style=ALERT) + legend_text
        else:
            widget.border_title = "Axial slice"
        self.query_one("#legend", Static).update(legend_text)

    def action_slice(self, delta: int) -> None:
        widget = self.query_one("#preview", SlicePreview)
        widget.step(delta)
        self._update_preview_titles()

    def action_symbols(self) -> None:
        widget = self.query_one("#preview", SlicePreview)
        widget.symbols = not widget.symbols
        widget.refresh()
        self._update_preview_titles()

    def action_review(self) -> None:
        if self.view is not None:
            self.dashboard.review(self.view.result_id)

    def action_patient(self) -> None:
        if self.view is not None:
            self.dashboard.open_patient(self.view.patient_id)
