"""ONNX -> TensorRT plan for the local GPU, through the engine cache.

Precision depends on the TensorRT major version, detected at run time:

- TensorRT 10: the fp32 ONNX file; fp16 is asked for with ``BuilderFlag.FP16`` (weak typing:
  TensorRT may pick fp16 kernels where it likes).
- TensorRT 11 (and later): weak typing is gone, so fp16 comes from the fp16 ONNX variant in the
  manifest (normalisation kept in fp32 at export); the network is created strongly typed
  (the flag is accepted and ignored on 11) and no precision flag is set. No calibrators on
  either path (no INT8).

The optimisation profile fixes the tile shape and lets only the batch vary: min 1, opt = max =
``max_batch``. The tactic timing cache is kept per TensorRT version and GPU, so rebuilding after
an ONNX change is quicker.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.runtime.base import BackendUnavailable, ModelError, ModelSpec, sha256_of
from engines.cache import EngineCache, EngineKey, Lookup

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16")
DEFAULT_MAX_BATCH = 4
"""opt = max batch of the optimisation profile unless the configured batch size is larger."""
DEFAULT_WORKSPACE_GB = 4.0
DEFAULT_OPT_LEVEL = 3
"""TensorRT's own default builder optimisation level."""
MAX_OPT_LEVEL = 5
OLDEST_MAJOR = 10
STRONG_TYPING_MAJOR = 11
"""From this major version on, only strongly typed networks exist (no BuilderFlag.FP16)."""
NVIDIA_DRIVER_FILE = Path("/proc/driver/nvidia/version")


class BuildError(RuntimeError):
    """TensorRT could not build or load an engine; str(exc) is a one-line reason."""


def engine_max_batch(batch_size: int | None) -> int:
    """The profile's max batch for a configured batch size: at least DEFAULT_MAX_BATCH."""
    if batch_size is None:
        return DEFAULT_MAX_BATCH
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
    return max(DEFAULT_MAX_BATCH, batch_size)


@dataclass(frozen=True)
class BuildSettings:
    """What the builder is asked for (part of the cache key)."""

    precision: str = "fp32"
    max_batch: int = DEFAULT_MAX_BATCH
    workspace_gb: float = DEFAULT_WORKSPACE_GB
    opt_level: int = DEFAULT_OPT_LEVEL

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"`precision` must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise ValueError(f"`max_batch` must be a positive int, got {self.max_batch!r}")
        gb = self.workspace_gb
        if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not math.isfinite(gb) or gb <= 0:
            raise ValueError(f"`workspace_gb` must be a positive number, got {gb!r}")
        lvl = self.opt_level
        if isinstance(lvl, bool) or not isinstance(lvl, int) or not 0 <= lvl <= MAX_OPT_LEVEL:
            raise ValueError(f"`opt_level` must be an int in 0..{MAX_OPT_LEVEL}, got {lvl!r}")


@dataclass(frozen=True)
class Platform:
    """The TensorRT and GPU a plan is built for."""

    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    driver: str

    @property
    def trt_major(self) -> int:
        match = re.match(r"\s*(\d+)", self.tensorrt_version)
        if not match:
            raise BackendUnavailable(f"cannot read the TensorRT version {self.tensorrt_version!r}")
        return int(match.group(1))


def _driver_version(cuda: Any) -> str:
    """The NVIDIA kernel driver version (changes on every driver update), else the CUDA one."""
    try:
        text = NVIDIA_DRIVER_FILE.read_text()
    except OSError:
        text = ""
    match = re.search(r"Kernel Module(?: for \S+)?\s+([0-9][0-9.]*)", text)
    if match:
        return match.group(1)
    return f"cuda-{cuda.get_driver_version()}"


def detect_platform(trt: Any, cuda: Any, device_index: int = 0) -> Platform:
    """TensorRT version, GPU name, compute capability and driver (cuda.init() must have run)."""
    device = cuda.Device(device_index)
    major, minor = device.compute_capability()
    return Platform(str(trt.__version__), str(device.name()), f"{major}.{minor}", _driver_version(cuda))


@dataclass(frozen=True)
class PrecisionPlan:
    """Which ONNX file the builder reads and how, for one TensorRT major and precision."""

    onnx_path: Path
    onnx_sha256: str
    fp16_flag: bool
    strongly_typed: bool


