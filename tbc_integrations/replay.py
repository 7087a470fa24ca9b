"""Rebuild a ledger's state from its event stream.

:class:`LedgerReplay` applies events, in order, to plain per-agent numbers the
way the store applied the verbs, so a replay of every event since
registration equals the live :meth:`~tbc_integrations.BudgetManager.status`.
It is what audit-log readers, plots and "what if" tools are built on.

Example:
    >>> from tbc_integrations import BudgetManager
    >>> from tbc_integrations.replay import LedgerReplay
    >>> m = BudgetManager()
    >>> replay = LedgerReplay()
    >>> _ = m.subscribe(replay.apply)
    >>> _ = m.register_agent("a", max_tokens=100)
    >>> with m.spend("a", 10, 10) as call:
    ...     call.set_usage((8, 4))
    >>> replay.status() == m.status()
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from tbc_integrations._contracts import BudgetContract
from tbc_integrations._engine import AgentRow, agent_status, lend, rearm, repay
from tbc_integrations._money import to_nanos
from tbc_integrations._records import AgentStatus
from tbc_integrations.events import (
    AgentRegistered,
    BudgetEvent,
    BudgetWarning,
    Committed,
    Completed,
    ConfidenceRecorded,
    Expired,
    GateChanged,
    Refused,
    Released,
    Reserved,
    Transferred,
)

__all__ = ["LedgerReplay"]


class _Held(NamedTuple):
    """What an open reservation holds: tokens (input and output), loans, money."""

    tokens: int = 0
    loans: tuple[tuple[str, int], ...] = ()
    cost: int = 0
    input_tokens: int = 0
    output_tokens: int = 0


class _Numbers:
    """One agent's row (the engine's numbers), its contract and the holds it has open."""

    __slots__ = ("contract", "held", "row")

    def __init__(self, contract: BudgetContract) -> None:
        self.contract = contract
        self.row = AgentRow.new(contract)
        self.held: dict[str, _Held] = {}  # each open reservation's holds


class LedgerReplay:
    """Per-agent state rebuilt from events.

    Args:
        contracts: Agents already registered before the first event replayed
            (their starting allocation is their contract's ``max_tokens``).
            Agents registered later are picked up from ``AgentRegistered``
            events, which carry their contract.

    Example:
        >>> from tbc_integrations import BudgetContract
        >>> LedgerReplay([BudgetContract("a", max_tokens=5)]).status()["a"].remaining
        5
    """

    def __init__(
        self, contracts: Iterable[BudgetContract] | Mapping[str, BudgetContract] = ()
    ) -> None:
        items = contracts.values() if isinstance(contracts, Mapping) else contracts
        self._agents: dict[str, _Numbers] = {}
        self._teams: dict[str, dict[str, _Numbers]] = {}  # a team per run (``event.run``)
        for contract in items:
            self._add(contract)
        self.events = 0

    @classmethod
    def from_status(
        cls,
        statuses: Mapping[str, AgentStatus],
        contracts: Mapping[str, BudgetContract] | None = None,
        open_reservations: Iterable[tuple[Any, ...]] = (),
    ) -> LedgerReplay:
        """Start from a snapshot of the ledger (what an audit log records when attached).

        ``open_reservations`` are ``(id, agent, tokens, loans[, cost_nanos, input_tokens,
        output_tokens])`` tuples, as the audit log's snapshot lists them.

        Example:
            >>> from tbc_integrations import BudgetManager
            >>> m = BudgetManager(); _ = m.register_agent("a", max_tokens=9)
            >>> _ = m.reserve("a", 4)
            >>> LedgerReplay.from_status(m.status()).status()["a"].reserved
            4
        """
        replay = cls()
        for name, s in statuses.items():
            contract = (contracts or {}).get(name) or BudgetContract(
                name,
                priority=s.priority,
                max_tokens=s.max_tokens,
                min_reserve=s.min_reserve,
                confidence_threshold=s.confidence_threshold,
                depends_on=s.depends_on,
                max_cost=s.max_cost,
            )
            numbers = replay._agents[name] = _Numbers(contract)
            row = numbers.row
            row.allocated, row.consumed, row.reserved = s.allocated, s.consumed, s.reserved
            row.consumed_in, row.consumed_out = s.input_tokens, s.output_tokens
            row.borrowed, row.lent, row.refusals = s.borrowed, s.lent, s.refusals
            row.last_confidence, row.threshold = s.last_confidence, s.confidence_threshold
            row.complete = s.complete
            row.warned = s.warned
            row.cost, row.cost_reserved = to_nanos(s.cost, name), to_nanos(s.cost_reserved, name)
            if s.output_cap_left is not None and row.max_output is not None:
                row.reserved_out = row.max_output - row.consumed_out - s.output_cap_left
        for rid, agent, tokens, loans, *rest in open_reservations:
            replay._agents[agent].held[rid] = _Held(tokens, loans, *rest)
        return replay

    def _add(self, contract: BudgetContract) -> None:
        self._agents[contract.agent_name] = _Numbers(contract)

    def _team(self, run: str) -> dict[str, _Numbers]:
        """The agents an event of ``run`` changes: the registered ones for ``""``, else the
        run's own team, fresh from the registered contracts at its first event."""
        if not run:
            return self._agents
        team = self._teams.get(run)
        if team is None:
            team = self._teams[run] = self._fresh_team()
        return team

    def _fresh_team(self) -> dict[str, _Numbers]:
        """The registered agents' numbers before any event: a new run's team."""
        return {name: _Numbers(a.contract) for name, a in self._agents.items()}

    def apply(self, event: BudgetEvent) -> None:
        """Apply one event (in the order the ledger emitted them)."""
        self.events += 1
        if isinstance(event, AgentRegistered):
            if event.contract is not None and event.agent not in self._agents:
                self._add(BudgetContract.from_dict(event.contract))
            return
        agents = self._team(event.run)
        numbers = agents.get(event.agent)
        if numbers is None:
            return  # an agent this replay was not told about
        a = numbers.row
        if isinstance(event, Reserved):
            a.reserved += event.tokens
            a.reserved_in += event.input_tokens
            a.reserved_out += event.output_tokens
            a.cost_reserved += event.cost_nanos
            numbers.held[event.reservation_id or ""] = _Held(
                event.tokens,
                event.donors,
                event.cost_nanos,
                event.input_tokens,
                event.output_tokens,
            )
        elif isinstance(event, Committed):
            if event.reservation_id is not None and event.reason != "late":
                held = numbers.held.pop(event.reservation_id, _Held())
                a.reserved -= held.tokens
                a.reserved_in -= held.input_tokens
                a.reserved_out -= held.output_tokens
                a.cost_reserved -= held.cost
            a.cost += event.cost_nanos
            a.consumed += event.tokens
            a.consumed_in += event.input_tokens
            a.consumed_out += event.output_tokens
        elif isinstance(event, (Released, Expired)):
            rid = event.reservation_id or ""
            held = numbers.held.pop(rid, _Held(event.tokens, event.donors))
            a.reserved -= held.tokens
            a.reserved_in -= event.input_tokens
            a.reserved_out -= event.output_tokens
            a.cost_reserved -= event.cost_nanos
            for donor, tokens in held.loans:
                repay(a, agents[donor].row, tokens)
        elif isinstance(event, Transferred):
            if event.reason == "grant":
                a.allocated += event.tokens
                if event.tokens > 0:
                    rearm(a)
            elif event.reason == "return":  # event.agent is the donor paid back
                for borrower, tokens in event.donors:
                    repay(agents[borrower].row, a, tokens)
            else:  # borrow, overdraft, reallocate
                for donor, tokens in event.donors:
                    lend(a, agents[donor].row, tokens)
                if event.reason == "reallocate":
                    rearm(a)
        elif isinstance(event, BudgetWarning):
            if event.reason == "agent":
                a.warned = True
        elif isinstance(event, Refused):
            a.refusals += 1
        elif isinstance(event, ConfidenceRecorded):
            a.last_confidence = event.confidence
        elif isinstance(event, GateChanged):
            a.threshold = event.threshold
        elif isinstance(event, Completed):
            a.complete = True

    def apply_all(self, events: Iterable[BudgetEvent]) -> LedgerReplay:
        """Apply every event; returns self."""
        for event in events:
            self.apply(event)
        return self

    def status(self) -> dict[str, AgentStatus]:
        """What :meth:`~tbc_integrations.BudgetManager.status` showed after the last event."""
        return _statuses(self._agents)

    def runs(self) -> list[str]:
        """The runs whose teams the replayed events changed, in order of their first event."""
        return list(self._teams)

    def team_status(self, run: str) -> dict[str, AgentStatus]:
        """What :meth:`~tbc_integrations.BudgetManager.team_status` showed for ``run`` after
        the last event (fresh numbers for a run no event named).

        Example:
            >>> from tbc_integrations import BudgetManager, Usage
            >>> m = BudgetManager(team_per="run"); replay = LedgerReplay()
            >>> _ = m.subscribe(replay.apply)
            >>> _ = m.register_agent("a", max_tokens=100)
            >>> with m.scope(run="r-1"):
            ...     m.commit(m.reserve("a", 50, 30), Usage(50, 30))
            0
            >>> replay.team_status("r-1") == m.team_status("r-1")
            True
            >>> replay.status() == m.status()  # the registered team, the template
            True
        """
        team = self._teams.get(run)
        return _statuses(self._fresh_team() if team is None else team)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict status per agent."""
        return {name: s.to_dict() for name, s in self.status().items()}


def _statuses(team: Mapping[str, _Numbers]) -> dict[str, AgentStatus]:
    """Each agent's status from its replayed numbers."""
    return {name: agent_status(a.row, a.contract.depends_on) for name, a in team.items()}
