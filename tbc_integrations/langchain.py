"""LangChain plugin: a callback handler that budgets every chat-model and LLM call.

Attach :class:`BudgetCallbackHandler` to any runnable (``config={"callbacks":
[handler]}``, ``.with_config(...)``), or install it for a whole block with
:func:`budget_scope`. Before a call it reserves the estimated input plus the
request's ``max_tokens``; a refusal raises :class:`~tbc_integrations.BudgetExceededError`
before the provider is called. While streaming it counts output and cuts the
stream at the reservation. After the call it commits the provider's real usage.
On the async paths (``ainvoke``, ``astream``...) over a store that waits on I/O
(Redis, SQLite), it reserves and settles through the ledger's async verbs, so the
event loop runs other calls meanwhile.

Example:
    >>> from langchain_core.language_models import FakeListChatModel
    >>> from tbc_integrations import BudgetManager
    >>> from tbc_integrations.langchain import BudgetCallbackHandler
    >>> m = BudgetManager()
    >>> _ = m.register_agent("writer", max_tokens=500)
    >>> handler = BudgetCallbackHandler(m, agent="writer", default_max_tokens=50)
    >>> FakeListChatModel(responses=["ok"]).invoke("hi", config={"callbacks": [handler]}).content
    'ok'
    >>> m.status()["writer"].consumed > 0
    True
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from types import MethodType
from typing import Any, NamedTuple
from uuid import UUID

from tbc_integrations._engine import EXPIRED_MEMORY_SECONDS
from tbc_integrations._errors import (
    ContractError,
    InvalidTokenCountError,
    MissingDependencyError,
    TBCError,
    UnknownAgentError,
)
from tbc_integrations._ledger import Ledger
from tbc_integrations._records import Reservation
from tbc_integrations._usage import Usage, parse_usage
from tbc_integrations._validate import check_agent_name, check_lease, check_tokens
from tbc_integrations.tokens import TokenCounter, shared_counter

try:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.callbacks import manager as _lc_manager
    from langchain_core.messages import BaseMessage
    from langchain_core.outputs import ChatGeneration, LLMResult
    from langchain_core.tracers.context import register_configure_hook
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError(
        "tbc_integrations.langchain needs langchain-core: pip install 'tbc-integrations[langchain]'"
    ) from exc

__all__ = [
    "AGENT_METADATA_KEY",
    "FORGET_RUNS_AFTER_SECONDS",
    "SCOPE_METADATA_KEY",
    "BudgetCallbackHandler",
    "budget_scope",
    "call_scope",
    "logprob_confidence",
]

logger = logging.getLogger("tbc_integrations.langchain")


class _QuietRefusals(logging.Filter):
    """Drop LangChain's "Error in BudgetCallbackHandler..." lines for our own refusals.

    LangChain logs every exception a handler raises, even with ``raise_error``;
    a refusal is the handler working, and the caller gets the exception anyway.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (
            record.msg == "Error in %s.%s callback: %s"
            and len(args) == 3
            and args[0] == "BudgetCallbackHandler"
            and str(args[2]).startswith(("BudgetExceededError(", "ConfidenceGateError("))
        )


logging.getLogger("langchain_core.callbacks.manager").addFilter(_QuietRefusals())

# The function of LangChain's async callback manager that looks a handler's event
# method up, awaits it when it is a coroutine function, and re-raises what it raises
# when the handler has ``raise_error``. Where it is missing (another LangChain), every
# path gets the sync methods: correct, only blocking on a network store.
_ASYNC_DISPATCH = getattr(
    getattr(_lc_manager, "_ahandle_event_for_handler", None), "__code__", None
)

_EMPTY: Mapping[str, Any] = {}

AGENT_METADATA_KEY = "tbc_agent"
"""Metadata key that names a call's agent: ``config={"metadata": {"tbc_agent": ...}}``."""
SCOPE_METADATA_KEY = "tbc_scope"
"""Metadata key that names a call's scope for the ledger's limits:
``config={"metadata": {"tbc_scope": {"user": "u-42"}}}``."""

