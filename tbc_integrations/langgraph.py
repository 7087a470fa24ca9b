"""LangGraph plugin: graph nodes as agents under contracts.

:func:`budgeted_node` wraps one node; :func:`govern_graph` wraps every node of a
``StateGraph`` builder before ``compile()``. LLM calls made inside a node,
however deep, are metered against the node's agent by the LangChain handler
(installed for the node's duration, not re-implemented), and a node whose agent
is gated or cannot afford a minimum call is refused before it starts. When a
budget runs out a node can raise (the default), be skipped, or hand over to
``END`` or a fallback node through LangGraph's ``error_handler``.
:class:`BudgetMiddleware` does the same for ``langchain.agents.create_agent``.

Example:
    >>> from typing_extensions import TypedDict
    >>> from langgraph.graph import StateGraph, START, END
    >>> from tbc_integrations import BudgetManager
    >>> from tbc_integrations.langgraph import govern_graph
    >>> from tbc_integrations.testing import UsageFakeChat
    >>> class S(TypedDict):
    ...     text: str
    >>> def writer(state: S) -> dict[str, str]:
    ...     return {"text": UsageFakeChat(reply="a draft").invoke(state["text"]).content}
    >>> m = BudgetManager(); _ = m.register_agent("writer", max_tokens=2_000)
    >>> builder = StateGraph(S).add_node("writer", writer)
    >>> _ = builder.add_edge(START, "writer").add_edge("writer", END)
    >>> graph = govern_graph(builder, m, default_max_tokens=64).compile()
    >>> graph.invoke({"text": "write"})["text"]
    'a draft'
    >>> m.status()["writer"].consumed > 0
    True
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any, Protocol, TypeVar, cast, overload

from tbc_integrations._contracts import BudgetContract
from tbc_integrations._degrade import Call, Ladder, Plan, Taken
from tbc_integrations._errors import (
    BudgetExceededError,
    ContractError,
    MissingDependencyError,
)
from tbc_integrations._ledger import Ledger
from tbc_integrations._records import AgentStatus
from tbc_integrations._validate import MAX_TOKENS
from tbc_integrations.tokens import TokenCounter

try:
    from langchain.agents.middleware import AgentMiddleware, ModelRequest, hook_config
    from langchain_core.messages import AIMessage, SystemMessage
    from langchain_core.runnables import Runnable, RunnableConfig, RunnableLambda
    from langchain_core.runnables.config import (
        ensure_config,
        var_child_runnable_config,
    )
    from langgraph.constants import END
    from langgraph.errors import NodeError
    from langgraph.graph import StateGraph
    from langgraph.pregel import Pregel
    from langgraph.types import Command

    from tbc_integrations._chat_shaping import (
        NodeShaper,
        chat_model,
        install,
        ladder_of,
        model_name,
        shaping,
    )
    from tbc_integrations.langchain import (
        AGENT_METADATA_KEY,
        SCOPE_METADATA_KEY,
        BudgetCallbackHandler,
        budget_scope,
        call_scope,
    )
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError(
        "tbc_integrations.langgraph needs langgraph and langchain: "
        "pip install 'tbc-integrations[langgraph]'"
    ) from exc

__all__ = ["BudgetMiddleware", "budgeted_node", "govern_graph"]

F = TypeVar("F", bound=Callable[..., Any])
ConfidenceKey = str | Callable[[Any], "float | None"]
_LOCAL_MODES = ("raise", "skip")


def _check_options(where: str, min_call_tokens: Any, handler_options: Mapping[str, Any]) -> None:
    """Refuse a bad ``min_call_tokens`` or an option the callback handler does not take,
    when the node or middleware is made rather than at its first model call.

    Example:
        >>> try:
        ...     _check_options("govern_graph", 16, {"default_max_token": 50})
        ... except ContractError as exc:
        ...     print(str(exc).split(" (")[0])
        govern_graph: unknown option(s) ['default_max_token']
    """
    m = min_call_tokens
    if isinstance(m, bool) or not isinstance(m, int) or not 0 <= m <= MAX_TOKENS:
        raise ContractError(
            f"{where}: min_call_tokens must be an integer from 0 to {MAX_TOKENS}, got {m!r}"
        )
    takes = [
        name
        for name, p in inspect.signature(BudgetCallbackHandler.__init__).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    unknown = sorted(str(k) for k in handler_options if k not in takes)
    if unknown:
        raise ContractError(
            f"{where}: unknown option(s) {unknown} (the callback handler takes {takes})"
        )


_GOVERNED = "_tbc_governed_by"

logger = logging.getLogger("tbc_integrations.langgraph")


def _node_of(config: RunnableConfig) -> str | None:
    node = (config.get("metadata") or {}).get("langgraph_node")
    return node if isinstance(node, str) else None


def _update_dict(update: Any) -> Mapping[str, Any] | None:
    if isinstance(update, Mapping):
        return update
    if isinstance(update, Command) and isinstance(update.update, Mapping):
        return update.update
    return None


class _NodeBudget:
    """What a governed node does around its body (shared by sync and async forms)."""

    def __init__(
        self,
        manager: Ledger,
        agent: str | None,
        mode: str,
        confidence: ConfidenceKey | None,
        complete_after: bool,
        min_call_tokens: int,
        handler_options: Mapping[str, Any],
        models: dict[str, Any] | None = None,
    ) -> None:
        self.manager = manager
        self.agent = agent
        self.models = {} if models is None else models  # shared by a graph's nodes
        self._shapers: dict[str, NodeShaper] = {}
        install()  # the node's chat-model calls are shaped by its agent's ladder
        self.mode = mode
        self.confidence = confidence
        self.complete_after = complete_after
        self.min_call_tokens = min_call_tokens
        self.handler_options = dict(handler_options)
        self._handlers: dict[str, BudgetCallbackHandler] = {}
        # nodes whose update has held the confidence key, or that were warned it did not
        self._key_seen: set[str] = set()
        self._key_warned: set[str] = set()
        self._key_lock = threading.Lock()

    def handler(self, agent: str) -> BudgetCallbackHandler:
        """The handler that meters this node's calls (one per agent, reused across steps)."""
        handler = self._handlers.get(agent)
        if handler is None:
            handler = self._handlers.setdefault(
                agent, BudgetCallbackHandler(self.manager, agent, **self.handler_options)
            )
        return handler

    def shaper(self, agent: str) -> NodeShaper:
        """What shapes this node's chat-model calls for ``agent`` (output cap, ladder)."""
        shaper = self._shapers.get(agent)
        if shaper is None:
            shaper = self._shapers.setdefault(
                agent,
                NodeShaper(
                    self.manager, agent, self.handler(agent), self.models, self.handler_options
                ),
            )
        return shaper

    def agent_for(self, config: RunnableConfig) -> str:
        if self.agent is not None:
            return self.agent
        node = _node_of(config)
        if node is None:
            raise ContractError(
                "budgeted_node without an agent name must run as a LangGraph node "
                "(no 'langgraph_node' in its config metadata)"
            )
        return node

    def admit(self, agent: str, config: RunnableConfig) -> None:
        """Refuse the node before it starts (gated, or no room for a minimum call)."""
        self.manager.check(
            agent, 0, self.min_call_tokens, scope=_config_scope(self.manager, config)
        )

    def child_config(self, config: RunnableConfig, agent: str) -> RunnableConfig:
        metadata = {**(config.get("metadata") or {}), AGENT_METADATA_KEY: agent}
        scope = _config_scope(self.manager, config)
        if scope:
            metadata[SCOPE_METADATA_KEY] = scope  # the node's calls carry the run's scope
        return cast(RunnableConfig, {**config, "metadata": metadata})

    async def aadmit(self, agent: str, config: RunnableConfig) -> None:
        """:meth:`admit`, off the event loop when the store waits on I/O."""
        scope = _config_scope(self.manager, config)
        await self.manager.acheck(agent, 0, self.min_call_tokens, scope=scope)

    def confidence_of(self, update: Any, node: str) -> Any:
        if callable(self.confidence):
            return self.confidence(update)
        if isinstance(self.confidence, str):
            fields = _update_dict(update)
            if fields is not None and self.confidence in fields:
                if node not in self._key_seen:
                    with self._key_lock:
                        self._key_seen.add(node)
                return fields[self.confidence]
            self._missing_key(node, fields)
        return None

    def _missing_key(self, node: str, fields: Mapping[str, Any] | None) -> None:
        """Warn once per node whose updates have not held the confidence key so far."""
        with self._key_lock:
            if node in self._key_seen or node in self._key_warned:
                return
            self._key_warned.add(node)
        keys = "no update" if fields is None else f"keys {sorted(map(str, fields))}"
        logger.warning(
            "node '%s' (agent '%s'): confidence_key '%s' is not in its update (%s); "
            "its agent's confidence gate is not fed",
            node,
            self.agent or node,
            self.confidence,
            keys,
        )

    def record(self, agent: str, conf: Any, config: RunnableConfig | None = None) -> None:
        scope = None if config is None else _config_scope(self.manager, config)
        if conf is not None:
            self.manager.record_confidence(agent, conf, scope=scope)
        if self.complete_after:
            self.manager.complete(agent, scope=scope)

    def finish(self, agent: str, update: Any, node: str, config: RunnableConfig) -> None:
        self.record(agent, self.confidence_of(update, node), config)

    async def afinish(self, agent: str, update: Any, node: str, config: RunnableConfig) -> None:
        """:meth:`finish` through the ledger's async verbs."""
        conf = self.confidence_of(update, node)  # the user's function runs on the loop
        scope = _config_scope(self.manager, config)
        if conf is not None:
            await self.manager.arecord_confidence(agent, conf, scope=scope)
        if self.complete_after:
            await self.manager.acomplete(agent, scope=scope)


