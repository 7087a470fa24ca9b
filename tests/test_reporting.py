"""Report table, timeline plot (read back from the PNG and the figure), and the live view."""

from __future__ import annotations

import io
import struct
from pathlib import Path

from rich.console import Console

from tbc_integrations import BudgetManager, Usage
from tbc_integrations.events import BudgetEvent
from tbc_integrations.replay import LedgerReplay
from tbc_integrations.reporting import live_view, plot_timeline, render_report, timeline


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
    marks = [c for c in ax.collections if c.get_label() == "reallocation"]
    assert len(marks) == 1 and len(marks[0].get_offsets()) == 1
    assert ax.get_ylabel() == "remaining tokens"


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
