"""Reading provider usage: the fast readers agree with the general one on every input."""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from tbc_integrations import InvalidTokenCountError, Usage
from tbc_integrations._usage import _parse_any, _with_details, parse_usage
from tbc_integrations._validate import MAX_TOKENS

# counts as providers send them (most often), and as they should not
counts = st.one_of(
    st.integers(0, 5_000),
    st.integers(0, 5_000),
    st.integers(0, 5_000),
    st.integers(-3, MAX_TOKENS + 3),
    st.sampled_from([None, True, False, 1.0, float("nan"), "7", -1, MAX_TOKENS, MAX_TOKENS + 1]),
)


def _details(keys: list[str]) -> st.SearchStrategy[Any]:
    fields = st.dictionaries(st.sampled_from(keys), counts, max_size=len(keys))
    return st.one_of(
        fields,
        st.none(),
        st.sampled_from(["x", 0]),
        fields.map(MappingProxyType),  # a Mapping, not a dict
    )


usage_metadata = st.fixed_dictionaries(
    {},
    optional={
        "total_tokens": counts,
        # LangChain's details (and Anthropic's extra keys in them)
        "input_token_details": _details(
            ["cache_read", "cache_creation", "audio", "ephemeral_5m_input_tokens"]
        ),
        "output_token_details": _details(["reasoning", "audio"]),
        # keys of other shapes, which the general reader may read instead
        "prompt_tokens": counts,
        "completion_tokens": counts,
        "cache_read_input_tokens": counts,
        "reasoning_tokens": counts,
    },
).flatmap(
    # the totals most often there, as LangChain sends them
    lambda extra: (
        st.fixed_dictionaries(
            {"input_tokens": st.integers(0, 20_000), "output_tokens": st.integers(0, 20_000)},
        ).map(lambda totals: {**totals, **extra})
        | st.fixed_dictionaries({}, optional={"input_tokens": counts, "output_tokens": counts}).map(
            lambda totals: {**totals, **extra}
        )
    )
)


def _read(read: Any, value: Any) -> Usage | str:
    try:
        usage = read(value, "writer")
    except InvalidTokenCountError as exc:
        return f"refused: {exc}"
    assert type(usage) is Usage
    return usage


@given(usage_metadata)
def test_usage_metadata_is_read_as_the_general_reader_reads_it(value: dict[str, Any]) -> None:
    assert _read(parse_usage, value) == _read(_parse_any, value)


@given(st.tuples(*[counts] * 7))
def test_a_usage_is_checked_as_the_general_reader_checks_it(fields: tuple[Any, ...]) -> None:
    usage = Usage(*fields)
    assert _read(parse_usage, usage) == _read(_parse_any, usage)


def test_chat_models_usage_takes_the_fast_reader() -> None:
    """What ChatOpenAI and ChatAnthropic report on every call is read without the general
    reader (so the tests above compare something)."""
    openai = {
        "input_tokens": 1_700,
        "output_tokens": 400,
        "total_tokens": 2_100,
        "input_token_details": {"audio": 0, "cache_read": 1_024},
        "output_token_details": {"audio": 0, "reasoning": 128},
    }
    anthropic = {
        "input_tokens": 3_215,
        "output_tokens": 40,
        "total_tokens": 3_255,
        "input_token_details": {
            "cache_read": 3_000,
            "cache_creation": 200,
            "ephemeral_5m_input_tokens": 200,
            "ephemeral_1h_input_tokens": 0,
        },
    }
    assert _with_details(openai) == Usage(1_700, 400, cache_read_tokens=1_024, reasoning_tokens=128)
    assert _with_details(anthropic) == Usage(
        3_215, 40, cache_read_tokens=3_000, cache_write_tokens=200
    )
    usage = Usage(50, 9, cache_read_tokens=40, reasoning_tokens=3)
    assert parse_usage(usage) is usage  # checked, not rebuilt
