"""bbr's span joins Envoy's trace: a real Envoy with its OpenTelemetry tracer on (HCM
`tracing`), bbr with --tracing, both exporting to one OTLP/gRPC receiver.

Envoy's gRPC client sends `traceparent` on the ext_proc call; the span bbr exports must
have Envoy's trace id and an Envoy span as its parent.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from harness.envoy_config import static_cluster
from harness.processes import free_port
from harness.stack import LLAMA, ModelServers, Stack, start_stack
from tests.otlp import ReceivedSpan, Receiver

pytestmark = pytest.mark.e2e

OTEL_CONFIG_TYPE = "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig"
ZIPKIN_CONFIG_TYPE = "type.googleapis.com/envoy.config.trace.v3.ZipkinConfig"
CLIENT_TRACE = "5bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "10f067aa0ba902b7"


def envoy_tracing(otlp_port: int) -> Any:
    """Turn on Envoy's OpenTelemetry tracer: the README's 'Tracing' snippet, plus a fast
    flush (Envoy exports every 5 s by default) for the test."""

    def edit(bootstrap: dict[str, Any]) -> None:
        listener = bootstrap["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["tracing"] = {
            "random_sampling": {"value": 100},
            "provider": {
                "name": "envoy.tracers.opentelemetry",
                "typed_config": {
                    "@type": OTEL_CONFIG_TYPE,
                    "grpc_service": {"envoy_grpc": {"cluster_name": "otlp"}, "timeout": "2s"},
                    "service_name": "envoy-e2e",
                },
            },
        }
        bootstrap["static_resources"]["clusters"].append(
            static_cluster("otlp", otlp_port, buffer_limit=1024 * 1024, http2=True)
        )
        bootstrap["layered_runtime"] = {
            "layers": [
                {
                    "name": "fast-flush",
                    "static_layer": {
                        "tracing.opentelemetry.flush_interval_ms": 100,
                        "tracing.opentelemetry.min_flush_spans": 1,
                    },
                }
            ]
        }

    return edit


def envoy_zipkin(collector_port: int) -> Any:
    """Envoy's Zipkin tracer, which propagates B3 (`x-b3-*`); its collector is absent
    here: only the headers on the ext_proc call matter."""

    def edit(bootstrap: dict[str, Any]) -> None:
        listener = bootstrap["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["tracing"] = {
            "random_sampling": {"value": 100},
            "provider": {
                "name": "envoy.tracers.zipkin",
                "typed_config": {
                    "@type": ZIPKIN_CONFIG_TYPE,
                    "collector_cluster": "zipkin",
                    "collector_endpoint": "/api/v2/spans",
                    "collector_endpoint_version": "HTTP_JSON",
                    "trace_id_128bit": True,
                },
            },
        }
        bootstrap["static_resources"]["clusters"].append(
            static_cluster("zipkin", collector_port, buffer_limit=1024 * 1024)
        )

    return edit


def traced_stack(
    name: str,
    tmp_path_factory: pytest.TempPathFactory,
    model_servers: ModelServers,
    receiver: Receiver,
    envoy_edit: Any,
) -> Iterator[Stack]:
    stack = start_stack(
        name,
        tmp_path_factory.mktemp(name),
        model_servers,
        ["--tracing"],
        envoy_edit=envoy_edit,
        bbr_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_SERVICE_NAME": f"bbr-{name}",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def traced(
    tmp_path_factory: pytest.TempPathFactory, model_servers: ModelServers, receiver: Receiver
) -> Iterator[Stack]:
    edit = envoy_tracing(receiver.port)
    yield from traced_stack("e2e", tmp_path_factory, model_servers, receiver, edit)


def bbr_span_for(receiver: Receiver, model: str) -> ReceivedSpan:
    def found(spans: list[ReceivedSpan]) -> bool:
        return any(s.service == "bbr-e2e" and s.attributes.get("bbr.model") == model for s in spans)

    receiver.wait_for(found)
    (span,) = [s for s in receiver.spans("bbr-e2e") if s.attributes.get("bbr.model") == model]
    return span


def envoy_parent_of(receiver: Receiver, span: ReceivedSpan) -> ReceivedSpan:
    """The Envoy span whose id is `span`'s parent (waits for Envoy's export)."""

    def found(spans: list[ReceivedSpan]) -> bool:
        return any(s.service == "envoy-e2e" and s.span_id == span.parent_span_id for s in spans)

    receiver.wait_for(found)
    (parent,) = [s for s in receiver.spans("envoy-e2e") if s.span_id == span.parent_span_id]
    return parent


def test_bbr_span_is_child_of_envoys_ext_proc_span(traced: Stack, receiver: Receiver) -> None:
    reply = traced.chat("food-review-1")
    assert reply.status == 200, reply
    span = bbr_span_for(receiver, "food-review-1")
    assert span.attributes["bbr.outcome"] == "routed"
    assert span.attributes["bbr.base_model"] == LLAMA
    assert span.attributes["bbr.body_bytes"] > 0
    assert span.parent_span_id, "bbr's span has no parent: Envoy sent no context"

    parent = envoy_parent_of(receiver, span)
    assert parent.trace_id == span.trace_id
    # Envoy's gRPC client span for the ext_proc call, inside its span for the request.
    envoy_trace = [s for s in receiver.spans("envoy-e2e") if s.trace_id == span.trace_id]
    assert len(envoy_trace) >= 2, envoy_trace
    assert parent.parent_span_id in {s.span_id for s in envoy_trace}


def test_a_client_trace_runs_through_envoy_into_bbr(traced: Stack, receiver: Receiver) -> None:
    """A client that sends traceparent to the gateway finds bbr's span in its own trace."""
    header = {"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"}
    reply = traced.chat("movie-critique", headers=header)
    assert reply.status == 200, reply
    span = bbr_span_for(receiver, "movie-critique")
    assert span.trace_id == CLIENT_TRACE
    assert envoy_parent_of(receiver, span).trace_id == CLIENT_TRACE


