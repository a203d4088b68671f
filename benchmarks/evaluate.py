"""Model accuracy: held-out phantoms, lesions inserted into a real normal scan, the real normal
scan as it is, and the labelled COVID-19 / CAP scans. Prints JSON; writes overlay PNGs.

    python benchmarks/evaluate.py [--phantoms 4] [--out out/eval] [--skip-real]

Everything runs through `appliance.analysis.Analyzer` (the product's own path). Phantom seeds
are >= 1_000_000 (never used in training). normal-normal001, covid-P001 and cap-cap001 were
never trained on. Figures go into MODEL_CARD.md and notes, never into test assertions.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import time
from pathlib import Path

import numpy as np

from appliance.analysis import Analyzer
from appliance.cli import prefer_small_pages
from appliance.config import load_config
from appliance.dicom.series import SeriesInfo, load_series
from appliance.labels import Lobe
from appliance.pipeline import classical
from appliance.pipeline.quantify import quantify
from appliance.render import axial, coronal, montage, overlay
from appliance.volume import Volume

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT.parent / "shared" / "data" / "real" / "covid-ct-md"
EVAL_SEED_BASE = 1_000_000
# Normal adult lobe volume fractions (% of total lung), from CT volumetry of healthy adults
# (e.g. Tan et al./ Yamada et al.: RUL ~18-22, RML ~8-10, RLL ~25, LUL ~22-24, LLL ~22);
# the ranges are widened for individual variation.
NORMAL_LOBE_PCT = {"RUL": (12.0, 30.0), "RML": (4.0, 14.0), "RLL": (17.0, 35.0),
                   "LUL": (15.0, 32.0), "LLL": (15.0, 32.0)}
LABEL_LOBES = ("LLL", "LUL", "RLL", "RML", "RUL")
INVOLVED_PLO = 0.5
AWAY_FROM_LABEL_SLICES = 3
"""An infection-free slice counts as 'away from the labelled disease' when no slice this close
is labelled infected (lesions run on past the labelled range: covid-P001 slices 18-22)."""
AIRWAY_LUMEN_HU = -950.0
"""Mean HU of a 5-voxel neighbourhood below which a voxel is airway lumen, not parenchyma."""
NODULE_FOUND_SHARE = 0.3
"""An inserted nodule counts as found when the model calls at least this share of it opacity."""
SLICE_INVOLVED_FRACTION = 0.005
"""A slice counts as 'involved' when opacity covers more than this fraction of its lung area."""


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    s = int(a.sum()) + int(b.sum())
    return 2.0 * int((a & b).sum()) / s if s else None


def info_for(name: str, shape) -> SeriesInfo:
    """A SeriesInfo for arrays that did not come from DICOM (phantoms made in memory)."""
    return SeriesInfo(
        patient_id=name, patient_name=name, patient_sex=None, patient_age_years=None, patient_birth_date=None,
        study_instance_uid=name, series_instance_uid=name, study_date=None, acquired_at=None, manufacturer=None,
        kernel=None, kvp=None, slice_thickness_mm=None, series_description=None,
        sop_instance_uids=tuple(f"{name}.{i}" for i in range(shape[0])), sop_class_uid="", files=(),
    )


def segmentation_scores(lobes_t, opac_t, lobes_p, opac_p, voxel_ml) -> dict:
    qt = quantify(lobes_t, opac_t, voxel_ml)["regions"]
    qp = quantify(lobes_p, opac_p, voxel_ml)["regions"]
    lung_t, lung_p = lobes_t > 0, lobes_p > 0
    scores = {
        "lung_dice": dice(lung_t, lung_p),
        "lobe_dice": {lb.name: dice(lobes_t == lb, lobes_p == lb) for lb in Lobe},
        "opacity_dice": dice(opac_t > 0, opac_p > 0),
        "ggo_dice": dice(opac_t == 1, opac_p == 1),
        "consolidation_dice": dice(opac_t == 2, opac_p == 2),
        "plo_true": {r: qt[r]["plo_pct"] for r in qt},
        "plo_pred": {r: qp[r]["plo_pct"] for r in qp},
    }
    scores["plo_abs_error"] = _plo_errors(qt, qp)
    # where a per-lobe error comes from: the opacity alone (true lobes, predicted opacity) and
    # the lobe borders alone (predicted lobes, true opacity)
    scores["plo_abs_error_opacity_only"] = _plo_errors(qt, quantify(lobes_t, opac_p, voxel_ml)["regions"])
    scores["plo_abs_error_lobes_only"] = _plo_errors(qt, quantify(lobes_p, opac_t, voxel_ml)["regions"])
    vals = [v for v in scores["lobe_dice"].values() if v is not None]
    scores["mean_lobe_dice"] = float(np.mean(vals)) if vals else None
    return scores


def _plo_errors(truth: dict, pred: dict) -> dict:
    return {r: (abs(pred[r]["plo_pct"] - truth[r]["plo_pct"])
                if pred[r]["plo_pct"] is not None and truth[r]["plo_pct"] is not None else None)
            for r in truth}


def save_overlays(out: Path, name: str, volume: Volume, lobes, opacity, extra_title: str = "") -> list[str]:
    hu = volume.array
    paths = []
    k_best = int(np.argmax((opacity > 0).sum(axis=(1, 2)))) if opacity.any() else None
    panels = [axial(hu, lobes, opacity), axial(hu, lobes, opacity, k=k_best) if k_best is not None else axial(hu),
              coronal(hu, lobes, opacity, spacing=volume.spacing)]
    titles = [f"{name} axial (most lung)", f"axial (most opacity){extra_title}", "coronal"]
    path = out / f"{name}.png"
    montage(panels, titles).save(path)
    paths.append(str(path))
    return paths


def eval_phantoms(analyzer: Analyzer, n: int, out: Path) -> dict:
    from appliance.phantom import synthesize

    severities = ("none", "moderate", "severe", "critical")
    cases = []
    for i in range(n):
        seed, sev = EVAL_SEED_BASE + i, severities[i % len(severities)]
        p = synthesize(seed, sev, spacing=(2.0, 0.7, 0.7), shape=(170, 512, 512))
        vol = Volume(p.hu, p.spacing)
        a = analyzer.analyze_volume(vol, info_for(f"phantom{seed}", p.hu.shape))
        s = segmentation_scores(p.lobes, p.opacity, a.lobes, a.opacity, vol.voxel_ml)
        s.update(seed=seed, severity=sev, seconds=a.result["timings_s"]["total"], qa=a.result["qa"]["flags"])
        cases.append(s)
        save_overlays(out, f"phantom{seed}-{sev}", vol, a.lobes, a.opacity)
    def worst_lobe(key: str) -> float | None:
        errors = [c[key][lb.name] for c in cases for lb in Lobe if c[key][lb.name] is not None]
        return max(errors) if errors else None

    return {
        "cases": cases,
        "mean_lung_dice": _mean_or_none(c["lung_dice"] for c in cases),
        "mean_lobe_dice": _mean_or_none(c["mean_lobe_dice"] for c in cases),
        # opacity Dice is only meaningful where there is opacity (a "none" case scores 0 for any speck)
        "mean_opacity_dice": _mean_or_none(c["opacity_dice"] for c in cases if c["severity"] != "none"),
        "max_whole_plo_abs_error": _max_or_none(c["plo_abs_error"]["whole"] for c in cases),
        "max_lobe_plo_abs_error": worst_lobe("plo_abs_error"),
        "max_lobe_plo_abs_error_opacity_only": worst_lobe("plo_abs_error_opacity_only"),
        "max_lobe_plo_abs_error_lobes_only": worst_lobe("plo_abs_error_lobes_only"),
    }


def _mean_or_none(values) -> float | None:
    """Mean of the figures a case has (None entries: undefined there, e.g. no opacity)."""
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


def _max_or_none(values) -> float | None:
    """Largest figure; None when a case has none (e.g. no lung predicted: PLO undefined)."""
    vals = list(values)
    return None if not vals or any(v is None for v in vals) else max(vals)


def eval_inserted(analyzer: Analyzer, out: Path) -> dict:
    from appliance.lesions import insert_lesions

    volume, info = load_series(REAL / "normal-normal001")
    lung = classical.lung_mask(volume.array, volume.spacing)
    res = {}
    for sev, seed in (("moderate", EVAL_SEED_BASE + 101), ("severe", EVAL_SEED_BASE + 102)):
        hu, mask = insert_lesions(volume.array, lung, volume.spacing, seed=seed, severity=sev)
        vol = Volume(hu.astype(volume.array.dtype), volume.spacing, volume.origin, volume.direction)
        a = analyzer.analyze_volume(vol, info)
        lung_ref = lung | (mask > 0)
        plo_true = 100.0 * float((mask > 0).sum()) / float(lung_ref.sum())
        res[sev] = {
            "opacity_dice": dice(mask > 0, a.opacity > 0),
            "plo_true": plo_true,
            "plo_pred": a.result["regions"]["whole"]["plo_pct"],
            "plo_abs_error": (abs(a.result["regions"]["whole"]["plo_pct"] - plo_true)
                              if a.result["regions"]["whole"]["plo_pct"] is not None else None),
            "lung_dice_vs_classical": dice(lung_ref, a.lobes > 0),
        }
        save_overlays(out, f"normal001-inserted-{sev}", vol, a.lobes, a.opacity)
    return res


def eval_nodules(analyzer: Analyzer, out: Path, count: int = 12) -> dict:
    """Small ground-glass nodules (the training augmentation of export.train --nodules) inserted
    into normal001's real lungs with an evaluation seed: how many the opacity stage finds."""
    from scipy import ndimage

    from appliance.lesions import add_nodules

    volume, info = load_series(REAL / "normal-normal001")
    hu = volume.array.astype(np.int16, copy=True)
    # the threshold mask holds the trachea and main bronchi: no place for a nodule
    lung = classical.lung_mask(volume.array, volume.spacing) & (
        ndimage.uniform_filter(hu.astype(np.float32), 5) > AIRWAY_LUMEN_HU)
    truth = np.zeros(hu.shape, np.uint8)
    ids = np.zeros(hu.shape, np.uint16)
    add_nodules(np.random.default_rng(EVAL_SEED_BASE + 103), hu, truth, lung, volume.spacing,
                count=(count, count), ids=ids)
    vol = Volume(hu.astype(volume.array.dtype), volume.spacing, volume.origin, volume.direction)
    a = analyzer.analyze_volume(vol, info)
    found, panels, titles = [], [], []
    for i in [int(i) for i in np.unique(ids) if i]:  # by number: vessels can cut one in pieces
        nodule = ids == i
        share = float((a.opacity[nodule] > 0).mean())
        found.append(share >= NODULE_FOUND_SHARE)
        if len(panels) < 6:
            k, y, x = (int(v) for v in np.argwhere(nodule).mean(axis=0))
            crop = (k, slice(max(y - 40, 0), y + 40), slice(max(x - 40, 0), x + 40))
            panels.append(overlay(hu[crop], nodule[crop].astype(np.uint8), a.opacity[crop]))
            titles.append(f"nodule {i}: {100 * share:.0f}% called")
    if panels:
        montage(panels, titles, height=240).save(out / "normal001-inserted-nodules.png")
    return {
        "nodules": len(found), "found": int(sum(found)),
        "sensitivity": sum(found) / len(found) if found else None,
        "found_means": f">= {NODULE_FOUND_SHARE:.0%} of the nodule's voxels called opacity",
        "opacity_dice_in_nodules": dice(truth > 0, (a.opacity > 0) & (ids > 0)),
        "opacity_ml_outside_nodules": float(((a.opacity > 0) & (truth == 0)).sum()) * vol.voxel_ml,
        "nodule_ml": float((truth > 0).sum()) * vol.voxel_ml,
    }


