"""`make soak`: bbr under steady load for a long time, with the model map changing under it.

What runs (all on localhost, bbr as a real process):

- ghz drives bbr's ext_proc port as Envoy does in BUFFERED mode: several ghz processes,
  ~20 concurrent streams in all, each with its own model and body size (base models,
  adapters, an adapter that moves between base models, an unknown model, a client-sent
  spoofed routing header);
- the model map is rewritten atomically every `--reload-every` seconds, moving the
  adapter `soak-moving` between the two base models;
- a checker sends known models over its own gRPC channel the whole time and checks the
  routing headers bbr sets (after a spoofed header on every request): stable models
  must go to their base model, the moving adapter to one of the two (and, once the 2 s
  a change may take have passed, to the one in the file), the unknown model to none;
- bbr's RSS and open file descriptors (/proc/PID/status, /proc/PID/fd) are sampled every
  `--sample-every` seconds and printed as they come.

It fails (exit 1) when RSS or the descriptor count grows more than `--max-growth` (10 %)
between the end of the warm-up (the first 20 % of the run) and the end of the run, on
any misrouted request, on any ghz error, when reloads stop being applied, or when bbr
does not exit 0 on SIGTERM at the end. Exit 2: ghz (or the protoset) is missing.

    python -m bench.soak --seconds 600          # what `make soak` runs (SOAK_SECONDS)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from bench import bodies, common
from bench.common import PROTOSET, REPO, ghz_argv
from bench.tables import Column, Table
from harness.processes import Child, bbr_argv, free_port, grpc_health_ready, wait_until

TOOLS_TARGET = "make perf-tools"
BASE_HEADER = "x-gateway-base-model-name"
MODEL_HEADER = "x-gateway-model-name"

LLAMA = "meta-llama/Llama-3.1-8B-Instruct"
DEEPSEEK = "deepseek/vllm-deepseek-r1"
MOVING = "soak-moving"
UNKNOWN = "not-in-the-map"
SPOOF = "spoofed/base-model"
STABLE = {LLAMA: LLAMA, "food-review-1": LLAMA, DEEPSEEK: DEEPSEEK, "ski-resorts": DEEPSEEK}
SETTLE_SECONDS = 2.0  # SPEC §3: a change takes effect within 2 s
SETTLE_SLACK = 0.5  # plus the checker's own request in flight


# --- model map ----------------------------------------------------------------------------


def model_map(moving_base: str) -> str:
    """Two ConfigMaps; `soak-moving` is an adapter of `moving_base`."""
    llama = ["food-review-1", "movie-critique"] + ([MOVING] if moving_base == LLAMA else [])
    deepseek = ["ski-resorts"] + ([MOVING] if moving_base == DEEPSEEK else [])

    def doc(name: str, base: str, adapters: list[str]) -> str:
        items = "".join(f"    - {a}\n" for a in adapters)
        return (
            "apiVersion: v1\nkind: ConfigMap\n"
            f"metadata:\n  name: {name}\n"
            f"data:\n  baseModel: {base}\n  adapters: |\n{items}"
        )

    return doc("llama", LLAMA, llama) + "---\n" + doc("deepseek", DEEPSEEK, deepseek)


def write_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text, encoding="utf-8")
    os.replace(temp, path)


class Reloader(threading.Thread):
    """Moves `soak-moving` to the other base model every `every` seconds."""

    def __init__(self, path: Path, every: float, stop: threading.Event) -> None:
        super().__init__(name="reloader", daemon=True)
        self.path = path
        self.every = every
        self.stop = stop
        self.lock = threading.Lock()
        self.base = LLAMA
        self.changed_at = time.monotonic()
        self.writes = 0
        write_atomically(path, model_map(self.base))

    def expected(self) -> tuple[str, float]:
        """Where `soak-moving` goes now, and when that was written."""
        with self.lock:
            return self.base, self.changed_at

    def run(self) -> None:
        while not self.stop.wait(self.every):
            with self.lock:
                self.base = DEEPSEEK if self.base == LLAMA else LLAMA
                # Record the time before the write: a check never expects too early.
                self.changed_at = time.monotonic()
                write_atomically(self.path, model_map(self.base))
                self.writes += 1


# --- ext_proc messages --------------------------------------------------------------------


def stream_parts(model: str, size: int, *, spoof: bool) -> tuple[bytes, list[tuple[str, str]]]:
    """The body (`size` bytes, `model` after the messages) and HTTP headers of one request;
    `spoof` adds client-sent routing headers that bbr must overwrite."""
    spoofed = [(BASE_HEADER, SPOOF), (MODEL_HEADER, SPOOF)] if spoof else []
    return bodies.chat_body(size, model), bodies.request_headers(spoofed)


def ghz_stream(model: str, size: int, *, spoof: bool) -> list[dict[str, Any]]:
    """One ext_proc stream as Envoy sends it in BUFFERED mode, in ghz's JSON."""
    return bodies.ghz_messages(*stream_parts(model, size, spoof=spoof))


