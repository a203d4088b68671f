"""`appliance engines build|list|verify`: argument parsing and output only.

`appliance.cli` adds the command with ``engines_cli.add_parser(sub)`` (the handler is set as the
parser's ``func``). Exit codes as everywhere: 0 success; 2 refused (TensorRT or a GPU missing,
bad usage, an unusable model); 1 a failure (a build error, a parity check that fails).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from engines.build import DEFAULT_OPT_LEVEL, DEFAULT_WORKSPACE_GB, MAX_OPT_LEVEL, PRECISIONS
from engines.verify import DEFAULT_TILES

log = logging.getLogger(__name__)
EXIT_OK, EXIT_FAILED = 0, 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add `engines` with its subcommands to the CLI's subparsers."""
    p = subparsers.add_parser("engines", help="TensorRT engines: build for this GPU, list the cache, verify parity",
                              description="TensorRT plans for the local GPU, cached under <state_dir>/engines/.")
    sub = p.add_subparsers(dest="engines_command", required=True, metavar="{build,list,verify}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state-dir", metavar="DIR", help="state directory (default: the config's state_dir)")
    common.add_argument("--config", metavar="FILE", help="TOML config file")
    common.add_argument("--json", action="store_true", help="print JSON instead of a table")

    def model_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--model", default="all", metavar="NAME|all", help="a model of the manifest, or all (default)")
        q.add_argument("--models-dir", metavar="DIR", help="manifest folder (default: the config's, else shipped)")
        q.add_argument("--precision", choices=PRECISIONS, default=None, help="default: the config's")
        q.add_argument("--max-batch", type=int, default=None, metavar="N",
                       help="profile max (= opt) batch (default: the config's batch size, at least 4)")
        q.add_argument("--workspace-gb", type=float, default=DEFAULT_WORKSPACE_GB, metavar="N",
                       help=f"builder workspace limit in GiB (default {DEFAULT_WORKSPACE_GB:g})")
        q.add_argument("--opt-level", type=int, choices=range(MAX_OPT_LEVEL + 1), default=DEFAULT_OPT_LEVEL,
                       metavar="0-5", help=f"builder optimisation level (default {DEFAULT_OPT_LEVEL})")

    q = sub.add_parser("build", parents=[common], help="build missing (or --force: all) engines for this GPU")
    model_args(q)
    q.add_argument("--force", action="store_true", help="rebuild even when a cached engine is usable")
    q = sub.add_parser("list", parents=[common], help="show the engine cache")
    q = sub.add_parser("verify", parents=[common], help="parity of the engines against ONNX Runtime on real tiles")
    model_args(q)
    q.add_argument("--series", metavar="DIR", help="DICOM series to cut tiles from (default: a synthetic chest)")
    q.add_argument("--tiles", type=int, default=DEFAULT_TILES, metavar="N", help=f"tiles per model ({DEFAULT_TILES})")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    return {"build": cmd_build, "list": cmd_list, "verify": cmd_verify}[args.engines_command](args)


# ----------------------------------------------------------------------------- shared


def _refused(message: str) -> Exception:
    from appliance.cli import Refused

    return Refused(message)


def _setup(args: argparse.Namespace) -> tuple[Any, Path]:
    from appliance.config import load_config

    config = load_config(args.config)
    state = Path(args.state_dir or config.general.state_dir)
    return config, state / "engines"


def _require_tensorrt(what: str) -> tuple[Any, Any]:
    from appliance.runtime.base import BackendUnavailable
    from appliance.runtime.select import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason:
        raise BackendUnavailable(f"cannot {what}: {reason}")
    import pycuda.driver as cuda
    import tensorrt as trt

    return trt, cuda


