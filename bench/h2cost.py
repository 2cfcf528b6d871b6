"""CPU of bbr's HTTP/2 server (bbr/h2grpc.py) per ext_proc call, in-process.

    python -m bench.h2cost [--calls 20000] [--batch 100] [--repeat 3]

The server runs on an event loop in a thread; a client on raw sockets sends calls as
Envoy does (HEADERS whose HPACK block is, after the first, a few table references, then
one DATA with request_headers + request_body and END_STREAM), `--batch` at a time, and
waits for every call's trailers. What is reported is the loop thread's own CPU time
(time.thread_time), so the client's work is not counted. Two header shapes:

    cached    the same header block every call: the decoder's cache answers it (Envoy)
    decoded   a new `x-request-id` value each call: every block is decoded and validated

Use it to show one change's effect on the hot path: run it before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import hpack
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from bbr import h2grpc
from bbr.decision import Options
from bbr.health import SERVICE_NAME, Health
from bbr.modelmap import MapHolder, parse_file_text
from bbr.service import Processor, h2_server
from harness.h2client import PREFACE, frame

MAP = """
kind: ConfigMap
metadata: {name: llama}
data: {baseModel: meta-llama/Llama-3.1-8B-Instruct, adapters: "- food-review-1"}
"""
CHAT = b'{"messages": [{"role": "user", "content": "hi"}], "model": "food-review-1"}'


def request_messages() -> bytes:
    headers = pb.ProcessingRequest()
    for name, value in ((":method", "POST"), (":path", "/v1/chat/completions")):
        headers.request_headers.headers.headers.add(key=name, raw_value=value.encode())
    headers.request_headers.headers.headers.add(key="content-type", raw_value=b"application/json")
    body = pb.ProcessingRequest()
    body.request_body.body = CHAT
    body.request_body.end_of_stream = True
    out = b""
    for message in (headers, body):
        data = message.SerializeToString()
        out += b"\x00" + struct.pack(">I", len(data)) + data
    return out


def request_headers(extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", f"/{SERVICE_NAME}/Process".encode()),
        (b":authority", b"bbr"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *extra,
    ]


def calls_wire(encoder: hpack.Encoder, first_id: int, count: int, unique: bool) -> bytes:
    """`count` calls as a client sends them: HEADERS, then DATA with END_STREAM."""
    body = request_messages()
    out = []
    for stream_id in range(first_id, first_id + 2 * count, 2):
        extra = [(b"x-request-id", str(stream_id).encode())] if unique else []
        block = encoder.encode(request_headers(extra))
        out.append(frame(1, 0x4, stream_id, block))
        out.append(frame(0, 0x1, stream_id, body))
    return b"".join(out)


# Big windows: the answers never wait for a WINDOW_UPDATE.
GREETING = (
    PREFACE
    + frame(4, 0, 0, struct.pack(">HL", 4, 2**31 - 1))
    + frame(8, 0, 0, struct.pack(">L", 2**31 - 65536))
)


class Client:
    """Raw frames over a socket: enough of HTTP/2 to send calls and count their ends."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.encoder = hpack.Encoder()
        self.next_id = 1
        self.buffer = b""
        self.sock.sendall(GREETING)

    def batch(self, count: int, unique: bool) -> None:
        self.sock.sendall(calls_wire(self.encoder, self.next_id, count, unique))
        self.next_id += 2 * count
        ended = 0
        while ended < count:
            data = self.sock.recv(1 << 20)
            if not data:
                raise RuntimeError("server closed the connection")
            buffer = self.buffer + data
            pos = 0
            while len(buffer) - pos >= 9:
                high, low, kind, flags, _ = struct.unpack_from(">BHBBL", buffer, pos)
                end = pos + 9 + ((high << 16) | low)
                if end > len(buffer):
                    break
                if kind == 3:
                    raise RuntimeError("a call was reset")
                if kind == 1 and flags & 0x1:
                    ended += 1
                pos = end
            self.buffer = buffer[pos:]


