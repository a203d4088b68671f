"""Runtime Protocol and the ONNX Runtime backend on tiny real ONNX models."""

import json

import numpy as np
import pytest

from appliance.runtime import BackendUnavailable, load_manifest, open_runner, resolve_backend
from appliance.runtime.base import ModelError
from tests.onnx_models import write_models


@pytest.fixture
def models(tmp_path):
    return write_models(tmp_path / "models")


def test_manifest_and_inference(models):
    specs = load_manifest(models)
    spec = specs["lobes"]
    assert spec.n_classes == 6 and spec.tile_shape == (32, 32, 32)
    hu = np.full((2, 1, 32, 32, 32), 40.0, np.float32)
    hu[1, :, :16] = -900.0  # second tile: air in the first half
    with open_runner("onnxruntime", spec, threads=1) as runner:
        out = runner.infer(spec.normalize(hu))
        assert runner.describe() == {"name": "onnxruntime", "device": "cpu", "precision": "fp32"}
    assert out.shape == (2, 6, 32, 32, 32) and out.dtype == np.float32
    labels = out.argmax(axis=1)
    assert (labels[0] == 0).all()
    assert (labels[1, :16] == 1).all() and (labels[1, 16:] == 0).all()


def test_infer_checks_the_batch(models):
    spec = load_manifest(models)["opacity"]
    with open_runner("onnxruntime", spec, threads=1) as runner:
        with pytest.raises(TypeError, match="`batch` must be float32"):
            runner.infer(np.zeros((1, 1, 16, 32, 32), np.float64))
        with pytest.raises(ValueError, match=r"`batch` must have shape \(N, 1, 16, 32, 32\)"):
            runner.infer(np.zeros((1, 1, 16, 32, 31), np.float32))


def test_corrupt_model_file_is_a_one_line_error(models):
    (models / "lobes.onnx").write_bytes(b"not a model")
    spec = load_manifest(models)["lobes"]
    with pytest.raises(ModelError, match="does not match the manifest's sha256"):
        open_runner("onnxruntime", spec)
    manifest = json.loads((models / "manifest.json").read_text())
    manifest["models"]["lobes"]["sha256"] = __import__("hashlib").sha256(b"not a model").hexdigest()
    (models / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="cannot be loaded"):
        open_runner("onnxruntime", load_manifest(models)["lobes"])


def test_wrong_output_channels_are_caught(models):
    import onnx

    from tests.onnx_models import conv_model, sha256

    onnx.save(conv_model(np.ones(4), np.zeros(4), (32, 32, 32)), models / "lobes.onnx")
    manifest = json.loads((models / "manifest.json").read_text())
    manifest["models"]["lobes"]["sha256"] = sha256(models / "lobes.onnx")
    (models / "manifest.json").write_text(json.dumps(manifest))
    spec = load_manifest(models)["lobes"]
    with open_runner("onnxruntime", spec, threads=1) as runner:
        with pytest.raises(ModelError, match=r"returned shape \(1, 4, 32, 32, 32\), expected \(1, 6"):
            runner.infer(np.zeros((1, 1, 32, 32, 32), np.float32))


def test_manifest_problems(tmp_path, models):
    with pytest.raises(ModelError, match="no model manifest"):
        load_manifest(tmp_path / "empty")
    manifest = json.loads((models / "manifest.json").read_text())
    del manifest["models"]["opacity"]
    (models / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="has no 'opacity' model"):
        load_manifest(models)


