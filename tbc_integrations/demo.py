"""The demo: a LangGraph research team governed end to end (the main job).

A planner fans out to two researchers and a critic, whose work a writer turns
into a report. Each node is an agent under a contract; the run shows the live
view, then the report (tokens and dollars), and writes the audit log and a PNG
plot. Offline by default (scripted chat models that report usage like
providers, as ``scripted-gpt``, priced by :data:`PRICES` like gpt-4o-mini); with
``model=...`` the same graph calls a real model (``OPENAI_API_KEY`` must be set:
without it the demo refuses to start rather than quietly run offline).

The run is deterministic: the fan-out (two researchers and the critic) runs one
node at a time in the graph's order, so the same agents lend the same tokens on
every run (run concurrently, which node held a reservation when a researcher
borrowed, and so who lent to it, depended on thread timing).

Example:
    >>> import tempfile
    >>> result = run_demo(out_dir=tempfile.mkdtemp(), live=False, delay=0.0)
    >>> result.state["report"].startswith("Battery recycling")
    True
    >>> result.manager.status()["writer"].max_cost
    Decimal('0.0005')
"""

from __future__ import annotations

import importlib.util
import operator
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypedDict, cast

from tbc_integrations._errors import ContractError, MissingDependencyError
from tbc_integrations._manager import BudgetManager
from tbc_integrations._pricing import ModelPrice
from tbc_integrations.audit import AuditLog, read_log
from tbc_integrations.reporting import Timeline, live_view, plot_timeline, timeline

__all__ = ["DEMO_NAMESPACE", "PRICES", "DemoResult", "TEAM", "check_demo", "run_demo"]

NEEDS = {
    "langgraph": "langgraph",
    "langchain": "langgraph",
    "langchain_core": "langgraph",
    "rich": "cli",
    "matplotlib": "cli",
}
"""The modules the demo imports, each with the extra that installs it."""

DEMO_NAMESPACE = "demo"
"""The namespace the demo's team lives in, on whatever store it runs on."""

API_KEY = "OPENAI_API_KEY"
"""The environment variable a real ``model`` needs."""

SCRIPTED_MODEL = "scripted-gpt"
"""The model name the offline demo's scripted chat models report (counted as gpt-4 counts)."""

PRICES: dict[str, ModelPrice] = {
    SCRIPTED_MODEL: ModelPrice(input="0.15", output="0.60"),
    "gpt-4o-mini": ModelPrice(input="0.15", output="0.60"),
}
"""The demo's prices, US dollars per million tokens: the scripted model is priced as
gpt-4o-mini; other real models come from genai-prices (the ``prices`` extra)."""

TEAM: dict[str, dict[str, Any]] = {
    "planner": {"priority": 2, "max_tokens": 800},
    "researcher_a": {"priority": 4, "max_tokens": 150, "max_output_tokens": 150},
    "researcher_b": {"priority": 3, "max_tokens": 400},
    "critic": {"priority": 1, "max_tokens": 2_000, "confidence_threshold": 0.8},
    "writer": {
        "priority": 3,
        "max_tokens": 900,
        "depends_on": ["researcher_a", "researcher_b", "critic"],
        "max_cost": "0.0005",
    },
    "short_writer": {"priority": 1, "max_tokens": 150},
}
"""The demo team's contracts."""


class Research(TypedDict, total=False):
    topic: str
    plan: str
    findings: Annotated[list[str], operator.add]
    critique: str
    confidence: float
    report: str


@dataclass
class DemoResult:
    """What a demo run leaves behind."""

    manager: BudgetManager
    state: dict[str, Any]
    audit_path: Path
    plot_path: Path
    timeline: Timeline
    figure: Any


ChatFactory = Callable[[str, int], Any]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a finder that refuses it, or a broken parent package
        return False


def check_demo(model: str | None = None) -> None:
    """Refuse to start a demo that cannot run: a missing extra, or a ``model`` without its key.

    Raises:
        MissingDependencyError: naming the extras to install.
        ContractError: ``model`` given but ``OPENAI_API_KEY`` not set.

    Example:
        >>> check_demo()  # every extra installed here: nothing happens
    """
    missing = [name for name in NEEDS if not _installed(name)]
    if missing:
        extras = ",".join(sorted({NEEDS[name] for name in missing}))
        raise MissingDependencyError(
            f"the demo needs {', '.join(missing)}: pip install 'tbc-integrations[{extras}]'"
        )
    if model is not None:
        if not os.environ.get(API_KEY):
            raise ContractError(
                f"--model {model} needs {API_KEY} set (the demo runs offline without --model)"
            )
        if not _installed("langchain_openai"):
            raise MissingDependencyError(
                f"--model {model} needs langchain-openai: pip install langchain-openai"
            )


def _chat_factory(model: str | None, delay: float) -> ChatFactory:
    if model is not None:
        from langchain_openai import ChatOpenAI

        def real(reply: str, max_tokens: int) -> Any:
            return ChatOpenAI(model=model, max_completion_tokens=max_tokens, stream_usage=True)

        return real
    from tbc_integrations.testing import UsageFakeChat

    def scripted(reply: str, max_tokens: int) -> Any:
        return UsageFakeChat(reply=reply, max_tokens=max_tokens, delay=delay, model=SCRIPTED_MODEL)

    return scripted