def eval_normal(analyzer: Analyzer, out: Path, case: str = "normal001") -> dict:
    a = analyzer.analyze(REAL / f"normal-{case}")
    lung = classical.lung_mask(a.volume.array, a.volume.spacing)
    r = a.result["regions"]
    whole = r["whole"]["lung_ml"]
    fractions = {lb.name: 100.0 * r[lb.name]["lung_ml"] / whole for lb in Lobe} if whole else {}
    save_overlays(out, case, a.volume, a.lobes, a.opacity)
    return {
        "lung_dice_vs_classical": dice(lung, a.lobes > 0),
        "lung_ml": whole, "classical_lung_ml": float(lung.sum()) * a.volume.voxel_ml,
        "lobe_fraction_pct": fractions,
        "lobe_fraction_in_normal_range": {k: NORMAL_LOBE_PCT[k][0] <= v <= NORMAL_LOBE_PCT[k][1]
                                          for k, v in fractions.items()},
        "normal_ranges_pct": NORMAL_LOBE_PCT,
        "whole_plo_pct": r["whole"]["plo_pct"],
        "qa": a.result["qa"]["flags"],
    }


def sens_spec(truth: list[bool], pred: list[bool]) -> dict:
    tp = sum(t and p for t, p in zip(truth, pred, strict=True))
    tn = sum((not t) and (not p) for t, p in zip(truth, pred, strict=True))
    pos, neg = sum(truth), len(truth) - sum(truth)
    return {"sensitivity": tp / pos if pos else None, "specificity": tn / neg if neg else None,
            "positives": pos, "negatives": neg}