def test_error_answered_by_bbr_is_traced_too(traced: Stack, receiver: Receiver) -> None:
    reply = traced.chat("")
    assert reply.status == 400, reply

    def found(spans: list[ReceivedSpan]) -> bool:
        return any(s.attributes.get("bbr.error_code") == "invalid_model" for s in spans)

    receiver.wait_for(found)
    (span,) = [
        s
        for s in receiver.spans("bbr-e2e")
        if s.attributes.get("bbr.error_code") == "invalid_model"
    ]
    assert span.attributes["bbr.response.status_code"] == 400
    assert envoy_parent_of(receiver, span).trace_id == span.trace_id


def test_b3_from_envoys_zipkin_tracer(
    tmp_path_factory: pytest.TempPathFactory, model_servers: ModelServers, receiver: Receiver
) -> None:
    """Envoy with Zipkin tracing sends x-b3-* on the ext_proc call; the client's B3 trace
    continues through Envoy's span into bbr's."""
    edit = envoy_zipkin(free_port())
    for stack in traced_stack("zipkin", tmp_path_factory, model_servers, receiver, edit):
        trace_id, span_id = "6bf92f3577b34da6a3ce929d0e0e4736", "20f067aa0ba902b7"
        b3 = {"x-b3-traceid": trace_id, "x-b3-spanid": span_id, "x-b3-sampled": "1"}
        reply = stack.chat("ski-resorts", headers=b3)
        assert reply.status == 200, reply

        def found(spans: list[ReceivedSpan]) -> bool:
            return any(s.service == "bbr-zipkin" for s in spans)

        receiver.wait_for(found)
        (span,) = receiver.spans("bbr-zipkin")
        assert span.attributes["bbr.model"] == "ski-resorts"
        assert span.trace_id == trace_id
        # Its parent is Envoy's span for the ext_proc call, not the client's span.
        assert span.parent_span_id not in ("", span_id)
