"""The ``tbc`` command: demo, report, plot, validate, replay.

``report`` reads an audit log or a store URL; ``--by user`` (any limit's name or
scope key, or ``limit``) lists the limits' rows per scope value and period with each
agent's spend in them. ``watch`` shows a store live (``--scope user=u-42``: one
scope's limits).

Exit codes: 0 success; 1 the command ran into an error (printed as one line,
``tbc: error: ...``, at most :data:`MAX_ERROR` characters); 2 bad command-line usage.

``report``, ``replay`` and ``validate`` run on a core install (``validate`` and
``replay --contracts`` read YAML: the ``yaml`` extra); without rich (the ``cli``
extra) tables are plain text. ``plot`` needs matplotlib (``cli``); ``demo``
needs the ``langgraph`` and ``cli`` extras.

Example:
    >>> main(["--help"])  # doctest: +ELLIPSIS
    usage: tbc ...
    0
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any

from tbc_integrations._errors import BudgetExceededError, ContractError, TBCError
from tbc_integrations._version import __version__

__all__ = ["main"]

MAX_ERROR = 400
"""The longest error line the command prints (longer messages are cut with ``...``)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tbc", description="Token budget contracts for multi-agent LLM systems."
    )
    parser.add_argument("--version", action="version", version=f"tbc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="run the governed research-team demo (offline)")
    demo.add_argument("--store", default="memory://", help="store URL (default: memory://)")
    demo.add_argument("--out", default="tbc-demo", help="directory for audit.jsonl and budget.png")
    demo.add_argument("--model", help="a real model, e.g. gpt-4o-mini (needs OPENAI_API_KEY)")
    live = demo.add_mutually_exclusive_group()
    live.add_argument(
        "--live", dest="live", action="store_true", default=None, help="force the live view"
    )
    live.add_argument("--no-live", dest="live", action="store_false", help="no live view")

    report = sub.add_parser(
        "report", help="per-agent table, or limits by scope, from an audit log or a store"
    )
    report.add_argument(
        "log", metavar="SOURCE", help="an audit log (JSON lines) or a store URL (sqlite:///...)"
    )
    report.add_argument(
        "--by",
        metavar="KEY",
        help="limit rows by scope: 'user', 'run' (any limit's name or key), or 'limit' for all",
    )
    report.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only the rows of this scope value (repeatable), e.g. --scope user=u-42",
    )
    report.add_argument("--namespace", default="default", help="the store's namespace")
    report.add_argument(
        "--run", metavar="RUN", help="one run's own team (a log of a manager with team_per=)"
    )

    plot = sub.add_parser("plot", help="plot remaining budget per agent from an audit log")
    plot.add_argument("log", type=Path, help="an audit log (JSON lines)")
    plot.add_argument("-o", "--output", type=Path, required=True, help="the PNG to write")
    plot.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="plot one scope's spend per agent against its limit, e.g. --scope user=u-42",
    )
    plot.add_argument(
        "--run", metavar="RUN", help="one run's own team (a log of a manager with team_per=)"
    )

    watch = sub.add_parser(
        "watch", help="live view of a store: the agents' budgets, or one scope's limits"
    )
    watch.add_argument("store", help="a store URL (sqlite:///budgets.db, redis://...)")
    watch.add_argument("--namespace", default="default", help="the store's namespace")
    watch.add_argument(
        "--scope",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="show this scope's limit rows and the agents' spend in them",
    )
    watch.add_argument(
        "--run", metavar="RUN", help="one run's own team (a store of a manager with team_per=)"
    )
    watch.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    watch.add_argument("--once", action="store_true", help="print one view and exit")

    validate = sub.add_parser("validate", help="check a budgets.yaml")
    validate.add_argument("budgets", type=Path, help="a budgets.yaml")

    replay = sub.add_parser(
        "replay", help="re-run a recorded run's demands under another policy or contracts"
    )
    replay.add_argument("log", type=Path, help="an audit log (JSON lines)")
    replay.add_argument("--policy", default="greedy", help="reallocation policy (default: greedy)")
    replay.add_argument("--contracts", type=Path, help="a budgets.yaml to use instead of the log's")
    return parser


def _console() -> Any:
    from rich.console import Console

    console = Console()
    if not console.is_terminal:  # piped or captured: room for every column
        console = Console(width=max(console.width, 170))
    return console


