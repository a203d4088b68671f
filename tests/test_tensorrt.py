"""The TensorRT runner (appliance/runtime/tensorrt.py) against FakeTensorRT/FakePyCuda, and on a
real GPU when TensorRT and pycuda import (marked `gpu`, skipped with the reason otherwise).

The fakes run streams lazily (work happens at synchronisation points, copies read their host
buffers then), so a runner that reused a pinned buffer too early, read an output before its
event, or forgot a buffer would give wrong answers or leaks here, not only on the GPU.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from appliance.runtime import BackendUnavailable, load_manifest, open_runner, resolve_backend
from appliance.runtime.base import ModelError
from appliance.runtime.onnxruntime import OnnxRuntimeRunner
from tests.fake_tensorrt import FakeCudaGraphs, add_fp16_variants, install_fakes
from tests.onnx_models import write_models

TILE = (32, 32, 32)


@pytest.fixture
def models(tmp_path):
    return add_fp16_variants(write_models(tmp_path / "models"))


@pytest.fixture
def engine_dir(tmp_path):
    return tmp_path / "state" / "engines"


@pytest.fixture
def fakes(monkeypatch):
    return install_fakes(monkeypatch)


def hu_batch(n: int, seed: int = 0, tile=TILE) -> np.ndarray:
    """Tiles of HU between air and soft tissue, normalised for the lobes model."""
    rng = np.random.default_rng(seed)
    hu = rng.uniform(-1000.0, 100.0, size=(n, 1, *tile)).astype(np.float32)
    return ((hu + 1024.0) / 1624.0).astype(np.float32)


def reference(spec, batch: np.ndarray) -> np.ndarray:
    with OnnxRuntimeRunner(spec, threads=1) as runner:
        return runner.infer(batch)


def runner_for(spec, engine_dir, **kwargs):
    from appliance.runtime.tensorrt import TensorRTRunner

    return TensorRTRunner(spec, engine_dir=engine_dir, **kwargs)


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize("n", [1, 3, 4, 5, 9])
def test_runner_matches_onnxruntime(models, engine_dir, fakes, n):
    spec = load_manifest(models)["lobes"]
    batch = hu_batch(n)
    with runner_for(spec, engine_dir, max_batch=4) as runner:
        out = runner.infer(batch)
        assert runner.describe() == {"name": "tensorrt", "device": "cuda", "precision": "fp32"}
    assert out.dtype == np.float32 and out.shape == (n, 6, *TILE)
    np.testing.assert_array_equal(out, reference(spec, batch))


def test_open_runner_reaches_the_tensorrt_runner(models, engine_dir, fakes):
    trt, _cuda = fakes
    spec = load_manifest(models)["opacity"]
    assert resolve_backend("auto") == ("tensorrt", None)
    batch = hu_batch(2, tile=(16, 32, 32))
    with open_runner("tensorrt", spec, batch_size=6, engine_dir=engine_dir) as runner:
        assert runner.max_batch == 6
        np.testing.assert_array_equal(runner.infer(batch), reference(spec, batch))
    assert trt.builds[0]["profiles"][0]["image"][2] == (6, 1, 16, 32, 32)


def test_auto_falls_back_when_no_gpu_answers(monkeypatch):
    install_fakes(monkeypatch, device_count=0)
    assert resolve_backend("auto") == ("onnxruntime", "TensorRT not used (no CUDA GPU answers); using ONNX Runtime")
    with pytest.raises(BackendUnavailable, match="^backend tensorrt is unavailable: no CUDA GPU answers$"):
        resolve_backend("tensorrt")


def test_runner_without_tensorrt_is_unavailable(models, engine_dir):
    from appliance.runtime.select import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason is None:
        pytest.skip("this machine has TensorRT and a GPU")
    with pytest.raises(BackendUnavailable, match=f"^backend tensorrt is unavailable: {reason}$"):
        runner_for(load_manifest(models)["lobes"], engine_dir)


@pytest.mark.parametrize("version", ["10.9.0.34", "11.2.0.5"])
def test_fp16_engines_stay_close_to_fp32(models, engine_dir, monkeypatch, version):
    from engines.verify import compare

    trt, _cuda = install_fakes(monkeypatch, version=version)
    spec = load_manifest(models)["lobes"]
    batch = hu_batch(4, seed=3)
    with runner_for(spec, engine_dir, precision="fp16") as runner:
        out = runner.infer(batch)
        assert runner.describe()["precision"] == "fp16"
    ref = reference(spec, batch)
    result = compare(spec, "fp16", ref, out)
    assert result.ok and 0 < result.max_abs_output_diff < 0.5  # rounded, not identical
    assert trt.builds[0]["onnx_path"].endswith(".fp16.onnx") == (version == "11.2.0.5")


def test_fp16_input_and_output_tensors_are_converted(tmp_path, engine_dir, monkeypatch):
    """An fp16 ONNX file with fp16 inputs/outputs: the pinned buffers follow the engine's types."""
    install_fakes(monkeypatch, version="11.2.0.5")
    models = add_fp16_variants(write_models(tmp_path / "models16"), keep_io_types=False)
    spec = load_manifest(models)["lobes"]
    batch = hu_batch(3, seed=4)
    with runner_for(spec, engine_dir, precision="fp16") as runner:
        assert runner._in_dtype == np.float16 and runner._slots[0].host_out.dtype == np.float16
        out = runner.infer(batch)
    assert out.dtype == np.float32
    assert (out.argmax(1) == reference(spec, batch).argmax(1)).mean() > 0.995


