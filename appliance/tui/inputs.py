"""The patient inputs dialog: symptom onset date and clinical type (mild, moderate, severe,
critical), saved with Store.update_patient."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, RadioSet, Static

from appliance.store import ClinicalType, Patient
from appliance.tui.fields import Choice, Field

if TYPE_CHECKING:
    from appliance.tui.app import DashboardApp


class PatientInputsDialog(ModalScreen[bool]):
    """Dismissed with True when something was saved."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "save", "Save"),
    ]

    def __init__(self, patient: Patient) -> None:
        super().__init__()
        self.patient = patient

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as box:
            box.border_title = f"Patient {self.patient.patient_id}"
            yield Label("Symptom onset date (YYYY-MM-DD)")
            yield Field(value=self.patient.onset_date or "", placeholder="YYYY-MM-DD",
                        restrict=r"[0-9-]*", max_length=10, id="onset")
            yield Label("Clinical type (↑↓ then space; ctrl+s saves)")
            with RadioSet(id="clinical-type"):
                for kind in ClinicalType:
                    yield Choice(kind.value, value=kind == self.patient.clinical_type,
                                 name=kind.value)
            yield Static("", id="error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Save (ctrl+s)", variant="primary", id="save")
                yield Button("Cancel (esc)", id="cancel")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()

    def action_cancel(self) -> None:
        self.dismiss(False)

    def action_save(self) -> None:
        onset = self.query_one("#onset", Input).value.strip() or None
        pressed = self.query_one("#clinical-type", RadioSet).pressed_button
        clinical = pressed.name if pressed is not None else None
        if onset is None and clinical is None:
            self.dismiss(False)
            return
        app: DashboardApp = self.app  # type: ignore[assignment]
        try:
            app.write(lambda s: s.update_patient(self.patient.patient_id, onset_date=onset,
                                                 clinical_type=clinical))
        except app.WRITE_ERRORS as exc:
            self.query_one("#error", Static).update(f"! not saved: {exc}")
            return
        self.dismiss(True)
