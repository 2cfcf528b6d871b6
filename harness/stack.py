"""One bbr behind one Envoy in front of simulated model servers, on ephemeral ports."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from harness.envoy_config import render
from harness.model_server import ModelServer
from harness.modelmaps import read_model_map
from harness.processes import (
    REPO_ROOT,
    Child,
    StartupError,
    bbr_argv,
    envoy_argv,
    envoy_binary,
    free_port,
    free_ports,
    grpc_health_ready,
    http_ready,
    log_tails,
    stop_all,
    tcp_ready,
    wait_until,
)

MODEL_MAP = REPO_ROOT / "config" / "model-map.yaml"
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
DEEPSEEK = "deepseek/vllm-deepseek-r1"
STARTUP_TIMEOUT = 30.0


@dataclass
class Reply:
    """What an HTTP client saw: status, lower-cased headers, raw body."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.headers} {self.body[:600]!r}"


def routed(reply: Reply) -> dict[str, Any]:
    """The model server's report (``x_bbr_demo``), after checking that one answered 200."""
    if reply.status != 200:
        raise AssertionError(str(reply))
    report = reply.json().get("x_bbr_demo")
    if not isinstance(report, dict):
        raise AssertionError(str(reply))
    return report


def send(
    port: int,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
    *,
    chunked: bool = False,
    timeout: float = 20.0,
) -> Reply:
    """One request on a fresh connection to 127.0.0.1:port."""
    if isinstance(body, bytes) and len(body) > EARLY_ANSWER_BYTES and not chunked:
        return _send_reading(port, method, path, body, headers or {}, timeout)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = dict(headers or {})
        if chunked:
            hdrs["Transfer-Encoding"] = "chunked"
        conn.request(method, path, body=body, headers=hdrs, encode_chunked=chunked)
        response = conn.getresponse()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        conn.close()


# A body this large may be answered (413) before it is all sent, and the connection closed:
# the rest of it then meets a reset, which discards an answer not yet read. So it is sent
# from another thread while this one reads, as a browser or curl does.
EARLY_ANSWER_BYTES = 1024 * 1024


def _send_reading(
    port: int, method: str, path: str, body: bytes, headers: dict[str, str], timeout: float
) -> Reply:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    lines += [f"Content-Length: {len(body)}", "", ""]
    request = "\r\n".join(lines).encode("latin-1") + body

    def write() -> None:
        with contextlib.suppress(OSError):  # answered early and closed: the reader has it
            sock.sendall(request)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        data = response.read()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
    finally:
        sock.close()
        writer.join(timeout)


class ModelServers:
    """The two simulated model servers, run in-process on ephemeral ports."""

    def __init__(self, pools: dict[str, str]) -> None:
        self.servers: dict[str, ModelServer] = {}
        self.threads: list[threading.Thread] = []
        for base, name in pools.items():
            server = ModelServer("127.0.0.1", 0, name, base_model=base, quiet=True)
            self.servers[base] = server
            thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)

    @property
    def routes(self) -> dict[str, int]:
        return {base: int(s.server_address[1]) for base, s in self.servers.items()}

    def name_of(self, base: str) -> str:
        return self.servers[base].name

    def close(self) -> None:
        for server in self.servers.values():
            server.shutdown()
            server.server_close()


@dataclass(frozen=True)
class BbrPorts:
    """The three ports of one `bbr serve`."""

    grpc: int
    health: int
    metrics: int

    @classmethod
    def free(cls) -> BbrPorts:
        grpc, health, metrics = free_ports(3)
        return cls(grpc, health, metrics)


def spawn_bbr(
    name: str,
    model_map: Path,
    ports: BbrPorts,
    log: IO[Any],
    *,
    streaming: bool = False,
    flags: Sequence[str] = (),
    env: dict[str, str] | None = None,
) -> Child:
    """`bbr serve` named ``bbr (name)``, output to ``log``; see `wait_bbr`."""
    argv = bbr_argv(
        model_map,
        grpc_port=ports.grpc,
        health_port=ports.health,
        metrics_port=ports.metrics,
        streaming=streaming,
        flags=flags,
    )
    full_env = {**os.environ, **env} if env else None
    return Child(f"bbr ({name})", argv, cwd=REPO_ROOT, env=full_env, stdout=log, stderr=log)


def wait_bbr(bbr: Child, ports: BbrPorts, timeout: float = STARTUP_TIMEOUT) -> None:
    """Until bbr's health says SERVING and its gRPC port accepts connections."""
    wait_until(f"{bbr.name} health", grpc_health_ready(ports.health), child=bbr, timeout=timeout)
    wait_until(f"{bbr.name} gRPC port", tcp_ready(ports.grpc), child=bbr)


