"""The embedded in-memory store: one lock, plain numbers, indexed donors.

Donors are kept in one lazy max-heap per priority level (and one for completed
agents), keyed by remaining budget. A heap entry is refreshed only when an
agent's remaining grows; entries that went stale because it shrank are fixed
when popped. So a reservation that borrows touches only the donors it takes
from, and a reservation that does not borrow touches no index at all.

Example:
    >>> from tbc_integrations import BudgetManager
    >>> from tbc_integrations.stores import MemoryStore
    >>> m = BudgetManager(store=MemoryStore())
    >>> _ = m.register_agent("a", max_tokens=100)
    >>> m.remaining("a")
    100
"""

from __future__ import annotations

import heapq
import itertools
import math
import os
import threading
from bisect import insort
from collections.abc import Generator

from tbc_integrations._contracts import BudgetContract
from tbc_integrations._errors import (
    BudgetExceededError,
    ContractError,
    ReservationError,
    UnknownAgentError,
)
from tbc_integrations._records import AgentStatus, Reservation
from tbc_integrations._usage import Usage
from tbc_integrations.events import (
    AgentRegistered,
    Committed,
    Completed,
    Expired,
    Released,
    Reserved,
    Transferred,
)
from tbc_integrations.policies import Donor, Needy, ReallocationPolicy

from ._base import EXPIRED_MEMORY_SECONDS, EventSink, Store
from ._rules import (
    admission_refusal,
    agent_status,
    apply_plan,
    checked_plan,
    clamped_output,
    committed_event,
    gated,
    new_confidence,
    new_threshold,
    overdraft_events,
    plan_transfer,
    record_usage,
    refused_event,
    return_loans,
)

__all__ = ["MemoryStore"]


class _Agent:
    """Mutable per-agent numbers (plain data; never leaves the store)."""

    __slots__ = (
        "allocated",
        "borrowed",
        "complete",
        "consumed",
        "consumed_in",
        "consumed_out",
        "contract",
        "key",
        "last_confidence",
        "lent",
        "max_input",
        "max_output",
        "min_reserve",
        "name",
        "priority",
        "refusals",
        "reserved",
        "reserved_in",
        "reserved_out",
        "threshold",
    )

    def __init__(self, contract: BudgetContract) -> None:
        self.name = contract.agent_name
        self.contract = contract
        self.priority = contract.priority
        self.min_reserve = contract.reserve
        self.max_input = contract.max_input_tokens
        self.max_output = contract.max_output_tokens
        self.threshold = contract.confidence_threshold
        self.allocated = contract.max_tokens
        self.consumed = self.consumed_in = self.consumed_out = 0
        self.reserved = self.reserved_in = self.reserved_out = 0
        self.borrowed = self.lent = self.refusals = 0
        self.last_confidence: float | None = None
        self.complete = False
        self.key: int | None = None  # remaining at this agent's live heap entry

    def gated(self) -> bool:
        return gated(self)


