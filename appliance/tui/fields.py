"""Form parts of the dialogs, made to work from the keyboard alone and without colour."""

from __future__ import annotations

from textual.widgets import Input, RadioButton


class Field(Input):
    """Enter moves to the next field; on a field with the class ``last`` it submits the form."""

    async def action_submit(self) -> None:
        if self.has_class("last"):
            await super().action_submit()
        else:
            self.screen.focus_next()


class Choice(RadioButton):
    """A radio button whose state shows as ● / ○, not by colour alone."""

    @property
    def BUTTON_INNER(self) -> str:  # noqa: N802 - Textual's class attribute, made per state
        return "●" if self.value else "○"
