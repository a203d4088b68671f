"""Preprocess the one real training scan into small npz files at both stage spacings.

    python -m export.prepare_real [--src .../covid-ct-md/normal-normal002] [--out out/real]

Reads the DICOM series (appliance.dicom.series.load_series), brings it to the canonical
orientation, resamples it to each stage's spacing (HU linear), computes the classical lung mask
(appliance.pipeline.classical.lung_mask) once at the opacity spacing and carries it to the lobe
grid. Writes ``normal002_lobes.npz`` (full field of view: the table and outside air are part of
what stage 1 sees) and ``normal002_opacity.npz`` (cropped to the body box: stage 2 only runs
inside the lungs), each with int16 ``hu``, uint8 ``lung``, ``spacing``, ``case``, ``source``.

Only normal-normal002 may be used: normal-normal001, covid-P001 and cap-cap001 are evaluation
scans and are refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

from export.data import FORBIDDEN_REAL, REAL_CASE, REAL_DIR, stage_spec

DEFAULT_SRC = Path("/work/shared/data/real/covid-ct-md/normal-normal002")
BODY_HU = -400.0
BODY_MARGIN_MM = 15.0
MAX_NPZ_BYTES = 20 * 1024 * 1024


def to_canonical(array: np.ndarray, direction: np.ndarray) -> np.ndarray:
    """Permute/flip an axis-aligned volume so axis n runs along patient axis (z, y, x)[n] with
    increasing coordinate (the canonical orientation). Oblique volumes are refused."""
    d = np.asarray(direction, dtype=float)
    patient_axis = np.abs(d).argmax(axis=1)  # 0 x, 1 y, 2 z for each array axis
    if sorted(patient_axis) != [0, 1, 2] or np.abs(d).max(axis=1).min() < 0.99:
        raise ValueError(f"`direction` must be axis-aligned, got {d.tolist()}")
    order = [int(np.flatnonzero(patient_axis == p)[0]) for p in (2, 1, 0)]
    out = np.transpose(array, order)
    for new_axis, old_axis in enumerate(order):
        if d[old_axis, patient_axis[old_axis]] < 0:
            out = np.flip(out, axis=new_axis)
    return np.ascontiguousarray(out)


def resample(array: np.ndarray, spacing: tuple[float, ...], new_spacing: tuple[float, ...],
             order: int) -> np.ndarray:
    """Resample onto a grid with the same first voxel centre and the same physical extent."""
    shape = [max(1, int(round(n * s / t))) for n, s, t in zip(array.shape, spacing, new_spacing,
                                                              strict=True)]
    coords = np.meshgrid(*[np.arange(n) * t / s for n, s, t in zip(shape, spacing, new_spacing,
                                                                     strict=True)],
                         indexing="ij", sparse=True)
    src = array.astype(np.float32)
    # Separable: one axis at a time keeps memory small (map_coordinates on the full grid is not).
    out = src
    for axis in range(3):
        idx = coords[axis].reshape(-1)
        out = ndimage.map_coordinates(
            out, np.meshgrid(*[idx if a == axis else np.arange(out.shape[a]) for a in range(3)],
                             indexing="ij"),
            order=order, mode="nearest")
    return out


def load(src: Path) -> tuple[np.ndarray, tuple[float, float, float], str]:
    """HU (canonical, int16) and spacing of the series in `src`."""
    if any(name in str(src) for name in FORBIDDEN_REAL):
        raise ValueError(f"`src` must not be an evaluation scan ({', '.join(FORBIDDEN_REAL[:3])}), "
                         f"got {src}")
    from appliance.dicom.series import load_series

    volume, info = load_series(src)
    hu = to_canonical(volume.array, volume.direction)
    d = np.abs(np.asarray(volume.direction)).argmax(axis=1)
    spacing = tuple(float(volume.spacing[int(np.flatnonzero(d == p)[0])]) for p in (2, 1, 0))
    return hu.astype(np.int16), spacing, info.series_instance_uid  # type: ignore[return-value]


def body_box(hu: np.ndarray, spacing: tuple[float, ...]) -> tuple[slice, ...]:
    body = ndimage.binary_opening(hu > BODY_HU, iterations=2)
    idx = np.argwhere(body)
    if len(idx) == 0:
        raise ValueError("`hu` must contain a body (nothing above -400 HU)")
    margin = [int(np.ceil(BODY_MARGIN_MM / s)) for s in spacing]
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, hu.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def prepare(src: Path = DEFAULT_SRC, out: Path = REAL_DIR) -> dict[str, dict[str, object]]:
    from appliance.pipeline.classical import lung_mask

    hu, spacing, series_uid = load(src)
    out.mkdir(parents=True, exist_ok=True)
    op_spec, lobe_spec = stage_spec("opacity"), stage_spec("lobes")
    hu_op = resample(hu, spacing, op_spec.spacing_mm, order=1)
    lung_op = lung_mask(hu_op, op_spec.spacing_mm)
    hu_lobes = resample(hu, spacing, lobe_spec.spacing_mm, order=1)
    lung_lobes = resample(lung_op.astype(np.float32), op_spec.spacing_mm, lobe_spec.spacing_mm,
                          order=1) > 0.5
    lung_lobes = _fit(lung_lobes, hu_lobes.shape)
    box = body_box(hu_op, op_spec.spacing_mm)
    report = {}
    for stage, h, lung, sp, crop in (
        ("lobes", hu_lobes, lung_lobes, lobe_spec.spacing_mm, None),
        ("opacity", hu_op, lung_op, op_spec.spacing_mm, box),
    ):
        if crop is not None:
            h, lung = h[crop], lung[crop]
        path = out / f"{REAL_CASE}_{stage}.npz"
        np.savez_compressed(path, hu=np.clip(np.rint(h), -1024, 3071).astype(np.int16),
                            lung=lung.astype(np.uint8), spacing=np.asarray(sp, dtype=np.float64),
                            case=np.asarray(REAL_CASE), source=np.asarray(str(src)),
                            series_uid=np.asarray(series_uid))
        size = path.stat().st_size
        if size > MAX_NPZ_BYTES:
            raise ValueError(f"`{path}` must be under {MAX_NPZ_BYTES} bytes, got {size}")
        report[stage] = {"file": str(path), "shape": list(h.shape), "spacing_mm": list(sp),
                         "lung_ml": round(float(lung.sum() * np.prod(sp) / 1000), 1),
                         "bytes": size}
    return report


def _fit(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop/pad a mask to `shape` (rounding can differ by a voxel between two resamplings)."""
    out = np.zeros(shape, dtype=bool)
    common = tuple(slice(0, min(a, b)) for a, b in zip(mask.shape, shape, strict=True))
    out[common] = mask[common]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.prepare_real",
                                description=__doc__.split("\n")[0])
    p.add_argument("--src", type=Path, default=DEFAULT_SRC)
    p.add_argument("--out", type=Path, default=REAL_DIR)
    a = p.parse_args(argv)
    try:
        report = prepare(a.src, a.out)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
