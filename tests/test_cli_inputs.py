"""The tbc command on what a file can hold and on a core-only install.

A core-only install two ways: a fresh venv (``venv.create``, no pip, a ``.pth``
file naming this checkout: stdlib plus this package, nothing else, offline), and
a subprocess whose ``sys.meta_path`` refuses every optional dependency (rich,
yaml, matplotlib, the frameworks) though they are installed. Each command either
works without them or fails in one line naming the extra.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tbc_integrations import BudgetManager
from tbc_integrations.audit import AuditLog
from tbc_integrations.cli import MAX_ERROR, main

ROOT = Path(__file__).resolve().parent.parent
OPTIONAL = (
    "rich",
    "yaml",
    "matplotlib",
    "langgraph",
    "langchain",
    "langchain_core",
    "langchain_openai",
    "crewai",
    "tiktoken",
    "redis",
    "typing_extensions",
    "genai_prices",
    "opentelemetry",
)
BLOCKER = f"""
import sys
BLOCKED = {OPTIONAL!r}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Block())
sys.argv = ["tbc", *sys.argv[1:]]
from tbc_integrations.cli import main
sys.exit(main())
"""


def core_only(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``tbc ARGS`` with every optional dependency missing."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OPENAI_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-c", BLOCKER, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
        check=False,
    )


def one_line_error(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tbc: error: ")
    assert len(lines[0]) <= len("tbc: error: ") + MAX_ERROR
    return lines[0]


@pytest.fixture(scope="module")
def small_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three agents, one borrow from a donor, names with rich markup in them."""
    path = tmp_path_factory.mktemp("log") / "audit.jsonl"
    m = BudgetManager()
    m.register_agent("planner", priority=1, max_tokens=1_000)
    m.register_agent("writer [v2]", priority=3, max_tokens=100)
    m.register_agent("critic[/]", priority=2, max_tokens=200)
    with AuditLog(path).attach(m):
        with m.spend("writer [v2]", 100, 60) as call:  # borrows 60 from the planner, pays 30 back
            call.set_usage((90, 40))
        with m.spend("critic[/]", 10, 10) as call:
            call.set_usage((5, 5))
    return path


def run(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


# --- a core-only install ---------------------------------------------------------


def test_report_and_replay_print_plain_tables_without_rich(small_log: Path) -> None:
    done = core_only("report", str(small_log), cwd=small_log.parent)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"Token budgets: {small_log}"
    assert lines[1].split() == [
        "agent", "allocated", "consumed", "reserved", "borrowed", "lent", "refusals",
        "confidence", "state",
    ]  # fmt: skip
    rows = {line[:11].strip(): line[11:].split() for line in lines[3:]}
    assert rows["planner"] == ["970", "0", "0", "0", "30", "0", "-"]
    assert rows["writer [v2]"] == ["130", "130", "0", "30", "0", "0", "-"]
    assert rows["critic[/]"] == ["200", "10", "0", "0", "0", "0", "-"]

    done = core_only("replay", str(small_log), cwd=small_log.parent)
    assert done.returncode == 0, done.stderr
    head = done.stdout.splitlines()[1]
    assert head.split("  ")[0] == "agent"
    assert [h.strip() for h in head.split("  ") if h.strip()] == [
        "agent",
        "consumed",
        "consumed replayed",
        "refusals",
        "refusals replayed",
        "borrowed",
        "borrowed replayed",
    ]
    writer = next(line for line in done.stdout.splitlines() if line.startswith("writer [v2]"))
    assert writer.split()[2:] == ["130", "130", "0", "0", "30", "30"]


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (("plot", "LOG", "-o", "out.png"), "pip install 'tbc-integrations[cli]'"),
        (("validate", "budgets.yaml"), "pip install 'tbc-integrations[yaml]'"),
        (("replay", "LOG", "--contracts", "budgets.yaml"), "pip install 'tbc-integrations[yaml]'"),
        (("demo", "--no-live", "--out", "d"), "pip install 'tbc-integrations[cli,langgraph]'"),
    ],
)
def test_commands_name_the_extra_they_need(
    small_log: Path, tmp_path: Path, args: tuple[str, ...], extra: str
) -> None:
    (tmp_path / "budgets.yaml").write_text("a: {max_tokens: 5}\n")
    argv = [str(small_log) if a == "LOG" else a for a in args]
    done = core_only(*argv, cwd=tmp_path)
    assert done.returncode == 1 and done.stdout == ""
    assert one_line_error(done.stderr).endswith(extra)
    assert not (tmp_path / "d").exists()  # the demo refused before writing anything


