"""Loopback stand-ins between bbr and the API server, for tests.

`CuttableProxy`: a TCP proxy that a test can cut ("the API server is unreachable"):
`cut()` closes every open connection and answers new ones by closing them at once;
`refuse_new()` only does the latter (a watch already open keeps flowing: the API server
is unreachable for any new request); `restore()` forwards again. TLS passes through
untouched. `attempts` are the times (monotonic) of the connections it refused while cut.

`ConnectProxy`: an HTTP proxy that tunnels (CONNECT), as corporate proxies do, maps
host names to loopback ports, may require Basic credentials, and records what it was
asked.

`FailingApi`: a plain-HTTP server answering every request with one error status (and
Retry-After), recording when each stream asked: for what a real API server will not do
on demand.
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class _Listener:
    """A loopback listener whose accept loop hands each connection to `_handle`."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        _close(self._listener)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._handle(client)

    def _handle(self, client: socket.socket) -> None:
        raise NotImplementedError


class CuttableProxy(_Listener):
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._cut = False
        self.attempts: list[float] = []
        super().__init__()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            sockets, self._open = self._open, set()
        for s in sockets:
            _close(s)

    def refuse_new(self) -> None:
        with self._lock:
            self._cut = True

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        super().close()
        self.cut()

    def _handle(self, client: socket.socket) -> None:
        with self._lock:
            if self._cut:
                self.attempts.append(time.monotonic())
                _close(client)
                return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
            upstream.settimeout(None)
        except OSError:
            _close(client)
            return
        with self._lock:
            self._open.update((client, upstream))
        _tunnel(client, upstream, self._forget)

    def _forget(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._open.difference_update(sockets)


class ConnectProxy(_Listener):
    """An HTTP CONNECT proxy on loopback. `hosts` maps a host name to the loopback port
    to tunnel to (a name bbr cannot resolve itself); `credentials` ("user:password")
    makes it answer 407 to a request without them. `asked` is every CONNECT target and
    its Proxy-Authorization header, in order."""

    def __init__(self, hosts: dict[str, int] | None = None, credentials: str | None = None):
        self.hosts = hosts or {}
        self.expected = (
            "Basic " + base64.b64encode(credentials.encode()).decode() if credentials else None
        )
        self.asked: list[tuple[str, str | None]] = []
        super().__init__()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _handle(self, client: socket.socket) -> None:
        threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 8192:
                chunk = client.recv(1)
                if not chunk:
                    raise OSError("closed")
                head += chunk
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            authorization = headers.get("Proxy-Authorization")
            self.asked.append((target, authorization))
            if method != "CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                raise OSError("not CONNECT")
            if self.expected is not None and authorization != self.expected:
                client.sendall(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b"Proxy-Authenticate: Basic\r\nContent-Length: 0\r\n\r\n"
                )
                raise OSError("no credentials")
            host, _, port = target.rpartition(":")
            upstream = socket.create_connection(
                ("127.0.0.1", self.hosts.get(host.strip("[]"), int(port))), timeout=5
            )
            upstream.settimeout(None)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        except (OSError, ValueError):
            _close(client)
            return
        _tunnel(client, upstream)


class FailingApi:
    """Answers every request with `status` (a Kubernetes Status body; Retry-After when
    `retry_after` is set). `asked` holds (monotonic time, label selector) per request."""

    def __init__(self, status: int, retry_after: str | None = None) -> None:
        owner = self
        self.status = status
        self.retry_after = retry_after
        self.asked: list[tuple[float, str]] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                query = parse_qs(urlsplit(self.path).query)
                owner.asked.append((time.monotonic(), query.get("labelSelector", [""])[0]))
                body = json.dumps(
                    {"kind": "Status", "status": "Failure", "code": owner.status,
                     "message": f"failing on purpose ({owner.status})"}
                ).encode()  # fmt: skip
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if owner.retry_after is not None:
                    self.send_header("Retry-After", owner.retry_after)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def by_stream(self) -> dict[str, list[float]]:
        streams: dict[str, list[float]] = {}
        for at, selector in self.asked:
            streams.setdefault(selector, []).append(at)
        return streams

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _tunnel(
    client: socket.socket,
    upstream: socket.socket,
    done: Callable[[socket.socket, socket.socket], None] | None = None,
) -> None:
    """Copy bytes both ways, a thread each; both ends close when either side ends."""
    for a, b in ((client, upstream), (upstream, client)):
        threading.Thread(target=_pump, args=(a, b, done), daemon=True).start()


def _pump(
    source: socket.socket,
    sink: socket.socket,
    done: Callable[[socket.socket, socket.socket], None] | None,
) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            _close(s)
        if done is not None:
            done(source, sink)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(OSError):
        s.close()
