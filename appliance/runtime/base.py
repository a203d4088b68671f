"""The runner Protocol every backend implements, and the model manifest it is built from.

A runner is a context manager: open a model from its manifest entry, `infer(batch)` with a
(N, 1, D, H, W) float32 batch returning (N, C, D, H, W) float32, report name/device/precision,
`close()`. The public `infer` checks the input against the model before the backend sees it.
Output arrays are fresh for every call (callers may keep them).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


class BackendUnavailable(RuntimeError):
    """The asked-for backend cannot run here; str(exc) is a one-line reason."""


class ModelError(ValueError):
    """A model file or manifest entry that cannot be used; str(exc) is a one-line reason."""


@dataclass(frozen=True)
class ModelSpec:
    """One manifest entry: everything the runtime and the pipeline need to know about a model."""

    name: str
    version: str
    path: Path
    sha256: str
    classes: tuple[str, ...]
    spacing_mm: tuple[float, float, float]
    tile_shape: tuple[int, int, int]
    overlap: float
    hu_min: float
    hu_max: float
    output: str = "logits"
    input_name: str = "image"
    output_name: str = "logits"
    fp16_path: Path | None = None
    fp16_sha256: str | None = None
    min_confidence: float = 0.0
    class_weights: tuple[float, ...] | None = None
    """Per-class factors on the probabilities before the argmax (calibrated on training
    phantoms by `export.calibrate`); None means a plain argmax."""
    heavy_class_weights: tuple[tuple[float, float], tuple[float, ...]] | None = None
    """((from_pct, to_pct), weights): heavily diseased lungs, where the low background weight
    over-calls, get other class weights. The scan's burden is the share (%) of the stage's mask
    that the plain argmax calls foreground; from `from_pct` to `to_pct` the weights move
    linearly from `class_weights` to these (so PLO stays continuous in the burden: no jump in a
    patient's serial figures), above `to_pct` they are these. Calibrated too."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def class_weights_for(self, foreground_pct: float | None) -> tuple[float, ...] | None:
        """The class weights for a scan whose plain argmax has this foreground share (%)."""
        if self.heavy_class_weights is None or foreground_pct is None:
            return self.class_weights
        (lo, hi), heavy = self.heavy_class_weights
        t = min(max((foreground_pct - lo) / (hi - lo), 0.0), 1.0) if hi > lo else float(foreground_pct >= lo)
        if t == 0.0:
            return self.class_weights
        base = self.class_weights or (1.0,) * len(heavy)
        return tuple(b + t * (h - b) for b, h in zip(base, heavy, strict=True))

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def normalize(self, hu: np.ndarray) -> np.ndarray:
        """HU -> model input in [0, 1]; air and out-of-volume padding map to 0."""
        x = np.clip(hu, self.hu_min, self.hu_max, dtype=np.float32)
        x -= np.float32(self.hu_min)
        x *= np.float32(1.0 / (self.hu_max - self.hu_min))
        return x

    def file_for(self, precision: str) -> tuple[Path, str]:
        if precision == "fp16":
            if self.fp16_path is None or self.fp16_sha256 is None:
                raise ModelError(f"model {self.name} has no fp16 variant in the manifest")
            return self.fp16_path, self.fp16_sha256
        return self.path, self.sha256

    def as_result(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "sha256": self.sha256}


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(models_dir: str | Path | None = None) -> dict[str, ModelSpec]:
    """Read manifest.json; raise ModelError with a one-line reason when it or a file is unusable."""
    folder = Path(models_dir) if models_dir else MODELS_DIR
    path = folder / "manifest.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"no model manifest at {path}") from None
    except json.JSONDecodeError as exc:
        raise ModelError(f"model manifest {path} is not valid JSON: {exc}") from None
    specs: dict[str, ModelSpec] = {}
    for key, entry in raw.get("models", {}).items():
        try:
            norm = entry["normalization"]
            specs[key] = ModelSpec(
                name=entry["name"],
                version=entry["version"],
                path=folder / entry["file"],
                sha256=entry["sha256"],
                classes=tuple(entry["classes"]),
                spacing_mm=tuple(float(s) for s in entry["spacing_mm"]),  # type: ignore[arg-type]
                tile_shape=tuple(int(s) for s in entry["tile_shape"]),  # type: ignore[arg-type]
                overlap=float(entry["overlap"]),
                hu_min=float(norm["hu_min"]),
                hu_max=float(norm["hu_max"]),
                output=entry.get("output", "logits"),
                input_name=entry.get("input_name", "image"),
                output_name=entry.get("output_name", "logits"),
                fp16_path=folder / entry["fp16_file"] if entry.get("fp16_file") else None,
                fp16_sha256=entry.get("fp16_sha256"),
                min_confidence=float(entry.get("min_confidence", 0.0)),
                class_weights=_class_weights(entry.get("class_weights"), entry),
                heavy_class_weights=_heavy_class_weights(entry),
                extra=entry,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"manifest entry {key!r} in {path} is incomplete: {exc}") from None
    for need in ("lobes", "opacity"):
        if need not in specs:
            raise ModelError(f"model manifest {path} has no {need!r} model")
    return specs


def _class_weights(values: Any, entry: dict[str, Any], name: str = "class_weights",
                   ) -> tuple[float, ...] | None:
    if values is None:
        return None
    weights = tuple(float(w) for w in values)
    if len(weights) != len(entry["classes"]) or min(weights) <= 0:
        raise ValueError(f"{name} must be {len(entry['classes'])} positive numbers, got {weights}")
    return weights


def _heavy_class_weights(entry: dict[str, Any]) -> tuple[tuple[float, float], tuple[float, ...]] | None:
    heavy = entry.get("heavy_class_weights")
    if heavy is None:
        return None
    lo, hi = (float(v) for v in heavy["foreground_pct"])
    if not 0.0 <= lo <= hi <= 100.0:
        raise ValueError(f"heavy_class_weights.foreground_pct must be [from, to] within 0-100, got {[lo, hi]}")
    weights = _class_weights(heavy["class_weights"], entry, "heavy_class_weights.class_weights")
    if weights is None:
        raise ValueError("heavy_class_weights.class_weights is missing")
    return (lo, hi), weights


class Runner:
    """Base class of every backend: validation here, the work in `_infer`."""

    name = "base"
    device = "cpu"

    def __init__(self, spec: ModelSpec, precision: str = "fp32") -> None:
        self.spec = spec
        self.precision = precision

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_batch(self, batch: np.ndarray) -> None:
        """Name, dtype and shape of an input batch against the model, before any backend sees it."""
        if not isinstance(batch, np.ndarray):
            raise TypeError(f"`batch` must be a numpy array, got {type(batch).__name__}")
        if batch.dtype != np.float32:
            raise TypeError(f"`batch` must be float32, got {batch.dtype}")
        want = (1, *self.spec.tile_shape)
        if batch.ndim != 5 or batch.shape[1:] != want or batch.shape[0] < 1:
            raise ValueError(f"`batch` must have shape (N, {', '.join(map(str, want))}), got {batch.shape}")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self._check_batch(batch)
        out = self._infer(batch)
        expect = (batch.shape[0], self.spec.n_classes, *self.spec.tile_shape)
        if out.shape != expect:
            raise ModelError(f"model {self.spec.name} returned shape {out.shape}, expected {expect}")
        return out

    def _infer(self, batch: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def close(self) -> None:
        """Release everything the backend holds (explicit, never in __del__)."""

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "device": self.device, "precision": self.precision}
