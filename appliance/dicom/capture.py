"""Key images: a few axial slices with the opacity overlay and the per-lobe figures, as RGB
Secondary Capture images any PACS viewer shows.

Each image is one axial slice in a lung window, radiological convention (the patient's right
on the image's left, anterior at the top, via :mod:`appliance.render` on the canonical grid),
opacity filled (ground-glass yellow, consolidation orange), lobe borders drawn, and beside it
a legend: lung volume, opacity volume and PLO per lobe, per side and for both lungs, the
severity scores, the colour key, the slice position, QA flags, the models, and "not a
diagnosis" (the figures in Huang et al. 2020 pair slices with the same per-lobe numbers).

Slices: the lung's head-foot extent is cut into upper, middle and lower zones; each zone gives
its slice with the most opacity, or its middle slice when it has none. Every image references
its source CT slice (Source Image Sequence) and says it is burned-in, derived and AI-made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from appliance.dicom.seg import Equipment, model_of
from appliance.labels import Lobe, Opacity
from appliance.pipeline.geometry import to_canonical
from appliance.render import LOBE_COLOURS, OPACITY_COLOURS, overlay
from appliance.volume import Volume

SC_SERIES_NUMBER = 9803
KEY_IMAGES = 3
"""Upper, middle and lower lung zone."""
PANEL_PX = 512
"""Height of the image (CT panel and legend), pixels."""
LEGEND_PX = 460
"""Width of the legend panel, pixels."""
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")
"""CID 7005 Contributing Equipment Purpose of Reference."""
SOURCE_IMAGE_PURPOSE = Code("121322", "DCM", "Source image for image processing operation")
"""CID 7202 Source Image Purposes of Reference."""
NOT_A_DIAGNOSIS = "AI-generated. NOT A DIAGNOSIS: research and triage support."
TABLE_ROWS = (("RUL", "RUL"), ("RML", "RML"), ("RLL", "RLL"), ("LUL", "LUL"), ("LLL", "LLL"),
              ("right", "Right"), ("left", "Left"), ("whole", "Both"))
"""Result region key and its row label, in the paper's table order."""
BACKGROUND = (0, 0, 0)
TEXT = (255, 255, 255)
DIM = (170, 170, 170)
WARN = (255, 176, 0)


@dataclass(frozen=True)
class KeySlice:
    """A chosen slice: its index on the canonical grid and on the scan (source) grid."""

    canonical: int
    scan: int | None
    """None when the scan's slice axis is not the canonical one (no single source slice)."""
    zone: str


