"""The embedded in-memory store: the engine's rows in a dict, one lock for atomicity.

Example:
    >>> from tbc_integrations import BudgetManager
    >>> from tbc_integrations.stores import MemoryStore
    >>> m = BudgetManager(store=MemoryStore())
    >>> _ = m.register_agent("a", max_tokens=100)
    >>> m.remaining("a")
    100
"""

from __future__ import annotations

import copy
import heapq
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

from tbc_integrations import _engine as engine
from tbc_integrations._contracts import BudgetContract
from tbc_integrations._engine import (
    EXPIRED,
    EXPIRED_MEMORY_SECONDS,
    LIMIT_MEMORY_SECONDS,
    OPEN,
    SETTLED,
    AgentRow,
    Events,
    LimitHold,
    LimitRow,
    TeamHold,
    TeamRow,
    Transaction,
)
from tbc_integrations._records import Reservation
from tbc_integrations._usage import Usage
from tbc_integrations.policies import ReallocationPolicy

from ._base import EngineStore

__all__ = ["MemoryStore"]

_NONE: dict[str, AgentRow] = {}  # the rows of a team not made yet
T = TypeVar("T")
LIMIT_ROWS_CHECK = 1024
"""Limit rows kept before the memory store looks for periods long past to forget."""


def _forgettable(row: LimitRow, now: float) -> bool:
    """A row of a period that ended long ago, with nothing held in it."""
    return row.until + LIMIT_MEMORY_SECONDS < now and not row.reserved and not row.cost_reserved


def _copy(row: LimitRow) -> LimitRow:
    """A copy of a limit row for a reader (the store's own keeps changing)."""
    out = copy.copy(row)
    out.agents = {name: list(spent) for name, spent in row.agents.items()}
    return out


class _Tables(Transaction):
    """The store's state; the lock held by the caller makes each use a transaction.

    Changes are made in place: the engine changes nothing it would have to undo
    (see ``tbc_integrations._engine``).
    """

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.by_name: dict[str, AgentRow] = {}
        self.contract_of: dict[str, BudgetContract] = {}
        self.dependents_of: dict[str, list[str]] = {}
        self.open: dict[str, Reservation] = {}
        self.expired: dict[str, Reservation] = {}  # in the order their leases lapsed
        self.due = math.inf  # no open reservation's lease ends before this
        self.prefix = f"{os.getpid():x}.{id(self):x}."
        self.last_id = 0  # ids issued: prefix + 1 .. prefix + last_id
        self.allocation = 0
        self.limit_rows: dict[str, LimitRow] = {}
        self.limits_check_at = LIMIT_ROWS_CHECK
        self.forget_due = math.inf  # no lapsed reservation is due to be forgotten before this
        # teams per run: their records and rows, the one worked on, and a heap of
        # (until, key) to find idle ones (an entry may be older than its record)
        self.team = ""
        self.teams: dict[str, tuple[TeamRow, dict[str, AgentRow]]] = {}
        self.team_heap: list[tuple[float, str]] = []
        # the engine's row lookup is the dict's own (it runs on every verb)
        self.agent = self.by_name.get  # type: ignore[method-assign, assignment]

    def agent(self, name: str) -> AgentRow | None:
        return self.by_name.get(name)

    def enter(self, key: str) -> TeamRow | None:
        self.team = key
        if not key:
            self.agent = self.by_name.get  # type: ignore[method-assign, assignment]
            return None
        found = self.teams.get(key)
        if found is None:
            self.agent = _NONE.get  # type: ignore[method-assign, assignment]
            return None
        self.agent = found[1].get  # type: ignore[method-assign, assignment]
        return found[0]

    def add_team(self, row: TeamRow) -> None:
        rows: dict[str, AgentRow] = {}
        self.teams[row.key] = (row, rows)
        heapq.heappush(self.team_heap, (row.until, row.key))
        self.agent = rows.get  # type: ignore[method-assign, assignment]

    def add_row(self, row: AgentRow) -> None:
        self.teams[self.team][1][row.name] = row

    def forget_team(self, key: str) -> None:
        self.teams.pop(key, None)

    def idle_teams(self, now: float) -> list[str]:
        heap, out = self.team_heap, []
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            found = self.teams.get(key)
            if found is None:
                continue  # forgotten already
            if found[0].until <= now:
                out.append(key)
            else:  # active since: look again at its present end
                heapq.heappush(heap, (found[0].until, key))
        return out

    def rows(self) -> Iterable[AgentRow]:
        return self.by_name.values()

    def contracts(self) -> Mapping[str, BudgetContract]:
        return self.contract_of

    def add_agent(self, contract: BudgetContract, row: AgentRow) -> None:
        self.by_name[row.name] = row
        self.contract_of[row.name] = contract
        for producer in contract.depends_on:
            self.dependents_of.setdefault(producer, []).append(row.name)

    def dependents(self, name: str) -> Iterable[str]:
        return self.dependents_of.get(name, ())

    def total(self) -> int:
        return self.allocation

    def set_total(self, total: int) -> None:
        self.allocation = total

    def hold(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        expires_at: float,
        loans: tuple[tuple[str, int], ...],
        cost: int,
        limits: tuple[str, ...],
        model: str | None = None,
        provider: str | None = None,
    ) -> Reservation:
        self.last_id += 1
        rid = self.prefix + str(self.last_id)
        res = Reservation(
            rid,
            agent,
            input_tokens,
            output_tokens,
            expires_at,
            loans,
            self.namespace,
            cost,
            model,
            provider,
            limits,
            self.team,
        )
        self.open[rid] = res
        if expires_at < self.due:
            self.due = expires_at
        return res

    def limit(self, key: str) -> LimitRow | None:
        return self.limit_rows.get(key)

    def add_limit(self, row: LimitRow, now: float) -> None:
        rows = self.limit_rows
        if len(rows) >= self.limits_check_at:  # forget periods long past, now and then
            for key in [k for k, r in rows.items() if _forgettable(r, now)]:
                del rows[key]
            self.limits_check_at = max(LIMIT_ROWS_CHECK, 2 * len(rows))
        rows[row.key] = row

    def find(self, rid: str) -> tuple[str, Reservation] | None:
        res = self.open.get(rid)
        if res is not None:
            return OPEN, res
        res = self.expired.get(rid)
        if res is not None:
            return EXPIRED, res
        if self._issued(rid):  # neither open nor waiting for a late commit: settled
            return SETTLED, Reservation(rid, "?", 0, 0, 0.0, (), self.namespace)
        return None

    def _issued(self, rid: str) -> bool:
        """Whether this store issued ``rid`` (ids are its prefix and a counter)."""
        tail = rid[len(self.prefix) :]
        return rid.startswith(self.prefix) and tail.isdigit() and 0 < int(tail) <= self.last_id

    def settle(self, rid: str, now: float) -> None:
        if self.open.pop(rid, None) is None:
            del self.expired[rid]
        if self.expired and now > self.forget_due:
            self._forget(now)

    def lapse(self, rid: str, now: float) -> None:
        res = self.expired[rid] = self.open.pop(rid)
        if self.forget_due == math.inf:
            self.forget_due = res.expires_at + EXPIRED_MEMORY_SECONDS

    def lapsed(self, now: float) -> Sequence[Reservation]:
        due = sorted(
            (res for res in self.open.values() if res.expires_at <= now),
            key=lambda res: (res.expires_at, int(res.id[len(self.prefix) :])),
        )
        self.due = min(
            (res.expires_at for res in self.open.values() if res.expires_at > now),
            default=math.inf,
        )
        return due

    def _forget(self, now: float) -> None:
        """Drop lapsed reservations past their memory, oldest first."""
        expired = self.expired
        while expired:
            rid, res = next(iter(expired.items()))
            if res.expires_at + EXPIRED_MEMORY_SECONDS >= now:
                self.forget_due = res.expires_at + EXPIRED_MEMORY_SECONDS
                return
            del expired[rid]
        self.forget_due = math.inf


