"""Contract validation: every bad field is a clear error naming the agent and value."""

from __future__ import annotations

from typing import Any

import pytest

from tbc_integrations import BudgetContract, BudgetManager, ContractError
from tbc_integrations._contracts import check_dependencies
from tbc_integrations._validate import MAX_TOKENS


def test_defaults_follow_the_paper_schema() -> None:
    c = BudgetContract("researcher", priority=3, max_tokens=4000)
    assert c.min_reserve == 400
    assert (c.max_input_tokens, c.max_output_tokens, c.confidence_threshold) == (None,) * 3
    assert c.depends_on == ()


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"priority": 0}, "priority must be an integer >= 1, got 0"),
        ({"priority": True}, "priority must be an integer >= 1, got True"),
        ({"priority": 1.5}, "priority must be an integer >= 1, got 1.5"),
        ({"max_tokens": -1}, f"max_tokens must be an integer from 0 to {MAX_TOKENS}, got -1"),
        (
            {"max_tokens": 10.0},
            f"max_tokens must be an integer from 0 to {MAX_TOKENS}, got 10.0",
        ),
        (
            {"max_tokens": True},
            f"max_tokens must be an integer from 0 to {MAX_TOKENS}, got True",
        ),
        (
            {"max_tokens": "100"},
            f"max_tokens must be an integer from 0 to {MAX_TOKENS}, got '100'",
        ),
        ({"max_tokens": 10, "min_reserve": 11}, "min_reserve 11 is above max_tokens 10"),
        ({"min_reserve": -5}, f"min_reserve must be an integer from 0 to {MAX_TOKENS}, got -5"),
        ({"max_tokens": 10, "max_input_tokens": 11}, "max_input_tokens 11 is above max_tokens"),
        ({"max_tokens": 10, "max_output_tokens": 20}, "max_output_tokens 20 is above max_tokens"),
        ({"max_output_tokens": False}, "max_output_tokens must be an integer from 0 to"),
        ({"confidence_threshold": 1.5}, "confidence_threshold must be in [0, 1], got 1.5"),
        ({"confidence_threshold": -0.1}, "confidence_threshold must be in [0, 1], got -0.1"),
        ({"confidence_threshold": float("nan")}, "confidence_threshold must be in [0, 1], got nan"),
        ({"confidence_threshold": "high"}, "confidence_threshold must be a number"),
        ({"depends_on": "planner"}, "depends_on must be a list of agent names"),
        ({"depends_on": ["agent"]}, "cannot depend on itself"),
        ({"depends_on": ["a", "a"]}, "lists a name twice"),
        ({"depends_on": [3]}, "depends_on entries must be agent names, got 3"),
    ],
)
def test_bad_fields_are_refused_naming_agent_and_value(
    kwargs: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ContractError) as info:
        BudgetContract("agent", **kwargs)
    assert "Agent 'agent'" in str(info.value)
    assert fragment in str(info.value)


def test_empty_name_is_refused() -> None:
    with pytest.raises(ContractError, match="agent name must be a non-empty string"):
        BudgetContract("")


def test_dict_round_trip_and_unknown_fields() -> None:
    c = BudgetContract("w", priority=2, max_tokens=50, depends_on=["r"], max_output_tokens=20)
    assert BudgetContract.from_dict(c.to_dict()) == c
    with pytest.raises(ContractError, match=r"Agent 'w': unknown contract field\(s\) \['budget'\]"):
        BudgetContract.from_dict({"agent_name": "w", "budget": 3})


def test_unknown_dependency_is_an_error_once_all_agents_are_known() -> None:
    contracts = {"w": BudgetContract("w", depends_on=["ghost"])}
    check_dependencies(contracts, complete=False)  # ghost may register later
    with pytest.raises(ContractError, match="Agent 'w' depends on unknown agent 'ghost'"):
        check_dependencies(contracts, complete=True)
    m = BudgetManager()
    m.add_contract(contracts["w"])
    with pytest.raises(ContractError, match="unknown agent 'ghost'"):
        m.check_dependencies()
    with pytest.raises(ContractError, match="unknown agent 'ghost'"):
        BudgetManager.from_contracts(contracts.values())


def test_cycles_are_refused_at_registration_and_leave_nothing_registered() -> None:
    m = BudgetManager()
    m.register_agent("a", depends_on=["b"])
    m.register_agent("b", depends_on=["c"])
    with pytest.raises(
        ContractError, match=r"Dependency cycle: (c -> a -> b -> c|a -> b -> c -> a)"
    ):
        m.register_agent("c", depends_on=["a"])
    assert sorted(m.contracts) == ["a", "b"]
    with pytest.raises(ContractError, match="Dependency cycle"):
        BudgetManager.from_contracts(
            {"x": {"depends_on": ["y"]}, "y": {"depends_on": ["x"]}},
        )


def test_duplicate_registration_is_refused_and_changes_nothing() -> None:
    m = BudgetManager()
    m.register_agent("a", max_tokens=100)
    m.reserve("a", 30)
    with pytest.raises(ContractError, match="Agent 'a' is already registered"):
        m.register_agent("a", max_tokens=100)
    with pytest.raises(ContractError, match="Agent 'a' is already registered"):
        m.register_agent("a", max_tokens=500)
    assert m.report()["a"] == {"allocated": 100, "consumed": 0, "remaining": 70}


def test_second_manager_on_the_same_store_attaches_or_refuses_a_different_contract() -> None:
    first = BudgetManager()
    first.register_agent("a", max_tokens=100)
    first.reserve("a", 40)
    second = BudgetManager(store=first.store)
    second.register_agent("a", max_tokens=100)  # same contract: attaches
    assert second.remaining("a") == 60
    third = BudgetManager(store=first.store)
    with pytest.raises(ContractError, match="already exists in namespace 'default'"):
        third.register_agent("a", max_tokens=101)


def test_from_contracts_accepts_mappings_and_rejects_junk() -> None:
    m = BudgetManager.from_contracts({"a": {"max_tokens": 10, "priority": 2}})
    assert m.contracts["a"].priority == 2
    with pytest.raises(ContractError, match="Agent 'a': contract must be a mapping"):
        BudgetManager.from_contracts({"a": 10})  # type: ignore[arg-type]
