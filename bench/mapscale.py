"""`make bench-mapscale`: does the model map keep up at scale? Against a real kube-apiserver.

For each map size (500, 5 k and 50 k names by default: ConfigMaps of five adapters each,
sharing 50 base models, spread over 20 namespaces, all watched with `--namespace '*'`)
it starts a *probe*: a process that wires the map side exactly as `bbr serve --kubernetes`
does (`server.build_sources`: the Kubernetes source, its map builder, the metrics and
log listeners, the Events recorder, JSON logs at info) and runs an asyncio loop in its
main thread, as the request loop runs in bbr. Then it edits ConfigMaps through the API
(from this process, over kept-alive connections) and measures:

per-event CPU   one ConfigMap edit at a time, each waited for: the probe's CPU time
                (all its threads: watch decode, builder, holder, listeners, logging)
                divided by the number of edits; and the time from the API's answer to
                the PUT until the edit is in force (the probe's holder listener sees it).
loop stall      while edits arrive, how late the request loop notices a readable pipe
                that a separate writer process feeds a CLOCK_MONOTONIC timestamp every
                ~1 ms: the loop's wait for the GIL (and the machine's scheduling). Shown
                against the same measure with no events (idle), on the same machine.
                Every sample over 1 ms is attributed to bbr or to the machine
                (`attribute`, from /proc: see `_Lag`); per phase the raw maximum and
                the maximum put down to bbr are printed.
burst lag       1,000 edits paced over 10 s (one every 10 ms, several in flight): the
                time from the API's answer to the last one until all are in force.

Targets (issue 14, SPEC §3): no stall over 1 ms at 50 k names; a burst in force within
2 s of its last edit. The figures are only as good as the machine is quiet: the load
average is printed with them, and the idle column shows the machine's own noise.

    python -m bench.mapscale [--sizes 500,5000,50000] [--edits 100] [--burst 1000]
                             [--burst-seconds 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import gc
import http.client
import json
import os
import queue
import ssl
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench import common

NAMESPACES = 20
BASES = 50
ADAPTERS = 5  # per ConfigMap
LABEL = "inference.networking.k8s.io/bbr-managed"
RESULT = common.RESULTS / "mapscale-latest.json"
TICK = 0.001  # the lag writer's period
LANES = 16  # edits in flight at most
RT_PRIORITY = 10


# --- the probe: bbr's map side in a process of its own ---------------------------------


class _Tracker:
    """Holder listener: notices when expected names are in force (base, or None: gone).

    It runs on bbr's map-builder thread, so it must cost little there: the names of a
    command are checked in the order they were edited, and each snapshot's check stops
    at the first one not yet in force (edits arrive in about that order). Checking every
    pending name on every snapshot (up to 1,000 in the burst, unpaced) was a third of
    that thread's GIL time in the burst: the benchmark's overhead, not bbr's."""

    def __init__(self, loop: asyncio.AbstractEventLoop, reply: Callable[..., None]) -> None:
        self.loop = loop
        self.reply = reply
        self.pending: dict[int, collections.deque[tuple[str, str | None]]] = {}
        self.lock = threading.Lock()
        self.current: Any = None

    def expect(self, seq: int, names: dict[str, str | None]) -> None:
        """`names` in the order they are edited."""
        with self.lock:
            self.pending[seq] = collections.deque(names.items())
        if self.current is not None:
            self(self.current)

    def __call__(self, snapshot: Any) -> None:
        now = time.monotonic()
        self.current = snapshot
        lookup = snapshot.lookup
        done = []
        with self.lock:
            for seq, names in self.pending.items():
                while names and lookup(names[0][0]) == names[0][1]:
                    names.popleft()
                if not names:
                    done.append(seq)
            for seq in done:
                del self.pending[seq]
        for seq in done:
            self.loop.call_soon_threadsafe(self.reply, {"seq": seq, "met_at": now})


LATE = 0.001  # a loop-lag sample later than this is attributed (the 1 ms)


def attribute(
    lag_ms: float, loop_rq_ms: float, loop_cpu_ms: float, writer_ms: float, bbr_cpu_ms: float
) -> str:
    """Who made a late loop-lag sample late: `"bbr"` (bbr's threads held the GIL) or
    `"machine"` (the machine, or the benchmark's own loop and writer).

    Take from the wait what was certainly not bbr's: the loop thread's time runnable but
    not running (the run queue), its own CPU (the benchmark's commands run on that loop)
    and the writer's lateness in sending the timestamp. If the rest is within 1 ms, the
    machine accounts for the excess. Otherwise it is bbr's if bbr's threads ran on a CPU
    for at least half of the rest (one of them held the GIL most of that time); if they
    ran less, the GIL was free or held by a thread off the CPU (preempted or stolen by
    the hypervisor, whose time is not a thread's CPU time): the machine. The inputs lean
    towards bbr: `bbr_cpu_ms` is an upper bound and the others lower bounds."""
    rest = lag_ms - loop_rq_ms - loop_cpu_ms - writer_ms
    if rest <= LATE * 1000:
        return "machine"
    return "bbr" if bbr_cpu_ms >= rest / 2 else "machine"


