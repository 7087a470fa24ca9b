"""The store interface, and the base of the stores that run the Python engine.

A :class:`Store` does each ledger verb as one atomic operation. The memory and
SQLite stores are :class:`EngineStore` subclasses: they provide a transaction
(storage and atomicity) and the engine in ``tbc_integrations._engine`` decides
everything else. The Redis store runs a Lua port of the same engine.

Example:
    >>> from tbc_integrations.stores import MemoryStore, Store
    >>> isinstance(MemoryStore(), Store)
    True
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, TypeVar

from tbc_integrations import _engine as engine
from tbc_integrations._contracts import BudgetContract
from tbc_integrations._engine import Events, LimitHold, LimitRow, TeamHold, Transaction
from tbc_integrations._errors import ContractError, TBCError, UnknownAgentError
from tbc_integrations._records import AgentStatus, Reservation
from tbc_integrations._usage import Usage
from tbc_integrations.policies import ReallocationPolicy

__all__ = ["EngineStore", "Store"]

T = TypeVar("T")


class Store(ABC):
    """Atomic verbs over one namespace's agents and reservations.

    Every method is atomic with respect to every other call on the same store,
    from any thread (and, for durable stores, any process). ``now`` is the
    ledger's clock reading; lapsed leases are reclaimed at the start of a verb.
    ``commit`` and ``release`` take a reservation's id: the store's own record
    says whose it is, what it holds and what it borrowed.
    """

    namespace: str
    blocking_io: bool = False
    """True when a verb may wait on a file or a network (async callers move it off the loop)."""

    @abstractmethod
    def register(self, contract: BudgetContract, now: float, events: Events) -> bool:
        """Create the agent, or attach when it exists with an equal contract.

        Returns True when created. Raises ``ContractError`` for a different
        contract under the same name or a dependency cycle.
        """

    @abstractmethod
    def contracts(self) -> dict[str, BudgetContract]:
        """Every agent's contract, by name."""

    @abstractmethod
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
        """Hold tokens for a call, borrowing under ``policy``, or raise before any spend
        (in the run's own team with ``team``; see ``BudgetManager(team_per=...)``).

        The reservation returned carries ``model`` and ``provider`` (what the call is
        priced by); the store keeps neither.
        """

    @abstractmethod
    def check(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
        cost: int = 0,
        holds: Sequence[LimitHold] = (),
        team: TeamHold | None = None,
    ) -> None:
        """Raise as :meth:`reserve` would, but hold and move nothing when it would pass."""

    @abstractmethod
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
        """Settle reservation ``rid`` with real usage; return the uncovered overdraft."""

    @abstractmethod
    def release(self, rid: str, now: float, events: Events) -> None:
        """Return reservation ``rid``'s tokens unused (and its loans to their donors)."""

    @abstractmethod
    def charge(
        self,
        agent: str,
        usage: Usage,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
        estimated: bool = False,
        cost: int = 0,
        holds: Sequence[LimitHold] = (),
        team: TeamHold | None = None,
    ) -> int:
        """Record usage with no reservation; return the uncovered overdraft."""

    @abstractmethod
    def reallocate(
        self,
        agent: str,
        tokens: int,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
        team: TeamHold | None = None,
    ) -> int:
        """Move up to ``tokens`` to ``agent`` for good; return how many moved."""

    @abstractmethod
    def adjust(
        self, agent: str, delta: int, now: float, events: Events, team: TeamHold | None = None
    ) -> None:
        """Grant (``delta`` > 0) or revoke (< 0) allocation from outside the system."""

    @abstractmethod
    def complete(
        self, agent: str, now: float, events: Events, team: TeamHold | None = None
    ) -> None:
        """Mark ``agent`` complete: everything it has left is spare for anyone."""

    @abstractmethod
    def record_confidence(
        self,
        agent: str,
        confidence: float,
        now: float,
        events: Events,
        team: TeamHold | None = None,
    ) -> bool:
        """Record a result's confidence; return whether the agent is now gated."""

    @abstractmethod
    def set_threshold(
        self,
        agent: str,
        threshold: float | None,
        now: float,
        events: Events,
        team: TeamHold | None = None,
    ) -> None:
        """Change the agent's effective confidence threshold."""

    @abstractmethod
    def expire(self, now: float, events: Events) -> int:
        """Reclaim every reservation whose lease lapsed; return how many."""

    @abstractmethod
    def status(self, now: float) -> dict[str, AgentStatus]:
        """A consistent snapshot of every agent (call :meth:`expire` first to reclaim leases)."""

    def team_status(self, key: str, now: float) -> dict[str, AgentStatus]:
        """A consistent snapshot of run ``key``'s own team (fresh numbers for agents it has
        not used, all of them when the run has no team or it was forgotten)."""
        raise ContractError(f"{type(self).__name__} keeps no team per run")

    @abstractmethod
    def remaining(self, agent: str, now: float) -> int:
        """What new reservations for ``agent`` can still use."""

    @abstractmethod
    def open_reservations(self) -> list[Reservation]:
        """Reservations not yet settled (for snapshots and diagnostics)."""

    @abstractmethod
    def limit(self, key: str) -> LimitRow | None:
        """A limit row's numbers (``None``: no call of its period yet)."""

    @abstractmethod
    def limit_rows(self, prefix: str = "") -> list[LimitRow]:
        """Every limit row the store keeps whose key (``limit/value/period``) starts with
        ``prefix``, ordered by key (rows of periods long past are forgotten in time)."""

    def check_policy(self, policy: ReallocationPolicy) -> None:  # noqa: B027 - a hook
        """Refuse, when a ledger is built, a policy this store cannot run (any can, here)."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Release connections or files; the memory store has none."""

    # Async forms. Stores with a native async client override these; the others
    # run the sync verb (the ledger moves a blocking store's verbs off the loop).
    async def areserve(
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
        """Async :meth:`reserve` (in a worker thread when the store waits on I/O)."""
        args = (agent, input_tokens, output_tokens, now, lease_seconds, policy, events)
        rest = (clamp_output, cost, holds, team, model, provider)
        if self.blocking_io:
            return await asyncio.to_thread(self.reserve, *args, *rest)
        return self.reserve(*args, *rest)

    async def acommit(
        self,
        rid: str,
        usage: Usage | None,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
        estimated: bool = False,
        cost: int | None = None,
    ) -> int:
        """Async :meth:`commit` (in a worker thread when the store waits on I/O)."""
        if self.blocking_io:
            return await asyncio.to_thread(
                self.commit, rid, usage, now, policy, events, estimated, cost
            )
        return self.commit(rid, usage, now, policy, events, estimated, cost)

    async def arelease(self, rid: str, now: float, events: Events) -> None:
        """Async :meth:`release` (in a worker thread when the store waits on I/O)."""
        if self.blocking_io:
            await asyncio.to_thread(self.release, rid, now, events)
        else:
            self.release(rid, now, events)


class EngineStore(Store):
    """A store that runs ``tbc_integrations._engine`` inside its own transactions.

    Subclasses implement :meth:`transaction` (and the reads); every verb is the
    engine's function run in one transaction. A verb that fails with a
    :class:`~tbc_integrations.TBCError` keeps what the engine did before it
    decided (the lease sweep, a refusal's count): the transaction commits, the
    events are delivered, and the error is raised. Any other exception rolls the
    transaction back and delivers nothing.
    """

    @abstractmethod
    def transaction(self) -> AbstractContextManager[Transaction]:
        """One atomic transaction: commits on exit, rolls back on an exception."""

    def _run(self, events: Events, verb: Callable[..., T], *args: Any, **extra: Any) -> T:
        sink: Events = None if events is None else []
        error: TBCError | None = None
        result: Any = None
        with self.transaction() as tx:
            try:
                result = verb(tx, *args, sink, **extra)
            except TBCError as exc:
                error = exc
        if sink:
            assert events is not None
            events.extend(sink)
        if error is not None:
            raise error
        return result  # type: ignore[no-any-return]

    def register(self, contract: BudgetContract, now: float, events: Events) -> bool:
        return self._run(events, engine.register, contract, now)

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
        return self._run(
            events,
            engine.reserve,
            agent,
            input_tokens,
            output_tokens,
            now,
            lease_seconds,
            policy,
            clamp_output,
            cost=cost,
            holds=holds,
            team=team,
            model=model,
            provider=provider,
        )

    def check(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
        cost: int = 0,
        holds: Sequence[LimitHold] = (),
        team: TeamHold | None = None,
    ) -> None:
        self._run(
            events,
            engine.check,
            agent,
            input_tokens,
            output_tokens,
            now,
            policy,
            cost=cost,
            holds=holds,
            team=team,
        )

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
        return self._run(events, engine.commit, rid, usage, now, policy, estimated, cost=cost)

    def release(self, rid: str, now: float, events: Events) -> None:
        self._run(events, engine.release, rid, now)

    def charge(
        self,
        agent: str,
        usage: Usage,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
        estimated: bool = False,
        cost: int = 0,
        holds: Sequence[LimitHold] = (),
        team: TeamHold | None = None,
    ) -> int:
        return self._run(
            events,
            engine.charge,
            agent,
            usage,
            now,
            policy,
            estimated,
            cost=cost,
            holds=holds,
            team=team,
        )

    def reallocate(
        self,
        agent: str,
        tokens: int,
        now: float,
        policy: ReallocationPolicy,
        events: Events,
        team: TeamHold | None = None,
    ) -> int:
        return self._run(events, engine.reallocate, agent, tokens, now, policy, team=team)

    def adjust(
        self, agent: str, delta: int, now: float, events: Events, team: TeamHold | None = None
    ) -> None:
        self._run(events, engine.adjust, agent, delta, now, team=team)

    def complete(
        self, agent: str, now: float, events: Events, team: TeamHold | None = None
    ) -> None:
        self._run(events, engine.complete, agent, now, team=team)

    def record_confidence(
        self,
        agent: str,
        confidence: float,
        now: float,
        events: Events,
        team: TeamHold | None = None,
    ) -> bool:
        return self._run(events, engine.record_confidence, agent, confidence, now, team=team)

    def set_threshold(
        self,
        agent: str,
        threshold: float | None,
        now: float,
        events: Events,
        team: TeamHold | None = None,
    ) -> None:
        self._run(events, engine.set_threshold, agent, threshold, now, team=team)

    def expire(self, now: float, events: Events) -> int:
        return self._run(events, engine.expire, now)

    def _read(self) -> AbstractContextManager[Transaction]:
        """A transaction for reading (stores with cheaper read transactions override it)."""
        return self.transaction()

    def contracts(self) -> dict[str, BudgetContract]:
        with self._read() as tx:
            return dict(tx.contracts())

    def status(self, now: float) -> dict[str, AgentStatus]:
        with self._read() as tx:
            contracts = tx.contracts()
            return {
                row.name: engine.agent_status(row, contracts[row.name].depends_on)
                for row in tx.rows()
            }

    def team_status(self, key: str, now: float) -> dict[str, AgentStatus]:
        with self._read() as tx:
            contracts = tx.contracts()
            return {
                row.name: engine.agent_status(row, contracts[row.name].depends_on)
                for row in engine.team_rows(tx, key, now)
            }

    def limit(self, key: str) -> LimitRow | None:
        with self._read() as tx:
            row = tx.limit(key)
            return None if row is None else row.snapshot()

    def remaining(self, agent: str, now: float) -> int:
        with self._read() as tx:
            row = tx.agent(agent)
            if row is None:
                raise UnknownAgentError(agent)
            return engine.available(row)
