"""The ledger: reserve before a call, commit real usage after it, release on error.

Example:
    >>> from tbc_integrations import Ledger, BudgetContract
    >>> ledger = Ledger()
    >>> ledger.add_contract(BudgetContract("writer", max_tokens=1000))
    True
    >>> with ledger.spend("writer", input_tokens=120, output_tokens=300) as call:
    ...     call.set_usage({"prompt_tokens": 118, "completion_tokens": 240})
    >>> ledger.report()["writer"]
    {'allocated': 1000, 'consumed': 358, 'remaining': 642}
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from ._contracts import BudgetContract, check_dependencies
from ._engine import LimitHold, TeamHold, split_limit_key
from ._errors import (
    ContractError,
    InvalidTokenCountError,
    InvalidValueError,
    NamespaceLostError,
    PriceNotFoundError,
    ReservationError,
    StoreUnavailableError,
    UnknownAgentError,
)
from ._limits import (
    Limit,
    check_scope,
    current_scope,
    limit_holds,
    parse_duration,
    row_status,
    scoped,
    scoped_value,
)
from ._money import MAX_NANOS, ceil_nanos, dollars, to_decimal
from ._pricing import ModelPrice, PriceTable
from ._records import AgentStatus, LimitStatus, Reservation
from ._usage import Usage, UsageLike, parse_usage
from ._validate import (
    MAX_NAME_LENGTH,
    MAX_TOKENS,
    check_agent_name,
    check_confidence,
    check_lease,
    check_tokens,
)
from .events import BudgetEvent, Degraded, EventBus, Subscriber
from .policies import GreedyPolicy, ReallocationPolicy
from .stores import MemoryStore, Store, check_namespace, store_from_url

__all__ = ["DEFAULT_LEASE_SECONDS", "Ledger", "LedgerEntry", "Spend", "monotonic_clock"]

logger = logging.getLogger("tbc_integrations")
T = TypeVar("T")
UNRECORDED = "unrecorded:"
"""Id prefix of the pass a fail-open ledger hands out when its store is unreachable."""

DEFAULT_LEASE_SECONDS = 300.0
"""How long a reservation holds its tokens unless settled first (five minutes)."""

_WALL_AT_ZERO = time.time() - time.monotonic()


def monotonic_clock() -> float:
    """Wall-clock seconds that never jump: the wall time at import plus monotonic time since.

    The memory store's default clock: a lease is never cut short or stretched when
    the wall clock is set back or forward. (Stores shared by several hosts use
    ``time.time``: hosts must agree on the time; see the README.)

    Example:
        >>> monotonic_clock() <= monotonic_clock()
        True
    """
    return _WALL_AT_ZERO + time.monotonic()


def _still_held(exc: InvalidTokenCountError, rid: str) -> InvalidTokenCountError:
    """A commit's bad usage, saying that nothing was settled."""
    return InvalidTokenCountError(
        f"{exc}; reservation {rid!r} is still held: commit its real usage or release it"
    )


def _rid(reservation: Reservation, agent: str = "?") -> str:
    """The id of a reservation the caller hands back (the store looks up the rest)."""
    rid = getattr(reservation, "id", None)
    if not isinstance(reservation, Reservation) or type(rid) is not str:
        raise ReservationError(
            f"Agent '{agent}': expected a Reservation this ledger issued, got {reservation!r}; "
            "nothing was changed"
        )
    return rid


class Spend:
    """The handle :meth:`Ledger.spend` yields: set the real usage before leaving.

    Attributes:
        reservation: The reservation being held.
        usage: The usage to commit; ``None`` commits the reservation as an estimate.
        overdraft: After a commit, the agent's uncovered overdraft.
    """

    __slots__ = ("overdraft", "reservation", "usage")

    def __init__(self, reservation: Reservation) -> None:
        self.reservation = reservation
        self.usage: Usage | None = None
        self.overdraft = 0

    def set_usage(self, usage: UsageLike) -> None:
        """Record the call's real usage (any shape :meth:`Usage.parse` reads)."""
        self.usage = Usage.parse(usage, agent=self.reservation.agent)


