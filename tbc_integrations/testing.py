"""Offline stand-ins for providers, for tests, demos and benchmarks (needs langchain-core).

- :class:`UsageFakeChat`, a scripted LangChain chat model that reports usage the
  way providers do (``usage_metadata`` on invoke, on the last chunk of a stream);
- :class:`OpenAIStub`, a local OpenAI-compatible ``/v1/chat/completions`` server
  that real clients (``langchain_openai.ChatOpenAI``, ``crewai.LLM``) can talk to,
  billing cached prompt and reasoning tokens when asked to;
- :class:`AnthropicStub`, a local Anthropic ``/v1/messages`` server for
  ``langchain_anthropic.ChatAnthropic``, billing cache reads and writes.

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
from typing import Any, TypeVar

from tbc_integrations._errors import MissingDependencyError
from tbc_integrations.tokens import TokenCounter, openai_function_tokens

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

__all__ = ["AnthropicStub", "OpenAIStub", "UsageFakeChat", "prompt_tokens"]

_COUNTER = TokenCounter(model="gpt-4")
"""The stubs' tokenizer (cl100k, available offline)."""


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


def _json_tokens(value: Any) -> int:
    """Tokens of a request field a provider bills as JSON (tool schemas, a response format)."""
    return _COUNTER.count(json.dumps(value, sort_keys=True)) if value else 0


_Stub = TypeVar("_Stub", bound="_StubServer")


class _StubServer:
    """A local HTTP server on a free port that serves while the stub is entered."""

    _url_path = ""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.lock = threading.Lock()  # keeps a request and its usage at the same index
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        """The URL to give a client."""
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}{self._url_path}"

    def __enter__(self: _Stub) -> _Stub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _read_json(handler: BaseHTTPRequestHandler) -> Any:
    return json.loads(handler.rfile.read(int(handler.headers["Content-Length"])))