class Sink(asyncio.Transport):
    """A transport that keeps only the number of bytes written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.keep = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.keep:
            self.written += data

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        raise RuntimeError("the server closed the connection")

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def pause_reading(self) -> None:  # the server's per-turn frame budget pauses reads
        pass

    def resume_reading(self) -> None:
        pass


def bytecodes(server: h2grpc.Server, batch: int, unique: bool) -> float:
    """Python bytecodes executed per call (deterministic, unlike CPU time on a shared
    machine): one batch fed to a warmed-up connection, counted by a tracer."""
    conn = h2grpc.Connection(server)
    sink = Sink()
    sink.keep = False
    conn.connection_made(sink)
    encoder = hpack.Encoder()
    feed = _feeder(conn)
    warm = 3 * batch  # past every per-connection ramp (caches, rings): the steady state
    feed(GREETING + calls_wire(encoder, 1, warm, unique))
    wire = calls_wire(encoder, 1 + 2 * warm, batch, unique)
    count = 0

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal count
        count += event == "opcode"
        return local

    def start(frame: FrameType, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return local

    sink.keep = True
    sys.settrace(start)
    try:
        feed(wire)
    finally:
        sys.settrace(None)
    answered = bytes(sink.written).count(b"grpc-status")
    assert answered == batch, f"{answered} of {batch} calls answered: the count is not per call"
    conn.connection_lost(None)
    return count / batch


def _feeder(conn: h2grpc.Connection) -> Callable[[bytes], None]:
    def feed(data: bytes) -> None:
        view = memoryview(data)
        while view:
            room = conn.get_buffer(-1)
            size = min(len(room), len(view))
            room[:size] = view[:size]
            view = view[size:]
            conn.buffer_updated(size)

    return feed


def in_frames(server: h2grpc.Server, calls: int, batch: int, unique: bool) -> float:
    """CPU seconds of the server's frame handling alone: no sockets, no event loop turns."""
    conn = h2grpc.Connection(server)
    sink = Sink()
    conn.connection_made(sink)
    encoder = hpack.Encoder()
    feed = _feeder(conn)
    feed(GREETING + calls_wire(encoder, 1, batch, unique))  # warm: tables, caches
    answers = bytes(sink.written)
    assert answers.count(b"grpc-status") == batch and b"\x00\x00\x04\x03" not in answers
    sink.keep = False
    wires = [calls_wire(encoder, 1 + 2 * n, batch, unique) for n in range(batch, calls, batch)]
    start = time.process_time()
    for wire in wires:
        feed(wire)
    cpu = time.process_time() - start
    conn.connection_lost(None)
    return cpu * calls / (calls - batch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--mode",
        choices=["frames", "socket", "bytecodes"],
        default="frames",
        help="frames: bytes handed to the connection in-process (default, least noise); "
        "socket: a client on a real socket, the loop thread's CPU; "
        "bytecodes: Python bytecodes per call, exact and repeatable",
    )
    args = parser.parse_args(argv)
    logging.disable(logging.INFO)  # the request log is not the transport's cost
    try:
        return _measure(args)
    finally:
        logging.disable(logging.NOTSET)  # called in-process (tests/test_bench.py)


def _measure(args: argparse.Namespace) -> int:
    holder = MapHolder()
    holder.publish("bench", parse_file_text(MAP, path="m.yaml").configs)
    limit = 16 * 1024 * 1024 + 65536
    # In-process the loop never turns between feeds, so frames left for the next turn
    # would never be handled: no per-turn frame budget here (its bookkeeping still runs).
    unturned = h2grpc.Limits(frames_per_turn=2**31)

    if args.mode == "bytecodes":
        for shape, unique in (("cached", False), ("decoded", True)):
            server = h2_server(
                Processor(holder, Options(), streaming=False), Health(), limit, unturned
            )
            per_call = asyncio.run(_async(bytecodes, server, args.batch, unique))
            print(f"{shape:8} {per_call:,.0f} Python bytecodes per call")
        return 0
    if args.mode == "frames":

        async def run(unique: bool) -> float:
            server = h2_server(
                Processor(holder, Options(), streaming=False), Health(), limit, unturned
            )
            return in_frames(server, args.calls, args.batch, unique)

        measure: Callable[[bool], float] = lambda unique: asyncio.run(run(unique))  # noqa: E731
    else:
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()

        async def start() -> int:
            processor = Processor(holder, Options(), streaming=False)
            return await h2_server(processor, Health(), limit).listen("127.0.0.1", 0)

        port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)

        def loop_cpu() -> float:
            done = asyncio.run_coroutine_threadsafe(_thread_time(), loop)
            return done.result(5)

        def measure(unique: bool) -> float:
            client = Client(port)
            client.batch(args.batch, unique)  # warm: tables, caches
            before = loop_cpu()
            for _ in range(args.calls // args.batch):
                client.batch(args.batch, unique)
            cpu = loop_cpu() - before
            client.sock.close()
            return cpu

    for shape, unique in (("cached", False), ("decoded", True)):
        best = min(measure(unique) for _ in range(args.repeat))
        per_call = best / args.calls * 1e6
        print(f"{shape:8} {args.calls} calls: server CPU {best:.3f} s ({per_call:.1f} µs/call)")
    return 0


async def _async(fn: Callable[..., float], *args: object) -> float:
    return fn(*args)  # on a running loop: calls may set timers


async def _thread_time() -> float:
    return time.thread_time()


if __name__ == "__main__":
    raise SystemExit(main())
