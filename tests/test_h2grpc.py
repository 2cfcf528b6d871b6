"""bbr.h2grpc, the ext_proc port's own HTTP/2 server, against two real clients.

grpcio (what Envoy-like gRPC clients do) drives the ext_proc, health and reflection
services end to end; the `h2` library (an independent HTTP/2 implementation) and
hand-built frames drive the protocol's edge cases: flow control, frame sizes, PING,
CONTINUATION, padding, HPACK, GOAWAY and draining, stream resets.
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from bbr import h2grpc, metrics
from bbr.decision import Options
from bbr.health import SERVICE_NAME, Health
from bbr.service import Processor, h2_server
from harness.h2client import PREFACE
from harness.processes import poll_until
from tests.extproc import BASE, CHAT, LLAMA, NAME, body, headers, holder_with, set_headers, stub

ROUTED = {BASE: LLAMA, NAME: "food-review-1"}
LIMIT = 16 * 1024 * 1024 + 65536
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]
PROCESS = f"/{SERVICE_NAME}/Process".encode()
HEALTH_CHECK = b"/grpc.health.v1.Health/Check"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


HOLDER = holder_with()


def active_streams() -> float:
    value: float = metrics.ACTIVE_STREAMS._value.get()
    return value


def chunked(payload: bytes, size: int) -> list[pb.ProcessingRequest]:
    pieces = [payload[i : i + size] for i in range(0, len(payload), size)]
    return [body(p, end_of_stream=i == len(pieces) - 1) for i, p in enumerate(pieces)]


def big_chat(size: int) -> bytes:
    return json.dumps(
        {"model": "food-review-1", "messages": [{"role": "user", "content": "x" * size}]}
    ).encode()


# --- the server, on an event loop in a background thread --------------------------------


@dataclass
class Running:
    server: h2grpc.Server
    port: int
    processor: Processor
    health: Health


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=event_loop.run_forever, daemon=True)
    thread.start()
    yield event_loop
    event_loop.call_soon_threadsafe(event_loop.stop)
    thread.join(5)
    event_loop.close()


Serve = Callable[..., Running]


@pytest.fixture
def serve(loop: asyncio.AbstractEventLoop) -> Iterator[Serve]:
    """Start `h2_server(...)` on 127.0.0.1:0; every server started is stopped after."""
    started: list[Running] = []

    def start(
        *, streaming: bool = False, idle_seconds: float = 60.0, limit: int = LIMIT
    ) -> Running:
        async def go() -> Running:
            processor = Processor(HOLDER, Options(), streaming=streaming, idle_seconds=idle_seconds)
            health = Health()
            await health.set_all(SERVING)
            server = h2_server(processor, health, limit)
            port = await server.listen("127.0.0.1", 0)
            return Running(server, port, processor, health)

        running = asyncio.run_coroutine_threadsafe(go(), loop).result(10)
        started.append(running)
        return running

    yield start
    for running in started:
        asyncio.run_coroutine_threadsafe(running.server.stop(0), loop).result(10)
    assert poll_until(lambda: active_streams() == 0, timeout=5) is not None, (
        "a stream was never freed"
    )


@pytest.fixture
def channel(serve: Serve) -> Iterator[grpc.Channel]:
    running = serve()
    with grpc.insecure_channel(f"127.0.0.1:{running.port}", options=CHANNEL_OPTIONS) as chan:
        yield chan


def open_channel(running: Running) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{running.port}", options=CHANNEL_OPTIONS)


# --- grpcio against h2_server ------------------------------------------------------------


def test_grpc_routes_a_small_body(channel: grpc.Channel) -> None:
    replies = list(stub(channel).Process(iter([headers(), body(CHAT)]), timeout=5))
    assert [r.WhichOneof("response") for r in replies] == ["request_headers", "request_body"]
    assert set_headers(replies[1]) == ROUTED
    assert replies[1].request_body.response.clear_route_cache


def test_grpc_routes_a_5_mib_body(channel: grpc.Channel) -> None:
    big = big_chat(5 * 1024 * 1024)
    replies = list(stub(channel).Process(iter([headers(), body(big)]), timeout=10))
    assert set_headers(replies[-1]) == ROUTED
    assert not replies[-1].request_body.response.HasField("body_mutation")


def test_grpc_message_over_the_limit_is_resource_exhausted(serve: Serve) -> None:
    running = serve(limit=64 * 1024)
    with open_channel(running) as chan:
        with pytest.raises(grpc.RpcError) as info:
            list(stub(chan).Process(iter([headers(), body(big_chat(100_000))]), timeout=5))
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (info.value.details() or "")
        # The connection is not hurt: the next call on the channel is answered.
        replies = list(stub(chan).Process(iter([headers(), body(CHAT)]), timeout=5))
        assert set_headers(replies[-1]) == ROUTED


def test_grpc_protocol_violation_is_invalid_argument(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub(channel).Process(iter([headers(), headers()]), timeout=5))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "second request_headers" in (info.value.details() or "")


@pytest.mark.parametrize(
    "path",
    [PROCESS, HEALTH_CHECK, b"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"],
)
def test_grpc_malformed_message_is_invalid_argument(channel: grpc.Channel, path: bytes) -> None:
    call = channel.stream_stream(path.decode())  # no serializers: raw bytes on the wire
    with pytest.raises(grpc.RpcError) as info:
        list(call(iter([b"\xff\xff\xff"]), timeout=5))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed" in (info.value.details() or "")


def test_a_failing_call_is_internal_and_the_connection_carries_on(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """A bug in one call's code ends that call with INTERNAL; other calls on the same
    connection, before and after, are answered."""

    class Broken(h2grpc.Call):
        def message(self, data: memoryview) -> None:
            raise RuntimeError("bug")

    def refuse(conn: h2grpc.Connection, stream_id: int, headers: object) -> h2grpc.Call:
        raise RuntimeError("bug at start")

    processor = Processor(HOLDER, Options(), streaming=False)
    server = h2grpc.Server(
        {
            f"/{SERVICE_NAME}/Process": processor.call,
            "/test.Broken/Message": lambda conn, stream_id, headers: Broken(conn, stream_id),
            "/test.Broken/Start": refuse,
        },
        max_message=LIMIT,
    )
    port = asyncio.run_coroutine_threadsafe(server.listen("127.0.0.1", 0), loop).result(10)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as chan:
            for method in ("/test.Broken/Message", "/test.Broken/Start"):
                with pytest.raises(grpc.RpcError) as info:
                    chan.unary_unary(method)(b"x", timeout=5)
                assert info.value.code() is grpc.StatusCode.INTERNAL
                replies = list(stub(chan).Process(iter([headers(), body(CHAT)]), timeout=5))
                assert set_headers(replies[-1]) == ROUTED
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(10)


def test_grpc_unknown_method_is_unimplemented(channel: grpc.Channel) -> None:
    method = channel.unary_unary("/no.such.Service/Method")
    with pytest.raises(grpc.RpcError) as info:
        method(b"", timeout=5)
    assert info.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert "/no.such.Service/Method" in (info.value.details() or "")


def test_grpc_health_check(serve: Serve, loop: asyncio.AbstractEventLoop) -> None:
    running = serve()
    with open_channel(running) as chan:
        health = health_pb2_grpc.HealthStub(chan)
        for service in ("", SERVICE_NAME):
            request = health_pb2.HealthCheckRequest(service=service)
            assert health.Check(request, timeout=5).status == SERVING
        with pytest.raises(grpc.RpcError) as info:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
        assert info.value.code() is grpc.StatusCode.NOT_FOUND
        # Check answers the status in force now, not the one at start.
        change = running.health.set(SERVICE_NAME, NOT_SERVING)
        asyncio.run_coroutine_threadsafe(change, loop).result(5)
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
        assert health.Check(request, timeout=5).status == NOT_SERVING


def test_grpc_reflection_lists_the_ext_proc_service(channel: grpc.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
    ]
    replies = list(reflection.ServerReflectionInfo(iter(requests), timeout=5))
    assert len(replies) == 2  # one answer per request on the stream
    names = {s.name for s in replies[0].list_services_response.service}
    assert "envoy.service.ext_proc.v3.ExternalProcessor" in names
    assert "grpc.health.v1.Health" in names
    assert replies[1].file_descriptor_response.file_descriptor_proto


def test_grpc_200_concurrent_streams_on_one_channel(serve: Serve) -> None:
    running = serve()
    models = ["food-review-1", LLAMA, "unknown-model", "food-review-1"]
    release = threading.Event()

    with open_channel(running) as chan:
        ext_proc = stub(chan)

        def one(i: int) -> tuple[str, dict[str, str]]:
            model = models[i % len(models)]
            payload = json.dumps({"model": model, "messages": [{"content": str(i)}]}).encode()

            def requests() -> Iterator[pb.ProcessingRequest]:
                yield headers()
                release.wait(10)  # every stream is open before any body goes
                yield body(payload)

            replies = list(ext_proc.Process(requests(), timeout=20))
            return model, set_headers(replies[-1])

        with ThreadPoolExecutor(max_workers=200) as pool:
            futures = [pool.submit(one, i) for i in range(200)]
            all_open = poll_until(lambda: running.processor.active == 200, timeout=10) is not None
            release.set()
            results = [f.result(20) for f in futures]
    assert all_open, f"only {running.processor.active} streams were open at once"
    assert len(results) == 200
    for model, got in results:
        expected = {NAME: model} if model == "unknown-model" else {BASE: LLAMA, NAME: model}
        assert got == expected


def test_grpc_cancelled_stream_releases_it(serve: Serve) -> None:
    running = serve()
    assert poll_until(lambda: active_streams() == 0, timeout=5) is not None
    gate = threading.Event()

    def requests() -> Iterator[pb.ProcessingRequest]:
        yield headers(streaming=True)
        yield body(b"x" * 100_000, end_of_stream=False)
        gate.wait(5)

    with open_channel(running) as chan:
        call = stub(chan).Process(requests())
        assert poll_until(lambda: active_streams() == 1, timeout=5) is not None
        call.cancel()
        gate.set()
        assert poll_until(lambda: active_streams() == 0, timeout=5) is not None
        assert running.processor.active == 0


def test_grpc_streaming_returns_chunks_unchanged_and_in_order(serve: Serve) -> None:
    running = serve(streaming=True)
    payload = big_chat(5000)
    messages = chunked(payload, 97)
    assert len(messages) > 50
    with open_channel(running) as chan:
        replies = list(stub(chan).Process(iter([headers(), *messages]), timeout=5))
    assert replies[0].WhichOneof("response") == "request_headers"
    assert set_headers(replies[0]) == ROUTED
    echoed = [r.request_body.response.body_mutation.streamed_response for r in replies[1:]]
    assert [e.body for e in echoed] == [m.request_body.body for m in messages]
    assert [e.end_of_stream for e in echoed] == [False] * (len(messages) - 1) + [True]


def test_grpc_idle_streamed_body_is_deadline_exceeded(serve: Serve) -> None:
    running = serve(streaming=True, idle_seconds=0.3)
    gate = threading.Event()

    def requests() -> Iterator[pb.ProcessingRequest]:
        yield headers()
        yield body(b'{"model": "food-review-1", "pad": "', end_of_stream=False)
        gate.wait(5)  # never send the rest

    started = time.monotonic()
    try:
        with open_channel(running) as chan, pytest.raises(grpc.RpcError) as info:
            list(stub(chan).Process(requests(), timeout=5))
    finally:
        gate.set()
    assert info.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert "no request body message" in (info.value.details() or "")
    assert time.monotonic() - started < 3
    assert poll_until(lambda: running.processor.active == 0, timeout=5) is not None


# --- HTTP/2 framing helpers --------------------------------------------------------------


def grpc_frame(message: bytes, *, compressed: bool = False) -> bytes:
    return bytes((1 if compressed else 0,)) + struct.pack(">I", len(message)) + message


def grpc_messages(data: bytes) -> list[bytes]:
    out = []
    pos = 0
    while pos < len(data):
        assert data[pos] == 0, "the server sent a compressed message"
        (length,) = struct.unpack_from(">I", data, pos + 1)
        assert pos + 5 + length <= len(data), "truncated gRPC message"
        out.append(data[pos + 5 : pos + 5 + length])
        pos += 5 + length
    return out


def process_request(*messages: pb.ProcessingRequest) -> bytes:
    return b"".join(grpc_frame(m.SerializeToString()) for m in messages)


def responses(data: bytes) -> list[pb.ProcessingResponse]:
    return [pb.ProcessingResponse.FromString(m) for m in grpc_messages(data)]


def request_headers(path: bytes = PROCESS) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", path),
        (b":authority", b"127.0.0.1"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]


@dataclass
class Reply:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    frame_sizes: list[int] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None

    @property
    def status(self) -> bytes | None:
        """grpc-status, from the trailers or a trailers-only response."""
        return self.trailers.get(b"grpc-status", self.headers.get(b"grpc-status"))


class H2Client:
    """A gRPC client on the `h2` library: its state machine checks the server's frames."""

    def __init__(self, port: int, settings: dict[SettingCodes, int] | None = None) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        if settings:
            self.conn.local_settings = h2.settings.Settings(client=True, initial_values=settings)
            self.conn.max_inbound_frame_size = self.conn.local_settings.max_frame_size
            self.conn.incoming_buffer.max_frame_size = self.conn.max_inbound_frame_size
        self.conn.initiate_connection()
        self.auto_ack = True
        self.closed = False
        self.events: list[h2.events.Event] = []
        self.replies: dict[int, Reply] = {}
        self.flush()

    def close(self) -> None:
        self.sock.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def pump(self, timeout: float) -> bool:
        """Read once; False when nothing came within `timeout` or the peer closed."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            return False
        except ConnectionResetError:
            data = b""
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self.events.append(event)
            self._record(event)
        self.flush()
        return True

    def _record(self, event: h2.events.Event) -> None:
        stream_id = getattr(event, "stream_id", None)
        if stream_id is None:
            return
        reply = self.replies.setdefault(stream_id, Reply())
        if isinstance(event, h2.events.ResponseReceived):
            reply.headers.update(event.headers or [])
        elif isinstance(event, h2.events.TrailersReceived):
            reply.trailers.update(event.headers or [])
        elif isinstance(event, h2.events.DataReceived):
            reply.data += event.data or b""
            reply.frame_sizes.append(event.flow_controlled_length or 0)
            if self.auto_ack and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            reply.ended = True
        elif isinstance(event, h2.events.StreamReset):
            reply.reset = event.error_code

    def wait(self, condition: Callable[[], bool], timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            left = deadline - time.monotonic()
            assert left > 0, "timed out waiting for the server"
            if not self.pump(left) and self.closed:
                assert condition(), "the server closed the connection"
                return

    def open(self, path: bytes = PROCESS, end_stream: bool = False) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, request_headers(path), end_stream=end_stream)
        self.flush()
        return stream_id

    def send(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        """Send DATA as the server's windows allow, reading its frames while blocked."""
        view = memoryview(data)
        while True:
            room = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if room <= 0 and view:
                assert self.pump(5), "the server never opened its window"
                continue
            piece, view = view[:room], view[room:]
            last = not view
            self.conn.send_data(stream_id, piece.tobytes(), end_stream=end_stream and last)
            self.flush()
            if last:
                return

    def reply(self, stream_id: int, timeout: float = 5.0) -> Reply:
        self.wait(lambda: self._over(stream_id), timeout)
        return self.replies[stream_id]

    def _over(self, stream_id: int) -> bool:
        reply = self.replies.get(stream_id)
        return reply is not None and (reply.ended or reply.reset is not None)

    def call(self, payload: bytes, path: bytes = PROCESS) -> Reply:
        stream_id = self.open(path)
        self.send(stream_id, payload, end_stream=True)
        return self.reply(stream_id)


