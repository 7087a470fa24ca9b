"""CrewAI plugin: a crew's agents under token budget contracts.

:func:`govern_crew` registers the crew's contracts (a mapping, or a
``budgets.yaml`` beside ``agents.yaml`` and ``tasks.yaml``), checks that every
agent has one, and governs the crew's runs (``kickoff``, ``kickoff_async``,
``akickoff``, ``kickoff_for_each`` and its async forms): before every LLM call a pre-model-call hook
reserves the call's estimated input plus its ``max_tokens``, and refuses it
before the provider is reached with :class:`CrewBudgetExceededError` (a
:class:`~tbc_integrations.BudgetExceededError` that CrewAI neither swallows nor
retries); after it, the provider's usage for that very call is committed, even
when agents share one LLM or tasks run asynchronously. The hooks and event
handlers exist only while the crew runs.

Example:
    >>> from tbc_integrations import BudgetManager
    >>> from tbc_integrations.crewai import contracts_from_mapping
    >>> sorted(contracts_from_mapping({"Researcher": {"priority": 3, "max_tokens": 900}}))
    ['Researcher']
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from tbc_integrations._errors import (
    BudgetExceededError,
    ConfidenceGateError,
    ContractError,
    MissingDependencyError,
    TBCError,
    UnknownAgentError,
)
from tbc_integrations._ledger import Ledger
from tbc_integrations._limits import check_scope
from tbc_integrations._records import Reservation
from tbc_integrations._usage import Usage, parse_usage
from tbc_integrations.budgets import contracts_from_mapping, load_budgets
from tbc_integrations.tokens import TokenCounter

try:
    from crewai import Crew
    from crewai.events import (
        LLMCallCompletedEvent,
        LLMCallFailedEvent,
        TaskCompletedEvent,
        crewai_event_bus,
    )
    from crewai.hooks import HookAborted, InterceptionPoint
    from crewai.hooks.dispatch import register_scoped, scoped_hooks
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError(
        "tbc_integrations.crewai needs crewai: pip install 'tbc-integrations[crewai]'"
    ) from exc

__all__ = [
    "CrewBudgetExceededError",
    "CrewConfidenceGateError",
    "CrewGovernanceError",
    "CrewUnknownAgentError",
    "crew_summary",
    "govern_crew",
]

logger = logging.getLogger("tbc_integrations.crewai")


class CrewBudgetExceededError(BudgetExceededError, HookAborted):
    """A refused CrewAI call: a ``BudgetExceededError`` that is also a ``HookAborted``.

    CrewAI swallows ordinary exceptions from hooks and retries ``ValueError``;
    a ``HookAborted`` passes through both, so ``kickoff`` raises this unchanged.
    """

    def __init__(
        self, agent_name: str, requested: int, available: int, reason: str = "budget"
    ) -> None:
        BudgetExceededError.__init__(self, agent_name, requested, available, reason)
        self.source: Any = None


class CrewConfidenceGateError(ConfidenceGateError, CrewBudgetExceededError):
    """A CrewAI call refused by the agent's confidence gate."""


class CrewUnknownAgentError(UnknownAgentError, HookAborted):
    """A CrewAI call that belongs to no governed agent, with no default agent configured."""

    def __init__(self, agent_name: str, hint: str = "") -> None:
        UnknownAgentError.__init__(self, agent_name, hint)
        self.reason = str(self)
        self.source: Any = None


class CrewGovernanceError(TBCError, HookAborted):
    """A CrewAI call refused because governing it failed (an unreachable store, a bad
    value): CrewAI runs a call whose hook raises anything but a ``HookAborted``, so a
    failure to budget a call would let it through unbudgeted. ``__cause__`` says why.
    """

    def __init__(self, reason: str) -> None:
        TBCError.__init__(self, reason)
        self.reason = reason
        self.source: Any = None


def _crew_error(err: BudgetExceededError) -> CrewBudgetExceededError:
    if isinstance(err, ConfidenceGateError):
        return CrewConfidenceGateError(
            err.agent_name, err.requested, err.available, err.confidence, err.threshold
        )
    return CrewBudgetExceededError(err.agent_name, err.requested, err.available, err.reason)


