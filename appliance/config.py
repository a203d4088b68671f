"""Typed configuration: defaults here, a TOML file over them, APPLIANCE_* environment over both.

Every key is a dataclass field with its default and a docstring-like comment; unknown sections or
keys are an error (a typo must not silently become a default). Environment overrides are named
``APPLIANCE_<SECTION>__<KEY>``, for example ``APPLIANCE_ANALYSIS__THREADS=4``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

DEFAULT_CONFIG_FILE = Path("/etc/appliance/appliance.toml")
ENV_PREFIX = "APPLIANCE_"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


@dataclass(frozen=True)
class GeneralConfig:
    state_dir: str = "/var/lib/appliance"
    """Database, spool, results and engine cache live here (systemd's StateDirectory)."""
    log_level: str = "INFO"
    """Python logging level name."""


@dataclass(frozen=True)
class AnalysisConfig:
    backend: str = "auto"
    """Inference backend: auto (TensorRT when it imports and a GPU answers, else ONNX Runtime),
    onnxruntime or tensorrt."""
    threads: int = 2
    """CPU threads for ONNX Runtime (intra-op) and for DICOM decoding."""
    batch_size: int = 1
    """Tiles per inference call (the last batch is padded to this size)."""
    models_dir: str = ""
    """Folder with manifest.json and the ONNX files; empty means the models shipped in the package."""
    precision: str = "fp32"
    """fp32 or fp16 (uses the fp16 ONNX variant)."""
    involvement_min_pct: float = 0.1
    """A region with PLO below this is 'not involved' (severity 0; serial change undefined)."""
    min_lung_ml: float = 400.0
    """A series whose classical lung volume is below this is refused as 'no lungs found'."""


@dataclass(frozen=True)
class SeriesConfig:
    min_slices: int = 20
    """Fewer usable slices than this: refused."""
    max_gap_factor: float = 1.5
    """A gap between slices larger than this times the median spacing means missing slices."""
    max_tilt_deg: float = 5.0
    """Gantry tilt above this is refused."""


@dataclass(frozen=True)
class QAConfig:
    lung_volume_ml: tuple[float, float] = (1500.0, 9500.0)
    """LUNG_VOLUME: whole lung outside this range (ml)."""
    lobe_min_pct: float = 3.0
    """LOBE_TINY: a lobe under this percentage of the lung volume, or absent."""
    right_fraction_pct: tuple[float, float] = (40.0, 70.0)
    """LR_IMBALANCE: right lung outside this percentage of the total."""
    min_confidence: float = 0.0
    """LOW_CONFIDENCE: mean top-class probability inside the lung under this; 0 means use the
    model's calibrated limit from the manifest."""
    classical_max_disagreement_pct: float = 15.0
    """CLASSICAL_DISAGREEMENT: |model lung - classical lung| beyond this percentage of the model
    lung, after allowing for the model's opacity volume (consolidation is missed by thresholds)."""
    motion_max_score: float = 0.35
    """MOTION: slice-to-slice lung-area jitter score above this."""


@dataclass(frozen=True)
class SerialConfig:
    progress_delta_pts: float = 2.0
    """Trend 'progressing' needs delta >= this (points) and change >= progress_change_pct."""
    progress_change_pct: float = 20.0
    improve_delta_pts: float = -2.0
    improve_change_pct: float = -20.0


@dataclass(frozen=True)
class Config:
    general: GeneralConfig = field(default_factory=GeneralConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    serial: SerialConfig = field(default_factory=SerialConfig)


def _suggest(name: str, valid: list[str]) -> str:
    near = difflib.get_close_matches(name, valid, n=1)
    return f" (did you mean '{near[0]}'?)" if near else f" (valid: {', '.join(valid)})"


def _coerce(where: str, value: Any, typ: Any) -> Any:
    """Convert a TOML or environment value to the field's type, or raise ConfigError."""
    text_in = isinstance(value, str)
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if text_in and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
            raise ValueError
        if typ is int:
            if isinstance(value, bool):
                raise ValueError
            return int(value) if text_in or isinstance(value, int) else _fail()
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str:
            if not isinstance(value, str):
                raise ValueError
            return value
        if getattr(typ, "__origin__", None) is tuple:
            items = value.split(",") if text_in else list(value)
            args = typ.__args__
            if len(items) != len(args):
                raise ValueError
            return tuple(_coerce(where, v.strip() if isinstance(v, str) else v, a)
                         for v, a in zip(items, args, strict=True))
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"`{where}` must be {getattr(typ, '__name__', typ)}, got {value!r}")


def _fail() -> Any:
    raise ValueError


def _build(section_cls: type, values: dict[str, Any], section: str) -> Any:
    hints = get_type_hints(section_cls)
    names = [f.name for f in dataclasses.fields(section_cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(f"unknown key `{section}.{key}`{_suggest(key, names)}")
        kwargs[key] = _coerce(f"{section}.{key}", value, hints[key])
    return section_cls(**kwargs)


def load_config(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> Config:
    """Defaults, then the TOML file (when given, or the system file when it exists), then the
    environment. Raises ConfigError with a one-line reason on any problem."""
    env = dict(os.environ if env is None else env)
    data: dict[str, dict[str, Any]] = {}
    file = Path(path) if path is not None else (DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.exists() else None)
    if file is not None:
        try:
            with open(file, "rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for name, value in data.items():
        if name not in sections:
            raise ConfigError(f"unknown section `[{name}]`{_suggest(name, list(sections))}")
        if not isinstance(value, dict):
            raise ConfigError(f"`{name}` must be a table, got {value!r}")
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX) or "__" not in key[len(ENV_PREFIX):]:
            continue
        section, _, sub = key[len(ENV_PREFIX):].lower().partition("__")
        if section not in sections:
            raise ConfigError(f"unknown section in {key}{_suggest(section, list(sections))}")
        data.setdefault(section, {})[sub] = value
    built = {}
    hints = get_type_hints(Config)
    for name in sections:
        built[name] = _build(hints[name], data.get(name, {}), name)
    config = Config(**built)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    a = config.analysis
    if a.backend not in ("auto", "onnxruntime", "tensorrt"):
        raise ConfigError(
            f"`analysis.backend` must be one of auto, onnxruntime, tensorrt, got {a.backend!r}"
            + _suggest(a.backend, ["auto", "onnxruntime", "tensorrt"])
        )
    if a.precision not in ("fp32", "fp16"):
        raise ConfigError(f"`analysis.precision` must be fp32 or fp16, got {a.precision!r}")
    if a.threads < 1 or a.batch_size < 1:
        raise ConfigError("`analysis.threads` and `analysis.batch_size` must be >= 1")
    lo, hi = config.qa.lung_volume_ml
    if not 0 <= lo < hi:
        raise ConfigError(f"`qa.lung_volume_ml` must be an increasing pair, got {(lo, hi)}")


def describe_defaults() -> str:
    """The default configuration as TOML with each key's documentation (for `appliance config`)."""
    import ast
    import inspect

    lines: list[str] = []
    for sec in dataclasses.fields(Config):
        cls = get_type_hints(Config)[sec.name]
        docs: dict[str, str] = {}
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[attr-defined]
        lines.append(f"[{sec.name}]")
        for f in dataclasses.fields(cls):
            if f.name in docs:
                lines.append(f"# {docs[f.name]}")
            value = f.default
            if isinstance(value, str):
                text = f'"{value}"'
            elif isinstance(value, bool):
                text = str(value).lower()
            elif isinstance(value, tuple):
                text = "[" + ", ".join(str(v) for v in value) + "]"
            else:
                text = str(value)
            lines.append(f"{f.name} = {text}")
        lines.append("")
    return "\n".join(lines)