class _Lag:
    """Reads timestamps from the writer process on the loop; keeps how late each was.

    Every sample later than LATE is attributed (`attribute`), always: the writer reads,
    just before each timestamp, the loop thread's run time and run-queue delay
    (`/proc/PID/task/TID/schedstat`, ns), whether it is runnable, and each CPU's steal
    time (`/proc/stat`, in 1/100 s), and sends them with it; the loop reads the same
    when a sample is late and takes the difference. The writer also sends how long its
    write before took (its own lateness). The loop reads bbr's threads' CPU clocks at
    every sample (~4 µs): on time samples cost nothing else.

    With `stalls` (seconds, > 0), a sample later than that also records where the
    probe's other threads stand (`--stalls`): a thread that held the GIL gave it up
    right after the step that held it, so its innermost frames name that step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stalls: float = 0.0) -> None:
        self.loop = loop
        self.stalls = stalls
        self.threshold = min(LATE, stalls) if stalls else LATE
        self.late: list[dict[str, Any]] = []
        self.samples: list[float] = []
        self.names: list[str] = []
        self.clocks: list[int] = []
        self.files: list[int] = []
        self.cpu: list[int] = []
        self.loop_cpu = 0
        self.last = 0.0
        self.record = struct.Struct("d")
        self.writer: subprocess.Popen[bytes] | None = None
        self.writer_stat = -1
        self.writer_base = -1
        self.writer_samples = 0
        self.fd = -1
        self.buffer = b""
        self.unfinished: dict[str, Any] | None = None  # late; the writer's lateness to come
        self.cost_ns = 0  # the loop's CPU for bookkeeping, on time reads
        self.reads = 0
        self.late_cost_ns: list[int] = []
        self.ncpu = os.cpu_count() or 1

    def start(self) -> None:
        read, write = os.pipe()
        self.samples = []
        self.late = []
        self.unfinished = None
        self.cost_ns = 0
        self.reads = 0
        self.late_cost_ns = []
        me = threading.get_ident()
        threads = [
            t
            for t in threading.enumerate()
            if t.ident is not None and t.ident != me and t.native_id is not None
        ]
        self.names = [t.name for t in threads]
        self.clocks = [time.pthread_getcpuclockid(t.ident) for t in threads]  # type: ignore[arg-type]
        task = f"/proc/{os.getpid()}/task/{threading.get_native_id()}"
        for fd in self.files:
            os.close(fd)
        paths = [f"/proc/{os.getpid()}/task/{t.native_id}/schedstat" for t in threads]
        self.files = [os.open(f"{task}/schedstat", os.O_RDONLY), os.open("/proc/stat", os.O_RDONLY)]
        self.files += [os.open(path, os.O_RDONLY) for path in paths]
        # sent, how long the writer's write before took, the loop thread's run and
        # run-queue ns, steal per CPU, whether the loop thread was runnable (state R),
        # then each of bbr's threads' run and run-queue ns
        self.record = struct.Struct(f"ddqq{self.ncpu}qq{2 * len(threads)}q")
        for fd in (self.files[0], *self.files[2:]):  # warm: a first read is slow
            _schedstat(fd)
        _steal(self.files[1], self.ncpu)
        self.cpu = self._cpu()
        self.loop_cpu = time.thread_time_ns()
        self.last = time.monotonic()
        _GC_PAUSES.clear()
        self.buffer = b""
        self.writer = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(write), str(TICK), str(self.ncpu), task, *paths],
            pass_fds=(write,),
        )
        os.close(write)
        self.writer_stat = os.open(f"/proc/{self.writer.pid}/schedstat", os.O_RDONLY)
        self.writer_base = -1
        self.fd = read
        os.set_blocking(read, False)
        self.loop.add_reader(read, self._readable)

    def _readable(self) -> None:
        now = time.monotonic()
        loop_cpu = time.thread_time_ns()
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        began = time.thread_time_ns()  # CPU: the loop may lose the GIL meanwhile
        if self.writer_base < 0:  # the writer's CPU from its first sample on
            self.writer_base = _schedstat(self.writer_stat)[0]
            self.writer_samples = len(self.samples)
        data = self.buffer + data
        size = self.record.size
        whole = len(data) - len(data) % size
        self.buffer = data[whole:]
        late, at = 0.0, -1
        for offset in range(0, whole, size):
            (sent,) = _SENT.unpack_from(data, offset)
            self.samples.append(now - sent)
            if now - sent > late:
                late, at = now - sent, offset
        cpu = self._cpu()
        if self.unfinished is not None and whole:  # the writer's lateness with that one
            self.unfinished["writer_ms"] = round(self.record.unpack_from(data, 0)[1] * 1e3, 3)
            self.unfinished = None
        if late > self.threshold:
            self._attribute(data, at, now, late, cpu, loop_cpu)
            if at + size < whole:
                following = self.record.unpack_from(data, at + size)[1]
                self.late[-1]["writer_ms"] = round(following * 1e3, 3)
            else:
                self.unfinished = self.late[-1]
            self.late_cost_ns.append(time.thread_time_ns() - began)
        else:
            self.cost_ns += time.thread_time_ns() - began
            self.reads += 1
        self.cpu = cpu
        self.loop_cpu = loop_cpu
        self.last = now
        if not data:
            self.loop.remove_reader(self.fd)

    def _attribute(
        self, data: bytes, at: int, now: float, late: float, cpu: list[int], loop_cpu: int
    ) -> None:
        """Record what the machine and bbr's threads did while sample `at` waited."""
        sent, _, run, queued, *rest = self.record.unpack_from(data, at)
        steal, runnable, threads = rest[: self.ncpu], rest[self.ncpu], rest[self.ncpu + 1 :]
        _, end_queued = _schedstat(self.files[0])
        steal = [b - a for a, b in zip(steal, _steal(self.files[1], self.ncpu), strict=True)]
        # The loop: asleep when the writer read it (waiting for the pipe or the GIL), its
        # figures then were exact. Runnable, its run-queue delay is added only when it
        # next runs, so some may precede `sent`, by at most the time since the last
        # sample; so may some of its CPU: that is taken off both.
        before = max(0.0, sent - self.last)
        if runnable:
            loop_run = max(0.0, (loop_cpu - self.loop_cpu) / 1e9 - before)
            loop_rq = max(0.0, (end_queued - queued) / 1e9 - before)
        else:
            loop_run = (loop_cpu - run) / 1e9
            loop_rq = (end_queued - queued) / 1e9
        # bbr's threads: a thread's schedstat run time is exact while it sleeps and lags
        # by up to a scheduler tick (4 ms) while it runs, so the CPU from the writer's
        # reading to its clock now is at least what it used while the sample waited; so
        # is its CPU since the last sample, which began `before` ahead of `sent`: the
        # smaller of the two. A thread's run-queue delay over the wait (a GIL holder
        # kept off the CPU) is added when it next runs: a rough figure.
        used: dict[str, float] = {}
        queued_ms = 0.0
        for k, name in enumerate(self.names):
            ns = min(cpu[k] - threads[2 * k], cpu[k] - self.cpu[k])
            if ns > 20_000:
                used[name] = used.get(name, 0.0) + ns / 1e6
            queued_ms += max(0, _schedstat(self.files[2 + k])[1] - threads[2 * k + 1]) / 1e6
        entry: dict[str, Any] = {
            "lag_ms": round(late * 1e3, 3),
            "loop_rq_ms": round(loop_rq * 1e3, 3),
            "loop_cpu_ms": round(loop_run * 1e3, 3),
            "writer_ms": None,
            "bbr_cpu_ms": round(min(late * 1e3, sum(used.values())), 3),
            "cpu_ms": {name: round(ms, 3) for name, ms in used.items()},
            "bbr_rq_ms": round(queued_ms, 3),
            "before_ms": round(before * 1e3, 3),
            "steal_ticks": steal,
            "loop_was_runnable": bool(runnable),
            "gc": _collections_since(sent),
        }
        if self.stalls and late > self.stalls:
            entry.update(_stacks())
        self.late.append(entry)

    def _cpu(self) -> list[int]:
        out = []
        for clock in self.clocks:
            try:
                out.append(time.clock_gettime_ns(clock))
            except OSError:  # the thread ended
                out.append(0)
        return out

    def stop(self) -> dict[str, Any]:
        assert self.writer is not None
        writer_ns = _schedstat(self.writer_stat)[0]
        os.close(self.writer_stat)
        self.writer.kill()
        self.writer.wait()
        self.loop.remove_reader(self.fd)
        os.close(self.fd)
        stats = lag_stats(self.samples)
        pauses, _GC_PAUSES[:] = list(_GC_PAUSES), []
        for generation in (0, 1, 2):
            durations = [d for g, d, _ in pauses if g == generation]
            stats[f"gc{generation}_max_ms"] = round(max(durations, default=0) * 1000, 3)
        for entry in self.late:
            entry["cause"] = attribute(
                entry["lag_ms"],
                entry["loop_rq_ms"],
                entry["loop_cpu_ms"],
                entry["writer_ms"] or 0.0,
                entry["bbr_cpu_ms"],
            )
        over = [e for e in self.late if e["lag_ms"] > LATE * 1e3]
        bbr = [e["lag_ms"] for e in over if e["cause"] == "bbr"]
        stats["bbr_max_ms"] = max(bbr, default=0.0)
        stats["late_bbr"] = len(bbr)
        stats["late_machine"] = len(over) - len(bbr)
        stats["attribution_cost_us"] = {
            "loop_per_read": round(self.cost_ns / max(1, self.reads) / 1e3, 2),
            "loop_per_late_read_max": round(max(self.late_cost_ns, default=0) / 1e3, 1),
            "writer_cpu_per_sample": round(
                (writer_ns - self.writer_base)
                / max(1, len(self.samples) - self.writer_samples)
                / 1e3,
                1,
            ),
            "loop_per_late_read_mean": round(
                sum(self.late_cost_ns) / max(1, len(self.late_cost_ns)) / 1e3, 1
            ),
        }
        stats["late"] = sorted(self.late, key=lambda s: -s["lag_ms"])[:40]
        return stats