def test_class_weights_from_the_manifest_move_the_argmax(models):
    from appliance.pipeline.segment import weighted

    assert load_manifest(models)["opacity"].class_weights is None
    manifest = json.loads((models / "manifest.json").read_text())
    manifest["models"]["opacity"]["class_weights"] = [0.4, 1.0, 1.0]
    (models / "manifest.json").write_text(json.dumps(manifest))
    weights = load_manifest(models)["opacity"].class_weights
    assert weights == (0.4, 1.0, 1.0)
    probs = np.array([0.55, 0.40, 0.05], np.float32)[:, None, None, None] * np.ones((3, 2, 2, 2), np.float32)
    assert (probs.argmax(axis=0) == 0).all()
    assert (weighted(probs, weights).argmax(axis=0) == 1).all()  # 0.22 < 0.40: faint rim called
    manifest["models"]["opacity"]["class_weights"] = [0.4, 1.0]
    (models / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="class_weights must be 3 positive numbers"):
        load_manifest(models)
    manifest["models"]["opacity"]["class_weights"] = [0.4, 1.0, 1.0]
    for heavy, reason in (({"foreground_pct": [40, 140], "class_weights": [0.5, 1, 1]}, "within 0-100"),
                          ({"foreground_pct": [40, 30], "class_weights": [0.5, 1, 1]}, "within 0-100"),
                          ({"foreground_pct": [30, 40], "class_weights": [0.5, 1]},
                           "heavy_class_weights.class_weights must be 3"),
                          ({"foreground_pct": [30, 40]}, "class_weights")):
        manifest["models"]["opacity"]["heavy_class_weights"] = heavy
        (models / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(ModelError, match=reason):
            load_manifest(models)


def test_the_opacity_stage_keeps_the_plain_argmax_beside_the_weighted_one(models):
    from dataclasses import replace

    from appliance.pipeline.segment import segment_opacity
    from appliance.volume import Volume

    plain_spec = load_manifest(models)["opacity"]
    weighted_spec = replace(plain_spec, class_weights=(0.4, 1.0, 1.0))
    # HU rising across x through the threshold model's -750 HU ground-glass edge
    hu = np.broadcast_to(np.linspace(-800.0, -700.0, 48, dtype=np.float32), (24, 48, 48)).copy()
    volume, lung = Volume(hu, (3.0, 3.0, 3.0)), np.ones(hu.shape, bool)
    with open_runner("onnxruntime", plain_spec, threads=1) as runner:
        plain = segment_opacity(volume, lung, runner, plain_spec)
        both = segment_opacity(volume, lung, runner, weighted_spec)
    assert plain.plain_labels is None and plain.decision_labels is plain.labels
    assert (both.plain_labels == plain.labels).all() and both.decision_labels is both.plain_labels
    ggo_plain, ggo_weighted = int((plain.labels == 1).sum()), int((both.labels == 1).sum())
    assert 0 < ggo_plain < ggo_weighted  # the weights widen the rim; the plain argmax stays
    assert both.class_weights == (0.4, 1.0, 1.0) and plain.class_weights is None
    # the plain argmax's foreground share of the mask picks the weights: a scan at the top of
    # the heavy rule's ramp gets the heavy weights (here: none, the plain argmax), one at its
    # foot the calibrated ones
    burden = both.foreground_pct
    assert burden == plain.foreground_pct and 0.0 < burden < 100.0
    for ramp, expected in (((burden - 1, burden), (1.0, 1.0, 1.0)), ((burden, burden + 1), (0.4, 1.0, 1.0))):
        spec = replace(weighted_spec, heavy_class_weights=(ramp, (1.0, 1.0, 1.0)))
        with open_runner("onnxruntime", spec, threads=1) as runner:
            stage = segment_opacity(volume, lung, runner, spec)
        assert stage.class_weights == expected
        assert int((stage.labels == 1).sum()) == (ggo_plain if expected[0] == 1.0 else ggo_weighted)


def test_backend_selection_without_tensorrt():
    assert resolve_backend("onnxruntime") == ("onnxruntime", None)
    name, why = resolve_backend("auto")
    assert name == "onnxruntime" and "TensorRT not used" in why
    with pytest.raises(BackendUnavailable, match="backend tensorrt is unavailable: "):
        resolve_backend("tensorrt")
    with pytest.raises(ValueError, match="`backend` must be one of"):
        resolve_backend("cuda")
