"""The calls the gRPC port answers: ext_proc Process, health Check and reflection.

Each handler subclasses `bbr.h2grpc.Call`, so the HTTP/2 server calls its `message`
directly: one indirection less per message on the hot path than a handler holding a call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from bbr import h2grpc, metrics
from bbr.config import STREAM_IDLE_SECONDS
from bbr.decision import Options
from bbr.health import SERVICE_NAME, Health
from bbr.logs import log_info
from bbr.modelmap import MapHolder
from bbr.protocol import ProtocolError, RequestRecord, Stream

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from bbr.tracing import Tracing

request_log = logging.getLogger("bbr.request")


class Processor:
    """The ext_proc service: one `Stream` per call (`ProcessCall`)."""

    def __init__(
        self,
        holder: MapHolder,
        options: Options,
        *,
        streaming: bool,
        idle_seconds: float = STREAM_IDLE_SECONDS,
        tracing: Tracing | None = None,
    ) -> None:
        self.holder = holder
        self.tracing = tracing
        self.options = options
        self.streaming = streaming
        self.idle_seconds = idle_seconds
        self.active = 0
        self.started = 0  # streams ever opened: tells the memory trimmer about new work

    def call(
        self, conn: h2grpc.Connection, stream_id: int, headers: list[tuple[bytes, bytes]]
    ) -> ProcessCall:
        return ProcessCall(conn, stream_id, self)

    def traced_call(
        self, conn: h2grpc.Connection, stream_id: int, headers: list[tuple[bytes, bytes]]
    ) -> ProcessCall:
        """The route with --tracing: the call's headers carry Envoy's trace context."""
        return TracedProcessCall(conn, stream_id, self, headers)


def parse(call: h2grpc.Call, kind: Any, data: memoryview) -> Any:
    """The request message, or None once the call is ended with INVALID_ARGUMENT."""
    try:
        return kind.FromString(data)
    except DecodeError:
        call.finish(h2grpc.INVALID_ARGUMENT, f"malformed {kind.DESCRIPTOR.name}")
        return None


class ProcessCall(h2grpc.Call):
    """One ext_proc stream on `bbr.h2grpc`: each message answered as it arrives."""

    __slots__ = ("_processor", "_stream", "_timer")

    def __init__(
        self,
        conn: h2grpc.Connection,
        stream_id: int,
        processor: Processor,
        on_finish: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        super().__init__(conn, stream_id)
        self._processor = processor
        self._stream = Stream(
            processor.holder,
            processor.options,
            streaming=processor.streaming,
            on_finish=on_finish or finished,
        )
        self._timer: asyncio.TimerHandle | None = None
        metrics.ACTIVE_STREAMS.inc()
        processor.active += 1
        processor.started += 1

    def message(self, data: memoryview) -> None:
        request = parse(self, pb.ProcessingRequest, data)
        if request is None:
            return
        try:
            replies = self._stream.handle(request)
        except ProtocolError as exc:
            self.finish(h2grpc.INVALID_ARGUMENT, str(exc))
            return
        for reply in replies:
            self.send(reply.SerializeToString())
        holding = self._stream.holding
        if self.retained or holding:
            self.hold(self._stream.held_bytes)  # counted in the port's memory budgets
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if holding and not self.done:  # a held body must not be held forever
            self._timer = asyncio.get_running_loop().call_later(
                self._processor.idle_seconds, self._expire
            )

    def _expire(self) -> None:
        self._timer = None
        self.finish(
            h2grpc.DEADLINE_EXCEEDED,
            f"no request body message for {self._processor.idle_seconds:g} s; stream dropped",
        )

    def closed(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._stream.close()
        self._processor.active -= 1
        metrics.ACTIVE_STREAMS.dec()


class TracedProcessCall(ProcessCall):
    """A ProcessCall inside an OpenTelemetry span: from the call's start to its end."""

    __slots__ = ("_code", "_done", "_span", "_tracing")

    def __init__(
        self,
        conn: h2grpc.Connection,
        stream_id: int,
        processor: Processor,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        assert processor.tracing is not None
        self._tracing = processor.tracing
        self._span: Span = self._tracing.start(headers)
        self._done: RequestRecord | None = None
        self._code: int | None = None
        super().__init__(conn, stream_id, processor, on_finish=self._finished)

    def _finished(self, done: RequestRecord) -> None:
        self._done = done
        finished(done)

    def finish(self, code: int = h2grpc.OK, message: str = "") -> None:
        if not self.done:
            self._code = code
        super().finish(code, message)

    def closed(self) -> None:
        super().closed()
        self._tracing.end(self._span, self._done, self._code)


class HealthCheckCall(h2grpc.Call):
    """grpc.health.v1 Check on the gRPC port, from the table the health port serves."""

    __slots__ = ("_status",)

    def __init__(self, conn: h2grpc.Connection, stream_id: int, status: dict[str, int]) -> None:
        super().__init__(conn, stream_id)
        self._status = status

    def message(self, data: memoryview) -> None:
        request = parse(self, health_pb2.HealthCheckRequest, data)
        if request is None:
            return
        status = self._status.get(request.service)
        if status is None:
            self.finish(h2grpc.NOT_FOUND, "unknown service")
            return
        self.send(health_pb2.HealthCheckResponse(status=status).SerializeToString())
        self.finish()


def health_check(health: Health) -> h2grpc.CallFactory:
    """The route for health Check on the gRPC port."""
    status = health.status
    return lambda conn, stream_id, headers: HealthCheckCall(conn, stream_id, status)


class ReflectionCall(h2grpc.Call):
    """grpc.reflection.v1alpha on `bbr.h2grpc`: grpcio-reflection answers each request."""

    __slots__ = ("_servicer",)

    def __init__(
        self, conn: h2grpc.Connection, stream_id: int, servicer: reflection.ReflectionServicer
    ) -> None:
        super().__init__(conn, stream_id)
        self._servicer = servicer

    def message(self, data: memoryview) -> None:
        request = parse(self, reflection_pb2.ServerReflectionRequest, data)
        if request is None:
            return
        for reply in self._servicer.ServerReflectionInfo(iter([request]), None):
            self.send(reply.SerializeToString())


REFLECTED_SERVICES = (
    SERVICE_NAME,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)


def h2_server(
    processor: Processor, health: Health, limit: int, limits: h2grpc.Limits | None = None
) -> h2grpc.Server:
    """The ext_proc port on `bbr.h2grpc`: Process, health Check and reflection."""
    servicer = reflection.ReflectionServicer(REFLECTED_SERVICES)
    process = processor.call if processor.tracing is None else processor.traced_call
    server = h2grpc.Server(
        {
            f"/{SERVICE_NAME}/Process": process,
            "/grpc.health.v1.Health/Check": health_check(health),
            f"/{reflection.SERVICE_NAME}/ServerReflectionInfo": (
                lambda conn, stream_id, headers: ReflectionCall(conn, stream_id, servicer)
            ),
        },
        max_message=limit,
        limits=limits,
    )
    server.on_close = lambda reason: metrics.CONNECTIONS_CLOSED.labels(reason=reason).inc()
    return server


def finished(done: RequestRecord) -> None:
    """Count and log one request; never the body."""
    metrics.record(done)
    if not request_log.isEnabledFor(logging.INFO):
        return
    outcome = done.outcome
    log_info(
        request_log,
        "request",
        {
            "outcome": outcome.label.value,
            "model": outcome.model,
            "base_model": outcome.base_model,
            "status": outcome.status or None,
            "code": outcome.code,
            "body_bytes": done.body_bytes,
            "duration_ms": round(done.seconds * 1000, 3),
        },
    )
