"""The ledger's rules on one agent's numbers, shared by the Python stores and the replay.

Stores keep the numbers their own way (objects in memory, rows in SQLite) under
the same attribute names; these functions decide what the design says about
them. (The Redis store applies the same rules inside its Lua script.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Protocol, TypeVar

from tbc_integrations._errors import BudgetExceededError, ConfidenceGateError, ContractError
from tbc_integrations._records import AgentStatus, Reservation
from tbc_integrations._usage import Usage
from tbc_integrations.events import (
    BudgetEvent,
    Committed,
    ConfidenceRecorded,
    GateChanged,
    Overdrawn,
    Refused,
    Transferred,
)

__all__ = [
    "AgentNumbers",
    "GateState",
    "LoanState",
    "UsageState",
    "admission_refusal",
    "agent_status",
    "apply_plan",
    "checked_plan",
    "clamped_output",
    "committed_event",
    "new_confidence",
    "new_threshold",
    "overdraft_events",
    "plan_transfer",
    "record_usage",
    "refused_event",
    "return_loans",
]


class AgentNumbers(Protocol):
    """One agent's state, as every Python store and the replay keep it (read here only)."""

    @property
    def name(self) -> str: ...

    @property
    def priority(self) -> int: ...

    @property
    def min_reserve(self) -> int: ...

    @property
    def max_input(self) -> int | None: ...

    @property
    def max_output(self) -> int | None: ...

    @property
    def threshold(self) -> float | None: ...

    @property
    def allocated(self) -> int: ...

    @property
    def consumed(self) -> int: ...

    @property
    def consumed_in(self) -> int: ...

    @property
    def consumed_out(self) -> int: ...

    @property
    def reserved(self) -> int: ...

    @property
    def reserved_in(self) -> int: ...

    @property
    def reserved_out(self) -> int: ...

    @property
    def borrowed(self) -> int: ...

    @property
    def lent(self) -> int: ...

    @property
    def refusals(self) -> int: ...

    @property
    def last_confidence(self) -> float | None: ...


def gated(a: AgentNumbers) -> bool:
    """The confidence gate: closed once the last confidence reached the threshold."""
    thr, conf = a.threshold, a.last_confidence
    return thr is not None and conf is not None and conf >= thr


class GateState(Protocol):
    """The part of an agent's numbers the confidence gate reads and writes."""

    threshold: float | None
    last_confidence: float | None

    def gated(self) -> bool: ...


class UsageState(Protocol):
    """The part of an agent's numbers that records what it used."""

    consumed: int
    consumed_in: int
    consumed_out: int


def record_usage(a: UsageState, usage: Usage) -> None:
    """Add ``usage`` to what the agent consumed."""
    ui, uo = usage
    a.consumed += ui + uo
    a.consumed_in += ui
    a.consumed_out += uo


class LoanState(Protocol):
    """The part of an agent's numbers that lending moves."""

    name: str
    allocated: int
    borrowed: int
    lent: int


L = TypeVar("L", bound=LoanState)


def apply_plan(needy: L, plan: Iterable[tuple[L, int]]) -> None:
    """Move the planned ``(donor, tokens)`` loans to ``needy``."""
    for donor, tokens in plan:
        donor.allocated -= tokens
        donor.lent += tokens
        needy.allocated += tokens
        needy.borrowed += tokens


def plan_transfer(
    agent: str,
    now: float,
    namespace: str,
    rid: str | None,
    loans: tuple[tuple[str, int], ...],
    reason: str,
) -> Transferred:
    """The event for ``loans`` (``(donor, tokens)`` pairs) moved to ``agent``."""
    return Transferred(agent, now, namespace, sum(t for _, t in loans), 0, 0, rid, loans, reason)


def return_loans(
    ag: L,
    loans: Sequence[tuple[str, int]],
    unused: int,
    row: Callable[[str], L],
    now: float,
    namespace: str,
    rid: str,
    events: list[BudgetEvent] | None,
) -> list[L]:
    """Send back what reservation ``rid`` borrowed and did not use, last loan first.

    ``row`` finds a donor's numbers by name; returns the donors paid back.
    """
    paid: list[L] = []
    for donor_name, tokens in reversed(loans):
        if unused <= 0:
            break
        back = tokens if tokens < unused else unused
        donor = row(donor_name)
        ag.allocated -= back
        ag.borrowed -= back
        donor.allocated += back
        donor.lent -= back
        unused -= back
        paid.append(donor)
        if events is not None:
            events.append(
                Transferred(
                    donor_name, now, namespace, back, 0, 0, rid, ((ag.name, back),), "return"
                )
            )
    return paid


def overdraft_events(
    events: list[BudgetEvent] | None,
    agent: str,
    now: float,
    namespace: str,
    rid: str | None,
    plan: Sequence[tuple[LoanState, int]],
    left: int,
) -> None:
    """Events of an overdraft's settlement: what reallocation covered, what stays uncovered."""
    if events is None:
        return
    if plan:
        loans = tuple((d.name, t) for d, t in plan)
        events.append(plan_transfer(agent, now, namespace, rid, loans, "overdraft"))
    if left > 0:
        events.append(Overdrawn(agent, now, namespace, left, 0, 0, rid))


