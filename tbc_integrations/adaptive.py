"""Adaptive confidence gating: each agent's threshold calibrated from its observed outcomes.

The paper's rule, theta = argmax[Accuracy(C >= theta) - lambda x RetrievalCost(C < theta)],
over a rolling window of outcomes, as implemented:

- **Accuracy(C >= theta)**: among the window's results whose confidence reached
  theta (where the gate would stop spending), the fraction that were correct
  (0 when none reached it);
- **RetrievalCost(C < theta)**: the share of the window's retrieval cost spent on
  results below theta (where the gate keeps spending): their cost divided by the
  window's total cost (0 when nothing cost anything), so lambda is unitless;
- **candidates**: every multiple of 0.05 in [0, 1] and every confidence seen;
  ties go to the lowest theta, so the result is deterministic.

Until an agent's window holds ``min_samples`` outcomes, its configured
threshold stays in force.

Example:
    >>> from tbc_integrations.adaptive import Outcome, calibrate
    >>> window = [Outcome(0.9, True, 10), Outcome(0.8, True, 10),
    ...           Outcome(0.6, False, 10), Outcome(0.3, False, 10)]
    >>> calibrate(window, lam=0.5)
    0.65
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

from tbc_integrations._errors import ContractError

__all__ = [
    "AdaptiveGating",
    "Outcome",
    "RoundHistory",
    "best_tier",
    "calibrate",
    "expected_gain",
    "posterior",
    "shadow_price",
    "worth_another_round",
]

GRID = tuple(round(i * 0.05, 2) for i in range(21))


class Outcome(NamedTuple):
    """One observed result: its confidence, whether it was right, what retrieval cost."""

    confidence: float
    correct: bool
    cost: float = 0.0


def calibrate(
    outcomes: Sequence[Outcome], lam: float, candidates: Iterable[float] | None = None
) -> float:
    """The threshold that maximises accuracy above it minus lambda times the cost below it.

    Example:
        >>> calibrate([Outcome(0.5, True, 1.0)], lam=1.0)
        0.0
    """
    if not outcomes:
        raise ContractError("calibrate needs at least one outcome")
    pool = sorted(
        set(candidates if candidates is not None else GRID) | {o.confidence for o in outcomes}
    )
    total_cost = sum(o.cost for o in outcomes)
    best_theta, best_score = pool[0], float("-inf")
    for theta in pool:
        above = [o for o in outcomes if o.confidence >= theta]
        accuracy = sum(1 for o in above if o.correct) / len(above) if above else 0.0
        below_cost = sum(o.cost for o in outcomes if o.confidence < theta)
        cost = below_cost / total_cost if total_cost > 0 else 0.0
        score = accuracy - lam * cost
        if score > best_score + 1e-12:
            best_theta, best_score = theta, score
    return float(best_theta)


class AdaptiveGating:
    """Rolling windows of outcomes per agent, and when to recalibrate.

    Args:
        window: Outcomes kept per agent (the newest).
        min_samples: Outcomes needed before the calibrated threshold replaces
            the configured one.
        lam: lambda, the weight of retrieval cost against accuracy.
        candidates: Thresholds to consider (default: 0, 0.05, ..., 1 and the
            confidences seen).

    Example:
        >>> gating = AdaptiveGating(window=4, min_samples=2, lam=0.5)
        >>> gating.observe("a", Outcome(0.9, True, 5)) is None  # not enough yet
        True
        >>> gating.observe("a", Outcome(0.2, False, 5))
        0.25
    """

    def __init__(
        self,
        window: int = 50,
        min_samples: int = 10,
        lam: float = 0.5,
        candidates: Iterable[float] | None = None,
    ) -> None:
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ContractError(f"window must be a positive integer, got {window!r}")
        if (
            isinstance(min_samples, bool)
            or not isinstance(min_samples, int)
            or not 1 <= min_samples <= window
        ):
            raise ContractError(f"min_samples must be in [1, window], got {min_samples!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or lam < 0:
            raise ContractError(f"lam must be a non-negative number, got {lam!r}")
        self.window = window
        self.min_samples = min_samples
        self.lam = float(lam)
        self.candidates = tuple(candidates) if candidates is not None else None
        self._windows: dict[str, deque[Outcome]] = {}
        self._lock = threading.Lock()

    def observe(self, agent: str, outcome: Outcome) -> float | None:
        """Add an outcome; return the calibrated threshold once the window is full enough."""
        with self._lock:
            window = self._windows.setdefault(agent, deque(maxlen=self.window))
            window.append(outcome)
            if len(window) < self.min_samples:
                return None
            samples = list(window)
        return calibrate(samples, self.lam, self.candidates)

    def samples(self, agent: str) -> list[Outcome]:
        """The agent's current window."""
        with self._lock:
            return list(self._windows.get(agent, ()))


