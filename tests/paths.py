"""Where the read-only real scans are: `shared/data/real` beside the checkout (as on the
developers' machines and in CI), overridable with APPLIANCE_REAL_DATA."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def real_data_dir() -> Path:
    if os.environ.get("APPLIANCE_REAL_DATA"):
        return Path(os.environ["APPLIANCE_REAL_DATA"])
    for candidate in (ROOT.parent / "shared" / "data" / "real", Path("/work/shared/data/real")):
        if candidate.is_dir():
            return candidate
    return ROOT.parent / "shared" / "data" / "real"


REAL = real_data_dir()