ConfidenceFn = Callable[[BaseMessage], "float | None"]
NOT_AN_AGENT_SECONDS = 5.0
"""How long a metadata name found not to be an agent is trusted to stay one."""
FORGET_RUNS_AFTER_SECONDS = EXPIRED_MEMORY_SECONDS
"""How long after its lease a call that never ended is still awaited (as long as a store
keeps its lapsed reservation for a late commit)."""
_FEW_RUNS = 1024  # open runs below which nobody looks for forgotten ones


class _Run(NamedTuple):
    """One call's reservation, the counter for its model, and the handler that made it."""

    reservation: Reservation
    counter: TokenCounter
    owner: BudgetCallbackHandler


# Runs reserved for, and output streamed so far, per ledger: two handlers on one
# ledger never reserve one call twice nor count its stream twice.
_ledger_runs: weakref.WeakKeyDictionary[Ledger, tuple[dict[int, _Run], dict[int, int]]] = (
    weakref.WeakKeyDictionary()
)
_ledger_runs_lock = threading.Lock()


def _runs_for(ledger: Ledger) -> tuple[dict[int, _Run], dict[int, int]]:
    with _ledger_runs_lock:
        runs = _ledger_runs.get(ledger)
        if runs is None:
            runs = _ledger_runs[ledger] = ({}, {})
        return runs


def logprob_confidence(message: BaseMessage) -> float | None:
    """Confidence from token logprobs: the geometric mean probability of the tokens.

    Reads OpenAI-style ``response_metadata["logprobs"]["content"]`` (a list of
    ``{"token", "logprob"}``); returns ``None`` when the provider sent none.

    Example:
        >>> from langchain_core.messages import AIMessage
        >>> lp = {"content": [{"token": "a", "logprob": -0.1}, {"token": "b", "logprob": -0.3}]}
        >>> round(logprob_confidence(AIMessage("ab", response_metadata={"logprobs": lp})), 3)
        0.819
    """
    logprobs = (getattr(message, "response_metadata", None) or {}).get("logprobs")
    if isinstance(logprobs, Mapping):
        logprobs = logprobs.get("content")
    if not isinstance(logprobs, Sequence) or not logprobs:
        return None
    values = [
        float(item["logprob"])
        for item in logprobs
        if isinstance(item, Mapping) and isinstance(item.get("logprob"), (int, float))
    ]
    if not values:
        return None
    return min(1.0, max(0.0, math.exp(sum(values) / len(values))))


def _usage_from(response: LLMResult | None) -> tuple[Any, Any]:
    """(raw usage or None, message or None) from an LLM result, as providers report it."""
    if response is None:
        return None, None
    message = None
    for generations in response.generations:
        for generation in generations:
            if isinstance(generation, ChatGeneration):
                message = generation.message
                usage = getattr(message, "usage_metadata", None)
                if usage:
                    return usage, message
    token_usage = (response.llm_output or {}).get("token_usage") or (response.llm_output or {}).get(
        "usage"
    )
    if token_usage:
        return token_usage, message
    return None, message


