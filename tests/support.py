"""Test helpers: run bbr as a real process and talk to it as Envoy and Prometheus do.

`start_bbr(*args, env=None, model_map=None) -> BbrProcess` starts `python -m bbr serve`
on free ports, waits for gRPC health SERVING and always kills the process at teardown.
`run_bbr(*args)` runs a short-lived `python -m bbr ...` (bad flags, `validate`).
`Conversation` drives one ext_proc stream message by message. Ports, model-map files
and polling come from `harness`; tests/conftest.py holds only the fixtures.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from harness.processes import REPO_ROOT, bbr_port_flags, free_ports
from tests import extproc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
START_TIMEOUT = 10.0
# Client side of the channel: no 4 MiB cap, so large bodies reach bbr's own limit.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]
BASE_HEADER = "x-gateway-base-model-name"
MODEL_HEADER = "x-gateway-model-name"


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without any BBR_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BBR_")}
    env["PYTHONUNBUFFERED"] = "1"
    if extra:
        env.update(extra)
    return env


def run_bbr(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 20.0
) -> subprocess.CompletedProcess[str]:
    """Run `python -m bbr ARGS` to completion (for commands that should exit)."""
    return subprocess.run(
        [sys.executable, "-m", "bbr", *args],
        cwd=REPO_ROOT,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def validate_table(stdout: str) -> dict[str, tuple[str, str]]:
    """`bbr validate`'s table: model -> (base model, source)."""
    rows: dict[str, tuple[str, str]] = {}
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip(), maxsplit=2)
        if len(cells) == 3 and cells[0] != "MODEL":
            rows[cells[0]] = (cells[1], cells[2])
    return rows


# --- ext_proc ---------------------------------------------------------------------------


def json_body(model: object = None, **fields: object) -> bytes:
    payload: dict[str, object] = {}
    if model is not None:
        payload["model"] = model
    payload.update(fields)
    if not payload:
        payload["messages"] = [{"role": "user", "content": "hi"}]
    return json.dumps(payload).encode()


def immediate(responses: Iterable[pb.ProcessingResponse]) -> pb.ImmediateResponse | None:
    for response in responses:
        if response.HasField("immediate_response"):
            return response.immediate_response
    return None


def call(
    channel: grpc.Channel,
    *messages: pb.ProcessingRequest,
    timeout: float = 10.0,
) -> list[pb.ProcessingResponse]:
    """One whole ext_proc stream: send every message, half-close, collect every answer."""
    stub = extproc.stub(channel)
    return list(stub.Process(iter(messages), timeout=timeout))


