"""Budget contracts: what each agent may spend, and how it ranks against others.

Example:
    >>> from tbc_integrations import BudgetContract
    >>> c = BudgetContract("researcher", priority=3, max_tokens=4000, max_output_tokens=1500)
    >>> c.min_reserve
    400
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from decimal import Decimal
from typing import Any

from ._errors import ContractError, InvalidValueError
from ._money import dollars, to_nanos
from ._validate import MAX_NAME_LENGTH, MAX_TOKENS, check_agent_name

__all__ = ["DEFAULT_MAX_TOKENS", "BudgetContract", "Degrade", "check_dependencies"]

DEFAULT_MAX_TOKENS = 1000
"""An agent's token budget when its contract gives neither ``max_tokens`` nor ``max_cost``."""


def _check_count(agent: str, name: str, value: Any, *, optional: bool) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TOKENS:
        raise ContractError(
            f"Agent '{agent}': {name} must be an integer from 0 to {MAX_TOKENS}, got {value!r}"
        )


@dataclass(frozen=True)
class Degrade:
    """One step of an agent's degradation ladder, tried before a refusal.

    A step changes one thing of the call: a cheaper ``model``, a lower ``max_tokens``,
    or a ``wrap_up`` instruction added to the prompt (tell the agent to finish with
    what it has). Steps are tried in order when a call cannot be afforded; a step with
    ``below`` is also taken before the call once the agent's remaining budget falls
    below that fraction of its allocation.

    Example:
        >>> Degrade(model="gpt-4o-mini").to_dict()
        {'model': 'gpt-4o-mini'}
    """

    model: str | None = None
    max_tokens: int | None = None
    wrap_up: str | None = None
    below: float | None = None

    def __post_init__(self) -> None:
        given = [x for x in (self.model, self.max_tokens, self.wrap_up) if x is not None]
        if len(given) != 1:
            raise ContractError(
                f"Degrade: give exactly one of model, max_tokens, wrap_up, got {self!r}"
            )
        mt = self.max_tokens
        if mt is not None and (isinstance(mt, bool) or not isinstance(mt, int) or mt < 1):
            raise ContractError(f"Degrade: max_tokens must be an integer >= 1, got {mt!r}")
        for name in ("model", "wrap_up"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ContractError(f"Degrade: {name} must be a non-empty string, got {value!r}")
        b = self.below
        if b is not None and (
            isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 < b < 1
        ):
            raise ContractError(f"Degrade: below must be a fraction in (0, 1), got {b!r}")

    @property
    def name(self) -> str:
        """What the step does, in a few words (the ``Degraded`` event's reason)."""
        if self.model is not None:
            return f"model {self.model}"
        if self.max_tokens is not None:
            return f"max_tokens {self.max_tokens}"
        return "wrap-up"

    def to_dict(self) -> dict[str, Any]:
        """The step's fields that are set."""
        return {
            f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None
        }


@dataclass(frozen=True)
class BudgetContract:
    """One agent's Token Budget Contract, TBC_i = (Imax, Omax, Cmin, Priority, Deps).

    Args:
        agent_name: Unique name of the agent.
        priority: Importance, an integer >= 1; higher is more important. Budget
            only flows to an agent from agents of equal or lower priority.
        max_tokens: Initial total budget (input + output tokens); 1000 by default,
            and ``None`` (no token budget: tokens are counted, never limited or
            lent) when ``max_cost`` is given alone.
        min_reserve: Tokens this agent always keeps when it lends; defaults to
            10% of ``max_tokens``.
        max_cost: Cap on the money it may spend, in US dollars (``str``, ``int``,
            ``Decimal``, or ``float`` read through its decimal text). Money is a
            hard cap of the agent's own: it is never lent or borrowed (tokens are
            what reallocation moves). ``None``: no cap.
        confidence_threshold: Confidence in [0, 1] at which further spend is
            refused; ``None`` disables gating.
        max_input_tokens: Cap on the input (prompt) tokens it may spend.
        max_output_tokens: Cap on the output (completion) tokens it may spend.
        depends_on: Names of the agents whose output this agent consumes.
        warn_at: A fraction in (0, 1]: a soft limit. When the agent's spend reaches it
            (of its current allocation in tokens, of ``max_cost`` in money), one
            ``BudgetWarning`` event is delivered (``reason`` ``"agent"``); a grant or a
            reallocation that takes the agent back below the line re-arms it.

    Raises:
        ContractError: naming the agent and the bad value.

    Example:
        >>> BudgetContract("critic", priority=2, max_tokens=1000).priority
        2
    """

    agent_name: str
    priority: int = 1
    max_tokens: int | None = None
    min_reserve: int | None = None
    confidence_threshold: float | None = None
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    depends_on: Sequence[str] = field(default=())
    max_cost: Decimal | str | int | float | None = None  # a Decimal once constructed
    degrade: Sequence[Degrade | Mapping[str, Any]] = field(default=())
    warn_at: float | None = None

    def __post_init__(self) -> None:
        name = check_agent_name(self.agent_name)
        prio = self.priority
        if isinstance(prio, bool) or not isinstance(prio, int) or prio < 1:
            raise ContractError(f"Agent '{name}': priority must be an integer >= 1, got {prio!r}")
        if self.max_cost is not None:
            try:
                nanos = to_nanos(self.max_cost, name, "max_cost")
            except InvalidValueError as exc:
                raise ContractError(str(exc)) from None
            object.__setattr__(self, "max_cost", dollars(nanos))
        elif self.max_tokens is None:
            object.__setattr__(self, "max_tokens", DEFAULT_MAX_TOKENS)
        _check_count(name, "max_tokens", self.max_tokens, optional=True)
        budget = self.max_tokens if self.max_tokens is not None else 0
        if self.min_reserve is None:
            object.__setattr__(self, "min_reserve", budget // 10)
        _check_count(name, "min_reserve", self.min_reserve, optional=False)
        if self.max_tokens is None and self.min_reserve:
            raise ContractError(
                f"Agent '{name}': min_reserve {self.min_reserve} needs a token budget "
                "(max_tokens), and this agent is budgeted in money only"
            )
        if self.max_tokens is not None and self.reserve > self.max_tokens:
            raise ContractError(
                f"Agent '{name}': min_reserve {self.min_reserve} is above max_tokens "
                f"{self.max_tokens}"
            )
        for cap_name in ("max_input_tokens", "max_output_tokens"):
            cap = getattr(self, cap_name)
            _check_count(name, cap_name, cap, optional=True)
            if cap is not None and self.max_tokens is not None and cap > self.max_tokens:
                raise ContractError(
                    f"Agent '{name}': {cap_name} {cap} is above max_tokens {self.max_tokens}"
                )
        thr = self.confidence_threshold
        if thr is not None:
            if isinstance(thr, bool) or not isinstance(thr, (int, float)):
                raise ContractError(
                    f"Agent '{name}': confidence_threshold must be a number in [0, 1], got {thr!r}"
                )
            if math.isnan(thr) or not 0.0 <= thr <= 1.0:
                raise ContractError(
                    f"Agent '{name}': confidence_threshold must be in [0, 1], got {thr!r}"
                )
            object.__setattr__(self, "confidence_threshold", float(thr))
        warn = self.warn_at
        if warn is not None:
            if (
                isinstance(warn, bool)
                or not isinstance(warn, (int, float))
                or math.isnan(warn)
                or not 0 < warn <= 1
            ):
                raise ContractError(f"Agent '{name}': warn_at must be in (0, 1], got {warn!r}")
            object.__setattr__(self, "warn_at", float(warn))
        deps = self.depends_on
        if isinstance(deps, str) or not isinstance(deps, Iterable):
            raise ContractError(
                f"Agent '{name}': depends_on must be a list of agent names (a string is not a "
                f"list of names), got {deps!r}"
            )
        deps_tuple = tuple(deps)
        for dep in deps_tuple:
            if not (isinstance(dep, str) and 0 < len(dep) <= MAX_NAME_LENGTH and dep.isprintable()):
                raise ContractError(
                    f"Agent '{name}': depends_on entries must be agent names, got {dep!r}"
                )
        if name in deps_tuple:
            raise ContractError(f"Agent '{name}': an agent cannot depend on itself")
        if len(set(deps_tuple)) != len(deps_tuple):
            raise ContractError(f"Agent '{name}': depends_on lists a name twice: {deps_tuple!r}")
        object.__setattr__(self, "depends_on", deps_tuple)
        ladder = self.degrade
        if isinstance(ladder, (str, Mapping)) or not isinstance(ladder, Iterable):
            raise ContractError(f"Agent '{name}': degrade must be a list of steps, got {ladder!r}")
        steps = []
        for step in ladder:
            if isinstance(step, Mapping):
                known = [f.name for f in fields(Degrade)]
                unknown = sorted(str(k) for k in step if k not in known)
                if unknown:
                    raise ContractError(
                        f"Agent '{name}': degrade step {dict(step)!r}: unknown field(s) "
                        f"{unknown} (a step has {known})"
                    )
                try:
                    step = Degrade(**step)
                except ContractError as exc:
                    raise ContractError(f"Agent '{name}': {exc}") from None
            if not isinstance(step, Degrade):
                raise ContractError(f"Agent '{name}': degrade steps are Degrade, got {step!r}")
            steps.append(step)
        object.__setattr__(self, "degrade", tuple(steps))

    @property
    def last_confidence(self) -> float | None:
        """The agent's most recent confidence, as its ledger holds it now (``tbcontracts``).

        A contract a :class:`~tbc_integrations.BudgetManager` hands out (from
        ``register_agent`` or ``manager.contracts``) reads it live from the ledger,
        so it follows ``record_usage(..., confidence=...)``, ``govern``'s
        ``confidence_fn`` and other processes on a shared store. A contract built
        alone, or copied, has no ledger: ``None``. Unlike ``tbcontracts`` it cannot
        be assigned (contracts are immutable; the ledger records confidences with
        ``record_confidence``).

        Example:
            >>> from tbc_integrations import BudgetManager
            >>> m = BudgetManager()
            >>> c = m.register_agent("critic", max_tokens=100, confidence_threshold=0.8)
            >>> c.last_confidence is None
            True
            >>> m.record_usage("critic", 5, confidence=0.9)
            >>> c.last_confidence, m.contracts["critic"].last_confidence
            (0.9, 0.9)
            >>> BudgetContract("critic").last_confidence is None
            True
        """
        source = self.__dict__.get("_confidence_source")
        return None if source is None else source(self.agent_name)

    def bound_to(self, source: Callable[[str], float | None]) -> BudgetContract:
        """A copy of this contract whose :attr:`last_confidence` asks ``source(agent_name)``.

        Equality, hashing, :meth:`to_dict` and pickling ignore the binding.

        Example:
            >>> c = BudgetContract("a").bound_to(lambda name: 0.25)
            >>> c.last_confidence, c == BudgetContract("a")
            (0.25, True)
        """
        bound = copy.copy(self)
        object.__setattr__(bound, "_confidence_source", source)
        return bound

    def __getstate__(self) -> dict[str, Any]:
        """Pickled and copied without the ledger binding (see :meth:`bound_to`)."""
        state = dict(self.__dict__)
        state.pop("_confidence_source", None)
        return state

    @property
    def max_cost_nanos(self) -> int | None:
        """``max_cost`` in whole nano-dollars, as the stores keep it."""
        return None if self.max_cost is None else to_nanos(self.max_cost, self.agent_name)

    @property
    def reserve(self) -> int:
        """The resolved minimum reserve (never ``None`` after construction)."""
        assert self.min_reserve is not None
        return self.min_reserve

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (what stores persist and ``from_dict`` reads back).

        Example:
            >>> BudgetContract("a", max_tokens=10).to_dict()["min_reserve"]
            1
        """
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["depends_on"] = list(self.depends_on)
        if self.degrade:
            out["degrade"] = [step.to_dict() for step in self.degrade]  # type: ignore[union-attr]
        else:
            del out["degrade"]  # the form contracts had before the ladder (stores compare it)
        if self.warn_at is None:
            del out["warn_at"]  # the form contracts had before soft limits (stores compare it)
        if self.max_cost is None:
            del out["max_cost"]  # the form contracts had before money (stores compare it)
        else:
            out["max_cost"] = str(self.max_cost)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BudgetContract:
        """Build a contract from :meth:`to_dict` output, refusing unknown keys.

        Example:
            >>> BudgetContract.from_dict({"agent_name": "a", "max_tokens": 10}).max_tokens
            10
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            who = data.get("agent_name", "?")
            raise ContractError(f"Agent '{who}': unknown contract field(s) {unknown}")
        kwargs = dict(data)
        if "depends_on" in kwargs and kwargs["depends_on"] is not None:
            deps = kwargs["depends_on"]
            if isinstance(deps, str) or not isinstance(deps, Iterable):
                raise ContractError(
                    f"Agent '{kwargs.get('agent_name', '?')}': depends_on must be a list of "
                    f"agent names, got {deps!r}"
                )
            kwargs["depends_on"] = tuple(deps)
        elif "depends_on" in kwargs:
            kwargs["depends_on"] = ()
        return cls(**kwargs)


def check_dependencies(contracts: Mapping[str, BudgetContract], *, complete: bool) -> None:
    """Refuse dependency cycles, and (when ``complete``) names no contract defines.

    Args:
        contracts: Every known contract by agent name.
        complete: True when ``contracts`` holds every agent of the system, so an
            unknown dependency is an error rather than one not registered yet.

    Raises:
        ContractError: naming the agent and the unknown name or the cycle.

    Example:
        >>> a = BudgetContract("a", depends_on=["b"])
        >>> b = BudgetContract("b")
        >>> check_dependencies({"a": a, "b": b}, complete=True)
    """
    if complete:
        for name, contract in contracts.items():
            for dep in contract.depends_on:
                if dep not in contracts:
                    raise ContractError(f"Agent '{name}' depends on unknown agent '{dep}'")
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(contracts, white)
    for root in contracts:
        if colour[root] != white:
            continue
        stack: list[tuple[str, int]] = [(root, 0)]
        path: list[str] = [root]
        colour[root] = grey
        while stack:
            node, idx = stack[-1]
            deps = [d for d in contracts[node].depends_on if d in contracts]
            if idx < len(deps):
                stack[-1] = (node, idx + 1)
                nxt = deps[idx]
                if colour[nxt] == grey:
                    cycle = [*path[path.index(nxt) :], nxt]
                    raise ContractError(f"Dependency cycle: {' -> '.join(cycle)}")
                if colour[nxt] == white:
                    colour[nxt] = grey
                    stack.append((nxt, 0))
                    path.append(nxt)
            else:
                colour[node] = black
                stack.pop()
                path.pop()