def _send_json(handler: BaseHTTPRequestHandler, payload: Any, status: int = 200) -> None:
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class OpenAIStub(_StubServer):
    """A local OpenAI-compatible ``/v1/chat/completions`` server that records requests.

    Every reply is ``reply`` clipped at the request's ``max_completion_tokens`` (or
    ``max_tokens``) words; usage is computed by the server, as a provider does:
    ``prompt_tokens`` counts the messages, plus ``tools`` by OpenAI's documented recipe
    for function definitions and the JSON of ``response_format`` when the request has
    them, plus a provider overhead.

    ``cached_tokens`` of the prompt are billed as read from the cache
    (``prompt_tokens_details.cached_tokens``, at most the prompt) and
    ``reasoning_tokens`` as hidden reasoning
    (``completion_tokens_details.reasoning_tokens``), counted inside
    ``completion_tokens`` and inside the request's limit, as OpenAI does: the
    reasoning is spent first and the visible words get what is left. The details
    are sent only when non-zero.

    ``requests`` keeps each request body, ``usages`` the usage billed for it (sent
    on the response, or on a stream's last chunk when the client asks for usage)
    and ``reported`` its ``(prompt_tokens, completion_tokens)``.
    """

    _url_path = "/v1"

    def __init__(
        self,
        reply: str = "one two three four five six seven eight",
        *,
        cached_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> None:
        self.reply = reply
        self.cached_tokens = cached_tokens
        self.reasoning_tokens = reasoning_tokens
        self.requests: list[dict[str, Any]] = []
        self.usages: list[dict[str, Any]] = []
        self.reported: list[tuple[int, int]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = _read_json(self)
                with stub.lock:
                    stub.requests.append(body)
                    words, usage = stub._bill(body)
                base = {"id": "chatcmpl-1", "created": 0, "model": body["model"]}
                if not body.get("stream"):
                    message = {"role": "assistant", "content": " ".join(words)}
                    cut = len(words) < len(stub.reply.split(" "))  # stopped by the limit
                    finish = "length" if cut else "stop"
                    choice = {"index": 0, "finish_reason": finish, "message": message}
                    _send_json(
                        self,
                        {**base, "object": "chat.completion", "choices": [choice], "usage": usage},
                    )
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

        super().__init__(Handler)

    def _bill(self, body: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
        """The words to answer ``body`` with and the usage billed for it (recorded)."""
        prompt = (
            prompt_tokens(body["messages"])
            + openai_function_tokens(body.get("tools") or (), _COUNTER)  # OpenAI's recipe
            + _json_tokens(body.get("response_format"))
            + 7  # a provider's own overhead
        )
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        reasoning = self.reasoning_tokens if limit is None else min(self.reasoning_tokens, limit)
        words = self.reply.split(" ")
        if limit is not None:
            words = words[: limit - reasoning]
        completion = len(words) + reasoning
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if self.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": min(self.cached_tokens, prompt)}
        if reasoning:
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        self.usages.append(usage)
        self.reported.append((prompt, completion))
        return words, usage


class AnthropicStub(_StubServer):
    """A local Anthropic Messages API (``POST /v1/messages``) server that records requests.

    Give a client its :attr:`base_url` (no ``/v1``: the Anthropic SDK adds
    ``/v1/messages``), e.g. ``ChatAnthropic(base_url=stub.base_url, api_key="test")``.
    Every reply is ``reply`` clipped at the request's ``max_tokens`` words
    (``stop_reason`` ``"max_tokens"`` then, ``"end_turn"`` otherwise), as one text
    block or, with ``"stream": true``, as the server-sent events Anthropic sends.

    The prompt counts the ``system`` prompt, the messages and the JSON of ``tools``.
    Of it, ``cache_read_tokens`` are billed as read from the cache and
    ``cache_creation_tokens`` as written to it (each at most what is left of the
    prompt); ``input_tokens`` is the rest, the uncached part, as Anthropic reports
    it. A stream carries the input usage on ``message_start`` and the final,
    cumulative usage on ``message_delta``. ``POST /v1/messages/count_tokens``
    answers with the whole prompt.

    ``requests`` keeps each request body and ``usages`` the final usage billed for it.
    """

    def __init__(
        self,
        reply: str = "one two three four five six seven eight",
        *,
        cache_read_tokens: int = 0,
        cache_creation_tokens: int = 0,
    ) -> None:
        self.reply = reply
        self.cache_read_tokens = cache_read_tokens
        self.cache_creation_tokens = cache_creation_tokens
        self.requests: list[dict[str, Any]] = []
        self.usages: list[dict[str, Any]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def event(self, kind: str, data: dict[str, Any]) -> None:
                self.wfile.write(f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode())

            def do_POST(self) -> None:
                path = self.path.split("?", 1)[0]
                body = _read_json(self)
                if path == "/v1/messages/count_tokens":
                    _send_json(self, {"input_tokens": stub._prompt(body)})
                    return
                if path != "/v1/messages":
                    error = {"type": "not_found_error", "message": f"no route {path}"}
                    _send_json(self, {"type": "error", "error": error}, status=404)
                    return
                with stub.lock:
                    stub.requests.append(body)
                    words, stop_reason, usage = stub._bill(body)
                text = " ".join(words)
                message: dict[str, Any] = {
                    "id": f"msg_stub{len(stub.requests)}",
                    "type": "message",
                    "role": "assistant",
                    "model": body["model"],
                    "content": [{"type": "text", "text": text}],
                    "stop_reason": stop_reason,
                    "stop_sequence": None,
                    "usage": usage,
                }
                if not body.get("stream"):
                    _send_json(self, message)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.end_headers()
                start_usage = {**usage, "output_tokens": min(1, usage["output_tokens"])}
                self.event(
                    "message_start",
                    {
                        "type": "message_start",
                        "message": {
                            **message,
                            "content": [],
                            "stop_reason": None,
                            "usage": start_usage,
                        },
                    },
                )
                self.event(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                )
                self.event("ping", {"type": "ping"})
                for i, word in enumerate(words):
                    self.event(
                        "content_block_delta",
                        {
                            "type": "content_block_delta",
                            "index": 0,
                            "delta": {"type": "text_delta", "text": word if i == 0 else " " + word},
                        },
                    )
                self.event("content_block_stop", {"type": "content_block_stop", "index": 0})
                self.event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                        "usage": usage,
                    },
                )
                self.event("message_stop", {"type": "message_stop"})
                self.wfile.flush()

        super().__init__(Handler)

    @staticmethod
    def _prompt(body: dict[str, Any]) -> int:
        system = body.get("system")
        messages = list(body.get("messages") or [])
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return prompt_tokens(messages) + _json_tokens(body.get("tools"))

    def _bill(self, body: dict[str, Any]) -> tuple[list[str], str, dict[str, Any]]:
        """The words, stop reason and usage billed for ``body`` (recorded)."""
        prompt = self._prompt(body)
        read = min(self.cache_read_tokens, prompt)
        creation = min(self.cache_creation_tokens, prompt - read)
        limit = body["max_tokens"]
        words = self.reply.split(" ")
        stop_reason = "max_tokens" if len(words) > limit else "end_turn"
        words = words[:limit]
        usage = {
            "input_tokens": prompt - read - creation,
            "cache_creation_input_tokens": creation,
            "cache_read_input_tokens": read,
            "output_tokens": len(words),
        }
        self.usages.append(usage)
        return words, stop_reason, usage
