"""Helpers to speak ext_proc to bbr the way Envoy does."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from bbr.modelmap import MapHolder, parse_file_text

Mode = processing_mode_pb2.ProcessingMode

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
BASE = "x-gateway-base-model-name"
NAME = "x-gateway-model-name"
MAP = """
kind: ConfigMap
metadata: {name: llama}
data: {baseModel: meta-llama/Llama-3.1-8B-Instruct, adapters: "- food-review-1"}
"""
CHAT = json.dumps(
    {"messages": [{"role": "user", "content": "hi" * 50}], "model": "food-review-1"}
).encode()


def holder_with(text: str = MAP) -> MapHolder:
    """A map holder with `text` (ConfigMap YAML) in force."""
    holder = MapHolder()
    holder.publish("test", parse_file_text(text, path="m.yaml").configs)
    return holder


def headers(
    items: Mapping[str, str] | Iterable[tuple[str, str]] = (),
    *,
    method: str = "POST",
    path: str = "/v1/chat/completions",
    end_of_stream: bool = False,
    streaming: bool | None = None,
) -> pb.ProcessingRequest:
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    pairs = [(":method", method), (":path", path), (":authority", "gw"), *pairs]
    request = pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(
            headers=base_pb2.HeaderMap(
                headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
            ),
            end_of_stream=end_of_stream,
        )
    )
    if streaming is not None:
        mode = Mode.FULL_DUPLEX_STREAMED if streaming else Mode.BUFFERED
        request.protocol_config.request_body_mode = mode
    return request


def body(data: bytes, *, end_of_stream: bool = True) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=data, end_of_stream=end_of_stream))


def trailers() -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_trailers=pb.HttpTrailers())


def set_headers(
    responses: pb.ProcessingResponse | Iterable[pb.ProcessingResponse],
) -> dict[str, str]:
    """Headers one response, or all of several, set, whichever phase each answers."""
    if isinstance(responses, pb.ProcessingResponse):
        responses = (responses,)
    found: dict[str, str] = {}
    for response in responses:
        common = _common(response)
        if common is not None:
            for h in common.header_mutation.set_headers:
                found[h.header.key] = h.header.raw_value.decode()
    return found


def removed_headers(response: pb.ProcessingResponse) -> list[str]:
    common = _common(response)
    return list(common.header_mutation.remove_headers) if common is not None else []


def clears_route_cache(response: pb.ProcessingResponse) -> bool:
    common = _common(response)
    return bool(common is not None and common.clear_route_cache)


def _common(response: pb.ProcessingResponse) -> pb.CommonResponse | None:
    kind = response.WhichOneof("response")
    if kind in ("request_headers", "request_body"):
        return getattr(response, kind).response
    return None


def stub(channel: grpc.Channel) -> pb_grpc.ExternalProcessorStub:
    return pb_grpc.ExternalProcessorStub(channel)
