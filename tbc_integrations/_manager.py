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
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from typing import Any, TypeVar, cast

from ._contracts import BudgetContract, Degrade, check_dependencies
from ._errors import BudgetExceededError, ContractError, UnknownAgentError
from ._ledger import DEFAULT_LEASE_SECONDS, Ledger
from ._limits import Limit
from ._pricing import ModelPrice, PriceTable
from ._records import AgentStatus
from ._usage import Usage, UsageLike
from ._validate import check_tokens
from .adaptive import AdaptiveGating, Outcome
from .events import BudgetEvent, BudgetWarning
from .policies import Donor, Needy, ReallocationPolicy
from .stores import Store
from .tokens import TokenCounter

__all__ = ["BudgetManager", "ContractsPolicy", "Reallocator"]

F = TypeVar("F", bound=Callable[..., Any])


def _warnings_to(callback: Callable[[BudgetWarning], None]) -> Callable[[BudgetEvent], None]:
    """A subscriber that hands only the warnings to ``callback``."""

    def deliver(event: BudgetEvent) -> None:
        if isinstance(event, BudgetWarning):
            callback(event)

    return deliver


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
        limits: :class:`Limit` budgets above the team, per run, user or period.
        team_per: A scope key (``"run"``) whose every value gets its own copy of the
            team: fresh allocations from the registered contracts, reallocation within
            that copy only (see :meth:`team_status`); ``None``: one team.
        forget_after: How long after a run's last activity its team is forgotten
            (seconds, or ``"90s"``, ``"30m"``, ``"24h"``, ``"7d"``; 7 days by default).
        fallback_price: The price of a model neither knows (``None``: such a call
            is refused for an agent with ``max_cost``, and counted in tokens only
            for the others, with a warning).
        on_warning: Called with every :class:`~tbc_integrations.events.BudgetWarning`
            (a soft limit crossed: an agent's ``warn_at`` or a limit's), once per
            crossing, after the verb that crossed it committed; an exception it raises
            is logged, never raised into the call.

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
        limits: Iterable[Limit] = (),
        on_warning: Callable[[BudgetWarning], None] | None = None,
        team_per: str | None = None,
        forget_after: str | float = "7d",
    ) -> None:
        if on_warning is not None and not callable(on_warning):
            raise ContractError(f"on_warning must be callable, got {on_warning!r}")
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
            limits=limits,
            team_per=team_per,
            forget_after=forget_after,
        )
        self.token_counter = token_counter if token_counter is not None else TokenCounter()
        self.adaptive = adaptive
        self.reallocator = Reallocator(self)
        self.telemetry: Any = None
        if telemetry is not None:  # tbcontracts' BudgetManager(telemetry=tracer)
            self._start_telemetry(telemetry if hasattr(telemetry, "start_span") else None)
        if on_warning is not None:
            self.subscribe(_warnings_to(on_warning))

    def enable_telemetry(self, service_name: str = "tbc_integrations") -> bool:
        """Report this manager through OpenTelemetry's global providers (``tbcontracts`` API).

        ``BudgetManager(telemetry=tracer)`` reports through that tracer instead.
        Returns False, changing nothing, when ``opentelemetry-api`` is not installed.
        """
        return self._start_telemetry(None)

    def _start_telemetry(self, tracer: Any) -> bool:
        try:
            from .telemetry import BudgetTelemetry
        except ImportError:
            return False
        if self.telemetry is None:
            self.telemetry = BudgetTelemetry(self, tracer=tracer)
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

    @property
    def contracts(self) -> dict[str, BudgetContract]:
        """Every agent's contract by name (a copy), reading ``last_confidence`` live.

        Example:
            >>> m = BudgetManager(); _ = m.register_agent("a", max_tokens=10)
            >>> m.record_usage("a", 1, confidence=0.4)
            >>> m.contracts["a"].last_confidence
            0.4
        """
        source = self.last_confidence
        return {name: c.bound_to(source) for name, c in self.store.contracts().items()}

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
        degrade: Iterable[Degrade | Mapping[str, Any]] = (),
        warn_at: float | None = None,
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
            degrade=tuple(degrade),  # checked by the contract
            warn_at=warn_at,
        )
        self.add_contract(contract)
        return contract.bound_to(self.last_confidence)

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
        self._remember(agent_name, usage.total_tokens, note)
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
        counter = self.token_counter

        def estimate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
            return sum(counter.count(a) for a in (*args, *kwargs.values()) if isinstance(a, str))

        def used(input_tokens: int, result: Any) -> Usage:
            return Usage(input_tokens, counter.count(result) if isinstance(result, str) else 0)

        return self._meter(agent_name, estimate, used, confidence_fn)

    def _meter(
        self,
        agent_name: str,
        estimate: Callable[[tuple[Any, ...], dict[str, Any]], int],
        used: Callable[[int, Any], Usage],
        confidence_of: Callable[[Any], float | None] | None = None,
        note: str | None = None,
    ) -> Callable[[F], F]:
        """The reserve/commit/release protocol around a sync or async function.

        ``estimate(args, kwargs)`` is the input reserved before the call;
        ``used(reserved_input, result)`` the usage committed after it;
        ``confidence_of(result)`` (``None``: no reading) feeds the gate. Shared by
        :meth:`govern` and the ``tbcontracts`` adapters (:mod:`tbc_integrations.adapters`).
        """
        if agent_name not in self.contracts:
            raise UnknownAgentError(agent_name)

        def settled(result: Any, overdraft: int, usage: Usage, label: str) -> Any:
            self._remember(agent_name, usage.total_tokens, label)
            if overdraft:
                raise BudgetExceededError(agent_name, usage.total_tokens, 0)
            return result

        def decorator(fn: F) -> F:
            label = note or str(getattr(fn, "__name__", type(fn).__name__))  # the history's note
            if inspect.iscoroutinefunction(fn):

                @functools.wraps(fn)
                async def awrapper(*args: Any, **kwargs: Any) -> Any:
                    reservation = await self.areserve(agent_name, estimate(args, kwargs))
                    try:
                        result = await cast(Callable[..., Awaitable[Any]], fn)(*args, **kwargs)
                        usage = used(reservation.input_tokens, result)
                    except BaseException:
                        await self.arelease(reservation)
                        raise
                    overdraft = await self.acommit(reservation, usage)
                    confidence = None if confidence_of is None else confidence_of(result)
                    if confidence is not None:
                        await self.arecord_confidence(agent_name, confidence)
                    return settled(result, overdraft, usage, label)

                return cast(F, awrapper)

            @functools.wraps(fn)
            def wrapper(*args: Any, **kwargs: Any) -> Any:
                reservation = self.reserve(agent_name, estimate(args, kwargs))
                try:
                    result = fn(*args, **kwargs)
                    usage = used(reservation.input_tokens, result)
                except BaseException:
                    self.release(reservation)
                    raise
                overdraft = self.commit(reservation, usage)
                confidence = None if confidence_of is None else confidence_of(result)
                if confidence is not None:
                    self.record_confidence(agent_name, confidence)
                return settled(result, overdraft, usage, label)

            return cast(F, wrapper)

        return decorator


