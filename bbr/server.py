"""Process lifecycle: the ext_proc port (`bbr.h2grpc`: Process, health Check, reflection),
the health port (grpc.aio), metrics, map sources, signals.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import logging
import os
import signal
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from bbr import __version__, h2grpc, mapview, metrics
from bbr.decision import Options
from bbr.logs import fields, log_info
from bbr.modelmap import Conflict, MapHolder, ModelMap
from bbr.protocol import Finished, ProtocolError, Stream
from bbr.sources import Source, SourceError, build

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from bbr.tracing import Tracing

log = logging.getLogger("bbr")
request_log = logging.getLogger("bbr.request")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
DRAIN_SECONDS = 20.0
# How long a stream may hold part of a streamed body without a new message.
STREAM_IDLE_SECONDS = 60.0
MESSAGE_OVERHEAD = 64 * 1024


class StartupError(Exception):
    """bbr cannot start; the message is the one line the operator sees."""


@dataclass
class ServeConfig:
    model_maps: list[str] = field(default_factory=list)
    grpc_port: int = 9004
    grpc_health_port: int = 9005
    metrics_port: int = 9090
    streaming: bool = False
    options: Options = field(default_factory=Options)
    kubernetes: bool = False
    namespaces: list[str] = field(default_factory=list)
    secure_serving: bool = False
    cert_path: str | None = None
    client_ca: str | None = None
    workers: int = 1
    drain_seconds: float = DRAIN_SECONDS
    stream_idle_seconds: float = STREAM_IDLE_SECONDS
    tracing: bool = False
    limits: h2grpc.Limits = field(default_factory=h2grpc.Limits)
    # Set in the worker processes of a multi-worker bbr: where to say "ready".
    ready_fd: int | None = None


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
        on_finish: Callable[[Finished], None] | None = None,
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
        if self.retained or self._stream.holding:
            self.hold(self._stream.held_bytes)  # counted in the port's memory budgets
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._stream.holding and not self.done:  # a held body must not be held forever
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
        self._done: Finished | None = None
        self._code: int | None = None
        super().__init__(conn, stream_id, processor, on_finish=self._finished)

    def _finished(self, done: Finished) -> None:
        self._done = done
        finished(done)

    def finish(self, code: int = h2grpc.OK, message: str = "") -> None:
        if not self.done:
            self._code = code
        super().finish(code, message)

    def closed(self) -> None:
        super().closed()
        self._tracing.end(self._span, self._done, self._code)


class Health:
    """Health status for both ports: grpc.aio's servicer (health port) and a table for
    `Check` on the ext_proc port."""

    def __init__(self) -> None:
        self.servicer = HealthServicer()
        self.status: dict[str, int] = {}

    async def set(self, service: str, status: int) -> None:
        self.status[service] = status
        await self.servicer.set(service, status)

    def check(
        self, conn: h2grpc.Connection, stream_id: int, headers: list[tuple[bytes, bytes]]
    ) -> h2grpc.Call:
        return HealthCheckCall(conn, stream_id, self.status)


class HealthCheckCall(h2grpc.Call):
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
            "/grpc.health.v1.Health/Check": health.check,
            f"/{reflection.SERVICE_NAME}/ServerReflectionInfo": (
                lambda conn, stream_id, headers: ReflectionCall(conn, stream_id, servicer)
            ),
        },
        max_message=limit,
        limits=limits,
    )
    server.on_close = lambda reason: metrics.CONNECTIONS_CLOSED.labels(reason=reason).inc()
    return server


def finished(done: Finished) -> None:
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


TRIM_SECONDS = 2.0


async def trim_when_idle(processor: Processor, server: h2grpc.Server | None = None) -> None:
    """Give freed body buffers back to the OS once traffic pauses.

    glibc keeps freed memory in its arenas, so after a burst of large bodies RSS would
    stay at its peak; malloc_trim(0) while no stream is open returns it. Closed
    connections count as work too (a client that never opened a Process stream may
    have made bbr buffer, queue and free plenty).
    """
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return
    trimmed_at = (0, 0)
    while True:
        await asyncio.sleep(TRIM_SECONDS)
        work = (processor.started, server.closed if server is not None else 0)
        if (
            processor.active == 0
            and work != trimmed_at
            and (server is None or not server.busy())  # a trim can take a while: only idle
        ):
            trimmed_at = work
            trim(0)


FD_RESERVE = 64  # fds bbr opens after start: health and metrics ports, map files, the API


def raise_fd_limit(connections: int) -> int:
    """Let the connection cap, not the fd limit, be what refuses clients.

    Raises the soft RLIMIT_NOFILE to the hard one. When even that leaves no room for
    --max-connections plus what bbr needs for itself, the cap is lowered to fit (and
    said so): a refused connection is closed at once, while running out of fds makes
    accept() fail over and over.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    try:  # what is open already, plus room for what bbr opens later
        reserve = len(os.listdir("/proc/self/fd")) + FD_RESERVE + 4 * h2grpc.ACCEPT_BATCH
    except OSError:
        reserve = 2 * FD_RESERVE + 4 * h2grpc.ACCEPT_BATCH
    if soft != resource.RLIM_INFINITY and soft < connections + reserve:
        fitted = max(1, soft - reserve)
        log.warning(
            "--max-connections lowered to fit the open-file limit",
            extra=fields(fd_limit=soft, max_connections=connections, lowered_to=fitted),
        )
        return fitted
    return connections


