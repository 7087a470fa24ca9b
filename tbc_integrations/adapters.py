"""The ``tbcontracts.adapters`` surface: govern a node or a task-runner callable.

``tbcontracts`` governs LangGraph nodes and CrewAI task-runners as plain
callables, recording usage after they run. These are the same names and
arguments, so ``from tbcontracts.adapters import TBCGraphGovernor`` becomes
``from tbc_integrations.adapters import TBCGraphGovernor``; but each call runs the
reserve/commit protocol: the input estimate is reserved *before* the callable
runs (an exhausted or gated agent is refused before any work), the usage is
committed after it (exact from ``usage_key`` / ``usage_fn``, else estimated),
and an exception releases the hold. Async callables are governed too.

Nothing here imports LangGraph or CrewAI. For governance of every model call
inside a graph or a crew (real provider usage, tools, streaming, caps), use
:func:`tbc_integrations.langgraph.govern_graph` and
:func:`tbc_integrations.crewai.govern_crew`.

Example:
    >>> from tbc_integrations.adapters import TBCGraphGovernor
    >>> governor = TBCGraphGovernor()
    >>> _ = governor.register("researcher", priority=3, max_tokens=4000)
    >>> def research(state):
    ...     return {"notes": "three sources found", "tokens_used": 420}
    >>> node = governor.wrap("researcher", research, usage_key="tokens_used")
    >>> node({"question": "what changed?"})["notes"]
    'three sources found'
    >>> governor.report()["researcher"]["consumed"]
    420
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from ._contracts import BudgetContract
from ._manager import BudgetManager
from ._usage import Usage
from ._validate import check_tokens
from .tokens import TokenCounter

__all__ = ["TBCCrewGovernor", "TBCGraphGovernor", "govern_agent", "govern_node"]

F = TypeVar("F", bound=Callable[..., Any])

_TEXT_ATTRS = ("raw", "output", "result")  # a CrewAI output object's text, as tbcontracts reads it


def _strings(value: Any) -> Iterable[str]:
    """The strings a state, an update or a result carries (one level into lists)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            if isinstance(item, str):
                yield item
            elif isinstance(item, (list, tuple)):
                yield from (x for x in item if isinstance(x, str))
    else:
        for attr in _TEXT_ATTRS:
            text = getattr(value, attr, None)
            if isinstance(text, str):
                yield text
                break


def _count(counter: TokenCounter, *values: Any) -> int:
    return sum(counter.count(text) for value in values for text in _strings(value))


