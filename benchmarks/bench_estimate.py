"""How close the input estimates come, printed side by side.

1. The four-characters-a-token estimate (a core install, no tiktoken) against tiktoken's
   ``cl100k_base`` on the prose and code of this repository, per paragraph and in all.
2. Tool definitions counted as their JSON (what the LangChain handler reserves) against
   OpenAI's documented recipe for function definitions, on flat and nested tool sets.
3. The handler's reservation against what a local server billed (``OpenAIStub``: the
   messages, the tools' and the schema's JSON, and 7 tokens of its own overhead), through
   the real ``ChatOpenAI`` client, with and without tools.

Run: ``python benchmarks/bench_estimate.py``.
"""

from __future__ import annotations

import statistics
import warnings
from pathlib import Path
from typing import Any

from tbc_integrations.tokens import TokenCounter, openai_function_tokens

ROOT = Path(__file__).resolve().parent.parent


def paragraphs() -> list[str]:
    texts = [p.read_text(encoding="utf-8") for p in sorted(ROOT.glob("docs/**/*.md"))]
    texts += [ROOT.joinpath("README.md").read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8") for p in sorted(ROOT.glob("tbc_integrations/*.py"))]
    out = []
    for text in texts:
        out += [p for p in text.split("\n\n") if len(p) > 40]
    return out


def bench_chars(exact: TokenCounter) -> None:
    paras = paragraphs()
    errors = []
    total_real = total_est = 0
    for p in paras:
        real, est = exact.count(p), (len(p) + 3) // 4
        total_real += real
        total_est += est
        errors.append((est - real) / real)
    print("1. four characters a token vs tiktoken cl100k_base")
    print(f"   paragraphs {len(paras)}, tokens {total_real:,} real, {total_est:,} estimated")
    print(f"   in all: {100 * (total_est - total_real) / total_real:+.1f}%")
    print(
        f"   per paragraph: median {100 * statistics.median(errors):+.1f}%, "
        f"10th {100 * statistics.quantiles(errors, n=10)[0]:+.1f}%, "
        f"90th {100 * statistics.quantiles(errors, n=10)[-1]:+.1f}%"
    )


def tool(name: str, props: dict[str, Any], doc: str) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": doc,
            "parameters": {"type": "object", "properties": props, "required": list(props)},
        },
    }


def tool_sets() -> dict[str, list[dict[str, Any]]]:
    flat = [
        tool(
            f"search_{i}",
            {
                "query": {"type": "string", "description": "What to look for."},
                "limit": {"type": "integer", "description": "How many results."},
                "region": {"type": "string", "enum": ["eu", "us", "asia"]},
            },
            f"Search source {i} for documents matching the query, ranked by relevance.",
        )
        for i in range(10)
    ]
    nested = [
        tool(
            "create_order",
            {
                "customer": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "email": {"type": "string"}},
                },
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                    },
                },
            },
            "Create an order for a customer.",
        )
    ]
    return {"10 flat tools": flat, "1 nested tool": nested, "one tool": flat[:1]}


def bench_tools(counter: TokenCounter) -> None:
    print("2. tools as JSON (reserved for providers other than OpenAI) vs OpenAI's recipe")
    for name, tools in tool_sets().items():
        ours, documented = counter.count_tools(tools), openai_function_tokens(tools, counter)
        print(f"   {name:<14} JSON {ours:>5}  recipe {documented:>5}  ({ours / documented:.2f}x)")


def bench_reservation() -> None:
    from langchain_openai import ChatOpenAI

    from tbc_integrations import BudgetManager
    from tbc_integrations.langchain import BudgetCallbackHandler
    from tbc_integrations.testing import OpenAIStub

    m = BudgetManager()
    m.register_agent("a", max_tokens=10**9)
    reserved: list[int] = []
    m.subscribe(lambda e: reserved.append(e.input_tokens) if e.kind == "reserve" else None)
    handler = BudgetCallbackHandler(m, agent="a")
    prompts = [p[:2000] for p in paragraphs()[:20]]
    tools = tool_sets()["10 flat tools"]
    with OpenAIStub() as stub:
        chat = ChatOpenAI(
            model="gpt-4",
            base_url=stub.base_url,
            api_key="t",  # type: ignore[arg-type]
            max_completion_tokens=4,
            max_retries=0,
        )
        for i, prompt in enumerate(prompts):
            model = chat.bind_tools(tools) if i % 2 else chat
            model.invoke(prompt, config={"callbacks": [handler]})
        billed = [u["prompt_tokens"] for u in stub.usages]
    gaps = [b - r for r, b in zip(reserved, billed, strict=True)]
    print("3. the handler's reservation vs the local server's bill (ChatOpenAI, gpt-4;")
    print("   the server bills tools by OpenAI's documented recipe, as the handler counts them)")
    print(
        f"   {len(gaps)} calls, half with 10 tools: billed minus reserved "
        f"min {min(gaps)}, max {max(gaps)} tokens (the server's own overhead is 7)"
    )


def main() -> None:
    warnings.simplefilter("ignore")
    counter = TokenCounter(encoding="cl100k_base")
    bench_chars(counter)
    bench_tools(counter)
    bench_reservation()


if __name__ == "__main__":
    main()
