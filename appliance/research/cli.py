"""`appliance export csv` and `appliance cohort report` (argument parsing and output only).

``appliance.cli`` adds them with ``register(subparsers)``. Both open the store read-only.

Exit codes: 0 done (``export csv`` on an empty store, or with a ``--since`` that keeps no scan,
writes the header alone and says so on stderr: an empty table is a valid export); 2 refused:
a bad ``--since`` date, no database in the state directory, or ``cohort report`` on a store
with no analysed scan (there is nothing to report), with one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from datetime import date
from pathlib import Path

from appliance.daemon_cli import add_state_args, state_dir
from appliance.daemon_cli import refused as _refused

EXIT_OK = 0
DEFAULT_REPORT_DIR = "cohort-report"


def _say(message: str) -> None:
    print(f"appliance: {message}", file=sys.stderr, flush=True)


def _load(args: argparse.Namespace):
    """(rows, database path) from the state directory, read-only."""
    from appliance.research.dataset import load_rows
    from appliance.store import DB_NAME, Store, StoreError

    config, state = state_dir(args)
    db = state / DB_NAME
    try:
        with Store.open(db, readonly=True) as store:
            return load_rows(store, config), db
    except StoreError as exc:
        raise _refused(str(exc)) from None


def parse_since(text: str | None) -> date | None:
    if text is None:
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise _refused(f"--since must be a date YYYY-MM-DD, got {text!r}") from None


def cmd_export_csv(args: argparse.Namespace) -> int:
    from appliance.research.csv_export import select_since, write_csv

    since = parse_since(args.since)  # before opening anything: bad usage costs nothing
    rows, db = _load(args)
    kept = select_since(rows, since)
    if args.output in (None, "-"):
        try:
            write_csv(kept, sys.stdout)
            sys.stdout.flush()
        except BrokenPipeError:  # the reader stopped early (`| head`): not a failure
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
    else:
        out = Path(args.output)
        if out.is_dir():
            raise _refused(f"-o {out} is a folder; name a file")
        out.parent.mkdir(parents=True, exist_ok=True)
        # written beside the target and renamed: a reader never sees half a file
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        try:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as fh:
                n = write_csv(kept, fh)
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _say(f"wrote {n} rows to {out}")
    if not rows:
        _say(f"no analysed scans in {db}; wrote the header only")
    elif not kept:
        _say(f"none of the {len(rows)} scans is on or after {since}; wrote the header only")
    return EXIT_OK


def cmd_cohort_report(args: argparse.Namespace) -> int:
    from appliance.research.cohort import analyse
    from appliance.research.report import write_report

    rows, db = _load(args)
    if not rows:
        raise _refused(f"no analysed scans in {db}; nothing to report")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise _refused(f"--out {out} exists and is not a folder")
    paths = write_report(analyse(rows), out)
    for path in paths.values():
        print(path)
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `export` (csv) and `cohort` (report) to the CLI's subparsers."""

    export = subparsers.add_parser("export", help="research exports of the stored results")
    kinds = export.add_subparsers(dest="export_kind", required=True)
    p = kinds.add_parser("csv", help="one row per analysed scan (columns: appliance/research/csv_export.py)")
    add_state_args(p)
    p.add_argument("--since", metavar="DATE", help="only scans on or after this date (YYYY-MM-DD)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here instead of stdout")
    p.set_defaults(func=cmd_export_csv)

    cohort = subparsers.add_parser("cohort", help="the paper's cohort statistics on the stored results")
    kinds = cohort.add_subparsers(dest="cohort_kind", required=True)
    p = kinds.add_parser("report", help="summary.md, stats.json and the PLO-versus-onset plot")
    add_state_args(p)
    p.add_argument("--out", metavar="DIR", default=DEFAULT_REPORT_DIR,
                   help=f"folder for the report files (default: ./{DEFAULT_REPORT_DIR})")
    p.set_defaults(func=cmd_cohort_report)
