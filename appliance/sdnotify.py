"""systemd's notify protocol, written directly (no dependency): one datagram per message to the
AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a leading ``@`` is the abstract namespace).

Outside systemd (no ``NOTIFY_SOCKET``) every call does nothing and returns False, so the daemon
runs the same under a terminal, in tests and under ``Type=notify``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


class Notifier:
    """READY=1, STATUS=..., WATCHDOG=1 and STOPPING=1 for the service manager."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self.address = address or None
        self.watchdog_s = _watchdog_seconds(env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=value`` fields as one message, without blocking; False when there is no
        socket or the send failed (a missing or slow service manager never stops the daemon)."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self.address)
                # never block the supervisor on a manager that does not read its socket
                sock.send(message, socket.MSG_DONTWAIT)
        except BlockingIOError:
            log.debug("sd_notify dropped (the manager's queue is full): %s", fields)
            return False
        except OSError as exc:
            log.warning("sd_notify to %r failed: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """systemd's WatchdogSec for this process (WATCHDOG_USEC, when WATCHDOG_PID is ours)."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None
