"""CrewAI plugin: a crew's agents under token budget contracts.

:func:`govern_crew` registers the crew's contracts (a mapping, or a
``budgets.yaml`` beside ``agents.yaml`` and ``tasks.yaml``), checks that every
agent has one, and governs the crew's runs (``kickoff``, ``kickoff_async``,
``akickoff``, ``kickoff_for_each`` and its async forms): before every LLM call a pre-model-call hook
reserves the call's estimated input plus its ``max_tokens``, and refuses it
before the provider is reached with :class:`CrewBudgetExceededError` (a
:class:`~tbc_integrations.BudgetExceededError` that CrewAI neither swallows nor
retries); after it, the provider's usage for that very call is committed, even
when agents share one LLM or tasks run asynchronously. The request asks for no
more output than was held (the agent's output cap holds), and the agent's
degradation ladder (a cheaper model, a lower ``max_tokens``, a wrap-up
instruction) is tried before a refusal; these changes are made to the one call,
on a copy of its LLM. The hooks and event handlers exist only while the crew runs.

Example:
    >>> from tbc_integrations import BudgetManager
    >>> from tbc_integrations.crewai import contracts_from_mapping
    >>> sorted(contracts_from_mapping({"Researcher": {"priority": 3, "max_tokens": 900}}))
    ['Researcher']
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import logging
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any, cast

from tbc_integrations._contracts import Degrade
from tbc_integrations._degrade import Call, Ladder, Plan
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
    from crewai.hooks.llm_hooks import model_call_hooks_already_dispatched
    from crewai.llms.base_llm import BaseLLM
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


# ---------------------------------------------------------- one call's request
# CrewAI reads the request (model, max_tokens) off the LLM object, which agents share
# and which serves concurrent calls. The pre-call hook therefore never changes that
# object: it names a change for its own call (a ContextVar, as CrewAI's own per-call
# stop words do), and the LLM's ``call``/``acall``, routed through :func:`_route` while
# a governed crew runs, make that call on a copy of the LLM of its own.
class _Change:
    """What the pre-call hook changes in its call's request: its ``max_tokens``, its
    model (a name, or an LLM object to make the call on instead) and wrap-up
    instructions appended to its messages."""

    __slots__ = ("llm", "max_tokens", "model", "sent", "wrap_up")

    def __init__(
        self,
        llm: Any,
        max_tokens: int | None = None,
        model: Any = None,
        wrap_up: tuple[str, ...] = (),
        sent: Any = None,
    ) -> None:
        self.llm = llm  # the LLM object the call is made on
        self.max_tokens = max_tokens
        self.model = model
        self.wrap_up = wrap_up
        self.sent = sent  # the messages list the hook saw, which the executor then sends

    def __bool__(self) -> bool:
        return self.max_tokens is not None or self.model is not None or bool(self.wrap_up)

    def made(self) -> Any:
        """An LLM object of this call's own, with the change made."""
        base = self.model if isinstance(self.model, BaseLLM) else self.llm
        target = _own_copy(base, self.llm)
        self.apply(target)
        return target

    def apply(self, target: Any) -> None:
        """Make the change on ``target``, an LLM object no other call uses (the
        messages are the caller's: see :meth:`messages`)."""
        if isinstance(self.model, str):
            provider, _, name = self.model.partition("/")  # "openai/gpt-4o-mini" on OpenAI
            same = name and provider == getattr(target, "provider", None)
            target.model = name if same else self.model
        elif isinstance(self.model, BaseLLM) and target.model != self.model.model:
            target.model = self.model.model  # a call that cannot change its object
        if self.max_tokens is not None:
            # OpenAI's newer field wins over max_tokens when the user set it
            newer = getattr(target, "max_completion_tokens", None) is not None
            setattr(target, "max_completion_tokens" if newer else "max_tokens", self.max_tokens)

    def messages(self, messages: Any) -> Any:
        """``messages`` (a list or a prompt string) with the wrap-up instructions after them."""
        if not self.wrap_up:
            return messages
        listed = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
        return [*listed, *_wrap_up_messages(self.wrap_up)]


def _wrap_up_messages(texts: tuple[str, ...]) -> list[dict[str, str]]:
    return [{"role": "user", "content": text} for text in texts]


_pending: contextvars.ContextVar[_Change | None] = contextvars.ContextVar(
    "tbc_crew_change", default=None
)
_own_call: contextvars.ContextVar[Any] = contextvars.ContextVar("tbc_crew_own_llm", default=None)


