"""One health status, served on both ports.

The health port is grpcio's own grpc.health.v1 servicer; on the gRPC port,
`bbr.service.HealthCheckCall` answers Check from `Health.status`. Both report the
server as a whole ("") and the ext_proc service, always alike.
"""

from __future__ import annotations

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from bbr.config import StartupError

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
SERVICES = ("", SERVICE_NAME)  # the server as a whole, and ext_proc
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """The status table both ports serve: grpcio's servicer and `status` change together."""

    def __init__(self) -> None:
        self.servicer = HealthServicer()
        self.status: dict[str, int] = {}

    async def set(self, service: str, status: int) -> None:
        self.status[service] = status
        await self.servicer.set(service, status)

    async def set_all(self, status: int) -> None:
        """Every service bbr reports on: SERVING or NOT_SERVING."""
        for service in SERVICES:
            await self.set(service, status)

    def bind(self, port: int) -> grpc.aio.Server:
        """The health port's grpcio server, bound (not started yet)."""
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        try:
            bound = server.add_insecure_port(f"0.0.0.0:{port}")
        except RuntimeError:
            bound = 0
        if bound == 0:
            raise StartupError(f"--grpc-health-port {port}: cannot listen on port {port}")
        return server
