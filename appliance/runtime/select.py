"""Backend choice: `auto` takes TensorRT only when it imports and a GPU answers, else ONNX Runtime."""

from __future__ import annotations

import logging
from pathlib import Path

from appliance.runtime.base import BackendUnavailable, ModelSpec, Runner

log = logging.getLogger(__name__)
BACKENDS = ("auto", "onnxruntime", "tensorrt")


TENSORRT_RUNNER_READY = True
"""appliance/runtime/tensorrt.py holds the real runner (engine cache, pycuda buffers, execute_async_v3)."""


def tensorrt_unavailable_reason() -> str | None:
    """None when TensorRT and pycuda import and a CUDA GPU answers; else why not, in one line."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python module is not installed"
    try:
        import pycuda.driver as cuda
    except ImportError:
        return "pycuda is not installed"
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            return "no CUDA GPU answers"
    except Exception as exc:  # pycuda raises its own error types for driver failures
        return f"the CUDA driver does not answer ({exc})"
    if not TENSORRT_RUNNER_READY:
        return "the TensorRT runner is not built yet"
    return None


def resolve_backend(name: str) -> tuple[str, str | None]:
    """The backend to use for `name` and, for auto, why TensorRT was not taken."""
    if name not in BACKENDS:
        raise ValueError(f"`backend` must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "onnxruntime":
        return name, None
    reason = tensorrt_unavailable_reason()
    if name == "tensorrt":
        if reason:
            raise BackendUnavailable(f"backend tensorrt is unavailable: {reason}")
        return name, None
    if reason:
        return "onnxruntime", f"TensorRT not used ({reason}); using ONNX Runtime"
    return "tensorrt", None


def open_runner(backend: str, spec: ModelSpec, *, precision: str = "fp32", threads: int = 2,
                batch_size: int | None = None, engine_dir: str | Path | None = None) -> Runner:
    """Open a runner for an already-resolved backend name.

    TensorRT only: ``batch_size`` (the configured tiles per call) sets the engine's max batch
    (at least 4); ``engine_dir`` is the engine cache, by default `<state_dir>/engines`.
    """
    if backend == "onnxruntime":
        from appliance.runtime.onnxruntime import OnnxRuntimeRunner

        return OnnxRuntimeRunner(spec, precision=precision, threads=threads)
    if backend == "tensorrt":
        from appliance.runtime.tensorrt import TensorRTRunner
        from engines.build import engine_max_batch

        return TensorRTRunner(spec, precision=precision, max_batch=engine_max_batch(batch_size),
                              engine_dir=engine_dir)
    raise ValueError(f"`backend` must be onnxruntime or tensorrt once resolved, got {backend!r}")
