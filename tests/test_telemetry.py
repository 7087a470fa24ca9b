"""OpenTelemetry spans and metrics, read back with the SDK's in-memory exporter and reader."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from tbc_integrations import BudgetExceededError, BudgetManager, Usage
from tbc_integrations.telemetry import BudgetTelemetry


@pytest.fixture
def otel(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any, Any, Any]]:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "false")  # the session disables it for CrewAI
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    yield exporter, tracer_provider, reader, meter_provider
    meter_provider.shutdown()
    tracer_provider.shutdown()


def metric_points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    assert data is not None
    for rm in data.resource_metrics:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = list(metric.data.data_points)
    return out


def test_spans_and_metrics_for_calls_reallocations_and_refusals(otel: Any) -> None:
    exporter, tracer_provider, reader, meter_provider = otel
    m = BudgetManager()
    m.register_agent("donor", priority=1, max_tokens=1_000)
    m.register_agent("needy", priority=2, max_tokens=100)
    telemetry = BudgetTelemetry(m, tracer_provider=tracer_provider, meter_provider=meter_provider)
    r = m.reserve("needy", 60, 100)  # borrows 60
    m.commit(r, Usage(60, 70))
    with pytest.raises(BudgetExceededError):
        m.reserve("needy", 5_000)
    m.release(m.reserve("donor", 10, 10))
    points = metric_points(reader)
    telemetry.close()

    spans = {s.name: s for s in exporter.get_finished_spans()}
    call = spans["tbc.call needy"]
    assert call.attributes["gen_ai.agent.name"] == "needy"
    assert call.attributes["gen_ai.usage.input_tokens"] == 60
    assert call.attributes["gen_ai.usage.output_tokens"] == 70
    assert call.attributes["tbc.reserved.output_tokens"] == 100
    assert (
        call.attributes["tbc.borrowed_tokens"] == 60
        and call.attributes["tbc.outcome"] == "committed"
    )
    move = spans["tbc.reallocation needy"]
    assert move.attributes["tbc.donors"] == ("donor",) and move.attributes["tbc.tokens"] == 60
    refusal = spans["tbc.refusal needy"]
    assert refusal.status.status_code is StatusCode.ERROR
    assert spans["tbc.call donor"].attributes["tbc.outcome"] == "released"

    consumed = {
        (p.attributes["gen_ai.agent.name"], p.attributes["gen_ai.token.type"]): p.value
        for p in points["tbc.tokens.consumed"]
    }
    assert consumed == {("needy", "input"): 60, ("needy", "output"): 70}
    assert sum(p.value for p in points["tbc.tokens.moved"]) == 60
    assert sum(p.value for p in points["tbc.refusals"]) == 1
    remaining = {p.attributes["gen_ai.agent.name"]: p.value for p in points["tbc.budget.remaining"]}
    assert remaining == {n: s.remaining for n, s in m.status().items()}
    borrowed = {p.attributes["gen_ai.agent.name"]: p.value for p in points["tbc.budget.borrowed"]}
    assert borrowed["needy"] == m.status()["needy"].borrowed == 30
    usage = {p.attributes["gen_ai.token.type"]: p.sum for p in points["gen_ai.client.token.usage"]}
    assert usage == {"input": 60, "output": 70}


def test_overdraft_is_an_error_span_and_close_ends_open_spans(otel: Any) -> None:
    exporter, tracer_provider, _, meter_provider = otel
    m = BudgetManager()
    m.register_agent("a", max_tokens=50)
    m.register_agent("b", priority=2, max_tokens=50)  # outranks a: never lends to it
    telemetry = BudgetTelemetry(m, tracer_provider=tracer_provider, meter_provider=meter_provider)
    m.commit(m.reserve("a", 10, 10), Usage(10, 200))
    m.reserve("b", 5, 5)  # still open when telemetry closes
    telemetry.close()
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["tbc.overdraft a"].attributes["tbc.overdraft_tokens"] == 160
    assert spans["tbc.overdraft a"].status.status_code is StatusCode.ERROR
    open_at_close = [
        s
        for s in exporter.get_finished_spans()
        if s.attributes.get("tbc.outcome") == "open at close"
    ]
    assert len(open_at_close) == 1