def _models(args: argparse.Namespace, config: Any) -> list[Any]:
    from appliance.runtime.base import load_manifest

    specs = load_manifest(args.models_dir or config.analysis.models_dir or None)
    if args.model == "all":
        return list(specs.values())
    if args.model not in specs:
        raise _refused(f"unknown model {args.model!r}: the manifest has {', '.join(sorted(specs))}")
    return [specs[args.model]]


def _settings(args: argparse.Namespace, config: Any) -> Any:
    from engines.build import BuildSettings, engine_max_batch

    try:
        return BuildSettings(
            precision=args.precision or config.analysis.precision,
            max_batch=args.max_batch if args.max_batch is not None else engine_max_batch(config.analysis.batch_size),
            workspace_gb=args.workspace_gb, opt_level=args.opt_level,
        )
    except ValueError as exc:
        raise _refused(str(exc)) from None


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


# ----------------------------------------------------------------------------- build


def cmd_build(args: argparse.Namespace) -> int:
    from appliance.runtime.tensorrt import PrimaryContext
    from engines.build import detect_platform, load_engine, make_logger
    from engines.cache import EngineCache

    config, engine_dir = _setup(args)
    settings = _settings(args, config)
    trt, cuda = _require_tensorrt("build TensorRT engines")
    specs = _models(args, config)
    cache = EngineCache(engine_dir)
    ctx = PrimaryContext(cuda)
    rows = []
    try:
        with ctx.active():
            platform = detect_platform(trt, cuda)
            print(f"TensorRT {platform.tensorrt_version} on {platform.gpu_name} (sm {platform.compute_capability}, "
                  f"driver {platform.driver}); cache {engine_dir}", file=sys.stderr)
            runtime = trt.Runtime(make_logger(trt))
            for spec in specs:
                # Deserialising proves a cached plan usable; one that is not is rebuilt here, at boot.
                engine, record = load_engine(trt, runtime, spec, settings, platform, cache, force=args.force)
                del engine
                rows.append({"model": spec.name, "precision": settings.precision, "max_batch": settings.max_batch,
                             "status": "built" if record.built else "cached", "reason": record.reason,
                             "seconds": round(record.seconds, 1), "plan": str(record.path)})
            del runtime
    finally:
        ctx.release()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        table = [["model", "precision", "batch", "status", "seconds", "plan"]]
        table += [[r["model"], r["precision"], str(r["max_batch"]), r["status"], f"{r['seconds']:.1f}", r["plan"]]
                  for r in rows]
        print(_table(table))
    return EXIT_OK


# ----------------------------------------------------------------------------- list


def _current_platform() -> tuple[Any, str | None]:
    """This machine's platform, or None and why it cannot be known (no TensorRT here)."""
    from appliance.runtime.select import tensorrt_unavailable_reason

    reason = tensorrt_unavailable_reason()
    if reason:
        return None, reason
    import pycuda.driver as cuda
    import tensorrt as trt

    from appliance.runtime.tensorrt import PrimaryContext
    from engines.build import detect_platform

    ctx = PrimaryContext(cuda)
    try:
        with ctx.active():
            return detect_platform(trt, cuda), None
    finally:
        ctx.release()


