"""Time `appliance phantom` writing one full-size series (300 x 512 x 512); prints JSON.

    python benchmarks/phantom.py [--repeats 3] [--severity moderate]

Target: under 30 s per series on the 2-core development machine (the phantom issue's figure).
Median of ``--repeats`` runs, each in a fresh temporary folder, as a subprocess so the time
includes start-up. Figures go into notes, never into test assertions.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 30.0


def run_once(seed: int, severity: str) -> float:
    with tempfile.TemporaryDirectory(prefix="phantom-bench-") as tmp:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "appliance.cli", "phantom", str(Path(tmp) / "p"),
                        "--seed", str(seed), "--severity", severity],
                       check=True, capture_output=True)
        return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--severity", default="moderate")
    a = p.parse_args()
    runs = [run_once(seed, a.severity) for seed in range(1, a.repeats + 1)]
    median = statistics.median(runs)
    print(json.dumps({"benchmark": "phantom_write", "machine": platform.platform(),
                      "shape": [300, 512, 512], "severity": a.severity, "runs_s": runs,
                      "median_s": median, "target_s": TARGET_S, "meets_target": median < TARGET_S},
                     indent=2))


if __name__ == "__main__":
    main()
