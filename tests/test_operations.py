"""Operations (SPEC §5) on a real `bbr serve` process: health, reflection, metrics, logs,
SIGTERM drain, large messages, concurrency and cancelled streams.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import time
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import bbr
from harness.h2client import EXT_PROC_SERVICE
from harness.modelmaps import configmap_yaml, write_model_map
from harness.processes import poll_until
from tests import extproc
from tests.extproc import set_headers
from tests.support import (
    BASE_HEADER,
    CHANNEL_OPTIONS,
    MODEL_HEADER,
    NOT_SERVING,
    SERVING,
    BbrProcess,
    Conversation,
    StartBbr,
    call,
    immediate,
    json_body,
    metric_samples,
    metric_value,
    request,
    route,
)

MAX_BODY = 6 * 1024 * 1024
MiB = 1024 * 1024
OUTCOMES = ("routed", "unknown_model", "no_model", "invalid", "too_large", "passthrough")


def sized_body(model: str, size: int) -> bytes:
    """A chat request of exactly `size` bytes, its `model` key last."""
    head = b'{"messages": [{"role": "user", "content": "'
    tail = f'"}}], "model": {json.dumps(model)}}}'.encode()
    body = head + b"x" * (size - len(head) - len(tail)) + tail
    assert len(body) == size
    json.loads(body)
    return body


@pytest.fixture(scope="module")
def shared(start_bbr_module: StartBbr, tmp_path_factory: pytest.TempPathFactory) -> BbrProcess:
    """One bbr for the tests that do not need exact counters: reject mode, 6 MiB limit."""
    path = write_model_map(
        tmp_path_factory.mktemp("maps") / "model-map.yaml",
        configmap_yaml("llama", "llama", ["food", "movie"]),
        configmap_yaml("qwen", "qwen", ["poem"]),
    )
    return start_bbr_module(
        "--unknown-model", "reject", "--max-body-bytes", str(MAX_BODY), model_map=path
    )


# --- health, reflection ---------------------------------------------------------------------


def test_health_serving_on_its_own_port(shared: BbrProcess) -> None:
    assert shared.health("") == SERVING
    assert shared.health(EXT_PROC_SERVICE) == SERVING
    # The health port speaks grpc.health.v1 only: no ext_proc there.
    with pytest.raises(grpc.RpcError) as caught:
        call(shared.channel(shared.health_port), extproc.headers(end_of_stream=True), timeout=3)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_unknown_service_is_not_found(shared: BbrProcess) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        shared.health("no.such.Service")
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_server_reflection_lists_ext_proc(shared: BbrProcess) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(shared.channel())
    replies = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
    )
    names = {s.name for r in replies for s in r.list_services_response.service}
    assert EXT_PROC_SERVICE in names, names
    # ... and can describe it, so grpcurl works without a proto file.
    replies = list(
        stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol=EXT_PROC_SERVICE)]),
            timeout=5,
        )
    )
    assert replies[0].file_descriptor_response.file_descriptor_proto


# --- metrics --------------------------------------------------------------------------------


def test_metrics_every_series(tmp_path: Path, start_bbr: StartBbr) -> None:
    path = write_model_map(
        tmp_path / "model-map.yaml",
        configmap_yaml("llama", "llama", ["food", "movie"]),
        configmap_yaml("qwen", "qwen"),
    )
    process = start_bbr("--max-body-bytes", "1000", model_map=path)
    channel = process.channel()
    routed = json_body("food")
    unknown = json_body("nope")
    no_model = json_body()
    invalid = b"{not json"
    assert set_headers(request(channel, routed)) == {BASE_HEADER: "llama", MODEL_HEADER: "food"}
    assert set_headers(request(channel, unknown)) == {MODEL_HEADER: "nope"}
    assert set_headers(request(channel, no_model)) == {}
    answer = immediate(request(channel, invalid))
    assert answer is not None and answer.status.code == 400
    answer = immediate(request(channel, json_body("food", pad="x" * 2000)))
    assert answer is not None and answer.status.code == 413
    assert call(channel, extproc.headers(method="GET", path="/v1/x", end_of_stream=True))

    samples = metric_samples(process.metrics_text())

    def value(name: str, **labels: str) -> float | None:
        return samples.get((name, frozenset(labels.items())))

    for outcome in OUTCOMES:
        assert value("bbr_requests_total", outcome=outcome) == 1, outcome
    assert value("bbr_request_duration_seconds_count") == len(OUTCOMES)
    assert value("bbr_request_duration_seconds_bucket", le="+Inf") == len(OUTCOMES)
    bodies = value("bbr_request_body_bytes_count")
    assert bodies is not None and bodies >= 4
    total = value("bbr_request_body_bytes_sum")
    assert total is not None and total >= len(routed + unknown + no_model + invalid)
    assert value("bbr_active_streams") == 0
    assert value("bbr_model_map_models", kind="base") == 2
    assert value("bbr_model_map_models", kind="adapter") == 2
    assert value("bbr_model_map_reloads_total", result="error") == 0
    assert any(name == "bbr_model_map_reloads_total" for name, _ in samples)
    assert value("bbr_model_map_conflicts") == 0
    assert value("bbr_info", version=bbr.__version__) == 1
    # The Go BBR's meaning: a model was read and set as a header (known or not).
    assert value("bbr_success_total") == 2
    assert value("bbr_body_field_not_found_total", field="model") == 1


def test_unknown_model_rejected_counts_as_unknown_model(shared: BbrProcess) -> None:
    before = shared.metric("bbr_requests_total", outcome="unknown_model") or 0
    answer = immediate(request(shared.channel(), json_body("not-in-the-map")))
    assert answer is not None and answer.status.code == 404
    assert json.loads(answer.body)["error"]["code"] == "model_not_found"
    assert shared.metric("bbr_requests_total", outcome="unknown_model") == before + 1


# --- logs -----------------------------------------------------------------------------------


def test_logs_are_json_with_outcome_and_never_the_body(tmp_path: Path, start_bbr: StartBbr) -> None:
    secret = "sk-TOPSECRET-4242-do-not-log"
    path = write_model_map(tmp_path / "model-map.yaml", configmap_yaml("llama", "llama", ["food"]))
    process = start_bbr("--log-level", "debug", model_map=path)
    channel = process.channel()
    messages = [{"role": "user", "content": f"my key is {secret}"}]
    assert route(channel, "food")[BASE_HEADER] == "llama"
    request(channel, json_body("food", messages=messages))
    request(channel, json_body("unknown-one", messages=messages))
    request(channel, json_body(None, messages=messages))
    request(channel, b'{"model": "food", "messages": "' + secret.encode() + b'"')  # invalid
    request(channel, json_body("food", messages=messages), streaming=True, chunks=3)

    def request_records() -> list[dict[str, object]]:
        return [r for r in process.log_records() if "outcome" in r]

    assert poll_until(lambda: len(request_records()) >= 6, timeout=5) is not None
    records = request_records()
    routed = [r for r in records if r["outcome"] == "routed"]
    assert routed and all(r["model"] == "food" and r["base_model"] == "llama" for r in routed), (
        routed
    )
    unknown = [r for r in records if r["outcome"] == "unknown_model"]
    assert unknown and unknown[0]["model"] == "unknown-one"
    assert "base_model" in unknown[0]
    assert {r["outcome"] for r in records} >= {"routed", "unknown_model", "no_model", "invalid"}
    process.terminate()
    assert process.wait() == 0
    process.log_records()  # every line, to the last, is a JSON object
    assert secret not in process.stderr_text()
    assert secret not in process.stdout_text()


def refused(channel: grpc.Channel) -> bool:
    """True when a new ext_proc stream on `channel` is refused (UNAVAILABLE)."""
    try:
        request(channel, json_body("food"), timeout=3)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        return True
    return False


# --- SIGTERM --------------------------------------------------------------------------------


def test_sigterm_drains_open_streams(simple_map: Path, start_bbr: StartBbr) -> None:
    process = start_bbr(model_map=simple_map)
    conversation_channel = process.channel()
    conversation = Conversation(conversation_channel)
    body = json_body("food", messages=[{"role": "user", "content": "x" * 1000}])
    first, second = body[:300], body[300:]
    conversation.send(extproc.headers({"content-type": "application/json"}, streaming=True))
    conversation.send(extproc.body(first, end_of_stream=False))
    assert conversation.nothing_within(0.3)  # held until the model is known
    assert poll_until(lambda: process.metric("bbr_active_streams") == 1, timeout=5) is not None

    process.send_signal(signal.SIGTERM)
    assert poll_until(lambda: process.health("") == NOT_SERVING, timeout=3) is not None, (
        "health did not go NOT_SERVING after SIGTERM"
    )
    assert process.health(EXT_PROC_SERVICE) == NOT_SERVING
    # A new stream is refused, on a new connection and on the open one (Envoy's) ...
    for channel in (process.channel(), conversation_channel):
        assert poll_until(functools.partial(refused, channel), timeout=2) is not None
    # ... while the open one still runs to its end.
    assert process.returncode is None
    assert process.health("") == NOT_SERVING
    conversation.send(extproc.body(second, end_of_stream=True))
    answer = conversation.recv()
    assert set_headers([answer]) == {BASE_HEADER: "llama", MODEL_HEADER: "food"}
    chunks = conversation.rest()
    echoed = b"".join(c.request_body.response.body_mutation.streamed_response.body for c in chunks)
    assert echoed == body
    assert process.wait(timeout=10) == 0
    process.log_records()  # every line a JSON object, drain included


def test_sigterm_when_idle_exits_promptly(simple_map: Path, start_bbr: StartBbr) -> None:
    process = start_bbr(model_map=simple_map)
    assert route(process.channel(), "movie")[BASE_HEADER] == "llama"
    start = time.monotonic()
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=10) == 0
    assert time.monotonic() - start < 5


@pytest.mark.parametrize("workers", [1, 2])
def test_a_storm_of_stop_signals_exits_cleanly(
    simple_map: Path, start_bbr: StartBbr, workers: int
) -> None:
    """bbr's handlers only wake the event loop (loop.add_signal_handler, a wakeup fd):
    no lock is taken in a handler, so hundreds of SIGTERM/SIGINT in a burst still end in
    one drain and exit 0 (the demo once hung on exactly this)."""
    process = start_bbr("--workers", str(workers), model_map=simple_map)
    assert route(process.channel(), "movie")[BASE_HEADER] == "llama"
    for i in range(600):
        try:
            process.send_signal(signal.SIGTERM if i % 2 else signal.SIGINT)
        except ProcessLookupError:
            break
    assert process.wait(timeout=60) == 0


def children(pid: int) -> set[int]:
    """The processes whose parent is `pid` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            after_name = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        if int(after_name[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def test_killed_workers_come_back_with_the_supervisors_settings(
    simple_map: Path, start_bbr: StartBbr
) -> None:
    """--workers: every worker runs with the supervisor's settings (flags and BBR_*
    variables alike), also a worker started again after it died; health stays SERVING."""
    process = start_bbr(
        "--workers",
        "2",
        "--max-body-bytes",
        "4096",
        model_map=simple_map,
        env={"BBR_UNKNOWN_MODEL": "reject"},
    )
    first = children(process.pid)
    assert len(first) == 2
    for pid in first:
        os.kill(pid, signal.SIGKILL)

    def replaced() -> bool:
        ready = [r for r in process.log_records() if r.get("msg") == "worker ready"]
        return len(ready) == 4 and len(children(process.pid) - first) == 2

    assert poll_until(replaced, timeout=30) is not None, process.stderr_text()
    exits = [r for r in process.log_records() if r.get("msg") == "worker exited; restarting"]
    assert sorted(r["worker"] for r in exits) == [0, 1]
    assert {r["code"] for r in exits} == {-signal.SIGKILL}
    assert process.health() == SERVING
    channel = process.channel()  # only new workers are left to answer
    assert route(channel, "movie")[BASE_HEADER] == "llama"
    too_large = immediate(request(channel, sized_body("movie", 5000)))
    assert too_large is not None and too_large.status.code == 413
    unknown = immediate(request(channel, json_body("nope")))
    assert unknown is not None and unknown.status.code == 404


# --- large messages -------------------------------------------------------------------------


def test_five_mib_body_routes(shared: BbrProcess) -> None:
    body = sized_body("poem", 5 * MiB)
    responses = request(shared.channel(), body)
    assert immediate(responses) is None
    assert set_headers(responses) == {BASE_HEADER: "qwen", MODEL_HEADER: "poem"}


def test_five_mib_streamed_body_routes_and_comes_back_unchanged(shared: BbrProcess) -> None:
    body = sized_body("food", 5 * MiB)
    for chunks in (1, 5):
        responses = request(shared.channel(), body, streaming=True, chunks=chunks)
        assert set_headers(responses[:1]) == {BASE_HEADER: "llama", MODEL_HEADER: "food"}
        back = [r.request_body.response.body_mutation.streamed_response for r in responses[1:]]
        assert len(back) == chunks
        assert b"".join(b.body for b in back) == body
        assert [b.end_of_stream for b in back] == [False] * (chunks - 1) + [True]


def test_body_at_the_limit_routes(shared: BbrProcess) -> None:
    responses = request(shared.channel(), sized_body("movie", MAX_BODY))
    assert set_headers(responses) == {BASE_HEADER: "llama", MODEL_HEADER: "movie"}


@pytest.mark.parametrize("streaming", [False, True], ids=["buffered", "streamed"])
def test_body_over_the_limit_is_413(shared: BbrProcess, streaming: bool) -> None:
    # Over the limit, but within the gRPC message limit (max + 64 KiB): an HTTP answer.
    body = sized_body("movie", MAX_BODY + 60 * 1024)
    responses = request(shared.channel(), body, streaming=streaming, chunks=7)
    answer = immediate(responses)
    assert answer is not None, responses
    assert answer.status.code == 413
    assert {h.header.key: h.header.raw_value for h in answer.headers.set_headers}[
        "content-type"
    ] == b"application/json"
    error = json.loads(answer.body)["error"]
    assert error["code"] == "request_too_large" and error["param"] is None
    assert error["type"] == "invalid_request_error"
    assert BASE_HEADER not in set_headers(responses)


# --- concurrency, cancellation --------------------------------------------------------------

Responses = list[pb.ProcessingResponse]
EXPECTED = {"food": "llama", "movie": "llama", "llama": "llama", "poem": "qwen", "qwen": "qwen"}


def test_200_concurrent_streams(shared: BbrProcess) -> None:
    count = 200
    models = [*EXPECTED, "unknown-x"]

    async def run() -> list[Responses]:
        target = f"127.0.0.1:{shared.grpc_port}"
        async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            stub = extproc.stub(channel)
            calls = [stub.Process(timeout=60) for _ in range(count)]
            head = extproc.headers({"content-type": "application/json"}, streaming=True)
            await asyncio.gather(*(c.write(head) for c in calls))

            async def active() -> float | None:
                return await asyncio.to_thread(shared.metric, "bbr_active_streams")

            deadline = time.monotonic() + 15
            while await active() != count:
                assert time.monotonic() < deadline, "not every stream is open at once"
                await asyncio.sleep(0.1)

            async def finish(
                i: int, stream: grpc.aio.StreamStreamCall
            ) -> list[pb.ProcessingResponse]:
                body = json_body(models[i % len(models)], n=i)
                await stream.write(extproc.body(body[:10], end_of_stream=False))
                await stream.write(extproc.body(body[10:], end_of_stream=True))
                await stream.done_writing()
                return [r async for r in stream]

            return await asyncio.gather(*(finish(i, c) for i, c in enumerate(calls)))

    results = asyncio.run(run())
    for i, responses in enumerate(results):
        model = models[i % len(models)]
        if model in EXPECTED:
            assert set_headers(responses[:1]) == {BASE_HEADER: EXPECTED[model], MODEL_HEADER: model}
            assert len(responses) == 3, (i, responses)
        else:
            answer = immediate(responses)
            assert answer is not None and answer.status.code == 404, (i, responses)
    assert poll_until(lambda: shared.metric("bbr_active_streams") == 0, timeout=5) is not None


@pytest.mark.parametrize("streaming", [False, True], ids=["buffered", "streamed"])
def test_cancelled_stream_releases_it(shared: BbrProcess, streaming: bool) -> None:
    assert poll_until(lambda: shared.metric("bbr_active_streams") == 0, timeout=5) is not None
    conversation = Conversation(shared.channel())
    conversation.send(extproc.headers({"content-type": "application/json"}, streaming=streaming))
    if streaming:
        conversation.send(extproc.body(b'{"model": "fo', end_of_stream=False))
    else:
        conversation.recv()  # buffered: the headers answer comes at once; the body is due
    assert poll_until(lambda: shared.metric("bbr_active_streams") == 1, timeout=5) is not None
    conversation.cancel()
    assert poll_until(lambda: shared.metric("bbr_active_streams") == 0, timeout=3) is not None
    # The server is fine afterwards.
    assert route(shared.channel(), "poem")[BASE_HEADER] == "qwen"


def test_every_log_line_is_json(shared: BbrProcess) -> None:
    """After all the above (cancelled streams, errors, 200 streams): still only JSON."""
    records = shared.log_records()
    assert records
    assert all(isinstance(r.get("msg"), str) and r.get("level") for r in records), records
    assert not [r for r in records if "exception" in r], "a traceback was logged"


def test_model_map_gauges(shared: BbrProcess) -> None:
    """Bases and adapters of the shared map, read as Prometheus would."""
    text = shared.metrics_text()
    assert metric_value(text, "bbr_info", version=bbr.__version__) == 1
    assert metric_value(text, "bbr_model_map_models", kind="base") == 2
    assert metric_value(text, "bbr_model_map_models", kind="adapter") == 3
