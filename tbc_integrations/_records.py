"""Plain-data records the ledger hands out: reservations and per-agent status.

Example:
    >>> from tbc_integrations import BudgetManager
    >>> m = BudgetManager()
    >>> _ = m.register_agent("a", max_tokens=100)
    >>> r = m.reserve("a", input_tokens=10, output_tokens=20)
    >>> r.agent, r.amount
    ('a', 30)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from types import MappingProxyType
from typing import Any, NamedTuple

from ._money import dollars

__all__ = ["AgentSpend", "AgentStatus", "LimitStatus", "Reservation"]


class Reservation(NamedTuple):
    """Tokens held for one call until it is committed or released.

    Attributes:
        id: Unique id within the ledger's store.
        agent: The agent the tokens are held for.
        input_tokens: Input tokens held.
        output_tokens: Output tokens held.
        expires_at: Clock time after which the lease lapses and the tokens return.
        loans: ``(donor, tokens)`` pairs borrowed to cover this reservation; what
            the call does not use goes back to these donors.
        namespace: The ledger's namespace.
        cost_nanos: Money held for the call's worst case, in nano-dollars
            (:attr:`cost` gives US dollars).
        model: The model the call is priced by (``None``: not priced).
        provider: The model's provider, where known.
        limits: The limit rows (limit/scope value/period) the call is held in.
        team: The run whose own team holds the call (``""``: the manager's team; see
            ``BudgetManager(team_per=...)``).
    """

    id: str
    agent: str
    input_tokens: int
    output_tokens: int
    expires_at: float
    loans: tuple[tuple[str, int], ...] = ()
    namespace: str = "default"
    cost_nanos: int = 0
    model: str | None = None
    provider: str | None = None
    limits: tuple[str, ...] = ()
    team: str = ""

    @property
    def cost(self) -> Decimal:
        """Money held for the call, in US dollars."""
        return dollars(self.cost_nanos)

    @property
    def amount(self) -> int:
        """Total tokens held (input + output)."""
        return self.input_tokens + self.output_tokens

    @property
    def borrowed(self) -> int:
        """Tokens of this reservation that were lent by other agents."""
        return sum(t for _, t in self.loans)


@dataclass(frozen=True)
class AgentStatus:
    """One agent's full state, as :meth:`~tbc_integrations.BudgetManager.status` shows it.

    ``remaining`` is what new reservations can still use: allocated minus consumed
    minus reserved (negative only while the agent is overdrawn; for an agent
    budgeted in money only, every token a store holds, 2**53 - 1, minus its use).
    Money is in US dollars: ``cost`` spent, ``cost_reserved`` held for calls in
    flight, ``cost_remaining`` what the cost cap ``max_cost`` still allows
    (``None`` without a cap). ``output_cap_left`` is what the output cap still
    allows a new call (``None`` without one): what a plugin lowers a request's
    ``max_tokens`` to. ``warned`` is True once the agent's spend crossed its
    contract's ``warn_at`` (and its warning was delivered), until a grant or a
    reallocation takes it back below the line.
    """

    agent: str
    priority: int
    max_tokens: int | None
    min_reserve: int
    allocated: int
    consumed: int
    reserved: int
    remaining: int
    input_tokens: int
    output_tokens: int
    borrowed: int
    lent: int
    overdraft: int
    refusals: int
    last_confidence: float | None
    confidence_threshold: float | None
    gated: bool
    complete: bool
    depends_on: tuple[str, ...] = ()
    max_cost: Decimal | None = None
    cost: Decimal = Decimal(0)
    cost_reserved: Decimal = Decimal(0)
    cost_remaining: Decimal | None = None
    output_cap_left: int | None = None
    warned: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form.

        Example:
            >>> from tbc_integrations import BudgetManager
            >>> m = BudgetManager(); _ = m.register_agent("a", max_tokens=5)
            >>> m.status()["a"].to_dict()["allocated"]
            5
        """
        out = asdict(self)
        out["depends_on"] = list(self.depends_on)
        for key in ("max_cost", "cost", "cost_reserved", "cost_remaining"):
            if out[key] is not None:
                out[key] = str(out[key])  # exact, and JSON-ready
        return out


@dataclass(frozen=True)
class AgentSpend:
    """What one agent's calls settled in one limit row (one scope value, one period).

    Example:
        >>> AgentSpend(tokens=120, cost=Decimal("0.002"), calls=3).calls
        3
    """

    tokens: int
    cost: Decimal
    calls: int


@dataclass(frozen=True)
class LimitStatus:
    """One limit's numbers for one scope value, in the period that holds a given time.

    ``remaining`` and ``cost_remaining`` are what new calls can still use (``None`` for
    the amount the limit does not cap); ``ends`` is when the period ends (``None``: a
    limit without a window). For a rolling window, ``period`` is its duration
    (``"24h"``), ``consumed`` and ``cost`` what was spent within it, and ``ends`` when
    the oldest spend still counted leaves it (``None``: none is counted).
    ``agents`` is each agent's spend within the row (tokens, dollars, calls settled;
    for a rolling window, all the row has settled), by agent name; ``warn_tokens`` and
    ``warn_cost`` are the soft limit's lines (``None``: no ``warn_at``).

    Example:
        >>> from tbc_integrations import BudgetManager, Limit
        >>> m = BudgetManager(limits=[Limit("user", max_tokens=100)])
        >>> _ = m.register_agent("a")
        >>> m.limit_status("user", "u-1").remaining
        100
    """

    limit: str
    value: str
    period: str
    ends: float | None
    max_tokens: int | None
    max_cost: Decimal | None
    consumed: int
    reserved: int
    remaining: int | None
    cost: Decimal
    cost_reserved: Decimal
    cost_remaining: Decimal | None
    warned: bool
    agents: Mapping[str, AgentSpend] = field(default_factory=lambda: MappingProxyType({}))
    warn_tokens: int | None = None
    warn_cost: Decimal | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (money as exact decimal strings, JSON-ready).

        Example:
            >>> from tbc_integrations import BudgetManager, Limit
            >>> m = BudgetManager(limits=[Limit("user", max_tokens=100)])
            >>> m.limit_status("user", "u-1").to_dict()["remaining"]
            100
        """
        out: dict[str, Any] = {}
        for key, value in self.__dict__.items():
            out[key] = str(value) if isinstance(value, Decimal) else value
        out["agents"] = {
            name: {"tokens": s.tokens, "cost": str(s.cost), "calls": s.calls}
            for name, s in self.agents.items()
        }
        return out
