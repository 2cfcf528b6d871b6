"""gRPC over HTTP/2 for the ext_proc port, served straight from an asyncio Protocol.

grpc.aio spends ~650 µs of CPU per ext_proc stream — a task per call, completion-queue
round trips through a poller thread, eventfd wake-ups — against ~30 µs of bbr's own
work (docs/performance.md). This server reads HTTP/2 frames off the socket and hands
each complete gRPC message to its call synchronously: no task, no queue, one write per
socket read. It speaks what Envoy and gRPC clients use on this port: h2c with prior
knowledge (or h2 over TLS via ALPN), flow control both ways, length-prefixed
uncompressed messages, trailers, GOAWAY for draining.

What a call does with its messages lives elsewhere (`bbr.server`); this module knows
HTTP/2 and gRPC framing only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import struct
import urllib.parse
from collections import deque
from collections.abc import Callable
from typing import ClassVar

import hpack

from bbr.logs import fields

log = logging.getLogger("bbr.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

# Error codes (RFC 9113 §7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 5, 6, 7, 8, 9
ENHANCE_YOUR_CALM = 11

# Settings.
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 1, 2, 3, 4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 5, 6

# gRPC status codes.
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 1, 2, 3, 4, 5
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14

DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
FRAME_LIMIT = 16384  # the largest frame we accept (the protocol's default)
STREAM_WINDOW = 8 * 1024 * 1024  # what one stream may send before we acknowledge it
CONNECTION_WINDOW = 64 * 1024 * 1024
MAX_STREAMS = 1024
HEADER_LIST_LIMIT = 64 * 1024
MESSAGE_DETAIL_LIMIT = 512  # characters of grpc-message we send (before percent-encoding)

_FRAME = struct.Struct(">BHBBL")  # length (24 bits as 8 + 16), type, flags, stream id
_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")


def _frame_head(size: int, kind: int, flags: int, stream_id: int) -> bytes:
    return _FRAME.pack(size >> 16, size & 0xFFFF, kind, flags, stream_id)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _frame_head(len(payload), kind, flags, stream_id) + payload


# --- HPACK -------------------------------------------------------------------------------


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """A header field 'without indexing, new name': nothing enters the peer's table."""
    return b"\x00" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value


# :status 200 (static index 8) and content-type (static name 31): application/grpc.
RESPONSE_HEADERS = b"\x88" + b"\x0f\x10" + _hpack_int(16, 7, 0) + b"application/grpc"
OK_TRAILERS = literal(b"grpc-status", b"0")


def trailers_block(code: int, message: str = "") -> bytes:
    block = literal(b"grpc-status", str(code).encode())
    if message:
        # gRPC's percent-encoding: printable ASCII except '%' goes as is.
        encoded = urllib.parse.quote(
            message[:MESSAGE_DETAIL_LIMIT], safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"
        )
        block += literal(b"grpc-message", encoded.encode())
    return block


class HeaderDecoder:
    """hpack's decoder, with repeated header blocks answered from a cache.

    A gRPC client sends the same headers on every call, and after the first they are
    all references to the table (a few bytes). Decoding such a block changes nothing, so
    its result only depends on the table: while the table is unchanged, the same bytes
    give the same headers. Every insertion and resize is counted, and any change empties
    the cache; a block whose decoding changed the table is never cached.
    """

    __slots__ = ("_cache", "_changes", "_decoder", "_state")

    def __init__(self) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=HEADER_LIST_LIMIT)
        self._cache: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._changes = 0
        table = self._decoder.header_table
        add = table.add

        def counted_add(name: bytes, value: bytes) -> None:
            self._changes += 1
            add(name, value)

        table.add = counted_add  # type: ignore[method-assign]
        self._state = self._table_state()

    def _table_state(self) -> tuple[int, int]:
        return (self._changes, self._decoder.header_table.maxsize)

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        found = self._cache.get(block)
        if found is not None:
            return found
        headers: list[tuple[bytes, bytes]] = self._decoder.decode(block, raw=True)  # type: ignore[assignment]
        state = self._table_state()
        if state != self._state:
            self._state = state
            self._cache.clear()
        elif len(self._cache) < 64 and len(block) <= 512:
            self._cache[block] = headers
        return headers


