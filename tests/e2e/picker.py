"""A stand-in for an InferencePool's endpoint picker (EPP), for gateway end-to-end tests.

Istio calls a pool's picker through its own ext_proc filter, after bbr, with everything
streamed (FULL_DUPLEX_STREAMED request and response bodies, trailers sent) and fails the
request when the picker is unreachable (the pool's default failureMode FailClose). The
real picker (the Inference Extension's EPP) scores model-server pods; this one only does
what the gateway needs from it: it names its pool's one endpoint in
``x-gateway-destination-endpoint`` (header and ``envoy.lb`` dynamic metadata, as the EPP
does), streams every body chunk back unchanged, and records the routing header it saw, so
a test can tell which pool's picker ran for a request.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

DESTINATION = "x-gateway-destination-endpoint"
BASE = "x-gateway-base-model-name"


def _headers(message: pb.HttpHeaders) -> dict[str, str]:
    return {h.key: (h.raw_value.decode() or h.value) for h in message.headers.headers}


class Picker(pb_grpc.ExternalProcessorServicer):
    """Picks ``endpoint`` ("ip:port") for every request; remembers what it saw."""

    def __init__(self, pool: str, endpoint: str) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.lock = threading.Lock()
        self.seen: list[str | None] = []  # x-gateway-base-model-name per request

    def _pick(self) -> pb.ProcessingResponse:
        lb = struct_pb2.Struct()
        lb.update({DESTINATION: self.endpoint})
        metadata = struct_pb2.Struct()
        metadata.update({"envoy.lb": lb})
        return pb.ProcessingResponse(
            request_headers=pb.HeadersResponse(
                response=pb.CommonResponse(
                    header_mutation=pb.HeaderMutation(
                        set_headers=[
                            base_pb2.HeaderValueOption(
                                header=base_pb2.HeaderValue(
                                    key=DESTINATION, raw_value=self.endpoint.encode()
                                )
                            )
                        ]
                    )
                )
            ),
            dynamic_metadata=metadata,
        )

    @staticmethod
    def _echo(body: pb.HttpBody, *, request: bool) -> pb.ProcessingResponse:
        streamed = pb.BodyResponse(
            response=pb.CommonResponse(
                body_mutation=pb.BodyMutation(
                    streamed_response=pb.StreamedBodyResponse(
                        body=body.body, end_of_stream=body.end_of_stream
                    )
                )
            )
        )
        if request:
            return pb.ProcessingResponse(request_body=streamed)
        return pb.ProcessingResponse(response_body=streamed)

    def Process(
        self, request_iterator: Iterator[pb.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ProcessingResponse]:
        for request in request_iterator:
            kind = request.WhichOneof("request")
            if kind == "request_headers":
                with self.lock:
                    self.seen.append(_headers(request.request_headers).get(BASE))
                yield self._pick()
            elif kind == "request_body":
                yield self._echo(request.request_body, request=True)
            elif kind == "request_trailers":
                yield pb.ProcessingResponse(request_trailers=pb.TrailersResponse())
            elif kind == "response_headers":
                yield pb.ProcessingResponse(response_headers=pb.HeadersResponse())
            elif kind == "response_body":
                yield self._echo(request.response_body, request=False)
            elif kind == "response_trailers":
                yield pb.ProcessingResponse(response_trailers=pb.TrailersResponse())

    def calls(self) -> list[str | None]:
        with self.lock:
            return list(self.seen)


def serve(picker: Picker) -> tuple[grpc.Server, int]:
    """Serve ``picker`` on an ephemeral loopback port; returns the server and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_ExternalProcessorServicer_to_server(picker, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port