# ----------------------------------------------------------------------------- buffers


def test_buffers_are_allocated_once_and_outputs_are_copies(models, engine_dir, fakes):
    _trt, cuda = fakes
    spec = load_manifest(models)["lobes"]
    a_in, b_in = hu_batch(4, seed=1), hu_batch(4, seed=2)
    with runner_for(spec, engine_dir) as runner:
        assert runner.reuses_output_buffers is False
        allocated = (cuda.state.device_allocs, cuda.state.pinned_allocs)
        assert allocated == (2, 4)  # device in + out; two pinned slots of in + out
        a = runner.infer(a_in)
        b = runner.infer(b_in)
        c = runner.infer(a_in[:1])
        assert (cuda.state.device_allocs, cuda.state.pinned_allocs) == allocated
        assert not any(np.shares_memory(a, s.host_out) or np.shares_memory(b, s.host_out) for s in runner._slots)
    np.testing.assert_array_equal(a, reference(spec, a_in))  # not overwritten by later calls
    np.testing.assert_array_equal(b, reference(spec, b_in))
    np.testing.assert_array_equal(c, a[:1])


def test_close_frees_everything(models, engine_dir, fakes):
    _trt, cuda = fakes
    runner = runner_for(load_manifest(models)["lobes"], engine_dir)
    runner.infer(hu_batch(5))
    assert cuda.state.memory and cuda.state.pinned_live and cuda.state.retained == 1
    runner.close()
    assert cuda.state.memory == {} and cuda.state.pinned_live == set()
    assert cuda.state.device_frees == cuda.state.device_allocs and cuda.state.pinned_frees == cuda.state.pinned_allocs
    assert cuda.state.released == cuda.state.retained == 1 and cuda.state.context_depth == 0
    runner.close()  # idempotent
    assert cuda.state.released == 1
    with pytest.raises(RuntimeError, match="the TensorRT runner for lobes is closed"):
        runner.infer(hu_batch(1))


def test_a_failed_open_frees_what_it_took(models, engine_dir, fakes):
    _trt, cuda = fakes
    manifest = json.loads((models / "manifest.json").read_text())
    manifest["models"]["lobes"]["classes"] = manifest["models"]["lobes"]["classes"][:5]
    (models / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"engine for lobes gives output shape \(4, 6, 32, 32, 32\) at batch 4, "
                                         r"expected \(4, 5, 32, 32, 32\)"):
        runner_for(load_manifest(models)["lobes"], engine_dir)
    assert cuda.state.memory == {} and cuda.state.pinned_live == set()
    assert cuda.state.released == cuda.state.retained == 1 and cuda.state.context_depth == 0


def test_execute_async_v3_result_is_checked(models, engine_dir, fakes):
    trt, _cuda = fakes
    from appliance.runtime.tensorrt import ExecutionError

    with runner_for(load_manifest(models)["lobes"], engine_dir) as runner:
        trt.fail_execute = True
        with pytest.raises(ExecutionError, match="^TensorRT execute_async_v3 failed for lobes$"):
            runner.infer(hu_batch(2))
        trt.fail_execute = False
        batch = hu_batch(6, seed=9)  # the runner recovers: nothing left in flight
        np.testing.assert_array_equal(runner.infer(batch), reference(runner.spec, batch))


