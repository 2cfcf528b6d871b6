"""What the GIL switch interval costs the request path while the map is busy.

ghz (1 KB bodies, 4 streams, 10 s) against `bbr serve --kubernetes --namespace '*'` at
50 k names (a real kube-apiserver, ConfigMaps as `make bench-mapscale` makes them), with
no edits ("quiet") and during a 1,000-edit burst over 10 s; the switch interval of each
run is given (bbr's SWITCH_INTERVAL replaced at start, the code otherwise the same) and
the intervals alternate. Per request: the request loop's CPU and run-queue delay (its
thread's schedstat), its context switches, and the process's CPU. Not pinned: run it
under the benchmark lock and compare alternated pairs, not single runs.

    python -m bench.switchcost [--intervals 0.25,0.1] [--pairs 2] [--log-level info]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import bodies, common, mapscale

CONFIGMAPS = 10_000
_WRAP = (
    "import sys; import bbr.sources.kubernetes as k; k.SWITCH_INTERVAL = float(sys.argv[1]); "
    "sys.argv = ['bbr', *sys.argv[2:]]; from bbr.cli import main; sys.exit(main())"
)


def _loop(pid: int) -> tuple[int, int, int, int]:
    """The main (request loop) thread's run ns, run-queue ns, voluntary and
    involuntary context switches."""
    run, queued, _ = Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()
    status = Path(f"/proc/{pid}/task/{pid}/status").read_text().splitlines()
    switches = {line.split(":")[0]: int(line.split()[1]) for line in status if "ctxt" in line}
    return (
        int(run),
        int(queued),
        switches["voluntary_ctxt_switches"],
        switches["nonvoluntary_ctxt_switches"],
    )


def _burst(editor: mapscale.Editor, tag: str, count: int = 1000, seconds: float = 10.0) -> None:
    started = time.monotonic()
    with ThreadPoolExecutor(mapscale.LANES) as pool:
        futures = []
        for k in range(count):
            delay = started + k * seconds / count - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            index = (k * 7919) % CONFIGMAPS
            adapters = mapscale.adapters_of(index, f"{tag}-{k}")
            futures.append(pool.submit(editor.put, index, adapters))
        for future in futures:
            future.result()


def run_one(
    ghz: str, data: Path, kubeconfig: Path, editor: mapscale.Editor, interval: float,
    phase: str, tag: str, workdir: Path, log_level: str,
) -> dict[str, Any]:  # fmt: skip
    from harness.processes import bbr_port_flags, free_port

    port = free_port()
    argv = [
        sys.executable, "-c", _WRAP, str(interval), "serve", "--kubernetes", "--namespace", "*",
        *bbr_port_flags(port, free_port(), free_port()), "--log-level", log_level,
    ]  # fmt: skip
    server = common.Server(f"bbr-{tag}", argv, port, env={"KUBECONFIG": str(kubeconfig)})
    server.start(workdir / "logs")
    try:
        common.run_ghz(ghz, port, data, concurrency=4, requests=2000)  # warm up
        time.sleep(1)
        before, cpu_before = _loop(server.pid), common.cpu_seconds(server.pid)
        editing = None
        if phase == "burst":
            editing = threading.Thread(target=_burst, args=(editor, tag))
            editing.start()
        report = common.run_ghz(ghz, port, data, concurrency=4, duration=10)
        after, cpu_after = _loop(server.pid), common.cpu_seconds(server.pid)
        if editing is not None:
            editing.join()
    finally:
        server.stop()
    summary = common.summarise_ghz(report)
    ok = max(1, summary["ok"])
    return {
        "interval_ms": interval * 1e3,
        "log_level": log_level,
        "phase": phase,
        "ok": summary["ok"],
        "rps": summary["rps"],
        "p50_ms": summary["p50_ms"],
        "p99_ms": summary["p99_ms"],
        "loop_cpu_us_per_request": round((after[0] - before[0]) / 1e3 / ok, 1),
        "loop_queued_us_per_request": round((after[1] - before[1]) / 1e3 / ok, 1),
        "loop_voluntary_switches_per_request": round((after[2] - before[2]) / ok, 3),
        "loop_involuntary_switches_per_request": round((after[3] - before[3]) / ok, 3),
        "process_cpu_us_per_request": round((cpu_after - cpu_before) * 1e6 / ok, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--intervals", default="0.25,0.1", help="switch intervals, ms")
    parser.add_argument("--pairs", type=int, default=2, help="rounds of all the intervals")
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--json", type=Path, default=common.RESULTS / "switchcost-latest.json")
    args = parser.parse_args(argv)
    ghz = common.tool("ghz")
    if ghz is None:
        print("ghz not found: run `make ghz` first", file=sys.stderr)
        return 2
    from harness.apiserver import ADMIN_TOKEN, ApiServer

    intervals = [float(x) / 1e3 for x in args.intervals.split(",")]
    runs: list[dict[str, Any]] = []
    machine_before = common.machine()
    with tempfile.TemporaryDirectory(prefix="bbr-switchcost-") as tmp:
        work = Path(tmp)
        data = common.write_ghz_data(work / "data")["1KB"]
        api = ApiServer(work / "kube").start()
        try:
            editor = mapscale.Editor(api.url, ADMIN_TOKEN, api.dir / "ca.crt")
            for n in range(mapscale.NAMESPACES):
                editor.call("POST", "/api/v1/namespaces", {"metadata": {"name": f"scale-{n}"}})
            mapscale.populate(editor, 0, CONFIGMAPS)
            routed = {  # the model ghz sends
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": "ghz",
                    "namespace": "scale-0",
                    "labels": {mapscale.LABEL: "true"},
                },
                "data": {"baseModel": bodies.BASE_MODEL, "adapters": f"- {bodies.MODEL}\n"},
            }
            status, text = editor.call("POST", "/api/v1/namespaces/scale-0/configmaps", routed)
            if status >= 300:
                raise RuntimeError(f"{status}: {text[:300]!r}")
            kubeconfig = api.kubeconfig()
            for _ in range(args.pairs):
                for interval in intervals:
                    for phase in ("quiet", "burst"):
                        tag = f"r{len(runs)}"
                        run = run_one(
                            ghz, data, kubeconfig, editor, interval, phase, tag, work,
                            args.log_level,
                        )  # fmt: skip
                        print(json.dumps(run), flush=True)
                        runs.append(run)
        finally:
            api.stop()
    result = {"machine_before": machine_before, "machine_after": common.machine(), "runs": runs}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
