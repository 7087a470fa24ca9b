"""Budgets files: contracts for a team from a mapping or a ``budgets.yaml``.

Reading a file needs only a YAML parser (``pip install 'tbc-integrations[yaml]'``),
no framework; CrewAI projects keep such a file beside ``agents.yaml`` and the
``tbc validate`` command checks one. A file is read like API input: duplicate or
null keys, aliases that expand past :data:`MAX_NODES` nodes, nesting deeper than
:data:`MAX_DEPTH` and a file without agents are refused with a
:class:`~tbc_integrations.ContractError` naming the file, and the line or key.

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
    "MAX_DEPTH",
    "MAX_NODES",
    "PRICES_KEY",
    "contracts_from_mapping",
    "load_budgets",
    "load_prices",
    "prices_from_mapping",
]

PRICES_KEY = "prices"
"""The top-level key of a budgets file that holds model prices, not an agent."""


MAX_NODES = 100_000
"""The most YAML nodes a budgets file may expand to (aliases counted each time used)."""

MAX_DEPTH = 32
"""The deepest nesting of mappings and lists a budgets file may have."""


def _yaml() -> Any:
    try:
        import yaml
    except ImportError as exc:
        raise MissingDependencyError(
            "reading a budgets file needs pyyaml: pip install 'tbc-integrations[yaml]'"
        ) from exc
    return yaml


def _where(node: Any) -> str:
    mark = getattr(node, "start_mark", None)
    return f"line {mark.line + 1}" if mark is not None else "?"


def _check_tree(yaml: Any, root: Any) -> None:
    """Refuse a node tree that expands past MAX_NODES or nests past MAX_DEPTH.

    Aliases point at shared nodes, so the walk counts every use: a "billion
    laughs" stops at the bound instead of filling memory.
    """
    count = 0
    stack: list[tuple[Any, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ContractError(f"more than {MAX_NODES:,} YAML nodes (aliases expanded)")
        if depth > MAX_DEPTH:
            raise ContractError(f"{_where(node)}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, depth + 1) for item in node.value)


def _safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses duplicate and null keys, alias bombs and deep nesting."""
    yaml = _yaml()

    class Loader(yaml.SafeLoader):  # type: ignore[name-defined,misc]
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                if key is None:
                    raise ContractError(f"{_where(key_node)}: a null key")
                try:
                    duplicate = key in seen
                except TypeError:  # an unhashable key: SafeLoader says so below
                    continue
                if duplicate:
                    shown = str(key)[:80]
                    raise ContractError(f"{_where(key_node)}: duplicate key '{shown}'")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    loader = Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None
        _check_tree(yaml, root)
        return loader.construct_document(root)
    finally:
        loader.dispose()


def contracts_from_mapping(budgets: Mapping[str, Any]) -> dict[str, BudgetContract]:
    """Contracts from ``{agent: {field: value} | BudgetContract}``, validated.

    Raises:
        ContractError: naming the agent and the bad field or value.

    Example:
        >>> contracts_from_mapping({"Writer": {"max_tokens": 500}})["Writer"].max_tokens
        500
    """
    if not isinstance(budgets, Mapping):
        raise ContractError(f"budgets must map agent names to contracts, got {_shown(budgets)}")
    out: dict[str, BudgetContract] = {}
    for name, spec in budgets.items():
        if not isinstance(name, str) or not name:
            raise ContractError(f"budgets: agent names must be strings, got {_shown(name)}")
        if isinstance(spec, BudgetContract):
            if spec.agent_name != name:
                spec = BudgetContract.from_dict({**spec.to_dict(), "agent_name": name})
            out[name] = spec
        elif isinstance(spec, Mapping):
            out[name] = BudgetContract.from_dict({**spec, "agent_name": name})
        else:
            raise ContractError(
                f"Agent '{name}': contract must be a mapping of fields, got {_shown(spec)}"
            )
    return out


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load(file: Path, what: str) -> Any:
    try:
        return _safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ContractError(f"{file}: cannot read {what}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ContractError(f"{file}: not UTF-8 text: {exc.reason}") from None
    except ContractError as exc:
        raise ContractError(f"{file}: {exc}") from None
    except RecursionError:
        raise ContractError(f"{file}: nested too deeply") from None
    except _yaml().YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ContractError(f"{file}: not valid YAML: {where}{problem}") from None


def _read(file: Path) -> Mapping[Any, Any]:
    data = _load(file, "budgets file")
    if data is None:
        raise ContractError(f"{file}: empty budgets file (no agents)")
    if not isinstance(data, Mapping):
        raise ContractError(f"{file}: expected a mapping of agent to contract, got {_shown(data)}")
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
        ContractError: unreadable YAML (with its line), no agents, duplicate or
            null keys, unknown fields, bad types or numbers, naming the file and
            the agent.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "budgets.yaml"
        >>> _ = path.write_text("Writer: {max_tokens: 500}")
        >>> load_budgets(path)["Writer"].max_tokens
        500
        >>> _ = path.write_text("Writer: {max_tokens: 500}\\nWriter: {max_tokens: 9}")
        >>> load_budgets(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        tbc_integrations._errors.ContractError: ...budgets.yaml: line 2: duplicate key 'Writer'
    """
    file = Path(path)
    data = dict(_read(file))
    prices = _is_price_table(data.get(PRICES_KEY))
    if prices:
        del data[PRICES_KEY]
    roles: dict[str, str] = {}
    agents_file = file.with_name("agents.yaml")
    if agents_file.exists():
        agents = _load(agents_file, "agents file") or {}
        if isinstance(agents, Mapping):
            for key, spec in agents.items():
                if isinstance(spec, Mapping) and isinstance(spec.get("role"), str):
                    roles[str(key)] = spec["role"].strip()
    if not data:
        raise ContractError(f"{file}: no agents" + (" (only prices)" if prices else ""))
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
