"""An axial slice in the terminal: CT in a lung window with the opacity fill and the lobe outlines
of appliance.render, two pixels per cell with the half-block '▀' (foreground = upper pixel,
background = lower one). Symbol mode draws one pixel per cell with characters instead, for
monochrome terminals: '▒' ground-glass, '█' consolidation, 1-5 lobe borders, '·' lung, '░' body
(when the CT is kept).

Arrays are as the series was loaded (for a standard axial series: rows towards the back,
columns towards the patient's left), so the patient's right is on the left of the screen.
"""

from __future__ import annotations

import numpy as np
from rich.color import Color
from rich.style import Style
from rich.text import Text
from textual.widget import Widget

from appliance.labels import Lobe, Opacity
from appliance.render import LOBE_COLOURS, OPACITY_COLOURS, overlay
from appliance.tui.data import Preview

LUNG_HU_STANDIN = -800.0
"""Grey of the lung when the CT images are gone and only the masks are drawn."""
LOADING = "loading…"
SYMBOLS = {Opacity.CONSOLIDATION: "█", Opacity.GGO: "▒"}
TISSUE_HU = -400.0
"""Symbol mode draws the body (denser than this, outside the lungs) so the slice reads."""


def _nearest(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(int), n_in - 1)


def _starts(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum((np.arange(n_out) * n_in / n_out).astype(int), n_in - 1)


def resample(image: np.ndarray, shape: tuple[int, int], keep_max: bool = False) -> np.ndarray:
    """Nearest-neighbour resize of a 2D array; ``keep_max`` takes each block's maximum instead
    (for opacity labels, so that a lesion smaller than a screen pixel still shows)."""
    (h, w), (oh, ow) = image.shape, shape
    if keep_max:
        out = np.maximum.reduceat(image, _starts(h, oh), axis=0)
        return np.maximum.reduceat(out, _starts(w, ow), axis=1)
    return image[np.ix_(_nearest(h, oh), _nearest(w, ow))]


def _fit(h: int, w: int, cols: int, rows: int) -> tuple[int, int]:
    """Output (height, width) in pixels keeping the aspect ratio within cols x rows pixels."""
    scale = min(cols / w, rows / h)
    return max(1, int(h * scale)), max(1, int(w * scale))


def _slice(preview: Preview, k: int, shape: tuple[int, int]):
    lobes = resample(preview.lobes[k], shape)
    opacity = resample(preview.opacity[k], shape, keep_max=True)
    opacity = np.where(lobes > 0, opacity, 0)
    if preview.hu is not None:
        hu = resample(preview.hu[k], shape).astype(np.float32)
    else:
        hu = np.where(lobes > 0, LUNG_HU_STANDIN, -1000.0).astype(np.float32)
    return hu, lobes, opacity


def draw_colour(preview: Preview, k: int, cols: int, rows: int) -> Text:
    h, w = preview.lobes.shape[1:]
    oh, ow = _fit(h, w, cols, 2 * rows)
    rgb = overlay(*_slice(preview, k, (oh, ow)))
    if oh % 2:
        rgb = np.concatenate([rgb, np.zeros((1, ow, 3), np.uint8)])
    pad = " " * ((cols - ow) // 2)
    styles: dict[tuple, Style] = {}
    text = Text()
    for y in range(0, rgb.shape[0], 2):
        text.append(pad)
        for top, bottom in zip(map(tuple, rgb[y]), map(tuple, rgb[y + 1]), strict=True):
            style = styles.get((top, bottom))
            if style is None:
                style = styles[(top, bottom)] = Style(color=Color.from_rgb(*top),
                                                      bgcolor=Color.from_rgb(*bottom))
            text.append("▀", style)
        if y + 2 < rgb.shape[0]:
            text.append("\n")
    return text


def _rgb(colour: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*colour)


def draw_symbols(preview: Preview, k: int, cols: int, rows: int) -> Text:
    h, w = preview.lobes.shape[1:]
    oh, ow = _fit(h, w, cols, 2 * rows)
    oh = max(1, oh // 2)  # a cell is about twice as tall as it is wide
    hu, lobes, opacity = _slice(preview, k, (oh, ow))
    tissue = (hu > TISSUE_HU) if preview.hu is not None else np.zeros_like(lobes, bool)
    padded = np.pad(lobes, 1)
    border = (lobes > 0) & ((padded[:-2, 1:-1] != lobes) | (padded[2:, 1:-1] != lobes)
                            | (padded[1:-1, :-2] != lobes) | (padded[1:-1, 2:] != lobes))
    pad = " " * ((cols - ow) // 2)
    text = Text()
    for y in range(oh):
        text.append(pad)
        for x in range(ow):
            o, lobe = int(opacity[y, x]), int(lobes[y, x])
            if o:
                text.append(SYMBOLS[Opacity(o)], _rgb(OPACITY_COLOURS[Opacity(o)]))
            elif border[y, x]:
                text.append(str(lobe), _rgb(LOBE_COLOURS[Lobe(lobe)]))
            elif lobe:
                text.append("·", "dim")
            elif tissue[y, x]:
                text.append("░", "dim")
            else:
                text.append(" ")
        if y + 1 < oh:
            text.append("\n")
    return text


def legend(symbols: bool) -> Text:
    """What the marks mean, in the preview's current mode."""
    text = Text()
    if symbols:
        text.append("▒ GGO  █ consolidation  · lung  ░ body  ")
        for lobe in Lobe:
            text.append(f"{int(lobe)}", _rgb(LOBE_COLOURS[lobe]))
            text.append(f" {lobe.name} ")
        return text
    text.append("■", _rgb(OPACITY_COLOURS[Opacity.GGO]))
    text.append(" GGO  ")
    text.append("■", _rgb(OPACITY_COLOURS[Opacity.CONSOLIDATION]))
    text.append(" consolidation  outlines:")
    for lobe in Lobe:
        text.append(" ━", _rgb(LOBE_COLOURS[lobe]))
        text.append(lobe.name)
    return text


class SlicePreview(Widget):
    """The slice view; the screen sets ``preview``, ``index`` and ``symbols`` and refreshes."""

    DEFAULT_CSS = "SlicePreview { height: 1fr; }"

    def __init__(self, *, id: str | None = None) -> None:  # noqa: A002 - Textual's name
        super().__init__(id=id)
        self.preview: Preview | None = None
        self.message = LOADING
        self.index = 0
        self.symbols = False

    def show(self, preview: Preview | None, message: str = "") -> None:
        self.preview, self.message = preview, message
        if preview is not None:
            self.index = preview.default_slice()
        self.refresh()

    def step(self, delta: int) -> None:
        if self.preview is not None:
            self.index = min(max(self.index + delta, 0), self.preview.slices - 1)
            self.refresh()

    def render(self) -> Text:
        if self.preview is None:  # loading, or why there is no preview
            return Text(self.message, style="dim" if self.message == LOADING else "bold")
        cols, rows = self.content_size.width, self.content_size.height
        if cols < 4 or rows < 2:
            return Text("")
        draw = draw_symbols if self.symbols else draw_colour
        return draw(self.preview, self.index, cols, rows)
