"""`--tracing`: one OpenTelemetry span per ext_proc stream, joined to Envoy's trace.

Envoy's gRPC client sends the trace context of its ext_proc call as request headers
(W3C `traceparent`/`tracestate` with Envoy's OpenTelemetry tracer, `x-b3-*` or `b3` with
Zipkin). bbr reads them itself (`parent_of`): a few string checks, no propagator
machinery on the request path. Exporter, sampler and resource come from the standard
`OTEL_*` variables; spans leave through a batch span processor on its own thread.

The OpenTelemetry SDK is imported here only, and this module only with `--tracing`, so
a bbr without it neither loads the SDK nor does any per-request work for it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import (
    INVALID_SPAN,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from bbr import __version__
from bbr.logs import fields
from bbr.protocol import RequestRecord

log = logging.getLogger("bbr.tracing")

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
SPAN_NAME = f"{SERVICE}/Process"  # OTel RPC convention: {rpc.service}/{rpc.method}
STATIC_ATTRIBUTES = {"rpc.system": "grpc", "rpc.service": SERVICE, "rpc.method": "Process"}
# gRPC codes that are the server's fault (OTel RPC convention for SERVER spans).
SERVER_ERRORS = frozenset((2, 4, 12, 13, 14, 15))  # UNKNOWN .. DATA_LOSS
SHUTDOWN_SECONDS = 5.0
ENDPOINT = "http://localhost:4317"  # the OTLP/gRPC exporter's
PROPAGATORS = ("tracecontext", "b3", "b3multi")
IGNORED_PROPAGATORS = frozenset(("baggage", "none"))
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)
_HEX = frozenset(b"0123456789abcdef")


class TracingConfigError(Exception):
    """An OTEL_* variable bbr cannot honour; the message names it."""


# --- reading the parent context ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Parent:
    """The caller's span, as its trace headers named it."""

    trace_id: int
    span_id: int
    sampled: bool
    trace_state: bytes = b""


def _hex_id(text: bytes, sizes: tuple[int, ...]) -> int:
    """A non-zero lower-case hex id of one of `sizes` digits, else 0."""
    if len(text) not in sizes or not _HEX.issuperset(text):
        return 0
    return int(text, 16)


def traceparent(value: bytes, state: bytes = b"") -> Parent | None:
    """W3C Trace Context level 1: `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`."""
    if len(value) < 55 or value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    version = value[:2]
    if not _HEX.issuperset(version) or version == b"ff":
        return None
    if version == b"00" and len(value) != 55:
        return None
    if len(value) > 55 and value[55:56] != b"-":  # a later version may append fields
        return None
    trace_id = _hex_id(value[3:35], (32,))
    span_id = _hex_id(value[36:52], (16,))
    flags = value[53:55]
    if not trace_id or not span_id or not _HEX.issuperset(flags):
        return None
    return Parent(trace_id, span_id, bool(int(flags, 16) & 1), state)


def b3_single(value: bytes) -> Parent | None:
    """`b3: <trace id>-<span id>[-<sampling>[-<parent span id>]]` (openzipkin/b3-propagation).

    A sampling state of `d` (debug) counts as sampled; an absent one (deferred) as not,
    as OpenTelemetry's own B3 propagator reads it.
    """
    parts = value.split(b"-")
    if len(parts) < 2 or len(parts) > 4:
        return None  # also a bare "0"/"1"/"d": no ids to join
    trace_id = _hex_id(parts[0], (16, 32))
    span_id = _hex_id(parts[1], (16,))
    if not trace_id or not span_id:
        return None
    sampling_state = parts[2] if len(parts) > 2 else b""
    if sampling_state not in (b"", b"0", b"1", b"d"):
        return None
    return Parent(trace_id, span_id, sampling_state in (b"1", b"d"))


def b3_multi(trace: bytes, span: bytes, sampled: bytes, flags: bytes) -> Parent | None:
    """`x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled` (1/0, true/false), `x-b3-flags: 1`."""
    trace_id = _hex_id(trace, (16, 32))
    span_id = _hex_id(span, (16,))
    if not trace_id or not span_id:
        return None
    return Parent(trace_id, span_id, flags == b"1" or sampled.lower() in (b"1", b"true"))


_TRACE_HEADERS = frozenset(
    (
        b"traceparent",
        b"tracestate",
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-sampled",
        b"x-b3-flags",
    )
)


