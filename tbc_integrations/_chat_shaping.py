"""The chat-model calls a governed LangGraph node makes, shaped by its agent's ladder.

A node calls its own model (``llm.invoke(...)``, ``llm.stream(...)``, through
``bind_tools`` or ``with_structured_output`` too). A callback handler sees that
call but cannot change it: LangChain passes handlers copies of the request, and
its maintainers keep callbacks from changing prompts (langchain-ai/langchain
#8725, #8900). ``configurable_fields`` changes a model's fields at run time only
when the user built the model with them. So, for governed nodes only, the four
entry points of every chat model (``BaseChatModel.invoke``, ``ainvoke``,
``stream``, ``astream``; ``batch`` goes through ``invoke``) are interposed once:
inside a governed node (a context variable the node wrapper sets, so every other
call passes straight through) the call is planned by the agent's
:class:`~tbc_integrations._degrade.Ladder`: ``max_tokens`` lowered to the output
cap, a cheaper model swapped in, a wrap-up instruction added to the prompt, and
after a refusal the next step taken and the call made again. Each step is a
``Degraded`` event. A call made inside an inner governed scope (a
``BudgetMiddleware`` agent, a governed subgraph) is shaped by that scope alone.

The interposition relies on LangChain's public method names and signatures only;
``tests/plugins/test_node_degrade.py`` fails loudly when a LangChain upgrade moves
them (or a provider's model overrides them).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import replace
from typing import Any

from ._contracts import BudgetContract, Degrade
from ._degrade import DEFAULT_OUTPUT_TOKENS, Call, Ladder, Plan, Taken
from ._errors import BudgetExceededError, MissingDependencyError
from ._ledger import Ledger
from ._records import AgentStatus
from .tokens import TokenCounter

try:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import (
        BaseMessage,
        HumanMessage,
        SystemMessage,
        convert_to_messages,
    )
    from langchain_core.prompt_values import PromptValue
    from langchain_core.runnables.config import ensure_config

    from .langchain import BudgetCallbackHandler, _scope_handler, call_scope
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError(
        "tbc_integrations.langgraph needs langgraph and langchain: "
        "pip install 'tbc-integrations[langgraph]'"
    ) from exc

__all__ = [
    "SHAPED_METHODS",
    "NodeShaper",
    "chat_model",
    "install",
    "ladder_of",
    "model_name",
    "shaping",
]

logger = logging.getLogger("tbc_integrations.langgraph")

SHAPED_METHODS = ("invoke", "ainvoke", "stream", "astream")
"""The chat-model methods a governed node's calls are shaped in."""

_MARK = "__tbc_shaped__"
_shaper: ContextVar[NodeShaper | None] = ContextVar("tbc_node_shaper", default=None)
_inside: ContextVar[bool] = ContextVar("tbc_shaped_call", default=False)
_originals: dict[str, Callable[..., Any]] = {}
_install_lock = threading.Lock()
_installed = False


def model_name(model: Any) -> str | None:
    """A chat model's name (``model_name`` or ``model``), as LangChain's models keep it."""
    for attr in ("model_name", "model"):
        name = getattr(model, attr, None)
        if isinstance(name, str):
            return name
    return None


def chat_model(models: dict[str, Any], name: str) -> Any:
    """The chat model a ladder's ``model`` step names: from ``models``, else made (once)
    with LangChain's ``init_chat_model``."""
    model = models.get(name)
    if model is None:
        from langchain.chat_models import init_chat_model

        model = models.setdefault(name, init_chat_model(name))
    return model


def ladder_of(
    contract: BudgetContract | None, manager: Ledger, handler_options: Mapping[str, Any]
) -> Ladder:
    """An agent's ladder, priced by the manager's price table at the handler's default
    output (what a call without ``max_tokens`` reserves)."""
    steps: Iterable[Degrade] = () if contract is None else contract.degrade  # type: ignore[assignment]
    default = handler_options.get("default_max_tokens")
    return Ladder(
        steps,
        prices=getattr(manager, "prices", None),
        default_output_tokens=default if isinstance(default, int) else DEFAULT_OUTPUT_TOKENS,
    )


def _messages(model_input: Any) -> list[BaseMessage]:
    if isinstance(model_input, PromptValue):
        return model_input.to_messages()
    if isinstance(model_input, str):
        return [HumanMessage(model_input)]
    return convert_to_messages(model_input)