_SENT = struct.Struct("d")
_libc = ctypes.PyDLL(None)  # its calls keep the GIL: a late sample's reads cannot lose it
_libc.pread.restype = ctypes.c_ssize_t
_libc.pread.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_long]
_BUFFER = ctypes.create_string_buffer(4096)


def _pread(fd: int) -> bytes:
    n = _libc.pread(fd, _BUFFER, len(_BUFFER), 0)
    return _BUFFER.raw[: max(0, n)]


def _schedstat(fd: int) -> tuple[int, int]:
    """(run ns, run-queue ns) of a thread's schedstat."""
    run, queued, _ = _pread(fd).split()
    return int(run), int(queued)


def _steal(fd: int, ncpu: int) -> list[int]:
    """Each CPU's steal time so far, in USER_HZ ticks (1/100 s)."""
    lines = _pread(fd).split(b"\n")[1 : 1 + ncpu]
    return [int(line.split()[8]) for line in lines]


def _stacks(depth: int = 5) -> dict[str, str]:
    """The innermost frames of each thread but this one: `function file:line` each."""
    names = {t.ident: t.name for t in threading.enumerate()}
    me = threading.get_ident()
    out = {}
    for ident, frame in sys._current_frames().items():
        if ident == me:
            continue
        where: list[str] = []
        at: Any = frame
        while at is not None and len(where) < depth:
            code = at.f_code
            where.append(f"{code.co_name} {Path(code.co_filename).name}:{at.f_lineno}")
            at = at.f_back
        out[names.get(ident, str(ident))] = " < ".join(where)
    return out


