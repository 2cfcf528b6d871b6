"""Write a FileDescriptorSet of bbr's gRPC API (ext_proc + health), for ghz and grpcurl.

Generated from the installed bindings (xds-protos, grpcio-health-checking), so it always
matches what bbr serves:  python scripts/gen_protoset.py protos/ext_proc.protoset
"""

from __future__ import annotations

import sys
from pathlib import Path

from envoy.service.ext_proc.v3 import external_processor_pb2
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import FileDescriptor
from grpc_health.v1 import health_pb2


def descriptor_set() -> bytes:
    ordered: list[FileDescriptor] = []
    seen: set[str] = set()

    def visit(file: FileDescriptor) -> None:
        if file.name in seen:
            return
        seen.add(file.name)
        for dependency in file.dependencies:
            visit(dependency)
        ordered.append(file)  # dependencies first, as protoc writes them

    visit(external_processor_pb2.DESCRIPTOR)
    visit(health_pb2.DESCRIPTOR)
    out = descriptor_pb2.FileDescriptorSet()
    for file in ordered:
        proto = out.file.add()
        file.CopyToProto(proto)
    return out.SerializeToString(deterministic=True)


def main() -> int:
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "protos/ext_proc.protoset")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(descriptor_set())
    print(f"wrote {target} ({target.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
