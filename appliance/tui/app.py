"""The dashboard application: screens over one Store, polled for changes every refresh_s.

Reads go through the store given to :class:`DashboardApp` (read-only in production). The only
writes, reviews and patient inputs, open a writer connection for the moment of the write when
that store is read-only, so the dashboard holds no write lock while it idles.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

from textual.app import App
from textual.binding import Binding

from appliance import INTENDED_USE
from appliance.config import Config
from appliance.store import Patient, Store, StoreError
from appliance.tui import data
from appliance.tui.inputs import PatientInputsDialog
from appliance.tui.overview import OverviewScreen
from appliance.tui.patient import PatientScreen
from appliance.tui.review import ReviewDialog
from appliance.tui.scan import ScanScreen

T = TypeVar("T")


class DashboardApp(App[int]):
    CSS_PATH = ["app.tcss", "overview.tcss", "patient.tcss", "scan.tcss", "dialogs.tcss"]
    """Shared styles, then each screen's (their selectors start with the screen's ids)."""
    TITLE = "Appliance"
    SUB_TITLE = INTENDED_USE
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("o", "overview", "Overview"),
    ]
    WRITE_ERRORS = (ValueError, TypeError, StoreError, sqlite3.Error, OSError)
    """What a failed review or patient edit raises; shown in the dialog, never a traceback."""

    def __init__(self, config: Config, store: Store) -> None:
        if not isinstance(config, Config):
            raise TypeError(f"`config` must be an appliance Config, got {type(config).__name__}")
        if not isinstance(store, Store):
            raise TypeError(f"`store` must be a Store, got {type(store).__name__}")
        super().__init__()
        self.config = config
        self.store = store
        self.reviewer = ""
        """The last reviewer's name, offered again in the next review."""
        self._marker: tuple | None = None

    def get_default_screen(self) -> OverviewScreen:
        return OverviewScreen()

    def on_mount(self) -> None:
        self._marker = data.change_marker(self.store)
        self.set_interval(self.config.dashboard.refresh_s, self.poll)

    def poll(self) -> None:
        """Reload the screen on top when the store changed (one cheap query)."""
        try:
            marker = data.change_marker(self.store)
        except sqlite3.Error as exc:
            self.sub_title = f"store unreadable: {exc}"
            return
        if marker != self._marker:
            self._marker = marker
            self.sub_title = INTENDED_USE
            self.reload()

    def reload(self) -> None:
        reload = getattr(self.screen, "reload", None)
        if reload is not None:
            reload()

    def write(self, change: Callable[[Store], T]) -> T:
        """Run one write (a review, a patient edit) and reload the screen at once."""
        if self.store.readonly:
            with Store.open(self.store.path) as writer:
                out = change(writer)
        else:
            out = change(self.store)
        self.poll()
        return out

    # ------------------------------------------------------------------ navigation

    def action_overview(self) -> None:
        while len(self.screen_stack) > 1:
            self.pop_screen()

    def open_scan(self, result_id: int) -> None:
        self.push_screen(ScanScreen(result_id))

    def open_patient(self, patient_id: str) -> None:
        self.push_screen(PatientScreen(patient_id))

    def review(self, result_id: int) -> None:
        def saved(review_id: int | None) -> None:
            if review_id is not None:
                self.notify(f"review {review_id} saved")

        self.push_screen(ReviewDialog(result_id, self.reviewer), saved)

    def edit_patient(self, patient: Patient) -> None:
        def saved(changed: bool | None) -> None:
            if changed:
                self.notify(f"patient {patient.patient_id} updated")

        self.push_screen(PatientInputsDialog(patient), saved)