def eval_labelled(analyzer: Analyzer, case: str, out: Path) -> dict:
    a = analyzer.analyze(REAL / case)
    rows = list(csv.DictReader(open(REAL / "labels" / f"{case}_labels.csv")))
    by_file = {Path(f).name: i for i, f in enumerate(a.info.files)}
    lung = a.lobes > 0
    slices = []  # (index, labelled infected, lung voxels, opacity voxels, opacity fraction)
    lobe_truth = {lb: False for lb in LABEL_LOBES}
    for row in rows:
        k = by_file.get(row["file"])
        if k is None:
            continue
        for lb in LABEL_LOBES:
            lobe_truth[lb] |= row[lb] == "1"
        area, opac = int(lung[k].sum()), int((a.opacity[k] > 0).sum())
        slices.append((k, row["infection"] == "1", area, opac, opac / area if area else 0.0))
    positive = np.array([s[0] for s in slices if s[1]])
    negative = [s for s in slices if not s[1]]
    away = [s for s in negative
            if not positive.size or np.abs(positive - s[0]).min() > AWAY_FROM_LABEL_SLICES]

    def mean_fraction(group: list) -> float | None:
        return float(np.mean([s[4] for s in group])) if group else None

    def volume_share(group: list) -> float | None:
        lung_voxels = sum(s[2] for s in group)
        return sum(s[3] for s in group) / lung_voxels if lung_voxels else None

    r = a.result["regions"]
    plo = {lb: r[lb]["plo_pct"] for lb in LABEL_LOBES}
    labelled = [lb for lb in LABEL_LOBES if lobe_truth[lb]]
    ranked = sorted(LABEL_LOBES, key=lambda lb: -(plo[lb] or 0.0))
    save_overlays(out, case, a.volume, a.lobes, a.opacity)
    # the infection-free slices with the most opacity, to look at (labels or model?)
    worst = sorted(negative, key=lambda s: -s[4])[:2]
    if worst and worst[0][3]:
        hu = a.volume.array
        montage([axial(hu, a.lobes, a.opacity, k=s[0]) for s in worst],
                [f"{case} slice {s[0]} labelled infection-free: {100 * s[4]:.1f}% opacity"
                 for s in worst]).save(out / f"{case}-negative-slices.png")
    classical_ml = float(classical.lung_mask(a.volume.array, a.volume.spacing).sum()) * a.volume.voxel_ml
    return {
        "lobe_plo_pct": plo, "whole_plo_pct": r["whole"]["plo_pct"],
        # context for the lung outline: the HU-threshold mask also holds the trachea and main
        # bronchi, and on some scans gastric or colonic gas touching the lung bases
        "lung_ml": r["whole"]["lung_ml"], "classical_lung_ml": classical_ml,
        "labelled_lobes": labelled,
        "labelled_are_highest": set(ranked[: len(labelled)]) == set(labelled),
        "every_labelled_above_0.5": all((plo[lb] or 0) > INVOLVED_PLO for lb in labelled),
        "lobe_involvement": sens_spec([lobe_truth[lb] for lb in LABEL_LOBES],
                                      [(plo[lb] or 0) > INVOLVED_PLO for lb in LABEL_LOBES]),
        "slice_involvement": sens_spec([s[1] for s in slices],
                                       [s[4] > SLICE_INVOLVED_FRACTION for s in slices]),
        # the floor's figure: each infection-free slice's opacity share of its lung, averaged
        "mean_opacity_fraction_on_negative_slices": mean_fraction(negative),
        # context: the same slices' opacity as a share of their lung volume (small lung-base
        # slices weigh less), and only the slices more than a few slices from labelled disease
        "opacity_volume_share_on_negative_slices": volume_share(negative),
        "away_from_labels": {
            "slices": len(away), "min_distance_slices": AWAY_FROM_LABEL_SLICES + 1,
            "mean_opacity_fraction": mean_fraction(away),
            "opacity_volume_share": volume_share(away),
        },
        "worst_negative_slices": [{"slice": s[0], "opacity_fraction": s[4]} for s in worst],
        "qa": a.result["qa"]["flags"],
    }


