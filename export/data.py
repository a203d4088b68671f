"""Training samples generated on the fly: phantom (or real) sources and their augmentation.

Work is split so the expensive part runs once per source and the cheap part once per sample:

* A *chunk* (``make_chunk``, run in a DataLoader worker) is one source volume at the stage's
  spacing (a synthetic phantom, or the preprocessed real scan) together with the parameters of
  ``crops_per_source`` augmented samples drawn from it. It depends only on (seed, chunk index),
  so the stream is the same whatever the number of workers, and a run can resume mid-stream.
* ``augment`` (run by the trainer on its device, GPU or CPU) turns a source + parameters into one
  (image, target) tile: a single resampling that does the crop, scale (spacing change), rotation
  and mild elastic deformation, then resolution loss (slice thickness, coarser spacing), blur,
  HU scale/shift, noise and the stage's intensity normalisation.

Orientation: arrays are canonical (axis 2 increases towards the patient's left). The lobe stage
is never mirrored on any axis; only the opacity stage may flip axis 2 (`StageSpec.allow_flip`).

Seeds: training phantoms use seeds below ``VALIDATION_SEED_BASE``; seeds at or above it are
reserved for validation and evaluation and refused for training.
"""

from __future__ import annotations

import functools
import math
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

VALIDATION_SEED_BASE = 1_000_000
"""Phantom seeds >= this are never used for training (validation and evaluation only)."""
SEVERITIES = ("none", "mild", "moderate", "severe", "critical")
AIR_HU = -1024.0
NODULE_COUNT = (2, 8)
"""Nodules per source given them (`DataConfig.nodule_fraction`)."""
NODULE_CENTRE_FRACTION = 0.35
"""Share of such a source's crops centred on a nodule voxel."""
KIND_FULL = 0
"""The target holds every class of the stage."""
KIND_LUNG_ONLY = 1
"""The target is a lung mask only (real scan with its classical mask): lung-vs-rest loss only."""
REAL_DIR = Path(__file__).resolve().parent.parent / "out" / "real"
REAL_CASE = "normal002"
"""The only real scan used for training (covid-ct-md normal-normal002)."""
FORBIDDEN_REAL = ("normal-normal001", "covid-P001", "cap-cap001", "normal001", "P001", "cap001")
"""Real scans reserved for evaluation: never a training source."""


@dataclass(frozen=True)
class StageSpec:
    """What a stage's model sees: the manifest's fixed decisions plus how its data are drawn."""

    name: str
    classes: tuple[str, ...]
    spacing_mm: tuple[float, float, float]
    tile_shape: tuple[int, int, int]
    hu_min: float
    hu_max: float
    overlap: float = 0.25
    allow_flip: bool = False
    """Mirror axis 2 (left-right) in augmentation; never for lobes (laterality is the label)."""
    synth_shape: tuple[int, int, int] | None = None
    """Phantom shape to synthesise; None means the tile shape (the phantom centres the chest)."""
    severity_weights: tuple[float, ...] = (0.2, 0.2, 0.2, 0.2, 0.2)
    """Sampling weights over SEVERITIES for training phantoms."""
    lesion_centre_fraction: float = 0.0
    """Fraction of tiles centred on a lesion voxel (when the source has any)."""

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def normalize(self, hu: torch.Tensor) -> torch.Tensor:
        """HU -> [0, 1] exactly as the runtime does it (air and padding are 0)."""
        return (hu.clamp(self.hu_min, self.hu_max) - self.hu_min) / (self.hu_max - self.hu_min)

    def manifest_fields(self) -> dict[str, Any]:
        return {
            "classes": list(self.classes),
            "spacing_mm": list(self.spacing_mm),
            "tile_shape": list(self.tile_shape),
            "overlap": self.overlap,
            "normalization": {"hu_min": self.hu_min, "hu_max": self.hu_max},
        }