def cmd_list(args: argparse.Namespace) -> int:
    from engines.cache import EngineCache

    _config, engine_dir = _setup(args)
    entries = EngineCache(engine_dir).entries()
    platform, why_unknown = _current_platform()
    rows = []
    for e in entries:
        key = e.key
        if e.problem:
            state = f"unusable: {e.problem}"
        elif key is None:
            state = "unusable: sidecar without a key"
        elif platform is None:
            state = "unknown"
        else:
            same = (key.tensorrt_version, key.gpu_name, key.compute_capability, key.driver) == (
                platform.tensorrt_version, platform.gpu_name, platform.compute_capability, platform.driver)
            state = "current" if same else "stale (other TensorRT, GPU or driver)"
        k = key.as_dict() if key else {}
        rows.append({"file": e.plan_path.name, "model": k.get("model"), "precision": k.get("precision"),
                     "tensorrt": k.get("tensorrt_version"), "gpu": k.get("gpu_name"),
                     "sm": k.get("compute_capability"), "max_batch": k.get("max_batch"),
                     "mb": round(e.meta.get("plan_bytes", 0) / 2**20, 1), "built_at": e.meta.get("built_at"),
                     "state": state})
    if args.json:
        print(json.dumps({"engine_dir": str(engine_dir), "platform_unknown_because": why_unknown,
                          "engines": rows}, indent=2))
        return EXIT_OK
    print(f"engine cache {engine_dir}: {len(rows)} engine(s)"
          + (f"; current platform unknown ({why_unknown})" if why_unknown else ""))
    if rows:
        table = [["model", "precision", "tensorrt", "gpu", "sm", "batch", "MB", "built", "state", "file"]]
        table += [[str(r["model"]), str(r["precision"]), str(r["tensorrt"]), str(r["gpu"]), str(r["sm"]),
                   str(r["max_batch"]), f"{r['mb']:.1f}", str(r["built_at"]), r["state"], r["file"]] for r in rows]
        print(_table(table))
    return EXIT_OK


# ----------------------------------------------------------------------------- verify


def _volume(args: argparse.Namespace, config: Any) -> tuple[Any, tuple[float, float, float], str]:
    if not args.series:
        from engines.verify import phantom_volume

        return phantom_volume()
    from appliance.dicom.series import SelectionRules, load_series
    from appliance.pipeline.geometry import to_canonical

    if not Path(args.series).exists():
        raise _refused(f"{args.series} does not exist")
    s = config.series
    rules = SelectionRules(min_slices=s.min_slices, max_gap_factor=s.max_gap_factor, max_tilt_deg=s.max_tilt_deg)
    volume, info = load_series(args.series, rules=rules, threads=config.analysis.threads)
    canonical, _ = to_canonical(volume)
    return canonical.array, tuple(canonical.spacing), f"series {info.series_instance_uid}"  # type: ignore[return-value]


def cmd_verify(args: argparse.Namespace) -> int:
    from appliance.runtime.onnxruntime import OnnxRuntimeRunner
    from appliance.runtime.tensorrt import TensorRTRunner
    from engines.verify import verify_models

    config, engine_dir = _setup(args)
    settings = _settings(args, config)
    if args.tiles < 1:
        raise _refused(f"`--tiles` must be a positive integer, got {args.tiles}")
    _require_tensorrt("verify TensorRT engines")
    specs = _models(args, config)
    hu, spacing, source = _volume(args, config)
    print(f"parity on {args.tiles} tile(s) per model from {source}", file=sys.stderr)
    results = verify_models(
        specs, settings.precision, hu, spacing,
        open_reference=lambda spec: OnnxRuntimeRunner(spec, precision="fp32", threads=config.analysis.threads),
        open_candidate=lambda spec: TensorRTRunner(spec, precision=settings.precision, max_batch=settings.max_batch,
                                                   engine_dir=engine_dir, workspace_gb=settings.workspace_gb,
                                                   opt_level=settings.opt_level),
        n_tiles=args.tiles, batch_size=settings.max_batch,
    )
    if args.json:
        print(json.dumps({"source": source, "results": [r.as_dict() for r in results]}, indent=2))
    else:
        table = [["model", "precision", "tiles", "agreement", "needed", "max |diff|", "max |dprob|", "result"]]
        table += [[r.model, r.precision, str(r.tiles), f"{100 * r.argmax_agreement:.3f}%",
                   f"{100 * r.min_agreement:.1f}%", f"{r.max_abs_output_diff:.3g}", f"{r.max_abs_prob_diff:.3g}",
                   "ok" if r.ok else "FAILED"] for r in results]
        print(_table(table))
    failed = [r.model for r in results if not r.ok]
    if failed:
        print(f"appliance: TensorRT parity check failed for {', '.join(failed)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
