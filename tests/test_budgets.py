"""budgets.yaml with money: max_cost as a string or a number, and a top-level prices table."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from tbc_integrations import BudgetManager, ContractError, ModelPrice, Usage
from tbc_integrations.budgets import load_budgets, load_prices
from tbc_integrations.cli import main

BUDGETS = """\
prices:
  scripted-gpt: {input: "0.15", output: "0.60", cache_read: "0.075"}
  big-model: {input: 3, output: 15.5}
Researcher:
  max_tokens: 4000
  max_cost: "0.05"
Writer:
  max_cost: 0.1
Critic:
  max_tokens: 500
  max_cost: 2
"""


def test_max_cost_as_string_or_number_and_a_prices_table(tmp_path: Path) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text(BUDGETS)
    contracts = load_budgets(path)
    assert sorted(contracts) == ["Critic", "Researcher", "Writer"]  # prices is no agent
    assert contracts["Researcher"].max_cost == Decimal("0.05")
    assert contracts["Writer"].max_cost == Decimal("0.1") and contracts["Writer"].max_tokens is None
    assert contracts["Critic"].max_cost == Decimal("2")
    prices = load_prices(path)
    assert prices == {
        "scripted-gpt": ModelPrice(input="0.15", output="0.60", cache_read="0.075"),
        "big-model": ModelPrice(input=3, output="15.5"),
    }
    m = BudgetManager.from_contracts(contracts.values(), prices=prices)
    m.commit(m.reserve("Researcher", 1_000, 100, model="scripted-gpt"), Usage(1_000, 100))
    assert m.status()["Researcher"].cost == Decimal("0.00021")
    assert m.status()["Researcher"].cost_remaining == Decimal("0.04979")


def test_a_file_without_prices_and_an_agent_named_prices(tmp_path: Path) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text("prices:\n  max_tokens: 100\n  max_cost: '0.5'\n")
    assert load_prices(path) == {}
    assert load_budgets(path)["prices"].max_cost == Decimal("0.5")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prices:\n  m: {input: -1, output: 1}\n", "Price of model 'm'"),
        ("prices:\n  m: {input: 1}\n", "Price of model 'm'"),
        ("prices:\n  m: {input: 1, output: 1, typo: 2}\n", "typo"),
    ],
)
def test_bad_prices_name_the_file_and_the_model(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text(text)
    with pytest.raises(ContractError) as info:
        load_prices(path)
    assert str(path) in str(info.value) and message in str(info.value)
    assert main(["validate", str(path)]) == 1


def test_validate_reports_caps_and_prices(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "budgets.yaml"
    path.write_text(BUDGETS)
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out == (
        "ok: 3 agents, 4,500 tokens in all, $2.15 in cost caps (3 capped), prices for 2 models\n"
    )