def build_graph(chat: ChatFactory) -> Any:
    """The research team's ``StateGraph`` builder (not yet governed)."""
    from langgraph.graph import END, START, StateGraph

    def ask(reply: str, max_tokens: int, prompt: str) -> str:
        return str(chat(reply, max_tokens).invoke(prompt).content)

    def planner(state: Research) -> Research:
        plan = ask("1. recovery rates 2. costs 3. policy", 64, f"Plan a study of {state['topic']}")
        return {"plan": plan}

    def researcher_a(state: Research) -> Research:
        text = ask(" ".join(["lithium"] * 160), 300, f"Research recovery rates: {state['plan']}")
        return {"findings": [text]}

    def researcher_b(state: Research) -> Research:
        text = ask(" ".join(["cost"] * 90), 200, f"Research costs: {state['plan']}")
        return {"findings": [text]}

    def critic(state: Research) -> Research:
        text = ask("the plan is sound; cite the cost sources", 64, f"Critique: {state['plan']}")
        return {"critique": text, "confidence": 0.9}

    def writer(state: Research) -> Research:
        notes = "\n".join(state.get("findings", [])) + state.get("critique", "")
        text = ask("Battery recycling: a three part report with sources", 200, notes)
        return {"report": text}

    def short_writer(state: Research) -> Research:
        return {"report": "Battery recycling: short report (the writer's budget ran out)"}

    b = StateGraph(Research)
    for fn in (planner, researcher_a, researcher_b, critic, writer, short_writer):
        b.add_node(fn.__name__, fn)
    b.add_edge(START, "planner")
    for name in ("researcher_a", "researcher_b", "critic"):
        b.add_edge("planner", name)
    b.add_edge(["researcher_a", "researcher_b", "critic"], "writer")
    b.add_edge("writer", END)
    b.add_edge("short_writer", END)
    return b


def run_demo(
    *,
    store: str = "memory://",
    out_dir: str | Path = "tbc-demo",
    model: str | None = None,
    live: bool | None = None,
    delay: float = 0.15,
    console: Any = None,
) -> DemoResult:
    """Run the governed research team once; write ``audit.jsonl`` and ``budget.png``.

    Args:
        store: Store URL (``memory://`` by default).
        out_dir: Where the audit log and the plot go.
        model: A real model name (needs ``OPENAI_API_KEY``); priced by
            :data:`PRICES` or genai-prices (the ``prices`` extra); when neither
            knows it, the writer's ``max_cost`` is left out.
        live: Show the live view (default: when the console is a terminal).
        delay: Seconds each scripted call takes, so the live view has something to show.
        console: A rich console to draw on.

    Raises:
        MissingDependencyError: an extra the demo needs is not installed.
        ContractError: ``model`` given without ``OPENAI_API_KEY``, or a ``store`` that
            already holds a demo run (in namespace :data:`DEMO_NAMESPACE`).
    """
    check_demo(model)
    from tbc_integrations.langgraph import govern_graph

    manager = BudgetManager(store=store, namespace=DEMO_NAMESPACE, prices=PRICES)
    if manager.contracts:  # a run before this one: its spend and gates would carry over
        manager.store.close()
        raise ContractError(
            f"{store} already holds a demo run (namespace {DEMO_NAMESPACE!r}); nothing was "
            f"changed: give a new store, or look at that run with "
            f"`tbc report {store} --namespace {DEMO_NAMESPACE}`"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    audit_path, plot_path = out / "audit.jsonl", out / "budget.png"
    audit_path.unlink(missing_ok=True)
    priced = model is None or manager.prices.find(model, "openai") is not None
    for name, fields in TEAM.items():
        if not priced:  # a real model no price source knows: cap tokens, not dollars
            fields = {k: v for k, v in fields.items() if k != "max_cost"}
        manager.register_agent(name, **fields)
    graph = govern_graph(
        build_graph(_chat_factory(model, delay)),
        manager,
        on_exhausted={"writer": "short_writer"},
        confidence_key={"critic": "confidence"},
        complete="auto",
        default_max_tokens=128,
    ).compile()
    with AuditLog(audit_path).attach(manager), live_view(manager, console=console, enabled=live):
        # one node at a time: who lends to whom does not depend on thread timing
        state = cast(
            dict[str, Any], graph.invoke({"topic": "battery recycling"}, {"max_concurrency": 1})
        )
    record = read_log(audit_path)
    from tbc_integrations.replay import LedgerReplay

    line = timeline(
        LedgerReplay.from_status(record.snapshot, record.contracts, record.open),
        record.events,
        start=record.events[0].time if record.events else record.started,
    )
    figure = plot_timeline(line, plot_path, title="Research team: remaining budget per agent")
    return DemoResult(manager, state, audit_path, plot_path, line, figure)
