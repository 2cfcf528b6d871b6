"""Profile bbr under ghz load with py-spy; print where the time goes.

    python -m bench.profile [--size 1KB] [--duration 10] [--log-level info] [--native]

py-spy (PyPI, `pip install py-spy`) samples the running server from outside, so the
profile is of the real server under the real load. Output: collapsed stacks (for
flamegraph tools) in bench/results/profile-<size>.txt and a summary of the
functions with the most samples (inclusive and self) on stdout.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench import bodies, common


def summarise(collapsed: Path, top: int) -> list[str]:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " " + f.split("/")[-1].rstrip(")") for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        own[frames[-1]] += n
    lines = [f"{total} samples", "", "inclusive %  function (file:line)"]
    lines += [f"{100 * n / total:10.1f}  {f}" for f, n in inclusive.most_common(top)]
    lines += ["", "self %       function (file:line)"]
    lines += [f"{100 * n / total:10.1f}  {f}" for f, n in own.most_common(top)]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1KB", choices=list(bodies.SIZES))
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--native", action="store_true", help="include C frames")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    ghz = common.tool("ghz")
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if ghz is None or not Path(pyspy).exists():
        print("needs ghz (make perf-tools) and py-spy (pip install py-spy)", file=sys.stderr)
        return 2
    output = args.output or common.RESULTS / f"profile-{args.size}.txt"
    with tempfile.TemporaryDirectory(prefix="bbr-profile-") as tmp:
        work = Path(tmp)
        data = common.write_ghz_data(work / "data")[args.size]
        server = common.bbr_server("bbr", log_level=args.log_level)
        server.start(work / "logs")
        try:
            common.run_ghz(ghz, server.port, data, concurrency=args.concurrency, duration=2)
            load = threading.Thread(
                target=common.run_ghz,
                args=(ghz, server.port, data),
                kwargs={"concurrency": args.concurrency, "duration": args.duration + 2},
            )
            load.start()
            argv_spy = [
                pyspy, "record", "--pid", str(server.pid), "--duration", str(args.duration),
                "--format", "raw", "--output", str(output), "--rate", "200",
            ]  # fmt: skip
            # --native (C frames: gRPC's Cython core, msgspec) pauses the process per sample.
            argv_spy.append("--native" if args.native else "--nonblocking")
            subprocess.run(argv_spy, check=True, capture_output=True)
            load.join()
        finally:
            server.stop()
    load = common.machine()["loadavg"]
    print(f"bbr at {args.size}, log level {args.log_level}; load average {load}")
    print("\n".join(summarise(output, args.top)))
    print(f"\nwrote {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