def parent_of(
    headers: Iterable[tuple[bytes, bytes]], propagators: Sequence[str] = PROPAGATORS
) -> Parent | None:
    """The first valid context among `propagators`, in their order; None: a new trace."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in _TRACE_HEADERS and name not in found:
            found[name] = value.strip()
    if not found:
        return None
    for kind in propagators:
        parent = None
        if kind == "tracecontext" and b"traceparent" in found:
            parent = traceparent(found[b"traceparent"], found.get(b"tracestate", b""))
        elif kind == "b3" and b"b3" in found:
            parent = b3_single(found[b"b3"])
        elif kind == "b3multi" and b"x-b3-traceid" in found:
            parent = b3_multi(
                found[b"x-b3-traceid"],
                found.get(b"x-b3-spanid", b""),
                found.get(b"x-b3-sampled", b""),
                found.get(b"x-b3-flags", b""),
            )
        if parent is not None:
            return parent
    return None


# --- configuration from OTEL_* -------------------------------------------------------------


def _env(name: str, default: str = "") -> str:
    return os.environ.get(name, default).strip()


def _first_env(*names: str, default: str = "") -> tuple[str, str]:
    """The first of `names` that is set (name, value); the last name and `default` if none."""
    for name in names:
        value = _env(name)
        if value:
            return name, value
    return names[-1], default


def propagators_from_env() -> tuple[str, ...]:
    """OTEL_PROPAGATORS, restricted to what can arrive from Envoy; all three when unset."""
    raw = _env("OTEL_PROPAGATORS")
    if not raw:
        return PROPAGATORS
    chosen: list[str] = []
    for name in (part.strip().lower() for part in raw.split(",")):
        if name in PROPAGATORS:
            chosen.append(name)
        elif name and name not in IGNORED_PROPAGATORS:
            raise TracingConfigError(
                f"OTEL_PROPAGATORS={raw}: bbr reads tracecontext, b3 and b3multi, not {name!r}"
            )
    return tuple(chosen)


def sampler_from_env() -> sampling.Sampler:
    """OTEL_TRACES_SAMPLER (+ _ARG); a value the SDK would only warn about is an error here."""
    name = _env("OTEL_TRACES_SAMPLER", "parentbased_always_on").lower()
    if name not in SAMPLERS:
        raise TracingConfigError(
            f"OTEL_TRACES_SAMPLER={name}: unknown sampler (use {', '.join(SAMPLERS)})"
        )
    if name.endswith("traceidratio"):
        raw = _env("OTEL_TRACES_SAMPLER_ARG", "1.0")
        try:
            ratio = float(raw)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise TracingConfigError(
                f"OTEL_TRACES_SAMPLER_ARG={raw}: a ratio between 0 and 1 is needed for {name}"
            )
        if name == "traceidratio":
            return sampling.TraceIdRatioBased(ratio)
        return sampling.ParentBasedTraceIdRatio(ratio)
    fixed: dict[str, sampling.Sampler] = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "parentbased_always_on": sampling.DEFAULT_ON,
        "parentbased_always_off": sampling.DEFAULT_OFF,
    }
    return fixed[name]


def exporter_from_env() -> Callable[[], SpanExporter] | None:
    """OTEL_TRACES_EXPORTER (otlp, console, none) and the OTLP protocol: how to make the
    exporter (None: export nothing), checked without making it."""
    kind = _env("OTEL_TRACES_EXPORTER", "otlp").lower()
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter
    if kind != "otlp":
        raise TracingConfigError(
            f"OTEL_TRACES_EXPORTER={kind}: bbr exports with otlp, console or none"
        )
    variable, protocol = _first_env(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL", default="grpc"
    )
    if protocol == "grpc":
        module = "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"
    elif protocol == "http/protobuf":
        module = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
        if importlib.util.find_spec("opentelemetry.exporter.otlp.proto.http") is None:
            raise TracingConfigError(
                f"{variable}=http/protobuf: bbr ships the grpc exporter only "
                "(install opentelemetry-exporter-otlp-proto-http, or use grpc)"
            )
    else:
        raise TracingConfigError(f"{variable}={protocol}: use grpc (or http/protobuf)")
    exporter: Callable[[], SpanExporter] = importlib.import_module(module).OTLPSpanExporter
    return exporter


def check() -> None:
    """Raise TracingConfigError for an OTEL_* value bbr cannot honour (the supervisor of
    --workers checks once, so a bad value is one exit 2, not workers restarting)."""
    if _env("OTEL_SDK_DISABLED").lower() != "true":
        propagators_from_env()
        sampler_from_env()
        exporter_from_env()


def resource_from_env() -> Resource:
    """OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES, with bbr's name and version as defaults."""
    resource = Resource.create({"service.version": __version__, "process.pid": os.getpid()})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "bbr"}))
    return resource


