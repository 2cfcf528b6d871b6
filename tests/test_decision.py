"""The decision function alone: SPEC §4, row by row."""

from __future__ import annotations

import gzip
import json
import zlib

import msgspec
import pytest

from bbr.decision import Label, Options, Outcome, decide_request
from bbr.modelmap import ModelMap, parse_file_text

MAP_YAML = """
apiVersion: v1
kind: ConfigMap
metadata: {name: llama}
data:
  baseModel: meta-llama/Llama-3.1-8B-Instruct
  adapters: |
    - food-review-1
    - movie-critique
---
apiVersion: v1
kind: ConfigMap
metadata: {name: deepseek}
data:
  baseModel: deepseek/vllm-deepseek-r1
"""
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
SNAPSHOT = ModelMap(parse_file_text(MAP_YAML, path="map.yaml").configs)
PASS = Options()
REJECT = Options(unknown_model="reject")
POST = {":method": "POST", ":path": "/v1/chat/completions"}
JSON = {**POST, "content-type": "application/json"}


def decide(
    body: bytes | None, headers: dict[str, str] | None = None, options: Options = PASS
) -> Outcome:
    return decide_request(JSON if headers is None else headers, body, SNAPSHOT, options)


def error_of(outcome: Outcome) -> dict[str, object]:
    payload = json.loads(outcome.body)
    assert set(payload) == {"error"}
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    return dict(error)


def chat(model: object, **extra: object) -> bytes:
    return json.dumps(
        {"messages": [{"role": "user", "content": "hi"}], "model": model, **extra}
    ).encode()