def refused_event(
    agent: str, now: float, namespace: str, input_tokens: int, output_tokens: int, reason: str
) -> Refused:
    """The event of a request refused before anything was held."""
    return Refused(
        agent,
        now,
        namespace,
        input_tokens + output_tokens,
        input_tokens,
        output_tokens,
        None,
        (),
        reason,
    )


def committed_event(
    res: Reservation, usage: Usage, now: float, namespace: str, estimated: bool, reason: str
) -> Committed:
    """The event of ``res`` settled with ``usage``."""
    ui, uo = usage
    return Committed(
        res.agent, now, namespace, ui + uo, ui, uo, res.id, res.loans, reason, estimated
    )


def new_confidence(
    a: GateState,
    agent: str,
    confidence: float,
    now: float,
    namespace: str,
    events: list[BudgetEvent] | None,
) -> bool:
    """Record the agent's last confidence (and whether the gate moved); return it closed."""
    before = a.gated()
    a.last_confidence = confidence
    after = a.gated()
    if events is not None:
        events.append(ConfidenceRecorded(agent, now, namespace, confidence=confidence))
        if before != after:
            events.append(
                GateChanged(
                    agent,
                    now,
                    namespace,
                    reason="closed" if after else "opened",
                    confidence=confidence,
                    threshold=a.threshold,
                )
            )
    return after


def new_threshold(
    a: GateState,
    agent: str,
    threshold: float | None,
    now: float,
    namespace: str,
    events: list[BudgetEvent] | None,
) -> None:
    """Set the agent's gate threshold, with the event saying whether the gate moved."""
    before = a.gated()
    a.threshold = threshold
    after = a.gated()
    if events is not None:
        events.append(
            GateChanged(
                agent,
                now,
                namespace,
                reason=("closed" if after else "opened") if before != after else "threshold",
                confidence=a.last_confidence,
                threshold=threshold,
            )
        )


def clamped_output(a: AgentNumbers, output_tokens: int) -> int:
    """``output_tokens`` lowered to what the output cap still allows (a spent cap stays)."""
    if a.max_output is not None:
        left = a.max_output - a.consumed_out - a.reserved_out
        if 0 < left < output_tokens:
            return left
    return output_tokens


def admission_refusal(
    a: AgentNumbers, input_tokens: int, output_tokens: int
) -> BudgetExceededError | None:
    """Why a reservation must be refused before any budget is looked at, or ``None``.

    The gate first, then the input cap, then the output cap; the budget itself
    (with reallocation) is the store's next step.
    """
    amount = input_tokens + output_tokens
    if gated(a):
        assert a.last_confidence is not None and a.threshold is not None
        avail = a.allocated - a.consumed - a.reserved
        return ConfidenceGateError(a.name, amount, max(avail, 0), a.last_confidence, a.threshold)
    if a.max_input is not None and a.consumed_in + a.reserved_in + input_tokens > a.max_input:
        left = max(a.max_input - a.consumed_in - a.reserved_in, 0)
        return BudgetExceededError(a.name, input_tokens, left, "input cap")
    if a.max_output is not None and a.consumed_out + a.reserved_out + output_tokens > a.max_output:
        left = max(a.max_output - a.consumed_out - a.reserved_out, 0)
        return BudgetExceededError(a.name, output_tokens, left, "output cap")
    return None


def checked_plan(
    policy_name: str,
    needy: str,
    need: int,
    raw: Iterable[tuple[str, int]],
    offered: Mapping[str, int],
) -> tuple[list[tuple[str, int]], int]:
    """A policy's plan, refused unless every transfer is one the store offered.

    Raises:
        ContractError: a donor not offered or named twice, a non-positive or
            non-integer amount, more than its spare, or more than the need.
    """
    plan: list[tuple[str, int]] = []
    found = 0
    seen: set[str] = set()
    for name, tokens in raw:
        spare = offered.get(name)
        if (
            spare is None
            or name in seen
            or type(tokens) is not int
            or not 0 < tokens <= spare
            or found + tokens > need
        ):
            raise ContractError(
                f"Reallocation policy {policy_name!r} proposed an invalid transfer "
                f"({name!r}, {tokens!r}) for agent '{needy}'"
            )
        seen.add(name)
        plan.append((name, tokens))
        found += tokens
    return plan, found


def agent_status(
    a: AgentNumbers, *, max_tokens: int, complete: bool, depends_on: Sequence[str]
) -> AgentStatus:
    """The public status of one agent's numbers."""
    remaining = a.allocated - a.consumed - a.reserved
    return AgentStatus(
        agent=a.name,
        priority=a.priority,
        max_tokens=max_tokens,
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
        complete=complete,
        depends_on=tuple(depends_on),
    )