def _check(value, floor: float, higher_is_better: bool = True) -> dict:
    ok = value is not None and (value >= floor if higher_is_better else value <= floor)
    return {"value": value, ("floor" if higher_is_better else "ceiling"): floor, "ok": bool(ok)}


def floors(report: dict) -> dict:
    """Every figure the models issue asks for, against its floor (means over the held-out
    phantoms, worst case for PLO errors); `all_ok` decides the manifest's "validated" status."""
    checks: dict[str, dict] = {}
    ph = report.get("phantoms")
    if ph:
        checks["phantom_lung_dice"] = _check(ph["mean_lung_dice"], 0.97)
        checks["phantom_mean_lobe_dice"] = _check(ph["mean_lobe_dice"], 0.90)
        checks["phantom_opacity_dice"] = _check(ph["mean_opacity_dice"], 0.80)
        checks["phantom_whole_plo_error"] = _check(ph["max_whole_plo_abs_error"], 2.0, False)
        checks["phantom_lobe_plo_error"] = _check(ph["max_lobe_plo_abs_error"], 4.0, False)
    for sev, r in (report.get("inserted_normal001") or {}).items():
        checks[f"inserted_{sev}_opacity_dice"] = _check(r["opacity_dice"], 0.75)
        checks[f"inserted_{sev}_plo_error"] = _check(r["plo_abs_error"], 3.0, False)
    n = report.get("normal001")
    if n:
        checks["normal001_lung_dice"] = _check(n["lung_dice_vs_classical"], 0.95)
        in_range = n["lobe_fraction_in_normal_range"]
        checks["normal001_lobe_fractions"] = {"value": n["lobe_fraction_pct"],
                                              "ok": bool(in_range) and all(in_range.values())}
        checks["normal001_whole_plo"] = _check(n["whole_plo_pct"], 3.0, False)
    for case in ("covid-P001", "cap-cap001"):
        r = report.get(case)
        if r:
            checks[f"{case}_labelled_highest"] = {"value": r["labelled_lobes"], "ok": r["labelled_are_highest"]}
            checks[f"{case}_labelled_above_0.5"] = {"value": r["lobe_plo_pct"],
                                                    "ok": r["every_labelled_above_0.5"]}
            # "almost no opacity" on infection-free slices: under 1% of their lung on average
            checks[f"{case}_negative_slices"] = _check(r["mean_opacity_fraction_on_negative_slices"], 0.01, False)
    return {"checks": checks, "all_ok": bool(checks) and all(c["ok"] for c in checks.values())}


