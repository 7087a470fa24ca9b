"""LangChain plugin: a callback handler that budgets every chat-model and LLM call.

Attach :class:`BudgetCallbackHandler` to any runnable (``config={"callbacks":
[handler]}``, ``.with_config(...)``), or install it for a whole block with
:func:`budget_scope`. Before a call it reserves the estimated input plus the
request's ``max_tokens``; a refusal raises :class:`~tbc_integrations.BudgetExceededError`
before the provider is called. While streaming it counts output and cuts the
stream at the reservation. After the call it commits the provider's real usage.

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

import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, NamedTuple
from uuid import UUID

from tbc_integrations._engine import EXPIRED_MEMORY_SECONDS
from tbc_integrations._errors import MissingDependencyError, TBCError, UnknownAgentError
from tbc_integrations._ledger import Ledger
from tbc_integrations._records import Reservation
from tbc_integrations._usage import Usage
from tbc_integrations.tokens import TokenCounter

try:
    from langchain_core.callbacks import BaseCallbackHandler
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
    "BudgetCallbackHandler",
    "budget_scope",
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

_EMPTY: Mapping[str, Any] = {}

AGENT_METADATA_KEY = "tbc_agent"
"""Metadata key that names a call's agent: ``config={"metadata": {"tbc_agent": ...}}``."""

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


def _warn_overdraft(agent: str, overdraft: int, used: int) -> None:
    logger.warning(
        "Agent '%s' is overdrawn by %d tokens after a call used %d", agent, overdraft, used
    )


def _generated_text(response: LLMResult | None) -> str:
    if response is None:
        return ""
    return "".join(g.text for gens in response.generations for g in gens)


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
        self.manager = manager
        self.agent = agent
        self.default_agent = default_agent
        self.default_max_tokens = default_max_tokens
        self.confidence_fn = confidence_fn
        self.lease_seconds = lease_seconds
        self.cut_streams = cut_streams
        self._runs, self._streamed = _runs_for(manager)
        self._known: frozenset[str] = frozenset()
        self._not_agents: dict[str, float] = {}
        self._counters: dict[str | None, TokenCounter] = {}
        self._forget_at = _FEW_RUNS

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

    def _counter(self, model: str | None) -> TokenCounter:
        counter = self._counters.get(model)
        if counter is None:
            counter = self._counters.setdefault(model, TokenCounter(model))
        return counter

    # ------------------------------------------------------------------ start
    def _start(
        self,
        run_id: UUID,
        metadata: Mapping[str, Any] | None,
        invocation_params: Mapping[str, Any] | None,
        chats: list[list[BaseMessage]] | None,
        prompts: list[str] | None,
    ) -> None:
        key = run_id.int
        if key in self._runs:
            return  # another handler on this ledger already reserved for this call
        agent = self.agent if self.agent is not None else self.resolve_agent(metadata)
        meta = metadata or _EMPTY
        params = invocation_params or _EMPTY
        model = meta.get("ls_model_name") or params.get("model") or params.get("model_name")
        counter = self._counters.get(model) or self._counter(
            model if isinstance(model, str) else None
        )
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
        reservation = self.manager.reserve(
            agent, inp, out, lease_seconds=self.lease_seconds, clamp_output=True
        )
        # tuple.__new__ directly: the NamedTuple's own __new__ is a Python-level call
        self._runs[key] = tuple.__new__(_Run, (reservation, counter, self))
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
        before = self._streamed.get(key, 0)
        if isinstance(token, str):
            self._streamed[key] = before + run.counter.count(token)
        else:
            self._streamed[key] = before + run.counter.count_content(token)
        reserved_out = run.reservation.output_tokens
        if self.cut_streams and before >= reserved_out:
            from tbc_integrations._errors import BudgetExceededError

            raise BudgetExceededError(
                run.reservation.agent,
                self._streamed[key],
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
        streamed = self._streamed.pop(key, 0) if self._streamed else 0
        raw, message = _usage_from(response)
        self._settle(run, streamed, raw, response)
        if self.confidence_fn is not None and message is not None:
            try:
                confidence = self.confidence_fn(message)
                if confidence is not None:
                    self.manager.record_confidence(run.reservation.agent, confidence)
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
        """Release the reservation, or settle what a broken stream already produced."""
        key = run_id.int
        run = self._runs.pop(key, None)
        if run is None:
            return
        streamed = self._streamed.pop(key, 0)
        raw, _ = _usage_from(response)
        if raw is None and streamed == 0:
            try:
                self.manager.release(run.reservation)
            except TBCError:
                logger.exception("releasing agent '%s' failed", run.reservation.agent)
            return
        self._settle(run, streamed, raw, None)

    def _settle(self, run: _Run, streamed: int, raw: Any, response: LLMResult | None) -> None:
        reservation = run.reservation
        agent = reservation.agent
        estimated = raw is None
        usage: Usage | None = None
        if raw is not None:
            try:
                usage = Usage.parse(raw, agent=agent)
            except TBCError:
                logger.error(
                    "Agent '%s': malformed provider usage %r; settling the estimate instead",
                    agent,
                    raw,
                )
                estimated = True
        if usage is None:
            out = streamed or run.counter.count(_generated_text(response))
            usage = Usage(reservation.input_tokens, out)
        try:
            overdraft = self.manager.commit(reservation, usage, estimated=estimated)
        except TBCError:
            logger.exception("settling agent '%s' failed", agent)
            return
        if overdraft:
            _warn_overdraft(agent, overdraft, usage.total_tokens)

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
        try:
            yield self
        finally:
            _scope_handler.reset(token)

    @property
    def open_runs(self) -> int:
        """Calls this handler's ledger holds reservations for right now."""
        return len(self._runs)


_scope_handler: ContextVar[BudgetCallbackHandler | None] = ContextVar(
    "tbc_budget_handler", default=None
)
register_configure_hook(_scope_handler, inheritable=True)


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