def _config_scope(manager: Ledger, config: RunnableConfig) -> dict[str, str] | None:
    """A node's scope for the ledger's limits: its metadata's, with the run's
    ``configurable`` ``thread_id`` (the run) and ``user_id`` (the user)."""
    configurable = config.get("configurable") or {}
    found: dict[str, Any] = {
        k: configurable[k] for k in ("thread_id", "user_id") if k in configurable
    }
    return call_scope(manager, {**found, **(config.get("metadata") or {})})


def _with_config_param(fn: Callable[..., Any]) -> tuple[inspect.Signature, bool]:
    """The node's signature plus a ``config`` parameter, so LangGraph passes us its config."""
    sig = inspect.signature(fn)
    if "config" in sig.parameters:
        return sig, True
    params = list(sig.parameters.values())
    extra = inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RunnableConfig
    )
    if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD:
        params.insert(len(params) - 1, extra)
    else:
        params.append(extra)
    return sig.replace(parameters=params), False


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - callable objects with async __call__
    )


def _wrap_callable(fn: Callable[..., Any], budget: _NodeBudget) -> Callable[..., Any]:
    sig, node_wants_config = _with_config_param(fn)

    def split(kwargs: dict[str, Any]) -> RunnableConfig:
        config = kwargs.get("config") if node_wants_config else kwargs.pop("config", None)
        if config is None:  # called outside a graph: read the ambient config
            return ensure_config()
        return cast(RunnableConfig, config)

    @contextlib.contextmanager
    def governed(agent: str, config: RunnableConfig, kwargs: dict[str, Any]) -> Iterator[None]:
        """Run the node with its child config and handler in place (once admitted)."""
        child = budget.child_config(config, agent)
        if node_wants_config:
            kwargs["config"] = child
        token = var_child_runnable_config.set(child)
        try:
            with budget.handler(agent).scope(), shaping(budget.shaper(agent)):
                yield
        finally:
            var_child_runnable_config.reset(token)

    if _is_async(fn):
        afn = cast(Callable[..., Awaitable[Any]], fn)

        async def anode(*args: Any, **kwargs: Any) -> Any:
            config = split(kwargs)
            agent = budget.agent_for(config)
            try:
                await budget.aadmit(agent, config)
                with governed(agent, config, kwargs):
                    update = await afn(*args, **kwargs)
            except BudgetExceededError:
                if budget.mode == "skip":
                    return None
                raise
            await budget.afinish(agent, update, _node_of(config) or agent, config)
            return update

        wrapper: Callable[..., Any] = anode
    else:

        def node(*args: Any, **kwargs: Any) -> Any:
            config = split(kwargs)
            agent = budget.agent_for(config)
            try:
                budget.admit(agent, config)
                with governed(agent, config, kwargs):
                    update = fn(*args, **kwargs)
            except BudgetExceededError:
                if budget.mode == "skip":
                    return None
                raise
            budget.finish(agent, update, _node_of(config) or agent, config)
            return update

        wrapper = node
    functools.update_wrapper(wrapper, fn)
    del wrapper.__wrapped__  # type: ignore[attr-defined]  # LangGraph must read *our* signature
    wrapper.__signature__ = sig  # type: ignore[attr-defined]
    return wrapper