_PLACEHOLDER = re.compile(r"\{[^{}]*\}")


def _template(role: str) -> re.Pattern[str]:
    """A role from agents.yaml may hold ``{placeholders}`` filled at kickoff."""
    parts = _PLACEHOLDER.split(role)
    return re.compile("^" + ".+".join(re.escape(p) for p in parts) + "$", re.DOTALL)


class _Roles:
    """Which contract a crew agent's calls go to, by its role as it is when it calls.

    ``kickoff(inputs=...)`` rewrites a templated role (``"{topic} Researcher"``
    becomes ``"AI Researcher"``); CrewAI keeps the template in the agent's
    ``_original_role``. A role is looked up as it is, then by that template, then
    matched against the templated roles and contract names (most literal first),
    which also covers the copies ``kickoff_for_each`` makes.
    """

    def __init__(self, names: Mapping[str, str]) -> None:
        self.names = dict(names)  # role (or template role) -> contract
        templates = {
            key: contract
            for key, contract in [*self.names.items(), *((c, c) for c in self.names.values())]
            if _PLACEHOLDER.search(key)
        }
        ordered = sorted(templates, key=lambda t: -len(_PLACEHOLDER.sub("", t)))
        self.templates = [(_template(t), templates[t]) for t in ordered]

    def contracts(self) -> set[str]:
        return set(self.names.values())

    def of_role(self, role: str, original: str | None = None) -> str | None:
        found = self.names.get(role)
        if found is None and original is not None:
            found = self.names.get(original)
        if found is None:
            found = next((c for pattern, c in self.templates if pattern.match(role)), None)
        return found

    def of(self, crew_agent: Any) -> str | None:
        role = getattr(crew_agent, "role", None)
        if not isinstance(role, str):
            return None
        return self.of_role(role, _original_role(crew_agent))


def _original_role(crew_agent: Any) -> str | None:
    """The role as written, before ``kickoff(inputs=...)`` filled its placeholders."""
    original = getattr(crew_agent, "_original_role", None)  # CrewAI's BaseAgent keeps it
    return original if isinstance(original, str) else None


# ------------------------------------------------------------------------ run
class _Call:
    __slots__ = ("agent", "counter", "done", "input_tokens", "reservation")

    def __init__(
        self, reservation: Reservation, agent: str, counter: TokenCounter, input_tokens: int
    ) -> None:
        self.reservation = reservation
        self.agent = agent
        self.counter = counter
        self.input_tokens = input_tokens
        self.done = False


CrewScope = Mapping[str, Any] | Callable[[dict[str, Any]], Mapping[str, Any]]
"""``govern_crew(scope=...)``: a kickoff's scope, or a function of its inputs giving it."""

_current_call: contextvars.ContextVar[_Call | None] = contextvars.ContextVar(
    "tbc_crew_call", default=None
)
_current_run: contextvars.ContextVar[_Run | None] = contextvars.ContextVar(
    "tbc_crew_run", default=None
)


class _Governance:
    """What govern_crew decided for a crew; shared by its runs (and its copies' runs)."""

    def __init__(
        self,
        manager: Ledger,
        roles: Mapping[str, str],
        default_agent: str | None,
        default_max_tokens: int,
        confidence_fn: Callable[[Any], float | None] | None,
        lease_seconds: float | None,
        scope: CrewScope | None = None,
    ) -> None:
        self.manager = manager
        self.scope = scope
        self.roles = _Roles(roles)
        self.default_agent = default_agent
        self.default_max_tokens = default_max_tokens
        self.confidence_fn = confidence_fn
        self.lease_seconds = lease_seconds
        self.counters: dict[str | None, TokenCounter] = {}

    def scope_for(self, inputs: Any) -> dict[str, str] | None:
        """The scope of one kickoff (its run, its user), from ``scope`` and its inputs."""
        if self.scope is None:
            return None
        if callable(self.scope):
            given = dict(inputs) if isinstance(inputs, Mapping) else {}
            return check_scope(self.scope(given))
        return check_scope(self.scope)

    def counter(self, model: str | None) -> TokenCounter:
        counter = self.counters.get(model)
        if counter is None:
            counter = self.counters.setdefault(model, TokenCounter(model))
        return counter