@pytest.fixture
def h2client(serve: Serve) -> Iterator[Callable[..., H2Client]]:
    clients: list[H2Client] = []

    def connect(running: Running, settings: dict[SettingCodes, int] | None = None) -> H2Client:
        client = H2Client(running.port, settings)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


class RawClient:
    """Hand-built frames (hyperframe, hpack) for what `h2` will not send."""

    def __init__(self, port: int, *, preface: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self._buffer = b""
        if preface:
            self.sock.sendall(PREFACE + SettingsFrame(0).serialize())

    def close(self) -> None:
        self.sock.close()

    def send(self, *frames: Frame | bytes) -> None:
        self.sock.sendall(b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames))

    def block(self, path: bytes = PROCESS) -> bytes:
        encoded: bytes = self.encoder.encode(request_headers(path))
        return encoded

    def _read(self, size: int, timeout: float) -> bytes | None:
        deadline = time.monotonic() + timeout
        while len(self._buffer) < size:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no frame from the server")
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            self._buffer += data
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    def frame(self, timeout: float = 5.0) -> Frame | None:
        """The next frame, or None once the server closed the connection."""
        head = self._read(9, timeout)
        if head is None:
            return None
        parsed, length = Frame.parse_frame_header(memoryview(head))
        payload = self._read(length, timeout) if length else b""
        if payload is None:
            return None
        parsed.parse_body(memoryview(payload))
        return parsed

    def frames_until(self, condition: Callable[[Frame], bool], timeout: float = 5.0) -> list[Frame]:
        seen: list[Frame] = []
        while True:
            got = self.frame(timeout)
            assert got is not None, f"the server closed the connection after {seen}"
            seen.append(got)
            if condition(got):
                return seen

    def reply(self, stream_id: int, timeout: float = 5.0) -> Reply:
        """Collect one stream's answer, up to its END_STREAM or RST_STREAM."""
        reply = Reply()
        while not (reply.ended or reply.reset is not None):
            got = self.frame(timeout)
            assert got is not None, "the server closed the connection mid-reply"
            if isinstance(got, HeadersFrame):
                decoded = dict(self.decoder.decode(got.data, raw=True))
                if got.stream_id != stream_id:
                    continue
                (reply.trailers if reply.headers else reply.headers).update(decoded)
                reply.ended = "END_STREAM" in got.flags
            elif isinstance(got, DataFrame) and got.stream_id == stream_id:
                reply.data += got.data
                reply.frame_sizes.append(got.flow_controlled_length)
                reply.ended = "END_STREAM" in got.flags
            elif isinstance(got, RstStreamFrame) and got.stream_id == stream_id:
                reply.reset = got.error_code
        return reply

    def closed_within(self, timeout: float) -> bool:
        """True when the server closes the connection (frames before that are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.frame(deadline - time.monotonic()) is None:
                    return True
            except TimeoutError:
                return False
        return False


@pytest.fixture
def raw(serve: Serve) -> Iterator[Callable[..., RawClient]]:
    clients: list[RawClient] = []

    def connect(running: Running, *, preface: bool = True) -> RawClient:
        client = RawClient(running.port, preface=preface)
        clients.append(client)
        return client

    yield connect
    for client in clients:
        client.close()


def assert_routed(reply: Reply) -> None:
    assert reply.headers.get(b":status") == b"200"
    assert reply.headers.get(b"content-type") == b"application/grpc"
    assert reply.status == b"0", reply
    answers = responses(bytes(reply.data))
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "request_body"]
    assert set_headers(answers[1]) == ROUTED


ROUTED_CALL = process_request(headers(), body(CHAT))


# --- the h2 library against the server ---------------------------------------------------


def test_h2_tiny_initial_window_still_gets_the_whole_streamed_response(
    serve: Serve, h2client: Callable[..., H2Client]
) -> None:
    running = serve(streaming=True)
    client = h2client(running, {SettingCodes.INITIAL_WINDOW_SIZE: 16})
    client.auto_ack = False
    payload = big_chat(200_000)
    messages = chunked(payload, 16_000)
    stream_id = client.open()
    client.send(stream_id, process_request(headers(), *messages), end_stream=True)
    # The server has the whole answer (~200 KB) but may send 16 bytes of it.
    client.wait(lambda: stream_id in client.replies and len(client.replies[stream_id].data) > 0)
    while client.pump(0.3):  # and nothing more, however long the client waits
        pass
    reply = client.replies[stream_id]
    assert reply.headers.get(b":status") == b"200"
    assert len(reply.data) == 16 and not reply.ended
    # Open the windows: the rest follows, and h2 checks no frame overruns them.
    client.auto_ack = True
    client.conn.increment_flow_control_window(1 << 20, stream_id)
    client.conn.increment_flow_control_window(1 << 20)
    client.flush()
    reply = client.reply(stream_id)
    assert reply.status == b"0"
    answers = responses(bytes(reply.data))
    assert set_headers(answers[0]) == ROUTED
    echoed = [a.request_body.response.body_mutation.streamed_response.body for a in answers[1:]]
    assert echoed == [m.request_body.body for m in messages]
    assert b"".join(echoed) == payload


@pytest.mark.parametrize("max_frame", [16_384, 40_000])
def test_h2_max_frame_size_is_respected(
    serve: Serve, h2client: Callable[..., H2Client], max_frame: int
) -> None:
    running = serve(streaming=True)
    client = h2client(running, {SettingCodes.MAX_FRAME_SIZE: max_frame})
    payload = big_chat(300_000)
    messages = chunked(payload, 100_000)  # each answer is larger than any frame
    reply = client.call(process_request(headers(), *messages))
    assert reply.status == b"0"
    assert reply.frame_sizes and max(reply.frame_sizes) <= max_frame
    echoed = [
        a.request_body.response.body_mutation.streamed_response.body
        for a in responses(bytes(reply.data))[1:]
    ]
    assert b"".join(echoed) == payload


def test_raw_frame_over_16_kib_is_a_frame_size_error(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    client = raw(serve())
    client.send(HeadersFrame(1, client.block(), flags={"END_HEADERS"}))
    client.send(DataFrame(1, b"\0" * (h2grpc.FRAME_LIMIT + 1)))
    [*_, goaway] = client.frames_until(lambda f: isinstance(f, GoAwayFrame))
    assert isinstance(goaway, GoAwayFrame) and goaway.error_code == ErrorCodes.FRAME_SIZE_ERROR
    assert client.closed_within(2)


def test_h2_ping_is_acked_with_its_payload(serve: Serve, h2client: Callable[..., H2Client]) -> None:
    client = h2client(serve())
    client.conn.ping(b"bbr-ping")
    client.flush()
    client.wait(lambda: any(isinstance(e, h2.events.PingAckReceived) for e in client.events))
    [ack] = [e for e in client.events if isinstance(e, h2.events.PingAckReceived)]
    assert ack.ping_data == b"bbr-ping"


def test_h2_a_ping_with_each_call_is_no_flood(
    serve: Serve, h2client: Callable[..., H2Client]
) -> None:
    """grpc-go clients (ghz among them) ping once per data sample they receive, hundreds of
    times a second at full speed: pings that come with answers must not close the
    connection, while the same number of pings alone does (ENHANCE_YOUR_CALM)."""
    client = h2client(serve())
    client.wait(lambda: client.conn.outbound_flow_control_window >= 300 * len(ROUTED_CALL))
    calls = []
    for n in range(300):  # more than the 200 PING/SETTINGS a second allowed without data
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream_id, request_headers(PROCESS))
        client.conn.send_data(stream_id, ROUTED_CALL, end_stream=True)
        client.conn.ping(n.to_bytes(8, "big"))
        calls.append(stream_id)
    client.flush()
    for stream_id in calls:
        assert_routed(client.reply(stream_id))
    assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events)

    lone = h2client(serve())
    for n in range(300):
        lone.conn.ping(n.to_bytes(8, "big"))
    lone.flush()
    lone.wait(lambda: any(isinstance(e, h2.events.ConnectionTerminated) for e in lone.events))
    [end] = [e for e in lone.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert end.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM


def test_h2_messages_split_and_coalesced_across_data_frames(
    serve: Serve, h2client: Callable[..., H2Client]
) -> None:
    client = h2client(serve())
    stream_id = client.open()
    for i in range(0, len(ROUTED_CALL), 3):  # both messages, 3 bytes per DATA frame
        client.send(stream_id, ROUTED_CALL[i : i + 3])
    client.send(stream_id, b"", end_stream=True)
    assert_routed(client.reply(stream_id))


def test_h2_rst_stream_frees_the_call(serve: Serve, h2client: Callable[..., H2Client]) -> None:
    running = serve(streaming=True)
    assert poll_until(lambda: active_streams() == 0, timeout=5) is not None
    client = h2client(running)
    stream_id = client.open()
    client.send(stream_id, process_request(headers(), body(b'{"model": ', end_of_stream=False)))
    assert poll_until(lambda: running.processor.active == 1, timeout=5) is not None
    assert active_streams() == 1
    client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
    client.flush()
    assert poll_until(lambda: running.processor.active == 0, timeout=5) is not None
    assert active_streams() == 0
    # The connection goes on: a new stream on it is answered.
    reply = client.call(process_request(headers(), body(CHAT)))
    assert reply.status == b"0"
    assert set_headers(responses(bytes(reply.data))[0]) == ROUTED


def test_h2_compressed_message_is_unimplemented(
    serve: Serve, h2client: Callable[..., H2Client]
) -> None:
    client = h2client(serve())
    reply = client.call(grpc_frame(headers().SerializeToString(), compressed=True))
    assert reply.headers.get(b":status") == b"200"
    assert reply.status == b"12"
    assert b"compressed" in reply.trailers.get(
        b"grpc-message", reply.headers.get(b"grpc-message", b"")
    )
    assert not reply.data


# --- hand-built frames -------------------------------------------------------------------


def test_raw_header_block_split_into_continuation_frames(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    client = raw(serve())
    block = client.block()
    a, b = len(block) // 3, 2 * len(block) // 3
    client.send(
        HeadersFrame(1, block[:a]),
        ContinuationFrame(1, block[a:b]),
        ContinuationFrame(1, block[b:], flags={"END_HEADERS"}),
        DataFrame(1, ROUTED_CALL, flags={"END_STREAM"}),
    )
    assert_routed(client.reply(1))


def test_raw_preface_and_frames_trickled_in_pieces(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    """Every frame, and the preface, arrives split across several socket reads."""
    client = raw(serve(), preface=False)
    client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    wire = (
        PREFACE
        + SettingsFrame(0).serialize()
        + HeadersFrame(1, client.block(), flags={"END_HEADERS"}).serialize()
        + DataFrame(1, ROUTED_CALL, flags={"END_STREAM"}).serialize()
    )
    for i in range(0, len(wire), 5):
        client.send(wire[i : i + 5])
        time.sleep(0.0005)
    assert_routed(client.reply(1))


def test_raw_frame_between_headers_and_continuation_is_a_protocol_error(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    client = raw(serve())
    block = client.block()
    client.send(HeadersFrame(1, block[:4]), PingFrame(0, b"12345678"))
    [*_, goaway] = client.frames_until(lambda f: isinstance(f, GoAwayFrame))
    assert isinstance(goaway, GoAwayFrame) and goaway.error_code == ErrorCodes.PROTOCOL_ERROR
    assert client.closed_within(2)


def test_raw_padded_headers_and_data(serve: Serve, raw: Callable[..., RawClient]) -> None:
    client = raw(serve())
    head = HeadersFrame(1, client.block(), flags={"END_HEADERS", "PADDED", "PRIORITY"})
    head.pad_length = 40
    head.depends_on, head.stream_weight, head.exclusive = 0, 200, False
    half = len(ROUTED_CALL) // 2
    first = DataFrame(1, ROUTED_CALL[:half], flags={"PADDED"})
    first.pad_length = 255
    last = DataFrame(1, ROUTED_CALL[half:], flags={"PADDED", "END_STREAM"})
    last.pad_length = 7
    client.send(head, first, last)
    assert_routed(client.reply(1))


@pytest.mark.parametrize(
    "greeting",
    [b"GET / HTTP/1.1\r\nHost: bbr\r\n\r\n", b"PRI * HTTP/1.1\r\n", b"\x16\x03\x01\x02\x00"],
    ids=["http1", "wrong-version", "tls-hello"],
)
def test_raw_bad_client_preface_closes_the_connection(
    serve: Serve, raw: Callable[..., RawClient], greeting: bytes
) -> None:
    running = serve()
    client = raw(running, preface=False)
    client.send(greeting)
    frames: list[Frame] = []
    while (got := client.frame()) is not None:
        frames.append(got)
    goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
    assert goaways and goaways[0].error_code == ErrorCodes.PROTOCOL_ERROR
    # Other connections are unaffected.
    good = raw(running)
    good.send(HeadersFrame(1, good.block(), flags={"END_HEADERS"}))
    good.send(DataFrame(1, ROUTED_CALL, flags={"END_STREAM"}))
    assert_routed(good.reply(1))


def test_raw_hpack_garbage_is_a_compression_error(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    client = raw(serve())
    # Indexed field 70: past the static table, and the dynamic table is empty.
    client.send(HeadersFrame(1, b"\xc6\xff\xff\xff\xff", flags={"END_HEADERS"}))
    [*_, goaway] = client.frames_until(lambda f: isinstance(f, GoAwayFrame))
    assert isinstance(goaway, GoAwayFrame)
    assert goaway.error_code == ErrorCodes.COMPRESSION_ERROR
    assert client.closed_within(2)


def _open_held_call(client: RawClient) -> None:
    """Stream 1: a streamed body the server holds until its end."""
    client.send(
        HeadersFrame(1, client.block(), flags={"END_HEADERS"}),
        DataFrame(
            1,
            process_request(
                headers(streaming=True),
                body(b'{"model": "food-review-1", ', end_of_stream=False),
            ),
        ),
    )


def _finish_held_call(client: RawClient) -> Reply:
    client.send(
        DataFrame(
            1,
            process_request(body(b'"messages": []}', end_of_stream=True)),
            flags={"END_STREAM"},
        )
    )
    return client.reply(1)


def _drain_with_a_held_call(
    serve: Serve, raw: Callable[..., RawClient], loop: asyncio.AbstractEventLoop
) -> tuple[Running, RawClient, Future[None], list[Frame]]:
    """A server stopping (10 s grace) while stream 1 is held; the frames up to GOAWAY."""
    running = serve(streaming=True)
    client = raw(running)
    _open_held_call(client)
    assert poll_until(lambda: running.processor.active == 1, timeout=5) is not None
    stopping: Future[None] = asyncio.run_coroutine_threadsafe(running.server.stop(10), loop)
    frames = client.frames_until(lambda f: isinstance(f, GoAwayFrame))
    return running, client, stopping, frames


def _assert_held_call_answered(reply: Reply) -> None:
    assert reply.status == b"0", reply
    answers = responses(bytes(reply.data))
    assert set_headers(answers[0]) == ROUTED
    echoed = [a.request_body.response.body_mutation.streamed_response.body for a in answers[1:]]
    assert b"".join(echoed) == b'{"model": "food-review-1", "messages": []}'


def test_raw_stop_sends_goaway_and_lets_the_open_call_finish(
    serve: Serve, raw: Callable[..., RawClient], loop: asyncio.AbstractEventLoop
) -> None:
    running, client, stopping, frames = _drain_with_a_held_call(serve, raw, loop)
    [*_, goaway] = frames
    assert isinstance(goaway, GoAwayFrame)
    assert goaway.error_code == ErrorCodes.NO_ERROR and goaway.last_stream_id == 1
    time.sleep(0.2)
    assert not stopping.done(), "stop() did not wait for the open call"
    finished_at = time.monotonic()
    _assert_held_call_answered(_finish_held_call(client))
    assert client.closed_within(2), "the connection stayed open after its last call"
    stopping.result(3)
    assert time.monotonic() - finished_at < 3  # not the 10 s grace
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", running.port), timeout=1).close()


def test_raw_new_stream_after_goaway_is_refused(
    serve: Serve, raw: Callable[..., RawClient], loop: asyncio.AbstractEventLoop
) -> None:
    running, client, stopping, _ = _drain_with_a_held_call(serve, raw, loop)
    client.send(
        HeadersFrame(3, client.block(), flags={"END_HEADERS"}),
        DataFrame(3, ROUTED_CALL, flags={"END_STREAM"}),
    )
    refused = client.reply(3)
    assert refused.reset == ErrorCodes.REFUSED_STREAM and not refused.headers
    assert running.processor.active == 1  # stream 3 never became a call
    _assert_held_call_answered(_finish_held_call(client))
    stopping.result(5)


def _literal_indexed(name: bytes, value: bytes) -> bytes:
    """HPACK 'literal with incremental indexing, new name' (short strings only)."""
    assert len(name) < 127 and len(value) < 127
    return b"\x40" + bytes((len(name),)) + name + bytes((len(value),)) + value


def _literal(name: bytes, value: bytes) -> bytes:
    """HPACK 'literal without indexing, new name'."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


