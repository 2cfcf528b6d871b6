"""`--workers N`: N server processes sharing the gRPC port (SO_REUSEPORT).

Python runs one request at a time per process; several processes use several cores.
Each worker loads and watches the same map sources. This supervisor serves health
(SERVING once every worker is) and metrics (summed across workers through
prometheus_client's multiprocess mode), restarts a worker that dies, and on SIGTERM
passes the signal on and waits for the workers to drain.

`bbr.cli` picks this or `bbr.server.run`, and hands this the worker's entry point
(`target`, `bbr.server.run_worker`): the supervisor starts each worker with the Config
itself, not by re-reading flags. It uses `bbr.server` only for what both process kinds
do alike (`build_sources`, `on_stop_signals`); the server never imports this module.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry, multiprocess

from bbr import logs, metrics
from bbr.config import Config, StartupError, check_ports, check_tracing, startup_failed
from bbr.health import NOT_SERVING, SERVING, Health
from bbr.logs import fields
from bbr.modelmap import MapHolder
from bbr.server import build_sources, on_stop_signals

log = logging.getLogger("bbr.workers")
RESTART_DELAY = 1.0

# What a worker process runs: its Config, and `ready()` to call once it serves.
Target = Callable[[Config, Callable[[], None]], int]


class Worker:
    """One worker process, started as `python -m bbr.workers FD`.

    FD is one end of a socket pair: the supervisor writes the pickled (target, Config)
    and shuts its side for writing; the worker writes one byte back once it serves.
    End of file before that byte means the worker died first.
    """

    def __init__(self, index: int, handover: bytes) -> None:
        self.index = index
        self.handover = handover
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        self.ready.clear()
        ours, theirs = socket.socketpair()
        with theirs:
            fd = theirs.fileno()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bbr.workers", str(fd)], pass_fds=(fd,)
            )
        loop = asyncio.get_running_loop()
        said = await loop.run_in_executor(None, self._talk, ours)
        if said:
            self.ready.set()
            log.info("worker ready", extra=fields(worker=self.index, pid=self.process.pid))

    def _talk(self, link: socket.socket) -> bytes:
        with link:
            try:
                link.sendall(self.handover)
                link.shutdown(socket.SHUT_WR)
                return link.recv(1)
            except OSError:  # the worker is gone already
                return b""


def worker_main(argv: Sequence[str]) -> int:
    """A worker process: take the Config from the supervisor, then run the target."""
    link = socket.socket(fileno=int(argv[1]))
    chunks = []
    while chunk := link.recv(65536):
        chunks.append(chunk)
    target, config = pickle.loads(b"".join(chunks))  # from our own parent only
    logs.configure(config.log_level, config.log_format)

    def ready() -> None:
        link.sendall(b"1")
        link.close()

    try:
        code: int = target(config, ready)
    except StartupError as exc:
        return startup_failed(exc)
    return code


async def supervise(config: Config, target: Target) -> int:
    """Run `target` in config.workers processes until SIGTERM/SIGINT; the exit code."""
    check_ports(config)
    # Fail here, once, on a bad map. The supervisor keeps its own copy of the map for
    # GET /modelmap, and posts the Kubernetes Events (the workers do not).
    holder = MapHolder()
    sources = build_sources(config, holder, announce=False, events=True)
    if config.tracing:
        check_tracing()

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    health = Health()
    health_server = health.bind(config.grpc_health_port)
    metrics.start(config.metrics_port, registry, current=lambda: holder.current)
    for source in sources:
        source.start()
    await health.set_all(NOT_SERVING)
    await health_server.start()

    loop = asyncio.get_running_loop()
    # Each worker holds two blocking waits (its ready pipe, its exit).
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2 * config.workers + 4))
    stopping = asyncio.Event()
    on_stop_signals(loop, stopping.set)

    handover = pickle.dumps((target, config))
    workers = [Worker(i, handover) for i in range(config.workers)]

    async def keep(worker: Worker) -> None:
        while not stopping.is_set():
            started = time.monotonic()
            await worker.start()
            assert worker.process is not None
            code = await loop.run_in_executor(None, worker.process.wait)
            multiprocess.mark_process_dead(worker.process.pid)  # type: ignore[no-untyped-call]
            if stopping.is_set():
                return
            log.error("worker exited; restarting", extra=fields(worker=worker.index, code=code))
            if time.monotonic() - started < RESTART_DELAY:
                await asyncio.sleep(RESTART_DELAY)

    keepers = [asyncio.create_task(keep(w)) for w in workers]
    log.info("bbr supervisor starting", extra=fields(workers=config.workers))

    async def all_ready() -> None:
        for worker in workers:
            await worker.ready.wait()

    readiness = asyncio.create_task(all_ready())
    stop_wait = asyncio.create_task(stopping.wait())
    await asyncio.wait([readiness, stop_wait], return_when=asyncio.FIRST_COMPLETED)
    if not stopping.is_set():
        await health.set_all(SERVING)
        log.info("serving", extra=fields(grpc_port=config.grpc_port, workers=config.workers))
        await stopping.wait()
    readiness.cancel()

    log.info("draining", extra=fields(grace_seconds=config.drain_seconds))
    await health.set_all(NOT_SERVING)
    for worker in workers:
        if worker.process is not None and worker.process.poll() is None:
            worker.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + config.drain_seconds + 5
    for worker in workers:
        if worker.process is None:
            continue
        try:
            await loop.run_in_executor(
                None, worker.process.wait, max(0.1, deadline - time.monotonic())
            )
        except subprocess.TimeoutExpired:
            worker.process.kill()
    for task in keepers:
        task.cancel()
    await asyncio.gather(*keepers, return_exceptions=True)
    await health_server.stop(0)
    for source in sources:
        source.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv))