class _Run:
    """One governed kickoff: its hook, its event handlers, its open calls."""

    def __init__(
        self,
        gov: _Governance,
        tasks_left: dict[str, int] | None,
        scope: dict[str, str] | None = None,
    ) -> None:
        self.gov = gov
        self.tasks_left = tasks_left
        self.scope = scope
        self.calls: list[_Call] = []
        self.lock = threading.Lock()

    # -- the pre-model-call hook (runs in the caller's context) ------------
    def before_call(self, ctx: Any) -> None:
        """Reserve for the call, or refuse it (always as a ``HookAborted``: fail closed)."""
        try:
            self._reserve_for(ctx)
        except HookAborted:
            raise
        except Exception as exc:
            raise CrewGovernanceError(
                f"the call was refused: governing it failed with {exc!r}"
            ) from exc

    def _reserve_for(self, ctx: Any) -> None:
        gov = self.gov
        crew_agent = getattr(ctx, "agent", None)
        role = getattr(crew_agent, "role", None)
        agent = gov.roles.of(crew_agent)
        if agent is None:
            agent = gov.default_agent
        if agent is None:
            raise CrewUnknownAgentError(
                str(role or "<no agent>"),
                hint=(
                    "This LLM call belongs to no governed agent (planning, a hierarchical "
                    "manager, or an agent without a contract): pass default_agent=... to "
                    "govern_crew, or give this agent a budget."
                ),
            )
        llm = getattr(ctx, "llm", None)
        model = getattr(llm, "model", None)
        counter = gov.counter(model if isinstance(model, str) else None)
        messages = getattr(ctx, "messages", None) or []
        provider = getattr(llm, "provider", None)
        inp = counter.count_messages(messages)
        # native tool calling sends the tools' schemas (CrewAI keeps them on the executor)
        tools = getattr(getattr(ctx, "executor", None), "_openai_tools", None)
        inp += counter.count_tools(tools, provider if isinstance(provider, str) else None)
        out = getattr(llm, "max_tokens", None)
        if isinstance(out, float) and out.is_integer():
            out = int(out)
        if type(out) is not int or out <= 0:
            out = gov.default_max_tokens
        try:
            reservation = gov.manager.reserve(
                agent,
                inp,
                out,
                lease_seconds=gov.lease_seconds,
                clamp_output=True,
                model=model if isinstance(model, str) else None,
                provider=provider if isinstance(provider, str) else None,
                scope=self.scope,
            )
        except BudgetExceededError as err:
            raise _crew_error(err) from None
        call = _Call(reservation, agent, counter, inp)
        with self.lock:
            self.calls.append(call)
        _current_call.set(call)

    # -- event handlers (run on CrewAI's handler threads, in a copy of the
    #    emitting call's context, so _current_call is that very call) ------
    def _mine(self) -> _Call | None:
        if _current_run.get() is not self:
            return None
        call = _current_call.get()
        if call is None:
            return None
        with self.lock:
            if call.done:
                return None
            call.done = True
        return call

    def on_completed(self, source: Any, event: LLMCallCompletedEvent) -> None:
        call = self._mine()
        if call is None:
            return
        estimated = True
        usage = Usage(call.input_tokens, 0)
        if event.usage:
            try:
                usage = parse_usage(event.usage, call.agent)
                estimated = False
            except TBCError:
                logger.error(
                    "Agent '%s': malformed provider usage %r; settling the estimate",
                    call.agent,
                    event.usage,
                )
        if estimated:
            text = event.response if isinstance(event.response, str) else ""
            usage = Usage(call.input_tokens, call.counter.count(text))
        try:
            self.gov.manager.commit(call.reservation, usage, estimated=estimated)
        except TBCError:
            logger.exception("settling agent '%s' failed", call.agent)

    def on_failed(self, source: Any, event: LLMCallFailedEvent) -> None:
        call = self._mine()
        if call is None:
            return
        try:
            self.gov.manager.release(call.reservation)
        except TBCError:
            logger.exception("releasing agent '%s' failed", call.agent)

    def on_task_completed(self, source: Any, event: TaskCompletedEvent) -> None:
        if _current_run.get() is not self:
            return
        agent = self.gov.roles.of(getattr(event.task, "agent", None))
        if agent is None:
            return
        try:
            if self.gov.confidence_fn is not None:
                confidence = self.gov.confidence_fn(event.output)
                if confidence is not None:
                    self.gov.manager.record_confidence(agent, confidence, scope=self.scope)
            if self.tasks_left is not None:
                with self.lock:
                    self.tasks_left[agent] -= 1
                    finished = self.tasks_left[agent] == 0
                if finished:
                    self.gov.manager.complete(agent, scope=self.scope)
        except TBCError:
            logger.exception("task bookkeeping for agent '%s' failed", agent)

    def settle_leftovers(self) -> None:
        """Release calls that never reported back (their events never came)."""
        with self.lock:
            leftovers = [c for c in self.calls if not c.done]
            for call in leftovers:
                call.done = True
        for call in leftovers:
            with contextlib.suppress(TBCError):  # already expired or settled
                self.gov.manager.release(call.reservation)