def test_raw_repeated_header_block_is_decoded_against_the_current_table(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    """The same HPACK bytes mean different headers once the dynamic table changed.

    Block R refers to dynamic entry 62. It is sent once while entry 62 is the health
    Check path, then again after a block that inserts two entries (each evicting the
    one before, the table being 100 bytes): entry 62 is then the Process path.
    """
    client = raw(serve())
    common = b"".join(
        _literal(n, v) for n, v in request_headers() if n not in (b":path", b":authority")
    )
    size_update = b"\x3f\x45"  # dynamic table size update to 100
    first = size_update + _literal_indexed(b":path", HEALTH_CHECK) + _literal(b":authority", b"h")
    repeated = b"\xbe" + _literal(b":authority", b"h")  # indexed: dynamic entry 62
    two_inserts = _literal_indexed(b":authority", b"x" * 30) + _literal_indexed(b":path", PROCESS)
    blocks = [first + common, repeated + common, two_inserts + common, repeated + common]
    # What those blocks mean, by an independent HPACK decoder.
    reference = hpack.Decoder()
    paths = [dict(reference.decode(b, raw=True))[b":path"] for b in blocks]
    assert paths == [HEALTH_CHECK, HEALTH_CHECK, PROCESS, PROCESS]

    health_request = grpc_frame(health_pb2.HealthCheckRequest(service="").SerializeToString())
    for stream_id, block, path in zip((1, 3, 5, 7), blocks, paths, strict=True):
        client.send(
            HeadersFrame(stream_id, block, flags={"END_HEADERS"}),
            DataFrame(
                stream_id,
                ROUTED_CALL if path == PROCESS else health_request,
                flags={"END_STREAM"},
            ),
        )
        reply = client.reply(stream_id)
        if path == PROCESS:
            stale = health_pb2.HealthCheckResponse(status=SERVING).SerializeToString()
            assert grpc_messages(bytes(reply.data)) != [stale], (
                f"stream {stream_id} (:path {path.decode()}) was answered by Health/Check"
            )
            assert_routed(reply)
        else:
            assert reply.status == b"0"
            [answer] = grpc_messages(bytes(reply.data))
            assert health_pb2.HealthCheckResponse.FromString(answer).status == SERVING


# --- RFC 9113 conformance: request headers --------------------------------------------------

GRPC_REQUEST = request_headers()
FIN = {"END_HEADERS", "END_STREAM"}
GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]