def _own_copy(llm: Any, like: Any) -> Any:
    """A shallow copy of ``llm`` for one call, with the per-call settings CrewAI keyed to
    ``like`` (stop words, streaming). Its usage counters stay shared with ``llm``."""
    target = copy.copy(llm)
    for name in ("call", "acall"):
        target.__dict__.pop(name, None)  # our routing, when ``llm`` carries it
    target.stop = list(like.stop_sequences)  # CrewAI's per-call stop words for ``like``
    effective = getattr(like, "_effective_stream", None)  # CrewAI's per-call streaming
    if callable(effective) and effective() != target.stream:
        target.stream = effective()
    return target


def _route(home: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``call`` and ``acall`` for ``home`` that make a governed call on its own object."""

    def target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, tuple[Any, ...]]:
        """The LLM object to make this call on, and the call's arguments."""
        if model_call_hooks_already_dispatched():  # an agent's call: its hook already ran
            change = _pending.get()
            sent = args[0] if args else kwargs.get("messages")
            if (
                change is None
                or change.llm.__dict__.get("call") is not call
                or (change.sent is not None and sent is not change.sent)
            ):
                return home, args  # not the call our hook saw (e.g. CrewAI summarising)
            _pending.set(None)
            if not change:
                return change.llm, args
            if args:
                args = (change.messages(args[0]), *args[1:])
            elif "messages" in kwargs:
                kwargs["messages"] = change.messages(kwargs["messages"])
            return change.made(), args
        if _current_run.get() is not None and type(home).__module__.startswith("crewai."):
            # a call that runs the hooks itself, inside: give it an object of its own
            # that the hook may change (CrewAI's own LLM classes, whose state is their
            # settings; a copy of a crew copy's LLM routes through the LLM it was copied
            # from, which has the same settings)
            own = _own_copy(home, home)
            _own_call.set(own)  # in this call's context (call/acall reset it)
            return own, args
        return home, args

    def call(*args: Any, **kwargs: Any) -> Any:
        token = _own_call.set(None)
        try:
            llm, args = target(args, kwargs)
            return type(llm).call(llm, *args, **kwargs)
        finally:
            _own_call.reset(token)

    async def acall(*args: Any, **kwargs: Any) -> Any:
        token = _own_call.set(None)
        try:
            llm, args = target(args, kwargs)
            return await type(llm).acall(llm, *args, **kwargs)
        finally:
            _own_call.reset(token)

    return call, acall


_routes_lock = threading.Lock()
_routes: dict[int, list[Any]] = {}  # id(llm) -> [llm, governed runs using its routing]


def _routed(llm: Any) -> bool:
    """Route ``llm``'s calls (see :func:`_route`); ``False`` when it already was, or cannot be."""
    if not isinstance(llm, BaseLLM):
        return False
    with _routes_lock:
        entry = _routes.get(id(llm))
        if entry is not None and entry[0] is llm:
            entry[1] += 1
            return True
        own = llm.__dict__.get("call")
        if own is not None:  # a copy made of a routed LLM routes already; a mock is left alone
            return False
        _routes[id(llm)] = [llm, 1]
        call, acall = _route(llm)
        object.__setattr__(llm, "call", call)
        object.__setattr__(llm, "acall", acall)
        return True


def _unrouted(llm: Any) -> None:
    with _routes_lock:
        entry = _routes.get(id(llm))
        if entry is None or entry[0] is not llm:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _routes[id(llm)]
            llm.__dict__.pop("call", None)
            llm.__dict__.pop("acall", None)


def _crew_llms(crew: Crew) -> list[Any]:
    """The LLM objects a crew's calls are made on, each once."""
    found: dict[int, Any] = {}
    # read as stored: CrewAI warns on reading its deprecated fields
    candidates = [vars(agent).get("llm") for agent in crew.agents]
    candidates += [vars(crew).get(name) for name in ("manager_llm", "planning_llm")]
    for llm in candidates:
        if isinstance(llm, BaseLLM):
            found.setdefault(id(llm), llm)
    return list(found.values())


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
        models: Mapping[str, Any] | None = None,
    ) -> None:
        self.manager = manager
        self.scope = scope
        self.models = dict(models or {})
        self.ladders: dict[str, Ladder] = {}
        self.roles = _Roles(roles)
        self.default_agent = default_agent
        self.default_max_tokens = default_max_tokens
        self.confidence_fn = confidence_fn
        self.lease_seconds = lease_seconds
        self.counters: dict[str | None, TokenCounter] = {}
        self.capped: dict[str, bool] = {}  # agent -> has an output cap (contracts never change)

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

    def _contract(self, agent: str) -> None:
        """Read what the hook needs of ``agent``'s contract (contracts never change)."""
        contract = self.manager.contracts.get(agent)
        self.capped[agent] = contract is not None and contract.max_output_tokens is not None
        steps = () if contract is None else contract.degrade
        self.ladders[agent] = Ladder(
            cast(Iterable[Degrade], steps),
            prices=getattr(self.manager, "prices", None),
            default_output_tokens=self.default_max_tokens,
        )

    def has_output_cap(self, agent: str) -> bool:
        if agent not in self.capped:
            self._contract(agent)
        return self.capped[agent]

    def ladder(self, agent: str) -> Ladder:
        """The agent's degradation ladder."""
        if agent not in self.ladders:
            self._contract(agent)
        return self.ladders[agent]


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _asked(llm: Any) -> int | None:
    """The output limit ``llm`` puts on its requests (``None``: none)."""
    for name in ("max_completion_tokens", "max_tokens"):
        value = getattr(llm, name, None)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if type(value) is int and value > 0:
            return value
    return None


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
        self.routed: dict[int, Any] = {}  # LLMs whose calls this run routes (see _route)

    def route(self, llm: Any) -> None:
        with self.lock:
            if id(llm) in self.routed:
                return
            if _routed(llm):
                self.routed[id(llm)] = llm

    def unroute(self) -> None:
        with self.lock:
            routed, self.routed = self.routed, {}
        for llm in routed.values():
            _unrouted(llm)

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
        model = _str(getattr(llm, "model", None))
        provider = _str(getattr(llm, "provider", None))
        messages = getattr(ctx, "messages", None) or []
        # native tool calling sends the tools' schemas (CrewAI keeps them on the executor)
        tools = getattr(getattr(ctx, "executor", None), "_openai_tools", None)

        def estimate(model: str | None, wrap_up: tuple[str, ...] = ()) -> tuple[TokenCounter, int]:
            """The call's input tokens, counted for its model."""
            counter = gov.counter(model)
            sent = [*messages, *_wrap_up_messages(wrap_up)] if wrap_up else messages
            return counter, counter.count_messages(sent) + counter.count_tools(tools, provider)

        asked = _asked(llm)
        counter, inp = estimate(model)
        # a call whose LLM sets no max_tokens is held (and priced) at the default output
        call = Call(model, gov.default_max_tokens if asked is None else asked, inp, provider)
        ladder = gov.ladder(agent)
        # the ladder's decisions (_degrade): the steps due before the call, then one per refusal
        plan = (
            ladder.plan(call, gov.manager.call_status(agent, self.scope)) if ladder else Plan(call)
        )
        taken = plan.taken
        while True:
            for step in taken:
                gov.manager.note_degraded(agent, step.step.name, step.why)
            now = plan.call
            if now.model != call.model or now.wrap_up:
                counter, inp = estimate(now.model, now.wrap_up)
            out = now.max_tokens if now.max_tokens is not None else gov.default_max_tokens
            try:
                reservation = gov.manager.reserve(
                    agent,
                    inp,
                    out,
                    lease_seconds=gov.lease_seconds,
                    clamp_output=True,
                    model=now.model,
                    provider=provider,
                    scope=self.scope,
                )
                break
            except BudgetExceededError as err:
                after = ladder.after_refusal(plan, err.reason) if ladder else None
                if after is None:
                    raise _crew_error(err) from None
                plan, taken = after, after.taken[-1:]
        record = _Call(reservation, agent, counter, inp)
        with self.lock:
            self.calls.append(record)
        _current_call.set(record)
        change = self.change(agent, llm, asked, now, reservation.output_tokens)
        change.sent = getattr(ctx, "messages", None)
        self.request(ctx, llm, change)

    def change(self, agent: str, llm: Any, asked: int | None, now: Call, held: int) -> _Change:
        """The request as planned (``now``), asking no more output than was ``held``."""
        gov = self.gov
        was = _str(getattr(llm, "model", None))
        switched = now.model if now.model is not None and now.model != was else None
        if switched is not None:
            lower = True  # the other model's LLM object may ask another max_tokens
        elif asked is not None:
            lower = held < asked
        else:  # the LLM asks no limit: give it one when that is what the cap allows
            lower = held < gov.default_max_tokens or gov.has_output_cap(agent)
        model = None if switched is None else gov.models.get(switched, switched)
        return _Change(llm, held if lower else None, model, now.wrap_up)

    def request(self, ctx: Any, llm: Any, change: _Change) -> None:
        """Have ``change`` made to this call's request, on an LLM object of its own."""
        if getattr(ctx, "executor", None) is not None:  # the call is made after the hook
            if change:
                self.route(llm)
            _pending.set(change)
        elif change:  # the hook runs inside the call: change the object it runs on
            own = _own_call.get()
            if own is not None and own is llm:
                change.apply(own)
                # CrewAI's own LLMs hand their hooks the call's formatted copy of the messages
                ctx.messages.extend(_wrap_up_messages(change.wrap_up))
            else:
                logger.debug("a call on %r cannot be changed from its hook", llm)

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
    gov: _Governance,
    tasks_left: dict[str, int] | None,
    inputs: Any = None,
    crew: Crew | None = None,
) -> Iterator[_Run]:
    run = _Run(gov, tasks_left, gov.scope_for(inputs))
    if crew is not None:
        for llm in _crew_llms(crew):  # their calls outside an agent's loop too
            run.route(llm)
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
        run.unroute()
        run.settle_leftovers()