def main() -> None:
    prefer_small_pages()  # as the appliance's own processes do
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phantoms", type=int, default=4)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "eval")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument("--models-dir", default="")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = load_config(env={"APPLIANCE_ANALYSIS__MODELS_DIR": args.models_dir} if args.models_dir else {})
    start = time.time()
    report: dict = {"benchmark": "evaluate", "machine": platform.platform()}
    with Analyzer(config, backend="onnxruntime") as analyzer:
        report["models"] = [s.as_result() for s in analyzer.specs.values()]
        report["phantoms"] = eval_phantoms(analyzer, args.phantoms, args.out)
        if not args.skip_real and REAL.exists():
            report["inserted_normal001"] = eval_inserted(analyzer, args.out)
            report["normal001"] = eval_normal(analyzer, args.out)
            report["inserted_nodules_normal001"] = eval_nodules(analyzer, args.out)
            # The training scan: shown for its overlay and its PLO, never counted as evaluation.
            report["normal002_training_scan"] = eval_normal(analyzer, args.out, "normal002")
            report["covid-P001"] = eval_labelled(analyzer, "covid-P001", args.out)
            report["cap-cap001"] = eval_labelled(analyzer, "cap-cap001", args.out)
    report["floors"] = floors(report)
    report["seconds"] = time.time() - start
    (args.out / "evaluate.json").write_text(json.dumps(report, indent=2, default=float))
    print(json.dumps(report, indent=2, default=float))


if __name__ == "__main__":
    main()