def precision_plan(spec: ModelSpec, precision: str, trt_major: int) -> PrecisionPlan:
    if trt_major < OLDEST_MAJOR:
        raise BackendUnavailable(f"TensorRT {trt_major}.x is too old: 10.x or 11.x is needed")
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if trt_major >= STRONG_TYPING_MAJOR:
        path, digest = spec.file_for(precision)  # fp16: the fp16 ONNX variant (ModelError if none)
        return PrecisionPlan(path, digest, fp16_flag=False, strongly_typed=True)
    return PrecisionPlan(spec.path, spec.sha256, fp16_flag=precision == "fp16", strongly_typed=False)


def engine_key(spec: ModelSpec, settings: BuildSettings, platform: Platform) -> EngineKey:
    plan = precision_plan(spec, settings.precision, platform.trt_major)
    return EngineKey(
        model=spec.name, precision=settings.precision, onnx_sha256=plan.onnx_sha256,
        tensorrt_version=platform.tensorrt_version, gpu_name=platform.gpu_name,
        compute_capability=platform.compute_capability, driver=platform.driver,
        input_name=spec.input_name, tile_shape=tuple(spec.tile_shape), max_batch=settings.max_batch,
        workspace_gb=float(settings.workspace_gb), opt_level=settings.opt_level,
        strongly_typed=plan.strongly_typed, fp16_flag=plan.fp16_flag,
    )


def make_logger(trt: Any) -> Any:
    """A TensorRT logger that forwards to Python logging and keeps the errors for the reason."""

    class TrtLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            name = str(getattr(severity, "name", None) or str(severity).rsplit(".", 1)[-1]).upper()
            if name in ("ERROR", "INTERNAL_ERROR"):
                self.errors.append(str(msg))
                log.error("TensorRT: %s", msg)
            elif name == "WARNING":
                log.warning("TensorRT: %s", msg)
            elif name == "INFO":
                log.debug("TensorRT: %s", msg)

    return TrtLogger()


def _first_line(text: str) -> str:
    return str(text).strip().splitlines()[0] if str(text).strip() else "no reason given"


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def build_plan(trt: Any, spec: ModelSpec, settings: BuildSettings, platform: Platform,
               timing_cache: bytes = b"") -> tuple[bytes, bytes]:
    """Build one serialized engine; returns (plan, updated timing cache). Needs a current CUDA context."""
    plan_for = precision_plan(spec, settings.precision, platform.trt_major)
    path = plan_for.onnx_path
    if not path.exists():
        raise ModelError(f"model file {path} is missing")
    if sha256_of(path) != plan_for.onnx_sha256:
        raise ModelError(f"model file {path} does not match the manifest's sha256")
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    if plan_for.strongly_typed:
        strongly = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        if strongly is not None:  # always on (and the flag ignored) from TensorRT 11
            flags |= 1 << int(strongly)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(path)):
        errors = [_first_line(getattr(e, "desc", lambda e=e: str(e))()) for e in
                  (parser.get_error(i) for i in range(parser.num_errors))]
        raise ModelError(f"TensorRT cannot parse {path.name}: {'; '.join(errors) or 'no reason given'}")
    inputs = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    outputs = {network.get_output(i).name for i in range(network.num_outputs)}
    if set(inputs) != {spec.input_name}:
        raise ModelError(f"model {spec.name} must have one input named {spec.input_name!r}, has {sorted(inputs)}")
    if spec.output_name not in outputs:
        raise ModelError(f"model {spec.name} has no output named {spec.output_name!r} (has {sorted(outputs)})")
    shape = _dims(inputs[spec.input_name].shape)
    if len(shape) != 5 or shape[1:] != (1, *spec.tile_shape):
        raise ModelError(f"model {spec.name} input shape {shape} does not match the manifest tile "
                         f"(N, 1, {', '.join(map(str, spec.tile_shape))})")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gb * 2**30))
    config.builder_optimization_level = settings.opt_level
    if plan_for.fp16_flag:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    tile = tuple(spec.tile_shape)
    profile.set_shape(spec.input_name, (1, 1, *tile), (settings.max_batch, 1, *tile),
                      (settings.max_batch, 1, *tile))
    if config.add_optimization_profile(profile) < 0:
        raise BuildError(f"TensorRT refused the optimisation profile for {spec.name}: "
                         f"{'; '.join(logger.errors) or 'no reason given'}")
    _attach_timing_cache(config, timing_cache, spec.name)

    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        reason = _first_line(logger.errors[-1]) if logger.errors else "no reason given"
        raise BuildError(f"TensorRT could not build an engine for {spec.name} ({settings.precision}): {reason}")
    log.info("built TensorRT engine for %s (%s) in %.1f s", spec.name, settings.precision,
             time.perf_counter() - start)
    cache = config.get_timing_cache()
    return bytes(serialized), bytes(cache.serialize()) if cache is not None else b""


