"""`make loadtest`: ghz against bbr (and the Go BBR, alternately) per body size.

Each server runs as a child process. For every body size the servers take turns
(A B C A B C ...), so drifting machine load hits all of them alike; the summary takes
the median of the rounds. bbr runs twice: at its defaults (request logs at info) and
at --log-level warning. The Go BBR needs a Kubernetes API for its ConfigMaps: the real
one from harness/apiserver.py when present, else bench/fakekube.py.

    python -m bench.loadtest [--duration S] [--rounds N] [--concurrency C] [--no-go]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import bodies, common
from bench.common import RssSampler, Server, rss_bytes
from bench.tables import Column, Table

MiB = 1024 * 1024


@contextlib.contextmanager
def kube_api(workdir: Path, kind: str = "auto") -> Iterator[tuple[Path, str]]:
    """A Kubernetes API holding config/model-map.yaml's ConfigMaps; yields (kubeconfig, kind).

    `real`: etcd + kube-apiserver from harness/apiserver.py (binaries from `make
    kube-tools`); `fake`: bench/fakekube.py; `auto`: real when its binaries are there.
    """
    from bench.fakekube import FakeKube, load_configmaps

    configmaps = load_configmaps(common.MODEL_MAP)
    if kind in ("auto", "real"):
        try:
            from harness.apiserver import ApiServer, ToolsMissing
        except ImportError:
            if kind == "real":
                raise
        else:
            try:
                api = ApiServer(workdir / "kube").start()
            except ToolsMissing:
                if kind == "real":
                    raise
            else:
                try:
                    for cm in configmaps:
                        _create(api.url, workdir / "kube" / "ca.crt", cm)
                    yield api.kubeconfig("admin"), "kube-apiserver (harness/apiserver.py)"
                finally:
                    api.stop()
                return
    fake = FakeKube(configmaps).start()
    try:
        yield fake.kubeconfig(workdir / "kubeconfig"), "bench/fakekube.py"
    finally:
        fake.stop()


def _create(url: str, ca: Path, configmap: dict[str, Any]) -> None:
    import ssl
    import urllib.request

    from harness.apiserver import ADMIN_TOKEN

    meta = dict(configmap["metadata"])
    for key in ("uid", "resourceVersion", "creationTimestamp"):
        meta.pop(key, None)
    doc = {**configmap, "metadata": meta}
    request = urllib.request.Request(
        f"{url}/api/v1/namespaces/{meta['namespace']}/configmaps",
        data=json.dumps(doc).encode(),
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
        method="POST",
    )
    context = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        response.read()


class OtlpSink:
    """An OTLP/gRPC trace endpoint that takes every export and parses none of it (a real
    collector runs elsewhere; parsing here would take CPU from bbr and ghz)."""

    def __init__(self) -> None:
        import grpc

        self.exports = 0
        self.bytes = 0

        def export(request: bytes, context: object) -> bytes:
            self.exports += 1
            self.bytes += len(request)
            return b""  # an empty ExportTraceServiceResponse

        handler = grpc.method_handlers_generic_handler(
            "opentelemetry.proto.collector.trace.v1.TraceService",
            {"Export": grpc.unary_unary_rpc_method_handler(export)},
        )
        self._server = grpc.server(ThreadPoolExecutor(max_workers=2))
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        print(f"otlp sink: {self.exports} exports, {self.bytes} bytes", file=sys.stderr)
        self._server.stop(0)


def measure(
    ghz: str, server: Server, data: Path, *, concurrency: int, duration: float, connections: int = 1
) -> dict[str, Any]:
    before = rss_bytes(server.pid)
    cpu = common.cpu_seconds(server.pid)
    with RssSampler(server.pid) as sampler:
        report = common.run_ghz(
            ghz,
            server.port,
            data,
            concurrency=concurrency,
            duration=duration,
            connections=connections,
        )
    cpu = common.cpu_seconds(server.pid) - cpu
    result = common.summarise_ghz(report)
    # CPU per request: what the server spent, whatever else the machine was doing.
    result["cpu_us_per_request"] = round(cpu / max(1, result["requests"]) * 1e6, 1)
    result["rss_before_mb"] = round(before / MiB, 1)
    result["peak_rss_mb"] = round(sampler.peak / MiB, 1)
    return result


def memory_check(
    ghz: str, server: Server, data: dict[str, Path], *, streams: int, logs: Path
) -> dict[str, Any]:
    """A fresh server: `streams` concurrent 1 MiB streams, RSS growth against bytes in
    flight, and RSS 1 s and 10 s after the load against the baseline before it.

    Baseline: after start and 200 small requests (imports, caches and gRPC's buffers
    warmed), before any large body.
    """
    server.start(logs)
    try:
        common.run_ghz(ghz, server.port, data["1KB"], concurrency=10, requests=200)
        time.sleep(1)
        baseline = rss_bytes(server.pid)
        with RssSampler(server.pid, interval=0.01) as sampler:
            report = common.run_ghz(
                ghz, server.port, data["1MB"], concurrency=streams, requests=streams * 10
            )
        summary = common.summarise_ghz(report)
        after = []
        for _ in range(10):
            time.sleep(1)
            after.append(rss_bytes(server.pid))
    finally:
        server.stop()
    in_flight = streams * bodies.SIZES["1MB"]
    growth = sampler.peak - baseline
    return {
        "server": server.name,
        "env": server.env,
        "streams": streams,
        "bytes_in_flight_mb": round(in_flight / MiB, 1),
        "baseline_rss_mb": round(baseline / MiB, 1),
        "peak_rss_mb": round(sampler.peak / MiB, 1),
        "growth_mb": round(growth / MiB, 1),
        "growth_per_byte_in_flight": round(growth / in_flight, 2),
        "rss_after_1s_mb": round(after[0] / MiB, 1),
        "rss_after_10s_mb": round(after[-1] / MiB, 1),
        "errors": summary["errors"],
        "rps": summary["rps"],
    }


_MEASURES = ("rps", "p50_ms", "p90_ms", "p99_ms", "peak_rss_mb", "cpu_us_per_request")


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Median over rounds, per server and size."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for run in runs:
        out.setdefault(run["server"], {}).setdefault(run["size"], {})
    for name, sizes in out.items():
        for size in sizes:
            mine = [r for r in runs if r["server"] == name and r["size"] == size]
            sizes[size] = {
                key: round(statistics.median(r[key] for r in mine), 3) for key in _MEASURES
            }
            sizes[size]["errors"] = sum(r["errors"] for r in mine)
    return out


def ratios(
    summary: dict[str, dict[str, dict[str, float]]], mine: str, peer: str
) -> dict[str, dict[str, float]]:
    out = {}
    for size, ours in summary.get(mine, {}).items():
        theirs = summary.get(peer, {}).get(size)
        if theirs and theirs["rps"] and theirs["p99_ms"]:
            out[size] = {
                "throughput": round(ours["rps"] / theirs["rps"], 2),
                "p99": round(ours["p99_ms"] / theirs["p99_ms"], 2),
                "cpu_per_request": round(
                    ours["cpu_us_per_request"] / max(0.1, theirs["cpu_us_per_request"]), 2
                ),
            }
    return out


TABLE = Table(
    Column("server", 14, left=True),
    Column("size", 7),
    Column("req/s", 10, ".0f"),
    Column("p50 ms", 9, ".2f"),
    Column("p90 ms", 9, ".2f"),
    Column("p99 ms", 9, ".2f"),
    Column("errors", 8, ".0f"),
    Column("peak RSS MB", 13, ".1f"),
    Column("CPU µs/req", 12, ".0f"),
)


def table_row(name: str, size: str, s: dict[str, float]) -> tuple[object, ...]:
    """One server and size of the summary, in the order of TABLE (and report's table)."""
    cpu = s.get("cpu_us_per_request", float("nan"))
    figures = (s[k] for k in ("rps", "p50_ms", "p90_ms", "p99_ms", "errors", "peak_rss_mb"))
    return (name, size, *figures, cpu)


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\nmachine: {result['machine_before']['cpus']} CPUs, load average before "
        f"{result['machine_before']['loadavg']}, after {result['machine_after']['loadavg']}"
    )
    rows = [
        table_row(n, size, s) for n, sizes in result["summary"].items() for size, s in sizes.items()
    ]
    print("\n".join(TABLE.lines(rows)))
    for mine, table in result["ratios"].items():
        for size, r in table.items():
            print(
                f"{mine} ÷ go-bbr {size:>6}: throughput x{r['throughput']:.2f}, "
                f"p99 x{r['p99']:.2f}, CPU per request x{r['cpu_per_request']:.2f}"
            )
    for m in result.get("memory", []):
        print(
            f"memory {m['server']}: {m['streams']} x 1 MiB in flight: RSS {m['baseline_rss_mb']}"
            f" → peak {m['peak_rss_mb']} MB (growth {m['growth_per_byte_in_flight']}x bytes in "
            f"flight), after 1 s {m['rss_after_1s_mb']}, after 10 s {m['rss_after_10s_mb']} MB"
        )


