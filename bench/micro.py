"""`make bench`: the hot path in-process, per body size, in CPU microseconds (no gRPC).

    decision   decision.decide_request(headers, body, map, options)
    json_model bodies.json_model(body) alone (msgspec decode + duplicate-model screen)
    dup_screen the duplicate-`model` screen alone (bbr/body.py _may_repeat_model)
    stream     protocol.Stream.handle() for request_headers then request_body, buffered
    stream+log the same with the server's on_finish (metrics and the info request log)
    serialize  ProcessingResponse.SerializeToString() of the body answer
  with --tracing (bbr/tracing.py, the SDK's batch span processor on its thread, counted):
    traced     stream+log inside a span: context read from the call's headers (traceparent),
               span started, attributes set, ended, exported by an exporter that encodes
               the OTLP request and sends it nowhere
    unsampled  the same with a parent that did not sample (OTEL_TRACES_SAMPLER default)

Use it to show one change's effect: run it before and after, on a quiet machine.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import bodies, common
from bench.tables import Column, Table


def timeit(fn: Callable[[], object], *, budget: float, repeat: int = 7) -> float:
    """Best of `repeat` timings per call in µs, within about `budget` seconds.

    CPU time of this process (not wall time) and the minimum, not the mean: other
    processes mostly add waiting, so on a shared machine this is the closest to the
    code's own cost. Caches shared with busy neighbours still add some noise.
    """
    fn()
    start = time.process_time()
    n = 0
    while time.process_time() - start < budget / (repeat * 4) or n < 3:
        fn()
        n += 1
    per = (time.process_time() - start) / n
    loops = max(1, int(budget / repeat / per))
    samples = []
    for _ in range(repeat):
        t0 = time.process_time()
        for _ in range(loops):
            fn()
        samples.append((time.process_time() - t0) / loops * 1e6)
    return min(samples)


# The headers of Envoy's ext_proc call (gRPC over HTTP/2), as bbr.h2grpc hands them over.
CALL_HEADERS = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"),
    (b":authority", b"bbr"),
    (b"content-type", b"application/grpc"),
    (b"te", b"trailers"),
    (b"x-envoy-internal", b"true"),
    (b"x-forwarded-for", b"10.0.0.1"),
    (b"x-envoy-expected-rq-timeout-ms", b"10000"),
    (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
]


def tracing_cases(run_stream: Callable[..., Callable[[], object]]) -> dict[str, Any]:
    """traced / unsampled: bbr's per-call tracing work around stream+log."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        SpanExporter,
        SpanExportResult,
    )

    from bbr import service, tracing

    class EncodeOnly(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            encode_spans(spans).SerializeToString()
            return SpanExportResult.SUCCESS

    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(EncodeOnly()))
    traced = tracing.Tracing(provider)
    unsampled_headers = [
        *CALL_HEADERS[:-1],
        (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"),
    ]

    def case(headers: list[tuple[bytes, bytes]]) -> Callable[[], object]:
        def go() -> object:
            span = traced.start(headers)
            seen: list[Any] = []

            def on_finish(done: Any) -> None:
                seen.append(done)
                service.finished(done)

            out = run_stream(on_finish)()
            traced.end(span, seen[0] if seen else None, 0)
            return out

        return go

    return {"traced": case(CALL_HEADERS), "unsampled": case(unsampled_headers)}


def cases(size: int, *, with_tracing: bool = False) -> dict[str, Callable[[], object]]:
    from bbr import body as bodylib
    from bbr import decision, protocol, service
    from bbr.modelmap import MapHolder
    from bbr.sources.files import FileSource

    holder = MapHolder()
    FileSource([str(common.MODEL_MAP)], holder).load()
    snapshot = holder.current
    options = decision.Options()
    body = bodies.chat_body(size)
    headers = dict(bodies.request_headers())
    messages = bodies.extproc_messages(body)

    def run_stream(
        on_finish: Callable[[protocol.RequestRecord], None] | None,
    ) -> Callable[[], object]:
        def go() -> object:
            stream = protocol.Stream(holder, options, streaming=False, on_finish=on_finish)
            out = [*stream.handle(messages[0]), *stream.handle(messages[1])]
            stream.close()
            return out

        return go

    answer = run_stream(None)()
    assert isinstance(answer, list)
    reply = answer[-1]
    assert decision.decide_request(headers, body, snapshot, options).label.value == "routed"
    screen = getattr(bodylib, "_may_repeat_model", None)
    out: dict[str, Callable[[], object]] = {
        "decision": lambda: decision.decide_request(headers, body, snapshot, options),
        "json_model": lambda: bodylib.json_model(body),
    }
    if screen is not None:
        out["dup_screen"] = lambda: screen(body)
    out["stream"] = run_stream(None)
    out["stream+log"] = run_stream(service.finished)
    out["serialize"] = reply.SerializeToString
    if with_tracing:
        out.update(tracing_cases(run_stream))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=1.0, help="seconds per case")
    parser.add_argument("--output", type=Path, default=None, help="write JSON here")
    parser.add_argument("--tracing", action="store_true", help="add the traced cases")
    args = parser.parse_args(argv)

    # The request log at its default level (JSON), written to memory instead of stderr.
    from bbr import logs

    sink = io.StringIO()
    logs.configure("info", "json", stream=sink)

    results: dict[str, dict[str, float]] = {}
    names: list[str] = []
    for label, size in bodies.SIZES.items():
        results[label] = {}
        for name, fn in cases(size, with_tracing=args.tracing).items():
            results[label][name] = round(timeit(fn, budget=args.budget), 2)
            if name not in names:
                names.append(name)
        sink.seek(0)
        sink.truncate()

    print(f"load average {common.machine()['loadavg']} on {common.machine()['cpus']} CPUs")
    table = Table(Column("µs per call", 12, left=True), *(Column(n, 12, ".1f") for n in names))
    rows = [[label, *(row.get(n, float("nan")) for n in names)] for label, row in results.items()]
    print("\n".join(table.lines(rows)))
    if args.output:
        doc: dict[str, Any] = {"kind": "micro", "machine": common.machine(), "us": results}
        args.output.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
