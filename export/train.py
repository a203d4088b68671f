"""Train one stage: ``python -m export.train --stage lobes|opacity [--minutes M] [--steps N] ...``

Seeded and resumable: everything the next step depends on (weights, optimiser, step, samples
consumed, training seconds) is in ``<out>/last.pt``, and the data stream is a pure function of
(seed, chunk index), so a resumed run continues exactly where it stopped. Progress, validation
(per-class Dice on held-out phantom seeds >= 1,000,000) and the final summary are JSON lines on
stdout (and appended to ``<out>/log.jsonl``).

Learning-rate schedule: linear warm-up then cosine decay over `--steps` when given (fully
reproducible). With only `--minutes`, progress is measured in training seconds against the
budget instead, so the schedule ends when the time does (the GPU run); a resumed time-budgeted
run continues the decay over the new budget.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from export.data import (
    KIND_FULL,
    KIND_LUNG_ONLY,
    REAL_DIR,
    AugmentConfig,
    ChunkDataset,
    DataConfig,
    SourceCache,
    StageSpec,
    ValidationDataset,
    chunk_loader,
    first_chunk,
    identity,
    load_real,
    make_batch,
    sample_stream,
    stage_spec,
)
from export.unet import UNet3D, UNetConfig, check_tile_shape, count_parameters
from export.unfold import calibrate_batchnorm, load_folded

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINTS = ROOT / "out" / "checkpoints"
DEFAULTS: dict[str, dict[str, Any]] = {
    # Widths chosen from the ONNX Runtime CPU timing table (`python -m export.onnx bench`):
    # lobes 1-2 tiles x 1.0 s + opacity 8-12 tiles x 0.31 s stays under ~6 s per scan.
    "lobes": {"base": 8, "top_convs": 1, "batch": 2, "crops": 2, "group": 4,
              "real_fraction": 0.15, "crop": None, "coords": 1,
              "lr": 3e-3},
    "opacity": {"base": 8, "top_convs": 1, "batch": 4, "crops": 8, "group": 2,
                "real_fraction": 0.25, "crop": (32, 96, 96), "coords": 0,
                "lr": 2e-3},
}
DICE_SMOOTH = 1.0
WARMUP = 0.03
"""Fraction of the schedule spent warming the learning rate up."""
FINAL_LR_FRACTION = 0.02


@dataclass(frozen=True)
class TrainConfig:
    stage: str
    seed: int = 0
    device: str = "cpu"
    steps: int | None = None
    minutes: float | None = None
    batch: int = 2
    lr: float = 2e-3
    weight_decay: float = 1e-4
    base: int = 8
    top_convs: int = 1
    coords: int = 0
    workers: int = 1
    crops: int = 4
    group: int = 2
    real_fraction: float = 0.0
    nodule_fraction: float = 0.0
    real_dir: str = str(REAL_DIR)
    val_every: int = 200
    val_samples: int = 4
    log_every: int = 10
    checkpoint_minutes: float = 10.0
    crop: tuple[int, int, int] | None = None
    """Training tile shape when it differs from the inference tile (e.g. to train faster on CPU)."""
    out: str = ""
    threads: int = 0
    augment: bool = True
    export: bool = False
    models_dir: str = ""
    severity_weights: tuple[float, ...] | None = None
    """Training severity mix (none, mild, moderate, severe, critical); None: the stage's."""
    init_from: str = ""
    """An exported ONNX model to start from instead of random weights (see export.unfold);
    ignored when resuming from a checkpoint."""
    freeze_bn: bool = False
    """Keep every BatchNorm in eval mode (its running statistics fixed): a continuation then
    trains the very function the ONNX model computes, instead of one normalised by the
    statistics of small training crops, which differ from those of whole inference tiles."""

    def __post_init__(self) -> None:
        stage_spec(self.stage)
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"`device` must be 'cpu' or 'cuda', got {self.device!r}")
        if self.steps is None and self.minutes is None:
            raise ValueError("`steps` or `minutes` must be given, got neither")
        if self.batch < 1:
            raise ValueError(f"`batch` must be >= 1, got {self.batch}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else CHECKPOINTS / self.stage


def default_workers() -> int:
    return max(0, min((os.cpu_count() or 1) - 1, 8))


# --------------------------------------------------------------------------------------------
# Loss and metrics


def seg_loss(logits: torch.Tensor, target: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice (foreground classes, over the batch) for fully labelled samples;
    for lung-only samples, binary CE + Dice on P(lung) = sum of the non-background probabilities."""
    logp = F.log_softmax(logits.float(), dim=1)
    n = logits.shape[0]
    total = logits.new_zeros(())
    full = kinds == KIND_FULL
    if bool(full.any()):
        lp, t = logp[full], target[full]
        ce = F.nll_loss(lp, t)
        p = lp.exp()
        onehot = F.one_hot(t, logits.shape[1]).permute(0, 4, 1, 2, 3).to(p.dtype)
        dims = (0, 2, 3, 4)
        inter = (p * onehot).sum(dims)[1:]
        denom = p.sum(dims)[1:] + onehot.sum(dims)[1:]
        dice = 1 - ((2 * inter + DICE_SMOOTH) / (denom + DICE_SMOOTH)).mean()
        total = total + (ce + dice) * full.sum() / n
    lung_only = kinds == KIND_LUNG_ONLY
    if bool(lung_only.any()):
        lp = logp[lung_only]
        m = (target[lung_only] > 0).to(lp.dtype)
        log_lung = torch.logsumexp(lp[:, 1:], dim=1)
        bce = -(m * log_lung + (1 - m) * lp[:, 0]).mean()
        pl = log_lung.exp()
        dice = 1 - (2 * (pl * m).sum() + DICE_SMOOTH) / (pl.sum() + m.sum() + DICE_SMOOTH)
        total = total + (bce + dice) * lung_only.sum() / n
    return total


def describe_model_file(path: Path) -> str:
    """'lobes.onnx 0.3.0 (sha256 cb1f3493f721)': the file, its version when a manifest beside it
    lists that file, and the start of its digest (what a continued model started from)."""
    from appliance.runtime.base import ModelError, load_manifest
    from export.onnx import sha256_of

    try:
        specs = load_manifest(path.parent).values()
        version = next((f" {spec.version}" for spec in specs if spec.path.name == path.name), "")
    except ModelError:
        version = ""  # no usable manifest beside it only costs the label its version
    return f"{path.name}{version} (sha256 {sha256_of(path)[:12]})"


def dice_table(stats: np.ndarray, classes: tuple[str, ...]) -> dict[str, float | None]:
    """Per-class Dice from accumulated [class, (intersection, predicted, true)] counts."""
    out: dict[str, float | None] = {}
    for c in range(1, len(classes)):
        inter, pred, true = stats[c]
        out[classes[c]] = None if pred + true == 0 else float(2 * inter / (pred + true))
    vals = [v for v in out.values() if v is not None]
    out["mean"] = float(np.mean(vals)) if vals else None
    fg = stats[0]
    out["foreground"] = None if fg[1] + fg[2] == 0 else float(2 * fg[0] / (fg[1] + fg[2]))
    return out


def accumulate(stats: np.ndarray, pred: torch.Tensor, target: torch.Tensor) -> None:
    """Add Dice counts; row 0 holds foreground (any class > 0) vs background."""
    for c in range(1, stats.shape[0]):
        p, t = pred == c, target == c
        stats[c] += [int((p & t).sum()), int(p.sum()), int(t.sum())]
    p, t = pred > 0, target > 0
    stats[0] += [int((p & t).sum()), int(p.sum()), int(t.sum())]


# --------------------------------------------------------------------------------------------
# Trainer


def lr_at(progress: float, peak: float) -> float:
    progress = min(max(progress, 0.0), 1.0)
    if progress < WARMUP:
        return peak * (0.1 + 0.9 * progress / WARMUP)
    t = (progress - WARMUP) / (1 - WARMUP)
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * t)))


class Logger:
    def __init__(self, path: Path | None, quiet: bool = False) -> None:
        self.path, self.quiet = path, quiet

    def __call__(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "time": round(time.time(), 3), **fields})
        if not self.quiet:
            print(line, flush=True)
        if self.path is not None:
            with open(self.path, "a") as fh:
                fh.write(line + "\n")


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class Trainer:
    """One stage's training run; `run()` trains until the step count or time budget is spent."""

    def __init__(self, cfg: TrainConfig, *, synthesize: Callable[..., Any] | None = None,
                 insert_lesions: Callable[..., Any] | None = None,
                 synth_kwargs: dict[str, Any] | None = None, quiet: bool = False) -> None:
        self.cfg = cfg
        self.spec: StageSpec = stage_spec(cfg.stage)
        self.synthesize = synthesize
        self.insert_lesions = insert_lesions
        self.synth_kwargs = synth_kwargs or {}
        self.device = torch.device(cfg.device)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("`device` must be 'cpu' here: CUDA is not available")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.unet = UNetConfig(n_classes=self.spec.n_classes, base=cfg.base,
                               top_convs=cfg.top_convs, coords=cfg.coords)
        self.tile = tuple(cfg.crop) if cfg.crop else self.spec.tile_shape
        check_tile_shape(self.tile, self.unet)  # type: ignore[arg-type]
        self.data_cfg = DataConfig(
            stage=cfg.stage, seed=cfg.seed, crops_per_source=cfg.crops,
            real_fraction=cfg.real_fraction, real_dir=cfg.real_dir,
            augment=AugmentConfig() if cfg.augment else replace(AugmentConfig(), **_NO_AUG),
            synth_kwargs=self.synth_kwargs, severity_weights=cfg.severity_weights,
            nodule_fraction=cfg.nodule_fraction,
        )
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        self.log = Logger(cfg.out_dir / "log.jsonl", quiet=quiet)
        torch.manual_seed(cfg.seed)
        self.model = UNet3D(self.unet).to(self.device)
        if cfg.device == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            self.model = self.model.to(memory_format=torch.channels_last_3d)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.step = 0
        self.samples = 0
        self.train_seconds = 0.0
        self.prior_seconds = 0.0
        self.metrics: dict[str, Any] = {}
        self.stop_requested = False
        """Set by SIGTERM/SIGINT: the loop stops after the current step, then saves."""
        self._val: list[tuple[Any, dict[str, Any]]] | None = None
        self._calibrate_batchnorm = False
        self.init_label = Path(cfg.init_from).name if cfg.init_from else ""
        """Which exported model the weights started from (recorded in the weights' summary)."""
        self._resume()
        if cfg.init_from and self.step == 0:
            layers = load_folded(self.model, cfg.init_from)
            self.init_label = describe_model_file(Path(cfg.init_from))
            # on the first training batch (see export.unfold); frozen BatchNorm keeps identity
            self._calibrate_batchnorm = not cfg.freeze_bn
            self.log("init", stage=cfg.stage, init_from=cfg.init_from, layers=layers)

    # -- state --------------------------------------------------------------------------------
    @property
    def last_path(self) -> Path:
        return self.cfg.out_dir / "last.pt"

    @property
    def weights_path(self) -> Path:
        return self.cfg.out_dir / f"{self.cfg.stage}.pt"

    def _resume(self) -> None:
        if not self.last_path.exists():
            return
        state = torch.load(self.last_path, map_location=self.device, weights_only=False)
        if UNetConfig.from_dict(state["unet"]) != self.unet or state["stage"] != self.cfg.stage:
            raise ValueError(f"`{self.last_path}` was trained with another network or stage: "
                             f"{state['unet']}; move it away to start afresh")
        if state["seed"] != self.cfg.seed:
            raise ValueError(
                f"`seed` must match the checkpoint's ({state['seed']}), got {self.cfg.seed}")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.samples = state["step"], state["samples"]
        self.train_seconds = self.prior_seconds = state["train_seconds"]
        self.metrics = state.get("metrics", {})
        self.log("resume", stage=self.cfg.stage, step=self.step, samples=self.samples,
                 train_seconds=round(self.train_seconds, 1))

    def state(self) -> dict[str, Any]:
        return {
            "stage": self.cfg.stage, "seed": self.cfg.seed, "unet": self.unet.to_dict(),
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
            "step": self.step, "samples": self.samples, "train_seconds": self.train_seconds,
            "metrics": self.metrics, "config": _jsonable(asdict(self.cfg)),
        }

    def save(self) -> None:
        _atomic_save(self.state(), self.last_path)
        weights = {
            "stage": self.cfg.stage, "unet": self.unet.to_dict(),
            "state_dict": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "training": self.summary(), "metrics": self.metrics,
        }
        _atomic_save(weights, self.weights_path)

    def summary(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "data": "synthetic phantoms (appliance.phantom, seeds < 1,000,000) with augmentation"
                    + (f"; real scan {c.real_fraction:.0%} of sources (covid-ct-md normal-normal002"
                       + (", classical lung mask only)" if c.stage == "lobes"
                          else ", inserted lesions)") if c.real_fraction else "")
                    + (f"; small ground-glass nodules (appliance.lesions.add_nodules) added to {c.nodule_fraction:.0%}"
                       " of sources" if c.nodule_fraction else ""),
            "steps": self.step, "samples": self.samples, "batch": c.batch,
            "train_tile": list(self.tile), "seed": c.seed, "optimizer": "AdamW",
            "lr": c.lr, "weight_decay": c.weight_decay, "schedule": "warmup+cosine",
            "loss": "cross-entropy + soft Dice", "device": c.device,
            "train_minutes": round(self.train_seconds / 60, 2),
            "parameters": count_parameters(self.model), "torch": torch.__version__,
            **({"init_from": self.init_label} if self.init_label else {}),
            **({"batchnorm": "frozen (statistics of the model it started from)"} if c.freeze_bn else {}),
        }

    # -- loop ---------------------------------------------------------------------------------
    def progress(self, session_seconds: float) -> float:
        """Schedule position in [0, 1]: steps when `steps` is set, else wall time of the budget."""
        if self.cfg.steps:
            return self.step / self.cfg.steps
        budget = self.cfg.minutes * 60 if self.cfg.minutes else 1.0
        return (self.prior_seconds + session_seconds) / (self.prior_seconds + budget)

    def _stream(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        if self.cfg.real_fraction and load_real(self.cfg.real_dir, self.cfg.stage) is None:
            self.log("warning", message=f"no real npz in {self.cfg.real_dir}: phantoms only")
        start = first_chunk(self.data_cfg, self.samples, self.cfg.group)
        chunks = chunk_loader(ChunkDataset(self.data_cfg, self.synthesize, self.insert_lesions),
                              start, self.cfg.workers)
        return sample_stream(chunks, self.data_cfg, self.samples, self.cfg.group)

    def _autocast(self) -> Any:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def train_mode(self) -> None:
        self.model.train()
        if self.cfg.freeze_bn:
            for m in self.model.modules():
                if isinstance(m, torch.nn.BatchNorm3d):
                    m.eval()

    def train_step(self, x: torch.Tensor, y: torch.Tensor, kinds: torch.Tensor,
                   lr: float) -> float:
        self.train_mode()
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        with self._autocast():
            logits = self.model(x)
        loss = seg_loss(logits, y, kinds)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 5.0)
        self.opt.step()
        return float(loss.detach())

    def validation_set(self) -> list[tuple[Any, dict[str, Any]]]:
        if self._val is None:
            ds = ValidationDataset(self.cfg.stage, self.cfg.val_samples, self.synthesize,
                                   self.synth_kwargs)
            workers = min(self.cfg.workers, self.cfg.val_samples)
            loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers,
                                                 collate_fn=identity)
            self._val = [(c["source"], p) for c in loader for p in c["params"]]
        return self._val

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        self.model.eval()
        stats = np.zeros((self.spec.n_classes, 3), dtype=np.int64)
        cache = SourceCache(self.device)
        for pair in self.validation_set():
            x, y, _ = make_batch([pair], self.spec, cache, self.tile)  # type: ignore[arg-type]
            with self._autocast():
                pred = self.model(x).argmax(1)
            accumulate(stats, pred, y)
        table = dice_table(stats, self.spec.classes)
        self.metrics = {"validation_dice": table, "validation_tiles": len(self._val or []),
                        "validation_seeds": "phantom seeds >= 1000000", "step": self.step}
        return table

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        start = time.perf_counter()
        budget = cfg.minutes * 60 if cfg.minutes else math.inf
        self.log("start", stage=cfg.stage, device=cfg.device, step=self.step,
                 parameters=count_parameters(self.model), unet=self.unet.to_dict(),
                 tile=list(self.tile), batch=cfg.batch, workers=cfg.workers,
                 torch=torch.__version__, cuda=torch.cuda.is_available(),
                 gpu=torch.cuda.get_device_name(0) if self.device.type == "cuda" else None)
        try:
            stop_reason = self._loop(start, budget)
        except BaseException as exc:
            # Keep what was learnt (the GPU run has one chance), then let the error through.
            if self.step > 0:
                try:
                    self.save()
                except (RuntimeError, OSError) as save_exc:  # the original error is raised below
                    self.log("save_failed", stage=cfg.stage, error=repr(save_exc)[:300])
            self.log("crashed", stage=cfg.stage, step=self.step, error=repr(exc)[:500])
            raise
        validated = self.metrics.get("step") == self.step and self.metrics.get("validation_dice")
        table = self.metrics["validation_dice"] if validated else (
            self.validate() if cfg.val_samples else {})
        self.log("validation", stage=cfg.stage, step=self.step, dice=table, final=True)
        self.save()
        result = {"stage": cfg.stage, "step": self.step, "samples": self.samples,
                  "stop": stop_reason, "weights": str(self.weights_path),
                  "wall_s": round(time.perf_counter() - start, 1), "dice": table}
        if self.device.type == "cuda":
            result["cuda_max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        self.log("done", **result)
        return result

    def _loop(self, start: float, budget: float) -> str:
        cfg = self.cfg
        # Time kept for the final validation + save; re-measured at every validation.
        reserve = min(20.0, 0.05 * budget)
        stream = self._stream()
        cache = SourceCache(self.device)
        last_ckpt = time.perf_counter()
        window: list[float] = []
        t_log = time.perf_counter()
        data_wait = 0.0
        while True:
            if cfg.steps is not None and self.step >= cfg.steps:
                return "steps"
            if time.perf_counter() - start + reserve >= budget:
                return "time"
            if self.stop_requested:
                return "signal"
            t0 = time.perf_counter()
            pairs = [next(stream) for _ in range(cfg.batch)]
            data_wait += time.perf_counter() - t0
            x, y, kinds = make_batch(pairs, self.spec, cache, self.tile)  # type: ignore[arg-type]
            if self._calibrate_batchnorm:
                calibrate_batchnorm(self.model, x)
                self._calibrate_batchnorm = False
            lr = lr_at(self.progress(time.perf_counter() - start), cfg.lr)
            loss = self.train_step(x, y, kinds, lr)
            self.step += 1
            self.samples += cfg.batch
            self.train_seconds = self.prior_seconds + time.perf_counter() - start
            window.append(loss)
            if self.step % cfg.log_every == 0:
                now = time.perf_counter()
                self.log("train", stage=cfg.stage, step=self.step,
                         loss=round(float(np.mean(window)), 4),
                         lr=round(lr, 6), samples=self.samples,
                         steps_per_s=round(cfg.log_every / max(now - t_log, 1e-9), 3),
                         data_wait_frac=round(data_wait / max(now - t_log, 1e-9), 3),
                         elapsed_s=round(now - start, 1))
                window, t_log, data_wait = [], now, 0.0
            if cfg.val_every and self.step % cfg.val_every == 0:
                t_val = time.perf_counter()
                table = self.validate()
                self.log("validation", stage=cfg.stage, step=self.step, dice=table)
                reserve = max(reserve, 1.5 * (time.perf_counter() - t_val) + 5.0)
                self.save()
                last_ckpt = time.perf_counter()
            elif time.perf_counter() - last_ckpt > cfg.checkpoint_minutes * 60:
                self.save()
                last_ckpt = time.perf_counter()


_NO_AUG = {"scale": (1.0, 1.0), "anisotropy": 0.0, "rotate_deg": (0.0, 0.0, 0.0),
           "elastic_p": 0.0, "lowres_p": 0.0, "thick_p": 0.0, "blur_p": 0.0,
           "hu_scale": (1.0, 1.0), "hu_shift": (0.0, 0.0), "noise_p": 0.0, "flip_p": 0.0,
           "centre_jitter": 0.0}


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m export.train", description=__doc__.split("\n")[0])
    p.add_argument("--stage", required=True, choices=sorted(DEFAULTS))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--minutes", type=float, help="time budget; stops cleanly, saves (and exports)")
    p.add_argument("--steps", type=int, help="total optimiser steps (defines the LR schedule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--coords", type=int, choices=(0, 1), help="position channels (see export.unet)")
    p.add_argument("--base", type=int, help="U-Net base channels")
    p.add_argument("--top-convs", type=int, choices=(1, 2))
    p.add_argument("--workers", type=int, default=default_workers(), help="data worker processes")
    p.add_argument("--crops", type=int, help="augmented samples per generated source")
    p.add_argument("--group", type=int, help="sources shuffled together into batches")
    p.add_argument("--real-fraction", type=float, help="fraction of sources from the real scan")
    p.add_argument("--real-dir", default=str(REAL_DIR))
    p.add_argument("--nodules", type=float, default=0.0,
                   help="opacity: fraction of sources given small ground-glass nodules")
    p.add_argument("--val-every", type=int, default=200)
    p.add_argument("--val-samples", type=int, default=4)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--checkpoint-minutes", type=float, default=10.0)
    p.add_argument("--crop", type=lambda s: tuple(int(v) for v in s.split(",")),
                   help="training tile D,H,W when smaller than the inference tile")
    p.add_argument("--out", default="", help="checkpoint folder (default out/checkpoints/<stage>)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    p.add_argument("--severity-weights", type=lambda s: tuple(float(v) for v in s.split(",")),
                   help="sampling weights none,mild,moderate,severe,critical (default: the stage's)")
    p.add_argument("--init-from", default="",
                   help="start from an exported ONNX model (e.g. appliance/models/lobes.onnx)")
    p.add_argument("--freeze-bn", action="store_true",
                   help="keep BatchNorm statistics fixed (for continuations of a shipped model)")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--export", action="store_true", help="export ONNX at the end (needs onnx)")
    p.add_argument("--models-dir", default="",
                   help="where --export writes (default appliance/models)")
    a = p.parse_args(argv)
    d = DEFAULTS[a.stage]

    def pick(value: Any, key: str) -> Any:
        return d[key] if value is None else value

    return TrainConfig(
        stage=a.stage, seed=a.seed, device=a.device, steps=a.steps, minutes=a.minutes,
        batch=pick(a.batch, "batch"), lr=pick(a.lr, "lr"), coords=pick(a.coords, "coords"),
        base=pick(a.base, "base"),
        top_convs=pick(a.top_convs, "top_convs"), workers=a.workers, crops=pick(a.crops, "crops"),
        group=pick(a.group, "group"), real_fraction=pick(a.real_fraction, "real_fraction"),
        nodule_fraction=a.nodules, real_dir=a.real_dir, val_every=a.val_every, val_samples=a.val_samples,
        log_every=a.log_every, checkpoint_minutes=a.checkpoint_minutes, crop=pick(a.crop, "crop"), out=a.out,
        threads=a.threads, augment=not a.no_augment, export=a.export, models_dir=a.models_dir,
        severity_weights=a.severity_weights, init_from=a.init_from, freeze_bn=a.freeze_bn,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        trainer = Trainer(cfg)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    def request_stop(signum: int, _frame: object) -> None:
        trainer.stop_requested = True
        trainer.log("signal", signal=signum)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    trainer.run()
    if cfg.export:
        try:
            import onnx  # noqa: F401
        except ImportError:
            trainer.log("export_skipped", reason="onnx is not importable here; weights saved only")
            return 0
        from export.onnx import export_stage

        entry = export_stage(trainer.weights_path, models_dir=cfg.models_dir or None)
        trainer.log("exported", file=entry["file"], metrics=entry.get("metrics", {}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
