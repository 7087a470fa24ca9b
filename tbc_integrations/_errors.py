"""Every exception the package raises, under one base class :class:`TBCError`.

Example:
    >>> from tbc_integrations import BudgetExceededError, TBCError
    >>> err = BudgetExceededError("writer", requested=500, available=120)
    >>> isinstance(err, TBCError), isinstance(err, RuntimeError)
    (True, True)
    >>> err.agent_name, err.requested, err.available
    ('writer', 500, 120)
"""

from __future__ import annotations

from decimal import Decimal

__all__ = [
    "BudgetExceededError",
    "ConfidenceGateError",
    "ContractError",
    "CostLimitError",
    "InvalidTokenCountError",
    "InvalidValueError",
    "LimitExceededError",
    "MissingDependencyError",
    "NamespaceLostError",
    "PriceNotFoundError",
    "ReservationError",
    "StoreError",
    "StoreUnavailableError",
    "TBCError",
    "UnknownAgentError",
]


class TBCError(Exception):
    """Base class of every error raised by ``tbc_integrations``."""


class BudgetExceededError(TBCError, RuntimeError):
    """An agent asked for more tokens than it and its donors can cover.

    Raised *before* any spend by :meth:`~tbc_integrations.Ledger.reserve`, and
    after recording by ``record_usage`` when real usage cannot be covered (an
    overdraft). It derives from :class:`RuntimeError` as well, so LangGraph's
    default retry policy does not retry it.

    Args:
        agent_name: The agent that was refused.
        requested: Tokens it asked for.
        available: Tokens it could have had, reallocation included.
        reason: Why, in a few words (``"budget"``, ``"input cap"``, ...).
    """

    def __init__(
        self,
        agent_name: str,
        requested: int,
        available: int,
        reason: str = "budget",
    ) -> None:
        self.agent_name = agent_name
        self.requested = requested
        self.available = available
        self.reason = reason
        super().__init__(self._message())

    def _message(self) -> str:
        if self.reason == "budget":
            return (
                f"Agent '{self.agent_name}' requested {self.requested} tokens but only "
                f"{self.available} were available even after attempting reallocation."
            )
        return (
            f"Agent '{self.agent_name}' requested {self.requested} tokens, refused by its "
            f"{self.reason} ({self.available} available)."
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.agent_name, self.requested, self.available, self.reason))


class ConfidenceGateError(BudgetExceededError):
    """The agent's last result was confident enough: further spend is refused.

    Args:
        agent_name: The gated agent.
        requested: Tokens it asked for.
        available: Tokens it still has.
        confidence: Its last recorded confidence.
        threshold: The threshold that confidence reached.
    """

    def __init__(
        self,
        agent_name: str,
        requested: int,
        available: int,
        confidence: float,
        threshold: float,
    ) -> None:
        self.confidence = confidence
        self.threshold = threshold
        super().__init__(agent_name, requested, available, reason="confidence gate")

    def _message(self) -> str:
        return (
            f"Agent '{self.agent_name}' is gated by confidence: its last result scored "
            f"{self.confidence:g} >= threshold {self.threshold:g}, so the {self.requested} "
            "tokens it requested were refused by the confidence gate."
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (self.agent_name, self.requested, self.available, self.confidence, self.threshold),
        )


class CostLimitError(BudgetExceededError):
    """The call's worst-case cost would take the agent past its ``max_cost``.

    Raised before any spend. ``requested`` and ``available`` are nano-dollars;
    :attr:`requested_cost` and :attr:`available_cost` give them in US dollars.

    Args:
        agent_name: The agent that was refused.
        requested: Nano-dollars the call could cost at most.
        available: Nano-dollars its cost cap still allows.

    .. versionadded:: 0.3
    """

    def __init__(self, agent_name: str, requested: int, available: int) -> None:
        super().__init__(agent_name, requested, available, reason="cost cap")

    @property
    def requested_cost(self) -> Decimal:
        """The call's worst-case cost, in US dollars."""
        from ._money import dollars  # _money needs this module's errors

        return dollars(self.requested)

    @property
    def available_cost(self) -> Decimal:
        """What the agent's cost cap still allows, in US dollars."""
        from ._money import dollars

        return dollars(self.available)

    def _message(self) -> str:
        return (
            f"Agent '{self.agent_name}' would spend up to ${self.requested_cost} on this call, "
            f"refused by its cost cap (${self.available_cost} left)."
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.agent_name, self.requested, self.available))


