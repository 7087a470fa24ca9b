"""The ledger engine: every budget rule, written once, over a small transaction interface.

A store provides storage and atomicity (a :class:`Transaction`); the functions
here decide everything else: the lease sweep, admission (gate, caps, budget),
borrowing under a policy, holds, settlement with loan returns and overdraft,
release, charge, reallocation, grants, completion, confidence and registration
with its dependency checks. The memory and SQLite stores run these functions
inside their transactions; the Redis store runs a Lua port of them
(``stores/ledger.lua``), held to this module by a differential test.

Rules every verb keeps:

- every verb first reclaims the reservations whose lease lapsed (the sweep);
- a verb that fails with a :class:`~tbc_integrations.TBCError` decided so before
  changing anything except the sweep and, for a refusal, the agent's refusal
  count and its ``Refused`` event: the store commits those and raises;
- events describe what the transaction did, in order, and are delivered only
  after it committed.

Example:
    >>> from tbc_integrations import BudgetContract
    >>> row = AgentRow.new(BudgetContract("a", max_tokens=100))
    >>> row.allocated, available(row)
    (100, 100)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

from ._contracts import BudgetContract
from ._errors import (
    BudgetExceededError,
    ConfidenceGateError,
    ContractError,
    CostLimitError,
    InvalidTokenCountError,
    LimitExceededError,
    ReservationError,
    TBCError,
    UnknownAgentError,
)
from ._money import dollars
from ._records import AgentStatus, Reservation
from ._usage import Usage
from .events import (
    AgentRegistered,
    BudgetEvent,
    BudgetWarning,
    Committed,
    Completed,
    ConfidenceRecorded,
    Expired,
    GateChanged,
    Overdrawn,
    Refused,
    Released,
    Reserved,
    Transferred,
)
from .policies import Donor, Needy, ReallocationPolicy

__all__ = [
    "EXPIRED_MEMORY_SECONDS",
    "LIMIT_MEMORY_SECONDS",
    "MAX_TOKENS",
    "SETTLED_MEMORY_SECONDS",
    "AgentRow",
    "Events",
    "LimitHold",
    "LimitRow",
    "LimitView",
    "TeamHold",
    "TeamRow",
    "Transaction",
    "adjust",
    "agent_status",
    "available",
    "charge",
    "check",
    "commit",
    "complete",
    "dependency_cycle",
    "expire",
    "lend",
    "limit_view",
    "past_warning",
    "record_confidence",
    "reallocate",
    "rearm",
    "register",
    "release",
    "repay",
    "reserve",
    "set_threshold",
    "split_limit_key",
    "team_rows",
]

T = TypeVar("T")

MAX_TOKENS = 2**53 - 1
"""The largest amount any store holds exactly (a double's integer range, as in Redis)."""

SETTLED_MEMORY_SECONDS = 3600.0
"""How long a store remembers a settled reservation's id.

A commit or release retried within it (after a lost reply or a restarted server)
is refused as already settled; after it, as not issued by the store. Either way it
is never counted twice; the window only bounds what the store keeps.
"""

LIMIT_MEMORY_SECONDS = 35 * 86400.0
"""How long after its period ended a limit's row is kept (for late commits and reports)."""

EXPIRED_MEMORY_SECONDS = 86400.0
"""How long a store keeps a reservation whose lease lapsed, for a late commit."""

Events = list[BudgetEvent] | None
"""Where a verb appends its events; ``None`` when nobody listens (no events built)."""

OPEN, EXPIRED, SETTLED = "open", "expired", "settled"


class AgentRow:
    """One agent's numbers, as every store keeps them.

    ``allocated - consumed - reserved`` is what the agent can still hold; the
    ``_in``/``_out`` parts split consumption and holds for the caps. Money is in
    nano-dollars: ``cost`` spent, ``cost_reserved`` held, ``max_cost`` the cap
    (``None``: none). An agent with ``max_tokens`` ``None`` is budgeted in money
    only: its tokens are counted, never limited, never lent.
    """

    __slots__ = (
        "allocated",
        "borrowed",
        "complete",
        "consumed",
        "consumed_in",
        "consumed_out",
        "cost",
        "cost_reserved",
        "last_confidence",
        "lent",
        "max_cost",
        "max_input",
        "max_output",
        "max_tokens",
        "min_reserve",
        "name",
        "priority",
        "refusals",
        "reserved",
        "reserved_in",
        "reserved_out",
        "threshold",
        "warn_at",
        "warned",
    )

    name: str
    priority: int
    min_reserve: int
    max_tokens: int | None
    max_cost: int | None
    max_input: int | None
    max_output: int | None
    threshold: float | None
    allocated: int
    consumed: int
    consumed_in: int
    consumed_out: int
    reserved: int
    reserved_in: int
    reserved_out: int
    borrowed: int
    lent: int
    refusals: int
    last_confidence: float | None
    complete: bool
    cost: int
    cost_reserved: int
    warn_at: float | None
    warned: bool

    @classmethod
    def new(cls, contract: BudgetContract) -> AgentRow:
        """A freshly registered agent's numbers."""
        row = cls()
        row.name = contract.agent_name
        row.priority = contract.priority
        row.min_reserve = contract.reserve
        row.max_tokens = contract.max_tokens
        row.max_cost = contract.max_cost_nanos
        row.max_input = contract.max_input_tokens
        row.max_output = contract.max_output_tokens
        row.threshold = contract.confidence_threshold
        row.allocated = contract.max_tokens or 0
        row.consumed = row.consumed_in = row.consumed_out = 0
        row.reserved = row.reserved_in = row.reserved_out = 0
        row.borrowed = row.lent = row.refusals = 0
        row.last_confidence = None
        row.complete = False
        row.cost = row.cost_reserved = 0
        row.warn_at = contract.warn_at
        row.warned = False
        return row

    def __repr__(self) -> str:
        return f"AgentRow({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__)})"


class LimitRow:
    """One limit's numbers for one scope key and period (a row of its own in every store).

    Thresholds come with the first call of the period (``Limit`` turns its fractions
    into whole amounts); money is in nano-dollars. ``agents`` holds what each agent's
    calls settled in the row: ``[tokens, nano-dollars, calls]`` (in a rolling window's
    row, everything the row has settled, window or not).

    A rolling window's row (``buckets`` not ``None``) has one row per scope value: its
    spend is kept in buckets by the time it leaves the window (``{leaves: [tokens,
    nano-dollars]}``), ``consumed`` and ``cost`` are the sums of the buckets still in the
    window when the row was last rolled forward, and ``until`` is when its newest
    bucket leaves.
    """

    __slots__ = (
        "agents",
        "buckets",
        "consumed",
        "cost",
        "cost_reserved",
        "key",
        "max_cost",
        "max_tokens",
        "reserved",
        "until",
        "warn_cost",
        "warn_tokens",
        "warned",
    )

    buckets: dict[int, list[int]] | None

    def __init__(self, hold: LimitHold) -> None:
        self.key, self.max_tokens, self.max_cost, self.warn_tokens, self.warn_cost = hold[:5]
        self.until = hold[5]
        self.consumed = self.reserved = self.cost = self.cost_reserved = 0
        self.warned = False
        self.agents: dict[str, list[int]] = {}
        self.buckets = None
        key, leaves = split_limit_key(self.key)
        if leaves is not None:  # a rolling window's hold: the row is the scope value's
            self.key, self.buckets = key, {}

    def snapshot(self) -> LimitRow:
        """A copy of the row (its buckets and spend per agent too) that later changes
        to the row leave alone."""
        row = LimitRow.__new__(LimitRow)
        for field in self.__slots__:
            setattr(row, field, getattr(self, field))
        if self.buckets is not None:
            row.buckets = {t: list(b) for t, b in self.buckets.items()}
        row.agents = {a: list(v) for a, v in self.agents.items()}
        return row

    def __repr__(self) -> str:
        return f"LimitRow({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__)})"


LimitHold = tuple[str, "int | None", "int | None", "int | None", "int | None", float]
"""A limit a call must fit in: ``(key, max_tokens, max_cost, warn_tokens, warn_cost,
until)``; the key names the limit, the scope value and the period. A rolling window's
key ends with ``@`` and the (whole) time its bucket's spend leaves the window, which
is then ``until`` too: ``"user/u-42/24h@1796342400"``."""


def split_limit_key(key: str) -> tuple[str, int | None]:
    """A hold's row key and, for a rolling window, when the spend of its bucket leaves.

    Period labels never hold ``@``; scope values may, so only the last part is read.

    Example:
        >>> split_limit_key("user/a@b.c/24h@86400")
        ('user/a@b.c/24h', 86400)
        >>> split_limit_key("user/a@b.c/2026-12-03")
        ('user/a@b.c/2026-12-03', None)
    """
    if "@" not in key:  # the usual calendar key: nothing to split
        return key, None
    head, _, label = key.rpartition("/")
    window, at, leaves = label.partition("@")
    if not at:
        return key, None
    return f"{head}/{window}", int(leaves)


class LimitView(NamedTuple):
    """A limit row's window as of a time: what is counted, and when its oldest spend leaves."""

    consumed: int
    cost: int
    warned: bool
    frees_at: float | None


def _crossed(row: LimitRow, consumed: int, cost: int) -> bool:
    return (row.warn_tokens is not None and consumed >= row.warn_tokens) or (
        row.warn_cost is not None and cost >= row.warn_cost
    )


def limit_view(row: LimitRow, now: float) -> LimitView:
    """What ``row`` counts at ``now`` (a rolling window without the buckets that left it),
    changing nothing."""
    if row.buckets is None:
        return LimitView(row.consumed, row.cost, row.warned, None)
    live = [(t, b) for t, b in row.buckets.items() if t > now]
    consumed = sum(b[0] for _, b in live)
    cost = sum(b[1] for _, b in live)
    frees_at = min((t for t, b in live if b[0] or b[1]), default=None)
    warned = row.warned and _crossed(row, consumed, cost)
    return LimitView(consumed, cost, warned, None if frees_at is None else float(frees_at))


def _roll(row: LimitRow, now: float) -> None:
    """Drop a rolling window's buckets whose spend left it by ``now``; a soft limit that is
    no longer crossed may warn again at its next crossing."""
    buckets = row.buckets
    if not buckets or min(buckets) > now:
        return
    for t in [t for t in buckets if t <= now]:
        tokens, cost = buckets.pop(t)
        row.consumed -= tokens
        row.cost -= cost
    if row.warned and not _crossed(row, row.consumed, row.cost):
        row.warned = False


TeamHold = tuple[str, float]
"""The run a call's team belongs to: ``(key, forget_after)``, the run's scope value and
how many seconds after its last activity its team is forgotten."""


class TeamRow:
    """The record of one run's own team (its agents' rows are kept beside it).

    The team is forgotten once the clock reaches ``until``: its last activity plus
    ``forget`` seconds, or later while a reservation of it is open (its lease end plus
    ``forget``). A forgotten team is never read again: the run starts a fresh one.
    """

    __slots__ = ("forget", "key", "until")

    def __init__(self, key: str, forget: float, until: float) -> None:
        self.key, self.forget, self.until = key, forget, until

    def __repr__(self) -> str:
        return f"TeamRow(key={self.key!r}, forget={self.forget!r}, until={self.until!r})"


class Transaction(Protocol):
    """What a store provides to the engine inside one atomic transaction.

    Rows returned by :meth:`agent` and :meth:`rows` are the transaction's own
    objects: the engine changes them in place, and the store makes the changes
    durable when the transaction commits.
    """

    namespace: str
    due: float
    """No open reservation's lease ends before this time (``-inf`` when the store
    does not keep track: the engine then looks for lapsed leases on every verb)."""
    team: str
    """The team :meth:`agent`, :meth:`add_row`, :meth:`total` and :meth:`hold` work on:
    ``""`` for the namespace's own (registered) team, else a run's key (see :meth:`enter`)."""

    def agent(self, name: str) -> AgentRow | None:
        """The agent's row in the current team, or ``None`` (not registered, or not yet
        used in this run's team)."""

    def rows(self) -> Iterable[AgentRow]:
        """Every agent's row of the namespace's own team, in registration order."""

    def enter(self, key: str) -> TeamRow | None:
        """Work on team ``key`` from now on (``""``: the namespace's own team, and
        ``None`` is returned); the run's team record, or ``None`` when it has none."""

    def add_team(self, row: TeamRow) -> None:
        """Keep a new team record (the current team, entered before)."""

    def add_row(self, row: AgentRow) -> None:
        """Keep a new agent row in the current (run's) team."""

    def forget_team(self, key: str) -> None:
        """Delete a run's team record and its rows."""

    def idle_teams(self, now: float) -> Iterable[str]:
        """Some teams whose ``until`` has passed (the store chooses how many)."""

    def contracts(self) -> Mapping[str, BudgetContract]:
        """Every agent's contract, in registration order."""

    def add_agent(self, contract: BudgetContract, row: AgentRow) -> None:
        """Register a new agent with its first row."""

    def dependents(self, name: str) -> Iterable[str]:
        """Agents whose contract lists ``name`` in ``depends_on``."""

    def total(self) -> int:
        """The namespace's allocation in all (it changes only by registration and grants)."""

    def set_total(self, total: int) -> None:
        """Record the namespace's allocation in all."""

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
        """Keep a new open reservation (holding ``cost`` nano-dollars, in the limit rows
        ``limits``, of the current team), under an id never issued before in this store;
        the record returned carries ``model`` and ``provider``, which the store need not
        keep."""

    def limit(self, key: str) -> LimitRow | None:
        """A limit row, or ``None`` when no call of its period has been seen."""

    def add_limit(self, row: LimitRow, now: float) -> None:
        """Keep a new limit row (and forget rows of periods long past)."""

    def find(self, rid: str) -> tuple[str, Reservation] | None:
        """The state (``open``, ``expired``, ``settled``) and record of a reservation."""

    def settle(self, rid: str, now: float) -> None:
        """Mark the reservation settled (remembered for ``SETTLED_MEMORY_SECONDS``)."""

    def lapse(self, rid: str, now: float) -> None:
        """Mark the open reservation expired (kept for ``EXPIRED_MEMORY_SECONDS``)."""

    def lapsed(self, now: float) -> Sequence[Reservation]:
        """Open reservations whose lease ended by ``now``, oldest lease first, then
        in the order they were issued."""


# ----------------------------------------------------------------- numbers
def available(a: AgentRow) -> int:
    """What new reservations of the agent can still hold (negative while overdrawn).

    An agent budgeted in money only has every token a store holds.
    """
    if a.max_tokens is None:
        return MAX_TOKENS - a.consumed - a.reserved
    return a.allocated - a.consumed - a.reserved


def spare(a: AgentRow) -> int:
    """What the agent can lend: its remaining above its reserve, or all once complete.

    An agent budgeted in money only lends no tokens.
    """
    if a.max_tokens is None:
        return 0
    return available(a) if a.complete else available(a) - a.min_reserve


def gated(a: AgentRow) -> bool:
    """The confidence gate: closed once the last confidence reached the threshold."""
    thr, conf = a.threshold, a.last_confidence
    return thr is not None and conf is not None and conf >= thr


def lend(needy: AgentRow, donor: AgentRow, tokens: int) -> None:
    """Move ``tokens`` of allocation from ``donor`` to ``needy`` as a loan."""
    donor.allocated -= tokens
    donor.lent += tokens
    needy.allocated += tokens
    needy.borrowed += tokens


def repay(borrower: AgentRow, donor: AgentRow, tokens: int) -> None:
    """Give ``tokens`` of a loan back from ``borrower`` to ``donor``."""
    borrower.allocated -= tokens
    borrower.borrowed -= tokens
    donor.allocated += tokens
    donor.lent -= tokens


def _need(tx: Transaction, name: str) -> AgentRow:
    row = tx.agent(name)
    if row is None:
        return _fresh(tx, name)
    return row


# ------------------------------------------------------------ teams per run
def _fresh(tx: Transaction, name: str) -> AgentRow:
    """The agent's first row in a run's team: a fresh copy of its contract's numbers."""
    contract = tx.contracts().get(name) if tx.team else None
    if contract is None:
        raise UnknownAgentError(name)
    row = AgentRow.new(contract)
    tx.add_row(row)
    return row


def _rows(tx: Transaction) -> Iterable[AgentRow]:
    """Every agent's row of the current team, in registration order."""
    if not tx.team:
        return tx.rows()
    return [_need(tx, name) for name in tx.contracts()]


def _enter(tx: Transaction, team: TeamHold, now: float) -> TeamRow:
    """Work on the call's run's team, started fresh when the run has none or its team
    was forgotten (idle past its ``until``). Between verbs a transaction works on the
    namespace's own team: a verb that entered a run's leaves it before it returns."""
    key, forget = team
    row = tx.enter(key)
    if row is not None and row.until <= now:
        tx.forget_team(key)
        row = None
    if row is None:
        for idle in list(tx.idle_teams(now)):  # reclaim other forgotten teams' storage
            if idle != key:
                tx.forget_team(idle)
        tx.enter(key)
        row = TeamRow(key, forget, now + forget)
        tx.add_team(row)
    else:
        row.forget = forget
        if now + forget > row.until:
            row.until = now + forget
    return row


def _in_run(
    tx: Transaction, team: TeamHold, now: float, events: Events, verb: Callable[..., T], *args: Any
) -> T:
    """``verb(tx, *args)`` in the run's team, back in the namespace's own after it (the
    events it appends to ``events`` name the run)."""
    start = 0 if events is None else len(events)
    _enter(tx, team, now)
    try:
        return verb(tx, *args)
    finally:
        tx.enter("")
        _name_run(events, start, team[0])


def _name_run(events: Events, start: int, key: str) -> None:
    """Name the run in the events a verb in its team appended from ``start`` on."""
    if events is not None:
        for i in range(start, len(events)):
            events[i] = dataclasses.replace(events[i], run=key)


def _resume(tx: Transaction, key: str, now: float, touch: bool) -> bool:
    """Work on a reservation's run's team; False when it was forgotten meanwhile
    (``touch``: the verb is activity of the run)."""
    row = tx.enter(key)
    if row is None or row.until <= now:
        return False
    if touch and now + row.forget > row.until:
        row.until = now + row.forget
    return True


def team_rows(tx: Transaction, key: str, now: float) -> list[AgentRow]:
    """A run's team as it stands (fresh rows for agents it has not used; all of them
    fresh when the run has no team, or it was forgotten). Changes nothing."""
    row = tx.enter(key)
    alive = row is not None and row.until > now
    out = []
    for name, contract in tx.contracts().items():
        found = tx.agent(name) if alive else None
        out.append(found if found is not None else AgentRow.new(contract))
    tx.enter("")
    return out


def _check_total(agent: str, what: str, value: int) -> None:
    if value > MAX_TOKENS:
        raise InvalidTokenCountError(
            f"Agent '{agent}': {what} would reach {value} tokens, above the {MAX_TOKENS} "
            "every store holds exactly; nothing was changed"
        )


def _give_back(tx: Transaction, res: Reservation) -> None:
    a = _need(tx, res.agent)
    a.reserved -= res.input_tokens + res.output_tokens
    a.reserved_in -= res.input_tokens
    a.reserved_out -= res.output_tokens
    a.cost_reserved -= res.cost_nanos
    for donor_name, tokens in res.loans:
        donor = _need(tx, donor_name)
        repay(a, donor, tokens)


def _unhold(tx: Transaction, res: Reservation, now: float, touch: bool) -> None:
    """Give a reservation's tokens back: loans to their donors, the rest to the agent
    (in its run's team, unless that was forgotten), and its limits'."""
    if not res.team:
        _give_back(tx, res)
    else:
        try:
            if _resume(tx, res.team, now, touch):
                _give_back(tx, res)
        finally:
            tx.enter("")
    for key in res.limits:
        row = tx.limit(split_limit_key(key)[0])
        if row is not None:
            row.reserved -= res.input_tokens + res.output_tokens
            row.cost_reserved -= res.cost_nanos


def _sweep(tx: Transaction, now: float, events: Events) -> int:
    """Reclaim every reservation whose lease lapsed; return how many."""
    lapsed = tx.lapsed(now)
    for res in lapsed:
        _unhold(tx, res, now, False)
        tx.lapse(res.id, now)
        if events is not None:
            events.append(
                Expired(
                    res.agent,
                    now,
                    tx.namespace,
                    res.input_tokens + res.output_tokens,
                    res.input_tokens,
                    res.output_tokens,
                    res.id,
                    res.loans,
                    "lease",
                    cost_nanos=res.cost_nanos,
                    run=res.team,
                )
            )
    return len(lapsed)


# ------------------------------------------------------------ reallocation
def _protected(tx: Transaction, a: AgentRow) -> bool:
    """An agent that has not run yet lends nothing while an active agent needs its output."""
    if a.consumed or a.reserved:
        return False
    for name in tx.dependents(a.name):
        dependent = tx.agent(name)
        if dependent is not None and not dependent.complete:
            return True
    return False


def _donor_order(a: AgentRow) -> tuple[int, int, int, str]:
    """Completed agents first, then lowest priority, then most remaining, then by name."""
    left = a.consumed + a.reserved - a.allocated  # minus what the agent has left
    return (0, 0, left, a.name) if a.complete else (1, a.priority, left, a.name)


def _borrow(
    tx: Transaction, needy: AgentRow, need: int, policy: ReallocationPolicy, partial: bool
) -> tuple[list[tuple[AgentRow, int]], int]:
    """Plan loans covering up to ``need`` under ``policy``; nothing moves here."""
    rows = list(_rows(tx))
    candidates = sorted(
        (d for d in rows if d.name != needy.name and (d.complete or d.priority <= needy.priority)),
        key=_donor_order,
    )
    offered: dict[str, int] = {}

    def donors() -> Iterator[Donor]:
        for d in candidates:
            s = spare(d)
            if s > 0 and (d.complete or not _protected(tx, d)):
                offered[d.name] = s
                yield Donor(d.name, s, d.priority, available(d), d.complete)

    view = Needy(
        needy.name,
        needy.priority,
        available(needy),
        needy.last_confidence,
        needy.threshold,
        needy.max_tokens or 0,
        needy.max_input,
        max(r.priority for r in rows),
    )
    try:
        raw = policy.plan(view, need, donors(), partial=partial)
    except TBCError:
        raise
    except Exception as exc:
        raise ContractError(
            f"Reallocation policy {getattr(policy, 'name', policy)!r} failed while planning "
            f"for agent '{needy.name}': {exc!r}; nothing was moved"
        ) from exc
    plan: list[tuple[AgentRow, int]] = []
    found = 0
    seen: set[str] = set()
    for name, tokens in raw:
        spare_of = offered.get(name)
        if (
            spare_of is None
            or name in seen
            or type(tokens) is not int
            or not 0 < tokens <= spare_of
            or found + tokens > need
        ):
            raise ContractError(
                f"Reallocation policy {getattr(policy, 'name', policy)!r} proposed an invalid "
                f"transfer ({name!r}, {tokens!r}) for agent '{needy.name}'; nothing was moved"
            )
        seen.add(name)
        plan.append((_need(tx, name), tokens))
        found += tokens
    return plan, found


def _apply(tx: Transaction, needy: AgentRow, plan: list[tuple[AgentRow, int]]) -> None:
    for donor, tokens in plan:
        lend(needy, donor, tokens)


def _loans(plan: list[tuple[AgentRow, int]]) -> tuple[tuple[str, int], ...]:
    return tuple((d.name, t) for d, t in plan)


def _settle_overdraft(
    tx: Transaction,
    a: AgentRow,
    now: float,
    policy: ReallocationPolicy,
    events: Events,
    rid: str | None,
) -> int:
    """Cover a negative remaining by reallocation; return what stays uncovered."""
    short = -available(a)
    if short <= 0:
        return 0
    plan, found = _borrow(tx, a, short, policy, partial=True)
    _apply(tx, a, plan)
    left = short - found
    if events is not None:
        if plan:
            events.append(
                Transferred(a.name, now, tx.namespace, found, 0, 0, rid, _loans(plan), "overdraft")
            )
        if left > 0:
            events.append(Overdrawn(a.name, now, tx.namespace, left, 0, 0, rid))
    return left


def _cap_overdrafts(
    tx: Transaction,
    a: AgentRow,
    now: float,
    events: list[BudgetEvent],
    rid: str | None,
    used: Usage,
    cost: int,
) -> None:
    """Event real usage that took the agent past a cap: input, output or cost.

    Caps are never reallocated: the excess is recorded (the usage was real) and the
    agent's admission refuses that kind until the cap allows it again (only events
    come of it: a verb nobody listens to skips it).
    """
    ui, uo = used.input_tokens, used.output_tokens
    if a.max_input is not None and ui > 0 and a.consumed_in > a.max_input:
        over = a.consumed_in - a.max_input
        events.append(Overdrawn(a.name, now, tx.namespace, 0, over, 0, rid, (), "input cap"))
    if a.max_output is not None and uo > 0 and a.consumed_out > a.max_output:
        over = a.consumed_out - a.max_output
        events.append(Overdrawn(a.name, now, tx.namespace, 0, 0, over, rid, (), "output cap"))
    if a.max_cost is not None and cost > 0 and a.cost > a.max_cost:
        over = a.cost - a.max_cost
        events.append(
            Overdrawn(a.name, now, tx.namespace, 0, 0, 0, rid, (), "cost cap", cost_nanos=over)
        )


def past_warning(a: AgentRow) -> bool:
    """Whether the agent's spend reached its contract's ``warn_at`` fraction: of its
    current allocation in tokens, of its ``max_cost`` in money.

    Example:
        >>> from tbc_integrations import BudgetContract
        >>> row = AgentRow.new(BudgetContract("a", max_tokens=100, warn_at=0.8))
        >>> row.consumed = 80
        >>> past_warning(row)
        True
    """
    w = a.warn_at
    if w is None:
        return False
    if a.max_tokens is not None and a.consumed >= math.ceil(a.allocated * w):
        return True
    return a.max_cost is not None and a.cost >= math.ceil(a.max_cost * w)


def _warn_agent(tx: Transaction, a: AgentRow, now: float, events: Events) -> None:
    """After usage was recorded: warn once when the agent's spend crossed its ``warn_at``."""
    if a.warned or a.warn_at is None or not past_warning(a):
        return
    a.warned = True
    if events is not None:
        events.append(
            BudgetWarning(
                a.name, now, tx.namespace, a.consumed, 0, 0, None, (), "agent", cost_nanos=a.cost
            )
        )


def rearm(a: AgentRow) -> None:
    """After the agent's allocation rose for good (a grant, a reallocation): once its
    spend is below its warning line again, the next crossing warns again."""
    if a.warned and not past_warning(a):
        a.warned = False


# ------------------------------------------------------------------- verbs
def dependency_cycle(contracts: Mapping[str, BudgetContract], start: str) -> list[str] | None:
    """A dependency cycle through ``start``, as a path, or ``None``.

    Depth first over ``depends_on`` in listed order; the registered agents never
    form a cycle, so a new one can only pass through the agent being added.

    Example:
        >>> a = BudgetContract("a", depends_on=["b"]); b = BudgetContract("b", depends_on=["a"])
        >>> dependency_cycle({"a": a, "b": b}, "a")
        ['a', 'b', 'a']
    """
    path = [start]
    seen = {start}

    def visit(name: str) -> bool:
        contract = contracts.get(name)
        for dep in contract.depends_on if contract is not None else ():
            if dep == start:
                path.append(dep)
                return True
            if dep in seen or dep not in contracts:
                continue
            seen.add(dep)
            path.append(dep)
            if visit(dep):
                return True
            path.pop()
        return False

    return path if visit(start) else None


def register(tx: Transaction, contract: BudgetContract, now: float, events: Events) -> bool:
    """Create the agent, or attach to an equal one; return True when created.

    Raises:
        ContractError: a different contract under the name, a dependency cycle,
            or a namespace total above :data:`MAX_TOKENS`.
    """
    if now >= tx.due:
        _sweep(tx, now, events)
    name = contract.agent_name
    known = dict(tx.contracts())
    existing = known.get(name)
    if existing is not None:
        if existing != contract:
            raise ContractError(
                f"Agent '{name}' already exists in namespace '{tx.namespace}' with a "
                f"different contract: {existing.to_dict()} != {contract.to_dict()}"
            )
        return False
    known[name] = contract
    cycle = dependency_cycle(known, name)
    if cycle is not None:
        raise ContractError(f"Dependency cycle: {' -> '.join(cycle)}")
    total = tx.total() + (contract.max_tokens or 0)
    if total > MAX_TOKENS:
        raise ContractError(
            f"Agent '{name}': max_tokens {contract.max_tokens} would take namespace "
            f"'{tx.namespace}' to {total} tokens in all, above the {MAX_TOKENS} every store "
            "holds exactly"
        )
    tx.set_total(total)
    tx.add_agent(contract, AgentRow.new(contract))
    if events is not None:
        events.append(
            AgentRegistered(
                name, now, tx.namespace, contract.max_tokens or 0, contract=contract.to_dict()
            )
        )
    return True


def _admit(
    tx: Transaction,
    agent: str,
    input_tokens: int,
    output_tokens: int,
    now: float,
    policy: ReallocationPolicy,
    events: Events,
    clamp_output: bool,
    probe: bool,
    cost: int,
    holds: Sequence[LimitHold] = (),
) -> tuple[AgentRow, int, tuple[tuple[str, int], ...]]:
    """Gate, caps (input, output, cost), then budget (borrowing when short).

    Returns the row, the output tokens to hold and the loans moved (none when
    ``probe``); a refusal is counted, evented and raised.
    """
    a = tx.agent(agent)
    if a is None:
        a = _fresh(tx, agent)  # a run's first use of the agent (else: unknown)
    if clamp_output and a.max_output is not None:
        left = a.max_output - a.consumed_out - a.reserved_out
        if 0 < left < output_tokens:
            output_tokens = left
    amount = input_tokens + output_tokens
    avail = (a.allocated if a.max_tokens is not None else MAX_TOKENS) - a.consumed - a.reserved
    refusal: BudgetExceededError | None = None
    loans: tuple[tuple[str, int], ...] = ()
    if a.threshold is not None and gated(a):
        assert a.last_confidence is not None and a.threshold is not None
        refusal = ConfidenceGateError(agent, amount, max(avail, 0), a.last_confidence, a.threshold)
    elif a.max_input is not None and a.consumed_in + a.reserved_in + input_tokens > a.max_input:
        left = max(a.max_input - a.consumed_in - a.reserved_in, 0)
        refusal = BudgetExceededError(agent, input_tokens, left, "input cap")
    elif (
        a.max_output is not None and a.consumed_out + a.reserved_out + output_tokens > a.max_output
    ):
        left = max(a.max_output - a.consumed_out - a.reserved_out, 0)
        refusal = BudgetExceededError(agent, output_tokens, left, "output cap")
    elif a.max_cost is not None and a.cost + a.cost_reserved + cost > a.max_cost:
        refusal = CostLimitError(agent, cost, max(a.max_cost - a.cost - a.cost_reserved, 0))
    elif holds and (over := _over_limit(tx, agent, holds, amount, cost, now)) is not None:
        refusal = over
    elif amount > avail:
        need = amount - avail
        plan, found = _borrow(tx, a, need, policy, partial=False)
        if found < need:
            refusal = BudgetExceededError(agent, amount, max(avail, 0) + found)
        elif not probe:
            _apply(tx, a, plan)
            loans = _loans(plan)
    if refusal is not None:
        a.refusals += 1
        if events is not None:
            events.append(
                Refused(
                    agent,
                    now,
                    tx.namespace,
                    amount,
                    input_tokens,
                    output_tokens,
                    None,
                    (),
                    refusal.reason,
                    cost_nanos=cost,
                )
            )
        raise refusal
    return a, output_tokens, loans


def _over_limit(
    tx: Transaction, agent: str, holds: Sequence[LimitHold], amount: int, cost: int, now: float
) -> BudgetExceededError | None:
    """The first limit of the call's scope it would not fit in, as a refusal (rolling
    windows are rolled forward to ``now`` first)."""
    for key, max_tokens, max_cost, *_ in holds:
        row_key, leaves = split_limit_key(key)
        row = tx.limit(row_key)
        if row is not None and leaves is not None:
            _roll(row, now)
        used = 0 if row is None else row.consumed + row.reserved
        spent = 0 if row is None else row.cost + row.cost_reserved
        if max_tokens is not None and used + amount > max_tokens:
            return LimitExceededError(agent, row_key, amount, max(max_tokens - used, 0))
        if max_cost is not None and spent + cost > max_cost:
            return LimitExceededError(agent, row_key, cost, max(max_cost - spent, 0), money=True)
    return None


def _hold_limits(
    tx: Transaction, holds: Sequence[LimitHold], amount: int, cost: int, now: float
) -> tuple[str, ...]:
    for hold in holds:
        row_key, leaves = split_limit_key(hold[0])
        row = tx.limit(row_key)
        if row is None:
            row = LimitRow(hold)
            tx.add_limit(row, now)
        elif leaves is not None and leaves > row.until:
            row.until = leaves
        row.reserved += amount
        row.cost_reserved += cost
    return tuple(h[0] for h in holds)


def _spend_limits(
    tx: Transaction,
    keys: Iterable[str],
    agent: str,
    used: int,
    cost: int,
    held: tuple[int, int] | None,
    now: float,
    events: Events,
) -> None:
    """Settle a call in its limit rows (``held``: what it held there, if still held) and
    warn once per row and crossing when a soft threshold is crossed.

    A rolling window counts the spend in the bucket of the time the call was held in;
    spend whose bucket already left the window is not counted there.
    """
    for key in keys:
        row_key, leaves = split_limit_key(key)
        row = tx.limit(row_key)
        if row is None:
            continue  # a period long past, forgotten
        if held is not None:
            row.reserved -= held[0]
            row.cost_reserved -= held[1]
        if leaves is None:
            row.consumed += used
            row.cost += cost
        else:
            _roll(row, now)
            if leaves > now and (used or cost):
                assert row.buckets is not None
                bucket = row.buckets.setdefault(leaves, [0, 0])
                bucket[0] += used
                bucket[1] += cost
                row.consumed += used
                row.cost += cost
        spent = row.agents.get(agent)
        if spent is None:
            row.agents[agent] = [used, cost, 1]
        else:
            spent[0] += used
            spent[1] += cost
            spent[2] += 1
        if row.warned:
            continue
        if _crossed(row, row.consumed, row.cost):
            row.warned = True
            if events is not None:
                events.append(
                    BudgetWarning(
                        agent,
                        now,
                        tx.namespace,
                        row.consumed,
                        0,
                        0,
                        None,
                        (),
                        row_key,
                        cost_nanos=row.cost,
                    )
                )


def reserve(
    tx: Transaction,
    agent: str,
    input_tokens: int,
    output_tokens: int,
    now: float,
    lease_seconds: float,
    policy: ReallocationPolicy,
    clamp_output: bool,
    events: Events,
    cost: int = 0,
    holds: Sequence[LimitHold] = (),
    team: TeamHold | None = None,
    model: str | None = None,
    provider: str | None = None,
) -> Reservation:
    """Hold tokens (and ``cost`` nano-dollars) for a call, in its agent and in every limit
    of its scope (``holds``), borrowing tokens under ``policy``, or refuse before any spend.
    With ``team``, the agent and its donors are the run's own team's. The reservation
    carries the call's ``model`` and ``provider``."""
    if now >= tx.due:
        _sweep(tx, now, events)
    if team is not None:
        start = 0 if events is None else len(events)
        run = _enter(tx, team, now)
        try:
            res = reserve(
                tx,
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
                model=model,
                provider=provider,
            )
        finally:
            tx.enter("")
            _name_run(events, start, team[0])
        if res.expires_at + run.forget > run.until:
            run.until = res.expires_at + run.forget  # kept while the reservation is open
        return res
    a, output_tokens, loans = _admit(
        tx,
        agent,
        input_tokens,
        output_tokens,
        now,
        policy,
        events,
        clamp_output,
        False,
        cost,
        holds,
    )
    amount = input_tokens + output_tokens
    a.reserved += amount
    a.reserved_in += input_tokens
    a.reserved_out += output_tokens
    a.cost_reserved += cost
    keys = _hold_limits(tx, holds, amount, cost, now) if holds else ()
    expires_at = now + lease_seconds
    res = tx.hold(
        agent, input_tokens, output_tokens, expires_at, loans, cost, keys, model, provider
    )
    if events is not None:
        rid = res.id
        if loans:
            borrowed = sum(t for _, t in loans)
            events.append(
                Transferred(agent, now, tx.namespace, borrowed, 0, 0, rid, loans, "borrow")
            )
        events.append(
            Reserved(
                agent,
                now,
                tx.namespace,
                amount,
                input_tokens,
                output_tokens,
                rid,
                loans,
                cost_nanos=cost,
                limits=keys,
            )
        )
    return res


def check(
    tx: Transaction,
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
    """Refuse as :func:`reserve` would, but hold and move nothing when it would pass."""
    if now >= tx.due:
        _sweep(tx, now, events)
    if team is not None:
        return _in_run(
            tx,
            team,
            now,
            events,
            check,
            agent,
            input_tokens,
            output_tokens,
            now,
            policy,
            events,
            cost,
            holds,
        )
    _admit(tx, agent, input_tokens, output_tokens, now, policy, events, False, True, cost, holds)


def _open(tx: Transaction, rid: str) -> tuple[str, Reservation]:
    found = tx.find(rid)
    if found is None:
        raise ReservationError(
            f"Reservation {rid!r} was not issued by this store (namespace "
            f"'{tx.namespace}'); nothing was changed"
        )
    if found[0] == SETTLED:
        raise ReservationError(
            f"Reservation {rid!r} is already settled (committed or released); nothing was changed"
        )
    return found


def commit(
    tx: Transaction,
    rid: str,
    usage: Usage | None,
    now: float,
    policy: ReallocationPolicy,
    estimated: bool,
    events: Events,
    cost: int | None = None,
    in_run: bool = False,
) -> int:
    """Settle the reservation the store knows as ``rid`` with real usage and its
    ``cost`` in nano-dollars (``usage`` ``None``: the amounts it holds, as an estimate;
    ``cost`` ``None``: the money it holds).

    What was not used goes back (loans to their donors first, last loan first);
    usage above the hold is covered by reallocation, and the rest is an overdraft.
    A reservation whose lease lapsed records its usage in full (``late``).
    Returns the agent's uncovered overdraft.
    """
    if now >= tx.due:
        _sweep(tx, now, events)
    state, res = _open(tx, rid)
    if res.team and not in_run:  # settle in the run's team (``in_run``: entered)
        start = 0 if events is None else len(events)
        try:
            if _resume(tx, res.team, now, True):
                return commit(tx, rid, usage, now, policy, estimated, events, cost, True)
            _commit_forgotten(tx, state, res, usage, cost, now, estimated, events)
            return 0
        finally:
            tx.enter("")
            _name_run(events, start, res.team)
    # the store's record, read once (a NamedTuple's fields are slow to reach by name)
    _, agent, held_in, held_out, _, loans, _, held_cost = res[:8]
    a = _need(tx, agent)
    if usage is None:  # settle what was held, as an estimate
        usage = Usage(held_in, held_out)
        cost = held_cost
        estimated = True
    elif cost is None:
        cost = held_cost
    ui, uo = usage[:2]
    used = ui + uo
    if a.consumed + used > MAX_TOKENS:
        _check_total(agent, "consumed", a.consumed + used)
    if a.cost + cost > MAX_TOKENS:
        _check_total(agent, "cost (nano-dollars)", a.cost + cost)
    tx.settle(rid, now)
    a.consumed += used
    a.consumed_in += ui
    a.consumed_out += uo
    a.cost += cost
    late = state == EXPIRED
    if events is not None:
        events.append(
            Committed(
                agent,
                now,
                tx.namespace,
                used,
                ui,
                uo,
                rid,
                loans,
                "late" if late else "",
                estimated,
                cost,
                limits=res.limits,
            )
        )
    if not late:
        a.cost_reserved -= held_cost
    if res.limits:
        held = None if late else (held_in + held_out, held_cost)
        _spend_limits(tx, res.limits, agent, used, cost, held, now, events)
    if events is not None:
        _cap_overdrafts(tx, a, now, events, rid, usage, cost)
    if late:
        left = _settle_overdraft(tx, a, now, policy, events, rid)
        _warn_agent(tx, a, now, events)
        return left
    amount = held_in + held_out
    a.reserved -= amount
    a.reserved_in -= held_in
    a.reserved_out -= held_out
    if used > amount:
        left = _settle_overdraft(tx, a, now, policy, events, rid)
        _warn_agent(tx, a, now, events)
        return left
    unused = amount - used
    for donor_name, tokens in reversed(loans):
        if unused <= 0:
            break
        back = min(tokens, unused)
        donor = _need(tx, donor_name)
        repay(a, donor, back)
        unused -= back
        if events is not None:
            events.append(
                Transferred(
                    donor_name, now, tx.namespace, back, 0, 0, rid, ((a.name, back),), "return"
                )
            )
    _warn_agent(tx, a, now, events)
    return 0


def _commit_forgotten(
    tx: Transaction,
    state: str,
    res: Reservation,
    usage: Usage | None,
    cost: int | None,
    now: float,
    estimated: bool,
    events: Events,
) -> None:
    """Settle a call whose run's team was forgotten meanwhile (a late commit after the
    run's idle time): it is recorded in the limits above the team and in its event."""
    if usage is None:
        usage, cost, estimated = Usage(res.input_tokens, res.output_tokens), None, True
    if cost is None:
        cost = res.cost_nanos
    used = usage.input_tokens + usage.output_tokens
    tx.settle(res.id, now)
    if events is not None:
        events.append(
            Committed(
                res.agent,
                now,
                tx.namespace,
                used,
                usage.input_tokens,
                usage.output_tokens,
                res.id,
                res.loans,
                "forgotten",
                estimated,
                cost,
            )
        )
    if res.limits:
        held = None if state == EXPIRED else (res.input_tokens + res.output_tokens, res.cost_nanos)
        _spend_limits(tx, res.limits, res.agent, used, cost, held, now, events)


def release(tx: Transaction, rid: str, now: float, events: Events) -> None:
    """Return everything the reservation ``rid`` holds (its loans to their donors)."""
    if now >= tx.due:
        _sweep(tx, now, events)
    state, res = _open(tx, rid)
    tx.settle(rid, now)
    if state == EXPIRED:
        return  # the lease already gave everything back
    _unhold(tx, res, now, True)
    if events is not None:
        events.append(
            Released(
                res.agent,
                now,
                tx.namespace,
                res.input_tokens + res.output_tokens,
                res.input_tokens,
                res.output_tokens,
                rid,
                res.loans,
                cost_nanos=res.cost_nanos,
                run=res.team,
            )
        )


def charge(
    tx: Transaction,
    agent: str,
    usage: Usage,
    now: float,
    policy: ReallocationPolicy,
    estimated: bool,
    events: Events,
    cost: int = 0,
    holds: Sequence[LimitHold] = (),
    team: TeamHold | None = None,
) -> int:
    """Record usage (costing ``cost`` nano-dollars) that had no reservation, in its agent
    and the limits of its scope (``holds``, never refused: the usage happened); return
    the uncovered overdraft."""
    if now >= tx.due:
        _sweep(tx, now, events)
    if team is not None:
        return _in_run(
            tx, team, now, events, charge, agent, usage, now, policy, estimated, events, cost, holds
        )
    a = _need(tx, agent)
    ui, uo = usage.input_tokens, usage.output_tokens
    _check_total(agent, "consumed", a.consumed + ui + uo)
    _check_total(agent, "cost (nano-dollars)", a.cost + cost)
    a.consumed += ui + uo
    a.consumed_in += ui
    a.consumed_out += uo
    a.cost += cost
    keys = tuple(h[0] for h in holds)
    if events is not None:
        events.append(
            Committed(
                agent,
                now,
                tx.namespace,
                ui + uo,
                ui,
                uo,
                None,
                (),
                "direct",
                estimated,
                cost,
                limits=keys,
            )
        )
    if holds:
        _hold_limits(tx, holds, 0, 0, now)
        _spend_limits(tx, keys, agent, ui + uo, cost, None, now, events)
    if events is not None:
        _cap_overdrafts(tx, a, now, events, None, usage, cost)
    left = _settle_overdraft(tx, a, now, policy, events, None)
    _warn_agent(tx, a, now, events)
    return left


def reallocate(
    tx: Transaction,
    agent: str,
    tokens: int,
    now: float,
    policy: ReallocationPolicy,
    events: Events,
    team: TeamHold | None = None,
) -> int:
    """Move up to ``tokens`` to ``agent`` for good (within its team); return how many moved."""
    if now >= tx.due:
        _sweep(tx, now, events)
    if team is not None:
        return _in_run(tx, team, now, events, reallocate, agent, tokens, now, policy, events)
    a = _need(tx, agent)
    if tokens <= 0 or a.max_tokens is None:  # an agent budgeted in money needs no tokens
        return 0
    plan, found = _borrow(tx, a, tokens, policy, partial=True)
    _apply(tx, a, plan)
    if plan:
        rearm(a)
    if plan and events is not None:
        events.append(
            Transferred(agent, now, tx.namespace, found, 0, 0, None, _loans(plan), "reallocate")
        )
    return found


def adjust(
    tx: Transaction,
    agent: str,
    delta: int,
    now: float,
    events: Events,
    team: TeamHold | None = None,
) -> None:
    """Grant (``delta`` > 0) or revoke (< 0) allocation from outside the system."""
    if now >= tx.due:
        _sweep(tx, now, events)
    if team is not None:
        return _in_run(tx, team, now, events, adjust, agent, delta, now, events)
    a = _need(tx, agent)
    if a.max_tokens is None:
        raise ContractError(
            f"Agent '{agent}' is budgeted in money only (no max_tokens): a token grant "
            "has nothing to change; nothing was changed"
        )
    avail = available(a)
    if delta < 0 and -delta > avail:
        raise BudgetExceededError(agent, -delta, max(avail, 0), "revocation")
    # a run's team: its allocation in all is its rows'
    total = (sum(r.allocated for r in _rows(tx)) if tx.team else tx.total()) + delta
    _check_total(agent, "the namespace's allocation", total)
    if not tx.team:
        tx.set_total(total)
    a.allocated += delta
    if delta > 0:
        rearm(a)
    if events is not None:
        events.append(Transferred(agent, now, tx.namespace, delta, 0, 0, None, (), "grant"))


def complete(
    tx: Transaction, agent: str, now: float, events: Events, team: TeamHold | None = None
) -> None:
    """Mark ``agent`` complete: everything it has left is spare for anyone."""
    if now >= tx.due:
        _sweep(tx, now, events)
    if team is not None:
        return _in_run(tx, team, now, events, complete, agent, now, events)
    a = _need(tx, agent)
    if a.complete:
        return
    a.complete = True
    if events is not None:
        events.append(Completed(agent, now, tx.namespace, max(available(a), 0)))


def record_confidence(
    tx: Transaction,
    agent: str,
    confidence: float,
    now: float,
    events: Events,
    team: TeamHold | None = None,
) -> bool:
    """Record a result's confidence; return whether the agent is now gated."""
    if now >= tx.due:
        _sweep(tx, now, events)
    if team is not None:
        return _in_run(tx, team, now, events, record_confidence, agent, confidence, now, events)
    a = _need(tx, agent)
    before = gated(a)
    a.last_confidence = confidence
    after = gated(a)
    if events is not None:
        events.append(ConfidenceRecorded(agent, now, tx.namespace, confidence=confidence))
        if before != after:
            events.append(
                GateChanged(
                    agent,
                    now,
                    tx.namespace,
                    reason="closed" if after else "opened",
                    confidence=confidence,
                    threshold=a.threshold,
                )
            )
    return after


def set_threshold(
    tx: Transaction,
    agent: str,
    threshold: float | None,
    now: float,
    events: Events,
    team: TeamHold | None = None,
) -> None:
    """Change the agent's effective confidence threshold (``None`` opens the gate for good)."""
    if now >= tx.due:
        _sweep(tx, now, events)
    if team is not None:
        return _in_run(tx, team, now, events, set_threshold, agent, threshold, now, events)
    a = _need(tx, agent)
    before = gated(a)
    a.threshold = threshold
    after = gated(a)
    if events is not None:
        events.append(
            GateChanged(
                agent,
                now,
                tx.namespace,
                reason=("closed" if after else "opened") if before != after else "threshold",
                confidence=a.last_confidence,
                threshold=threshold,
            )
        )


def expire(tx: Transaction, now: float, events: Events) -> int:
    """Reclaim every reservation whose lease lapsed; return how many."""
    return _sweep(tx, now, events) if now >= tx.due else 0


# ------------------------------------------------------------------- reads
def agent_status(a: AgentRow, depends_on: Sequence[str] = ()) -> AgentStatus:
    """The public status of one agent's numbers."""
    remaining = available(a)
    return AgentStatus(
        agent=a.name,
        priority=a.priority,
        max_tokens=a.max_tokens,
        min_reserve=a.min_reserve,
        allocated=a.allocated,
        consumed=a.consumed,
        reserved=a.reserved,
        remaining=remaining,
        input_tokens=a.consumed_in,
        output_tokens=a.consumed_out,
        borrowed=a.borrowed,
        lent=a.lent,
        overdraft=max(-remaining, 0),
        refusals=a.refusals,
        last_confidence=a.last_confidence,
        confidence_threshold=a.threshold,
        gated=gated(a),
        complete=bool(a.complete),
        depends_on=tuple(depends_on),
        max_cost=None if a.max_cost is None else dollars(a.max_cost),
        cost=dollars(a.cost),
        cost_reserved=dollars(a.cost_reserved),
        cost_remaining=None
        if a.max_cost is None
        else dollars(a.max_cost - a.cost - a.cost_reserved),
        output_cap_left=None
        if a.max_output is None
        else max(a.max_output - a.consumed_out - a.reserved_out, 0),
        warned=bool(a.warned),
    )
