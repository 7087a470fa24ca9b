"""Reports by scope: a limit's rows per user, run or any scope key, with each agent's spend.

A limit row is one limit's numbers for one scope value in one period
(:class:`~tbc_integrations.LimitStatus`: used, held, left, money, warned, and the
agents' spend within it). The rows come from a live manager
(:meth:`~tbc_integrations.BudgetManager.limit_statuses`,
``status(scope=...)``), from a store other processes write to, or from an audit log
(:meth:`~tbc_integrations.audit.AuditRecord.limit_statuses`). Here they become a
table (``tbc report --by user``), a live view of one scope, and a plot of one scope's
spend over time (``tbc plot --scope user=u-42``). Nothing here knows a scope key by
name: ``"user"`` and ``"run"`` are any limit's names or keys.

Example:
    >>> from tbc_integrations import BudgetManager, Limit
    >>> from tbc_integrations.scope_report import scope_rows
    >>> m = BudgetManager(limits=[Limit("user", max_tokens=1_000)])
    >>> _ = m.register_agent("writer")
    >>> _ = m.charge("writer", (120, 30), scope={"user": "u-42"})
    >>> columns, rows = scope_rows(m.limit_statuses(), by="user")
    >>> rows[0][:4]
    ['u-42', 'all', '150', '0']
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tbc_integrations._errors import ContractError
from tbc_integrations._ledger import Ledger
from tbc_integrations._limits import Limit, check_scope, split_key
from tbc_integrations._records import LimitStatus
from tbc_integrations.events import BudgetEvent, BudgetWarning, Committed
from tbc_integrations.reporting import (
    _COLOURS,
    _markup,
    _rich,
    format_dollars,
    line_style,
    mpl_text,
    need_matplotlib,
)

__all__ = [
    "ScopeTimeline",
    "current_rows",
    "parse_scope",
    "plot_scope",
    "render_scope",
    "row_of",
    "scope_rows",
    "scope_timeline",
    "select_rows",
    "warning_rows",
]


def parse_scope(items: Iterable[str]) -> dict[str, str]:
    """``["user=u-42", "run=t-1"]`` as a scope (what ``--scope`` takes on the command line).

    Raises:
        ContractError: an item without ``=``, or an empty key or value.

    Example:
        >>> parse_scope(["user=u-42", "run=t=1"])
        {'user': 'u-42', 'run': 't=1'}
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ContractError(f"a scope is key=value (user=u-42), got {item!r}")
        out[key] = value
    return check_scope(out)


def _matches(status: LimitStatus, key: str, keys: Mapping[str, str]) -> bool:
    """Whether ``status`` is a row of a limit named ``key`` or per scope key ``key``."""
    return status.limit == key or keys.get(status.limit) == key


def select_rows(
    statuses: Iterable[LimitStatus],
    scope: Mapping[str, str] | None = None,
    by: str | None = None,
    keys: Mapping[str, str] | None = None,
) -> list[LimitStatus]:
    """The rows of the limits named (or keyed) ``by``, and of scope ``scope``'s values.

    ``keys`` maps a limit's name to its scope key, where known (a log knows its
    limits; a bare store only the rows' names, which are their keys unless a
    ``Limit`` says ``key=``).

    Example:
        >>> from tbc_integrations import Limit
        >>> user, run = Limit("user", max_tokens=5), Limit("run", max_tokens=5)
        >>> rows = [row_of(user, "u-1"), row_of(run, "r-1")]
        >>> [s.limit for s in select_rows(rows, scope={"user": "u-1"})]
        ['user']
    """
    keys = keys or {}
    out = []
    for s in statuses:
        if by is not None and by != "limit" and not _matches(s, by, keys):
            continue
        if scope and not any(
            _matches(s, key, keys) and s.value == value for key, value in scope.items()
        ):
            continue
        out.append(s)
    return out


def row_of(limit: Limit, value: str, now: float = 0.0) -> LimitStatus:
    """An empty row of ``limit`` for ``value`` (for examples and tests)."""
    from tbc_integrations._limits import row_status

    return row_status(limit.hold(value, now))


def _agents_cell(status: LimitStatus, money: bool) -> str:
    parts = []
    for name, spent in sorted(status.agents.items(), key=lambda kv: (-kv[1].tokens, kv[0])):
        text = f"{name} {spent.tokens:,}"
        if money:
            text += f" {format_dollars(spent.cost)}"
        parts.append(text + f" ({spent.calls})")
    return "; ".join(parts)


