"""The audit log: every ledger event as one JSON line, and the ledger rebuilt from it.

A log starts with a snapshot of the ledger when it was attached (contracts,
per-agent state, the ledger's limits and their rows), then one line per event,
flushed as it is written, so a crash loses at most the line being written.
:func:`replay_log` rebuilds the final state; it equals the live ``status()``, and
:meth:`AuditRecord.limit_statuses` rebuilds the limit rows (each scope value's and
period's spend, per agent) from the calls' ``limits``.

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

import copy
import json
import logging
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from tbc_integrations._contracts import BudgetContract
from tbc_integrations._engine import LimitRow
from tbc_integrations._errors import ContractError
from tbc_integrations._ledger import Ledger
from tbc_integrations._limits import NEVER, Limit, row_status, split_key
from tbc_integrations._records import AgentStatus, LimitStatus
from tbc_integrations._validate import check_agent_name
from tbc_integrations.events import (
    EVENT_TYPES,
    AgentRegistered,
    BudgetEvent,
    BudgetWarning,
    Committed,
    Expired,
    Released,
    Reserved,
    Transferred,
    event_from_dict,
    event_to_dict,
)
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
                        "limits": list(r.limits),
                    }
                    for r in open_now
                ],
                "limits": [limit.to_dict() for limit in ledger.limits],
                "limit_rows": [_row_data(row) for row in ledger.store.limit_rows()],
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


def _row_data(row: LimitRow) -> dict[str, Any]:
    """A limit row as the snapshot line records it."""
    return {
        "key": row.key,
        "max_tokens": row.max_tokens,
        "max_cost": row.max_cost,
        "warn_tokens": row.warn_tokens,
        "warn_cost": row.warn_cost,
        "until": row.until,
        "consumed": row.consumed,
        "reserved": row.reserved,
        "cost": row.cost,
        "cost_reserved": row.cost_reserved,
        "warned": row.warned,
        "agents": {name: list(spent) for name, spent in row.agents.items()},
    }


@dataclass
class AuditRecord:
    """What a log holds: its first snapshot (if any) and its events, in order.

    ``limits`` are the ledger's limits when the log was attached, ``limit_rows`` their
    rows then (by key), and ``open_limits`` the limit rows each open reservation holds.
    """

    namespace: str = "default"
    started: float | None = None
    contracts: dict[str, BudgetContract] = field(default_factory=dict)
    snapshot: dict[str, AgentStatus] = field(default_factory=dict)
    open: list[tuple[str, str, int, tuple[tuple[str, int], ...], int, int, int]] = field(
        default_factory=list
    )
    events: list[BudgetEvent] = field(default_factory=list)
    limits: list[Limit] = field(default_factory=list)
    limit_rows: dict[str, LimitRow] = field(default_factory=dict)
    open_limits: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def replay(self) -> LedgerReplay:
        """The ledger rebuilt from the snapshot and every event."""
        replay = LedgerReplay.from_status(self.snapshot, self.contracts, self.open)
        return replay.apply_all(self.events)

    def limit_statuses(self) -> list[LimitStatus]:
        """Every limit row after the last event, by limit, scope value and period.

        Rebuilt from the snapshot's rows and the calls' ``limits`` (held by ``Reserved``,
        settled by ``Committed``, given back by ``Released``/``Expired``; ``warned`` from
        the warnings). A row's caps come from the log's limits (none when the log
        does not name the limit).

        Example:
            >>> AuditRecord().limit_statuses()
            []
        """
        rows = {key: copy.deepcopy(row) for key, row in self.limit_rows.items()}
        limits = {limit.name: limit for limit in self.limits}
        held: dict[str, tuple[tuple[str, ...], int, int]] = {
            rid: (keys, tokens, cost)
            for rid, _, tokens, _, cost, *_ in self.open
            if (keys := self.open_limits.get(rid))
        }

        def row(key: str, at: float) -> LimitRow:
            found = rows.get(key)
            if found is None:
                name, value, _ = split_key(key)
                limit = limits.get(name)
                hold = None if limit is None else limit.hold(value, at)
                if hold is None or hold[0] != key:  # a limit the log does not define
                    hold = (key, None, None, None, None, NEVER)
                found = rows[key] = LimitRow(hold)
            return found

        for e in self.events:
            if isinstance(e, Reserved) and e.limits:
                held[e.reservation_id or ""] = (e.limits, e.tokens, e.cost_nanos)
                for key in e.limits:
                    r = row(key, e.time)
                    r.reserved += e.tokens
                    r.cost_reserved += e.cost_nanos
            elif isinstance(e, Committed) and e.limits:
                hold = held.pop(e.reservation_id or "", None)
                for key in e.limits:
                    r = row(key, e.time)
                    if hold is not None and e.reason != "late":
                        r.reserved -= hold[1]
                        r.cost_reserved -= hold[2]
                    r.consumed += e.tokens
                    r.cost += e.cost_nanos
                    spent = r.agents.setdefault(e.agent, [0, 0, 0])
                    spent[0] += e.tokens
                    spent[1] += e.cost_nanos
                    spent[2] += 1
            elif isinstance(e, (Released, Expired)):
                hold = held.pop(e.reservation_id or "", None)
                if hold is not None:
                    keys, tokens, cost = hold
                    for key in keys:
                        r = row(key, e.time)
                        r.reserved -= tokens
                        r.cost_reserved -= cost
            elif isinstance(e, BudgetWarning) and e.limit is not None:
                row(e.reason, e.time).warned = True
        statuses = [row_status(r) for r in rows.values()]
        return sorted(statuses, key=lambda s: (s.limit, s.value, s.ends or math.inf, s.period))


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as f:
        yield from enumerate(f, start=1)


_BIG = 2**63
"""Integers in a log (tokens, nano-dollars, counts) are below this in size."""


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and abs(value) < _BIG


def _decimal(value: Any) -> bool:
    if type(value) not in (str, int, float) or (isinstance(value, str) and len(value) > 40):
        return False
    try:
        return Decimal(value).is_finite()
    except (InvalidOperation, ValueError):
        return False


def _pairs(value: Any) -> bool:
    return type(value) is list and all(
        type(p) is list and len(p) == 2 and type(p[0]) is str and type(p[1]) is int for p in value
    )


_CHECKS: dict[str, Callable[[Any], bool]] = {
    "str": lambda v: type(v) is str,
    "int": lambda v: type(v) is int and abs(v) < _BIG,
    "float": _number,
    "bool": lambda v: type(v) is bool,
    "Decimal": _decimal,
    "tuple[str, ...]": lambda v: type(v) is list and all(type(x) is str for x in v),
    "tuple[tuple[str, int], ...]": _pairs,
    "Mapping[str, Any]": lambda v: type(v) is dict,
}


def _check_fields(cls: type, data: Mapping[str, Any], what: str) -> None:
    """Refuse a value whose JSON type does not fit the field of ``cls`` it fills."""
    for f in fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        kind = str(f.type)
        optional = kind.endswith(" | None")
        kind = kind.removesuffix(" | None")
        if value is None and optional:
            continue
        check = _CHECKS.get(kind)
        if check is not None and not check(value):
            raise ValueError(f"{what}: field {f.name!r} must be {kind}, got {_shown(value)}")
    if "agent" in data:
        check_agent_name(data["agent"])


def _object(value: Any, what: str) -> dict[str, Any]:
    if type(value) is not dict:
        raise ValueError(f"{what} must be a JSON object, got {_shown(value)}")
    return value


def _status(data: Any, name: str) -> AgentStatus:
    """An agent's status as a snapshot line wrote it (money as exact decimal strings)."""
    data = _object(data, f"agent {name!r}")
    _check_fields(AgentStatus, data, f"agent {name!r}")
    values = {**data, "depends_on": tuple(data.get("depends_on", ()))}
    for key in ("max_cost", "cost", "cost_reserved", "cost_remaining"):
        if values.get(key) is not None:
            values[key] = Decimal(values[key])
    return AgentStatus(**values)


