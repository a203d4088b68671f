"""The two model stages on a canonical volume: lungs + lobes over the chest, then opacity inside
the lung box. Arrays in, labels on the scan grid out; the runner does the arithmetic."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from appliance.pipeline.geometry import (
    Grid,
    bounding_box,
    labels_from_probabilities,
    make_grid,
    resample_image,
)
from appliance.pipeline.tiling import plan_tiles, sliding_window
from appliance.runtime.base import ModelSpec, Runner
from appliance.volume import Volume

BODY_HU = -500.0
"""Voxels above this are body (or table); the lobe stage skips tiles without any."""
LUNG_BOX_MARGIN_MM = 6.0
"""Margin around the stage-1 lung when cropping for the opacity stage."""
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class StageResult:
    labels: np.ndarray
    """uint8 labels on the canonical scan grid."""
    confidence: float | None
    """Mean top-class probability over the voxels the stage labelled foreground."""
    tiles: int
    seconds: float
    probabilities: np.ndarray | None = None
    """Model-grid class probabilities (C, *grid.shape), only when asked for (calibration)."""
    grid: Grid | None = None
    plain_labels: np.ndarray | None = None
    """The network's own argmax, before the calibrated class weights; None when no class weight
    differs from 1 (then it equals `labels`). See `decision_labels`."""
    foreground_pct: float | None = None
    """Share (%) of the stage's mask (model grid) that the network's own argmax calls foreground:
    for the opacity stage, the scan's disease burden, which picks the class weights."""
    class_weights: tuple[float, ...] | None = None
    """The class weights `labels` were made with (see ModelSpec.class_weights_for)."""

    @property
    def decision_labels(self) -> np.ndarray:
        """Labels without the calibrated class weights: what the lung border follows. The
        weights move the faint rim of opacity inside the lung; used for the border they also
        push consolidation a few mm into the chest wall next to it (critical phantoms)."""
        return self.labels if self.plain_labels is None else self.plain_labels


def _probabilities(runner: Runner, spec: ModelSpec) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap the runner so blending works on probabilities, whatever the model outputs."""

    def infer(batch: np.ndarray) -> np.ndarray:
        out = runner.infer(batch)
        if spec.output == "logits":
            out = out - out.max(axis=1, keepdims=True)
            np.exp(out, out=out)
            out /= out.sum(axis=1, keepdims=True)
        return out

    return infer


def _background_only(n_classes: int) -> np.ndarray:
    fill = np.zeros(n_classes, dtype=np.float32)
    fill[0] = 1.0
    return fill


def _run_stage(
    image_hu: np.ndarray, grid: Grid, mask: np.ndarray | None, runner: Runner, spec: ModelSpec,
    out_shape: tuple[int, int, int], batch_size: int, stage: str, progress: Progress | None,
    keep_probabilities: bool = False,
) -> StageResult:
    start = time.perf_counter()
    image = spec.normalize(image_hu)
    n_tiles = len(plan_tiles(image.shape, spec.tile_shape, spec.overlap, mask=mask))
    probs = sliding_window(
        image, spec.tile_shape, spec.overlap, _probabilities(runner, spec), spec.n_classes,
        batch_size=batch_size, mask=mask, blend="gaussian", pad_value=0.0,
        progress=(lambda done, total: progress(stage, done, total)) if progress else None,
        out_of_mask=_background_only(spec.n_classes),
    )
    top = probs.max(axis=0)
    fg = probs.argmax(axis=0) > 0
    confidence = float(top[fg].mean()) if fg.any() else None
    inside = fg[mask] if mask is not None else fg
    foreground_pct = 100.0 * float(inside.mean()) if inside.size else None
    class_weights = spec.class_weights_for(foreground_pct)
    kept = probs.copy() if keep_probabilities else None
    plain = None
    if class_weights is not None and any(w != 1.0 for w in class_weights):
        plain = labels_from_probabilities(probs, grid, out_shape)
    labels = labels_from_probabilities(weighted(probs, class_weights), grid, out_shape)
    return StageResult(labels, confidence, n_tiles, time.perf_counter() - start, kept, grid,
                       plain, foreground_pct, class_weights)


def weighted(probs: np.ndarray, class_weights: tuple[float, ...] | None) -> np.ndarray:
    """In place: probabilities times the calibrated class weights (scaling commutes with the
    trilinear upsampling in labels_from_probabilities, so the argmax can follow)."""
    if class_weights is not None:
        probs *= np.asarray(class_weights, np.float32)[:, None, None, None]
    return probs


def segment_lobes(
    volume: Volume, runner: Runner, spec: ModelSpec, *, batch_size: int = 1,
    progress: Progress | None = None,
) -> StageResult:
    """Stage 1 over the body box of a canonical volume: labels 0-5 on the scan grid."""
    hu = volume.array
    step = 4
    coarse_body = hu[::step, ::step, ::step] > BODY_HU
    box = bounding_box(coarse_body, margin=(1, 1, 1))
    if box is None:
        return StageResult(np.zeros(hu.shape, np.uint8), None, 0, 0.0)
    box = tuple(slice(s.start * step, min(s.stop * step, n)) for s, n in zip(box, hu.shape, strict=True))
    grid = make_grid(box, volume.spacing, spec.spacing_mm)
    image_hu = resample_image(hu, grid, order=1)
    mask = image_hu > BODY_HU
    return _run_stage(image_hu, grid, mask, runner, spec, hu.shape, batch_size, "lobes", progress)


def segment_opacity(
    volume: Volume, lung: np.ndarray, runner: Runner, spec: ModelSpec, *, batch_size: int = 1,
    progress: Progress | None = None, keep_probabilities: bool = False,
) -> StageResult:
    """Stage 2 inside the lung box, only on tiles that contain lung: labels 0-2 on the scan grid."""
    margin = tuple(int(np.ceil(LUNG_BOX_MARGIN_MM / s)) for s in volume.spacing)
    box = bounding_box(lung, margin=margin)  # type: ignore[arg-type]
    if box is None:
        return StageResult(np.zeros(lung.shape, np.uint8), None, 0, 0.0)
    grid = make_grid(box, volume.spacing, spec.spacing_mm)
    image_hu = resample_image(volume.array, grid, order=1)
    mask = resample_image(lung.astype(np.float32), grid, order=1) > 0.25
    return _run_stage(image_hu, grid, mask, runner, spec, lung.shape, batch_size, "opacity", progress,
                      keep_probabilities)
