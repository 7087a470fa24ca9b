"""OpenTelemetry for budgets: spans for governed LLM calls and reallocations, and metrics.

Built on the ledger's event stream; needs ``opentelemetry-api`` (``pip install
'tbc-integrations[otel]'``) and, to export anything, an SDK you configure.
Spans follow the GenAI semantic conventions where they exist (``gen_ai.agent.name``,
``gen_ai.usage.input_tokens``, ``gen_ai.usage.output_tokens``) and use ``tbc.*`` for the
rest. Metrics: ``tbc.budget.remaining``, ``tbc.budget.reserved`` and
``tbc.budget.borrowed`` per agent (gauges), ``tbc.tokens.consumed`` and
``tbc.tokens.moved`` and ``tbc.refusals`` and ``tbc.degradations`` (counters; each
degradation ladder step is also a ``tbc.degrade`` span with its ``tbc.reason``), and
``gen_ai.client.token.usage`` (a histogram per call, by ``gen_ai.token.type``). Money: a
committed call's span carries its cost in US dollars as ``tbc.cost.usd`` and
``llm.cost.total`` (OpenInference), and ``tbc.cost_nanos`` exactly; ``tbc.cost`` (a
counter, USD) adds every commit's cost and ``tbc.budget.cost_remaining`` (a gauge, USD)
shows what each capped agent's ``max_cost`` still allows. A soft limit crossed (a
``BudgetWarning``) is a ``tbc.warning <agent>`` span (``tbc.limit``: the limit's name or
``"agent"``, ``tbc.scope_value``, ``tbc.period``, ``tbc.tokens``, ``tbc.cost.usd``) and a
point of the ``tbc.warnings`` counter (by agent and ``tbc.limit``).

Example:
    >>> from tbc_integrations import BudgetManager
    >>> from tbc_integrations.telemetry import BudgetTelemetry
    >>> m = BudgetManager(); _ = m.register_agent("a", max_tokens=100)
    >>> telemetry = BudgetTelemetry(m)  # global providers: no-ops until an SDK is set up
    >>> with m.spend("a", 5, 5) as call:
    ...     call.set_usage((4, 2))
    >>> telemetry.close()
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import Any, cast

from tbc_integrations._errors import MissingDependencyError
from tbc_integrations._ledger import Ledger
from tbc_integrations.events import BudgetEvent, BudgetWarning

try:
    from opentelemetry import metrics, trace
    from opentelemetry.metrics import CallbackOptions, Observation
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise MissingDependencyError(
        "tbc_integrations.telemetry needs opentelemetry-api: pip install 'tbc-integrations[otel]'"
    ) from exc

__all__ = ["BudgetTelemetry"]

_SCOPE = "tbc_integrations"
_MOVES = ("borrow", "overdraft", "reallocate")
_NANOS_PER_DOLLAR = 1_000_000_000


def _usd(nanos: int) -> float:
    """Nano-dollars as float US dollars, for attributes and metrics (exact: ``tbc.cost_nanos``)."""
    return nanos / _NANOS_PER_DOLLAR


class BudgetTelemetry:
    """Subscribe to a ledger and report it through OpenTelemetry.

    Args:
        ledger: The manager or ledger to observe.
        tracer_provider: Provider for spans (the global one by default).
        meter_provider: Provider for metrics (the global one by default).
        tracer: A tracer to report spans with, instead of one from ``tracer_provider``
            (``tbcontracts``' ``BudgetManager(telemetry=tracer)``).
    """

    def __init__(
        self,
        ledger: Ledger,
        *,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        tracer: Any = None,
    ) -> None:
        self.ledger = ledger
        if tracer is None:
            tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        self.tracer = tracer
        meter = metrics.get_meter(_SCOPE, meter_provider=meter_provider)
        self._open: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._consumed = meter.create_counter(
            "tbc.tokens.consumed", unit="{token}", description="Tokens recorded as spent"
        )
        self._moved = meter.create_counter(
            "tbc.tokens.moved", unit="{token}", description="Tokens reallocated between agents"
        )
        self._refusals = meter.create_counter(
            "tbc.refusals", unit="{call}", description="Calls refused before any spend"
        )
        self._degradations = meter.create_counter(
            "tbc.degradations",
            unit="{step}",
            description="Degradation ladder steps taken instead of a refusal",
        )
        self._cost = meter.create_counter(
            "tbc.cost", unit="USD", description="Money recorded as spent, in US dollars"
        )
        self._warnings = meter.create_counter(
            "tbc.warnings", unit="{warning}", description="Soft limits crossed (once each)"
        )
        self._usage = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}", description="Tokens used per call"
        )
        for name, field, description in (
            ("tbc.budget.remaining", "remaining", "Budget new reservations can still use"),
            ("tbc.budget.reserved", "reserved", "Tokens held by open reservations"),
            ("tbc.budget.borrowed", "borrowed", "Tokens kept from other agents"),
        ):
            meter.create_observable_gauge(
                name, callbacks=[self._observe(field)], unit="{token}", description=description
            )
        meter.create_observable_gauge(
            "tbc.budget.cost_remaining",
            callbacks=[self._observe_cost_remaining],
            unit="USD",
            description="Money an agent's cost cap still allows (agents with a cap)",
        )
        self._unsubscribe: Callable[[], None] | None = ledger.subscribe(self.on_event)

    def _observe_cost_remaining(self, options: CallbackOptions) -> Iterable[Observation]:
        if self._unsubscribe is None:
            return []
        return [
            Observation(float(s.cost_remaining), {"gen_ai.agent.name": name})
            for name, s in self.ledger.status().items()
            if s.cost_remaining is not None
        ]

    def _observe(self, field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            if self._unsubscribe is None:
                return []
            return [
                Observation(getattr(s, field), {"gen_ai.agent.name": name})
                for name, s in self.ledger.status().items()
            ]

        return callback

    def on_event(self, event: BudgetEvent) -> None:
        """Turn one ledger event into spans and metric points."""
        agent = {"gen_ai.agent.name": event.agent}
        kind = event.kind
        if kind == "reserve":
            span = self.tracer.start_span(
                f"tbc.call {event.agent}",
                kind=SpanKind.INTERNAL,
                attributes={
                    **agent,
                    "tbc.namespace": event.namespace,
                    "tbc.reservation_id": event.reservation_id or "",
                    "tbc.reserved.input_tokens": event.input_tokens,
                    "tbc.reserved.output_tokens": event.output_tokens,
                    "tbc.borrowed_tokens": sum(t for _, t in event.donors),
                    **(
                        {"tbc.reserved.cost.usd": _usd(event.cost_nanos)}
                        if event.cost_nanos
                        else {}
                    ),
                },
            )
            with self._lock:
                self._open[event.reservation_id or ""] = span
        elif kind == "commit":
            self._consumed.add(event.input_tokens, {**agent, "gen_ai.token.type": "input"})
            self._consumed.add(event.output_tokens, {**agent, "gen_ai.token.type": "output"})
            self._usage.record(event.input_tokens, {**agent, "gen_ai.token.type": "input"})
            self._usage.record(event.output_tokens, {**agent, "gen_ai.token.type": "output"})
            if event.cost_nanos:
                self._cost.add(_usd(event.cost_nanos), agent)
            span = self._pop(event.reservation_id)
            if span is not None:
                span.set_attribute("gen_ai.usage.input_tokens", event.input_tokens)
                span.set_attribute("gen_ai.usage.output_tokens", event.output_tokens)
                if event.cost_nanos:
                    span.set_attribute("tbc.cost.usd", _usd(event.cost_nanos))
                    span.set_attribute("llm.cost.total", _usd(event.cost_nanos))
                    span.set_attribute("tbc.cost_nanos", event.cost_nanos)
                span.set_attribute("tbc.estimated", event.estimated)
                span.set_attribute("tbc.outcome", "committed")
                span.end()
        elif kind in ("release", "expire"):
            span = self._pop(event.reservation_id)
            if span is not None:
                span.set_attribute("tbc.outcome", "released" if kind == "release" else "expired")
                span.end()
        elif kind == "refuse":
            self._refusals.add(1, {**agent, "tbc.reason": event.reason})
            span = self.tracer.start_span(
                f"tbc.refusal {event.agent}",
                attributes={
                    **agent,
                    "tbc.reason": event.reason,
                    "tbc.requested.input_tokens": event.input_tokens,
                    "tbc.requested.output_tokens": event.output_tokens,
                    **(
                        {"tbc.requested.cost.usd": _usd(event.cost_nanos)}
                        if event.cost_nanos
                        else {}
                    ),
                },
            )
            span.set_status(Status(StatusCode.ERROR, f"refused: {event.reason}"))
            span.end()
        elif kind == "transfer" and event.reason in _MOVES:
            self._moved.add(event.tokens, {**agent, "tbc.reason": event.reason})
            span = self.tracer.start_span(
                f"tbc.reallocation {event.agent}",
                attributes={
                    **agent,
                    "tbc.reason": event.reason,
                    "tbc.tokens": event.tokens,
                    "tbc.donors": [d for d, _ in event.donors],
                    "tbc.donor_tokens": [t for _, t in event.donors],
                },
            )
            span.end()
        elif kind == "warning":
            warning = cast(BudgetWarning, event)
            limit = warning.limit or "agent"
            self._warnings.add(1, {**agent, "tbc.limit": limit})
            span = self.tracer.start_span(
                f"tbc.warning {event.agent}",
                attributes={
                    **agent,
                    "tbc.limit": limit,
                    "tbc.reason": event.reason,
                    "tbc.tokens": event.tokens,
                    "tbc.cost.usd": _usd(event.cost_nanos),
                    **({"tbc.scope_value": warning.scope_value} if warning.scope_value else {}),
                    **({"tbc.period": warning.period} if warning.period else {}),
                },
            )
            span.end()
        elif kind == "overdraft":
            overdraft = self.tracer.start_span(
                f"tbc.overdraft {event.agent}",
                attributes={
                    **agent,
                    "tbc.overdraft_tokens": event.tokens,
                    **({"tbc.reason": event.reason} if event.reason else {}),
                    **(
                        {"tbc.overdraft.cost.usd": _usd(event.cost_nanos)}
                        if event.cost_nanos
                        else {}
                    ),
                },
            )
            overdraft.set_status(Status(StatusCode.ERROR, "usage beyond what could be covered"))
            overdraft.end()

        elif kind == "degrade":
            self._degradations.add(1, agent)
            self.tracer.start_span(
                f"tbc.degrade {event.agent}", attributes={**agent, "tbc.reason": event.reason}
            ).end()

    def _pop(self, reservation_id: str | None) -> Any:
        with self._lock:
            return self._open.pop(reservation_id or "", None)

    def close(self) -> None:
        """Stop observing; end any span still open."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        with self._lock:
            spans, self._open = list(self._open.values()), {}
        for span in spans:
            span.set_attribute("tbc.outcome", "open at close")
            span.end()
