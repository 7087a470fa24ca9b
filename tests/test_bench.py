"""The paper benchmark harness: every policy on the same seeded tasks, JSON and plot out."""

from __future__ import annotations

import json
import struct
import sys
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
        "paper",
        "expected_gain",
        "informed",
        "oracle_budget",
        "oracle",
    }
    assert first["recommended"] == "expected_gain"
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
    assert data["config"]["noise"] == 0.3 and "paper" in data["policies"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png.read_bytes()[16:24]) == (700, 450)
    assert "paper" in capsys.readouterr().out


@pytest.mark.parametrize("noise", [0.2, 0.5])
def test_simulated_confidence_is_calibrated_and_informative(noise: float) -> None:
    import random

    from tbc_integrations.bench import _confidence

    rng = random.Random(11)
    samples = []
    for _ in range(20_000):
        prior = rng.uniform(0.05, 0.95)
        right = rng.random() < prior
        samples.append((_confidence(prior, right, noise, rng), right))
    # calibrated: in every populated tenth of [0, 1], the share right is the mean confidence
    for lo in (i / 10 for i in range(10)):
        inside = [(c, r) for c, r in samples if lo <= c < lo + 0.1]
        if len(inside) >= 300:
            mean_c = sum(c for c, _ in inside) / len(inside)
            share = sum(r for _, r in inside) / len(inside)
            assert abs(mean_c - share) < 0.05, (lo, mean_c, share)
    # informative: right answers are reported far more confidently than wrong ones
    right_c = [c for c, r in samples if r]
    wrong_c = [c for c, r in samples if not r]
    gap = sum(right_c) / len(right_c) - sum(wrong_c) / len(wrong_c)
    assert gap > (0.6 if noise < 0.3 else 0.15)


def test_simulated_confidence_at_the_ends_of_noise() -> None:
    import random

    from tbc_integrations.bench import _confidence

    rng = random.Random(1)
    assert _confidence(0.3, True, 0.0, rng) == 1.0 and _confidence(0.3, False, 0.0, rng) == 0.0
    assert _confidence(0.3, True, 1.0, rng) == 0.3  # no information: the prior


def test_ablation_runs_each_element_alone(capsys: pytest.CaptureFixture[str]) -> None:
    from tbc_integrations.bench import run_ablation

    rows = run_ablation(PaperConfig(tasks=10, seed=2))
    assert set(rows) == {
        "weighted_only",
        "adaptive_only",
        "last_confidence",
        "expected_gain_policy",
    }
    full = run_paper(PaperConfig(tasks=10, seed=2))["policies"]
    # adaptive gating over the greedy policy is its own run: it differs from both ends
    assert rows["adaptive_only"] != {k: full["tbc_greedy"][k] for k in rows["adaptive_only"]}
    assert main(["paper", "--tasks", "10", "--ablation"]) == 0
    assert "weighted_only" in capsys.readouterr().out


def test_paper_is_a_name_the_command_line_and_run_paper_accept(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tbc_integrations import ContractError

    out = tmp_path / "paper.json"
    assert main(["paper", "--tasks", "5", "--policies", "paper", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["policies"]) == {"unconstrained", "paper"}
    assert "paper" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["paper", "--tasks", "5", "--policies", "tbc_full"])  # one canonical name
    with pytest.raises(ContractError, match="unknown benchmark policy"):
        run_paper(PaperConfig(tasks=2), ["tbc_full"])


def test_command_line_says_when_the_package_row_is_left_out(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "paper.json"
    common = ["paper", "--tasks", "5", "--policies", "tbcontracts", "--json", str(out)]
    assert main(common) == 0
    assert "tbcontracts" in json.loads(out.read_text())["policies"]
    assert "left out" not in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tbcontracts", None)  # as if not installed
    assert main(common) == 0
    assert "tbcontracts" not in json.loads(out.read_text())["policies"]
    err = capsys.readouterr().err
    assert "tbcontracts row is left out" in err and "tbc-integrations[bench]" in err