def pin(server: Server, cpu: int) -> None:
    """Run `server` on `cpu` alone (taskset execs it: the pid stays the server's)."""
    server.argv[:0] = ["taskset", "-c", str(cpu)]


def experiment(value: str) -> tuple[str, Path]:
    """`NAME=PATH` or `PATH` (named bbr-exp): a source tree to run alongside."""
    name, sep, path = value.partition("=")
    if not sep:
        name, path = "bbr-exp", value
    return name, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per ghz run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds per size")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--sizes", default=",".join(bodies.SIZES), help="e.g. 1KB,1MB")
    parser.add_argument("--no-go", action="store_true", help="skip the Go BBR")
    parser.add_argument("--no-warning-run", action="store_true", help="bbr at defaults only")
    parser.add_argument("--memory-streams", type=int, default=100, help="0 to skip")
    parser.add_argument("--workers", type=int, default=1, help="bbr --workers")
    parser.add_argument("--connections", type=int, default=1, help="ghz HTTP/2 connections")
    parser.add_argument(
        "--experiment",
        type=experiment,
        action="append",
        default=[],
        help="[NAME=]PATH: also run bbr from this source tree (e.g. a git worktree with a "
        "change, or an older commit), alternating with the others; repeatable",
    )
    parser.add_argument(
        "--kube",
        choices=("auto", "real", "fake"),
        default="auto",
        help="the Go BBR's Kubernetes API",
    )
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="also bbr --tracing, every span exported (bbr-tracing) and none sampled "
        "(bbr-tracing-unsampled), to an OTLP/gRPC sink in this process",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="servers on the last CPU, ghz and this process on the others: CPU per request "
        "then does not depend on where the scheduler put ghz (needs 2+ CPUs, --workers 1)",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and (len(cpus) < 2 or args.workers > 1):
        parser.error("--pin needs 2 or more CPUs and --workers 1")

    ghz = common.tool("ghz")
    if ghz is None:
        print("ghz not found: run `make perf-tools` first", file=sys.stderr)
        return 2
    go_bbr = None if args.no_go else common.tool("go-bbr")
    if go_bbr is None and not args.no_go:
        print("go-bbr not found (make perf-tools); measuring bbr alone", file=sys.stderr)

    sizes = bodies.sizes(args.sizes)
    result: dict[str, Any] = {
        "kind": "loadtest",
        "machine_before": common.machine(),
        "tools": {
            "ghz": f"{common.GHZ_VERSION} (binary reports {common.ghz_version(ghz)!r})",
            "go_bbr": common.GO_BBR_VERSION if go_bbr else None,
        },
        "settings": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "concurrency": args.concurrency,
            "connections": args.connections,
            "workers": args.workers,
            "pinned": f"servers on CPU {cpus[-1]}, ghz on {cpus[:-1]}" if args.pin else None,
            "sizes": {s: bodies.SIZES[s] for s in sizes},
            "model": bodies.MODEL,
        },
    }
    with (
        tempfile.TemporaryDirectory(prefix="bbr-loadtest-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        data = common.write_ghz_data(work / "data")
        servers = [common.bbr_server("bbr", workers=args.workers)]
        if not args.no_warning_run:
            servers.append(
                common.bbr_server("bbr-warning", log_level="warning", workers=args.workers)
            )
        for name, tree in args.experiment:
            servers.append(common.bbr_server(name, workers=args.workers, cwd=tree))
            result["settings"][name] = str(tree)
        if args.tracing:
            sink = OtlpSink()
            stack.callback(sink.close)
            for name, sampler in (("bbr-tracing", None), ("bbr-tracing-unsampled", "always_off")):
                traced = common.bbr_server(name, workers=args.workers)
                traced.argv.append("--tracing")
                traced.env.update(
                    OTEL_EXPORTER_OTLP_ENDPOINT=sink.endpoint, OTEL_EXPORTER_OTLP_INSECURE="true"
                )
                if sampler:
                    traced.env["OTEL_TRACES_SAMPLER"] = sampler
                servers.append(traced)
        if go_bbr is not None:
            kubeconfig, api_kind = stack.enter_context(kube_api(work, args.kube))
            result["tools"]["kube_api"] = api_kind
            servers.append(common.go_bbr_server(go_bbr, kubeconfig))
        stack.callback(common.stop_servers, servers)
        if args.pin:
            for server in servers:
                pin(server, cpus[-1])
            os.sched_setaffinity(0, cpus[:-1])  # ghz inherits it
        for server in servers:
            if server.name == "go-bbr":
                server.env["KUBE_FEATURE_WatchListClient"] = "false"
            server.start(work / "logs")
            print(f"started {server.name} (pid {server.pid}, port {server.port})", file=sys.stderr)

        runs: list[dict[str, Any]] = []
        for size in sizes:
            for server in servers:  # warm-up, not recorded
                common.run_ghz(
                    ghz,
                    server.port,
                    data[size],
                    concurrency=args.concurrency,
                    duration=min(2.0, args.duration),
                    connections=args.connections,
                )
            for round_ in range(args.rounds):
                for server in servers:
                    run = measure(
                        ghz,
                        server,
                        data[size],
                        concurrency=args.concurrency,
                        duration=args.duration,
                        connections=args.connections,
                    )
                    run.update(server=server.name, size=size, round=round_)
                    runs.append(run)
                    print(
                        f"{server.name:<12} {size:>6} round {round_}: {run['rps']:8.0f} req/s "
                        f"p50 {run['p50_ms']:.2f} p99 {run['p99_ms']:.2f} ms "
                        f"errors {run['errors']} peak RSS {run['peak_rss_mb']} MB "
                        f"CPU {run['cpu_us_per_request']} µs/request",
                        file=sys.stderr,
                    )
        memory = []
        if args.memory_streams and "1MB" in data and "1KB" in data:
            fresh = [common.bbr_server("bbr")]
            # glibc raises its mmap threshold after freeing a large block; then 1 MiB bodies
            # come from the heap, which fragments and is not given back. A fixed threshold
            # keeps them in mmap, returned to the kernel on free.
            tuned = common.bbr_server("bbr-mmap-threshold")
            tuned.env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
            fresh.append(tuned)
            for name, tree in args.experiment[:1]:
                fresh.append(common.bbr_server(name, cwd=tree))
            if go_bbr is not None:
                go = common.go_bbr_server(go_bbr, kubeconfig)
                go.env["KUBE_FEATURE_WatchListClient"] = "false"
                fresh.append(go)
            for server in fresh:
                if args.pin:
                    pin(server, cpus[-1])
                memory.append(
                    memory_check(
                        ghz, server, data, streams=args.memory_streams, logs=work / "logs-memory"
                    )
                )
                m = memory[-1]
                print(
                    f"memory {m['server']}: {m['baseline_rss_mb']} -> peak {m['peak_rss_mb']} "
                    f"-> {m['rss_after_10s_mb']} MB",
                    file=sys.stderr,
                )
        result["machine_after"] = common.machine()
        result["runs"] = runs
        result["summary"] = summarise(runs)
        result["ratios"] = {
            name: ratios(result["summary"], name, "go-bbr")
            for name in result["summary"]
            if name != "go-bbr" and "go-bbr" in result["summary"]
        }
        result["memory"] = memory

    output = args.output or common.RESULTS / "loadtest-latest.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