class Ledger:
    """Budget arithmetic over a store, with validation and events.

    Args:
        store: A :class:`~tbc_integrations.stores.Store` or a store URL;
            the in-memory store by default.
        policy: The reallocation policy (greedy by default).
        namespace: Namespace of a store opened from a URL.
        lease_seconds: Default lease of a reservation.
        clock: Seconds-returning clock: :func:`monotonic_clock` for the memory store,
            ``time.time`` for stores shared by several hosts (which must agree on the
            time within a fraction of the shortest lease).
        fail_open: When the store cannot be reached, let calls through unchecked
            (logged as a warning each time) instead of refusing them. Off by
            default: an unreachable store refuses with ``StoreUnavailableError``.
        prices: The :class:`~tbc_integrations.PriceTable` calls are priced from
            (a ``{model: ModelPrice}`` mapping is merged over genai-prices).
        limits: :class:`~tbc_integrations.Limit` budgets above the team (per run, per
            user, per period); a call names its scope with :meth:`scope` or ``scope=``.
        team_per: A scope key (``"run"``): every value of it gets its own copy of the
            team, with fresh allocations from the registered contracts, made on its
            first call; reallocation moves budget only within one copy. A call whose
            scope lacks the key is refused, naming it. ``None`` (the default): one team.
        forget_after: How long after a run's last activity its team is forgotten (and
            its storage reclaimed): seconds, or ``"<n>s"``, ``"<n>m"``, ``"<n>h"``,
            ``"<n>d"``; an open reservation keeps it until its lease end plus this.

    Example:
        >>> ledger = Ledger()
        >>> ledger.register("a", 100)  # the tbcontracts form
        >>> ledger.remaining("a")
        100
    """

    def __init__(
        self,
        store: Store | str | None = None,
        *,
        policy: ReallocationPolicy | None = None,
        namespace: str = "default",
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        clock: Callable[[], float] | None = None,
        fail_open: bool = False,
        prices: PriceTable | Mapping[str, ModelPrice] | None = None,
        limits: Iterable[Limit] = (),
        team_per: str | None = None,
        forget_after: str | float = "7d",
    ) -> None:
        check_namespace(namespace)
        if team_per is not None and (
            not isinstance(team_per, str) or not team_per or not team_per.isprintable()
        ):
            raise ContractError(f"team_per must be a scope key like 'run', got {team_per!r}")
        self.team_per = team_per
        self.forget_after = parse_duration(forget_after, "forget_after")
        self.limits = tuple(limits)
        for limit in self.limits:
            if not isinstance(limit, Limit):
                raise ContractError(f"limits must be Limit objects, got {limit!r}")
        names = [limit.name for limit in self.limits]
        if len(set(names)) != len(names):
            raise ContractError(f"limits: a name is given twice: {names}")
        self.prices = prices if isinstance(prices, PriceTable) else PriceTable(prices)
        self._cost_capped: dict[str, bool] = {}  # contracts never change once registered
        self._unpriced_warned: set[tuple[str | None, str | None]] = set()
        self.fail_open = fail_open
        if store is None:
            store = store_from_url("memory://", namespace)
        elif isinstance(store, str):
            store = store_from_url(store, namespace)
        elif not isinstance(store, Store):
            raise ContractError(f"store must be a Store or a URL string, got {store!r}")
        self.store: Store = store
        if policy is not None and not isinstance(policy, ReallocationPolicy):
            raise ContractError(
                f"policy must be a ReallocationPolicy (such as GreedyPolicy() or "
                f"ExpectedGainPolicy()), got {policy!r}"
            )
        self.policy: ReallocationPolicy = policy if policy is not None else GreedyPolicy()
        store.check_policy(self.policy)
        self.lease_seconds = check_lease(lease_seconds)
        if clock is None:
            clock = monotonic_clock if isinstance(store, MemoryStore) else time.time
        self.clock = clock
        self.bus = EventBus()
        self._registered: set[str] = set()

    @property
    def namespace(self) -> str:
        """The store's namespace."""
        return self.store.namespace

    # ---------------------------------------------------------------- plumbing
    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Deliver every event to ``callback``; returns an unsubscribe function."""
        return self.bus.subscribe(callback)

    def _sink(self) -> list[BudgetEvent] | None:
        return [] if self.bus.active else None

    def _emit(self, events: list[BudgetEvent] | None) -> None:
        if events:
            self.bus.emit(events)

    # ---------------------------------------------------------- registration
    def add_contract(self, contract: BudgetContract) -> bool:
        """Register ``contract``'s agent; attach if an equal one exists. Returns True if new."""
        if not isinstance(contract, BudgetContract):
            raise ContractError(f"expected a BudgetContract, got {contract!r}")
        name = contract.agent_name
        if name in self._registered:
            raise ContractError(f"Agent '{name}' is already registered with this manager")
        events = self._sink()  # the store refuses a dependency cycle inside its transaction
        try:
            created = self.store.register(contract, self.clock(), events)
        finally:
            self._emit(events)
        self._registered.add(name)
        return created

    def check_dependencies(self) -> None:
        """Refuse unknown dependency names and cycles, now that every agent is known.

        Raises:
            ContractError: naming the agent and the unknown name, or the cycle.
        """
        check_dependencies(self.store.contracts(), complete=True)

    @property
    def contracts(self) -> dict[str, BudgetContract]:
        """Every agent's contract by name (a copy)."""
        return self.store.contracts()

    # ------------------------------------------------------------------ verbs
    def _unrecorded(
        self, agent: str, input_tokens: int, output_tokens: int, exc: Exception
    ) -> Reservation:
        """Fail open: let the call through without a hold, and say so loudly."""
        logger.warning(
            "store unavailable (%s): FAILING OPEN, agent '%s' proceeds without a budget check",
            exc,
            agent,
        )
        return Reservation(
            f"{UNRECORDED}{agent}",
            agent,
            input_tokens,
            output_tokens,
            self.clock(),
            (),
            self.namespace,
        )

    def _unrecorded_use(self, reservation: Reservation, usage: Usage | None) -> bool:
        """True for a fail-open pass: its usage cannot be recorded (said in a warning)."""
        if not (self.fail_open and reservation.id.startswith(UNRECORDED)):
            return False
        if usage is not None:
            logger.warning(
                "agent '%s' used %d tokens while the store was unavailable: not recorded",
                reservation.agent,
                usage.total_tokens,
            )
        return True

    # ---------------------------------------------------------------- scopes
    def scope(self, **keys: Any) -> AbstractContextManager[Mapping[str, str]]:
        """Run the block in a scope (``user="u-42", run="t-1"``): every call in it is held
        in the limits of that scope too (see :class:`~tbc_integrations.Limit`).

        Scopes nest (inner keys are added to outer ones) and follow the context into
        threads LangChain and LangGraph start, and asyncio tasks.

        Example:
            >>> from tbc_integrations import BudgetManager, Limit
            >>> m = BudgetManager(limits=[Limit("run", max_tokens=50)])
            >>> _ = m.register_agent("a", max_tokens=1_000)
            >>> with m.scope(run="r-1"):
            ...     m.commit(m.reserve("a", 20, 10), (20, 5))
            0
        """
        return scoped(**keys)

    def limit_status(self, name: str, value: str | None = None) -> LimitStatus:
        """Limit ``name``'s numbers for scope value ``value`` (by default the current
        scope's, else the limit's default), in the period that holds now (for a rolling
        window: what the last duration spent, and when its oldest spend leaves).

        Raises:
            ContractError: no such limit, or no value to read it for.
        """
        limit = next((x for x in self.limits if x.name == name), None)
        if limit is None:
            raise ContractError(f"no limit named {name!r} (this ledger has {self.limit_names})")
        if value is None:
            value = scoped_value(limit)
        if value is None:
            raise ContractError(f"limit {name!r}: give the {limit.scope_key!r} value to read")
        now = self.clock()
        hold = limit.hold(value, now)
        row = self.store.limit(split_limit_key(hold[0])[0])
        return row_status(hold if row is None else row, hold, now)

    def scope_status(self, scope: Mapping[str, Any]) -> dict[str, LimitStatus]:
        """Every limit whose scope key ``scope`` names, for that value, in the period that
        holds now: ``{limit name: LimitStatus}``, each with the agents' spend within it
        (:attr:`LimitStatus.agents`). A limit whose key the scope does not name is left
        out (an app-wide limit's default is not read unless its key is given).

        Raises:
            InvalidValueError: ``scope`` is not a mapping of keys to printable values.

        Example:
            >>> from tbc_integrations import BudgetManager, Limit
            >>> m = BudgetManager(limits=[Limit("user", max_tokens=100)])
            >>> _ = m.register_agent("a")
            >>> m.charge("a", (30, 10), scope={"user": "u-1"})
            0
            >>> s = m.status(scope={"user": "u-1"})["user"]
            >>> s.remaining, s.agents["a"].tokens
            (60, 40)
        """
        given = check_scope(scope)
        now = self.clock()
        out: dict[str, LimitStatus] = {}
        for limit in self.limits:
            value = given.get(limit.scope_key)
            if value is not None:
                hold = limit.hold(value, now)
                row = self.store.limit(split_limit_key(hold[0])[0])
                out[limit.name] = row_status(hold if row is None else row, hold, now)
        return out

    def limit_statuses(
        self, name: str | None = None, value: str | None = None
    ) -> list[LimitStatus]:
        """Every limit row the store keeps (every scope value and period not yet forgotten),
        optionally of limit ``name`` and scope value ``value`` only, by limit, value and period.

        Rows are read from the store, so this works on a store other processes write
        to (a manager opened on it needs no limits of its own).

        Example:
            >>> from tbc_integrations import BudgetManager, Limit
            >>> m = BudgetManager(limits=[Limit("user", max_tokens=100)])
            >>> _ = m.register_agent("a")
            >>> for user in ("u-1", "u-2"):
            ...     _ = m.charge("a", (5, 5), scope={"user": user})
            >>> [(s.value, s.consumed) for s in m.limit_statuses("user")]
            [('u-1', 10), ('u-2', 10)]
        """
        if value is not None and name is None:
            raise ContractError("limit_statuses: give the limit's name with its value")
        prefix = "" if name is None else f"{name}/" + ("" if value is None else f"{value}/")
        now = self.clock()
        rows = [row_status(row, now=now) for row in self.store.limit_rows(prefix)]
        if value is not None:  # a value holding '/' could match a longer one's prefix
            rows = [s for s in rows if s.value == value]
        return sorted(rows, key=lambda s: (s.limit, s.value, s.ends or math.inf, s.period))

    @property
    def limit_names(self) -> list[str]:
        """The names of the ledger's limits."""
        return [x.name for x in self.limits]

    def run_scope(self, reservation: Reservation) -> dict[str, str] | None:
        """The scope naming ``reservation``'s run (``None``: it is not a run team's), for
        verbs about the same run (``record_confidence(..., scope=...)``)."""
        if not reservation.team or self.team_per is None:
            return None
        return {self.team_per: reservation.team}

    def _team(self, agent: str, scope: Mapping[str, Any] | None = None) -> TeamHold | None:
        """The run team a call of ``agent`` in ``scope`` works in (``None``: the one team)."""
        key = self.team_per
        if key is None:
            return None
        given = check_scope(scope) if scope else {}
        value = given[key] if key in given else current_scope().get(key)
        if value is None:
            raise ContractError(
                f"Agent '{agent}': this manager keeps a team per {key!r} (team_per={key!r}), "
                f"and the call's scope has no {key!r} (give it with manager.scope({key}=...), "
                f"scope={{...}}, or LangGraph's thread_id); nothing was changed"
            )
        return (value, self.forget_after)

    def team_status(self, run: str) -> dict[str, AgentStatus]:
        """Run ``run``'s own team, per agent (see ``team_per``): the registered contracts'
        fresh numbers for agents the run has not used, or for every agent when the run
        has no team yet or it was forgotten. :meth:`status` shows the registered team.

        Example:
            >>> from tbc_integrations import BudgetManager
            >>> m = BudgetManager(team_per="run")
            >>> _ = m.register_agent("a", max_tokens=100)
            >>> with m.scope(run="r-1"):
            ...     m.commit(m.reserve("a", 30), (30, 0))
            0
            >>> m.team_status("r-1")["a"].remaining, m.team_status("r-2")["a"].remaining
            (70, 100)
        """
        if self.team_per is None:
            raise ContractError("team_status needs a manager with team_per= (a team per run)")
        value = check_scope({self.team_per: run})[self.team_per]
        self.expire()
        return self.store.team_status(value, self.clock())

    async def ateam_status(self, run: str) -> dict[str, AgentStatus]:
        """Async :meth:`team_status` (off the event loop when the store waits on I/O)."""
        return await self._off_loop(self.team_status, run)

    def call_status(self, agent: str, scope: Mapping[str, Any] | None = None) -> AgentStatus | None:
        """``agent``'s numbers in the team a call in ``scope`` (and the current
        :meth:`scope`) works in: its run's own team with ``team_per`` and a run key, else
        the registered team. ``None`` for an agent the ledger does not know. Plugins read
        it to shape a request (output cap left, degradation ladder) before the call.

        Example:
            >>> from tbc_integrations import BudgetManager
            >>> m = BudgetManager(team_per="run")
            >>> _ = m.register_agent("a", max_tokens=100)
            >>> with m.scope(run="r-1"):
            ...     _ = m.charge("a", (40, 0))
            ...     m.call_status("a").remaining
            60
            >>> m.call_status("a", scope={"run": "r-2"}).remaining
            100
        """
        key = self.team_per
        run = None
        if key is not None:
            given = check_scope(scope) if scope else {}
            run = given[key] if key in given else current_scope().get(key)
        team = self.status() if run is None else self.team_status(run)
        return team.get(agent)

    async def acall_status(
        self, agent: str, scope: Mapping[str, Any] | None = None
    ) -> AgentStatus | None:
        """Async :meth:`call_status` (off the event loop when the store waits on I/O)."""
        return await self._off_loop(self.call_status, agent, scope)  # the context travels

    def _holds(
        self, agent: str, scope: Mapping[str, Any] | None, now: float
    ) -> tuple[LimitHold, ...]:
        if not self.limits:
            return ()
        return limit_holds(self.limits, check_scope(scope), now, agent)

    # ----------------------------------------------------------------- money
    def _is_cost_capped(self, agent: str) -> bool:
        capped = self._cost_capped.get(agent)
        if capped is None:
            contract = self.store.contracts().get(agent)
            if contract is None:
                return False  # the store refuses the unknown agent itself
            capped = self._cost_capped[agent] = contract.max_cost is not None
        return capped

    def _hold_nanos(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        model: str | None,
        provider: str | None,
        cost: Any,
    ) -> int:
        """The money to hold for a call: its worst case at its model's price."""
        if cost is not None:
            return ceil_nanos(to_decimal(cost, agent, "cost"))
        price = self.prices.fallback if model is None else self.prices.find(model, provider)
        if price is None:
            if self._is_cost_capped(agent):
                raise PriceNotFoundError(
                    f"Agent '{agent}' has a cost cap, and no price is known for "
                    + (f"model {model!r}" if model else "a call that names no model")
                    + (f" (provider {provider!r})" if provider else "")
                    + ": give it a ModelPrice in BudgetManager(prices={...}) or a fallback "
                    "price; nothing was held"
                )
            if model is not None:
                self._warn_unpriced(agent, model, provider)
            return 0
        nanos = price.worst_case_nanos(input_tokens, output_tokens)
        if nanos > MAX_NANOS:
            raise InvalidValueError(
                f"Agent '{agent}': the call's worst-case cost {dollars(nanos)} USD is "
                "above what every store holds exactly"
            )
        return nanos

    def _spent_nanos(self, reservation: Reservation, usage: Usage | None, cost: Any) -> int | None:
        """The money a call spent: its usage priced by kind at its model's price
        (``None``: the store settles the money it holds)."""
        if cost is not None:
            return ceil_nanos(to_decimal(cost, reservation.agent, "cost"))
        if usage is None:
            return None
        model = reservation.model
        price = (
            self.prices.fallback if model is None else self.prices.find(model, reservation.provider)
        )
        return None if price is None else price.cost_nanos(usage)

    def _warn_unpriced(self, agent: str, model: str | None, provider: str | None) -> None:
        key = (model, provider)
        if model is not None and key not in self._unpriced_warned:
            self._unpriced_warned.add(key)
            logger.warning(
                "agent '%s': no price known for model %r (provider %r); its calls on it are "
                "counted in tokens, not in money",
                agent,
                model,
                provider,
            )

    def _reserve_args(
        self,
        agent: str,
        input_tokens: int,
        output_tokens: int,
        lease_seconds: float | None,
    ) -> tuple[int, int, float]:
        if not (type(agent) is str and 0 < len(agent) <= MAX_NAME_LENGTH and agent.isprintable()):
            check_agent_name(agent)  # raises, naming the value
        if not (
            type(input_tokens) is int
            and type(output_tokens) is int
            and input_tokens >= 0
            and output_tokens >= 0
            and input_tokens + output_tokens <= MAX_TOKENS
        ):
            input_tokens = check_tokens(input_tokens, "input_tokens", agent)
            output_tokens = check_tokens(output_tokens, "output_tokens", agent)
            check_tokens(input_tokens + output_tokens, "input_tokens + output_tokens", agent)
        lease = self.lease_seconds if lease_seconds is None else check_lease(lease_seconds)
        return input_tokens, output_tokens, lease

    def reserve(
        self,
        agent: str,
        input_tokens: int = 0,
        output_tokens: int = 0,
        *,
        lease_seconds: float | None = None,
        clamp_output: bool = False,
        model: str | None = None,
        provider: str | None = None,
        cost: Any = None,
        scope: Mapping[str, Any] | None = None,
    ) -> Reservation:
        """Hold ``input_tokens + output_tokens`` for ``agent`` before a call.

        Borrows from donors if the agent's own remaining is short. Refuses,
        before any spend, when the confidence gate is closed, a cap would be
        passed, or reallocation cannot cover the request. With
        ``clamp_output``, an output request above what the agent's output cap
        still allows is lowered to it (the reservation says how much was held).

        Money: the call is priced by ``model`` (from the ledger's prices; ``provider``
        helps find it), and its worst case (input at the input price, output at
        the highest output price) is held too; ``cost`` (US dollars) holds that
        amount instead. An agent with ``max_cost`` is refused when the worst case
        does not fit, and when the model has no known price.

        Raises:
            BudgetExceededError: (or :class:`ConfidenceGateError`, :class:`CostLimitError`)
                nothing is held.
            PriceNotFoundError: the agent has a cost cap and the model no price.
            UnknownAgentError: no contract for ``agent``.
            InvalidTokenCountError: a count is not an integer in [0, 2**53 - 1].

        Example:
            >>> ledger = Ledger(); ledger.register("a", 50)
            >>> ledger.reserve("a", 10, 5).amount
            15
        """
        input_tokens, output_tokens, lease = self._reserve_args(
            agent, input_tokens, output_tokens, lease_seconds
        )
        now = self.clock()
        holds = self._holds(agent, scope, now) if self.limits else ()
        team = None if self.team_per is None else self._team(agent, scope)
        events: list[BudgetEvent] | None = [] if self.bus.active else None
        try:
            nanos = self._hold_nanos(agent, input_tokens, output_tokens, model, provider, cost)
            return self.store.reserve(
                agent,
                input_tokens,
                output_tokens,
                now,
                lease,
                self.policy,
                events,
                clamp_output,
                nanos,
                holds,
                team,
                model,
                provider,
            )
        except StoreUnavailableError as exc:
            if not self.fail_open or isinstance(exc, NamespaceLostError):
                raise  # a lost namespace is a lost ledger, not an outage
            return self._unrecorded(agent, input_tokens, output_tokens, exc)
        finally:
            if events:
                self.bus.emit(events)

    def check(
        self,
        agent: str,
        input_tokens: int = 0,
        output_tokens: int = 0,
        *,
        model: str | None = None,
        provider: str | None = None,
        cost: Any = None,
        scope: Mapping[str, Any] | None = None,
    ) -> None:
        """Raise the error :meth:`reserve` would raise now; otherwise change nothing.

        Use it to refuse a step before it starts (a graph node, a crew task)
        when its agent is gated or cannot afford a minimum call.

        Example:
            >>> ledger = Ledger(); ledger.register("a", 50)
            >>> ledger.check("a", 10, 40)
            >>> ledger.remaining("a")
            50
        """
        input_tokens, output_tokens, _ = self._reserve_args(
            agent, input_tokens, output_tokens, None
        )
        events = self._sink()
        try:
            # a step's check names no model: its calls are priced when they reserve
            nanos = (
                0
                if model is None and cost is None
                else self._hold_nanos(agent, input_tokens, output_tokens, model, provider, cost)
            )
            now = self.clock()
            self.store.check(
                agent,
                input_tokens,
                output_tokens,
                now,
                self.policy,
                events,
                nanos,
                self._holds(agent, scope, now),
                self._team(agent, scope),
            )
        except StoreUnavailableError as exc:
            if not self.fail_open or isinstance(exc, NamespaceLostError):
                raise
            logger.warning(
                "store unavailable (%s): FAILING OPEN, agent '%s' is admitted unchecked",
                exc,
                agent,
            )
        finally:
            self._emit(events)

    def commit(
        self,
        reservation: Reservation,
        usage: UsageLike | None = None,
        *,
        estimated: bool = False,
        cost: Any = None,
    ) -> int:
        """Settle ``reservation`` with the call's real usage; return any uncovered overdraft.

        The store finds the reservation by its id: whose it is, what it holds and
        what it borrowed come from the store's record, never from the object
        passed in. The unused part returns to the agent, and what was borrowed and
        not needed returns to its donors. Usage above the reservation is recorded
        in full: covered from the agent's remaining, then by reallocation, and any
        rest is an overdraft (evented, and the agent is refused until covered).
        ``usage=None`` settles the amounts the store holds, marked as an estimate.
        The call's money is its usage priced by kind at the reservation's model's
        price (or ``cost``, in US dollars, when given).

        Raises:
            ReservationError: already settled, or not issued by this store
                (nothing changes).
            InvalidTokenCountError: malformed usage (nothing changes).

        Example:
            >>> ledger = Ledger(); ledger.register("a", 50)
            >>> r = ledger.reserve("a", 10, 20)
            >>> ledger.commit(r, {"input_tokens": 10, "output_tokens": 4})
            0
            >>> ledger.remaining("a")
            36
        """
        rid = reservation.id if type(reservation) is Reservation else _rid(reservation)
        try:
            parsed = None if usage is None else parse_usage(usage, reservation.agent)
        except InvalidTokenCountError as exc:
            raise _still_held(exc, rid) from None
        if self.fail_open and self._unrecorded_use(reservation, parsed):
            return 0
        nanos = self._spent_nanos(reservation, parsed, cost)
        events: list[BudgetEvent] | None = [] if self.bus.active else None
        try:
            return self.store.commit(
                rid, parsed, self.clock(), self.policy, events, estimated, nanos
            )
        finally:
            if events:
                self.bus.emit(events)

    def release(self, reservation: Reservation) -> None:
        """Return everything ``reservation`` holds (the call failed or was cancelled).

        Example:
            >>> ledger = Ledger(); ledger.register("a", 50)
            >>> ledger.release(ledger.reserve("a", 30))
            >>> ledger.remaining("a")
            50
        """
        rid = _rid(reservation)
        if self._unrecorded_use(reservation, None):
            return
        events = self._sink()
        try:
            self.store.release(rid, self.clock(), events)
        finally:
            self._emit(events)

    async def areserve(
        self,
        agent: str,
        input_tokens: int = 0,
        output_tokens: int = 0,
        *,
        lease_seconds: float | None = None,
        clamp_output: bool = False,
        model: str | None = None,
        provider: str | None = None,
        cost: Any = None,
        scope: Mapping[str, Any] | None = None,
    ) -> Reservation:
        """Async :meth:`reserve` (native on stores with an async client; a store that
        blocks on a file runs in a worker thread, off the event loop)."""
        input_tokens, output_tokens, lease = self._reserve_args(
            agent, input_tokens, output_tokens, lease_seconds
        )
        events = self._sink()
        try:
            if self._cost_capped.get(agent) is None and self.store.blocking_io:
                await self._off_loop(self._is_cost_capped, agent)  # one store read, off the loop
            nanos = self._hold_nanos(agent, input_tokens, output_tokens, model, provider, cost)
            now = self.clock()
            return await self.store.areserve(
                agent,
                input_tokens,
                output_tokens,
                now,
                lease,
                self.policy,
                events,
                clamp_output,
                nanos,
                self._holds(agent, scope, now),
                self._team(agent, scope),
                model,
                provider,
            )
        except StoreUnavailableError as exc:
            if not self.fail_open or isinstance(exc, NamespaceLostError):
                raise  # a lost namespace is a lost ledger, not an outage
            return self._unrecorded(agent, input_tokens, output_tokens, exc)
        finally:
            self._emit(events)

    async def acommit(
        self,
        reservation: Reservation,
        usage: UsageLike | None = None,
        *,
        estimated: bool = False,
        cost: Any = None,
    ) -> int:
        """Async :meth:`commit`."""
        rid = _rid(reservation)
        try:
            parsed = None if usage is None else parse_usage(usage, reservation.agent)
        except InvalidTokenCountError as exc:
            raise _still_held(exc, rid) from None
        if self._unrecorded_use(reservation, parsed):
            return 0
        nanos = self._spent_nanos(reservation, parsed, cost)
        events = self._sink()
        try:
            return await self.store.acommit(
                rid, parsed, self.clock(), self.policy, events, estimated, nanos
            )
        finally:
            self._emit(events)

    async def arelease(self, reservation: Reservation) -> None:
        """Async :meth:`release`."""
        rid = _rid(reservation)
        if self._unrecorded_use(reservation, None):
            return
        events = self._sink()
        try:
            await self.store.arelease(rid, self.clock(), events)
        finally:
            self._emit(events)

    async def _off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)``, in a worker thread when the store waits on I/O."""
        if self.store.blocking_io:
            return await asyncio.to_thread(fn, *args)
        return fn(*args)

    async def acheck(
        self,
        agent: str,
        input_tokens: int = 0,
        output_tokens: int = 0,
        *,
        model: str | None = None,
        provider: str | None = None,
        scope: Mapping[str, Any] | None = None,
    ) -> None:
        """Async :meth:`check` (off the event loop when the store waits on I/O)."""
        await self._off_loop(
            functools.partial(self.check, model=model, provider=provider, scope=scope),
            agent,
            input_tokens,
            output_tokens,
        )

    async def arecord_confidence(
        self, agent: str, confidence: float, *, scope: Mapping[str, Any] | None = None
    ) -> bool:
        """Async :meth:`record_confidence` (off the event loop when the store waits on I/O)."""
        return await self._off_loop(
            functools.partial(self.record_confidence, scope=scope), agent, confidence
        )

    def note_degraded(self, agent: str, step: str, why: str) -> None:
        """Deliver a :class:`~tbc_integrations.events.Degraded` event: a plugin took a step
        of ``agent``'s degradation ladder (the ledger's numbers do not change).

        Example:
            >>> ledger = Ledger(); seen = []; _ = ledger.subscribe(seen.append)
            >>> ledger.note_degraded("a", "model small", "refused: budget")
            >>> seen[0].reason
            'model small (refused: budget)'
        """
        if self.bus.active:
            self.bus.emit([Degraded(agent, self.clock(), self.namespace, reason=f"{step} ({why})")])

    async def acontracts(self) -> dict[str, BudgetContract]:
        """Async :attr:`contracts` (off the event loop when the store waits on I/O)."""
        return await self._off_loop(lambda: self.contracts)

    @overload
    async def astatus(self) -> dict[str, AgentStatus]: ...

    @overload
    async def astatus(self, scope: Mapping[str, Any]) -> dict[str, LimitStatus]: ...

    async def astatus(
        self, scope: Mapping[str, Any] | None = None
    ) -> dict[str, AgentStatus] | dict[str, LimitStatus]:
        """Async :meth:`status` (off the event loop when the store waits on I/O)."""
        if scope is None:
            return await self._off_loop(self.status)
        return await self._off_loop(lambda: self.status(scope))

    async def acomplete(self, agent: str, *, scope: Mapping[str, Any] | None = None) -> None:
        """Async :meth:`complete` (off the event loop when the store waits on I/O)."""
        await self._off_loop(functools.partial(self.complete, scope=scope), agent)

    @contextmanager
    def spend(
        self,
        agent: str,
        input_tokens: int = 0,
        output_tokens: int = 0,
        *,
        lease_seconds: float | None = None,
        scope: Mapping[str, Any] | None = None,
    ) -> Iterator[Spend]:
        """Reserve, run the block, commit on success and release on an exception.

        Set the real usage inside the block with :meth:`Spend.set_usage`;
        without it, the reservation is committed as an estimate.

        Example:
            >>> ledger = Ledger(); ledger.register("a", 50)
            >>> with ledger.spend("a", 10, 10) as call:
            ...     call.set_usage((8, 2))
            >>> ledger.consumed("a")
            10
        """
        handle = Spend(
            self.reserve(
                agent, input_tokens, output_tokens, lease_seconds=lease_seconds, scope=scope
            )
        )
        try:
            yield handle
        except BaseException:
            self.release(handle.reservation)
            raise
        handle.overdraft = self.commit(handle.reservation, handle.usage)

    @asynccontextmanager
    async def aspend(
        self,
        agent: str,
        input_tokens: int = 0,
        output_tokens: int = 0,
        *,
        lease_seconds: float | None = None,
        scope: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[Spend]:
        """Async :meth:`spend`; a cancellation releases the reservation."""
        reservation = await self.areserve(
            agent, input_tokens, output_tokens, lease_seconds=lease_seconds, scope=scope
        )
        handle = Spend(reservation)
        try:
            yield handle
        except BaseException:
            await self.arelease(reservation)
            raise
        handle.overdraft = await self.acommit(reservation, handle.usage)

    def charge(
        self,
        agent: str,
        usage: UsageLike,
        *,
        estimated: bool = False,
        model: str | None = None,
        provider: str | None = None,
        cost: Any = None,
        scope: Mapping[str, Any] | None = None,
    ) -> int:
        """Record usage that had no reservation; return any uncovered overdraft.

        The usage is priced by ``model`` (or costs ``cost`` US dollars). It happened
        already, so it is recorded even when it cannot be priced (with a warning).
        """
        check_agent_name(agent)
        parsed = Usage.parse(usage, agent=agent)
        if cost is not None:
            nanos = ceil_nanos(to_decimal(cost, agent, "cost"))
        else:
            price = self.prices.find(model, provider)
            nanos = 0 if price is None else price.cost_nanos(parsed)
            if price is None:
                self._warn_unpriced(agent, model, provider)
        now = self.clock()
        holds = self._holds(agent, scope, now)
        team = self._team(agent, scope)
        events = self._sink()
        try:
            return self.store.charge(
                agent, parsed, now, self.policy, events, estimated, nanos, holds, team
            )
        finally:
            self._emit(events)

    def reallocate(self, agent: str, tokens: int) -> int:
        """Move up to ``tokens`` to ``agent`` for good under the policy; return how many."""
        check_agent_name(agent)
        tokens = check_tokens(tokens, "tokens", agent)
        events = self._sink()
        try:
            return self.store.reallocate(
                agent, tokens, self.clock(), self.policy, events, self._team(agent)
            )
        finally:
            self._emit(events)

    def complete(self, agent: str, *, scope: Mapping[str, Any] | None = None) -> None:
        """Mark ``agent`` done: all it has left, reserve included, is spare for anyone
        (in its run's team, with ``team_per``: the run comes from ``scope`` or
        :meth:`scope`)."""
        check_agent_name(agent)
        events = self._sink()
        try:
            self.store.complete(agent, self.clock(), events, self._team(agent, scope))
        finally:
            self._emit(events)

    def record_confidence(
        self, agent: str, confidence: float, *, scope: Mapping[str, Any] | None = None
    ) -> bool:
        """Record a result's confidence; returns True when the agent is now gated (in its
        run's team, with ``team_per``: the run comes from ``scope`` or :meth:`scope`)."""
        check_agent_name(agent)
        value = check_confidence(confidence, agent)
        events = self._sink()
        try:
            return self.store.record_confidence(
                agent, value, self.clock(), events, self._team(agent, scope)
            )
        finally:
            self._emit(events)

    def set_threshold(self, agent: str, threshold: float | None) -> None:
        """Change ``agent``'s effective confidence threshold (``None`` disables the gate)."""
        check_agent_name(agent)
        value = None if threshold is None else check_confidence(threshold, agent, "threshold")
        events = self._sink()
        try:
            self.store.set_threshold(agent, value, self.clock(), events, self._team(agent))
        finally:
            self._emit(events)

    def expire(self) -> int:
        """Reclaim every lapsed reservation now; returns how many."""
        events = self._sink()
        try:
            return self.store.expire(self.clock(), events)
        finally:
            self._emit(events)

    # ----------------------------------------------------------------- reads
    @overload
    def status(self) -> dict[str, AgentStatus]: ...

    @overload
    def status(self, scope: Mapping[str, Any]) -> dict[str, LimitStatus]: ...

    def status(
        self, scope: Mapping[str, Any] | None = None
    ) -> dict[str, AgentStatus] | dict[str, LimitStatus]:
        """Full per-agent state (see :class:`AgentStatus`), after reclaiming lapsed leases.

        With ``scope`` (``{"user": "u-42"}``): the limits of that scope instead, as
        :meth:`scope_status` gives them (``{limit name: LimitStatus}``, with each
        agent's spend within it).
        """
        self.expire()
        if scope is not None:
            return self.scope_status(scope)
        return self.store.status(self.clock())

    def report(self) -> dict[str, dict[str, int]]:
        """``{"allocated", "consumed", "remaining"}`` per agent."""
        return {
            name: {"allocated": s.allocated, "consumed": s.consumed, "remaining": s.remaining}
            for name, s in self.status().items()
        }

    snapshot = report

    def remaining(self, agent_name: str) -> int:
        """What new reservations for the agent can still use."""
        check_agent_name(agent_name)
        self.expire()
        return self.store.remaining(agent_name, self.clock())

    def consumed(self, agent_name: str) -> int:
        """Tokens the agent has spent."""
        return self._one(agent_name).consumed

    def allocated(self, agent_name: str) -> int:
        """The agent's current allocation."""
        return self._one(agent_name).allocated

    def _one(self, agent_name: str) -> AgentStatus:
        check_agent_name(agent_name)
        status = self.status().get(agent_name)
        if status is None:
            raise UnknownAgentError(agent_name)
        return status

    # ------------------------------------------------------- tbcontracts API
    def register(self, agent_name: str, allocated_tokens: int) -> None:
        """Register a bare agent with an allocation (the ``tbcontracts.Ledger`` form)."""
        self.add_contract(BudgetContract(agent_name, max_tokens=allocated_tokens))

    def record(self, agent_name: str, tokens: int, note: str = "") -> None:
        """Record ``tokens`` of real usage for the agent (counted as input tokens)."""
        self.charge(agent_name, Usage(check_tokens(tokens, "tokens", agent_name), 0))
        self._remember(agent_name, tokens, note)

    def adjust_allocation(self, agent_name: str, delta: int) -> None:
        """Grant (``delta`` > 0) or revoke (< 0) allocation from outside the system."""
        check_agent_name(agent_name)
        if isinstance(delta, bool) or not isinstance(delta, int) or abs(delta) > MAX_TOKENS:
            raise InvalidTokenCountError(
                f"Agent '{agent_name}': delta must be an integer from -{MAX_TOKENS} to "
                f"{MAX_TOKENS}, got {delta!r}"
            )
        events = self._sink()
        try:
            self.store.adjust(agent_name, delta, self.clock(), events, self._team(agent_name))
        finally:
            self._emit(events)

    # ------------------------------------------- tbcontracts API: reads, history
    HISTORY_LIMIT = 10_000
    """How many recent entries :meth:`history` keeps (the oldest go first)."""

    def history(self, agent_name: str | None = None) -> list[LedgerEntry]:
        """The usage recorded through this ledger object, oldest first (``tbcontracts``).

        Entries are what ``record``, ``BudgetManager.record_usage`` and ``govern``
        recorded here, each with its note (``govern``: the function's name), up
        to the :attr:`HISTORY_LIMIT` most recent. Calls settled with
        ``reserve``/``commit`` or ``spend``, and other processes on a shared
        store, are not in it: for every event of every writer, use
        :meth:`subscribe` or ``tbc_integrations.audit.AuditLog``.

        Example:
            >>> ledger = Ledger(); ledger.register("a", 100); ledger.register("b", 100)
            >>> ledger.record("a", 10, note="search"); ledger.record("b", 5)
            >>> [(e.agent_name, e.tokens, e.note) for e in ledger.history("a")]
            [('a', 10, 'search')]
            >>> len(ledger.history())
            2
        """
        log: deque[LedgerEntry] | None = self.__dict__.get("_history_log")
        entries = [] if log is None else list(log)
        if agent_name is None:
            return entries
        return [e for e in entries if e.agent_name == agent_name]

    def _remember(self, agent_name: str, tokens: int, note: str) -> None:
        """Append one entry to :meth:`history` (after the usage was recorded)."""
        log = self.__dict__.get("_history_log")
        if log is None:
            log = self.__dict__.setdefault("_history_log", deque(maxlen=self.HISTORY_LIMIT))
        log.append(LedgerEntry(agent_name, tokens, self.clock(), note))

    def last_confidence(self, agent_name: str) -> float | None:
        """The agent's most recently recorded confidence (``None`` before any).

        Example:
            >>> ledger = Ledger(); ledger.register("a", 100)
            >>> ledger.record_confidence("a", 0.7)
            False
            >>> ledger.last_confidence("a")
            0.7
        """
        return self._one(agent_name).last_confidence

    def reallocate_with(self, agent: str, tokens: int, policy: ReallocationPolicy) -> int:
        """:meth:`reallocate` planned by ``policy`` instead of the ledger's own policy.

        The store still applies its rules to the plan (donor reserves, never
        uphill by the registered priorities, conservation) and moves it
        atomically. A store that runs reallocation itself (Redis) refuses a
        policy it cannot run, with :class:`ContractError`, and nothing moves.

        Example:
            >>> from tbc_integrations.policies import GreedyPolicy
            >>> ledger = Ledger(); ledger.register("a", 10); ledger.register("b", 100)
            >>> ledger.reallocate_with("a", 30, GreedyPolicy())
            30
        """
        check_agent_name(agent)
        tokens = check_tokens(tokens, "tokens", agent)
        self.store.check_policy(policy)
        events = self._sink()
        try:
            return self.store.reallocate(
                agent, tokens, self.clock(), policy, events, self._team(agent)
            )
        finally:
            self._emit(events)


@dataclass(frozen=True)
class LedgerEntry:
    """One entry of :meth:`Ledger.history` (the ``tbcontracts.ledger.LedgerEntry`` fields).

    Example:
        >>> LedgerEntry("a", 10, 0.0, "search").tokens
        10
    """

    agent_name: str
    tokens: int
    timestamp: float
    note: str = ""
