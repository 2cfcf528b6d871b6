"""The README's demo section works as printed: its curl lines, and its OpenAI SDK and httpx
snippets with the real `openai` package, against `python -m demo` on free ports.

The snippets are parsed out of README.md, so they cannot drift from what is tested; the
only change made to them is the Envoy port (`localhost:8080` -> the free port in use).
"""

from __future__ import annotations

import itertools
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.processes import free_port, port_in_use

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PRINTED_PORT = "localhost:8080"


def demo_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("### What the demo shows")
    end = text.index("\n## ", start)
    return text[start:end]


def fenced(section: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced code block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w*)\n(.*?)```", section, re.S)]


@dataclass
class CurlExample:
    command: str
    expected: list[str]  # the `# …` comment after the command, cut at each "…"


def curl_examples(section: str) -> list[CurlExample]:
    """Each curl command (with its `\\` continuations) and the output comment after it."""
    [shell] = [body for lang, body in fenced(section) if lang == "sh" and "curl" in body]
    examples: list[CurlExample] = []
    lines = shell.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].startswith("curl "):
            i += 1
            continue
        command = lines[i]
        while command.endswith("\\"):
            i += 1
            command = command[:-1] + " " + lines[i].strip()
        i += 1
        expected: list[str] = []
        while i < len(lines) and lines[i].startswith("# "):
            expected += [p.strip() for p in lines[i][2:].split("…") if p.strip()]
            i += 1
        examples.append(CurlExample(command, expected))
    return examples


def python_examples(section: str) -> list[tuple[str, str]]:
    """Each ```python block and the ```text block (its output) right after it."""
    blocks = fenced(section)
    pairs = []
    for (lang, code), (next_lang, output) in itertools.pairwise(blocks):
        if lang == "python":
            assert next_lang == "text", "a README python snippet must show its output"
            pairs.append((code, output))
    return pairs


def test_the_readme_has_what_the_issue_asks_for() -> None:
    """The parsers find the snippets (so the tests below cannot pass on nothing)."""
    section = demo_section()
    curls = curl_examples(section)
    assert len(curls) >= 6 and all(c.expected for c in curls)
    snippets = python_examples(section)
    code = "\n".join(code for code, _ in snippets)
    assert "from openai import OpenAI" in code and "stream=True" in code
    assert "audio.transcriptions.create" in code and "import httpx" in code


@dataclass
class Demo:
    process: subprocess.Popen[str]
    port: int
    ports: list[int]
    output: list[str]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        env.pop(name, None)
    env["NO_PROXY"] = env["no_proxy"] = "localhost,127.0.0.1,::1"
    env.pop("OPENAI_BASE_URL", None)
    env["OPENAI_API_KEY"] = "unused"
    return env


def start_demo(*flags: str) -> Demo:
    ports = [free_port() for _ in range(6)]
    port, admin, model, grpc_port, health, metrics = ports
    command = [
        sys.executable,
        "-m",
        "demo",
        "--port",
        str(port),
        "--admin-port",
        str(admin),
        "--model-port",
        "0",
        "--grpc-port",
        str(grpc_port),
        "--grpc-health-port",
        str(health),
        "--metrics-port",
        str(metrics),
        *flags,
    ]
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    output: list[str] = []
    # Read the pipe's fd itself: a buffered readline() may pull several lines at once and
    # leave them in Python's buffer, where select() does not see them (the test then
    # waited for "Ctrl-C to stop" that was already read).
    fd = process.stdout.fileno()
    selector = selectors.DefaultSelector()
    selector.register(fd, selectors.EVENT_READ)
    pending = b""
    deadline = time.monotonic() + 120  # Envoy and bbr start slowly on a loaded machine
    while time.monotonic() < deadline:
        if not selector.select(timeout=1.0):
            if process.poll() is not None:
                break
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode() + "\n"
            output.append(line)
            if line.startswith("Ctrl-C to stop"):
                model_ports = [
                    int(p) for p in re.findall(r"^\s+pool-\S+\s+:(\d+)", "".join(output), re.M)
                ]
                return Demo(process, port, [p for p in ports if p != model] + model_ports, output)
    output.append(pending.decode(errors="replace"))
    process.kill()
    raise AssertionError("demo did not start:\n" + "".join(output))


def stop_demo(demo: Demo) -> None:
    """A storm of stop signals (the demo once hung on this): exit 0, every port free."""
    pid = demo.process.pid
    storm = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    for i in range(600):
        try:
            os.kill(pid, storm[i % len(storm)])
        except ProcessLookupError:
            break
    try:
        code = demo.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        demo.process.kill()
        raise AssertionError("demo hung on SIGINT/SIGTERM") from None
    rest = demo.process.stdout.read() if demo.process.stdout else ""
    assert code == 0, "".join(demo.output) + rest
    busy = [p for p in demo.ports if port_in_use(p)]
    assert not busy, f"ports still bound after the demo exited: {busy}"


@pytest.fixture(scope="module", params=["buffered", "streaming-reject"])
def demo(request: pytest.FixtureRequest) -> Iterator[Demo]:
    flags = ["--streaming", "--unknown-model", "reject"] if request.param != "buffered" else []
    running = start_demo(*flags)
    try:
        yield running
    finally:
        if running.process.poll() is None:
            stop_demo(running)


def _here(text: str, demo: Demo) -> str:
    return text.replace(PRINTED_PORT, f"localhost:{demo.port}")


def test_readme_curl_lines(demo: Demo) -> None:
    assert shutil.which("curl"), "curl is needed to run the README's curl lines"
    rejecting = "--unknown-model reject" in "".join(demo.output)
    for example in curl_examples(demo_section()):
        result = subprocess.run(
            ["bash", "-c", _here(example.command, demo)],
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        )
        assert result.returncode == 0, (example.command, result.stderr)
        expected = example.expected
        if rejecting and any('"code": "no_route"' in part for part in expected):
            # bbr answers with its own 404 instead of Envoy's catch-all route.
            expected = ['"code":"model_not_found"', "The model 'no-such-model' does not exist"]
        for part in expected:
            assert part in result.stdout, (example.command, part, result.stdout)


def test_readme_sdk_snippets(demo: Demo) -> None:
    for code, output in python_examples(demo_section()):
        result = subprocess.run(
            [sys.executable, "-c", _here(code, demo)],
            capture_output=True,
            text=True,
            timeout=120,
            env=_env(),
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == output.splitlines(), code


def test_demo_stops_cleanly_on_a_signal_storm() -> None:
    stop_demo(start_demo())