# (id, body, headers, label, status, code, model, base)
ROWS = [
    ("base model", chat(LLAMA), None, Label.ROUTED, 0, None, LLAMA, LLAMA),
    ("adapter", chat("food-review-1"), None, Label.ROUTED, 0, None, "food-review-1", LLAMA),
    (
        "second base",
        chat("deepseek/vllm-deepseek-r1"),
        None,
        Label.ROUTED,
        0,
        None,
        "deepseek/vllm-deepseek-r1",
        "deepseek/vllm-deepseek-r1",
    ),
    ("unknown passes", chat("gpt-x"), None, Label.UNKNOWN_MODEL, 0, None, "gpt-x", None),
    ("no model", b'{"messages": []}', None, Label.NO_MODEL, 0, None, None, None),
    ("no body", None, POST, Label.PASSTHROUGH, 0, None, None, None),
    (
        "no content type is JSON",
        chat("food-review-1"),
        POST,
        Label.ROUTED,
        0,
        None,
        "food-review-1",
        LLAMA,
    ),
    (
        "json with charset",
        chat("food-review-1"),
        {**POST, "content-type": "Application/JSON; charset=utf-8"},
        Label.ROUTED,
        0,
        None,
        "food-review-1",
        LLAMA,
    ),
    (
        "+json suffix",
        chat("food-review-1"),
        {**POST, "content-type": "application/vnd.x+json"},
        Label.ROUTED,
        0,
        None,
        "food-review-1",
        LLAMA,
    ),
    (
        "other content type untouched",
        b"model=food-review-1",
        {**POST, "content-type": "text/plain"},
        Label.PASSTHROUGH,
        0,
        None,
        None,
        None,
    ),
    (
        "other content type, bad bytes",
        b"\xff\xfe",
        {**POST, "content-type": "application/octet-stream"},
        Label.PASSTHROUGH,
        0,
        None,
        None,
        None,
    ),
    (
        "unknown encoding untouched",
        b"\x00garbage",
        {**JSON, "content-encoding": "br"},
        Label.PASSTHROUGH,
        0,
        None,
        None,
        None,
    ),
    (
        "escapes honoured",
        b'{"model": "\\u0066ood-review-1"}',
        None,
        Label.ROUTED,
        0,
        None,
        "food-review-1",
        LLAMA,
    ),
    (
        "escaped key",
        b'{"\\u006dodel": "food-review-1"}',
        None,
        Label.ROUTED,
        0,
        None,
        "food-review-1",
        LLAMA,
    ),
    (
        "never trimmed",
        chat(" food-review-1"),
        None,
        Label.UNKNOWN_MODEL,
        0,
        None,
        " food-review-1",
        None,
    ),
    (
        "case-sensitive",
        chat("Food-Review-1"),
        None,
        Label.UNKNOWN_MODEL,
        0,
        None,
        "Food-Review-1",
        None,
    ),
    (
        "nested model ignored",
        b'{"x": {"model": "deepseek/vllm-deepseek-r1"}, "model": "food-review-1"}',
        None,
        Label.ROUTED,
        0,
        None,
        "food-review-1",
        LLAMA,
    ),
    (
        "nested duplicate is fine",
        b'{"x": {"model": 1, "model": 2}, "model": "food-review-1"}',
        None,
        Label.ROUTED,
        0,
        None,
        "food-review-1",
        LLAMA,
    ),
    (
        "model string elsewhere",
        b'{"messages": [{"role": "model"}], "model": "food-review-1"}',
        None,
        Label.ROUTED,
        0,
        None,
        "food-review-1",
        LLAMA,
    ),
    ("model null", chat(None), None, Label.INVALID, 400, "invalid_model", None, None),
    ("model empty", chat(""), None, Label.INVALID, 400, "invalid_model", None, None),
    ("model number", chat(7), None, Label.INVALID, 400, "invalid_model", None, None),
    (
        "model huge number",
        b'{"model": 1e999}',
        None,
        Label.INVALID,
        400,
        "invalid_model",
        None,
        None,
    ),
    (
        "model object",
        chat({"name": "food-review-1"}),
        None,
        Label.INVALID,
        400,
        "invalid_model",
        None,
        None,
    ),
    ("model list", chat(["food-review-1"]), None, Label.INVALID, 400, "invalid_model", None, None),
    (
        "model with newline",
        chat("food\nreview"),
        None,
        Label.INVALID,
        400,
        "invalid_model",
        None,
        None,
    ),
    ("model with tab", chat("food\treview"), None, Label.INVALID, 400, "invalid_model", None, None),
    ("model with NUL", chat("food\x00"), None, Label.INVALID, 400, "invalid_model", None, None),
    ("model with DEL", chat("food\x7f"), None, Label.INVALID, 400, "invalid_model", None, None),
    (
        "model over 256 bytes",
        chat("m" * 257),
        None,
        Label.INVALID,
        400,
        "invalid_model",
        None,
        None,
    ),
    (
        "model 256 bytes is fine",
        chat("m" * 256),
        None,
        Label.UNKNOWN_MODEL,
        0,
        None,
        "m" * 256,
        None,
    ),
    (
        "model 256 bytes multibyte",
        chat("é" * 129),
        None,
        Label.INVALID,
        400,
        "invalid_model",
        None,
        None,
    ),
    ("not JSON", b"model: food-review-1", None, Label.INVALID, 400, "invalid_json", None, None),
    ("empty body is no body", b"", None, Label.PASSTHROUGH, 0, None, None, None),
    (
        "array",
        b'[{"model": "food-review-1"}]',
        None,
        Label.INVALID,
        400,
        "invalid_json",
        None,
        None,
    ),
    ("string", b'"food-review-1"', None, Label.INVALID, 400, "invalid_json", None, None),
    (
        "truncated",
        b'{"model": "food-review-1"',
        None,
        Label.INVALID,
        400,
        "invalid_json",
        None,
        None,
    ),
    (
        "trailing garbage",
        b'{"model": "food-review-1"} x',
        None,
        Label.INVALID,
        400,
        "invalid_json",
        None,
        None,
    ),
    (
        "NaN",
        b'{"model": "food-review-1", "t": NaN}',
        None,
        Label.INVALID,
        400,
        "invalid_json",
        None,
        None,
    ),
    (
        "duplicate model",
        b'{"model": "food-review-1", "model": "deepseek/vllm-deepseek-r1"}',
        None,
        Label.INVALID,
        400,
        "invalid_json",
        None,
        None,
    ),
    (
        "duplicate via escape",
        b'{"model": "a", "m\\u006fdel": "b"}',
        None,
        Label.INVALID,
        400,
        "invalid_json",
        None,
        None,
    ),
    (
        "duplicate, spaced",
        b'{"model" : "a" ,\n "model"\t: "a"}',
        None,
        Label.INVALID,
        400,
        "invalid_json",
        None,
        None,
    ),
    (
        "invalid UTF-8 elsewhere",
        b'{"model": "food-review-1", "x": "\xff"}',
        None,
        Label.INVALID,
        400,
        "invalid_json",
        None,
        None,
    ),
    (
        "overlong UTF-8",
        b'{"model": "food-review-1", "x": "\xc0\xaf"}',
        None,
        Label.INVALID,
        400,
        "invalid_json",
        None,
        None,
    ),
    (
        "lone high surrogate",
        b'{"model": "food-review-1", "x": "\\ud800"}',
        None,
        Label.INVALID,
        400,
        "invalid_json",
        None,
        None,
    ),
    (
        "lone low surrogate",
        b'{"x": "\\udc00", "model": "food-review-1"}',
        None,
        Label.INVALID,
        400,
        "invalid_json",
        None,
        None,
    ),
    (
        "surrogate in key",
        b'{"\\ud800": 1, "model": "food-review-1"}',
        None,
        Label.INVALID,
        400,
        "invalid_json",
        None,
        None,
    ),
    (
        "surrogate pair is fine",
        b'{"x": "\\ud83d\\ude00", "model": "food-review-1"}',
        None,
        Label.ROUTED,
        0,
        None,
        "food-review-1",
        LLAMA,
    ),
    (
        "raw UTF-8 is fine",
        '{"x": "héllo 😀", "model": "food-review-1"}'.encode(),
        None,
        Label.ROUTED,
        0,
        None,
        "food-review-1",
        LLAMA,
    ),
    (
        "deep nesting",
        b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "model": "food-review-1"}',
        None,
        Label.INVALID,
        400,
        "invalid_json",
        None,
        None,
    ),
    (
        "huge number",
        b'{"x": 1' + b"0" * 100_000 + b', "model": "food-review-1"}',
        None,
        Label.ROUTED,
        0,
        None,
        "food-review-1",
        LLAMA,
    ),
]


