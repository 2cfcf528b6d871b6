"""`make loadtest-e2e`: HTTP load through a real Envoy, with and without an ext_proc.

One Envoy, four listeners:

    upstream   direct_response 200 (the fast loopback model server)
    ceiling    routes on a header the client sends itself; no ext_proc (the ceiling)
    bbr        ext_proc -> bbr, then routes on the header bbr sets
    go-bbr     ext_proc -> the Go BBR, then the same routes

h2load (Debian's nghttp2-client) posts the same OpenAI bodies as the gRPC load test;
each variant takes turns per round. Reported: requests/s, p50/p99 (from h2load's
per-request log), the throughput ratio to the ceiling and the latency added to it.

    python -m bench.e2e [--duration S] [--rounds N] [--clients C] [--streams M]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench import bodies, common
from bench.common import RssSampler, Server
from bench.loadtest import kube_api
from bench.tables import Column, Table
from harness.envoy_config import EXT_PROC_TYPE, HCM_TYPE, ROUTER_TYPE, static_cluster
from harness.processes import (
    Child,
    envoy_binary,
    free_port,
    http_ready,
    stop_all,
    tcp_ready,
    wait_until,
)

BUFFER_LIMIT = 32 * 1024 * 1024
PATH = "/v1/chat/completions"


def _cluster(name: str, port: int, *, http2: bool) -> dict[str, Any]:
    return static_cluster(name, port, buffer_limit=BUFFER_LIMIT, http2=http2)


def _listener(name: str, port: int, routes: list[dict[str, Any]], filters: list[Any]) -> Any:
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": name,
        "codec_type": "AUTO",
        "route_config": {
            "name": name,
            "virtual_hosts": [{"name": name, "domains": ["*"], "routes": routes}],
        },
        "http_filters": [
            *filters,
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}},
        ],
    }
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "per_connection_buffer_limit_bytes": BUFFER_LIMIT,
        "filter_chains": [
            {
                "filters": [
                    {"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}
                ]
            }
        ],
    }


def _ext_proc(cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": EXT_PROC_TYPE,
            "grpc_service": {"envoy_grpc": {"cluster_name": cluster}},
            "failure_mode_allow": False,
            "message_timeout": "10s",
            "processing_mode": {
                "request_header_mode": "SEND",
                "response_header_mode": "SKIP",
                "request_body_mode": "BUFFERED",
                "response_body_mode": "NONE",
                "request_trailer_mode": "SKIP",
                "response_trailer_mode": "SKIP",
            },
        },
    }


def render(admin: int, upstream: int, fronts: dict[str, int], ext_procs: dict[str, int]) -> str:
    """The Envoy bootstrap: `fronts` maps variant -> listener port; `ext_procs` variant -> port."""
    routed = [
        {
            "match": {
                "prefix": "/",
                "headers": [
                    {
                        "name": "x-gateway-base-model-name",
                        "string_match": {"exact": bodies.BASE_MODEL},
                    }
                ],
            },
            "route": {"cluster": "upstream", "timeout": "60s"},
        },
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]
    ok = [
        {
            "match": {"prefix": "/"},
            "direct_response": {"status": 200, "body": {"inline_string": '{"ok":true}'}},
        }
    ]
    listeners = [_listener("upstream", upstream, ok, [])]
    clusters = [_cluster("upstream", upstream, http2=False)]
    for name, port in fronts.items():
        filters = [_ext_proc(name)] if name in ext_procs else []
        listeners.append(_listener(name, port, routed, filters))
    for name, port in ext_procs.items():
        clusters.append(_cluster(name, port, http2=True))
    bootstrap = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    return yaml.safe_dump(bootstrap, sort_keys=False)


def run_h2load(
    port: int, body: Path, *, duration: float, clients: int, streams: int, header: str | None
) -> dict[str, Any]:
    h2load = shutil.which("h2load")
    assert h2load is not None
    with tempfile.NamedTemporaryFile(suffix=".log") as log:
        argv = [
            h2load,
            "-D",
            str(int(duration)),
            "-c",
            str(clients),
            "-m",
            str(streams),
            "-t",
            "1",
            "-d",
            str(body),
            "-H",
            "content-type: application/json",
            "--log-file",
            log.name,
        ]
        if header:
            argv += ["-H", header]
        argv.append(f"http://127.0.0.1:{port}{PATH}")
        out = subprocess.run(argv, capture_output=True, text=True, check=False)
        lines = Path(log.name).read_text().split("\n")
    # log lines: start time (µs since epoch), status, latency (µs)
    latencies = []
    statuses: dict[str, int] = {}
    for line in lines:
        parts = line.split("\t")
        if len(parts) >= 3:
            statuses[parts[1]] = statuses.get(parts[1], 0) + 1
            if parts[1] == "200":
                latencies.append(int(parts[2]) / 1000)
    latencies.sort()
    ok = statuses.get("200", 0)

    def pct(p: float) -> float:
        return round(common.percentile(latencies, p / 100), 3)

    if not latencies:
        raise RuntimeError(f"h2load: no successful request: {out.stdout[-800:]} {out.stderr}")
    return {
        "requests": sum(statuses.values()),
        "ok": ok,
        "errors": sum(statuses.values()) - ok,
        "statuses": statuses,
        "rps": round(ok / duration, 1),
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--clients", type=int, default=10, help="h2load connections")
    parser.add_argument("--streams", type=int, default=5, help="concurrent streams each")
    parser.add_argument("--envoy-concurrency", type=int, default=1)
    parser.add_argument("--sizes", default=",".join(bodies.SIZES))
    parser.add_argument("--no-go", action="store_true")
    parser.add_argument("--kube", choices=("auto", "real", "fake"), default="auto")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    if shutil.which("h2load") is None:
        print("h2load not found: make perf-tools (nghttp2-client)", file=sys.stderr)
        return 2
    go_bbr = None if args.no_go else common.tool("go-bbr")
    sizes = bodies.sizes(args.sizes)
    result: dict[str, Any] = {
        "kind": "e2e",
        "machine_before": common.machine(),
        "settings": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "clients": args.clients,
            "streams_per_client": args.streams,
            "envoy_concurrency": args.envoy_concurrency,
            "sizes": {s: bodies.SIZES[s] for s in sizes},
        },
        "tools": {
            "h2load": subprocess.run(
                ["h2load", "--version"], capture_output=True, text=True, check=False
            ).stdout.strip(),
        },
    }
    with (
        tempfile.TemporaryDirectory(prefix="bbr-e2e-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        servers: list[Server] = [common.bbr_server("bbr")]
        if go_bbr is not None:
            kubeconfig, api_kind = stack.enter_context(kube_api(work, args.kube))
            result["tools"]["kube_api"] = api_kind
            go = common.go_bbr_server(go_bbr, kubeconfig)
            go.env["KUBE_FEATURE_WatchListClient"] = "false"
            servers.append(go)
        stack.callback(common.stop_servers, servers)
        for server in servers:
            server.start(work / "logs")
        admin, upstream = free_port(), free_port()
        fronts = {"ceiling": free_port(), **{s.name: free_port() for s in servers}}
        config = work / "envoy.yaml"
        config.write_text(render(admin, upstream, fronts, {s.name: s.port for s in servers}))
        envoy_bin = envoy_binary()
        version = subprocess.run([envoy_bin, "--version"], capture_output=True, text=True)
        result["tools"]["envoy"] = version.stdout.strip().split("version: ")[-1][:80]
        log = (work / "envoy.log").open("wb")
        envoy = Child(
            "envoy",
            [
                envoy_bin,
                "-c",
                str(config),
                "--concurrency",
                str(args.envoy_concurrency),
                "--log-level",
                "warn",
                "--base-id",
                str(free_port()),
            ],
            stdout=log,
            stderr=log,
        )
        stack.callback(stop_all, [envoy])
        wait_until("envoy", http_ready(admin, "/ready"), child=envoy, timeout=60)
        for port in fronts.values():
            wait_until("envoy listener", tcp_ready(port), child=envoy)

        body_files = {}
        for size in sizes:
            body_files[size] = work / f"body-{size}.json"
            body_files[size].write_bytes(bodies.chat_body(bodies.SIZES[size]))
        header = f"x-gateway-base-model-name: {bodies.BASE_MODEL}"
        pids = {s.name: s.pid for s in servers}
        runs: list[dict[str, Any]] = []
        for size in sizes:
            for name, port in fronts.items():  # warm-up
                run_h2load(
                    port,
                    body_files[size],
                    duration=2,
                    clients=args.clients,
                    streams=args.streams,
                    header=header if name == "ceiling" else None,
                )
            for round_ in range(args.rounds):
                for name, port in fronts.items():
                    sampler = RssSampler(pids.get(name, envoy.pid))
                    with sampler:
                        run = run_h2load(
                            port,
                            body_files[size],
                            duration=args.duration,
                            clients=args.clients,
                            streams=args.streams,
                            header=header if name == "ceiling" else None,
                        )
                    run.update(variant=name, size=size, round=round_)
                    run["peak_rss_mb"] = round(sampler.peak / 1024 / 1024, 1)
                    runs.append(run)
                    print(
                        f"{name:<8} {size:>6} round {round_}: {run['rps']:8.0f} req/s "
                        f"p50 {run['p50_ms']:.2f} p99 {run['p99_ms']:.2f} ms "
                        f"errors {run['errors']} {run['statuses']}",
                        file=sys.stderr,
                    )
        result["machine_after"] = common.machine()
        result["runs"] = runs
    result["summary"] = summarise(runs)
    output = args.output or common.RESULTS / "e2e-latest.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwrote {output}")
    return 0


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {}
    for run in runs:
        out.setdefault(run["variant"], {}).setdefault(run["size"], {})
    for name, sizes in out.items():
        for size in sizes:
            mine = [r for r in runs if r["variant"] == name and r["size"] == size]
            sizes[size] = {
                k: round(statistics.median(r[k] for r in mine), 3)
                for k in ("rps", "p50_ms", "p90_ms", "p99_ms")
            }
            sizes[size]["errors"] = sum(r["errors"] for r in mine)
    ceiling = out.get("ceiling", {})
    for sizes in out.values():
        for size, s in sizes.items():
            top = ceiling.get(size)
            if top and top["rps"]:
                s["ratio_to_ceiling"] = round(s["rps"] / top["rps"], 3)
                s["added_p50_ms"] = round(s["p50_ms"] - top["p50_ms"], 3)
                s["added_p99_ms"] = round(s["p99_ms"] - top["p99_ms"], 3)
    return out


TABLE = Table(
    Column("variant", 9, left=True),
    Column("size", 7),
    Column("req/s", 9, ".0f"),
    Column("p50 ms", 9, ".2f"),
    Column("p99 ms", 9, ".2f"),
    Column("errors", 8, ".0f"),
    Column("/ceiling", 10, ".2f"),
    Column("+p50 ms", 9, ".2f"),
    Column("+p99 ms", 9, ".2f"),
)


def table_row(name: str, size: str, s: dict[str, float]) -> tuple[object, ...]:
    """One variant and size of the summary, in the order of TABLE (and report's table)."""
    added = (s.get("ratio_to_ceiling", 0), s.get("added_p50_ms", 0), s.get("added_p99_ms", 0))
    return (name, size, s["rps"], s["p50_ms"], s["p99_ms"], s["errors"], *added)


def print_table(result: dict[str, Any]) -> None:
    before, after = result["machine_before"]["loadavg"], result["machine_after"]["loadavg"]
    print(f"\nload average before {before}, after {after}")
    rows = [
        table_row(n, size, s) for n, sizes in result["summary"].items() for size, s in sizes.items()
    ]
    print("\n".join(TABLE.lines(rows)))


if __name__ == "__main__":
    started = time.monotonic()
    code = main()
    print(f"({time.monotonic() - started:.0f} s)", file=sys.stderr)
    raise SystemExit(code)
