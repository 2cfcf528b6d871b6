"""bench/'s shared pieces: the README and docs/performance.md quote what they print."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bbr.body import json_model
from bench import bodies, report
from bench.tables import Column, Table

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def test_console_table_header_lines_up_with_its_rows() -> None:
    table = Table(Column("server", 8, left=True), Column("req/s", 7, ".0f"), sep=" ")
    header, row = table.lines([("bbr", 11916.4)])
    assert header == "server     req/s"
    assert row == "bbr        11916"
    with pytest.raises(ValueError, match="3 values for 2 columns"):
        Table(Column("a"), Column("b")).row(1, 2, 3)
    assert len(header) == len(row)


def test_markdown_table_aligns_the_first_column_left_and_figures_right() -> None:
    table = Table(Column("body", left=True), Column("p99 ms", spec=".2f"), markdown=True)
    assert table.lines([("1KB", 7.777)]) == ["| body | p99 ms |", "|---|---:|", "| 1KB | 7.78 |"]


def test_report_prints_the_figures_the_readme_quotes() -> None:
    """`make bench-report` over the stored results gives the README's first table row."""
    doc = json.loads((RESULTS / "loadtest-latest.json").read_text())
    lines = report.loadtest_table(doc)
    assert lines[2].startswith("| server | body | req/s | p50 ms | p90 ms | p99 ms | errors |")
    bbr_1kb = next(line for line in lines if line.startswith("| bbr | 1KB |"))
    readme = (RESULTS.parent.parent / "README.md").read_text()
    rps = bbr_1kb.split(" | ")[2]
    assert f"| 1 KB | {int(rps):,} |" in readme


@pytest.mark.parametrize("size", sorted(bodies.SIZES.values()))
def test_bodies_are_exactly_their_size_with_model_last(size: int) -> None:
    body = bodies.chat_body(size)
    assert len(body) == size
    assert json_model(body) == bodies.MODEL
    assert body.rstrip().endswith(b"}") and body.index(b'"model"') > body.index(b'"messages"')
    messages = bodies.extproc_messages(body, bodies.request_headers([("x-extra", "1")]))
    sent = {h.key: h.raw_value for h in messages[0].request_headers.headers.headers}
    assert sent["x-extra"] == b"1" and sent[":path"] == b"/v1/chat/completions"
    assert messages[1].request_body.body == body and messages[1].request_body.end_of_stream


@pytest.mark.parametrize("mode", ["frames", "bytecodes"])
def test_h2cost_answers_every_call_it_counts(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m bench.h2cost` (docs/performance.md's HTTP/2 cost figures) still drives
    the server in-process and every call it divides by is answered; it broke twice when
    the server grew a per-turn frame budget and read pausing."""
    from bench import h2cost

    assert h2cost.main(["--mode", mode, "--calls", "200", "--batch", "10", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "cached" in out and "decoded" in out, out


def test_instructions_reads_a_callgrind_dump(tmp_path: Path) -> None:
    from bench.instructions import read_dump

    dump = tmp_path / "callgrind.out.1"
    dump.write_text("version: 1\ncreator: callgrind-3.19.0\nevents: Ir D1mr\nsummary: 1200 7\n")
    assert read_dump(dump) == {"Ir": 1200, "D1mr": 7}
    dump.write_text("version: 1\n")
    with pytest.raises(ValueError, match="not a callgrind dump"):
        read_dump(dump)


@pytest.mark.skipif(not shutil.which("valgrind"), reason="valgrind (Debian) not installed")
def test_instructions_counts_a_real_server(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`make bench-instructions` runs bbr under callgrind and counts only the calls ghz
    sent after the warm-up (a 1 KB call is hundreds of thousands of instructions, not the
    hundreds of millions of the interpreter's start-up), and two servers of the same tree
    get the same count: the figure docs/performance.md compares trees with."""
    from bench import common, instructions

    assert common.tool("ghz") is not None, "ghz is a test tool: `make ghz`"
    out = tmp_path / "instructions.json"
    argv = ["--sizes", "1KB", "--requests", "600", "--concurrency", "4", "--output", str(out)]
    argv += ["--experiment", f"again={common.REPO}"]
    assert instructions.main(argv) == 0
    first, again = json.loads(out.read_text())["runs"]
    assert first["ok"] == again["ok"] == 600
    assert 50_000 < first["Ir"] < 5_000_000
    assert abs(again["Ir"] / first["Ir"] - 1) < 0.01
    assert "instructions/request" in capsys.readouterr().out


def test_mapscale_puts_a_late_sample_down_to_bbr_only_when_bbr_ran_through_it() -> None:
    """`make bench-mapscale` attributes each loop-lag sample over 1 ms: the rule that
    docs/performance.md states, on the figures it reads from /proc."""
    from bench.mapscale import attribute

    # bbr's threads on a CPU for all of a 1.8 ms wait, the loop not queued: bbr's
    assert attribute(1.8, loop_rq_ms=0.0, loop_cpu_ms=0.05, writer_ms=0.01, bbr_cpu_ms=1.7) == "bbr"
    # no bbr thread ran: the GIL was free, or held by a thread off the CPU
    assert attribute(3.2, 0.0, 0.05, 0.01, bbr_cpu_ms=0.0) == "machine"
    assert attribute(2.0, 0.0, 0.0, 0.0, bbr_cpu_ms=0.9) == "machine"
    # the loop runnable but not running for 0.9 ms of 1.6: the rest is within 1 ms
    assert attribute(1.6, loop_rq_ms=0.9, loop_cpu_ms=0.0, writer_ms=0.0, bbr_cpu_ms=1.6) == (
        "machine"
    )
    # the writer sent the timestamp 0.5 ms late, the loop's own work 0.2 ms
    assert attribute(1.6, 0.0, loop_cpu_ms=0.2, writer_ms=0.5, bbr_cpu_ms=1.6) == "machine"
    # the same waits, the machine's share smaller: bbr's
    assert attribute(2.6, 0.9, 0.0, 0.0, bbr_cpu_ms=1.0) == "bbr"
    assert attribute(1.0, 0.0, 0.0, 0.0, bbr_cpu_ms=1.0) == "machine"  # not over 1 ms
