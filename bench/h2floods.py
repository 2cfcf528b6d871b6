"""Health-check latency on one connection while another floods the gRPC port.

    python -m bench.h2floods [--seconds 3]

Starts `bbr serve` with the flood limits raised out of reach (so each flood goes on for
the whole run instead of being closed at once; `--limits default` keeps them and the
attacker reconnects whenever it is closed), floods from one raw connection (its own
process) and sends a health Check every 10 ms on another; prints p50/p99/max per flood, and the same
with no flood as the reference. On loopback only, a few seconds per flood.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import struct
import subprocess
import time
from statistics import median

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.common import MODEL_MAP, percentile
from bench.tables import Column, Table
from harness.h2client import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    PING,
    PRIORITY,
    PROCESS_PATH,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Attacker,
    frame,
)
from harness.processes import bbr_argv, free_port

UNLIMITED = (
    *("--max-pings-per-second", "100000000"),
    *("--max-resets-per-second", "100000000"),
    *("--max-empty-frames", "100000000"),
    *("--max-continuation-frames", "100000000"),
    *("--max-priority-frames", "100000000"),
    *("--max-window-updates", "100000000"),
)


def flood_units(attacker: Attacker) -> dict[str, bytes]:
    def resets() -> bytes:
        out = b""
        for _ in range(200):
            stream_id, head = attacker.headers(PROCESS_PATH)
            out += head + frame(RST_STREAM, 0, stream_id, struct.pack(">L", 8))
        return out

    settings = b"".join(struct.pack(">HL", INITIAL_WINDOW_SIZE, 1000 + i) for i in range(2730))
    return {
        "ping": frame(PING, 0, 0, b"12345678") * 4000,
        "settings (16 KiB of INITIAL_WINDOW_SIZE)": frame(SETTINGS, 0, 0, settings),
        "window_update": frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1)) * 4000,
        "priority": frame(PRIORITY, 0, 1, struct.pack(">LB", 0, 16)) * 4000,
        "rapid reset": b"",  # built per burst
        "empty data": b"",
        "continuation (empty)": b"",
        "_resets": resets(),
    }


TABLE = Table(
    Column("flood", 45, left=True),
    Column("checks", 6),
    *(Column(title, 7, ".2f") for title in ("p50 ms", "p99 ms", "max ms")),
    sep=" ",
)


def run(seconds: float, *, limited: bool) -> None:
    grpc_port, health_port, metrics_port = free_port(), free_port(), free_port()
    flags = ["--log-level", "warning", *(() if limited else UNLIMITED)]
    argv = bbr_argv(
        MODEL_MAP,
        grpc_port=grpc_port,
        health_port=health_port,
        metrics_port=metrics_port,
        flags=flags,
    )
    server = subprocess.Popen(argv, stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 20
        while True:
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        kinds = ["none", "ping", "settings (16 KiB of INITIAL_WINDOW_SIZE)", "window_update"]
        kinds += ["priority", "rapid reset", "empty data", "continuation (empty)"]
        print(*TABLE.header(), sep="\n")
        for kind in kinds:
            latencies = probe(stub, grpc_port, kind, seconds)
            ordered = sorted(latencies)
            p99 = percentile(ordered, 0.99)
            print(
                TABLE.row(
                    kind, len(ordered), *(1e3 * t for t in (median(ordered), p99, ordered[-1]))
                )
            )
        channel.close()
    finally:
        server.terminate()
        server.wait(10)


def attack(port: int, kind: str, seconds: float) -> None:
    """The flood, from its own process: the probe's client must not share a GIL with it."""
    attacker = Attacker(port)
    units = flood_units(attacker)
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            if attacker.sock.fileno() < 0:  # closed by bbr (ENHANCE_YOUR_CALM): again
                attacker = Attacker(port)
            if kind == "rapid reset":
                burst = b""
                for _ in range(200):
                    stream_id, head = attacker.headers(PROCESS_PATH)
                    burst += head + frame(RST_STREAM, 0, stream_id, struct.pack(">L", 8))
            elif kind == "empty data":
                stream_id, head = attacker.headers(PROCESS_PATH)
                burst = head + frame(DATA, 0, stream_id) * 4000
            elif kind == "continuation (empty)":
                stream_id, head = attacker.headers(PROCESS_PATH)
                start = frame(HEADERS, 0, stream_id, head[9:])
                burst = start + frame(CONTINUATION, 0, stream_id) * 4000
                burst += frame(CONTINUATION, END_HEADERS, stream_id)
            else:
                burst = units[kind]
            if not attacker.send(burst, timeout=1):
                attacker.close()
    finally:
        attacker.close()


def probe(stub: health_pb2_grpc.HealthStub, port: int, kind: str, seconds: float) -> list[float]:
    flood = None
    if kind != "none":
        flood = multiprocessing.get_context("fork").Process(
            target=attack, args=(port, kind, seconds + 1), daemon=True
        )
        flood.start()
        time.sleep(0.5)
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        latencies.append(time.perf_counter() - start)
        time.sleep(0.01)
    if flood is not None:
        flood.join(5)
        if flood.is_alive():
            flood.kill()
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument(
        "--limits",
        choices=("off", "default"),
        default="off",
        help="off: limits out of reach, one endless flood; default: bbr's limits, the"
        " attacker reconnecting each time it is closed",
    )
    args = parser.parse_args()
    run(args.seconds, limited=args.limits == "default")


if __name__ == "__main__":
    main()