class _NodeDecorator(Protocol):
    """What :func:`budgeted_node` returns: a function stays a function, a Runnable a Runnable."""

    @overload
    def __call__(self, fn: F, /) -> F: ...
    @overload
    def __call__(self, fn: Runnable[Any, Any], /) -> Runnable[Any, Any]: ...


def budgeted_node(
    manager: Ledger,
    agent: str | None = None,
    *,
    on_exhausted: str = "raise",
    confidence_key: ConfidenceKey | None = None,
    complete_after: bool = False,
    min_call_tokens: int = 16,
    models: Mapping[str, Any] | None = None,
    **handler_options: Any,
) -> _NodeDecorator:
    """Make a LangGraph node an agent under a contract (decorator or function form).

    A node function keeps its signature (LangGraph still injects ``config``,
    ``store``, ``runtime``...); a Runnable such as a compiled subgraph becomes one
    agent for all of its calls.

    Args:
        manager: The budget manager.
        agent: The node's agent; the node's name in the graph when omitted.
        on_exhausted: ``"raise"`` (the exception reaches ``invoke`` unchanged and
            is not retried by the default retry policy) or ``"skip"`` (no state
            update; the graph goes on along the node's out-edges). Routing to
            ``END`` or a fallback node needs :func:`govern_graph`.
        confidence_key: Key of the node's update holding a confidence in [0, 1],
            or a function of the update returning one (or ``None``); it feeds the
            agent's gate. A key the node's update does not hold is logged once
            per node (warning, logger ``tbc_integrations.langgraph``).
        complete_after: Mark the agent complete when the node finishes, so its
            leftover budget is spare for the rest of the graph.
        min_call_tokens: A node is refused before it starts unless its agent
            could reserve this many tokens.
        models: Chat models by name, for the ``model`` steps of the agent's
            degradation ladder; a name not here is made with ``init_chat_model``.
        handler_options: Passed to the LangChain handler (``default_max_tokens``,
            ``confidence_fn``, ``lease_seconds``, ...).

    The node's own chat-model calls follow its agent's output cap and degradation
    ladder (see :func:`govern_graph`).

    Example:
        >>> from tbc_integrations import BudgetManager
        >>> m = BudgetManager(); _ = m.register_agent("critic", max_tokens=500)
        >>> @budgeted_node(m, "critic", on_exhausted="skip", confidence_key="score")
        ... def critic(state: dict) -> dict:
        ...     return {"score": 0.4}
        >>> critic.__name__
        'critic'
    """
    _check_options("budgeted_node", min_call_tokens, handler_options)
    if on_exhausted not in _LOCAL_MODES:
        raise ContractError(
            f"budgeted_node(on_exhausted={on_exhausted!r}): routing to END or a fallback "
            "node goes through LangGraph's error_handler, which govern_graph(...) installs; "
            "budgeted_node alone supports 'raise' and 'skip'"
        )
    budget = _NodeBudget(
        manager,
        agent,
        on_exhausted,
        confidence_key,
        complete_after,
        min_call_tokens,
        handler_options,
        dict(models or {}),
    )

    def decorate(fn: Any) -> Any:
        if isinstance(fn, Runnable):  # a compiled subgraph or a chain: one agent for all of it
            return _governed_node(fn, budget)
        if not callable(fn):
            raise ContractError(
                f"budgeted_node wraps a node function or Runnable, got {type(fn).__name__}"
            )
        return _wrap_callable(fn, budget)

    return cast(_NodeDecorator, decorate)