def with_wrap_up(messages: Sequence[BaseMessage], texts: Sequence[str]) -> list[BaseMessage]:
    """The prompt with wrap-up instructions added to its system message (a new one first
    when it has none).

    Example:
        >>> [m.content for m in with_wrap_up([HumanMessage("write")], ["Finish now."])]
        ['Finish now.', 'write']
    """
    text = "\n\n".join(texts)
    first = messages[0] if messages else None
    if isinstance(first, SystemMessage):
        content = first.content
        if isinstance(content, str):
            merged: Any = f"{content}\n\n{text}"
        else:
            merged = [*content, {"type": "text", "text": text}]
        return [SystemMessage(merged), *messages[1:]]
    return [SystemMessage(text), *messages]


def _asked(model: Any, kwargs: Mapping[str, Any]) -> int | None:
    for value in (
        kwargs.get("max_tokens"),
        kwargs.get("max_completion_tokens"),
        getattr(model, "max_tokens", None),
    ):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class NodeShaper:
    """Shapes the chat-model calls a governed node makes for one agent."""

    def __init__(
        self,
        manager: Ledger,
        agent: str,
        handler: BudgetCallbackHandler,
        models: dict[str, Any],
        handler_options: Mapping[str, Any],
    ) -> None:
        self.manager = manager
        self.agent = agent
        self.handler = handler
        self.models = models
        self.handler_options = handler_options
        self._ladder: Ladder | None = None
        self._capped = False
        self._read = False
        self._counter = TokenCounter()

    def _scope(self) -> dict[str, str] | None:
        """The governed node's scope (its run, its user), from the config it runs under."""
        return call_scope(self.manager, ensure_config().get("metadata"))

    def status(self) -> AgentStatus | None:
        """The agent's numbers in the team this call works in (its run's, per run)."""
        return self.manager.call_status(self.agent, self._scope())

    async def astatus(self) -> AgentStatus | None:
        """Async :meth:`status`."""
        return await self.manager.acall_status(self.agent, self._scope())

    def _set_ladder(self, contracts: Mapping[str, BudgetContract]) -> None:
        contract = contracts.get(self.agent)
        self._ladder = ladder_of(contract, self.manager, self.handler_options)
        self._capped = contract is not None and contract.max_output_tokens is not None
        self._read = True

    def ladder(self) -> Ladder | None:
        """The agent's ladder, or ``None`` when its calls need no shaping (no steps and
        no output cap). Contracts never change once registered: read once."""
        if not self._read:
            self._set_ladder(self.manager.contracts)
        return self._ladder if (self._ladder or self._capped) else None

    async def aladder(self) -> Ladder | None:
        """:meth:`ladder`, reading the contracts off the event loop."""
        if not self._read:
            self._set_ladder(await self.manager.acontracts())
        return self._ladder if (self._ladder or self._capped) else None

    def plan(
        self,
        ladder: Ladder,
        model: Any,
        model_input: Any,
        kwargs: Mapping[str, Any],
        status: AgentStatus | None,
    ) -> tuple[Call, Plan]:
        """The call as asked, and the plan for it (its events delivered)."""
        call = Call(model_name(model), _asked(model, kwargs))
        if ladder.priced(status):
            counted = self._counter.count_messages(_messages(model_input))
            call = replace(call, input_tokens=counted)
        plan = ladder.plan(call, status)
        self.report(plan.taken)
        return call, plan

    def report(self, taken: Iterable[Taken]) -> None:
        """A ``Degraded`` event for each step taken."""
        for step in taken:
            self.manager.note_degraded(self.agent, step.step.name, step.why)

    def shape(
        self, model: Any, model_input: Any, kwargs: Mapping[str, Any], was: Call, now: Call
    ) -> tuple[Any, Any, dict[str, Any]]:
        """The model, input and keyword arguments of the call made as ``now`` says (the
        node asked ``was``)."""
        target = model
        if now.model is not None and now.model != was.model:
            target = chat_model(self.models, now.model)
        out = dict(kwargs)
        if now.max_tokens is not None and (now.max_tokens != was.max_tokens or target is not model):
            out.pop("max_completion_tokens", None)
            out["max_tokens"] = now.max_tokens
        if now.wrap_up:
            model_input = with_wrap_up(_messages(model_input), now.wrap_up)
        return target, model_input, out


def _active() -> NodeShaper | None:
    """The shaper of the governed node this call is made in, unless an inner governed
    scope owns the call or the call is the shaped call itself."""
    if _inside.get():
        return None
    shaper = _shaper.get()
    if shaper is None or _scope_handler.get() is not shaper.handler:
        return None
    return shaper


class shaping:
    """Shape the chat-model calls made inside the block for ``shaper``'s agent."""

    def __init__(self, shaper: NodeShaper) -> None:
        self.shaper = shaper

    def __enter__(self) -> NodeShaper:
        self._token = _shaper.set(self.shaper)
        return self.shaper

    def __exit__(self, *exc: object) -> None:
        _shaper.reset(self._token)


