"""Offline CrewAI parts for tests: a BaseLLM fake that reports usage like a provider."""

from __future__ import annotations

import threading
from typing import Any

from crewai.events.types.llm_events import LLMCallType
from crewai.llms.base_llm import BaseLLM, llm_call_context

from tbc_integrations.tokens import TokenCounter

_COUNTER = TokenCounter(model="gpt-4")


class ScriptedCrewLLM(BaseLLM):
    """Answers every call with a ReAct final answer and reports provider-style usage.

    ``reported`` keeps, per agent role, the usage this "provider" reported.
    """

    def __init__(self, answer: str = "done", *, fail: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("model", "scripted-gpt")
        super().__init__(**kwargs)
        self._answer = answer
        self._fail = fail
        self._lock = threading.Lock()
        self.reported: dict[str, list[tuple[int, int]]] = {}
        self.requests = 0

    def call(
        self,
        messages: Any,
        tools: Any = None,
        callbacks: Any = None,
        available_functions: Any = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> Any:
        with llm_call_context():
            self._emit_call_started_event(
                messages=messages, tools=tools, from_task=from_task, from_agent=from_agent
            )
            msgs = (
                [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
            )
            self._invoke_before_llm_call_hooks(msgs, from_agent)  # type: ignore[arg-type]
            if self._fail:  # the provider errors, the way native providers report it
                with self._lock:
                    self.requests += 1
                self._emit_call_failed_event(
                    error="provider unavailable", from_task=from_task, from_agent=from_agent
                )
                raise ConnectionError("provider unavailable")
            text = f"Thought: I can answer now.\nFinal Answer: {self._answer}"
            prompt = _COUNTER.count_messages(msgs)
            completion = _COUNTER.count(text)
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
            role = getattr(from_agent, "role", None) or "<none>"
            with self._lock:
                self.requests += 1
                self.reported.setdefault(role, []).append((prompt, completion))
            self._track_token_usage_internal(usage)
            self._emit_call_completed_event(
                response=text,
                call_type=LLMCallType.LLM_CALL,
                from_task=from_task,
                from_agent=from_agent,
                messages=messages,
                usage=usage,
            )
            return text

    def totals(self) -> dict[str, tuple[int, int]]:
        return {
            role: (sum(p for p, _ in calls), sum(c for _, c in calls))
            for role, calls in self.reported.items()
        }