def _route(target: str) -> Callable[..., Any]:
    def on_budget_error(state: Any, error: NodeError) -> Command[Any]:
        if isinstance(error.error, BudgetExceededError):
            return Command(goto=target)
        raise error.error

    return on_budget_error


def _governed_node(runnable: Any, budget: _NodeBudget) -> Any:
    """The node LangGraph built, re-made under ``budget``.

    A function node is re-wrapped (keeping LangGraph's injection of ``config``,
    ``store``, ``runtime``...); any other Runnable (a compiled subgraph, a chain)
    becomes a Runnable that invokes it, with sync and async paths.
    """
    if type(runnable).__name__ == "RunnableCallable":
        func = getattr(runnable, "func", None) or getattr(runnable, "afunc", None)
        if func is not None:
            return _wrap_callable(func, budget)
    if not isinstance(runnable, Runnable):
        raise ContractError(f"cannot govern node {runnable!r}: not a callable or Runnable")
    inner = runnable

    def run(state: Any, config: RunnableConfig) -> Any:
        return inner.invoke(state, config)

    async def arun(state: Any, config: RunnableConfig) -> Any:
        return await inner.ainvoke(state, config)

    name = getattr(inner, "name", None) or "node"
    run.__name__ = arun.__name__ = name
    return RunnableLambda(_wrap_callable(run, budget), _wrap_callable(arun, budget), name=name)


def _per_node(value: Any, node: str, default: Any) -> Any:
    if isinstance(value, Mapping):
        return value.get(node, default)
    return value


