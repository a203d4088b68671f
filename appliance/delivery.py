"""Delivering the outbox: take pending rows from the store, C-STORE them per destination, record
each file's outcome.

The store owns the queue (the ``outbox`` table), :mod:`appliance.dicom.send` owns one attempt
(an association, a :class:`~appliance.dicom.send.SendReport`) and the backoff arithmetic; this
module joins them. It is used by the daemon's sender process (:func:`deliver` with
``due_only=True`` in a loop) and by `appliance send` (everything pending, now).

Per destination, up to ``limit`` rows are taken with a lease long enough for one association
with that many files to finish or time out (:meth:`Settings.lease_s`): a second sender never
sends them meanwhile, and rows of a sender that died are taken again when the lease ends (the
daemon's supervisor releases its dead sender's rows at once). Outcomes: delivered -> sent;
transient (peer down, out of resources) -> pending with the next attempt after the backoff;
permanent (refused, unreadable) or out of attempts -> failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from appliance.config import Config
from appliance.dicom.send import Destination, FileStatus, Outcome, RetryPolicy, send_files
from appliance.store import EventKind, OutboxItem, OutboxState, Store

log = logging.getLogger(__name__)

BATCH_FILES = 20
"""Files sent over one association; bounds the lease (a result is 5 files)."""
LEASE_MARGIN_S = 10.0
"""Added to a lease for reading the files and writing the outcomes."""


@dataclass(frozen=True)
class Settings:
    """What a sender needs from the configuration."""

    calling_ae_title: str
    timeout_s: float
    policy: RetryPolicy
    max_attempts: int

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        s = config.send
        return cls(config.dicom.ae_title, s.timeout_s,
                   RetryPolicy(s.retry_base_s, s.retry_factor, s.retry_max_s), s.max_attempts)

    def lease_s(self, files: int) -> float:
        """Longest one association with ``files`` files can take: connect, negotiate, one
        response per file and the release, each bounded by ``timeout_s``."""
        return self.timeout_s * (files + 3) + LEASE_MARGIN_S


@dataclass(frozen=True)
class Attempt:
    """One association's worth of files to one destination, and what became of them."""

    destination: str
    files: int
    delivered: int
    to_retry: int
    failed: int
    error: str | None
    """Why files were not delivered (the association's error, else the first file's)."""

    @property
    def ok(self) -> bool:
        return self.delivered == self.files

    def summary(self) -> str:
        text = (f"{self.destination}: {self.delivered} of {self.files} delivered, "
                f"{self.to_retry} to retry, {self.failed} failed")
        return text + (f" ({self.error})" if self.error else "")


def merge(attempts: Sequence[Attempt]) -> list[Attempt]:
    """One Attempt per destination (in first-seen order), adding up the counts."""
    out: dict[str, Attempt] = {}
    for a in attempts:
        b = out.get(a.destination)
        out[a.destination] = a if b is None else Attempt(
            a.destination, b.files + a.files, b.delivered + a.delivered, b.to_retry + a.to_retry,
            b.failed + a.failed, b.error or a.error)
    return list(out.values())


def deliver(store: Store, state_dir: str | Path, settings: Settings, *, holder: str,
            due_only: bool = True, result_id: int | None = None, destination: str | None = None,
            limit: int = BATCH_FILES, now: Callable[[], float] = time.time,
            before_send: Callable[[float], None] | None = None,
            stop: Callable[[], bool] | None = None) -> list[Attempt]:
    """One pass over the destinations with pending rows (due ones, or all with ``due_only``
    False; only ``result_id``'s or ``destination``'s when given): up to ``limit`` rows each,
    held for ``holder`` (:meth:`Store.claim_outbox`), over one association.
    ``before_send(lease_s)`` is called before each association (the daemon keeps its
    heartbeat for that long); ``stop()`` ends the pass between destinations. ``now`` is the
    clock (tests move it). Returns one Attempt per association."""
    if not isinstance(store, Store):
        raise TypeError(f"`store` must be a Store, got {type(store).__name__}")
    state = Path(state_dir)
    attempts = []
    for dest in store.pending_destinations(now(), due_only=due_only, result_id=result_id):
        if destination is not None and dest != destination:
            continue
        if stop is not None and stop():
            break
        items = store.claim_outbox(now(), settings.lease_s, holder=holder, due_only=due_only,
                                   result_id=result_id, destination=dest, limit=limit)
        if not items:
            continue  # another sender holds them
        if before_send is not None:
            before_send(settings.lease_s(len(items)))
        attempts.append(_send(store, state, settings, dest, items, now))
    return attempts


def _send(store: Store, state: Path, settings: Settings, dest: str, items: list[OutboxItem],
          now: Callable[[], float]) -> Attempt:
    # A file listed by two results (identical re-analysis) is sent once; both rows get its outcome.
    by_path: dict[str, list[OutboxItem]] = {}
    for item in items:
        by_path.setdefault(item.path, []).append(item)
    error: str | None
    try:
        target = Destination.parse(dest, calling_ae_title=settings.calling_ae_title,
                                   timeout_s=settings.timeout_s)
    except (TypeError, ValueError) as exc:
        error = f"bad destination {dest!r}: {exc}"
        statuses = [FileStatus(state / p, Outcome.FAILED, error) for p in by_path]
    else:
        try:
            report = send_files(target, [state / p for p in by_path])
        except ValueError as exc:  # two of the files hold one instance: never sendable together
            error = f"cannot send these files together: {exc}"
            statuses = [FileStatus(state / p, Outcome.FAILED, error) for p in by_path]
        else:
            statuses, error = list(report.files), report.association_error
    counts = {Outcome.SENT: 0, Outcome.RETRY: 0, Outcome.FAILED: 0}
    per_result: dict[int, dict[Outcome, list[str]]] = {}
    at = now()
    with store.transaction():
        for path, status in zip(by_path, statuses, strict=True):
            if error is None and not status.outcome.delivered:
                error = status.message
            for item in by_path[path]:
                if status.outcome.delivered:
                    outcome = Outcome.SENT
                    store.mark_sent(item.id, at)
                else:
                    done = store.mark_failed(item.id, status.message, at,
                                             retry=status.outcome.retryable,
                                             policy=settings.policy,
                                             max_attempts=settings.max_attempts)
                    outcome = Outcome.RETRY if done.state is OutboxState.PENDING else Outcome.FAILED
                counts[outcome] += 1
                per_result.setdefault(item.result_id, {}).setdefault(outcome, []).append(
                    status.message)
        for result_id, outcomes in per_result.items():
            _record(store, result_id, dest, outcomes, at)
    attempt = Attempt(dest, len(items), counts[Outcome.SENT], counts[Outcome.RETRY],
                      counts[Outcome.FAILED], error)
    (log.info if attempt.ok else log.warning)("outbox: %s", attempt.summary())
    return attempt


def _record(store: Store, result_id: int, dest: str, outcomes: dict[Outcome, list[str]],
            at: float) -> None:
    """One event per result and outcome of this attempt."""
    kinds = {Outcome.SENT: EventKind.OUTPUTS_SENT, Outcome.RETRY: EventKind.OUTPUTS_RETRY,
             Outcome.FAILED: EventKind.OUTPUTS_FAILED}
    for outcome, messages in outcomes.items():
        detail = f"result {result_id} to {dest}: {len(messages)} file(s) {outcome.value}"
        if outcome is not Outcome.SENT:
            detail += f": {messages[0]}"
        store.outbox_event(kinds[outcome], result_id, detail, at)