# (generation, seconds, monotonic end) of each collection
_GC_PAUSES: list[tuple[int, float, float]] = []
_gc_started = [0.0]


def _collections_since(moment: float) -> list[str]:
    """The GC collections that ended after `moment` (the newest are last: look back
    only that far; a burst runs thousands)."""
    out = []
    for generation, seconds, end in reversed(_GC_PAUSES):
        if end < moment:
            break
        out.append(f"gen{generation} {seconds * 1e3:.3f} ms")
    return out[::-1]


def _gc_callback(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_started[0] = time.perf_counter()
    else:
        _GC_PAUSES.append(
            (info["generation"], time.perf_counter() - _gc_started[0], time.monotonic())
        )


_WRITER = """
import os, struct, sys, time
fd, tick, ncpu, loop = int(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
sched = os.open(loop + "/schedstat", os.O_RDONLY)
state = os.open(loop + "/stat", os.O_RDONLY)
stat = os.open("/proc/stat", os.O_RDONLY)
def opened(path):
    try:
        return os.open(path, os.O_RDONLY)
    except OSError:  # the thread ended
        return -1
threads = [opened(path) for path in sys.argv[5:]]
record = struct.Struct(f"ddqq{ncpu}qq{2 * len(threads)}q")
values = [0] * (2 * len(threads))
wrote = 0.0
while True:
    for k, f in enumerate(threads):
        try:
            values[2 * k : 2 * k + 2] = map(int, os.pread(f, 128, 0).split()[:2])
        except OSError:  # the thread ended
            pass
    run, queued, _ = os.pread(sched, 128, 0).split()
    lines = os.pread(stat, 4096, 0).split(b"\\n")[1 : 1 + ncpu]
    steal = [int(line.split()[8]) for line in lines]
    runnable = os.pread(state, 512, 0).rpartition(b")")[2].split()[0] == b"R"
    sent = time.monotonic()
    os.write(fd, record.pack(sent, wrote, int(run), int(queued), *steal, runnable, *values))
    wrote = time.monotonic() - sent
    time.sleep(tick)
"""


def lag_stats(samples: Sequence[float]) -> dict[str, Any]:
    if not samples:
        return {"samples": 0}
    ordered = sorted(samples)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 3)

    return {
        "samples": len(ordered),
        "p50_ms": at(0.5),
        "p99_ms": at(0.99),
        "p999_ms": at(0.999),
        "max_ms": round(ordered[-1] * 1000, 3),
        "over_1ms": sum(1 for s in ordered if s > 0.001),
    }


