"""The ext_proc stream: Envoy's messages in, decisions out as Envoy's messages.

One `Stream` per HTTP request. It is synchronous and knows nothing of gRPC's
transport, so it can be driven message by message in tests; `bbr.service` runs it.

Buffered mode: Envoy sends headers (answered at once, client routing headers removed),
then the whole body in one message (answered with the routing headers).
FULL_DUPLEX_STREAMED mode: routing headers must ride on the headers response, so that
answer is held until the body is complete; then the held chunks go back, unchanged
and in order.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from bbr import decision
from bbr.decision import BASE_MODEL_HEADER, MODEL_HEADER, Label, Options, Outcome, Plan
from bbr.modelmap import MapHolder, ModelMap

_Mode = processing_mode_pb2.ProcessingMode
FULL_DUPLEX = _Mode.FULL_DUPLEX_STREAMED
BUFFERED_PARTIAL = _Mode.BUFFERED_PARTIAL
_WANTED_HEADERS = frozenset(
    (":method", ":path", "content-type", "content-encoding", BASE_MODEL_HEADER, MODEL_HEADER)
)


class ProtocolError(Exception):
    """Envoy broke the ext_proc protocol: the stream ends with INVALID_ARGUMENT."""


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """What the server counts and logs for one request once its outcome is known."""

    outcome: Outcome
    seconds: float
    body_bytes: int | None


# --- Envoy messages ------------------------------------------------------------------

CONTINUE_REQUEST_HEADERS = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
CONTINUE_REQUEST_BODY = pb.ProcessingResponse(request_body=pb.BodyResponse())
CONTINUE_REQUEST_TRAILERS = pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())
CONTINUE_RESPONSE_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse())
CONTINUE_RESPONSE_TRAILERS = pb.ProcessingResponse(response_trailers=pb.TrailersResponse())
_JSON_HEADERS = pb.HeaderMutation(
    set_headers=[
        base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")
        )
    ]
)
_CACHE_LIMIT = 4096


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    # Envoy reads raw_value; a value sent in `value` arrives empty.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode("utf-8"))
    )


class _Replies:
    """Ready-made responses, shared by all streams (messages are never mutated)."""

    def __init__(self) -> None:
        self._common: dict[tuple[str | None, str | None, tuple[str, ...]], pb.CommonResponse] = {}
        self._immediate: dict[tuple[int, bytes], pb.ProcessingResponse] = {}

    def common(
        self, model: str | None, base: str | None, remove: tuple[str, ...]
    ) -> pb.CommonResponse | None:
        """Set the routing headers bbr decided; remove any other client-sent one."""
        if model is None and not remove:
            return None
        key = (model, base, remove)
        found = self._common.get(key)
        if found is None:
            sets = []
            if base is not None:
                sets.append(_header(BASE_MODEL_HEADER, base))
            if model is not None:
                sets.append(_header(MODEL_HEADER, model))
            set_names = {h.header.key for h in sets}
            found = pb.CommonResponse(
                header_mutation=pb.HeaderMutation(
                    set_headers=sets,
                    remove_headers=[name for name in remove if name not in set_names],
                ),
                # Envoy chose the route from the client's headers; make it choose again.
                clear_route_cache=True,
            )
            if len(self._common) >= _CACHE_LIMIT:
                self._common.clear()
            self._common[key] = found
        return found

    def headers(self, common: pb.CommonResponse | None) -> pb.ProcessingResponse:
        if common is None:
            return CONTINUE_REQUEST_HEADERS
        return pb.ProcessingResponse(request_headers=pb.HeadersResponse(response=common))

    def body(self, common: pb.CommonResponse | None) -> pb.ProcessingResponse:
        if common is None:
            return CONTINUE_REQUEST_BODY
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))

    def immediate(self, outcome: Outcome) -> pb.ProcessingResponse:
        key = (outcome.status, outcome.body)
        found = self._immediate.get(key)
        if found is None:
            found = pb.ProcessingResponse(
                immediate_response=pb.ImmediateResponse(
                    status=http_status_pb2.HttpStatus(code=outcome.status),
                    headers=_JSON_HEADERS,
                    body=outcome.body,
                    details=f"bbr_{outcome.code or outcome.label.value}",
                )
            )
            if len(self._immediate) >= _CACHE_LIMIT:
                self._immediate.clear()
            self._immediate[key] = found
        return found


def streamed_chunk(
    body: bytes, end_of_stream: bool, *, response: bool = False
) -> pb.ProcessingResponse:
    """A FULL_DUPLEX_STREAMED body chunk sent back unchanged."""
    common = pb.CommonResponse(
        body_mutation=pb.BodyMutation(
            streamed_response=pb.StreamedBodyResponse(body=body, end_of_stream=end_of_stream)
        )
    )
    if response:
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=common))
    return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common))


REPLIES = _Replies()


# --- the stream ----------------------------------------------------------------------


class Stream:
    """The state of one ext_proc stream (one HTTP request)."""

    __slots__ = (
        "_body_done",
        "_chunks",
        "_finished",
        "_headers_seen",
        "_holder",
        "_on_finish",
        "_options",
        "_partial",
        "_plan",
        "_replied",
        "_response_streaming",
        "_size",
        "_skipped_headers",
        "_snapshot",
        "_spoofed",
        "_started",
        "_streaming",
        "outcome",
    )

    def __init__(
        self,
        holder: MapHolder,
        options: Options,
        *,
        streaming: bool,
        on_finish: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        self._holder = holder
        self._options = options
        self._streaming = streaming
        self._response_streaming = False
        self._partial = False
        self._on_finish = on_finish
        self._snapshot: ModelMap | None = None
        self._plan: Plan | None = None
        self._headers_seen = False
        self._skipped_headers = False
        self._body_done = False
        self._spoofed: tuple[str, ...] = ()
        self._chunks: list[tuple[bytes, bool]] = []
        self._size = 0
        self._started = 0.0
        self._finished = False
        self._replied = False  # an ImmediateResponse went out: Envoy is done with us
        self.outcome: Outcome | None = None

    def handle(self, request: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        """Answer one message from Envoy (possibly with nothing yet, or several)."""
        if request.HasField("protocol_config"):
            config = request.protocol_config
            self._streaming = config.request_body_mode == FULL_DUPLEX
            self._response_streaming = config.response_body_mode == FULL_DUPLEX
            self._partial = config.request_body_mode == BUFFERED_PARTIAL
        kind = request.WhichOneof("request")
        if kind == "request_headers":
            return self._on_headers(request.request_headers)
        if kind == "request_body":
            return self._on_body(request.request_body)
        if kind == "request_trailers":
            return self._on_trailers()
        if kind == "response_headers":
            return [CONTINUE_RESPONSE_HEADERS]
        if kind == "response_body":
            if self._response_streaming:
                chunk = request.response_body
                return [streamed_chunk(chunk.body, chunk.end_of_stream, response=True)]
            return [CONTINUE_RESPONSE_BODY]
        if kind == "response_trailers":
            return [CONTINUE_RESPONSE_TRAILERS]
        raise ProtocolError("empty ProcessingRequest")

    @property
    def holding(self) -> bool:
        """True while bbr holds part of a streamed body and Envoy owes it more."""
        return self._streaming and self._headers_seen and not self._finished

    @property
    def held_bytes(self) -> int:
        """Body bytes held back from Envoy until the model is known."""
        return self._size if self.holding else 0

    def close(self) -> None:
        """The stream ended (normally or not): let go of everything held."""
        self._chunks = []
        self._snapshot = None

    # -- request side --

    def _begin(self, headers: dict[str, str], end_of_stream: bool) -> None:
        self._headers_seen = True
        self._started = time.perf_counter()
        self._snapshot = snapshot = self._holder.current
        self._plan = decision.plan(headers, snapshot, self._options, end_of_stream=end_of_stream)

    def _on_headers(self, message: pb.HttpHeaders) -> list[pb.ProcessingResponse]:
        if self._headers_seen:
            raise ProtocolError("second request_headers message on one stream")
        headers: dict[str, str] = {}
        for h in message.headers.headers:
            name = h.key.lower()
            if name in _WANTED_HEADERS:
                headers[name] = (h.raw_value or h.value.encode()).decode("utf-8", "replace")
        self._spoofed = tuple(n for n in (BASE_MODEL_HEADER, MODEL_HEADER) if n in headers)
        self._begin(headers, message.end_of_stream)
        plan = self._plan
        assert plan is not None
        if message.end_of_stream:
            self._body_done = True
        if plan.outcome is not None:
            return [self._finish(plan.outcome, None, in_headers=True)]
        if not plan.reads_body:
            return [self._finish(decision.PASSTHROUGH, None, in_headers=True)]
        if self._streaming:
            return []  # held until the model is known
        return [REPLIES.headers(REPLIES.common(None, None, self._spoofed))]

    def _on_body(self, message: pb.HttpBody) -> list[pb.ProcessingResponse]:
        if self._body_done:
            raise ProtocolError("request body after end_of_stream")
        if not self._headers_seen:
            # Header mode SKIP: Envoy routed already; treat as headers without a type.
            self._skipped_headers = True
            self._begin({}, False)
        end = self._body_done = message.end_of_stream
        if self._replied:
            return []
        data = message.body  # each read of a bytes field is a copy: read it once
        if self._finished:  # a body we pass through untouched
            if self._streaming:
                return [streamed_chunk(data, end)]
            return [CONTINUE_REQUEST_BODY]
        if not self._streaming:
            if not end and self._partial:
                # Envoy's buffer filled before the end: bbr cannot see the whole body.
                return [self._finish(decision.too_large(self._options.max_body_bytes), None)]
            return [self._decide(data)]
        self._size += len(data)
        if self._size > self._options.max_body_bytes:
            self._chunks = []
            return [self._finish(decision.too_large(self._options.max_body_bytes), self._size)]
        self._chunks.append((data, end))
        if end:
            return self._flush()
        return []

    def _on_trailers(self) -> list[pb.ProcessingResponse]:
        self._body_done = True
        if self._replied:
            return []
        if not self._finished and self._headers_seen:
            if self._streaming:
                return [*self._flush(), CONTINUE_REQUEST_TRAILERS]
            # Buffered mode with no body message: decide on an empty body.
            return [self._decide(b""), CONTINUE_REQUEST_TRAILERS]
        return [CONTINUE_REQUEST_TRAILERS]

    def _decide(self, body: bytes) -> pb.ProcessingResponse:
        assert self._plan is not None and self._snapshot is not None
        outcome = decision.decide(body, self._plan, self._snapshot, self._options)
        return self._finish(outcome, len(body))

    def _flush(self) -> list[pb.ProcessingResponse]:
        """Streaming: decide on the held chunks, then release headers and chunks."""
        assert self._plan is not None and self._snapshot is not None
        chunks = self._chunks
        self._chunks = []
        body = b"".join(c for c, _ in chunks) if len(chunks) != 1 else chunks[0][0]
        outcome = decision.decide(body, self._plan, self._snapshot, self._options)
        first = self._finish(outcome, len(body), in_headers=not self._skipped_headers)
        if not outcome.continues:
            return [first]
        replies = [first] if not self._skipped_headers else []
        replies.extend(streamed_chunk(c, eos) for c, eos in chunks)
        return replies

    def _finish(
        self, outcome: Outcome, body_bytes: int | None, *, in_headers: bool = False
    ) -> pb.ProcessingResponse:
        self._finished = True
        self.outcome = outcome
        if self._on_finish is not None:
            self._on_finish(RequestRecord(outcome, time.perf_counter() - self._started, body_bytes))
        if not outcome.continues:
            self._replied = True
            self._chunks = []
            return REPLIES.immediate(outcome)
        if in_headers:
            return REPLIES.headers(REPLIES.common(outcome.model, outcome.base_model, self._spoofed))
        # Buffered body answer: the client's routing headers went with the headers
        # answer, except under header mode SKIP, where bbr never saw them.
        remove = decision.ROUTING_HEADERS if self._skipped_headers else ()
        if outcome.label is Label.PASSTHROUGH and not remove:
            return CONTINUE_REQUEST_BODY
        return REPLIES.body(REPLIES.common(outcome.model, outcome.base_model, remove))