def _handlers(run: _Run) -> list[tuple[type[Any], Callable[..., None]]]:
    return [
        (LLMCallCompletedEvent, run.on_completed),
        (LLMCallFailedEvent, run.on_failed),
        (TaskCompletedEvent, run.on_task_completed),
    ]


def _tasks_per_agent(crew: Crew, gov: _Governance) -> dict[str, int]:
    left: dict[str, int] = dict.fromkeys(gov.roles.contracts(), 0)
    for task in crew.tasks:
        agent = gov.roles.of(getattr(task, "agent", None))
        if agent is not None:
            left[agent] += 1
    return {agent: n for agent, n in left.items() if n > 0}


@contextmanager
def _governed(
    gov: _Governance, tasks_left: dict[str, int] | None, inputs: Any = None
) -> Iterator[_Run]:
    run = _Run(gov, tasks_left, gov.scope_for(inputs))
    handlers = _handlers(run)
    for event_type, handler in handlers:
        crewai_event_bus.on(event_type)(handler)
    token = _current_run.set(run)
    try:
        with scoped_hooks():
            register_scoped(InterceptionPoint.PRE_MODEL_CALL, run.before_call)
            yield run
    finally:
        _current_run.reset(token)
        crewai_event_bus.flush()
        for event_type, handler in handlers:
            crewai_event_bus.off(event_type, handler)
        run.settle_leftovers()


@asynccontextmanager
async def _agoverned(
    gov: _Governance, tasks_left: dict[str, int] | None, inputs: Any = None
) -> AsyncIterator[_Run]:
    with _governed(gov, tasks_left, inputs) as run:
        yield run


