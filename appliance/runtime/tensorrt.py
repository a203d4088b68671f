"""TensorRT backend (the production path on the box).

Not built yet: the engine builder, cache and pycuda runner are the TensorRT issue's work. Until
then asking for this backend explicitly fails with a one-line reason, and `auto` never picks it.
"""

from __future__ import annotations

from appliance.runtime.base import BackendUnavailable, ModelSpec, Runner


class TensorRTRunner(Runner):
    name = "tensorrt"
    device = "cuda"

    def __init__(self, spec: ModelSpec, precision: str = "fp32") -> None:
        raise BackendUnavailable("backend tensorrt is unavailable: the TensorRT runner is not built yet")