def spawn_envoy(
    name: str, config: Path, log: IO[Any], *, cwd: Path, binary: str | None = None
) -> Child:
    """Envoy named ``envoy (name)`` on the bootstrap file ``config``; see `wait_envoy`."""
    argv = envoy_argv(config, binary=binary)
    return Child(f"envoy ({name})", argv, cwd=cwd, stdout=log, stderr=log)


def wait_envoy(envoy: Child, admin_port: int, timeout: float = STARTUP_TIMEOUT) -> None:
    """Until Envoy's admin port answers /ready (its listeners are up)."""
    wait_until(envoy.name, http_ready(admin_port, "/ready"), child=envoy, timeout=timeout)


@dataclass
class Stack:
    """One bbr process and one Envoy in front of it."""

    name: str
    port: int
    admin_port: int
    grpc_port: int
    health_port: int
    metrics_port: int
    logs: dict[str, Path]
    children: list[Child] = field(default_factory=list)
    files: list[IO[Any]] = field(default_factory=list)

    def send(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        *,
        chunked: bool = False,
    ) -> Reply:
        return send(self.port, method, path, body, headers, chunked=chunked)

    def chat(self, model: Any, headers: dict[str, str] | None = None, **extra: Any) -> Reply:
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        return self.send("POST", "/v1/chat/completions", json.dumps(payload).encode(), hdrs)

    def log_tails(self, lines: int = 40) -> str:
        logs = [(f"{self.name} {what} ({path})", path) for what, path in self.logs.items()]
        return log_tails(logs, lines)

    def close(self) -> None:
        if self in RUNNING:
            RUNNING.remove(self)
        stop_all(self.children)
        for fh in self.files:
            fh.close()


RUNNING: list[Stack] = []
"""Stacks started by `start_stack` and not yet closed (a failed test shows their logs)."""


def start_stack(
    name: str,
    workdir: Path,
    model_servers: ModelServers,
    bbr_flags: list[str],
    *,
    streaming: bool = False,
    envoy_edit: Callable[[dict[str, Any]], None] | None = None,
    bbr_env: dict[str, str] | None = None,
) -> Stack:
    """Start bbr with ``bbr_flags`` and an Envoy in front; wait until both are ready.

    ``envoy_edit`` may change the rendered bootstrap (a dict) before Envoy reads it;
    ``bbr_env`` is added to bbr's environment.
    """
    envoy = envoy_binary()  # missing binary: fail loudly, it is a test dependency
    workdir.mkdir(parents=True, exist_ok=True)
    model_map = workdir / "model-map.yaml"
    shutil.copyfile(MODEL_MAP, model_map)
    stack = Stack(
        name=name,
        port=free_port(),
        admin_port=free_port(),
        grpc_port=free_port(),
        health_port=free_port(),
        metrics_port=free_port(),
        logs={"bbr": workdir / "bbr.log", "envoy": workdir / "envoy.log"},
    )
    envoy_yaml = workdir / "envoy.yaml"
    bootstrap = render(
        listen_port=stack.port,
        admin_port=stack.admin_port,
        bbr_port=stack.grpc_port,
        routes=model_servers.routes,
        streaming=streaming,
        access_log=True,
    )
    if envoy_edit is not None:
        edited = yaml.safe_load(bootstrap)
        envoy_edit(edited)
        bootstrap = yaml.safe_dump(edited, sort_keys=False, width=1000)
    envoy_yaml.write_text(bootstrap, encoding="utf-8")
    ports = BbrPorts(stack.grpc_port, stack.health_port, stack.metrics_port)
    try:
        bbr_log = stack.logs["bbr"].open("wb")
        stack.files.append(bbr_log)
        bbr = spawn_bbr(
            name, model_map, ports, bbr_log, streaming=streaming, flags=bbr_flags, env=bbr_env
        )
        stack.children.append(bbr)
        envoy_log = stack.logs["envoy"].open("wb")
        stack.files.append(envoy_log)
        proxy = spawn_envoy(name, envoy_yaml, envoy_log, cwd=workdir, binary=envoy)
        stack.children.append(proxy)
        wait_bbr(bbr, ports)
        wait_envoy(proxy, stack.admin_port)
        RUNNING.append(stack)
    except BaseException as exc:
        stack.close()
        if isinstance(exc, StartupError):
            raise StartupError(f"{exc}\n{stack.log_tails()}") from None
        raise
    return stack


def demo_pools() -> tuple[dict[str, str], dict[str, str]]:
    """The repo's model map as the demo reads it: base → pool name, model → base."""
    return read_model_map(MODEL_MAP)


def chunks_of(data: bytes, size: int, pause: float = 0.0) -> Iterator[bytes]:
    """``data`` in pieces of ``size`` bytes, sleeping ``pause`` seconds between them."""
    import time

    for start in range(0, len(data), size):
        if pause and start:
            time.sleep(pause)
        yield data[start : start + size]