def _once_per_run(builder: StateGraph[Any, Any, Any, Any]) -> set[str]:
    """Nodes no path can re-enter (a conditional edge without a path map may go anywhere)."""
    nodes = set(builder.nodes)
    succ: dict[str, set[str]] = {n: set() for n in nodes}
    for start, end in builder.edges:
        if start in succ:
            succ[start].add(end)
    for start, branches in builder.branches.items():
        for branch in branches.values():
            ends = getattr(branch, "ends", None)
            targets = set(ends.values()) if isinstance(ends, Mapping) else set(nodes)
            succ.setdefault(start, set()).update(targets)
    for name, spec in builder.nodes.items():
        ends = spec.ends
        if ends:
            succ[name].update(ends.values() if isinstance(ends, Mapping) else ends)
    for starts, end in getattr(builder, "waiting_edges", set()):
        for start in starts:
            if start in succ:
                succ[start].add(end)
    once = set()
    for node in nodes:
        seen: set[str] = set()
        stack = list(succ.get(node, ()))
        cyclic = False
        while stack:
            cur = stack.pop()
            if cur == node:
                cyclic = True
                break
            if cur in seen or cur not in succ:
                continue
            seen.add(cur)
            stack.extend(succ[cur])
        if not cyclic:
            once.add(node)
    return once


def _require_builder(builder: Any) -> None:
    """``govern_graph`` re-makes the nodes of a builder; a compiled graph is too late."""
    if isinstance(builder, StateGraph):
        return
    if isinstance(builder, Pregel):
        raise ContractError(
            f"govern_graph got a compiled graph ({type(builder).__name__}); pass the "
            "StateGraph builder before compile(): govern_graph(builder, manager, ...).compile()"
        )
    raise ContractError(
        f"govern_graph needs a langgraph StateGraph builder, got {type(builder).__name__}"
    )


def _naming(named: Mapping[str, Iterable[str]], nodes: set[str]) -> str:
    """``"agents= names ['x']; complete= names ['y']"`` for the options naming ``nodes``."""
    return "; ".join(
        f"{option}= names {sorted(str(n) for n in set(names) & nodes)}"
        for option, names in named.items()
        if set(names) & nodes
    )


def _check_node_names(
    builder: StateGraph[Any, Any, Any, Any], named: Mapping[str, Iterable[str]]
) -> None:
    """Every node an option names must be a node of ``builder``."""
    nodes = set(builder.nodes)
    strangers = {str(n) for names in named.values() for n in names} - nodes
    if strangers:
        raise ContractError(
            f"govern_graph: unknown graph node(s): {_naming(named, strangers)} "
            f"(the graph's nodes: {sorted(nodes)})"
        )