class LimitExceededError(BudgetExceededError):
    """A call that would not fit in a limit of its scope (a user's, a run's, the app's).

    Raised before any spend. ``limit`` is the limit row's key: the limit's name, the
    scope value and the period, joined by ``/``. ``requested`` and ``available`` are
    tokens, or nano-dollars when ``money``.

    .. versionadded:: 0.3
    """

    def __init__(
        self, agent_name: str, limit: str, requested: int, available: int, money: bool = False
    ) -> None:
        self.limit = limit
        self.money = money
        super().__init__(agent_name, requested, available, reason=f"limit {limit}")

    def _message(self) -> str:
        if self.money:
            from ._money import dollars

            return (
                f"Agent '{self.agent_name}' would spend up to ${dollars(self.requested)}, "
                f"refused by limit {self.limit} (${dollars(self.available)} left)."
            )
        return (
            f"Agent '{self.agent_name}' requested {self.requested} tokens, refused by limit "
            f"{self.limit} ({self.available} left)."
        )

    def __reduce__(self) -> tuple[object, ...]:
        return (
            type(self),
            (self.agent_name, self.limit, self.requested, self.available, self.money),
        )


class UnknownAgentError(TBCError, KeyError):
    """An agent name that no contract was registered for.

    Args:
        agent_name: The name that was not found.
    """

    def __init__(self, agent_name: str, hint: str = "") -> None:
        self.agent_name = agent_name
        self.hint = hint
        super().__init__(agent_name)

    def __str__(self) -> str:
        msg = f"Agent '{self.agent_name}' was never registered."
        return f"{msg} {self.hint}" if self.hint else msg

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.agent_name, self.hint))


class ContractError(TBCError, ValueError):
    """A contract, or a set of contracts, is invalid (bad field, cycle, duplicate)."""


class InvalidValueError(TBCError, ValueError):
    """An argument is malformed: a confidence, a lease, a token count, a usage record.

    The message names the agent and the offending value; the ledger is unchanged.

    .. versionadded:: 0.2
    """


class InvalidTokenCountError(InvalidValueError):
    """A token count or a usage record is malformed (or above what a store holds exactly).

    The message names the agent and the offending value; the ledger is unchanged.
    """


class ReservationError(TBCError):
    """A reservation cannot be settled: already settled, or not from this ledger."""


class StoreError(TBCError):
    """The ledger's store failed."""


class StoreUnavailableError(StoreError):
    """The ledger's store cannot be reached; the verb was refused (fail closed)."""


class NamespaceLostError(StoreUnavailableError):
    """The store no longer holds the namespace this manager knew (a Redis restart without
    persistence, a flushed database, a SQLite file deleted or replaced).

    Every verb of the manager that knew it is refused; a new manager on the store
    starts the namespace anew. See the README's recovery steps.

    .. versionadded:: 0.2
    """


class PriceNotFoundError(TBCError, LookupError):
    """No price is known for a call's model, and its agent has a cost cap.

    Raised before the request: a cost-capped call is never let through as free.
    Give the model a :class:`~tbc_integrations.ModelPrice` in
    ``BudgetManager(prices=...)``, or a ``fallback_price``.

    .. versionadded:: 0.3
    """


class MissingDependencyError(TBCError, ImportError):
    """An optional extra is needed for this feature (the message says which)."""