@pytest.mark.parametrize(
    ("body", "headers", "label", "status", "code", "model", "base"),
    [row[1:] for row in ROWS],
    ids=[row[0] for row in ROWS],
)
def test_row(body, headers, label, status, code, model, base) -> None:
    outcome = decide(body, headers)
    assert outcome.label is label
    assert outcome.status == status
    assert outcome.code == code
    if status:
        error = error_of(outcome)
        assert error["code"] == code
        assert error["param"] == ("model" if code == "invalid_model" else None)
    else:
        assert (outcome.model, outcome.base_model) == (model, base)


def test_unknown_model_rejected_with_404() -> None:
    outcome = decide(chat("gpt-x"), options=REJECT)
    assert (outcome.status, outcome.label, outcome.model) == (404, Label.UNKNOWN_MODEL, "gpt-x")
    error = error_of(outcome)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-x" in str(error["message"])


def test_known_model_routes_under_reject() -> None:
    assert decide(chat("food-review-1"), options=REJECT).base_model == LLAMA


def test_error_messages_echo_at_most_256_bytes_of_input() -> None:
    secret = "S" * 5000
    for body in (
        chat(secret),
        chat("x" * 300 + secret),
        b'{"model": "' + secret.encode() + b'" garbage',
    ):
        for options in (PASS, REJECT):
            outcome = decide(body, options=options)
            assert outcome.status
            assert "S" * 257 not in error_of(outcome)["message"]