def _show(columns: list[tuple[str, str]], rows: list[list[str]], title: str) -> None:
    """Print a table: rich when installed, plain text when not (text printed literally)."""
    from tbc_integrations.reporting import have_rich, plain_table, rich_table

    if have_rich():
        _console().print(rich_table(columns, rows, title))
    else:
        print(plain_table(columns, rows, title))


def _cmd_demo(args: argparse.Namespace) -> int:
    from tbc_integrations.demo import DEMO_NAMESPACE, check_demo, run_demo

    check_demo(args.model)  # before anything is imported or written
    from tbc_integrations.reporting import format_dollars, literal, report_table

    console = _console()
    result = run_demo(
        store=args.store, out_dir=args.out, model=args.model, live=args.live, console=console
    )
    statuses = result.manager.status()
    console.print(report_table(statuses, title="Research team budgets"))
    spent = sum((s.cost for s in statuses.values()), Decimal(0))
    tokens = sum(s.consumed for s in statuses.values())
    console.print(f"spent: {format_dollars(spent)} for {tokens:,} tokens")
    console.print(f"report: {literal(result.state.get('report', ''))}", markup=False)
    console.print(
        f"audit log: {literal(result.audit_path)}\nplot: {literal(result.plot_path)}",
        markup=False,
    )
    if not args.store.lower().startswith("memory://") and ":memory:" not in args.store:
        console.print(
            f"store: {literal(args.store)} (namespace {DEMO_NAMESPACE}: "
            f"tbc watch {literal(args.store)} --namespace {DEMO_NAMESPACE})",
            markup=False,
        )
    return 0


def _is_url(source: str) -> bool:
    return "://" in source


def _open_store(url: str, namespace: str, team_per: str | None = None) -> Any:
    """A ledger on a store other processes write to (its namespace must exist)."""
    from tbc_integrations._ledger import Ledger

    if url.lower().startswith("memory://"):
        raise ContractError("a memory:// store lives in one process: give a sqlite or redis URL")
    if url.lower().startswith("sqlite:///"):
        from tbc_integrations.stores._sqlite import has_namespace, options_from_url

        path, _ = options_from_url(url)
        if not Path(path).is_file():
            raise ContractError(f"{path}: no such SQLite store")
        if not has_namespace(path, namespace):  # looked for without writing
            raise ContractError(f"namespace {namespace!r} of {url} has no agents and no limit rows")
    ledger = Ledger(url, namespace=namespace, team_per=team_per)
    if not ledger.contracts and not ledger.store.limit_rows():
        ledger.store.close()
        raise ContractError(f"namespace {namespace!r} of {url} has no agents and no limit rows")
    return ledger


def _cmd_report(args: argparse.Namespace) -> int:
    from tbc_integrations.reporting import report_rows
    from tbc_integrations.scope_report import parse_scope, scope_rows, warning_rows

    scope = parse_scope(args.scope)
    runs: list[str] = []
    if _is_url(args.log):
        if args.run is not None:
            raise ContractError("--run reads an audit log, not a store")
        ledger = _open_store(args.log, args.namespace)
        try:
            statuses = ledger.status()
            rows = ledger.limit_statuses()
        finally:
            ledger.store.close()
        keys: dict[str, str] = {}
        events: list[Any] = []
        where = f"{args.log} (namespace {args.namespace})"
    else:
        from tbc_integrations.audit import read_log

        record = read_log(Path(args.log))
        replayed = record.replay()
        runs = replayed.runs()
        statuses = replayed.status()
        events = record.events
        where = args.log
        if args.run is not None:
            if args.run not in runs:
                raise ContractError(f"{args.log} has no run {args.run!r}")
            statuses = replayed.team_status(args.run)
            events = [e for e in events if e.run == args.run]
            where = f"{args.log}, run {args.run}"
        rows = record.limit_statuses()
        keys = {limit.name: limit.scope_key for limit in record.limits}
    if args.by is None and not scope:
        _show(*report_rows(statuses), title=f"Token budgets: {where}")
        warnings = warning_rows(events)
        if warnings[1]:
            _show(*warnings, title="Budget warnings")
        if runs and args.run is None:
            shown_runs = ", ".join(runs[:10]) + (f" and {len(runs) - 10} more" if runs[10:] else "")
            print(
                f"runs with a team of their own: {shown_runs} (the table is the registered "
                "team, the template; one run's team: --run RUN)"
            )
        return 0
    by = args.by or "limit"
    shown = f" in {', '.join(f'{k}={v}' for k, v in scope.items())}" if scope else ""
    if not rows:
        print(f"no limit rows in {where}")
        return 0
    _show(*scope_rows(rows, by, scope=scope, keys=keys), title=f"Limits by {by}{shown}: {where}")
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    import time

    from tbc_integrations.reporting import view
    from tbc_integrations.scope_report import parse_scope

    scope = parse_scope(args.scope) or None
    if not args.interval > 0:
        raise ContractError(f"--interval must be a positive number of seconds, got {args.interval}")
    if scope is not None and args.run is not None:
        raise ContractError("--scope and --run show different views: give one of them")
    ledger = _open_store(args.store, args.namespace, team_per=None if args.run is None else "run")
    console = _console()
    try:
        if args.once or not console.is_terminal:
            console.print(view(ledger, scope, run=args.run))
            return 0
        from rich.live import Live

        with Live(view(ledger, scope, run=args.run), console=console, auto_refresh=False) as live:
            while True:  # until interrupted (Ctrl-C)
                time.sleep(args.interval)
                live.update(view(ledger, scope, run=args.run), refresh=True)
    finally:
        ledger.store.close()