def _open_hold(
    data: Any, agents: Mapping[str, Any]
) -> tuple[str, str, int, tuple[tuple[str, int], ...], int, int, int]:
    hold = _object(data, "an open reservation")
    for key, kind in (("id", str), ("agent", str), ("tokens", int), ("loans", list)):
        if type(hold.get(key)) is not kind:
            raise ValueError(f"open reservation: {key!r} must be {kind.__name__}")
    for key in ("cost_nanos", "input_tokens", "output_tokens"):
        if key in hold and type(hold[key]) is not int:
            raise ValueError(f"open reservation: {key!r} must be int")
    if not _pairs(hold["loans"]):
        raise ValueError("open reservation: 'loans' must be [donor, tokens] pairs")
    for name in (hold["agent"], *(d for d, _ in hold["loans"])):
        if name not in agents:
            raise ValueError(f"open reservation names an agent not in the snapshot: {_shown(name)}")
    return (
        hold["id"],
        hold["agent"],
        hold["tokens"],
        tuple((d, t) for d, t in hold["loans"]),
        hold.get("cost_nanos", 0),
        hold.get("input_tokens", 0),
        hold.get("output_tokens", 0),
    )


def _limit_row(data: Any) -> LimitRow:
    """A limit row as a snapshot line recorded it, checked like API input."""
    x = _object(data, "a limit row")
    key = x.get("key")
    if type(key) is not str or key.count("/") < 2:
        raise ValueError(f"limit row: 'key' must be limit/value/period, got {_shown(key)}")
    for name in ("max_tokens", "max_cost", "warn_tokens", "warn_cost"):
        if x.get(name) is not None and not _CHECKS["int"](x[name]):
            raise ValueError(f"limit row {key!r}: {name!r} must be int, got {_shown(x[name])}")
    for name in ("consumed", "reserved", "cost", "cost_reserved"):
        if not _CHECKS["int"](x.get(name)):
            raise ValueError(f"limit row {key!r}: {name!r} must be int")
    if not _number(x.get("until")) or type(x.get("warned")) is not bool:
        raise ValueError(f"limit row {key!r}: 'until' must be a number and 'warned' a bool")
    agents = _object(x.get("agents", {}), f"limit row {key!r}: 'agents'")
    for name, spent in agents.items():
        if type(spent) is not list or len(spent) != 3 or not all(_CHECKS["int"](v) for v in spent):
            raise ValueError(f"limit row {key!r}: agent {_shown(name)} needs [tokens, cost, calls]")
    row = LimitRow(
        (
            key,
            x.get("max_tokens"),
            x.get("max_cost"),
            x.get("warn_tokens"),
            x.get("warn_cost"),
            float(x["until"]),
        )
    )
    row.consumed, row.reserved, row.cost = x["consumed"], x["reserved"], x["cost"]
    row.cost_reserved, row.warned = x["cost_reserved"], x["warned"]
    row.agents = {str(name): list(spent) for name, spent in agents.items()}
    return row


