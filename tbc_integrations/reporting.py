"""Seeing the budget: a report table, a timeline plot, bars, and a live view (rich, matplotlib).

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
    "Loan",
    "Timeline",
    "format_dollars",
    "has_money",
    "have_rich",
    "line_style",
    "literal",
    "live_view",
    "mpl_text",
    "need_matplotlib",
    "plain_table",
    "plot_budgets",
    "plot_timeline",
    "render_report",
    "report_rows",
    "report_table",
    "rich_table",
    "timeline",
    "view",
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
        if s.warned:
            state.append("warned")
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


@dataclass(frozen=True)
class Loan:
    """Tokens that moved from a donor to a needy agent, at one point of a :class:`Timeline`.

    Attributes:
        point: The index of the point just after the transfer (its x in events).
        time: Seconds since the first point.
        donor: The agent that gave the tokens.
        receiver: The agent that got them.
        tokens: How many.
        reason: ``"borrow"``, ``"overdraft"`` or ``"reallocate"``.
    """

    point: int
    time: float
    donor: str
    receiver: str
    tokens: int
    reason: str


@dataclass
class Timeline:
    """Remaining budget per agent after every event, and where budget moved.

    Point ``i`` is the ledger after the ``i``-th event (point 0: before any).

    Attributes:
        times: Seconds since the first point, one per point.
        remaining: Agent to its remaining budget at each point (an agent that
            registered after the start has values for the last points only).
        moves: ``(time, receiver, tokens)`` for every transfer to a needy agent.
        spent: Agent to the money it had spent at each point, in nano-dollars
            (from the starting status plus every commit's ``cost_nanos``).
        loans: Every transfer to a needy agent, one :class:`Loan` per donor.
    """

    times: list[float] = field(default_factory=list)
    remaining: dict[str, list[int]] = field(default_factory=dict)
    moves: list[tuple[float, str, int]] = field(default_factory=list)
    spent: dict[str, list[int]] = field(default_factory=dict)
    loans: list[Loan] = field(default_factory=list)

    def total_spent(self, agent: str) -> Decimal:
        """The money ``agent`` had spent at the last point, in US dollars.

        Example:
            >>> Timeline(spent={"a": [0, 1_500_000]}).total_spent("a")
            Decimal('0.0015')
        """
        values = self.spent.get(agent)
        return dollars(values[-1] if values else 0)


def timeline(
    replay: LedgerReplay,
    events: list[BudgetEvent],
    start: float | None = None,
    run: str | None = None,
) -> Timeline:
    """Apply ``events`` to ``replay`` and record each agent's remaining after every one.

    With ``run``, the agents are that run's own team (a manager with ``team_per=``):
    every event is applied, and only the run's own are recorded.
    """
    t0 = start if start is not None else (events[0].time if events else 0.0)
    line = Timeline()

    def team() -> dict[str, AgentStatus]:
        return replay.status() if run is None else replay.team_status(run)

    spent = {name: _nanos(s.cost) for name, s in team().items()}

    def point(at: float) -> None:
        line.times.append(max(at - t0, 0.0))
        for name, s in team().items():
            line.remaining.setdefault(name, []).append(s.remaining)
            line.spent.setdefault(name, []).append(spent.get(name, 0))

    point(t0)
    for event in events:
        replay.apply(event)
        if run is not None and event.run != run:
            continue  # another run's team, or the template's
        if event.kind == "commit":
            spent[event.agent] = spent.get(event.agent, 0) + event.cost_nanos
        point(event.time)
        if event.kind == "transfer" and event.reason in _MOVES:
            at = max(event.time - t0, 0.0)
            line.moves.append((at, event.agent, event.tokens))
            index = len(line.times) - 1
            line.loans += [
                Loan(index, at, donor, event.agent, tokens, event.reason)
                for donor, tokens in event.donors
            ]
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


def mpl_text(text: object, limit: int | None = 40) -> str:
    """``text`` as matplotlib draws it literally: control characters dropped, ``$`` escaped.

    (Between two ``$`` matplotlib would read math.) Longer than ``limit``
    characters, it is cut with ``...``.

    Example:
        >>> print(mpl_text("cost $5 \\x1b[31mred$"))
        cost \\$5 [31mred\\$
        >>> mpl_text("a" * 10, limit=6)
        'aaa...'
    """
    out = "".join(c for c in str(text) if c.isprintable())
    if limit is not None and len(out) > limit:
        out = out[: max(limit - 3, 0)] + "..."
    return out.replace("$", r"\$")


REAL_TIME_AFTER = 10.0
"""A run longer than this many seconds is plotted against time; a shorter one against events."""

_COLOURS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
_DASHES: tuple[Any, ...] = (
    "-",
    (0, (6, 2)),
    (0, (1, 1.5)),
    (0, (6, 2, 1.5, 2)),
    (0, (10, 3)),
    (0, (3, 1.5, 1, 1.5, 1, 1.5)),
    (0, (2, 3)),
    (0, (12, 2, 2, 2)),
)
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "h", "<")


def line_style(index: int) -> dict[str, Any]:
    """The colour, line style and marker of the ``index``-th agent's line (40 distinct ones).

    The first eight differ in all three, so lines that run together stay apart.

    Example:
        >>> line_style(0) == line_style(40), line_style(0) != line_style(10)
        (True, True)
    """
    i = index % (len(_COLOURS) * len(_DASHES))
    return {
        "color": _COLOURS[i % len(_COLOURS)],
        "linestyle": _DASHES[i % len(_DASHES)],
        "marker": _MARKERS[i % len(_MARKERS)],
    }


def _tail_style(index: int) -> dict[str, Any]:
    return {"linestyles": [line_style(index)["linestyle"]]}


def _spread(values: list[float], gap: float) -> list[float]:
    """``values`` moved apart (in their order) so that neighbours are at least ``gap`` apart."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    placed = [values[i] for i in order]
    for k in range(1, len(placed)):
        placed[k] = max(placed[k], placed[k - 1] + gap)
    # centre the moved block on the original values, so labels drift both ways
    shift = (sum(placed) - sum(values)) / max(len(values), 1)
    out = [0.0] * len(values)
    for k, i in enumerate(order):
        out[i] = placed[k] - shift
    # never closer than gap after the shift either
    return out


def plot_timeline(
    line: Timeline, path: str | Path, *, title: str = "Remaining budget per agent"
) -> Any:
    """Plot remaining budget per agent, loans drawn from donor to borrower; save a PNG.

    The x axis counts ledger events (point 0: before the first), or seconds when
    the run lasted longer than :data:`REAL_TIME_AFTER`. Every agent's line has its
    own colour, line style and marker (the markers sit where its budget changed),
    and its name at its right end; when money was spent, the name gives the
    dollars spent (``"writer ($0.0012)"``). Each loan is an arrow from the donor's
    line to the borrower's, labelled ``donor → borrower: tokens``. Agent names are
    drawn literally (:func:`mpl_text`). Returns the matplotlib ``Figure``: its
    lines carry the plotted series, labelled with the agents' names.
    """
    need_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    real_time = bool(line.times) and line.times[-1] > REAL_TIME_AFTER
    xs: list[float] = list(line.times) if real_time else [float(i) for i in range(len(line.times))]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    money = any(values and values[-1] for values in line.spent.values())
    ends: list[tuple[str, float, float, str]] = []  # label, x, y, colour
    top = max((max(v) for v in line.remaining.values() if v), default=1)
    low = min((min(v) for v in line.remaining.values() if v), default=0)
    for i, (name, values) in enumerate(line.remaining.items()):
        style = line_style(i)
        own_x = xs[len(xs) - len(values) :]  # an agent registered late has the last points
        changes = [0] + [k for k in range(1, len(values)) if values[k] != values[k - 1]]
        ax.step(
            own_x,
            values,
            where="post",
            label=mpl_text(name),
            linewidth=2.0,
            markersize=5,
            markevery=changes,
            zorder=2 + i * 0.01,
            **style,
        )
        if values:
            text = mpl_text(name)
            if money:
                text += f" ({mpl_text(format_dollars(line.total_spent(name)))})"
            ends.append((text, own_x[-1], float(values[-1]), style["color"]))
    span = max(top - low, 1)
    ax.set_ylim(low - 0.06 * span, top + 0.08 * span)
    # the loans: an arrow from the donor's line (before) to the borrower's (after)
    for loan in line.loans:
        x = loan.time if real_time else float(loan.point)
        before, after = line.remaining.get(loan.donor), line.remaining.get(loan.receiver)
        if not before or not after:
            continue
        k = loan.point - (len(xs) - len(before))
        y0 = before[max(k - 1, 0)] if 0 <= k < len(before) + 1 else before[0]
        j = loan.point - (len(xs) - len(after))
        y1 = after[j] if 0 <= j < len(after) else after[-1]
        ax.annotate(
            "",
            xy=(x, y1),
            xytext=(x, y0),
            arrowprops={
                "arrowstyle": "-|>",
                "color": "black",
                "linewidth": 1.4,
                "connectionstyle": "arc3,rad=-0.5",
                "shrinkA": 2,
                "shrinkB": 2,
            },
            zorder=4,
        )
        ax.annotate(
            f"{mpl_text(loan.donor, 20)} → {mpl_text(loan.receiver, 20)}: {loan.tokens:,}"
            + ("" if loan.reason == "borrow" else f" ({loan.reason})"),
            xy=(x, (y0 + y1) / 2),
            xytext=(8, 0),
            textcoords="offset points",
            fontsize=8,
            va="center",
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "0.6"},
            zorder=5,
        )
    # a short tail past the last point, so a change at the last event shows its new level;
    # then the names at the lines' ends, spread apart where lines end close together
    x_start, x_end = (xs[0], xs[-1]) if xs else (0.0, 0.0)
    tail = 0.03 * (x_end - x_start) if x_end > x_start else 0.5
    for i, (_, _, y, colour) in enumerate(ends):
        ax.hlines(y, x_end, x_end + tail, colors=colour, linewidth=2.0, **_tail_style(i))
    bottom, upper = ax.get_ylim()
    ys = _spread([y for _, _, y, _ in ends], gap=0.065 * (upper - bottom))
    for (text, _, y, colour), label_y in zip(ends, ys, strict=True):
        ax.annotate(
            text,
            xy=(x_end + tail, y),
            xytext=(1.02, label_y),
            textcoords=("axes fraction", "data"),
            fontsize=8,
            color=colour,
            va="center",
            annotation_clip=False,
            arrowprops={"arrowstyle": "-", "color": colour, "linewidth": 0.6, "alpha": 0.7},
        )
    ax.set_xlim(x_start, x_end + tail)
    ax.set_xlabel("seconds since start" if real_time else "ledger events since start")
    if not real_time:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("remaining tokens")
    ax.set_title(mpl_text(title, limit=100))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return fig


BAR_FIELDS = ("allocated", "consumed", "borrowed", "lent")
"""What :func:`plot_budgets` draws for each agent, one bar each."""


def plot_budgets(
    statuses: Mapping[str, AgentStatus],
    path: str | Path,
    *,
    title: str = "Budgets per agent",
) -> Any:
    """Bars per agent (allocated, consumed, borrowed, lent) with their values; save a PNG.

    The scale is logarithmic when the largest bar is over 50 times the smallest
    non-zero one, with room above the tallest bar so that nothing is cut; every
    bar carries its value (a zero bar only its ``0``). Agent names are drawn
    literally (:func:`mpl_text`). Returns the matplotlib ``Figure``.
    """
    need_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(statuses)
    values = {key: [int(getattr(statuses[a], key)) for a in names] for key in BAR_FIELDS}
    every = [v for column in values.values() for v in column]
    top = max(every, default=0) or 1
    smallest = min((v for v in every if v > 0), default=top)
    log = top / smallest > 50
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 + 1.8 * len(names)), 3.8))
    width = 0.8 / len(BAR_FIELDS)
    floor = 0.6 if log else 0.0  # where a log scale's bars start
    for i, key in enumerate(BAR_FIELDS):
        xs = [n + (i - (len(BAR_FIELDS) - 1) / 2) * width for n in range(len(names))]
        heights = [max(v, floor) - floor for v in values[key]]
        bars = ax.bar(xs, heights, width, bottom=floor, label=key, color=_COLOURS[i])
        ax.bar_label(bars, labels=[f"{v:,}" for v in values[key]], padding=2, fontsize=8)
    if log:
        ax.set_yscale("log")
        ax.set_ylim(floor, top * 4)  # a decade and a half above the tallest bar: its label fits
    else:
        ax.set_ylim(0, top * 1.18)
    ax.set_xticks(range(len(names)), [mpl_text(a) for a in names])
    ax.set_ylabel("tokens" + (" (log scale)" if log else ""))
    ax.set_title(mpl_text(title, limit=100))
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=80)
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
    scope: Mapping[str, Any] | None = None,
) -> Iterator[Callable[[], None]]:
    """Show one bar per agent, refreshing while the block runs (off when not a terminal).

    With ``scope`` (``{"user": "u-42"}``), show that scope instead: a bar per limit row
    of it and each agent's spend within it (see
    :func:`~tbc_integrations.scope_report.render_scope`).

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
        view(ledger, scope),
        console=console,
        refresh_per_second=refresh_per_second,
        transient=False,
        get_renderable=lambda: view(ledger, scope),
    ) as live:
        yield live.refresh


def view(ledger: Ledger, scope: Mapping[str, Any] | None = None, run: str | None = None) -> Any:
    """What the live view shows now: the agents' bars, one scope's (with ``scope``), or
    one run's own team's (with ``run``, on a manager with ``team_per=``).

    Example:
        >>> from tbc_integrations import BudgetManager
        >>> view(BudgetManager()).__class__.__name__
        'Table'
    """
    if run is not None:
        return render_bars(ledger.team_status(run))
    if scope is None:
        return render_bars(ledger.status())
    from tbc_integrations.scope_report import current_rows, render_scope

    return render_scope(current_rows(ledger, scope))