def _usage_from_error(error: BaseException) -> Any:
    """Usage a provider billed for a call that then raised, or None.

    SDKs raise after a billed response (OpenAI's ``LengthFinishReasonError`` and
    ``ContentFilterFinishReasonError`` keep it as ``completion``); LangChain may wrap
    them, so the cause chain is searched too.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        for holder in (getattr(current, "completion", None), current):
            usage = getattr(holder, "usage", None)
            if usage is not None and not callable(usage):
                return usage
        current = current.__cause__ or current.__context__
    return None


def _log_malformed(agent: str, raw: Any) -> None:
    logger.error(
        "Agent '%s': malformed provider usage %r; settling the estimate instead", agent, raw
    )


def _warn_overdraft(agent: str, overdraft: int, used: int) -> None:
    logger.warning(
        "Agent '%s' is overdrawn by %d tokens after a call used %d", agent, overdraft, used
    )


def _generated_text(response: LLMResult | None) -> str:
    if response is None:
        return ""
    return "".join(g.text for gens in response.generations for g in gens)


class _PerPath:
    """An event method in two forms: LangChain's async manager gets the coroutine one.

    LangChain runs one handler object on both paths. Its sync manager calls the
    method and, if that returns a coroutine, runs it elsewhere and swallows its
    exceptions (a refusal would be lost), so the sync form must stay a plain
    method. Its async manager (``_ahandle_event_for_handler``) awaits a coroutine
    function and re-raises its exceptions. So the lookup made from that function,
    and only that one, gets the coroutine form, when the handler's store waits on
    I/O; every other lookup (the sync manager, user code, ``super()``) gets the
    sync form.
    """

    __slots__ = ("asynchronous", "synchronous")

    def __init__(
        self,
        synchronous: Callable[..., None],
        asynchronous: Callable[..., Coroutine[Any, Any, None]],
    ) -> None:
        self.synchronous = synchronous
        self.asynchronous = asynchronous

    def __get__(self, obj: BudgetCallbackHandler | None, owner: type | None = None) -> Any:
        if obj is None:
            return self.synchronous
        if sys._getframe(1).f_code is _ASYNC_DISPATCH:
            return MethodType(self.asynchronous, obj)
        return MethodType(self.synchronous, obj)


_STORE_EVENTS = ("on_chat_model_start", "on_llm_start", "on_llm_end", "on_llm_error")
_ASYNC_IO_CLASSES: dict[type, type] = {}


def _async_io_class(cls: type[BudgetCallbackHandler]) -> type[BudgetCallbackHandler]:
    """``cls`` with its store-waiting events in two forms (:class:`_PerPath`), made once.

    Only handlers over a store that waits on I/O take this class, so the lookups
    LangChain makes on every event stay plain method lookups on the memory store.
    Events a subclass overrides keep the override, on every path.
    """
    sub = _ASYNC_IO_CLASSES.get(cls)
    if sub is None:
        forms = {
            name: _PerPath(getattr(cls, name), getattr(cls, f"_a{name}"))
            for name in _STORE_EVENTS
            if getattr(cls, name) is getattr(BudgetCallbackHandler, name)
        }
        namespace = {"__module__": cls.__module__, "__qualname__": cls.__qualname__, **forms}
        sub = _ASYNC_IO_CLASSES.setdefault(cls, type(cls.__name__, (cls,), namespace))
    return sub


class BudgetCallbackHandler(BaseCallbackHandler):
    """Reserve before every chat-model/LLM call, cut streams, settle real usage.

    Args:
        manager: The :class:`~tbc_integrations.BudgetManager` (or ledger) to spend from.
        agent: Agent every call is charged to. Without it the agent comes from
            the call's metadata: ``tbc_agent``, else ``lc_agent_name``, else
            ``langgraph_node`` (the last two only when such an agent is
            registered), else ``default_agent``.
        default_agent: Agent for calls nothing else attributes.
        default_max_tokens: Output tokens to reserve when a request sets no
            ``max_tokens``.
        confidence_fn: ``f(message) -> float | None`` feeding the agent's gate
            after each call (see :func:`logprob_confidence`).
        lease_seconds: Lease of this handler's reservations (the manager's
            default otherwise); it bounds what a call that never reports back
            can hold.
        cut_streams: Stop a stream with ``BudgetExceededError`` once its output
            passes what was reserved for output. Of several handlers on one
            ledger, the one that reserved for a call counts its stream and
            decides this.

    On LangChain's async paths, over a store whose verbs wait on I/O
    (``store.blocking_io``), the handler reserves, commits and releases through
    the ledger's async verbs instead of blocking the event loop; a refusal still
    raises before the provider is called. Over the memory store it runs inline
    on every path.

    Example:
        >>> from tbc_integrations import BudgetManager
        >>> m = BudgetManager(); _ = m.register_agent("a", max_tokens=100)
        >>> BudgetCallbackHandler(m, default_agent="a").raise_error
        True
    """

    raise_error = True
    run_inline = True
    # Only model events matter: let LangChain skip this handler for everything else.
    # (Plain class attributes, not the base class's properties: LangChain reads them
    # on every event.)
    ignore_llm = False
    ignore_chat_model = False
    ignore_chain = True
    ignore_agent = True
    ignore_retriever = True
    ignore_retry = True
    ignore_custom_event = True

    def __init__(
        self,
        manager: Ledger,
        agent: str | None = None,
        *,
        default_agent: str | None = None,
        default_max_tokens: int = 1024,
        confidence_fn: ConfidenceFn | None = None,
        lease_seconds: float | None = None,
        cut_streams: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(manager, Ledger):
            raise ContractError(
                f"BudgetCallbackHandler needs a BudgetManager (or a Ledger), got {manager!r}"
            )
        for name in (agent, default_agent):
            if name is not None:
                check_agent_name(name)
        self.manager = manager
        self.agent = agent
        self.default_agent = default_agent
        self.default_max_tokens = check_tokens(
            default_max_tokens, "default_max_tokens", agent or default_agent or "?"
        )
        self.confidence_fn = confidence_fn
        self.lease_seconds = None if lease_seconds is None else check_lease(lease_seconds)
        self.cut_streams = cut_streams
        self._runs, self._streamed = _runs_for(manager)
        self._known: frozenset[str] = frozenset()
        self._not_agents: dict[str, float] = {}
        self._forget_at = _FEW_RUNS
        self._scopes = 0  # scopes this handler is installed by, right now
        self._scopes_lock = threading.Lock()
        # on a store that waits on I/O, async paths use the async verbs (see _PerPath)
        self._async_io = _ASYNC_DISPATCH is not None and bool(
            getattr(getattr(manager, "store", None), "blocking_io", False)
        )
        if self._async_io and type(self) not in _ASYNC_IO_CLASSES.values():
            self.__class__ = _async_io_class(type(self))

    # ------------------------------------------------------------ attribution
    def _is_agent(self, name: Any) -> bool:
        if not isinstance(name, str):
            return False
        if name in self._known:
            return True
        # A name seen not to be an agent is not looked up again for a few seconds, so a
        # node without a contract (charged to the default agent) costs no store query per call.
        now = time.monotonic()
        if self._not_agents.get(name, 0.0) > now:
            return False
        self._known = frozenset(self.manager.contracts)
        if name in self._known:
            return True
        self._not_agents[name] = now + NOT_AN_AGENT_SECONDS
        return False

    def resolve_agent(self, metadata: Mapping[str, Any] | None) -> str:
        """The agent a call with this metadata is charged to.

        Raises:
            UnknownAgentError: when nothing names a registered agent and there
                is no ``default_agent``.
        """
        if self.agent is not None:
            return self.agent
        metadata = metadata or {}
        explicit = metadata.get(AGENT_METADATA_KEY)
        if explicit is not None:
            return str(explicit)
        for key in ("lc_agent_name", "langgraph_node"):
            name = metadata.get(key)
            if self._is_agent(name):
                return str(name)
        if self.default_agent is not None:
            return self.default_agent
        raise UnknownAgentError(
            str(metadata.get("lc_agent_name") or metadata.get("langgraph_node") or "<none>"),
            hint=(
                "No agent for this LLM call: pass agent= or default_agent= to "
                "BudgetCallbackHandler, or set config={'metadata': {'tbc_agent': ...}}."
            ),
        )

    async def _aresolve_agent(self, metadata: Mapping[str, Any] | None) -> str:
        """:meth:`resolve_agent`, in a thread when it would ask the store."""
        if self._lookup_needed(metadata):
            return await asyncio.to_thread(self.resolve_agent, metadata)
        return self.resolve_agent(metadata)

    def _lookup_needed(self, metadata: Mapping[str, Any] | None) -> bool:
        """Whether :meth:`resolve_agent` would ask the store which agents exist."""
        if self.agent is not None or not metadata or metadata.get(AGENT_METADATA_KEY) is not None:
            return False
        now = time.monotonic()
        for key in ("lc_agent_name", "langgraph_node"):
            name = metadata.get(key)
            if isinstance(name, str):
                if name in self._known:
                    return False
                if self._not_agents.get(name, 0.0) <= now:
                    return True
        return False

    # ------------------------------------------------------------------ start
    def _scope_of(self, metadata: Mapping[str, Any] | None) -> dict[str, str] | None:
        return call_scope(self.manager, metadata)

    def _outer(self) -> bool:
        """Whether a governed scope nested inside this handler's owns the call.

        The innermost agent owns its call: a node's handler does not reserve for a
        call made inside a governed subgraph or a ``BudgetMiddleware`` agent it runs;
        the inner agent's budget holds it, and refuses it when it must.
        """
        if not self._scopes:
            return False  # not installed by a scope: handed to this very call
        inner = _scope_handler.get()
        return inner is not None and inner is not self and inner.manager is self.manager

    def _start(
        self,
        run_id: UUID,
        metadata: Mapping[str, Any] | None,
        invocation_params: Mapping[str, Any] | None,
        chats: list[list[BaseMessage]] | None,
        prompts: list[str] | None,
    ) -> None:
        key = run_id.int
        if key in self._runs or self._outer():
            return  # reserved by another handler on this ledger, or by the inner scope's
        agent = self.agent if self.agent is not None else self.resolve_agent(metadata)
        inp, out, counter, model, provider = self._estimate(
            metadata, invocation_params, chats, prompts
        )
        reservation = self.manager.reserve(
            agent,
            inp,
            out,
            lease_seconds=self.lease_seconds,
            clamp_output=True,
            model=model,
            provider=provider,
            scope=self._scope_of(metadata),
        )
        self._hold(key, reservation, counter)

    async def _astart(
        self,
        run_id: UUID,
        metadata: Mapping[str, Any] | None,
        invocation_params: Mapping[str, Any] | None,
        chats: list[list[BaseMessage]] | None,
        prompts: list[str] | None,
    ) -> None:
        """:meth:`_start` through the async verbs (a store lookup, if any, in a thread)."""
        key = run_id.int
        if key in self._runs or self._outer():
            return
        agent = self.agent
        if agent is None:
            agent = await self._aresolve_agent(metadata)
        inp, out, counter, model, provider = self._estimate(
            metadata, invocation_params, chats, prompts
        )
        reservation = await self.manager.areserve(
            agent,
            inp,
            out,
            lease_seconds=self.lease_seconds,
            clamp_output=True,
            model=model,
            provider=provider,
            scope=self._scope_of(metadata),
        )
        self._hold(key, reservation, counter)

    def _estimate(
        self,
        metadata: Mapping[str, Any] | None,
        invocation_params: Mapping[str, Any] | None,
        chats: list[list[BaseMessage]] | None,
        prompts: list[str] | None,
    ) -> tuple[int, int, TokenCounter, str | None, str | None]:
        """Input tokens, output tokens to reserve, the model's counter, the model and its
        provider (what the call is priced by)."""
        meta = metadata or _EMPTY
        params = invocation_params or _EMPTY
        model = meta.get("ls_model_name") or params.get("model") or params.get("model_name")
        provider = meta.get("ls_provider")
        # the process's counter: its cache of texts outlives this handler
        counter = shared_counter(model if isinstance(model, str) else None)
        out = meta.get("ls_max_tokens")
        if type(out) is not int or out < 0:
            out = params.get("max_tokens") or params.get("max_completion_tokens")
            if type(out) is not int or out < 0:
                out = self.default_max_tokens
        inp = 0
        if chats is not None:
            for chat in chats:
                inp += counter.count_messages(chat)
        else:
            for prompt in prompts or ():
                inp += counter.count(prompt)
        # what the provider bills beside the messages: tool definitions, a schema
        tools = params.get("tools") or params.get("functions")
        if tools:
            inp += counter.count_tools(tools, provider)
        response_format = params.get("response_format")
        if response_format:
            inp += counter.count_response_format(response_format)
        return (
            inp,
            out,
            counter,
            model if isinstance(model, str) else None,
            provider if isinstance(provider, str) else None,
        )

    def _hold(self, key: int, reservation: Reservation, counter: TokenCounter) -> None:
        self._runs[key] = _Run(reservation, counter, self)
        if len(self._runs) > self._forget_at:
            self._forget_lapsed()

    def _forget_lapsed(self) -> None:
        """Drop calls whose end never came (another handler raised at their start, so
        LangChain sends neither end nor error) once no late commit can count any more.
        Their tokens came back when their lease ended."""
        horizon = self.manager.clock() - FORGET_RUNS_AFTER_SECONDS
        for key, run in list(self._runs.items()):
            if run.reservation.expires_at < horizon:
                self._runs.pop(key, None)
                self._streamed.pop(key, None)
        self._forget_at = max(_FEW_RUNS, 2 * len(self._runs))

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        metadata: dict[str, Any] | None = None,
        invocation_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Reserve for a chat-model call (raises to refuse it)."""
        self._start(run_id, metadata, invocation_params, messages, None)

    def on_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        metadata: dict[str, Any] | None = None,
        invocation_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Reserve for a plain-LLM call (raises to refuse it)."""
        self._start(run_id, metadata, invocation_params, None, prompts)

    async def _aon_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        metadata: dict[str, Any] | None = None,
        invocation_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        await self._astart(run_id, metadata, invocation_params, messages, None)

    async def _aon_llm_start(
        self,
        serialized: dict[str, Any],
        prompts: list[str],
        *,
        run_id: UUID,
        metadata: dict[str, Any] | None = None,
        invocation_params: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        await self._astart(run_id, metadata, invocation_params, None, prompts)

    # ---------------------------------------------------------------- stream
    def on_llm_new_token(self, token: Any, *, run_id: UUID, **kwargs: Any) -> None:
        """Count streamed output; past the output reservation, cut the stream.

        Only the handler that reserved for the call counts it, so two handlers on
        one ledger count a stream once.
        """
        key = run_id.int
        run = self._runs.get(key)
        if run is None or run.owner is not self or not token:
            return
        counter = run.counter
        before = self._streamed.get(key, 0)
        self._streamed[key] = counter.add_streamed(before, token)
        reserved_out = run.reservation.output_tokens
        if self.cut_streams and counter.streamed_tokens(before) >= reserved_out:
            from tbc_integrations._errors import BudgetExceededError

            raise BudgetExceededError(
                run.reservation.agent,
                counter.streamed_tokens(self._streamed[key]),
                reserved_out,
                reason="output reservation (stream cut)",
            )

    # ------------------------------------------------------------------- end
    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        """Commit the provider's real usage (or the estimate, marked as such)."""
        key = run_id.int
        run = self._runs.pop(key, None)
        if run is None:
            return
        so_far = self._streamed.pop(key, 0) if self._streamed else 0
        streamed = run.counter.streamed_tokens(so_far) if so_far else 0
        raw, message = _usage_from(response)
        self._settle(run, streamed, raw, response)
        if self.confidence_fn is not None and message is not None:
            try:
                confidence = self.confidence_fn(message)
                if confidence is not None:
                    self.manager.record_confidence(
                        run.reservation.agent,
                        confidence,
                        scope=self.manager.run_scope(run.reservation),
                    )
            except TBCError:
                logger.exception(
                    "confidence for agent '%s' was not recorded", run.reservation.agent
                )

    async def _aon_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        key = run_id.int
        run = self._runs.pop(key, None)
        if run is None:
            return
        streamed = run.counter.streamed_tokens(self._streamed.pop(key, 0))
        raw, message = _usage_from(response)
        await self._asettle(run, streamed, raw, response)
        if self.confidence_fn is not None and message is not None:
            try:
                confidence = self.confidence_fn(message)
                if confidence is not None:
                    await self.manager.arecord_confidence(
                        run.reservation.agent,
                        confidence,
                        scope=self.manager.run_scope(run.reservation),
                    )
            except TBCError:
                logger.exception(
                    "confidence for agent '%s' was not recorded", run.reservation.agent
                )

    def on_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        response: LLMResult | None = None,
        **kwargs: Any,
    ) -> None:
        """Release the reservation; or commit what the provider billed before the error
        (its usage on the result or the error), or what a broken stream produced."""
        key = run_id.int
        run = self._runs.pop(key, None)
        if run is None:
            return
        streamed = run.counter.streamed_tokens(self._streamed.pop(key, 0))
        raw, _ = _usage_from(response)
        if raw is None:
            raw = _usage_from_error(error)  # billed, then raised: recorded, not released
        if raw is None and streamed == 0:
            try:
                self.manager.release(run.reservation)
            except TBCError:
                logger.exception("releasing agent '%s' failed", run.reservation.agent)
            return
        self._settle(run, streamed, raw, None)

    async def _aon_llm_error(
        self,
        error: BaseException,
        *,
        run_id: UUID,
        response: LLMResult | None = None,
        **kwargs: Any,
    ) -> None:
        key = run_id.int
        run = self._runs.pop(key, None)
        if run is None:
            return
        streamed = run.counter.streamed_tokens(self._streamed.pop(key, 0))
        raw, _ = _usage_from(response)
        if raw is None:
            raw = _usage_from_error(error)  # billed, then raised: recorded, not released
        if raw is None and streamed == 0:
            try:
                await self.manager.arelease(run.reservation)
            except TBCError:
                logger.exception("releasing agent '%s' failed", run.reservation.agent)
            return
        await self._asettle(run, streamed, raw, None)

    def _settle(self, run: _Run, streamed: int, raw: Any, response: LLMResult | None) -> None:
        """Commit the provider's usage, read once by the ledger; the estimate when there is
        none or it is malformed (a refused usage leaves the reservation held)."""
        reservation = run.reservation
        usage = raw if raw is not None else self._estimate_usage(run, streamed, response)
        try:
            try:
                overdraft = self.manager.commit(reservation, usage, estimated=raw is None)
            except InvalidTokenCountError:
                if raw is None:
                    raise
                _log_malformed(reservation.agent, raw)
                usage = self._estimate_usage(run, streamed, response)
                overdraft = self.manager.commit(reservation, usage, estimated=True)
        except TBCError:
            logger.exception("settling agent '%s' failed", reservation.agent)
            return
        if overdraft:
            _warn_overdraft(reservation.agent, overdraft, parse_usage(usage).total_tokens)

    async def _asettle(
        self, run: _Run, streamed: int, raw: Any, response: LLMResult | None
    ) -> None:
        """Async :meth:`_settle`."""
        reservation = run.reservation
        usage = raw if raw is not None else self._estimate_usage(run, streamed, response)
        try:
            try:
                overdraft = await self.manager.acommit(reservation, usage, estimated=raw is None)
            except InvalidTokenCountError:
                if raw is None:
                    raise
                _log_malformed(reservation.agent, raw)
                usage = self._estimate_usage(run, streamed, response)
                overdraft = await self.manager.acommit(reservation, usage, estimated=True)
        except TBCError:
            logger.exception("settling agent '%s' failed", reservation.agent)
            return
        if overdraft:
            _warn_overdraft(reservation.agent, overdraft, parse_usage(usage).total_tokens)

    @staticmethod
    def _estimate_usage(run: _Run, streamed: int, response: LLMResult | None) -> Usage:
        """What the call is taken to have used when the provider says nothing (usable):
        the input held, and the output streamed or counted in the reply."""
        out = streamed or run.counter.count(_generated_text(response))
        return Usage(run.reservation.input_tokens, out)

    @contextmanager
    def scope(self) -> Iterator[BudgetCallbackHandler]:
        """Install this handler for every LangChain call inside the block.

        Example:
            >>> from langchain_core.language_models import FakeListChatModel
            >>> from tbc_integrations import BudgetManager
            >>> m = BudgetManager(); _ = m.register_agent("a", max_tokens=100)
            >>> handler = BudgetCallbackHandler(m, agent="a", default_max_tokens=10)
            >>> with handler.scope():
            ...     _ = FakeListChatModel(responses=["done"]).invoke("go")
            >>> m.status()["a"].consumed > 0
            True
        """
        token = _scope_handler.set(self)
        with self._scopes_lock:
            self._scopes += 1
        try:
            yield self
        finally:
            _scope_handler.reset(token)
            with self._scopes_lock:
                self._scopes -= 1

    @property
    def open_runs(self) -> int:
        """Calls this handler's ledger holds reservations for right now."""
        return len(self._runs)


