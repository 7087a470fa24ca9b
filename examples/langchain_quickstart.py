"""LangChain quick start: budget a chain per agent, cut a stream, degrade to a cheaper model.

Runs offline: the chat models are scripted fakes that report usage the way
providers do. Swap in ``langchain_openai.ChatOpenAI(...)`` (with
``stream_usage=True`` when you stream through a custom ``base_url``) and
nothing else changes.

Run: ``python examples/langchain_quickstart.py``
"""

from __future__ import annotations

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableConfig

from tbc_integrations import BudgetExceededError, BudgetManager
from tbc_integrations.langchain import BudgetCallbackHandler, budget_scope
from tbc_integrations.testing import UsageFakeChat


def run() -> tuple[BudgetManager, list[str]]:
    """Run the scenario; return the manager and what happened."""
    manager = BudgetManager()
    manager.register_agent("researcher", priority=3, max_tokens=600)
    manager.register_agent("writer", priority=2, max_tokens=400, max_output_tokens=40)
    manager.register_agent("helper", priority=1, max_tokens=1_000)
    log: list[str] = []

    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a careful {role}."), ("user", "{task}")]
    )
    model = UsageFakeChat(reply="lithium recovery rates rose to 95 percent in 2025", max_tokens=60)
    chain = prompt | model | StrOutputParser()

    # 1. One handler for the whole team; each call names its agent in metadata.
    handler = BudgetCallbackHandler(manager, default_max_tokens=200)
    answer = chain.invoke(
        {"role": "researcher", "task": "Find recovery rates."},
        config={"callbacks": [handler], "metadata": {"tbc_agent": "researcher"}},
    )
    log.append(f"researcher answered: {answer!r}")

    # 2. A stream cut at the writer's output cap: the caller keeps what arrived.
    long_writer = UsageFakeChat(reply=" ".join(["word"] * 100))
    received: list[str] = []
    writer_config: RunnableConfig = {"callbacks": [handler], "metadata": {"tbc_agent": "writer"}}
    try:
        for chunk in long_writer.stream("Write it all up.", config=writer_config):
            received.append(str(chunk.content))  # noqa: PERF401 - a real caller consumes as it goes
    except BudgetExceededError as exc:
        log.append(f"writer stream cut after {len(received)} chunks: {exc}")

    # 3. Degrade instead of failing: a big request is refused, the cheap model answers.
    big = UsageFakeChat(reply="an exhaustive report", max_tokens=4_000)
    small = UsageFakeChat(reply="a short report", max_tokens=100)
    robust = big.with_fallbacks([small], exceptions_to_handle=(BudgetExceededError,))
    with budget_scope(manager, agent="researcher"):
        reply = robust.invoke("Report everything.")
    log.append(f"researcher fell back to the cheaper model: {reply.content!r}")
    return manager, log


def main() -> None:
    """Print what happened and the per-agent status."""
    manager, log = run()
    for line in log:
        print(line)
    print()
    for name, s in manager.status().items():
        print(
            f"{name:<11} allocated {s.allocated:>5}  consumed {s.consumed:>4} "
            f"(in {s.input_tokens}, out {s.output_tokens})  borrowed {s.borrowed:>4}  "
            f"refusals {s.refusals}"
        )


if __name__ == "__main__":
    main()