def test_last_chunk_runs_at_its_own_batch_without_graphs(models, engine_dir, fakes):
    trt, _cuda = fakes
    spec = load_manifest(models)["lobes"]
    batch = hu_batch(5)
    with runner_for(spec, engine_dir, max_batch=4) as runner:
        out = runner.infer(batch)
        assert runner._context.shape_calls == [(4, 1, *TILE), (1, 1, *TILE)]
    assert [x.shape[0] for x in trt.executor.seen_inputs] == [4, 1]
    np.testing.assert_array_equal(out, reference(spec, batch))


# ----------------------------------------------------------------------------- CUDA graph


def test_cuda_graph_pads_the_last_chunk(models, engine_dir, fakes, monkeypatch):
    trt, cuda = fakes
    graphs = FakeCudaGraphs(cuda)
    monkeypatch.setattr("appliance.runtime.tensorrt.load_graph_api", lambda: graphs)
    spec = load_manifest(models)["lobes"]
    batch = hu_batch(5, seed=5)
    with runner_for(spec, engine_dir, max_batch=4, cuda_graph=True) as runner:
        out = runner.infer(batch)
        out2 = runner.infer(batch[:2])
        assert runner._context.shape_calls == [(4, 1, *TILE)]  # one fixed shape, never changed
        assert graphs.captures == 1 and graphs.launches == 3
    assert graphs.destroyed == 1 and graphs.execs == {} and graphs.graphs == {}
    np.testing.assert_array_equal(out, reference(spec, batch))
    np.testing.assert_array_equal(out2, out[:2])
    padded = trt.executor.seen_inputs[-1]  # the last launch: 2 tiles + 2 zero tiles
    assert padded.shape[0] == 4 and (padded[2:] == 0).all()
    np.testing.assert_array_equal(padded[:2], batch[:2])
    second = trt.executor.seen_inputs[-2]  # the 5th tile of the first call, padded too
    np.testing.assert_array_equal(second[0], batch[4])
    assert second.shape[0] == 4 and (second[1:] == 0).all()


def test_cuda_graph_failure_falls_back_to_plain_execution(models, engine_dir, fakes, monkeypatch, caplog):
    _trt, cuda = fakes
    monkeypatch.setattr("appliance.runtime.tensorrt.load_graph_api",
                        lambda: FakeCudaGraphs(cuda, fail_instantiate=True))
    spec = load_manifest(models)["lobes"]
    batch = hu_batch(3)
    with caplog.at_level(logging.WARNING), runner_for(spec, engine_dir, cuda_graph=True) as runner:
        out = runner.infer(batch)
        assert runner.cuda_graph is False
    assert "CUDA graph not used for lobes (cuGraphInstantiate failed: CUDA_ERROR_NOT_SUPPORTED (801))" in caplog.text
    np.testing.assert_array_equal(out, reference(spec, batch))


# ----------------------------------------------------------------------------- overlap


def test_host_preparation_overlaps_the_gpu(models, engine_dir, fakes):
    _trt, cuda = fakes
    spec = load_manifest(models)["lobes"]
    batches = [hu_batch(2, seed=k) for k in range(4)]
    outstanding = []

    def prepared():
        for k, b in enumerate(batches):
            outstanding.append(cuda.state.pending_ops)  # GPU work in flight while batch k is prepared
            cuda.state.log.append(f"prepared {k}")
            yield b

    with runner_for(spec, engine_dir, max_batch=2) as runner:
        outs = list(runner.infer_pipelined(prepared()))
    assert outstanding[0] == 0 and all(n > 0 for n in outstanding[1:])
    log = cuda.state.log
    assert log.index("prepared 1") < log.index("event.synchronize")  # batch 1 ready before batch 0 is waited for
    for b, out in zip(batches, outs, strict=True):
        np.testing.assert_array_equal(out, reference(spec, b))


def test_chunks_of_one_call_alternate_pinned_slots(models, engine_dir, fakes):
    """Five chunks through two slots: the next chunk is on the stream before the previous one is
    waited for, and a slot is refilled only after its previous chunk is back (the fake reads the
    pinned input when the copy runs, so early reuse would corrupt answers)."""
    _trt, cuda = fakes
    spec = load_manifest(models)["lobes"]
    batch = hu_batch(10, seed=11)
    with runner_for(spec, engine_dir, max_batch=2) as runner:
        del cuda.state.log[:]
        np.testing.assert_array_equal(runner.infer(batch), reference(spec, batch))
        slots = {id(s.host_in) for s in runner._slots}
    h2d, wait = "memcpy_htod_async", "event.synchronize"
    assert [e for e in cuda.state.log if e in (h2d, wait)] == [h2d, h2d, wait, h2d, wait, h2d, wait, h2d, wait, wait]
    assert len(slots) == 2


