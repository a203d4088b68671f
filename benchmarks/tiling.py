"""Micro-benchmark of the numeric core at full scan size; prints JSON (median of repeats).

    python benchmarks/tiling.py [--repeats 5]

- ``resample_image``: a (300, 512, 512) int16 scan at (1.0, 0.68, 0.68) mm to 3 mm and 1.5 mm.
- ``labels_from_probabilities``: (6, 100, 120, 120) lobe-like probabilities (two ellipsoid lungs
  cut into five lobes, blurred, softmax) back to (300, 512, 512); also with noisy probabilities
  (many mixed cells). Peak extra memory from tracemalloc (numpy reports its buffers there),
  output array included.
- ``sliding_window``: blending overhead on a (100, 120, 120) grid, 64^3 tiles, overlap 0.5,
  6 classes, batch 2, with a model that costs nothing (it returns a preallocated array).

Figures go into notes, never assertions. Set OMP_NUM_THREADS=1 on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from scipy import ndimage

from appliance.pipeline.geometry import labels_from_probabilities, make_grid, resample_image
from appliance.pipeline.tiling import plan_tiles, sliding_window

SCAN_SHAPE = (300, 512, 512)
SCAN_SPACING = (1.0, 0.68, 0.68)
FULL_BOX = tuple(slice(0, n) for n in SCAN_SHAPE)


def timed(fn: Callable[[], object], repeats: int) -> dict:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"median_s": statistics.median(times), "min_s": min(times),
            "peak_traced_mb": round(peak / 2**20, 1)}


def lobe_probabilities(shape: tuple[int, int, int], noise: float, seed: int = 0) -> np.ndarray:
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    labels = np.zeros(shape, np.uint8)
    right = ((x + 0.45) / 0.4) ** 2 + (y / 0.6) ** 2 + (z / 0.9) ** 2 < 1
    left = ((x - 0.45) / 0.4) ** 2 + (y / 0.6) ** 2 + (z / 0.9) ** 2 < 1
    labels[right & (z > 0.2)] = 1
    labels[right & (z <= 0.2) & (y < 0)] = 2
    labels[right & (z <= 0.2) & (y >= 0)] = 3
    labels[left & (z + 0.5 * y > 0)] = 4
    labels[left & (z + 0.5 * y <= 0)] = 5
    logits = np.stack([ndimage.gaussian_filter((labels == c).astype(np.float32), 1.5) * 8
                       for c in range(6)])
    if noise:
        logits += np.random.default_rng(seed).normal(0, noise, logits.shape).astype(np.float32)
    p = np.exp(logits - logits.max(axis=0))
    return (p / p.sum(axis=0)).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    scan = rng.integers(-1024, 1500, size=SCAN_SHAPE, dtype=np.int16)
    results: dict[str, dict] = {}

    for mm in (3.0, 1.5):
        grid = make_grid(FULL_BOX, SCAN_SPACING, (mm, mm, mm))
        results[f"resample_image_{mm:g}mm"] = {
            "in": [list(SCAN_SHAPE), "int16"], "out": list(grid.shape),
            **timed(lambda g=grid, s=scan: resample_image(s, g), args.repeats),
        }
    del scan

    grid = make_grid(FULL_BOX, SCAN_SPACING, (3.0, 2.9, 2.9))
    for name, noise in (("smooth", 0.0), ("noisy", 1.0)):
        probs = lobe_probabilities(grid.shape, noise)
        results[f"labels_from_probabilities_{name}"] = {
            "probs": list(probs.shape), "out": list(SCAN_SHAPE),
            **timed(lambda p=probs: labels_from_probabilities(p, grid, SCAN_SHAPE), args.repeats),
        }

    image = rng.uniform(0, 1, (100, 120, 120)).astype(np.float32)
    tile, batch = (64, 64, 64), 2
    canned = np.zeros((batch, 6) + tile, np.float32)
    results["sliding_window_blend"] = {
        "image": list(image.shape), "tile": list(tile), "overlap": 0.5, "classes": 6,
        "batch_size": batch, "tiles": len(plan_tiles(image.shape, tile, 0.5)),
        **timed(lambda: sliding_window(image, tile, 0.5, lambda b: canned, 6, batch_size=batch),
                args.repeats),
    }
    print(json.dumps({
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count(), "numpy": np.__version__,
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "repeats": args.repeats,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
