"""A simulated OpenAI-compatible model server for the demo and the tests.

    python -m harness.model_server --port 8001 --name pool-llama

Speaks enough of the OpenAI API for the official SDKs: chat completions and completions
(``stream=True`` as server-sent events), embeddings (floats or base64), responses
(streamed too), audio transcriptions and translations (multipart/form-data),
``GET /v1/models`` and ``GET /v1/models/{id}``. Any other POST path gets a chat-shaped
answer. Every answer says which server answered and which model was asked, and carries
an extra ``x_bbr_demo`` object (in each streamed event too) with the routing headers the
server received and the SHA-256 of the exact body bytes, so tests can prove where a
request went and that its body arrived unchanged. Any body is accepted: JSON, non-JSON,
multipart, chunked. ``GET /health`` answers 200.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import signal
import struct
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from harness.signals import StopSignals

BASE_HEADER = "x-gateway-base-model-name"
MODEL_HEADER = "x-gateway-model-name"


def _form_field(body: bytes, name: str) -> str | None:
    """A multipart/form-data field's text (for the demo only; bbr parses strictly)."""
    marker = f'name="{name}"'.encode()
    at = body.find(marker)
    if at < 0:
        return None
    start = body.find(b"\r\n\r\n", at)
    end = body.find(b"\r\n", start + 4) if start >= 0 else -1
    if start < 0 or end < 0:
        return None
    return body[start + 4 : end].decode("utf-8", "replace")


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        parsed: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _model_from_body(body: bytes, content_type: str) -> str | None:
    """Best-effort model name, for the demo text only (never used for routing)."""
    if "multipart/form-data" in content_type:
        return _form_field(body, "model")
    model = _json_body(body).get("model")
    return model if isinstance(model, str) else None


def _embedding(text: str, model: str | None, dimensions: int) -> list[float]:
    """A deterministic unit-length vector for `text` (same input, same vector)."""
    values: list[float] = []
    counter = 0
    while len(values) < dimensions:
        digest = hashlib.sha256(f"{model}\0{text}\0{counter}".encode()).digest()
        values.extend((b - 127.5) / 127.5 for b in digest)
        counter += 1
    vector = values[:dimensions]
    norm = sum(v * v for v in vector) ** 0.5 or 1.0
    return [round(v / norm, 6) for v in vector]