def _snapshot(data: dict[str, Any], record: AuditRecord) -> None:
    if not _number(data.get("time")):
        raise ValueError(f"snapshot: 'time' must be a number, got {_shown(data.get('time'))}")
    namespace = data.get("namespace", "default")
    if type(namespace) is not str:
        raise ValueError(f"snapshot: 'namespace' must be str, got {_shown(namespace)}")
    contracts = _object(data.get("contracts"), "snapshot: 'contracts'")
    agents = _object(data.get("agents"), "snapshot: 'agents'")
    opened = data.get("open", [])
    if type(opened) is not list:
        raise ValueError(f"snapshot: 'open' must be a list, got {_shown(opened)}")
    record.started = float(data["time"])
    record.namespace = namespace
    record.contracts = {
        n: BudgetContract.from_dict(_object(c, f"contract {n!r}")) for n, c in contracts.items()
    }
    for n, c in record.contracts.items():
        if c.agent_name != n:
            raise ValueError(f"contract {_shown(n)} names another agent: {_shown(c.agent_name)}")
    record.snapshot = {n: _status(s, n) for n, s in agents.items()}
    record.open = [_open_hold(r, agents) for r in opened]
    record.open_limits = {
        r["id"]: tuple(r["limits"])
        for r in opened
        if _CHECKS["tuple[str, ...]"](r.get("limits", [])) and r.get("limits")
    }
    limits = data.get("limits", [])
    if type(limits) is not list:
        raise ValueError(f"snapshot: 'limits' must be a list, got {_shown(limits)}")
    record.limits = [Limit.from_dict(_object(x, "a limit")) for x in limits]
    rows = data.get("limit_rows", [])
    if type(rows) is not list:
        raise ValueError(f"snapshot: 'limit_rows' must be a list, got {_shown(rows)}")
    record.limit_rows = {}
    for x in rows:
        r = _limit_row(x)
        record.limit_rows[r.key] = r


