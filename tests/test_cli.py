"""The tbc command: every subcommand, its errors and its exit codes."""

from __future__ import annotations

import contextlib
import io
import sqlite3
import struct
import sys
from decimal import Decimal
from pathlib import Path

import pytest

from tbc_integrations import BudgetExceededError, BudgetManager, Usage, __version__
from tbc_integrations._validate import MAX_TOKENS
from tbc_integrations.audit import AuditLog
from tbc_integrations.cli import main
from tbc_integrations.demo import DEMO_NAMESPACE, PRICES, SCRIPTED_MODEL, TEAM, run_demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as mp:
        buffer = io.StringIO()
        mp.setattr(sys, "stdout", buffer)
        assert main(["demo", "--no-live", "--out", str(out)]) == 0
    return out / "audit.jsonl", buffer.getvalue()


@pytest.fixture(scope="module")
def demo_log(demo_run: tuple[Path, str]) -> Path:
    return demo_run[0]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_help_on_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    for command in ("demo", "report", "plot", "validate", "replay"):
        assert main([command, "--help"]) == 0
        assert f"usage: tbc {command}" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"tbc {__version__}\n"


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert main(["teleport"]) == 2
    assert main(["plot", "log.jsonl"]) == 2  # -o is required
    assert "usage:" in capsys.readouterr().err


def test_demo_writes_the_log_and_the_plot(
    demo_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert demo_log.exists() and (demo_log.parent / "budget.png").exists()
    width, height = png_size(demo_log.parent / "budget.png")
    assert (width, height) == (900, 450)


def test_report_rebuilds_the_demo_state(demo_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(demo_log)]) == 0
    out = capsys.readouterr().out
    for agent in TEAM:
        assert agent[:6] in out
    assert "allocated" in out and "refusals" in out


