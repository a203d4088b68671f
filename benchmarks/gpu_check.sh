#!/usr/bin/env bash
# GPU device check for the TensorRT production path (issue 5). One script, about 4 minutes on an
# H100/H200 (the pycuda build is about 2 of them). The device machine has CUDA, nvcc, PyTorch,
# CuPy and the system python3 but NO TensorRT and no network, so this checks what can be checked:
#
#   1. pycuda, built here from the carried sdist + wheels in .whl/ (see /work/shared/GPU.md);
#   2. buffers: our PrimaryContext, pinned buffers, mem_alloc, a stream, async copies: round-trip
#      correctness, H2D / D2H bandwidth, memory given back;
#   3. CUDA graphs: our CudaGraphs (libcuda through ctypes) capturing and replaying a copy;
#   4. the runner: appliance.runtime.tensorrt.TensorRTRunner itself, with real pycuda, on the
#      production tile shapes, where only the engine is a stand-in (tests/fake_tensorrt.py's
#      FakeTensorRT whose "execute_async_v3" launches a CuPy kernel on the runner's stream over
#      the runner's device buffers; the test models are per-voxel affine, so the answer is
#      exact): parity with ONNX Runtime, double buffering, CUDA graph capture, padding, close();
#   5. speed: the same tiled plan through the PyTorch 3D U-Net (export/unet.py) in fp32 and fp16
#      autocast, as a stand-in for TensorRT's speed.
#
# Prints one JSON object on stdout and writes it to "$OUT/gpu_check.json" when $OUT is set.
# Every section reports ok/error on its own; a failing section does not stop the others.
#
#   bash benchmarks/gpu_check.sh                      (device machine, repo root, .whl carried)
#   GPU_CHECK_FAKE=1 bash benchmarks/gpu_check.sh     (dry run anywhere: FakePyCuda, no GPU work)
#
# Section 4 writes its test models with the onnx package; if the device python lacks it, make
# them here and carry the folder (it is git-ignored):
#   PYTHONPATH=. .venv/bin/python -c 'from pathlib import Path; from tests.onnx_models import \
#     write_models; write_models(Path("out/gpu_check_models"), lobes_tile=(128,128,128), \
#     opacity_tile=(64,128,128))'
# Knobs: PYTHON (python3), SITE (/tmp/gpu_check_site), PY_TIMEOUT (220 s for the python part).
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/gpu_check_site}
PY_TIMEOUT=${PY_TIMEOUT:-220}
LOGDIR=${OUT:-/tmp/gpu_check}
mkdir -p "$LOGDIR" "$SITE"
export PYTHONDONTWRITEBYTECODE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export CUDA_ROOT=${CUDA_ROOT:-/usr/local/cuda}
export PATH="$CUDA_ROOT/bin:$PATH"