def _with(*extra: tuple[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    return [*GRPC_REQUEST, *extra]


def _without(name: bytes) -> list[tuple[bytes, bytes]]:
    return [(n, v) for n, v in GRPC_REQUEST if n != name]


def _replaced(name: bytes, value: bytes) -> list[tuple[bytes, bytes]]:
    return [(n, value if n == name else v) for n, v in GRPC_REQUEST]


MALFORMED_REQUESTS = {
    "upper-case name": _with((b"X-Request-Id", b"1")),
    "space in name": _with((b"x request", b"1")),
    "colon in name": _with((b"x:y", b"1")),
    "empty name": _with((b"", b"1")),
    "cr-lf in value": _with((b"x-request-id", b"1\r\nx-evil: 1")),
    "nul in value": _with((b"x-request-id", b"1\x002")),
    "value with leading space": _with((b"x-request-id", b" 1")),
    "lf in value": _with((b"x-request-id", b"1\n2")),
    "value ending in a tab": _with((b"x-request-id", b"1\t")),
    "unknown pseudo-header": _with((b":token", b"x")),
    "response pseudo-header": [(b":status", b"200"), *GRPC_REQUEST],
    "pseudo-header after a regular field": [*_without(b":authority"), (b":authority", b"h")],
    "connection header": _with((b"connection", b"keep-alive")),
    "transfer-encoding": _with((b"transfer-encoding", b"chunked")),
    "upgrade": _with((b"upgrade", b"h2c")),
    "te other than trailers": _replaced(b"te", b"trailers, deflate"),
    "empty :path": _replaced(b":path", b""),
    "no :method": _without(b":method"),
    "no :scheme": _without(b":scheme"),
    "no :path": _without(b":path"),
    "duplicated :method": [(b":method", b"POST"), *GRPC_REQUEST],
    "duplicated :path": [(b":path", PROCESS), *GRPC_REQUEST],
    "content-length not a number": _with((b"content-length", b"12a")),
    "two content-lengths that differ": _with((b"content-length", b"1"), (b"content-length", b"2")),
    "CONNECT with :path": _replaced(b":method", b"CONNECT"),
}


@pytest.mark.parametrize("fields", MALFORMED_REQUESTS.values(), ids=MALFORMED_REQUESTS.keys())
def test_header_block_malformed_request_is_named(fields: list[tuple[bytes, bytes]]) -> None:
    assert h2grpc.HeaderBlock(fields).request_error is not None


def test_header_block_well_formed_requests() -> None:
    grpc_call = h2grpc.HeaderBlock(
        _with((b"user-agent", b"grpc c\t1"), (b"x-empty", b""), (b"content-length", b"10"))
    )
    assert grpc_call.request_error is None
    assert grpc_call.grpc and grpc_call.path == PROCESS and grpc_call.content_length == 10
    for fields, method in (
        (
            [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b"accept", b"*")],
            b"GET",
        ),
        ([(b":method", b"CONNECT"), (b":authority", b"example:443")], b"CONNECT"),
        (_replaced(b"content-type", b"application/json"), b"POST"),
    ):
        block = h2grpc.HeaderBlock(fields)
        assert block.request_error is None, fields
        assert not block.grpc and block.method == method
    assert h2grpc.HeaderBlock(_replaced(b"content-type", b"application/grpc+proto")).grpc


def test_header_block_trailers() -> None:
    assert h2grpc.HeaderBlock([(b"x-checksum", b"1")]).trailer_error is None
    assert h2grpc.HeaderBlock([]).trailer_error is None
    assert h2grpc.HeaderBlock([(b":method", b"POST")]).trailer_error is not None
    assert h2grpc.HeaderBlock([(b"Upper", b"1")]).trailer_error is not None
    # A request block's own trailer check is separate: pseudo-headers belong there.
    assert h2grpc.HeaderBlock(GRPC_REQUEST).trailer_error is not None


def test_header_decoder_caches_the_checked_block() -> None:
    """A repeated block comes from the cache with its checks done; a malformed one too."""
    decoder, encoder = h2grpc.HeaderDecoder(), hpack.Encoder()
    for fields in (GRPC_REQUEST, MALFORMED_REQUESTS["upper-case name"]):
        decoder.decode(encoder.encode(fields))  # the first block fills the table
        repeated = encoder.encode(fields)  # references to it only
        first = decoder.decode(repeated)
        assert decoder.decode(repeated) is first
        assert (first[0].request_error is None) == (fields is GRPC_REQUEST)


def test_header_decoder_checks_by_shape() -> None:
    """Blocks that change the table every call (grpc-go sends a new grpc-timeout each time)
    miss the block cache; their checks are reused by names and significant values, and a
    malformed value, another content-type, :path or te is still judged on its own."""
    decoder, encoder = h2grpc.HeaderDecoder(), hpack.Encoder()
    base = _with((b"user-agent", b"grpc-go/1.56.3"))
    timeout = 0

    def checked(replace: tuple[bytes, bytes] | None = None) -> h2grpc.HeaderBlock:
        nonlocal timeout
        timeout += 1
        fields = [(n, replace[1] if replace and n == replace[0] else v) for n, v in base]
        fields.append((b"grpc-timeout", b"%du" % timeout))
        block, decoded = decoder.decode(encoder.encode(fields))
        assert decoded == fields  # this block's own fields, not the shape's first
        return block

    first = checked()
    assert first.request_error is None and first.grpc and first.path == PROCESS
    assert checked() is first  # same shape: checked once
    for name, value, why in (
        (b"user-agent", b"bad\x00agent", "invalid field value"),
        (b"user-agent", b" leading space", "invalid field value"),
        (b"te", b"gzip", "te other than trailers"),
        (b":path", b"", "no or empty :path"),
    ):
        assert checked((name, value)).request_error == why, (name, value)
        assert checked() is first
    other = checked((b"content-type", b"application/json"))
    assert other.request_error is None and not other.grpc
    health = checked((b":path", HEALTH_CHECK))
    assert health.path == HEALTH_CHECK and health.grpc


def test_header_decoder_reads_indexed_blocks_as_hpack_does() -> None:
    """A block of table references alone is read from the table directly: the same
    fields as hpack's decoder, static and dynamic entries alike, and an index past the
    table is still a decoding error."""
    decoder, reference, encoder = h2grpc.HeaderDecoder(), hpack.Decoder(), hpack.Encoder()
    for timeout in range(1, 40):  # each call a new grpc-timeout: the table moves every time
        fields = _with(
            (b"user-agent", b"grpc-go/1.56.3"), (b"grpc-timeout", b"%du" % (timeout % 7))
        )
        block = encoder.encode(fields)
        expected = reference.decode(block, raw=True)
        _, decoded = decoder.decode(block)
        assert decoded == expected == fields
    indexed = encoder.encode(fields)
    assert min(indexed) > 0x80  # references only
    assert decoder.decode(indexed)[1] == fields
    with pytest.raises(hpack.HPACKDecodingError):
        h2grpc.HeaderDecoder().decode(indexed)  # a fresh table has no such entries


def expect_stream_error(client: RawClient, stream_id: int, code: ErrorCodes) -> None:
    """The server resets `stream_id` with `code`, and does not end the connection."""
    frames = client.frames_until(
        lambda f: isinstance(f, RstStreamFrame | GoAwayFrame) and f.stream_id in (0, stream_id)
    )
    last = frames[-1]
    assert isinstance(last, RstStreamFrame), f"a connection error, not a stream error: {last}"
    assert last.error_code == code, f"RST_STREAM {ErrorCodes(last.error_code)!r}, not {code!r}"


def expect_connection_error(client: RawClient, code: ErrorCodes) -> None:
    """The server sends GOAWAY with `code` and closes the connection."""
    frames = client.frames_until(lambda f: isinstance(f, GoAwayFrame))
    goaway = frames[-1]
    assert isinstance(goaway, GoAwayFrame)
    assert goaway.error_code == code, f"GOAWAY {ErrorCodes(goaway.error_code)!r}, not {code!r}"
    assert client.closed_within(2)


def assert_connection_goes_on(client: RawClient, stream_id: int) -> None:
    """A routed call on `stream_id` of the same connection is answered."""
    client.send(
        HeadersFrame(stream_id, client.block(), flags={"END_HEADERS"}),
        DataFrame(stream_id, ROUTED_CALL, flags={"END_STREAM"}),
    )
    assert_routed(client.reply(stream_id))


@pytest.mark.parametrize(
    "fields",
    [MALFORMED_REQUESTS[k] for k in ("upper-case name", "response pseudo-header", "no :path")],
    ids=["upper-case name", "response pseudo-header", "no :path"],
)
def test_raw_malformed_request_is_reset_and_the_connection_goes_on(
    serve: Serve, raw: Callable[..., RawClient], fields: list[tuple[bytes, bytes]]
) -> None:
    running = serve()
    client = raw(running)
    client.send(HeadersFrame(1, client.encoder.encode(fields), flags={"END_HEADERS"}))
    client.send(DataFrame(1, ROUTED_CALL, flags={"END_STREAM"}))  # ignored: stream 1 is reset
    expect_stream_error(client, 1, ErrorCodes.PROTOCOL_ERROR)
    assert running.processor.active == 0  # it never became a call
    assert_connection_goes_on(client, 3)


@pytest.mark.parametrize("ending", ["one-frame", "two-frames", "trailers", "headers-only"])
def test_raw_content_length_must_match_the_data(
    serve: Serve, raw: Callable[..., RawClient], ending: str
) -> None:
    client = raw(serve())
    size = str(len(ROUTED_CALL) + 1).encode()  # one byte more than will come
    fields = client.encoder.encode(_with((b"content-length", size)))
    if ending == "headers-only":
        client.send(HeadersFrame(1, fields, flags=FIN))
    else:
        client.send(HeadersFrame(1, fields), ContinuationFrame(1, b"", flags={"END_HEADERS"}))
    if ending == "one-frame":
        client.send(DataFrame(1, ROUTED_CALL, flags={"END_STREAM"}))
    elif ending == "two-frames":  # too much: caught before the end
        client.send(DataFrame(1, ROUTED_CALL[:10]), DataFrame(1, ROUTED_CALL[10:] + b"xx"))
    elif ending == "trailers":
        client.send(DataFrame(1, ROUTED_CALL))
        client.send(HeadersFrame(1, client.encoder.encode([(b"x-checksum", b"1")]), flags=FIN))
    expect_stream_error(client, 1, ErrorCodes.PROTOCOL_ERROR)
    # The same call with the right length is answered.
    size = str(len(ROUTED_CALL)).encode()
    client.send(
        HeadersFrame(
            3, client.encoder.encode(_with((b"content-length", size))), flags={"END_HEADERS"}
        ),
        DataFrame(3, ROUTED_CALL, flags={"END_STREAM"}),
    )
    assert_routed(client.reply(3))


def test_raw_trailers_are_checked(serve: Serve, raw: Callable[..., RawClient]) -> None:
    client = raw(serve())
    trailers = {"END_HEADERS", "END_STREAM"}
    client.send(HeadersFrame(1, client.block(), flags={"END_HEADERS"}), DataFrame(1, ROUTED_CALL))
    client.send(HeadersFrame(1, client.encoder.encode([(b":path", b"/x")]), flags=trailers))
    expect_stream_error(client, 1, ErrorCodes.PROTOCOL_ERROR)
    # Well-formed trailers end the request like END_STREAM on DATA.
    client.send(HeadersFrame(3, client.block(), flags={"END_HEADERS"}), DataFrame(3, ROUTED_CALL))
    client.send(HeadersFrame(3, client.encoder.encode([(b"x-checksum", b"1")]), flags=trailers))
    assert_routed(client.reply(3))


@pytest.mark.parametrize(
    ("method", "status"), [(b"GET", b"405"), (b"POST", b"415")], ids=["GET", "POST-json"]
)
def test_raw_a_request_that_is_not_grpc_gets_an_http_answer(
    serve: Serve, raw: Callable[..., RawClient], method: bytes, status: bytes
) -> None:
    client = raw(serve())
    fields = [
        (b":method", method),
        (b":scheme", b"http"),
        (b":path", b"/v1/chat/completions"),
        (b"content-type", b"application/json"),
    ]
    end = {"END_HEADERS"} if method == b"POST" else {"END_HEADERS", "END_STREAM"}
    client.send(HeadersFrame(1, client.encoder.encode(fields), flags=end))
    if method == b"POST":
        client.send(DataFrame(1, b'{"model": "x"}', flags={"END_STREAM"}))
    reply = client.reply(1)
    assert reply.headers[b":status"] == status
    assert reply.headers[b"content-type"].startswith(b"text/plain")
    assert b"gRPC" in reply.data
    assert reply.headers[b"content-length"] == str(len(reply.data)).encode()
    assert reply.status == b"12"  # UNIMPLEMENTED, for a gRPC client that mislabelled itself


def test_raw_a_head_request_gets_headers_only(serve: Serve, raw: Callable[..., RawClient]) -> None:
    client = raw(serve())
    head = [(b":method", b"HEAD"), (b":scheme", b"https"), (b":path", b"/")]
    client.send(HeadersFrame(1, client.encoder.encode(head), flags=FIN))
    frames = client.frames_until(lambda f: f.stream_id == 1 and "END_STREAM" in f.flags)
    [answer] = [f for f in frames if f.stream_id == 1]
    assert isinstance(answer, HeadersFrame)
    assert dict(client.decoder.decode(answer.data, raw=True))[b":status"] == b"405"
    assert_connection_goes_on(client, 3)


# --- RFC 9113 conformance: stream states -------------------------------------------------------


def _ping_acked(client: RawClient) -> list[Frame]:
    """Frames up to the answer to a PING: the server read everything sent before it."""
    client.send(PingFrame(0, b"conform!"))
    return client.frames_until(lambda f: isinstance(f, PingFrame) and "ACK" in f.flags)


def test_raw_data_on_a_half_closed_stream_is_stream_closed(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    client = raw(serve())
    # A request the client has ended, whose answer waits for a window (0): half-closed.
    client.send(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0}))
    client.send(HeadersFrame(1, client.encoder.encode(GET), flags=FIN))
    client.frames_until(lambda f: isinstance(f, HeadersFrame) and f.stream_id == 1)
    client.send(DataFrame(1, b"more"))
    expect_stream_error(client, 1, ErrorCodes.STREAM_CLOSED)
    client.send(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535}))
    assert_connection_goes_on(client, 3)


