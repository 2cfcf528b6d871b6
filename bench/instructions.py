"""Instructions per ext_proc request of `bbr serve` under ghz, counted by callgrind.

CPU time per request on a shared machine moves by 10-30 % between runs of the same code
(other processes, ghz competing for the cores, how many calls each read batches), which
is more than the 5 % a change near the hot path may cost. valgrind's callgrind counts
the instructions the server executes instead, whatever else the machine does: two runs
of one tree agree to 0.1 % at 1 KB and 100 KB, to ~2 % at 1 MB (docs/performance.md).
That needs the same traffic every time: str hashes are unsalted (PYTHONHASHSEED=0), and
ghz sends no deadline by default, since a `grpc-timeout` value that changes per call
makes the header cache's hits depend on timing (with `--deadline 60s`, 2-7 % apart).
The kernel's side of system calls is not counted, nor what cache misses cost
(`--cache-sim` adds simulated L1 and last-level misses). Under valgrind the server is
~50x slower than ghz, so every read carries as many calls as ghz has in flight: the
counts are of that (fully batched) regime; `--concurrency 1` gives the unbatched one.

Each server (bbr from this tree, and every `--experiment NAME=PATH` tree) runs under
`valgrind --tool=callgrind`; per size, a warm-up, then the counters are zeroed
(`callgrind_control -z`), ghz sends `--requests` calls and the counters are dumped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import bodies, common
from bench.loadtest import experiment
from bench.tables import Column, Table

REQUESTS = {"1KB": 3000, "100KB": 1000, "1MB": 100}


def read_dump(path: Path) -> dict[str, int]:
    """A callgrind dump's totals by event name (`Ir`, and with --cache-sim `D1mr` ...)."""
    events: list[str] = []
    totals: list[int] = []
    for line in path.read_text().splitlines():
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith("summary:"):
            totals = [int(x) for x in line.split()[1:]]
    if not events or not totals:
        raise ValueError(f"{path}: no events/summary lines (not a callgrind dump?)")
    return dict(zip(events, totals, strict=False))


def callgrind_server(server: common.Server, out: Path, cache_sim: bool) -> common.Server:
    """`server` run under callgrind, counting nothing until zeroed, writing to `out`."""
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        "--dump-instr=no",
        f"--cache-sim={'yes' if cache_sim else 'no'}",
    ]
    # str hashes are salted per process; the same salt gives the same dict probes
    env = {"PYTHONHASHSEED": "0"}
    return common.Server(server.name, valgrind + server.argv, server.port, env=env, cwd=server.cwd)


def control(flag: str, pid: int) -> None:
    subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(bodies.SIZES), help="e.g. 1KB,1MB")
    parser.add_argument(
        "--requests", type=int, default=None, help=f"calls counted per size (default {REQUESTS})"
    )
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument(
        "--deadline",
        default="0",
        help="ghz's per-call deadline (sent as grpc-timeout); 0, the default, sends none",
    )
    parser.add_argument("--cache-sim", action="store_true", help="also simulated cache misses")
    parser.add_argument(
        "--experiment",
        type=experiment,
        action="append",
        default=[],
        help="[NAME=]PATH: also count bbr from this source tree; repeatable",
    )
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)

    ghz = common.tool("ghz")
    if ghz is None:
        print("ghz not found: run `make ghz` first", file=sys.stderr)
        return 2
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind not found: install it (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    sizes = bodies.sizes(args.sizes)
    result: dict[str, Any] = {
        "kind": "instructions",
        "machine_before": common.machine(),
        "settings": {
            "concurrency": args.concurrency,
            "deadline": args.deadline,
            "cache_sim": args.cache_sim,
        },
        "runs": [],
    }
    with (
        tempfile.TemporaryDirectory(prefix="bbr-instructions-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        work = Path(tmp)
        data = common.write_ghz_data(work / "data")
        plain = [common.bbr_server("bbr")]
        plain += [common.bbr_server(name, cwd=tree) for name, tree in args.experiment]
        servers = [callgrind_server(s, work / f"{s.name}.callgrind", args.cache_sim) for s in plain]
        stack.callback(common.stop_servers, servers)
        for server in servers:
            server.start(work / "logs")
            print(f"started {server.name} under callgrind (pid {server.pid})", file=sys.stderr)
        dumps = dict.fromkeys((s.name for s in servers), 0)
        for size in sizes:
            requests = args.requests or REQUESTS.get(size, 100)
            for server in servers:
                common.run_ghz(
                    ghz,
                    server.port,
                    data[size],
                    concurrency=args.concurrency,
                    requests=max(args.concurrency, requests // 3),
                    timeout=args.deadline,
                )
                control("-z", server.pid)
                report = common.run_ghz(
                    ghz,
                    server.port,
                    data[size],
                    concurrency=args.concurrency,
                    requests=requests,
                    timeout=args.deadline,
                )
                control("-d", server.pid)
                dumps[server.name] += 1
                counts = read_dump(work / f"{server.name}.callgrind.{dumps[server.name]}")
                ok = common.summarise_ghz(report)["ok"]
                if ok != requests:  # failed calls cost less: the count is not comparable
                    print(f"{server.name}: only {ok} of {requests} calls OK", file=sys.stderr)
                run = {"server": server.name, "size": size, "requests": requests, "ok": ok}
                run |= {event: round(n / requests) for event, n in counts.items()}
                result["runs"].append(run)
                print(
                    f"{server.name:<12} {size:>6}: {run['Ir']:,} instructions/request",
                    file=sys.stderr,
                )
        result["machine_after"] = common.machine()

    first = result["runs"][0]["server"] if result["runs"] else "bbr"
    base = {r["size"]: r["Ir"] for r in result["runs"] if r["server"] == first}
    columns = [
        Column("server", 14, left=True),
        Column("body", 7),
        Column("instructions/request", 22, ",d"),
        Column(f"÷ {first}", 9, ".3f"),
    ]
    if args.cache_sim:
        columns += [Column("D1 misses/request", 19, ",d"), Column("I1 misses/request", 19, ",d")]
    table = Table(*columns, sep=" ")
    rows = []
    for r in result["runs"]:
        row = [r["server"], r["size"], r["Ir"], r["Ir"] / base[r["size"]]]
        if args.cache_sim:
            row += [r.get("D1mr", 0) + r.get("D1mw", 0), r.get("I1mr", 0)]
        rows.append(row)
    print("\n".join(table.lines(rows)))
    output = args.output or common.RESULTS / "instructions-latest.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