def govern_graph(
    builder: StateGraph[Any, Any, Any, Any],
    manager: Ledger,
    agents: Mapping[str, str] | None = None,
    *,
    on_exhausted: str | Mapping[str, str] = "raise",
    confidence_key: ConfidenceKey | Mapping[str, ConfidenceKey] | None = None,
    complete: bool | str | Iterable[str] = False,
    min_call_tokens: int = 16,
    models: Mapping[str, Any] | None = None,
    **handler_options: Any,
) -> StateGraph[Any, Any, Any, Any]:
    """Put every node of ``builder`` under its agent's contract, in place, before ``compile()``.

    Args:
        builder: The ``StateGraph`` builder (not yet compiled).
        manager: The budget manager; every governed node's agent needs a contract.
        agents: Node name to agent name, for nodes whose agent is not their name.
        on_exhausted: One mode for all nodes or a mapping per node: ``"raise"``,
            ``"skip"``, ``END``, or the name of a fallback node (routed through
            LangGraph's ``error_handler``, so the node's own out-edges do not fire).
        confidence_key: One key/function for all nodes, or a mapping per node.
        complete: Which agents to mark complete when their node finishes:
            ``True`` (all), ``False`` (none), an iterable of node names, or
            ``"auto"`` (nodes no path of the graph can re-enter; jumps made with
            ``Command``/``Send`` beyond declared destinations are not seen).
        min_call_tokens: Refuse a node before it starts unless this much is affordable.
        models: Chat models by name, for the ``model`` steps of the agents'
            degradation ladders (shared by the graph's nodes); a name not here is made
            with LangChain's ``init_chat_model``.
        handler_options: Passed to the LangChain handler.

    Returns:
        The same builder, for chaining.

    Raises:
        ContractError: a compiled graph instead of its builder; ``agents``,
            ``on_exhausted``, ``confidence_key`` or ``complete`` naming nodes the
            graph does not have; a node without a contract; an unknown mode or
            fallback; or routing asked for a node that already has its own error
            handler.

    A ``confidence_key`` string that a node's update does not hold is logged
    once per node (a warning on the ``tbc_integrations.langgraph`` logger): the
    gate of that node's agent is then not fed.

    A subgraph compiled as a node counts as one agent for all its calls, unless
    its own builder was governed: then its nodes are their own agents.

    The chat-model calls a node makes itself (``invoke``, ``ainvoke``, ``stream``,
    ``astream`` of any LangChain chat model) are shaped for its agent: ``max_tokens``
    lowered to what its output cap allows, and its degradation ladder
    (``BudgetContract(degrade=[...])``) taken: a cheaper model, a lower ``max_tokens``,
    a wrap-up instruction, before the call for a step whose ``below`` the agent has
    crossed, and after a refusal, before the refusal stands. Each step is a ``Degraded``
    event. A ``create_agent`` agent with :class:`BudgetMiddleware` run inside a node is
    shaped by its middleware alone.
    """
    _require_builder(builder)
    _check_options("govern_graph", min_call_tokens, handler_options)
    agents = dict(agents or {})
    known = manager.contracts
    if isinstance(complete, str):
        if complete != "auto":
            raise ContractError(f"complete must be a bool, node names or 'auto', got {complete!r}")
        completing = _once_per_run(builder)
    elif isinstance(complete, bool):
        completing = set(builder.nodes) if complete else set()
    else:
        completing = set(complete)
    named: dict[str, Iterable[str]] = {
        "agents": agents,
        "on_exhausted": on_exhausted if isinstance(on_exhausted, Mapping) else (),
        "confidence_key": confidence_key if isinstance(confidence_key, Mapping) else (),
        "complete": completing if not isinstance(complete, (bool, str)) else (),
    }
    _check_node_names(builder, named)
    plan: list[tuple[str, str, str]] = []
    missing = []
    for name, spec in builder.nodes.items():
        if spec.is_error_handler:
            continue
        sub_builder = getattr(spec.runnable, "builder", None)
        if sub_builder is not None and getattr(sub_builder, _GOVERNED, None) is manager:
            continue  # a governed subgraph: its own nodes are the agents
        agent = agents.get(name, name)
        if agent not in known:
            missing.append(f"{name!r} (agent {agent!r})" if agent != name else repr(name))
        mode = _per_node(on_exhausted, name, "raise")
        if mode not in _LOCAL_MODES and mode != END and mode not in builder.nodes:
            raise ContractError(
                f"node {name!r}: on_exhausted={mode!r} is not 'raise', 'skip', END "
                "or a node of this graph"
            )
        if mode not in _LOCAL_MODES and (
            spec.error_handler_node is not None or builder._node_defaults.error_handler
        ):
            raise ContractError(
                f"node {name!r} already has an error_handler; on_exhausted={mode!r} routes "
                "through its own error_handler and cannot share it"
            )
        plan.append((name, agent, mode))
    if missing:
        raise ContractError(
            "no contract for graph node(s) " + ", ".join(missing) + ": register them with "
            "the manager or map them to an agent with agents={node: agent}"
        )
    ungoverned = set(builder.nodes) - {name for name, _, _ in plan}
    if any(set(names) & ungoverned for names in named.values()):
        raise ContractError(
            f"govern_graph: {_naming(named, ungoverned)}, which it does not govern: an "
            "error handler, or a subgraph governed on its own (its nodes are the agents: "
            "give these options when governing its builder)"
        )
    shared_models = dict(models or {})  # one cheaper model of each name for the graph
    for name, agent, mode in plan:
        spec = builder.nodes[name]
        budget = _NodeBudget(
            manager,
            agent,
            "skip" if mode == "skip" else "raise",
            _per_node(confidence_key, name, None),
            name in completing,
            min_call_tokens,
            handler_options,
            shared_models,
        )
        wrapped = _governed_node(spec.runnable, budget)
        error_handler: Any = None
        if spec.error_handler_node is not None:
            error_handler = builder.nodes.pop(spec.error_handler_node).runnable
        if mode not in _LOCAL_MODES:
            error_handler = _route(mode)
        del builder.nodes[name]
        builder.add_node(
            name,
            wrapped,
            defer=spec.defer,
            metadata=spec.metadata,
            input_schema=spec.input_schema,
            retry_policy=spec.retry_policy,
            cache_policy=spec.cache_policy,
            error_handler=error_handler,
            destinations=spec.ends or None,
            timeout=spec.timeout,
            trace_policy=spec.trace_policy,
        )
    setattr(builder, _GOVERNED, manager)
    return builder