def pb_stream(model: str, size: int) -> list[pb.ProcessingRequest]:
    """The same as protobuf messages, with spoofed routing headers (the checker's)."""
    return bodies.extproc_messages(*stream_parts(model, size, spoof=True))


def routing_headers(responses: Sequence[pb.ProcessingResponse]) -> dict[str, str] | str:
    """The routing headers Envoy would send upstream after these answers, or what went wrong.

    Starts from the client's spoofed values and applies every header mutation in order.
    """
    headers = {BASE_HEADER: SPOOF, MODEL_HEADER: SPOOF}
    for response in responses:
        kind = response.WhichOneof("response")
        if kind == "immediate_response":
            return f"immediate response {response.immediate_response.status.code}"
        if kind not in ("request_headers", "request_body"):
            return f"unexpected {kind}"
        answer = getattr(response, kind).response
        for name in answer.header_mutation.remove_headers:
            headers.pop(name.lower(), None)
        for option in answer.header_mutation.set_headers:
            headers[option.header.key.lower()] = option.header.raw_value.decode()
    return headers


# --- the checker ---------------------------------------------------------------------------


class Checker(threading.Thread):
    """Sends known models over its own channel and checks the routing headers bbr sets."""

    def __init__(self, port: int, reloader: Reloader, stop: threading.Event) -> None:
        super().__init__(name="checker", daemon=True)
        self.port = port
        self.reloader = reloader
        self.stop = stop
        self.checks = 0
        self.strict_moving_checks = 0
        self.misrouted: list[str] = []
        self.errors: list[str] = []

    def run(self) -> None:
        models = [*STABLE, MOVING, UNKNOWN]
        sizes = (512, 4096, 32768)
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = pb_grpc.ExternalProcessorStub(channel)
            n = 0
            while not self.stop.is_set():
                model = models[n % len(models)]
                size = sizes[n % len(sizes)]
                n += 1
                expected_base, changed_at = self.reloader.expected()
                settled = time.monotonic() - changed_at > SETTLE_SECONDS + SETTLE_SLACK
                try:
                    responses = list(stub.Process(iter(pb_stream(model, size)), timeout=60))
                except grpc.RpcError as exc:
                    if not self.stop.is_set():
                        self.errors.append(f"{model}: {exc.code()} {exc.details()}")
                    continue
                self.checks += 1
                # The request used the map in force when its headers reached bbr, which
                # may be after a newer write landed: then either base is right.
                if self.reloader.expected()[1] != changed_at:
                    settled = False
                problem = self.verify(
                    model, routing_headers(responses), expected_base if settled else None
                )
                if problem is not None:
                    problem = f"{time.strftime('%H:%M:%S')} {problem}"
                    self.misrouted.append(problem)
                    print(f"MISROUTED: {problem}", flush=True)
                self.stop.wait(0.01)

    def verify(
        self, model: str, headers: dict[str, str] | str, expected_base: str | None
    ) -> str | None:
        """What is wrong with bbr's answer for `model`, or None.

        `expected_base`: where the moving adapter must go, when its last move was written
        more than 2 s (plus slack) before the request was sent; None while it may be
        either.
        """
        if isinstance(headers, str):
            return f"{model}: {headers}"
        base = headers.get(BASE_HEADER)
        if headers.get(MODEL_HEADER) != model:
            return f"{model}: model header {headers.get(MODEL_HEADER)!r}"
        if model in STABLE:
            ok = base == STABLE[model]
        elif model == UNKNOWN:
            ok = base is None
        elif expected_base is not None:
            self.strict_moving_checks += 1
            ok = base == expected_base
        else:
            ok = base in (LLAMA, DEEPSEEK)
        if ok:
            return None
        want = expected_base or STABLE.get(model)
        return f"{model}: base header {base!r}, want {want!r}"


# --- sampling ------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    threads: int


# What is printed per sample, as it comes.
SAMPLES = Table(
    Column("t (s)", 7, ".1f"),
    Column("RSS MiB", 8, ".1f"),
    Column("fds", 5, "d"),
    Column("threads", 7, "d"),
    Column("checks", 7, "d"),
    Column("misrouted", 9, "d"),
    sep=" ",
)