def _cmd_plot(args: argparse.Namespace) -> int:
    from tbc_integrations.audit import read_log
    from tbc_integrations.replay import LedgerReplay
    from tbc_integrations.reporting import need_matplotlib, plot_timeline, timeline

    need_matplotlib()
    record = read_log(args.log)
    if args.scope and args.run is not None:
        raise ContractError("--scope and --run plot different things: give one of them")
    if args.scope:
        from tbc_integrations.scope_report import parse_scope, plot_scope, scope_timeline

        scoped = scope_timeline(record.events, parse_scope(args.scope), limits=record.limits)
        plot_scope(scoped, args.output)
        print(f"wrote {args.output}")
        return 0
    start = record.events[0].time if record.events else record.started
    replay = LedgerReplay.from_status(record.snapshot, record.contracts, record.open)
    if args.run is not None and not any(e.run == args.run for e in record.events):
        runs = sorted({e.run for e in record.events if e.run})
        raise ContractError(f"{args.log}: no event of run {args.run!r} (its runs: {runs})")
    line = timeline(replay, record.events, start=start, run=args.run)
    plot_timeline(line, args.output)
    print(f"wrote {args.output}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from tbc_integrations._contracts import check_dependencies
    from tbc_integrations.budgets import load_budgets, load_prices
    from tbc_integrations.reporting import format_dollars

    contracts = load_budgets(args.budgets)
    prices = load_prices(args.budgets)
    try:
        check_dependencies(contracts, complete=True)
    except ContractError as exc:
        raise ContractError(f"{args.budgets}: {exc}") from None
    total = sum(c.max_tokens or 0 for c in contracts.values())
    agents = f"{len(contracts)} agent{'s' if len(contracts) != 1 else ''}"
    line = f"ok: {agents}, {total:,} tokens in all"
    caps = [c.max_cost for c in contracts.values() if c.max_cost is not None]
    if caps:
        money = sum((Decimal(cap) for cap in caps), Decimal(0))
        line += f", {format_dollars(money)} in cost caps ({len(caps)} capped)"
    if prices:
        line += f", prices for {len(prices)} model{'s' if len(prices) != 1 else ''}"
    print(line)
    return 0


def _teams_total(teams: list[dict[str, Any]]) -> dict[str, Any]:
    """Each agent's status with its spend, refusals and loans summed over ``teams``."""
    from dataclasses import replace

    total: dict[str, Any] = {}
    for team in teams:
        for name, s in team.items():
            t = total.get(name)
            total[name] = (
                s
                if t is None
                else replace(
                    t,
                    consumed=t.consumed + s.consumed,
                    refusals=t.refusals + s.refusals,
                    borrowed=t.borrowed + s.borrowed,
                    cost=t.cost + s.cost,
                )
            )
    return total


def _cmd_replay(args: argparse.Namespace) -> int:
    from tbc_integrations._manager import BudgetManager
    from tbc_integrations.audit import read_log
    from tbc_integrations.budgets import load_budgets
    from tbc_integrations.policies import policy_from_name
    from tbc_integrations.reporting import format_dollars, has_money

    record = read_log(args.log)
    contracts = load_budgets(args.contracts) if args.contracts else record.contracts
    if args.contracts:
        logged = dict.fromkeys([*record.contracts, *record.snapshot])
        logged.update(dict.fromkeys(e.agent for e in record.events))
        missing = [name for name in logged if name not in contracts]
        if missing:
            shown = ", ".join(repr(name) for name in missing[:10])
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ContractError(
                f"{args.contracts} has no contract for agent(s) of the log: {shown}{more}"
            )
    per_run = any(e.run for e in record.events)  # a team per run: each replayed in its own
    manager = BudgetManager.from_contracts(
        contracts.values(),
        policy=policy_from_name(args.policy),
        team_per="run" if per_run else None,
    )
    held: dict[str, Any] = {}
    for e in record.events:
        if e.agent not in contracts or (per_run and not e.run):
            continue
        in_run = manager.scope(run=e.run) if per_run else contextlib.nullcontext()
        with in_run:
            if e.kind == "reserve":
                with contextlib.suppress(BudgetExceededError):  # a refusal is part of the replay
                    held[e.reservation_id or ""] = manager.reserve(
                        e.agent, e.input_tokens, e.output_tokens, cost=e.cost
                    )
            elif e.kind == "refuse":  # a demand refused in the run: asked again; it never ran,
                with contextlib.suppress(BudgetExceededError):  # so an admitted one uses nothing
                    manager.release(
                        manager.reserve(e.agent, e.input_tokens, e.output_tokens, cost=e.cost)
                    )
            elif e.kind == "commit":
                res = held.pop(e.reservation_id or "", None)
                usage = (e.input_tokens, e.output_tokens)
                if res is not None:
                    manager.commit(res, usage, cost=e.cost)
                elif e.reason == "direct":
                    manager.charge(e.agent, usage, cost=e.cost)
            elif e.kind in ("release", "expire"):
                res = held.pop(e.reservation_id or "", None)
                if res is not None:
                    manager.release(res)
            elif e.kind == "confidence":
                manager.record_confidence(e.agent, getattr(e, "confidence", 0.0))
            elif e.kind == "complete":
                manager.complete(e.agent)
    recorded = record.replay()
    runs = recorded.runs()
    before = _teams_total([recorded.team_status(r) for r in runs] or [recorded.status()])
    replayed = _teams_total([manager.team_status(r) for r in runs] or [manager.status()])
    # money spent as recorded: the snapshot's, plus every commit's cost
    spent = {name: int(st.cost * 10**9) for name, st in record.snapshot.items()}
    for e in record.events:
        if e.kind == "commit":
            spent[e.agent] = spent.get(e.agent, 0) + e.cost_nanos
    money = any(spent.values()) or has_money(replayed)
    headings = ["consumed", "refusals", "borrowed", *(["spent $"] if money else [])]
    columns = [("agent", "left")]
    for heading in headings:
        columns += [(heading, "right"), (f"{heading} replayed", "right")]
    rows: list[list[str]] = []
    for name in contracts:
        a, b = before.get(name), replayed[name]
        rows.append(
            [
                name,
                "-" if a is None else f"{a.consumed:,}",
                f"{b.consumed:,}",
                "-" if a is None else str(a.refusals),
                str(b.refusals),
                "-" if a is None else f"{a.borrowed:,}",
                f"{b.borrowed:,}",
                *(
                    [
                        "-" if a is None else format_dollars(spent.get(name, 0)),
                        format_dollars(b.cost),
                    ]
                    if money
                    else []
                ),
            ]
        )
    _show(columns, rows, title=f"replay of {args.log} under policy {args.policy!r}")
    if record.limits:
        names = ", ".join(limit.name for limit in record.limits)
        print(f"note: the log's limits ({names}) are not replayed, only the agents' contracts")
    return 0


COMMANDS = {
    "demo": _cmd_demo,
    "report": _cmd_report,
    "plot": _cmd_plot,
    "validate": _cmd_validate,
    "replay": _cmd_replay,
    "watch": _cmd_watch,
}


def _error(text: str) -> int:
    from tbc_integrations.reporting import literal

    message = literal(" ".join(text.split()), limit=MAX_ERROR)
    print(f"tbc: error: {message}", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``tbc`` command; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        return COMMANDS[args.command](args)
    except BrokenPipeError:  # the reader went away (``tbc report log | head``)
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - nothing more is written
        return 1
    except (TBCError, OSError, ValueError) as exc:
        return _error(str(exc))
    except ImportError as exc:  # a dependency of an extra, missing or broken
        return _error(f"{exc} (reinstall the extra this command needs, see tbc --help)")
    except (RecursionError, MemoryError) as exc:
        return _error(f"input too large or too deeply nested ({type(exc).__name__})")
    except KeyboardInterrupt:
        print("tbc: interrupted", file=sys.stderr)
        return 130


def entry() -> None:  # pragma: no cover - the console script
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