def _inputs(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    """The ``inputs`` a kickoff was given (its first argument, or by name)."""
    return kwargs["inputs"] if "inputs" in kwargs else (args[0] if args else None)


def _one_scope(gov: _Governance, method: str) -> None:
    """Refuse running many inputs under one scope when each kickoff has its own."""
    if callable(gov.scope):
        raise ContractError(
            f"{method} runs every input in one governed scope, and govern_crew(scope=...) "
            "gives each kickoff its own: call kickoff(inputs=...) for each input instead"
        )


def _install(crew: Crew, gov: _Governance) -> None:
    kickoff = crew.kickoff
    kickoff_async = crew.kickoff_async
    akickoff = crew.akickoff
    kickoff_for_each = crew.kickoff_for_each

    @functools.wraps(kickoff)
    def governed_kickoff(*args: Any, **kwargs: Any) -> Any:
        with _governed(gov, _tasks_per_agent(crew, gov), _inputs(args, kwargs)):
            return kickoff(*args, **kwargs)

    @functools.wraps(kickoff_async)
    async def governed_kickoff_async(*args: Any, **kwargs: Any) -> Any:
        async with _agoverned(gov, _tasks_per_agent(crew, gov), _inputs(args, kwargs)):
            return await kickoff_async(*args, **kwargs)

    @functools.wraps(akickoff)
    async def governed_akickoff(*args: Any, **kwargs: Any) -> Any:
        async with _agoverned(gov, _tasks_per_agent(crew, gov), _inputs(args, kwargs)):
            return await akickoff(*args, **kwargs)

    @functools.wraps(kickoff_for_each)
    def governed_kickoff_for_each(*args: Any, **kwargs: Any) -> Any:
        # every input runs every task again: nobody is finished after one of them
        _one_scope(gov, "kickoff_for_each")
        with _governed(gov, None):
            return kickoff_for_each(*args, **kwargs)

    methods: list[tuple[str, Callable[..., Any]]] = [
        ("kickoff", governed_kickoff),
        ("kickoff_async", governed_kickoff_async),
        ("akickoff", governed_akickoff),
        ("kickoff_for_each", governed_kickoff_for_each),
    ]
    for name in ("kickoff_for_each_async", "akickoff_for_each"):
        for_each = getattr(crew, name, None)  # the copies' runs share one governed scope
        if for_each is not None:
            methods.append((name, _governed_for_each_async(for_each, gov)))
    for name, method in methods:
        object.__setattr__(crew, name, method)


def _governed_for_each_async(for_each: Callable[..., Any], gov: _Governance) -> Callable[..., Any]:
    @functools.wraps(for_each)
    async def governed(*args: Any, **kwargs: Any) -> Any:
        _one_scope(gov, getattr(for_each, "__name__", "kickoff_for_each_async"))
        async with _agoverned(gov, None):
            return await for_each(*args, **kwargs)

    return governed


def _yaml_roles(agents_config: Mapping[str, Any] | str | Path) -> dict[str, str]:
    """``agents.yaml`` key -> the role it declares (as written, placeholders kept)."""
    if isinstance(agents_config, (str, Path)):
        import yaml

        path = Path(agents_config)
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ContractError(f"agents_config {path}: {exc}") from exc
        agents_config = loaded if isinstance(loaded, Mapping) else {}
    if not isinstance(agents_config, Mapping):
        raise ContractError(
            f"agents_config must be agents.yaml (a path or its mapping), got {agents_config!r}"
        )
    return {
        str(key): spec["role"].strip()
        for key, spec in agents_config.items()
        if isinstance(spec, Mapping) and isinstance(spec.get("role"), str)
    }


def _by_role(contracts: Mapping[str, Any], roles: Mapping[str, str]) -> dict[str, Any]:
    """Contracts keyed by an ``agents.yaml`` key renamed to that agent's role."""
    renamed: dict[str, Any] = {}
    for name, contract in contracts.items():
        role = roles.get(name, name)
        if role in renamed:
            raise ContractError(
                f"agent '{role}' is given two budgets (by its role and by its agents.yaml key)"
            )
        renamed[role] = contract
    return contracts_from_mapping(renamed)


def govern_crew(
    crew: Crew,
    manager: Ledger,
    budgets: Mapping[str, Any] | str | Path | None = None,
    *,
    default_agent: str | None = None,
    default_max_tokens: int = 1024,
    confidence_fn: Callable[[Any], float | None] | None = None,
    lease_seconds: float | None = None,
    agents_config: Mapping[str, Any] | str | Path | None = None,
    scope: CrewScope | None = None,
) -> Crew:
    """Put ``crew`` under token budget contracts; returns the same crew.

    Args:
        crew: The crew to govern.
        manager: The budget manager.
        budgets: ``{role: fields | BudgetContract}``, a path to a ``budgets.yaml``,
            or ``None`` when the manager already holds the contracts. Agents are
            named in the ledger by their ``role`` as written: a role with
            placeholders (``"{topic} Researcher"``, keyed by that template or, in
            a ``budgets.yaml`` beside ``agents.yaml``, by its ``agents.yaml`` key)
            keeps that name after ``kickoff(inputs=...)`` fills it in, for every
            run (``kickoff_for_each`` and Flows included).
        default_agent: Agent charged for calls that belong to no governed agent
            (planning, a hierarchical manager, an agent without a contract); with
            none, such calls are refused with :class:`CrewUnknownAgentError`.
        default_max_tokens: Output tokens to reserve when an LLM sets no ``max_tokens``.
        confidence_fn: ``f(task_output) -> float | None`` feeding the task's agent's gate.
        lease_seconds: Lease of each call's reservation.
        agents_config: The crew's ``agents.yaml`` (its path, or the mapping a
            ``CrewBase`` loads as ``self.agents_config``), so that ``budgets`` may
            name agents by their ``agents.yaml`` key (a ``budgets.yaml`` reads the
            ``agents.yaml`` beside it without this); the ledger names them by role.
        scope: The scope of the crew's runs, for the manager's limits and its team per
            run (``BudgetManager(team_per="run")``): a mapping (``{"user": "u-42"}``)
            for every kickoff, or ``f(inputs) -> mapping`` called with each kickoff's
            ``inputs`` (``lambda i: {"run": i["request_id"], "user": i["user"]}``), so
            one governed crew serves many runs, each with its own team. (With a
            function, ``kickoff_for_each`` is refused: kick off each input.)

    Raises:
        ContractError: bad budgets, or agents without a contract and no default agent.

    Example:
        >>> from crewai import Agent, Crew, Task
        >>> from tbc_integrations import BudgetManager
        >>> agent = Agent(role="Writer", goal="write", backstory="a writer")
        >>> task = Task(description="Write.", expected_output="text", agent=agent)
        >>> crew = govern_crew(Crew(agents=[agent], tasks=[task]), BudgetManager(),
        ...                    {"Writer": {"max_tokens": 2000}})
        >>> crew.kickoff.__wrapped__ is not None  # runs are governed from now on
        True
    """
    if isinstance(budgets, (str, Path)):
        contracts = load_budgets(budgets)
    elif budgets is None:
        contracts = {}
    else:
        contracts = contracts_from_mapping(budgets)
    if agents_config is not None:
        contracts = _by_role(contracts, _yaml_roles(agents_config))
    known = manager.contracts
    for name, contract in contracts.items():
        if name in known and known[name] == contract:
            continue
        manager.add_contract(contract)
    by_name = _Roles({name: name for name in manager.contracts})
    roles: dict[str, str] = {}
    missing: list[str] = []
    for agent in crew.agents:
        role = agent.role
        original = _original_role(agent)
        match = by_name.of_role(role, original)
        if match is not None:
            roles[role] = match
            if original is not None and match != role:  # not a budget for one interpolation
                roles[original] = match
        elif default_agent is None:
            missing.append(role)
    if default_agent is not None and default_agent not in manager.contracts:
        raise ContractError(f"default_agent '{default_agent}' has no contract in the manager")
    if missing:
        raise ContractError(
            "no budget for crew agent(s) "
            + ", ".join(repr(m) for m in missing)
            + ": add them to budgets (by role, or by agents.yaml key in a budgets.yaml "
            "beside agents.yaml or with agents_config=...) or pass default_agent=... to "
            "charge them to a shared agent"
        )
    extra = set(contracts) - set(roles.values()) - {default_agent}
    if extra and budgets is not None:
        raise ContractError(f"budgets name agent(s) not in this crew: {sorted(extra)}")
    if scope is not None and not callable(scope):
        check_scope(scope)  # a bad entry is refused now, naming it
    gov = _Governance(
        manager, roles, default_agent, default_max_tokens, confidence_fn, lease_seconds, scope
    )
    _install(crew, gov)
    return crew


def crew_summary(manager: Ledger, crew: Crew | None = None) -> dict[str, dict[str, Any]]:
    """Per agent: allocated, consumed, borrowed, lent, refusals (and more) after a run.

    Unlike ``crew.usage_metrics``, this is per-agent truth: two agents sharing one
    LLM are never counted twice.

    Example:
        >>> from tbc_integrations import BudgetManager
        >>> m = BudgetManager(); _ = m.register_agent("Writer", max_tokens=10)
        >>> crew_summary(m)["Writer"]["allocated"]
        10
    """
    names = None
    if crew is not None:
        known = _Roles({name: name for name in manager.contracts})
        names = {known.of(a) or a.role for a in crew.agents}
    keys = ("allocated", "consumed", "borrowed", "lent", "refusals", "remaining", "complete")
    return {
        name: {k: getattr(s, k) for k in keys}
        for name, s in manager.status().items()
        if names is None or name in names
    }
