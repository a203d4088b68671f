"""The engine cache: TensorRT plans and the timing cache under `<state_dir>/engines/`.

A plan is only valid for the ONNX file, TensorRT version, GPU (name and compute capability),
driver and build settings it was built with, so all of those form its key (:class:`EngineKey`);
the file name carries a digest of the key. Each plan has a JSON sidecar with the full key, the
plan's sha256 and how it was built. A lookup returns the plan bytes or says why not (missing,
built for something else, corrupt); the caller builds on any miss. Writes are atomic (temporary
file, fsync, rename; the sidecar last), and a per-key lock file keeps two processes from
building the same engine at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
"""Version of the sidecar layout; a sidecar of another format is a miss."""
ENV_STATE_DIR = "APPLIANCE_GENERAL__STATE_DIR"


def default_engine_dir(state_dir: str | os.PathLike | None = None) -> Path:
    """`<state_dir>/engines`; without a state dir, the config's (environment override, else default)."""
    if state_dir is None:
        from appliance.config import GeneralConfig

        state_dir = os.environ.get(ENV_STATE_DIR) or GeneralConfig().state_dir
    return Path(state_dir) / "engines"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "unknown"


@dataclass(frozen=True)
class EngineKey:
    """Everything a plan depends on. Two keys are equal only if the plan can be reused."""

    model: str
    precision: str
    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    driver: str
    input_name: str
    tile_shape: tuple[int, int, int]
    max_batch: int
    workspace_gb: float
    opt_level: int
    strongly_typed: bool
    fp16_flag: bool

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tile_shape"] = list(self.tile_shape)
        return d

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EngineKey:
        values = dict(raw)
        values["tile_shape"] = tuple(int(v) for v in values["tile_shape"])
        return cls(**values)

    TUNING_FIELDS = ("workspace_gb", "opt_level")
    """Fields that change how fast a plan is, not what it computes or where it runs."""

    def identity(self) -> dict[str, Any]:
        """The key without the tuning fields: plans with equal identities are interchangeable."""
        return {k: v for k, v in self.as_dict().items() if k not in self.TUNING_FIELDS}

    @property
    def digest(self) -> str:
        blob = json.dumps(self.as_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    @property
    def stem(self) -> str:
        """File name stem: readable prefix plus the key digest (unique per key)."""
        return f"{_slug(self.model)}-{self.precision}-{self.digest[:16]}"


@dataclass(frozen=True)
class Lookup:
    """A cache lookup: the plan on a hit, else why it missed (one line)."""

    plan: bytes | None
    reason: str

    @property
    def hit(self) -> bool:
        return self.plan is not None


@dataclass(frozen=True)
class CacheEntry:
    """One sidecar found on disk (for `engines list`)."""

    stem: str
    plan_path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    """None when the sidecar is readable and its plan exists with the recorded size."""

    @property
    def key(self) -> EngineKey | None:
        try:
            return EngineKey.from_dict(self.meta["key"])
        except (KeyError, TypeError, ValueError):
            return None


def _write_atomic(path: Path, data: bytes) -> None:
    """Temporary name in the same folder, fsync, rename over, fsync the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class EngineCache:
    """Plans, their sidecars, the timing caches and the build locks in one folder."""

    def __init__(self, root: str | os.PathLike) -> None:
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"`root` must be a path, got {type(root).__name__}")
        self.root = Path(root)

    def plan_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.stem}.plan"

    def meta_path(self, key: EngineKey) -> Path:
        return self.root / f"{key.stem}.json"

    def _ensure_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o750)

    # ---------------------------------------------------------------- plans

    def load(self, key: EngineKey) -> Lookup:
        """The plan for ``key`` if it is there, complete and unchanged; else why not."""
        meta_path, plan_path = self.meta_path(key), self.plan_path(key)
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            return Lookup(None, "no cached engine")
        except (OSError, json.JSONDecodeError) as exc:
            return Lookup(None, f"unreadable sidecar {meta_path.name} ({exc})")
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            return Lookup(None, f"sidecar {meta_path.name} has another format")
        if meta.get("key") != key.as_dict():
            return Lookup(None, f"sidecar {meta_path.name} describes another build")
        try:
            plan = plan_path.read_bytes()
        except FileNotFoundError:
            return Lookup(None, f"plan {plan_path.name} is missing")
        if len(plan) != meta.get("plan_bytes") or hashlib.sha256(plan).hexdigest() != meta.get("plan_sha256"):
            return Lookup(None, f"plan {plan_path.name} is corrupt (size or sha256 differs from its sidecar)")
        return Lookup(plan, "cached")

    def find(self, key: EngineKey) -> tuple[EngineKey, Lookup]:
        """The newest usable plan whose key has the same identity as ``key`` (any workspace or
        optimisation level), so a runner with default settings uses what `engines build` built
        with others; ``key`` itself with the reason when there is none."""
        candidates = []
        for entry in self.entries():
            other = entry.key
            if entry.problem is None and other is not None and other.identity() == key.identity():
                candidates.append((entry.meta.get("built_unix", 0.0), other != key, other))
        for _when, _other, other in sorted(candidates, key=lambda c: (-c[0], c[1])):
            found = self.load(other)
            if found.hit:
                return other, found
        return key, self.load(key)

    def store(self, key: EngineKey, plan: bytes, *, build_seconds: float, extra: dict[str, Any] | None = None) -> Path:
        """Write the plan, then its sidecar (so a crash in between leaves a miss, not a bad hit)."""
        if not isinstance(plan, (bytes, bytearray)) or not plan:
            raise ValueError(f"`plan` must be non-empty bytes, got {type(plan).__name__}")
        self._ensure_root()
        path = self.plan_path(key)
        _write_atomic(path, bytes(plan))
        meta = {
            "format": CACHE_FORMAT,
            "key": key.as_dict(),
            "plan_file": path.name,
            "plan_bytes": len(plan),
            "plan_sha256": hashlib.sha256(plan).hexdigest(),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "built_unix": time.time(),
            "build_seconds": round(float(build_seconds), 3),
            **(extra or {}),
        }
        _write_atomic(self.meta_path(key), json.dumps(meta, indent=1).encode())
        return path

    def discard(self, key: EngineKey, reason: str) -> None:
        """Remove a plan that cannot be used (it is rebuilt on the next lookup)."""
        log.warning("discarding cached TensorRT engine %s: %s", key.stem, reason)
        for path in (self.meta_path(key), self.plan_path(key)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def entries(self) -> list[CacheEntry]:
        """Every sidecar in the folder, sorted by name, with any problem found."""
        if not self.root.is_dir():
            return []
        found = []
        for meta_path in sorted(self.root.glob("*.json")):
            stem = meta_path.stem
            plan_path = self.root / f"{stem}.plan"
            try:
                meta = json.loads(meta_path.read_text())
                if not isinstance(meta, dict):
                    raise ValueError("not an object")
            except (OSError, ValueError) as exc:
                found.append(CacheEntry(stem, plan_path, {}, f"unreadable sidecar ({exc})"))
                continue
            problem = None
            if meta.get("format") != CACHE_FORMAT:
                problem = "sidecar of another format"
            elif not plan_path.exists():
                problem = "plan missing"
            elif plan_path.stat().st_size != meta.get("plan_bytes"):
                problem = "plan size differs from its sidecar"
            found.append(CacheEntry(stem, plan_path, meta, problem))
        return found

    # ---------------------------------------------------------------- timing cache

    def timing_cache_path(self, tensorrt_version: str, gpu_name: str, compute_capability: str) -> Path:
        """One timing cache per TensorRT version and GPU (TensorRT checks it matches, too)."""
        return self.root / f"timing-{_slug(tensorrt_version)}-{_slug(gpu_name)}-sm{_slug(compute_capability)}.cache"

    def load_timing_cache(self, path: Path) -> bytes:
        """The saved timing cache, or b"" (an empty one) when there is none."""
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return b""

    def save_timing_cache(self, path: Path, data: bytes) -> None:
        if data:
            self._ensure_root()
            _write_atomic(path, bytes(data))

    # ---------------------------------------------------------------- locking

    @contextlib.contextmanager
    def lock(self, key: EngineKey) -> Iterator[None]:
        """Exclusive per-key lock across processes (the daemon's workers, the boot-time unit)."""
        self._ensure_root()
        with open(self.root / f".{key.stem}.lock", "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