class BudgetMiddleware(AgentMiddleware):
    """Budget every model call of a ``langchain.agents.create_agent`` agent.

    Args:
        manager: The budget manager.
        agent: The agent to charge; by default the agent's ``name`` (its
            ``lc_agent_name``) when it has a contract (also inside a governed node,
            whose agent it is nested in), else the enclosing governed node's agent.
        on_exhausted: ``"raise"`` (the refusal reaches the caller unchanged) or
            ``"end"`` (the agent stops with a final message instead).
        min_call_tokens: Refuse a model step unless this much is affordable.
        models: Chat models by name, for the ``model`` steps of the agent's
            degradation ladder (its contract's ``degrade``); a name not here is made
            with LangChain's ``init_chat_model``.
        handler_options: Passed to the LangChain handler.

    The agent's degradation ladder (``BudgetContract(degrade=[...])``) is tried before
    a refusal: a step with ``below`` is taken before the call once the agent's
    remaining falls below that fraction of its allocation; when a call is refused, the
    next step is taken and the call tried again. Each step is a ``Degraded`` event.

    Example:
        >>> from tbc_integrations import BudgetManager
        >>> m = BudgetManager(); _ = m.register_agent("bob", max_tokens=100)
        >>> BudgetMiddleware(m, "bob").name
        'BudgetMiddleware'
    """

    def __init__(
        self,
        manager: Ledger,
        agent: str | None = None,
        *,
        on_exhausted: str = "raise",
        min_call_tokens: int = 16,
        exhausted_message: str = "[stopped: token budget exhausted]",
        models: Mapping[str, Any] | None = None,
        **handler_options: Any,
    ) -> None:
        super().__init__()
        _check_options("BudgetMiddleware", min_call_tokens, handler_options)
        if on_exhausted not in ("raise", "end"):
            raise ContractError(
                f"BudgetMiddleware(on_exhausted={on_exhausted!r}): use 'raise' or 'end'"
            )
        self.manager = manager
        self.agent = agent
        self.on_exhausted = on_exhausted
        self.min_call_tokens = min_call_tokens
        self.exhausted_message = exhausted_message
        self.models = dict(models or {})
        self.handler_options = handler_options
        self._ladders: dict[str, Ladder] = {}
        self._named: set[str] = set()  # agent-graph names known to have a contract
        self._counter = TokenCounter()  # prices a model choice (cl100k: close for most)

    def _agent(self, known: Mapping[str, Any] | None = None) -> str:
        """The agent to charge. ``known``: the contracts, read by an async caller off the
        loop (without it, the store is read here, once per agent-graph name)."""
        if self.agent is not None:
            return self.agent
        meta = ensure_config().get("metadata") or {}
        inner = meta.get("lc_agent_name")  # the agent graph's own name: the innermost
        if isinstance(inner, str) and self._has_contract(inner, known):
            return inner
        name = meta.get(AGENT_METADATA_KEY) or inner
        if not isinstance(name, str):
            raise ContractError(
                "BudgetMiddleware needs agent=..., or create_agent(name=...) to name the agent"
            )
        return name

    def _has_contract(self, name: str, known: Mapping[str, Any] | None = None) -> bool:
        """Whether ``name`` is a registered agent (remembered once known)."""
        if name in self._named:
            return True
        if name in (self.manager.contracts if known is None else known):
            self._named.add(name)
            return True
        return False

    async def _aagent(self) -> str:
        """:meth:`_agent`, reading the contracts off the event loop when it must."""
        if self.agent is not None:
            return self.agent
        inner = (ensure_config().get("metadata") or {}).get("lc_agent_name")
        if isinstance(inner, str) and inner not in self._named:
            return self._agent(await self.manager.acontracts())
        return self._agent({})

    def _gate(self) -> dict[str, Any] | None:
        try:
            scope = _config_scope(self.manager, ensure_config())
            self.manager.check(self._agent(), 0, self.min_call_tokens, scope=scope)
        except BudgetExceededError as err:
            if self.on_exhausted == "raise":
                raise
            return self._stop(err)
        return None

    async def _agate(self) -> dict[str, Any] | None:
        """:meth:`_gate`, off the event loop when the store waits on I/O."""
        agent = await self._aagent()  # from the run's config, on the loop
        try:
            scope = _config_scope(self.manager, ensure_config())
            await self.manager.acheck(agent, 0, self.min_call_tokens, scope=scope)
        except BudgetExceededError as err:
            if self.on_exhausted == "raise":
                raise
            return self._stop(err)
        return None

    def _ladder(self, agent: str, contracts: Mapping[str, BudgetContract] | None = None) -> Ladder:
        """The agent's degradation ladder (contracts never change once registered)."""
        ladder = self._ladders.get(agent)
        if ladder is None:
            contract = (self.manager.contracts if contracts is None else contracts).get(agent)
            ladder = self._ladders[agent] = ladder_of(contract, self.manager, self.handler_options)
        return ladder

    def _plan(
        self, agent: str, request: ModelRequest, status: AgentStatus | None
    ) -> tuple[ModelRequest, Plan]:
        """The request with ``max_tokens`` lowered to the output cap and the steps whose
        ``below`` the agent's remaining has fallen under taken; and the plan, whose
        ``left`` steps a refusal takes."""
        ladder = self._ladder(agent)
        model = request.model
        asked = request.model_settings.get("max_tokens")
        if asked is None:
            asked = getattr(model, "max_tokens", None)
        call = Call(model_name(model), asked if isinstance(asked, int) else None)
        if ladder.priced(status):
            messages = [request.system_message, *request.messages]
            counted = self._counter.count_messages([m for m in messages if m is not None])
            call = replace(call, input_tokens=counted)
        plan = ladder.plan(call, status)
        return self._shaped(agent, request, call, plan.call, plan.taken), plan

    def _shaped(
        self, agent: str, request: ModelRequest, was: Call, now: Call, taken: Iterable[Taken]
    ) -> ModelRequest:
        """The request made as ``now`` says (it was made as ``was``), with a ``Degraded``
        event for each step ``taken``."""
        swapped = now.model != was.model and now.model is not None
        if swapped:
            request = request.override(model=chat_model(self.models, now.model or ""))
        if now.max_tokens is not None and (now.max_tokens != was.max_tokens or swapped):
            # the cheaper model is asked the output the plan priced, not its own default
            settings = {**request.model_settings, "max_tokens": now.max_tokens}
            request = request.override(model_settings=settings)
        for text in now.wrap_up[len(was.wrap_up) :]:
            if request.system_message is not None:
                text = f"{request.system_message.content}\n\n{text}"
            request = request.override(system_message=SystemMessage(text))
        for step in taken:
            self.manager.note_degraded(agent, step.step.name, step.why)
        return request

    def _next(
        self, agent: str, request: ModelRequest, plan: Plan, err: BudgetExceededError
    ) -> tuple[ModelRequest, Plan] | None:
        """After a refusal: the request and plan with the ladder's next step taken
        (``None``: no step is left, the refusal stands)."""
        after = self._ladder(agent).after_refusal(plan, err.reason)
        if after is None:
            return None
        return self._shaped(agent, request, plan.call, after.call, after.taken[-1:]), after

    def _final(self, err: BudgetExceededError) -> AIMessage:
        """The message an agent ends with when its budget refused it, saying why."""
        return AIMessage(f"{self.exhausted_message} {err}")

    def _stop(self, err: BudgetExceededError) -> dict[str, Any]:
        return {"jump_to": "end", "messages": [self._final(err)]}

    @hook_config(can_jump_to=["end"])
    def before_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        """Stop (or raise) before the model step when the agent cannot afford a call."""
        return self._gate()

    @hook_config(can_jump_to=["end"])
    async def abefore_model(self, state: Any, runtime: Any) -> dict[str, Any] | None:
        """Async :meth:`before_model`."""
        return await self._agate()

    def wrap_model_call(self, request: ModelRequest, handler: Callable[[ModelRequest], Any]) -> Any:
        """Run the model call with the budget handler installed for this agent.

        With ``on_exhausted="end"``, a call the budget refuses ends the agent's run
        with a final message saying why (no tool calls: the agent loop stops).
        """
        agent = self._agent()
        status = self.manager.call_status(agent, _config_scope(self.manager, ensure_config()))
        request, plan = self._plan(agent, request, status)
        with budget_scope(self.manager, agent, **self.handler_options):
            while True:
                try:
                    return handler(request)
                except BudgetExceededError as err:  # noqa: PERF203 - a retry per ladder step
                    after = self._next(agent, request, plan, err)
                    if after is None:
                        if self.on_exhausted == "raise":
                            raise
                        return self._final(err)
                    request, plan = after

    async def awrap_model_call(
        self,
        request: ModelRequest,
        handler: Callable[[ModelRequest], Awaitable[Any]],
    ) -> Any:
        """Async :meth:`wrap_model_call`."""
        agent = await self._aagent()
        if agent not in self._ladders:  # the one contracts read, off the loop
            self._ladder(agent, await self.manager.acontracts())
        scope = _config_scope(self.manager, ensure_config())
        request, plan = self._plan(agent, request, await self.manager.acall_status(agent, scope))
        with budget_scope(self.manager, agent, **self.handler_options):
            while True:
                try:
                    return await handler(request)
                except BudgetExceededError as err:  # noqa: PERF203 - a retry per ladder step
                    after = self._next(agent, request, plan, err)
                    if after is None:
                        if self.on_exhausted == "raise":
                            raise
                        return self._final(err)
                    request, plan = after