def scope_rows(
    statuses: Iterable[LimitStatus],
    by: str = "limit",
    *,
    scope: Mapping[str, str] | None = None,
    keys: Mapping[str, str] | None = None,
) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """The table of ``tbc report --by``: columns (``(heading, justify)``) and rows of text.

    ``by="limit"`` lists every row (columns ``limit`` and ``value``); any other ``by``
    lists the rows of the limits named (or keyed, see :func:`select_rows`) ``by``, one
    row per scope value and period (the first column is headed ``by``; ``limit`` is
    added when several limits share the key). Then: the period, tokens ``used`` and
    ``held``, the ``cap`` and what is ``left`` (``-``: no token cap); dollars when any
    row has money; ``warned``; and the agents' spend within the row, most first
    (``writer 1,200 (3)``: tokens, then calls).

    Raises:
        ContractError: no row matches (naming ``by`` and the limits there are).
    """
    keys = keys or {}
    every = list(statuses)
    rows = select_rows(every, scope, by, keys)
    if not rows and every:
        names = sorted({s.limit for s in every})
        raise ContractError(
            f"no limit row {'of ' + repr(by) + ' ' if by != 'limit' else ''}"
            f"{'in scope ' + repr(dict(scope)) + ' ' if scope else ''}(limits: {names})"
        )
    many = len({s.limit for s in rows}) > 1
    money = any(s.max_cost is not None or s.cost or s.cost_reserved for s in rows)
    if by == "limit":
        columns = [("limit", "left"), ("value", "left")]
    else:
        columns = [(by, "left"), *([("limit", "left")] if many else [])]
    columns += [(h, "right") for h in ("period", "used", "held", "cap", "left")]
    if money:
        columns += [(h, "right") for h in ("spent $", "cap $", "left $")]
    columns += [("warned", "left"), ("agents", "left")]
    out: list[list[str]] = []
    for s in sorted(rows, key=lambda s: (s.value, s.limit, s.ends or 0.0, s.period)):
        head = [s.limit, s.value] if by == "limit" else [s.value, *([s.limit] if many else [])]
        cells = [
            s.period,
            f"{s.consumed:,}",
            f"{s.reserved:,}",
            "-" if s.max_tokens is None else f"{s.max_tokens:,}",
            "-" if s.remaining is None else f"{s.remaining:,}",
        ]
        if money:
            cells += [
                format_dollars(s.cost),
                format_dollars(s.max_cost),
                format_dollars(s.cost_remaining),
            ]
        cells += ["yes" if s.warned else "", _agents_cell(s, money)]
        out.append(head + cells)
    return columns, out


