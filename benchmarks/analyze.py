"""Time `appliance analyze` per stage and its peak memory; prints JSON (median of repeats).

    python benchmarks/analyze.py [--repeats 5] [--phantom-slices 300] [SERIES_DIR ...]

Defaults: the real scan normal-normal002 and a 512x512x300 phantom written to a temporary
folder. Each repeat is a fresh `appliance analyze --json` process (models loaded each time, as
the CLI does), so peak RSS is the whole process's. Figures go into notes, never assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT.parent / "shared" / "data" / "real" / "covid-ct-md" / "normal-normal002"


def run_once(series: Path, extra: list[str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli", "analyze", str(series), "--json", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    out, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"analyze failed on {series}: {err.strip().splitlines()[-1] if err else proc.returncode}")
    result = json.loads(out)
    return {"wall_s": wall, "timings_s": result["timings_s"],
            "lung_ml": result["regions"]["whole"]["lung_ml"], "tiles": result.get("tiles")}


def peak_rss_mb_of(series: Path, extra: list[str]) -> float:
    """Peak RSS (MB) of one analyze process, read from the waiting parent's child rusage."""
    code = (
        "import resource,subprocess,sys;"
        "subprocess.run(sys.argv[1:],stdout=subprocess.DEVNULL,stderr=subprocess.DEVNULL,check=True);"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, sys.executable, "-m", "appliance.cli", "analyze", str(series), *extra],
        capture_output=True, text=True, check=True,
    )
    return int(out.stdout.strip()) / 1024.0


def bench(series: Path, repeats: int, extra: list[str]) -> dict:
    runs = [run_once(series, extra) for _ in range(repeats)]
    stages = sorted({k for r in runs for k in r["timings_s"]})
    return {
        "series": str(series),
        "repeats": repeats,
        "median_wall_s": statistics.median(r["wall_s"] for r in runs),
        "median_stage_s": {k: statistics.median(r["timings_s"].get(k, 0.0) for r in runs) for k in stages},
        "peak_rss_mb": peak_rss_mb_of(series, extra),
        "lung_ml": runs[0]["lung_ml"],
        "tiles": runs[0]["tiles"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("series", nargs="*", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--phantom-slices", type=int, default=300)
    parser.add_argument("--backend", default="onnxruntime")
    args = parser.parse_args()
    extra = ["--backend", args.backend]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        series = list(args.series)
        if not series:
            if REAL.exists():
                series.append(REAL)
            phantom_dir = Path(tmp) / "phantom"
            subprocess.run([sys.executable, "-m", "appliance.cli", "phantom", str(phantom_dir), "--seed", "7",
                            "--severity", "moderate", "--slices", str(args.phantom_slices)],
                           check=True, stdout=subprocess.DEVNULL)
            series.append(phantom_dir)
        for s in series:
            results.append(bench(s, args.repeats, extra))
    print(json.dumps({
        "benchmark": "analyze",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "backend": args.backend,
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
