"""Export a trained stage to ONNX (fp32 + fp16), check it, and record it in the manifest.

    python -m export.onnx --weights out/checkpoints/lobes/lobes.pt [--models-dir appliance/models]
    python -m export.onnx bench [--bases 8,12,16] [--top-convs 1,2]

Export: opset 17, input "image" (N, 1, D, H, W) float32 with a dynamic batch and the stage's
static tile shape, output "logits" (N, C, D, H, W); eval mode, so BatchNorm folds into the
convolutions. Checks before anything is written to the manifest: onnx.checker; PyTorch vs ONNX
Runtime on a few real-looking tiles (argmax agreement >= 99.9%); the fp16 variant (converted
with keep_io_types, normalisation ops kept in fp32) against fp32 (argmax agreement >= 99.5%);
each file <= 16 MB. The manifest entry carries the fixed stage decisions (export.data.STAGES),
the architecture, the training summary and these metrics.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from export.data import (
    REAL_DIR,
    SourceCache,
    StageSpec,
    load_real,
    phantom_source,
    sample_params,
    stage_spec,
    warp,
)
from export.unet import UNet3D, UNetConfig, count_parameters

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "appliance" / "models"
OPSET = 17
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
MAX_FILE_BYTES = 16 * 1024 * 1024
MIN_ARGMAX_AGREEMENT = 0.999
MIN_FP16_AGREEMENT = 0.995
FP32_KEEP_OPS = ["BatchNormalization", "InstanceNormalization", "LayerNormalization",
                 "GroupNormalization", "Softmax", "LogSoftmax", "ReduceMean"]
"""Kept in fp32 in the fp16 variant (normalisation layers, as MONAI/TensorRT advise)."""
VALIDATION_PHANTOM_SEED = 1_000_500
"""Parity tiles from a phantom use a held-out seed (never a training one)."""


class ExportCheckFailed(RuntimeError):
    """An exported model failed a check; nothing was written to the manifest."""


# --------------------------------------------------------------------------------------------
# Loading


def load_model(path: str | Path) -> tuple[str, UNet3D, dict[str, Any], dict[str, Any]]:
    """(stage, model in eval mode, training summary, metrics) from weights or a last.pt."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"`weights` must be an existing file, got {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle, zip and torch errors alike: not a weights file
        raise ValueError(f"`weights` must be a file written by export.train, got {path} ({type(e).__name__})") from e
    if not isinstance(state, dict) or "unet" not in state or "stage" not in state:
        raise ValueError(f"`weights` must be a file written by export.train, got {path}")
    config = UNetConfig.from_dict(state["unet"])
    model = UNet3D(config)
    model.load_state_dict(state.get("state_dict") or state["model"])
    model.eval()
    training = state.get("training") or {"steps": state.get("step"),
                                         "samples": state.get("samples")}
    return state["stage"], model, training, state.get("metrics", {})


# --------------------------------------------------------------------------------------------
# Export and conversion


def _inline_identity_initializers(model: Any) -> None:
    """Constant folding leaves Identity nodes where two folded tensors are equal; give each
    consumer its own initializer instead, so the graph is plain Conv/ConvTranspose/Relu/..."""
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    keep = []
    for node in model.graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            arr = numpy_helper.to_array(inits[node.input[0]])
            model.graph.initializer.append(numpy_helper.from_array(arr, node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)


def export_onnx(model: torch.nn.Module, tile_shape: tuple[int, int, int], path: str | Path,
                *, doc: str = "") -> Path:
    """Export in eval mode (BN folded), opset 17, dynamic batch, static spatial; run the checker."""
    import onnx

    path = Path(path)
    model = copy.deepcopy(model).cpu().float().eval()
    dummy = torch.zeros(1, 1, *tile_shape)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(
            model, (dummy,), str(raw), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
            do_constant_folding=True, training=torch.onnx.TrainingMode.EVAL,
        )
        proto = onnx.load(str(raw))
    _inline_identity_initializers(proto)
    proto.doc_string = doc
    proto.producer_name = "appliance export.onnx"
    onnx.checker.check_model(proto, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(path))
    return path


def convert_fp16(src: str | Path, dst: str | Path) -> Path:
    """Mixed-precision copy: weights and compute fp16, inputs/outputs fp32, norm ops fp32."""
    import onnx
    from onnxconverter_common import float16

    proto = onnx.load(str(src))
    block = sorted(set(float16.DEFAULT_OP_BLOCK_LIST) | set(FP32_KEEP_OPS))
    with warnings.catch_warnings():
        # It reports every tiny weight it rounds to fp16's smallest subnormal; the agreement
        # check against fp32 is what tells whether that matters.
        warnings.simplefilter("ignore", UserWarning)
        half = float16.convert_float_to_float16(proto, keep_io_types=True, op_block_list=block,
                                                disable_shape_infer=False)
    onnx.checker.check_model(half, full_check=True)
    onnx.save(half, str(dst))
    return Path(dst)


def ort_session(path: str | Path, threads: int = 2) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_run(session: Any, tiles: np.ndarray) -> np.ndarray:
    (out,) = session.run([OUTPUT_NAME], {INPUT_NAME: np.ascontiguousarray(tiles, np.float32)})
    return np.asarray(out, dtype=np.float32)


# --------------------------------------------------------------------------------------------
# Checks


def realistic_tiles(spec: StageSpec, n: int = 3, *, real_dir: str | Path = REAL_DIR,
                    seed: int = 0) -> tuple[np.ndarray, str]:
    """A few normalised tiles (n, 1, D, H, W) that look like what the runtime feeds the model:
    the real training scan if prepared (out/real), else a held-out phantom, else smooth noise."""
    rng = np.random.default_rng(seed)
    source = None
    real = load_real(str(real_dir), spec.name)
    if real is not None:
        from export.data import KIND_FULL, Source

        source = Source(real["hu"].astype(np.int16), real["lung"].astype(np.uint8),
                        real["lung"].astype(bool), tuple(float(s) for s in real["spacing"]),
                        KIND_FULL, "real")
        where = "real scan normal002 (training scan)"
    else:
        try:
            from appliance.phantom import synthesize
        except ImportError:
            synthesize = None
        if synthesize is not None:
            source = phantom_source(spec, VALIDATION_PHANTOM_SEED, "moderate", synthesize)
            where = f"phantom seed {VALIDATION_PHANTOM_SEED}"
    if source is None:
        from scipy import ndimage

        x = ndimage.gaussian_filter(rng.random((n, 1, *spec.tile_shape)), (0, 0, 3, 3, 3))
        x = (x - x.min()) / (x.max() - x.min())
        return x.astype(np.float32), "smooth random noise (no real npz, no phantom)"
    assert source.lung is not None
    lung = np.argwhere(source.lung)
    if len(lung) == 0:
        lung = np.argwhere(np.ones(source.hu.shape, dtype=bool))
    cache = SourceCache(torch.device("cpu"))
    hu_t, _ = cache.get(source)
    tiles = []
    for i in range(n):
        centre = (np.asarray(source.hu.shape) - 1) / 2 if (spec.name == "lobes" and i == 0) \
            else lung[rng.integers(len(lung))]
        params = sample_params(rng, spec, centre, None)
        img, _ = warp(hu_t, None, params, source.spacing, spec)
        tiles.append(spec.normalize(img)[None].numpy())
    return np.stack(tiles).astype(np.float32), where


def compare(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    return {
        "max_abs_logit_diff": float(np.abs(reference - other).max()),
        "argmax_agreement": float((reference.argmax(1) == other.argmax(1)).mean()),
    }


def check_parity(model: torch.nn.Module, fp32_path: Path, fp16_path: Path,
                 tiles: np.ndarray, threads: int = 2) -> dict[str, Any]:
    """PyTorch vs ONNX Runtime fp32, and fp16 vs fp32 (ONNX Runtime), tile by tile."""
    s32, s16 = ort_session(fp32_path, threads), ort_session(fp16_path, threads)
    torch_out, o32, o16, times = [], [], [], []
    model = model.cpu().eval()
    ort_run(s32, tiles[:1])  # warm-up: the first call allocates, the timing below is per tile
    with torch.no_grad():
        for tile in tiles:
            batch = tile[None]
            torch_out.append(model(torch.from_numpy(batch)).numpy())
            t0 = time.perf_counter()
            o32.append(ort_run(s32, batch))
            times.append(time.perf_counter() - t0)
            o16.append(ort_run(s16, batch))
    ref, a, h = (np.concatenate(v) for v in (torch_out, o32, o16))
    # The dynamic batch must give the same answer as one tile at a time.
    batched = ort_run(s32, tiles[:2]) if len(tiles) > 1 else a[:1]
    fp32 = compare(ref, a)
    fp16 = compare(a, h)
    return {
        "fp32_vs_torch": fp32,
        "fp16_vs_fp32": fp16,
        "batch_vs_single_max_abs_diff": float(np.abs(batched - a[: len(batched)]).max()),
        "ort_cpu_seconds_per_tile": float(np.median(times)),
        "ort_threads": threads,
        "tiles": len(tiles),
    }


def sha256_of(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Manifest


def read_manifest(models_dir: Path) -> dict[str, Any]:
    path = models_dir / "manifest.json"
    if not path.exists():
        return {"schema_version": 1, "models": {}}
    manifest = json.loads(path.read_text())
    if manifest.get("schema_version") != 1:
        raise ValueError(
            f"`{path}` must have schema_version 1, got {manifest.get('schema_version')}")
    manifest.setdefault("models", {})
    return manifest


def write_manifest(models_dir: Path, manifest: dict[str, Any]) -> Path:
    path = models_dir / "manifest.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def manifest_entry(spec: StageSpec, model: UNet3D, *, version: str, file: str, fp16_file: str,
                   sha: str, fp16_sha: str, training: dict[str, Any],
                   metrics: dict[str, Any]) -> dict[str, Any]:
    """The entry the runtime reads (appliance.runtime.base.load_manifest), fixed key order."""
    architecture = {**model.config.to_dict(), "parameters": count_parameters(model),
                    "blocks": "Conv3d+BatchNorm3d+ReLU (BN folded in ONNX)", "opset": OPSET}
    return {
        "name": spec.name, "version": version, "file": file, "fp16_file": fp16_file,
        "sha256": sha, "fp16_sha256": fp16_sha, **spec.manifest_fields(),
        "output": "logits", "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
        "batch": "dynamic", "architecture": architecture, "training": training,
        "metrics": metrics,
    }


def export_stage(weights: str | Path, *, models_dir: str | Path | None = None,
                 version: str = "1.0.0", tiles: int = 3, threads: int = 2,
                 real_dir: str | Path = REAL_DIR, spec: StageSpec | None = None) -> dict[str, Any]:
    """Export, check and register one stage; returns the manifest entry it wrote.

    Files are written under temporary names and only renamed into place (and the manifest only
    updated) when every check passes; a failure raises ExportCheckFailed.
    """
    stage, model, training, train_metrics = load_model(weights)
    spec = spec or stage_spec(stage)
    if spec.name != stage:
        raise ValueError(f"`spec` must be for stage {stage!r}, got {spec.name!r}")
    folder = Path(models_dir) if models_dir else MODELS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    file, fp16_file = f"{stage}.onnx", f"{stage}.fp16.onnx"
    tmp32, tmp16 = folder / f".{file}.tmp", folder / f".{fp16_file}.tmp"
    try:
        export_onnx(model, spec.tile_shape, tmp32,
                    doc=f"appliance {stage} model {version}: logits (N,{spec.n_classes},D,H,W)")
        convert_fp16(tmp32, tmp16)
        x, where = realistic_tiles(spec, tiles, real_dir=real_dir)
        parity = check_parity(model, tmp32, tmp16, x, threads)
        parity["tile_source"] = where
        problems = []
        a32 = parity["fp32_vs_torch"]["argmax_agreement"]
        a16 = parity["fp16_vs_fp32"]["argmax_agreement"]
        if a32 < MIN_ARGMAX_AGREEMENT:
            problems.append(f"fp32 argmax agreement {a32:.5f} < {MIN_ARGMAX_AGREEMENT}")
        if a16 < MIN_FP16_AGREEMENT:
            problems.append(f"fp16 argmax agreement {a16:.5f} < {MIN_FP16_AGREEMENT}")
        if parity["batch_vs_single_max_abs_diff"] > 1e-3:
            problems.append(f"batched output differs by {parity['batch_vs_single_max_abs_diff']}")
        for p in (tmp32, tmp16):
            if p.stat().st_size > MAX_FILE_BYTES:
                problems.append(f"{p.name} is {p.stat().st_size} bytes > {MAX_FILE_BYTES}")
        if problems:
            raise ExportCheckFailed(f"{stage}: " + "; ".join(problems))
        os.replace(tmp32, folder / file)
        os.replace(tmp16, folder / fp16_file)
    finally:
        for p in (tmp32, tmp16):
            p.unlink(missing_ok=True)
    metrics = {**train_metrics, "export": parity}
    entry = manifest_entry(spec, model, version=version, file=file, fp16_file=fp16_file,
                           sha=sha256_of(folder / file), fp16_sha=sha256_of(folder / fp16_file),
                           training=training, metrics=metrics)
    manifest = read_manifest(folder)
    manifest["models"][stage] = entry
    write_manifest(folder, manifest)
    return entry


# --------------------------------------------------------------------------------------------
# CPU timing table


def bench(bases: list[int], top_convs: list[int], repeats: int = 5,
          threads: int = 2) -> list[dict[str, Any]]:
    """ONNX Runtime CPU seconds per tile (batch 1) for each stage's tile shape and width."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for tc in top_convs:
            for base in bases:
                for name in ("lobes", "opacity"):
                    spec = stage_spec(name)
                    model = UNet3D(UNetConfig(n_classes=spec.n_classes, base=base, top_convs=tc))
                    path = export_onnx(model, spec.tile_shape, Path(tmp) / "m.onnx")
                    session = ort_session(path, threads)
                    x = np.random.default_rng(0).random((1, 1, *spec.tile_shape), np.float32)
                    ort_run(session, x)
                    times = []
                    for _ in range(repeats):
                        t0 = time.perf_counter()
                        ort_run(session, x)
                        times.append(time.perf_counter() - t0)
                    row = {"stage": name, "tile": list(spec.tile_shape), "base": base,
                           "top_convs": tc, "median_s": round(float(np.median(times)), 3),
                           "min_s": round(min(times), 3), "parameters": count_parameters(model),
                           "mb": round(path.stat().st_size / 1e6, 2), "threads": threads}
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "bench":
        p = argparse.ArgumentParser(prog="python -m export.onnx bench")
        p.add_argument("--bases", default="8,12,16")
        p.add_argument("--top-convs", default="2,1")
        p.add_argument("--repeats", type=int, default=5)
        p.add_argument("--threads", type=int, default=2)
        a = p.parse_args(argv[1:])
        bench([int(b) for b in a.bases.split(",")], [int(t) for t in a.top_convs.split(",")],
              a.repeats, a.threads)
        return 0
    p = argparse.ArgumentParser(prog="python -m export.onnx", description=__doc__.split("\n")[0])
    p.add_argument("--weights", required=True, nargs="+", help="stage weights (.pt) or last.pt")
    p.add_argument("--models-dir", default=str(MODELS_DIR))
    p.add_argument("--version", default="1.0.0")
    p.add_argument("--tiles", type=int, default=3, help="tiles for the parity checks")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--real-dir", default=str(REAL_DIR))
    a = p.parse_args(argv)
    status = 0
    for weights in a.weights:
        try:
            entry = export_stage(weights, models_dir=a.models_dir, version=a.version,
                                 tiles=a.tiles, threads=a.threads, real_dir=a.real_dir)
        except (ValueError, ExportCheckFailed) as exc:
            print(f"error: {exc}", file=sys.stderr)
            status = 2
            continue
        print(json.dumps({"event": "exported", "name": entry["name"], "file": entry["file"],
                          "sha256": entry["sha256"], "metrics": entry["metrics"].get("export")}),
              flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