STAGES: dict[str, StageSpec] = {
    "lobes": StageSpec(
        name="lobes",
        classes=("background", "RUL", "RML", "RLL", "LUL", "LLL"),
        # One tile holds the whole chest (320 x 400 x 400 mm), so every voxel sees the
        # mediastinum, diaphragm and apices that tell the lobes apart; trained on full tiles.
        spacing_mm=(5.0, 5.0, 5.0),
        tile_shape=(64, 80, 80),
        hu_min=-1024.0,
        hu_max=600.0,
        allow_flip=False,
        synth_shape=None,
        severity_weights=(0.2, 0.2, 0.2, 0.2, 0.2),
    ),
    "opacity": StageSpec(
        name="opacity",
        classes=("none", "ggo", "consolidation"),
        spacing_mm=(2.0, 1.5, 1.5),
        tile_shape=(64, 128, 128),
        hu_min=-1024.0,
        hu_max=400.0,
        allow_flip=True,
        synth_shape=(176, 240, 240),
        # "mild" has no CT findings in the phantom's disease model (like "none").
        severity_weights=(0.1, 0.05, 0.3, 0.3, 0.25),
        lesion_centre_fraction=0.7,
    ),
}


def stage_spec(name: str) -> StageSpec:
    if name not in STAGES:
        raise ValueError(f"`stage` must be one of {sorted(STAGES)}, got {name!r}")
    return STAGES[name]


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random augmentation (all mild: the phantom already varies anatomy)."""

    scale: tuple[float, float] = (0.85, 1.18)
    """Isotropic zoom of the field of view (a spacing change); log-uniform."""
    anisotropy: float = 0.06
    """Extra per-axis scale jitter (relative)."""
    rotate_deg: tuple[float, float, float] = (10.0, 5.0, 5.0)
    """Max rotation about axis 0 (in-plane), 1 and 2."""
    elastic_p: float = 0.5
    elastic_mm: float = 4.0
    """Std of the coarse (4^3 control points) displacement field."""
    lowres_p: float = 0.2
    lowres_factor: tuple[float, float] = (1.2, 1.8)
    thick_p: float = 0.3
    thick_mm: tuple[float, float] = (2.5, 6.0)
    blur_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.3, 1.0)
    hu_scale: tuple[float, float] = (0.93, 1.07)
    hu_shift: tuple[float, float] = (-30.0, 30.0)
    noise_p: float = 0.7
    noise_sd: tuple[float, float] = (5.0, 45.0)
    flip_p: float = 0.5
    """Used only by stages with `allow_flip`."""
    centre_jitter: float = 0.25
    """Tile-centre jitter as a fraction of the tile extent."""


@dataclass(frozen=True)
class DataConfig:
    """How chunks are drawn for one training run (picklable: workers receive a copy)."""

    stage: str
    seed: int = 0
    crops_per_source: int = 4
    """Augmented samples taken from each generated source (phantoms are the costly part)."""
    real_fraction: float = 0.0
    """Fraction of chunks drawn from the real scan (when its npz exists)."""
    real_dir: str = str(REAL_DIR)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synth_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for synthesize (e.g. a smaller shape for tests)."""
    severity_weights: tuple[float, ...] | None = None
    """Sampling weights over SEVERITIES; None means the stage's default."""
    nodule_fraction: float = 0.0
    """Opacity stage: fraction of sources given small ground-glass nodules (appliance.lesions.add_nodules)."""

    def __post_init__(self) -> None:
        stage_spec(self.stage)
        if self.severity_weights is not None and (
                len(self.severity_weights) != len(SEVERITIES) or min(self.severity_weights) < 0
                or sum(self.severity_weights) <= 0):
            raise ValueError(f"`severity_weights` must be {len(SEVERITIES)} non-negative weights "
                             f"({', '.join(SEVERITIES)}) with a positive sum, got {self.severity_weights}")
        if self.crops_per_source < 1:
            raise ValueError(f"`crops_per_source` must be >= 1, got {self.crops_per_source}")
        if not 0.0 <= self.real_fraction <= 1.0:
            raise ValueError(f"`real_fraction` must be in [0, 1], got {self.real_fraction}")
        if not 0.0 <= self.nodule_fraction <= 1.0:
            raise ValueError(f"`nodule_fraction` must be in [0, 1], got {self.nodule_fraction}")


# --------------------------------------------------------------------------------------------
# Sources (run in workers)


def check_training_seed(seed: int) -> int:
    """Refuse seeds reserved for validation/evaluation."""
    if not 0 <= int(seed) < VALIDATION_SEED_BASE:
        raise ValueError(f"`seed` must be in [0, {VALIDATION_SEED_BASE}) for training, got {seed}")
    return int(seed)