_scope_handler: ContextVar[BudgetCallbackHandler | None] = ContextVar(
    "tbc_budget_handler", default=None
)
register_configure_hook(_scope_handler, inheritable=True)


def call_scope(ledger: Ledger, metadata: Mapping[str, Any] | None) -> dict[str, str] | None:
    """A call's scope for ``ledger``'s limits, from its run metadata.

    ``metadata["tbc_scope"]``, with LangGraph's ``thread_id`` as the ``run`` and its
    ``user_id`` as the ``user`` when the scope does not name them (an enclosing
    ``manager.scope(...)`` adds its keys). ``None`` when the ledger has no limits and
    one team (no ``team_per``).

    Example:
        >>> from tbc_integrations import BudgetManager, Limit
        >>> m = BudgetManager(limits=[Limit("run", max_tokens=10)])
        >>> call_scope(m, {"thread_id": "t-1", "tbc_scope": {"user": "u"}})
        {'user': 'u', 'run': 't-1'}
    """
    if not getattr(ledger, "limits", ()) and getattr(ledger, "team_per", None) is None:
        return None
    meta = metadata or _EMPTY
    given = meta.get(SCOPE_METADATA_KEY)
    scope = {str(k): str(v) for k, v in given.items()} if isinstance(given, Mapping) else {}
    for key, source in (("run", "thread_id"), ("user", "user_id")):
        value = meta.get(source)
        if key not in scope and value is not None:
            scope[key] = str(value)
    return scope


@contextmanager
def budget_scope(
    manager: Ledger,
    agent: str | None = None,
    **kwargs: Any,
) -> Iterator[BudgetCallbackHandler]:
    """Install a :class:`BudgetCallbackHandler` for every LangChain call in the block.

    Reaches calls in LangGraph's worker threads and asyncio tasks started
    inside the block. Keyword arguments go to the handler.

    Example:
        >>> from langchain_core.language_models import FakeListChatModel
        >>> from tbc_integrations import BudgetManager
        >>> m = BudgetManager(); _ = m.register_agent("a", max_tokens=100)
        >>> with budget_scope(m, default_agent="a", default_max_tokens=10):
        ...     _ = FakeListChatModel(responses=["done"]).invoke("go")
        >>> m.status()["a"].consumed > 0
        True
    """
    with BudgetCallbackHandler(manager, agent, **kwargs).scope() as handler:
        yield handler
