"""The technologist's terminal dashboard (`appliance dashboard`): Textual screens over the store.

Screens: overview.py (alerts, recent results, incoming series, queue), patient.py (serial
course and patient inputs), scan.py (regions, QA, slice preview, review). Styles live in the
.tcss files beside them. Textual is imported only when the dashboard runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.config import Config
    from appliance.store import Store
    from appliance.tui.app import DashboardApp

EXIT_OK = 0


def make_app(config: Config, store: Store) -> DashboardApp:
    """The dashboard over ``store`` (read-only is enough: reviews and patient inputs open a
    writer for the moment of the write)."""
    from appliance.tui.app import DashboardApp

    return DashboardApp(config, store)


def open_store(state_dir: str | Path) -> Store:
    """The state directory's database, read-only; raises the CLI's Refused with one line."""
    from appliance.daemon_cli import refused
    from appliance.store import DB_NAME, Store, StoreError

    try:
        return Store.open(Path(state_dir) / DB_NAME, readonly=True)
    except StoreError as exc:
        raise refused(str(exc)) from None


def run(config: Config, state_dir: str | Path) -> int:
    """Open the store and run the dashboard until the user quits."""
    with open_store(state_dir) as store:
        make_app(config, store).run()
    return EXIT_OK


def cmd_dashboard(args: argparse.Namespace) -> int:
    from appliance.daemon_cli import state_dir

    config, state = state_dir(args)
    return run(config, state)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Add `dashboard` to the CLI's subparsers."""
    p = sub.add_parser("dashboard", help="terminal dashboard: results, queue, patients, review")
    from appliance.daemon_cli import add_state_args

    add_state_args(p)
    p.set_defaults(func=cmd_dashboard)
