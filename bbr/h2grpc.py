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
import enum
import logging
import operator
import os
import re
import socket
import ssl
import struct
import time
import urllib.parse
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import hpack

from bbr.logs import fields

log = logging.getLogger("bbr.h2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20


class ErrorCode(enum.IntEnum):
    """HTTP/2 error codes (RFC 9113 §7), as RST_STREAM and GOAWAY carry them."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


NO_ERROR, PROTOCOL_ERROR = ErrorCode.NO_ERROR, ErrorCode.PROTOCOL_ERROR
INTERNAL_ERROR, FLOW_CONTROL_ERROR = ErrorCode.INTERNAL_ERROR, ErrorCode.FLOW_CONTROL_ERROR
STREAM_CLOSED, FRAME_SIZE_ERROR = ErrorCode.STREAM_CLOSED, ErrorCode.FRAME_SIZE_ERROR
REFUSED_STREAM, CANCEL = ErrorCode.REFUSED_STREAM, ErrorCode.CANCEL
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = ErrorCode.COMPRESSION_ERROR, ErrorCode.ENHANCE_YOUR_CALM


class StreamState(enum.Enum):
    """A client stream's state (RFC 9113 §5.1). bbr never pushes, so the reserved states
    never occur, and it answers only after the request began, so half-closed (local) is
    reached only on the way to closed (an answer that ends early resets the stream)."""

    IDLE = "idle"
    OPEN = "open"
    HALF_CLOSED_REMOTE = "half-closed (remote)"
    CLOSED = "closed"


class ClosedBy(enum.Enum):
    """How a closed stream closed: it decides what a late frame on it means (§5.1)."""

    END_STREAM = "both sides ended it"  # a late DATA/HEADERS: connection error STREAM_CLOSED
    SENT_RST = "bbr reset it"  # frames already in flight: ignored
    RECEIVED_RST = "the client reset it"  # a late DATA/HEADERS: stream error STREAM_CLOSED
    NEVER_OPENED = "an id the client skipped"  # a late HEADERS: connection PROTOCOL_ERROR


CLOSED_MEMORY = 128  # resets remembered per connection (older ones count as ended)
SKIPPED_MEMORY = 16  # ranges of stream ids a client skipped, remembered per connection
_SELF_DEPENDENT = 0x100  # not a wire flag: marks a HEADERS whose priority names itself

# Settings.
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 1, 2, 3, 4
MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = 5, 6

# gRPC status codes.
OK, CANCELLED, UNKNOWN, INVALID_ARGUMENT, DEADLINE_EXCEEDED, NOT_FOUND = 0, 1, 2, 3, 4, 5
RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE = 8, 12, 13, 14

DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
FRAME_LIMIT = 16384  # the largest frame we accept (the protocol's default)
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
# A DATA frame's head and a gRPC message's prefix, packed in one step (`send_message`);
# the first answer of a call also has the response HEADERS frame before them.
_DATA_MESSAGE = struct.Struct(">BHBBLBL")
_HEADERS_DATA_MESSAGE = struct.Struct(f">BHBBL{len(RESPONSE_HEADERS)}sBHBBLBL")
OK_TRAILERS = literal(b"grpc-status", b"0")
# The answer to a request that is not gRPC (`NotGrpc`).
NOT_GRPC_BODY = (
    b"bbr: this port speaks gRPC (Envoy ext_proc): POST with content-type application/grpc\n"
)
NOT_GRPC_HEADERS = {
    status: literal(b":status", str(status).encode())
    + literal(b"content-type", b"text/plain; charset=utf-8")
    + literal(b"content-length", str(len(NOT_GRPC_BODY)).encode())
    + (literal(b"allow", b"POST") if status == 405 else b"")
    for status in (405, 415)
}


def trailers_block(code: int, message: str = "") -> bytes:
    block = literal(b"grpc-status", str(code).encode())
    if message:
        # gRPC's percent-encoding: printable ASCII except '%' goes as is.
        encoded = urllib.parse.quote(
            message[:MESSAGE_DETAIL_LIMIT], safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"
        )
        block += literal(b"grpc-message", encoded.encode())
    return block


# --- request headers (RFC 9113 §8.2, §8.3) ------------------------------------------------

# A field name may not hold controls, space, upper case, DEL, non-ASCII, or ':' (except
# the leading one of a pseudo-header); a value may not hold NUL, CR or LF, nor start or
# end with a space or tab (RFC 9113 §8.2.1).
_NAME_BYTES = bytes(
    c for c in range(256) if not (c <= 0x20 or 0x41 <= c <= 0x5A or c >= 0x7F or c == 0x3A)
)
_EDGE_SPACE = re.compile(rb"\n[ \t]|[ \t]\n")  # in values joined and framed by LF
_REQUEST_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path"))
# Meaningful in HTTP/1.1 only: a request carrying one is malformed (§8.2.2).
_CONNECTION_SPECIFIC = frozenset(
    (b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade")
)


class HeaderBlock:
    """A decoded header block and what the RFC's rules say of it, worked out once.

    `request_error` (as the first HEADERS of a stream) and `trailer_error` (as a later
    one) are None when the block is well-formed for that role, else why it is malformed:
    a stream error PROTOCOL_ERROR (§8.1.1). A block served from the decoder's cache was
    checked when it was first decoded, so a repeated block costs no checking at all; a
    new one costs a few scans of its joined names and values, not a regex per field.
    What it says depends only on the names, on the values of pseudo-headers,
    content-type, te and content-length (`_SIGNIFICANT`), and on whether every value is
    well-formed: `HeaderDecoder` reuses it for blocks that agree on those.
    """

    __slots__ = (
        "content_length",
        "grpc",
        "method",
        "path",
        "request_error",
        "trailer_error",
    )

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        # Few Python steps, most of the scanning in C: this runs for every header block
        # the caches do not answer.
        self.content_length = -1  # none given
        error: str | None = None  # breaks a rule for any block
        if _values_malformed(fields):
            error = "invalid field value"
        names = list(map(_first, fields))
        # Pseudo-headers come first (§8.3). One that does not lands among the regular
        # names, whose check refuses ':', or leaves a regular name among the pseudo ones.
        count = (b"\n" + b"\n".join(names)).count(b"\n:")
        pseudo = dict(fields[:count])
        regular = names[count:]
        if b"".join(regular).translate(None, _NAME_BYTES) or b"" in regular:
            error = error or "invalid field name (or a pseudo-header after a regular field)"
        by_name = dict(fields[count:])
        content_type = by_name.get(b"content-type", b"")
        if not _CONNECTION_SPECIFIC.isdisjoint(by_name):
            error = error or "connection-specific field"
        if len(by_name) == len(regular):  # no name twice: one look each
            if by_name.get(b"te", b"trailers") != b"trailers":
                error = error or "te other than trailers"
            length = by_name.get(b"content-length")
            if length is not None:
                error = error or self._content_length(length)
        else:
            for name, value in fields[count:]:
                if name == b"te" and value != b"trailers":
                    error = error or "te other than trailers"
                elif name == b"content-length":
                    error = error or self._content_length(value)
        self.trailer_error = error or ("pseudo-header in trailers" if count else None)
        request_error: str | None = None
        if len(pseudo) != count:
            request_error = "duplicated pseudo-header"
        elif not _REQUEST_PSEUDO.issuperset(pseudo):
            request_error = "pseudo-header other than a request's"
        method = pseudo.get(b":method")
        if method is None:
            request_error = request_error or "no :method"
        elif method == b"CONNECT":  # §8.5: authority only
            if b":scheme" in pseudo or b":path" in pseudo or b":authority" not in pseudo:
                request_error = request_error or "malformed CONNECT"
        elif not pseudo.get(b":scheme"):
            request_error = request_error or "no :scheme"
        elif not pseudo.get(b":path"):
            request_error = request_error or "no or empty :path"
        self.request_error = error or request_error
        self.path = pseudo.get(b":path", b"")
        self.method = method or b""
        # gRPC over HTTP/2: POST with content-type application/grpc[+proto|;...].
        self.grpc = method == b"POST" and content_type.startswith(b"application/grpc")

    def _content_length(self, value: bytes) -> str | None:
        """Takes a content-length value; why it is malformed, if it is."""
        if not value.isdigit() or len(value) > 18:
            return "invalid content-length"
        if self.content_length not in (-1, int(value)):
            return "content-lengths that differ"
        self.content_length = int(value)
        return None


_first, _second = operator.itemgetter(0), operator.itemgetter(1)
# The fields whose values a `HeaderBlock` reads (besides every pseudo-header).
_SIGNIFICANT = frozenset((b"content-type", b"te", b"content-length"))


def _values_malformed(fields: list[tuple[bytes, bytes]]) -> bool:
    """A value holds NUL, CR or LF, or starts or ends with a space or tab (§8.2.1)."""
    values = b"\n".join(map(_second, fields))
    return (
        values.count(b"\n") > max(len(fields) - 1, 0)  # an LF inside a value
        or b"\x00" in values
        or b"\r" in values
        or (
            (b" " in values or b"\t" in values)
            and _EDGE_SPACE.search(b"\n" + values + b"\n") is not None
        )
    )


def _no_significant(fields: list[tuple[bytes, bytes]]) -> tuple[()]:
    return ()


# An indexed field's byte (RFC 7541 §6.1) to its index; the tables by index (0 unused).
_INDEX = bytes(byte & 0x7F for byte in range(256))
_STATIC_ENTRIES: tuple[tuple[bytes, bytes], ...] = (
    (b"", b""),
    *hpack.table.HeaderTable.STATIC_TABLE,
)
Shape = tuple[Callable[[list[tuple[bytes, bytes]]], object], dict[object, HeaderBlock]]
Decoded = tuple[HeaderBlock, list[tuple[bytes, bytes]]]
SHAPES = 16  # header-name lists whose checks a connection remembers
SHAPE_KEYS = 16  # significant values remembered per header-name list
SHAPE_BYTES = 1024  # the longest names + significant values remembered


class HeaderDecoder:
    """hpack's decoder, with repeated header blocks answered from a cache.

    A gRPC client sends the same headers on every call, and after the first they are
    all references to the table (a few bytes). Decoding such a block changes nothing, so
    its result only depends on the table: while the table is unchanged, the same bytes
    give the same headers. Every insertion and resize is counted, and any change empties
    the cache; a block whose decoding changed the table is never cached. What is cached
    is the decoded fields with their checked `HeaderBlock`, so a hit is neither decoded
    nor checked again.

    A client whose blocks change the table every call (grpc-go, and so ghz, sends a new
    `grpc-timeout` value with each) misses that cache, but its blocks keep one shape: the
    same names with the same significant values (see `HeaderBlock`). The checks of a
    block are therefore also remembered by its names, then by its significant values
    (bounded: SHAPES times SHAPE_KEYS entries of at most SHAPE_BYTES), and only its values'
    well-formedness is tested again.
    """

    __slots__ = ("_cache", "_changes", "_decoder", "_shapes", "_state")

    def __init__(self) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=HEADER_LIST_LIMIT)
        self._cache: dict[bytes, Decoded] = {}
        self._shapes: dict[tuple[bytes, ...], Shape] = {}
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

    def decode(self, block: bytes) -> Decoded:
        """The block's fields and what the checks say of them."""
        found = self._cache.get(block)
        if found is not None:
            return found
        indexed = None
        if block and min(block) > 0x80 and max(block) < 0xFF:
            indexed = self._indexed(block)
        fields: list[tuple[bytes, bytes]] = (
            self._decoder.decode(block, raw=True)  # type: ignore[assignment]
            if indexed is None
            else indexed
        )
        names = tuple(map(_first, fields))
        shape = self._shapes.get(names)
        checked = None
        if shape is not None and not _values_malformed(fields):
            checked = shape[1].get(shape[0](fields))
        if checked is None:
            checked = HeaderBlock(fields)
            self._remember_shape(names, fields, shape, checked)
        decoded = (checked, fields)
        state = self._table_state()
        if state != self._state:
            self._state = state
            self._cache.clear()
        elif len(self._cache) < 64 and len(block) <= 512:
            self._cache[block] = decoded
        return decoded

    def _indexed(self, block: bytes) -> list[tuple[bytes, bytes]] | None:
        """A block of indexed fields only (each one byte: index 1 to 126) read straight from
        the table: what hpack's decoder gives for it, in a few steps instead of ~250 per
        field. None when an index is past the table or the list is too long: hpack then
        decodes it and raises the error. (grpc-go, whose every call changes the table,
        sends about half its blocks like this: they miss the cache.)"""
        entries = _STATIC_ENTRIES + tuple(self._decoder.header_table.dynamic_entries)
        indices = block.translate(_INDEX)
        if max(indices) >= len(entries):
            return None
        fields: list[tuple[bytes, bytes]] = list(map(entries.__getitem__, indices))
        size = 32 * len(fields) + sum(map(len, map(_first, fields)))
        if size + sum(map(len, map(_second, fields))) > HEADER_LIST_LIMIT:
            return None
        return fields

    def _remember_shape(
        self,
        names: tuple[bytes, ...],
        fields: list[tuple[bytes, bytes]],
        shape: Shape | None,
        checked: HeaderBlock,
    ) -> None:
        """Keep `checked` for blocks of these names and significant values, within bounds
        (a block with a malformed value is not kept: its values decided)."""
        if shape is None:
            if len(self._shapes) >= SHAPES or len(b"".join(names)) > SHAPE_BYTES:
                return
            indices = [
                i for i, name in enumerate(names) if name[:1] == b":" or name in _SIGNIFICANT
            ]
            getter: Callable[[list[tuple[bytes, bytes]]], object] = (
                operator.itemgetter(*indices, *indices) if indices else _no_significant
            )
            shape = (getter, {})
        elif len(shape[1]) >= SHAPE_KEYS:
            return
        key = shape[0](fields)
        significant: tuple[tuple[bytes, bytes], ...] = key  # type: ignore[assignment]
        size = len(b"".join(names)) + sum(len(value) for _, value in significant)
        if size > SHAPE_BYTES or _values_malformed(fields):
            return
        shape[1][key] = checked
        self._shapes[names] = shape


class H2Error(Exception):
    """The peer broke HTTP/2: the connection ends with GOAWAY and this code."""

    def __init__(self, code: ErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code


# --- limits ------------------------------------------------------------------------------

MiB = 1024 * 1024
# A message longer than this is admitted (counted in the budgets) as soon as its length
# is known, so long messages never sit in the windows as unaccounted ("loose") bytes.
ADMIT_ABOVE = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """Every bound of the port: what one client, one connection and the process may cost.

    Flags in bbr/cli.py set them; SECURITY.md sums them into the worst-case memory.
    Defaults let Envoy at full speed (many streams on few connections, 16 KiB DATA
    frames, bodies up to --max-body-bytes) through without ever tripping one.
    """

    max_connections: int = 1024
    max_streams: int = MAX_STREAMS
    stream_window: int = MiB  # a stream's receive window (messages over 64 KiB are admitted)
    connection_buffer: int = 64 * MiB  # admitted request messages per connection
    process_buffer: int = 256 * MiB  # request data held by all connections together
    connection_output: int = 4 * MiB  # answers queued behind the peer's windows
    handshake_timeout: float = 5.0  # TLS handshake, then the client preface
    idle_timeout: float = 300.0  # a connection with no open stream
    first_message_timeout: float = 10.0  # a new stream's first complete message
    stream_idle_timeout: float = 60.0  # a partial message with no new DATA
    max_empty_frames: int = 16  # consecutive DATA/HEADERS/CONTINUATION without payload
    max_continuations: int = 32  # CONTINUATION frames in one header block
    max_priority_per_stream: int = 100  # PRIORITY frames per stream opened (plus one stream)
    max_window_updates_per_data: int = 10  # WINDOW_UPDATEs per DATA frame sent (plus one)
    max_control_per_second: int = 200  # PING and SETTINGS frames
    max_resets_per_second: int = 1000  # streams reset by the client
    max_outbound_frames: int = 10000  # frames queued while the peer does not read
    max_outbound_control_frames: int = 1000  # of which PING/SETTINGS ACKs and RST_STREAMs
    frames_per_turn: int = 1000  # frames handled per read callback before yielding
    # (a HEADERS frame counts 10, a SETTINGS frame one per entry)


# --- calls -------------------------------------------------------------------------------


class Call:
    """One gRPC call (one HTTP/2 stream). Subclasses answer messages."""

    __slots__ = (
        "_buffer",
        "born",
        "conn",
        "content_left",
        "done",
        "eos_pending",
        "fed",
        "headers_sent",
        "last_data",
        "loose",
        "pending",
        "recv_window",
        "remote_closed",
        "reserved",
        "retained",
        "send_window",
        "stream_id",
        "swept",
        "trailers",
        "waiting",
    )
    # Set when the call enters `conn.partial`, the only place they are read: when DATA
    # last came, and how many bytes were buffered when the sweep last looked.
    last_data: float
    swept: int

    def __init__(self, conn: Connection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.send_window = conn.peer_initial_window
        self.recv_window = conn.limits.stream_window
        self.headers_sent = False
        self.remote_closed = False
        self.done = False
        self.fed = False  # a complete message arrived
        self.eos_pending = False  # END_STREAM came while messages wait for output room
        self.loose = 0  # buffered bytes of a message not admitted
        self.reserved = 0  # the admitted message's size, counted in the budgets
        self.waiting = 0  # the size of a message waiting for admission
        self.retained = 0  # bytes of consumed messages the call still keeps (see `hold`)
        self.born = conn.now
        self.content_left = -1  # request bytes still due by its content-length (-1: none)
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

    def hold(self, nbytes: int) -> None:
        """The call keeps `nbytes` of what it was sent (a streamed body held until its
        model is known): counted in the budgets, and while they are full its window
        stays shut."""
        delta = nbytes - self.retained
        if delta:
            conn = self.conn
            limits = conn.limits
            if delta > 0 and (
                conn.reserved > limits.connection_buffer + limits.connection_buffer // 4
                or conn.server.held > limits.process_buffer + limits.process_buffer // 4
            ):
                # Windows are shut while over budget; past a quarter more, shed the call.
                self.finish(RESOURCE_EXHAUSTED, "bbr holds too much request data; retry")
                return
            self.retained = nbytes
            conn.reserved += delta
            conn.server.reserved += delta

    # -- the transport's side --

    def feed(self, data: memoryview) -> None:
        """Reassemble length-prefixed messages from DATA payloads.

        While the connection's answers wait behind the peer's windows beyond its output
        budget, complete messages stay buffered (unconsumed, so their window stays shut).
        """
        buffer = self._buffer
        buffered = bool(buffer)
        if buffered:
            buffer += data
            view = memoryview(buffer)
        else:
            view = data
        size = len(view)
        pos = 0
        conn = self.conn
        limit = conn.server.max_message
        while size - pos >= 5:
            if conn.out_bytes and conn.output_full():
                conn.stall(self)
                break
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
            self.fed = True
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


class NotGrpc(Call):
    """A request that is not gRPC (a browser, curl, a conformance tester): once it has
    ended, an HTTP answer saying what this port speaks (415, or 405 for a method other
    than POST), with a short text body and trailers naming the gRPC status. Its body is
    counted (content-length, flow control) but not kept."""

    __slots__ = ("_method",)

    def __init__(self, conn: Connection, stream_id: int, method: bytes) -> None:
        super().__init__(conn, stream_id)
        self._method = method

    def feed(self, data: memoryview) -> None:
        pass

    def half_closed(self) -> None:
        block = NOT_GRPC_HEADERS[415 if self._method == b"POST" else 405]
        if self._method == b"HEAD":  # the headers alone, ending the stream: no content
            self.done = self.headers_sent = True
            self.conn._end(self, block)
            return
        self.conn.respond(self, block, NOT_GRPC_BODY)
        self.finish(UNIMPLEMENTED, "not a gRPC request")


# --- the connection ----------------------------------------------------------------------


RECEIVE_BUFFER = 256 * 1024
FIRST_BUFFER = 2 * (FRAME_LIMIT + 9)  # until reads fill it: a silent client costs nothing

# Why reading is paused (bits): the peer does not read; a turn's frame budget is spent;
# request data over the budgets.
_PAUSE_WRITE, _PAUSE_TURN = 1, 2


class Connection(asyncio.BufferedProtocol):
    """One HTTP/2 connection: frames in, calls driven, frames out in one write.

    The socket is read into one buffer of our own (no bytes object per read, no joining
    of a frame split across reads); frames are parsed where they lie.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.limits = server.limits
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, Call] = {}
        self.decoder = HeaderDecoder()
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = FRAME_LIMIT
        self.send_window = DEFAULT_WINDOW
        self._half_connection_window = server.connection_window // 2
        self.recv_unacked = 0
        self._acked = 0  # DATA bytes whose connection window went back
        self.last_stream_id = 0
        self.goaway_sent = False
        self.closing = False
        self.established = False  # preface and SETTINGS received
        self._receive: bytearray | None = None
        self._small = False  # `_receive` is the first, small buffer
        self._receive_view = memoryview(b"")
        self._filled = 0
        self._preface = False
        self._headers: tuple[int, int, bytearray] | None = None  # awaiting CONTINUATION
        self._continuations = 0
        self._out: list[bytes] = []
        self._in_callback = False
        self._blocked: dict[int, Call] = {}
        self._stalled: dict[int, Call] = {}  # calls with messages waiting for output room
        self._unstall_soon = False
        self._paused = 0
        self._more = False  # frames left over when a turn's budget ran out
        self._discarding = False  # a connection error was sent: input is dropped
        # Budgets (bytes): answers queued behind the peer's windows; request data held.
        self.out_bytes = 0
        self.loose = 0
        self.reserved = 0
        self.partial: dict[int, Call] = {}  # calls holding part of a message
        self._half_window = self.limits.stream_window // 2
        self._turn_ticks = range(self.limits.frames_per_turn)  # a turn's budget (`_frames`)
        # Loose bytes (beginnings of messages not admitted) are capped at a quarter of the
        # budgets.
        self._loose_cap = self.limits.connection_buffer // 4
        self._process_loose_cap = self.limits.process_buffer // 4
        self.withheld: dict[int, Call] = {}  # calls whose window waits for budget room
        # Flood counters.
        self._empty = 0
        self._empty_mark = 0
        self._priority = 0
        self._window_updates = 0
        self._opened = 0
        self._data_sent = 0
        self._control = 0
        self._control_start = 0.0
        self._control_data = 0  # self._data_sent when the control-frame second began
        self._resets = 0
        self._resets_start = 0.0
        self._queued = 0  # frames written while the peer does not read
        self._queued_control = 0
        loop = server.loop
        self.now = self.opened_at = self.idle_since = loop.time() if loop else 0.0
        # The last CLOSED_MEMORY streams reset, and by whom (a ring: O(1) per stream; a
        # dict trimmed from its front would rescan deleted slots); ids never opened.
        self._closed: dict[int, ClosedBy] = {}
        self._closed_ring: list[int] = []
        self._skipped: list[tuple[int, int]] = []
        self._closed_next = 0

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
        self.now = self.opened_at = self.idle_since = self.server.clock()
        self._control_start = self._resets_start = self.now
        self.server.connections.add(self)
        transport.write(self.server.settings_frames)
        if self.server.draining:
            self.goaway()

    def get_buffer(self, sizehint: int) -> memoryview:
        # Whatever is left in the buffer is less than one frame, so there is room.
        if self._receive is None:
            self._receive = bytearray(FIRST_BUFFER)
            self._receive_view = memoryview(self._receive)
            self._small = True
        return self._receive_view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._discarding:
            return  # after a connection error: dropped unread
        self._filled += nbytes
        self.now = self.server.clock()
        self._turn()
        if self._small and nbytes > FRAME_LIMIT:
            self._grow()  # reads fill the small buffer: this client sends in bulk

    def _grow(self) -> None:
        receive = self._receive
        assert receive is not None
        self._small = False
        grown = bytearray(max(len(receive), RECEIVE_BUFFER) + FRAME_LIMIT + 9)
        grown[: self._filled] = receive[: self._filled]
        self._receive_view.release()
        self._receive = grown
        self._receive_view = memoryview(grown)

    def _turn(self) -> None:
        """Handle the frames in the buffer, at most `frames_per_turn` of them."""
        self._in_callback = True
        receive = self._receive
        assert receive is not None
        filled = self._filled
        try:
            view = self._receive_view[:filled]
            used = self._frames(view, 0) if self._preface else self._received(view)
            left = filled - used
            if left and used:
                receive[:left] = receive[used:filled]
            self._filled = left
        except H2Error as exc:
            self._filled = 0
            self._more = False
            self._abort(exc.code, str(exc))
        finally:
            self._in_callback = False
            self.flush()
        if self._more:
            # One connection gets its share of the loop, not more: the rest next turn.
            self._pause(_PAUSE_TURN)
            asyncio.get_running_loop().call_soon(self._next_turn)
        elif self._paused & _PAUSE_TURN:
            self._resume(_PAUSE_TURN)

    def _next_turn(self) -> None:
        self._more = False
        if self.closing or self._receive is None or self._discarding:
            return
        self.now = self.server.clock()
        self._turn()

    def _pause(self, why: int) -> None:
        if not self._paused and self.transport is not None:
            self.transport.pause_reading()
        self._paused |= why

    def _resume(self, why: int) -> None:
        self._paused &= ~why
        if not self._paused and self.transport is not None and not self.closing:
            self.transport.resume_reading()

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
        self.server.accepted.discard(self)
        calls = list(self.calls.values())
        self.calls.clear()
        self._blocked.clear()
        self._stalled.clear()
        for call in calls:
            self._release(call)
            self._close_call(call)
        self._receive_view.release()
        self._receive = None
        self._small = False
        self.server.connection_gone()

    def pause_writing(self) -> None:
        # The peer reads slower than we answer: stop reading until it catches up.
        self._queued = self._queued_control = 0
        self._pause(_PAUSE_WRITE)

    def resume_writing(self) -> None:
        self._resume(_PAUSE_WRITE)

    # -- output --

    def write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._in_callback:
            self.flush()

    def control(self, data: bytes) -> None:
        """A frame we owe the peer (ACK, RST_STREAM): counted while it does not read."""
        if self._paused & _PAUSE_WRITE:
            self._queued_control += 1
            if self._queued_control > self.limits.max_outbound_control_frames:
                raise H2Error(ENHANCE_YOUR_CALM, "too many control frames queued")
        self.write(data)

    def flush(self) -> None:
        if self._out and self.transport is not None and not self.transport.is_closing():
            out = self._out
            self._out = []
            if self._paused & _PAUSE_WRITE:
                self._queued += len(out)
                if self._queued > self.limits.max_outbound_frames:
                    self._calm_later("too many frames queued for a peer that does not read")
                    return
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        else:
            self._out.clear()

    def _calm_later(self, reason: str) -> None:
        log.info("http2 connection error", extra=fields(code=ENHANCE_YOUR_CALM, reason=reason))
        self.server.on_close(ENHANCE_YOUR_CALM.name)
        self.abort()

    def send_message(self, call: Call, payload: bytes) -> None:
        size = len(payload) + 5
        if (
            not call.pending
            and size <= call.send_window
            and size <= self.send_window
            and size <= self.peer_max_frame
        ):
            call.send_window -= size
            self.send_window -= size
            self._data_sent += 1
            if call.headers_sent:
                head = _DATA_MESSAGE.pack(
                    size >> 16, size & 0xFFFF, DATA, 0, call.stream_id, 0, size - 5
                )
            else:  # the first answer: the response headers, then it, in one write
                call.headers_sent = True
                stream_id = call.stream_id
                head = _HEADERS_DATA_MESSAGE.pack(
                    0,
                    len(RESPONSE_HEADERS),
                    HEADERS,
                    END_HEADERS,
                    stream_id,
                    RESPONSE_HEADERS,
                    size >> 16,
                    size & 0xFFFF,
                    DATA,
                    0,
                    stream_id,
                    0,
                    size - 5,
                )
            self.write(head + payload)
            return
        if not call.headers_sent:
            call.headers_sent = True
            self.write(frame(HEADERS, END_HEADERS, call.stream_id, RESPONSE_HEADERS))
        prefix = b"\x00" + _U32.pack(len(payload))
        call.pending.append(memoryview(prefix + payload))
        self.out_bytes += size
        self.server.out_bytes += size
        self._send_pending(call)

    def respond(self, call: Call, block: bytes, body: bytes) -> None:
        """An HTTP answer: HEADERS `block`, then `body` as the windows allow; the call's
        `finish` adds the trailers after it."""
        call.headers_sent = True
        self.write(frame(HEADERS, END_HEADERS, call.stream_id, block))
        call.pending.append(memoryview(body))
        self.out_bytes += len(body)
        self.server.out_bytes += len(body)
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
        size = len(block)
        stream_id = call.stream_id
        self.write(
            _FRAME.pack(size >> 16, size & 0xFFFF, HEADERS, END_HEADERS | END_STREAM, stream_id)
            + block
        )
        if not call.remote_closed:
            # The client may still be sending: tell it to stop (gRPC's convention).
            self.write(frame(RST_STREAM, 0, stream_id, _U32.pack(NO_ERROR)))
            self._forget(call, ClosedBy.SENT_RST)
        else:
            self._forget(call, ClosedBy.END_STREAM)

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
            self.out_bytes -= size
            self.server.out_bytes -= size
            self._data_sent += 1
            self.write(_frame_head(size, DATA, 0, call.stream_id) + piece.tobytes())
        self._blocked.pop(call.stream_id, None)
        if self._stalled and not self._unstall_soon:
            self._unstall_soon = True
            asyncio.get_running_loop().call_soon(self._unstall)
        if call.trailers is not None:
            block, call.trailers = call.trailers, None
            self._end(call, block)

    def _unblock(self) -> None:
        for call in list(self._blocked.values()):
            if self.send_window <= 0:
                return
            self._send_pending(call)

    # -- output budget --

    def output_full(self) -> bool:
        """Answers queued behind the peer's windows fill this connection's budget, or
        everything held fills the process's."""
        return (
            self.out_bytes >= self.limits.connection_output
            or self.server.held > self.limits.process_buffer
        )

    def stall(self, call: Call) -> None:
        """`call` has messages but the answers already queued fill the output budget."""
        self._stalled[call.stream_id] = call

    def _unstall(self) -> None:
        """Output room again: answer the messages that waited for it."""
        self._unstall_soon = False
        if self.closing:
            return
        self._in_callback = True
        try:
            for call in list(self._stalled.values()):
                if self.output_full():
                    break
                del self._stalled[call.stream_id]
                if call.done:
                    continue
                before = len(call._buffer)
                call.feed(memoryview(b""))
                self._after_feed(call, before, 0)
                if call.eos_pending and call.stream_id not in self._stalled and not call.done:
                    call.eos_pending = False
                    _guarded(call, call.half_closed)
        finally:
            self._in_callback = False
            self.flush()

    # -- input --

    def _frames(self, view: memoryview, pos: int) -> int:
        """Handle the frames in `view` from `pos`, at most a turn's budget of them; returns
        where the first frame not handled starts."""
        size = len(view)
        unpack = _FRAME.unpack_from
        calls = self.calls
        half_connection_window = self._half_connection_window
        # The turn's budget as an iterator: a frame takes one tick, and a HEADERS frame or
        # each SETTINGS entry takes more (consumed in one step, itertools' `consume`).
        ticks = iter(self._turn_ticks)
        for _ in ticks:
            if size - pos < 9:
                return pos
            high, length, kind, flags, stream_id = unpack(view, pos)
            if high or length > FRAME_LIMIT:  # FRAME_LIMIT < 2**16
                raise H2Error(FRAME_SIZE_ERROR, f"frame of {(high << 16) | length} bytes")
            end = pos + 9 + length
            if end > size:
                return pos
            stream_id &= 0x7FFFFFFF
            payload = view[pos + 9 : end]
            pos = end
            if self._headers is not None and kind != CONTINUATION:
                raise H2Error(PROTOCOL_ERROR, "expected CONTINUATION")
            if kind == DATA:
                # `_on_data` for the frames of a call that is going well, inline: no padding,
                # not empty (unless it ends the stream), within the windows, no content-length
                # to count down. Every other DATA frame goes to `_on_data`, which does the
                # same checks in the same order; nothing is changed before the choice.
                call = calls.get(stream_id)
                unacked = self.recv_unacked + length
                if (
                    call is None
                    or flags & PADDED
                    or not (length or flags & END_STREAM)
                    or unacked >= half_connection_window
                    or call.remote_closed
                    or call.done
                    or call.recv_window < length
                    or call.content_left >= 0
                ):
                    self._on_data(flags, stream_id, payload, length)
                    continue
                self.recv_unacked = unacked
                call.recv_window -= length
                end_stream = flags & END_STREAM
                if end_stream:
                    call.remote_closed = True
                if length:
                    buffer = call._buffer
                    before = len(buffer)
                    reserved = call.reserved
                    if (
                        reserved
                        and before + length < reserved
                        and not end_stream
                        and not self.out_bytes
                    ):
                        # More of an admitted message, still incomplete: `feed` would only
                        # append it, and it is counted with its window open.
                        buffer += payload
                        continue
                    call.feed(payload)
                    if reserved and call.reserved and len(call._buffer) == before + length:
                        pass  # the admitted message grows: counted, window already open
                    elif before or call._buffer or call.recv_window <= self._half_window:
                        self._after_feed(call, before, length)
                if end_stream and not call.done:
                    if self._stalled and stream_id in self._stalled:
                        call.eos_pending = True
                    else:
                        _guarded(call, call.half_closed)
            elif kind == HEADERS:
                next(islice(ticks, 10, 10), None)  # a new call costs about ten frames' work
                self._on_headers(flags, stream_id, payload)
            elif kind == CONTINUATION:
                self._on_continuation(flags, stream_id, payload)
            elif kind == WINDOW_UPDATE:
                self._window_updates += 1
                if self._window_updates > self.limits.max_window_updates_per_data * (
                    1 + self._data_sent
                ):
                    raise H2Error(ENHANCE_YOUR_CALM, "WINDOW_UPDATE flood")
                self._on_window_update(stream_id, payload)
            elif kind == SETTINGS:
                entries = length // 6  # each entry is work
                next(islice(ticks, entries, entries), None)
                self._on_settings(flags, stream_id, payload)
            elif kind == PING:
                if stream_id:
                    raise H2Error(PROTOCOL_ERROR, "PING on a stream")
                if length != 8:
                    raise H2Error(FRAME_SIZE_ERROR, "PING of other than 8 bytes")
                if not flags & ACK:
                    self._count_control()
                    self.control(frame(PING, ACK, 0, payload.tobytes()))
            elif kind == RST_STREAM:
                self._on_rst_stream(stream_id, length)
            elif kind == PRIORITY:
                self._priority += 1
                if self._priority > self.limits.max_priority_per_stream * (1 + self._opened):
                    raise H2Error(ENHANCE_YOUR_CALM, "PRIORITY flood")
                self._on_priority(stream_id, payload)
            elif kind == GOAWAY:
                if stream_id:
                    raise H2Error(PROTOCOL_ERROR, "GOAWAY on a stream")
                self._peer_goaway()
            elif kind == PUSH_PROMISE:
                raise H2Error(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            else:  # unknown types are ignored (RFC 9113 §4.1), but not for free
                self._count_control()
        if size - pos >= 9:
            self._more = True  # the budget ran out: the rest next turn
        return pos

    def _count_control(self) -> None:
        """PING and SETTINGS: at most `max_control_per_second` a second beyond one for each
        DATA frame bbr sent in that second (time read rarely). grpc-go clients ping once
        per received data sample to size their windows (BDP), hundreds of times a second
        at full speed; as grpc-go's own server does, pings that come with data are no flood.
        """
        self._control += 1
        if (
            self._control
            > self.limits.max_control_per_second + self._data_sent - self._control_data
        ):
            now = self.server.clock()
            if now - self._control_start < 1.0:
                raise H2Error(ENHANCE_YOUR_CALM, "PING/SETTINGS flood")
            self._control, self._control_start, self._control_data = 1, now, self._data_sent

    def _count_reset(self) -> None:
        """Streams the client resets: Rapid Reset is this beyond any real client's rate."""
        self._resets += 1
        if self._resets > self.limits.max_resets_per_second:
            now = self.server.clock()
            if now - self._resets_start < 1.0:
                raise H2Error(ENHANCE_YOUR_CALM, "stream reset flood")
            self._resets, self._resets_start = 1, now

    def _count_empty(self) -> None:
        mark = self._acked + self.recv_unacked  # DATA with payload since: not consecutive
        if mark != self._empty_mark:
            self._empty_mark, self._empty = mark, 0
        self._empty += 1
        if self._empty > self.limits.max_empty_frames:
            raise H2Error(ENHANCE_YOUR_CALM, "flood of frames without payload")

    def _on_data(self, flags: int, stream_id: int, payload: memoryview, length: int) -> None:
        # Runs for every DATA frame: attributes are read once, into locals.
        if not stream_id:
            raise H2Error(PROTOCOL_ERROR, "DATA on stream 0")
        if flags & PADDED:
            payload = _unpad(payload)  # a frame check, whatever the stream's state
        unacked = self.recv_unacked + length
        self.recv_unacked = unacked
        if unacked >= self._half_connection_window:
            if unacked > self.server.connection_window:
                raise H2Error(FLOW_CONTROL_ERROR, "DATA beyond the connection window")
            # The connection window comes back as data is accounted: the stream windows
            # and the budgets bound what is held.
            self.write(frame(WINDOW_UPDATE, 0, 0, _U32.pack(unacked)))
            self._acked += unacked
            self.recv_unacked = 0
        end = flags & END_STREAM
        if not length and not end:
            self._count_empty()
        call = self.calls.get(stream_id)
        if call is None:
            self._not_open(DATA, stream_id)
            return
        if call.remote_closed:  # half-closed (remote): the client said it was done
            self._stream_error(stream_id, STREAM_CLOSED, call)
            return
        if call.done:  # answered, trailers still queued: the rest of the request goes nowhere
            call.remote_closed = bool(end)
            return
        window = call.recv_window - length
        call.recv_window = window
        if window < 0:
            self._stream_error(stream_id, FLOW_CONTROL_ERROR, call)
            return
        size = len(payload)
        if call.content_left >= 0:  # the DATA must add up to the content-length (§8.1.1)
            left = call.content_left - size
            if left < 0 or (left and end):
                self._stream_error(stream_id, PROTOCOL_ERROR, call)
                return
            call.content_left = left
        if flags & PADDED:
            padding = length - size
            if padding and not end:
                call.recv_window += padding  # padding is consumed at once
                self.write(frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(padding)))
        if end:
            call.remote_closed = True
        if size:
            buffer = call._buffer
            before = len(buffer)
            reserved = call.reserved
            if reserved and before + size < reserved and not end and not self.out_bytes:
                # More of an admitted message that is still incomplete: `feed` would only
                # append it (no message ends, no answer waits for output room), and it is
                # already counted in the budgets with its window open.
                buffer += payload
                return
            call.feed(payload)
            if reserved and call.reserved and len(call._buffer) == before + size:
                pass  # the admitted message grows: already counted, window already open
            elif before or call._buffer or call.recv_window <= self._half_window:
                self._after_feed(call, before, size)
        if call.done:
            return
        if end:
            if self._stalled and stream_id in self._stalled:
                call.eos_pending = True
            else:
                _guarded(call, call.half_closed)

    def _after_feed(self, call: Call, before: int, added: int) -> None:
        """Account what `feed` consumed and kept; reopen the stream's window to match.

        A stream may hold `stream_window` bytes of a message on its own; a longer message
        is admitted (its whole size counted against the connection and process budgets)
        before the window opens for the rest of it, else it waits for room in line.
        """
        after = 0 if call.done else len(call._buffer)
        server = self.server
        if before + added != after:  # a message was consumed
            if not call.fed:
                call.fed = True
            reserved = call.reserved
            if reserved:  # `_unreserve`, inline: once per long message
                self.reserved -= reserved
                server.reserved -= reserved
                call.reserved = 0
                if server.waiting:
                    server.admit()
                if not (after or call.loose or call.retained or call.done or call.remote_closed):
                    # The long message was all there is: what the general path below
                    # does then, unless the window is due to reopen.
                    if before:
                        self.partial.pop(call.stream_id, None)
                    if self.limits.stream_window - call.recv_window < self._half_window:
                        return
        elif (
            not before
            and after >= 5
            and not (call.reserved or call.loose or call.waiting or call.retained)
            and not (call.remote_closed or server.waiting)
        ):
            # The first DATA of a message: when it is long and the budgets have room for
            # it and for its first bytes, it is admitted at once, in one step. The checks
            # are those of the general path below (loose bytes, then `admit`).
            need = 5 + _U32.unpack_from(call._buffer, 1)[0]
            limits = self.limits
            if (
                need > ADMIT_ABOVE
                and self.loose + after <= self._loose_cap
                and server.loose + after <= self._process_loose_cap
                and self.reserved + need <= limits.connection_buffer
                and server.loose + server.reserved + server.out_bytes + need
                <= limits.process_buffer  # server.held, inline
            ):
                call.reserved = need
                self.reserved += need
                server.reserved += need
                self.partial[call.stream_id] = call
                call.last_data, call.swept = self.now, after
                grant = need - after - call.recv_window
                if grant > 0:
                    call.recv_window += grant
                    self.write(frame(WINDOW_UPDATE, 0, call.stream_id, _U32.pack(grant)))
                return
        loose = after if not call.reserved else 0
        if loose != call.loose:
            delta = loose - call.loose
            if delta > 0 and (
                self.loose + delta > self._loose_cap
                or server.loose + delta > self._process_loose_cap
            ):
                # Beginnings of messages on too many streams at once: shed this one.
                self._reset(call.stream_id, CANCEL if call.fed else REFUSED_STREAM)
                self._forget(call)
                return
            self.loose += delta
            server.loose += delta
            call.loose = loose
        if call.done or call.remote_closed:
            if call.stream_id in self.partial and not after:
                del self.partial[call.stream_id]
            return
        need = 0
        limits = self.limits
        if not after:
            if before:
                self.partial.pop(call.stream_id, None)
            target = limits.stream_window
        else:
            if not before:
                self.partial[call.stream_id] = call
                call.last_data, call.swept = self.now, after
            need = 5 + _U32.unpack_from(call._buffer, 1)[0] if after >= 5 else 5
            if call.reserved:
                target = call.reserved
            elif need > ADMIT_ABOVE:
                if call.retained:
                    # A streamed body already held never waits in line (its holders would
                    # wait on each other): admitted within the slack, or shed.
                    call.waiting = need
                    if not self.admit(call, slack=True):
                        call.waiting = 0
                        call.finish(RESOURCE_EXHAUSTED, "bbr holds too much request data; retry")
                    return
                if not call.waiting:
                    call.waiting = need
                    if server.waiting or not self.admit(call):  # first come, first served
                        server.waiting.append(call)
                        server.admit()
                return
            else:
                target = limits.stream_window
        grant = target - after - call.recv_window
        if grant > 0 and call.retained and self.over_budget():
            self.withheld[call.stream_id] = call  # the sweep looks again
            return
        if grant > 0 and (
            call.reserved or grant >= limits.stream_window // 2 or need > after + call.recv_window
        ):
            call.recv_window += grant
            self.write(frame(WINDOW_UPDATE, 0, call.stream_id, _U32.pack(grant)))

    def over_budget(self) -> bool:
        return (
            self.reserved > self.limits.connection_buffer
            or self.server.held > self.limits.process_buffer
        )

    def admit(self, call: Call, *, slack: bool = False) -> bool:
        """Count `call`'s waiting message against the budgets and open its window for it.

        With `slack` (a call holding a streamed body) the budgets stretch by a quarter.
        """
        need = call.waiting
        server = self.server
        limits = self.limits
        connection, process = limits.connection_buffer, limits.process_buffer
        if slack:
            connection, process = connection + connection // 4, process + process // 4
        if self.reserved + need > connection or server.held - call.loose + need > process:
            return False
        call.waiting = 0
        call.reserved = need
        self.reserved += need
        server.reserved += need
        self.loose -= call.loose
        server.loose -= call.loose
        call.loose = 0
        grant = need - len(call._buffer) - call.recv_window
        if grant > 0:
            call.recv_window += grant
            self.write(frame(WINDOW_UPDATE, 0, call.stream_id, _U32.pack(grant)))
        return True

    def _unreserve(self, call: Call) -> None:
        self.reserved -= call.reserved
        self.server.reserved -= call.reserved
        call.reserved = 0
        if self.server.waiting:
            self.server.admit()

    def _release(self, call: Call) -> None:
        """Everything `call` counted in the budgets goes back."""
        if call.reserved:
            self._unreserve(call)
        if call.loose:
            self.loose -= call.loose
            self.server.loose -= call.loose
            call.loose = 0
        call.waiting = 0
        if call.retained:
            self.reserved -= call.retained
            self.server.reserved -= call.retained
            call.retained = 0
        if call.pending:
            queued = sum(len(chunk) for chunk in call.pending)
            self.out_bytes -= queued
            self.server.out_bytes -= queued
            call.pending.clear()

    def _on_headers(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if not stream_id or not stream_id & 1:
            raise H2Error(PROTOCOL_ERROR, "HEADERS on an even stream")
        if flags & PADDED:
            payload = _unpad(payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise H2Error(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            if _U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:
                flags |= _SELF_DEPENDENT  # a stream error, once the block is decoded
            payload = payload[5:]
        if payload:
            self._empty = 0
        else:
            self._count_empty()
        if flags & END_HEADERS:
            self._on_header_block(flags, stream_id, payload.tobytes())
        else:
            self._headers = (stream_id, flags, bytearray(payload))
            self._continuations = 0

    def _on_continuation(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if self._headers is None or self._headers[0] != stream_id:
            raise H2Error(PROTOCOL_ERROR, "unexpected CONTINUATION")
        if payload:
            self._empty = 0
        else:
            self._count_empty()
        self._continuations += 1
        if self._continuations > self.limits.max_continuations:
            raise H2Error(ENHANCE_YOUR_CALM, "CONTINUATION flood")
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
            decoded, headers = self.decoder.decode(block)  # always: it keeps the table in step
        except Exception as exc:  # hpack's errors, and whatever a hostile block provokes
            raise H2Error(COMPRESSION_ERROR, f"header block: {exc}") from None
        call = self.calls.get(stream_id)
        if call is not None:
            self._on_trailers(flags, call, decoded)
            return
        if stream_id <= self.last_stream_id:
            self._not_open(HEADERS, stream_id)
            return
        # idle -> open (or half-closed (remote) with END_STREAM): a new request.
        if stream_id > self.last_stream_id + 2:  # ids skipped: closed, never opened (§5.1.1)
            self._skip(self.last_stream_id + 2 if self.last_stream_id else 1, stream_id - 2)
        self.last_stream_id = stream_id
        if flags & _SELF_DEPENDENT:
            self._stream_error(stream_id, PROTOCOL_ERROR)
            return
        if decoded.request_error is not None or (flags & END_STREAM and decoded.content_length > 0):
            log.debug("malformed request", extra=fields(reason=decoded.request_error))
            self._stream_error(stream_id, PROTOCOL_ERROR)
            return
        if self.goaway_sent or len(self.calls) >= self.limits.max_streams:
            self._stream_error(stream_id, REFUSED_STREAM)
            return
        self._opened += 1
        if not decoded.grpc:
            call = NotGrpc(self, stream_id, decoded.method)
        else:
            factory = self.server.routes.get(decoded.path)
            if factory is None:
                message = f"Method not found: {decoded.path.decode('latin-1')[:200]}"
                call = Ended(self, stream_id, UNIMPLEMENTED, message)
            else:
                try:
                    call = factory(self, stream_id, headers)
                except Exception:
                    log.exception("error starting a gRPC call")
                    call = Ended(self, stream_id, INTERNAL, "internal error")
        call.content_left = decoded.content_length
        self.calls[stream_id] = call
        if flags & END_STREAM:
            call.remote_closed = True
        _guarded(call, call.start)
        if flags & END_STREAM and not call.done:
            _guarded(call, call.half_closed)

    def _on_trailers(self, flags: int, call: Call, decoded: HeaderBlock) -> None:
        """A second HEADERS on an open stream: trailers, which must end the request."""
        if call.remote_closed:  # half-closed (remote)
            self._stream_error(call.stream_id, STREAM_CLOSED, call)
            return
        if (
            not flags & END_STREAM
            or flags & _SELF_DEPENDENT
            or decoded.trailer_error is not None
            or call.content_left > 0
        ):
            self._stream_error(call.stream_id, PROTOCOL_ERROR, call)
            return
        call.remote_closed = True
        if call.done:
            return
        if self._stalled and call.stream_id in self._stalled:
            call.eos_pending = True
        else:
            _guarded(call, call.half_closed)

    def _on_priority(self, stream_id: int, payload: memoryview) -> None:
        """PRIORITY is advice bbr does not take (RFC 9113 §5.3.2), but it is checked."""
        if not stream_id:
            raise H2Error(PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            self._stream_error(stream_id, FRAME_SIZE_ERROR, self.calls.get(stream_id))
        elif _U32.unpack_from(payload)[0] & 0x7FFFFFFF == stream_id:
            self._stream_error(stream_id, PROTOCOL_ERROR, self.calls.get(stream_id))

    def _on_rst_stream(self, stream_id: int, length: int) -> None:
        if not stream_id:
            raise H2Error(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if length != 4:
            raise H2Error(FRAME_SIZE_ERROR, "RST_STREAM of other than 4 bytes")
        call = self.calls.get(stream_id)
        if call is not None:
            self._count_reset()
            self._forget(call, ClosedBy.RECEIVED_RST)
        else:
            self._not_open(RST_STREAM, stream_id)

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
            self._not_open(WINDOW_UPDATE, stream_id)
            return
        if not increment:
            self._stream_error(stream_id, PROTOCOL_ERROR, call)
            return
        call.send_window += increment
        if call.send_window > MAX_WINDOW:
            self._stream_error(stream_id, FLOW_CONTROL_ERROR, call)
            return
        if call.pending:
            self._send_pending(call)

    def _on_settings(self, flags: int, stream_id: int, payload: memoryview) -> None:
        if stream_id:
            raise H2Error(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise H2Error(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        self._count_control()
        self.established = True
        if len(payload) % 6:
            raise H2Error(FRAME_SIZE_ERROR, "bad SETTINGS")
        window = None
        for key, value in _SETTING.iter_unpack(payload):
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise H2Error(FLOW_CONTROL_ERROR, "initial window too large")
                window = value  # applied once per frame: the last value is the one in force
            elif key == ENABLE_PUSH:
                if value > 1:
                    raise H2Error(PROTOCOL_ERROR, "ENABLE_PUSH other than 0 or 1")
            elif key == MAX_FRAME_SIZE:
                if not FRAME_LIMIT <= value <= 16777215:
                    raise H2Error(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self.peer_max_frame = value
            # Our encoder never uses the peer's table, so HEADER_TABLE_SIZE needs nothing.
        self.control(frame(SETTINGS, ACK, 0))
        if window is not None and window != self.peer_initial_window:
            delta = window - self.peer_initial_window
            self.peer_initial_window = window
            for call in self.calls.values():
                call.send_window += delta
        for call in list(self._blocked.values()):
            self._send_pending(call)

    # -- stream and connection ends --

    def _reset(self, stream_id: int, code: ErrorCode) -> None:
        self.control(frame(RST_STREAM, 0, stream_id, _U32.pack(code)))

    def _stream_error(self, stream_id: int, code: ErrorCode, call: Call | None = None) -> None:
        """RST_STREAM with `code`: the stream is closed, the rest of the connection goes on."""
        self._reset(stream_id, code)
        if call is not None:
            self._forget(call, ClosedBy.SENT_RST)
        else:
            self._remember(stream_id, ClosedBy.SENT_RST)

    def stream_state(self, stream_id: int) -> StreamState:
        """The state of a client stream (RFC 9113 §5.1), as bbr sees it now."""
        call = self.calls.get(stream_id)
        if call is not None:
            return StreamState.HALF_CLOSED_REMOTE if call.remote_closed else StreamState.OPEN
        if stream_id > self.last_stream_id or not stream_id & 1:  # even: never opened
            return StreamState.IDLE
        return StreamState.CLOSED

    def closed_by(self, stream_id: int) -> ClosedBy:
        """How a closed stream closed. Resets are remembered (the last CLOSED_MEMORY of
        them) and so are the ids a client skipped; any other closed stream ended both ways,
        the normal end, which therefore costs a call no bookkeeping."""
        how = self._closed.get(stream_id)
        if how is not None:
            return how
        for low, high in self._skipped:
            if low <= stream_id <= high:
                return ClosedBy.NEVER_OPENED
        return ClosedBy.END_STREAM

    def _not_open(self, kind: int, stream_id: int) -> None:
        """A frame (DATA, HEADERS, RST_STREAM, WINDOW_UPDATE) on a stream that is not
        open: what RFC 9113 §5.1 asks of idle and closed streams."""
        if self.stream_state(stream_id) is StreamState.IDLE:
            # Only HEADERS and PRIORITY may open a stream (HEADERS never gets here).
            raise H2Error(PROTOCOL_ERROR, f"frame type {kind} on idle stream {stream_id}")
        if kind != DATA and kind != HEADERS:
            return  # WINDOW_UPDATE and RST_STREAM may cross our END_STREAM or RST_STREAM
        how = self.closed_by(stream_id)
        if how is ClosedBy.SENT_RST:
            return  # sent before our RST_STREAM reached the client: ignore (§5.1)
        if how is ClosedBy.END_STREAM:
            raise H2Error(STREAM_CLOSED, f"frame type {kind} after END_STREAM on {stream_id}")
        if how is ClosedBy.NEVER_OPENED and kind == HEADERS:
            # A new stream's id must exceed every earlier one (§5.1.1).
            raise H2Error(PROTOCOL_ERROR, f"HEADERS on closed stream {stream_id}")
        self._stream_error(stream_id, STREAM_CLOSED)  # then ignored like any we reset

    def _remember(self, stream_id: int, how: ClosedBy) -> None:
        ring = self._closed_ring
        if len(ring) < CLOSED_MEMORY:  # grown as streams close: nothing for idle connections
            ring.append(stream_id)
        else:
            slot = self._closed_next
            self._closed.pop(ring[slot], None)
            ring[slot] = stream_id
            self._closed_next = (slot + 1) % CLOSED_MEMORY
        self._closed[stream_id] = how

    def _skip(self, low: int, high: int) -> None:
        if len(self._skipped) >= SKIPPED_MEMORY:
            del self._skipped[0]
        self._skipped.append((low, high))

    def _forget(self, call: Call, how: ClosedBy = ClosedBy.SENT_RST) -> None:
        stream_id = call.stream_id
        if how is not ClosedBy.END_STREAM:  # the normal end needs no record (closed_by)
            self._remember(stream_id, how)
        self.calls.pop(stream_id, None)
        if self._blocked:
            self._blocked.pop(stream_id, None)
        if self._stalled:
            self._stalled.pop(stream_id, None)
        if self.partial:
            self.partial.pop(stream_id, None)
        if self.withheld:
            self.withheld.pop(stream_id, None)
        if call.reserved or call.loose or call.retained or call.waiting or call.pending:
            self._release(call)
        call.done = True  # `_close_call`, inline
        try:
            call.closed()
        except Exception:  # a bug in one call must not take the connection down
            log.exception("error closing a call")
        if not self.calls:
            self.idle_since = self.now
            if self.goaway_sent:
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

    def _peer_goaway(self) -> None:
        """The client opens no more streams; its calls go on, and the connection closes when
        the last ends (as on drain). With none open it closes a moment later, not at once:
        frames sent after the GOAWAY (a PING) are answered, not met by the reset a close
        with unread input makes (h2spec 7)."""
        if self._send_goaway(NO_ERROR, "") and not self.calls:
            asyncio.get_running_loop().call_later(LINGER_SECONDS, self._close_soon)

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
        self.server.on_close(_code_name(code))
        self._send_goaway(code, reason)
        self.flush()
        if self.transport is None or self.transport.is_closing():
            return
        # Closing with the client's frames unread would make the kernel answer with a
        # reset, which can destroy the GOAWAY before the client reads it: read and drop
        # for a moment (nothing is parsed), then close.
        self._discarding = True
        self._paused = 0
        self.transport.resume_reading()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, self._linger_end)

    def _linger_end(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
            asyncio.get_running_loop().call_later(LINGER_SECONDS, self.abort)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- the server's sweep --

    def sweep(self, now: float) -> None:
        """Timeouts, checked about once a second: preface, idle, first message, partial."""
        limits = self.limits
        if not self.established:
            if now - self.opened_at > limits.handshake_timeout:
                log.debug("http2 preface timeout")
                self.server.on_close("handshake_timeout")
                self.abort()
            return
        if not self.calls:
            if now - self.idle_since > limits.idle_timeout:
                self.server.on_close("idle_timeout")
                self.goaway()
                self._close_soon()
            elif self._receive is not None and not self._filled:
                self._receive_view.release()  # an idle connection keeps no buffer
                self._receive = None
                self._small = False
                self._receive_view = memoryview(b"")
            return
        if self.withheld and not self.over_budget():
            for call in list(self.withheld.values()):
                del self.withheld[call.stream_id]
                if not call.done:
                    size = len(call._buffer)
                    self._after_feed(call, size, 0)
        deadline = now - limits.first_message_timeout
        late = [
            call
            for call in self.calls.values()
            if call.born < deadline and not (call.fed or call.done or call.remote_closed)
        ]
        for call in late:
            call.finish(
                DEADLINE_EXCEEDED,
                f"no complete message within {limits.first_message_timeout:g} s",
            )
        if self.partial:
            deadline = now - limits.stream_idle_timeout
            for call in list(self.partial.values()):
                size = len(call._buffer)
                if size != call.swept:  # DATA came since the last look
                    call.swept, call.last_data = size, now
                elif call.last_data < deadline and not call.done and not call.waiting:
                    call.finish(
                        DEADLINE_EXCEEDED,
                        f"part of a message and no DATA for {limits.stream_idle_timeout:g} s",
                    )
        self.flush()


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


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        with contextlib.suppress(Exception):
            sock = transport.get_extra_info("socket")
            if sock is not None:  # RST, not FIN: nothing lingers in TIME_WAIT
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if isinstance(transport, asyncio.WriteTransport):
            transport.abort()
        else:
            transport.close()


# --- the server --------------------------------------------------------------------------

ACCEPT_BATCH = 16  # connections accepted per loop turn (fds open before the cap is checked)
LISTEN_BACKLOG = 1024
LOG_EVERY = 10.0  # seconds between two log lines about refused connections or accept errors
LINGER_SECONDS = 1.0  # after a connection error, how long input is read and dropped


class Server:
    """Calls by path, one listening socket, and a drain that waits for open calls."""

    def __init__(
        self, routes: dict[str, CallFactory], *, max_message: int, limits: Limits | None = None
    ) -> None:
        self.routes = {path.encode(): factory for path, factory in routes.items()}
        self.max_message = max_message
        self.limits = limits = limits or Limits()
        self.connections: set[Connection] = set()
        self.accepted: weakref.WeakSet[Connection] = weakref.WeakSet()
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clock: Callable[[], float] = _no_clock
        self.closed = 0  # connections ever closed: tells the memory trimmer about new work
        self.loose = 0
        self.reserved = 0
        self.out_bytes = 0
        self.waiting: deque[Call] = deque()
        self.refused = 0
        # Told why bbr closed a connection: an HTTP/2 error code's name, "refused" (the
        # cap), "handshake_timeout", "idle_timeout" (bbr.server counts them).
        self.on_close: Callable[[str], None] = _ignore
        self._refused_logged = 0
        self._refused_at = -LOG_EVERY
        self._accept_errors = 0
        self._accept_logged_at = -LOG_EVERY
        self._listener: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        # The connection window is returned as data is accounted, so it only needs to be
        # large enough never to be what slows an honest peer down.
        self.connection_window = min(MAX_WINDOW, max(limits.connection_buffer, 2 * max_message))
        self.settings_frames = frame(
            SETTINGS,
            0,
            0,
            b"".join(
                _SETTING.pack(k, v)
                for k, v in (
                    (ENABLE_PUSH, 0),
                    (MAX_CONCURRENT_STREAMS, limits.max_streams),
                    (INITIAL_WINDOW_SIZE, limits.stream_window),
                    (MAX_HEADER_LIST_SIZE, HEADER_LIST_LIMIT),
                )
            ),
        ) + frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.connection_window - DEFAULT_WINDOW))

    @property
    def held(self) -> int:
        """What every connection holds: admitted messages, loose bytes, queued answers."""
        return self.loose + self.reserved + self.out_bytes

    def admit(self) -> None:
        """Admit waiting messages, oldest first, while the budgets have room."""
        waiting = self.waiting
        for _ in range(len(waiting)):
            call = waiting.popleft()
            if call.done or not call.waiting:
                call.waiting = 0
                continue
            if not call.conn.admit(call):
                waiting.append(call)
                if self.reserved >= self.limits.process_buffer:
                    break

    def _connection(self) -> asyncio.BaseProtocol:
        """The protocol for an accepted socket: a Connection, or a refusal over the cap."""
        if len(self.accepted) >= self.limits.max_connections:
            self.refused += 1
            self.on_close("refused")
            now = self.clock()
            if now - self._refused_at >= LOG_EVERY:
                log.warning(
                    "connection refused: too many connections",
                    extra=fields(
                        max_connections=self.limits.max_connections,
                        refused=self.refused - self._refused_logged,
                    ),
                )
                self._refused_at, self._refused_logged = now, self.refused
            return _Refused()
        conn = Connection(self)
        self.accepted.add(conn)
        return conn

    async def listen(
        self,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        ssl_context: ssl.SSLContext | None = None,
    ) -> int:
        loop = asyncio.get_running_loop()
        self.loop = loop
        # The loop's clock, read once per socket read: asyncio's own is time.monotonic
        # behind a Python method, so that is called directly when it is the one in use.
        self.clock = time.monotonic if type(loop).time is asyncio.BaseEventLoop.time else loop.time
        self._quiet_accept_errors(loop)
        self._listener = await loop.create_server(
            self._connection,
            host,
            port,
            reuse_address=True,
            reuse_port=reuse_port or None,
            ssl=ssl_context,
            ssl_handshake_timeout=self.limits.handshake_timeout if ssl_context else None,
            # asyncio accepts up to `backlog` sockets per loop turn, all holding fds before
            # any over the cap is closed: a small batch keeps that overshoot small ...
            backlog=ACCEPT_BATCH,
        )
        for listening in self._listener.sockets:  # ... while the kernel queue stays long
            with (
                contextlib.suppress(OSError),
                socket.socket(fileno=os.dup(listening.fileno())) as dup,
            ):
                dup.listen(LISTEN_BACKLOG)
        self._sweeper = asyncio.create_task(self._sweep())
        bound: int = self._listener.sockets[0].getsockname()[1]
        return bound

    def _quiet_accept_errors(self, loop: asyncio.AbstractEventLoop) -> None:
        """asyncio logs every failed accept() when fds run out (thousands a second):
        one line every LOG_EVERY seconds instead, with the count."""
        previous = loop.get_exception_handler()

        def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
            if str(context.get("message", "")).startswith("socket.accept() out of system"):
                self._accept_errors += 1
                now = loop.time()
                if now - self._accept_logged_at >= LOG_EVERY:
                    log.error(
                        "accept failed: out of file descriptors or memory",
                        extra=fields(
                            errors=self._accept_errors, error=str(context.get("exception"))
                        ),
                    )
                    self._accept_logged_at, self._accept_errors = now, 0
                return
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)

        loop.set_exception_handler(handler)

    async def _sweep(self) -> None:
        period = max(0.05, min(1.0, self.limits.handshake_timeout / 4))
        while True:
            await asyncio.sleep(period)
            now = self.clock()
            over = self.held > self.limits.process_buffer
            for conn in list(self.accepted):
                if conn.transport is None:
                    if now - conn.opened_at > 2 * self.limits.handshake_timeout:
                        self.accepted.discard(conn)  # a TLS handshake that never finished
                        self.on_close("handshake_timeout")
                    continue
                if conn.closing:
                    continue
                try:
                    conn.sweep(now)
                except Exception:  # the sweep must go on for the others
                    log.exception("error sweeping a connection")
                if conn._stalled and not over and not conn._unstall_soon:
                    conn._unstall_soon = True
                    conn._unstall()
            if self.waiting:
                self.admit()

    def busy(self) -> bool:
        """Any call open on any connection."""
        return any(conn.calls for conn in self.connections)

    def connection_gone(self) -> None:
        self.closed += 1
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
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.wait_closed(), 1)


def _no_clock() -> float:
    return 0.0


def _ignore(reason: str) -> None:
    pass


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)
