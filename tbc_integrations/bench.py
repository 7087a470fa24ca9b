"""Benchmarks anyone can rerun: ``python -m tbc_integrations.bench paper``.

``paper`` puts the Token Budget Contracts paper's claim (40-60% fewer tokens at
97%+ of the accuracy of unconstrained operation) to a seeded simulation. Each
task has a team of agents; each agent spends tokens on rounds of retrieval and
reasoning; every round raises its chance of a correct answer with diminishing
returns (``p_k = 1 - (1 - p0) * decay**k``); its confidence after a round is a
noisy, calibrated signal of that chance. Whether an answer is right is drawn
once per (task, agent) and shared by every policy (common random numbers), so
policies differ only in when they stop and what they are allowed to spend.

Policies, on the same tasks:

- ``unconstrained``: every agent runs every round;
- ``flat_caps``: each agent gets an equal share of the budget, no reallocation, no gate;
- ``tbcontracts``: the ``token-budget-contracts`` package's own ``BudgetManager``
  (post-hoc ``record_usage`` with its reallocation, its fixed confidence gate);
  tokens it refuses after they were spent still count as spent;
- ``tbc_greedy``: this library, greedy reallocation, fixed gate, reserve before each round;
- ``tbc_full``: this library, confidence-weighted reallocation and adaptive gating.

The budget of a task is ``--tightness`` times what the unconstrained run spends on it.

Example:
    >>> result = run_paper(PaperConfig(tasks=5, seed=1))
    >>> sorted(result["policies"])[:2]
    ['flat_caps', 'tbc_full']
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tbc_integrations._errors import BudgetExceededError
from tbc_integrations._manager import BudgetManager
from tbc_integrations.adaptive import AdaptiveGating
from tbc_integrations.policies import ConfidenceWeightedPolicy

__all__ = ["PaperConfig", "main", "run_ablation", "run_paper"]

POLICY_NAMES = ("unconstrained", "flat_caps", "tbcontracts", "tbc_greedy", "tbc_full")


@dataclass(frozen=True)
class AgentSpec:
    """An agent of the simulated team."""

    name: str
    priority: int
    base_cost: int
    p0: float


DEFAULT_TEAM = (
    AgentSpec("planner", 2, 120, 0.55),
    AgentSpec("researcher", 4, 400, 0.35),
    AgentSpec("critic", 1, 150, 0.50),
    AgentSpec("writer", 3, 250, 0.45),
)


@dataclass(frozen=True)
class PaperConfig:
    """The workload (every field is a command-line option)."""

    seed: int = 7
    tasks: int = 200
    rounds: int = 8
    decay: float = 0.6
    noise: float = 0.2
    tightness: float = 0.5
    threshold: float = 0.85
    alpha: float = 1.0
    lam: float = 0.3
    window: int = 40
    min_samples: int = 10
    team: tuple[AgentSpec, ...] = field(default=DEFAULT_TEAM)


@dataclass
class _Task:
    costs: dict[str, list[int]]
    confidence: dict[str, list[float]]
    luck: dict[str, float]


def _p(spec: AgentSpec, k: int, decay: float) -> float:
    """Chance the answer is right after k rounds (k >= 1)."""
    return 1.0 - (1.0 - spec.p0) * decay ** (k - 1)


def _confidence(prior: float, right: bool, noise: float, rng: random.Random) -> float:
    """A calibrated confidence that carries information about this answer.

    The agent sees a noisy reading of whether its answer is right,
    ``z = right + N(0, sigma)`` with ``sigma = noise / (1 - noise)``, and reports
    the posterior ``P(right | z)`` from its prior (the chance of being right after
    this many rounds). A posterior is calibrated by construction: of the answers
    reported at confidence c, a fraction c is right. ``noise`` 0 reveals the answer
    exactly; towards 1 the reading says nothing and the confidence falls back to
    the prior.
    """
    if noise <= 0.0:
        return 1.0 if right else 0.0
    if noise >= 1.0 or prior <= 0.0 or prior >= 1.0:
        return min(1.0, max(0.0, prior))
    sigma = noise / (1.0 - noise)
    z = float(right) + rng.gauss(0.0, sigma)
    # log-likelihood ratio of right against wrong for the reading z
    llr = (2.0 * z - 1.0) / (2.0 * sigma * sigma)
    log_odds = math.log(prior / (1.0 - prior)) + llr
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, log_odds))))


def _tasks(cfg: PaperConfig) -> list[_Task]:
    rng = random.Random(cfg.seed)
    out = []
    for _ in range(cfg.tasks):
        costs: dict[str, list[int]] = {}
        conf: dict[str, list[float]] = {}
        luck: dict[str, float] = {}
        for spec in cfg.team:
            costs[spec.name] = [
                max(1, round(spec.base_cost * rng.lognormvariate(0.0, 0.25)))
                for _ in range(cfg.rounds)
            ]
            luck[spec.name] = rng.random()
            conf[spec.name] = [
                _confidence(
                    _p(spec, k, cfg.decay), luck[spec.name] < _p(spec, k, cfg.decay), cfg.noise, rng
                )
                for k in range(1, cfg.rounds + 1)
            ]
        out.append(_Task(costs, conf, luck))
    return out


@dataclass
class _Tally:
    tokens: int = 0
    correct: float = 0.0
    weight: float = 0.0
    refusals: int = 0
    starved: int = 0

    def answer(self, spec: AgentSpec, rounds: int, luck: float, cfg: PaperConfig) -> bool:
        right = rounds > 0 and luck < _p(spec, rounds, cfg.decay)
        self.correct += spec.priority * right
        self.weight += spec.priority
        return right


def _unconstrained(cfg: PaperConfig, tasks: list[_Task]) -> tuple[_Tally, list[int]]:
    tally, per_task = _Tally(), []
    for task in tasks:
        spent = 0
        for spec in cfg.team:
            spent += sum(task.costs[spec.name])
            tally.answer(spec, cfg.rounds, task.luck[spec.name], cfg)
        tally.tokens += spent
        per_task.append(spent)
    return tally, per_task


def _shares(cfg: PaperConfig, budget: int, flat: bool) -> dict[str, int]:
    if flat:
        return {s.name: budget // len(cfg.team) for s in cfg.team}
    total = sum(s.priority * s.base_cost for s in cfg.team)
    return {s.name: budget * s.priority * s.base_cost // total for s in cfg.team}


def _flat(cfg: PaperConfig, tasks: list[_Task], budgets: list[int]) -> _Tally:
    tally = _Tally()
    top = max(cfg.team, key=lambda s: s.priority)
    for task, budget in zip(tasks, budgets, strict=True):
        caps = _shares(cfg, budget, flat=True)
        for spec in cfg.team:
            left, k = caps[spec.name], 0
            while k < cfg.rounds and task.costs[spec.name][k] <= left:
                left -= task.costs[spec.name][k]
                tally.tokens += task.costs[spec.name][k]
                k += 1
            if k < cfg.rounds:
                tally.refusals += 1
                tally.starved += spec is top and k < cfg.rounds
            tally.answer(spec, k, task.luck[spec.name], cfg)
    return tally


def _tbcontracts(cfg: PaperConfig, tasks: list[_Task], budgets: list[int]) -> _Tally | None:
    try:
        import tbcontracts
    except ImportError:
        return None
    tally = _Tally()
    top = max(cfg.team, key=lambda s: s.priority)
    for task, budget in zip(tasks, budgets, strict=True):
        shares = _shares(cfg, budget, flat=False)
        m = tbcontracts.BudgetManager()
        for spec in cfg.team:
            m.register_agent(
                spec.name,
                priority=spec.priority,
                max_tokens=shares[spec.name],
                confidence_threshold=cfg.threshold,
            )
        for spec in sorted(cfg.team, key=lambda s: -s.priority):
            k = 0
            while k < cfg.rounds:
                contract = m.contracts[spec.name]
                if not tbcontracts.ConfidenceGate.allow_further_retrieval(
                    contract, contract.last_confidence
                ):
                    break
                cost = task.costs[spec.name][k]
                tally.tokens += cost  # spent before the package checks (and even if it refuses)
                k += 1
                try:
                    m.record_usage(spec.name, cost, confidence=task.confidence[spec.name][k - 1])
                except tbcontracts.BudgetExceededError:
                    tally.refusals += 1
                    tally.starved += spec is top
                    break
            tally.answer(spec, k, task.luck[spec.name], cfg)
    return tally


def _ours(
    cfg: PaperConfig,
    tasks: list[_Task],
    budgets: list[int],
    full: bool,
    weighted: bool | None = None,
) -> _Tally:
    """Our ledger; ``full`` adds adaptive gating, ``weighted`` the weighted policy.

    ``weighted`` defaults to ``full`` (the full model has both).
    """
    weighted = full if weighted is None else weighted
    tally = _Tally()
    top = max(cfg.team, key=lambda s: s.priority)
    adaptive = AdaptiveGating(window=cfg.window, min_samples=cfg.min_samples, lam=cfg.lam)
    thresholds = {s.name: cfg.threshold for s in cfg.team}
    for task, budget in zip(tasks, budgets, strict=True):
        shares = _shares(cfg, budget, flat=False)
        m = BudgetManager(
            policy=ConfidenceWeightedPolicy(cfg.alpha) if weighted else None,
            adaptive=adaptive if full else None,
        )
        for spec in cfg.team:
            m.register_agent(
                spec.name,
                priority=spec.priority,
                max_tokens=shares[spec.name],
                min_reserve=0,
                confidence_threshold=thresholds[spec.name],
            )
        order = sorted(cfg.team, key=lambda s: -s.priority)
        for spec in order:
            k, spent = 0, 0
            while k < cfg.rounds:
                cost = task.costs[spec.name][k]
                estimate = spec.base_cost * 2  # reserve a pessimistic estimate, settle the truth
                try:
                    r = m.reserve(spec.name, 0, min(estimate, max(cost, estimate)))
                except BudgetExceededError as exc:
                    if exc.reason != "confidence gate":
                        tally.refusals += 1
                        tally.starved += spec is top
                    break
                m.commit(r, (0, cost))
                spent += cost
                k += 1
                m.record_confidence(spec.name, task.confidence[spec.name][k - 1])
            tally.tokens += spent
            tally.answer(spec, k, task.luck[spec.name], cfg)
            m.complete(spec.name)  # done: its leftover is spare for the rest of the team
            if full:
                # every round's result is an observation (confidence, right or not, its cost);
                # reporting only the final one would bias the window toward the old threshold
                for j in range(k):
                    right_j = task.luck[spec.name] < _p(spec, j + 1, cfg.decay)
                    new = m.record_outcome(
                        spec.name, task.confidence[spec.name][j], right_j, task.costs[spec.name][j]
                    )
                    if new is not None:
                        thresholds[spec.name] = new
    return tally


def run_paper(cfg: PaperConfig) -> dict[str, Any]:
    """Run every policy on the same tasks; the JSON-ready result."""
    tasks = _tasks(cfg)
    base, per_task = _unconstrained(cfg, tasks)
    budgets = [max(1, math.floor(spent * cfg.tightness)) for spent in per_task]
    tallies: dict[str, _Tally | None] = {
        "unconstrained": base,
        "flat_caps": _flat(cfg, tasks, budgets),
        "tbcontracts": _tbcontracts(cfg, tasks, budgets),
        "tbc_greedy": _ours(cfg, tasks, budgets, full=False),
        "tbc_full": _ours(cfg, tasks, budgets, full=True),
    }
    base_acc = base.correct / base.weight
    policies: dict[str, dict[str, float | int]] = {}
    for name, tally in tallies.items():
        if tally is None:
            continue
        accuracy = tally.correct / tally.weight
        policies[name] = {
            "tokens": tally.tokens,
            "accuracy": round(accuracy, 4),
            "reduction": round(1 - tally.tokens / base.tokens, 4),
            "preservation": round(accuracy / base_acc, 4),
            "refusals": tally.refusals,
            "starved_high_priority": tally.starved,
        }
    config = asdict(cfg)
    config["team"] = [asdict(s) for s in cfg.team]
    return {"config": config, "policies": policies}


def run_ablation(cfg: PaperConfig) -> dict[str, dict[str, float]]:
    """Each of the paper's two elements alone: which one moves tokens and accuracy.

    ``weighted_only``: the confidence-weighted policy with the fixed gate;
    ``adaptive_only``: greedy reallocation with adaptive gating.

    Example:
        >>> sorted(run_ablation(PaperConfig(tasks=3, seed=1)))
        ['adaptive_only', 'weighted_only']
    """
    tasks = _tasks(cfg)
    base, per_task = _unconstrained(cfg, tasks)
    budgets = [max(1, math.floor(spent * cfg.tightness)) for spent in per_task]
    base_acc = base.correct / base.weight
    out = {}
    for name, full, weighted in (("weighted_only", False, True), ("adaptive_only", True, False)):
        tally = _ours(cfg, tasks, budgets, full=full, weighted=weighted)
        accuracy = tally.correct / tally.weight
        out[name] = {
            "tokens": tally.tokens,
            "accuracy": round(accuracy, 4),
            "reduction": round(1 - tally.tokens / base.tokens, 4),
            "preservation": round(accuracy / base_acc, 4),
            "refusals": tally.refusals,
        }
    return out


def _print_table(result: dict[str, Any]) -> None:
    print(
        f"{'policy':<15}{'tokens':>10}{'accuracy':>10}{'reduction':>11}{'preserved':>11}"
        f"{'refusals':>10}{'starved':>9}"
    )
    for name, row in result["policies"].items():
        print(
            f"{name:<15}{row['tokens']:>10,}{row['accuracy']:>10.3f}{row['reduction']:>11.1%}"
            f"{row['preservation']:>11.1%}{row['refusals']:>10}{row['starved_high_priority']:>9}"
        )


def _plot(results: Sequence[tuple[str, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = dict(zip(POLICY_NAMES, "osD^*", strict=True))
    for label, result in results:
        for name, row in result["policies"].items():
            ax.scatter(
                row["tokens"],
                row["accuracy"],
                marker=markers.get(name, "o"),
                label=f"{name} {label}".strip(),
            )
    ax.set_xlabel("tokens spent")
    ax.set_ylabel("accuracy (priority-weighted)")
    ax.set_title("Tokens against accuracy, by policy")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tbc_integrations.bench paper [options]``."""
    parser = argparse.ArgumentParser(prog="python -m tbc_integrations.bench")
    sub = parser.add_subparsers(dest="bench", required=True)
    paper = sub.add_parser("paper", help="test the paper's claim on a seeded simulation")
    defaults = PaperConfig()
    for name in ("seed", "tasks", "rounds", "window", "min_samples"):
        paper.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("decay", "noise", "tightness", "threshold", "alpha", "lam"):
        paper.add_argument(f"--{name}", type=float, default=getattr(defaults, name))
    paper.add_argument("--json", type=Path, help="write the result as JSON here")
    paper.add_argument("--plot", type=Path, help="write a tokens-against-accuracy PNG here")
    paper.add_argument("--sweep", action="store_true", help="also sweep noise and tightness")
    paper.add_argument(
        "--ablation", action="store_true", help="also run each of the paper's two elements alone"
    )
    args = parser.parse_args(argv)
    fields = {k: v for k, v in vars(args).items() if k in PaperConfig.__dataclass_fields__}
    cfg = PaperConfig(**fields)
    result = run_paper(cfg)
    print(
        f"paper benchmark: {cfg.tasks} tasks, seed {cfg.seed}, noise {cfg.noise}, "
        f"tightness {cfg.tightness}"
    )
    _print_table(result)
    plotted = [("", result)]
    if args.ablation:
        result["ablation"] = run_ablation(cfg)
        print("\nablation: each element of the full model alone")
        for name, row in result["ablation"].items():
            print(
                f"  {name:<14}{row['tokens']:>10,}{row['accuracy']:>10.3f}"
                f"{row['reduction']:>11.1%}{row['preservation']:>11.1%}{row['refusals']:>10}"
            )
    if args.sweep:
        result["sweep"] = []
        print("\nsweep: tbc_full against tbcontracts (tokens, accuracy)")
        for noise in (0.1, 0.2, 0.4):
            for tightness in (0.4, 0.5, 0.7):
                r = run_paper(PaperConfig(**{**fields, "noise": noise, "tightness": tightness}))
                full, peer = r["policies"]["tbc_full"], r["policies"].get("tbcontracts")
                ahead = peer is not None and (
                    full["tokens"] <= peer["tokens"]
                    and full["accuracy"] >= peer["accuracy"]
                    and (full["tokens"] < peer["tokens"] or full["accuracy"] > peer["accuracy"])
                )
                result["sweep"].append({"noise": noise, "tightness": tightness, **r})
                peer_text = (
                    "n/a" if peer is None else f"{peer['tokens']:>9,} {peer['accuracy']:.3f}"
                )
                print(
                    f"  noise {noise:.1f} tightness {tightness:.1f}: "
                    f"tbc_full {full['tokens']:>9,} {full['accuracy']:.3f} "
                    f"({full['reduction']:.0%} fewer, {full['preservation']:.1%} kept)"
                    f" | tbcontracts {peer_text} | ahead: {'yes' if ahead else 'NO'}"
                )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.plot:
        _plot(plotted, args.plot)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