def test_too_large() -> None:
    small = Options(max_body_bytes=1000)
    outcome = decide(chat("food-review-1", pad="x" * 1000), options=small)
    assert (outcome.status, outcome.label, error_of(outcome)["code"]) == (
        413,
        Label.TOO_LARGE,
        "request_too_large",
    )
    assert decide(chat("food-review-1"), options=small).label is Label.ROUTED


def test_size_limit_ignores_bodies_bbr_does_not_read() -> None:
    small = Options(max_body_bytes=10)
    outcome = decide(b"x" * 100, {**POST, "content-type": "audio/wav"}, small)
    assert outcome.label is Label.PASSTHROUGH


@pytest.mark.parametrize("encoding", ["gzip", "GZIP", "deflate", " Deflate "])
def test_compressed_bodies_are_read(encoding: str) -> None:
    raw = chat("food-review-1")
    packed = gzip.compress(raw) if "gzip" in encoding.lower() else zlib.compress(raw)
    outcome = decide(packed, {**JSON, "content-encoding": encoding})
    assert (outcome.label, outcome.base_model) == (Label.ROUTED, LLAMA)


def test_multi_member_gzip() -> None:
    raw = chat("food-review-1")
    packed = gzip.compress(raw[:10]) + gzip.compress(raw[10:])
    assert decide(packed, {**JSON, "content-encoding": "gzip"}).label is Label.ROUTED


def test_zip_bomb_is_413_after_the_limit() -> None:
    bomb = gzip.compress(b'{"model": "food-review-1", "x": "' + b"0" * 50_000_000 + b'"}')
    assert len(bomb) < 100_000
    outcome = decide(bomb, {**JSON, "content-encoding": "gzip"}, Options(max_body_bytes=1_000_000))
    assert outcome.status == 413


@pytest.mark.parametrize(
    "body",
    [b"not gzip at all", gzip.compress(chat("food-review-1"))[:-12]],
    ids=["garbage", "truncated"],  # an empty body is no body: test_empty_body_is_no_body
)
def test_undecompressable_body_is_400(body: bytes) -> None:
    outcome = decide(body, {**JSON, "content-encoding": "gzip"})
    assert (outcome.status, error_of(outcome)["code"]) == (400, "invalid_json")


def test_deflate_with_trailing_data_is_400() -> None:
    body = zlib.compress(chat("food-review-1")) + b"junk"
    assert decide(body, {**JSON, "content-encoding": "deflate"}).status == 400


def multipart(fields: list[tuple[str, bytes, str | None]], boundary: str = "XyZzY") -> bytes:
    out = b""
    for name, value, filename in fields:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename:
            out += b"Content-Type: audio/wav\r\n"
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MULTIPART = {
    **POST,
    ":path": "/v1/audio/transcriptions",
    "content-type": 'multipart/form-data; boundary="XyZzY"',
}


def test_multipart_model_field() -> None:
    body = multipart(
        [("file", b"RIFF\r\n--Xy\x00\xff" * 100, "a.wav"), ("model", b"food-review-1", None)]
    )
    outcome = decide(body, MULTIPART)
    assert (outcome.label, outcome.model, outcome.base_model) == (
        Label.ROUTED,
        "food-review-1",
        LLAMA,
    )


def test_multipart_without_model_passes() -> None:
    body = multipart([("file", b"RIFF", "a.wav"), ("language", b"en", None)])
    assert decide(body, MULTIPART).label is Label.NO_MODEL


def test_multipart_unknown_and_invalid_models() -> None:
    assert (
        decide(multipart([("model", b"whisper-9", None)]), MULTIPART).label is Label.UNKNOWN_MODEL
    )
    assert decide(multipart([("model", b"", None)]), MULTIPART).code == "invalid_model"
    assert decide(multipart([("model", b"a\r\nb", None)]), MULTIPART).code == "invalid_model"


def test_multipart_duplicate_model_is_400() -> None:
    body = multipart(
        [("model", b"food-review-1", None), ("model", b"deepseek/vllm-deepseek-r1", None)]
    )
    assert decide(body, MULTIPART).code == "invalid_json"


@pytest.mark.parametrize(
    "body",
    [b"no boundary here", b'--XyZzY\r\nContent-Disposition: form-data; name="model"\r\n\r\nfood'],
    ids=["no-delimiter", "unterminated"],
)
def test_malformed_multipart_is_400(body: bytes) -> None:
    assert decide(body, MULTIPART).status == 400


def test_multipart_without_boundary_is_400() -> None:
    assert decide(b"x", {**POST, "content-type": "multipart/form-data"}).status == 400


def test_models_endpoint() -> None:
    headers = {":method": "GET", ":path": "/v1/models?limit=2"}
    off = decide(None, headers)
    assert (off.status, off.label) == (0, Label.PASSTHROUGH)
    outcome = decide(None, headers, Options(models_endpoint=True))
    assert (outcome.status, outcome.label) == (200, Label.PASSTHROUGH)
    listing = msgspec.json.decode(outcome.body)
    assert listing["object"] == "list"
    assert {m["id"] for m in listing["data"]} == {
        LLAMA,
        "food-review-1",
        "movie-critique",
        "deepseek/vllm-deepseek-r1",
    }
    for entry in listing["data"]:
        assert entry["object"] == "model"
        assert isinstance(entry["created"], int)
        assert isinstance(entry["owned_by"], str)


@pytest.mark.parametrize("path", ["/v1/models/x", "/v1/model", "/v2/models"])
def test_models_endpoint_exact_path(path: str) -> None:
    outcome = decide(None, {":method": "GET", ":path": path}, Options(models_endpoint=True))
    assert outcome.status == 0


@pytest.mark.parametrize(
    "payload",
    [
        b'{"model": "food-review-1", "x": "\\ud800"}',
        b'{"model": "food-review-1", "x": "a\\ud800"}',
        b'{"x": "\\ud800", "model": "food-review-1"}',
        b'{"x": "\\ud800x", "model": "food-review-1"}',
        b'{"x": "\\uD83D\\u0041", "model": "food-review-1"}',
        b'{"model": "a\\udbff"}',
    ],
)
def test_lone_high_surrogate_says_lone_surrogate(payload: bytes) -> None:
    outcome = decide(payload)
    assert outcome.status == 400 and outcome.code == "invalid_json"
    assert "lone surrogate" in error_of(outcome)["message"]  # not "truncated"


def test_escaped_backslash_before_u_is_no_surrogate() -> None:
    outcome = decide(b'{"x": "\\\\ud800", "model": "food-review-1"}')
    assert outcome.label is Label.ROUTED


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "application/vnd.api+json", "application/merge-patch+json"],
)
@pytest.mark.parametrize("encoding", [None, "identity", "IDENTITY", " identity "])
def test_identity_encoding_and_plus_json_types_are_read(
    content_type: str | None, encoding: str | None
) -> None:
    """README request table: `identity` is no encoding; application/*+json is JSON."""
    headers = {}
    if content_type is not None:
        headers["content-type"] = content_type
    if encoding is not None:
        headers["content-encoding"] = encoding
    assert decide(chat("food-review-1"), headers=headers).label is Label.ROUTED


@pytest.mark.parametrize(
    "content_type", ["application/json", None, "multipart/form-data; boundary=b"]
)
@pytest.mark.parametrize("encoding", [None, "gzip"])
def test_empty_body_is_no_body(content_type: str | None, encoding: str | None) -> None:
    headers = {}
    if content_type is not None:
        headers["content-type"] = content_type
    if encoding is not None:
        headers["content-encoding"] = encoding
    assert decide(b"", headers=headers).label is Label.PASSTHROUGH
