"""Shared pieces of the load tests: tools, servers under test, RSS sampling, machine load,
ghz (its command line and the one parser of its report), percentiles."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from bench import bodies
from harness.processes import Child, bbr_argv, free_port, stop_all, tcp_ready, wait_until

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
PROTOSET = REPO / "protos" / "ext_proc.protoset"
MODEL_MAP = REPO / "config" / "model-map.yaml"
PROCESS_METHOD = "envoy.service.ext_proc.v3.ExternalProcessor.Process"
GO_BBR_VERSION = "v1.5.0"
GHZ_VERSION = "v0.120.0"


def tools_dir() -> Path:
    """Where `make perf-tools` puts ghz and the Go BBR (outside the repository)."""
    root = os.environ.get("BBR_TOOLS") or str(Path.home() / ".cache" / "bbr-tools")
    return Path(root) / "bin"


def tool(name: str) -> str | None:
    found = tools_dir() / name
    if found.is_file() and os.access(found, os.X_OK):
        return str(found)
    return shutil.which(name)


def machine() -> dict[str, Any]:
    """What else the machine was doing: the numbers are only as good as this."""
    return {
        "cpus": os.cpu_count(),
        "loadavg": list(os.getloadavg()),
        "uname": platform.platform(),
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def percentile(ordered: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted values: `fraction` 0.99 is p99."""
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# --- memory ---------------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (bbr --workers N forks workers)."""
    pids = [pid]
    i = 0
    while i < len(pids):
        try:
            for task in os.listdir(f"/proc/{pids[i]}/task"):
                with open(f"/proc/{pids[i]}/task/{task}/children") as f:
                    pids.extend(int(p) for p in f.read().split())
        except OSError:
            pass
        i += 1
    return pids


def rss_bytes(pid: int) -> int:
    """Resident set size of a process tree (VmRSS summed), in bytes."""
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process tree so far, in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in _tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        except OSError:
            pass
    return total / ticks


class RssSampler:
    """Polls VmRSS of a process tree in a thread; `peak` is the highest sum seen."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = rss_bytes(self.pid)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- servers under test ---------------------------------------------------------------


@dataclass
class Server:
    """One ext_proc server under test, running as a child process."""

    name: str
    argv: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path = REPO
    child: Child | None = None
    log_path: Path | None = None

    def start(self, logs: Path) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.log_path = logs / f"{self.name}.log"
        out = self.log_path.open("wb")
        env = {**os.environ, **self.env}
        self.child = Child(self.name, self.argv, cwd=self.cwd, env=env, stdout=out, stderr=out)
        wait_until(f"{self.name} gRPC port", tcp_ready(self.port), child=self.child, timeout=60)
        wait_until(f"{self.name} routes", lambda: routes(self.port), child=self.child, timeout=60)

    @property
    def pid(self) -> int:
        assert self.child is not None
        return self.child.pid

    def stop(self) -> None:
        if self.child is not None:
            stop_all([self.child])


def bbr_server(name: str, *, log_level: str = "info", workers: int = 1, cwd: Path = REPO) -> Server:
    """bbr from the source tree `cwd` (`python -m bbr` imports the bbr package there)."""
    port = free_port()
    flags = ["--log-level", log_level]
    if workers > 1:
        flags += ["--workers", str(workers)]
    argv = bbr_argv(
        MODEL_MAP, grpc_port=port, health_port=free_port(), metrics_port=free_port(), flags=flags
    )
    return Server(name, argv, port, cwd=cwd)


def go_bbr_server(binary: str, kubeconfig: Path, name: str = "go-bbr") -> Server:
    """The Gateway API Inference Extension's BBR, plain gRPC, reading ConfigMaps via the API."""
    port = free_port()
    argv = [
        binary,
        f"--grpc-port={port}",
        f"--grpc-health-port={free_port()}",
        f"--metrics-port={free_port()}",
        "--secure-serving=false",
        "--tracing=false",
        "--metrics-endpoint-auth=false",
        "--enable-pprof=false",
    ]
    return Server(name, argv, port, env={"KUBECONFIG": str(kubeconfig), "NAMESPACE": "default"})


