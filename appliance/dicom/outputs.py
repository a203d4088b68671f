"""All DICOM outputs of one analysis: SEG, SR and key images, written into a folder.

The files are what the outbox sends to PACS. Three new series in the source study (a SEG, an
SR and a Secondary Capture series: DICOM puts each modality in its own series), numbered 9801-9803
so that they sort after the scanner's.

UIDs are derived from the result (source series, software, models and the figures), not drawn
at random: analysing the same scan again with the same software gives the same instances, so
a re-sent result replaces itself in PACS instead of piling up duplicates, while a changed
result (new model, different figures) gets new UIDs.

Values are checked by pydicom while the objects are built (``writing_validation_mode`` RAISE):
an invalid value fails the write instead of reaching PACS. Reading the scanner's headers stays
lenient. Files are written to a temporary name, synced and renamed, so that the outbox never
picks up a partial file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from appliance.analysis import Analysis
from appliance.dicom.capture import KEY_IMAGES, build_key_images
from appliance.dicom.seg import Equipment, build_segmentation, source_headers
from appliance.dicom.sr import build_report

DIGEST_KEYS = ("scan", "regions", "severity_score", "qa", "models", "software")
"""Parts of the result whose change makes new output instances."""


@dataclass(frozen=True)
class OutputUIDs:
    """Series and instance UIDs of the outputs of one result."""

    seg_series: str
    seg_instance: str
    sr_series: str
    sr_instance: str
    sc_series: str
    sc_instances: tuple[str, ...]


def result_digest(result: dict) -> str:
    """SHA-256 of the result parts that the outputs show (JSON, sorted keys)."""
    if not isinstance(result, dict):
        raise TypeError(f"`result` must be a dict, got {type(result).__name__}")
    part = {k: result.get(k) for k in DIGEST_KEYS}
    text = json.dumps(part, sort_keys=True, default=str, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def output_uids(result: dict, key_images: int = KEY_IMAGES) -> OutputUIDs:
    """Deterministic UIDs for the outputs of ``result`` (see the module docstring)."""
    if key_images < 1:
        raise ValueError(f"`key_images` must be >= 1, got {key_images}")
    digest = result_digest(result)

    def uid(*parts: str) -> str:
        return generate_uid(entropy_srcs=[digest, *parts])

    return OutputUIDs(
        seg_series=uid("seg", "series"), seg_instance=uid("seg", "instance"),
        sr_series=uid("sr", "series"), sr_instance=uid("sr", "instance"),
        sc_series=uid("sc", "series"),
        sc_instances=tuple(uid("sc", "instance", str(i)) for i in range(key_images)),
    )


@contextmanager
def strict_values() -> Iterator[None]:
    """pydicom raises on invalid values set inside this block (STYLE.md item 12).

    pydicom validates a value when its element is created, under ``reading_validation_mode``
    (``writing_validation_mode`` covers the rest), so both are set. Source headers must be
    fully converted before (``source_headers`` does): the scanner's own raw values are then
    not re-validated, but a value copied from them into an output is. pydicom's settings are
    process-wide; the writers run in a worker process, one job at a time.
    """
    settings = pydicom_config.settings
    before = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = pydicom_config.RAISE
    settings.writing_validation_mode = pydicom_config.RAISE
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = before


def _save(ds: Dataset, path: Path) -> Path:
    """Write atomically: temporary name in the same folder, fsync, rename."""
    tmp = path.with_name(path.name + ".part")
    ds.save_as(tmp, enforce_file_format=True)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def write_dicom_outputs(
    analysis: Analysis,
    outdir: str | os.PathLike,
    *,
    key_images: int = KEY_IMAGES,
    device_serial_number: str | None = None,
) -> list[Path]:
    """Write the SEG, the SR and the key images of ``analysis`` into ``outdir`` (created if
    needed); returns their paths in that order. Names: ``seg_<uid>.dcm``, ``sr_<uid>.dcm``,
    ``key<n>_<uid>.dcm`` with the SOP Instance UID."""
    if not isinstance(analysis, Analysis):
        raise TypeError(f"`analysis` must be an Analysis, got {type(analysis).__name__}")
    info, volume, result = analysis.info, analysis.volume, analysis.result
    shape = volume.shape
    for name in ("lobes", "opacity"):
        mask = getattr(analysis, name)
        if mask.shape != shape:
            raise ValueError(f"`analysis.{name}` must have the series' shape {shape}, "
                             f"got {mask.shape}")
    if len(info.files) != shape[0]:
        raise ValueError(f"`analysis.info.files` must list one file per slice ({shape[0]}), "
                         f"got {len(info.files)}")
    frame_numbers = tuple(info.frame_numbers) or (None,) * shape[0]
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    sources = source_headers(info.files)
    equipment = Equipment.from_result(result, device_serial_number)
    uids = output_uids(result, key_images)
    try:
        with strict_values():
            seg = build_segmentation(
                lobes=analysis.lobes, opacity=analysis.opacity, result=result, sources=sources,
                frame_numbers=frame_numbers, series_instance_uid=uids.seg_series,
                sop_instance_uid=uids.seg_instance, equipment=equipment)
            report = build_report(
                result=result, seg=seg, sources=sources, series_instance_uid=uids.sr_series,
                sop_instance_uid=uids.sr_instance, equipment=equipment)
            images = build_key_images(
                volume=volume, lobes=analysis.lobes, opacity=analysis.opacity, result=result,
                sources=sources, frame_numbers=frame_numbers,
                series_instance_uid=uids.sc_series, sop_instance_uids=uids.sc_instances,
                equipment=equipment)
    except ValueError as exc:  # pydicom's value checks name the value, not what it was for
        raise ValueError(f"DICOM outputs of series {info.series_instance_uid} would be "
                         f"invalid: {exc}") from exc
    paths = [_save(seg, out / f"seg_{seg.SOPInstanceUID}.dcm"),
             _save(report, out / f"sr_{report.SOPInstanceUID}.dcm")]
    for n, image in enumerate(images, start=1):
        paths.append(_save(image, out / f"key{n}_{image.SOPInstanceUID}.dcm"))
    return paths
