"""HTTP/2 conformance of the ext_proc port: h2spec against a real `bbr serve`.

h2spec (github.com/summerwind/h2spec, built by `make h2spec` into $BBR_TOOLS/bin) runs
its 145 cases (RFC 7540/9113 and HPACK) against the plaintext port and the TLS port
(`--secure-serving`). Every case must pass, except those in EXCUSED, each with the reason
it cannot apply to a gRPC-only server; an excused case that passes fails the test too,
so the table cannot go stale. Afterwards bbr must still route a request on a new
connection: nothing h2spec sent may have hurt it.
"""

from __future__ import annotations

import ssl
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from harness.modelmaps import configmap_yaml, write_model_map
from tests.pki import served_certificate
from tests.support import CHANNEL_OPTIONS, SERVING, BbrProcess, StartBbr, route
from tests.tools import tool

CASES = 145  # h2spec v2.2.1's cases without --strict
CASE_TIMEOUT = 2  # seconds h2spec waits for an expected frame (its -o)
RUN_TIMEOUT = 300

# "package description" -> why the case cannot apply to bbr. Empty: every case passes.
EXCUSED: dict[str, str] = {}


@dataclass(frozen=True)
class Case:
    package: str
    description: str
    outcome: str  # passed, failed, skipped
    detail: str

    @property
    def key(self) -> str:
        return f"{self.package} {self.description}"


def read_report(path: Path) -> list[Case]:
    """The cases of h2spec's JUnit report (-j), in order."""
    cases = []
    for suite in ET.parse(path).getroot():
        for case in suite.iter("testcase"):
            outcome, detail = "passed", ""
            for tag in ("error", "failure", "skipped"):
                found = case.find(tag)
                if found is not None:
                    outcome = "skipped" if tag == "skipped" else "failed"
                    detail = (found.text or found.get("message") or "").strip()
                    break
            cases.append(Case(case.get("package", ""), case.get("classname", ""), outcome, detail))
    return cases


def h2spec_binary() -> Path:
    return Path(tool("h2spec"))


def run_h2spec(port: int, report: Path, *, tls: bool) -> list[Case]:
    argv = [str(h2spec_binary()), "-h", "127.0.0.1", "-p", str(port)]
    argv += ["-o", str(CASE_TIMEOUT), "-j", str(report)]
    if tls:
        argv += ["-t", "-k"]
    # h2spec exits non-zero when a case fails; the report says which.
    done = subprocess.run(argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)
    if not report.exists():
        pytest.fail(f"h2spec wrote no report (exit {done.returncode}):\n{done.stdout[-3000:]}")
    return read_report(report)


def served_root(port: int) -> bytes:
    """The self-signed certificate the TLS port shows, as a PEM trust root."""
    return ssl.DER_cert_to_PEM_cert(served_certificate(port)).encode()


def assert_still_routes(bbr: BbrProcess, *, tls: bool) -> None:
    assert bbr.returncode is None, f"bbr exited during h2spec:\n{bbr.stderr_text()[-3000:]}"
    assert "Traceback" not in bbr.stderr_text()
    assert bbr.health() == SERVING
    target = f"127.0.0.1:{bbr.grpc_port}"
    if tls:
        credentials = grpc.ssl_channel_credentials(root_certificates=served_root(bbr.grpc_port))
        channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
    else:
        channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    with channel:
        assert route(channel, "food")["x-gateway-base-model-name"] == "llama"


@pytest.mark.parametrize("tls", [False, True], ids=["plaintext", "tls"])
def test_h2spec_every_case_passes_or_is_excused(
    tls: bool, start_bbr: StartBbr, tmp_path: Path
) -> None:
    h2spec_binary()  # before starting bbr: a missing tool names `make h2spec`
    model_map = write_model_map(
        tmp_path / "model-map.yaml", configmap_yaml("llama", "llama", ["food"])
    )
    bbr = start_bbr(*(["--secure-serving"] if tls else []), model_map=model_map)
    cases = run_h2spec(bbr.grpc_port, tmp_path / "h2spec.xml", tls=tls)

    assert len(cases) == CASES, f"h2spec ran {len(cases)} cases, not {CASES}"
    unexpected = [c for c in cases if c.outcome != "passed" and c.key not in EXCUSED]
    stale = [c.key for c in cases if c.outcome == "passed" and c.key in EXCUSED]
    unknown = set(EXCUSED) - {c.key for c in cases}
    report = "\n".join(f"{c.outcome}: {c.key}\n    {c.detail}" for c in unexpected)
    assert not unexpected, f"{len(unexpected)} of {CASES} h2spec cases did not pass:\n{report}"
    assert not stale, f"excused cases that now pass (drop them from EXCUSED): {stale}"
    assert not unknown, f"EXCUSED names cases h2spec does not have: {unknown}"
    assert_still_routes(bbr, tls=tls)