def test_plot_writes_a_png(
    demo_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "plot.png"
    assert main(["plot", str(demo_log), "-o", str(target)]) == 0
    assert png_size(target) == (900, 450)
    assert f"wrote {target}" in capsys.readouterr().out


def test_replay_same_contracts_reproduces_and_tighter_ones_refuse(
    demo_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", str(demo_log)]) == 0
    same = capsys.readouterr().out
    assert "policy 'greedy'" in same
    tight = tmp_path / "budgets.yaml"
    lines = [
        f"{name}:\n  priority: {c['priority']}\n  max_tokens: 20\n" for name, c in TEAM.items()
    ]
    tight.write_text("".join(lines))
    assert main(["replay", str(demo_log), "--contracts", str(tight)]) == 0
    out = capsys.readouterr().out
    assert out != same
    assert main(["replay", str(demo_log), "--policy", "nonsense"]) == 1
    assert "unknown reallocation policy 'nonsense'" in capsys.readouterr().err


def test_validate_ok_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = tmp_path / "budgets.yaml"
    good.write_text("a:\n  max_tokens: 100\nb:\n  max_tokens: 50\n  depends_on: [a]\n")
    assert main(["validate", str(good)]) == 0
    assert "ok: 2 agents, 150 tokens" in capsys.readouterr().out
    cases = {
        "a:\n  max_tokens: -1\n": f"max_tokens must be an integer from 0 to {MAX_TOKENS}, got -1",
        "a:\n  depends_on: [ghost]\n": "depends on unknown agent 'ghost'",
        "a:\n  depends_on: [b]\nb:\n  depends_on: [a]\n": "Dependency cycle",
        "a: [\n": "not valid YAML",
    }
    for text, message in cases.items():
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        assert main(["validate", str(bad)]) == 1
        err = capsys.readouterr().err
        assert err.startswith("tbc: error: ") and message in err
        assert err.count("\n") == 1  # one line, no traceback
    assert main(["validate", str(tmp_path / "missing.yaml")]) == 1
    assert "cannot read budgets file" in capsys.readouterr().err


def test_errors_on_bad_logs_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(tmp_path / "none.jsonl")]) == 1
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{}\n{}\n")
    assert main(["report", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "no such audit log" in err and "not an audit record" in err


def test_demo_rejects_an_unknown_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--no-live", "--out", str(tmp_path), "--store", "nosuch://x"]) == 1
    assert "unknown store URL" in capsys.readouterr().err


def test_demo_on_a_store_says_where_it_is_and_refuses_a_second_run_there(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    assert main(["demo", "--no-live", "--out", str(tmp_path / "first"), "--store", url]) == 0
    printed = " ".join(capsys.readouterr().out.split())  # a long path may wrap
    assert f"store: {url} (namespace demo: tbc watch {url} --namespace demo)" in printed
    before = BudgetManager(url, namespace=DEMO_NAMESPACE).status()
    # a second run on it was refused by the first run's confidence gate, after spending
    assert main(["demo", "--no-live", "--out", str(tmp_path / "second"), "--store", url]) == 1
    err = capsys.readouterr().err
    assert f"{url} already holds a demo run (namespace 'demo'); nothing was changed" in err
    assert BudgetManager(url, namespace=DEMO_NAMESPACE).status() == before
    assert not (tmp_path / "second").exists()
    assert main(["report", url, "--namespace", DEMO_NAMESPACE]) == 0


def test_demo_result_in_python(tmp_path: Path) -> None:
    result = run_demo(out_dir=tmp_path, live=False, delay=0.0)
    s = result.manager.status()
    assert s["researcher_a"].borrowed > 0
    assert s["critic"].gated and s["planner"].complete
    assert result.state["report"].startswith("Battery recycling")
    assert sum(x.allocated for x in s.values()) == sum(c["max_tokens"] for c in TEAM.values())


def test_demo_shows_dollars_beside_tokens(demo_run: tuple[Path, str]) -> None:
    _, out = demo_run
    header = next(line for line in out.splitlines() if "allocated" in line)
    assert "consumed" in header and "spent $" in header and "cap $" in header
    writer = next(line for line in out.splitlines() if line.startswith("│ writer "))
    # the writer's 268 tokens: 171 in, 97 out, at $0.15 and $0.60 per million
    assert "268" in writer and "$0.00004425" in writer
    assert "$0.0005" in writer and "$0.00045575" in writer  # its cap and what is left
    assert "spent: $0.0002145 for 614 tokens" in out


def test_replay_shows_money_recorded_and_replayed(
    demo_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["replay", str(demo_log)]) == 0
    out = capsys.readouterr().out
    assert "spent $" in out
    writer = next(line for line in out.splitlines() if line.startswith("│ writer "))
    assert writer.count("$0.00004425") == 2  # as recorded, and as replayed


def test_demo_prices_every_call_and_caps_the_writer(tmp_path: Path) -> None:
    result = run_demo(out_dir=tmp_path, live=False, delay=0.0)
    s = result.manager.status()
    price = PRICES[SCRIPTED_MODEL]
    for name in ("planner", "researcher_a", "researcher_b", "critic", "writer"):
        expected = (s[name].input_tokens * price.input + s[name].output_tokens * price.output) / (
            1_000_000
        )
        assert s[name].cost == expected > 0, name
    assert s["short_writer"].cost == 0
    assert s["writer"].max_cost == Decimal(TEAM["writer"]["max_cost"])
    assert s["writer"].cost_remaining == s["writer"].max_cost - s["writer"].cost
    assert result.manager.report()["writer"] == {
        "allocated": s["writer"].allocated,
        "consumed": s["writer"].consumed,
        "remaining": s["writer"].remaining,
    }


def test_validate_counts_cost_caps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text(
        'a:\n  max_tokens: 100\n  max_cost: "0.50"\nb:\n  max_cost: 1.25\nc:\n  max_tokens: 10\n'
    )
    assert main(["validate", str(budgets)]) == 0
    assert (
        capsys.readouterr().out
        == "ok: 3 agents, 110 tokens in all, $1.75 in cost caps (2 capped)\n"
    )
    budgets.write_text('a:\n  max_cost: "-1"\n')
    assert main(["validate", str(budgets)]) == 1
    assert "max_cost must be a finite amount of dollars >= 0" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:tiktoken encoding")  # gpt-4o-mini: o200k_base, offline
@pytest.mark.parametrize(("model", "capped"), [("gpt-4o-mini", True), ("house-model", False)])
def test_demo_with_a_real_model_prices_it_or_leaves_the_cost_cap_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: str, capped: bool
) -> None:
    from tbc_integrations.testing import OpenAIStub

    with OpenAIStub(reply="Battery recycling: from a local stub") as stub:
        for var in ("OPENAI_BASE_URL", "OPENAI_API_BASE"):
            monkeypatch.setenv(var, stub.base_url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        result = run_demo(out_dir=tmp_path, model=model, live=False, delay=0.0)
    assert stub.requests and {r["model"] for r in stub.requests} == {model}
    writer = result.manager.status()["writer"]
    assert writer.consumed > 0
    if capped:
        price = PRICES[model]
        expected = writer.input_tokens * price.input + writer.output_tokens * price.output
        assert writer.max_cost == Decimal("0.0005") and writer.cost == expected / 1_000_000
    else:
        assert writer.max_cost is None and writer.cost == 0


def readme_demo_table() -> list[str]:
    lines = (Path(__file__).resolve().parent.parent / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "Research team budgets")
    end = next(i for i in range(start, len(lines)) if lines[i].startswith("report: "))
    return lines[start : end + 1]


def test_demo_prints_the_readme_table(demo_run: tuple[Path, str]) -> None:
    printed = [line.rstrip() for line in demo_run[1].splitlines()]
    start = next(i for i, line in enumerate(printed) if line.strip() == "Research team budgets")
    assert printed[start : start + len(readme_demo_table())] == readme_demo_table()


def test_demo_lenders_are_the_same_on_every_run(tmp_path: Path) -> None:
    for run in range(4):  # concurrent fan-out: about 1 run in 3 had other lenders
        statuses = run_demo(out_dir=tmp_path / str(run), live=False, delay=0.0).manager.status()
        lent = {name: s.lent for name, s in statuses.items() if s.lent}
        borrowed = {name: s.borrowed for name, s in statuses.items() if s.borrowed}
        assert (lent, borrowed) == ({"critic": 26}, {"researcher_a": 26})


def test_replay_asks_the_refused_demands_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "audit.jsonl"
    m = BudgetManager()
    m.register_agent("a", max_tokens=100)
    with AuditLog(log).attach(m):
        m.commit(m.reserve("a", 50, 30), Usage(50, 30))
        with pytest.raises(BudgetExceededError):
            m.reserve("a", 50, 30)  # 20 left

    def row(*extra: str) -> list[str]:
        assert main(["replay", str(log), *extra]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("│ a "))
        return [cell.strip() for cell in line.strip("│").split("│")]

    # agent, consumed, consumed replayed, refusals, refusals replayed, borrowed, replayed
    assert row() == ["a", "80", "80", "1", "1", "0", "0"]  # its own contracts: the same run
    bigger = tmp_path / "budgets.yaml"
    bigger.write_text("a: {max_tokens: 1000}\n")
    assert row("--contracts", str(bigger)) == ["a", "80", "80", "1", "0", "0", "0"]


def test_report_and_replay_of_a_team_per_run_log(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "audit.jsonl"
    m = BudgetManager(team_per="run")
    m.register_agent("a", max_tokens=100)
    with AuditLog(log).attach(m):
        for run in ("r1", "r2", "r3"):
            with m.scope(run=run):
                m.commit(m.reserve("a", 50, 30), Usage(50, 30))  # 80 of each run's own 100

    def row(*args: str) -> list[str]:
        assert main([*args]) == 0
        out = capsys.readouterr().out
        line = next(x for x in out.splitlines() if x.startswith("│ a "))
        return [cell.strip() for cell in line.strip("│").split("│")]

    # agent, allocated, consumed, reserved, borrowed, lent, refusals, confidence, state
    assert row("report", str(log)) == ["a", "100", "0", "0", "0", "0", "0", "-", ""]
    assert row("report", str(log), "--run", "r2") == ["a", "100", "80", "0", "0", "0", "0", "-", ""]
    assert main(["report", str(log)]) == 0
    assert "runs with a team of their own: r1, r2, r3" in capsys.readouterr().out
    assert main(["report", str(log), "--run", "r9"]) == 1
    assert f"{log} has no run 'r9'" in capsys.readouterr().err
    # consumed, replayed; refusals, replayed; borrowed, replayed: summed over the runs
    assert row("replay", str(log)) == ["a", "240", "240", "0", "0", "0", "0"]


def test_replay_the_demo_under_the_readme_contracts_file(
    demo_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """examples/my-budgets.yaml, the file the README's replay line names, covers the demo."""
    from tbc_integrations.budgets import load_budgets

    sample = Path(__file__).resolve().parent.parent / "examples" / "my-budgets.yaml"
    contracts = load_budgets(sample)
    assert list(contracts) == list(TEAM)  # all six agents, in the demo's order
    assert main(["validate", str(sample)]) == 0
    assert "ok: 6 agents, 2,000 tokens in all" in capsys.readouterr().out
    assert main(["replay", str(demo_log), "--contracts", str(sample)]) == 0
    out = capsys.readouterr().out
    rows = {
        cells[0]: cells[1:]
        for line in out.splitlines()
        if line.startswith("│ ")
        for cells in [[c.strip() for c in line.strip("│").split("│")]]
    }
    assert list(rows) == list(TEAM)
    # consumed, replayed; refusals, replayed; borrowed, replayed; spent $, replayed
    assert rows["researcher_a"][:6] == ["176", "176", "0", "0", "26", "0"]  # 300 of its own
    assert rows["writer"][:6] == ["268", "268", "0", "0", "0", "18"]  # 250: it borrows 18
    assert all(r[2] == r[3] == "0" for r in rows.values())  # nobody refused


def test_the_readme_shows_the_contracts_file_it_replays_under(tmp_path: Path) -> None:
    from tbc_integrations.budgets import load_budgets

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "--contracts examples/my-budgets.yaml" in readme
    blocks = readme.split("```yaml\n")[1:]
    shown = next(b.split("```")[0] for b in blocks if b.startswith("planner:"))
    (tmp_path / "shown.yaml").write_text(shown)
    assert load_budgets(tmp_path / "shown.yaml") == load_budgets(
        root / "examples" / "my-budgets.yaml"
    )


def test_read_only_commands_do_not_create_a_namespace(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ledger.db"
    url = f"sqlite:///{path}"
    m = BudgetManager(url, namespace="team")
    m.register_agent("writer", max_tokens=100)
    m.store.close()

    def namespaces() -> list[str]:
        with contextlib.closing(sqlite3.connect(path)) as db:
            return sorted(row[0] for row in db.execute("SELECT ns FROM namespaces"))

    assert namespaces() == ["team"]
    for argv in (["report", url, "--namespace", "zzz"], ["watch", url, "--namespace", "zzz"]):
        assert main([*argv, "--once"] if argv[0] == "watch" else argv) == 1
        assert "namespace 'zzz'" in capsys.readouterr().err
    assert namespaces() == ["team"]  # looked for, not made
    assert main(["report", url, "--namespace", "team"]) == 0


def test_watch_and_plot_one_runs_own_team(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    log = tmp_path / "audit.jsonl"
    m = BudgetManager(url, team_per="run")
    m.register_agent("writer", max_tokens=1_000)
    with AuditLog(log).attach(m):
        for run, used in (("r1", 300), ("r2", 700)):
            with m.scope(run=run):
                m.commit(m.reserve("writer", used), Usage(used, 0))

    def writer_line(out: str) -> str:
        return next(x for x in out.splitlines() if "writer" in x)

    assert main(["watch", url, "--once"]) == 0  # the registered team, the template
    assert "0/1,000" in writer_line(capsys.readouterr().out)
    assert main(["watch", url, "--once", "--run", "r2"]) == 0
    assert "700/1,000" in writer_line(capsys.readouterr().out)
    assert main(["watch", url, "--once", "--run", "r2", "--scope", "user=u"]) == 1
    assert "give one of them" in capsys.readouterr().err

    from tbc_integrations.audit import read_log
    from tbc_integrations.replay import LedgerReplay
    from tbc_integrations.reporting import timeline

    record = read_log(log)
    runs: list[tuple[str | None, int]] = [("r1", 700), ("r2", 300), (None, 1_000)]
    for which, left in runs:
        replay = LedgerReplay.from_status(record.snapshot, record.contracts, record.open)
        line = timeline(replay, record.events, run=which)
        assert line.remaining["writer"][-1] == left
    png = tmp_path / "r1.png"
    assert main(["plot", str(log), "-o", str(png), "--run", "r1"]) == 0
    assert png.read_bytes().startswith(b"\x89PNG")
    assert main(["plot", str(log), "-o", str(png), "--run", "r9"]) == 1
    assert "no event of run 'r9' (its runs: ['r1', 'r2'])" in capsys.readouterr().err
    m.store.close()