def thread_cpu() -> dict[str, float]:
    """CPU seconds so far of each thread of this process, by thread name (the watch
    streams summed as `watch`), from /proc (clock ticks: 10 ms granularity)."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        name = names.get(int(tid), "other")
        if name.startswith("bbr-kube-") and name not in ("bbr-kube-map", "bbr-kube-events"):
            name = "watch"
        elif name == "MainThread":
            name = "loop"
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return out


def realtime() -> bool:
    """Run this process (and the threads and children it starts) under SCHED_FIFO, so
    that the other processes of a busy machine cannot preempt it: what the loop then
    still waits for is bbr's own threads holding the GIL. Needs root (CAP_SYS_NICE);
    Linux keeps 5 % of each second for everything else (sched_rt_runtime_us)."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(RT_PRIORITY))
    except (OSError, AttributeError):
        return False
    return True


def probe(
    kubeconfig: str, log_path: str, rt: bool, stalls: float = 0.0, switch: float = 0.0
) -> int:
    """The map side of `bbr serve --kubernetes --namespace '*'`, driven over stdin."""
    os.environ["KUBECONFIG"] = kubeconfig
    rt = rt and realtime()
    if switch:  # an experiment (--switch-interval): bbr's constant, replaced
        from bbr.sources import kubernetes

        kubernetes.SWITCH_INTERVAL = switch  # type: ignore[attr-defined]  # imported by name
    from bbr import logs
    from bbr.config import Config
    from bbr.modelmap import MapHolder
    from bbr.server import build_sources

    log_file = open(log_path, "a")  # noqa: SIM115 - lives as long as the probe
    logs.configure("info", "json", stream=log_file)
    holder = MapHolder()
    sources = build_sources(Config(kubernetes=True, namespaces=["*"]), holder)
    gc.callbacks.append(_gc_callback)

    async def run() -> None:
        loop = asyncio.get_running_loop()

        def reply(message: dict[str, Any]) -> None:
            sys.stdout.write(json.dumps(message) + "\n")
            sys.stdout.flush()

        tracker = _Tracker(loop, reply)
        holder.subscribe(tracker)
        lag = _Lag(loop, stalls)
        started = time.monotonic()
        for source in sources:
            source.start()
        await loop.run_in_executor(None, holder.loaded.wait, 600)
        reply(
            {
                "ready": round(time.monotonic() - started, 3),
                "names": len(holder.current),
                "rss": common.rss_bytes(os.getpid()),
                "realtime": rt,
            }
        )
        lines: asyncio.Queue[str] = asyncio.Queue()
        pending = [b""]
        stdin = sys.stdin.fileno()

        def readable() -> None:  # raw reads: a buffered readline would strand lines
            data = os.read(stdin, 65536)
            if not data:
                loop.remove_reader(stdin)
                lines.put_nowait("")
                return
            *whole, pending[0] = (pending[0] + data).split(b"\n")
            for line in whole:
                lines.put_nowait(line.decode() + "\n")

        loop.add_reader(stdin, readable)
        while True:
            line = await lines.get()
            if not line:
                return
            command = json.loads(line)
            op, seq = command["op"], command.get("seq")
            if op == "cpu":
                reply(
                    {
                        "seq": seq,
                        "cpu": time.process_time(),
                        "threads": thread_cpu(),
                        "rss": common.rss_bytes(os.getpid()),
                        "names": len(holder.current),
                    }
                )
            elif op == "expect":
                tracker.expect(seq, command["names"])
            elif op == "lag_start":
                lag.start()
                reply({"seq": seq})
            elif op == "lag_stop":
                reply({"seq": seq, "lag": lag.stop()})
            elif op == "quit":
                return

    asyncio.run(run())
    for source in sources:
        source.stop()
    return 0


