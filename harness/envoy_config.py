"""Envoy bootstrap for the demo and the end-to-end tests.

``render()`` returns an Envoy v3 bootstrap (YAML) with one HTTP listener whose first HTTP
filter is ext_proc pointing at bbr, followed by the router. The route table has one
route per base model, matching the ``x-gateway-base-model-name`` header bbr sets, and a
catch-all that answers 404 in the OpenAI error shape.

Facts this relies on (checked against Envoy 1.40):

- Envoy picks the route from the client's headers, before ext_proc runs; it only
  re-picks when the ext_proc response sets ``clear_route_cache`` (bbr does).
- With ``request_body_mode: BUFFERED`` Envoy buffers the whole request body and itself
  answers 413 when it exceeds the connection's buffer limit, so the listener's
  ``per_connection_buffer_limit_bytes`` must exceed the largest body bbr should see.
- The bbr cluster must speak HTTP/2 (gRPC).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import yaml

BASE_MODEL_HEADER = "x-gateway-base-model-name"
EXT_PROC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
HCM_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
)
ROUTER_TYPE = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
HTTP_OPTIONS_KEY = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
HTTP_OPTIONS_TYPE = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
CONNECTIONS_MONITOR_TYPE = (
    "type.googleapis.com/"
    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig"
)
UPSTREAM_TLS_TYPE = (
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
)
STDOUT_LOG_TYPE = "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"

NO_ROUTE_BODY = json.dumps(
    {
        "error": {
            "message": "no route for this model",
            "type": "invalid_request_error",
            "param": "model",
            "code": "no_route",
        }
    }
)

ACCESS_LOG_FORMAT = (
    "[envoy] %REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% -> %RESPONSE_CODE% "
    "model=%REQ(X-GATEWAY-MODEL-NAME)% base=%REQ(X-GATEWAY-BASE-MODEL-NAME)% "
    "cluster=%UPSTREAM_CLUSTER% flags=%RESPONSE_FLAGS% %DURATION%ms\n"
)


@dataclass(frozen=True)
class BbrTLS:
    """How Envoy talks TLS to bbr (``bbr serve --secure-serving``); file paths Envoy reads.

    ``ca_file``: verify bbr's certificate against this CA bundle (None: no verification,
    for bbr's self-signed certificate). ``cert_file``/``key_file``: Envoy's client
    certificate, for bbr's ``--client-ca`` (mutual TLS). ``sni``: the server name Envoy
    sends, and, when ``ca_file`` is given, the DNS name bbr's certificate must carry.
    """

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    sni: str | None = "localhost"

    def transport_socket(self) -> dict[str, Any]:
        """An ``envoy.transport_sockets.tls`` block for the bbr cluster."""
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("BbrTLS: cert_file and key_file go together")
        # gRPC servers insist on ALPN h2.
        common: dict[str, Any] = {"alpn_protocols": ["h2"]}
        if self.cert_file is not None and self.key_file is not None:
            common["tls_certificates"] = [
                {
                    "certificate_chain": {"filename": self.cert_file},
                    "private_key": {"filename": self.key_file},
                }
            ]
        if self.ca_file is not None:
            validation: dict[str, Any] = {"trusted_ca": {"filename": self.ca_file}}
            if self.sni:
                validation["match_typed_subject_alt_names"] = [
                    {"san_type": "DNS", "matcher": {"exact": self.sni}}
                ]
            common["validation_context"] = validation
        context: dict[str, Any] = {"@type": UPSTREAM_TLS_TYPE, "common_tls_context": common}
        if self.sni:
            context["sni"] = self.sni
        return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def cluster_name(base_model: str) -> str:
    """A cluster name safe for Envoy stats, unique per base model."""
    slug = re.sub(r"[^a-z0-9]+", "_", base_model.lower()).strip("_")[:60] or "model"
    digest = hashlib.sha256(base_model.encode("utf-8")).hexdigest()[:8]
    return f"model_{slug}_{digest}"


def static_cluster(
    name: str, port: int, *, buffer_limit: int, http2: bool = False
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "per_connection_buffer_limit_bytes": buffer_limit,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            HTTP_OPTIONS_KEY: {
                "@type": HTTP_OPTIONS_TYPE,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def render(
    *,
    listen_port: int,
    admin_port: int,
    bbr_port: int,
    routes: dict[str, int],
    streaming: bool = False,
    max_body_bytes: int = 32 * 1024 * 1024,
    access_log: bool = False,
    bbr_tls: BbrTLS | None = None,
) -> str:
    """Return an Envoy v3 bootstrap (YAML) routing on bbr's base-model header.

    ``routes`` maps each base model to the local port of its model server.
    ``streaming`` selects ``FULL_DUPLEX_STREAMED`` (bbr must run with ``--streaming``).
    ``max_body_bytes`` is the largest request body Envoy will buffer for bbr.
    ``access_log`` writes one line per request to Envoy's stdout.
    ``bbr_tls`` makes Envoy talk TLS (or mutual TLS) to bbr; None: plaintext.
    """
    # Room for the body plus headers; Envoy answers 413 itself past this.
    buffer_limit = max_body_bytes + 1024 * 1024

    processing_mode: dict[str, str] = {
        "request_header_mode": "SEND",
        "response_header_mode": "SKIP",
        "request_body_mode": "FULL_DUPLEX_STREAMED" if streaming else "BUFFERED",
        "response_body_mode": "NONE",
        "request_trailer_mode": "SEND" if streaming else "SKIP",
        "response_trailer_mode": "SKIP",
    }
    ext_proc_filter: dict[str, Any] = {
        "name": "envoy.filters.http.ext_proc",
        "typed_config": {
            "@type": EXT_PROC_TYPE,
            "grpc_service": {"envoy_grpc": {"cluster_name": "bbr"}},
            "failure_mode_allow": False,
            "message_timeout": "10s",
            "processing_mode": processing_mode,
        },
    }

    route_entries: list[dict[str, Any]] = [
        {
            "name": cluster_name(base),
            "match": {
                "prefix": "/",
                "headers": [{"name": BASE_MODEL_HEADER, "string_match": {"exact": base}}],
            },
            "route": {"cluster": cluster_name(base), "timeout": "60s"},
        }
        for base in routes
    ]
    route_entries.append(
        {
            "name": "no_route",
            "match": {"prefix": "/"},
            "direct_response": {"status": 404, "body": {"inline_string": NO_ROUTE_BODY}},
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": "application/json"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }
    )

    hcm: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": "bbr_demo",
        "codec_type": "AUTO",
        "route_config": {
            "name": "by_base_model",
            "virtual_hosts": [{"name": "models", "domains": ["*"], "routes": route_entries}],
        },
        "http_filters": [
            ext_proc_filter,
            {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}},
        ],
    }
    if access_log:
        hcm["access_log"] = [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": STDOUT_LOG_TYPE,
                    "log_format": {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}},
                },
            }
        ]

    bbr_cluster = static_cluster("bbr", bbr_port, buffer_limit=buffer_limit, http2=True)
    if bbr_tls is not None:
        bbr_cluster["transport_socket"] = bbr_tls.transport_socket()
    clusters = [bbr_cluster]
    clusters += [
        static_cluster(cluster_name(base), port, buffer_limit=buffer_limit)
        for base, port in routes.items()
    ]

    bootstrap: dict[str, Any] = {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "http",
                    "address": {
                        "socket_address": {"address": "127.0.0.1", "port_value": listen_port}
                    },
                    "per_connection_buffer_limit_bytes": buffer_limit,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
        # A connection cap; without one Envoy warns at start.
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": CONNECTIONS_MONITOR_TYPE,
                        "max_active_downstream_connections": 10000,
                    },
                }
            ]
        },
    }
    return yaml.safe_dump(bootstrap, sort_keys=False, width=1000)
