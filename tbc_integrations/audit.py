"""The audit log: every ledger event as one JSON line, and the ledger rebuilt from it.

A log starts with a snapshot of the ledger when it was attached (contracts and
per-agent state), then one line per event, flushed as it is written, so a crash
loses at most the line being written. :func:`replay_log` rebuilds the final
state; it equals the live ``status()``.

Example:
    >>> import tempfile, pathlib
    >>> from tbc_integrations import BudgetManager
    >>> from tbc_integrations.audit import AuditLog, replay_log
    >>> m = BudgetManager(); _ = m.register_agent("a", max_tokens=100)
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "audit.jsonl"
    >>> with AuditLog(path).attach(m):
    ...     with m.spend("a", 10, 10) as call:
    ...         call.set_usage((7, 3))
    >>> replay_log(path).status() == m.status()
    True
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tbc_integrations._contracts import BudgetContract
from tbc_integrations._errors import ContractError
from tbc_integrations._ledger import Ledger
from tbc_integrations._records import AgentStatus
from tbc_integrations.events import BudgetEvent, event_from_dict, event_to_dict
from tbc_integrations.replay import LedgerReplay

__all__ = ["AuditLog", "AuditRecord", "read_log", "replay_log"]

logger = logging.getLogger("tbc_integrations.audit")
SNAPSHOT = "snapshot"


class AuditLog:
    """A subscriber that appends every event to a JSON-lines file.

    Args:
        path: The log file (appended to; its directory is created).
        fsync: Also ``fsync`` after each line (survives a machine crash, slower).

    Example:
        >>> import tempfile, pathlib
        >>> log = AuditLog(pathlib.Path(tempfile.mkdtemp()) / "a.jsonl")
        >>> log.path.name
        'a.jsonl'
    """

    def __init__(self, path: str | Path, *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._unsubscribe: Callable[[], None] | None = None

    def _open(self) -> IO[str]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        return self._file

    def _write_line(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        with self._lock:
            f = self._open()
            f.write(line)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())

    def __call__(self, event: BudgetEvent) -> None:
        """Write one event (the subscriber callback)."""
        self._write_line(event_to_dict(event))

    def attach(self, ledger: Ledger) -> AuditLog:
        """Write a snapshot of ``ledger`` and log every event from now on; returns self.

        Attach while the ledger is idle (before a run, or between steps): a verb
        finishing in the same instant could land both in the snapshot and in the log.
        """
        self._unsubscribe = ledger.subscribe(self)
        statuses = ledger.status()
        open_now = ledger.store.open_reservations()
        self._write_line(
            {
                "kind": SNAPSHOT,
                "time": ledger.clock(),
                "namespace": ledger.namespace,
                "contracts": {n: c.to_dict() for n, c in ledger.contracts.items()},
                "agents": {n: s.to_dict() for n, s in statuses.items()},
                "open": [
                    {
                        "id": r.id,
                        "agent": r.agent,
                        "tokens": r.amount,
                        "loans": list(r.loans),
                        "cost_nanos": r.cost_nanos,
                        "input_tokens": r.input_tokens,
                        "output_tokens": r.output_tokens,
                    }
                    for r in open_now
                ],
            }
        )
        return self

    def close(self) -> None:
        """Stop logging and close the file."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class AuditRecord:
    """What a log holds: its first snapshot (if any) and its events, in order."""

    namespace: str = "default"
    started: float | None = None
    contracts: dict[str, BudgetContract] = field(default_factory=dict)
    snapshot: dict[str, AgentStatus] = field(default_factory=dict)
    open: list[tuple[str, str, int, tuple[tuple[str, int], ...], int, int, int]] = field(
        default_factory=list
    )
    events: list[BudgetEvent] = field(default_factory=list)

    def replay(self) -> LedgerReplay:
        """The ledger rebuilt from the snapshot and every event."""
        replay = LedgerReplay.from_status(self.snapshot, self.contracts, self.open)
        return replay.apply_all(self.events)


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as f:
        yield from enumerate(f, start=1)


def _status(data: dict[str, Any]) -> AgentStatus:
    """An agent's status as a snapshot line wrote it (money as exact decimal strings)."""
    values = {**data, "depends_on": tuple(data.get("depends_on", ()))}
    for key in ("max_cost", "cost", "cost_reserved", "cost_remaining"):
        if values.get(key) is not None:
            values[key] = Decimal(values[key])
    return AgentStatus(**values)


def read_log(path: str | Path) -> AuditRecord:
    """Read an audit log; a truncated last line (a crash mid-write) is skipped with a warning.

    Raises:
        ContractError: the file is missing, or a line before the last is not valid.
    """
    file = Path(path)
    if not file.exists():
        raise ContractError(f"{file}: no such audit log")
    record = AuditRecord()
    lines = list(_lines(file))
    for index, (number, line) in enumerate(lines):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            if data.get("kind") == SNAPSHOT:
                if record.started is None:
                    record.started = float(data["time"])
                    record.namespace = str(data.get("namespace", "default"))
                    record.contracts = {
                        n: BudgetContract.from_dict(c) for n, c in data["contracts"].items()
                    }
                    record.snapshot = {n: _status(s) for n, s in data["agents"].items()}
                    record.open = [
                        (
                            str(r["id"]),
                            str(r["agent"]),
                            int(r["tokens"]),
                            tuple((str(d), int(t)) for d, t in r["loans"]),
                            int(r.get("cost_nanos", 0)),
                            int(r.get("input_tokens", 0)),
                            int(r.get("output_tokens", 0)),
                        )
                        for r in data.get("open", [])
                    ]
                continue
            record.events.append(event_from_dict(data))
        except (ValueError, KeyError, TypeError) as exc:
            if index == len(lines) - 1 and not line.endswith("\n"):
                logger.warning("%s:%d: skipping a truncated last line", file, number)
                break
            raise ContractError(f"{file}:{number}: not an audit record: {exc}") from None
    return record


def replay_log(path: str | Path) -> LedgerReplay:
    """The ledger's state rebuilt from an audit log (equal to the live ``status()``).

    Example:
        >>> replay_log  # doctest: +ELLIPSIS
        <function replay_log at ...>
    """
    return read_log(path).replay()
