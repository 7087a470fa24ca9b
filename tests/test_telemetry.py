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

from tbc_integrations import BudgetExceededError, BudgetManager, ModelPrice, Usage
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


def test_cost_on_spans_and_in_metrics(otel: Any) -> None:
    exporter, tracer_provider, reader, meter_provider = otel
    m = BudgetManager(prices={"m": ModelPrice(input="0.15", output="0.60")})
    m.register_agent("capped", max_tokens=10_000, max_cost="0.001")
    m.register_agent("free", max_tokens=10_000)
    telemetry = BudgetTelemetry(m, tracer_provider=tracer_provider, meter_provider=meter_provider)
    m.commit(m.reserve("capped", 1_000, 500, model="m"), Usage(1_000, 100))  # $0.00021
    m.commit(m.reserve("free", 100, 100, model="m"), Usage(100, 50))  # $0.000045
    m.charge("free", Usage(0, 1_000), model="m")  # $0.0006, no reservation
    with pytest.raises(BudgetExceededError):
        m.reserve("capped", 1_000, 5_000, model="m")  # $0.00315 worst case, $0.00079 left
    m.commit(m.reserve("free", 10, 10), Usage(10, 10))  # names no model: no cost
    points = metric_points(reader)
    telemetry.close()

    calls = [s for s in exporter.get_finished_spans() if s.name.startswith("tbc.call")]
    capped = next(s for s in calls if s.name == "tbc.call capped")
    assert capped.attributes["tbc.cost.usd"] == pytest.approx(0.00021)
    assert capped.attributes["llm.cost.total"] == pytest.approx(0.00021)
    assert capped.attributes["tbc.cost_nanos"] == 210_000
    assert capped.attributes["tbc.reserved.cost.usd"] == pytest.approx(0.00045)  # 1000*.15+500*.6
    free = [s for s in calls if s.name == "tbc.call free"]
    assert free[0].attributes["tbc.cost_nanos"] == 45_000
    assert "tbc.cost.usd" not in free[1].attributes  # unpriced
    refusal = next(s for s in exporter.get_finished_spans() if s.name == "tbc.refusal capped")
    assert refusal.attributes["tbc.requested.cost.usd"] == pytest.approx(0.00315)

    cost = {p.attributes["gen_ai.agent.name"]: p.value for p in points["tbc.cost"]}
    assert cost == {"capped": pytest.approx(0.00021), "free": pytest.approx(0.000645)}
    assert sum(cost.values()) == pytest.approx(float(sum(s.cost for s in m.status().values())))
    left = {p.attributes["gen_ai.agent.name"]: p.value for p in points["tbc.budget.cost_remaining"]}
    assert left == {"capped": pytest.approx(0.00079)}  # only agents with a cap


def test_cost_cap_overdraft_span_names_the_money(otel: Any) -> None:
    exporter, tracer_provider, _, meter_provider = otel
    m = BudgetManager(prices={"m": ModelPrice(input=1, output=1)})
    m.register_agent("a", max_tokens=100_000, max_cost="0.001")
    telemetry = BudgetTelemetry(m, tracer_provider=tracer_provider, meter_provider=meter_provider)
    m.commit(m.reserve("a", 500, 500, model="m"), Usage(2_000, 500))  # $0.0025: $0.0015 over
    telemetry.close()
    over = next(s for s in exporter.get_finished_spans() if s.name == "tbc.overdraft a")
    assert over.attributes["tbc.reason"] == "cost cap"
    assert over.attributes["tbc.overdraft.cost.usd"] == pytest.approx(0.0015)
    assert over.status.status_code is StatusCode.ERROR


def test_a_tracer_given_as_telemetry_reports_the_spans(otel: Any) -> None:
    """tbcontracts' ``BudgetManager(telemetry=trace.get_tracer("my-app"))``: that tracer."""
    exporter, tracer_provider, _, _ = otel
    m = BudgetManager(telemetry=tracer_provider.get_tracer("my-app"))
    m.register_agent("a", max_tokens=100)
    with m.spend("a", 10, 5) as call:
        call.set_usage((8, 4))
    spans = exporter.get_finished_spans()
    assert spans and all(s.instrumentation_scope.name == "my-app" for s in spans)
    m.telemetry.close()


def test_a_ladder_step_is_a_span_and_a_count(otel: Any) -> None:
    exporter, tracer_provider, reader, meter_provider = otel
    m = BudgetManager()
    m.register_agent("writer", max_tokens=100)
    telemetry = BudgetTelemetry(m, tracer_provider=tracer_provider, meter_provider=meter_provider)
    m.note_degraded("writer", "model gpt-3.5-turbo", "below 0.5")
    m.note_degraded("writer", "wrap-up", "refused: budget")
    points = metric_points(reader)
    telemetry.close()
    reasons = [
        s.attributes["tbc.reason"]
        for s in exporter.get_finished_spans()
        if s.name == "tbc.degrade writer"
    ]
    assert reasons == ["model gpt-3.5-turbo (below 0.5)", "wrap-up (refused: budget)"]
    assert [(p.attributes["gen_ai.agent.name"], p.value) for p in points["tbc.degradations"]] == [
        ("writer", 2)
    ]