class MemoryStore(EngineStore):
    """Thread-safe store in this process's memory (the default).

    Args:
        namespace: Label carried by reservations and events.

    Example:
        >>> store = MemoryStore(namespace="run-1")
        >>> store.namespace
        'run-1'
    """

    def __init__(self, namespace: str = "default") -> None:
        self.namespace = namespace
        self._lock = threading.Lock()
        self._tables = _Tables(namespace)

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        with self._lock:
            if self._tables.team:
                self._tables.enter("")
            yield self._tables

    def _run(self, events: Events, verb: Callable[..., T], *args: Any, **extra: Any) -> T:
        # Nothing here is ever rolled back (the engine decides before it changes
        # anything), so the verb's events go straight to the caller's list; and the
        # lock is taken without a context manager: this runs on every governed call.
        self._lock.acquire()
        try:
            return verb(self._tables, *args, events, **extra)
        finally:
            self._lock.release()

    # The two verbs of every governed call run the engine under the lock directly.

    def reserve(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        now: float,
        lease_seconds: float,
        policy: ReallocationPolicy,
        events: Events,
        clamp_output: bool = False,
        cost: int = 0,
        holds: Sequence[LimitHold] = (),
        team: TeamHold | None = None,
        model: str | None = None,
        provider: str | None = None,
    ) -> Reservation:
        self._lock.acquire()
        try:
            return engine.reserve(
                self._tables,
                agent,
                input_tokens,
                output_tokens,
                now,
                lease_seconds,
                policy,
                clamp_output,
                events,
                cost,
                holds,
                team,
                model,
                provider,
            )
        finally:
            self._lock.release()

    def commit(
        self,
        rid: str,
        usage: Usage | None,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
        estimated: bool = False,
        cost: int | None = None,
    ) -> int:
        self._lock.acquire()
        try:
            return engine.commit(self._tables, rid, usage, now, policy, estimated, events, cost)
        finally:
            self._lock.release()

    def limit_rows(self, prefix: str = "") -> list[LimitRow]:
        with self._lock:
            rows = self._tables.limit_rows
            return [_copy(rows[k]) for k in sorted(rows) if k.startswith(prefix)]

    def limit(self, key: str) -> LimitRow | None:
        with self._lock:
            row = self._tables.limit_rows.get(key)
            return None if row is None else _copy(row)

    def open_reservations(self) -> list[Reservation]:
        """Reservations not yet settled (for tests and diagnostics)."""
        with self._lock:
            return list(self._tables.open.values())