def _default_synthesize() -> Callable[..., Any]:
    from appliance.phantom import synthesize  # lazy: the generator is optional for the runtime

    return synthesize


def _default_insert_lesions() -> Callable[..., Any] | None:
    try:
        from appliance.lesions import insert_lesions
    except ImportError:
        return None
    return insert_lesions


@functools.lru_cache(maxsize=4)
def load_real(real_dir: str, stage: str) -> dict[str, np.ndarray] | None:
    """The preprocessed real scan at the stage spacing (from prepare_real), or None if absent."""
    path = Path(real_dir) / f"{REAL_CASE}_{stage}.npz"
    if not path.exists():
        return None
    with np.load(path) as z:
        out = {k: z[k] for k in z.files}
    if str(out.get("case", REAL_CASE)) in FORBIDDEN_REAL:
        raise ValueError(f"`{path}` holds an evaluation-only scan: never train on it")
    return out


@dataclass
class Source:
    """One volume at the stage spacing with its target (canonical orientation)."""

    hu: np.ndarray
    """int16 HU."""
    label: np.ndarray
    """uint8 target (stage classes, or a 0/1 lung mask for KIND_LUNG_ONLY)."""
    lung: np.ndarray | None
    """bool lung mask (tile centres are drawn from it; dropped before leaving the worker)."""
    spacing: tuple[float, float, float]
    kind: int
    origin: str
    """Where it came from, for logs: 'phantom:<seed>:<severity>' or 'real:<case>'."""


def phantom_source(spec: StageSpec, seed: int, severity: str, synthesize: Callable[..., Any],
                   synth_kwargs: dict[str, Any] | None = None, *, rng: np.random.Generator | None
                   = None) -> Source:
    """Synthesise one phantom directly at the stage spacing and derive the stage's target."""
    kwargs: dict[str, Any] = {"spacing": spec.spacing_mm,
                              "shape": spec.synth_shape or spec.tile_shape}
    if rng is not None:
        # Variation the generator models physically: slice thickness, breathing motion.
        if rng.random() < 0.3:
            kwargs["thickness"] = float(rng.uniform(spec.spacing_mm[0], 2.5 * spec.spacing_mm[0]))
        if rng.random() < 0.1:
            kwargs["motion"] = True
        if rng.random() < 0.5:  # later scans of the course: lesions grow, consolidate, resolve
            kwargs["day"] = int(rng.integers(1, 28))
    kwargs.update(synth_kwargs or {})
    ph = synthesize(seed, severity, **kwargs)
    lobes = np.asarray(ph.lobes, dtype=np.uint8)
    lung = lobes > 0
    if spec.name == "lobes":
        label = lobes
    else:
        label = np.where(lung, np.asarray(ph.opacity, dtype=np.uint8), 0).astype(np.uint8)
    return Source(np.asarray(ph.hu, dtype=np.int16), label, lung,
                  tuple(float(s) for s in ph.spacing), KIND_FULL,  # type: ignore[arg-type]
                  f"phantom:{seed}:{severity}")


def real_source(spec: StageSpec, real: dict[str, np.ndarray], *, seed: int, severity: str,
                insert_lesions: Callable[..., Any] | None, day: int = 0) -> Source:
    """The real scan: lung-only target for lobes; inserted lesions (exact masks) for opacity."""
    hu = real["hu"].astype(np.int16)
    lung = real["lung"].astype(bool)
    spacing = tuple(float(s) for s in real["spacing"])
    case = str(real.get("case", REAL_CASE))
    if spec.name == "lobes":
        return Source(hu, lung.astype(np.uint8), lung, spacing, KIND_LUNG_ONLY,  # type: ignore[arg-type]
                      f"real:{case}")
    if insert_lesions is None or severity == "none":
        return Source(hu, np.zeros(hu.shape, np.uint8), lung, spacing, KIND_FULL,  # type: ignore[arg-type]
                      f"real:{case}:none")
    new_hu, labels = insert_lesions(hu, lung, spacing, seed=seed, severity=severity, lobes=None,
                                    day=day)
    label = np.where(lung, np.asarray(labels, dtype=np.uint8), 0).astype(np.uint8)
    return Source(np.asarray(new_hu, dtype=np.int16), label, lung, spacing, KIND_FULL,  # type: ignore[arg-type]
                  f"real:{case}:{severity}")


