"""End to end: real HTTP requests through a real Envoy, with bbr as its ext_proc filter.

Each test asserts what a client of the gateway would see: which model server answered,
the routing headers that server received, the body bytes it received, or the error
Envoy returned on bbr's behalf.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from harness.stack import DEEPSEEK, LLAMA, ModelServers, Reply, Stack, chunks_of, demo_pools, routed

pytestmark = pytest.mark.e2e

BASE_HEADER = "x-gateway-base-model-name"
MODEL_HEADER = "x-gateway-model-name"


def error(reply: Reply, status: int, code: str | None) -> dict[str, Any]:
    """The OpenAI-shaped error, after checking status, code and content type."""
    assert reply.status == status, str(reply)
    assert reply.headers.get("content-type", "").startswith("application/json"), str(reply)
    err = reply.json()["error"]
    assert isinstance(err["message"], str) and err["message"], str(reply)
    if code is not None:
        assert err["code"] == code, str(reply)
        assert err["type"] == "invalid_request_error", str(reply)
    return dict(err)


def big_body(model: str, size: int, *, model_last: bool = False) -> bytes:
    """A chat request of about ``size`` bytes (UTF-8), with non-ASCII text and escapes."""
    unit = 'Ünïcödé ✓ "quoted" \\ slash\n'
    unit_bytes = len(json.dumps(unit, ensure_ascii=False).encode("utf-8")) - 2
    messages = [{"role": "user", "content": unit * max(1, size // unit_bytes)}]
    payload: dict[str, Any] = {"model": model, "messages": messages}
    if model_last:
        payload = {"messages": messages, "model": model}
    return json.dumps(payload, ensure_ascii=False).encode("utf-8")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- routing ---------------------------------------------------------------------------


@pytest.mark.parametrize("base", [LLAMA, DEEPSEEK])
def test_base_model_routes_to_its_server(
    buffered: Stack, model_servers: ModelServers, base: str
) -> None:
    reply = buffered.chat(base)
    demo = routed(reply)
    assert demo["server"] == model_servers.name_of(base)
    assert demo["base_model_header"] == base
    assert demo["model_header"] == base
    assert base in reply.json()["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("adapter", "base"),
    [("food-review-1", LLAMA), ("movie-critique", LLAMA), ("ski-resorts", DEEPSEEK)],
)
def test_adapter_routes_to_its_base_model_server(
    buffered: Stack, model_servers: ModelServers, adapter: str, base: str
) -> None:
    demo = routed(buffered.chat(adapter))
    assert demo["server"] == model_servers.name_of(base)
    assert demo["base_model_header"] == base
    assert demo["model_header"] == adapter


def test_completions_endpoint_routes_too(buffered: Stack, model_servers: ModelServers) -> None:
    body = json.dumps({"model": "ski-resorts", "prompt": "Best slopes?"}).encode()
    reply = buffered.send("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    demo = routed(reply)
    assert demo["server"] == model_servers.name_of(DEEPSEEK)
    assert demo["path"] == "/v1/completions"
    assert reply.json()["object"] == "text_completion"


def test_json_content_type_absent_still_routes(
    buffered: Stack, model_servers: ModelServers
) -> None:
    body = json.dumps({"model": "food-review-1", "messages": []}).encode()
    demo = routed(buffered.send("POST", "/v1/chat/completions", body))
    assert demo["server"] == model_servers.name_of(LLAMA)


# --- anti-spoofing ---------------------------------------------------------------------


def test_spoofed_base_header_is_replaced(buffered: Stack, model_servers: ModelServers) -> None:
    reply = buffered.chat(
        "food-review-1", headers={BASE_HEADER: DEEPSEEK, MODEL_HEADER: "ski-resorts"}
    )
    demo = routed(reply)
    assert demo["server"] == model_servers.name_of(LLAMA)
    assert demo["base_model_header"] == LLAMA
    assert demo["model_header"] == "food-review-1"


def test_spoofed_header_with_unknown_model_gets_no_route(buffered: Stack) -> None:
    # --unknown-model pass: bbr removes the client's base-model header and sets none,
    # so only Envoy's catch-all route matches.
    reply = buffered.chat("no-such-model", headers={BASE_HEADER: DEEPSEEK})
    err = error(reply, 404, None)
    assert err["message"] == "no route for this model"


def test_unknown_model_without_spoofing_gets_no_route(buffered: Stack) -> None:
    err = error(buffered.chat("no-such-model"), 404, None)
    assert err["message"] == "no route for this model"


def test_spoofed_header_on_request_without_body_is_removed(buffered: Stack) -> None:
    reply = buffered.send("GET", "/v1/chat/completions", headers={BASE_HEADER: DEEPSEEK})
    err = error(reply, 404, None)
    assert err["message"] == "no route for this model"


def test_unknown_model_rejected(strict: Stack) -> None:
    reply = strict.chat("no-such-model", headers={BASE_HEADER: DEEPSEEK})
    err = error(reply, 404, "model_not_found")
    assert err["param"] == "model"


def test_known_model_still_routes_when_rejecting_unknown(
    strict: Stack, model_servers: ModelServers
) -> None:
    demo = routed(strict.chat("movie-critique"))
    assert demo["server"] == model_servers.name_of(LLAMA)


# --- errors ----------------------------------------------------------------------------


def test_invalid_json_is_400(buffered: Stack) -> None:
    reply = buffered.send(
        "POST",
        "/v1/chat/completions",
        b'{"model": "food-review-1", ',
        {"Content-Type": "application/json"},
    )
    err = error(reply, 400, "invalid_json")
    assert err["param"] is None


@pytest.mark.parametrize("model", [None, "", 42])
def test_invalid_model_is_400(buffered: Stack, model: Any) -> None:
    err = error(buffered.chat(model), 400, "invalid_model")
    assert err["param"] == "model"


def test_body_over_limit_is_413(strict: Stack) -> None:
    body = big_body("food-review-1", 100 * 1024)
    assert len(body) > 65536
    reply = strict.send("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    err = error(reply, 413, "request_too_large")
    assert err["param"] is None


def test_body_under_limit_routes(strict: Stack, model_servers: ModelServers) -> None:
    body = big_body("ski-resorts", 60 * 1024)
    assert len(body) < 65536
    reply = strict.send("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert routed(reply)["server"] == model_servers.name_of(DEEPSEEK)


# --- the body is untouched -------------------------------------------------------------


def test_large_body_arrives_byte_for_byte(buffered: Stack, model_servers: ModelServers) -> None:
    body = big_body("food-review-1", 300 * 1024, model_last=True)
    reply = buffered.send(
        "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    demo = routed(reply)
    assert demo["server"] == model_servers.name_of(LLAMA)
    assert demo["body_bytes"] == len(body)
    assert demo["body_sha256"] == sha256(body)


def test_gzip_body_routes_on_decompressed_model(
    buffered: Stack, model_servers: ModelServers
) -> None:
    body = gzip.compress(big_body("ski-resorts", 4096))
    reply = buffered.send(
        "POST",
        "/v1/chat/completions",
        body,
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
    )
    demo = routed(reply)
    assert demo["server"] == model_servers.name_of(DEEPSEEK)
    assert demo["model_header"] == "ski-resorts"
    assert demo["body_sha256"] == sha256(body)


def test_multipart_model_field_routes(buffered: Stack, model_servers: ModelServers) -> None:
    boundary = "bbr-e2e-boundary"
    body = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="model"\r\n\r\n'
            "movie-critique\r\n"
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
            "Content-Type: audio/wav\r\n\r\n"
        ).encode()
        + bytes(range(256)) * 8
        + f"\r\n--{boundary}--\r\n".encode()
    )
    reply = buffered.send(
        "POST",
        "/v1/audio/transcriptions",
        body,
        {"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    demo = routed(reply)
    assert demo["server"] == model_servers.name_of(LLAMA)
    assert demo["model_header"] == "movie-critique"
    assert demo["body_sha256"] == sha256(body)


# --- /v1/models ------------------------------------------------------------------------


def test_models_endpoint_lists_every_model(buffered: Stack) -> None:
    _, models = demo_pools()
    assert len(models) == 5
    reply = buffered.send("GET", "/v1/models")
    assert reply.status == 200, str(reply)
    assert reply.headers.get("content-type", "").startswith("application/json")
    listing = reply.json()
    assert listing["object"] == "list"
    assert all(entry["object"] == "model" for entry in listing["data"])
    assert sorted(entry["id"] for entry in listing["data"]) == sorted(models)


# --- streaming (FULL_DUPLEX_STREAMED) --------------------------------------------------


@pytest.mark.parametrize("model_last", [False, True], ids=["model-first", "model-last"])
def test_streaming_chunked_body_routes_and_arrives_unchanged(
    streaming: Stack, model_servers: ModelServers, model_last: bool
) -> None:
    body = big_body("ski-resorts", 24 * 1024, model_last=model_last)
    reply = streaming.send(
        "POST",
        "/v1/chat/completions",
        chunks_of(body, 512, pause=0.002),
        {"Content-Type": "application/json", BASE_HEADER: LLAMA},
        chunked=True,
    )
    demo = routed(reply)
    assert demo["server"] == model_servers.name_of(DEEPSEEK)
    assert demo["base_model_header"] == DEEPSEEK
    assert demo["model_header"] == "ski-resorts"
    assert demo["body_bytes"] == len(body)
    assert demo["body_sha256"] == sha256(body)


def test_streaming_large_body_arrives_unchanged(
    streaming: Stack, model_servers: ModelServers
) -> None:
    body = big_body("food-review-1", 300 * 1024, model_last=True)
    reply = streaming.send(
        "POST",
        "/v1/chat/completions",
        chunks_of(body, 16 * 1024),
        {"Content-Type": "application/json"},
        chunked=True,
    )
    demo = routed(reply)
    assert demo["server"] == model_servers.name_of(LLAMA)
    assert demo["body_sha256"] == sha256(body)


def test_streaming_content_length_body_routes(
    streaming: Stack, model_servers: ModelServers
) -> None:
    demo = routed(streaming.chat("movie-critique"))
    assert demo["server"] == model_servers.name_of(LLAMA)
    assert demo["model_header"] == "movie-critique"


def test_streaming_invalid_json_is_400(streaming: Stack) -> None:
    body = b'{"model": "food-review-1", "messages": [' + b"1," * 2000
    reply = streaming.send(
        "POST",
        "/v1/chat/completions",
        chunks_of(body, 256, pause=0.002),
        {"Content-Type": "application/json"},
        chunked=True,
    )
    error(reply, 400, "invalid_json")


def test_streaming_no_body_spoof_removed(streaming: Stack) -> None:
    reply = streaming.send("GET", "/v1/chat/completions", headers={BASE_HEADER: LLAMA})
    error(reply, 404, None)


def test_body_over_grpc_default_limit_routes(buffered: Stack, model_servers: ModelServers) -> None:
    # Buffered mode sends the whole body in one gRPC message: it must not be capped at
    # gRPC's 4 MiB default (bbr's default limit is 16 MiB).
    body = big_body("movie-critique", 5 * 1024 * 1024, model_last=True)
    assert len(body) > 4 * 1024 * 1024
    reply = buffered.send(
        "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    demo = routed(reply)
    assert demo["server"] == model_servers.name_of(LLAMA)
    assert demo["body_sha256"] == sha256(body)


@pytest.mark.parametrize("mode", ["buffered", "streaming"])
def test_bodies_near_the_limit_at_once_all_route(
    request: pytest.FixtureRequest, mode: str, model_servers: ModelServers
) -> None:
    """Envoy multiplexes them on its connection to bbr. Buffered: 6 x 15 MiB is more than
    bbr's default per-connection budget (64 MiB) admits at once, so some wait their turn.
    Streamed: bbr holds each body until its end, 4 x 15 MiB fit the budget. None may be
    refused, stall or arrive changed."""
    count = 6 if mode == "buffered" else 4
    stack: Stack = request.getfixturevalue(mode)
    body = big_body("movie-critique", 15 * 1024 * 1024, model_last=True)

    def one(_: int) -> Reply:
        if mode == "streaming":
            return stack.send(
                "POST",
                "/v1/chat/completions",
                chunks_of(body, 1024 * 1024),
                {"Content-Type": "application/json"},
                chunked=True,
            )
        return stack.send(
            "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
        )

    with ThreadPoolExecutor(count) as pool:
        replies = list(pool.map(one, range(count)))
    for reply in replies:
        demo = routed(reply)
        assert demo["server"] == model_servers.name_of(LLAMA)
        assert demo["body_sha256"] == sha256(body)


# --- an empty body is no body, however it is framed ------------------------------------


@pytest.mark.parametrize("framing", ["content-length", "chunked", "http2"])
@pytest.mark.parametrize("mode", ["buffered", "streaming"])
def test_empty_body_passes_and_loses_spoofed_headers(
    request: pytest.FixtureRequest, mode: str, framing: str
) -> None:
    """Same request, same answer: an empty body passes (no routing headers, so Envoy's
    catch-all answers 404 no_route) instead of a 400 when it comes chunked or as an
    empty HTTP/2 DATA frame. A spoofed base-model header surviving would reach a pool."""
    stack: Stack = request.getfixturevalue(mode)
    headers = {"Content-Type": "application/json", BASE_HEADER: LLAMA, MODEL_HEADER: "x"}
    if framing == "http2":
        import httpx

        with httpx.Client(http1=False, http2=True, timeout=20, trust_env=False) as client:
            response = client.post(
                f"http://127.0.0.1:{stack.port}/v1/chat/completions", content=b"", headers=headers
            )
        assert response.http_version == "HTTP/2"
        reply = Reply(response.status_code, dict(response.headers), response.content)
    elif framing == "chunked":
        reply = stack.send("POST", "/v1/chat/completions", iter([]), headers, chunked=True)
    else:
        reply = stack.send("POST", "/v1/chat/completions", b"", headers)
    error(reply, 404, "no_route")
