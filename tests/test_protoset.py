"""protos/ext_proc.protoset must match the installed bindings (ghz and grpcurl use it)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool

from bench import bodies, common
from tests.support import StartBbr

ROOT = Path(__file__).resolve().parent.parent


def test_protoset_is_current_and_complete() -> None:
    spec = importlib.util.spec_from_file_location("gen_protoset", ROOT / "scripts/gen_protoset.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    committed = (ROOT / "protos/ext_proc.protoset").read_bytes()
    assert committed == module.descriptor_set(), "run `make protos` and commit the result"

    files = descriptor_pb2.FileDescriptorSet.FromString(committed)
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)  # fails if any dependency is missing or out of order
    service = pool.FindServiceByName("envoy.service.ext_proc.v3.ExternalProcessor")
    assert service.FindMethodByName("Process").client_streaming
    assert pool.FindServiceByName("grpc.health.v1.Health")


def test_ghz_load_tests_bbr_through_the_committed_protoset(
    start_bbr: StartBbr, simple_map: Path, tmp_path: Path
) -> None:
    """What the README's load-test section does: ghz (a real grpc-go client) calls
    Process with protos/ext_proc.protoset, no reflection; every call is answered and
    routed (counted as such by bbr)."""
    ghz = common.tool("ghz")
    assert ghz is not None, "ghz is a test tool: `make ghz`"
    data = tmp_path / "stream.json"
    body = json.dumps({"model": "food", "messages": [{"role": "user", "content": "hi"}]})
    data.write_text(json.dumps(bodies.ghz_messages(body.encode())))
    bbr = start_bbr(model_map=simple_map)
    argv = common.ghz_argv(ghz, bbr.grpc_port, data, concurrency=5, requests=200)
    report = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    assert common.summarise_ghz(report)["ok"] == 200
    assert bbr.metric("bbr_requests_total", outcome="routed") == 200
