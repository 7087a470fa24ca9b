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

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Protocol

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
    "record_confidence",
    "reallocate",
    "register",
    "release",
    "repay",
    "reserve",
    "set_threshold",
]

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
        return row

    def __repr__(self) -> str:
        return f"AgentRow({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__)})"


class LimitRow:
    """One limit's numbers for one scope key and period (a row of its own in every store).

    Thresholds come with the first call of the period (``Limit`` turns its fractions
    into whole amounts); money is in nano-dollars.
    """

    __slots__ = (
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

    def __init__(self, hold: LimitHold) -> None:
        self.key, self.max_tokens, self.max_cost, self.warn_tokens, self.warn_cost = hold[:5]
        self.until = hold[5]
        self.consumed = self.reserved = self.cost = self.cost_reserved = 0
        self.warned = False

    def __repr__(self) -> str:
        return f"LimitRow({', '.join(f'{k}={getattr(self, k)!r}' for k in self.__slots__)})"


LimitHold = tuple[str, "int | None", "int | None", "int | None", "int | None", float]
"""A limit a call must fit in: ``(key, max_tokens, max_cost, warn_tokens, warn_cost,
until)``; the key names the limit, the scope value and the period."""


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

    def agent(self, name: str) -> AgentRow | None:
        """The agent's row, or ``None`` when no such agent is registered."""

    def rows(self) -> Iterable[AgentRow]:
        """Every agent's row, in registration order."""

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
        ``limits``), under an id never issued before in this store; the record returned
        carries ``model`` and ``provider``, which the store need not keep."""

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
        raise UnknownAgentError(name)
    return row


def _check_total(agent: str, what: str, value: int) -> None:
    if value > MAX_TOKENS:
        raise InvalidTokenCountError(
            f"Agent '{agent}': {what} would reach {value} tokens, above the {MAX_TOKENS} "
            "every store holds exactly; nothing was changed"
        )


def _unhold(tx: Transaction, res: Reservation) -> None:
    """Give a reservation's tokens back: loans to their donors, the rest to the agent."""
    a = _need(tx, res.agent)
    a.reserved -= res.input_tokens + res.output_tokens
    a.reserved_in -= res.input_tokens
    a.reserved_out -= res.output_tokens
    a.cost_reserved -= res.cost_nanos
    for donor_name, tokens in res.loans:
        donor = _need(tx, donor_name)
        repay(a, donor, tokens)
    for key in res.limits:
        row = tx.limit(key)
        if row is not None:
            row.reserved -= res.input_tokens + res.output_tokens
            row.cost_reserved -= res.cost_nanos


def _sweep(tx: Transaction, now: float, events: Events) -> int:
    """Reclaim every reservation whose lease lapsed; return how many."""
    lapsed = tx.lapsed(now)
    for res in lapsed:
        _unhold(tx, res)
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
    rows = list(tx.rows())
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
        raise UnknownAgentError(agent)
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
    elif holds and (over := _over_limit(tx, agent, holds, amount, cost)) is not None:
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
    tx: Transaction, agent: str, holds: Sequence[LimitHold], amount: int, cost: int
) -> BudgetExceededError | None:
    """The first limit of the call's scope it would not fit in, as a refusal."""
    for key, max_tokens, max_cost, *_ in holds:
        row = tx.limit(key)
        used = 0 if row is None else row.consumed + row.reserved
        spent = 0 if row is None else row.cost + row.cost_reserved
        if max_tokens is not None and used + amount > max_tokens:
            return LimitExceededError(agent, key, amount, max(max_tokens - used, 0))
        if max_cost is not None and spent + cost > max_cost:
            return LimitExceededError(agent, key, cost, max(max_cost - spent, 0), money=True)
    return None


def _hold_limits(
    tx: Transaction, holds: Sequence[LimitHold], amount: int, cost: int, now: float
) -> tuple[str, ...]:
    for hold in holds:
        row = tx.limit(hold[0])
        if row is None:
            row = LimitRow(hold)
            tx.add_limit(row, now)
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
    warn once per row when a soft threshold is crossed."""
    for key in keys:
        row = tx.limit(key)
        if row is None:
            continue  # a period long past, forgotten
        if held is not None:
            row.reserved -= held[0]
            row.cost_reserved -= held[1]
        row.consumed += used
        row.cost += cost
        if row.warned:
            continue
        if (row.warn_tokens is not None and row.consumed >= row.warn_tokens) or (
            row.warn_cost is not None and row.cost >= row.warn_cost
        ):
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
                        key,
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
    model: str | None = None,
    provider: str | None = None,
) -> Reservation:
    """Hold tokens (and ``cost`` nano-dollars) for a call, in its agent and in every limit
    of its scope (``holds``), borrowing tokens under ``policy``, or refuse before any spend.
    The reservation carries the call's ``model`` and ``provider``."""
    if now >= tx.due:
        _sweep(tx, now, events)
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
) -> None:
    """Refuse as :func:`reserve` would, but hold and move nothing when it would pass."""
    if now >= tx.due:
        _sweep(tx, now, events)
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
        return _settle_overdraft(tx, a, now, policy, events, rid)
    amount = held_in + held_out
    a.reserved -= amount
    a.reserved_in -= held_in
    a.reserved_out -= held_out
    if used > amount:
        return _settle_overdraft(tx, a, now, policy, events, rid)
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
    return 0


