"""The gRPC port against a hostile client: a real `bbr serve`, attacked on loopback.

Each attack is bounded in time and size. Each test asserts what an operator would
notice: bbr's memory stays under the bound SECURITY.md gives for the flags used here,
the attacker's connection is closed (GOAWAY ENHANCE_YOUR_CALM where a flood limit
applies), and on another connection a Process call is routed and a health check is
answered, promptly.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import ssl
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import hpack
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from harness.h2client import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    ENHANCE_YOUR_CALM,
    EXT_PROC_SERVICE,
    GOAWAY,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    PING,
    PREFACE,
    PRIORITY,
    PROCESS_PATH,
    REFLECTION_PATH,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Attacker,
    frame,
    grpc_message,
)
from harness.modelmaps import configmap_yaml, write_model_map
from harness.processes import REPO_ROOT, free_ports
from tests.extproc import set_headers
from tests.support import (
    CHANNEL_OPTIONS,
    BbrProcess,
    StartBbr,
    clean_env,
    request,
    route,
)

MiB = 1024 * 1024
# Small budgets, so that the documented bound is tight enough to mean something.
MAX_BODY = MiB
MESSAGE = MAX_BODY + 64 * 1024
CONNECTION_BUFFER = 4 * MiB
PROCESS_BUFFER = 16 * MiB
CONNECTION_OUTPUT = MiB
STREAMS = 128
LIMIT_ARGS = (
    *("--max-body-bytes", str(MAX_BODY)),
    *("--connection-buffer-bytes", str(CONNECTION_BUFFER)),
    *("--process-buffer-bytes", str(PROCESS_BUFFER)),
    *("--connection-output-bytes", str(CONNECTION_OUTPUT)),
    *("--max-concurrent-streams", str(STREAMS)),
    *("--handshake-timeout", "1"),
    *("--idle-timeout", "3"),
    *("--first-message-timeout", "2"),
    *("--stream-idle-timeout", "2"),
    *("--max-connections", "400"),
)
# SECURITY.md: RSS <= RSS_0 + 1.5 P + W + C (R + 128 KiB + A + S K): W the stream window,
# R the receive buffer, A one answer past the budget, K an open stream. The tests add a
# margin for the allocator and for the test's own health checks.
RECEIVE = 272 * 1024
ANSWER = 256 * 1024
WINDOW = 1024 * 1024
PER_STREAM = 4 * 1024
MARGIN = 40 * MiB


def bound(connections: int) -> int:
    """The documented worst case for `connections` attacker connections (plus margin)."""
    per_connection = RECEIVE + 128 * 1024 + ANSWER + STREAMS * PER_STREAM
    return int(1.5 * PROCESS_BUFFER + WINDOW + connections * per_connection)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def bbr(start_bbr_module: StartBbr, tmp_path_factory: pytest.TempPathFactory) -> BbrProcess:
    path = write_model_map(
        tmp_path_factory.mktemp("map") / "map.yaml", configmap_yaml("llama", "llama", ["food"])
    )
    return start_bbr_module(*LIMIT_ARGS, model_map=path)


@pytest.fixture
def attackers(bbr: BbrProcess) -> Iterator[Callable[..., Attacker]]:
    made: list[Attacker] = []

    def make(**kwargs: object) -> Attacker:
        attacker = Attacker(bbr.grpc_port, **kwargs)  # type: ignore[arg-type]
        made.append(attacker)
        return attacker

    yield make
    for attacker in made:
        attacker.close()


def still_serving(bbr: BbrProcess) -> None:
    """Another connection: a Process call is routed and a health check answered."""
    with grpc.insecure_channel(f"127.0.0.1:{bbr.grpc_port}", options=CHANNEL_OPTIONS) as chan:
        assert route(chan, "food")["x-gateway-base-model-name"] == "llama"
        health = health_pb2_grpc.HealthStub(chan)
        reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


class HealthProbe:
    """Health checks on their own connection, every 20 ms, while an attack runs."""

    def __init__(self, bbr: BbrProcess) -> None:
        self.channel = grpc.insecure_channel(f"127.0.0.1:{bbr.grpc_port}")
        self.stub = health_pb2_grpc.HealthStub(self.channel)
        self.stub.Check(health_pb2.HealthCheckRequest(), timeout=5)  # connected and warm
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.perf_counter()
            try:
                self.stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                self.latencies.append(time.perf_counter() - start)
            except grpc.RpcError:
                self.failures += 1
            time.sleep(0.02)

    def stop(self) -> float:
        """The p99 latency in seconds."""
        self._stop.set()
        self._thread.join(5)
        self.channel.close()
        assert self.latencies, "no health check answered during the attack"
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        print(
            f"health during attack: n={len(ordered)} median="
            f"{statistics.median(ordered) * 1000:.1f} ms p99={p99 * 1000:.1f} ms"
            f" failures={self.failures}"
        )
        return p99


@contextlib.contextmanager
def probing(bbr: BbrProcess) -> Iterator[HealthProbe]:
    probe = HealthProbe(bbr)
    try:
        yield probe
    finally:
        p99 = probe.stop()
    assert probe.failures == 0
    # The target is 10 ms (docs/performance.md has the figures); this bound only says
    # the health check was never starved, with room for a loaded 2-core test machine.
    assert p99 < 1.5, f"health check p99 {p99 * 1000:.0f} ms during the attack"


# --- memory ------------------------------------------------------------------------------


def test_zero_window_reflection_requests_do_not_pile_up_answers(
    bbr: BbrProcess, attackers: Callable[..., Attacker]
) -> None:
    """The client shuts its window and asks for reflection answers for 3 s: bbr stops
    answering (and reading) once its output budget is full; memory stays bounded."""
    before = rss(bbr.pid)
    attacker = attackers(window=0)
    request = grpc_message(
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol=EXT_PROC_SERVICE
        ).SerializeToString()
    )
    sent = 0
    with probing(bbr):
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            stream_id, head = attacker.headers(REFLECTION_PATH)
            burst = head + b"".join(frame(DATA, 0, stream_id, request) for _ in range(20))
            if not attacker.send(burst, timeout=0.5):
                break  # bbr stopped reading: what the test wants to see
            sent += 20
        grown = rss(bbr.pid) - before
    assert grown < bound(1) + MARGIN, f"RSS grew {grown / MiB:.0f} MiB for {sent} requests"
    still_serving(bbr)


def test_partial_messages_on_many_streams_are_bounded_then_dropped(
    bbr: BbrProcess, attackers: Callable[..., Attacker]
) -> None:
    """Streams announce 1 MiB messages and send only what their window allows: bbr admits
    what the budgets hold, never opens more window, and drops them after the
    stream idle timeout."""
    before = rss(bbr.pid)
    victims = [attackers() for _ in range(4)]
    prefix = b"\x00" + struct.pack(">L", MAX_BODY)
    for attacker in victims:
        for _ in range(STREAMS):
            stream_id, head = attacker.headers(PROCESS_PATH)
            chunk = prefix + b"x" * (16384 - 5)
            attacker.send(head + frame(DATA, 0, stream_id, chunk), timeout=1)
            # Within any window bbr gave: the first 64 KiB.
            attacker.send(b"".join(frame(DATA, 0, stream_id, b"y" * 16384) for _ in range(3)))
    grown = rss(bbr.pid) - before
    assert grown < bound(4) + MARGIN, f"RSS grew {grown / MiB:.0f} MiB"
    still_serving(bbr)
    # After the stream idle timeout (2 s here) each partial stream is ended with
    # DEADLINE_EXCEEDED (gRPC status 4) and what it held is freed.
    time.sleep(3.5)
    victim = victims[0].sock
    victim.settimeout(2)
    answers = b""
    with contextlib.suppress(TimeoutError, OSError):
        while answers.count(b"grpc-status") < 2:
            chunk = victim.recv(1 << 20)
            if not chunk:
                break
            answers += chunk
    assert b"\x0bgrpc-status\x014" in answers, answers[:300]
    still_serving(bbr)


def test_sending_beyond_the_window_is_a_flow_control_error(
    bbr: BbrProcess, attackers: Callable[..., Attacker]
) -> None:
    attacker = attackers()
    stream_id, head = attacker.headers(PROCESS_PATH)
    prefix = b"\x00" + struct.pack(">L", 10 * MAX_BODY)  # too large: never admitted
    data = [frame(DATA, 0, stream_id, (prefix if i == 0 else b"") + b"z" * 16000) for i in range(8)]
    attacker.send(head + b"".join(data))
    got = b""
    attacker.sock.settimeout(3)
    with contextlib.suppress(TimeoutError, OSError):
        while b"\x00\x00\x04\x03" not in got:
            chunk = attacker.sock.recv(65536)
            if not chunk:
                break
            got += chunk
    # A stream error: RST_STREAM FLOW_CONTROL_ERROR (3), or the stream ended with
    # RESOURCE_EXHAUSTED before; either way nothing past the window was kept.
    assert b"\x00\x00\x04\x03" in got or b"grpc-status" in got or b"\x00\x00\x00\x03" in got
    still_serving(bbr)


# --- silent and slow connections ---------------------------------------------------------


def test_silent_and_trickling_connections_are_closed_after_the_handshake_timeout(
    bbr: BbrProcess,
) -> None:
    silent = [socket.create_connection(("127.0.0.1", bbr.grpc_port)) for _ in range(100)]
    trickler = socket.create_connection(("127.0.0.1", bbr.grpc_port))
    try:
        started = time.monotonic()
        closed_at = None
        for byte in PREFACE:
            try:
                trickler.sendall(bytes([byte]))
            except OSError:
                closed_at = time.monotonic()
                break
            time.sleep(0.2)
        trickler.settimeout(4)
        with contextlib.suppress(ConnectionResetError):
            while trickler.recv(65536):
                pass
        closed_at = closed_at or time.monotonic()
        assert closed_at - started < 4, "a trickled preface kept its connection"
        for sock in silent:  # each was closed: reading gives EOF (or a reset), not a wait
            sock.settimeout(0.5)
            with contextlib.suppress(ConnectionResetError):
                while sock.recv(65536):
                    pass
    finally:
        for sock in [*silent, trickler]:
            sock.close()
    still_serving(bbr)


def test_idle_connection_is_closed(bbr: BbrProcess, attackers: Callable[..., Attacker]) -> None:
    attacker = attackers()
    codes = attacker.goaway_codes(timeout=6)
    assert codes is not None, "an idle connection was kept past --idle-timeout"


def test_a_client_goaway_is_answered_then_the_connection_closes(
    bbr: BbrProcess, attackers: Callable[..., Attacker]
) -> None:
    """A client's GOAWAY ends the connection gracefully: a PING sent after it is still
    answered (h2spec 7 failed now and then on a reset instead), then bbr closes."""
    client = attackers()
    assert client.send(frame(GOAWAY, 0, 0, struct.pack(">LL", 0, 0xFF)))  # unknown code
    time.sleep(0.2)  # its own read: bbr has acted on the GOAWAY
    assert client.send(frame(PING, 0, 0, b"h2spec\x00\x00"))
    frames, closed = client.frames_until_closed(timeout=3)
    assert (PING, 0x1, b"h2spec\x00\x00") in frames, frames
    assert any(kind == GOAWAY for kind, _, _ in frames), frames
    assert closed, "bbr kept the connection open after the client's GOAWAY"


def test_stream_without_a_first_message_is_ended(
    bbr: BbrProcess, attackers: Callable[..., Attacker]
) -> None:
    attacker = attackers()
    _, head = attacker.headers(PROCESS_PATH)
    attacker.send(head)
    attacker.sock.settimeout(5)
    got = b""
    with contextlib.suppress(TimeoutError):
        while b"grpc-status" not in got and b"\x0bgrpc-status" not in got:
            chunk = attacker.sock.recv(65536)
            if not chunk:
                break
            got += chunk
    assert b"grpc-status" in got, "no status for a stream that never sent a message"


# --- floods ------------------------------------------------------------------------------


def _flood(attacker: Attacker, unit: bytes, seconds: float = 3.0) -> list[int] | None:
    burst = unit * max(1, 65536 // len(unit))
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not attacker.send(burst, timeout=0.5):
            break
    return attacker.goaway_codes(timeout=5)


def _open_stream(attacker: Attacker) -> bytes:
    return attacker.headers(PROCESS_PATH)[1]


FLOODS: dict[str, Callable[[Attacker], bytes]] = {
    "ping": lambda a: frame(PING, 0, 0, b"12345678"),
    "settings": lambda a: frame(SETTINGS, 0, 0, b""),
    "window_update": lambda a: frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1)),
    "priority": lambda a: frame(PRIORITY, 0, 1, struct.pack(">LB", 0, 16)),
    "empty_data": lambda a: _open_stream(a) + frame(DATA, 0, a.next_stream - 2) * 50,
    "empty_headers": lambda a: frame(HEADERS, END_HEADERS, a.next_stream) * 1,
    "unknown_frames": lambda a: frame(0x42, 0, 0, b"x"),
}


@pytest.mark.parametrize("kind", sorted(FLOODS))
def test_flood_is_calmed(bbr: BbrProcess, attackers: Callable[..., Attacker], kind: str) -> None:
    attacker = attackers()
    before = rss(bbr.pid)
    with probing(bbr):
        unit = FLOODS[kind](attacker)
        if kind == "empty_headers":  # each on a new stream: ids must grow
            unit = b"".join(frame(HEADERS, END_HEADERS, 2 * i + 1) for i in range(200))
            attacker.send(unit)
            codes = attacker.goaway_codes()
        else:
            codes = _flood(attacker, unit)
    assert codes is not None, f"{kind} flood: connection not closed"
    assert ENHANCE_YOUR_CALM in codes, f"{kind} flood: GOAWAY codes {codes}"
    assert rss(bbr.pid) - before < bound(1) + MARGIN
    still_serving(bbr)
    calmed = bbr.metric("bbr_grpc_connections_closed_total", reason="ENHANCE_YOUR_CALM")
    assert calmed is not None and calmed >= 1


def test_rapid_reset_is_calmed(bbr: BbrProcess, attackers: Callable[..., Attacker]) -> None:
    attacker = attackers()
    with probing(bbr):
        burst = b""
        for _ in range(2000):
            stream_id, head = attacker.headers(PROCESS_PATH)
            burst += head + frame(RST_STREAM, 0, stream_id, struct.pack(">L", 8))
        attacker.send(burst, timeout=2)
        codes = attacker.goaway_codes()
    assert codes is not None and ENHANCE_YOUR_CALM in codes, codes
    still_serving(bbr)


def test_continuation_flood_of_empty_frames_is_calmed(
    bbr: BbrProcess, attackers: Callable[..., Attacker]
) -> None:
    attacker = attackers()
    stream_id, head = attacker.headers(PROCESS_PATH)
    start = frame(HEADERS, 0, stream_id, head[9:])  # no END_HEADERS: CONTINUATION follows
    with probing(bbr):
        codes = _flood(attacker, start + frame(CONTINUATION, 0, stream_id) * 5000, seconds=2)
    assert codes is not None and ENHANCE_YOUR_CALM in codes, codes
    still_serving(bbr)


def test_hpack_bomb_closes_the_connection(
    bbr: BbrProcess, attackers: Callable[..., Attacker]
) -> None:
    """One 4 KiB header in the table, then blocks naming it again and again."""
    attacker = attackers()
    before = rss(bbr.pid)
    big = hpack.Encoder()
    first = big.encode([(":method", "POST"), ("x-bomb", "b" * 4000)])
    repeat = bytes([0x80 | 62]) * 8000  # the newest dynamic entry, 8,000 times
    attacker.send(frame(HEADERS, END_HEADERS, 1, first + repeat[:16000]))
    codes = attacker.goaway_codes()
    assert codes is not None, "HPACK bomb: connection not closed"
    assert rss(bbr.pid) - before < bound(1) + MARGIN
    still_serving(bbr)


def test_initial_window_size_walk_costs_one_pass_per_frame(
    bbr: BbrProcess, attackers: Callable[..., Attacker]
) -> None:
    """SETTINGS frames full of INITIAL_WINDOW_SIZE entries with many streams open."""
    attacker = attackers()
    opening = b""
    for _ in range(STREAMS):
        opening += attacker.headers(PROCESS_PATH)[1]
    attacker.send(opening)
    entries = b"".join(struct.pack(">HL", INITIAL_WINDOW_SIZE, 1000 + i) for i in range(2730))
    with probing(bbr):
        codes = _flood(attacker, frame(SETTINGS, 0, 0, entries), seconds=3)
    assert codes is not None and ENHANCE_YOUR_CALM in codes, codes
    still_serving(bbr)


# --- the connection cap, and TLS -------------------------------------------------------


def test_connections_over_the_cap_are_refused_and_logged_once(
    start_bbr: StartBbr, simple_map: Path
) -> None:
    process = start_bbr(
        "--max-connections", "20", "--handshake-timeout", "30", model_map=simple_map
    )
    held = [socket.create_connection(("127.0.0.1", process.grpc_port)) for _ in range(20)]
    time.sleep(0.3)
    refused = []
    try:
        for _ in range(30):
            sock = socket.create_connection(("127.0.0.1", process.grpc_port))
            refused.append(sock)
        for sock in refused:
            sock.settimeout(3)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b"", "a connection over the cap was served"
        # The health port still answers; once the held ones go, the port serves again.
        assert process.health("") == health_pb2.HealthCheckResponse.SERVING
    finally:
        for sock in [*held, *refused]:
            sock.close()
    time.sleep(0.5)
    with grpc.insecure_channel(f"127.0.0.1:{process.grpc_port}") as chan:
        assert route(chan, "food")["x-gateway-base-model-name"] == "llama"
    lines = [r for r in process.log_records() if "too many connections" in str(r.get("msg"))]
    assert len(lines) == 1, lines  # rate-limited: one line for the 30 refusals
    assert process.metric("bbr_grpc_connections_closed_total", reason="refused") == 30


def test_silent_tls_connections_are_closed_after_the_handshake_timeout(
    start_bbr: StartBbr, simple_map: Path
) -> None:
    process = start_bbr(
        "--secure-serving", "--handshake-timeout", "1", model_map=simple_map, wait=True
    )
    silent = [socket.create_connection(("127.0.0.1", process.grpc_port)) for _ in range(50)]
    try:
        started = time.monotonic()
        for sock in silent:
            sock.settimeout(4)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""
        assert time.monotonic() - started < 4
        # A real TLS client still gets in and is served.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        context.set_alpn_protocols(["h2"])
        with (
            socket.create_connection(("127.0.0.1", process.grpc_port)) as raw,
            context.wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            assert tls.selected_alpn_protocol() == "h2"
    finally:
        for sock in silent:
            sock.close()


# --- and honest clients still get through --------------------------------------------


def test_bodies_up_to_the_limit_many_at_once_wait_their_turn(
    start_bbr: StartBbr, tmp_path: Path
) -> None:
    """Twelve buffered 1 MiB bodies at once on one connection whose budget holds three:
    each is admitted in turn (none deadlocks, none is refused); then three streamed ones
    at once (bbr holds a streamed body until its end), within the budget, all routed.

    Nine wait in line, each holding what its window let it send before its length was
    known: with a 64 KiB window that is 576 KiB, inside the quarter of the budget (1 MiB)
    that bytes not admitted may hold (SECURITY.md: a quarter of the connection budget
    over the window is how many long messages can wait). With the default 1 MiB window
    the ninth would be refused, sooner or later depending on how fast the client sends
    (this test failed one run in three)."""
    path = write_model_map(tmp_path / "map.yaml", configmap_yaml("llama", "llama", ["food"]))
    bbr = start_bbr(*LIMIT_ARGS, "--stream-window", "65536", model_map=path)
    payload = b'{"model": "food", "messages": [{"content": "' + b"x" * (MAX_BODY - 100) + b'"}]}'
    with (
        grpc.insecure_channel(f"127.0.0.1:{bbr.grpc_port}", options=CHANNEL_OPTIONS) as chan,
        ThreadPoolExecutor(12) as pool,
    ):
        buffered = list(pool.map(lambda i: set_headers(request(chan, payload)), range(12)))
        streamed = list(
            pool.map(
                lambda i: set_headers(request(chan, payload, streaming=True, chunks=16)),
                range(3),
            )
        )
    for result in [*buffered, *streamed]:
        assert result.get("x-gateway-base-model-name") == "llama", result


def test_a_low_fd_limit_lowers_the_cap_instead_of_failing_accept(
    simple_map: Path, tmp_path: Path
) -> None:
    """With 256 fds and --max-connections 1000, bbr fits the cap to the fds: extra
    connections are refused and logged once, never an accept() error storm."""
    grpc_port, health_port, metrics_port = free_ports(3)
    argv = [sys.executable, "-m", "bbr", "serve", "--model-map", str(simple_map)]
    argv += ["--grpc-port", str(grpc_port), "--grpc-health-port", str(health_port)]
    argv += ["--metrics-port", str(metrics_port), "--max-connections", "1000"]
    argv += ["--handshake-timeout", "30"]
    stderr = tmp_path / "stderr"

    def low_fds() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            argv, cwd=REPO_ROOT, env=clean_env(), stderr=err, preexec_fn=low_fds
        )
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 15
        while b'"serving"' not in stderr.read_bytes():
            assert proc.poll() is None and time.monotonic() < deadline, stderr.read_text()
            time.sleep(0.1)
        for _ in range(300):
            held.append(socket.create_connection(("127.0.0.1", grpc_port)))
        time.sleep(2)
        text = stderr.read_text()
        assert "lowered to fit the open-file limit" in text
        assert text.count("too many connections") == 1
        assert "accept failed" not in text and "out of system resource" not in text
        for sock in held:
            sock.close()
        held.clear()
        time.sleep(0.5)
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as chan:
            assert route(chan, "food")["x-gateway-base-model-name"] == "llama"
    finally:
        for sock in held:
            sock.close()
        proc.terminate()
        proc.wait(10)
