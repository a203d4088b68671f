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


AE_TITLE_MAX = 16
"""DICOM AE titles are at most 16 characters (PS3.5 VR AE)."""


def _check_ae_title(where: str, value: str) -> None:
    if not (0 < len(value.strip()) <= AE_TITLE_MAX) or "\\" in value or not value.isascii() \
            or not value.isprintable():
        raise ConfigError(f"`{where}` must be 1 to {AE_TITLE_MAX} printable ASCII characters "
                          f"without a backslash, got {value!r}")


@dataclass(frozen=True)
class DicomConfig:
    """The DICOM receiver (C-STORE SCP, `appliance serve`)."""

    ae_title: str = "APPLIANCE"
    """Our AE title; associations called to another title are rejected."""
    port: int = 11112
    """TCP port of the SCP (0: an ephemeral port, for tests)."""
    bind_address: str = ""
    """Address to listen on; empty means every interface."""
    allowed_calling_aets: tuple[str, ...] = ()
    """Calling AE titles accepted; empty accepts any. When set, any other title is rejected."""
    allowed_hosts: tuple[str, ...] = ()
    """Source IP addresses or networks (CIDR, e.g. 10.0.3.0/24) accepted; empty accepts any.
    When set, associations from any other address are rejected."""
    max_associations: int = 4
    """Concurrent associations; more are rejected as 'local limit exceeded' (transient)."""
    max_pdu: int = 65536
    """Largest PDU we receive, in bytes (0: unlimited)."""
    max_instance_mb: float = 256.0
    """Instances larger than this are refused with 'out of resources' (0xA701)."""
    min_free_mb: float = 512.0
    """Refuse instances with 'out of resources' (0xA700) when the spool's file system has less
    free space than this, so that the database and results can still be written."""
    network_timeout_s: float = 60.0
    """An idle association is aborted after this many seconds."""
    dimse_timeout_s: float = 60.0
    """Longest wait for the next DIMSE message within an association."""

    def __post_init__(self) -> None:
        _check_ae_title("dicom.ae_title", self.ae_title)
        for title in self.allowed_calling_aets:
            _check_ae_title("dicom.allowed_calling_aets", title)
        import ipaddress

        for host in self.allowed_hosts:
            try:
                ipaddress.ip_network(host.strip(), strict=False)
            except ValueError:
                raise ConfigError(f"`dicom.allowed_hosts` must hold IP addresses or networks, "
                                  f"got {host!r}") from None
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"`dicom.port` must be in 0..65535, got {self.port}")
        if self.max_associations < 1:
            raise ConfigError(f"`dicom.max_associations` must be >= 1, got {self.max_associations}")
        if self.max_pdu != 0 and not 4096 <= self.max_pdu <= 2**32 - 1:
            raise ConfigError(f"`dicom.max_pdu` must be 0 (unlimited) or 4096..2**32-1, "
                              f"got {self.max_pdu}")
        for name in ("max_instance_mb", "network_timeout_s", "dimse_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"`dicom.{name}` must be > 0, got {getattr(self, name)}")
        if self.min_free_mb < 0:
            raise ConfigError(f"`dicom.min_free_mb` must be >= 0, got {self.min_free_mb}")


@dataclass(frozen=True)
class DaemonConfig:
    """The daemon's supervisor, stabiliser and analysis workers (`appliance serve`)."""

    stable_seconds: float = 5.0
    """A series becomes a job when no instance of it has arrived for this long."""
    release_settle_s: float = 1.0
    """Or sooner: when the association that delivered its last instance was released and no
    instance came for this long after (scanners that open one association per image)."""
    workers: int = 1
    """Analysis worker processes (each loads the models once)."""
    max_attempts: int = 3
    """A job whose worker dies, hangs or fails unexpectedly is retried until it has run this
    many times; then it fails with the reason. Refused input (bad series) fails at once."""
    job_timeout_s: float = 900.0
    """A job running longer than this is taken as hung: its worker is killed and replaced."""
    heartbeat_s: float = 2.0
    """Period of the workers' heartbeat and of systemd's WATCHDOG=1; a worker silent for three
    periods is taken as frozen and replaced."""
    poll_s: float = 0.5
    """How often idle workers and the stabiliser look for work."""
    start_timeout_s: float = 120.0
    """Longest wait for the SCP to listen and for a worker to load and warm up its models."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM the running job may finish within this; after it, the job is requeued (not
    counted as an attempt) and its worker stopped."""
    retention_days: float = 30.0
    """Spool files and result files (masks, result.json) of series older than this are deleted
    (the database keeps the results); 0 keeps them forever."""
    max_disk_gb: float = 0.0
    """When spool plus results exceed this, the oldest finished series are deleted first;
    0 means no limit."""
    retention_check_s: float = 300.0
    """How often retention runs."""

    def __post_init__(self) -> None:
        for name in ("stable_seconds", "job_timeout_s", "heartbeat_s", "poll_s",
                     "start_timeout_s", "retention_check_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"`daemon.{name}` must be > 0, got {getattr(self, name)}")
        for name in ("release_settle_s", "shutdown_grace_s", "retention_days", "max_disk_gb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`daemon.{name}` must be >= 0, got {getattr(self, name)}")
        if self.workers < 1:
            raise ConfigError(f"`daemon.workers` must be >= 1, got {self.workers}")
        if self.max_attempts < 1:
            raise ConfigError(f"`daemon.max_attempts` must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True)
class SendConfig:
    """Sending each result's DICOM SEG, SR and key images to PACS (the outbox, `appliance send`)."""

    destinations: tuple[str, ...] = ()
    """Peers that receive every result, as AE@host:port (e.g. PACS@10.0.0.5:104); empty sends
    nothing. Our calling AE title is dicom.ae_title."""
    timeout_s: float = 30.0
    """Limit for connecting, negotiating and each C-STORE response."""
    retry_base_s: float = 30.0
    """Wait after the first failed attempt; each further failure multiplies it by retry_factor."""
    retry_factor: float = 2.0
    retry_max_s: float = 3600.0
    """Longest wait between attempts (a PACS down overnight is retried hourly)."""
    max_attempts: int = 50
    """A file still not delivered after this many attempts is marked failed (about two days with
    the default backoff); `appliance send` can send it again."""

    def __post_init__(self) -> None:
        from appliance.dicom.send import Destination

        for text in self.destinations:
            try:
                Destination.parse(text)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"`send.destinations` must hold AE@host:port entries, "
                                  f"got {text!r} ({exc})") from None
        if len(set(self.destinations)) != len(self.destinations):
            raise ConfigError(f"`send.destinations` lists a destination twice: {self.destinations}")
        for name in ("timeout_s", "retry_base_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"`send.{name}` must be > 0, got {getattr(self, name)}")
        if not self.retry_factor >= 1:
            raise ConfigError(f"`send.retry_factor` must be >= 1, got {self.retry_factor}")
        if not self.retry_max_s >= self.retry_base_s:
            raise ConfigError(f"`send.retry_max_s` must be >= send.retry_base_s "
                              f"({self.retry_base_s}), got {self.retry_max_s}")
        if self.max_attempts < 1:
            raise ConfigError(f"`send.max_attempts` must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True)
class DashboardConfig:
    """The technologist's terminal dashboard (`appliance dashboard`)."""

    refresh_s: float = 0.5
    """How often the dashboard polls the store for changes (one cheap query)."""
    alert_plo_pct: float = 25.0
    """Alert when a scan's whole-lung PLO is above this (25%: Pan et al.'s lobe score 3 band)."""
    alert_progress_pts: float = 5.0
    """Alert when whole-lung PLO rose by at least this many points since the previous scan."""

    def __post_init__(self) -> None:
        if not self.refresh_s > 0:
            raise ConfigError(f"`dashboard.refresh_s` must be > 0, got {self.refresh_s}")
        for name in ("alert_plo_pct", "alert_progress_pts"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"`dashboard.{name}` must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class Config:
    general: GeneralConfig = field(default_factory=GeneralConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    series: SeriesConfig = field(default_factory=SeriesConfig)
    qa: QAConfig = field(default_factory=QAConfig)
    serial: SerialConfig = field(default_factory=SerialConfig)
    dicom: DicomConfig = field(default_factory=DicomConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    send: SendConfig = field(default_factory=SendConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)


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
            if not (text_in or isinstance(value, int)):
                raise ValueError
            return int(value)
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
            if len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: any length, "" is empty
                items = [v for v in items if not isinstance(v, str) or v.strip()]
                args = (args[0],) * len(items)
            if len(items) != len(args):
                raise ValueError
            return tuple(_coerce(where, v.strip() if isinstance(v, str) else v, a)
                         for v, a in zip(items, args, strict=True))
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"`{where}` must be {getattr(typ, '__name__', typ)}, got {value!r}")


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
                text = "[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value) + "]"
            else:
                text = str(value)
            lines.append(f"{f.name} = {text}")
        lines.append("")
    return "\n".join(lines)
