"""OpenAI chat-completion bodies of a given size, and ext_proc messages that carry them.

The one place bench/ builds request bodies and the ext_proc stream Envoy sends for them
(as protobuf messages for a gRPC client, as ghz's JSON for ghz). The `model` key comes
after `messages`, as the OpenAI Python client serialises it, so a parser that stops at the
first `model` still has to cross the whole body.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

Headers = Sequence[tuple[str, str]]

SIZES: dict[str, int] = {"1KB": 1024, "100KB": 100 * 1024, "1MB": 1024 * 1024}


def sizes(text: str) -> list[str]:
    """The labels of SIZES a `--sizes` option names, in its order ("1KB,1MB")."""
    return [s.strip() for s in text.split(",") if s.strip()]


MODEL = "food-review-1"  # an adapter of meta-llama/Llama-3.1-8B-Instruct in config/model-map.yaml
BASE_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
_WORDS = (
    "the quick brown fox jumps over the lazy dog while a review of the food "
    'says "excellent" and the chef\'s notes mention temperature, seasoning and time. '
)


def chat_body(size: int, model: str = MODEL) -> bytes:
    """A chat-completion body of exactly `size` bytes (for sizes of 256 bytes and up)."""

    def render(text: str) -> bytes:
        doc = {
            "messages": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": text},
            ],
            "model": model,
            "max_tokens": 256,
            "temperature": 0.2,
            "stream": False,
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    empty = len(render(""))
    if size < empty:
        raise ValueError(f"body size {size} is below the {empty}-byte minimum")
    # json.dumps escapes the quotes in _WORDS, so grow the text until the size fits.
    text = (_WORDS * (size // len(_WORDS) + 2))[: size - empty]
    while len(body := render(text)) > size:
        text = text[: len(text) - (len(body) - size)]
    return body + b" " * (size - len(body))  # trailing whitespace is valid JSON


def request_headers(extra: Headers = ()) -> list[tuple[str, str]]:
    """The HTTP request headers of a chat completion, then `extra` (e.g. spoofed routing)."""
    return [
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":authority", "gateway"),
        (":scheme", "http"),
        ("content-type", "application/json"),
        ("user-agent", "OpenAI/Python 1.60.0"),
        ("x-request-id", "8f14e45f-ceea-467f-a0e6-b32a3b1c2f2e"),
        *extra,
    ]


def extproc_messages(body: bytes, headers: Headers | None = None) -> list[pb.ProcessingRequest]:
    """The ext_proc stream Envoy sends in BUFFERED mode: request headers, then the body.

    `headers`: the HTTP request's (default `request_headers()`).
    """
    values = [
        base_pb2.HeaderValue(key=k, raw_value=v.encode())
        for k, v in (request_headers() if headers is None else headers)
    ]
    return [
        pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=values))
        ),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)),
    ]


def ghz_messages(body: bytes, headers: Headers | None = None) -> list[dict[str, Any]]:
    """`extproc_messages` in ghz's JSON (bytes are base64): one array is one stream."""

    def b64(value: str | bytes) -> str:
        raw = value.encode() if isinstance(value, str) else value
        return base64.b64encode(raw).decode("ascii")

    pairs = request_headers() if headers is None else headers
    return [
        {
            "request_headers": {
                "headers": {"headers": [{"key": k, "raw_value": b64(v)} for k, v in pairs]},
                "end_of_stream": False,
            }
        },
        {"request_body": {"body": b64(body), "end_of_stream": True}},
    ]