def _after(shaper: NodeShaper, ladder: Ladder, plan: Plan, err: BudgetExceededError) -> Plan:
    after = ladder.after_refusal(plan, err.reason)
    if after is None:
        raise err
    shaper.report(after.taken[-1:])
    return after


def _invoke(self: Any, input: Any, config: Any = None, *, stop: Any = None, **kwargs: Any) -> Any:
    original = _originals["invoke"]
    shaper = _active()
    ladder = None if shaper is None else shaper.ladder()
    if shaper is None or ladder is None:
        return original(self, input, config, stop=stop, **kwargs)
    status = shaper.status()
    was, plan = shaper.plan(ladder, self, input, kwargs, status)
    while True:
        model, model_input, kw = shaper.shape(self, input, kwargs, was, plan.call)
        token = _inside.set(True)
        try:
            return original(model, model_input, config, stop=stop, **kw)
        except BudgetExceededError as err:
            plan = _after(shaper, ladder, plan, err)
        finally:
            _inside.reset(token)


async def _ainvoke(
    self: Any, input: Any, config: Any = None, *, stop: Any = None, **kwargs: Any
) -> Any:
    original = _originals["ainvoke"]
    shaper = _active()
    ladder = None if shaper is None else await shaper.aladder()
    if shaper is None or ladder is None:
        return await original(self, input, config, stop=stop, **kwargs)
    status = await shaper.astatus()
    was, plan = shaper.plan(ladder, self, input, kwargs, status)
    while True:
        model, model_input, kw = shaper.shape(self, input, kwargs, was, plan.call)
        token = _inside.set(True)
        try:
            return await original(model, model_input, config, stop=stop, **kw)
        except BudgetExceededError as err:
            plan = _after(shaper, ladder, plan, err)
        finally:
            _inside.reset(token)


def _stream(
    self: Any, input: Any, config: Any = None, *, stop: Any = None, **kwargs: Any
) -> Iterator[Any]:
    original = _originals["stream"]
    shaper = _active()
    ladder = None if shaper is None else shaper.ladder()
    if shaper is None or ladder is None:
        yield from original(self, input, config, stop=stop, **kwargs)
        return
    status = shaper.status()
    was, plan = shaper.plan(ladder, self, input, kwargs, status)
    while True:
        model, model_input, kw = shaper.shape(self, input, kwargs, was, plan.call)
        chunks = original(model, model_input, config, stop=stop, **kw)
        token = _inside.set(True)
        try:  # a refusal comes before the first chunk; after it, the stream is the call's
            first = next(chunks)
            break
        except StopIteration:
            return
        except BudgetExceededError as err:
            plan = _after(shaper, ladder, plan, err)
        finally:
            _inside.reset(token)
    yield first
    yield from chunks


async def _astream(
    self: Any, input: Any, config: Any = None, *, stop: Any = None, **kwargs: Any
) -> AsyncIterator[Any]:
    original = _originals["astream"]
    shaper = _active()
    ladder = None if shaper is None else await shaper.aladder()
    if shaper is None or ladder is None:
        async for chunk in original(self, input, config, stop=stop, **kwargs):
            yield chunk
        return
    status = await shaper.astatus()
    was, plan = shaper.plan(ladder, self, input, kwargs, status)
    while True:
        model, model_input, kw = shaper.shape(self, input, kwargs, was, plan.call)
        chunks = original(model, model_input, config, stop=stop, **kw)
        token = _inside.set(True)
        try:
            first = await chunks.__anext__()
            break
        except StopAsyncIteration:
            return
        except BudgetExceededError as err:
            plan = _after(shaper, ladder, plan, err)
        finally:
            _inside.reset(token)
    yield first
    async for chunk in chunks:
        yield chunk


_WRAPPERS: dict[str, Callable[..., Any]] = {
    "invoke": _invoke,
    "ainvoke": _ainvoke,
    "stream": _stream,
    "astream": _astream,
}


def install() -> None:
    """Interpose on ``BaseChatModel``'s four entry points (once; idempotent). Calls made
    outside a governed node pass straight through."""
    global _installed
    if _installed:
        return
    with _install_lock:
        if _installed:
            return
        for name in SHAPED_METHODS:
            original = getattr(BaseChatModel, name)
            wrapper = functools.wraps(original)(_WRAPPERS[name])
            setattr(wrapper, _MARK, True)
            _originals[name] = original
            setattr(BaseChatModel, name, wrapper)
        _installed = True