def _number(value: Any) -> float | None:
    """``value`` if it is a real number (not a bool), else ``None``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _called(fn: Callable[[Any], Any] | None, result: Any) -> float | None:
    """``fn(result)`` as a number; ``None`` when absent, not a number, or it raised
    (tbcontracts' rule: a broken reader falls back to the estimate)."""
    if fn is None:
        return None
    try:
        return _number(fn(result))
    except Exception:
        return None


def _field(result: Any, key: str | None) -> float | None:
    return _number(result.get(key)) if key is not None and isinstance(result, Mapping) else None


def _usage(agent: str, exact: float | None, input_tokens: int, output_tokens: int) -> Usage:
    """The exact total (as input tokens, like ``record_usage``) or else the estimate.

    A negative or non-finite exact total is refused (``InvalidTokenCountError``
    naming the agent): the hold is released and nothing is recorded.
    """
    if exact is None:
        return Usage(input_tokens, output_tokens)
    total = int(exact) if math.isfinite(exact) else exact
    return Usage(check_tokens(total, "usage", agent), 0)


def govern_node(
    manager: BudgetManager,
    agent_name: str,
    node: F,
    usage_key: str | None = None,
    confidence_key: str | None = None,
) -> F:
    """Wrap a LangGraph node ``(state) -> update`` so each run is metered for ``agent_name``.

    The strings in the state are reserved as input before the node runs; after
    it, ``update[usage_key]`` (a number) is committed as the exact total, or else
    the estimate (state in, update out). ``update[confidence_key]`` feeds the gate.

    Raises:
        UnknownAgentError: ``agent_name`` is not registered on ``manager``.

    Example:
        >>> from tbc_integrations import BudgetManager
        >>> m = BudgetManager(); _ = m.register_agent("critic", max_tokens=100)
        >>> node = govern_node(m, "critic", lambda state: {"verdict": "ok"})
        >>> node({"draft": "a draft"})
        {'verdict': 'ok'}
    """
    counter = manager.token_counter
    return manager._meter(
        agent_name,
        lambda args, kwargs: _count(counter, *args[:1]),
        lambda reserved, update: _usage(
            agent_name, _field(update, usage_key), reserved, _count(counter, update)
        ),
        lambda update: _field(update, confidence_key),
        note=f"langgraph:{getattr(node, '__name__', 'node')}",
    )(node)


def govern_agent(
    manager: BudgetManager,
    agent_name: str,
    runner: F,
    usage_fn: Callable[[Any], int] | None = None,
    confidence_fn: Callable[[Any], float] | None = None,
) -> F:
    """Wrap a callable that runs an agent's work (``lambda: agent.execute_task(task)``).

    String arguments are reserved as input before it runs; after it,
    ``usage_fn(output)`` is committed as the exact total when it returns a
    number (for example ``output.token_usage.total_tokens``), or else the
    estimate of the output's text. ``confidence_fn(output)`` feeds the gate.

    Raises:
        UnknownAgentError: ``agent_name`` is not registered on ``manager``.

    Example:
        >>> from tbc_integrations import BudgetManager
        >>> m = BudgetManager(); _ = m.register_agent("writer", max_tokens=500)
        >>> run = govern_agent(m, "writer", lambda: "a draft", usage_fn=lambda out: 120)
        >>> run(), m.consumed("writer")
        ('a draft', 120)
    """
    counter = manager.token_counter
    return manager._meter(
        agent_name,
        lambda args, kwargs: _count(counter, *args, *kwargs.values()),
        lambda reserved, output: _usage(
            agent_name, _called(usage_fn, output), reserved, _count(counter, output)
        ),
        lambda output: _called(confidence_fn, output),
        note=f"crewai:{getattr(runner, '__name__', 'agent')}",
    )(runner)


class _Governor:
    """Agents registered on one manager, and callables wrapped against them."""

    def __init__(self, manager: BudgetManager | None = None) -> None:
        self.manager = manager if manager is not None else BudgetManager()

    def register(self, agent_name: str, **kwargs: Any) -> BudgetContract:
        """Register an agent (the keyword arguments of ``BudgetManager.register_agent``)."""
        return self.manager.register_agent(agent_name, **kwargs)

    def report(self) -> dict[str, dict[str, int]]:
        """``{agent: {"allocated", "consumed", "remaining"}}``, as ``BudgetManager.report``."""
        return self.manager.report()


class TBCGraphGovernor(_Governor):
    """Register agents and wrap LangGraph nodes against one manager.

    Example:
        >>> governor = TBCGraphGovernor()
        >>> _ = governor.register("critic", priority=1, max_tokens=2000)
        >>> critic = governor.wrap("critic", lambda s: {"score": 0.9}, confidence_key="score")
        >>> critic({"draft": "v1"})
        {'score': 0.9}
    """

    def wrap(
        self,
        agent_name: str,
        node: F,
        usage_key: str | None = None,
        confidence_key: str | None = None,
    ) -> F:
        """``node`` governed for ``agent_name`` (see :func:`govern_node`)."""
        return govern_node(self.manager, agent_name, node, usage_key, confidence_key)


class TBCCrewGovernor(_Governor):
    """Register agents and wrap CrewAI task-runners against one manager.

    Example:
        >>> governor = TBCCrewGovernor()
        >>> _ = governor.register("researcher", priority=3, max_tokens=4000)
        >>> run = governor.wrap("researcher", lambda: "findings")
        >>> run()
        'findings'
    """

    def wrap(
        self,
        agent_name: str,
        runner: F,
        usage_fn: Callable[[Any], int] | None = None,
        confidence_fn: Callable[[Any], float] | None = None,
    ) -> F:
        """``runner`` governed for ``agent_name`` (see :func:`govern_agent`)."""
        return govern_agent(self.manager, agent_name, runner, usage_fn, confidence_fn)
