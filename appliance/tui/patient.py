"""A patient: every scan in time order with whole-lung and per-lobe PLO, the changes of the
highlighted scan against the baseline and the previous scan (points and percent, Huang et al.
Table 2), and a chart of whole-lung PLO over days since onset (or since the baseline)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from appliance.pipeline.quantify import REGIONS
from appliance.tui import data
from appliance.tui.chart import PloChart
from appliance.tui.data import PatientView, ScanEntry, fmt_when
from appliance.tui.table import Table
from appliance.tui.theme import ALERT, change_text, plo_text, qa_text, review_text, trend_text

if TYPE_CHECKING:
    from appliance.tui.app import DashboardApp

LOBES = REGIONS[3:]
WIDE_COLUMNS = 120
"""From this width the changes table and the chart sit side by side; below, 'g' switches."""


def _iso_date(text: str | None) -> str:
    """DICOM's YYYYMMDD as YYYY-MM-DD."""
    if text and len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or "?"


def _day(entry: ScanEntry, onset: bool) -> str:
    days = entry.serial.get("days_since_onset" if onset else "days_since_baseline")
    return "" if days is None else f"{days:.0f}"


class PatientScreen(Screen):
    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("e", "edit", "Onset / type"),
        Binding("g", "toggle_chart", "Chart ↔ changes"),
    ]

    def __init__(self, patient_id: str) -> None:
        super().__init__()
        self.patient_id = patient_id
        self.view: PatientView | None = None

    @property
    def dashboard(self) -> DashboardApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="patient-info")
        scans = Table(id="scans")
        scans.border_title = "Scans (time order)"
        scans.add_columns("#", "Acquired", "Day", "Whole", "Trend", "QA", *LOBES, "Sev", "Review")
        yield scans
        with Horizontal(id="patient-lower"):
            changes = DataTable(id="changes", cursor_type="none")
            changes.add_columns("Region", "PLO %", "Δ vs baseline", "Δ vs previous")
            changes.can_focus = False
            yield changes
            yield PloChart(id="chart")
        yield Footer()

    def on_mount(self) -> None:
        self.reload()
        self.query_one("#scans", DataTable).focus()

    def on_screen_resume(self) -> None:
        self.reload()

    def on_resize(self) -> None:
        self.set_class(self.size.width < WIDE_COLUMNS, "-narrow")

    def reload(self) -> None:
        app = self.dashboard
        view = self.view = data.patient_view(app.store, app.config, self.patient_id)
        info = self.query_one("#patient-info", Static)
        if view is None:
            info.update(Text(f"no patient {self.patient_id!r} in the store", style=ALERT))
            return
        p = view.patient
        text = Text()
        text.append(f"{p.patient_id}", style="bold")
        text.append(f"  {p.patient_name or ''}  {p.sex or '?'}  born {_iso_date(p.birth_date)}  ")
        text.append("onset ")
        text.append(p.onset_date or "not recorded", style="bold" if p.onset_date else ALERT)
        text.append("  clinical type ")
        text.append(p.clinical_type.value if p.clinical_type else "not recorded",
                    style="bold" if p.clinical_type else ALERT)
        info.update(text)

        onset = view.onset is not None
        threshold = app.config.dashboard.alert_plo_pct
        table = self.query_one("#scans", DataTable)
        current = table.cursor_row if table.row_count else len(view.scans) - 1
        table.clear()
        for i, s in enumerate(view.scans):
            table.add_row(
                str(i), fmt_when(s.acquired_at), _day(s, onset), plo_text(s.plo["whole"], threshold),
                trend_text(s.serial.get("trend"),
                           ((s.serial.get("vs_previous") or {}).get("whole") or {}).get("delta_pts")),
                qa_text(s.qa_ok, s.qa_codes), *(plo_text(s.plo[r]) for r in LOBES),
                "" if s.severity_score is None else str(s.severity_score),
                review_text(s.review_score), key=str(s.result_id))
        table.border_title = (f"Scans of {p.patient_id} (time order; day since "
                              f"{'onset' if onset else 'baseline'})")
        if view.scans:
            table.move_cursor(row=min(max(current, 0), len(view.scans) - 1), animate=False)
        self._show_changes()
        chart = self.query_one("#chart", PloChart)
        chart.border_title = ("Whole-lung PLO % by day since " +
                              ("onset" if onset else "baseline (onset not recorded)"))
        chart.set_points(view.chart_points(), threshold)

    def _selected(self) -> ScanEntry | None:
        table = self.query_one("#scans", DataTable)
        if self.view is None or not self.view.scans or not table.row_count:
            return None
        return self.view.scans[min(table.cursor_row, len(self.view.scans) - 1)]

    def _show_changes(self) -> None:
        table = self.query_one("#changes", DataTable)
        table.clear()
        scan = self._selected()
        if scan is None:
            table.border_title = "Changes"
            return
        base = scan.serial.get("vs_baseline") or {}
        prev = scan.serial.get("vs_previous") or {}
        for region in REGIONS:
            b, p = base.get(region) or {}, prev.get(region) or {}
            table.add_row(
                Text(region, style="bold" if region == "whole" else ""), plo_text(scan.plo[region]),
                change_text(b.get("delta_pts"), b.get("change_pct"), b.get("new_involvement", False)),
                change_text(p.get("delta_pts"), p.get("change_pct"), p.get("new_involvement", False)))
        role = scan.serial.get("role", "")
        table.border_title = f"Changes of scan {scan.serial.get('index', '?')} ({role}): points (%)"

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        if event.data_table.id == "scans":
            self._show_changes()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open_scan()

    def action_open_scan(self) -> None:
        scan = self._selected()
        if scan is not None:
            self.dashboard.open_scan(scan.result_id)

    def action_edit(self) -> None:
        if self.view is not None:
            self.dashboard.edit_patient(self.view.patient)

    def action_toggle_chart(self) -> None:
        self.toggle_class("-show-chart")