def _attach_timing_cache(config: Any, data: bytes, model: str) -> None:
    """Load the saved timing cache; one TensorRT rejects (corrupt, other version) is replaced."""
    if data:
        try:
            cache = config.create_timing_cache(data)
        except (RuntimeError, TypeError, ValueError):  # the bindings raise on unreadable bytes
            cache = None
        if cache is not None and config.set_timing_cache(cache, False):
            return
        log.warning("the saved TensorRT timing cache cannot be used for %s; starting an empty one", model)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, False):
        raise BuildError(f"TensorRT refused an empty timing cache while building {model}")


@dataclass(frozen=True)
class EngineRecord:
    """Where an engine came from: the cache (built False) or a fresh build."""

    key: EngineKey
    path: Path
    plan: bytes
    built: bool
    seconds: float
    reason: str
    """Why it was built (the cache miss), or "cached"."""


def ensure_engine(trt: Any, spec: ModelSpec, settings: BuildSettings, platform: Platform,
                  cache: EngineCache, *, build_missing: bool = True, force: bool = False,
                  any_tuning: bool = False) -> EngineRecord:
    """The plan for this model and settings from the cache, built (under a lock) when missing.

    ``any_tuning``: accept the newest cached plan that differs only in workspace or optimisation
    level (what a runner wants); otherwise the exact settings (what `engines build` wants).
    """
    wanted = engine_key(spec, settings, platform)

    def lookup() -> tuple[EngineKey, Lookup]:
        return cache.find(wanted) if any_tuning else (wanted, cache.load(wanted))

    if not force:
        key, found = lookup()
        if found.hit:
            return EngineRecord(key, cache.plan_path(key), found.plan, False, 0.0, "cached")  # type: ignore[arg-type]
        if not build_missing:
            raise BackendUnavailable(f"no usable TensorRT engine for {spec.name} ({found.reason}); "
                                     f"run `appliance engines build`")
    with cache.lock(wanted):
        reason = "rebuild asked for"
        if not force:
            key, found = lookup()  # another process may have built it while we waited
            if found.hit:
                return EngineRecord(key, cache.plan_path(key), found.plan, False, 0.0, "cached")  # type: ignore[arg-type]
            reason = found.reason
        log.info("building TensorRT engine for %s (%s, batch <= %d) because: %s; this can take minutes",
                 spec.name, settings.precision, settings.max_batch, reason)
        timing_path = cache.timing_cache_path(platform.tensorrt_version, platform.gpu_name,
                                              platform.compute_capability)
        start = time.perf_counter()
        plan, timing = build_plan(trt, spec, settings, platform, cache.load_timing_cache(timing_path))
        seconds = time.perf_counter() - start
        path = cache.store(wanted, plan, build_seconds=seconds, extra={"model_version": spec.version})
        cache.save_timing_cache(timing_path, timing)
    return EngineRecord(wanted, path, plan, True, seconds, reason)


def _deserialize(runtime: Any, plan: bytes) -> Any:
    try:
        return runtime.deserialize_cuda_engine(plan)
    except (RuntimeError, TypeError, ValueError) as exc:  # some versions raise instead of returning None
        log.warning("TensorRT could not deserialize a plan: %s", _first_line(str(exc)))
        return None


def load_engine(trt: Any, runtime: Any, spec: ModelSpec, settings: BuildSettings, platform: Platform,
                cache: EngineCache, *, build_missing: bool = True, force: bool = False,
                any_tuning: bool = False) -> tuple[Any, EngineRecord]:
    """A deserialized engine. A cached plan that does not deserialize is a miss: discarded and
    rebuilt (never a crash); a freshly built one that does not is a BuildError."""
    record = ensure_engine(trt, spec, settings, platform, cache, build_missing=build_missing, force=force,
                           any_tuning=any_tuning)
    engine = _deserialize(runtime, record.plan)
    if engine is None and not record.built:
        cache.discard(record.key, "the cached plan does not deserialize with this TensorRT")
        if not build_missing:
            raise BackendUnavailable(f"the cached TensorRT engine for {spec.name} does not deserialize; "
                                     f"run `appliance engines build`")
        record = ensure_engine(trt, spec, settings, platform, cache, force=True)
        engine = _deserialize(runtime, record.plan)
    if engine is None:
        raise BuildError(f"TensorRT cannot deserialize the engine it just built for {spec.name}")
    return engine, record