class MemoryStore(Store):
    """Thread-safe store in this process's memory (the default).

    Args:
        namespace: Label carried by reservations and events.

    Example:
        >>> store = MemoryStore(namespace="run-1")
        >>> store.namespace
        'run-1'
    """

    _short_path = True  # tests turn it off to check the short path against the full one

    def __init__(self, namespace: str = "default") -> None:
        self.namespace = namespace
        self._lock = threading.Lock()
        self._agents: dict[str, _Agent] = {}
        self._levels: list[int] = []  # sorted distinct priorities
        self._heaps: dict[int, list[tuple[int, str]]] = {}
        self._done_heap: list[tuple[int, str]] = []
        self._heap_size = 0
        self._open: dict[str, Reservation] = {}
        self._expired: dict[str, Reservation] = {}
        self._next_due = math.inf  # no open reservation's lease ends before this
        self._prefix = f"{os.getpid():x}.{id(self):x}."
        self._ids = itertools.count(1)
        self._pending_touch: list[_Agent] = []
        self._dependents: dict[str, set[str]] = {}  # producer -> agents that consume its output

    # ------------------------------------------------------------------ index
    def _touch(self, ag: _Agent) -> None:
        """Index ``ag`` again if its remaining grew past its live entry."""
        avail = ag.allocated - ag.consumed - ag.reserved
        key = ag.key
        if key is not None and avail <= key:
            return
        spare = avail if ag.complete else avail - ag.min_reserve
        if spare <= 0:
            return
        ag.key = avail
        heap = self._done_heap if ag.complete else self._heaps[ag.priority]
        heapq.heappush(heap, (-avail, ag.name))
        self._heap_size += 1
        if self._heap_size > 4 * len(self._agents) + 64:
            self._rebuild_index()

    def _rebuild_index(self) -> None:
        for heap in self._heaps.values():
            heap.clear()
        self._done_heap.clear()
        size = 0
        for ag in self._agents.values():
            ag.key = None
            avail = ag.allocated - ag.consumed - ag.reserved
            spare = avail if ag.complete else avail - ag.min_reserve
            if spare > 0:
                ag.key = avail
                heap = self._done_heap if ag.complete else self._heaps[ag.priority]
                heap.append((-avail, ag.name))
                size += 1
        for heap in self._heaps.values():
            heapq.heapify(heap)
        heapq.heapify(self._done_heap)
        self._heap_size = size

    def _pop_valid(self, heap: list[tuple[int, str]], done: bool) -> _Agent | None:
        """Pop the donor with most remaining from ``heap``, fixing stale entries."""
        agents = self._agents
        while heap:
            neg, name = heapq.heappop(heap)
            self._heap_size -= 1
            ag = agents[name]
            key = -neg
            if ag.key != key or ag.complete is not done:
                continue  # superseded entry
            ag.key = None
            avail = ag.allocated - ag.consumed - ag.reserved
            if avail < key:  # stale-high: re-file under the true value
                spare = avail if done else avail - ag.min_reserve
                if spare > 0:
                    ag.key = avail
                    heapq.heappush(heap, (-avail, name))
                    self._heap_size += 1
                continue
            return ag
        return None

    def _donors(
        self, needy: _Agent, popped: list[_Agent], offered: dict[str, int]
    ) -> Generator[Donor, None, None]:
        """Yield eligible donors in order, noting each in ``popped`` and ``offered``."""
        sources: list[tuple[list[tuple[int, str]], bool]] = [(self._done_heap, True)]
        for level in self._levels:
            if level > needy.priority:
                break
            sources.append((self._heaps[level], False))
        for heap, done in sources:
            while True:
                ag = self._pop_valid(heap, done)
                if ag is None:
                    break
                popped.append(ag)
                if ag is needy or (not done and self._protected(ag)):
                    continue
                avail = ag.allocated - ag.consumed - ag.reserved
                spare = avail if done else avail - ag.min_reserve
                if spare > 0:
                    offered[ag.name] = spare
                    yield Donor(ag.name, spare, ag.priority, avail, done)

    def _protected(self, ag: _Agent) -> bool:
        """An agent that has not run yet lends nothing while an active agent needs its output."""
        if ag.consumed or ag.reserved:
            return False
        agents = self._agents
        return any(
            (d := agents.get(name)) is not None and not d.complete
            for name in self._dependents.get(ag.name, ())
        )

    def _borrow(
        self,
        needy: _Agent,
        need: int,
        policy: ReallocationPolicy,
        partial: bool,
    ) -> tuple[list[tuple[_Agent, int]], int]:
        """Plan transfers for ``need``; return (checked plan, tokens found).

        Nothing is moved here; every popped donor is re-indexed.
        """
        popped: list[_Agent] = []
        offered: dict[str, int] = {}
        donors = self._donors(needy, popped, offered)
        view = Needy(
            needy.name,
            needy.priority,
            needy.allocated - needy.consumed - needy.reserved,
            needy.last_confidence,
            needy.threshold,
            needy.contract.max_tokens,
            needy.max_input,
            self._levels[-1],
        )
        try:
            raw = policy.plan(view, need, donors, partial=partial)
        finally:
            donors.close()
        try:
            names, found = checked_plan(policy.name, needy.name, need, raw, offered)
        except ContractError:
            for ag in popped:
                self._touch(ag)
            raise
        plan = [(self._agents[name], tokens) for name, tokens in names]
        self._pending_touch = popped
        return plan, found

    def _reindex_pending(self) -> None:
        for ag in self._pending_touch:
            self._touch(ag)
        self._pending_touch = []

    # ----------------------------------------------------------------- leases
    def _sweep(self, now: float, events: EventSink) -> int:
        """Expire every open reservation whose lease has ended; return how many.

        It scans the open reservations, and runs only once the first lease has ended
        (``_next_due``), then learns the next one: reservations settled before their
        lease leave nothing behind to clean up.
        """
        lapsed = sorted(
            (res.expires_at, rid) for rid, res in self._open.items() if res.expires_at <= now
        )
        for _, rid in lapsed:
            res = self._open.pop(rid)
            self._unhold(res)
            self._expired[rid] = res
            if events is not None:
                events.append(
                    Expired(
                        res.agent,
                        now,
                        self.namespace,
                        res.amount,
                        res.input_tokens,
                        res.output_tokens,
                        rid,
                        res.loans,
                        "lease",
                    )
                )
        self._next_due = min((res.expires_at for res in self._open.values()), default=math.inf)
        # lapsed reservations wait a day for a late commit, then are forgotten; they were
        # swept in order of their lease's end, so the oldest come first
        forget_before = now - EXPIRED_MEMORY_SECONDS
        while self._expired:
            rid, res = next(iter(self._expired.items()))
            if res.expires_at >= forget_before:
                break
            del self._expired[rid]
        return len(lapsed)

    def _unhold(self, res: Reservation) -> None:
        """Give a reservation's tokens back: loans to donors, the rest to the agent."""
        ag = self._agents[res.agent]
        ag.reserved -= res.input_tokens + res.output_tokens
        ag.reserved_in -= res.input_tokens
        ag.reserved_out -= res.output_tokens
        for donor_name, tokens in res.loans:
            donor = self._agents[donor_name]
            ag.allocated -= tokens
            ag.borrowed -= tokens
            donor.allocated += tokens
            donor.lent -= tokens
            self._touch(donor)
        self._touch(ag)

    def _agent(self, name: str) -> _Agent:
        ag = self._agents.get(name)
        if ag is None:
            raise UnknownAgentError(name)
        return ag

    # ------------------------------------------------------------------ verbs
    def register(self, contract: BudgetContract, now: float, events: EventSink) -> bool:
        with self._lock:
            existing = self._agents.get(contract.agent_name)
            if existing is not None:
                if existing.contract != contract:
                    raise ContractError(
                        f"Agent '{contract.agent_name}' already exists in namespace "
                        f"'{self.namespace}' with a different contract: "
                        f"{existing.contract.to_dict()} != {contract.to_dict()}"
                    )
                return False
            ag = _Agent(contract)
            self._agents[ag.name] = ag
            for producer in contract.depends_on:
                self._dependents.setdefault(producer, set()).add(ag.name)
            if ag.priority not in self._heaps:
                self._heaps[ag.priority] = []
                insort(self._levels, ag.priority)
            self._touch(ag)
            if events is not None:
                events.append(
                    AgentRegistered(
                        ag.name,
                        now,
                        self.namespace,
                        contract.max_tokens,
                        contract=contract.to_dict(),
                    )
                )
            return True

    def contracts(self) -> dict[str, BudgetContract]:
        with self._lock:
            return {name: ag.contract for name, ag in self._agents.items()}

    def reserve(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        now: float,
        lease_seconds: float,
        policy: ReallocationPolicy,
        events: EventSink,
        clamp_output: bool = False,
    ) -> Reservation:
        # acquire/release rather than `with`: half the cost, on every governed call
        self._lock.acquire()
        try:
            if now >= self._next_due:
                self._sweep(now, events)
            ag = self._agents.get(agent)
            if (
                self._short_path
                and ag is not None
                and ag.threshold is None
                and ag.max_input is None
                and ag.max_output is None
                and input_tokens + output_tokens <= ag.allocated - ag.consumed - ag.reserved
            ):
                # the common call: no gate or caps to check and the agent's own remaining
                # covers it, so admission has nothing to do (what _admit would conclude)
                loans: tuple[tuple[str, int], ...] = ()
            else:
                output_tokens, loans = self._admit(
                    ag, agent, input_tokens, output_tokens, now, policy, events, clamp_output, False
                )
                assert ag is not None
            amount = input_tokens + output_tokens
            ag.reserved += amount
            ag.reserved_in += input_tokens
            ag.reserved_out += output_tokens
            rid = self._prefix + str(next(self._ids))
            expires = now + lease_seconds
            # tuple.__new__ directly: the NamedTuple's own __new__ is a Python-level call
            res: Reservation = tuple.__new__(
                Reservation,
                (rid, agent, input_tokens, output_tokens, expires, loans, self.namespace),
            )
            self._open[rid] = res
            if expires < self._next_due:
                self._next_due = expires
            if events is not None:
                if loans:
                    events.append(plan_transfer(agent, now, self.namespace, rid, loans, "borrow"))
                events.append(
                    Reserved(
                        agent, now, self.namespace, amount, input_tokens, output_tokens, rid, loans
                    )
                )
            return res
        finally:
            self._lock.release()

    def check(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
    ) -> None:
        with self._lock:
            if now >= self._next_due:
                self._sweep(now, events)
            self._admit(
                self._agents.get(agent),
                agent,
                input_tokens,
                output_tokens,
                now,
                policy,
                events,
                False,
                True,
            )

    def _admit(
        self,
        ag: _Agent | None,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
        clamp_output: bool,
        probe: bool,
    ) -> tuple[int, tuple[tuple[str, int], ...]]:
        """Gate, caps, then budget (borrowing when short): raise the refusal, or return
        the output tokens to hold and the loans taken (none when ``probe``). The lock is held.
        """
        if ag is None:
            raise UnknownAgentError(agent)
        if clamp_output:
            output_tokens = clamped_output(ag, output_tokens)
        amount = input_tokens + output_tokens
        avail = ag.allocated - ag.consumed - ag.reserved
        refusal = admission_refusal(ag, input_tokens, output_tokens)
        loans: tuple[tuple[str, int], ...] = ()
        if refusal is None and amount > avail:
            need = amount - avail
            plan, found = self._borrow(ag, need, policy, partial=False)
            if found < need:
                self._reindex_pending()
                refusal = BudgetExceededError(agent, amount, max(avail, 0) + found)
            elif probe:
                self._reindex_pending()
            else:
                apply_plan(ag, plan)
                self._reindex_pending()
                loans = tuple((d.name, t) for d, t in plan)
        if refusal is not None:
            ag.refusals += 1
            if events is not None:
                why = refusal.reason
                events.append(
                    refused_event(agent, now, self.namespace, input_tokens, output_tokens, why)
                )
            raise refusal
        return output_tokens, loans

    def _settle_overdraft(
        self,
        ag: _Agent,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
        rid: str | None,
    ) -> int:
        """Cover a negative remaining by reallocation; return what stays uncovered."""
        short = ag.consumed + ag.reserved - ag.allocated
        if short <= 0:
            return 0
        plan, found = self._borrow(ag, short, policy, partial=True)
        apply_plan(ag, plan)
        self._reindex_pending()
        left = short - found
        overdraft_events(events, ag.name, now, self.namespace, rid, plan, left)
        return left

    def commit(
        self,
        reservation: Reservation,
        usage: Usage,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
        estimated: bool = False,
    ) -> int:
        self._lock.acquire()  # not `with`: see reserve
        try:
            if now >= self._next_due:
                self._sweep(now, events)
            rid = reservation.id
            res = self._open.pop(rid, None)
            if res is None:
                res = self._expired.pop(rid, None)
                if res is None:
                    raise self._settled_error(reservation)
                # Lease lapsed before the commit: its hold is gone, record usage in full.
                ag = self._agents[res.agent]
                record_usage(ag, usage)
                if events is not None:
                    late = committed_event(res, usage, now, self.namespace, estimated, "late")
                    events.append(late)
                return self._settle_overdraft(ag, now, policy, events, rid)
            ag = self._agents[res.agent]
            amount = res.input_tokens + res.output_tokens
            ag.reserved -= amount
            ag.reserved_in -= res.input_tokens
            ag.reserved_out -= res.output_tokens
            # record_usage, inline: this is the settlement of every governed call
            ui, uo = usage
            used = ui + uo
            ag.consumed += used
            ag.consumed_in += ui
            ag.consumed_out += uo
            if events is not None:
                events.append(committed_event(res, usage, now, self.namespace, estimated, ""))
            if used <= amount:
                unused = amount - used
                if unused:
                    if res.loans:
                        back = self._agents.__getitem__
                        for donor in return_loans(
                            ag, res.loans, unused, back, now, self.namespace, rid, events
                        ):
                            self._touch(donor)
                    self._touch(ag)
                return 0
            return self._settle_overdraft(ag, now, policy, events, rid)
        finally:
            self._lock.release()

    def _settled_error(self, reservation: Reservation) -> ReservationError:
        rid = reservation.id
        if rid.startswith(self._prefix):
            tail = rid[len(self._prefix) :]
            if tail.isdigit() and int(tail) > 0 and reservation.agent in self._agents:
                return ReservationError(
                    f"Reservation {rid} of agent '{reservation.agent}' is already settled "
                    "(committed or released); nothing was changed"
                )
        return ReservationError(
            f"Reservation {rid} of agent '{reservation.agent}' was not issued by this "
            f"store (namespace '{self.namespace}'); nothing was changed"
        )

    def release(self, reservation: Reservation, now: float, events: EventSink) -> None:
        with self._lock:
            if now >= self._next_due:
                self._sweep(now, events)
            rid = reservation.id
            res = self._open.pop(rid, None)
            if res is None:
                if self._expired.pop(rid, None) is not None:
                    return  # the lease already gave everything back
                raise self._settled_error(reservation)
            self._unhold(res)
            if events is not None:
                events.append(
                    Released(
                        res.agent,
                        now,
                        self.namespace,
                        res.amount,
                        res.input_tokens,
                        res.output_tokens,
                        rid,
                        res.loans,
                    )
                )

    def charge(
        self,
        agent: str,
        usage: Usage,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
        estimated: bool = False,
    ) -> int:
        with self._lock:
            if now >= self._next_due:
                self._sweep(now, events)
            ag = self._agent(agent)
            record_usage(ag, usage)
            if events is not None:
                events.append(
                    Committed(
                        agent,
                        now,
                        self.namespace,
                        usage[0] + usage[1],
                        usage[0],
                        usage[1],
                        None,
                        (),
                        "direct",
                        estimated,
                    )
                )
            return self._settle_overdraft(ag, now, policy, events, None)

    def reallocate(
        self,
        agent: str,
        tokens: int,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
    ) -> int:
        with self._lock:
            ag = self._agent(agent)
            if tokens <= 0:
                return 0
            plan, found = self._borrow(ag, tokens, policy, partial=True)
            apply_plan(ag, plan)
            self._reindex_pending()
            self._touch(ag)
            if plan and events is not None:
                loans = tuple((d.name, t) for d, t in plan)
                events.append(plan_transfer(agent, now, self.namespace, None, loans, "reallocate"))
            return found

    def adjust(self, agent: str, delta: int, now: float, events: EventSink) -> None:
        with self._lock:
            ag = self._agent(agent)
            avail = ag.allocated - ag.consumed - ag.reserved
            if delta < 0 and -delta > avail:
                raise BudgetExceededError(agent, -delta, max(avail, 0), "revocation")
            ag.allocated += delta
            self._touch(ag)
            if events is not None:
                events.append(
                    Transferred(agent, now, self.namespace, delta, 0, 0, None, (), "grant")
                )

    def complete(self, agent: str, now: float, events: EventSink) -> None:
        with self._lock:
            ag = self._agent(agent)
            if ag.complete:
                return
            ag.complete = True
            ag.key = None
            self._touch(ag)
            if events is not None:
                avail = ag.allocated - ag.consumed - ag.reserved
                events.append(Completed(agent, now, self.namespace, max(avail, 0)))

    def record_confidence(
        self, agent: str, confidence: float, now: float, events: EventSink
    ) -> bool:
        with self._lock:
            return new_confidence(
                self._agent(agent), agent, confidence, now, self.namespace, events
            )

    def set_threshold(
        self, agent: str, threshold: float | None, now: float, events: EventSink
    ) -> None:
        with self._lock:
            new_threshold(self._agent(agent), agent, threshold, now, self.namespace, events)

    def expire(self, now: float, events: EventSink) -> int:
        with self._lock:
            if now < self._next_due:  # no lease ends before it: nothing to scan
                return 0
            return self._sweep(now, events)

    def status(self, now: float) -> dict[str, AgentStatus]:
        with self._lock:
            return {name: self._status(ag) for name, ag in self._agents.items()}

    def _status(self, ag: _Agent) -> AgentStatus:
        return agent_status(
            ag,
            max_tokens=ag.contract.max_tokens,
            complete=ag.complete,
            depends_on=ag.contract.depends_on,
        )

    def remaining(self, agent: str, now: float) -> int:
        with self._lock:
            ag = self._agent(agent)
            return ag.allocated - ag.consumed - ag.reserved

    def open_reservations(self) -> list[Reservation]:
        """Reservations not yet settled (for tests and diagnostics)."""
        with self._lock:
            return list(self._open.values())