# --------------------------------------------------------- expected-gain rules
class RoundHistory:
    """Each agent's calibrated history of rounds: what a first round and a further round buy.

    After an agent's work is judged, :meth:`observe` takes, for each round it ran,
    whether its answer was right after that round and what the round cost. From
    these (with a Beta(1, 1) prior, so an agent with no history reads 0.5):

    - **first(agent)**: the chance one round makes the answer right,
      ``(right after round 1 + 1) / (first rounds seen + 2)``;
    - **lift(agent)**: the chance one more round turns a wrong answer right,
      ``(wrong-then-right pairs + 1) / (wrong rounds followed by another + 2)``;
    - **cost(agent)**: the mean tokens of a round (``default`` before any is seen);
    - **hold(agent)**: what to reserve for a round before its cost is known, the
      mean plus two standard deviations of the rounds seen (twice the mean, or
      twice ``default``, before two are seen).

    ``first`` and ``lift`` take an ``optimism``: that many standard deviations of
    their Beta posterior are added (capped at 1), so an agent with little history
    reads higher than its mean and is tried again before it is written off; with
    ``optimism`` 0 (the default) they are the posterior means.

    Example:
        >>> h = RoundHistory()
        >>> h.observe("a", [False, False, True], [100, 120, 80])
        >>> h.first("a"), h.lift("a"), h.cost("a", default=50), h.hold("a", default=50)
        (0.3333333333333333, 0.5, 100.0, 140.0)
        >>> round(h.first("a", optimism=1.0), 4)  # 1/3 + sqrt(1/18)
        0.569
    """

    def __init__(self) -> None:
        self._firsts: dict[str, list[int]] = {}
        self._lifts: dict[str, list[int]] = {}
        self._costs: dict[str, list[float]] = {}

    def observe(self, agent: str, rights: Sequence[bool], costs: Sequence[float]) -> None:
        """Record one judged run: right or not after each round, and each round's cost."""
        if len(rights) != len(costs):
            raise ContractError("observe needs one cost per round")
        if not rights:
            return
        first = self._firsts.setdefault(agent, [0, 0])
        first[0] += bool(rights[0])
        first[1] += 1
        lift = self._lifts.setdefault(agent, [0, 0])
        for before, after in itertools.pairwise(rights):
            if not before:
                lift[0] += bool(after)
                lift[1] += 1
        cost = self._costs.setdefault(agent, [0.0, 0.0, 0.0])
        cost[0] += float(sum(costs))
        cost[1] += len(costs)
        cost[2] += float(sum(float(c) * c for c in costs))

    @staticmethod
    def _estimate(hit: int, seen: int, optimism: float) -> float:
        """The Beta(1 + hit, 1 + seen - hit) mean plus ``optimism`` standard deviations."""
        a, b = hit + 1, seen - hit + 1
        mean = a / (a + b)
        if not optimism:
            return mean
        sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
        return min(1.0, mean + optimism * sd)

    def first(self, agent: str, optimism: float = 0.0) -> float:
        """The chance one round makes the agent's answer right."""
        hit, seen = self._firsts.get(agent, [0, 0])
        return self._estimate(hit, seen, optimism)

    def lift(self, agent: str, optimism: float = 0.0) -> float:
        """The chance one more round turns the agent's wrong answer right."""
        hit, seen = self._lifts.get(agent, [0, 0])
        return self._estimate(hit, seen, optimism)

    def cost(self, agent: str, default: float) -> float:
        """The agent's mean tokens per round (``default`` before any round is seen)."""
        total, n, _ = self._costs.get(agent, [0.0, 0.0, 0.0])
        return total / n if n else float(default)

    def hold(self, agent: str, default: float) -> float:
        """Tokens to reserve for the agent's next round: mean plus two standard deviations.

        Twice the mean before two rounds are seen (twice ``default`` before any).
        """
        total, n, squares = self._costs.get(agent, [0.0, 0.0, 0.0])
        if n < 2:
            return 2.0 * (total / n if n else float(default))
        mean = total / n
        variance = max(0.0, (squares - n * mean * mean) / (n - 1))
        return mean + 2.0 * math.sqrt(variance)

    def belief(self, agent: str, confidences: Sequence[float]) -> float | None:
        """The chance the agent's answer is right now, from every confidence it reported.

        :func:`posterior` with the history's ``first`` and ``lift`` (their means) as
        the prior: ``P(right now | c_1..c_k)`` after ``k`` rounds (None before any).
        One reading gives back ``c_1``; several agreeing readings are surer than any
        one, and a confident reading after unsure ones counts for less than alone.
        Confidences are clipped to [1e-9, 1 - 1e-9].

        Example:
            >>> h = RoundHistory()  # no history yet: first = lift = 0.5
            >>> round(h.belief("a", [0.8]), 6)
            0.8
            >>> round(h.belief("a", [0.8, 0.9]), 3)  # two readings that it is right
            0.964
            >>> h.belief("a", []) is None
            True
        """
        return posterior(self.first(agent), self.lift(agent), confidences)