# --- spans ---------------------------------------------------------------------------------


class Tracing:
    """The tracer bbr's ext_proc calls use, and its shutdown."""

    def __init__(
        self,
        provider: TracerProvider,
        propagators: Sequence[str] = PROPAGATORS,
    ) -> None:
        self.provider = provider
        self.propagators = tuple(propagators)
        self._tracer = provider.get_tracer("bbr", __version__)
        sampler = provider.sampler
        # Shortcuts to the SDK's own answers: no span at all, for the cost of a check.
        self._never = sampler is sampling.ALWAYS_OFF
        # The OTEL_TRACES_SAMPLER parentbased_* samplers drop what the caller did not sample.
        self._follows_parent = isinstance(sampler, sampling.ParentBased)

    def start(self, headers: list[tuple[bytes, bytes]]) -> Span:
        """A SERVER span for one ext_proc call, child of the caller's context if it sent one."""
        if self._never:
            return INVALID_SPAN
        parent = parent_of(headers, self.propagators)
        context = None
        if parent is not None:
            if not parent.sampled and self._follows_parent:
                return INVALID_SPAN
            state = None
            if parent.trace_state:
                state = TraceState.from_header([parent.trace_state.decode("latin-1")])
            remote = SpanContext(
                parent.trace_id,
                parent.span_id,
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED if parent.sampled else 0),
                trace_state=state,
            )
            context = trace.set_span_in_context(NonRecordingSpan(remote))
        return self._tracer.start_span(SPAN_NAME, context=context, kind=SpanKind.SERVER)

    @staticmethod
    def end(span: Span, done: RequestRecord | None, grpc_code: int | None) -> None:
        """Attributes of the outcome (none if the stream ended before one), then end."""
        if not span.is_recording():
            return
        attributes: dict[str, Any] = dict(STATIC_ATTRIBUTES)  # all set at once: cheaper
        if done is not None:
            outcome = done.outcome
            attributes["bbr.outcome"] = outcome.label.value
            if outcome.model is not None:
                attributes["bbr.model"] = outcome.model
            if outcome.base_model is not None:
                attributes["bbr.base_model"] = outcome.base_model
            if done.body_bytes is not None:
                attributes["bbr.body_bytes"] = done.body_bytes
            attributes["bbr.decision.duration"] = done.seconds
            if outcome.status:
                attributes["bbr.response.status_code"] = outcome.status
                if outcome.code:
                    attributes["bbr.error_code"] = outcome.code
        if grpc_code is not None:
            attributes["rpc.grpc.status_code"] = grpc_code
            if grpc_code in SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR))
        span.set_attributes(attributes)
        span.end()

    async def shutdown(self, seconds: float = SHUTDOWN_SECONDS) -> None:
        """Flush the spans still queued, waiting at most `seconds` for the collector.

        The SDK's flush waits out the exporter's own timeout and retries (10 s and more);
        it runs on a daemon thread, so an unreachable collector cannot hold up the exit.
        """
        flusher = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        flusher.start()
        await asyncio.get_running_loop().run_in_executor(None, flusher.join, seconds)
        if flusher.is_alive():
            log.warning(
                "spans not flushed before exit: the collector did not answer",
                extra=fields(seconds=seconds),
            )


def setup() -> Tracing | None:
    """The tracer from OTEL_*; None when OTEL_SDK_DISABLED is true. Raises TracingConfigError."""
    if _env("OTEL_SDK_DISABLED").lower() == "true":
        log.info("tracing disabled by OTEL_SDK_DISABLED")
        return None
    propagators = propagators_from_env()
    provider = TracerProvider(
        sampler=sampler_from_env(), resource=resource_from_env(), shutdown_on_exit=False
    )
    exporter = exporter_from_env()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter()))
    _, endpoint = _first_env(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT", default=ENDPOINT
    )
    log.info(
        "tracing on",
        extra=fields(
            exporter=_env("OTEL_TRACES_EXPORTER", "otlp"),
            endpoint=endpoint,
            sampler=_env("OTEL_TRACES_SAMPLER", "parentbased_always_on"),
            propagators=",".join(propagators),
        ),
    )
    return Tracing(provider, propagators)
