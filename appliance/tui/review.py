"""The review dialog: a 0-5 segmentation quality score with the reviewer's name (and an optional
comment), saved with Store.add_review."""

from __future__ import annotations

from typing import TYPE_CHECKING

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from appliance.tui.fields import Field

if TYPE_CHECKING:
    from appliance.tui.app import DashboardApp

SCORE_HELP = "0 unusable · 1 poor · 2 major edits · 3 minor edits · 4 good · 5 perfect"


class ReviewDialog(ModalScreen[int | None]):
    """Dismissed with the new review's id, or None when cancelled."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel"),
        Binding("ctrl+s", "save", "Save"),
    ]

    def __init__(self, result_id: int, reviewer: str = "") -> None:
        super().__init__()
        self.result_id = result_id
        self.reviewer = reviewer

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog") as box:
            box.border_title = f"Review result {self.result_id}"
            yield Label("Segmentation quality score (0-5)")
            yield Field(placeholder="0-5", restrict=r"[0-5]?", max_length=1, id="score")
            yield Static(SCORE_HELP, classes="help")
            yield Label("Reviewer")
            yield Field(value=self.reviewer, placeholder="your name", id="reviewer")
            yield Label("Comment (optional)")
            yield Field(placeholder="Enter saves", id="comment", classes="last")
            yield Static("", id="error", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Save (ctrl+s)", variant="primary", id="save")
                yield Button("Cancel (esc)", id="cancel")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_save()  # Enter on the last field

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_save() if event.button.id == "save" else self.action_cancel()

    def action_cancel(self) -> None:
        self.dismiss(None)

    def action_save(self) -> None:
        score_text = self.query_one("#score", Input).value.strip()
        reviewer = self.query_one("#reviewer", Input).value.strip()
        comment = self.query_one("#comment", Input).value.strip() or None
        error = self.query_one("#error", Static)
        if not score_text:
            error.update("! enter a score from 0 to 5")
            self.query_one("#score", Input).focus()
            return
        app: DashboardApp = self.app  # type: ignore[assignment]
        try:
            review_id = app.write(lambda s: s.add_review(self.result_id, int(score_text), reviewer,
                                                         comment))
        except app.WRITE_ERRORS as exc:
            error.update(f"! not saved: {exc}")
            return
        app.reviewer = reviewer
        self.dismiss(review_id)
