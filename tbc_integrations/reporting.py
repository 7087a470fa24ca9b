"""Seeing the budget: a report table, a timeline plot, and a live view (rich, matplotlib).

rich and matplotlib are imported only when these are used (``pip install
'tbc-integrations[cli]'``); without rich, :func:`render_report` and
:func:`plain_table` give the same table in plain text. Text that came from a
file or a caller (agent names, titles) is shown literally: rich markup is
escaped and control characters are written as ``\\xNN``.

Example:
    >>> from tbc_integrations import BudgetManager
    >>> from tbc_integrations.reporting import render_report
    >>> m = BudgetManager(); _ = m.register_agent("writer", max_tokens=500)
    >>> "writer" in render_report(m.status(), width=100)
    True
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from tbc_integrations._errors import MissingDependencyError
from tbc_integrations._ledger import Ledger
from tbc_integrations._money import dollars
from tbc_integrations._records import AgentStatus
from tbc_integrations.events import BudgetEvent
from tbc_integrations.replay import LedgerReplay

__all__ = [
    "Timeline",
    "format_dollars",
    "has_money",
    "have_rich",
    "literal",
    "live_view",
    "need_matplotlib",
    "plain_table",
    "plot_timeline",
    "render_report",
    "report_rows",
    "report_table",
    "rich_table",
    "timeline",
]

_MOVES = ("borrow", "overdraft", "reallocate")


def _rich() -> Any:
    try:
        import rich
    except ImportError as exc:
        raise MissingDependencyError(
            "the live view and rich tables need rich: pip install 'tbc-integrations[cli]'"
        ) from exc
    return rich


def have_rich() -> bool:
    """Whether rich is installed (the ``cli`` extra); without it tables are plain text.

    Example:
        >>> isinstance(have_rich(), bool)
        True
    """
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def literal(text: object, limit: int | None = None) -> str:
    """``text`` safe to print: control characters (escape sequences too) as ``\\xNN``.

    Longer than ``limit`` characters, it is cut with ``...``.

    Example:
        >>> literal("critic\\x1b[31m")
        'critic\\\\x1b[31m'
        >>> literal("a" * 10, limit=6)
        'aaa...'
    """
    out = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in str(text))
    if limit is not None and len(out) > limit:
        out = out[: max(limit - 3, 0)] + "..."
    return out


def _markup(text: object) -> str:
    """A cell or title for rich: literal, with rich markup escaped."""
    from rich.markup import escape

    return escape(literal(text))


def plain_table(
    columns: list[tuple[str, str]], rows: list[list[str]], title: str | None = None
) -> str:
    """A table in plain text: ``columns`` are ``(heading, "left" | "right")``.

    Example:
        >>> print(plain_table([("agent", "left"), ("tokens", "right")], [["a", "5"]]))
        agent  tokens
        -----  ------
        a           5
    """
    cells = [[literal(c) for c in row] for row in rows]
    heads = [literal(name) for name, _ in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(heads)]

    def line(values: list[str]) -> str:
        parts = [
            v.rjust(w) if justify == "right" else v.ljust(w)
            for v, w, (_, justify) in zip(values, widths, columns, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [literal(title)] if title else []
    out += [line(heads), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def format_dollars(amount: Decimal | int | None) -> str:
    """US dollars as a report shows them: exact to the nano-dollar, at least the cents.

    An ``int`` is nano-dollars (as events carry them); ``None`` (no cap) is ``"-"``.

    Example:
        >>> format_dollars(Decimal("0.0123")), format_dollars(Decimal("1234.5"))
        ('$0.0123', '$1,234.50')
        >>> format_dollars(45_000), format_dollars(Decimal("-0.5")), format_dollars(None)
        ('$0.000045', '-$0.50', '-')
    """
    if amount is None:
        return "-"
    value = dollars(amount) if isinstance(amount, int) else amount
    sign = "-" if value < 0 else ""
    value = abs(value).normalize()
    if value.as_tuple().exponent > -2:  # type: ignore[operator]
        value = value.quantize(Decimal("0.01"))
    return f"{sign}${value:,f}"


def has_money(statuses: Mapping[str, AgentStatus]) -> bool:
    """Whether any agent has spent or holds money, or has a cost cap (reports show dollars then).

    Example:
        >>> from tbc_integrations import BudgetManager
        >>> m = BudgetManager(); _ = m.register_agent("a", max_tokens=5)
        >>> has_money(m.status())
        False
    """
    return any(s.cost or s.cost_reserved or s.max_cost is not None for s in statuses.values())


def report_rows(
    statuses: Mapping[str, AgentStatus],
) -> tuple[list[tuple[str, str]], list[list[str]]]:
    """The report's columns (``(heading, justify)``) and rows of text, one row per agent.

    Columns: allocated, consumed, reserved, borrowed, lent, refusals; when any
    agent has a cost or a cost cap (:func:`has_money`), ``spent $``, and with any
    cap ``cap $`` and ``left $``; then confidence, state and (when any agent has
    dependencies) ``depends on``.

    Example:
        >>> from tbc_integrations import BudgetManager
        >>> m = BudgetManager(); _ = m.register_agent("a", max_tokens=5)
        >>> columns, rows = report_rows(m.status())
        >>> [c for c, _ in columns][:3], rows[0][:3]
        (['agent', 'allocated', 'consumed'], ['a', '5', '0'])
    """
    columns = [("agent", "left")]
    columns += [
        (name, "right")
        for name in ("allocated", "consumed", "reserved", "borrowed", "lent", "refusals")
    ]
    money = has_money(statuses)
    caps = any(s.max_cost is not None for s in statuses.values())
    if money:
        columns.append(("spent $", "right"))
    if caps:
        columns += [("cap $", "right"), ("left $", "right")]
    columns += [("confidence", "right"), ("state", "left")]
    deps = any(s.depends_on for s in statuses.values())
    if deps:
        columns.append(("depends on", "left"))
    rows: list[list[str]] = []
    for name, s in statuses.items():
        cost_cells = [format_dollars(s.cost)] if money else []
        if caps:
            cost_cells += [format_dollars(s.max_cost), format_dollars(s.cost_remaining)]
        state = []
        if s.gated:
            state.append("gated")
        if s.complete:
            state.append("complete")
        if s.overdraft:
            state.append(f"overdrawn {s.overdraft}")
        if s.cost_remaining is not None and s.cost_remaining < 0:
            state.append(f"over cost cap {format_dollars(-s.cost_remaining)}")
        rows.append(
            [
                name,
                f"{s.allocated:,}",
                f"{s.consumed:,}",
                f"{s.reserved:,}",
                f"{s.borrowed:,}",
                f"{s.lent:,}",
                str(s.refusals),
                *cost_cells,
                "-" if s.last_confidence is None else f"{s.last_confidence:.2f}",
                ", ".join(state),
                *([", ".join(s.depends_on)] if deps else []),
            ]
        )
    return columns, rows


def rich_table(
    columns: list[tuple[str, str]], rows: list[list[str]], title: str | None = None
) -> Any:
    """:func:`plain_table` as a rich ``Table`` (needs rich); every cell printed literally.

    The first column is bold and never wrapped, nor are the right-justified ones.

    Example:
        >>> from rich.console import Console
        >>> console = Console(width=40, file=io.StringIO(), record=True)
        >>> console.print(rich_table([("agent", "left")], [["critic[/]"]]))
        >>> "critic[/]" in console.export_text()
        True
    """
    _rich()
    from rich.table import Table

    table = Table(title=None if title is None else _markup(title))
    for i, (heading, justify) in enumerate(columns):
        if i == 0:
            longest = max((len(literal(r[0])) for r in rows), default=len(heading))
            table.add_column(
                _markup(heading), style="bold", no_wrap=True, min_width=max(longest, 5)
            )
        elif justify == "right":
            table.add_column(_markup(heading), justify="right", no_wrap=True)
        else:
            table.add_column(_markup(heading))
    for row in rows:
        table.add_row(*(_markup(cell) for cell in row))
    return table


def report_table(statuses: Mapping[str, AgentStatus], title: str = "Token budgets") -> Any:
    """A rich ``Table`` of :func:`report_rows`: tokens, then money when there is any.

    Agent names and the title are printed literally (markup escaped).
    """
    columns, rows = report_rows(statuses)
    return rich_table(columns, rows, title)


def render_report(statuses: Mapping[str, AgentStatus], width: int = 110) -> str:
    """The report table as plain text (for logs and tests); :func:`plain_table` without rich."""
    if not have_rich():
        return plain_table(*report_rows(statuses), title="Token budgets")
    from rich.console import Console

    console = Console(width=width, record=True, file=io.StringIO())
    console.print(report_table(statuses))
    return console.export_text()


@dataclass
class Timeline:
    """Remaining budget per agent after every event, and where budget moved.

    Attributes:
        times: Seconds since the first point, one per point.
        remaining: Agent to its remaining budget at each point.
        moves: ``(time, receiver, tokens)`` for every transfer to a needy agent.
        spent: Agent to the money it had spent at each point, in nano-dollars
            (from the starting status plus every commit's ``cost_nanos``).
    """

    times: list[float] = field(default_factory=list)
    remaining: dict[str, list[int]] = field(default_factory=dict)
    moves: list[tuple[float, str, int]] = field(default_factory=list)
    spent: dict[str, list[int]] = field(default_factory=dict)

    def total_spent(self, agent: str) -> Decimal:
        """The money ``agent`` had spent at the last point, in US dollars.

        Example:
            >>> Timeline(spent={"a": [0, 1_500_000]}).total_spent("a")
            Decimal('0.0015')
        """
        values = self.spent.get(agent)
        return dollars(values[-1] if values else 0)


def timeline(
    replay: LedgerReplay, events: list[BudgetEvent], start: float | None = None
) -> Timeline:
    """Apply ``events`` to ``replay`` and record each agent's remaining after every one."""
    t0 = start if start is not None else (events[0].time if events else 0.0)
    line = Timeline()
    spent = {name: _nanos(s.cost) for name, s in replay.status().items()}

    def point(at: float) -> None:
        line.times.append(max(at - t0, 0.0))
        for name, s in replay.status().items():
            line.remaining.setdefault(name, []).append(s.remaining)
            line.spent.setdefault(name, []).append(spent.get(name, 0))

    point(t0)
    for event in events:
        replay.apply(event)
        if event.kind == "commit":
            spent[event.agent] = spent.get(event.agent, 0) + event.cost_nanos
        point(event.time)
        if event.kind == "transfer" and event.reason in _MOVES:
            line.moves.append((max(event.time - t0, 0.0), event.agent, event.tokens))
    return line


def _nanos(amount: Decimal) -> int:
    return int(amount * 1_000_000_000)


def need_matplotlib() -> None:
    """Raise :class:`~tbc_integrations.MissingDependencyError` naming the extra unless
    matplotlib is installed (plots need it).

    Example:
        >>> need_matplotlib()  # installed here: nothing happens
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            "plots need matplotlib: pip install 'tbc-integrations[cli]'"
        ) from exc


def plot_timeline(
    line: Timeline, path: str | Path, *, title: str = "Remaining budget per agent"
) -> Any:
    """Plot remaining budget per agent over time, reallocations marked; save a PNG.

    When money was spent, each agent's legend entry gives its dollars spent
    (``"writer ($0.0012)"``). Returns the matplotlib ``Figure`` (its lines carry
    the plotted series).
    """
    need_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    money = any(values and values[-1] for values in line.spent.values())
    for name, values in line.remaining.items():
        label = f"{name} ({format_dollars(line.total_spent(name))})" if money else name
        ax.step(line.times, values, where="post", label=label, linewidth=1.6)
    if line.moves:
        xs = [t for t, _, _ in line.moves]
        ys = [
            line.remaining[a][line.times.index(t)] if t in line.times else 0
            for t, a, _ in line.moves
        ]
        ax.scatter(xs, ys, marker="v", color="black", zorder=3, label="reallocation")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("remaining tokens")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


def render_bars(statuses: Mapping[str, AgentStatus], width: int = 40) -> Any:
    """A rich renderable: one bar per agent (consumed, reserved, borrowed, free).

    Beside each bar: tokens consumed of allocated, then, when any agent has
    money (:func:`has_money`), dollars spent (of the cap, where there is one).
    """
    _rich()
    from rich.table import Table
    from rich.text import Text

    table = Table.grid(padding=(0, 1))
    table.add_column(style="bold")
    table.add_column()
    table.add_column(justify="right")
    money = has_money(statuses)
    if money:
        table.add_column(justify="right")
    top = (
        max((max(s.allocated, s.consumed + s.reserved) for s in statuses.values()), default=1) or 1
    )
    for name, s in statuses.items():
        scale = width / top
        used = round(s.consumed * scale)
        held = round(s.reserved * scale)
        lent_in = min(round(s.borrowed * scale), used + held)
        free = max(round(max(s.remaining, 0) * scale), 0)
        bar = Text()
        bar.append("█" * max(used - lent_in, 0), style="green")
        bar.append("█" * lent_in, style="magenta")
        bar.append("▒" * held, style="yellow")
        bar.append("·" * free, style="dim")
        spent = format_dollars(s.cost)
        if s.max_cost is not None:
            spent += f"/{format_dollars(s.max_cost)}"
        table.add_row(
            _markup(name), bar, f"{s.consumed:,}/{s.allocated:,}", *([spent] if money else [])
        )
    legend = Text("█ consumed  ", style="green")
    legend.append("█ borrowed  ", style="magenta")
    legend.append("▒ reserved  ", style="yellow")
    legend.append("· free", style="dim")
    table.add_row("", legend, "", *([""] if money else []))
    return table


@contextmanager
def live_view(
    ledger: Ledger,
    *,
    refresh_per_second: float = 4.0,
    console: Any = None,
    enabled: bool | None = None,
) -> Iterator[Callable[[], None]]:
    """Show one bar per agent, refreshing while the block runs (off when not a terminal).

    Yields a function that forces a refresh.
    """
    _rich()
    from rich.console import Console
    from rich.live import Live

    console = console or Console(file=sys.stdout)
    on = console.is_terminal if enabled is None else enabled
    if not on:
        yield lambda: None
        return
    with Live(
        render_bars(ledger.status()),
        console=console,
        refresh_per_second=refresh_per_second,
        transient=False,
        get_renderable=lambda: render_bars(ledger.status()),
    ) as live:
        yield live.refresh
