"""A small CrewAI project under token budget contracts.

``agents.yaml`` and ``tasks.yaml`` define the crew the usual CrewAI way;
``budgets.yaml`` beside them gives each agent its contract. Offline by default:
the crew's ``crewai.LLM`` talks HTTP to a local OpenAI-compatible stub that
reports usage like the real API. ``--model gpt-4o-mini`` runs it against
OpenAI (``OPENAI_API_KEY`` must be set; without it the script stops with an
error rather than quietly run offline).

Run: ``python examples/crewai_crew/crew.py``
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import yaml
from crewai import LLM, Agent, Crew, Process, Task

from tbc_integrations import BudgetManager, ContractError
from tbc_integrations.crewai import crew_summary, govern_crew
from tbc_integrations.testing import OpenAIStub

HERE = Path(__file__).resolve().parent


def build_crew(llm: LLM) -> Crew:
    """The crew from agents.yaml and tasks.yaml."""
    agents_cfg: dict[str, Any] = yaml.safe_load((HERE / "agents.yaml").read_text())
    tasks_cfg: dict[str, Any] = yaml.safe_load((HERE / "tasks.yaml").read_text())
    agents = {key: Agent(config=cfg, llm=llm) for key, cfg in agents_cfg.items()}
    tasks = [
        Task(
            description=cfg["description"],
            expected_output=cfg["expected_output"],
            agent=agents[cfg["agent"]],
        )
        for cfg in tasks_cfg.values()
    ]
    return Crew(agents=list(agents.values()), tasks=tasks, process=Process.sequential)


REPLY = (
    "Thought: I have what I need.\nFinal Answer: Recycling recovers 95% of the "
    "cobalt, costs are falling, and policy is catching up."
)
INPUTS = {"topic": "battery recycling"}
Result = tuple[BudgetManager, str, dict[str, dict[str, Any]]]


def governed_crew(stub: OpenAIStub, manager: BudgetManager, model: str | None) -> Crew:
    """The crew on a real model (``model``; needs ``OPENAI_API_KEY``) or on the local stub."""
    if model is not None:
        if not os.environ.get("OPENAI_API_KEY"):
            raise ContractError(f"--model {model} needs OPENAI_API_KEY set")
        llm = LLM(model=model, max_tokens=300)
    else:
        llm = LLM(model="openai/gpt-4", base_url=stub.base_url, api_key="offline", max_tokens=150)
    return govern_crew(build_crew(llm), manager, HERE / "budgets.yaml")


def run(model: str | None = None) -> Result:
    """Kick off the governed crew once; return the manager, the result and the summary."""
    manager = BudgetManager()
    with OpenAIStub(reply=REPLY) as stub:
        crew = governed_crew(stub, manager, model)
        result = crew.kickoff(inputs=INPUTS)
    return manager, str(result), crew_summary(manager, crew)


async def arun(model: str | None = None) -> Result:
    """:func:`run` for code already inside an event loop (a notebook, a server)."""
    manager = BudgetManager()
    with OpenAIStub(reply=REPLY) as stub:
        crew = governed_crew(stub, manager, model)
        result = await crew.akickoff(inputs=INPUTS)
    return manager, str(result), crew_summary(manager, crew)


def main(argv: list[str] | None = None) -> None:
    """Run and print the brief and the per-agent budget summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", help="a real model (needs OPENAI_API_KEY), e.g. gpt-4o-mini")
    args = parser.parse_args(argv)
    try:
        _, result, summary = run(args.model)
    except ContractError as exc:
        sys.exit(f"crew.py: error: {exc}")
    print(f"brief: {result}\n")
    print(
        f"{'agent':<12}{'allocated':>10}{'consumed':>10}{'borrowed':>10}{'lent':>6}{'refused':>9}"
    )
    for name, row in summary.items():
        print(
            f"{name:<12}{row['allocated']:>10}{row['consumed']:>10}{row['borrowed']:>10}"
            f"{row['lent']:>6}{row['refusals']:>9}"
        )


if __name__ == "__main__":
    main()