PYCUDA_BUILD_S=0
PYCUDA_BUILD_RC=skipped
if [ -z "${GPU_CHECK_FAKE:-}" ]; then
  if "$PYTHON" -c "import pycuda.driver" 2>/dev/null; then
    PYCUDA_BUILD_RC=already-importable
  else
    T0=$(date +%s)
    if ls .whl/*.whl > /dev/null 2>&1 && ls .whl/pycuda-*.tar.gz > /dev/null 2>&1; then
      timeout 120 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl \
        > "$LOGDIR/pycuda_build.log" 2>&1 \
      && timeout 400 "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --target "$SITE" \
        .whl/pycuda-*.tar.gz >> "$LOGDIR/pycuda_build.log" 2>&1
      PYCUDA_BUILD_RC=$?
    else
      PYCUDA_BUILD_RC=no-carried-wheels
      echo "no .whl/pycuda-*.tar.gz and wheels: carry the .whl folder" > "$LOGDIR/pycuda_build.log"
    fi
    PYCUDA_BUILD_S=$(( $(date +%s) - T0 ))
  fi
fi
export PYCUDA_BUILD_S PYCUDA_BUILD_RC
export PYCUDA_BUILD_LOG_TAIL="$(tail -c 1500 "$LOGDIR/pycuda_build.log" 2>/dev/null)"

timeout -k 10 "$PY_TIMEOUT" "$PYTHON" - <<'EOF'
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

FAKE = bool(os.environ.get("GPU_CHECK_FAKE"))
ROOT = Path.cwd()
report = {
    "script": "benchmarks/gpu_check.sh", "dry_run": FAKE,
    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "pycuda_build": {"rc": os.environ.get("PYCUDA_BUILD_RC"), "seconds": int(os.environ.get("PYCUDA_BUILD_S", 0)),
                     "log_tail": os.environ.get("PYCUDA_BUILD_LOG_TAIL", "")[-600:]},
}
OUT = os.environ.get("OUT")
MB = 2**20


def emit():
    text = json.dumps(report, indent=1, default=str)
    if OUT:
        Path(OUT).mkdir(parents=True, exist_ok=True)
        (Path(OUT) / "gpu_check.json").write_text(text)
    return text


def section(name):
    def wrap(fn):
        t0 = time.perf_counter()
        try:
            result = fn()
            report[name] = {"ok": True, **(result or {})}
        except Exception as exc:  # a diagnostic script: record the failure and go on
            report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                            "trace": traceback.format_exc()[-1500:]}
        report[name]["seconds"] = round(time.perf_counter() - t0, 2)
        emit()  # partial results survive a timeout
        return fn
    return wrap


def median_time(fn, reps=5, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


if FAKE:
    from tests.fake_tensorrt import FakePyCuda

    fake_cuda = FakePyCuda()
    sys.modules["pycuda"], sys.modules["pycuda.driver"] = fake_cuda, fake_cuda.driver


# ---------------------------------------------------------------------------------------- 0
@section("env")
def _env():
    info = {"python": platform.python_version(), "numpy": np.__version__, "host": platform.node(),
            "cpus": os.cpu_count()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        info["nvidia_smi"] = f"unavailable: {exc}"
    for mod in ("torch", "cupy", "onnx", "onnxruntime", "pycuda", "tensorrt"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", None) or getattr(m, "VERSION_TEXT", "present")
        except ImportError as exc:
            info[mod] = f"missing ({exc})"
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["capability"] = list(torch.cuda.get_device_capability(0))
            info["torch_cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


# ---------------------------------------------------------------------------------------- 2
@section("buffers")
def _buffers():
    import pycuda.driver as cuda

    from appliance.runtime.tensorrt import PrimaryContext

    nbytes = (8 if FAKE else 256) * MB
    ctx = PrimaryContext(cuda)
    try:
        with ctx.active():
            info = getattr(cuda, "mem_get_info", None)
            free0 = info()[0] if info else None
            n = nbytes // 4
            h_in = cuda.pagelocked_empty((n,), np.float32)
            h_out = cuda.pagelocked_empty((n,), np.float32)
            h_in[:] = np.random.default_rng(0).random(n, dtype=np.float32)
            h_out.fill(0)
            d = cuda.mem_alloc(nbytes)
            s = cuda.Stream()

            def h2d():
                cuda.memcpy_htod_async(d, h_in, s)
                s.synchronize()

            def d2h():
                cuda.memcpy_dtoh_async(h_out, d, s)
                s.synchronize()

            def round_trip():
                cuda.memcpy_htod_async(d, h_in, s)
                cuda.memcpy_dtoh_async(h_out, d, s)
                s.synchronize()

            t_h2d, t_d2h, t_rt = median_time(h2d), median_time(d2h), median_time(round_trip)
            correct = bool(np.array_equal(h_in, h_out))
            d.free()
            h_in.base.free()
            h_out.base.free()
            del s
            free1 = info()[0] if info else None
    finally:
        ctx.release()
    return {"bytes": nbytes, "round_trip_correct": correct,
            "h2d_gb_s": round(nbytes / t_h2d / 1e9, 1), "d2h_gb_s": round(nbytes / t_d2h / 1e9, 1),
            "round_trip_gb_s": round(2 * nbytes / t_rt / 1e9, 1),
            "device_free_mb_before_after": [None if free0 is None else free0 // MB,
                                            None if free1 is None else free1 // MB]}


# ---------------------------------------------------------------------------------------- 3
@section("cuda_graph")
def _graph():
    if FAKE:
        return {"skipped": "dry run (needs libcuda)"}
    import pycuda.driver as cuda

    from appliance.runtime.tensorrt import CudaGraphs, PrimaryContext

    ctx = PrimaryContext(cuda)
    results = []
    try:
        with ctx.active():
            graphs = CudaGraphs()
            n = 1 << 20
            src, dst = cuda.mem_alloc(4 * n), cuda.mem_alloc(4 * n)
            h_in, h_out = cuda.pagelocked_empty((n,), np.float32), cuda.pagelocked_empty((n,), np.float32)
            s = cuda.Stream()
            graphs.begin_capture(s.handle)
            try:
                cuda.memcpy_dtod_async(dst, src, 4 * n, s)
            finally:
                graph = graphs.end_capture(s.handle)
            exe = graphs.instantiate(graph)
            for k in range(3):
                h_in.fill(k + 1)
                cuda.memcpy_htod_async(src, h_in, s)
                graphs.launch(exe, s.handle)
                cuda.memcpy_dtoh_async(h_out, dst, s)
                s.synchronize()
                results.append(bool((h_out == k + 1).all()))
            graphs.destroy(exe, graph)
            src.free(), dst.free(), h_in.base.free(), h_out.base.free()
            del s
    finally:
        ctx.release()
    return {"replays_correct": results, "all_correct": all(results)}


# ---------------------------------------------------------------------------------------- 4
TILES = {"lobes": (128, 128, 128), "opacity": (64, 128, 128)}
manifest_path = ROOT / "appliance" / "models" / "manifest.json"
manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
if manifest:
    TILES = {k: tuple(v["tile_shape"]) for k, v in manifest["models"].items() if k in TILES}
report["tiles"] = {"source": str(manifest_path) if manifest else "defaults", **{k: list(v) for k, v in TILES.items()}}


class CupyExecutor:
    """Stand-in for TensorRT's kernels (NOT TensorRT): the test models are 1x1x1 convolutions,
    y[:, c] = w[c] * x[:, 0] + b[c], with w and b read off the ONNX model by ONNX Runtime; the
    kernel runs on the runner's stream over the runner's device buffers."""

    def __init__(self):
        import cupy as cp

        self.cp = cp
        self.kernel = cp.ElementwiseKernel("float32 x, float32 w, float32 b", "float32 y", "y = x * w + b",
                                           "gpu_check_standin_affine")
        self.coeffs = {}

    def coefficients(self, engine):
        if id(engine) not in self.coeffs:
            sess = engine.session
            i = sess.get_inputs()[0]
            shape = [1, *engine.get_tensor_shape(i.name)[1:]]
            y0 = sess.run(None, {i.name: np.zeros(shape, np.float32)})[0][0, :, 0, 0, 0]
            y1 = sess.run(None, {i.name: np.ones(shape, np.float32)})[0][0, :, 0, 0, 0]
            self.coeffs[id(engine)] = ((y1 - y0).astype(np.float32), y0.astype(np.float32))
        return self.coeffs[id(engine)]

    def enqueue(self, engine, bindings, stream_handle):
        cp = self.cp
        w, b = self.coefficients(engine)
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n).name == "INPUT"]
        outputs = [n for n in names if n not in inputs]

        def view(name):
            address, shape, dtype = bindings[name]
            nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
            mem = cp.cuda.UnownedMemory(address, nbytes, self)
            return cp.ndarray(tuple(shape), dtype, cp.cuda.MemoryPointer(mem, 0))

        x, y = view(inputs[0]), view(outputs[0])
        with cp.cuda.ExternalStream(stream_handle):
            for c in range(y.shape[1]):
                self.kernel(x[:, 0], np.float32(w[c]), np.float32(b[c]), y[:, c])
        return True


def models_for_runner(tmp):
    tiles = {k: (32, 32, 32) if k == "lobes" else (16, 32, 32) for k in TILES} if FAKE else TILES
    try:
        import onnx  # noqa: F401

        from tests.onnx_models import write_models

        return write_models(Path(tmp) / "models", lobes_tile=tiles["lobes"], opacity_tile=tiles["opacity"]), "written"
    except ImportError:
        carried = ROOT / "out" / "gpu_check_models"
        if (carried / "manifest.json").exists():
            return carried, "carried out/gpu_check_models"
        raise RuntimeError("no onnx package here and no carried out/gpu_check_models (see the script header)")


@section("runner")
def _runner():
    import pycuda.driver as cuda

    from appliance.runtime.base import load_manifest
    from appliance.runtime.onnxruntime import OnnxRuntimeRunner
    from appliance.runtime.select import tensorrt_unavailable_reason
    from appliance.runtime.tensorrt import PrimaryContext, TensorRTRunner
    from tests.fake_tensorrt import FakeTensorRT

    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    models, how = models_for_runner(tmp)
    executor = None if FAKE else CupyExecutor()
    sys.modules["tensorrt"] = FakeTensorRT("10.99.0-standin", cuda=fake_cuda if FAKE else None, executor=executor)
    out = {"engine": "STAND-IN (FakeTensorRT + CuPy kernel), real pycuda buffers/stream/events" if not FAKE
           else "dry run: FakeTensorRT + FakePyCuda", "models": how,
           "select_reason": tensorrt_unavailable_reason()}
    probe = PrimaryContext(cuda)

    def free_mb():
        with probe.active():
            return cuda.mem_get_info()[0] // MB if hasattr(cuda, "mem_get_info") else None

    rng = np.random.default_rng(1)
    try:
        for key in ("lobes", "opacity"):
            spec = load_manifest(models)[key]
            n = 9
            batch = rng.uniform(0.0, 1.0, size=(n, 1, *spec.tile_shape)).astype(np.float32)
            with OnnxRuntimeRunner(spec, threads=os.cpu_count() or 2) as ort_runner:
                ref = ort_runner.infer(batch)
            for graph in (False, True):
                before = free_mb()
                runner = TensorRTRunner(spec, engine_dir=Path(tmp) / "engines", max_batch=4, cuda_graph=graph)
                try:
                    got = runner.infer(batch)  # 3 chunks: 4 + 4 + 1 (padded with the graph)
                    piped = list(runner.infer_pipelined(iter([batch[:4], batch[4:]])))
                    t_batch = median_time(lambda: runner.infer(batch[:4]), reps=5, warmup=1)
                    graph_used = runner._graph_exec is not None
                    during = free_mb()
                finally:
                    runner.close()
                after = free_mb()
                out[f"{key}_graph_{graph}"] = {
                    "tile": list(spec.tile_shape), "max_abs_diff_vs_onnxruntime": float(np.abs(got - ref).max()),
                    "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).mean()),
                    "pipelined_equal": bool(np.array_equal(np.concatenate(piped), got)),
                    "cuda_graph_used": graph_used,
                    "ms_per_batch_of_4": round(1000 * t_batch, 2),
                    "mb_moved_per_batch": round(batch[:4].nbytes / MB + 4 * spec.n_classes * batch[0].nbytes / MB, 1),
                    "device_free_mb_before_during_after": [before, during, after],
                }
    finally:
        probe.release()
        sys.modules.pop("tensorrt", None)
    return out


# ---------------------------------------------------------------------------------------- 5
# Representative extents (mm, z/y/x) of the regions each stage tiles on an adult chest CT:
# stage 1 the body box, stage 2 the lung box with its margin.
EXTENT_MM = {"lobes": (350.0, 330.0, 480.0), "opacity": (300.0, 230.0, 380.0)}


@section("torch_unet")
def _torch():
    if FAKE:
        return {"skipped": "dry run (needs a CUDA GPU)"}
    import torch

    from appliance.pipeline.tiling import plan_tiles

    try:
        from export.unet import UNet3D, UNetConfig
        source = "export/unet.py"
    except ImportError as exc:
        raise RuntimeError(f"export/unet.py does not import: {exc}") from None
    try:
        from export.data import STAGES
    except ImportError:
        STAGES = {}
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    batch = 4
    out = {"network": source, "batch": batch, "fp32_note": "PyTorch defaults (TF32 allowed in cuDNN convolutions)"}
    totals = {"fp32": 0.0, "fp16": 0.0, "fp16_with_copies": 0.0}
    for key, tile in TILES.items():
        entry = (manifest or {}).get("models", {}).get(key, {})
        stage = STAGES.get(key)
        n_classes = len(entry.get("classes") or (stage.classes if stage else ())) or (6 if key == "lobes" else 3)
        spacing = tuple(entry.get("spacing_mm") or (stage.spacing_mm if stage else (3.0, 3.0, 3.0)))
        overlap = float(entry.get("overlap", stage.overlap if stage else 0.25))
        arch = entry.get("architecture")
        cfg = UNetConfig.from_dict({**arch, "n_classes": n_classes}) if arch else UNetConfig(n_classes=n_classes)
        shape = tuple(max(1, math.ceil(e / s)) for e, s in zip(EXTENT_MM[key], spacing, strict=True))
        n_tiles = len(plan_tiles(shape, tile, overlap))
        n_batches = math.ceil(n_tiles / batch)
        model = UNet3D(cfg).to(dev).eval()
        x = torch.rand(batch, 1, *tile, device=dev)
        host_x = torch.rand(batch, 1, *tile).pin_memory()
        host_y = torch.empty(batch, n_classes, *tile, dtype=torch.float32).pin_memory()
        res = {"tile": list(tile), "spacing_mm": list(spacing), "extent_mm": list(EXTENT_MM[key]),
               "tiles_per_scan": n_tiles, "batches_per_scan": n_batches,
               "unet": cfg.to_dict(), "parameters": sum(p.numel() for p in model.parameters())}
        with torch.inference_mode():
            def run32():
                model(x)
                torch.cuda.synchronize()

            def run16():
                with torch.autocast("cuda", dtype=torch.float16):
                    model(x)
                torch.cuda.synchronize()

            def run16_copies():  # what the runner does around the network: tiles in, fp32 logits out
                xin = host_x.to(dev, non_blocking=True)
                with torch.autocast("cuda", dtype=torch.float16):
                    y = model(xin)
                host_y.copy_(y.float(), non_blocking=True)
                torch.cuda.synchronize()

            torch.cuda.reset_peak_memory_stats()
            t32 = median_time(run32, reps=5, warmup=2)
            t16 = median_time(run16, reps=5, warmup=2)
            t16c = median_time(run16_copies, reps=5, warmup=1)
        res.update({"ms_per_batch_fp32": round(1000 * t32, 2), "ms_per_batch_fp16": round(1000 * t16, 2),
                    "ms_per_batch_fp16_with_copies": round(1000 * t16c, 2),
                    "peak_gpu_mb": torch.cuda.max_memory_allocated() // MB})
        totals["fp32"] += n_batches * t32
        totals["fp16"] += n_batches * t16
        totals["fp16_with_copies"] += n_batches * t16c
        out[key] = res
        del model, x
        torch.cuda.empty_cache()
    out["seconds_per_scan"] = {k: round(v, 3) for k, v in totals.items()}
    out["fp16_speedup"] = round(totals["fp32"] / totals["fp16"], 2) if totals["fp16"] else None
    return out


report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
print(emit())
EOF
rc=$?
if [ "$rc" -ne 0 ]; then
  echo "{\"script\": \"benchmarks/gpu_check.sh\", \"error\": \"python part exited $rc (124: timeout)\"}" >&2
  [ -n "${OUT:-}" ] && [ -f "$OUT/gpu_check.json" ] && echo "partial results in $OUT/gpu_check.json" >&2
fi
exit "$rc"
