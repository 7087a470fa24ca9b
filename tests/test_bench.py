"""The paper benchmark harness: every policy on the same seeded tasks, JSON and plot out."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from tbc_integrations.bench import PaperConfig, main, run_paper


def test_same_seed_same_result_and_every_policy() -> None:
    cfg = PaperConfig(tasks=20, seed=3)
    first, second = run_paper(cfg), run_paper(cfg)
    assert first == second
    assert set(first["policies"]) == {
        "unconstrained",
        "flat_caps",
        "tbcontracts",
        "tbc_greedy",
        "tbc_full",
    }
    base = first["policies"]["unconstrained"]
    assert base["reduction"] == 0.0 and base["preservation"] == 1.0
    for row in first["policies"].values():
        assert set(row) == {
            "tokens",
            "accuracy",
            "reduction",
            "preservation",
            "refusals",
            "starved_high_priority",
        }
        assert 0.0 <= row["accuracy"] <= 1.0


def test_budgets_bind_the_governed_policies() -> None:
    tight, loose = (
        run_paper(PaperConfig(tasks=20, tightness=0.3)),
        run_paper(PaperConfig(tasks=20, tightness=1.0)),
    )
    for name in ("flat_caps", "tbc_greedy"):
        assert tight["policies"][name]["tokens"] < loose["policies"][name]["tokens"]
    assert (
        tight["policies"]["tbc_greedy"]["tokens"]
        <= 0.3 * tight["policies"]["unconstrained"]["tokens"] + 1
    )


def test_command_line_writes_json_and_plot(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, png = tmp_path / "paper.json", tmp_path / "paper.png"
    assert (
        main(["paper", "--tasks", "15", "--noise", "0.3", "--json", str(out), "--plot", str(png)])
        == 0
    )
    data = json.loads(out.read_text())
    assert data["config"]["noise"] == 0.3 and "tbc_full" in data["policies"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png.read_bytes()[16:24]) == (700, 450)
    assert "tbc_full" in capsys.readouterr().out
