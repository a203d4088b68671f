"""`appliance send`: deliver results to PACS now (argument parsing and output only).

- ``appliance send RESULT_ID`` sends that result's DICOM outputs (SEG, SR, key images) again,
  whatever their outbox state: to ``--to AE@HOST:PORT`` only, or else to every destination its
  outbox rows name plus ``send.destinations``. (The daemon writes a result's outputs when a
  destination is configured; a result analysed without one has none to send.)
- ``appliance send --all-pending`` sends every pending file now, without waiting for its next
  attempt (only those for ``--to`` when given).

It records outcomes in the outbox as the daemon's sender does (sent, or the next attempt after
the backoff, or failed), and never sends a file the daemon's sender holds at that moment. Prints
one line per destination. Exit codes: 0 every file delivered, 1 some not, 2 bad input.
`appliance.cli` adds it with ``send_cli.register(sub)``.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from appliance.daemon_cli import add_state_args, state_dir
from appliance.daemon_cli import refused as _refused

EXIT_OK, EXIT_NOT_DELIVERED = 0, 1
ALL_FILES = 100_000
"""Files per destination in one `appliance send` (one association): all of them."""


def _result_files(store, state: Path, result_id: int) -> list[str]:
    """The files the outbox holds for the result (the daemon writes them for the destinations
    configured when it analysed the result)."""
    if store.result(result_id) is None:
        raise _refused(f"no result {result_id} in the store")
    files = list(dict.fromkeys(item.path for item in store.outbox_items(result_id=result_id)))
    if not files:
        raise _refused(f"result {result_id} has no DICOM outputs: no destination was configured "
                       "when it was analysed, or writing them failed (see the outputs_failed "
                       "events); `appliance analyze SERIES --dicom-out DIR` writes them")
    if not any((state / f).is_file() for f in files):
        raise _refused(f"the DICOM outputs of result {result_id} are no longer on disk "
                       "(removed by retention?)")
    return files


def cmd_send(args: argparse.Namespace) -> int:
    from appliance.delivery import Settings, deliver, merge
    from appliance.dicom.send import Destination
    from appliance.store import DB_NAME, Store, StoreError

    config, state = state_dir(args)
    to = None
    if args.to is not None:
        try:
            to = str(Destination.parse(args.to))
        except ValueError as exc:
            raise _refused(f"--to: {exc}") from None
    if args.result_id is not None and args.result_id < 1:
        raise _refused(f"RESULT_ID must be a positive result id, got {args.result_id}")
    if not (state / DB_NAME).is_file():
        raise _refused(f"no database at {state / DB_NAME} (has the daemon run with this state dir?)")
    # the summary lines say what happened; the association logs would repeat it
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("appliance.delivery").setLevel(logging.ERROR)
    settings = Settings.from_config(config)
    holder = f"cli:{os.getpid()}"  # a lease the daemon's sender respects
    try:
        store = Store.open(state / DB_NAME)
    except StoreError as exc:
        raise _refused(str(exc)) from None
    with store:
        if args.result_id is None:
            attempts = deliver(store, state, settings, holder=holder, due_only=False,
                               destination=to, limit=ALL_FILES)
            if not attempts:
                print("nothing pending" + (f" for {to}" if to else ""))
                return EXIT_OK
        else:
            result_id = args.result_id
            files = _result_files(store, state, result_id)
            known = {item.destination for item in store.outbox_items(result_id=result_id)}
            destinations = [to] if to else sorted(known | set(config.send.destinations))
            store.enqueue_outputs(result_id, destinations, files)
            store.requeue_outputs(result_id, destinations)
            attempts = deliver(store, state, settings, holder=holder, due_only=False,
                               result_id=result_id, destination=to, limit=ALL_FILES)
            if not attempts:
                print(f"result {result_id}: the daemon is sending its files right now")
                return EXIT_NOT_DELIVERED
    merged = merge(attempts)
    for attempt in merged:
        print(attempt.summary())
    return EXIT_OK if all(a.ok for a in merged) else EXIT_NOT_DELIVERED


def register(sub: argparse._SubParsersAction) -> None:
    """Add `send` to the CLI's subparsers."""
    p = sub.add_parser("send", help="send results to PACS now: one result again, or all pending",
                       description="Send DICOM results now. Exit 0 when every file was "
                                   "delivered, 1 when some were not, 2 on bad input.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("result_id", metavar="RESULT_ID", type=int, nargs="?",
                       help="send this result's SEG, SR and key images again")
    which.add_argument("--all-pending", action="store_true",
                       help="send every pending file now, without waiting for its next attempt")
    p.add_argument("--to", metavar="AE@HOST:PORT",
                   help="this destination only (default: the configured ones and, for a "
                        "result, those it was queued for)")
    add_state_args(p)
    p.set_defaults(func=cmd_send)