def test_infer_pipelined_checks_and_recovers(models, engine_dir, fakes):
    spec = load_manifest(models)["lobes"]
    with runner_for(spec, engine_dir, max_batch=2) as runner:
        with pytest.raises(TypeError, match="`batch` must be float32, got float64"):
            list(runner.infer_pipelined([np.zeros((1, 1, *TILE))]))
        with pytest.raises(ValueError, match=r"`batch` must have shape \(N, 1, 32, 32, 32\), got \(1, 32, 32, 32\)"):
            list(runner.infer_pipelined([np.zeros((1, *TILE), np.float32)]))
        gen = runner.infer_pipelined([hu_batch(3, seed=1), hu_batch(3, seed=2)])
        first = next(gen)  # abandoned with work in flight
        del gen
        batch = hu_batch(5, seed=3)
        outs = list(runner.infer_pipelined([batch, batch[:1]]))
    np.testing.assert_array_equal(first, reference(spec, hu_batch(3, seed=1)))
    np.testing.assert_array_equal(outs[0], reference(spec, batch))
    np.testing.assert_array_equal(outs[1], outs[0][:1])


# ----------------------------------------------------------------------------- the cache from the runner


def test_runner_uses_a_plan_built_with_other_tuning(models, engine_dir, fakes):
    from engines.build import BuildSettings, detect_platform, ensure_engine
    from engines.cache import EngineCache

    trt, cuda = fakes
    spec = load_manifest(models)["lobes"]
    ensure_engine(trt, spec, BuildSettings(opt_level=5), detect_platform(trt, cuda.driver), EngineCache(engine_dir))
    with runner_for(spec, engine_dir) as runner:
        assert not runner.engine_record.built and runner.engine_record.key.opt_level == 5
    assert len(trt.builds) == 1


def test_runner_rebuilds_a_plan_that_does_not_deserialize(models, engine_dir, fakes):
    import hashlib

    trt, _cuda = fakes
    spec = load_manifest(models)["lobes"]
    with runner_for(spec, engine_dir) as runner:
        record = runner.engine_record
    record.path.write_bytes(b"junk")
    meta_path = record.path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta.update(plan_bytes=4, plan_sha256=hashlib.sha256(b"junk").hexdigest())
    meta_path.write_text(json.dumps(meta))
    batch = hu_batch(2)
    with runner_for(spec, engine_dir) as runner:
        assert runner.engine_record.built
        np.testing.assert_array_equal(runner.infer(batch), reference(spec, batch))
    assert len(trt.builds) == 2


def test_runner_can_refuse_to_build(models, engine_dir, fakes):
    _trt, cuda = fakes
    with pytest.raises(BackendUnavailable, match=r"no usable TensorRT engine for lobes \(no cached engine\)"):
        runner_for(load_manifest(models)["lobes"], engine_dir, build_missing=False)
    assert cuda.state.released == cuda.state.retained == 1


# ----------------------------------------------------------------------------- real hardware


def _real_tensorrt_missing() -> str | None:
    from appliance.runtime.select import tensorrt_unavailable_reason

    return tensorrt_unavailable_reason()


@pytest.mark.gpu
@pytest.mark.skipif(_real_tensorrt_missing() is not None,
                    reason=f"needs TensorRT, pycuda and a GPU: {_real_tensorrt_missing()}")
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_real_tensorrt_matches_onnxruntime(tmp_path, cuda_graph):
    from engines.verify import compare

    models = write_models(tmp_path / "models")
    for key, tile in (("lobes", TILE), ("opacity", (16, 32, 32))):
        spec = load_manifest(models)[key]
        batch = hu_batch(6, seed=7, tile=tile)
        with runner_for(spec, tmp_path / "engines", max_batch=4, cuda_graph=cuda_graph) as runner:
            out = runner.infer(batch)
            again = list(runner.infer_pipelined([batch[:3], batch[3:]]))
        result = compare(spec, "fp32", reference(spec, batch), out)
        assert result.ok and result.max_abs_output_diff < 1e-3, result
        np.testing.assert_allclose(np.concatenate(again), out, rtol=0, atol=1e-5)
