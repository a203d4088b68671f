"""Tiny ONNX models built by the tests (valid and deliberately broken), with a manifest.

`threshold` models are per-voxel 1x1x1 convolutions: logit_c = w_c * x + b_c on the normalised
input, so their answer is known: the lobe model calls everything darker than about -450 HU
"RUL", the opacity model calls -750..-300 HU "GGO". They exercise the runtime and the pipeline
without the trained models.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def conv_model(weights: np.ndarray, bias: np.ndarray, tile: tuple[int, int, int], opset: int = 17) -> onnx.ModelProto:
    """(N,1,*tile) -> (N,C,*tile) with a 1x1x1 Conv: out_c = weights[c] * x + bias[c]."""
    c = len(weights)
    w = numpy_helper.from_array(np.asarray(weights, np.float32).reshape(c, 1, 1, 1, 1), "w")
    b = numpy_helper.from_array(np.asarray(bias, np.float32), "b")
    node = helper.make_node("Conv", ["image", "w", "b"], ["logits"], kernel_shape=[1, 1, 1])
    graph = helper.make_graph(
        [node], "test",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, *tile])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", c, *tile])],
        initializer=[w, b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _norm(hu: float, lo: float, hi: float) -> float:
    return (hu - lo) / (hi - lo)


def lobes_threshold_model(tile) -> onnx.ModelProto:
    """Background above -450 HU, RUL below; other lobes never."""
    t = _norm(-450.0, -1024.0, 600.0)
    k = 60.0
    weights = np.array([k, -k, 0, 0, 0, 0])
    bias = np.array([-k * t, k * t, -50, -50, -50, -50])
    return conv_model(weights, bias, tile)


def opacity_threshold_model(tile) -> onnx.ModelProto:
    """GGO when the voxel is in roughly -750..-300 HU (a hump made of two linear logits)."""
    lo, hi = _norm(-750.0, -1024.0, 400.0), _norm(-300.0, -1024.0, 400.0)
    k = 80.0
    # none: flat 0; ggo: k*(x - lo) capped by the consolidation logit growing past hi
    weights = np.array([0.0, k, 2 * k])
    bias = np.array([0.0, -k * lo, -2 * k * hi + (-k * lo + k * hi)])
    return conv_model(weights, bias, tile)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_models(folder: Path, *, lobes_tile=(32, 32, 32), opacity_tile=(16, 32, 32),
                 lobes_spacing=(6.0, 6.0, 6.0), opacity_spacing=(3.0, 3.0, 3.0)) -> Path:
    """Write threshold models and a manifest.json in the shipped format; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for key, model, classes, tile, spacing, window in [
        ("lobes", lobes_threshold_model(lobes_tile), ["background", "RUL", "RML", "RLL", "LUL", "LLL"],
         lobes_tile, lobes_spacing, (-1024.0, 600.0)),
        ("opacity", opacity_threshold_model(opacity_tile), ["none", "ggo", "consolidation"],
         opacity_tile, opacity_spacing, (-1024.0, 400.0)),
    ]:
        path = folder / f"{key}.onnx"
        onnx.save(model, path)
        entries[key] = {
            "name": key, "version": "0.0.0-test", "file": path.name, "sha256": sha256(path),
            "classes": classes, "spacing_mm": list(spacing), "tile_shape": list(tile), "overlap": 0.25,
            "normalization": {"hu_min": window[0], "hu_max": window[1]}, "output": "logits",
            "input_name": "image", "output_name": "logits",
        }
    (folder / "manifest.json").write_text(json.dumps({"schema_version": 1, "models": entries}, indent=2))
    return folder