@asynccontextmanager
async def _agoverned(
    gov: _Governance,
    tasks_left: dict[str, int] | None,
    inputs: Any = None,
    crew: Crew | None = None,
) -> AsyncIterator[_Run]:
    with _governed(gov, tasks_left, inputs, crew) as run:
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
        with _governed(gov, _tasks_per_agent(crew, gov), _inputs(args, kwargs), crew):
            return kickoff(*args, **kwargs)

    @functools.wraps(kickoff_async)
    async def governed_kickoff_async(*args: Any, **kwargs: Any) -> Any:
        async with _agoverned(gov, _tasks_per_agent(crew, gov), _inputs(args, kwargs), crew):
            return await kickoff_async(*args, **kwargs)

    @functools.wraps(akickoff)
    async def governed_akickoff(*args: Any, **kwargs: Any) -> Any:
        async with _agoverned(gov, _tasks_per_agent(crew, gov), _inputs(args, kwargs), crew):
            return await akickoff(*args, **kwargs)

    @functools.wraps(kickoff_for_each)
    def governed_kickoff_for_each(*args: Any, **kwargs: Any) -> Any:
        # every input runs every task again: nobody is finished after one of them
        _one_scope(gov, "kickoff_for_each")
        with _governed(gov, None, None, crew):
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
            methods.append((name, _governed_for_each_async(for_each, gov, crew)))
    for name, method in methods:
        object.__setattr__(crew, name, method)