def _inputs(value: Any) -> list[str]:
    """The embedding inputs: a string, a list of strings, or token lists."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [json.dumps(value)]
    if isinstance(value, list):
        return [v if isinstance(v, str) else json.dumps(v) for v in value]
    return [json.dumps(value)]


def _usage(body_len: int) -> dict[str, int]:
    prompt = max(1, body_len // 4)
    return {"prompt_tokens": prompt, "completion_tokens": 12, "total_tokens": prompt + 12}


class ModelServerHandler(BaseHTTPRequestHandler):
    """Request handler; the server's name is read from ``self.server.name``."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are separate writes
    server_version = "bbr-demo-model-server/1"

    @property
    def _name(self) -> str:
        return str(getattr(self.server, "name", "model-server"))

    def log_message(self, format: str, *args: Any) -> None:
        if getattr(self.server, "quiet", False):
            return
        sys.stderr.write(f"[{self._name}] {self.address_string()} {format % args}\n")

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks: list[bytes] = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # Trailers (if any) end with an empty line.
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # the CRLF after each chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length", "0") or "0")
        return self.rfile.read(length) if length > 0 else b""

    def _send_json(self, status: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_text(self, status: int, text: str) -> None:
        data = text.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_events(self, events: list[tuple[str | None, dict[str, Any] | str]]) -> None:
        """Server-sent events, one chunk each (HTTP/1.1 chunked), as OpenAI streams."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for event, data in events:
            text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
            frame = (f"event: {event}\n" if event else "") + f"data: {text}\n\n"
            raw = frame.encode("utf-8")
            self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")

    def _model_list(self) -> list[dict[str, Any]]:
        served = getattr(self.server, "base_model", None) or self._name
        return [{"id": served, "object": "model", "created": 0, "owned_by": self._name}]

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/health":
            self._send_json(200, {"status": "ok", "server": self._name})
            return
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": self._model_list()})
            return
        if path.startswith("/v1/models/"):
            wanted = urllib.parse.unquote(path.removeprefix("/v1/models/"))
            for model in self._model_list():
                if model["id"] == wanted:
                    self._send_json(200, model)
                    return
        self._send_json(
            404,
            {
                "error": {
                    "message": f"[{self._name}] no such path: {self.path[:256]}",
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "not_found",
                }
            },
        )

    def do_POST(self) -> None:
        try:
            body = self._read_body()
        except (ValueError, OSError) as exc:
            self._send_json(400, {"error": {"message": f"bad request body: {exc}"}})
            return
        content_type = self.headers.get("Content-Type", "")
        request = {} if "multipart/form-data" in content_type else _json_body(body)
        model = _model_from_body(body, content_type)
        base_header = self.headers.get(BASE_HEADER)
        served = getattr(self.server, "base_model", None) or base_header or "an unknown model"
        path = self.path.split("?", 1)[0]
        reply = _Reply(
            server=self._name,
            model=model,
            text=f"[{self._name}] hello from {served} serving {model or '(no model)'}",
            demo={
                "server": self._name,
                "path": path,
                "base_model_header": base_header,
                "model_header": self.headers.get(MODEL_HEADER),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_bytes": len(body),
            },
            usage=_usage(len(body)),
        )
        stream = request.get("stream") is True
        if path.endswith(("/audio/transcriptions", "/audio/translations")):
            text = f"[{self._name}] transcribed by {served} for {model or '(no model)'}"
            response_format = _form_field(body, "response_format") or "json"
            if response_format in ("text", "srt", "vtt"):
                self._send_text(200, text)
                return
            answer: dict[str, Any] = {"text": text}
            if response_format == "verbose_json":
                answer.update(language="english", duration=1.0, segments=[])
            answer["x_bbr_demo"] = reply.demo
            self._send_json(200, answer)
        elif path.endswith("/embeddings"):
            self._send_json(200, reply.embeddings(request))
        elif path.endswith("/responses"):
            if stream:
                self._send_events(reply.response_events())
            else:
                self._send_json(200, reply.response())
        elif path.endswith("/completions") and not path.endswith("/chat/completions"):
            if stream:
                self._send_events(reply.completion_chunks(request))
            else:
                self._send_json(200, reply.completion())
        elif stream:
            self._send_events(reply.chat_chunks(request))
        else:
            self._send_json(200, reply.chat())


class _Reply:
    """The answers to one request, in each OpenAI shape."""

    def __init__(
        self,
        *,
        server: str,
        model: str | None,
        text: str,
        demo: dict[str, Any],
        usage: dict[str, int],
    ) -> None:
        self.model = model
        self.text = text
        self.demo = demo
        self.usage = usage
        self.created = int(time.time())
        self.id = uuid.uuid4().hex[:24]

    def _pieces(self) -> list[str]:
        words = self.text.split(" ")
        return [w if i == 0 else " " + w for i, w in enumerate(words)]

    def chat(self) -> dict[str, Any]:
        return {
            "id": f"chatcmpl-{self.id}",
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": self.text},
                    "finish_reason": "stop",
                }
            ],
            "usage": self.usage,
            "x_bbr_demo": self.demo,
        }

    def chat_chunks(self, request: dict[str, Any]) -> list[tuple[str | None, dict[str, Any] | str]]:
        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": f"chatcmpl-{self.id}",
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                "x_bbr_demo": self.demo,
            }

        events: list[tuple[str | None, dict[str, Any] | str]] = [
            (None, chunk({"role": "assistant", "content": ""}, None))
        ]
        events += [(None, chunk({"content": piece}, None)) for piece in self._pieces()]
        events.append((None, chunk({}, "stop")))
        if (request.get("stream_options") or {}).get("include_usage"):
            last = chunk({}, None)
            last.update(choices=[], usage=self.usage)
            events.append((None, last))
        events.append((None, "[DONE]"))
        return events

    def completion(self) -> dict[str, Any]:
        return {
            "id": f"cmpl-{self.id}",
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "text": self.text, "finish_reason": "stop", "logprobs": None}],
            "usage": self.usage,
            "x_bbr_demo": self.demo,
        }

    def completion_chunks(
        self, request: dict[str, Any]
    ) -> list[tuple[str | None, dict[str, Any] | str]]:
        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            return {
                "id": f"cmpl-{self.id}",
                "object": "text_completion",
                "created": self.created,
                "model": self.model,
                "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
                "x_bbr_demo": self.demo,
            }

        events: list[tuple[str | None, dict[str, Any] | str]] = [
            (None, chunk(piece, None)) for piece in self._pieces()
        ]
        events.append((None, chunk("", "stop")))
        events.append((None, "[DONE]"))
        return events

    def embeddings(self, request: dict[str, Any]) -> dict[str, Any]:
        dimensions = request.get("dimensions")
        if not isinstance(dimensions, int) or not 1 <= dimensions <= 4096:
            dimensions = 16
        as_base64 = request.get("encoding_format") == "base64"
        data: list[dict[str, Any]] = []
        for index, text in enumerate(_inputs(request.get("input", ""))):
            vector = _embedding(text, self.model, dimensions)
            packed: Any = vector
            if as_base64:  # what the SDKs ask for by default: little-endian float32
                packed = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": packed})
        tokens = self.usage["prompt_tokens"]
        return {
            "object": "list",
            "data": data,
            "model": self.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            "x_bbr_demo": self.demo,
        }

    def response(self, status: str = "completed", text: str | None = None) -> dict[str, Any]:
        content = self.text if text is None else text
        return {
            "id": f"resp_{self.id}",
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": self.model,
            "output": [
                {
                    "type": "message",
                    "id": f"msg_{self.id}",
                    "status": status,
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": content, "annotations": []}],
                }
            ]
            if content
            else [],
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": self.usage["prompt_tokens"],
                "output_tokens": self.usage["completion_tokens"],
                "total_tokens": self.usage["total_tokens"],
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0},
            },
            "x_bbr_demo": self.demo,
        }

    def response_events(self) -> list[tuple[str | None, dict[str, Any] | str]]:
        events: list[tuple[str | None, dict[str, Any] | str]] = []

        def add(kind: str, **fields: Any) -> None:
            events.append((kind, {"type": kind, "sequence_number": len(events), **fields}))

        add("response.created", response=self.response("in_progress", ""))
        for piece in self._pieces():
            add(
                "response.output_text.delta",
                item_id=f"msg_{self.id}",
                output_index=0,
                content_index=0,
                delta=piece,
                logprobs=[],
            )
        add(
            "response.output_text.done",
            item_id=f"msg_{self.id}",
            output_index=0,
            content_index=0,
            text=self.text,
            logprobs=[],
        )
        add("response.completed", response=self.response())
        return events


class ModelServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, host: str, port: int, name: str, *, base_model: str | None = None, quiet: bool = False
    ) -> None:
        super().__init__((host, port), ModelServerHandler)
        self.name = name
        self.base_model = base_model
        self.quiet = quiet

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that goes away mid-request is not worth a traceback.
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError | TimeoutError):
            return
        super().handle_error(request, client_address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", required=True, help="shown in every answer")
    parser.add_argument("--base-model", help="the base model this server plays (for the text)")
    parser.add_argument("--quiet", action="store_true", help="no access log")
    args = parser.parse_args(argv)
    try:
        server = ModelServer(
            args.host, args.port, args.name, base_model=args.base_model, quiet=args.quiet
        )
    except OSError as exc:
        print(
            f"model server {args.name}: cannot listen on port {args.port}: {exc}", file=sys.stderr
        )
        return 2

    # serve_forever runs in a thread; the main thread only waits for a stop signal
    # (a flag and a wakeup pipe: no lock and no raise inside a signal handler).
    stop = StopSignals((signal.SIGINT, signal.SIGTERM))
    print(f"model server {args.name} listening on {args.host}:{args.port}", file=sys.stderr)
    serving = threading.Thread(target=server.serve_forever, name="serve", daemon=True)
    serving.start()
    try:
        while not stop.wait(1.0) and serving.is_alive():
            pass
    finally:
        stop.ignore()
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