# --------------------------------------------------------------------------------------------
# Augmentation parameters (drawn in workers, applied by `augment`)


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation matrix in (axis0, axis1, axis2) coordinates from angles about each axis."""
    a, b, c = angles_rad
    r0 = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    r1 = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    r2 = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return r0 @ r1 @ r2


def sample_params(rng: np.random.Generator, spec: StageSpec, centre: np.ndarray,
                  aug: AugmentConfig | None) -> dict[str, Any]:
    """Parameters of one sample. `centre` is the tile centre in source voxel coordinates.

    `matrix` maps an output offset (mm) to a source offset (mm). It never mirrors axis 2 unless
    the stage allows flips; for the lobe stage its determinant is always positive.
    """
    params: dict[str, Any] = {
        "centre": np.asarray(centre, dtype=np.float64),
        "matrix": np.eye(3),
        "elastic": None,
        "lowres": 1.0,
        "thick_sigma": 0.0,
        "blur_sigma": 0.0,
        "hu_scale": 1.0,
        "hu_shift": 0.0,
        "noise_sd": 0.0,
        "noise_seed": int(rng.integers(0, 2**31 - 1)),
        "flip": False,
    }
    if aug is None:
        return params
    extent = np.asarray(spec.tile_shape) * np.asarray(spec.spacing_mm)
    jitter = rng.uniform(-1, 1, 3) * aug.centre_jitter * extent / np.asarray(spec.spacing_mm)
    params["centre"] = params["centre"] + jitter
    scale = math.exp(rng.uniform(math.log(aug.scale[0]), math.log(aug.scale[1])))
    scales = scale * (1.0 + rng.uniform(-aug.anisotropy, aug.anisotropy, 3))
    angles = np.deg2rad(rng.uniform(-1, 1, 3) * np.asarray(aug.rotate_deg))
    matrix = _rotation(angles) @ np.diag(scales)
    if spec.allow_flip and rng.random() < aug.flip_p:
        matrix = matrix @ np.diag([1.0, 1.0, -1.0])
        params["flip"] = True
    params["matrix"] = matrix
    if rng.random() < aug.elastic_p:
        params["elastic"] = rng.normal(0.0, aug.elastic_mm, (3, 4, 4, 4)).astype(np.float32)
    if rng.random() < aug.lowres_p:
        params["lowres"] = float(rng.uniform(*aug.lowres_factor))
    if rng.random() < aug.thick_p:
        thick = float(rng.uniform(*aug.thick_mm))
        s0 = spec.spacing_mm[0]
        # A box profile of width `thick` has variance thick^2/12; subtract what the grid has.
        params["thick_sigma"] = math.sqrt(max(thick**2 - s0**2, 0.0) / 12.0) / s0
    if rng.random() < aug.blur_p:
        params["blur_sigma"] = float(rng.uniform(*aug.blur_sigma))
    params["hu_scale"] = float(rng.uniform(*aug.hu_scale))
    params["hu_shift"] = float(rng.uniform(*aug.hu_shift))
    if rng.random() < aug.noise_p:
        params["noise_sd"] = float(rng.uniform(*aug.noise_sd))
    return params


def _pick_centres(rng: np.random.Generator, source: Source, spec: StageSpec, n: int) -> np.ndarray:
    """Tile centres (voxel coordinates): lobes at the volume centre; opacity biased to lesions
    (``lesion_centre_fraction``), else to lung voxels, else anywhere in the lung box."""
    shape = np.asarray(source.hu.shape, dtype=np.float64)
    if spec.name == "lobes":
        return np.repeat(((shape - 1) / 2)[None], n, axis=0)
    assert source.lung is not None
    lesion = np.flatnonzero(source.label.ravel()) if source.kind == KIND_FULL else np.empty(0, int)
    lung = np.flatnonzero(source.lung.ravel())
    centres = []
    for _ in range(n):
        u = rng.random()
        if lesion.size and u < spec.lesion_centre_fraction:
            flat = lesion[rng.integers(lesion.size)]
        elif lung.size and u < 0.95:
            flat = lung[rng.integers(lung.size)]
        else:
            flat = None
        if flat is None:
            if lung.size:
                idx = np.unravel_index(lung, source.lung.shape)
                lo = np.array([i.min() for i in idx])
                hi = np.array([i.max() for i in idx])
            else:
                lo, hi = np.zeros(3), shape - 1
            centres.append(rng.uniform(lo, hi))
        else:
            centres.append(np.array(np.unravel_index(flat, source.hu.shape), dtype=np.float64))
    return np.asarray(centres)


def _derive_seed(seed: int, index: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), int(salt)])


def make_chunk(cfg: DataConfig, index: int, *, synthesize: Callable[..., Any] | None = None,
               insert_lesions: Callable[..., Any] | None = None) -> dict[str, Any]:
    """Training chunk `index`: one source + `crops_per_source` sample parameters (deterministic)."""
    spec = stage_spec(cfg.stage)
    rng = _derive_seed(cfg.seed, index, 1)
    weights = np.asarray(cfg.severity_weights or spec.severity_weights, dtype=np.float64)
    severity = str(rng.choice(SEVERITIES, p=weights / weights.sum()))
    phantom_seed = check_training_seed(int(rng.integers(0, VALIDATION_SEED_BASE)))
    real = load_real(cfg.real_dir, cfg.stage) if cfg.real_fraction > 0 else None
    if real is not None and rng.random() < cfg.real_fraction:
        day = int(rng.integers(1, 28)) if rng.random() < 0.5 else 0
        source = real_source(spec, real, seed=phantom_seed, severity=severity,
                             insert_lesions=insert_lesions or _default_insert_lesions(), day=day)
    else:
        synth = synthesize or _default_synthesize()
        source = phantom_source(spec, phantom_seed, severity, synth, cfg.synth_kwargs, rng=rng)
    nodules = np.empty(0, np.int64)
    if spec.name == "opacity" and source.kind == KIND_FULL and cfg.nodule_fraction > 0:
        nodule_rng = _derive_seed(cfg.seed, index, 3)  # its own stream: the rest stays as it was
        if nodule_rng.random() < cfg.nodule_fraction:
            from appliance.lesions import add_nodules  # lazy, like the generator

            assert source.lung is not None
            ids = np.zeros(source.hu.shape, np.uint16)
            add_nodules(nodule_rng, source.hu, source.label, source.lung, source.spacing,
                        count=NODULE_COUNT, ids=ids)
            nodules = np.flatnonzero(ids)
            source.origin += ":nodules"
    centres = _pick_centres(rng, source, spec, cfg.crops_per_source)
    if nodules.size:
        # a few hundred voxels among the lesions' hundreds of thousands: aim some crops at them
        for i in range(len(centres)):
            if nodule_rng.random() < NODULE_CENTRE_FRACTION:
                centres[i] = np.unravel_index(nodules[nodule_rng.integers(nodules.size)], source.hu.shape)
    params = [sample_params(rng, spec, c, cfg.augment) for c in centres]
    source.lung = None
    return {"source": source, "params": params, "index": index}


def validation_chunk(stage: str, k: int, *, synthesize: Callable[..., Any] | None = None,
                     synth_kwargs: dict[str, Any] | None = None, tiles: int = 2) -> dict[str, Any]:
    """Held-out chunk k: phantom seed VALIDATION_SEED_BASE + k, severities in turn, no
    augmentation."""
    spec = stage_spec(stage)
    seed = VALIDATION_SEED_BASE + int(k)
    severity = SEVERITIES[k % len(SEVERITIES)] if stage == "lobes" else SEVERITIES[1 + k % 4]
    synth = synthesize or _default_synthesize()
    source = phantom_source(spec, seed, severity, synth, synth_kwargs)
    rng = _derive_seed(seed, k, 2)
    n = 1 if stage == "lobes" else tiles
    centres = _pick_centres(rng, source, spec, n)
    source.lung = None
    return {"source": source, "params": [sample_params(rng, spec, c, None) for c in centres],
            "index": -1 - k}


class ChunkDataset(torch.utils.data.Dataset):
    """Map-style dataset over chunk indices (the sampler decides where the stream starts)."""

    def __init__(self, cfg: DataConfig, synthesize: Callable[..., Any] | None = None,
                 insert_lesions: Callable[..., Any] | None = None) -> None:
        self.cfg = cfg
        self.synthesize = synthesize
        self.insert_lesions = insert_lesions

    def __len__(self) -> int:  # the stream is unbounded; DataLoader only needs a number
        return 2**62

    def __getitem__(self, index: int) -> dict[str, Any]:
        return make_chunk(self.cfg, index, synthesize=self.synthesize,
                          insert_lesions=self.insert_lesions)


class ValidationDataset(torch.utils.data.Dataset):
    def __init__(self, stage: str, n: int, synthesize: Callable[..., Any] | None = None,
                 synth_kwargs: dict[str, Any] | None = None) -> None:
        self.stage, self.n, self.synthesize, self.synth_kwargs = stage, n, synthesize, synth_kwargs

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int) -> dict[str, Any]:
        return validation_chunk(self.stage, k, synthesize=self.synthesize,
                                synth_kwargs=self.synth_kwargs)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    # A stop signal sent to the whole process group (Ctrl-C, `kill -- -PGID`, systemd) is the
    # trainer's to handle: it saves and then shuts its workers down itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def chunk_loader(dataset: torch.utils.data.Dataset, start: int, workers: int,
                 prefetch: int = 2) -> Iterator[dict[str, Any]]:
    """Chunks start, start+1, ... in order, generated by `workers` processes (0: in-process)."""

    class _From(torch.utils.data.Sampler[int]):
        def __iter__(self) -> Iterator[int]:
            i = start
            while True:
                yield i
                i += 1

    kwargs: dict[str, Any] = {}
    if workers > 0:
        kwargs = {"prefetch_factor": prefetch, "persistent_workers": False,
                  "worker_init_fn": _worker_init}
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=_From(),
                                         num_workers=workers, collate_fn=identity, **kwargs)
    return iter(loader)


def identity(x: Any) -> Any:
    return x


def sample_stream(chunks: Iterator[dict[str, Any]], cfg: DataConfig, start_sample: int,
                  group: int) -> Iterator[tuple[Source, dict[str, Any]]]:
    """(source, params) pairs: each group of `group` chunks is shuffled deterministically, so a
    batch mixes sources; `start_sample` skips what a resumed run already consumed. `chunks` must
    start at chunk (start_sample // (group * crops_per_source)) * group."""
    per_group = group * cfg.crops_per_source
    g = start_sample // per_group
    skip = start_sample % per_group
    while True:
        members = [next(chunks) for _ in range(group)]
        pairs = [(c["source"], p) for c in members for p in c["params"]]
        order = _derive_seed(cfg.seed, g, 3).permutation(len(pairs))
        for j in order[skip:]:
            yield pairs[j]
        skip = 0
        g += 1


def first_chunk(cfg: DataConfig, start_sample: int, group: int) -> int:
    return (start_sample // (group * cfg.crops_per_source)) * group


# --------------------------------------------------------------------------------------------
# Augmentation on the training device


@functools.lru_cache(maxsize=8)
def _offsets(shape: tuple[int, int, int], spacing: tuple[float, float, float],
             device: str) -> torch.Tensor:
    """Output voxel offsets from the tile centre in mm, (D, H, W, 3)."""
    axes = [(torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * s
            for n, s in zip(shape, spacing, strict=True)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).to(device)


def _gauss_kernel(sigma: float, device: torch.device) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur_axis(x: torch.Tensor, sigma: float, axis: int) -> torch.Tensor:
    """Gaussian blur of a (1, 1, D, H, W) tensor along spatial `axis` (0..2), edges replicated."""
    if sigma <= 0.05:
        return x
    k = _gauss_kernel(sigma, x.device)
    r = (k.numel() - 1) // 2
    shape = [1, 1, 1, 1, 1]
    shape[2 + axis] = k.numel()
    pad = [0, 0, 0, 0, 0, 0]
    pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = r
    return F.conv3d(F.pad(x, pad, mode="replicate"), k.view(shape))


def warp(hu: torch.Tensor, label: torch.Tensor | None, params: dict[str, Any],
         src_spacing: tuple[float, float, float], spec: StageSpec,
         out_shape: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Resample a source (D, H, W) onto the output tile: HU bilinear (air outside), labels
    nearest."""
    out_shape = out_shape or spec.tile_shape
    device = hu.device
    p = _offsets(tuple(out_shape), tuple(spec.spacing_mm), str(device))
    m = torch.as_tensor(params["matrix"], dtype=torch.float32, device=device)
    q = p @ m.T
    if params["elastic"] is not None:
        e = torch.as_tensor(params["elastic"], dtype=torch.float32, device=device)[None]
        e = F.interpolate(e, size=tuple(out_shape), mode="trilinear", align_corners=True)[0]
        q = q + e.permute(1, 2, 3, 0)
    centre = torch.as_tensor(params["centre"], dtype=torch.float32, device=device)
    idx = centre + q / torch.as_tensor(src_spacing, dtype=torch.float32, device=device)
    size = torch.as_tensor(hu.shape, dtype=torch.float32, device=device)
    grid = (2 * idx / (size - 1).clamp(min=1) - 1).flip(-1)[None]  # grid_sample wants (x, y, z)
    img = F.grid_sample((hu.float() - AIR_HU)[None, None], grid, mode="bilinear",
                        padding_mode="zeros", align_corners=True)[0, 0] + AIR_HU
    lab = None
    if label is not None:
        lab = F.grid_sample(label.float()[None, None], grid, mode="nearest", padding_mode="zeros",
                            align_corners=True)[0, 0].round().to(torch.uint8)
    return img, lab


def intensity(img: torch.Tensor, params: dict[str, Any], spec: StageSpec) -> torch.Tensor:
    """Resolution loss, blur, HU scale/shift, noise, then the stage normalisation -> [0, 1]."""
    x = img[None, None]
    shape = img.shape
    if params["lowres"] > 1.0:
        small = [max(4, int(round(n / params["lowres"]))) for n in shape]
        x = F.interpolate(x, size=small, mode="trilinear", align_corners=False)
        x = F.interpolate(x, size=tuple(shape), mode="trilinear", align_corners=False)
    x = _blur_axis(x, params["thick_sigma"], 0)
    if params["blur_sigma"] > 0:
        for axis in range(3):
            x = _blur_axis(x, params["blur_sigma"], axis)
    x = (x + 1000.0) * params["hu_scale"] - 1000.0 + params["hu_shift"]
    if params["noise_sd"] > 0:
        gen = torch.Generator(device=x.device).manual_seed(params["noise_seed"])
        noise = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
        x = x + noise * params["noise_sd"]
    return spec.normalize(x[0, 0])


def augment(hu: torch.Tensor, label: torch.Tensor, params: dict[str, Any],
            src_spacing: tuple[float, float, float], spec: StageSpec,
            out_shape: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One training tile: (1, D, H, W) float32 image in [0, 1] and (D, H, W) int64 target."""
    img, lab = warp(hu, label, params, src_spacing, spec, out_shape)
    assert lab is not None
    return intensity(img, params, spec)[None], lab.long()


class SourceCache:
    """Sources moved to the training device once and reused by all their samples. Entries keep
    their Source alive, so an id() in the cache always names the same object."""

    def __init__(self, device: torch.device, keep: int = 32) -> None:
        self.device, self.keep = device, keep
        self._items: dict[int, tuple[Source, torch.Tensor, torch.Tensor]] = {}

    def get(self, source: Source) -> tuple[torch.Tensor, torch.Tensor]:
        key = id(source)
        if key not in self._items:
            if len(self._items) >= self.keep:
                self._items.pop(next(iter(self._items)))
            hu = torch.from_numpy(np.ascontiguousarray(source.hu)).to(self.device)
            lab = torch.from_numpy(np.ascontiguousarray(source.label)).to(self.device)
            self._items[key] = (source, hu, lab)
        _, hu, lab = self._items[key]
        return hu, lab


def make_batch(pairs: list[tuple[Source, dict[str, Any]]], spec: StageSpec, cache: SourceCache,
               out_shape: tuple[int, int, int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack augmented samples: images (N,1,D,H,W), targets (N,D,H,W), kinds (N,)."""
    xs, ys, kinds = [], [], []
    for source, params in pairs:
        hu, lab = cache.get(source)
        x, y = augment(hu, lab, params, source.spacing, spec, out_shape)
        xs.append(x)
        ys.append(y)
        kinds.append(source.kind)
    return (torch.stack(xs), torch.stack(ys),
            torch.as_tensor(kinds, dtype=torch.long, device=xs[0].device))