def test_raw_frames_after_the_servers_reset_are_ignored(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    """An answer before the request ended resets the stream (NO_ERROR); what the client
    had already sent on it is then dropped quietly, as RFC 9113 §5.1 requires: Envoy
    races its body against bbr's early answer, and must not lose the connection."""
    client = raw(serve())
    client.send(HeadersFrame(1, client.block(b"/no.such/Method"), flags={"END_HEADERS"}))
    reply = client.reply(1)
    assert reply.status == b"12"
    client.send(DataFrame(1, b"late"), HeadersFrame(1, client.encoder.encode([]), flags=FIN))
    seen = _ping_acked(client)
    errors = [f for f in seen if isinstance(f, GoAwayFrame | RstStreamFrame) and f.error_code]
    assert not errors, errors
    assert_connection_goes_on(client, 3)


def test_raw_data_after_the_clients_reset_is_stream_closed(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    client = raw(serve())
    client.send(HeadersFrame(1, client.block(), flags={"END_HEADERS"}))
    client.send(RstStreamFrame(1, error_code=ErrorCodes.CANCEL), DataFrame(1, b"late"))
    expect_stream_error(client, 1, ErrorCodes.STREAM_CLOSED)
    assert_connection_goes_on(client, 3)


def test_raw_headers_after_both_ends_is_a_connection_error(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    client = raw(serve())
    client.send(HeadersFrame(1, client.block(), flags={"END_HEADERS"}))
    client.send(DataFrame(1, ROUTED_CALL, flags={"END_STREAM"}))
    assert_routed(client.reply(1))
    client.send(HeadersFrame(1, client.block(), flags=FIN))
    expect_connection_error(client, ErrorCodes.STREAM_CLOSED)


def test_raw_stream_ids_must_grow(serve: Serve, raw: Callable[..., RawClient]) -> None:
    client = raw(serve())
    client.send(HeadersFrame(5, client.block(), flags={"END_HEADERS"}))
    client.send(HeadersFrame(3, client.block(), flags={"END_HEADERS"}))
    expect_connection_error(client, ErrorCodes.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    "sent",
    [
        RstStreamFrame(1, error_code=ErrorCodes.CANCEL),
        h2grpc.frame(h2grpc.WINDOW_UPDATE, 0, 1, struct.pack(">L", 100)),
        DataFrame(1, b"x"),
        RstStreamFrame(2, error_code=ErrorCodes.CANCEL),  # even: never a client's stream
    ],
    ids=["RST_STREAM", "WINDOW_UPDATE", "DATA", "RST_STREAM-even"],
)
def test_raw_frame_on_an_idle_stream_is_a_protocol_error(
    serve: Serve, raw: Callable[..., RawClient], sent: Frame | bytes
) -> None:
    client = raw(serve())
    client.send(sent)
    expect_connection_error(client, ErrorCodes.PROTOCOL_ERROR)


def test_raw_window_update_and_rst_after_the_end_are_accepted(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    client = raw(serve())
    client.send(HeadersFrame(1, client.block(), flags={"END_HEADERS"}))
    client.send(DataFrame(1, ROUTED_CALL, flags={"END_STREAM"}))
    assert_routed(client.reply(1))
    client.send(
        h2grpc.frame(h2grpc.WINDOW_UPDATE, 0, 1, struct.pack(">L", 100)),
        RstStreamFrame(1, error_code=ErrorCodes.CANCEL),
    )
    seen = _ping_acked(client)
    assert not [f for f in seen if isinstance(f, GoAwayFrame | RstStreamFrame)], seen


def test_stream_states_as_the_connection_sees_them(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    running = serve(streaming=True)
    client = raw(running)
    _open_held_call(client)  # stream 1: open, the server holding its body
    _ping_acked(client)
    [conn] = running.server.connections
    state, closed_by = conn.stream_state, conn.closed_by
    assert [state(1), state(3), state(2)] == [
        h2grpc.StreamState.OPEN,
        h2grpc.StreamState.IDLE,
        h2grpc.StreamState.IDLE,
    ]
    client.send(HeadersFrame(3, client.block(), flags=FIN))  # half-closed (remote) at once
    client.send(HeadersFrame(5, client.block(), flags={"END_HEADERS"}))
    client.send(RstStreamFrame(5, error_code=ErrorCodes.CANCEL))
    _ping_acked(client)
    assert state(1) is h2grpc.StreamState.OPEN
    assert state(3) is h2grpc.StreamState.CLOSED  # answered at once: empty request
    assert closed_by(3) is h2grpc.ClosedBy.END_STREAM
    assert state(5) is h2grpc.StreamState.CLOSED and closed_by(5) is h2grpc.ClosedBy.RECEIVED_RST
    _assert_held_call_answered(_finish_held_call(client))
    assert state(1) is h2grpc.StreamState.CLOSED and closed_by(1) is h2grpc.ClosedBy.END_STREAM


def test_raw_streams_beyond_the_advertised_limit_are_refused(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    client = raw(serve())
    client.send(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0}))
    # Answers that cannot be sent (window 0) keep every stream open.
    limit = h2grpc.MAX_STREAMS
    client.send(
        *(HeadersFrame(1 + 2 * i, client.encoder.encode(GET), flags=FIN) for i in range(limit))
    )
    last = 1 + 2 * limit
    client.send(HeadersFrame(last, client.encoder.encode(GET), flags=FIN))
    expect_stream_error(client, last, ErrorCodes.REFUSED_STREAM)


# --- RFC 9113 conformance: frames ------------------------------------------------------------


def test_raw_priority_frames_are_checked(serve: Serve, raw: Callable[..., RawClient]) -> None:
    client = raw(serve())
    client.send(h2grpc.frame(h2grpc.PRIORITY, 0, 1, b"\x00\x00\x00\x00"))  # 4 bytes, not 5
    expect_stream_error(client, 1, ErrorCodes.FRAME_SIZE_ERROR)
    client.send(h2grpc.frame(h2grpc.PRIORITY, 0, 3, b"\x00\x00\x00\x03\x10"))  # on itself
    expect_stream_error(client, 3, ErrorCodes.PROTOCOL_ERROR)
    head = HeadersFrame(5, client.block(), flags={"END_HEADERS", "PRIORITY"})
    head.depends_on, head.stream_weight = 5, 16
    client.send(head)
    expect_stream_error(client, 5, ErrorCodes.PROTOCOL_ERROR)
    client.send(h2grpc.frame(h2grpc.PRIORITY, 0, 9, b"\x00\x00\x00\x00\x10"))  # fine: ignored
    assert_connection_goes_on(client, 7)
    client.send(h2grpc.frame(h2grpc.PRIORITY, 0, 0, b"\x00\x00\x00\x01\x10"))
    expect_connection_error(client, ErrorCodes.PROTOCOL_ERROR)


@pytest.mark.parametrize(
    ("sent", "code"),
    [
        (
            h2grpc.frame(h2grpc.SETTINGS, h2grpc.ACK, 0, b"\x00\x02\x00\x00\x00\x00"),
            "FRAME_SIZE_ERROR",
        ),
        (SettingsFrame(0, settings={SettingsFrame.ENABLE_PUSH: 2}), "PROTOCOL_ERROR"),
        (
            SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 2**31}),
            "FLOW_CONTROL_ERROR",
        ),
        (SettingsFrame(0, settings={SettingsFrame.MAX_FRAME_SIZE: 16383}), "PROTOCOL_ERROR"),
        (h2grpc.frame(h2grpc.PING, 0, 1, b"12345678"), "PROTOCOL_ERROR"),
        (h2grpc.frame(h2grpc.PING, 0, 0, b"1234567"), "FRAME_SIZE_ERROR"),
        (h2grpc.frame(h2grpc.RST_STREAM, 0, 0, b"\x00\x00\x00\x08"), "PROTOCOL_ERROR"),
        (h2grpc.frame(h2grpc.GOAWAY, 0, 1, b"\x00" * 8), "PROTOCOL_ERROR"),
        (h2grpc.frame(h2grpc.WINDOW_UPDATE, 0, 0, b"\x7f\xff\xff\xff"), "FLOW_CONTROL_ERROR"),
    ],
    ids=[
        "SETTINGS-ACK-with-payload",
        "ENABLE_PUSH-2",
        "INITIAL_WINDOW_SIZE-2^31",
        "MAX_FRAME_SIZE-too-small",
        "PING-on-a-stream",
        "PING-7-bytes",
        "RST_STREAM-on-stream-0",
        "GOAWAY-on-a-stream",
        "connection-window-past-2^31-1",
    ],
)
def test_raw_bad_frame_is_a_connection_error(
    serve: Serve, raw: Callable[..., RawClient], sent: Frame | bytes, code: str
) -> None:
    client = raw(serve())
    client.send(sent)
    expect_connection_error(client, ErrorCodes[code])


def test_raw_stream_window_past_the_maximum_is_a_stream_error(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    client = raw(serve())
    client.send(HeadersFrame(1, client.block(), flags={"END_HEADERS"}))
    increment = struct.pack(">L", 2**31 - 1)
    client.send(h2grpc.frame(h2grpc.WINDOW_UPDATE, 0, 1, increment))
    expect_stream_error(client, 1, ErrorCodes.FLOW_CONTROL_ERROR)
    assert_connection_goes_on(client, 3)


def test_raw_bad_padding_on_a_closed_stream_is_still_a_protocol_error(
    serve: Serve, raw: Callable[..., RawClient]
) -> None:
    client = raw(serve())
    client.send(HeadersFrame(1, client.block(b"/no.such/Method"), flags={"END_HEADERS"}))
    client.reply(1)  # answered and reset: stream 1 is closed
    client.send(h2grpc.frame(h2grpc.DATA, h2grpc.PADDED, 1, b"\x06Test"))  # pad 6 > 4 bytes
    expect_connection_error(client, ErrorCodes.PROTOCOL_ERROR)


def test_raw_unknown_frame_types_are_ignored(serve: Serve, raw: Callable[..., RawClient]) -> None:
    client = raw(serve())
    client.send(h2grpc.frame(0x42, 0xFF, 0, b"whatever"), h2grpc.frame(0x43, 0, 1, b"x"))
    seen = _ping_acked(client)
    assert not [f for f in seen if isinstance(f, GoAwayFrame | RstStreamFrame)], seen
    assert_connection_goes_on(client, 1)


def test_closed_streams_remembered_are_bounded(serve: Serve) -> None:
    """Resets are remembered for the last CLOSED_MEMORY streams only, skipped ids for the
    last SKIPPED_MEMORY gaps: a client opening streams for ever cannot grow a
    connection's memory through them. A forgotten reset counts as a normal end."""
    conn = h2grpc.Connection(serve().server)
    for stream_id in range(1, 2001, 2):
        conn.last_stream_id = stream_id
        how = h2grpc.ClosedBy.SENT_RST if stream_id % 3 else h2grpc.ClosedBy.RECEIVED_RST
        conn._remember(stream_id, how)
        conn._skip(stream_id + 10_000, stream_id + 10_000)
    assert len(conn._closed) == h2grpc.CLOSED_MEMORY
    assert len(conn._skipped) == h2grpc.SKIPPED_MEMORY
    assert conn.closed_by(1999) is h2grpc.ClosedBy.SENT_RST
    assert conn.closed_by(1995) is h2grpc.ClosedBy.RECEIVED_RST
    oldest = 1999 - 2 * (h2grpc.CLOSED_MEMORY - 1)
    assert conn.closed_by(oldest) is not h2grpc.ClosedBy.END_STREAM
    assert conn.closed_by(oldest - 2) is h2grpc.ClosedBy.END_STREAM
    assert conn.closed_by(11_999) is h2grpc.ClosedBy.NEVER_OPENED
    assert conn.closed_by(10_001) is h2grpc.ClosedBy.END_STREAM  # gap forgotten