def test_budgets_module_imports_without_a_framework(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from tbc_integrations.budgets import contracts_from_mapping, load_budgets\n"
        "print(contracts_from_mapping({'a': {'max_tokens': 7}})['a'].max_tokens)\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in"
        " ('crewai', 'langchain_core', 'langgraph')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.splitlines() == ["7", "[]"]


def test_langgraph_without_its_extra_names_it(tmp_path: Path) -> None:
    code = BLOCKER.split("sys.argv")[0] + "import tbc_integrations.langgraph\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert "pip install 'tbc-integrations[langgraph]'" in done.stderr.splitlines()[-1]


# --- no silent fallbacks -------------------------------------------------------------


def test_demo_with_a_model_but_no_key_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    code, out, err = run("demo", "--no-live", "--out", str(tmp_path / "d"), "--model", "gpt-4o")
    assert code == 1 and out == ""
    assert one_line_error(err) == (
        "tbc: error: --model gpt-4o needs OPENAI_API_KEY set (the demo runs offline without"
        " --model)"
    )
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty budgets file (no agents)"),
        ("# only a comment\n", "empty budgets file (no agents)"),
        ("{}\n", "no agents"),
        ("prices: {m: {input: 1, output: 2}}\n", "no agents (only prices)"),
        ("- a\n- b\n", "expected a mapping of agent to contract, got ['a', 'b']"),
    ],
)
def test_budgets_files_without_agents_are_errors(tmp_path: Path, text: str, message: str) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text(text)
    code, _, err = run("validate", str(budgets))
    assert code == 1
    assert one_line_error(err) == f"tbc: error: {budgets}: {message}"


def test_replay_names_the_agents_its_contracts_miss(small_log: Path, tmp_path: Path) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("planner: {max_tokens: 50}\n")
    code, out, err = run("replay", str(small_log), "--contracts", str(budgets))
    assert code == 1 and out == ""
    assert one_line_error(err) == (
        f"tbc: error: {budgets} has no contract for agent(s) of the log: 'writer [v2]', 'critic[/]'"
    )


# --- inputs a file can hold ------------------------------------------------------------

BOMB = "".join(
    f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]\n"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: {max_tokens: 5}\na: {max_tokens: 6}\n", "line 2: duplicate key 'a'"),
        ("a: {max_tokens: 5, max_tokens: 6}\n", "line 1: duplicate key 'max_tokens'"),
        ("a: {max_tokens: 5}\n~: {max_tokens: 6}\n", "line 2: a null key"),
        ("a: {max_tokens: 5}\nnull: {max_tokens: 6}\n", "line 2: a null key"),
        ("a: &a [x, x, x, x, x, x, x, x, x]\n" + BOMB, "more than 100,000 YAML nodes"),
        ("a: " + "[" * 100 + "]" * 100 + "\n", "line 1: nested deeper than 32 levels"),
        ("a: {max_tokens: '5'}\n", "Agent 'a': max_tokens must be an integer"),
        ("a: {max_tokens: 5, depends_on: [ghost]}\n", "ghost"),
        ("a: [1\n", "not valid YAML: line 2: expected ',' or ']'"),
        (
            "a: {max_tokens: 5, depends_on: [b]}\nb: {max_tokens: 5, depends_on: [a]}\n",
            "budgets.yaml: Dependency cycle: a -> b -> a",
        ),
        (
            "a: {max_tokens: 5, depends_on: [ghost]}\n",
            "budgets.yaml: Agent 'a' depends on unknown agent 'ghost'",
        ),
        (
            "a: {max_tokens: 5, degrade: [{modell: x}]}\n",
            "budgets.yaml: Agent 'a': degrade step {'modell': 'x'}: unknown field(s) ['modell']",
        ),
        (
            "prices: {m: {input: abc, output: 1}}\na: {max_tokens: 5}\n",
            "budgets.yaml: Price of model 'm': ModelPrice.input must be an amount of dollars",
        ),
        (
            "prices: {m: {input: 1}}\na: {max_tokens: 5}\n",
            "budgets.yaml: Price of model 'm': needs output",
        ),
        (
            "prices: {m: {input: 1, output: 2, foo: 3}}\na: {max_tokens: 5}\n",
            "budgets.yaml: Price of model 'm': unknown field(s) ['foo']",
        ),
    ],
)
def test_bad_budgets_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text(text)
    code, out, err = run("validate", str(budgets))
    assert code == 1 and out == ""
    assert message in one_line_error(err)