def sample(pid: int, t: float) -> Sample:
    rss = threads = 0
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return Sample(t, rss, len(os.listdir(f"/proc/{pid}/fd")), threads)


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def growth(samples: list[Sample], what: str, warmup_end: float) -> tuple[float, float, float]:
    """(baseline, final, relative growth): medians of the first and last few samples
    after the warm-up, so one transient reading (an fd open for a moment) does not count."""
    after = [s for s in samples if s.t >= warmup_end]
    if len(after) < 2:
        raise RuntimeError("too few samples after the warm-up: lengthen the run")
    k = max(1, min(3, len(after) // 4))
    first = statistics.median(getattr(s, what) for s in after[:k])
    last = statistics.median(getattr(s, what) for s in after[-k:])
    return first, last, (last - first) / first if first else 0.0


# --- ghz -----------------------------------------------------------------------------------

# (model, body bytes, concurrency, spoofed routing headers): 20 streams in all.
MIX: list[tuple[str, int, int, bool]] = [
    (LLAMA, 1024, 4, False),
    ("food-review-1", 16 * 1024, 4, False),
    ("ski-resorts", 1024, 4, True),
    (MOVING, 4096, 4, False),
    (UNKNOWN, 1024, 2, False),
    (DEEPSEEK, 100 * 1024, 2, True),
]


def start_ghz(
    ghz: str, port: int, work: Path, seconds: float
) -> list[tuple[str, subprocess.Popen[bytes], Path]]:
    runs = []
    for i, (model, size, concurrency, spoof) in enumerate(MIX):
        data = work / f"ghz-{i}.json"
        data.write_text(json.dumps(ghz_stream(model, size, spoof=spoof)))
        report = work / f"ghz-{i}.report.json"
        argv = ghz_argv(ghz, port, data, concurrency=concurrency, duration=seconds)
        argv[-1:-1] = ["--output", str(report)]
        log = (work / f"ghz-{i}.log").open("wb")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        runs.append((f"{model} {size}B{' spoofed' if spoof else ''} c{concurrency}", proc, report))
    return runs


def ghz_summary(label: str, report_path: Path, work: Path) -> tuple[int, int, str]:
    """(requests, errors, one line) for one ghz run."""
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError) as exc:
        return 0, 1, f"{label}: no ghz report ({exc}); see {work}"
    s = common.summarise_ghz(report)
    count, errors = s["requests"], s["errors"]
    detail = f" errors {s['error_kinds']}" if errors else ""
    line = (
        f"{label:40} {count:8d} req {s['rps']:8.1f}/s  p50 {s['p50_ms']:7.2f} ms  "
        f"p99 {s['p99_ms']:8.2f} ms{detail}"
    )
    return count, errors, line


# --- main ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=float(os.environ.get("SOAK_SECONDS", "600"))
    )
    parser.add_argument("--reload-every", type=float, default=5.0)
    parser.add_argument("--sample-every", type=float, default=None)
    parser.add_argument("--warmup", type=float, default=0.2, help="fraction of the run")
    parser.add_argument("--max-growth", type=float, default=0.10)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--log-level", default="info", help="bbr's; info logs every request (~6 MB/min)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ghz = common.tool("ghz")
    if ghz is None:
        print(
            "soak: ghz not found in ${BBR_TOOLS:-~/.cache/bbr-tools}/bin or on PATH: "
            f"run `{TOOLS_TARGET}` first",
            file=sys.stderr,
        )
        return 2
    if not PROTOSET.is_file():
        print(f"soak: {PROTOSET} missing: run `make protos` first", file=sys.stderr)
        return 2
    seconds = args.seconds
    every = args.sample_every or max(0.5, min(5.0, seconds / 40))
    work = Path(tempfile.mkdtemp(prefix="bbr-soak-"))
    failures: list[str] = []
    stop = threading.Event()
    ports = {"grpc": free_port(), "health": free_port(), "metrics": free_port()}
    map_path = work / "model-map.yaml"
    reloader = Reloader(map_path, args.reload_every, stop)
    bbr_log = (work / "bbr.log").open("wb")
    bbr = Child(
        "bbr",
        bbr_argv(
            map_path,
            grpc_port=ports["grpc"],
            health_port=ports["health"],
            metrics_port=ports["metrics"],
            flags=["--log-level", args.log_level],
        ),
        cwd=REPO,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("BBR_")}},
        stdout=bbr_log,
        stderr=bbr_log,
    )
    runs: list[tuple[str, subprocess.Popen[bytes], Path]] = []
    try:
        wait_until("bbr health", grpc_health_ready(ports["health"]), child=bbr, timeout=60)
        before = metrics(ports["metrics"])
        print(
            f"soak: {seconds:g} s, ghz {ghz}, {sum(m[2] for m in MIX)} streams, map rewritten "
            f"every {args.reload_every:g} s, samples every {every:g} s, bbr pid {bbr.pid}, "
            f"work {work}",
            flush=True,
        )
        start = time.monotonic()
        runs = start_ghz(ghz, ports["grpc"], work, seconds)
        reloader.start()
        checker = Checker(ports["grpc"], reloader, stop)
        checker.start()

        samples: list[Sample] = []
        print(*SAMPLES.header(), sep="\n")
        while True:
            t = time.monotonic() - start
            if bbr.exited() is not None:
                failures.append(f"bbr exited with {bbr.exited()} during the soak")
                break
            s = sample(bbr.pid, t)
            samples.append(s)
            row = (t, s.rss_kib / 1024, s.fds, s.threads, checker.checks, len(checker.misrouted))
            print(SAMPLES.row(*row), flush=True)
            if t >= seconds:
                break
            time.sleep(min(every, max(0.0, seconds - t)) or every)

        for _, proc, _ in runs:
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                failures.append("a ghz run did not finish")
        stop.set()
        checker.join(60)
        reloader.join(10)
        after = metrics(ports["metrics"]) if bbr.exited() is None else {}

        print("\nghz:")
        total = 0
        for label, _, report in runs:
            count, errors, line = ghz_summary(label, report, work)
            total += count
            print("  " + line)
            if errors:
                failures.append(f"ghz {label}: {errors} errors")
        print(f"  {'all':40} {total:8d} req {total / seconds:8.1f}/s")

        warmup_end = seconds * args.warmup
        print(f"\nafter the warm-up (t >= {warmup_end:.0f} s), first vs last samples (medians):")
        for what, unit, scale in (("rss_kib", "MiB", 1024.0), ("fds", "", 1.0)):
            try:
                first, last, rel = growth(samples, what, warmup_end)
            except RuntimeError as exc:
                failures.append(str(exc))
                continue
            print(f"  {what:8} {first / scale:9.1f} -> {last / scale:9.1f} {unit:4} {rel:+.1%}")
            if rel > args.max_growth:
                failures.append(
                    f"{what} grew {rel:+.1%} after the warm-up (limit {args.max_growth:.0%})"
                )
        peak = max(s.rss_kib for s in samples) / 1024
        fds = [s.fds for s in samples]
        print(f"  RSS peak {peak:.1f} MiB; fds {min(fds)}..{max(fds)}")

        key = 'bbr_model_map_reloads_total{result="success"}'
        applied = after.get(key, 0) - before.get(key, 0)
        bad_key = 'bbr_model_map_reloads_total{result="error"}'
        failed = after.get(bad_key, 0) - before.get(bad_key, 0)
        print(
            f"\nmodel map: {reloader.writes} rewrites, {applied:.0f} reloads applied, "
            f"{failed:.0f} failed"
        )
        if reloader.writes and applied < reloader.writes - 1:
            failures.append(f"only {applied:.0f} of {reloader.writes} map rewrites were applied")
        if failed:
            failures.append(f"{failed:.0f} map reloads failed")
        print(
            f"checker: {checker.checks} requests checked ({checker.strict_moving_checks} of the "
            f"moving adapter after its 2 s), {len(checker.misrouted)} misrouted, "
            f"{len(checker.errors)} errors"
        )
        if checker.checks == 0:
            failures.append("the checker checked nothing")
        if checker.misrouted:
            failures.append(f"{len(checker.misrouted)} misrouted: {checker.misrouted[:5]}")
        if checker.errors:
            failures.append(f"{len(checker.errors)} checker errors: {checker.errors[:5]}")
        if after.get("bbr_active_streams", 0):
            print(f"note: {after['bbr_active_streams']:.0f} streams open at the end")
    finally:
        stop.set()
        for _, proc, _ in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        code = bbr.stop(timeout=30)
        bbr_log.close()
    if code != 0:
        failures.append(f"bbr exited {code} on SIGTERM (want 0)")
    if failures:
        print("\nSOAK FAILED:\n  " + "\n  ".join(failures), flush=True)
        print(f"logs kept in {work}")
        return 1
    print("\nsoak passed")
    if args.keep:
        print(f"logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
