"""Per-call cost of governing CrewAI LLM calls, side by side with an ungoverned ``LLM.call``.

A ``BaseLLM`` fake that reports usage like a provider (the one the tests use) is
called directly with an agent. Settlement happens on CrewAI's event-bus threads,
so each variant runs batches of calls inside its scope and flushes the bus at
the end of each batch; the batches of all variants are interleaved in random
order (``benchmarks/_timing.py``), and the figure is the median batch divided
by its calls. Variants:

- ungoverned: ``llm.call(...)`` with no hook installed;
- trivial hook: a scoped pre-model-call hook that does nothing (CrewAI's own cost);
- governed: inside a governed run (reserve in the hook, settle from the
  completion event on CrewAI's handler threads; the timing includes flushing
  the event bus, so settlement is counted).

Run: ``python benchmarks/bench_crewai.py`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from crewai import Agent
from crewai.events import crewai_event_bus
from crewai.hooks import InterceptionPoint
from crewai.hooks.dispatch import register_scoped, scoped_hooks

from benchmarks._timing import interleaved, medians
from tbc_integrations import BudgetManager
from tbc_integrations.crewai import _Governance, _governed  # the run scope itself
from tests.crew_support import ScriptedCrewLLM


@contextmanager
def trivial_hook() -> Iterator[None]:
    with scoped_hooks():
        register_scoped(InterceptionPoint.PRE_MODEL_CALL, lambda ctx: None)
        yield


def batch(
    call: Callable[[], object], scope: Callable[[], AbstractContextManager[object]], n: int
) -> Callable[[], None]:
    """``n`` calls inside ``scope``, then a flush of the event bus (settlement included)."""

    def run() -> None:
        with scope():
            for _ in range(n):
                call()
            crewai_event_bus.flush()

    return run


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Measure and print; returns the median seconds per call by variant."""
    parser = argparse.ArgumentParser(description="CrewAI governance overhead")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    args = parser.parse_args(argv)
    calls, per_batch, blocks = (100, 10, 2) if args.quick else (10_000, 50, 10)

    llm = ScriptedCrewLLM(answer="short answer")
    agent = Agent(role="Researcher", goal="g", backstory="b", llm=llm)
    manager = BudgetManager()
    manager.register_agent("Researcher", max_tokens=10**15)
    gov = _Governance(manager, {"Researcher": "Researcher"}, None, 64, None, None)
    messages = [{"role": "user", "content": "Summarise the findings in one line."}]

    def call() -> object:
        return llm.call(messages, from_agent=agent)

    variants: dict[str, Callable[[], AbstractContextManager[object]]] = {
        "ungoverned LLM.call": nullcontext,
        "trivial scoped hook": trivial_hook,
        "governed (reserve + settle)": lambda: _governed(gov, None),
    }
    batches = {name: batch(call, scope, per_batch) for name, scope in variants.items()}
    for run in batches.values():
        run()
    median = {
        name: per / per_batch
        for name, per in medians(interleaved(batches, calls // per_batch, blocks)).items()
    }
    base = median["ungoverned LLM.call"]
    print(
        f"BaseLLM.call with an agent: median of {calls // per_batch:,} batches of "
        f"{per_batch} calls for each, batches interleaved in random order"
    )
    for name, per in median.items():
        extra = "" if per is base else f"  (+{(per - base) * 1e6:6.1f} us, {per / base - 1:+.1%})"
        print(f"  {name:<30}{per * 1e6:9.1f} us{extra}")
    s = manager.status()["Researcher"]
    assert s.reserved == 0 and s.consumed > 0
    return median


if __name__ == "__main__":
    main()