def test_the_billion_laughs_file_is_small() -> None:
    assert len("a: &a [x, x, x, x, x, x, x, x, x]\n" + BOMB) < 400


def good_lines(small_log: Path) -> list[str]:
    return small_log.read_text().splitlines()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[1, 2]", "a line must be a JSON object, got [1, 2]"),
        ("null", "a line must be a JSON object, got None"),
        ('"text"', "a line must be a JSON object, got 'text'"),
        (
            '{"kind": "commit", "agent": "planner", "time": 1, "tokens": "5"}',
            "event 'commit': field 'tokens' must be int, got '5'",
        ),
        (
            '{"kind": "commit", "agent": null, "time": 1}',
            "event 'commit': field 'agent' must be str, got None",
        ),
        (
            '{"kind": "commit", "agent": "planner", "time": NaN}',
            "event 'commit': field 'time' must be float, got nan",
        ),
        (
            '{"kind": "transfer", "agent": "planner", "time": 1, "tokens": 5,'
            ' "donors": [["ghost", 5]], "reason": "borrow"}',
            "donor 'ghost' is not an agent of the log",
        ),
        ('{"kind": "teleport", "agent": "planner", "time": 1}', "unknown event kind 'teleport'"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_bad_log_lines_are_one_line_errors_naming_the_line(
    small_log: Path, tmp_path: Path, line: str, message: str
) -> None:
    lines = good_lines(small_log)
    log = tmp_path / "audit.jsonl"
    log.write_text("\n".join([lines[0], line, *lines[1:]]) + "\n")
    for command in ("report", "replay"):
        code, out, err = run(command, str(log))
        assert code == 1 and out == ""
        assert one_line_error(err) == f"tbc: error: {log}:2: not an audit record: {message}"


def test_a_bad_snapshot_is_an_error(small_log: Path, tmp_path: Path) -> None:
    lines = good_lines(small_log)
    snapshot = json.loads(lines[0])
    snapshot["agents"]["planner"]["consumed"] = "lots"
    log = tmp_path / "audit.jsonl"
    log.write_text("\n".join([json.dumps(snapshot), *lines[1:]]) + "\n")
    code, _, err = run("report", str(log))
    assert code == 1
    assert one_line_error(err) == (
        f"tbc: error: {log}:1: not an audit record: agent 'planner': field 'consumed' must be"
        " int, got 'lots'"
    )


def test_names_and_text_from_files_print_literally(small_log: Path) -> None:
    code, out, _ = run("report", str(small_log))
    assert code == 0
    assert "│ writer [v2] " in out and "│ critic[/]   " in out
    plain = core_only("report", str(small_log), cwd=small_log.parent).stdout
    assert "writer [v2]" in plain and "critic[/]" in plain


def test_control_characters_in_a_file_name_are_not_written(tmp_path: Path) -> None:
    log = tmp_path / "evil\x1b[2Jname.jsonl"
    log.write_text("null\n{}\n")
    code, _, err = run("report", str(log))
    assert code == 1
    assert "\x1b" not in err and "evil\\x1b[2Jname.jsonl:1" in one_line_error(err)


def test_a_long_value_is_cut(tmp_path: Path) -> None:
    budgets = tmp_path / "budgets.yaml"
    budgets.write_text("a: {max_tokens: '" + "9" * 5_000 + "'}\n")
    code, _, err = run("validate", str(budgets))
    assert code == 1 and one_line_error(err).endswith("...")


# --- fuzzed inputs ---------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=8,
)
FIELDS = ("kind", "agent", "time", "tokens", "donors", "reason", "reservation_id", "cost_nanos")


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_log_lines_never_give_a_traceback(
    small_log: Path, tmp_path: Path, data: st.DataObject
) -> None:
    lines = good_lines(small_log)
    at = data.draw(st.integers(1, len(lines) - 1))
    choice = data.draw(st.integers(0, 3))
    if choice == 3:  # the snapshot: one agent's field, or a section, replaced
        at, record = 0, json.loads(lines[0])
        section = data.draw(st.sampled_from(["agents", "contracts", "open", "time"]))
        if section in ("agents", "contracts") and data.draw(st.booleans()):
            fields = [*sorted(record[section]["planner"]), "bogus"]
            record[section]["planner"][data.draw(st.sampled_from(fields))] = data.draw(JSON)
        else:
            record[section] = data.draw(JSON)
        bad = json.dumps(record)
    elif choice == 0:  # a good line, one field replaced by any JSON value
        record = json.loads(lines[at])
        record[data.draw(st.sampled_from(FIELDS))] = data.draw(JSON)
        bad = json.dumps(record)
    elif choice == 1:  # any JSON value that is not an object
        bad = json.dumps(data.draw(JSON.filter(lambda v: not isinstance(v, dict))))
    else:  # any text
        bad = data.draw(st.text(max_size=40).filter(lambda t: "\n" not in t and t.strip()))
    lines[at] = bad
    log = tmp_path / "fuzz.jsonl"
    log.write_text("\n".join(lines) + "\n")
    for command in ("report", "replay"):
        code, _, err = run(command, str(log))
        if choice == 1 or code != 0:
            assert code == 1
            one_line_error(err)


