"""The manager: contracts, ledger, reallocation and gating behind one object.

``BudgetManager`` keeps the ``tbcontracts`` surface (``register_agent``,
``govern``, ``record_usage``, ``remaining``, ``report``, ``ledger``,
``contracts``) so users switch by changing the import, and adds the
reserve/commit/release protocol that makes budgets hold *before* the spend.

Example:
    >>> from tbc_integrations import BudgetManager
    >>> m = BudgetManager()
    >>> _ = m.register_agent("researcher", priority=3, max_tokens=4000)
    >>> _ = m.register_agent("writer", priority=2, max_tokens=2000)
    >>> @m.govern("writer")
    ... def write(prompt: str) -> str:
    ...     return "a short draft"
    >>> write("draft the summary")
    'a short draft'
    >>> m.report()["writer"]["consumed"] > 0
    True
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any, TypeVar, cast

from ._contracts import BudgetContract, check_dependencies
from ._errors import BudgetExceededError, ContractError, UnknownAgentError
from ._ledger import DEFAULT_LEASE_SECONDS, Ledger
from ._pricing import ModelPrice, PriceTable
from ._usage import Usage, UsageLike
from ._validate import check_tokens
from .adaptive import AdaptiveGating, Outcome
from .policies import ReallocationPolicy
from .stores import Store
from .tokens import TokenCounter

__all__ = ["BudgetManager", "Reallocator"]

F = TypeVar("F", bound=Callable[..., Any])


class BudgetManager(Ledger):
    """Token budget contracts for a team of agents.

    Args:
        store: A store object or URL (``memory://`` by default).
        namespace: The store namespace this manager works in.
        policy: Reallocation policy (greedy by default).
        lease_seconds: Default lease of a reservation.
        clock: Seconds-returning clock (see :class:`~tbc_integrations.Ledger`).
        token_counter: Counter used by :meth:`govern` to estimate tokens.
        prices: ``{model: ModelPrice}`` in US dollars per million tokens, merged
            over genai-prices (the ``prices`` extra), or a :class:`PriceTable`.
        fallback_price: The price of a model neither knows (``None``: such a call
            is refused for an agent with ``max_cost``, and counted in tokens only
            for the others, with a warning).

    Example:
        >>> m = BudgetManager()
        >>> _ = m.register_agent("a", max_tokens=100, max_output_tokens=40)
        >>> with m.spend("a", input_tokens=20, output_tokens=40) as call:
        ...     call.set_usage({"input_tokens": 20, "output_tokens": 12})
        >>> m.remaining("a")
        68
    """

    def __init__(
        self,
        store: Store | str | None = None,
        *,
        namespace: str = "default",
        policy: ReallocationPolicy | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        clock: Callable[[], float] | None = None,
        token_counter: TokenCounter | None = None,
        adaptive: AdaptiveGating | None = None,
        fail_open: bool = False,
        telemetry: Any = None,
        prices: PriceTable | Mapping[str, ModelPrice | Mapping[str, Any]] | None = None,
        fallback_price: ModelPrice | None = None,
    ) -> None:
        if not isinstance(prices, PriceTable):
            prices = PriceTable(prices, fallback=fallback_price)
        elif fallback_price is not None:
            raise ContractError("give fallback_price to the PriceTable itself, not beside it")
        super().__init__(
            store,
            policy=policy,
            namespace=namespace,
            lease_seconds=lease_seconds,
            clock=clock,
            fail_open=fail_open,
            prices=prices,
        )
        self.token_counter = token_counter if token_counter is not None else TokenCounter()
        self.adaptive = adaptive
        self.reallocator = Reallocator(self)
        self.telemetry: Any = None
        if telemetry is not None:  # tbcontracts' BudgetManager(telemetry=tracer)
            self.enable_telemetry()

    def enable_telemetry(self, service_name: str = "tbc_integrations") -> bool:
        """Report this manager through OpenTelemetry's global providers (``tbcontracts`` API).

        Returns False, changing nothing, when ``opentelemetry-api`` is not installed.
        """
        try:
            from .telemetry import BudgetTelemetry
        except ImportError:
            return False
        if self.telemetry is None:
            self.telemetry = BudgetTelemetry(self)
        return True

    @classmethod
    def from_contracts(
        cls, contracts: Iterable[BudgetContract] | Mapping[str, Mapping[str, Any]], **kwargs: Any
    ) -> BudgetManager:
        """A manager with every contract registered and dependencies checked.

        Example:
            >>> spec = {"a": {"max_tokens": 10}, "b": {"depends_on": ["a"]}}
            >>> m = BudgetManager.from_contracts(spec)
            >>> sorted(m.contracts)
            ['a', 'b']
        """
        items: list[BudgetContract] = []
        if isinstance(contracts, Mapping):
            for name, fields in contracts.items():
                if not isinstance(fields, Mapping):
                    raise ContractError(
                        f"Agent '{name}': contract must be a mapping, got {fields!r}"
                    )
                items.append(BudgetContract.from_dict({"agent_name": name, **fields}))
        else:
            items = list(contracts)
        check_dependencies({c.agent_name: c for c in items}, complete=True)
        manager = cls(**kwargs)
        for contract in items:
            manager.add_contract(contract)
        return manager

    # ----------------------------------------------------- tbcontracts surface
    @property
    def ledger(self) -> Ledger:
        """The ledger (this manager is one)."""
        return self

    def register_agent(
        self,
        agent_name: str,
        priority: int = 1,
        max_tokens: int | None = None,
        min_reserve: int | None = None,
        confidence_threshold: float | None = None,
        *,
        max_input_tokens: int | None = None,
        max_output_tokens: int | None = None,
        depends_on: Iterable[str] = (),
        max_cost: Decimal | str | float | None = None,
    ) -> BudgetContract:
        """Register an agent's contract and return it.

        ``max_tokens`` is 1000 unless ``max_cost`` (US dollars) is given alone: then
        the agent is budgeted in money only (see :class:`BudgetContract`).

        Raises:
            ContractError: a bad field, a dependency cycle, or a second
                registration of the same name with this manager.
        """
        contract = BudgetContract(
            agent_name,
            priority=priority,
            max_tokens=max_tokens,
            min_reserve=min_reserve,
            confidence_threshold=confidence_threshold,
            max_input_tokens=max_input_tokens,
            max_output_tokens=max_output_tokens,
            depends_on=cast(Sequence[str], depends_on),  # checked by the contract
            max_cost=cast(Decimal | None, max_cost),  # checked by the contract
        )
        self.add_contract(contract)
        return contract

    def record_usage(
        self,
        agent_name: str,
        tokens: int | UsageLike,
        note: str = "usage",
        confidence: float | None = None,
    ) -> None:
        """Record real usage (an int total, or a usage record) for ``agent_name``.

        The usage is always recorded in full. If the agent and its donors
        cannot cover it, :class:`BudgetExceededError` is raised *after*
        recording, and the agent stays refused until the overdraft is covered.
        An int total counts as input tokens.

        Raises:
            UnknownAgentError: the agent was never registered.
            InvalidTokenCountError: ``tokens`` is malformed (nothing recorded).
            BudgetExceededError: the usage overdrew the agent.
        """
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            usage = Usage(check_tokens(tokens, "tokens", agent_name), 0)
        else:
            usage = Usage.parse(tokens, agent=agent_name)
        if confidence is not None:
            from ._validate import check_confidence

            check_confidence(confidence, agent_name)
        overdraft = self.charge(agent_name, usage)
        if confidence is not None:
            self.record_confidence(agent_name, confidence)
        if overdraft:
            raise BudgetExceededError(
                agent_name, usage.total_tokens, usage.total_tokens - overdraft
            )

    def record_outcome(
        self, agent_name: str, confidence: float, correct: bool, cost: float = 0.0
    ) -> float | None:
        """Report how a result turned out, for adaptive gating; returns a new threshold if set.

        Once the agent's window holds enough outcomes, its threshold becomes the
        calibrated one (an event, like every threshold change). Needs
        ``BudgetManager(adaptive=AdaptiveGating(...))``.

        Raises:
            ContractError: no adaptive gating configured.
            InvalidValueError: confidence outside [0, 1] or a bad cost.
            UnknownAgentError: the agent was never registered.
        """
        from ._validate import check_confidence

        if self.adaptive is None:
            raise ContractError(
                "record_outcome needs adaptive gating: BudgetManager(adaptive=AdaptiveGating())"
            )
        value = check_confidence(confidence, agent_name)
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not cost >= 0:
            from ._errors import InvalidValueError

            raise InvalidValueError(
                f"Agent '{agent_name}': cost must be a non-negative number, got {cost!r}"
            )
        if agent_name not in self.contracts:
            raise UnknownAgentError(agent_name)
        threshold = self.adaptive.observe(agent_name, Outcome(value, bool(correct), float(cost)))
        if threshold is not None and self.status()[agent_name].confidence_threshold != threshold:
            self.set_threshold(agent_name, threshold)
        return threshold

    def govern(
        self,
        agent_name: str,
        confidence_fn: Callable[[Any], float] | None = None,
    ) -> Callable[[F], F]:
        """Decorate a sync or async function so every call is metered for ``agent_name``.

        Before the call, the estimated input (string arguments) is reserved,
        so a gated or exhausted agent is refused before the function runs.
        After it, input plus the estimated output is committed; an exception
        releases the reservation. ``confidence_fn(result)`` feeds the gate.

        Raises:
            UnknownAgentError: at decoration, for an unregistered agent.
        """
        if agent_name not in self.contracts:
            raise UnknownAgentError(agent_name)
        counter = self.token_counter

        def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
            return sum(counter.count(a) for a in (*args, *kwargs.values()) if isinstance(a, str))

        def used(reservation: Any, result: Any) -> Usage:
            return Usage(
                reservation.input_tokens, counter.count(result) if isinstance(result, str) else 0
            )

        def settle(reservation: Any, result: Any) -> Any:
            usage = used(reservation, result)
            overdraft = self.commit(reservation, usage)
            if confidence_fn is not None:
                self.record_confidence(agent_name, confidence_fn(result))
            if overdraft:
                raise BudgetExceededError(agent_name, usage.total_tokens, 0)
            return result

        async def asettle(reservation: Any, result: Any) -> Any:
            """:func:`settle` with the ledger's async verbs."""
            usage = used(reservation, result)
            overdraft = await self.acommit(reservation, usage)
            if confidence_fn is not None:
                await self.arecord_confidence(agent_name, confidence_fn(result))
            if overdraft:
                raise BudgetExceededError(agent_name, usage.total_tokens, 0)
            return result

        def decorator(fn: F) -> F:
            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def awrapper(*args: Any, **kwargs: Any) -> Any:
                    reservation = await self.areserve(agent_name, estimate(args, kwargs))
                    try:
                        result = await cast(Callable[..., Awaitable[Any]], fn)(*args, **kwargs)
                    except BaseException:
                        await self.arelease(reservation)
                        raise
                    return await asettle(reservation, result)

                return cast(F, awrapper)

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                reservation = self.reserve(agent_name, estimate(args, kwargs))
                try:
                    result = fn(*args, **kwargs)
                except BaseException:
                    self.release(reservation)
                    raise
                return settle(reservation, result)

            return cast(F, wrapper)

        return decorator


class Reallocator:
    """The ``tbcontracts`` reallocator surface over a ledger's policy.

    Example:
        >>> m = BudgetManager()
        >>> _ = m.register_agent("lo", priority=1, max_tokens=100)
        >>> _ = m.register_agent("hi", priority=2, max_tokens=10)
        >>> m.reallocator.reallocate("hi", 50)
        50
        >>> m.remaining("hi"), m.remaining("lo")
        (60, 50)
    """

    def __init__(self, contracts: Any, ledger: Ledger | None = None, telemetry: Any = None) -> None:
        # tbcontracts' order is Reallocator(contracts, ledger[, telemetry]); the contracts
        # live in the ledger here, so Reallocator(ledger) works as well.
        target = ledger if ledger is not None else contracts
        if not isinstance(target, Ledger):
            raise ContractError(f"Reallocator needs a Ledger or BudgetManager, got {target!r}")
        self.ledger = target

    def reallocate(self, needy_agent: str, shortfall: int) -> int:
        """Move up to ``shortfall`` to ``needy_agent`` for good; return how many moved."""
        return self.ledger.reallocate(needy_agent, shortfall)

    def find_donors(self, exclude: str) -> list[str]:
        """Agents with spare above their reserve, in the order they would give."""
        status = self.ledger.status()
        donors = [
            s
            for name, s in status.items()
            if name != exclude and s.remaining - (0 if s.complete else s.min_reserve) > 0
        ]
        donors.sort(key=lambda s: (not s.complete, s.priority, -s.remaining))
        return [s.agent for s in donors]
