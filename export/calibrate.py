"""Calibrate the opacity stage's background weight on training phantoms.

    python -m export.calibrate [--models-dir appliance/models] [--phantoms 16] [--write]

The opacity network under-calls the faint rim of ground-glass lesions (its argmax is
conservative). Multiplying the background probability by a weight below 1 before the argmax
moves that border (the lung border still follows the network's plain argmax: see
appliance.pipeline.postprocess.combine); this picks the weight, from a grid, that minimises
the mean absolute per-lobe PLO error over training sources through the product's own stages
and clean-up: phantoms with training seeds (below 1,000,000; the evaluation's seeds are never
used), and the real training scan normal-normal002 as it is (true PLO 0) and with moderate and
severe lesions inserted (exact masks; its whole-lung PLO error counts, as it has no lobe
labels). The evaluation scans are never read here. The network runs once per source; every
weight re-labels the same probabilities.

Heavily diseased lungs want a larger weight than the rest (the low weight widens every lesion's
rim, and where most of the lung is a lesion that over-calls), so the sources are also split by
their disease burden (StageResult.foreground_pct: the plain argmax's share of the stage mask)
and, when that lowers the objective, scans above the split get their own weight
(`choose_weights`; the runtime's ramp between the two: ModelSpec.class_weights_for). Prints
JSON; `--write` stores `class_weights` and `heavy_class_weights` in the manifest (run it after
`export.onnx`, which rewrites the entry).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from appliance.cli import prefer_small_pages
from appliance.labels import Lobe
from appliance.pipeline import postprocess
from appliance.pipeline.geometry import labels_from_probabilities
from appliance.pipeline.segment import segment_lobes, segment_opacity, weighted
from appliance.runtime.base import MODELS_DIR, load_manifest
from appliance.volume import Volume
from export.prepare_real import DEFAULT_SRC

CALIBRATION_SEED_BASE = 900_000
"""Training-range seeds (< 1,000,000), away from the seeds the evaluation uses."""
SEVERITIES = ("none", "moderate", "severe", "critical")
WEIGHTS = (1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2)
SHAPE, SPACING = (170, 512, 512), (2.0, 0.7, 0.7)
"""The evaluation's phantom geometry (a 512 x 512 scan of 340 mm)."""
REAL_SCAN = DEFAULT_SRC
REAL_SEVERITIES = ("none", "moderate", "severe")


def plo(lobes: np.ndarray, opacity: np.ndarray) -> dict[str, float]:
    """PLO (%) of the whole lung and of each lobe; lobes without voxels count as 0."""
    out = {"whole": 100.0 * float((opacity > 0).sum()) / max(int((lobes > 0).sum()), 1)}
    for lobe in Lobe:
        inside = lobes == lobe.value
        out[lobe.name] = 100.0 * float((opacity[inside] > 0).sum()) / max(int(inside.sum()), 1)
    return out


def score(truth_lobes: np.ndarray | None, truth_lung: np.ndarray, truth_opacity: np.ndarray,
          lobes: np.ndarray, opacity: np.ndarray) -> dict[str, float]:
    """PLO errors and opacity Dice; `error` is the calibration objective for this source."""
    a, b = truth_opacity > 0, opacity > 0
    denom = int(a.sum()) + int(b.sum())
    out = {"opacity_dice": 2.0 * int((a & b).sum()) / denom if denom else 1.0}
    p = plo(lobes, opacity)
    if truth_lobes is None:  # a real scan: whole-lung PLO against the inserted lesions
        true_whole = 100.0 * float(a.sum()) / max(int(truth_lung.sum()), 1)
        out["whole_error"] = out["error"] = abs(p["whole"] - true_whole)
        return out
    t = plo(truth_lobes, truth_opacity)
    lobe_err = [abs(p[lb.name] - t[lb.name]) for lb in Lobe]
    out.update(whole_error=abs(p["whole"] - t["whole"]), error=float(np.mean(lobe_err)),
               max_lobe_error=float(max(lobe_err)))
    return out


