"""What `bbr serve` runs with (`Config`), and the checks that stop a start early.

`bbr.cli` builds a Config from flags and environment; `bbr.server` (one process) and
`bbr.workers` (the supervisor of --workers N) take it. A Config pickles: the supervisor
hands it to each worker whole. Nothing here imports prometheus_client: the CLI sets
PROMETHEUS_MULTIPROC_DIR after importing this module and before metrics are imported.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import sys
from dataclasses import dataclass, field

from bbr import h2grpc
from bbr.decision import Options
from bbr.logs import fields

log = logging.getLogger("bbr")

EXIT_USAGE = 2  # a bad flag, file or port: one line on stderr and this exit code
DRAIN_SECONDS = 20.0
# How long a stream may hold part of a streamed body without a new message.
STREAM_IDLE_SECONDS = 60.0
# A gRPC message is the body plus the ext_proc envelope around it.
MESSAGE_OVERHEAD = 64 * 1024
FD_RESERVE = 64  # fds bbr opens after start: health and metrics ports, map files, the API


class StartupError(Exception):
    """bbr cannot start; the message is the one line the operator sees."""


def startup_failed(exc: StartupError) -> int:
    """Say why bbr did not start, the one way: one line on stderr; the exit code."""
    print(f"bbr: error: {exc}", file=sys.stderr)
    return EXIT_USAGE


@dataclass
class Config:
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
    # How a worker process of --workers N sets up its logs (the CLI does it for the rest).
    log_level: str = "info"
    log_format: str = "json"

    @property
    def max_message(self) -> int:
        """The largest gRPC message the ext_proc port takes."""
        return self.options.max_body_bytes + MESSAGE_OVERHEAD


# The listening ports' flags; each sets the Config field (and argparse dest) of its name.
PORT_FLAGS = ("--grpc-port", "--grpc-health-port", "--metrics-port")


def ports(settings: Config | object) -> tuple[tuple[int, str], ...]:
    """The three listening ports, each with its flag: of a Config, or of parsed flags."""
    return tuple((getattr(settings, flag[2:].replace("-", "_")), flag) for flag in PORT_FLAGS)


def check_port(port: int, flag: str) -> None:
    """Fail early, naming the port, when something else listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("0.0.0.0", port))
        except OSError as exc:
            reason = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise StartupError(f"{flag} {port}: port {port} is {reason}") from None


def check_ports(config: Config) -> None:
    for port, flag in ports(config):
        check_port(port, flag)


def check_tracing() -> None:
    """A bad OTEL_* value stops the start; the SDK is imported only with --tracing."""
    from bbr.tracing import TracingConfigError, check

    try:
        check()
    except TracingConfigError as exc:
        raise StartupError(str(exc)) from None


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