def routes(port: int, body_size: int = 1024) -> bool:
    """True once the server answers a real request with the base-model header."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalProcessorStub(channel)
        try:
            messages = bodies.extproc_messages(bodies.chat_body(body_size))
            replies = list(stub.Process(iter(messages), timeout=5))
        except grpc.RpcError:
            return False
    for reply in replies:
        if reply.WhichOneof("response") == "request_body":
            mutation = reply.request_body.response.header_mutation
            got = {h.header.key.lower(): h.header.raw_value for h in mutation.set_headers}
            return got.get("x-gateway-base-model-name") == bodies.BASE_MODEL.encode()
    return False


# --- ghz ------------------------------------------------------------------------------


def ghz_version(ghz: str) -> str:
    out = subprocess.run([ghz, "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).strip()


def write_ghz_data(directory: Path) -> dict[str, Path]:
    """One ghz data file (a JSON array = one bidi stream) per body size."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for label, size in bodies.SIZES.items():
        path = directory / f"stream-{label}.json"
        path.write_text(json.dumps(bodies.ghz_messages(bodies.chat_body(size))))
        files[label] = path
    return files


def ghz_argv(
    ghz: str,
    port: int,
    data: Path,
    *,
    concurrency: int,
    duration: float | None = None,
    requests: int | None = None,
    connections: int = 1,
    timeout: str = "60s",
) -> list[str]:
    """ghz's command line for one run of the ext_proc stream in `data` (JSON to stdout).

    `timeout` is each call's deadline, sent as `grpc-timeout` ("0": none, not sent)."""
    argv = [
        ghz,
        "--insecure",
        "--protoset",
        str(PROTOSET),
        "--call",
        PROCESS_METHOD,
        "--data-file",
        str(data),
        "--concurrency",
        str(concurrency),
        "--connections",
        str(connections),
        "--timeout",
        timeout,
        "--format",
        "json",
        "--skipFirst",
        "0",
    ]
    if duration is not None:
        argv += ["--duration", f"{duration:g}s", "--duration-stop", "ignore", "--total", "0"]
    else:
        argv += ["--total", str(requests or 1000)]
    return [*argv, f"127.0.0.1:{port}"]


def run_ghz(
    ghz: str,
    port: int,
    data: Path,
    *,
    concurrency: int,
    duration: float | None = None,
    requests: int | None = None,
    connections: int = 1,
    timeout: str = "60s",
) -> dict[str, Any]:
    """One ghz run; returns ghz's JSON report."""
    argv = ghz_argv(
        ghz,
        port,
        data,
        concurrency=concurrency,
        duration=duration,
        requests=requests,
        connections=connections,
        timeout=timeout,
    )
    out = subprocess.run(argv, capture_output=True, text=True, check=False)
    if not out.stdout.strip():
        raise RuntimeError(f"ghz failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def summarise_ghz(report: dict[str, Any]) -> dict[str, Any]:
    """requests/s, latency percentiles (ms) and errors from a ghz report."""
    dist = {
        int(d["percentage"]): d["latency"] / 1e6 for d in report.get("latencyDistribution") or []
    }
    codes = report.get("statusCodeDistribution") or {}
    ok = int(codes.get("OK", 0))
    count = int(report.get("count", 0))
    return {
        "requests": count,
        "ok": ok,
        "errors": count - ok,
        "error_kinds": report.get("errorDistribution") or {},
        "rps": round(ok / (report["total"] / 1e9), 1) if report.get("total") else 0.0,
        "p50_ms": round(dist.get(50, 0.0), 3),
        "p90_ms": round(dist.get(90, 0.0), 3),
        "p99_ms": round(dist.get(99, 0.0), 3),
        "mean_ms": round(report.get("average", 0) / 1e6, 3),
    }


def stop_servers(servers: Sequence[Server]) -> None:
    for s in servers:
        s.stop()
