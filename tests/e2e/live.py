"""bbr and Envoy as separately stoppable processes, for the fault and TLS tests.

`harness.stack.start_stack` starts both together and stops both together; the fault
tests need to kill, signal and restart each on its own, keep ports across restarts, run
bbr as another user or with TLS, and read bbr's metrics and Envoy's stats. Everything
else (model servers, Envoy config, child processes) is the harness's.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from prometheus_client.parser import text_string_to_metric_families

from harness.envoy_config import BbrTLS, render
from harness.processes import (
    REPO_ROOT,
    Child,
    StartupError,
    bbr_argv,
    envoy_argv,
    free_port,
    http_ready,
    log_tails,
    wait_until,
)
from harness.stack import (
    LLAMA,
    BbrPorts,
    ModelServers,
    Reply,
    send,
    wait_bbr,
    wait_envoy,
)
from tests.support import clean_env

PATIENCE = 60.0
"""Seconds any wait may take: the machine is shared and busy; nothing here is a benchmark."""


def poll(what: str, predicate: Callable[[], bool], timeout: float = PATIENCE) -> None:
    """Wait until ``predicate()`` is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError, http.client.HTTPException):
            if predicate():
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.1)


def chat_body(model: str, size: int = 0) -> bytes:
    """A chat request naming ``model``; ``size`` pads the message to about that many bytes."""
    content = "hi" + " padding" * (size // 8)
    payload = {"model": model, "messages": [{"role": "user", "content": content}]}
    return json.dumps(payload).encode()


def assert_routes(live: Live, model_servers: ModelServers, known: Mapping[str, str]) -> None:
    """Every model in ``known`` (model → base model) reaches its base model's server."""
    for model, base in known.items():
        reply = live.chat(model)
        assert served_by(reply) == model_servers.name_of(base), f"{model}: {reply}"


def served_by(reply: Reply) -> str | None:
    """The name of the model server that answered (None: none did, e.g. an error).

    Also checks that the server got bbr's base-model header (so routing was bbr's).
    """
    if reply.status != 200:
        return None
    try:
        demo = reply.json().get("x_bbr_demo")
    except ValueError:
        return None
    if not isinstance(demo, dict) or not demo.get("base_model_header"):
        return None
    server = demo.get("server")
    return server if isinstance(server, str) else None


@dataclass
class Bbr:
    """One `bbr serve` child with its ports and log."""

    child: Child
    grpc_port: int
    health_port: int
    metrics_port: int
    log: Path
    log_file: IO[bytes]

    @property
    def pid(self) -> int:
        return self.child.pid

    def metrics(self) -> dict[str, float]:
        """Every sample, keyed ``name`` or ``name{label="value",...}`` (labels sorted)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.metrics_port, timeout=10)
        try:
            conn.request("GET", "/metrics")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
        return out

    def metric(self, key: str) -> float:
        return self.metrics().get(key, 0.0)

    def active_streams(self) -> float:
        return self.metric("bbr_active_streams")

    def wait_active(self, predicate: Callable[[float], bool], what: str) -> None:
        poll(f"bbr_active_streams {what}", lambda: predicate(self.active_streams()))

    def health(self) -> int:
        """grpc.health.v1 status of service "" (raises grpc.RpcError when unreachable)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5.0)
            return int(reply.status)

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log.read_text(encoding="utf-8", errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    records.append(record)
        return records


@dataclass
class Envoy:
    """One Envoy child in front of bbr."""

    child: Child
    port: int
    admin_port: int
    log: Path
    log_file: IO[bytes]

    def stats(self) -> dict[str, int]:
        """Envoy's counters and gauges (admin ``/stats``)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=10)
        try:
            conn.request("GET", "/stats")
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        out: dict[str, int] = {}
        for line in text.splitlines():
            name, _, value = line.partition(": ")
            with contextlib.suppress(ValueError):
                out[name] = int(value)
        return out

    def ext_proc_stat(self, name: str) -> int:
        return self.stats().get(f"http.bbr_demo.ext_proc.{name}", 0)


@dataclass
class Live:
    """bbr and Envoy on fixed ports, each stoppable and restartable on its own."""

    workdir: Path
    model_servers: ModelServers
    model_map: Path
    streaming: bool = False
    bbr_flags: list[str] = field(default_factory=list)
    bbr_prefix: list[str] = field(default_factory=list)
    """Put before ``python -m bbr`` (e.g. ``setpriv`` to run bbr as another user)."""
    bbr_tls: BbrTLS | None = None
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    grpc_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    metrics_port: int = field(default_factory=free_port)
    bbr: Bbr | None = None
    envoy: Envoy | None = None
    generation: int = 0

    # --- bbr ---

    def start_bbr(self, *, wait: bool = True) -> Bbr:
        self.generation += 1
        log = self.workdir / f"bbr-{self.generation}.log"
        log_file = log.open("wb")
        argv = [
            *self.bbr_prefix,
            *bbr_argv(
                self.model_map,
                grpc_port=self.grpc_port,
                health_port=self.health_port,
                metrics_port=self.metrics_port,
                streaming=self.streaming,
                flags=self.bbr_flags,
            ),
        ]
        child = Child("bbr", argv, cwd=REPO_ROOT, env=clean_env(), stdout=log_file, stderr=log_file)
        self.bbr = Bbr(child, self.grpc_port, self.health_port, self.metrics_port, log, log_file)
        if wait:
            try:
                wait_bbr(child, BbrPorts(self.grpc_port, self.health_port, self.metrics_port))
                wait_until("bbr metrics", http_ready(self.metrics_port, "/metrics"), child=child)
            except StartupError as exc:
                raise StartupError(f"{exc}\n{self.log_tails()}") from None
        return self.bbr

    # --- Envoy ---

    def start_envoy(self, *, wait: bool = True) -> Envoy:
        self.generation += 1
        config = self.workdir / f"envoy-{self.generation}.yaml"
        config.write_text(
            render(
                listen_port=self.port,
                admin_port=self.admin_port,
                bbr_port=self.grpc_port,
                routes=self.model_servers.routes,
                streaming=self.streaming,
                access_log=True,
                bbr_tls=self.bbr_tls,
            ),
            encoding="utf-8",
        )
        log = self.workdir / f"envoy-{self.generation}.log"
        log_file = log.open("wb")
        argv = envoy_argv(config, log_level="info")
        child = Child("envoy", argv, cwd=self.workdir, stdout=log_file, stderr=log_file)
        self.envoy = Envoy(child, self.port, self.admin_port, log, log_file)
        if wait:
            try:
                wait_envoy(child, self.admin_port)
            except StartupError as exc:
                raise StartupError(f"{exc}\n{self.log_tails()}") from None
        return self.envoy

    def start(self) -> Live:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self.start_bbr()
            self.start_envoy()
        except BaseException:
            self.close()
            raise
        return self

    # --- requests ---

    def send(self, body: bytes, headers: dict[str, str] | None = None, **kw: Any) -> Reply:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        return send(self.port, "POST", "/v1/chat/completions", body, hdrs, **kw)

    def chat(self, model: str, headers: dict[str, str] | None = None) -> Reply:
        return self.send(chat_body(model), headers)

    def wait_routing(self, model: str = LLAMA, base: str = LLAMA) -> None:
        """Until a request for ``model`` reaches ``base``'s server (Envoy up, bbr reachable)."""
        server = self.model_servers.name_of(base)
        poll(f"{model} routed to {base}", lambda: served_by(self.chat(model)) == server)

    # --- teardown ---

    def log_tails(self, lines: int = 40) -> str:
        return log_tails(((p.name, p) for p in sorted(self.workdir.glob("*.log"))), lines)

    def close(self) -> None:
        for part in (self.envoy, self.bbr):
            if part is not None:
                part.child.stop()
                part.log_file.close()


class HeldRequest:
    """An HTTP request whose body is sent in two steps, so it can be held mid-body.

    ``open()`` sends the headers and the first half of the body; ``finish()`` sends the
    rest and reads the answer; ``reset()`` aborts the connection with a TCP RST.
    """

    def __init__(self, port: int, body: bytes, *, chunked: bool = False) -> None:
        self.port = port
        self.body = body
        self.chunked = chunked
        self.sock: socket.socket | None = None

    def _frame(self, data: bytes) -> bytes:
        if not self.chunked or not data:
            return data
        return f"{len(data):x}\r\n".encode() + data + b"\r\n"

    def open(self) -> HeldRequest:
        length = (
            "Transfer-Encoding: chunked\r\n"
            if self.chunked
            else f"Content-Length: {len(self.body)}\r\n"
        )
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\n"
            f"Host: 127.0.0.1:{self.port}\r\n"
            "Content-Type: application/json\r\n"
            f"{length}\r\n"
        ).encode()
        self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=PATIENCE)
        self.sock.sendall(head + self._frame(self.body[: len(self.body) // 2]))
        return self

    def finish(self) -> Reply:
        assert self.sock is not None
        rest = self._frame(self.body[len(self.body) // 2 :])
        if self.chunked:
            rest += b"0\r\n\r\n"
        self.sock.sendall(rest)
        return self.answer()

    def answer(self) -> Reply:
        """Read the HTTP answer (what Envoy says, whether or not the body was finished)."""
        assert self.sock is not None
        response = http.client.HTTPResponse(self.sock)
        response.begin()
        data = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        self.close()
        return Reply(response.status, headers, data)

    def reset(self) -> None:
        """Abort: SO_LINGER 0 makes close() send a TCP RST instead of a FIN."""
        assert self.sock is not None
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