def warning_rows(events: Iterable[BudgetEvent]) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """Every ``BudgetWarning`` of a log as a table: when, agent, what was crossed, spend.

    Example:
        >>> from tbc_integrations.events import BudgetWarning
        >>> warning_rows([BudgetWarning("a", 3.0, reason="agent", tokens=80)])[1]
        [['1970-01-01 00:00:03', 'a', 'agent a', '80', '$0.00']]
    """
    columns = [
        ("time (UTC)", "left"),
        ("agent", "left"),
        ("crossed", "left"),
        ("tokens", "right"),
        ("spent $", "right"),
    ]
    rows = []
    for e in events:
        if isinstance(e, BudgetWarning):
            what = (
                f"agent {e.agent}" if e.limit is None else f"{e.limit}={e.scope_value} ({e.period})"
            )
            rows.append(
                [
                    datetime.fromtimestamp(e.time, timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
                    e.agent,
                    what,
                    f"{e.tokens:,}",
                    format_dollars(e.cost_nanos),
                ]
            )
    return columns, rows


def current_rows(ledger: Ledger, scope: Mapping[str, Any]) -> list[LimitStatus]:
    """The rows of ``scope`` now: through the ledger's limits where it has them for a key
    (the period that holds now), else the store's latest row of the limit named like the
    key (a manager opened on a store, knowing no limits).

    Example:
        >>> from tbc_integrations import BudgetManager, Limit
        >>> m = BudgetManager(limits=[Limit("user", max_tokens=9)])
        >>> [s.remaining for s in current_rows(m, {"user": "u-1"})]
        [9]
    """
    given = check_scope(scope)
    known = ledger.status(scope=given)
    out = list(known.values())
    keyed = {limit.scope_key for limit in ledger.limits}
    for key, value in given.items():
        if key in keyed:
            continue
        rows = ledger.limit_statuses(key, value)
        if rows:
            out.append(max(rows, key=lambda s: (s.ends or float("inf"), s.period)))
    return out


def render_scope(statuses: Sequence[LimitStatus], width: int = 40) -> Any:
    """A rich renderable of one scope: a bar per limit row (used, held, free of its token
    cap, or of its money cap when it has only that) and each agent's spend beneath it."""
    _rich()
    from rich.table import Table
    from rich.text import Text

    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold")
    table.add_column()
    table.add_column(justify="right")
    for s in statuses:
        if s.max_tokens is not None or s.max_cost is None:
            cap, used, held = s.max_tokens, s.consumed, s.reserved
            figure = f"{used:,}/" + ("-" if cap is None else f"{cap:,}")
        else:
            cap = int(s.max_cost * 10**9)
            used, held = int(s.cost * 10**9), int(s.cost_reserved * 10**9)
            figure = f"{format_dollars(s.cost)}/{format_dollars(s.max_cost)}"
        top = max(cap or 0, used + held, 1)
        scale = width / top
        bar = Text()
        bar.append("█" * round(used * scale), style="red" if s.warned else "green")
        bar.append("▒" * round(held * scale), style="yellow")
        bar.append("·" * max(round(((cap or 0) - used - held) * scale), 0), style="dim")
        label = f"{s.limit}={s.value} ({s.period})" + (" warned" if s.warned else "")
        table.add_row(_markup(label), bar, figure)
        for name, spent in sorted(s.agents.items(), key=lambda kv: (-kv[1].tokens, kv[0])):
            share = Text("█" * round(spent.tokens * scale), style="cyan")
            table.add_row(
                _markup(f"  {name}"), share, f"{spent.tokens:,} {format_dollars(spent.cost)}"
            )
    if not statuses:
        table.add_row("no limit row in this scope yet", "", "")
    return table


@dataclass
class ScopeTimeline:
    """One scope's spend over time, per agent, within one limit's rows.

    Point ``i`` is after the ``i``-th call settled in the scope. A new period starts
    every agent at 0 again (``periods`` lists where, with its label).

    Attributes:
        limit: The limit whose rows are followed.
        value: The scope value.
        times: Seconds since the first point.
        spent: Agent to its tokens within the current row at each point.
        total: Every agent's tokens within the current row at each point.
        cap: The latest row's token cap (``None``: none known).
        warn: The latest row's warning line in tokens (``None``: none).
        periods: ``(point, period label)`` where each row starts.
    """

    limit: str
    value: str
    times: list[float] = field(default_factory=list)
    spent: dict[str, list[int]] = field(default_factory=dict)
    total: list[int] = field(default_factory=list)
    cap: int | None = None
    warn: int | None = None
    periods: list[tuple[int, str]] = field(default_factory=list)


def scope_timeline(
    events: Iterable[BudgetEvent],
    scope: Mapping[str, str],
    *,
    limits: Sequence[Limit] = (),
    start: float | None = None,
) -> ScopeTimeline:
    """Follow ``scope``'s first key (a limit's name or scope key) through the log's calls.

    Raises:
        ContractError: the scope is empty, or no call of the log was in it.
    """
    given = check_scope(scope)
    if not given:
        raise ContractError("give the scope to plot, e.g. --scope user=u-42")
    key, value = next(iter(given.items()))
    names = {limit.name for limit in limits if limit.scope_key == key} | {key}
    by_name = {limit.name: limit for limit in limits}
    line: ScopeTimeline | None = None
    current = ""
    counts: dict[str, int] = {}
    t0 = start
    for e in events:
        if not isinstance(e, Committed):
            continue
        hit = next(
            (k for k in e.limits if split_key(k)[0] in names and split_key(k)[1] == value), None
        )
        if hit is None:
            continue
        name, _, period = split_key(hit)
        if line is None:
            line = ScopeTimeline(name, value)
            t0 = e.time if t0 is None else t0
            line.times.append(0.0)
            line.total.append(0)
        if hit != current:
            current = hit
            counts = {}
            line.periods.append((len(line.times) - 1, period))
            limit = by_name.get(name)
            hold = None if limit is None else limit.hold(value, e.time)
            line.cap, line.warn = (None, None) if hold is None else (hold[1], hold[3])
        counts[e.agent] = counts.get(e.agent, 0) + e.tokens
        assert t0 is not None
        line.times.append(max(e.time - t0, 0.0))
        for agent in line.spent.keys() | counts.keys():
            series = line.spent.setdefault(agent, [0] * (len(line.times) - 1))
            series.append(counts.get(agent, 0))
        line.total.append(sum(counts.values()))
    if line is None:
        raise ContractError(f"no call of the log was in scope {key}={value}")
    return line


def plot_scope(line: ScopeTimeline, path: str | Path, *, title: str | None = None) -> Any:
    """Plot one scope's spend: a step line per agent and one for all of them, against
    the limit's cap (dashed) and warning line (dotted), periods marked; save a PNG.

    Names are drawn literally (:func:`~tbc_integrations.reporting.mpl_text`). Returns
    the matplotlib ``Figure``; its lines carry the series, labelled by agent (``all``:
    the total).
    """
    need_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [float(i) for i in range(len(line.times))]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for i, (name, values) in enumerate(sorted(line.spent.items())):
        ax.step(xs, values, where="post", label=mpl_text(name), linewidth=1.6, **line_style(i))
    ax.step(xs, line.total, where="post", label="all", color="black", linewidth=2.4)
    if line.cap is not None:
        ax.axhline(line.cap, color=_COLOURS[3], linestyle="--", label=f"cap {line.cap:,}")
    if line.warn is not None:
        ax.axhline(line.warn, color=_COLOURS[1], linestyle=":", label=f"warn at {line.warn:,}")
    for point, period in line.periods[1:]:
        ax.axvline(point, color="0.6", linewidth=0.8)
        ax.annotate(mpl_text(period), (point, 0), fontsize=7, rotation=90, va="bottom")
    top = max([*line.total, line.cap or 0, 1])
    ax.set_ylim(0, top * 1.12)
    ax.set_xlabel("calls settled in the scope")
    ax.set_ylabel("tokens in the period")
    ax.set_title(mpl_text(title or f"Tokens spent in {line.limit}={line.value}", limit=100))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig
