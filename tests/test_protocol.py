"""The ext_proc stream state machine, driven message by message (over gRPC: test_h2grpc.py)."""

from __future__ import annotations

import json

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from hypothesis import given, settings
from hypothesis import strategies as st

from bbr.decision import Label, Options
from bbr.protocol import ProtocolError, Stream
from tests.extproc import (
    BASE,
    CHAT,
    LLAMA,
    NAME,
    body,
    clears_route_cache,
    headers,
    holder_with,
    removed_headers,
    set_headers,
    trailers,
)

HOLDER = holder_with()
SPOOF = {BASE: "evil-pool", NAME: "evil"}


def run(
    messages: list[pb.ProcessingRequest], *, streaming: bool = False, options: Options | None = None
) -> tuple[list[pb.ProcessingResponse], Stream]:
    stream = Stream(HOLDER, options or Options(), streaming=streaming)
    replies: list[pb.ProcessingResponse] = []
    for message in messages:
        replies.extend(stream.handle(message))
    return replies, stream


def kinds(replies: list[pb.ProcessingResponse]) -> list[str]:
    return [r.WhichOneof("response") for r in replies]  # type: ignore[misc]


# --- buffered -------------------------------------------------------------------------


def test_buffered_routes_on_the_body_answer() -> None:
    replies, stream = run([headers(), body(CHAT)])
    assert kinds(replies) == ["request_headers", "request_body"]
    assert set_headers(replies[0]) == {} and not clears_route_cache(replies[0])
    assert set_headers(replies[1]) == {BASE: LLAMA, NAME: "food-review-1"}
    assert clears_route_cache(replies[1])
    assert not replies[1].request_body.response.HasField("body_mutation")  # body untouched
    assert stream.outcome is not None and stream.outcome.label is Label.ROUTED


@pytest.mark.parametrize(
    ("payload", "label"),
    [
        (CHAT, Label.ROUTED),
        (b'{"model": "nope"}', Label.UNKNOWN_MODEL),
        (b'{"messages": []}', Label.NO_MODEL),
    ],
)
def test_buffered_spoofed_headers_never_survive(payload: bytes, label: Label) -> None:
    replies, stream = run([headers(SPOOF), body(payload)])
    assert sorted(removed_headers(replies[0])) == [BASE, NAME]
    assert clears_route_cache(replies[0])
    assert stream.outcome is not None and stream.outcome.label is label
    final = set_headers(replies[1])
    if label is Label.ROUTED:
        assert final == {BASE: LLAMA, NAME: "food-review-1"}
    elif label is Label.UNKNOWN_MODEL:
        assert final == {NAME: "nope"}
    else:
        assert final == {}


def test_no_body_removes_spoofed_headers() -> None:
    replies, _ = run([headers(SPOOF, method="GET", end_of_stream=True)])
    assert kinds(replies) == ["request_headers"]
    assert sorted(removed_headers(replies[0])) == [BASE, NAME] and clears_route_cache(replies[0])


def test_no_body_without_spoof_is_a_plain_continue() -> None:
    replies, _ = run([headers(method="GET", end_of_stream=True)])
    assert kinds(replies) == ["request_headers"] and not clears_route_cache(replies[0])


def test_other_content_type_passes_untouched_but_loses_spoofed_headers() -> None:
    replies, stream = run([headers({"content-type": "text/plain", **SPOOF}), body(b"model=x")])
    assert kinds(replies) == ["request_headers", "request_body"]
    assert sorted(removed_headers(replies[0])) == [BASE, NAME]
    assert set_headers(replies[1]) == {} and stream.outcome is not None
    assert stream.outcome.label is Label.PASSTHROUGH


@pytest.mark.parametrize(
    ("payload", "options", "status"),
    [
        (b"{", Options(), 400),
        (b'{"model": 1}', Options(), 400),
        (b'{"model": "nope"}', Options(unknown_model="reject"), 404),
        (CHAT, Options(max_body_bytes=10), 413),
    ],
)
def test_errors_are_immediate_json_responses(payload: bytes, options: Options, status: int) -> None:
    replies, _ = run([headers(SPOOF), body(payload)], options=options)
    reply = replies[-1]
    assert reply.WhichOneof("response") == "immediate_response"
    immediate = reply.immediate_response
    assert immediate.status.code == status
    assert {h.header.key: h.header.raw_value for h in immediate.headers.set_headers} == {
        "content-type": b"application/json"
    }
    assert json.loads(immediate.body)["error"]["type"] == "invalid_request_error"


def test_models_endpoint_answers_at_headers() -> None:
    replies, _ = run(
        [headers(method="GET", path="/v1/models", end_of_stream=True)],
        options=Options(models_endpoint=True),
    )
    assert replies[0].immediate_response.status.code == 200
    assert json.loads(replies[0].immediate_response.body)["object"] == "list"


def test_request_uses_the_map_in_force_at_its_headers() -> None:
    holder = holder_with()
    stream = Stream(holder, Options(), streaming=False)
    stream.handle(headers())
    holder.publish("test", [])  # the model disappears mid-request
    [reply] = stream.handle(body(CHAT))
    assert set_headers(reply)[BASE] == LLAMA
    fresh = Stream(holder, Options(), streaming=False)
    fresh.handle(headers())
    assert set_headers(fresh.handle(body(CHAT))[0]) == {NAME: "food-review-1"}


def test_response_side_messages_are_answered_unchanged() -> None:
    replies, _ = run(
        [
            pb.ProcessingRequest(response_headers=pb.HttpHeaders()),
            pb.ProcessingRequest(response_body=pb.HttpBody(body=b"x", end_of_stream=True)),
            pb.ProcessingRequest(response_trailers=pb.HttpTrailers()),
        ]
    )
    assert kinds(replies) == ["response_headers", "response_body", "response_trailers"]
    assert not replies[1].response_body.response.HasField("body_mutation")


def test_protocol_violations() -> None:
    with pytest.raises(ProtocolError):
        run([headers(), headers()])
    with pytest.raises(ProtocolError):
        run([headers(), body(CHAT), body(b"more")])
    with pytest.raises(ProtocolError):
        run([headers(end_of_stream=True), body(b"x")])
    with pytest.raises(ProtocolError):
        run([headers(streaming=True), body(CHAT), body(b"x")])


def test_header_mode_skip_body_first_still_gets_answers() -> None:
    replies, _ = run([body(b"{broken")])
    assert replies[0].immediate_response.status.code == 400
    replies, _ = run([body(CHAT)])
    assert kinds(replies) == ["request_body"]
    assert set_headers(replies[0]) == {BASE: LLAMA, NAME: "food-review-1"}
    assert sorted(removed_headers(replies[0])) == []  # both are set, so both overwritten


def test_buffered_body_then_trailers() -> None:
    replies, _ = run([headers(), body(CHAT, end_of_stream=False), trailers()])
    assert kinds(replies) == ["request_headers", "request_body", "request_trailers"]
    assert set_headers(replies[1])[BASE] == LLAMA


# --- streaming ------------------------------------------------------------------------


def chunked(payload: bytes, size: int) -> list[pb.ProcessingRequest]:
    pieces = [payload[i : i + size] for i in range(0, len(payload), size)] or [b""]
    return [body(p, end_of_stream=i == len(pieces) - 1) for i, p in enumerate(pieces)]


def test_streaming_holds_headers_then_returns_chunks_in_order() -> None:
    stream = Stream(HOLDER, Options(), streaming=True)
    assert stream.handle(headers(SPOOF)) == []
    messages = chunked(CHAT, 17)
    for message in messages[:-1]:
        assert stream.handle(message) == []
    replies = stream.handle(messages[-1])
    assert kinds(replies) == ["request_headers"] + ["request_body"] * len(messages)
    assert set_headers(replies[0]) == {BASE: LLAMA, NAME: "food-review-1"}
    assert clears_route_cache(replies[0])
    echoed = [r.request_body.response.body_mutation.streamed_response for r in replies[1:]]
    assert [e.body for e in echoed] == [m.request_body.body for m in messages]
    assert [e.end_of_stream for e in echoed] == [False] * (len(messages) - 1) + [True]


def test_streaming_protocol_config_overrides_the_flag() -> None:
    replies, _ = run([headers(streaming=True), *chunked(CHAT, 50)], streaming=False)
    assert kinds(replies)[0] == "request_headers" and len(replies) == 1 + len(chunked(CHAT, 50))


def test_streaming_trailers_end_the_body() -> None:
    replies, _ = run([headers(), body(CHAT, end_of_stream=False), trailers()], streaming=True)
    assert kinds(replies) == ["request_headers", "request_body", "request_trailers"]
    assert set_headers(replies[0])[BASE] == LLAMA


def test_streaming_too_large_answers_early_and_drops_the_buffer() -> None:
    stream = Stream(HOLDER, Options(max_body_bytes=100), streaming=True)
    stream.handle(headers())
    assert stream.handle(body(b"x" * 60, end_of_stream=False)) == []
    [reply] = stream.handle(body(b"x" * 60, end_of_stream=False))
    assert reply.immediate_response.status.code == 413
    assert stream._chunks == []
    assert stream.handle(body(b"x", end_of_stream=True)) == []  # Envoy is done with us


def test_streaming_passthrough_echoes_at_once() -> None:
    stream = Stream(HOLDER, Options(), streaming=True)
    [first] = stream.handle(headers({"content-type": "audio/wav"}))
    assert first.WhichOneof("response") == "request_headers"
    [echo] = stream.handle(body(b"RIFF", end_of_stream=False))
    assert echo.request_body.response.body_mutation.streamed_response.body == b"RIFF"


def test_close_releases_held_chunks() -> None:
    stream = Stream(HOLDER, Options(), streaming=True)
    stream.handle(headers())
    stream.handle(body(b"x" * 1000, end_of_stream=False))
    stream.close()
    assert stream._chunks == []


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([CHAT, b'{"model": "nope"}', b"{bad", b'{"a": 1}', b'{"model": 5}']),
    st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=20),
)
def test_any_chunking_gives_the_same_outcome(payload: bytes, cuts: list[int]) -> None:
    _, whole = run([headers(), body(payload)])
    pieces, rest = [], payload
    for cut in cuts:
        if not rest:
            break
        pieces.append(rest[:cut])
        rest = rest[cut:]
    if rest:
        pieces.append(rest)
    messages = [body(p, end_of_stream=i == len(pieces) - 1) for i, p in enumerate(pieces)]
    replies, split = run([headers(), *messages], streaming=True)
    assert whole.outcome == split.outcome
    if split.outcome is not None and split.outcome.continues:
        echoed = b"".join(
            r.request_body.response.body_mutation.streamed_response.body for r in replies[1:]
        )
        assert echoed == payload


any_message = st.sampled_from(
    [
        headers(),
        headers(end_of_stream=True),
        headers({"content-type": "text/plain"}),
        headers(streaming=True),
        body(CHAT),
        body(b'{"model": ', end_of_stream=False),
        body(b'"food-review-1"}'),
        body(b"", end_of_stream=False),
        trailers(),
        pb.ProcessingRequest(response_headers=pb.HttpHeaders()),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"x", end_of_stream=True)),
        pb.ProcessingRequest(),
    ]
)


@settings(max_examples=500, deadline=None)
@given(st.lists(any_message, max_size=8), st.booleans())
def test_any_message_order_ends_in_answers_or_a_protocol_error(
    messages: list[pb.ProcessingRequest], streaming: bool
) -> None:
    stream = Stream(HOLDER, Options(), streaming=streaming)
    answered_request_side = False
    try:
        for message in messages:
            replies = stream.handle(message)
            kind = message.WhichOneof("request")
            if kind is not None and kind.startswith("response"):
                assert len(replies) == 1  # response-side messages are answered at once
            answered_request_side |= any(
                r.WhichOneof("response") in ("request_headers", "immediate_response")
                for r in replies
            )
    except ProtocolError:
        return
    finally:
        stream.close()
    if stream.outcome is not None and stream.outcome.status:
        assert answered_request_side


# --- an empty body is no body, however framed ------------------------------------------


def _routing_removed_and_passed(replies: list[pb.ProcessingResponse], stream: Stream) -> None:
    assert not any(r.WhichOneof("response") == "immediate_response" for r in replies)
    assert stream.outcome is not None and stream.outcome.label is Label.PASSTHROUGH
    removed = [name for r in replies for name in removed_headers(r)]
    assert sorted(removed) == [BASE, NAME]
    assert all(set_headers(r) == {} for r in replies)
    assert any(clears_route_cache(r) for r in replies)


@pytest.mark.parametrize(
    ("messages", "streaming"),
    [
        ([headers(SPOOF, end_of_stream=True)], False),  # content-length: 0
        ([headers(SPOOF), body(b"")], False),  # chunked / HTTP/2: an empty DATA frame
        ([headers(SPOOF), body(b"", end_of_stream=False), trailers()], False),
        ([headers(SPOOF), trailers()], False),
        ([headers(SPOOF), body(b"")], True),
        ([headers(SPOOF), body(b"", end_of_stream=False), body(b"")], True),
        ([headers(SPOOF), body(b"", end_of_stream=False), trailers()], True),
        ([headers({"content-type": "multipart/form-data; boundary=x", **SPOOF}), body(b"")], False),
        ([headers({"content-encoding": "gzip", **SPOOF}), body(b"")], False),
    ],
    ids=[
        "headers-eos",
        "empty-body",
        "empty-body-trailers",
        "trailers-only",
        "streamed-empty",
        "streamed-empty-chunks",
        "streamed-empty-trailers",
        "multipart-empty",
        "gzip-empty",
    ],
)
def test_empty_body_passes_with_routing_headers_removed(
    messages: list[pb.ProcessingRequest], streaming: bool
) -> None:
    replies, stream = run(messages, streaming=streaming)
    _routing_removed_and_passed(replies, stream)


def test_empty_body_with_header_mode_skip_passes_and_strips() -> None:
    replies, stream = run([body(b"")])
    assert kinds(replies) == ["request_body"]
    assert stream.outcome is not None and stream.outcome.label is Label.PASSTHROUGH
    assert sorted(removed_headers(replies[0])) == [BASE, NAME]
