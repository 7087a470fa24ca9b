"""Offline stand-ins for providers, for tests, demos and benchmarks (needs langchain-core).

- :class:`UsageFakeChat`, a scripted LangChain chat model that reports usage the
  way providers do (``usage_metadata`` on invoke, on the last chunk of a stream);
- :class:`OpenAIStub`, a local OpenAI-compatible ``/v1/chat/completions`` server
  that real clients (``langchain_openai.ChatOpenAI``, ``crewai.LLM``) can talk to.

Example:
    >>> from tbc_integrations.testing import UsageFakeChat
    >>> reply = UsageFakeChat(reply="a b c").invoke("hi")
    >>> reply.content, reply.usage_metadata["output_tokens"]
    ('a b c', 3)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tbc_integrations._errors import MissingDependencyError
from tbc_integrations.tokens import TokenCounter

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
    )
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError(
        "tbc_integrations.testing needs langchain-core: pip install 'tbc-integrations[langchain]'"
    ) from exc

__all__ = ["OpenAIStub", "UsageFakeChat", "prompt_tokens"]

_COUNTER = TokenCounter(model="gpt-4")


def prompt_tokens(messages: list[Any]) -> int:
    """Input tokens the fakes report for ``messages`` (cl100k, chat overhead included)."""
    return _COUNTER.count_messages(messages)


class UsageFakeChat(BaseChatModel):
    """Answers from a script; reports provider-style usage on invoke and on the last chunk.

    ``reply`` is either fixed text or ``words`` repeated words; the output is
    clipped at ``max_tokens`` like a provider would. ``delay`` is the provider's
    latency: slept on the sync path, awaited (off the CPU) on the async one.
    """

    reply: str = "alpha beta gamma delta"
    model: str = "fake-gpt"
    max_tokens: int | None = None
    delay: float = 0.0
    report_usage: bool = True
    calls: int = 0

    @property
    def _llm_type(self) -> str:
        return "usage-fake-chat"

    def _words(self, max_tokens: int | None) -> list[str]:
        words = self.reply.split(" ")
        limit = max_tokens if max_tokens is not None else self.max_tokens
        return words if limit is None else words[:limit]

    def _usage(self, messages: list[BaseMessage], text: str) -> dict[str, int]:
        i, o = prompt_tokens(messages), _COUNTER.count(text)
        return {"input_tokens": i, "output_tokens": o, "total_tokens": i + o}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.delay:
            time.sleep(self.delay)
        return self._answer(messages, kwargs.get("max_tokens"))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.delay:
            await asyncio.sleep(self.delay)
        return self._answer(messages, kwargs.get("max_tokens"))

    def _answer(self, messages: list[BaseMessage], max_tokens: int | None) -> ChatResult:
        self.calls += 1
        text = " ".join(self._words(max_tokens))
        usage = self._usage(messages, text)
        message = AIMessage(
            content=text,
            usage_metadata=usage if self.report_usage else None,
            response_metadata={"model_name": self.model, "finish_reason": "stop"},
        )
        llm_output: dict[str, Any] = {"model_name": self.model}
        if self.report_usage:
            llm_output["token_usage"] = {
                "prompt_tokens": usage["input_tokens"],
                "completion_tokens": usage["output_tokens"],
            }
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output=llm_output)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        self.calls += 1
        words = self._words(kwargs.get("max_tokens"))
        for i, word in enumerate(words):
            if self.delay:
                time.sleep(self.delay)
            yield ChatGenerationChunk(
                message=AIMessageChunk(content=word if i == 0 else " " + word)
            )
        if self.report_usage:
            yield ChatGenerationChunk(
                message=AIMessageChunk(
                    content="",
                    usage_metadata=self._usage(messages, " ".join(words)),  # type: ignore[arg-type]
                    chunk_position="last",
                )
            )


class OpenAIStub:
    """A local OpenAI-compatible ``/v1/chat/completions`` server that records requests.

    Every reply is ``reply`` clipped at the request's ``max_tokens`` words; usage is
    ``prompt_tokens``/``completion_tokens`` computed by the server, as a provider does.
    """

    def __init__(self, reply: str = "one two three four five six seven eight") -> None:
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.reported: list[tuple[int, int]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                limit = body.get("max_completion_tokens") or body.get("max_tokens")
                words = stub.reply.split(" ")[: limit or None]
                prompt = prompt_tokens(body["messages"]) + 7  # a provider's own overhead
                completion = len(words)
                stub.reported.append((prompt, completion))
                usage = {
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "total_tokens": prompt + completion,
                }
                base = {"id": "chatcmpl-1", "created": 0, "model": body["model"]}
                if not body.get("stream"):
                    payload = {
                        **base,
                        "object": "chat.completion",
                        "choices": [
                            {
                                "index": 0,
                                "finish_reason": "stop",
                                "message": {"role": "assistant", "content": " ".join(words)},
                            }
                        ],
                        "usage": usage,
                    }
                    data = json.dumps(payload).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for i, word in enumerate(words):
                    chunk = {
                        **base,
                        "object": "chat.completion.chunk",
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"content": word if i == 0 else " " + word},
                                "finish_reason": None,
                            }
                        ],
                    }
                    self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                final = {
                    **base,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                }
                self.wfile.write(f"data: {json.dumps(final)}\n\n".encode())
                if (body.get("stream_options") or {}).get("include_usage"):
                    tail = {
                        **base,
                        "object": "chat.completion.chunk",
                        "choices": [],
                        "usage": usage,
                    }
                    self.wfile.write(f"data: {json.dumps(tail)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        """The ``/v1`` URL to give a client."""
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}/v1"

    def __enter__(self) -> OpenAIStub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
