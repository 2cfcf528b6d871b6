"""`--workers N`: N server processes sharing the gRPC port (SO_REUSEPORT).

Python runs one request at a time per process; several processes use several cores.
Each worker loads and watches the same map sources. This supervisor serves health
(SERVING once every worker is) and metrics (summed across workers through
prometheus_client's multiprocess mode), restarts a worker that dies, and on SIGTERM
passes the signal on and waits for the workers to drain.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry, multiprocess

from bbr.logs import fields
from bbr.modelmap import MapHolder
from bbr.server import (
    SERVICE_NAME,
    ServeConfig,
    _listen,
    _ports,
    build_sources,
    check_port,
    check_tracing,
    on_stop_signals,
    start_metrics,
)

log = logging.getLogger("bbr.workers")
READY_FD_ENV = "BBR_WORKER_READY_FD"
RESTART_DELAY = 1.0


class Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: subprocess.Popen[bytes] | None = None
        self.ready = asyncio.Event()

    async def start(self) -> None:
        self.ready.clear()
        read_fd, write_fd = os.pipe()
        env = {**os.environ, READY_FD_ENV: str(write_fd)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bbr", *sys.argv[1:]], env=env, pass_fds=(write_fd,)
        )
        os.close(write_fd)
        loop = asyncio.get_running_loop()
        said = await loop.run_in_executor(None, os.read, read_fd, 1)
        os.close(read_fd)
        if said:
            self.ready.set()
            log.info("worker ready", extra=fields(worker=self.index, pid=self.process.pid))


async def supervise(config: ServeConfig) -> int:
    for port, flag in _ports(config):
        check_port(port, flag)
    # Fail here, once, on a bad map. The supervisor keeps its own copy of the map for
    # GET /modelmap, and posts the Kubernetes Events (the workers do not).
    holder = MapHolder()
    sources = build_sources(config, holder, announce=False, events=True)
    if config.tracing:
        check_tracing()

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    health = HealthServicer()
    health_server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
    _listen(health_server, config.grpc_health_port, "--grpc-health-port")
    start_metrics(config.metrics_port, registry, current=lambda: holder.current)
    for source in sources:
        source.start()
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    await health_server.start()

    loop = asyncio.get_running_loop()
    # Each worker holds two blocking waits (its ready pipe, its exit).
    loop.set_default_executor(ThreadPoolExecutor(max_workers=2 * config.workers + 4))
    stopping = asyncio.Event()
    on_stop_signals(loop, stopping.set)

    workers = [Worker(i) for i in range(config.workers)]

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
        for service in ("", SERVICE_NAME):
            await health.set(service, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra=fields(grpc_port=config.grpc_port, workers=config.workers))
        await stopping.wait()
    readiness.cancel()

    log.info("draining", extra=fields(grace_seconds=config.drain_seconds))
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
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