def _event(data: dict[str, Any], known: set[str]) -> BudgetEvent:
    cls = EVENT_TYPES.get(str(data.get("kind")))
    if cls is not None:
        _check_fields(cls, data, f"event {data.get('kind')!r}")
    event = event_from_dict(data)
    if isinstance(event, AgentRegistered):
        if event.contract is not None:
            BudgetContract.from_dict(event.contract)
        known.add(event.agent)
    for name, _ in event.donors:
        if name not in known:
            role = (
                "borrower"
                if isinstance(event, Transferred) and event.reason == "return"
                else "donor"
            )
            raise ValueError(f"{role} {_shown(name)} is not an agent of the log")
    return event


def read_log(path: str | Path) -> AuditRecord:
    """Read an audit log; a truncated last line (a crash mid-write) is skipped with a warning.

    Every line is checked like API input: a JSON object of a known kind, each
    field of its JSON type, every donor an agent the log registered.

    Raises:
        ContractError: the file is missing, or a line before the last is not
            valid (naming the line and what is wrong with it).

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "audit.jsonl"
        >>> _ = path.write_text('{"kind": "commit", "agent": "a", "time": 1, "tokens": "5"}\\n')
        >>> read_log(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        tbc_integrations._errors.ContractError: ...:1: ...field 'tokens' must be int, got '5'
    """
    file = Path(path)
    if not file.exists():
        raise ContractError(f"{file}: no such audit log")
    if not file.is_file():
        raise ContractError(f"{file}: not a file")
    record = AuditRecord()
    known: set[str] = set()
    try:
        lines = list(_lines(file))
    except UnicodeDecodeError as exc:
        raise ContractError(f"{file}: not UTF-8 text: {exc.reason}") from None
    for index, (number, line) in enumerate(lines):
        if not line.strip():
            continue
        try:
            data = _object(json.loads(line), "a line")
            if data.get("kind") == SNAPSHOT:
                if record.started is None:
                    _snapshot(data, record)
                    known.update(record.contracts, record.snapshot)
                continue
            record.events.append(_event(data, known))
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            if index == len(lines) - 1 and not line.endswith("\n"):
                logger.warning("%s:%d: skipping a truncated last line", file, number)
                break
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            raise ContractError(f"{file}:{number}: not an audit record: {why}") from None
    return record


def replay_log(path: str | Path) -> LedgerReplay:
    """The ledger's state rebuilt from an audit log (equal to the live ``status()``).

    Example:
        >>> replay_log  # doctest: +ELLIPSIS
        <function replay_log at ...>
    """
    return read_log(path).replay()
