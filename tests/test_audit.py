"""The audit log: one JSON line per event, crash-tolerant reading, replay equals live."""

from __future__ import annotations

import json
import random
import threading
from pathlib import Path

import pytest

from tbc_integrations import (
    BudgetExceededError,
    BudgetManager,
    ContractError,
    ModelPrice,
    Reservation,
    Usage,
)
from tbc_integrations.audit import AuditLog, read_log, replay_log
from tbc_integrations.events import EVENT_TYPES, BudgetEvent, event_from_dict, event_to_dict


def busy_manager() -> BudgetManager:
    m = BudgetManager(prices={"small": ModelPrice(input="0.15", output="0.6", cache_read="0.075")})
    m.register_agent("planner", priority=1, max_tokens=5_000)
    m.register_agent("researcher", priority=3, max_tokens=800, confidence_threshold=0.9)
    m.register_agent("writer", priority=2, max_tokens=1_200, max_output_tokens=600, max_cost="0.01")
    return m


def workload(m: BudgetManager, seed: int, steps: int) -> None:
    rng = random.Random(seed)
    held: list[Reservation] = []
    for _ in range(steps):
        agent = rng.choice(["planner", "researcher", "writer"])
        op = rng.random()
        try:
            if op < 0.5 or not held:
                held.append(
                    m.reserve(agent, rng.randint(0, 300), rng.randint(0, 400), model="small")
                )
            elif op < 0.8:
                r = held.pop(rng.randrange(len(held)))
                inp = rng.randint(0, r.amount)
                m.commit(r, Usage(inp, rng.randint(0, 50), cache_read_tokens=inp // 2))
            elif op < 0.9:
                m.release(held.pop(rng.randrange(len(held))))
            elif op < 0.95:
                m.record_confidence(agent, rng.random())
            else:
                m.record_usage(agent, rng.randint(0, 100))
        except BudgetExceededError:
            pass


def test_every_line_is_one_json_event_with_the_documented_fields(tmp_path: Path) -> None:
    m = busy_manager()
    path = tmp_path / "audit.jsonl"
    with AuditLog(path).attach(m):
        workload(m, 1, 200)
    lines = path.read_text().splitlines()
    snapshot, *events = (json.loads(line) for line in lines)
    assert snapshot["kind"] == "snapshot" and set(snapshot["contracts"]) == set(m.contracts)
    assert len(events) > 200
    for e in events:
        assert e["kind"] in EVENT_TYPES
        assert {
            "time",
            "namespace",
            "agent",
            "tokens",
            "input_tokens",
            "output_tokens",
            "donors",
            "reason",
        } <= set(e)


def test_replay_equals_live_status_even_when_attached_mid_run(tmp_path: Path) -> None:
    m = busy_manager()
    workload(m, 2, 150)  # before the log is attached, with reservations still open
    path = tmp_path / "audit.jsonl"
    with AuditLog(path).attach(m):
        workload(m, 3, 400)
        threads = [threading.Thread(target=workload, args=(m, s, 200)) for s in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert replay_log(path).status() == m.status()
    assert m.status()["writer"].cost > 0  # money was spent, and replayed


def test_a_truncated_last_line_is_skipped_and_earlier_damage_is_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    m = busy_manager()
    path = tmp_path / "audit.jsonl"
    with AuditLog(path).attach(m):
        workload(m, 4, 50)
    whole = path.read_text()
    path.write_text(whole + '{"kind": "reserve", "agent": "plan')  # a crash mid-write
    assert read_log(path).replay().status() == m.status()
    assert "truncated last line" in caplog.text
    lines = whole.splitlines(keepends=True)
    lines[3] = "not json\n"
    path.write_text("".join(lines))
    with pytest.raises(ContractError, match=":4: not an audit record"):
        read_log(path)
    with pytest.raises(ContractError, match="no such audit log"):
        read_log(tmp_path / "missing.jsonl")


def test_events_round_trip_through_dicts() -> None:
    m = busy_manager()
    seen: list[BudgetEvent] = []
    m.subscribe(seen.append)
    workload(m, 5, 100)
    assert seen and all(event_from_dict(event_to_dict(e)) == e for e in seen)
    with pytest.raises(ValueError, match="unknown event kind"):
        event_from_dict({"kind": "teleport"})


def test_a_log_of_a_team_per_run_replays_each_run_in_its_own_team(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    m = BudgetManager(team_per="run")
    m.register_agent("researcher", priority=2, max_tokens=100)
    m.register_agent("writer", priority=1, max_tokens=100, min_reserve=0)
    with AuditLog(path).attach(m):
        for run in ("r-1", "r-2", "r-3"):
            with m.scope(run=run):
                m.commit(m.reserve("researcher", 120, 30), Usage(110, 20))  # borrows
                m.commit(m.reserve("writer", 30, 10), Usage(25, 5))
                with pytest.raises(BudgetExceededError):
                    m.reserve("researcher", 60, 0)  # the writer has 40 left
    replay = replay_log(path)
    assert replay.status() == m.status()  # the registered team (the template): untouched
    assert replay.runs() == ["r-1", "r-2", "r-3"]
    for run in replay.runs():
        assert replay.team_status(run) == m.team_status(run)
    assert replay.team_status("r-1")["researcher"].consumed == 130  # not 390 in one team
