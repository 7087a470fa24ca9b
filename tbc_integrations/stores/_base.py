"""The store interface: each ledger verb is one atomic operation of a store.

A store keeps plain data (numbers per agent, reservation records) so that a
durable store can do each verb, reallocation included, in one transaction or
one server-side script. The :class:`~tbc_integrations.Ledger` validates input,
reads the clock and delivers events; the store does the arithmetic atomically.

Example:
    >>> from tbc_integrations.stores import MemoryStore, Store
    >>> isinstance(MemoryStore(), Store)
    True
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from tbc_integrations._contracts import BudgetContract
from tbc_integrations._records import AgentStatus, Reservation
from tbc_integrations._usage import Usage
from tbc_integrations.events import BudgetEvent
from tbc_integrations.policies import ReallocationPolicy

__all__ = ["EXPIRED_MEMORY_SECONDS", "SETTLED_MEMORY_SECONDS", "EventSink", "Store"]

SETTLED_MEMORY_SECONDS = 3600.0
"""How long a durable store remembers a settled reservation's id.

A commit or release retried within it (after a lost reply or a restarted server)
is refused as already settled; after it, as not issued by the store. Either way it
is never counted twice; the window only bounds what the store keeps.
"""

EXPIRED_MEMORY_SECONDS = 86400.0
"""How long a store keeps a reservation whose lease lapsed, for a late commit."""

EventSink = list[BudgetEvent] | None
"""Where a verb appends its events; ``None`` when nobody listens (no events built)."""


class Store(ABC):
    """Atomic verbs over one namespace's agents and reservations.

    Every method is atomic with respect to every other call on the same store,
    from any thread (and, for durable stores, any process). ``now`` is the
    ledger's clock reading; lapsed leases are reclaimed at the start of a verb.
    """

    namespace: str

    @abstractmethod
    def register(self, contract: BudgetContract, now: float, events: EventSink) -> bool:
        """Create the agent, or attach when it exists with an equal contract.

        Returns True when created. Raises ``ContractError`` for a different
        contract under the same name.
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
        events: EventSink,
        clamp_output: bool = False,
    ) -> Reservation:
        """Hold tokens for a call, borrowing under ``policy``, or raise before any spend.

        With ``clamp_output``, an output request above the agent's remaining output
        cap is lowered to it (a cap already used up still refuses).
        """

    @abstractmethod
    def check(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
    ) -> None:
        """Raise as :meth:`reserve` would, but hold and move nothing when it would pass.

        A refusal counts and is evented like any other.
        """

    @abstractmethod
    def commit(
        self,
        reservation: Reservation,
        usage: Usage,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
        estimated: bool = False,
    ) -> int:
        """Settle with real usage; return the agent's uncovered overdraft (0 if none)."""

    @abstractmethod
    def release(self, reservation: Reservation, now: float, events: EventSink) -> None:
        """Return a reservation's tokens unused (and its loans to their donors)."""

    @abstractmethod
    def charge(
        self,
        agent: str,
        usage: Usage,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
        estimated: bool = False,
    ) -> int:
        """Record usage with no reservation; return the uncovered overdraft."""

    @abstractmethod
    def reallocate(
        self,
        agent: str,
        tokens: int,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
    ) -> int:
        """Move up to ``tokens`` to ``agent`` for good; return how many moved."""

    @abstractmethod
    def adjust(self, agent: str, delta: int, now: float, events: EventSink) -> None:
        """Grant (``delta`` > 0) or revoke (< 0) allocation from outside the system."""

    @abstractmethod
    def complete(self, agent: str, now: float, events: EventSink) -> None:
        """Mark ``agent`` complete: everything it has left is spare for anyone."""

    @abstractmethod
    def record_confidence(
        self, agent: str, confidence: float, now: float, events: EventSink
    ) -> bool:
        """Record a result's confidence; return whether the agent is now gated."""

    @abstractmethod
    def set_threshold(
        self, agent: str, threshold: float | None, now: float, events: EventSink
    ) -> None:
        """Change the agent's effective confidence threshold."""

    @abstractmethod
    def expire(self, now: float, events: EventSink) -> int:
        """Reclaim every reservation whose lease lapsed; return how many."""

    @abstractmethod
    def status(self, now: float) -> dict[str, AgentStatus]:
        """A consistent snapshot of every agent (call :meth:`expire` first to reclaim leases)."""

    @abstractmethod
    def remaining(self, agent: str, now: float) -> int:
        """What new reservations for ``agent`` can still use."""

    @abstractmethod
    def open_reservations(self) -> list[Reservation]:
        """Reservations not yet settled (for snapshots and diagnostics)."""

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to do by default
        """Release connections or files; the memory store has none."""

    # Async forms. Stores with a native async client override these; the
    # in-memory store's verbs never block, so calling them directly is safe.
    async def areserve(
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
        """Async :meth:`reserve`."""
        return self.reserve(
            agent, input_tokens, output_tokens, now, lease_seconds, policy, events, clamp_output
        )

    async def acommit(
        self,
        reservation: Reservation,
        usage: Usage,
        now: float,
        policy: ReallocationPolicy,
        events: EventSink,
        estimated: bool = False,
    ) -> int:
        """Async :meth:`commit`."""
        return self.commit(reservation, usage, now, policy, events, estimated)

    async def arelease(self, reservation: Reservation, now: float, events: EventSink) -> None:
        """Async :meth:`release`."""
        self.release(reservation, now, events)
