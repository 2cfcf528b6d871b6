"""Start and stop the end-to-end stack: model servers, bbr and Envoy on ephemeral ports."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from demo.__main__ import read_model_map  # noqa: E402
from demo.envoy_config import render  # noqa: E402
from demo.model_server import ModelServer  # noqa: E402
from demo.processes import (  # noqa: E402
    Child,
    StartupError,
    bbr_argv,
    envoy_argv,
    envoy_binary,
    free_port,
    grpc_health_ready,
    http_ready,
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
        out = []
        for what, path in self.logs.items():
            with contextlib.suppress(OSError):
                text = path.read_text(encoding="utf-8", errors="replace").splitlines()
                out.append(f"--- {self.name} {what} ({path}), last {lines} lines:")
                out += text[-lines:]
        return "\n".join(out)

    def close(self) -> None:
        stop_all(self.children)
        for fh in self.files:
            fh.close()


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
    bbr_command = bbr_argv(
        model_map,
        grpc_port=stack.grpc_port,
        health_port=stack.health_port,
        metrics_port=stack.metrics_port,
        streaming=streaming,
        flags=bbr_flags,
    )
    try:
        bbr_log = stack.logs["bbr"].open("wb")
        stack.files.append(bbr_log)
        env = {**os.environ, **bbr_env} if bbr_env else None
        bbr = Child(
            f"bbr ({name})", bbr_command, cwd=REPO_ROOT, env=env, stdout=bbr_log, stderr=bbr_log
        )
        stack.children.append(bbr)
        envoy_log = stack.logs["envoy"].open("wb")
        stack.files.append(envoy_log)
        proxy = Child(
            f"envoy ({name})",
            envoy_argv(envoy_yaml, binary=envoy),
            cwd=workdir,
            stdout=envoy_log,
            stderr=envoy_log,
        )
        stack.children.append(proxy)
        wait_until(
            f"bbr ({name}) health",
            grpc_health_ready(stack.health_port),
            child=bbr,
            timeout=STARTUP_TIMEOUT,
        )
        wait_until(f"bbr ({name}) gRPC port", tcp_ready(stack.grpc_port), child=bbr)
        wait_until(
            f"envoy ({name})",
            http_ready(stack.admin_port, "/ready"),
            child=proxy,
            timeout=STARTUP_TIMEOUT,
        )
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