class ContractsPolicy:
    """A reallocation policy that also obeys contracts a :class:`Reallocator` was given.

    ``tbcontracts`` keeps priorities and reserves in a contracts dict beside a
    ledger that only knows allocations (``Ledger.register(name, max_tokens)``).
    This policy applies those contracts on top of the ledger's own rules: a donor
    whose given contract outranks the needy agent's is skipped (never uphill),
    a donor gives nothing below its given ``min_reserve``, and donors are taken
    lowest given priority first, most remaining first. The store still applies
    its own rules to the plan, so where the two disagree the stricter one holds
    (a donor keeps the larger of its two reserves). The plan itself comes from
    ``inner`` (the ledger's policy), so the weighted policy stays weighted.

    Example:
        >>> from tbc_integrations import Ledger
        >>> ledger = Ledger(); ledger.register("hi", 100); ledger.register("lo", 100)
        >>> given = {"hi": BudgetContract("hi", priority=3, max_tokens=100),
        ...          "lo": BudgetContract("lo", priority=1, max_tokens=100)}
        >>> ledger.reallocate_with("lo", 50, ContractsPolicy(ledger.policy, given))
        0
        >>> ledger.reallocate_with("hi", 50, ContractsPolicy(ledger.policy, given))
        50
    """

    name = "contracts"

    def __init__(self, inner: ReallocationPolicy, contracts: Mapping[str, BudgetContract]) -> None:
        self.inner = inner
        self.contracts = contracts

    def eligible(self, needy: Needy, donors: Iterable[Donor]) -> list[Donor]:
        """The donors (as the store offered them) the given contracts allow, in order."""
        given = self.contracts.get(needy.name)
        rank = needy.priority if given is None else given.priority
        out: list[Donor] = []
        for donor in donors:
            contract = self.contracts.get(donor.name)
            if contract is not None and not donor.complete:
                if contract.priority > rank:
                    continue  # never from a more important agent
                spare = min(donor.spare, donor.available - contract.reserve)
                if spare <= 0:
                    continue
                donor = donor._replace(spare=spare, priority=contract.priority)
            out.append(donor)
        out.sort(key=lambda d: (not d.complete, 0 if d.complete else d.priority, -d.available))
        return out

    def plan(
        self, needy: Needy, need: int, donors: Iterator[Donor], *, partial: bool
    ) -> list[tuple[str, int]]:
        """The inner policy's plan over :meth:`eligible` donors, with the given priority."""
        given = self.contracts.get(needy.name)
        rank = needy.priority if given is None else given.priority
        top = max([needy.max_priority, rank, *(c.priority for c in self.contracts.values())])
        view = needy._replace(priority=rank, max_priority=top)
        return self.inner.plan(view, need, iter(self.eligible(needy, donors)), partial=partial)