def posterior(first: float, lift: float, confidences: Sequence[float]) -> float | None:
    """The chance an answer is right now, from every confidence reported and the round model.

    The first right round ``T`` has ``P(T = 1) = first`` and, after that, a constant
    chance ``lift`` each round, so the chance of being right after round ``j`` is
    ``p_j = 1 - (1 - first)(1 - lift)^(j-1)``. Each reported confidence ``c_j`` is
    taken as a calibrated posterior from that prior, so it carries the likelihood
    ratio ``odds(c_j) / odds(p_j)`` for "right at round j"; readings are independent
    given the answer. The result is ``P(T <= k | c_1..c_k)`` after ``k`` readings
    (None before any). :meth:`RoundHistory.belief` is this with the history's
    ``first`` and ``lift``; the benchmark's ``informed`` row, with the simulator's own.

    Example:
        >>> round(posterior(0.5, 0.5, [0.8, 0.9]), 3)
        0.964
    """
    if not confidences:
        return None
    k = len(confidences)

    def logit(x: float) -> float:
        x = min(max(x, 1e-9), 1.0 - 1e-9)
        return math.log(x / (1.0 - x))

    priors = [1.0 - (1.0 - first) * (1.0 - lift) ** j for j in range(k)]
    llr = [logit(c) - logit(p) for c, p in zip(confidences, priors, strict=True)]
    # log weight of "first right at round t" (t = 1..k): its prior times the
    # likelihood ratios of the readings from round t on; "not yet right": its prior
    logs, suffix = [], 0.0
    tails = [0.0] * (k + 1)
    for j in range(k - 1, -1, -1):
        suffix += llr[j]
        tails[j] = suffix
    for t in range(k):
        prior_t = first if t == 0 else (1.0 - first) * (1.0 - lift) ** (t - 1) * lift
        if prior_t > 0.0:
            logs.append(math.log(prior_t) + tails[t])
    wrong = (1.0 - first) * (1.0 - lift) ** (k - 1)
    if not logs:
        return 0.0
    top = max(logs)
    right = sum(math.exp(x - top) for x in logs)
    if wrong <= 0.0:
        return 1.0
    rest = math.exp(math.log(wrong) - top)
    return right / (right + rest)


