"""ONNX Runtime backend: the embedded default (CPU; the CUDA execution provider when present)."""

from __future__ import annotations

import numpy as np

from appliance.runtime.base import ModelError, ModelSpec, Runner, sha256_of


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, spec: ModelSpec, precision: str = "fp32", threads: int = 2,
                 verify_sha256: bool = True) -> None:
        super().__init__(spec, precision)
        import onnxruntime as ort

        path, digest = spec.file_for(precision)
        if not path.exists():
            raise ModelError(f"model file {path} is missing")
        if verify_sha256 and sha256_of(path) != digest:
            raise ModelError(f"model file {path} does not match the manifest's sha256")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
            raise ModelError(f"model file {path} cannot be loaded: {str(exc).splitlines()[0]}") from None
        self.device = "cuda" if self._session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        inputs = {i.name for i in self._session.get_inputs()}
        if spec.input_name not in inputs:
            raise ModelError(f"model {spec.name} has no input named {spec.input_name!r} (has {sorted(inputs)})")

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self._session.run([self.spec.output_name], {self.spec.input_name: batch})
        return np.asarray(out, dtype=np.float32)

    def close(self) -> None:
        self._session = None  # type: ignore[assignment]
