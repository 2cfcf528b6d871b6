"""protos/ext_proc.protoset must match the installed bindings (ghz and grpcurl use it)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool

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