def release(tx: Transaction, rid: str, now: float, events: Events) -> None:
    """Return everything the reservation ``rid`` holds (its loans to their donors)."""
    if now >= tx.due:
        _sweep(tx, now, events)
    state, res = _open(tx, rid)
    tx.settle(rid, now)
    if state == EXPIRED:
        return  # the lease already gave everything back
    _unhold(tx, res)
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
) -> int:
    """Record usage (costing ``cost`` nano-dollars) that had no reservation, in its agent
    and the limits of its scope (``holds``, never refused: the usage happened); return
    the uncovered overdraft."""
    if now >= tx.due:
        _sweep(tx, now, events)
    a = _need(tx, agent)
    ui, uo = usage.input_tokens, usage.output_tokens
    _check_total(agent, "consumed", a.consumed + ui + uo)
    _check_total(agent, "cost (nano-dollars)", a.cost + cost)
    a.consumed += ui + uo
    a.consumed_in += ui
    a.consumed_out += uo
    a.cost += cost
    if events is not None:
        events.append(
            Committed(
                agent, now, tx.namespace, ui + uo, ui, uo, None, (), "direct", estimated, cost
            )
        )
    if holds:
        keys = _hold_limits(tx, holds, 0, 0, now)
        _spend_limits(tx, keys, agent, ui + uo, cost, None, now, events)
    if events is not None:
        _cap_overdrafts(tx, a, now, events, None, usage, cost)
    return _settle_overdraft(tx, a, now, policy, events, None)


def reallocate(
    tx: Transaction,
    agent: str,
    tokens: int,
    now: float,
    policy: ReallocationPolicy,
    events: Events,
) -> int:
    """Move up to ``tokens`` to ``agent`` for good; return how many moved."""
    if now >= tx.due:
        _sweep(tx, now, events)
    a = _need(tx, agent)
    if tokens <= 0 or a.max_tokens is None:  # an agent budgeted in money needs no tokens
        return 0
    plan, found = _borrow(tx, a, tokens, policy, partial=True)
    _apply(tx, a, plan)
    if plan and events is not None:
        events.append(
            Transferred(agent, now, tx.namespace, found, 0, 0, None, _loans(plan), "reallocate")
        )
    return found


def adjust(tx: Transaction, agent: str, delta: int, now: float, events: Events) -> None:
    """Grant (``delta`` > 0) or revoke (< 0) allocation from outside the system."""
    if now >= tx.due:
        _sweep(tx, now, events)
    a = _need(tx, agent)
    if a.max_tokens is None:
        raise ContractError(
            f"Agent '{agent}' is budgeted in money only (no max_tokens): a token grant "
            "has nothing to change; nothing was changed"
        )
    avail = available(a)
    if delta < 0 and -delta > avail:
        raise BudgetExceededError(agent, -delta, max(avail, 0), "revocation")
    total = tx.total() + delta
    _check_total(agent, "the namespace's allocation", total)
    tx.set_total(total)
    a.allocated += delta
    if events is not None:
        events.append(Transferred(agent, now, tx.namespace, delta, 0, 0, None, (), "grant"))


def complete(tx: Transaction, agent: str, now: float, events: Events) -> None:
    """Mark ``agent`` complete: everything it has left is spare for anyone."""
    if now >= tx.due:
        _sweep(tx, now, events)
    a = _need(tx, agent)
    if a.complete:
        return
    a.complete = True
    if events is not None:
        events.append(Completed(agent, now, tx.namespace, max(available(a), 0)))


def record_confidence(
    tx: Transaction, agent: str, confidence: float, now: float, events: Events
) -> bool:
    """Record a result's confidence; return whether the agent is now gated."""
    if now >= tx.due:
        _sweep(tx, now, events)
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
    tx: Transaction, agent: str, threshold: float | None, now: float, events: Events
) -> None:
    """Change the agent's effective confidence threshold (``None`` opens the gate for good)."""
    if now >= tx.due:
        _sweep(tx, now, events)
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
    )
