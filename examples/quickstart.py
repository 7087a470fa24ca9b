"""Three agents under contracts: one borrows from an idle peer, one is refused.

Runs offline on the in-memory store. The "model" here is a stand-in that
reports usage the way providers do; the LangChain, LangGraph and CrewAI
plugins feed real calls through the same three verbs.

Run: ``python examples/quickstart.py``
"""

from __future__ import annotations

from tbc_integrations import BudgetExceededError, BudgetManager
from tbc_integrations.tokens import TokenCounter


def fake_llm(prompt: str, max_tokens: int) -> tuple[str, dict[str, int]]:
    """A scripted model: answers with a fixed share of its output cap."""
    words = ["finding"] * (max_tokens * 3 // 4)
    text = " ".join(words)
    counter = TokenCounter(model="gpt-4")
    return text, {
        "prompt_tokens": counter.count_messages([{"role": "user", "content": prompt}]),
        "completion_tokens": counter.count(text),
    }


def run() -> tuple[BudgetManager, list[str]]:
    """Run the scenario; return the manager and a log of what happened."""
    manager = BudgetManager()
    manager.register_agent("planner", priority=1, max_tokens=2_000)
    manager.register_agent("researcher", priority=3, max_tokens=1_000, max_input_tokens=400)
    manager.register_agent("critic", priority=2, max_tokens=300, confidence_threshold=0.8)
    counter = TokenCounter(model="gpt-4")
    log: list[str] = []

    def call(agent: str, prompt: str, max_tokens: int) -> None:
        estimate = counter.count_messages([{"role": "user", "content": prompt}])
        try:
            with manager.spend(agent, input_tokens=estimate, output_tokens=max_tokens) as spend:
                _, usage = fake_llm(prompt, max_tokens)
                spend.set_usage(usage)
            loans = ", ".join(f"{t} from {d}" for d, t in spend.reservation.loans)
            used = usage["prompt_tokens"] + usage["completion_tokens"]
            log.append(f"{agent}: used {used} tokens" + (f" (borrowed {loans})" if loans else ""))
        except BudgetExceededError as exc:
            log.append(f"{agent}: refused before the call: {exc}")

    call("planner", "Plan a short report on battery recycling.", 200)
    call("researcher", "Collect figures on lithium recovery rates.", 600)
    call("researcher", "Collect figures on cobalt recovery rates.", 800)  # borrows
    call("researcher", "Write up every figure in full detail.", 2_400)  # refused: no donor has it
    call("critic", "Review the figures.", 150)
    manager.record_confidence("critic", 0.9)
    call("critic", "Review the figures once more.", 100)  # gated: confident enough
    return manager, log


def main() -> None:
    """Print what happened and the per-agent report."""
    manager, log = run()
    for line in log:
        print(line)
    print()
    header = (
        f"{'agent':<11}{'allocated':>10}{'consumed':>10}{'remaining':>10}"
        f"{'borrowed':>10}{'lent':>6}{'refusals':>10}"
    )
    print(header)
    print("-" * len(header))
    for name, s in manager.status().items():
        print(
            f"{name:<11}{s.allocated:>10}{s.consumed:>10}{s.remaining:>10}"
            f"{s.borrowed:>10}{s.lent:>6}{s.refusals:>10}"
        )
    print()
    print("report():", manager.report())


if __name__ == "__main__":
    main()
