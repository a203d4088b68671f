"""The overview: alerts, recent results, incoming series and the job queue."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from appliance.store import JobState
from appliance.tui import data
from appliance.tui.data import PROGRESS_STAGES, Alert, JobRow, Overview, fmt_epoch, fmt_when
from appliance.tui.table import Table
from appliance.tui.theme import ALERT, GOOD, plo_text, qa_text, review_text, trend_text

if TYPE_CHECKING:
    from appliance.tui.app import DashboardApp

ALERT_SYMBOLS = {"plo": "!", "progression": "▲", "qa": "!", "failed": "✗"}


def progress_text(job: JobRow) -> Text:
    """A running job's stage as a bar over load, lobes, opacity, write ('▰▰▱▱ lobes'); a
    queued one's wait; a failed one's stage and reason."""
    if job.state == JobState.FAILED:
        return Text(f"✗ failed at {job.stage}: {job.reason or '?'}", style=ALERT)
    if job.state == JobState.QUEUED:
        retry = f", retry after: {job.reason}" if job.reason else ""
        return Text(f"queued{retry}", style="dim")
    done = job.stage_index
    bar = "▰" * done + "▱" * (len(PROGRESS_STAGES) - done)
    retry = f" (attempt {job.attempts})" if job.attempts > 1 else ""
    return Text(f"{bar} {job.stage}{retry}")


def alerts_text(alerts: list[Alert], limit: int) -> Text:
    if not alerts:
        return Text("✓ no alerts", style=GOOD)
    text = Text()
    for alert in alerts[:limit]:
        text.append(f" {ALERT_SYMBOLS.get(alert.kind, '!')} {alert.text} ", style=f"reverse {ALERT}")
        text.append("\n")
    if len(alerts) > limit:
        text.append(f" … {len(alerts) - limit} more alert(s)", style=ALERT)
    else:
        text.rstrip()
    return text


class OverviewScreen(Screen):
    BINDINGS = [
        Binding("p", "open_patient", "Patient"),
        Binding("tab", "app.focus_next", "Next panel"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.model: Overview | None = None
        self.patients: dict[str, dict[str, str]] = {"results": {}, "series": {}, "queue": {}}
        """Per table: row key -> patient ID (for 'p')."""
        self.result_of_series: dict[str, int] = {}

    @property
    def dashboard(self) -> DashboardApp:
        return self.app  # type: ignore[return-value]

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="alerts")
        results = Table(id="results")
        results.border_title = "Recent results"
        results.add_columns("Acquired", "Patient", "PLO %", "Sev", "Trend", "QA", "Review")
        yield results
        with Horizontal(id="lower"):
            series = Table(id="series")
            series.border_title = "Incoming series"
            series.add_columns("Patient", "Inst.", "Status", "Series")
            yield series
            queue = Table(id="queue")
            queue.border_title = "Queue"
            queue.add_columns("Job", "Patient", "State: stage / reason")
            yield queue
        yield Footer()

    def on_mount(self) -> None:
        self.reload()

    def on_screen_resume(self) -> None:
        self.reload()

    def on_resize(self) -> None:
        self.set_class(self.size.height >= 40, "-tall")
        if self.model is not None:
            self._show_alerts(self.model.alerts)

    def _show_alerts(self, alerts: list[Alert]) -> None:
        limit = 3 if self.size.height < 40 else 8
        panel = self.query_one("#alerts", Static)
        panel.update(alerts_text(alerts, limit))
        panel.set_class(bool(alerts), "-alerting")

    def reload(self) -> None:
        app = self.dashboard
        model = self.model = data.overview(app.store, app.config)
        self._show_alerts(model.alerts)
        threshold = app.config.dashboard.alert_plo_pct
        self.result_of_series = {r.series_uid: r.result_id for r in model.results}

        results = self._refill("results", [
            (str(r.result_id), r.patient_id,
             (fmt_when(r.acquired_at), r.patient_id, plo_text(r.plo_whole, threshold),
              "" if r.severity_score is None else str(r.severity_score),
              trend_text(r.trend, r.delta_prev_pts), qa_text(r.qa_ok, r.qa_codes),
              review_text(r.review_score)))
            for r in model.results])
        results.border_title = f"Recent results ({len(model.results)})" if model.results \
            else "Recent results (none yet)"

        self._refill("series", [
            (s.series_uid, s.patient_id,
             (s.patient_id, str(s.instances), Text(s.status, style=ALERT if s.status == "failed" else ""),
              s.description or "…" + s.series_uid[-12:]))
            for s in model.series])

        self._refill("queue", [
            (str(j.job_id), j.patient_id,
             (str(j.job_id), j.patient_id, progress_text(j)))
            for j in model.jobs])
        c = model.counts
        self.query_one("#queue", DataTable).border_title = (
            f"Queue: {c[JobState.RUNNING]} running, {c[JobState.QUEUED]} queued, "
            f"{c[JobState.FAILED]} failed")
        if model.series:
            latest = max(s.last_instance_at for s in model.series)
            self.query_one("#series", DataTable).border_subtitle = f"last {fmt_epoch(latest)}"

    def _refill(self, table_id: str, rows: list[tuple[str, str, tuple]]) -> DataTable:
        """Replace the rows. A cursor on the first row follows the newest (what a technologist
        watching scans arrive wants under Enter); elsewhere it stays on the same row key when
        that row is still there."""
        table = self.query_one(f"#{table_id}", DataTable)
        current = self._cursor_key(table) if table.cursor_row > 0 else None
        table.clear()
        self.patients[table_id] = {}
        for key, patient, cells in rows:
            table.add_row(*cells, key=key)
            self.patients[table_id][key] = patient
        if current is not None and current in self.patients[table_id]:
            table.move_cursor(row=table.get_row_index(current), animate=False)
        elif table.row_count:
            table.move_cursor(row=0, animate=False)
        return table

    @staticmethod
    def _cursor_key(table: DataTable) -> str | None:
        if not table.row_count:
            return None
        row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        return row_key.value

    def _focused_table(self) -> DataTable:
        focused = self.focused
        return focused if isinstance(focused, DataTable) else self.query_one("#results", DataTable)

    def action_open_scan(self) -> None:
        table = self._focused_table()
        key = self._cursor_key(table)
        if key is None:
            return
        if table.id == "results":
            result_id: int | None = int(key)
        elif table.id == "series":
            result_id = self.result_of_series.get(key)
        else:
            job = next(j for j in self.model.jobs if str(j.job_id) == key) if self.model else None
            result_id = self.result_of_series.get(job.series_uid) if job else None
        if result_id is None:
            self.notify("no result for this series yet", severity="warning")
            return
        self.dashboard.open_scan(result_id)

    def action_open_patient(self) -> None:
        table = self._focused_table()
        key = self._cursor_key(table)
        if key is not None:
            self.dashboard.open_patient(self.patients[table.id][key])

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open_scan()