def expected_gain(priority: float, confidence: float | None, first: float, lift: float) -> float:
    """Priority-weighted accuracy the agent's next round is expected to add.

    Before any round (``confidence`` None) it is ``priority x first``; after a
    round it is ``priority x (1 - confidence) x lift``: the answer is wrong with
    chance ``1 - confidence`` (confidence is calibrated), and another round
    turns a wrong answer right with chance ``lift``.

    Example:
        >>> expected_gain(4, None, first=0.35, lift=0.4)
        1.4
        >>> round(expected_gain(4, 0.75, first=0.35, lift=0.4), 3)
        0.4
    """
    if confidence is None:
        return priority * first
    return priority * (1.0 - confidence) * lift


def shadow_price(open_weight: float, remaining: float, kappa: float = 1.0) -> float:
    """What a token must buy to be worth spending, from what the budget leaves.

    ``kappa x open_weight / remaining``: ``open_weight`` is the priority-weighted
    accuracy at stake and ``remaining`` the team's tokens left. Spread evenly, the
    budget left buys ``open_weight / remaining`` per token; a round is worth it
    when it buys at least ``kappa`` times that. The price rises as the budget runs
    down. No budget left: an infinite price. As implemented in the recommended
    configuration (``bench``), ``open_weight`` is the team's whole priority (the
    sum of its agents' priorities), so the price does not fall as agents grow
    confident; passing only what is still to be won (``priority x (1 - belief)``
    over the agents still working) would let the team spend its budget on
    confirming answers it already believes.

    Example:
        >>> shadow_price(10.0, 4000)
        0.0025
        >>> shadow_price(1.0, 0)
        inf
    """
    if remaining <= 0:
        return math.inf
    return kappa * open_weight / remaining


def worth_another_round(gain: float, cost: float, price: float) -> bool:
    """The stopping rule: run the round only if its gain is worth its cost at the price.

    Example:
        >>> worth_another_round(0.4, 100, 0.0025), worth_another_round(0.2, 100, 0.0025)
        (True, False)
    """
    return gain >= price * cost


def best_tier(
    gain: float, cost: float, price: float, cheap_gain: float, cheap_cost: float
) -> Literal["full", "cheap"] | None:
    """The degradation rule: the tier whose round leaves the most surplus at the price.

    A full round buys ``gain`` for ``cost`` tokens; the cheap tier's buys
    ``cheap_gain x gain`` for ``cheap_cost x cost``. Each is worth its surplus,
    ``gain - price x cost``; the rule runs the tier with the larger one
    (``"full"`` on a tie), or neither (``None``) when no round is worth its cost.
    As the budget runs down the price rises, and the cheap tier wins before
    the full one stops being worth it: with the cheap tier at half the gain for
    30% of the tokens, the full round runs while it buys at least 1.4 times the
    price a token, the cheap one from 0.6 times, and nothing below.

    Example:
        >>> best_tier(0.5, 100, 0.0025, 0.5, 0.3)  # 0.25 surplus against 0.175
        'full'
        >>> best_tier(0.3, 100, 0.0025, 0.5, 0.3)  # 0.05 against 0.075
        'cheap'
        >>> print(best_tier(0.1, 100, 0.0025, 0.5, 0.3))  # 0.15 needed even for cheap
        None
    """
    full = gain - price * cost
    cheap = cheap_gain * gain - price * cheap_cost * cost
    if full >= cheap:
        return "full" if full >= 0 else None
    return "cheap" if cheap >= 0 else None
