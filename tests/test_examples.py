"""Examples and benchmark scripts run as part of the suite."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import STORE_KINDS

ROOT = Path(__file__).resolve().parent.parent


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def test_quickstart_borrows_and_refuses(capsys: pytest.CaptureFixture[str]) -> None:
    module = load(ROOT / "examples" / "quickstart.py")
    manager, log = module.run()
    assert any("borrowed" in line and "from planner" in line for line in log)
    assert any("researcher: refused before the call" in line for line in log)
    assert any("critic: refused before the call" in line and "gated" in line for line in log)
    status = manager.status()
    assert status["researcher"].borrowed > 0 and status["planner"].lent > 0
    assert sum(s.allocated for s in status.values()) == 2_000 + 1_000 + 300
    module.main()
    out = capsys.readouterr().out
    assert "report():" in out and "refusals" in out


def test_core_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    module = load(ROOT / "benchmarks" / "bench_core.py")
    module.main(["--quick"])
    out = capsys.readouterr().out
    assert "reserve+commit" in out and "tbcontracts" in out and "the floor" in out
    assert "1000" in out


def test_langchain_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    module = load(ROOT / "examples" / "langchain_quickstart.py")
    manager, log = module.run()
    assert log[0].startswith("researcher answered")
    assert "writer stream cut after 40 chunks" in log[1]
    assert "fell back to the cheaper model: 'a short report'" in log[2]
    status = manager.status()
    assert status["writer"].output_tokens == 41 and status["researcher"].refusals == 1
    assert all(s.reserved == 0 for s in status.values())
    module.main()
    assert "refusals" in capsys.readouterr().out


def test_langchain_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    module = load(ROOT / "benchmarks" / "bench_langchain.py")
    best = module.main(["--quick"])
    assert set(best) >= {"no handler", "UsageMetadataCallbackHandler", "BudgetCallbackHandler"}
    assert {"ainvoke, BudgetCallbackHandler", "ChatOpenAI, BudgetCallbackHandler"} <= set(best)
    out = capsys.readouterr().out
    assert "ours minus LangChain's own handler" in out and "ainvoke, median" in out
    assert "ChatOpenAI over HTTP" in out
    assert "agent turn, BudgetCallbackHandler made for the call" in best
    assert "an agent's turn" in out


def test_async_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    module = load(ROOT / "benchmarks" / "bench_async.py")
    walls = module.main(["--quick"])
    assert {"no handler", "handler, memory store"} <= set(walls)
    out = capsys.readouterr().out
    assert "concurrent ainvoke" in out and "memory / no handler" in out
    if "redis" in STORE_KINDS:  # with a Redis: the Redis store beside the memory store
        assert "handler, Redis store" in walls and "Redis / memory" in out


def test_langgraph_research_team(capsys: pytest.CaptureFixture[str]) -> None:
    module = load(ROOT / "examples" / "langgraph_research_team.py")
    manager, state, events = module.run()
    status = manager.status()
    assert state["report"] == "Battery recycling: a three part report"
    # one node at a time: the critic (finished, and the least important) lends, every run
    assert status["researcher"].borrowed == status["critic"].lent == 49
    assert status["planner"].lent == 0
    assert status["critic"].gated and status["planner"].complete
    assert any(e.kind == "transfer" and e.reason == "borrow" for e in events)
    assert sum(s.allocated for s in status.values()) == 600 + 150 + 1_500 + 800 + 100
    module.main()
    assert "budget flow" in capsys.readouterr().out


def test_langgraph_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    module = load(ROOT / "benchmarks" / "bench_langgraph.py")
    best = module.main(["--quick"])
    assert set(best) >= {"bare graph", "governed graph", "governed graph, no LLM call"}
    assert "block by block" in capsys.readouterr().out


def test_crewai_crew_project(capsys: pytest.CaptureFixture[str]) -> None:
    module = load(ROOT / "examples" / "crewai_crew" / "crew.py")
    manager, result, summary = module.run()
    assert "95%" in result
    assert summary["Researcher"]["borrowed"] > 0 and summary["Writer"]["lent"] > 0
    assert summary["Researcher"]["consumed"] > summary["Researcher"]["borrowed"]
    assert manager.contracts["Writer"].depends_on == ("Researcher",)
    module.main([])
    assert "Researcher" in capsys.readouterr().out


def test_crewai_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    module = load(ROOT / "benchmarks" / "bench_crewai.py")
    best = module.main(["--quick"])
    assert set(best) == {
        "ungoverned LLM.call",
        "trivial scoped hook",
        "governed (reserve + settle)",
    }
    assert "BaseLLM.call" in capsys.readouterr().out


def test_store_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    # imported by its package name, so the spawned worker processes can import it too
    module = importlib.import_module("benchmarks.bench_stores")
    rates = module.main(["--quick", "--rounds", "1"])
    assert set(rates) >= {"memory x1", "sqlite x1", "sqlite x4"}
    if "redis" in STORE_KINDS:  # with a Redis: the store beside the bare round trip
        for n in ("x1", "x4"):
            assert {f"redis {n}", f"redis (EVALSHA) {n}", f"bare EVALSHA {n}"} <= set(rates)
    assert all(rate > 0 for rate in rates.values())
    assert "verbs per second" in capsys.readouterr().out


def test_interleaved_timing_calls_every_variant_in_every_position() -> None:
    from benchmarks._timing import interleaved, medians

    seen: list[str] = []
    variants = {name: functools.partial(seen.append, name) for name in "abc"}
    times = interleaved(variants, calls=60, blocks=3)
    assert {name: [len(b) for b in per] for name, per in times.items()} == {
        name: [20, 20, 20] for name in "abc"
    }
    rounds = [tuple(seen[i : i + 3]) for i in range(0, len(seen), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # one call of each per round
    for position in range(3):  # and the order changes: each variant runs in every position
        assert {r[position] for r in rounds} == {"a", "b", "c"}
    assert all(t >= 0 for per in times.values() for block in per for t in block)
    assert set(medians(times)) == {"a", "b", "c"}


def test_block_differences_see_a_millisecond() -> None:
    import time

    from benchmarks._timing import block_differences, interleaved

    times = interleaved({"slow": lambda: time.sleep(0.001), "fast": lambda: None}, 20, 2)
    diffs = block_differences(times, "slow", "fast")
    assert len(diffs) == 2 and all(d >= 1_000 for d in diffs)  # microseconds


def test_crewai_crew_model_without_a_key_is_an_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    module = load(ROOT / "examples" / "crewai_crew" / "crew.py")
    with pytest.raises(SystemExit) as exited:
        module.main(["--model", "gpt-4o-mini"])
    assert exited.value.code == "crew.py: error: --model gpt-4o-mini needs OPENAI_API_KEY set"
    assert capsys.readouterr().out == ""
