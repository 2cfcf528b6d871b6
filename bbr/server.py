"""One bbr process: map sources, the gRPC and health ports, metrics, tracing, signals,
memory trimming, drain.

`run` is bbr alone; `run_worker` is one of --workers N under `bbr.workers`, which then
serves health and metrics itself. The calls the gRPC port answers are in `bbr.service`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import dataclasses
import logging
import signal
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from bbr import __version__, h2grpc, metrics
from bbr.config import Config, StartupError, check_ports, check_tracing, raise_fd_limit
from bbr.health import NOT_SERVING, SERVING, Health
from bbr.logs import fields
from bbr.modelmap import Conflict, MapHolder, ModelMap
from bbr.service import Processor, h2_server
from bbr.sources import Source, SourceError, build

if TYPE_CHECKING:
    from bbr.tracing import Tracing

log = logging.getLogger("bbr")

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


# --- map sources ---------------------------------------------------------------------


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
    config: Config, holder: MapHolder, *, announce: bool = True, events: bool | None = None
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


# --- the process -----------------------------------------------------------------------


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


def run(config: Config) -> int:
    """bbr as one process: the gRPC, health and metrics ports. Returns the exit code."""
    return asyncio.run(serve(config))


def run_worker(config: Config, ready: Callable[[], None]) -> int:
    """One of --workers N processes sharing the gRPC port (SO_REUSEPORT).

    Its supervisor has checked the ports and serves health and metrics, and posts the
    Kubernetes Events; `ready()` tells it that this worker serves.
    """
    return asyncio.run(serve(config, worker_ready=ready))


async def serve(config: Config, worker_ready: Callable[[], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code.

    Alone (`worker_ready` None) or as a worker (`worker_ready` given, see `run_worker`).
    """
    worker = worker_ready is not None
    if not worker:
        check_ports(config)
    if config.tracing:
        check_tracing()  # before anything logs: a bad OTEL_* value is the last line
    holder = MapHolder()
    # With --workers, the supervisor posts the Kubernetes Events (once, not N times).
    sources = build_sources(config, holder, events=not worker)

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
    server = h2_server(processor, health, config.max_message, limits)
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
        health_server = health.bind(config.grpc_health_port)
        metrics.start(config.metrics_port, current=lambda: holder.current)

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
            await health.set_all(SERVING)
            log.info("serving", extra=fields(grpc_port=config.grpc_port, version=__version__))
            if worker_ready is not None:
                worker_ready()

    await health.set_all(NOT_SERVING)
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
    await health.set_all(NOT_SERVING)
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
