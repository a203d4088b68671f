"""The one analysis path: series -> Volume -> lobes -> opacity -> postprocess -> quantify -> QA.

`appliance analyze`, the daemon's workers, the demo, the tests and the benchmarks all call
`Analyzer`, so they measure the same thing. An Analyzer keeps its model runners open between
scans (the daemon loads and warms the models once).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from os import PathLike

import numpy as np

from appliance import INTENDED_USE, __version__
from appliance.config import Config
from appliance.dicom.series import SelectionRules, SeriesInfo, SeriesRefused, load_series
from appliance.pipeline import classical, postprocess, qa, quantify
from appliance.pipeline.geometry import to_canonical
from appliance.pipeline.segment import StageResult, segment_lobes, segment_opacity
from appliance.runtime import load_manifest, open_runner, resolve_backend
from appliance.volume import Volume

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
CLASSICAL_SPACING_MM = 2.0
"""In-plane spacing (about) at which the HU-threshold lung is computed: volumes only."""
Progress = Callable[[str, int, int], None]


@dataclass
class Analysis:
    """A finished analysis: the JSON contract and the masks on the loaded series' grid."""

    result: dict
    lobes: np.ndarray
    opacity: np.ndarray
    volume: Volume
    info: SeriesInfo


def _scan_fields(info: SeriesInfo, volume: Volume) -> dict:
    return {
        "patient_id": info.patient_id,
        "patient_sex": info.patient_sex,
        "patient_age_years": info.patient_age_years,
        "study_instance_uid": info.study_instance_uid,
        "series_instance_uid": info.series_instance_uid,
        "acquired_at": info.acquired_at,
        "manufacturer": info.manufacturer,
        "kernel": info.kernel,
        "kvp": info.kvp,
        "shape": list(volume.shape),
        "spacing_mm": list(volume.spacing),
        "slice_thickness_mm": info.slice_thickness_mm,
    }


def _with_weights(entry: dict, stage: StageResult) -> dict:
    """A model's result entry plus the class weights its labels were made with and the scan's
    burden that chose them (the weights follow the burden: see ModelSpec.class_weights_for)."""
    weights = list(stage.class_weights) if stage.class_weights is not None else None
    burden = round(stage.foreground_pct, 3) if stage.foreground_pct is not None else None
    return {**entry, "class_weights": weights, "burden_pct": burden}


def classical_lung_ml(volume: Volume) -> float:
    """HU-threshold lung volume on an in-plane-downsampled copy (fast; volumes only)."""
    step = max(1, int(round(CLASSICAL_SPACING_MM / min(volume.spacing[1:]))))
    hu = volume.array[:, ::step, ::step]
    spacing = (volume.spacing[0], volume.spacing[1] * step, volume.spacing[2] * step)
    return classical.lung_volume_ml(hu, spacing)


class Analyzer:
    """Models opened once; `analyze` many times. Use as a context manager."""

    def __init__(self, config: Config, backend: str | None = None) -> None:
        self.config = config
        a = config.analysis
        self.specs = load_manifest(a.models_dir or None)
        name, why_not = resolve_backend(backend or a.backend)
        if why_not:
            log.info(why_not)
        self.backend_name = name
        self.runners = {
            key: open_runner(name, spec, precision=a.precision, threads=a.threads)
            for key, spec in self.specs.items()
            if key in ("lobes", "opacity")
        }

    def __enter__(self) -> Analyzer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for runner in self.runners.values():
            runner.close()
        self.runners = {}

    def analyze(
        self, source: str | PathLike | Sequence[str | PathLike], *, progress: Progress | None = None
    ) -> Analysis:
        """Load a series (refusing bad input with SeriesRefused) and analyse it."""
        start = time.perf_counter()
        s = self.config.series
        rules = SelectionRules(min_slices=s.min_slices, max_gap_factor=s.max_gap_factor,
                               max_tilt_deg=s.max_tilt_deg)
        load_progress = (lambda done, total: progress("load", done, total)) if progress else None
        volume, info = load_series(source, rules=rules, progress=load_progress,
                                   threads=self.config.analysis.threads)
        return self.analyze_volume(volume, info, progress=progress,
                                   load_seconds=time.perf_counter() - start)

    def analyze_volume(
        self, volume: Volume, info: SeriesInfo, *, progress: Progress | None = None,
        load_seconds: float = 0.0,
    ) -> Analysis:
        a, timings = self.config.analysis, {"load": load_seconds}
        t = time.perf_counter()
        canonical, reorient = to_canonical(volume)
        lung_ml_classical = classical_lung_ml(canonical)
        timings["classical"] = time.perf_counter() - t
        if lung_ml_classical < a.min_lung_ml:
            raise SeriesRefused(
                f"no lungs found in series {info.series_instance_uid}: {lung_ml_classical:.0f} ml of "
                f"aerated lung (at least {a.min_lung_ml:.0f} ml expected for a chest CT)"
            )
        lobes_spec, opacity_spec = self.specs["lobes"], self.specs["opacity"]
        stage1 = segment_lobes(canonical, self.runners["lobes"], lobes_spec,
                               batch_size=a.batch_size, progress=progress)
        timings["lobes"] = stage1.seconds
        t = time.perf_counter()
        lobes = postprocess.clean_lobes(stage1.labels)
        timings["postprocess"] = time.perf_counter() - t
        stage2 = segment_opacity(canonical, lobes > 0, self.runners["opacity"], opacity_spec,
                                 batch_size=a.batch_size, progress=progress)
        timings["opacity"] = stage2.seconds
        t = time.perf_counter()
        lobes, opacity = postprocess.combine(lobes, stage2.labels, canonical.array,
                                             canonical.spacing, stage2.decision_labels)
        timings["postprocess"] += time.perf_counter() - t
        t = time.perf_counter()
        q = quantify.quantify(lobes, opacity, canonical.voxel_ml, hu=canonical.array,
                              involvement_min_pct=a.involvement_min_pct)
        timings["quantify"] = time.perf_counter() - t
        t = time.perf_counter()
        qa_inputs = qa.QAInputs(
            lobes=lobes, spacing=canonical.spacing, confidence=stage1.confidence,
            confidence_limit=lobes_spec.min_confidence, classical_lung_ml=lung_ml_classical,
            motion_score=qa.motion_score(lobes > 0, canonical.spacing),
        )
        checks = qa.run_checks(q["regions"], qa_inputs, self.config.qa)
        timings["qa"] = time.perf_counter() - t
        timings["total"] = sum(timings.values())
        runner = self.runners["lobes"]
        result = {
            "schema_version": SCHEMA_VERSION,
            "software": {"name": "appliance", "version": __version__},
            "intended_use": INTENDED_USE,
            "scan": _scan_fields(info, volume),
            "regions": q["regions"],
            "severity_score": q["severity_score"],
            "qa": checks,
            "models": [lobes_spec.as_result(), _with_weights(opacity_spec.as_result(), stage2)],
            "backend": runner.describe(),
            "confidence": {"lobes": stage1.confidence, "opacity": stage2.confidence},
            "tiles": {"lobes": stage1.tiles, "opacity": stage2.tiles},
            "timings_s": timings,
            "masks": {"lobes": None, "opacity": None},
        }
        return Analysis(result, reorient.undo(lobes), reorient.undo(opacity), volume, info)
