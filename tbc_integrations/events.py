"""The ledger's event stream: one typed event per reserve, commit, transfer, ...

Subscribe with :meth:`~tbc_integrations.BudgetManager.subscribe`; telemetry, the
audit log and reports are all built on this one stream.

Example:
    >>> from tbc_integrations import BudgetManager
    >>> seen = []
    >>> m = BudgetManager()
    >>> _ = m.register_agent("a", max_tokens=100)
    >>> unsubscribe = m.subscribe(seen.append)
    >>> r = m.reserve("a", input_tokens=10, output_tokens=5)
    >>> [type(e).__name__ for e in seen]
    ['Reserved']
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from decimal import Decimal
from typing import Any, ClassVar

from ._money import dollars

__all__ = [
    "EVENT_TYPES",
    "AgentRegistered",
    "BudgetEvent",
    "BudgetWarning",
    "Committed",
    "Completed",
    "ConfidenceRecorded",
    "Degraded",
    "EventBus",
    "Expired",
    "GateChanged",
    "Overdrawn",
    "Refused",
    "Released",
    "Reserved",
    "Subscriber",
    "Transferred",
    "event_from_dict",
    "event_to_dict",
]

logger = logging.getLogger("tbc_integrations")


@dataclass(frozen=True)
class BudgetEvent:
    """Base of every ledger event.

    Attributes:
        agent: The agent the event is about (for a transfer, the receiver).
        time: Wall-clock seconds (the ledger's clock).
        namespace: The ledger's namespace.
        tokens: Tokens the event moved or recorded (input + output where split).
        input_tokens: Input part, where the verb knows it.
        output_tokens: Output part, where the verb knows it.
        reservation_id: The reservation concerned, if any.
        donors: ``(donor, tokens)`` pairs for transfers and borrowing reservations.
        reason: Short machine-readable reason (``"budget"``, ``"input cap"``, ...).
        estimated: True when the usage is an estimate, not provider-reported.
        cost_nanos: Money the event held, spent, returned or refused, in
            nano-dollars (:attr:`cost` gives ``Decimal`` dollars).
        run: The run whose own team the event is about (``BudgetManager(team_per=...)``;
            ``""``: the registered team).
    """

    kind: ClassVar[str] = "event"
    agent: str
    time: float
    namespace: str = "default"
    tokens: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    reservation_id: str | None = None
    donors: tuple[tuple[str, int], ...] = field(default=())
    reason: str = ""
    estimated: bool = False
    cost_nanos: int = 0
    run: str = ""

    @property
    def cost(self) -> Decimal:
        """:attr:`cost_nanos` as US dollars."""
        return dollars(self.cost_nanos)


@dataclass(frozen=True)
class AgentRegistered(BudgetEvent):
    """An agent was registered with ``tokens`` of initial allocation (``contract`` as data)."""

    kind: ClassVar[str] = "register"
    contract: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Reserved(BudgetEvent):
    """Tokens were reserved before a call; ``donors`` lent part of them. ``limits`` are
    the limit rows (``limit/value/period``) the call is held in too."""

    kind: ClassVar[str] = "reserve"
    limits: tuple[str, ...] = ()


@dataclass(frozen=True)
class Committed(BudgetEvent):
    """A reservation was settled with real usage (``tokens`` = usage); ``limits`` are the
    limit rows (``limit/value/period``) the usage was settled in too."""

    kind: ClassVar[str] = "commit"
    limits: tuple[str, ...] = ()


@dataclass(frozen=True)
class Released(BudgetEvent):
    """A reservation was released unused (error, cancellation)."""

    kind: ClassVar[str] = "release"


@dataclass(frozen=True)
class Expired(BudgetEvent):
    """A reservation outlived its lease and returned its tokens."""

    kind: ClassVar[str] = "expire"


@dataclass(frozen=True)
class Transferred(BudgetEvent):
    """Allocation moved: ``donors`` gave ``tokens`` to ``agent``.

    ``reason`` is ``"borrow"`` (a loan for a reservation), ``"return"`` (an unused
    loan going back; here ``agent`` is the donor receiving it and ``donors`` holds
    the borrower), or ``"overdraft"``/``"reallocate"`` (a permanent move).
    """

    kind: ClassVar[str] = "transfer"


@dataclass(frozen=True)
class Refused(BudgetEvent):
    """A reservation was refused before any spend; ``reason`` says why."""

    kind: ClassVar[str] = "refuse"


@dataclass(frozen=True)
class Overdrawn(BudgetEvent):
    """Real usage exceeded what the agent and its donors could cover.

    ``tokens`` is the agent's total uncovered overdraft after this settlement. A cap
    passed by real usage has ``tokens`` 0 and ``reason`` ``"input cap"``,
    ``"output cap"`` (``input_tokens``/``output_tokens`` say how far past it) or
    ``"cost cap"`` (``cost_nanos`` does).
    """

    kind: ClassVar[str] = "overdraft"


@dataclass(frozen=True)
class Degraded(BudgetEvent):
    """A call was degraded instead of refused: ``reason`` says which step of the agent's
    ladder was taken (``"model gpt-4o-mini"``, ``"max_tokens 200"``, ``"wrap-up"``) and why
    (``"refused: budget"``, ``"below 0.2"``)."""

    kind: ClassVar[str] = "degrade"


@dataclass(frozen=True)
class BudgetWarning(BudgetEvent):
    """A soft limit was crossed; ``tokens`` and ``cost_nanos`` are what has been spent.

    For a :class:`~tbc_integrations.Limit`, ``reason`` is the limit row's key
    (``limit/scope value/period``): delivered once per limit, scope value and period.
    For an agent's own contract (``warn_at`` on its contract), ``reason`` is
    ``"agent"``: delivered once per crossing (a grant or a reallocation that takes the
    agent back below its line re-arms it).

    Example:
        >>> w = BudgetWarning("writer", 0.0, reason="user/u-42/2026-12-03", tokens=900)
        >>> w.limit, w.scope_value, w.period
        ('user', 'u-42', '2026-12-03')
        >>> BudgetWarning("writer", 0.0, reason="agent").limit is None
        True
    """

    kind: ClassVar[str] = "warning"

    @property
    def limit(self) -> str | None:
        """The limit's name (``None``: the agent's own contract)."""
        return self.reason.split("/", 1)[0] if "/" in self.reason else None

    @property
    def scope_value(self) -> str | None:
        """The scope value of the limit row (``None``: the agent's own contract)."""
        return self.reason.split("/", 1)[1].rsplit("/", 1)[0] if "/" in self.reason else None

    @property
    def period(self) -> str | None:
        """The period label of the limit row (``None``: the agent's own contract)."""
        return self.reason.rsplit("/", 1)[1] if "/" in self.reason else None


@dataclass(frozen=True)
class ConfidenceRecorded(BudgetEvent):
    """A result's confidence was recorded for ``agent``."""

    kind: ClassVar[str] = "confidence"
    confidence: float = 0.0


@dataclass(frozen=True)
class GateChanged(BudgetEvent):
    """The agent's gate opened or closed, or its threshold changed.

    ``reason`` is ``"closed"``, ``"opened"`` or ``"threshold"`` (a new threshold
    that left the gate as it was).
    """

    kind: ClassVar[str] = "gate"
    confidence: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class Completed(BudgetEvent):
    """The agent was marked complete; its ``tokens`` left are spare for anyone."""

    kind: ClassVar[str] = "complete"


Subscriber = Callable[[BudgetEvent], None]


class EventBus:
    """Delivers events to subscribers; a failing subscriber is logged, never raised.

    Example:
        >>> bus = EventBus()
        >>> got = []
        >>> off = bus.subscribe(got.append)
        >>> bus.emit([Reserved(agent="a", time=0.0, tokens=3)])
        >>> len(got)
        1
    """

    def __init__(self) -> None:
        self._subscribers: tuple[Subscriber, ...] = ()
        self._lock = threading.Lock()
        self.active = False
        """True when at least one subscriber listens (a plain attribute: read on every verb)."""

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Add ``callback``; returns a function that removes it again."""
        with self._lock:
            self._subscribers = (*self._subscribers, callback)
            self.active = True

        def unsubscribe() -> None:
            with self._lock:
                subs = list(self._subscribers)
                if callback in subs:
                    subs.remove(callback)
                self._subscribers = tuple(subs)
                self.active = bool(subs)

        return unsubscribe

    def emit(self, events: list[BudgetEvent]) -> None:
        """Deliver ``events`` in order to every subscriber."""
        subscribers = self._subscribers
        for event in events:
            for callback in subscribers:
                try:
                    callback(event)
                except Exception:  # noqa: PERF203 - one bad subscriber must not stop the rest
                    logger.exception("tbc_integrations event subscriber %r failed", callback)


EVENT_TYPES: dict[str, type[BudgetEvent]] = {
    cls.kind: cls
    for cls in (
        AgentRegistered,
        Reserved,
        Committed,
        Released,
        Expired,
        Transferred,
        Refused,
        Overdrawn,
        ConfidenceRecorded,
        GateChanged,
        Completed,
        BudgetWarning,
        Degraded,
    )
}
"""Event classes by their ``kind``."""


def event_to_dict(event: BudgetEvent) -> dict[str, Any]:
    """Plain JSON-ready data for ``event`` (``kind`` first).

    Example:
        >>> event_to_dict(Reserved(agent="a", time=1.0, tokens=5))["kind"]
        'reserve'
    """
    data = asdict(event)
    data["donors"] = [list(pair) for pair in event.donors]
    if "limits" in data:
        data["limits"] = list(data["limits"])
    if not data["run"]:
        del data["run"]  # the registered team's events read as they always did
    return {"kind": event.kind, **data}


def event_from_dict(data: Mapping[str, Any]) -> BudgetEvent:
    """The typed event :func:`event_to_dict` wrote.

    Raises:
        ValueError: for an unknown ``kind`` or fields that do not belong to it.

    Example:
        >>> e = Reserved(agent="a", time=1.0, tokens=5, donors=(("b", 2),))
        >>> event_from_dict(event_to_dict(e)) == e
        True
    """
    kind = data.get("kind")
    cls = EVENT_TYPES.get(str(kind))
    if cls is None:
        raise ValueError(f"unknown event kind {kind!r}")
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in data.items() if k != "kind"}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"event {kind!r} has unknown field(s) {sorted(unknown)}")
    values["donors"] = tuple((str(d), int(t)) for d, t in values.get("donors") or ())
    if "limits" in values:
        values["limits"] = tuple(str(k) for k in values["limits"] or ())
    return cls(**values)