def request(
    channel: grpc.Channel,
    body: bytes,
    *,
    streaming: bool = False,
    header_items: Mapping[str, str] | None = None,
    chunks: int = 1,
    timeout: float = 10.0,
) -> list[pb.ProcessingResponse]:
    """A POST with a JSON body, as Envoy sends it (buffered, or streamed in `chunks`)."""
    items = {"content-type": "application/json", **(header_items or {})}
    messages = [extproc.headers(items, streaming=True if streaming else None)]
    if streaming and chunks > 1:
        size = -(-len(body) // chunks)
        parts = [body[i : i + size] for i in range(0, len(body), size)]
        messages.extend(
            extproc.body(part, end_of_stream=i == len(parts) - 1) for i, part in enumerate(parts)
        )
    else:
        messages.append(extproc.body(body))
    return call(channel, *messages, timeout=timeout)


def route(channel: grpc.Channel, model: str, *, streaming: bool = False) -> dict[str, str]:
    """The routing headers bbr sets for a chat request naming `model`."""
    responses = request(channel, json_body(model), streaming=streaming)
    answer = immediate(responses)
    if answer is not None:
        return {":status": str(answer.status.code)}
    return extproc.set_headers(responses)


def base_model(channel: grpc.Channel, model: str) -> str | None:
    """Where bbr routes `model` now (None: not in the map)."""
    return route(channel, model).get(BASE_HEADER)


class Conversation:
    """One ext_proc stream driven message by message, as Envoy does it."""

    _END = object()

    def __init__(self, channel: grpc.Channel, *, timeout: float = 30.0) -> None:
        self._outbox: queue.Queue[object] = queue.Queue()
        self._inbox: queue.Queue[pb.ProcessingResponse | BaseException | object] = queue.Queue()
        self._peeked: list[object] = []
        self.finished = threading.Event()
        self._call: Any = extproc.stub(channel).Process(self._requests(), timeout=timeout)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _requests(self) -> Iterator[pb.ProcessingRequest]:
        while True:
            item = self._outbox.get()
            if item is self._END:
                return
            assert isinstance(item, pb.ProcessingRequest)
            yield item

    def _read(self) -> None:
        try:
            for response in self._call:
                self._inbox.put(response)
            self._inbox.put(self._END)
        except BaseException as exc:  # grpc.RpcError: handed to the reader
            self._inbox.put(exc)
        finally:
            self.finished.set()

    def send(self, *messages: pb.ProcessingRequest) -> None:
        for message in messages:
            self._outbox.put(message)

    def close(self) -> None:
        """Half-close: Envoy has nothing more to send."""
        self._outbox.put(self._END)

    def cancel(self) -> None:
        self._call.cancel()

    def _next(self, timeout: float) -> object:
        if self._peeked:
            return self._peeked.pop(0)
        return self._inbox.get(timeout=timeout)

    def recv(self, timeout: float = 5.0) -> pb.ProcessingResponse:
        """The next answer; fails the test when none comes in time or the call ended."""
        try:
            item = self._next(timeout)
        except queue.Empty:
            pytest.fail(f"no ext_proc answer within {timeout} s")
        if isinstance(item, BaseException):
            raise item
        if item is self._END:
            pytest.fail("the ext_proc stream ended without an answer")
        assert isinstance(item, pb.ProcessingResponse)
        return item

    def nothing_within(self, seconds: float) -> bool:
        """True when no answer (and no end) arrives within `seconds`."""
        try:
            item = self._next(seconds)
        except queue.Empty:
            return True
        self._peeked.insert(0, item)
        return False

    def rest(self, timeout: float = 5.0) -> list[pb.ProcessingResponse]:
        """Half-close and collect every remaining answer until the call ends OK."""
        self.close()
        out: list[pb.ProcessingResponse] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail("the ext_proc stream did not end")
            try:
                item = self._next(left)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            if item is self._END:
                return out
            assert isinstance(item, pb.ProcessingResponse)
            out.append(item)


# --- metrics ----------------------------------------------------------------------------


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, keyed by name and labels."""
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric_value(text: str, name: str, **labels: str) -> float | None:
    return metric_samples(text).get((name, frozenset(labels.items())))


# --- the process ------------------------------------------------------------------------


class BbrProcess:
    """A running `bbr serve`: its ports, its output, and ways to stop it."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        grpc_port: int,
        health_port: int,
        metrics_port: int,
        env: Mapping[str, str],
        workdir: Path,
    ) -> None:
        self.args = list(args)
        self.grpc_port = grpc_port
        self.health_port = health_port
        self.metrics_port = metrics_port
        self._stderr_path = workdir / f"bbr-{grpc_port}.stderr"
        self._stdout_path = workdir / f"bbr-{grpc_port}.stdout"
        self._stderr: IO[bytes] = open(self._stderr_path, "wb")  # noqa: SIM115
        self._stdout: IO[bytes] = open(self._stdout_path, "wb")  # noqa: SIM115
        self._channels: list[grpc.Channel] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bbr", "serve", *self.args],
            cwd=REPO_ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._stdout,
            stderr=self._stderr,
            start_new_session=True,  # its own process group: workers die with it
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    # output

    def stderr_text(self) -> str:
        return self._stderr_path.read_text(errors="replace")

    def stdout_text(self) -> str:
        return self._stdout_path.read_text(errors="replace")

    def log_records(self) -> list[dict[str, Any]]:
        """stderr as JSON log records (fails the test on a line that is not one)."""
        records = []
        for line in self.stderr_text().splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                pytest.fail(f"stderr line is not JSON: {line!r}")
            if not isinstance(record, dict):
                pytest.fail(f"stderr line is not a JSON object: {line!r}")
            records.append(record)
        return records

    # gRPC

    def channel(self, port: int | None = None) -> grpc.Channel:
        """A channel to the ext_proc port (or `port`); closed at teardown."""
        channel = grpc.insecure_channel(
            f"127.0.0.1:{port or self.grpc_port}", options=CHANNEL_OPTIONS
        )
        self._channels.append(channel)
        return channel

    def health(self, service: str = "", timeout: float = 1.0) -> int:
        """The health status of `service` on the health port (raises grpc.RpcError)."""
        with grpc.insecure_channel(f"127.0.0.1:{self.health_port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return int(reply.status)

    def wait_serving(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"bbr exited with {self.proc.returncode} before serving:\n{self.stderr_text()}"
                )
            with contextlib.suppress(grpc.RpcError):
                if self.health("", timeout=0.5) == SERVING:
                    return
            if time.monotonic() > deadline:
                pytest.fail(f"bbr not SERVING within {timeout} s:\n{self.stderr_text()}")
            time.sleep(0.05)

    # metrics

    def metrics_text(self, timeout: float = 5.0) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            body: bytes = response.read()
        return body.decode()

    def metric(self, name: str, **labels: str) -> float | None:
        return metric_value(self.metrics_text(), name, **labels)

    # lifecycle

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float | None = 10.0) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        """Stop it (SIGTERM, then SIGKILL for the whole group); release everything."""
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=3)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        self._stderr.close()
        self._stdout.close()


StartBbr = Callable[..., BbrProcess]


class Launcher:
    """Starts bbr processes and stops every one of them in `close`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.started: list[BbrProcess] = []

    def start(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        model_map: str | os.PathLike[str] | None = None,
        port_flags: bool = True,
        wait: bool = True,
        grpc_port: int | None = None,
        health_port: int | None = None,
        metrics_port: int | None = None,
    ) -> BbrProcess:
        """`bbr serve ARGS` on free ports (see `start_bbr`)."""
        ports = free_ports(3)
        grpc_port = grpc_port or ports[0]
        health_port = health_port or ports[1]
        metrics_port = metrics_port or ports[2]
        argv = list(args)
        if model_map is not None:
            argv += ["--model-map", os.fspath(model_map)]
        if port_flags:
            argv += bbr_port_flags(grpc_port, health_port, metrics_port)
        process = BbrProcess(
            argv,
            grpc_port=grpc_port,
            health_port=health_port,
            metrics_port=metrics_port,
            env=clean_env(env),
            workdir=self.workdir,
        )
        self.started.append(process)
        if wait:
            process.wait_serving()
        return process

    def close(self) -> None:
        for process in self.started:
            process.close()
        self.started.clear()