def check_port(port: int, flag: str) -> None:
    """Fail early, naming the port, when something else listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise StartupError(f"{flag} {port}: port {port} is {reason}") from None


class MapAnnouncer:
    """Logs and counts each map put in force; a conflict is logged when it appears,
    not again on every later change (at scale that would be every event). It looks
    only at the names whose conflicts changed (`snapshot.changes`), when known."""

    def __init__(self) -> None:
        self._conflicts: dict[str, frozenset[Conflict]] = {}

    def __call__(self, snapshot: ModelMap) -> None:
        metrics.observe_map(snapshot)
        log.info(
            "model map in force",
            extra=fields(
                base_models=snapshot.base_count,
                adapters=snapshot.adapter_count,
                conflicts=snapshot.conflict_count,
            ),
        )
        changes = snapshot.changes
        if changes is not None:
            names: Iterable[str] = changes.conflicted
        else:
            names = {c.name for c in snapshot.conflicts} | self._conflicts.keys()
        for name in sorted(names):
            seen = self._conflicts.pop(name, frozenset())
            now = snapshot.conflicts_of(name)
            for conflict in now:
                if conflict not in seen:
                    log.warning(
                        "model name conflict", extra=fields(name=name, detail=str(conflict))
                    )
            if now:
                self._conflicts[name] = frozenset(now)


def build_sources(
    config: ServeConfig, holder: MapHolder, *, announce: bool = True, events: bool | None = None
) -> list[Source]:
    """The map sources of `config` (`bbr.sources.build`); one that cannot start stops the
    start. `announce`: log and count each map put in force and each load and reload."""
    if announce:
        holder.subscribe(MapAnnouncer())
    try:
        return build(
            holder,
            config.model_maps,
            config.namespaces if config.kubernetes else None,
            reports=announce,
            events=announce if events is None else events,
        )
    except SourceError as exc:
        raise StartupError(str(exc)) from None


def _ports(config: ServeConfig) -> tuple[tuple[int, str], ...]:
    return (
        (config.grpc_port, "--grpc-port"),
        (config.grpc_health_port, "--grpc-health-port"),
        (config.metrics_port, "--metrics-port"),
    )


def on_stop_signals(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT call `stop` on the loop, for the whole life of the process.

    The handler takes no lock, it only queues `stop` through the loop's self-pipe. It is a
    plain signal handler, not loop.add_signal_handler: closing the loop would give both
    signals their default actions back, so one more signal in a burst arriving while bbr
    drains or exits would kill it.
    """

    def handler(signum: int, frame: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are exiting anyway
            loop.call_soon_threadsafe(stop)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)