class Probe:
    """The orchestrator's handle on a probe process."""

    def __init__(
        self, kubeconfig: Path, log_path: Path, rt: bool, stalls: float = 0.0, switch: float = 0.0
    ) -> None:
        argv = ["--probe", str(kubeconfig), str(log_path), *(["--realtime"] if rt else [])]
        argv += ["--stalls", str(stalls)] if stalls else []
        argv += ["--switch-interval", str(switch)] if switch else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.mapscale", *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=common.REPO,
        )
        self._seq = 0
        self._lock = threading.Lock()
        self._replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self.ready: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            message = json.loads(line)
            seq = message.get("seq")
            if seq is None:
                self.ready.put(message)
            else:
                with self._lock:
                    box = self._replies.get(seq)
                if box is not None:
                    box.put(message)
        self.ready.put({"exited": self.proc.wait()})

    def send(self, op: str, **fields: Any) -> queue.Queue[dict[str, Any]]:
        with self._lock:
            self._seq += 1
            seq = self._seq
            box: queue.Queue[dict[str, Any]] = queue.Queue()
            self._replies[seq] = box
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "seq": seq, **fields}) + "\n")
        self.proc.stdin.flush()
        return box

    def call(self, op: str, timeout: float = 60, **fields: Any) -> dict[str, Any]:
        return self.send(op, **fields).get(timeout=timeout)

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        message = self.ready.get(timeout=timeout)
        if "exited" in message:
            raise RuntimeError(f"probe exited {message['exited']} before it was ready")
        return message

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- the editor: ConfigMaps through the API over kept-alive connections ------------------


class Editor:
    """Creates and replaces ConfigMaps with the admin token, one connection per thread."""

    def __init__(self, url: str, token: str, ca_file: Path) -> None:
        self.host, port = url.removeprefix("https://").split(":")
        self.port = int(port)
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.context = ssl.create_default_context(cafile=str(ca_file))
        self.local = threading.local()

    def _conn(self) -> http.client.HTTPSConnection:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = http.client.HTTPSConnection(
                self.host, self.port, context=self.context, timeout=30
            )
            self.local.conn = conn
        return conn

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        for attempt in (1, 2):
            conn = self._conn()
            try:
                payload = json.dumps(body).encode() if body is not None else None
                conn.request(method, path, payload, self.headers)
                response = conn.getresponse()
                return response.status, response.read()
            except (OSError, http.client.HTTPException):
                conn.close()
                self.local.conn = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def put(self, index: int, adapters: Sequence[str], create: bool = False) -> float:
        """Create or replace ConfigMap `index`; the monotonic time the API answered."""
        namespace, name = configmap_name(index)
        body = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": namespace, "labels": {LABEL: "true"}},
            "data": {
                "baseModel": base_of(index),
                "adapters": "".join(f"- {a}\n" for a in adapters),
            },
        }
        path = f"/api/v1/namespaces/{namespace}/configmaps"
        if create:
            status, data = self.call("POST", path, body)
            if status == 409:  # there from an earlier run: make it what it should be
                status, data = self.call("PUT", f"{path}/{name}", body)
        else:
            status, data = self.call("PUT", f"{path}/{name}", body)
        if status >= 300:
            raise RuntimeError(f"{status} for {namespace}/{name}: {data[:300]!r}")
        return time.monotonic()


def configmap_name(index: int) -> tuple[str, str]:
    return f"scale-{index % NAMESPACES}", f"adapters-{index}"


def base_of(index: int) -> str:
    return f"base-{index % BASES}"


def adapters_of(index: int, last: str | None = None) -> list[str]:
    """ConfigMap `index`'s adapters; an edit replaces the last one with `last`."""
    names = [f"a{index}-{j}" for j in range(ADAPTERS)]
    if last is not None:
        names[-1] = last
    return names


