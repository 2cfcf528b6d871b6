"""--tracing: spans per ext_proc stream, exported to a real OTLP/gRPC receiver.

The parent context reaches bbr as gRPC metadata (HTTP/2 request headers), as Envoy's
gRPC client sends it; tests/e2e/test_tracing_envoy.py does the same through Envoy.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from bbr import tracing
from bbr.tracing import Parent, parent_of
from harness.processes import REPO_ROOT, free_port
from tests import extproc
from tests.otlp import ReceivedSpan, Receiver
from tests.support import StartBbr, json_body, last_line, run_bbr

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_SERVER
STATUS_ERROR = 2


# --- reading the context: pure ----------------------------------------------------------


def parent(
    *pairs: tuple[str, str], propagators: tuple[str, ...] = tracing.PROPAGATORS
) -> Parent | None:
    return parent_of([(k.encode(), v.encode()) for k, v in pairs], propagators)


def test_traceparent_gives_ids_and_sampled_flag() -> None:
    found = parent(("traceparent", f"00-{TRACE}-{SPAN}-01"), ("tracestate", "congo=t61rcWkgMzE"))
    assert found == Parent(int(TRACE, 16), int(SPAN, 16), True, b"congo=t61rcWkgMzE")
    unsampled = parent(("traceparent", f"00-{TRACE}-{SPAN}-00"))
    assert unsampled is not None and not unsampled.sampled


@pytest.mark.parametrize(
    "value",
    [
        f"00-{TRACE.upper()}-{SPAN}-01",  # hex must be lower-case
        f"00-{'0' * 32}-{SPAN}-01",  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01",  # all-zero span id
        f"ff-{TRACE}-{SPAN}-01",  # version ff is invalid
        f"00-{TRACE}-{SPAN}-01-extra",  # version 00 has exactly four fields
        f"00-{TRACE[:-1]}-{SPAN}-01",
        f"00-{TRACE}-{SPAN}-0x",
        "",
    ],
)
def test_malformed_traceparent_starts_a_new_trace(value: str) -> None:
    assert parent(("traceparent", value)) is None


def test_later_traceparent_version_keeps_its_first_four_fields() -> None:
    found = parent(("traceparent", f"01-{TRACE}-{SPAN}-01-whatever"))
    assert found is not None and found.trace_id == int(TRACE, 16)


@pytest.mark.parametrize(
    ("value", "trace_id", "sampled"),
    [
        (f"{TRACE}-{SPAN}-1", TRACE, True),
        (f"{TRACE}-{SPAN}-d", TRACE, True),  # debug
        (f"{TRACE}-{SPAN}-0", TRACE, False),
        (f"{TRACE}-{SPAN}", TRACE, False),  # deferred: as OpenTelemetry's B3 reads it
        (f"{TRACE}-{SPAN}-1-{SPAN}", TRACE, True),  # with the parent span id
        (f"{TRACE[16:]}-{SPAN}-1", TRACE[16:], True),  # 64-bit trace id
    ],
)
def test_b3_single_header(value: str, trace_id: str, sampled: bool) -> None:
    assert parent(("b3", value)) == Parent(int(trace_id, 16), int(SPAN, 16), sampled)


@pytest.mark.parametrize("value", ["0", "1", "d", f"{TRACE}-{SPAN}-x", f"{TRACE}-zz", f"{TRACE}"])
def test_b3_single_without_usable_ids(value: str) -> None:
    assert parent(("b3", value)) is None


def test_b3_multi_headers() -> None:
    ids = (("x-b3-traceid", TRACE), ("x-b3-spanid", SPAN))
    assert parent(*ids, ("x-b3-sampled", "1")) == Parent(int(TRACE, 16), int(SPAN, 16), True)
    assert parent(*ids, ("x-b3-sampled", "true")) is not None
    debug = parent(*ids, ("x-b3-flags", "1"))
    assert debug is not None and debug.sampled
    unsampled = parent(*ids, ("x-b3-sampled", "0"))
    assert unsampled is not None and not unsampled.sampled
    assert parent(("x-b3-traceid", TRACE)) is None  # no span id


def test_traceparent_wins_and_otel_propagators_restricts() -> None:
    other = "a" * 32
    pairs = (("traceparent", f"00-{TRACE}-{SPAN}-01"), ("b3", f"{other}-{SPAN}-1"))
    found = parent(*pairs)
    assert found is not None and found.trace_id == int(TRACE, 16)
    only_b3 = parent(*pairs, propagators=("b3",))
    assert only_b3 is not None and only_b3.trace_id == int(other, 16)
    assert parent(*pairs, propagators=()) is None


def test_otel_propagators_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_PROPAGATORS", "b3multi, tracecontext,baggage")
    assert tracing.propagators_from_env() == ("b3multi", "tracecontext")
    monkeypatch.setenv("OTEL_PROPAGATORS", "none")
    assert tracing.propagators_from_env() == ()
    monkeypatch.setenv("OTEL_PROPAGATORS", "tracecontext,jaeger")
    with pytest.raises(tracing.TracingConfigError, match="jaeger"):
        tracing.propagators_from_env()


def test_sampler_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    assert "0.25" in tracing.sampler_from_env().get_description()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "2")
    with pytest.raises(tracing.TracingConfigError, match="OTEL_TRACES_SAMPLER_ARG=2"):
        tracing.sampler_from_env()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "sometimes")
    with pytest.raises(tracing.TracingConfigError, match="OTEL_TRACES_SAMPLER=sometimes"):
        tracing.sampler_from_env()


@pytest.mark.parametrize(
    ("sampler", "recorded"),
    [
        ("parentbased_always_on", [True, False, True]),  # follows the caller; roots sampled
        ("always_on", [True, True, True]),  # ignores the caller's decision
        ("always_off", [False, False, False]),
        ("parentbased_always_off", [True, False, False]),
    ],
)
def test_sampling_decision_per_sampler(
    monkeypatch: pytest.MonkeyPatch, sampler: str, recorded: list[bool]
) -> None:
    """bbr's shortcuts (no span when the answer is known) agree with the SDK's samplers."""
    from opentelemetry.sdk.trace import TracerProvider

    monkeypatch.setenv("OTEL_TRACES_SAMPLER", sampler)
    provider = TracerProvider(sampler=tracing.sampler_from_env(), shutdown_on_exit=False)
    traced = tracing.Tracing(provider)
    calls = [
        [(b"traceparent", f"00-{TRACE}-{SPAN}-01".encode())],
        [(b"traceparent", f"00-{TRACE}-{SPAN}-00".encode())],
        [],
    ]
    assert [traced.start(headers).is_recording() for headers in calls] == recorded


def test_tracing_off_never_imports_the_sdk() -> None:
    """Without --tracing, serving code loads no OpenTelemetry module at all."""
    code = (
        "import sys, bbr.cli, bbr.server, bbr.workers, bbr.metrics;"
        "print([m for m in sys.modules if m.startswith('opentelemetry')])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


# --- a real bbr exporting to a real receiver ----------------------------------------------


def otel_env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        **extra,
    }


def process(
    channel: grpc.Channel, model: str, metadata: tuple[tuple[str, str], ...] = ()
) -> list[object]:
    messages = [
        extproc.headers({"content-type": "application/json"}),
        extproc.body(json_body(model)),
    ]
    stub = extproc.stub(channel)
    return list(stub.Process(iter(messages), metadata=metadata, timeout=10))


def spans_of(receiver: Receiver, service: str, count: int) -> list[ReceivedSpan]:
    receiver.wait_for(lambda spans: sum(s.service == service for s in spans) >= count)
    return receiver.spans(service)


def test_span_per_stream_is_child_of_the_callers_context(
    receiver: Receiver, start_bbr: StartBbr, simple_map: Path
) -> None:
    bbr = start_bbr(
        "--tracing", model_map=simple_map, env=otel_env(receiver, OTEL_SERVICE_NAME="bbr-child")
    )
    channel = bbr.channel()
    process(channel, "food", (("traceparent", f"00-{TRACE}-{SPAN}-01"),))
    process(channel, "nobody", (("b3", f"{'b' * 32}-{SPAN}-1"),))
    process(
        channel,
        "qwen",
        (("x-b3-traceid", "c" * 16), ("x-b3-spanid", SPAN), ("x-b3-sampled", "1")),
    )
    process(channel, "")  # no context: a new trace; an invalid model
    spans = spans_of(receiver, "bbr-child", 4)
    assert len(spans) == 4
    routed, unknown, multi, fresh = sorted(spans, key=lambda s: s.start_ns)

    assert routed.name == "envoy.service.ext_proc.v3.ExternalProcessor/Process"
    assert routed.kind == SERVER_KIND
    assert (routed.trace_id, routed.parent_span_id) == (TRACE, SPAN)
    assert routed.attributes["bbr.outcome"] == "routed"
    assert routed.attributes["bbr.model"] == "food"
    assert routed.attributes["bbr.base_model"] == "llama"
    assert routed.attributes["bbr.body_bytes"] == len(json_body("food"))
    assert routed.attributes["rpc.system"] == "grpc"
    assert routed.attributes["rpc.grpc.status_code"] == 0
    assert routed.end_ns >= routed.start_ns
    assert 0 < routed.attributes["bbr.decision.duration"] < (routed.end_ns - routed.start_ns) / 1e9
    assert routed.resource["service.version"]

    assert (unknown.trace_id, unknown.parent_span_id) == ("b" * 32, SPAN)
    assert unknown.attributes["bbr.outcome"] == "unknown_model"
    assert unknown.attributes["bbr.model"] == "nobody"
    assert "bbr.base_model" not in unknown.attributes

    assert (multi.trace_id, multi.parent_span_id) == ("0" * 16 + "c" * 16, SPAN)
    assert multi.attributes["bbr.base_model"] == "qwen"

    assert fresh.parent_span_id == "" and fresh.trace_id not in (TRACE, "b" * 32)
    assert fresh.attributes["bbr.outcome"] == "invalid"
    assert fresh.attributes["bbr.error_code"] == "invalid_model"
    assert fresh.attributes["bbr.response.status_code"] == 400


def test_protocol_violation_span_carries_the_grpc_status(
    receiver: Receiver, start_bbr: StartBbr, simple_map: Path
) -> None:
    bbr = start_bbr(
        "--tracing", model_map=simple_map, env=otel_env(receiver, OTEL_SERVICE_NAME="bbr-proto")
    )
    stub = extproc.stub(bbr.channel())
    twice = [extproc.headers({"content-type": "application/json"})] * 2
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.Process(iter(twice), timeout=10))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    (span,) = spans_of(receiver, "bbr-proto", 1)
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "bbr.outcome" not in span.attributes  # the stream ended before a decision


def test_sampling_follows_otel_traces_sampler(
    receiver: Receiver, start_bbr: StartBbr, simple_map: Path
) -> None:
    """parentbased_traceidratio at 0: only callers that sampled get a span."""
    env = otel_env(
        receiver,
        OTEL_SERVICE_NAME="bbr-sampled",
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0",
    )
    bbr = start_bbr("--tracing", model_map=simple_map, env=env)
    channel = bbr.channel()
    process(channel, "food")  # root: ratio 0 drops it
    process(channel, "food", (("traceparent", f"00-{'1' * 32}-{SPAN}-00"),))  # parent said no
    process(channel, "food", (("x-b3-traceid", "2" * 32), ("x-b3-spanid", SPAN)))  # deferred
    process(channel, "movie", (("traceparent", f"00-{TRACE}-{SPAN}-01"),))  # parent said yes
    (span,) = spans_of(receiver, "bbr-sampled", 1)
    time.sleep(0.5)  # anything sampled before it would have been exported with or before it
    assert [s.attributes["bbr.model"] for s in receiver.spans("bbr-sampled")] == ["movie"]
    assert span.trace_id == TRACE


def test_sigterm_flushes_queued_spans(
    receiver: Receiver, start_bbr: StartBbr, simple_map: Path
) -> None:
    env = otel_env(receiver, OTEL_SERVICE_NAME="bbr-flush", OTEL_BSP_SCHEDULE_DELAY="600000")
    bbr = start_bbr("--tracing", model_map=simple_map, env=env)
    process(bbr.channel(), "food", (("traceparent", f"00-{TRACE}-{SPAN}-01"),))
    time.sleep(0.3)
    assert receiver.spans("bbr-flush") == []  # still queued: the schedule delay is 10 min
    bbr.terminate()
    assert bbr.wait(30) == 0
    (span,) = receiver.spans("bbr-flush")
    assert span.attributes["bbr.model"] == "food"


def test_unreachable_collector_neither_blocks_requests_nor_exit(
    start_bbr: StartBbr, simple_map: Path
) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "30",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    bbr = start_bbr("--tracing", model_map=simple_map, env=env)
    channel = bbr.channel()
    for _ in range(20):
        responses = process(channel, "food")
        assert extproc.set_headers(responses[-1])[extproc.BASE] == "llama"  # type: ignore[arg-type]
    started = time.monotonic()
    bbr.terminate()
    assert bbr.wait(60) == 0
    # The flush gives up after tracing.SHUTDOWN_SECONDS instead of the exporter's 30 s.
    assert time.monotonic() - started < tracing.SHUTDOWN_SECONDS + 10


def test_with_workers_every_worker_exports(
    receiver: Receiver, start_bbr: StartBbr, simple_map: Path
) -> None:
    env = otel_env(receiver, OTEL_SERVICE_NAME="bbr-workers")
    bbr = start_bbr("--tracing", "--workers", "2", model_map=simple_map, env=env)
    for _ in range(16):  # fresh connections: SO_REUSEPORT spreads them over the workers
        with grpc.insecure_channel(f"127.0.0.1:{bbr.grpc_port}") as channel:
            process(channel, "food", (("traceparent", f"00-{TRACE}-{SPAN}-01"),))
    spans = spans_of(receiver, "bbr-workers", 16)
    assert all(s.trace_id == TRACE and s.parent_span_id == SPAN for s in spans)
    pids = {s.resource["process.pid"] for s in spans}
    assert bbr.pid not in pids  # the supervisor serves no ext_proc calls
    assert 1 <= len(pids) <= 2


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("OTEL_TRACES_SAMPLER", "sometimes"),
        ("OTEL_TRACES_SAMPLER_ARG", "lots"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_TRACES_EXPORTER", "jaeger"),
    ],
)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_bad_otel_variable_is_one_line_exit_2(
    simple_map: Path, variable: str, value: str, workers: str
) -> None:
    env = {variable: value}
    if variable == "OTEL_TRACES_SAMPLER_ARG":
        env["OTEL_TRACES_SAMPLER"] = "traceidratio"
    result = run_bbr(
        "serve", "--model-map", str(simple_map), "--tracing", "--workers", workers, env=env
    )
    assert result.returncode == 2
    assert f"{variable}={value}" in last_line(result.stderr)
    assert "Traceback" not in result.stderr


def test_otel_sdk_disabled_turns_tracing_off(
    receiver: Receiver, start_bbr: StartBbr, simple_map: Path
) -> None:
    env = otel_env(receiver, OTEL_SERVICE_NAME="bbr-disabled", OTEL_SDK_DISABLED="true")
    bbr = start_bbr("--tracing", model_map=simple_map, env=env)
    process(bbr.channel(), "food", (("traceparent", f"00-{TRACE}-{SPAN}-01"),))
    bbr.terminate()
    assert bbr.wait(30) == 0
    assert receiver.spans("bbr-disabled") == []
    assert any("OTEL_SDK_DISABLED" in str(r.get("msg")) for r in bbr.log_records())


def test_env_twin_turns_tracing_on(
    receiver: Receiver, start_bbr: StartBbr, simple_map: Path
) -> None:
    env = otel_env(receiver, OTEL_SERVICE_NAME="bbr-env", BBR_TRACING="true")
    bbr = start_bbr(model_map=simple_map, env=env)
    process(bbr.channel(), "food")
    assert spans_of(receiver, "bbr-env", 1)
