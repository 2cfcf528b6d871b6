"""A raw HTTP/2 client that sends exactly the frames it is given, for attack tests and floods.

bbr's own server must hold against what well-behaved libraries never send; `Attacker`
writes hand-built frames (`frame`) on one connection and reads back GOAWAY codes.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time

import hpack

EXT_PROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
PROCESS_PATH = f"/{EXT_PROC_SERVICE}/Process"
REFLECTION_PATH = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
ENHANCE_YOUR_CALM = 11
INITIAL_WINDOW_SIZE = 4


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return struct.pack(">BHBBL", size >> 16, size & 0xFFFF, kind, flags, stream_id) + payload


def grpc_message(payload: bytes) -> bytes:
    return b"\x00" + struct.pack(">L", len(payload)) + payload


class Attacker:
    """A raw HTTP/2 client that says and reads only what the test wants."""

    def __init__(self, port: int, *, window: int | None = None, preface: bool = True) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.encoder = hpack.Encoder()
        self.next_stream = 1
        if preface:
            settings = b"" if window is None else struct.pack(">HL", INITIAL_WINDOW_SIZE, window)
            self.send(PREFACE + frame(SETTINGS, 0, 0, settings))

    def send(self, data: bytes, timeout: float = 5.0) -> bool:
        """Send it all; False when bbr closed the connection or stopped reading."""
        self.sock.settimeout(timeout)
        try:
            self.sock.sendall(data)
        except (TimeoutError, OSError):
            return False
        return True

    def headers(self, path: str, *, end_stream: bool = False) -> tuple[int, bytes]:
        stream_id = self.next_stream
        self.next_stream += 2
        block = self.encoder.encode(
            [
                (":method", "POST"),
                (":scheme", "http"),
                (":path", path),
                (":authority", "bbr"),
                ("content-type", "application/grpc"),
                ("te", "trailers"),
            ]
        )
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        return stream_id, frame(HEADERS, flags, stream_id, block)

    def frames_until_closed(
        self, timeout: float = 5.0
    ) -> tuple[list[tuple[int, int, bytes]], bool]:
        """Read until bbr closes or `timeout`: the (type, flags, payload) of each frame it
        sent, and whether it closed (a reset counts as closed)."""
        deadline = time.monotonic() + timeout
        buffer = b""
        frames: list[tuple[int, int, bytes]] = []
        closed = False
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                break
            except OSError:  # reset: closed all the same
                closed = True
                break
            if not chunk:
                closed = True
                break
            buffer += chunk
            while len(buffer) >= 9:
                high, low, kind, flags, _ = struct.unpack_from(">BHBBL", buffer)
                length = (high << 16) | low
                if len(buffer) < 9 + length:
                    break
                frames.append((kind, flags, buffer[9 : 9 + length]))
                buffer = buffer[9 + length :]
        return frames, closed

    def goaway_codes(self, timeout: float = 5.0) -> list[int] | None:
        """Read until bbr closes: the GOAWAY codes it sent; None if it did not close."""
        frames, closed = self.frames_until_closed(timeout)
        if not closed:
            return None
        return [
            struct.unpack_from(">L", payload, 4)[0] for kind, _, payload in frames if kind == GOAWAY
        ]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
