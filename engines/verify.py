"""Parity of a TensorRT engine against ONNX Runtime (fp32, the model's reference) on real tiles.

Tiles are cut from a CT volume exactly as stage 1 cuts them (body box, resampled to the model's
spacing, normalised, the model's tile plan; the tiles holding the most body are taken), so the
check sees real intensities and edges, not noise. The verdict is the fraction of voxels whose
predicted class agrees (the same thresholds as the ONNX export's checks); the largest output and
probability differences are reported beside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from appliance.pipeline.geometry import bounding_box, make_grid, resample_image
from appliance.pipeline.segment import BODY_HU
from appliance.pipeline.tiling import plan_tiles
from appliance.runtime.base import ModelSpec, Runner

MIN_AGREEMENT = {"fp32": 0.999, "fp16": 0.995}
"""Argmax agreement with ONNX Runtime fp32 needed to pass (as export/onnx.py asks of the ONNX files)."""
DEFAULT_TILES = 8
VERIFY_PHANTOM_SEED = 1_000_777
"""Without a series, tiles come from this synthetic chest (a seed no training run uses)."""
VERIFY_PHANTOM_SPACING = (2.0, 1.5, 1.5)
VERIFY_PHANTOM_SHAPE = (160, 256, 256)
BODY_STEP = 4
"""Coarse step for finding the body box (as stage 1 does)."""


@dataclass(frozen=True)
class ParityResult:
    model: str
    precision: str
    tiles: int
    argmax_agreement: float
    min_agreement: float
    max_abs_output_diff: float
    max_abs_prob_diff: float
    finite: bool

    @property
    def ok(self) -> bool:
        return self.finite and self.argmax_agreement >= self.min_agreement

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok}


def sample_tiles(hu: np.ndarray, spacing: tuple[float, float, float], spec: ModelSpec,
                 n_tiles: int = DEFAULT_TILES) -> np.ndarray:
    """(n, 1, *tile) float32 model inputs from a canonical HU volume (fewer if the plan has fewer)."""
    if not isinstance(hu, np.ndarray) or hu.ndim != 3:
        raise ValueError(f"`hu` must be a 3D numpy array, got {getattr(hu, 'shape', type(hu).__name__)}")
    if isinstance(n_tiles, bool) or not isinstance(n_tiles, int) or n_tiles < 1:
        raise ValueError(f"`n_tiles` must be a positive int, got {n_tiles!r}")
    coarse = hu[::BODY_STEP, ::BODY_STEP, ::BODY_STEP] > BODY_HU
    box = bounding_box(coarse, margin=(1, 1, 1))
    if box is None:
        raise ValueError("`hu` must contain a body (voxels above -500 HU), got none")
    box = tuple(slice(s.start * BODY_STEP, min(s.stop * BODY_STEP, n)) for s, n in zip(box, hu.shape, strict=True))
    grid = make_grid(box, spacing, spec.spacing_mm)
    image_hu = resample_image(hu.astype(np.float32), grid, order=1)
    body = image_hu > BODY_HU
    image = spec.normalize(image_hu)
    tile = tuple(spec.tile_shape)
    padded = np.zeros([max(n, t) for n, t in zip(image.shape, tile, strict=True)], np.float32)
    padded[tuple(slice(0, n) for n in image.shape)] = image
    body_padded = np.zeros(padded.shape, bool)
    body_padded[tuple(slice(0, n) for n in body.shape)] = body
    tiles = plan_tiles(padded.shape, tile, spec.overlap, mask=body_padded)
    ranked = sorted(tiles, key=lambda t: -int(body_padded[t].sum()))[:n_tiles]
    return np.stack([padded[t][None] for t in ranked]).astype(np.float32)


def _probabilities(out: np.ndarray, spec: ModelSpec) -> np.ndarray:
    if spec.output != "logits":
        return out
    p = out - out.max(axis=1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=1, keepdims=True)
    return p


def compare(spec: ModelSpec, precision: str, reference: np.ndarray, candidate: np.ndarray) -> ParityResult:
    finite = bool(np.isfinite(candidate).all())
    agreement = float((reference.argmax(axis=1) == candidate.argmax(axis=1)).mean())
    diff = pdiff = math.inf
    if finite:
        diff = float(np.abs(reference - candidate).max())
        pdiff = float(np.abs(_probabilities(reference, spec) - _probabilities(candidate, spec)).max())
    return ParityResult(spec.name, precision, int(reference.shape[0]), agreement, MIN_AGREEMENT[precision],
                        diff, pdiff, finite)


def verify_model(spec: ModelSpec, precision: str, tiles: np.ndarray, reference: Runner, candidate: Runner,
                 batch_size: int) -> ParityResult:
    """Run the same tiles through both runners, ``batch_size`` at a time, and compare."""
    if precision not in MIN_AGREEMENT:
        raise ValueError(f"`precision` must be one of {', '.join(MIN_AGREEMENT)}, got {precision!r}")
    ref = np.concatenate([reference.infer(tiles[i:i + batch_size]) for i in range(0, len(tiles), batch_size)])
    got = np.concatenate([candidate.infer(tiles[i:i + batch_size]) for i in range(0, len(tiles), batch_size)])
    return compare(spec, precision, ref, got)


def verify_models(specs: list[ModelSpec], precision: str, hu: np.ndarray, spacing: tuple[float, float, float],
                  open_reference: Callable[[ModelSpec], Runner], open_candidate: Callable[[ModelSpec], Runner],
                  *, n_tiles: int = DEFAULT_TILES, batch_size: int = 4) -> list[ParityResult]:
    results = []
    for spec in specs:
        tiles = sample_tiles(hu, spacing, spec, n_tiles)
        with open_reference(spec) as reference, open_candidate(spec) as candidate:
            results.append(verify_model(spec, precision, tiles, reference, candidate, batch_size))
    return results


def phantom_volume() -> tuple[np.ndarray, tuple[float, float, float], str]:
    """The synthetic chest used when no series is given: (hu, spacing, description)."""
    from appliance.phantom import synthesize

    ph = synthesize(VERIFY_PHANTOM_SEED, "moderate", spacing=VERIFY_PHANTOM_SPACING, shape=VERIFY_PHANTOM_SHAPE)
    return ph.hu, tuple(ph.spacing), f"synthetic chest (phantom seed {VERIFY_PHANTOM_SEED})"  # type: ignore[return-value]