class H2Error(Exception):
    """The peer broke HTTP/2: the connection ends with GOAWAY and this code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


# --- calls -------------------------------------------------------------------------------


class Call:
    """One gRPC call (one HTTP/2 stream). Subclasses answer messages."""

    __slots__ = (
        "_buffer",
        "conn",
        "done",
        "headers_sent",
        "pending",
        "remote_closed",
        "send_window",
        "stream_id",
        "trailers",
        "unacked",
    )

    def __init__(self, conn: Connection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.send_window = conn.peer_initial_window
        self.unacked = 0
        self.headers_sent = False
        self.remote_closed = False
        self.done = False
        self._buffer = bytearray()
        self.pending: deque[memoryview] = deque()
        self.trailers: bytes | None = None

    # -- what subclasses implement --

    def message(self, data: memoryview) -> None:
        """One complete request message, valid during this call only (copy to keep it)."""

    def half_closed(self) -> None:
        """The client sent END_STREAM: by default, end the call with OK."""
        self.finish(OK)

    def start(self) -> None:
        """The call is registered; `remote_closed` tells whether requests will follow."""

    def closed(self) -> None:
        """The call is over (finished, reset or connection lost): free what it holds."""

    # -- what subclasses use --

    def send(self, payload: bytes) -> None:
        if not self.done:
            self.conn.send_message(self, payload)

    def finish(self, code: int = OK, message: str = "") -> None:
        if not self.done:
            self.conn.finish(self, code, message)

    # -- the transport's side --

    def feed(self, data: memoryview) -> None:
        """Reassemble length-prefixed messages from DATA payloads."""
        buffer = self._buffer
        buffered = bool(buffer)
        if buffered:
            buffer += data
            view = memoryview(buffer)
        else:
            view = data
        size = len(view)
        pos = 0
        limit = self.conn.server.max_message
        while size - pos >= 5:
            if view[pos]:
                self.finish(UNIMPLEMENTED, "compressed messages are not supported")
                break
            length = _U32.unpack_from(view, pos + 1)[0]
            if length > limit:
                self.finish(
                    RESOURCE_EXHAUSTED,
                    f"Received message larger than max ({length} vs. {limit})",
                )
                break
            end = pos + 5 + length
            if end > size:
                break
            payload = view[pos + 5 : end]  # no copy: the message is parsed from here
            pos = end
            try:
                self.message(payload)
            except Exception:  # a bug in one call must not take the connection down
                log.exception("error answering a gRPC message")
                self.finish(INTERNAL, "internal error")
            finally:
                payload.release()
            if self.done:
                break
        if buffered:
            view.release()  # before the buffer may shrink
        if self.done:
            self._buffer = bytearray()
        elif buffered:
            del buffer[:pos]
        elif pos < size:
            self._buffer = bytearray(view[pos:])


CallFactory = Callable[["Connection", int, list[tuple[bytes, bytes]]], Call]


class Ended(Call):
    """A call answered with a status alone: an unknown method, or one that failed to start."""

    __slots__ = ("_code", "_message")

    def __init__(self, conn: Connection, stream_id: int, code: int, message: str) -> None:
        super().__init__(conn, stream_id)
        self._code, self._message = code, message

    def start(self) -> None:
        self.finish(self._code, self._message)


# --- the connection ----------------------------------------------------------------------


RECEIVE_BUFFER = 256 * 1024


class Connection(asyncio.BufferedProtocol):
    """One HTTP/2 connection: frames in, calls driven, frames out in one write.

    The socket is read into one buffer of our own (no bytes object per read, no joining
    of a frame split across reads); frames are parsed where they lie.
    """

    _SETTINGS: ClassVar[bytes] = frame(
        SETTINGS,
        0,
        0,
        b"".join(
            _SETTING.pack(k, v)
            for k, v in (
                (ENABLE_PUSH, 0),
                (MAX_CONCURRENT_STREAMS, MAX_STREAMS),
                (INITIAL_WINDOW_SIZE, STREAM_WINDOW),
                (MAX_HEADER_LIST_SIZE, HEADER_LIST_LIMIT),
            )
        ),
    ) + frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW))

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, Call] = {}
        self.decoder = HeaderDecoder()
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = FRAME_LIMIT
        self.send_window = DEFAULT_WINDOW
        self.recv_unacked = 0
        self.last_stream_id = 0
        self.goaway_sent = False
        self.closing = False
        self._receive = bytearray(RECEIVE_BUFFER + FRAME_LIMIT + 9)
        self._receive_view = memoryview(self._receive)
        self._filled = 0
        self._preface = False
        self._headers: tuple[int, int, bytearray] | None = None  # awaiting CONTINUATION
        self._out: list[bytes] = []
        self._in_callback = False
        self._blocked: dict[int, Call] = {}

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None and ssl_object.selected_alpn_protocol() not in ("h2", None):
            transport.close()
            return
        self.server.connections.add(self)
        transport.write(self._SETTINGS)
        if self.server.draining:
            self.goaway()

    def get_buffer(self, sizehint: int) -> memoryview:
        # Whatever is left in the buffer is less than one frame, so there is room.
        return self._receive_view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        self._in_callback = True
        try:
            used = self._received(self._receive_view[: self._filled])
            left = self._filled - used
            if left and used:
                self._receive[:left] = self._receive[used : self._filled]
            self._filled = left
        except H2Error as exc:
            self._filled = 0
            self._abort(exc.code, str(exc))
        finally:
            self._in_callback = False
            self.flush()

    def _received(self, data: memoryview) -> int:
        """Handle what is complete in `data`; returns how many bytes were used."""
        start = 0
        if not self._preface:
            if len(data) < len(PREFACE):
                if PREFACE[: len(data)] != data:
                    raise H2Error(PROTOCOL_ERROR, "not an HTTP/2 client preface")
                return 0
            if data[: len(PREFACE)] != PREFACE:
                raise H2Error(PROTOCOL_ERROR, "not an HTTP/2 client preface")
            self._preface = True
            start = len(PREFACE)
        return self._frames(data, start)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        calls = list(self.calls.values())
        self.calls.clear()
        self._blocked.clear()
        for call in calls:
            self._close_call(call)
        self.server.connection_gone()

    def pause_writing(self) -> None:
        # The peer reads slower than we answer: stop reading until it catches up.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closing:
            self.transport.resume_reading()

    # -- output --

    def write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._in_callback:
            self.flush()

    def flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            out = self._out
            self._out = []
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        else:
            self._out.clear()

    def send_message(self, call: Call, payload: bytes) -> None:
        if not call.headers_sent:
            call.headers_sent = True
            self.write(frame(HEADERS, END_HEADERS, call.stream_id, RESPONSE_HEADERS))
        size = len(payload) + 5
        prefix = b"\x00" + _U32.pack(len(payload))
        if (
            not call.pending
            and size <= call.send_window
            and size <= self.send_window
            and size <= self.peer_max_frame
        ):
            call.send_window -= size
            self.send_window -= size
            self.write(_frame_head(size, DATA, 0, call.stream_id) + prefix + payload)
            return
        call.pending.append(memoryview(prefix + payload))
        self._send_pending(call)

    def finish(self, call: Call, code: int, message: str) -> None:
        """End the call with a status: trailers after whatever data is still queued."""
        call.done = True
        if call.headers_sent:
            block = OK_TRAILERS if code == OK and not message else trailers_block(code, message)
        else:
            call.headers_sent = True
            block = RESPONSE_HEADERS + trailers_block(code, message)
        if call.pending:
            call.trailers = block
            return
        self._end(call, block)

    def _end(self, call: Call, block: bytes) -> None:
        self.write(frame(HEADERS, END_HEADERS | END_STREAM, call.stream_id, block))
        if not call.remote_closed:
            # The client may still be sending: tell it to stop (gRPC's convention).
            self.write(frame(RST_STREAM, 0, call.stream_id, _U32.pack(NO_ERROR)))
        self._forget(call)

    def _send_pending(self, call: Call) -> None:
        """Send queued DATA as far as the windows allow, then the trailers if due."""
        pending = call.pending
        while pending:
            room = min(call.send_window, self.send_window, self.peer_max_frame)
            if room <= 0:
                self._blocked[call.stream_id] = call
                return
            chunk = pending[0]
            piece = chunk[:room]
            if len(piece) == len(chunk):
                pending.popleft()
            else:
                pending[0] = chunk[room:]
            size = len(piece)
            call.send_window -= size
            self.send_window -= size
            self.write(_frame_head(size, DATA, 0, call.stream_id) + piece.tobytes())
        self._blocked.pop(call.stream_id, None)
        if call.trailers is not None:
            block, call.trailers = call.trailers, None
            self._end(call, block)

    def _unblock(self) -> None:
        for call in list(self._blocked.values()):
            if self.send_window <= 0:
                return
            self._send_pending(call)

    # -- input --

    def _frames(self, view: memoryview, pos: int) -> int:
        size = len(view)
        unpack = _FRAME.unpack_from
        while size - pos >= 9:
            high, low, kind, flags, stream_id = unpack(view, pos)
            length = (high << 16) | low
            if length > FRAME_LIMIT:
                raise H2Error(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            end = pos + 9 + length
            if end > size:
                break
            stream_id &= 0x7FFFFFFF
            payload = view[pos + 9 : end]
            pos = end
            if self._headers is not None and kind != CONTINUATION:
                raise H2Error(PROTOCOL_ERROR, "expected CONTINUATION")
            if kind == DATA:
                self._on_data(flags, stream_id, payload, length)
            elif kind == HEADERS:
                self._on_headers(flags, stream_id, payload)
            elif kind == CONTINUATION:
                self._on_continuation(flags, stream_id, payload)
            elif kind == WINDOW_UPDATE:
                self._on_window_update(stream_id, payload)
            elif kind == SETTINGS:
                self._on_settings(flags, stream_id, payload)
            elif kind == PING:
                if length != 8 or stream_id:
                    raise H2Error(FRAME_SIZE_ERROR, "bad PING")
                if not flags & ACK:
                    self.write(frame(PING, ACK, 0, payload.tobytes()))
            elif kind == RST_STREAM:
                if length != 4 or not stream_id:
                    raise H2Error(FRAME_SIZE_ERROR, "bad RST_STREAM")
                call = self.calls.get(stream_id)
                if call is not None:
                    self._forget(call)
            elif kind == GOAWAY:
                self.goaway()
            elif kind == PUSH_PROMISE:
                raise H2Error(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            # PRIORITY and unknown types are ignored, as RFC 9113 asks.
        return pos

    def _on_data(self, flags: int, stream_id: int, payload: memoryview, length: int) -> None:
        if not stream_id:
            raise H2Error(PROTOCOL_ERROR, "DATA on stream 0")
        self.recv_unacked += length
        if self.recv_unacked >= CONNECTION_WINDOW // 2:
            self.write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.recv_unacked)))
            self.recv_unacked = 0
        call = self.calls.get(stream_id)
        if call is None or call.remote_closed or call.done:
            if stream_id > self.last_stream_id:
                raise H2Error(PROTOCOL_ERROR, "DATA on an idle stream")
            return  # a stream we ended (or are ending): its data goes nowhere
        if flags & PADDED:
            payload = _unpad(payload)
        call.unacked += length
        if flags & END_STREAM:
            call.remote_closed = True
        if payload:
            call.feed(payload)
        if call.done:
            return
        if flags & END_STREAM:
            _guarded(call, call.half_closed)
        elif call.unacked >= STREAM_WINDOW // 2:
            self.write(frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(call.unacked)))
            call.unacked = 0

    def _on_headers(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if not stream_id or not stream_id & 1:
            raise H2Error(PROTOCOL_ERROR, "HEADERS on an even stream")
        if flags & PADDED:
            payload = _unpad(payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if flags & END_HEADERS:
            self._on_header_block(flags, stream_id, payload.tobytes())
        else:
            self._headers = (stream_id, flags, bytearray(payload))

    def _on_continuation(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if self._headers is None or self._headers[0] != stream_id:
            raise H2Error(PROTOCOL_ERROR, "unexpected CONTINUATION")
        block = self._headers[2]
        block += payload
        if len(block) > HEADER_LIST_LIMIT:
            raise H2Error(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            first_flags = self._headers[1]
            self._headers = None
            self._on_header_block(first_flags, stream_id, bytes(block))

    def _on_header_block(self, flags: int, stream_id: int, block: bytes) -> None:
        try:
            headers = self.decoder.decode(block)  # always: it keeps the table in step
        except Exception as exc:  # hpack's errors, and whatever a hostile block provokes
            raise H2Error(COMPRESSION_ERROR, f"header block: {exc}") from None
        call = self.calls.get(stream_id)
        if call is not None:  # trailers from the client
            if call.done or call.remote_closed:
                return
            if not flags & END_STREAM:
                self._reset(stream_id, PROTOCOL_ERROR)
                self._forget(call)
                return
            call.remote_closed = True
            _guarded(call, call.half_closed)
            return
        if stream_id <= self.last_stream_id:
            return  # trailers for a stream we already ended (RFC 9113 §5.4.2: ignore)
        self.last_stream_id = stream_id
        if self.goaway_sent or len(self.calls) >= MAX_STREAMS:
            self._reset(stream_id, REFUSED_STREAM)
            return
        path = b""
        for name, value in headers:
            if name == b":path":
                path = value
                break
        factory = self.server.routes.get(path)
        if factory is None:
            message = f"Method not found: {path.decode('latin-1')[:200]}"
            call = Ended(self, stream_id, UNIMPLEMENTED, message)
        else:
            try:
                call = factory(self, stream_id, headers)
            except Exception:
                log.exception("error starting a gRPC call")
                call = Ended(self, stream_id, INTERNAL, "internal error")
        self.calls[stream_id] = call
        if flags & END_STREAM:
            call.remote_closed = True
        _guarded(call, call.start)
        if flags & END_STREAM and not call.done:
            _guarded(call, call.half_closed)

    def _on_window_update(self, stream_id: int, payload: memoryview) -> None:
        if len(payload) != 4:
            raise H2Error(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise H2Error(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise H2Error(FLOW_CONTROL_ERROR, "connection window overflow")
            self._unblock()
            return
        call = self.calls.get(stream_id)
        if call is None:
            return
        if not increment:
            self._reset(stream_id, PROTOCOL_ERROR)
            self._forget(call)
            return
        call.send_window += increment
        if call.pending:
            self._send_pending(call)

    def _on_settings(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id:
            raise H2Error(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            return
        if len(payload) % 6:
            raise H2Error(FRAME_SIZE_ERROR, "bad SETTINGS")
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2Error(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for call in self.calls.values():
                    call.send_window += delta
            elif key == MAX_FRAME_SIZE:
                if not FRAME_LIMIT <= value <= 16777215:
                    raise H2Error(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self.peer_max_frame = value
            # Our encoder never uses the peer's table, so HEADER_TABLE_SIZE needs nothing.
        self.write(frame(SETTINGS, ACK, 0))
        for call in list(self.calls.values()):
            if call.pending:
                self._send_pending(call)

    # -- stream and connection ends --

    def _reset(self, stream_id: int, code: int) -> None:
        self.write(frame(RST_STREAM, 0, stream_id, _U32.pack(code)))

    def _forget(self, call: Call) -> None:
        self.calls.pop(call.stream_id, None)
        self._blocked.pop(call.stream_id, None)
        call.pending.clear()
        self._close_call(call)
        if self.goaway_sent and not self.calls:
            self._close_soon()

    def _close_call(self, call: Call) -> None:
        call.done = True
        try:
            call.closed()
        except Exception:  # a bug in one call must not take the connection down
            log.exception("error closing a call")

    def goaway(self) -> None:
        """No new streams: the ones we have go on; the connection closes after them."""
        if self._send_goaway(NO_ERROR, "") and not self.calls:
            self._close_soon()

    def _send_goaway(self, code: int, reason: str) -> bool:
        """GOAWAY naming the last stream taken, once per connection; False if already sent."""
        if self.goaway_sent or self.transport is None:
            return False
        self.goaway_sent = True
        payload = _U32.pack(self.last_stream_id) + _U32.pack(code) + reason.encode()[:256]
        self.write(frame(GOAWAY, 0, 0, payload))
        return True

    def _close_soon(self) -> None:
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _abort(self, code: int, reason: str) -> None:
        log.info("http2 connection error", extra=fields(code=code, reason=reason))
        self._send_goaway(code, reason)
        self._close_soon()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _guarded(call: Call, hook: Callable[[], None]) -> None:
    """Run a call's hook; a bug in it ends that call (INTERNAL), not the connection."""
    try:
        hook()
    except Exception:
        log.exception("error in a gRPC call")
        call.finish(INTERNAL, "internal error")