def populate(editor: Editor, have: int, want: int) -> None:
    """ConfigMaps [have, want), eight at a time."""
    if want <= have:
        return
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: editor.put(i, adapters_of(i), create=True), range(have, want)))
    print(
        f"  created ConfigMaps {have}..{want - 1} in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )


# --- the measurements -------------------------------------------------------------------


def per_event(editor: Editor, probe: Probe, count: int, configmaps: int) -> dict[str, Any]:
    """`count` edits, one at a time, each waited for; the probe's CPU per edit."""
    latencies = []
    start = probe.call("cpu")
    before = start["cpu"]
    for k in range(count):
        index = (k * 7919) % configmaps  # spread over the map
        name = f"one-{k}"
        waiter = probe.send("expect", names={name: base_of(index)})
        answered = editor.put(index, adapters_of(index, name))
        met = waiter.get(timeout=60)["met_at"]
        latencies.append(max(0.0, met - answered))
        time.sleep(0.02)
    end = probe.call("cpu")
    after = end["cpu"]
    latencies.sort()
    threads = {
        name: round((cpu - start["threads"].get(name, 0.0)) / count * 1000, 3)
        for name, cpu in end["threads"].items()
    }
    bbr = sum(
        ms for name, ms in threads.items() if name != "loop" and not name.startswith("asyncio")
    )
    return {
        "edits": count,
        # bbr's threads only: the watch streams, the map builder, Events, log flushing
        # (the loop here runs the benchmark's own commands)
        "cpu_ms_per_event": round(bbr, 3),
        "process_cpu_ms_per_event": round((after - before) / count * 1000, 3),
        "cpu_ms_per_event_by_thread": threads,
        "in_force_p50_ms": round(statistics.median(latencies) * 1000, 1),
        "in_force_max_ms": round(latencies[-1] * 1000, 1),
    }


def paced(
    editor: Editor, probe: Probe, count: int, seconds: float, configmaps: int, tag: str
) -> dict[str, Any]:
    """`count` edits, one every seconds/count, several in flight; time from the API's
    answer to the last one until every edit is in force."""
    final: dict[int, str] = {}  # in the order of each ConfigMap's last edit
    for k in range(count):
        index = (k * 7919) % configmaps
        final.pop(index, None)
        final[index] = f"{tag}-{k}"
    expected: dict[str, str | None] = {name: base_of(i) for i, name in final.items()}
    waiter = probe.send("expect", names=expected)
    before = probe.call("cpu")["cpu"]
    interval = seconds / count
    answered: list[float] = []
    failed: list[BaseException] = []
    # Edits of one ConfigMap go through one lane, in order, so the last one sent is the
    # one in force; lanes run side by side to keep the pace when the API is slow.
    lanes: list[queue.Queue[tuple[int, int] | None]] = [queue.Queue() for _ in range(LANES)]

    def work(lane: queue.Queue[tuple[int, int] | None]) -> None:
        while (item := lane.get()) is not None:
            k, index = item
            try:
                answered.append(editor.put(index, adapters_of(index, f"{tag}-{k}")))
            except Exception as exc:  # reported after the run
                failed.append(exc)

    workers = [threading.Thread(target=work, args=(lane,), daemon=True) for lane in lanes]
    for worker in workers:
        worker.start()
    started = time.monotonic()
    for k in range(count):
        delay = started + k * interval - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        index = (k * 7919) % configmaps
        lanes[index % LANES].put((k, index))
    for lane in lanes:
        lane.put(None)
    for worker in workers:
        worker.join()
    if failed:
        raise failed[0]
    last = max(answered)
    met = waiter.get(timeout=300)["met_at"]
    after = probe.call("cpu")["cpu"]
    return {
        "edits": count,
        "seconds": round(last - started, 2),
        "lag_s": round(max(0.0, met - last), 3),
        "cpu_s": round(after - before, 2),
    }


def measure(
    editor: Editor, kubeconfig: Path, workdir: Path, names: int, args: argparse.Namespace
) -> dict[str, Any]:
    configmaps = names // ADAPTERS
    probe = Probe(
        kubeconfig, workdir / f"probe-{names}.log", args.realtime, args.stalls, args.switch_interval
    )
    try:
        ready = probe.wait_ready(600)
        print(f"  probe ready: {ready}", file=sys.stderr)
        result: dict[str, Any] = {
            "configmaps": configmaps,
            "names": ready["names"],
            "load_s": ready["ready"],
            "rss_mb": round(ready["rss"] / 2**20, 1),
            "realtime": ready["realtime"],
        }
        result["per_event"] = per_event(editor, probe, args.edits, configmaps)
        print(f"  per event: {result['per_event']}", file=sys.stderr)
        probe.call("lag_start")
        time.sleep(args.idle_seconds)
        result["lag_idle"] = probe.call("lag_stop")["lag"]
        probe.call("lag_start")
        result["events"] = paced(editor, probe, args.edits, args.edits * 0.05, configmaps, "ev")
        result["lag_events"] = probe.call("lag_stop")["lag"]
        print(f"  loop lag idle {_brief(result['lag_idle'])}", file=sys.stderr)
        print(f"  loop lag with events {_brief(result['lag_events'])}", file=sys.stderr)
        probe.call("lag_start")
        result["burst"] = paced(
            editor, probe, args.burst, args.burst_seconds, configmaps, f"burst{names}"
        )
        result["lag_burst"] = probe.call("lag_stop")["lag"]
        print(f"  burst {result['burst']} lag {_brief(result['lag_burst'])}", file=sys.stderr)
        result["rss_end_mb"] = round(probe.call("cpu")["rss"] / 2**20, 1)
        return result
    finally:
        probe.stop()


def _brief(stats: dict[str, Any]) -> dict[str, Any]:
    """Loop-lag figures without the stall records (those are in the JSON)."""
    return {key: value for key, value in stats.items() if key != "late"}


def table(results: dict[str, Any]) -> Iterator[str]:
    yield (
        "| names | ConfigMaps | CPU per event | in force (p50 / max) | loop lag idle "
        "(p99.9 / max) | loop lag, events (p99.9 / max) | loop lag, burst (p99.9 / max) "
        "| burst lag | burst CPU | RSS |"
    )
    yield "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for r in results["sizes"]:
        e, i, v, b = r["per_event"], r["lag_idle"], r["lag_events"], r["lag_burst"]
        yield (
            f"| {r['names']:,} | {r['configmaps']:,} | {e['cpu_ms_per_event']} ms "
            f"| {e['in_force_p50_ms']} / {e['in_force_max_ms']} ms "
            f"| {i['p999_ms']} / {i['max_ms']} ms | {v['p999_ms']} / {v['max_ms']} ms "
            f"| {b['p999_ms']} / {b['max_ms']} ms "
            f"| {r['burst']['lag_s']} s | {r['burst']['cpu_s']} s | {r['rss_end_mb']} MB |"
        )


PHASES = (("idle", "lag_idle"), ("events", "lag_events"), ("burst", "lag_burst"))


def attribution_table(results: dict[str, Any]) -> Iterator[str]:
    """Per size and phase: the loop's longest wait, the longest put down to bbr
    (`attribute`), the waits over 1 ms by cause (one read of the pipe is one wait, however
    many samples it holds), and what the attribution cost."""
    yield (
        "| names | phase | samples | p99 / p99.9 | max | max, bbr's "
        "| waits over 1 ms: bbr / machine | attribution cost: loop per read, writer per sample |"
    )
    yield "|---:|---|---:|---:|---:|---:|---:|---:|"
    for r in results["sizes"]:
        for phase, key in PHASES:
            s = r[key]
            c = s["attribution_cost_us"]
            yield (
                f"| {r['names']:,} | {phase} | {s['samples']:,} "
                f"| {s['p99_ms']} / {s['p999_ms']} ms | {s['max_ms']} ms | {s['bbr_max_ms']} ms "
                f"| {s['late_bbr']} / {s['late_machine']} "
                f"| {c['loop_per_read']} / {c['writer_cpu_per_sample']} µs |"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="500,5000,50000", help="map sizes, in names")
    parser.add_argument("--edits", type=int, default=100, help="single edits per size")
    parser.add_argument("--burst", type=int, default=1000, help="edits in the burst")
    parser.add_argument("--burst-seconds", type=float, default=10.0)
    parser.add_argument("--idle-seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path, default=RESULT, help="where to write results")
    parser.add_argument(
        "--realtime",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the probe under SCHED_FIFO when permitted (default: yes)",
    )
    parser.add_argument(
        "--stalls",
        type=float,
        default=0.0,
        metavar="MS",
        help="diagnosis: also record each loop-lag sample over MS (below 1 ms too) and where "
        "each thread stood then (innermost frames), in the JSON's `late` records, per phase "
        "(every sample over 1 ms is recorded and attributed anyway); off by default",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        default=0.0,
        metavar="MS",
        help="experiment: the probe's GIL switch interval instead of bbr's SWITCH_INTERVAL",
    )
    parser.add_argument("--probe", nargs=2, metavar=("KUBECONFIG", "LOG"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        kubeconfig, log_path = args.probe
        return probe(
            kubeconfig, log_path, args.realtime, args.stalls / 1000, args.switch_interval / 1000
        )

    from harness.apiserver import ADMIN_TOKEN, ApiServer

    sizes = sorted(int(s) for s in args.sizes.split(","))
    results: dict[str, Any] = {"machine_before": common.machine(), "sizes": []}
    if args.switch_interval:
        results["switch_interval_ms"] = args.switch_interval
    with tempfile.TemporaryDirectory(prefix="bbr-mapscale-") as tmp:
        workdir = Path(tmp)
        api = ApiServer(workdir / "kube").start()
        try:
            kubeconfig = api.kubeconfig()
            editor = Editor(api.url, ADMIN_TOKEN, api.dir / "ca.crt")
            for n in range(NAMESPACES):
                editor.call("POST", "/api/v1/namespaces", {"metadata": {"name": f"scale-{n}"}})
            have = 0
            for names in sizes:
                print(f"{names} names:", file=sys.stderr)
                populate(editor, have, names // ADAPTERS)
                have = max(have, names // ADAPTERS)
                results["sizes"].append(measure(editor, kubeconfig, workdir, names, args))
        finally:
            api.stop()
    results["machine_after"] = common.machine()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(table(results)))
    print()
    print("\n".join(attribution_table(results)))
    before, after = results["machine_before"]["loadavg"][0], results["machine_after"]["loadavg"][0]
    print(f"\nload average {before:.1f} before, {after:.1f} after, on {os.cpu_count()} CPUs")
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