def _governed_for_each_async(
    for_each: Callable[..., Any], gov: _Governance, crew: Crew
) -> Callable[..., Any]:
    @functools.wraps(for_each)
    async def governed(*args: Any, **kwargs: Any) -> Any:
        _one_scope(gov, getattr(for_each, "__name__", "kickoff_for_each_async"))
        async with _agoverned(gov, None, None, crew):
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
    models: Mapping[str, Any] | None = None,
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
        models: ``crewai.LLM`` objects by name, for the ``model`` steps of the agents'
            degradation ladders; a name not here is the calling LLM with its ``model``
            set to that name (same client, same provider).

    Each call's request asks for no more output than its reservation holds: its
    ``max_tokens`` is lowered to what the agent's output cap allows. An agent's
    degradation ladder (``BudgetContract(degrade=[...])``) is tried before a refusal:
    a step with ``below`` is taken before the call once the agent's remaining falls
    below that fraction; when the call is refused, the next step is taken and the
    call reserved again: a cheaper model, a lower ``max_tokens``, a wrap-up
    instruction appended to the messages. Each step is a ``Degraded`` event. The
    changes are made to that one call (on a copy of its LLM), never to an LLM that
    agents share.

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
    by_name = _Roles({name: name for name in [*known, *contracts]})
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
    if default_agent is not None and default_agent not in known and default_agent not in contracts:
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
    for name, contract in contracts.items():  # registered once every check has passed
        if name in known and known[name] == contract:
            continue
        manager.add_contract(contract)
    gov = _Governance(
        manager,
        roles,
        default_agent,
        default_max_tokens,
        confidence_fn,
        lease_seconds,
        scope,
        models,
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
