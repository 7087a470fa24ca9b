"""Budgets files: contracts for a team from a mapping or a ``budgets.yaml`` (needs pyyaml).

The public names live in :mod:`tbc_integrations.crewai` (where CrewAI projects
keep such a file) and the ``tbc validate`` command uses them too.

A contract's ``max_cost`` is US dollars, a string (``"0.50"``, exact) or a
number. The file may also hold the models' prices under a top-level
``prices:`` key, mapping each model to its :class:`~tbc_integrations.ModelPrice`
fields (US dollars per million tokens); :func:`load_prices` reads them::

    prices:
      gpt-4o-mini: {input: "0.15", output: "0.60", cache_read: "0.075"}
    Researcher:
      max_tokens: 4000
      max_cost: "0.05"

(``prices`` is an agent like any other when its fields are not all mappings.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tbc_integrations._contracts import BudgetContract
from tbc_integrations._errors import ContractError, MissingDependencyError
from tbc_integrations._pricing import ModelPrice

__all__ = [
    "PRICES_KEY",
    "contracts_from_mapping",
    "load_budgets",
    "load_prices",
    "prices_from_mapping",
]

PRICES_KEY = "prices"
"""The top-level key of a budgets file that holds model prices, not an agent."""


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - pyyaml comes with every extra that reads it
        raise MissingDependencyError(
            "reading budgets.yaml needs pyyaml: pip install 'tbc-integrations[crewai]'"
        ) from exc
    return yaml


def contracts_from_mapping(budgets: Mapping[str, Any]) -> dict[str, BudgetContract]:
    """Contracts from ``{agent: {field: value} | BudgetContract}``, validated.

    Raises:
        ContractError: naming the agent and the bad field or value.

    Example:
        >>> contracts_from_mapping({"Writer": {"max_tokens": 500}})["Writer"].max_tokens
        500
    """
    if not isinstance(budgets, Mapping):
        raise ContractError(f"budgets must map agent names to contracts, got {budgets!r}")
    out: dict[str, BudgetContract] = {}
    for name, spec in budgets.items():
        if not isinstance(name, str) or not name:
            raise ContractError(f"budgets: agent names must be strings, got {name!r}")
        if isinstance(spec, BudgetContract):
            if spec.agent_name != name:
                spec = BudgetContract.from_dict({**spec.to_dict(), "agent_name": name})
            out[name] = spec
        elif isinstance(spec, Mapping):
            out[name] = BudgetContract.from_dict({**spec, "agent_name": name})
        else:
            raise ContractError(
                f"Agent '{name}': contract must be a mapping of fields, got {spec!r}"
            )
    return out


def _read(file: Path) -> Mapping[Any, Any]:
    try:
        data = _yaml().safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ContractError(f"{file}: cannot read budgets file: {exc}") from exc
    except _yaml().YAMLError as exc:
        raise ContractError(f"{file}: not valid YAML: {exc}") from exc
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ContractError(f"{file}: expected a mapping of agent to contract, got {data!r}")
    return data


def _is_price_table(value: Any) -> bool:
    """A ``prices:`` entry maps models to mappings of fields; a contract maps fields to values."""
    return isinstance(value, Mapping) and all(isinstance(v, Mapping) for v in value.values())


def prices_from_mapping(prices: Mapping[str, Any]) -> dict[str, ModelPrice]:
    """Prices from ``{model: {input, output, cache_read, ...} | ModelPrice}``, validated.

    Raises:
        ContractError: naming the model and the bad field or value.

    Example:
        >>> prices_from_mapping({"m": {"input": "0.15", "output": 0.6}})["m"].output
        Decimal('0.6')
    """
    if not isinstance(prices, Mapping):
        raise ContractError(f"prices must map model names to prices, got {prices!r}")
    return {str(model): ModelPrice.from_value(str(model), v) for model, v in prices.items()}


def load_prices(path: str | Path) -> dict[str, ModelPrice]:
    """The ``prices:`` of a ``budgets.yaml`` (empty when it has none), for ``BudgetManager``.

    Raises:
        ContractError: unreadable YAML or a bad price, naming the file and the model.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "budgets.yaml"
        >>> _ = path.write_text("prices: {m: {input: '0.15', output: '0.60'}}")
        >>> load_prices(path)["m"].input
        Decimal('0.15')
    """
    file = Path(path)
    table = _read(file).get(PRICES_KEY)
    if table is None or not _is_price_table(table):
        return {}
    try:
        return prices_from_mapping(table)
    except ContractError as exc:
        raise ContractError(f"{file}: {exc}") from None


def load_budgets(path: str | Path) -> dict[str, BudgetContract]:
    """Read ``budgets.yaml``: a mapping of agent (role or ``agents.yaml`` key) to fields.

    A top-level ``prices:`` table is not an agent (read it with :func:`load_prices`).

    When an ``agents.yaml`` sits beside it, a key naming an ``agents.yaml`` entry
    is translated to that agent's ``role``; any other key must be a role.

    Raises:
        ContractError: unreadable YAML (with its line), unknown fields, bad
            types or numbers, naming the file and the agent.
    """
    file = Path(path)
    data = dict(_read(file))
    if _is_price_table(data.get(PRICES_KEY)):
        del data[PRICES_KEY]
    roles: dict[str, str] = {}
    agents_file = file.with_name("agents.yaml")
    if agents_file.exists():
        try:
            agents = _yaml().safe_load(agents_file.read_text(encoding="utf-8")) or {}
        except _yaml().YAMLError as exc:
            raise ContractError(f"{agents_file}: not valid YAML: {exc}") from exc
        if isinstance(agents, Mapping):
            for key, spec in agents.items():
                if isinstance(spec, Mapping) and isinstance(spec.get("role"), str):
                    roles[str(key)] = spec["role"].strip()
    renamed: dict[str, Any] = {}
    for key, spec in data.items():
        name = roles.get(str(key), str(key))
        if name in renamed:
            raise ContractError(f"{file}: agent '{name}' is given two budgets")
        renamed[name] = spec
    try:
        return contracts_from_mapping(renamed)
    except ContractError as exc:
        raise ContractError(f"{file}: {exc}") from None
