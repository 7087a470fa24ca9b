"""Budgets files: contracts for a team from a mapping or a ``budgets.yaml`` (needs pyyaml).

The public names live in :mod:`tbc_integrations.crewai` (where CrewAI projects
keep such a file) and the ``tbc validate`` command uses them too.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tbc_integrations._contracts import BudgetContract
from tbc_integrations._errors import ContractError, MissingDependencyError

__all__ = ["contracts_from_mapping", "load_budgets"]


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


def load_budgets(path: str | Path) -> dict[str, BudgetContract]:
    """Read ``budgets.yaml``: a mapping of agent (role or ``agents.yaml`` key) to fields.

    When an ``agents.yaml`` sits beside it, a key naming an ``agents.yaml`` entry
    is translated to that agent's ``role``; any other key must be a role.

    Raises:
        ContractError: unreadable YAML (with its line), unknown fields, bad
            types or numbers, naming the file and the agent.
    """
    file = Path(path)
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