def sources(n_phantoms: int, real_scan: Path | None,
            ) -> Iterator[tuple[str, Volume, np.ndarray | None, np.ndarray, np.ndarray]]:
    """(name, canonical volume, true lobes or None, true lung, true opacity) per source;
    real sources have no lobe labels (their lung is the classical mask plus the lesions)."""
    from appliance.phantom import synthesize

    for k in range(n_phantoms):
        seed, severity = CALIBRATION_SEED_BASE + k, SEVERITIES[k % len(SEVERITIES)]
        ph = synthesize(seed, severity, spacing=SPACING, shape=SHAPE)
        yield f"phantom:{seed}:{severity}", Volume(ph.hu, ph.spacing), ph.lobes, ph.lobes > 0, ph.opacity
    if real_scan is None:
        return
    from appliance.dicom.series import load_series
    from appliance.lesions import insert_lesions
    from appliance.pipeline import classical
    from appliance.pipeline.geometry import to_canonical

    volume, _ = load_series(real_scan)
    volume, _ = to_canonical(volume)
    lung = classical.lung_mask(volume.array, volume.spacing)
    for k, severity in enumerate(REAL_SEVERITIES):
        if severity == "none":
            hu, mask = volume.array, np.zeros(lung.shape, np.uint8)
        else:
            hu, mask = insert_lesions(volume.array, lung, volume.spacing,
                                      seed=CALIBRATION_SEED_BASE + 100 + k, severity=severity)
        yield (f"real:{real_scan.name}:{severity}",
               Volume(hu.astype(volume.array.dtype), volume.spacing, volume.origin, volume.direction),
               None, lung | (mask > 0), mask)


MIN_HEAVY_SOURCES = 3
"""A heavy-burden rule needs at least this many calibration sources on each side of its threshold."""
MIN_HEAVY_GAIN = 0.01
"""...and must lower the objective by at least this much (PLO points), or one weight serves all."""


def choose_weights(errors: list[dict[float, float]], burdens: list[float],
                   weights: tuple[float, ...]) -> dict[str, Any]:
    """The background weight for every scan, or two: one below and one at or above a threshold
    on the scan's disease burden (the plain argmax's foreground share of the stage mask, %).
    `errors[i][w]` is source i's objective at weight w. Each weight minimises the mean error of
    its side (a tie goes to the larger weight: the plainer argmax). Between the burdens of the
    two sources the split separates the runtime moves linearly from one weight to the other
    (ModelSpec.class_weights_for), so every source is scored at its side's weight."""
    def mean_at(idx: list[int], w: float) -> float:
        return float(np.mean([errors[i][w] for i in idx]))

    def best(idx: list[int]) -> float:
        return min(weights, key=lambda w: (round(mean_at(idx, w), 3), -w))

    everyone = list(range(len(errors)))
    single = best(everyone)
    chosen: dict[str, Any] = {"background_weight": single, "objective": mean_at(everyone, single),
                              "heavy": None}
    order = sorted(everyone, key=lambda i: burdens[i])
    for cut in range(MIN_HEAVY_SOURCES, len(order) - MIN_HEAVY_SOURCES + 1):
        below, above = order[:cut], order[cut:]
        if burdens[below[-1]] == burdens[above[0]]:
            continue
        low, high = best(below), best(above)
        objective = (mean_at(below, low) * len(below) + mean_at(above, high) * len(above)) / len(order)
        if low != high and objective < chosen["objective"] - MIN_HEAVY_GAIN:
            chosen = {"background_weight": low, "objective": objective, "heavy": {
                "foreground_pct": [burdens[below[-1]], burdens[above[0]]],
                "background_weight": high, "sources_above": len(above)}}
    return chosen