async def serve(config: ServeConfig) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    worker = config.ready_fd is not None
    if config.workers > 1 and not worker:
        from bbr.workers import supervise

        return await supervise(config)
    if not worker:
        for port, flag in _ports(config):
            check_port(port, flag)

    if config.tracing:
        check_tracing()  # before anything logs: a bad OTEL_* value is the last line
    holder = MapHolder()
    # With --workers, the supervisor posts the Kubernetes Events (once, not N times).
    sources = build_sources(config, holder, events=not worker)

    limit = config.options.max_body_bytes + MESSAGE_OVERHEAD
    processor = Processor(
        holder,
        config.options,
        streaming=config.streaming,
        idle_seconds=config.stream_idle_seconds,
        tracing=start_tracing() if config.tracing else None,
    )
    health = Health()
    ssl_context = None
    if config.secure_serving:
        from bbr.tls import TLSError, server_tls

        try:
            ssl_context = server_tls(config.cert_path, config.client_ca).context
        except TLSError as exc:
            raise StartupError(str(exc)) from None
    limits = config.limits
    cap = raise_fd_limit(limits.max_connections)
    if cap != limits.max_connections:
        limits = dataclasses.replace(limits, max_connections=cap)
    server = h2_server(processor, health, limit, limits)
    try:
        await server.listen(
            "0.0.0.0", config.grpc_port, reuse_port=config.workers > 1, ssl_context=ssl_context
        )
    except OSError as exc:
        raise StartupError(
            f"--grpc-port {config.grpc_port}: cannot listen on port {config.grpc_port}"
            f" ({exc.strerror})"
        ) from None
    health_server = None
    if not worker:  # a multi-worker supervisor serves health and metrics itself
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health.servicer, health_server)
        _listen(health_server, config.grpc_health_port, "--grpc-health-port")
        start_metrics(config.metrics_port, current=lambda: holder.current)

    if health_server is not None:
        await health_server.start()
    for source in sources:
        source.start()

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    on_stop_signals(loop, stopping.set)

    async def mark_serving() -> None:
        await loop.run_in_executor(None, holder.loaded.wait)
        if not stopping.is_set():
            for service in ("", SERVICE_NAME):
                await health.set(service, health_pb2.HealthCheckResponse.SERVING)
            log.info("serving", extra=fields(grpc_port=config.grpc_port, version=__version__))
            if config.ready_fd is not None:
                os.write(config.ready_fd, b"1")
                os.close(config.ready_fd)

    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    ready = asyncio.create_task(mark_serving())
    trimmer = asyncio.create_task(trim_when_idle(processor, server))
    log.info(
        "bbr starting",
        extra=fields(
            version=__version__,
            grpc_port=config.grpc_port,
            health_port=config.grpc_health_port,
            metrics_port=config.metrics_port,
            streaming=config.streaming,
            unknown_model=config.options.unknown_model,
        ),
    )
    await stopping.wait()

    log.info("draining", extra=fields(grace_seconds=config.drain_seconds))
    ready.cancel()
    trimmer.cancel()
    holder.loaded.set()  # release the waiter thread
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.stop(config.drain_seconds)
    if health_server is not None:
        await health_server.stop(0)
    for source in sources:
        source.stop()
    if processor.tracing is not None:
        await processor.tracing.shutdown()  # flush the spans still queued
    with contextlib.suppress(asyncio.CancelledError):
        await ready
    log.info("stopped")
    return 0


def start_tracing() -> Tracing | None:
    """The SDK is imported here, only with --tracing; a bad OTEL_* value stops the start."""
    from bbr.tracing import TracingConfigError, setup

    try:
        return setup()
    except TracingConfigError as exc:
        raise StartupError(str(exc)) from None


def check_tracing() -> None:
    from bbr.tracing import TracingConfigError, check

    try:
        check()
    except TracingConfigError as exc:
        raise StartupError(str(exc)) from None


def start_metrics(
    port: int, registry: Any = None, current: Callable[[], ModelMap] | None = None
) -> None:
    """/metrics and, from `current()`, `GET /modelmap` (bbr.mapview)."""
    try:
        if registry is None:
            mapview.start(port, current)
        else:
            mapview.start(port, current, registry)
    except OSError as exc:
        raise StartupError(f"--metrics-port {port}: {exc.strerror}") from None


def _listen(server: grpc.aio.Server, port: int, flag: str) -> None:
    try:
        bound = server.add_insecure_port(f"0.0.0.0:{port}")
    except RuntimeError:
        bound = 0
    if bound == 0:
        raise StartupError(f"{flag} {port}: cannot listen on port {port}")