class Reallocator:
    """The ``tbcontracts`` reallocator surface over a ledger.

    ``Reallocator(ledger)`` (or a manager's ``m.reallocator``) reallocates under
    the ledger's contracts and policy. ``Reallocator(contracts, ledger)``, the
    ``tbcontracts`` form, also obeys the ``contracts`` dict it is given (read at
    each call) wherever they differ from the ledger's, through
    :class:`ContractsPolicy`: tokens never flow from an agent whose given
    priority is higher than the needy one's, and a donor keeps its given
    reserve. Differences from ``tbcontracts``, which keep this package's
    invariants: the ledger's own rules hold as well (a donor keeps the larger
    of its two reserves, and the ledger's priorities are never climbed either);
    the move goes through the ledger's store in one transaction; and on the
    Redis store, which runs only its built-in policies, contracts that differ
    from the ledger's are refused with :class:`ContractError` (register the
    agents with those contracts instead).

    Example:
        >>> from tbc_integrations import Ledger
        >>> ledger = Ledger()
        >>> ledger.register("researcher", 1000); ledger.register("critic", 1000)
        >>> contracts = {
        ...     "researcher": BudgetContract("researcher", priority=3, max_tokens=1000),
        ...     "critic": BudgetContract("critic", priority=1, max_tokens=1000),
        ... }
        >>> r = Reallocator(contracts, ledger)
        >>> r.reallocate("critic", 300)  # the researcher outranks the critic
        0
        >>> r.find_donors(exclude="critic"), r.find_donors(exclude="researcher")
        ([], ['critic'])
        >>> r.reallocate("researcher", 300), ledger.allocated("critic")
        (300, 700)
    """

    def __init__(self, contracts: Any, ledger: Ledger | None = None, telemetry: Any = None) -> None:
        # tbcontracts' order is Reallocator(contracts, ledger[, telemetry]); the ledger
        # holds contracts of its own, so Reallocator(ledger) works as well.
        target = ledger if ledger is not None else contracts
        if not isinstance(target, Ledger):
            raise ContractError(f"Reallocator needs a Ledger or BudgetManager, got {target!r}")
        given: Mapping[str, BudgetContract] | None = None
        if ledger is not None and contracts is not ledger:
            if not isinstance(contracts, Mapping) or not all(
                isinstance(c, BudgetContract) for c in contracts.values()
            ):
                raise ContractError(
                    f"Reallocator's contracts must map agent names to BudgetContract, "
                    f"got {contracts!r}"
                )
            given = contracts
        self.ledger = target
        self._given = given

    @property
    def contracts(self) -> Mapping[str, BudgetContract]:
        """The contracts it obeys: those it was given, else the ledger's."""
        return self._given if self._given is not None else self.ledger.contracts

    def _differences(self) -> list[str]:
        """Where the given contracts differ from the ledger's, as text (empty: nowhere)."""
        if self._given is None:
            return []
        own = self.ledger.store.contracts()
        out = []
        for name, given in self._given.items():
            mine = own.get(name)
            if mine is not None and (mine.priority, mine.reserve) != (
                given.priority,
                given.reserve,
            ):
                out.append(
                    f"'{name}': priority {given.priority} / min_reserve {given.reserve} given, "
                    f"{mine.priority} / {mine.reserve} in the ledger"
                )
        return out

    def _run(self, agent: str, tokens: int, policy: ReallocationPolicy) -> int:
        try:
            self.ledger.store.check_policy(policy)
        except ContractError as exc:
            raise ContractError(
                f"{exc}. This Reallocator was given contracts that differ from the "
                f"ledger's ({'; '.join(self._differences())}): register the agents "
                "with those contracts to reallocate on this store; nothing was moved"
            ) from None
        return self.ledger.reallocate_with(agent, tokens, policy)

    def reallocate(self, needy_agent: str, shortfall: int) -> int:
        """Move up to ``shortfall`` to ``needy_agent`` for good; return how many moved.

        Example:
            >>> m = BudgetManager()
            >>> _ = m.register_agent("lo", priority=1, max_tokens=100)
            >>> _ = m.register_agent("hi", priority=2, max_tokens=10)
            >>> m.reallocator.reallocate("hi", 500), m.remaining("lo")
            (90, 10)
        """
        if not self._differences():
            return self.ledger.reallocate(needy_agent, shortfall)
        assert self._given is not None
        return self._run(needy_agent, shortfall, ContractsPolicy(self.ledger.policy, self._given))

    def find_donors(self, exclude: str) -> list[str]:
        """The agents :meth:`reallocate` would take from for ``exclude``, in its order.

        Unlike ``tbcontracts``, which also lists agents its ``reallocate`` then
        skips (more important than the needy one), only real donors are listed:
        spare above their reserve, not more important than ``exclude``, not
        held back for an agent that depends on them, and (for an agent budgeted
        in money only) none at all.

        Raises:
            UnknownAgentError: ``exclude`` is not an agent of the ledger.

        Example:
            >>> m = BudgetManager()
            >>> _ = m.register_agent("lo", priority=1, max_tokens=100)
            >>> _ = m.register_agent("hi", priority=2, max_tokens=100)
            >>> m.reallocator.find_donors("hi"), m.reallocator.find_donors("lo")
            (['lo'], [])
        """
        status = self.ledger.status()
        needy = status.get(exclude)
        if needy is None:
            raise UnknownAgentError(exclude)
        if needy.max_tokens is None:
            return []  # an agent budgeted in money only borrows no tokens
        waiting = {
            dep for s in status.values() if not s.complete for dep in s.depends_on
        }  # agents some unfinished agent still needs output from

        def order(s: AgentStatus) -> tuple[int, int, int, str]:
            return (
                (0, 0, -s.remaining, s.agent)
                if s.complete
                else (1, s.priority, -s.remaining, s.agent)
            )

        offered: list[Donor] = []
        for s in sorted(status.values(), key=order):
            if s.agent == exclude or s.max_tokens is None:
                continue
            if not (s.complete or s.priority <= needy.priority):
                continue
            spare = s.remaining if s.complete else s.remaining - s.min_reserve
            if spare <= 0:
                continue
            if not s.complete and not (s.consumed or s.reserved) and s.agent in waiting:
                continue  # held back until it has run for the agents that depend on it
            offered.append(Donor(s.agent, spare, s.priority, s.remaining, s.complete))
        if self._differences():
            assert self._given is not None
            view = Needy(exclude, needy.priority, needy.remaining, None, None, 0, None)
            offered = ContractsPolicy(self.ledger.policy, self._given).eligible(view, offered)
        return [d.name for d in offered]