def calibrate(models_dir: Path, n_phantoms: int, weights: tuple[float, ...], *,
              real_scan: Path | None = REAL_SCAN, log: Any = None) -> dict[str, Any]:
    from appliance.runtime import open_runner

    specs = load_manifest(models_dir)
    lobes_spec, opacity_spec = specs["lobes"], specs["opacity"]
    rows: list[dict[float, dict[str, float]]] = []
    names: list[str] = []
    burdens: list[float] = []
    with open_runner("onnxruntime", lobes_spec) as lobes_runner, \
            open_runner("onnxruntime", opacity_spec) as opacity_runner:
        start = time.perf_counter()
        for name, volume, truth_lobes, truth_lung, truth_opacity in sources(n_phantoms, real_scan):
            lobes = postprocess.clean_lobes(segment_lobes(volume, lobes_runner, lobes_spec).labels)
            stage2 = segment_opacity(volume, lobes > 0, opacity_runner, opacity_spec,
                                     keep_probabilities=True)
            row = {}
            for w in weights:
                if stage2.probabilities is None or stage2.grid is None:
                    raw = stage2.labels
                else:
                    scaled = weighted(stage2.probabilities.copy(), (w,) + (1.0,) * (opacity_spec.n_classes - 1))
                    raw = labels_from_probabilities(scaled, stage2.grid, volume.array.shape)
                final_lobes, final_opacity = postprocess.combine(
                    lobes, raw, volume.array, volume.spacing, stage2.decision_labels)
                row[w] = score(truth_lobes, truth_lung, truth_opacity, final_lobes, final_opacity)
            names.append(name)
            rows.append(row)
            burdens.append(stage2.foreground_pct or 0.0)
            if log:
                log({"source": name, "seconds": round(time.perf_counter() - start, 1),
                     "burden_pct": round(burdens[-1], 2),
                     "error_by_weight": {w: round(row[w]["error"], 2) for w in weights}})
    table = {w: {key: float(np.mean([r[w][key] for r in rows if key in r[w]]))
                 for key in ("error", "whole_error", "opacity_dice")} for w in weights}
    chosen = choose_weights([{w: r[w]["error"] for w in weights} for r in rows], burdens, weights)
    return {"model": opacity_spec.name, "version": opacity_spec.version, "sources": names,
            "burden_pct": [round(b, 2) for b in burdens],
            "objective": "mean over sources of the mean absolute per-lobe PLO error (phantoms) "
                         "or the whole-lung PLO error (real scan)",
            "by_weight": {str(w): v for w, v in table.items()}, **chosen}


def write_weights(models_dir: Path, background_weight: float,
                  heavy: dict[str, Any] | None = None) -> None:
    """Store the chosen weights in the opacity entry; `heavy` is choose_weights' heavy rule."""
    path = models_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    entry = manifest["models"]["opacity"]
    others = [1.0] * (len(entry["classes"]) - 1)
    entry["class_weights"] = [background_weight] + others
    entry.pop("heavy_class_weights", None)
    if heavy is not None:
        entry["heavy_class_weights"] = {"foreground_pct": heavy["foreground_pct"],
                                        "class_weights": [heavy["background_weight"]] + others}
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    prefer_small_pages()  # as the appliance's own processes do
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models-dir", default=str(MODELS_DIR))
    p.add_argument("--phantoms", type=int, default=16,
                   help="training-seed phantoms, severities in turn (16: four critical ones)")
    p.add_argument("--weights", type=lambda s: tuple(float(v) for v in s.split(",")), default=WEIGHTS)
    p.add_argument("--no-real", action="store_true", help="phantoms only (no real training scan)")
    p.add_argument("--write", action="store_true", help="store the chosen weight in the manifest")
    a = p.parse_args(argv)
    if a.phantoms < 1 or not a.weights or min(a.weights) <= 0:
        print("error: --phantoms must be >= 1 and --weights positive numbers", file=sys.stderr)
        return 2
    models_dir = Path(a.models_dir)

    def log(line: dict[str, Any]) -> None:
        print(json.dumps(line), file=sys.stderr, flush=True)

    real = None if a.no_real else REAL_SCAN
    if real is not None and not real.is_dir():
        print(f"error: the real training scan is not at {real} (use --no-real)", file=sys.stderr)
        return 2
    result = calibrate(models_dir, a.phantoms, a.weights, real_scan=real, log=log)
    if a.write:
        write_weights(models_dir, result["background_weight"], result["heavy"])
        result["written"] = str(models_dir / "manifest.json")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