YAML_TEXT = st.text(alphabet=st.sampled_from(list("ab:{}[]-&*!?,'\"#~ \n|>0123456789")))


@settings(max_examples=150, deadline=None)
@given(text=YAML_TEXT | st.builds(lambda v: json.dumps(v), JSON))
def test_fuzzed_budgets_files_never_give_a_traceback(text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        budgets = Path(tmp) / "budgets.yaml"
        budgets.write_text(text)
        code, out, err = run("validate", str(budgets))
    assert code in (0, 1)
    if code == 1:
        one_line_error(err)
    else:
        assert out.startswith("ok: ")


def test_a_fresh_venv_with_no_extras(small_log: Path, tmp_path: Path) -> None:
    """A real core-only install: a new venv whose site-packages holds only this package."""
    import venv

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "tbc_integrations.pth").write_text(f"{ROOT}\n")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OPENAI_API_KEY")}

    def tbc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [python, "-m", "tbc_integrations", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=clean,
            timeout=60,
            check=False,
        )

    probe = subprocess.run(
        [
            python,
            "-c",
            "import importlib.util as u; print(u.find_spec('rich'), u.find_spec('yaml'))",
        ],
        capture_output=True,
        text=True,
        env=clean,
        check=True,
    )
    assert probe.stdout.split() == ["None", "None"]  # really without the extras
    report = tbc("report", str(small_log))
    assert report.returncode == 0, report.stderr
    assert report.stdout.splitlines()[3].split() == [
        "planner",
        "970",
        "0",
        "0",
        "0",
        "30",
        "0",
        "-",
    ]
    assert tbc("replay", str(small_log)).returncode == 0
    (tmp_path / "budgets.yaml").write_text("a: {max_tokens: 5}\n")
    for args, extra in [
        (("validate", "budgets.yaml"), "yaml"),
        (("plot", str(small_log), "-o", "p.png"), "cli"),
        (("demo", "--no-live"), "cli,langgraph"),
    ]:
        done = tbc(*args)
        assert done.returncode == 1
        assert one_line_error(done.stderr).endswith(f"pip install 'tbc-integrations[{extra}]'")


def test_a_snapshot_contract_naming_another_agent_is_refused(small_log: Path) -> None:
    """Found by the fuzzed test: the replay looked the agent up by its key and failed."""
    lines = good_lines(small_log)
    record = json.loads(lines[0])
    record["contracts"]["planner"]["agent_name"] = "0"
    lines[0] = json.dumps(record)
    small_log.write_text("\n".join(lines) + "\n")
    for command in ("report", "replay"):
        code, _, err = run(command, str(small_log))
        assert code == 1 and "contract 'planner' names another agent: '0'" in err
