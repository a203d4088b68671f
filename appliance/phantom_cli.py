"""`appliance phantom`: write synthetic chest CT studies (DICOM) with their exact ground truth.

Layout of OUTDIR:

* one study (no ``--follow-up``): the slice files ``CT000001.dcm``... plus ``truth.npz`` and
  ``truth.json`` directly in OUTDIR;
* with ``--follow-up K``: one folder per study, ``study0_day000``, ``study1_day006``... each
  holding its slices and truth;
* always ``phantom.json``: the patient, the course and one line per study (folder, day, UIDs,
  whole-lung PLO).

``truth.npz`` holds ``lobes`` (uint8 0-5) and ``opacity`` (uint8 0-2) on the grid of the written
series in order of ascending slice position (the canonical orientation), plus ``spacing``
(z, y, x mm) and ``origin`` (LPS of the first voxel). ``truth.json`` holds the figures of
:func:`appliance.pipeline.quantify.quantify` on exactly those masks and the written HU, with
``voxel_ml`` and the phantom's metadata.

With ``--insert-into DICOM_DIR`` the real series is rewritten with lesions inside its lungs (lung
mask: the classical HU threshold + morphology); ``truth.npz`` then holds ``opacity`` (exactly the
voxels that were changed, labelled) and ``lung`` (the mask used), and ``truth.json`` the
whole-lung figures (a real scan has no lobe truth).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from appliance import phantom as ph
from appliance.dicom import ct_writer

MIN_SLICES, MAX_SLICES = 20, 2000
"""The appliance refuses series of fewer than 20 slices (SelectionRules.min_slices)."""
THICKNESS_RANGE = (0.625, 2.5)
MAX_FOLLOW_UP = 20
DISPLAY_FOV_MM = (320.0, 340.0, 350.0, 360.0, 380.0, 400.0)
"""Reconstruction fields of view offered (512 x 512: 0.625-0.78 mm pixels)."""
MATRIX = 512
_TAG_CLI = 11


def _refuse(message: str) -> Exception:
    from appliance.cli import Refused

    return Refused(message)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _check_args(args: argparse.Namespace) -> None:
    if args.severity not in ph.SEVERITIES:
        raise _refuse(
            f"--severity must be one of {', '.join(ph.SEVERITIES)}, got {args.severity!r}"
        )
    if not isinstance(args.seed, int) or not 0 <= args.seed < 2**63:
        raise _refuse(f"--seed must be an integer in [0, 2**63), got {args.seed!r}")
    if not MIN_SLICES <= args.slices <= MAX_SLICES:
        raise _refuse(f"--slices must be in [{MIN_SLICES}, {MAX_SLICES}], got {args.slices}")
    if (
        args.thickness is not None
        and not THICKNESS_RANGE[0] <= args.thickness <= THICKNESS_RANGE[1]
    ):
        raise _refuse(
            f"--thickness must be in [{THICKNESS_RANGE[0]}, {THICKNESS_RANGE[1]}] mm, "
            f"got {args.thickness}"
        )
    if not 0 <= args.follow_up <= MAX_FOLLOW_UP:
        raise _refuse(f"--follow-up must be in [0, {MAX_FOLLOW_UP}], got {args.follow_up}")
    out = Path(args.outdir)
    if out.exists() and not out.is_dir():
        raise _refuse(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.glob("*.dcm")):
        raise _refuse(f"{out} already holds DICOM files; choose an empty folder")


def study_days(seed: int, follow_up: int) -> list[int]:
    """Day 0 and ``follow_up`` later days, 3 to 8 days apart (the paper's follow-up rhythm)."""
    r = ph._rng(seed, _TAG_CLI, 1)
    days = [0]
    for _ in range(follow_up):
        days.append(days[-1] + int(r.integers(3, 9)))
    return days


def grid_for(
    seed: int, slices: int, thickness: float | None
) -> tuple[tuple[float, float, float], float]:
    """(spacing, thickness): a display FOV that holds the body, a z step that covers the lungs
    with margins in ``slices`` slices, and a vendor slice thickness at least that step."""
    s = ph.patient_summary(seed)
    r = ph._rng(seed, _TAG_CLI, 2)
    need = s["body_width_mm"] + 16.0
    fov = next((f for f in DISPLAY_FOV_MM if f >= need), DISPLAY_FOV_MM[-1])
    pixel = fov / MATRIX
    cover = (s["lung_top_mm"] - s["lung_bottom_mm"]) + float(r.uniform(60.0, 80.0))
    step = math.ceil(cover / slices * 1000.0) / 1000.0
    if thickness is None:
        thickness = next((t for t in ph.THICKNESSES if t >= step - 1e-9), ph.THICKNESSES[-1])
    return (step, pixel, pixel), float(thickness)


def _dates(seed: int, age: int) -> tuple[dt.date, str, dt.date]:
    r = ph._rng(seed, _TAG_CLI, 3)
    base = dt.date(2020, 1, 20) + dt.timedelta(days=int(r.integers(0, 100)))
    t = int(r.integers(8 * 3600, 19 * 3600))
    birth = base - dt.timedelta(days=int(age * 365.25 + r.integers(1, 360)))
    return base, f"{t // 3600:02d}{t // 60 % 60:02d}{t % 60:02d}", birth


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def run(args: argparse.Namespace) -> int:
    """The command: phantom studies, or lesions inserted into a real series."""
    _check_args(args)
    if args.insert_into:
        return _insert(args)
    return _phantoms(args)


# ----------------------------------------------------------------------------- phantoms


def _phantoms(args: argparse.Namespace) -> int:
    from appliance.pipeline.quantify import quantify

    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    seed, severity = int(args.seed), args.severity
    summary = ph.patient_summary(seed)
    spacing, thickness = grid_for(seed, args.slices, args.thickness)
    shape = (int(args.slices), MATRIX, MATRIX)
    days = study_days(seed, args.follow_up)
    base, study_time, birth = _dates(seed, summary["age"])
    studies = []
    for k, day in enumerate(days):
        t0 = time.perf_counter()
        where = out if args.follow_up == 0 else out / f"study{k}_day{day:03d}"
        _say(
            f"phantom: study {k + 1}/{len(days)} (day {day}), "
            f"synthesising {shape[0]}x{shape[1]}x{shape[2]}"
        )
        phantom = ph.synthesize(
            seed,
            severity,
            spacing=spacing,
            shape=shape,
            thickness=thickness,
            day=day,
            motion=bool(args.motion),
        )
        meta = phantom.meta
        date = base + dt.timedelta(days=day)
        study_uid = ct_writer.uid_from("phantom", seed, "study", day)
        series_uid = ct_writer.uid_from(
            "phantom", seed, severity, "series", day, args.slices, thickness, bool(args.motion)
        )
        header = ct_writer.SeriesHeader(
            patient_id=meta["patient_id"],
            patient_name=f"PHANTOM^SEED{seed}",
            patient_sex=meta["patient_sex"],
            patient_birth_date=birth.strftime("%Y%m%d"),
            patient_age_years=int(meta["patient_age"]),
            study_instance_uid=study_uid,
            series_instance_uid=series_uid,
            frame_of_reference_uid=ct_writer.uid_from("phantom", seed, "for", day),
            study_date=date.strftime("%Y%m%d"),
            study_time=study_time,
            accession_number=f"A{seed % 10**7:07d}{k:02d}",
            study_id=f"{k + 1}",
            series_number=2 + k % 3,
            manufacturer=meta["manufacturer"],
            model=meta["model"],
            kernel=meta["kernel"],
            kvp=float(meta["kvp"]),
            slice_thickness=thickness,
        )
        _say(f"phantom: writing {shape[0]} slices to {where}")
        paths = ct_writer.write_ct_series(
            where, phantom.hu, phantom.spacing, phantom.origin, header
        )
        voxel_ml = float(np.prod(phantom.spacing)) / 1000.0
        np.savez_compressed(
            where / "truth.npz",
            lobes=phantom.lobes,
            opacity=phantom.opacity,
            spacing=np.array(phantom.spacing),
            origin=np.array(phantom.origin),
        )
        q = quantify(phantom.lobes, phantom.opacity, voxel_ml, hu=phantom.hu)
        truth = {
            "kind": "phantom",
            "intended_use": "synthetic test data; not patient data",
            "voxel_ml": voxel_ml,
            "regions": q["regions"],
            "severity_score": q["severity_score"],
            "phantom": meta,
            "scan": {
                "shape": list(phantom.hu.shape),
                "spacing_mm": list(phantom.spacing),
                "origin_lps_mm": list(phantom.origin),
                "slice_thickness_mm": thickness,
                "study_instance_uid": study_uid,
                "series_instance_uid": series_uid,
                "study_date": header.study_date,
                "files": len(paths),
            },
        }
        _write_json(where / "truth.json", truth)
        whole = q["regions"]["whole"]
        studies.append(
            {
                "folder": str(where.relative_to(out)) if where != out else ".",
                "day": day,
                "study_instance_uid": study_uid,
                "series_instance_uid": series_uid,
                "study_date": header.study_date,
                "plo_pct": whole["plo_pct"],
                "lung_ml": whole["lung_ml"],
            }
        )
        _say(
            f"phantom: day {day}: lung {whole['lung_ml']:.0f} ml, PLO {whole['plo_pct']:.2f} % "
            f"({time.perf_counter() - t0:.1f} s)"
        )
    _write_json(
        out / "phantom.json",
        {
            "kind": "phantom",
            "seed": seed,
            "severity": severity,
            "patient": summary,
            "spacing_mm": list(spacing),
            "slice_thickness_mm": thickness,
            "shape": list(shape),
            "motion": bool(args.motion),
            "studies": studies,
        },
    )
    print(json.dumps({"outdir": str(out), "studies": studies}, indent=2, default=_json_default))
    return 0


# ----------------------------------------------------------------------------- real scans


def _canonical_flips(direction: np.ndarray) -> tuple[int, ...]:
    """Axes to flip to bring an axial series to the canonical orientation, or refuse."""
    d = np.asarray(direction, dtype=float)
    if not np.allclose(np.abs(d), np.eye(3)[[2, 1, 0]], atol=0.02):
        raise _refuse("--insert-into needs an axial series with rows along x and columns along y")
    return tuple(i for i in range(3) if d[i, 2 - i] < 0)


def _insert(args: argparse.Namespace) -> int:
    from appliance.dicom.series import load_series
    from appliance.lesions import insert_lesions, lung_mask
    from appliance.pipeline.quantify import quantify

    src = Path(args.insert_into)
    if not src.exists():
        raise _refuse(f"--insert-into: {src} does not exist")
    out = Path(args.outdir)
    out.mkdir(parents=True, exist_ok=True)
    _say(f"phantom: loading {src}")
    vol, info = load_series(src)
    if any(f is not None for f in info.frame_numbers):
        raise _refuse("--insert-into needs a series of single-frame CT files")
    flips = _canonical_flips(vol.direction)
    hu = vol.array
    canon = np.flip(hu, axis=flips) if flips else hu
    _say("phantom: lung mask (HU threshold + morphology)")
    lung = lung_mask(canon, vol.spacing)
    if not lung.any():
        raise _refuse(f"--insert-into: no lungs found in {src}")
    seed, severity = int(args.seed), args.severity
    days = study_days(seed, args.follow_up)
    base = (
        dt.datetime.strptime(info.study_date, "%Y-%m-%d").date()
        if info.study_date
        else dt.date(2020, 2, 1)
    )
    voxel_ml = vol.voxel_ml
    studies = []
    for k, day in enumerate(days):
        where = out if args.follow_up == 0 else out / f"study{k}_day{day:03d}"
        new, labels = insert_lesions(
            canon, lung, vol.spacing, seed=seed, severity=severity, day=day
        )
        changed = labels > 0
        if flips:
            new, labels, changed = (np.flip(a, axis=flips) for a in (new, labels, changed))
        study_uid = ct_writer.uid_from("insert", info.study_instance_uid, seed, severity, day)
        series_uid = ct_writer.uid_from("insert", info.series_instance_uid, seed, severity, day)
        date = base + dt.timedelta(days=day)
        _say(f"phantom: day {day}: writing {len(info.files)} slices to {where}")
        ct_writer.write_derived_series(
            where,
            info.files,
            new,
            changed,
            series_instance_uid=series_uid,
            study_instance_uid=study_uid,
            study_date=date.strftime("%Y%m%d"),
        )
        lung_o = np.flip(lung, axis=flips) if flips else lung
        np.savez_compressed(
            where / "truth.npz",
            opacity=np.ascontiguousarray(labels),
            lung=np.ascontiguousarray(lung_o),
            spacing=np.array(vol.spacing),
            origin=np.array(vol.origin),
        )
        q = quantify(lung_o.astype(np.uint8), labels, voxel_ml, hu=new)
        truth = {
            "kind": "inserted",
            "intended_use": "real scan with synthetic lesions; not a diagnosis",
            "voxel_ml": voxel_ml,
            "regions": {"whole": q["regions"]["whole"]},
            "lung_mask": "appliance.pipeline.classical.lung_mask (HU threshold + morphology)",
            "source": {
                "folder": str(src),
                "series_instance_uid": info.series_instance_uid,
                "patient_id": info.patient_id,
            },
            "lesions": {"seed": seed, "severity": severity, "day": day},
            "scan": {
                "shape": list(new.shape),
                "spacing_mm": list(vol.spacing),
                "study_instance_uid": study_uid,
                "series_instance_uid": series_uid,
                "study_date": date.strftime("%Y%m%d"),
            },
        }
        _write_json(where / "truth.json", truth)
        whole = q["regions"]["whole"]
        studies.append(
            {
                "folder": str(where.relative_to(out)) if where != out else ".",
                "day": day,
                "study_instance_uid": study_uid,
                "series_instance_uid": series_uid,
                "plo_pct": whole["plo_pct"],
                "lung_ml": whole["lung_ml"],
            }
        )
        _say(f"phantom: day {day}: PLO {whole['plo_pct']:.2f} % of {whole['lung_ml']:.0f} ml")
    _write_json(
        out / "phantom.json",
        {
            "kind": "inserted",
            "seed": seed,
            "severity": severity,
            "source": str(src),
            "studies": studies,
        },
    )
    print(json.dumps({"outdir": str(out), "studies": studies}, indent=2, default=_json_default))
    return 0