def key_slices(
    lobes: np.ndarray, opacity: np.ndarray, count: int = KEY_IMAGES
) -> list[tuple[int, str]]:
    """(canonical slice, zone name) from the top of the lungs down; masks on the canonical grid
    (axis 0 towards the head)."""
    if count < 1:
        raise ValueError(f"`count` must be >= 1, got {count}")
    lung_per_slice = (lobes > 0).sum(axis=(1, 2))
    present = np.flatnonzero(lung_per_slice)
    if present.size == 0:
        return [(lobes.shape[0] // 2, "middle")]
    top, bottom = int(present.max()), int(present.min())
    opacity_per_slice = ((opacity > 0) & (lobes > 0)).sum(axis=(1, 2))
    edges = np.linspace(top + 1, bottom, count + 1)  # from the head down
    names = _zone_names(count)
    out: list[tuple[int, str]] = []
    for z in range(count):
        hi, lo = int(np.ceil(edges[z])) - 1, int(np.ceil(edges[z + 1]))
        ks = np.arange(lo, hi + 1)
        if ks.size == 0:
            continue
        best = ks[np.argmax(opacity_per_slice[ks])]
        k = int(best) if opacity_per_slice[best] > 0 else int(ks[ks.size // 2])
        if all(k != seen for seen, _ in out):
            out.append((k, names[z]))
    return out


def _zone_names(count: int) -> list[str]:
    if count == 3:
        return ["upper", "middle", "lower"]
    return [f"zone {i + 1} of {count}" for i in range(count)]


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, TypeError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _fmt_pct(value: float | None) -> str:
    """DESIGN.md display rounding: one decimal, two below 1%."""
    if value is None:
        return "n/a"
    return f"{value:.2f}" if abs(value) < 1 else f"{value:.1f}"


def _fmt_ml(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def legend(result: dict, where: str, height: int = PANEL_PX, width: int = LEGEND_PX) -> Image.Image:
    """The figures panel: per-region table, colour key, slice, QA, models, disclaimer."""
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    big, small = _font(18), _font(14)
    y = 10
    draw.text((12, y), "Lung opacification (QCT-PLO)", font=big, fill=TEXT)
    y += 30
    columns = [(12, "Region", False), (160, "Lung ml", True), (260, "Opac. ml", True),
               (340, "PLO %", True), (440, "Score", True)]
    for x, title, right in columns:
        _text(draw, x, y, title, small, DIM, right)
    y += 20
    regions = result.get("regions") or {}
    for key, label in TABLE_ROWS:
        r = regions.get(key) or {}
        score = r.get("severity")
        if key == "whole":
            score = result.get("severity_score")
            draw.line([(12, y - 2), (width - 12, y - 2)], fill=DIM)
        cells = [label, _fmt_ml(r.get("lung_ml")), _fmt_ml(r.get("opacity_ml")),
                 _fmt_pct(r.get("plo_pct")),
                 "" if score is None else (f"{score}/25" if key == "whole" else f"{score}/5")]
        if key in ("right", "left"):
            cells[4] = ""
        colour = LOBE_COLOURS.get(Lobe[key]) if key in Lobe.__members__ else TEXT
        for (x, _, right), cell in zip(columns, cells, strict=True):
            _text(draw, x, y, cell, small, colour if x == 12 else TEXT, right)
        y += 20
    y += 8
    x = 12
    for label, colour in ((Opacity.GGO, OPACITY_COLOURS[Opacity.GGO]),
                          (Opacity.CONSOLIDATION, OPACITY_COLOURS[Opacity.CONSOLIDATION])):
        draw.rectangle([x, y + 2, x + 14, y + 14], fill=colour)
        name = "ground-glass" if label == Opacity.GGO else "consolidation"
        draw.text((x + 20, y), name, font=small, fill=TEXT)
        x += 40 + int(draw.textlength(name, font=small))
    draw.text((x, y), "lines: lobe borders", font=small, fill=DIM)
    y += 26
    draw.text((12, y), where, font=small, fill=TEXT)
    y += 20
    qa = result.get("qa") or {}
    flags = [f.get("code", "?") for f in qa.get("flags") or []]
    if flags:
        draw.text((12, y), "QA: review (" + ", ".join(flags) + ")", font=small, fill=WARN)
        y += 20
    models = ", ".join(f"{m.get('name')} {m.get('version')}" for m in result.get("models") or [])
    software = result.get("software") or {}
    made_by = f"{software.get('name', '')} {software.get('version', '')}; models: {models}"
    draw.text((12, y), made_by, font=small, fill=DIM)
    draw.rectangle([0, height - 34, width, height], fill=(90, 0, 0))
    draw.text((12, height - 27), NOT_A_DIAGNOSIS, font=small, fill=TEXT)
    return img


def _text(draw: ImageDraw.ImageDraw, x: int, y: int, text: str, font, fill, right: bool) -> None:
    if right:
        x = x - int(draw.textlength(text, font=font))
    draw.text((x, y), text, font=font, fill=fill)


def ct_panel(hu: np.ndarray, lobes: np.ndarray, opacity: np.ndarray,
             pixel_spacing: tuple[float, float], height: int = PANEL_PX) -> Image.Image:
    """One canonical axial slice with overlay, scaled to ``height`` with square pixels, and the
    patient's right and left marked."""
    rgb = overlay(hu, lobes, opacity)
    rows, cols = rgb.shape[:2]
    width = max(1, int(round(height * cols * pixel_spacing[1] / (rows * pixel_spacing[0]))))
    resample = Image.NEAREST if height >= 2 * rows else Image.BILINEAR
    img = Image.fromarray(rgb).resize((width, height), resample)
    draw = ImageDraw.Draw(img)
    font = _font(18)
    for x, letter in ((8, "R"), (width - 20, "L")):
        draw.text((x, height // 2 - 10), letter, font=font, fill=TEXT, stroke_width=2,
                  stroke_fill=BACKGROUND)
    return img


def compose(panel: Image.Image, figures: Image.Image) -> np.ndarray:
    """CT panel and legend side by side -> (rows, cols, 3) uint8."""
    canvas = Image.new("RGB", (panel.width + 4 + figures.width, panel.height), BACKGROUND)
    canvas.paste(panel, (0, 0))
    canvas.paste(figures, (panel.width + 4, 0))
    return np.asarray(canvas, dtype=np.uint8)


def choose(volume: Volume, lobes: np.ndarray, opacity: np.ndarray,
           count: int = KEY_IMAGES) -> tuple[Volume, np.ndarray, np.ndarray, list[KeySlice]]:
    """Canonical copies of the volume and masks, and the key slices on both grids."""
    canonical, reo = to_canonical(volume)
    lobes_c, opacity_c = reo.apply(lobes), reo.apply(opacity)
    n = volume.shape[0]
    out = []
    for k, zone in key_slices(lobes_c, opacity_c, count):
        scan = None
        if reo.perm[0] == 0:
            scan = n - 1 - k if reo.flip[0] else k
        out.append(KeySlice(k, scan, zone))
    return canonical, lobes_c, opacity_c, out


def _source_reference(source: Dataset, frame: int | None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(SOURCE_IMAGE_PURPOSE)]
    return item


def build_key_images(
    *,
    volume: Volume,
    lobes: np.ndarray,
    opacity: np.ndarray,
    result: dict,
    sources: Sequence[Dataset],
    frame_numbers: Sequence[int | None],
    series_instance_uid: str,
    sop_instance_uids: Sequence[str],
    equipment: Equipment,
    series_number: int = SC_SERIES_NUMBER,
    series_description: str = "AI lung opacity key images (not for diagnosis)",
) -> list[hd.sc.SCImage]:
    """Up to ``len(sop_instance_uids)`` key images (one per lung zone) of one analysis.

    ``volume``, ``lobes`` and ``opacity`` are on the loaded series' grid; ``sources`` and
    ``frame_numbers`` as for :func:`appliance.dicom.seg.build_segmentation`.
    """
    if not sources:
        raise ValueError("`sources` must hold the source images' headers, got none")
    if not sop_instance_uids:
        raise ValueError("`sop_instance_uids` must hold at least one UID, got none")
    canonical, lobes_c, opacity_c, slices = choose(volume, lobes, opacity, len(sop_instance_uids))
    multi = len(sources) == 1 and int(sources[0].get("NumberOfFrames") or 1) > 1
    lobes_model, opacity_model = model_of(result, "lobes"), model_of(result, "opacity")
    models = (f"{lobes_model['name']} {lobes_model['version']}, "
              f"{opacity_model['name']} {opacity_model['version']}")
    images = []
    for i, (key, uid) in enumerate(zip(slices, sop_instance_uids, strict=False)):
        k = key.canonical
        z = float(canonical.position((k, 0, 0))[2])
        where = (f"{key.zone} zone: slice {k + 1} of {canonical.shape[0]} from the feet, "
                 f"z {z:.1f} mm")
        panel = ct_panel(canonical.array[k], lobes_c[k], opacity_c[k], canonical.spacing[1:])
        pixels = compose(panel, legend(result, where))
        source = None
        frame = None
        if key.scan is not None:
            source = sources[0] if multi else sources[key.scan]
            frame = frame_numbers[key.scan] if multi else None
        ref = source if source is not None else sources[0]
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=pixels,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=uid,
            instance_number=i + 1,
            manufacturer=equipment.manufacturer,
            patient_orientation=("L", "P"),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            contributing_equipment=[hd.ContributingEquipment(
                manufacturer=equipment.manufacturer,
                purpose_of_reference=PROCESSING_EQUIPMENT,
                manufacturer_model_name=equipment.model_name,
                software_versions=equipment.software_version,
                device_serial_number=equipment.device_serial_number,
                contribution_description=f"AI segmentation and quantification ({models})",
            )],
            series_description=series_description,
        )
        image.ConversionType = "WSD"  # made on a workstation, not digitised (highdicom: DI)
        image.BodyPartExamined = "CHEST"  # else Laterality (2C, paired body part) is required
        image.BurnedInAnnotation = "YES"
        image.ImageComments = f"AI-generated key image ({models}); not a diagnosis"
        image.DerivationDescription = (
            "Axial CT slice, lung window, AI opacity overlay and lobe borders, with the "
            "per-lobe figures of the analysis burned in")
        if source is not None:
            image.SourceImageSequence = [_source_reference(source, frame)]
        images.append(image)
    return images
