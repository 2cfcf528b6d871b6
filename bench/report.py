"""`make bench-report`: the tables and a PNG plot from bench/results/*-latest.json.

python -m bench.report [--loadtest PATH] [--e2e PATH] [--png PATH] [--markdown]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench import bodies, common, e2e, loadtest
from bench.tables import Column, Table

KB = 1024


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _load_note(doc: dict[str, Any]) -> str:
    before = doc.get("machine_before", doc.get("machine", {}))
    after = doc.get("machine_after", before)
    return (
        f"{before.get('cpus')} CPUs; load average (1 min) {before['loadavg'][0]:.1f} before, "
        f"{after['loadavg'][0]:.1f} after; {before.get('time', '')}"
    )


def markdown(table: Table, changed: dict[str, Column]) -> Table:
    """A console table's columns as Markdown, with the columns in `changed` (by title) replaced."""
    return Table(*(changed.get(c.title, c) for c in table.columns), markdown=True)


BODY = Column("body")
LOADTEST = markdown(
    loadtest.TABLE, {"size": BODY, "peak RSS MB": Column("peak RSS MB", spec=".0f")}
)
E2E = markdown(e2e.TABLE, {"size": BODY, "/ceiling": Column("x ceiling", spec=".2f")})
RATIOS = Table(
    Column("÷ go-bbr", left=True),
    Column("body"),
    Column("throughput", spec=".2f"),
    Column("p99", spec=".2f"),
    Column("CPU per request", spec=".2f"),
    markdown=True,
)
MEMORY = Table(
    Column("memory", left=True),
    Column("streams x 1 MiB"),
    Column("baseline MB", spec=".0f"),
    Column("peak MB", spec=".0f"),
    Column("growth / bytes in flight", spec=".2f"),
    Column("after 1 s MB", spec=".0f"),
    Column("after 10 s MB", spec=".0f"),
    markdown=True,
)
MEMORY_KEYS = (
    "server",
    "streams",
    "baseline_rss_mb",
    "peak_rss_mb",
    "growth_per_byte_in_flight",
    "rss_after_1s_mb",
    "rss_after_10s_mb",
)


def loadtest_table(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    lines = [
        f"gRPC (ghz, concurrency {s['concurrency']}, {s['rounds']} alternating rounds of "
        f"{s['duration_s']:.0f} s, medians) — {_load_note(doc)}",
        "",
    ]
    summary = doc["summary"]
    lines += LOADTEST.lines(
        [
            loadtest.table_row(n, size, r)
            for n, sizes in summary.items()
            for size, r in sizes.items()
        ]
    )
    if doc.get("ratios"):
        lines.append("")
        lines += RATIOS.lines(
            [
                (name, size, r["throughput"], r["p99"], r.get("cpu_per_request", float("nan")))
                for name, sizes in doc["ratios"].items()
                for size, r in sizes.items()
            ]
        )
    if doc.get("memory"):
        lines.append("")
        lines += MEMORY.lines([[m[k] for k in MEMORY_KEYS] for m in doc["memory"]])
    return lines


def e2e_table(doc: dict[str, Any]) -> list[str]:
    s = doc["settings"]
    lines = [
        f"Through Envoy (h2load, {s['clients']} connections x {s['streams_per_client']} streams, "
        f"Envoy --concurrency {s['envoy_concurrency']}) — {_load_note(doc)}",
        "",
    ]
    summary = doc["summary"]
    return lines + E2E.lines(
        [e2e.table_row(n, size, r) for n, sizes in summary.items() for size, r in sizes.items()]
    )


def plot(loadtest: dict[str, Any] | None, e2e: dict[str, Any] | None, png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    styles = {
        "bbr": ("tab:blue", "o", "-"),
        "bbr-warning": ("tab:cyan", "o", "--"),
        "bbr-exp": ("tab:green", "o", "-."),
        "grpc-aio": ("tab:olive", "v", "-."),
        "go-bbr": ("tab:red", "s", "-"),
        "ceiling": ("tab:gray", "^", "-"),
    }
    series: list[tuple[str, str, dict[str, dict[str, float]]]] = []
    for name, sizes in (loadtest or {}).get("summary", {}).items():
        label = {
            "bbr-warning": "bbr, --log-level warning",
            "bbr-exp": "bbr, experiment",
            "grpc-aio": "bbr before bbr.h2grpc (grpc.aio)",
        }.get(name, name)
        series.append((f"gRPC: {label}", name, sizes))
    for name, sizes in (e2e or {}).get("summary", {}).items():
        label = "Envoy alone (ceiling)" if name == "ceiling" else f"Envoy + {name}"
        series.append((label, name, sizes))
    for label, key, sizes in series:
        color, marker, line = styles.get(key, ("black", "x", "-"))
        if label.startswith("Envoy"):
            line, marker = ":", {"ceiling": "^"}.get(key, "D")
        xs = [bodies.SIZES[s] / KB for s in sizes]
        left.plot(xs, [r["rps"] for r in sizes.values()], line, marker=marker, color=color,
                  label=label)  # fmt: skip
        right.plot(xs, [r["p99_ms"] for r in sizes.values()], line, marker=marker, color=color,
                   label=label)  # fmt: skip
    for ax, title, unit in ((left, "Throughput", "requests/s"), (right, "p99 latency", "ms")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("request body (KiB)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.set_xticks([1, 100, 1024], ["1 KB", "100 KB", "1 MB"])
        ax.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    doc = loadtest or e2e or {}
    note = _load_note(doc) if doc else ""
    fig.suptitle(f"bbr vs Go BBR v1.5.0 vs Envoy alone ({note})", fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loadtest", type=Path, default=common.RESULTS / "loadtest-latest.json")
    parser.add_argument("--e2e", type=Path, default=common.RESULTS / "e2e-latest.json")
    parser.add_argument("--png", type=Path, default=common.RESULTS / "performance.png")
    args = parser.parse_args(argv)
    loadtest, e2e = _load(args.loadtest), _load(args.e2e)
    if loadtest is None and e2e is None:
        print("no results: run make loadtest and/or make loadtest-e2e", file=sys.stderr)
        return 1
    if loadtest:
        print("\n".join(loadtest_table(loadtest)) + "\n")
    if e2e:
        print("\n".join(e2e_table(e2e)) + "\n")
    if plot(loadtest, e2e, args.png):
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