def _unpad(payload: memoryview) -> memoryview:
    if not payload:
        raise H2Error(PROTOCOL_ERROR, "padded frame without padding length")
    pad = payload[0]
    if pad >= len(payload):
        raise H2Error(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1 : len(payload) - pad]


# --- the server --------------------------------------------------------------------------


class Server:
    """Calls by path, one listening socket, and a drain that waits for open calls."""

    def __init__(self, routes: dict[str, CallFactory], *, max_message: int) -> None:
        self.routes = {path.encode(): factory for path, factory in routes.items()}
        self.max_message = max_message
        self.connections: set[Connection] = set()
        self.draining = False
        self._listener: asyncio.Server | None = None
        self._idle = asyncio.Event()

    async def listen(
        self,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> int:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: Connection(self),
            host,
            port,
            reuse_address=True,
            reuse_port=reuse_port or None,
            ssl=ssl_context,
            backlog=1024,
        )
        bound: int = self._listener.sockets[0].getsockname()[1]
        return bound

    def connection_gone(self) -> None:
        if self.draining and not self.connections:
            self._idle.set()

    async def stop(self, grace: float) -> None:
        """Refuse new connections and streams, let open calls finish, then close."""
        self.draining = True
        if self._listener is not None:
            self._listener.close()
        for conn in list(self.connections):
            conn.goaway()
            conn.flush()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._idle.wait(), grace)
        for conn in list(self.connections):
            conn.abort()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.wait_closed(), 1)
