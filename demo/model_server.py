"""A simulated OpenAI-compatible model server for the demo and the end-to-end tests.

    python -m demo.model_server --port 8001 --name pool-llama

Answers ``POST /v1/chat/completions`` and ``POST /v1/completions`` (any other POST path
too) with an OpenAI-shaped response saying which server answered and which model was
asked. Every response carries an extra top-level ``x_bbr_demo`` object with the routing
headers the server received and the SHA-256 of the exact body bytes, so tests can prove
where a request went and that its body arrived unchanged. Any body is accepted: JSON,
non-JSON, multipart, chunked. ``GET /health`` answers 200.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import signal
import sys
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

BASE_HEADER = "x-gateway-base-model-name"
MODEL_HEADER = "x-gateway-model-name"


def _model_from_body(body: bytes, content_type: str) -> str | None:
    """Best-effort model name, for the demo text only (never used for routing)."""
    if "multipart/form-data" in content_type:
        marker = b'name="model"'
        at = body.find(marker)
        if at < 0:
            return None
        start = body.find(b"\r\n\r\n", at)
        end = body.find(b"\r\n", start + 4) if start >= 0 else -1
        if start < 0 or end < 0:
            return None
        return body[start + 4 : end].decode("utf-8", "replace")
    try:
        parsed: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("model"), str):
        return str(parsed["model"])
    return None


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

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] == "/health":
            self._send_json(200, {"status": "ok", "server": self._name})
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
        model = _model_from_body(body, content_type)
        base_header = self.headers.get(BASE_HEADER)
        model_header = self.headers.get(MODEL_HEADER)
        served = getattr(self.server, "base_model", None) or base_header or "an unknown model"
        text = f"[{self._name}] hello from {served} serving {model or '(no model)'}"
        path = self.path.split("?", 1)[0]
        created = int(time.time())
        response: dict[str, Any]
        if path.endswith("/completions") and not path.endswith("/chat/completions"):
            response = {
                "id": f"cmpl-{uuid.uuid4().hex[:24]}",
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
            }
        else:
            response = {
                "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
            }
        response["usage"] = _usage(len(body))
        response["x_bbr_demo"] = {
            "server": self._name,
            "path": path,
            "base_model_header": base_header,
            "model_header": model_header,
            "body_sha256": hashlib.sha256(body).hexdigest(),
            "body_bytes": len(body),
        }
        self._send_json(200, response)


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

    def _stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    print(f"model server {args.name} listening on {args.host}:{args.port}", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
