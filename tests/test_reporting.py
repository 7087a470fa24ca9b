"""Report table, timeline plot (read back from the PNG and the figure), and the live view."""

from __future__ import annotations

import io
import struct
from decimal import Decimal
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from rich.console import Console

from tbc_integrations import BudgetManager, ModelPrice, Usage
from tbc_integrations.events import BudgetEvent
from tbc_integrations.replay import LedgerReplay
from tbc_integrations.reporting import (
    Timeline,
    format_dollars,
    has_money,
    line_style,
    live_view,
    mpl_text,
    plot_budgets,
    plot_timeline,
    render_report,
    timeline,
)


def scripted_run() -> tuple[BudgetManager, LedgerReplay, list[BudgetEvent]]:
    m = BudgetManager()
    m.register_agent("donor", priority=1, max_tokens=1_000)
    m.register_agent("needy", priority=2, max_tokens=100)
    start = LedgerReplay(m.contracts)
    events: list[BudgetEvent] = []
    m.subscribe(events.append)
    r = m.reserve("needy", 50, 100)  # borrows 50
    m.commit(r, Usage(50, 80))  # keeps 30, returns 20
    with m.spend("donor", 100, 100) as call:
        call.set_usage((100, 50))
    return m, start, events


def test_timeline_tracks_remaining_and_moves() -> None:
    m, start, events = scripted_run()
    line = timeline(start, events)
    assert len(line.times) == len(events) + 1
    assert line.remaining["needy"][0] == 100 and line.remaining["needy"][-1] == 0
    assert line.remaining["donor"][-1] == m.status()["donor"].remaining == 820
    assert [(agent, tokens) for _, agent, tokens in line.moves] == [("needy", 50)]


