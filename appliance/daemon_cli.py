"""Subcommands of the daemon: `serve`, `status` and `history` (argument parsing and output only).

`appliance.cli` adds them with ``daemon_cli.add_parsers(sub)``. `status` and `history` open the
store read-only. ``python -m appliance.daemon_cli serve ...`` runs them without the main CLI.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from datetime import datetime
from pathlib import Path

EXIT_OK = 0


def refused(message: str) -> Exception:
    from appliance.cli import Refused

    return Refused(message)


def add_state_args(p: argparse.ArgumentParser) -> None:
    """`--config` and `--state-dir`, shared by every subcommand that touches the store."""
    p.add_argument("--config", metavar="FILE", help="TOML config file")
    p.add_argument("--state-dir", metavar="DIR",
                   help="state directory (default: the config's general.state_dir)")


def state_dir(args: argparse.Namespace):
    from appliance.config import load_config

    config = load_config(args.config)
    return config, Path(args.state_dir or config.general.state_dir)


def open_store(args: argparse.Namespace):
    from appliance.store import Store, StoreError

    _config, state = state_dir(args)
    try:
        return Store.open(state / "appliance.db", readonly=True)
    except StoreError as exc:
        raise refused(str(exc)) from None


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S") if t else "-"


def _pct(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if abs(value) < 1 else f"{value:.1f}"


# ----------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    from appliance.daemon import serve

    config, state = state_dir(args)
    # journald takes stdout; the supervisor and every child log there
    logging.basicConfig(level=getattr(logging, config.general.log_level.upper(), logging.INFO),
                        stream=sys.stdout, format="%(levelname)s supervisor %(name)s: %(message)s",
                        force=True)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    from appliance.store import StoreError

    try:
        return serve(config, state)
    except StoreError as exc:  # a database from a newer release, processes left running
        raise refused(str(exc)) from None


# ----------------------------------------------------------------------------- status


def _job_dict(job) -> dict:
    return {
        "id": job.id, "series_uid": job.series_uid, "patient_id": job.patient_id,
        "kind": job.kind.value, "state": job.state.value, "stage": job.stage,
        "attempts": job.attempts, "reason": job.reason, "instances": job.instance_count,
        "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "worker": job.worker, "heartbeat_at": job.heartbeat_at,
        "lease_until": job.lease_until,
    }


def _delivery_dict(d) -> dict:
    out = {"destination": d.destination, "state": d.state.value, "files": d.files,
           "sent": d.sent, "pending": d.pending, "failed": d.failed, "attempts": d.attempts,
           "last_error": d.last_error, "next_attempt_at": d.next_attempt_at,
           "sent_at": d.sent_at}
    return out if d.result_id is None else {"result_id": d.result_id, **out}


def delivery_report(store, limit: int = 10) -> dict:
    """The outbox: files per state, each destination's backlog, and the results whose files
    are not all delivered yet (most recent first)."""
    from appliance.store import OutboxState

    undelivered = [d for d in store.deliveries() if d.state is not OutboxState.SENT]
    return {
        "outbox": {state.value: n for state, n in store.outbox_counts().items()},
        "destinations": [_delivery_dict(d) for d in store.deliveries_by_destination()],
        "undelivered": [_delivery_dict(d) for d in reversed(undelivered[-limit:])],
    }


def status_report(store, limit: int = 10, now: float | None = None) -> dict:
    from appliance.store import JobState

    now = time.time() if now is None else now
    counts = store.job_counts()
    running = store.jobs(state=JobState.RUNNING, limit=100)
    return {
        "queue": {state.value: n for state, n in counts.items()},
        "running": [dict(_job_dict(j), stale=bool(j.lease_until and j.lease_until < now))
                    for j in running],
        "recent": [_job_dict(j) for j in store.jobs(limit=limit)],
        "failures": [_job_dict(j) for j in store.jobs(state=JobState.FAILED, limit=limit)],
        "delivery": delivery_report(store, limit),
    }


def format_status(report: dict, now: float | None = None) -> str:
    now = time.time() if now is None else now
    q = report["queue"]
    lines = [f"Jobs: {q['queued']} queued, {q['running']} running, {q['done']} done, "
             f"{q['failed']} failed"]
    if report["running"]:
        lines += ["", "Running:"]
        for j in report["running"]:
            beat = f"heartbeat {now - j['heartbeat_at']:.0f} s ago" if j["heartbeat_at"] else ""
            lines.append(f"  job {j['id']:<5} patient {j['patient_id']:<12} stage {j['stage']:<8} "
                         f"attempt {j['attempts']}  {now - (j['started_at'] or now):.0f} s  {beat}"
                         + ("  STALE" if j["stale"] else ""))
    lines += ["", "Recent jobs:"]
    if not report["recent"]:
        lines.append("  none")
    for j in report["recent"]:
        when = _when(j["finished_at"] or j["started_at"] or j["created_at"])
        lines.append(f"  job {j['id']:<5} {when}  {j['state']:<8} {j['kind']:<10} "
                     f"patient {j['patient_id']:<12} series {j['series_uid']}")
    if report["failures"]:
        lines += ["", "Failures:"]
        for j in report["failures"]:
            lines.append(f"  job {j['id']:<5} {_when(j['finished_at'])}  patient {j['patient_id']}"
                         f"  stage {j['stage']}: {j['reason']}")
    delivery = report.get("delivery")
    if delivery and delivery["destinations"]:
        o = delivery["outbox"]
        lines += ["", f"Delivery: {o['pending']} pending, {o['sent']} sent, {o['failed']} failed"]
        for d in delivery["destinations"]:
            lines.append("  " + _delivery_line(d))
        if delivery["undelivered"]:
            lines += ["", "Not delivered yet:"]
            for d in delivery["undelivered"]:
                lines.append(f"  result {d['result_id']:<5} " + _delivery_line(d))
    return "\n".join(lines)


def _delivery_line(d: dict) -> str:
    text = f"{d['destination']:<28} {d['sent']} sent, {d['pending']} pending, {d['failed']} failed"
    if d["pending"] and d["next_attempt_at"]:
        text += f"; next attempt {_when(d['next_attempt_at'])}"
    if d["last_error"] and d["state"] != "sent":
        text += f"; last error: {d['last_error']}"
    return text


def cmd_status(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        report = status_report(store, limit=args.limit)
    print(json.dumps(report, indent=2) if args.json else format_status(report))
    return EXIT_OK


# ----------------------------------------------------------------------------- history


def history_report(store, patient_id: str) -> dict:
    from appliance.pipeline.quantify import REGIONS

    patient = store.patient(patient_id)
    if patient is None:
        raise refused(f"no patient {patient_id!r} in the store")
    scans = []
    for scan in store.scans(patient_id):
        r = scan.result
        flags = r.get("qa", {}).get("flags", [])
        scans.append({
            "series_uid": scan.series_uid,
            "result_id": scan.result_id,
            "acquired_at": scan.acquired_at,
            "plo_pct": {name: r["regions"].get(name, {}).get("plo_pct") for name in REGIONS},
            "severity_score": r.get("severity_score"),
            "qa_ok": r.get("qa", {}).get("ok"),
            "qa_flags": list(dict.fromkeys(f.get("code") for f in flags)),
            "reviews": store.reviews(scan.result_id),
        })
    return {
        "patient": {"patient_id": patient.patient_id, "patient_name": patient.patient_name,
                    "sex": patient.sex, "birth_date": patient.birth_date,
                    "onset_date": patient.onset_date,
                    "clinical_type": (patient.clinical_type.value if patient.clinical_type
                                      else None)},
        "scans": scans,
        "serial": store.serial(patient_id) or [],
        "intended_use": _intended_use(),
    }


def _intended_use() -> str:
    from appliance import INTENDED_USE

    return INTENDED_USE


def format_history(report: dict) -> str:
    from appliance.pipeline.quantify import REGIONS

    p = report["patient"]
    lines = [f"Patient {p['patient_id']}  {p['patient_name'] or ''}  sex {p['sex'] or '?'}  "
             f"onset {p['onset_date'] or 'unknown'}  "
             f"clinical type {p['clinical_type'] or 'unknown'}"]
    if not report["scans"]:
        lines.append("no analysed scans")
        return "\n".join(lines)
    serial = {entry["key"]: entry for entry in report["serial"]}
    lines.append("")
    lines.append(f"{'#':<3}{'acquired':<20}{'days':>6}" + "".join(f"{r:>7}" for r in REGIONS)
                 + f"{'sev.':>6}{'d prev':>8}{'chg %':>8}  trend")
    for i, scan in enumerate(report["scans"]):
        entry = serial.get(scan["series_uid"], {})
        days = entry.get("days_since_baseline")
        prev = (entry.get("vs_previous") or {}).get("whole") or {}
        delta, change = prev.get("delta_pts"), prev.get("change_pct")
        lines.append(
            f"{i:<3}{(scan['acquired_at'] or '?')[:19]:<20}"
            f"{'' if days is None else f'{days:.0f}':>6}"
            + "".join(f"{_pct(scan['plo_pct'][r]):>7}" for r in REGIONS)
            + f"{scan['severity_score'] if scan['severity_score'] is not None else '':>6}"
            + f"{'' if delta is None else f'{delta:+.1f}':>8}"
            + f"{'' if change is None else f'{change:+.0f}':>8}"
            + f"  {entry.get('trend') or ('baseline' if i == 0 else '')}"
            + ("" if scan["qa_ok"] else "  QA: " + ",".join(scan["qa_flags"]))
        )
    lines.append("")
    lines.append("PLO in % of the region's lung volume; d prev: change of whole-lung PLO against "
                 "the previous scan in points.")
    lines.append(f"Intended use: {report['intended_use']}.")
    return "\n".join(lines)


def cmd_history(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        report = history_report(store, args.patient_id)
    print(json.dumps(report, indent=2) if args.json else format_history(report))
    return EXIT_OK


# ----------------------------------------------------------------------------- parsers


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add `serve`, `status` and `history` to the CLI's subparsers."""

    p = sub.add_parser("serve", help="run the DICOM receiver and the analysis daemon")
    add_state_args(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("status", help="queue, running and recent jobs, failures, delivery to "
                                      "PACS (read-only)")
    add_state_args(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--limit", type=int, default=10, help="recent jobs and failures shown")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("history", help="a patient's scans: PLO per region and serial changes")
    add_state_args(p)
    p.add_argument("patient_id", metavar="PATIENT_ID")
    p.add_argument("--json", action="store_true", help="print the history as JSON")
    p.set_defaults(func=cmd_history)


def main(argv: list[str] | None = None) -> int:
    """These subcommands alone (before or without the main CLI), with its exit codes."""
    from appliance.cli import EXIT_REFUSED, Refused
    from appliance.config import ConfigError
    from appliance.store import StoreError

    parser = argparse.ArgumentParser(prog="appliance")
    add_parsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except (Refused, ConfigError, StoreError) as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
