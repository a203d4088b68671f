"""Pictures of a result: CT slices in a lung window with lobe outlines and opacity fills.

Used for overlay PNGs (evaluation, review), key images and the dashboard preview. Arrays are on
the canonical grid (axis 0 towards the head, axis 1 towards the back, axis 2 towards the
patient's left), so an axial slice shows the patient's left on the image's right (radiological
convention) and a coronal slice is flipped to put the head at the top. Colour-blind-safe
palette (Okabe-Ito); outlines and fills differ in form as well as colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from appliance.labels import Lobe, Opacity

LUNG_WINDOW = (-1350.0, 150.0)
"""HU window (low, high) for display: level -600, width 1500."""
LOBE_COLOURS = {
    Lobe.RUL: (0, 114, 178), Lobe.RML: (0, 158, 115), Lobe.RLL: (86, 180, 233),
    Lobe.LUL: (204, 121, 167), Lobe.LLL: (230, 159, 0),
}
OPACITY_COLOURS = {Opacity.GGO: (240, 228, 66), Opacity.CONSOLIDATION: (213, 94, 0)}
OPACITY_ALPHA = 0.45


def window(hu: np.ndarray, low: float = LUNG_WINDOW[0], high: float = LUNG_WINDOW[1]) -> np.ndarray:
    """HU -> uint8 grey."""
    g = (np.clip(hu, low, high) - low) * (255.0 / (high - low))
    return g.astype(np.uint8)


def overlay(hu: np.ndarray, lobes: np.ndarray | None = None, opacity: np.ndarray | None = None) -> np.ndarray:
    """One 2D slice -> RGB uint8: grey CT, opacity filled translucent, lobe borders drawn."""
    grey = window(hu)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float32)
    if opacity is not None:
        for label, colour in OPACITY_COLOURS.items():
            m = opacity == label
            rgb[m] = (1 - OPACITY_ALPHA) * rgb[m] + OPACITY_ALPHA * np.asarray(colour, np.float32)
    if lobes is not None:
        for label, colour in LOBE_COLOURS.items():
            m = lobes == label
            if m.any():
                edge = m & ~ndimage.binary_erosion(m)
                rgb[edge] = colour
    return rgb.astype(np.uint8)


def axial(hu: np.ndarray, lobes=None, opacity=None, k: int | None = None) -> np.ndarray:
    """Axial slice k (default: the slice with the most lung, else the middle)."""
    if k is None:
        k = int(np.argmax((lobes > 0).sum(axis=(1, 2)))) if lobes is not None and lobes.any() else hu.shape[0] // 2
    return overlay(hu[k], None if lobes is None else lobes[k], None if opacity is None else opacity[k])


def coronal(hu: np.ndarray, lobes=None, opacity=None, j: int | None = None,
            spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> np.ndarray:
    """Coronal slice j (default: the row with the most lung), head at the top, square pixels."""
    if j is None:
        j = int(np.argmax((lobes > 0).sum(axis=(0, 2)))) if lobes is not None and lobes.any() else hu.shape[1] // 2
    rgb = overlay(hu[::-1, j], None if lobes is None else lobes[::-1, j],
                  None if opacity is None else opacity[::-1, j])
    height = max(1, int(round(rgb.shape[0] * spacing[0] / spacing[2])))
    return np.asarray(Image.fromarray(rgb).resize((rgb.shape[1], height), Image.NEAREST))


def montage(panels: list[np.ndarray], titles: list[str] | None = None, height: int = 384) -> Image.Image:
    """Side-by-side panels scaled to a common height, with a title above each."""
    scaled = []
    for p in panels:
        w = max(1, int(round(p.shape[1] * height / p.shape[0])))
        scaled.append(Image.fromarray(p).resize((w, height), Image.BILINEAR))
    title_h = 18 if titles else 0
    canvas = Image.new("RGB", (sum(s.width for s in scaled) + 4 * (len(scaled) - 1), height + title_h), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for i, s in enumerate(scaled):
        canvas.paste(s, (x, title_h))
        if titles:
            draw.text((x + 4, 3), titles[i], fill=(255, 255, 255))
        x += s.width + 4
    return canvas