def test_plot_png_size_and_plotted_series(tmp_path: Path) -> None:
    _, start, events = scripted_run()
    line = timeline(start, events)
    path = tmp_path / "plot.png"
    fig = plot_timeline(line, path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (900, 450)
    ax = fig.axes[0]
    series = {ln.get_label(): list(ln.get_ydata()) for ln in ax.get_lines()}
    assert series["needy"] == line.remaining["needy"]
    assert series["donor"] == line.remaining["donor"]
    # the x axis counts ledger events: point i is the ledger after the i-th event
    assert ax.get_xlabel() == "ledger events since start"
    assert list(ax.get_lines()[0].get_xdata()) == list(range(len(events) + 1))
    assert ax.get_ylabel() == "remaining tokens"
    # the one loan: an arrow from the donor's line (before) to the borrower's (after)
    labels = [t for t in ax.texts if "→" in t.get_text()]
    assert [t.get_text() for t in labels] == ["donor → needy: 50"]
    (loan,) = line.loans
    arrows = [t for t in ax.texts if t.get_text() == "" and t.arrow_patch is not None]
    assert len(arrows) == 1
    assert arrows[0].xyann == (loan.point, line.remaining["donor"][loan.point - 1])
    assert arrows[0].xy == (loan.point, line.remaining["needy"][loan.point])


def test_report_text_has_every_agent_and_column() -> None:
    m, _, _ = scripted_run()
    m.record_confidence("needy", 0.42)
    text = render_report(m.status(), width=140)
    for word in ("donor", "needy", "allocated", "consumed", "borrowed", "lent", "0.42"):
        assert word in text


def test_live_view_draws_bars_on_a_terminal_and_stays_off_otherwise() -> None:
    m, _, _ = scripted_run()
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    with live_view(m, console=console, refresh_per_second=20) as refresh:
        m.record_usage("donor", 10)
        refresh()
    drawn = buffer.getvalue()
    assert "donor" in drawn and "needy" in drawn and "█" in drawn and "consumed" in drawn
    quiet = io.StringIO()
    with live_view(m, console=Console(file=quiet)):  # not a terminal
        pass
    assert quiet.getvalue() == ""


def test_report_shows_the_dependency_graph() -> None:
    m = BudgetManager()
    m.register_agent("researcher", max_tokens=10)
    m.register_agent("writer", max_tokens=10, depends_on=["researcher"])
    text = render_report(m.status(), width=160)
    assert "depends on" in text
    row = next(line for line in text.splitlines() if "writer" in line)
    assert "researcher" in row


def priced_run() -> BudgetManager:
    m = BudgetManager(prices={"m": ModelPrice(input="0.15", output="0.60")})
    m.register_agent("capped", max_tokens=1_000, max_cost="0.01")
    m.register_agent("free", max_tokens=2_000)
    m.commit(m.reserve("capped", 100, 100, model="m"), Usage(100, 50))  # $0.000045
    m.commit(m.reserve("free", 1_000, 100, model="m"), Usage(1_000, 50))  # $0.00018
    return m


def test_format_dollars() -> None:
    assert format_dollars(Decimal("0.0123")) == "$0.0123"
    assert format_dollars(Decimal("0")) == "$0.00"
    assert format_dollars(Decimal("1234.5")) == "$1,234.50"
    assert format_dollars(Decimal("-0.000045")) == "-$0.000045"
    assert format_dollars(45_000) == "$0.000045"  # nano-dollars
    assert format_dollars(None) == "-"


def test_report_shows_money_beside_tokens() -> None:
    m = priced_run()
    text = render_report(m.status(), width=160)
    header = next(line for line in text.splitlines() if "agent" in line)
    for column in ("allocated", "consumed", "spent $", "cap $", "left $"):
        assert column in header
    capped = next(line for line in text.splitlines() if "capped" in line)
    assert "150" in capped and "$0.000045" in capped and "$0.01" in capped
    assert "$0.009955" in capped  # 0.01 - 0.000045
    free = next(line for line in text.splitlines() if "free" in line)
    assert "$0.00018" in free and free.count(" - ") >= 2  # no cap, nothing left to show
    assert m.report()["capped"] == {"allocated": 1_000, "consumed": 150, "remaining": 850}


def test_report_without_money_has_no_money_columns() -> None:
    m, _, _ = scripted_run()
    assert not has_money(m.status())
    assert "$" not in render_report(m.status(), width=160)
    spent_only = priced_run()
    spent_only_text = render_report({"free": spent_only.status()["free"]}, width=160)
    assert "spent $" in spent_only_text and "cap $" not in spent_only_text


def test_report_marks_an_agent_over_its_cost_cap() -> None:
    m = BudgetManager(prices={"m": ModelPrice(input=1, output=1)})
    m.register_agent("a", max_tokens=10_000, max_cost="0.001")
    m.commit(m.reserve("a", 500, 500, model="m"), Usage(2_000, 500))  # $0.0025, $0.0015 over
    row = next(line for line in render_report(m.status(), width=200).splitlines() if "│ a" in line)
    assert "$0.0025" in row and "-$0.0015" in row and "over cost cap $0.0015" in row


def test_timeline_and_plot_carry_dollars(tmp_path: Path) -> None:
    m = BudgetManager(prices={"m": ModelPrice(input="0.15", output="0.60")})
    m.register_agent("a", max_tokens=1_000)
    start = LedgerReplay(m.contracts)
    events: list[BudgetEvent] = []
    m.subscribe(events.append)
    m.commit(m.reserve("a", 100, 100, model="m"), Usage(100, 50))
    m.commit(m.reserve("a", 100, 100, model="m"), Usage(100, 100))
    line = timeline(start, events)
    assert line.spent["a"] == [0, 0, 45_000, 45_000, 120_000]  # $0.000045 + $0.000075
    assert line.total_spent("a") == Decimal("0.00012") == m.status()["a"].cost
    fig = plot_timeline(line, tmp_path / "plot.png")
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["a"]
    assert [t.get_text() for t in fig.axes[0].texts] == [r"a (\$0.00012)"]  # at the line's end


def test_live_view_shows_dollars_spent_of_the_cap() -> None:
    m = priced_run()
    buffer = io.StringIO()
    with live_view(m, console=Console(file=buffer, force_terminal=True, width=120)) as refresh:
        refresh()
    drawn = buffer.getvalue()
    assert "$0.000045/$0.01" in drawn and "$0.00018" in drawn


def demo_like_timeline() -> Timeline:
    """Six agents, two of them with the same budget all along (their lines coincide)."""
    m = BudgetManager()
    for i, name in enumerate(["planner", "researcher_a", "researcher_b", "critic", "writer"]):
        m.register_agent(name, priority=i % 3 + 1, max_tokens=150 if i == 1 else 400 + 100 * i)
    m.register_agent("short_writer", priority=1, max_tokens=150)
    start = LedgerReplay(m.contracts)
    events: list[BudgetEvent] = []
    m.subscribe(events.append)
    m.commit(m.reserve("researcher_a", 100, 120), Usage(100, 110))  # borrows 70
    m.commit(m.reserve("writer", 200, 100), Usage(200, 90))
    return timeline(start, events)


def test_every_line_has_its_own_style_and_its_name_at_its_end(tmp_path: Path) -> None:
    line = demo_like_timeline()
    fig = plot_timeline(line, tmp_path / "plot.png")
    ax = fig.axes[0]
    lines = ax.get_lines()
    assert [(ln.get_color(), ln.get_marker()) for ln in lines] == [
        (line_style(i)["color"], line_style(i)["marker"]) for i in range(6)
    ]
    # six colours, six markers and six dash patterns: lines that coincide stay visible
    for key in ("color", "marker", "linestyle"):
        assert len({repr(line_style(i)[key]) for i in range(6)}) == 6
    ends = {t.get_text(): t for t in ax.texts if "→" not in t.get_text() and t.get_text()}
    assert set(ends) == set(line.remaining)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # type: ignore[no-untyped-call]
    renderer = canvas.get_renderer()  # type: ignore[no-untyped-call]
    width, height = fig.bbox.width, fig.bbox.height
    boxes = [t.get_window_extent(renderer) for t in ends.values()]
    for box in boxes:  # inside the picture, right of the axes
        assert box.x0 >= 0 and box.x1 <= width and box.y0 >= 0 and box.y1 <= height
        assert box.x0 >= ax.get_window_extent(renderer).x1
    # researcher_a and short_writer end on the same value: their labels do not overlap
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            assert not a.overlaps(b)


def test_a_long_run_is_plotted_against_time(tmp_path: Path) -> None:
    line = Timeline(times=[0.0, 4.0, 30.0], remaining={"a": [10, 5, 0]})
    fig = plot_timeline(line, tmp_path / "plot.png")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "seconds since start"
    assert list(ax.get_lines()[0].get_xdata()) == [0.0, 4.0, 30.0]
    short = Timeline(times=[0.0, 0.004, 0.009], remaining={"a": [10, 5, 0]})
    ax = plot_timeline(short, tmp_path / "short.png").axes[0]
    assert ax.get_xlabel() == "ledger events since start"
    assert ax.get_xlim()[0] == 0.0 and 2.0 < ax.get_xlim()[1] < 2.2  # 2 events, and a tail


def test_names_with_dollars_and_escapes_are_drawn_literally(tmp_path: Path) -> None:
    name = "cost $x^{$ \x1b[31mred"  # unescaped, matplotlib's mathtext fails on this
    line = Timeline(times=[0.0, 1.0], remaining={name: [10, 5], "b": [3, 3]})
    fig = plot_timeline(line, tmp_path / "plot.png", title="$ per $^")
    ax = fig.axes[0]
    assert ax.get_lines()[0].get_label() == r"cost \$x^{\$ [31mred"
    assert r"cost \$x^{\$ [31mred" in [t.get_text() for t in ax.texts]
    assert ax.get_title() == r"\$ per \$^"
    assert mpl_text("a\nb\x00$") == r"ab\$"


def test_an_agent_registered_after_the_start_is_plotted_from_where_it_came(
    tmp_path: Path,
) -> None:
    m = BudgetManager()
    m.register_agent("early", max_tokens=100)
    start = LedgerReplay(m.contracts)
    events: list[BudgetEvent] = []
    m.subscribe(events.append)
    m.record_usage("early", 10)
    m.register_agent("late", max_tokens=50)
    m.record_usage("late", 5)
    line = timeline(start, events)
    fig = plot_timeline(line, tmp_path / "plot.png")
    late = next(ln for ln in fig.axes[0].get_lines() if ln.get_label() == "late")
    assert list(late.get_ydata()) == line.remaining["late"]
    assert list(late.get_xdata())[-1] == len(line.times) - 1


def test_budget_bars_fit_in_their_axes_and_carry_their_values(tmp_path: Path) -> None:
    m = BudgetManager()
    m.register_agent("Researcher", priority=3, max_tokens=100)
    m.register_agent("Writer $2", priority=1, max_tokens=3_000)
    m.commit(m.reserve("Researcher", 60, 55), Usage(60, 55))  # borrows 15 of the writer's
    m.record_usage("Writer $2", 154)
    fig = plot_budgets(m.status(), tmp_path / "bars.png", title="Crew budgets")
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"  # 2,985 against 15
    bars = [p for p in ax.patches if p.get_height() > 0]
    tallest = max(bars, key=lambda p: p.get_y() + p.get_height())
    assert tallest.get_y() + tallest.get_height() == 2_985
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # type: ignore[no-untyped-call]
    renderer = canvas.get_renderer()  # type: ignore[no-untyped-call]
    frame = ax.get_window_extent(renderer)
    for bar in bars:  # every bar, the tallest too, ends inside the axes
        assert frame.y0 <= bar.get_window_extent(renderer).y1 < frame.y1
    values = list(ax.texts)
    assert sorted(t.get_text() for t in values) == sorted(
        ["115", "115", "15", "0", "2,985", "154", "0", "15"]
    )
    for text in values:  # and so is every bar's value
        box = text.get_window_extent(renderer)
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1
    assert [t.get_text() for t in ax.get_xticklabels()] == ["Researcher", r"Writer \$2"]


def test_budget_bars_are_linear_when_values_are_close(tmp_path: Path) -> None:
    m = BudgetManager()
    m.register_agent("a", max_tokens=100)
    m.register_agent("b", max_tokens=80)
    m.record_usage("a", 40)
    ax = plot_budgets(m.status(), tmp_path / "bars.png").axes[0]
    assert ax.get_yscale() == "linear" and ax.get_ylim()[1] > 100
