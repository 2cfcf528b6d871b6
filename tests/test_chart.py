"""charts/body-based-routing, rendered by the real `helm` (`make helm` installs it).

`helm lint` (plain and `--strict`) and `helm template` for every provider and several value
combinations; the rendered objects are then checked for what an operator would notice: bbr
first in the gateway's filter chain and pointing at the bbr Service's ext_proc port, scoped
to the inference Gateway alone; Envoy sending request headers and body only, in the mode
bbr runs in; ConfigMap-only RBAC; probes on the health port; a locked-down pod; model
ConfigMaps that bbr's own parser accepts; container args that bbr's own CLI accepts.

The renders come from tests/chart.py (plain dicts, one per object), which the
server-side dry run against a real API server reuses.

Not checked here: that the objects are accepted by an API server with the providers' CRDs
(that is the dry run's job), nor what each gateway implementation does with them (Envoy
Gateway: tests/e2e/test_gateway_envoy_gateway.py, through its own translator and a real
Envoy). kgateway's and GKE's objects, which nothing here can run, are checked field by
field: kgateway's against its published Go types, GKE's against the Inference Extension's
own chart for gke (see those tests for what each cannot check).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2

from bbr import modelmap
from bbr.cli import build_parser
from harness.processes import REPO_ROOT
from tests.chart import (
    CHART,
    COMBINATIONS,
    MODELS,
    NAMESPACE,
    PROVIDERS,
    RELEASE,
    SCENARIOS,
    UNSUPPORTED,
    HelmError,
    Manifest,
    helm_binary,
    merge,
    provider_values,
    render,
    run_helm,
    template_text,
)

# protobuf ships no type stubs here; only ParseDict is used.
json_format: Any = importlib.import_module("google.protobuf.json_format")

GATEWAY = "inference-gateway"
BASE_HEADER = "x-gateway-base-model-name"
MANAGED_LABEL = "inference.networking.k8s.io/bbr-managed"


@pytest.fixture(scope="module", autouse=True)
def _render_in_parallel() -> None:
    """Fill render()'s cache for every combination, a few helm processes at a time."""
    helm_binary()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda c: render(provider_values(*c)), COMBINATIONS))


# --- reading rendered objects -------------------------------------------------------------


def of_kind(manifests: Sequence[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def one(manifests: Sequence[Manifest], kind: str) -> Manifest:
    found = of_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(manifests: Sequence[Manifest]) -> dict[str, Any]:
    containers = one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["bbr"]
    result: dict[str, Any] = containers[0]
    return result


def serve_args(manifests: Sequence[Manifest]) -> Any:
    """The container args, parsed by bbr's own CLI parser (the image runs `bbr serve`)."""
    args = container(manifests)["args"]
    assert all(isinstance(a, str) for a in args), args
    parser, _ = build_parser()
    try:
        return parser.parse_args(["serve", *args])
    except SystemExit:
        pytest.fail(f"bbr serve rejects the chart's args: {args}")


def gateway_namespace(values: Mapping[str, Any]) -> str:
    return str(values.get("inferenceGateway", {}).get("namespace") or NAMESPACE)


def gateway_name(values: Mapping[str, Any]) -> str:
    return str(values.get("inferenceGateway", {}).get("name") or GATEWAY)


def service_port(manifests: Sequence[Manifest], port: int) -> dict[str, Any]:
    """The Service port `port`, checked to reach the container's ext_proc port."""
    service = one(manifests, "Service")
    ports = {p["port"]: p for p in service["spec"]["ports"]}
    assert port in ports, f"the bbr Service has no port {port}"
    entry: dict[str, Any] = ports[port]
    named = {p["name"]: p["containerPort"] for p in container(manifests)["ports"]}
    assert named[entry["targetPort"]] == serve_args(manifests).grpc_port
    return entry


def istio_ext_proc_patch(manifests: Sequence[Manifest]) -> dict[str, Any]:
    """The EnvoyFilter patch that adds bbr's ext_proc filter to the gateway's chain."""
    patches = one(manifests, "EnvoyFilter")["spec"]["configPatches"]
    (patch,) = [p for p in patches if p["applyTo"] == "HTTP_FILTER"]
    return dict(patch)


def envoy_modes(provider: str, manifests: Sequence[Manifest]) -> dict[str, str]:
    """The provider objects' processing mode, in Envoy's ProcessingMode terms."""
    if provider == "istio":
        typed = istio_ext_proc_patch(manifests)["patch"]["value"]
        return dict(typed["typed_config"]["processing_mode"])
    if provider == "kgateway":
        policy_mode = one(manifests, "TrafficPolicy")["spec"]["extProc"]["processingMode"]
        extension = one(manifests, "GatewayExtension")["spec"]["extProc"]["processingMode"]
        assert policy_mode == extension
        return {
            "request_header_mode": policy_mode["requestHeaderMode"],
            "response_header_mode": policy_mode["responseHeaderMode"],
            "request_body_mode": policy_mode["requestBodyMode"],
            "response_body_mode": policy_mode["responseBodyMode"],
            "request_trailer_mode": policy_mode["requestTrailerMode"],
            "response_trailer_mode": policy_mode["responseTrailerMode"],
        }
    body = {
        None: "NONE",
        "Buffered": "BUFFERED",
        "Streamed": "STREAMED",
        "FullDuplexStreamed": "FULL_DUPLEX_STREAMED",
    }
    if provider == "envoy-gateway":
        # Envoy Gateway: headers are sent when request/response is present; a
        # FullDuplexStreamed body brings its trailers.
        (ext_proc,) = one(manifests, "EnvoyExtensionPolicy")["spec"]["extProc"]
        mode = ext_proc.get("processingMode", {})
        request, response = mode.get("request"), mode.get("response")
        request_body = body[(request or {}).get("body")]
        response_body = body[(response or {}).get("body")]
        return {
            "request_header_mode": "SEND" if request is not None else "SKIP",
            "response_header_mode": "SEND" if response is not None else "SKIP",
            "request_body_mode": request_body,
            "response_body_mode": response_body,
            "request_trailer_mode": "SEND" if request_body == "FULL_DUPLEX_STREAMED" else "SKIP",
            "response_trailer_mode": "SEND" if response_body == "FULL_DUPLEX_STREAMED" else "SKIP",
        }
    if provider == "gke":
        (chain,) = one(manifests, "GCPRoutingExtension")["spec"]["extensionChains"]
        (extension,) = chain["extensions"]
        events = extension["supportedEvents"]
        streamed = body[extension.get("requestBodySendMode", "Streamed")]
        return {
            "request_header_mode": "SEND" if "RequestHeaders" in events else "SKIP",
            "response_header_mode": "SEND" if "ResponseHeaders" in events else "SKIP",
            "request_body_mode": streamed if "RequestBody" in events else "NONE",
            "response_body_mode": "STREAMED" if "ResponseBody" in events else "NONE",
            "request_trailer_mode": "SEND" if "RequestTrailers" in events else "SKIP",
            "response_trailer_mode": "SEND" if "ResponseTrailers" in events else "SKIP",
        }
    raise AssertionError(f"no ext_proc objects for provider {provider}")


ONLY_REQUEST_BUFFERED = {
    "request_header_mode": "SEND",
    "response_header_mode": "SKIP",
    "request_body_mode": "BUFFERED",
    "response_body_mode": "NONE",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SKIP",
}
ONLY_REQUEST_STREAMED = {
    **ONLY_REQUEST_BUFFERED,
    "request_body_mode": "FULL_DUPLEX_STREAMED",
    "request_trailer_mode": "SEND",
}
PROVIDER_KINDS = {
    "none": set(),
    "istio": {"EnvoyFilter"},
    "gke": {"GCPRoutingExtension", "HealthCheckPolicy"},
    "envoy-gateway": {"EnvoyExtensionPolicy", "ClientTrafficPolicy"},
    "kgateway": {"GatewayExtension", "TrafficPolicy", "ListenerPolicy"},
}
# The catch-all route's direct response (envoy-gateway, kgateway), beside the route in the
# release namespace.
CATCH_ALL_KINDS = {"envoy-gateway": "HTTPRouteFilter", "kgateway": "DirectResponse"}
ALL_PROVIDER_KINDS = (
    set().union(*PROVIDER_KINDS.values())
    | set(CATCH_ALL_KINDS.values())
    | {"DestinationRule", "ReferenceGrant"}
)


# --- lint and the values schema ------------------------------------------------------------


def test_helm_lint_clean() -> None:
    result = run_helm("lint")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("provider", PROVIDERS)
def test_helm_lint_strict_clean(provider: str) -> None:
    result = run_helm("lint", "--strict", "--set", f"provider.name={provider}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"provider": {"name": "nginx"}}, "/provider/name"),
        ({"provider": {"supportedEvents": ["RequestHeaders"]}}, "/provider/supportedEvents"),
        ({"bbr": {"port": 0}}, "/bbr/port"),
        ({"bbr": {"unknownModel": "drop"}}, "/bbr/unknownModel"),
        ({"bbr": {"watchNamespaces": ["Team_A"]}}, "/bbr/watchNamespaces"),
        ({"bbr": {"watchNamespace": ["x"]}}, "watchNamespace"),
        ({"models": [{"adapters": ["a"]}]}, "baseModel"),
        ({"models": [{"name": "Llama", "baseModel": "llama"}]}, "/models/0/name"),
        ({"provider": {"messageTimeout": "10 seconds"}}, "/provider/messageTimeout"),
    ],
)
def test_schema_rejects_bad_values(values: dict[str, Any], complaint: str) -> None:
    with pytest.raises(HelmError) as failure:
        render(values)
    assert complaint in str(failure.value)


def test_duplicate_model_names_fail_with_a_reason() -> None:
    models = [{"baseModel": "Llama 3"}, {"baseModel": "llama-3"}]
    with pytest.raises(HelmError, match=r"models\[1\]: name \"llama-3\" is used twice"):
        render({"models": models})


@pytest.mark.parametrize(("provider", "scenario"), sorted(UNSUPPORTED))
def test_unsupported_combinations_fail_with_a_reason(provider: str, scenario: str) -> None:
    with pytest.raises(HelmError, match=UNSUPPORTED[provider, scenario]):
        render(provider_values(provider, scenario))


def test_http_routes_need_models() -> None:
    with pytest.raises(HelmError, match=r"httpRoute\.enabled needs at least one entry in models"):
        render({"httpRoute": {"enabled": True}})


# --- every provider, every scenario -----------------------------------------------------------


@pytest.mark.parametrize(("provider", "scenario"), COMBINATIONS)
def test_renders_well_formed_objects(provider: str, scenario: str) -> None:
    values = provider_values(provider, scenario)
    manifests = render(values)
    keys = [(m["kind"], m["metadata"].get("namespace"), m["metadata"]["name"]) for m in manifests]
    assert len(keys) == len(set(keys)), "two objects share kind, namespace and name"
    for manifest in manifests:
        assert manifest["apiVersion"] and manifest["kind"]
        if manifest["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            assert manifest["metadata"].get("namespace"), manifest["metadata"]["name"]
        assert manifest["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE

    kinds = {m["kind"] for m in manifests}
    assert {"Deployment", "Service", "ServiceAccount"} <= kinds
    assert kinds & ALL_PROVIDER_KINDS >= PROVIDER_KINDS[provider]
    others = set().union(*(v for k, v in PROVIDER_KINDS.items() if k != provider))
    others |= {v for k, v in CATCH_ALL_KINDS.items() if k != provider}
    assert not kinds & others, f"{provider} renders another provider's objects"


@pytest.mark.parametrize(("provider", "scenario"), [c for c in COMBINATIONS if c[0] != "none"])
def test_ext_proc_points_at_bbr_and_only_the_inference_gateway(
    provider: str, scenario: str
) -> None:
    values = provider_values(provider, scenario)
    manifests = render(values)
    gw_ns, gw_name = gateway_namespace(values), gateway_name(values)
    service_host = f"{one(manifests, 'Service')['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    args = serve_args(manifests)

    attached = [m for m in manifests if m["kind"] in PROVIDER_KINDS[provider]]
    for manifest in attached:
        if manifest["kind"] != "HealthCheckPolicy":
            assert manifest["metadata"]["namespace"] == gw_ns, manifest["kind"]

    if provider == "istio":
        envoy_filter = one(manifests, "EnvoyFilter")
        spec = envoy_filter["spec"]
        # Only the inference Gateway's pods, never sidecars or other gateways.
        assert spec["workloadSelector"] == {
            "labels": {"gateway.networking.k8s.io/gateway-name": gw_name}
        }
        assert "targetRefs" not in spec
        patch = istio_ext_proc_patch(manifests)
        assert patch["match"]["context"] == "GATEWAY"
        hcm = patch["match"]["listener"]["filterChain"]["filter"]
        assert hcm == {"name": "envoy.filters.network.http_connection_manager"}
        assert patch["patch"]["operation"] == "INSERT_FIRST"
        value = patch["patch"]["value"]
        assert value["name"].startswith("envoy.filters.http.ext_proc")
        typed = dict(value["typed_config"])
        assert typed.pop("@type").endswith(
            "envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
        )
        # Every field is Envoy's own: parse it with Envoy's protos.
        processor = json_format.ParseDict(typed, ext_proc_pb2.ExternalProcessor())
        assert processor.failure_mode_allow is False
        cluster = processor.grpc_service.envoy_grpc.cluster_name
        assert cluster == f"outbound|{args.grpc_port}||{service_host}"
        service_port(manifests, args.grpc_port)
        return

    target = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gw_name}
    if provider == "envoy-gateway":
        policy = one(manifests, "EnvoyExtensionPolicy")
        assert policy["spec"]["targetRefs"] == [target]
        (ext_proc,) = policy["spec"]["extProc"]
        assert ext_proc["failOpen"] is False
        (ref,) = ext_proc["backendRefs"]
    elif provider == "kgateway":
        extension = one(manifests, "GatewayExtension")
        policy = one(manifests, "TrafficPolicy")
        assert policy["spec"]["targetRefs"] == [target]
        assert policy["spec"]["extProc"]["extensionRef"] == {"name": extension["metadata"]["name"]}
        assert extension["spec"]["extProc"]["failOpen"] is False  # kgateway's default is true
        ref = extension["spec"]["extProc"]["grpcService"]["backendRef"]
    else:
        routing = one(manifests, "GCPRoutingExtension")
        assert routing["spec"]["targetRefs"] == [target]
        (chain,) = routing["spec"]["extensionChains"]
        (extension,) = chain["extensions"]
        assert extension["failOpen"] is False
        ref = extension["backendRef"]
        health = one(manifests, "HealthCheckPolicy")
        assert health["spec"]["targetRef"]["name"] == one(manifests, "Service")["metadata"]["name"]
        grpc_check = health["spec"]["default"]["config"]["grpcHealthCheck"]
        assert grpc_check["port"] == args.grpc_health_port

    assert ref.get("group", "") == "" and ref.get("kind", "Service") == "Service"
    assert ref["name"] == one(manifests, "Service")["metadata"]["name"]
    assert ref.get("namespace", gw_ns) == NAMESPACE
    service_port(manifests, ref["port"])

    grants = of_kind(manifests, "ReferenceGrant")
    if gw_ns == NAMESPACE:
        assert not grants
    else:
        (grant,) = grants
        assert grant["metadata"]["namespace"] == NAMESPACE
        assert grant["spec"]["from"][0]["namespace"] == gw_ns
        assert grant["spec"]["to"] == [{"group": "", "kind": "Service", "name": ref["name"]}]


@pytest.mark.parametrize(("provider", "scenario"), [c for c in COMBINATIONS if c[0] != "none"])
def test_envoy_sends_request_events_in_the_mode_bbr_runs(provider: str, scenario: str) -> None:
    values = provider_values(provider, scenario)
    manifests = render(values)
    modes = envoy_modes(provider, manifests)
    streaming = serve_args(manifests).streaming
    # Envoy's body mode and bbr's --streaming must agree, or no request routes.
    assert (modes["request_body_mode"] == "FULL_DUPLEX_STREAMED") == bool(streaming)
    if "supportedEvents" in values.get("provider", {}):
        return
    assert modes == (ONLY_REQUEST_STREAMED if streaming else ONLY_REQUEST_BUFFERED)


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "none"])
def test_streaming_switches_the_processing_mode(provider: str) -> None:
    buffered = render({"provider": {"name": provider}})
    streamed = render({"provider": {"name": provider}, "bbr": {"streaming": True}})
    assert envoy_modes(provider, streamed) == ONLY_REQUEST_STREAMED
    assert serve_args(streamed).streaming is True
    if provider == "gke":  # Google's load balancers only stream: always on
        assert envoy_modes(provider, buffered) == ONLY_REQUEST_STREAMED
        assert serve_args(buffered).streaming is True
    else:
        assert envoy_modes(provider, buffered) == ONLY_REQUEST_BUFFERED
        assert not serve_args(buffered).streaming


@pytest.mark.parametrize("provider", [p for p in PROVIDERS if p != "none"])
def test_response_events_only_when_asked(provider: str) -> None:
    events = ["RequestHeaders", "RequestBody", "ResponseHeaders", "ResponseBody"]
    manifests = render({"provider": {"name": provider, "supportedEvents": events}})
    modes = envoy_modes(provider, manifests)
    assert modes["response_header_mode"] == "SEND"
    assert modes["response_body_mode"] == "STREAMED"
    headers_only = render(
        {"provider": {"name": provider, "supportedEvents": events[:3]}, "bbr": {"streaming": True}}
    )
    modes = envoy_modes(provider, headers_only)
    assert modes["response_header_mode"] == "SEND"
    assert modes["response_body_mode"] == "NONE"
    # Streaming needs the request trailers, asked for or not.
    assert modes["request_trailer_mode"] == "SEND"


def test_istio_secure_serving_originates_tls_to_bbr() -> None:
    plain = render({"provider": {"name": "istio"}})
    assert not of_kind(plain, "DestinationRule")
    secure = render({"provider": {"name": "istio"}, "bbr": {"secureServing": True}})
    rule = one(secure, "DestinationRule")
    assert (
        rule["spec"]["host"]
        == f"{one(secure, 'Service')['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    )
    (port,) = rule["spec"]["trafficPolicy"]["portLevelSettings"]
    assert port["port"]["number"] == serve_args(secure).grpc_port
    assert port["tls"]["mode"] == "SIMPLE"
    assert serve_args(secure).secure_serving is True


@pytest.mark.parametrize(
    "envoy_filter",
    [
        {"operation": "INSERT_BEFORE", "anchorSubFilter": "envoy.filters.http.router"},
        {"operation": "INSERT_BEFORE", "anchorSubFilter": "envoy.filters.http.ext_proc"},
        {"operation": "INSERT_AFTER", "anchorSubFilter": "istio.stats"},
        {"operation": "INSERT_FIRST", "anchorSubFilter": "envoy.filters.http.cors"},
    ],
)
def test_istio_refuses_anchors_that_can_put_bbr_after_the_picker(
    envoy_filter: dict[str, str],
) -> None:
    values = {"provider": {"name": "istio", "istio": {"envoyFilter": envoy_filter}}}
    with pytest.raises(HelmError) as failure:
        render(values)
    message = str(failure.value)
    assert "provider.istio.envoyFilter" in message
    assert "use operation INSERT_FIRST and no anchor" in message
    assert "InferencePool ext_proc" in message


def test_istio_strips_client_routing_headers_before_any_route_is_chosen() -> None:
    manifests = render({"provider": {"name": "istio"}})
    patches = one(manifests, "EnvoyFilter")["spec"]["configPatches"]
    (early,) = [p for p in patches if p["applyTo"] == "NETWORK_FILTER"]
    assert early["match"]["context"] == "GATEWAY"
    hcm = early["match"]["listener"]["filterChain"]["filter"]
    assert hcm == {"name": "envoy.filters.network.http_connection_manager"}
    assert early["patch"]["operation"] == "MERGE"
    (extension,) = early["patch"]["value"]["typed_config"]["early_header_mutation_extensions"]
    mutations = extension["typed_config"]["mutations"]
    assert {m["remove"] for m in mutations} == {BASE_HEADER, "x-gateway-model-name"}


@pytest.mark.parametrize("domain", ["cluster.local", "corp.example"])
def test_istio_names_bbr_for_filtered_gateway_clusters(domain: str) -> None:
    """PILOT_FILTER_GATEWAY_CLUSTER_CONFIG pushes only referenced clusters: bbr's is named."""
    manifests = render({"provider": {"name": "istio"}, "clusterDomain": domain})
    host = f"{one(manifests, 'Service')['metadata']['name']}.{NAMESPACE}.svc.{domain}"
    envoy_filter = one(manifests, "EnvoyFilter")
    annotations = envoy_filter["metadata"]["annotations"]
    assert annotations["envoyfilter.istio.io/referenced-services"] == f"{NAMESPACE}/{host}"
    cluster = istio_ext_proc_patch(manifests)["patch"]["value"]["typed_config"]["grpc_service"]
    assert (
        cluster["envoy_grpc"]["cluster_name"]
        == f"outbound|{serve_args(manifests).grpc_port}||{host}"
    )


def test_istio_referenced_services_add_to_bbrs_own() -> None:
    picker = "llm/llama-epp.llm.svc.cluster.local"
    manifests = render({"provider": {"name": "istio", "istio": {"referencedServices": [picker]}}})
    annotations = one(manifests, "EnvoyFilter")["metadata"]["annotations"]
    host = f"{one(manifests, 'Service')['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert annotations["envoyfilter.istio.io/referenced-services"] == f"{NAMESPACE}/{host},{picker}"
    with pytest.raises(HelmError) as failure:
        render({"provider": {"name": "istio", "istio": {"referencedServices": ["no-namespace"]}}})
    assert "referencedServices" in str(failure.value)


def test_istio_buffers_what_bbr_accepts_unless_streaming() -> None:
    manifests = render({"provider": {"name": "istio"}, "bbr": {"maxBodyBytes": 1000}})
    patches = one(manifests, "EnvoyFilter")["spec"]["configPatches"]
    (listener,) = [p for p in patches if p["applyTo"] == "LISTENER"]
    assert listener["patch"]["value"] == {"per_connection_buffer_limit_bytes": 1000 + 32768}
    streamed = render({"provider": {"name": "istio"}, "bbr": {"streaming": True}})
    patches = one(streamed, "EnvoyFilter")["spec"]["configPatches"]
    assert not [p for p in patches if p["applyTo"] == "LISTENER"]
    with pytest.raises(HelmError) as failure:
        render({"provider": {"name": "istio"}, "bbr": {"maxBodyBytes": 2**32}})
    assert "per_connection_buffer_limit_bytes" in str(failure.value)


def test_cluster_domain_must_be_a_dns_name() -> None:
    with pytest.raises(HelmError) as failure:
        render({"provider": {"name": "istio"}, "clusterDomain": "svc/evil"})
    assert "clusterDomain" in str(failure.value)


def test_gke_serves_tls_over_http2() -> None:
    manifests = render({"provider": {"name": "gke"}})
    assert serve_args(manifests).secure_serving is True
    grpc = service_port(manifests, 9004)
    assert grpc["appProtocol"] == "HTTP2"


GATEWAY_LIMIT_OBJECT = {
    "envoy-gateway": ("ClientTrafficPolicy", ("connection", "bufferLimit")),
    "kgateway": ("ListenerPolicy", ("default", "perConnectionBufferLimitBytes")),
}
GATEWAY_LIMIT_VALUE = {
    "envoy-gateway": ("envoyGateway", "clientTrafficPolicy", "bufferLimit"),
    "kgateway": ("kgateway", "listenerPolicy", "perConnectionBufferLimitBytes"),
}


def gateway_buffer_limit(provider: str, manifests: Sequence[Manifest]) -> int | None:
    """The gateway's per-connection buffer limit the provider objects set, in bytes."""
    kind, path = GATEWAY_LIMIT_OBJECT[provider]
    node: Any = one(manifests, kind)["spec"]
    for key in path:
        if key not in node:
            return None
        node = node[key]
    return int(node)


def limit_values(provider: str, value: Any, **bbr: Any) -> dict[str, Any]:
    first, second, third = GATEWAY_LIMIT_VALUE[provider]
    return {"provider": {"name": provider, first: {second: {third: value}}}, "bbr": bbr}


@pytest.mark.parametrize("provider", sorted(GATEWAY_LIMIT_OBJECT))
def test_gateway_buffer_fits_bbrs_body_limit(provider: str) -> None:
    """BUFFERED bodies: the gateway's buffer defaults to bbr's limit + 32 KiB, so a body just
    over bbr's limit reaches bbr (its 413 JSON) and none is larger than the gRPC message bbr
    accepts (--max-body-bytes + 64 KiB), which would be Envoy's 500."""
    default = render({"provider": {"name": provider}})
    assert gateway_buffer_limit(provider, default) == 16 * 1024 * 1024 + 32768
    raised = render({"provider": {"name": provider}, "bbr": {"maxBodyBytes": 33554432}})
    assert gateway_buffer_limit(provider, raised) == 33554432 + 32768
    by_flag = render({"provider": {"name": provider}, "bbr": {"flags": {"max-body-bytes": 1000}}})
    assert gateway_buffer_limit(provider, by_flag) == 1000 + 32768
    assert serve_args(by_flag).max_body_bytes == 1000
    # Streaming: Envoy never holds the whole body; the gateway's own default stays.
    streamed = render({"provider": {"name": provider}, "bbr": {"streaming": True}})
    assert gateway_buffer_limit(provider, streamed) is None
    smaller = "8Mi" if provider == "envoy-gateway" else 8 * 1024 * 1024
    assert gateway_buffer_limit(provider, render(limit_values(provider, smaller))) == 8388608


@pytest.mark.parametrize("provider", sorted(GATEWAY_LIMIT_OBJECT))
def test_gateway_buffer_over_bbrs_limit_is_refused(provider: str) -> None:
    """The README's old advice (20Mi with bbr's 16 MiB default) gave Envoy's 500 for an
    18 MB body: the chart now refuses it, naming both values."""
    too_big = "20Mi" if provider == "envoy-gateway" else 20 * 1024 * 1024
    with pytest.raises(HelmError, match=r"larger than bbr's --max-body-bytes \(16777216\)"):
        render(limit_values(provider, too_big))
    fits = render(limit_values(provider, too_big, maxBodyBytes=20 * 1024 * 1024))
    assert gateway_buffer_limit(provider, fits) == 20 * 1024 * 1024


def test_envoy_gateway_buffer_limit_quantities() -> None:
    for quantity, expected in [("16M", 16_000_000), ("1Gi", None), (1048576, 1048576)]:
        values = limit_values("envoy-gateway", quantity, maxBodyBytes=1 << 30)
        if expected is None:
            expected = 1 << 30
        assert gateway_buffer_limit("envoy-gateway", render(values)) == expected
    with pytest.raises(HelmError, match="bufferLimit"):
        render(limit_values("envoy-gateway", "16Ei"))


@pytest.mark.parametrize("provider", sorted(GATEWAY_LIMIT_OBJECT))
def test_client_routing_headers_are_removed_before_routing(provider: str) -> None:
    """A route-level policy replaces the gateway's on its route (Envoy Gateway) and bbr never
    runs there: only headers removed before routing keep a spoof from choosing that route."""
    manifests = render({"provider": {"name": provider}})
    if provider == "envoy-gateway":
        policy = one(manifests, "ClientTrafficPolicy")
        removed = policy["spec"]["headers"]["earlyRequestHeaders"]["remove"]
    else:
        policy = one(manifests, "ListenerPolicy")
        settings = policy["spec"]["default"]["httpSettings"]
        removed = settings["earlyRequestHeaderModifier"]["remove"]
    assert policy["spec"]["targetRefs"] == [
        {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": GATEWAY}
    ]
    assert sorted(removed) == [BASE_HEADER, "x-gateway-model-name"]
    # Opting out leaves no policy, and a limit without its policy is refused.
    first, second, _ = GATEWAY_LIMIT_VALUE[provider]
    off = {"provider": {"name": provider, first: {second: {"enabled": False}}}}
    assert not of_kind(render(off), policy["kind"])
    with pytest.raises(HelmError, match="needs provider"):
        render(merge(off, limit_values(provider, 1024)))


@pytest.mark.parametrize(("provider", "scenario"), COMBINATIONS)
def test_catch_all_route_where_ext_proc_is_enabled_per_route(provider: str, scenario: str) -> None:
    """envoy-gateway and kgateway run bbr only on a route matched before bbr set its header:
    one rule without header matches on the same Gateway and hostnames is that route, and it
    answers what no model route takes with an OpenAI-shaped 404."""
    values = provider_values(provider, scenario)
    manifests = render(values)
    routes = of_kind(manifests, "HTTPRoute")
    catch_all = [r for r in routes if r["metadata"]["name"].endswith("-catch-all")]
    if provider not in CATCH_ALL_KINDS:
        assert not catch_all
        return
    (route,) = catch_all
    (rule,) = route["spec"]["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert "backendRefs" not in rule
    for model_route in routes:
        assert model_route["spec"]["parentRefs"] == route["spec"]["parentRefs"]
        assert model_route["spec"].get("hostnames") == route["spec"].get("hostnames")
    assert route["metadata"]["namespace"] == NAMESPACE
    (ref_filter,) = rule["filters"]
    ref = ref_filter["extensionRef"]
    answer = one(manifests, CATCH_ALL_KINDS[provider])
    assert answer["metadata"]["name"] == ref["name"]
    assert answer["metadata"]["namespace"] == NAMESPACE
    assert ref["kind"] == answer["kind"] and answer["apiVersion"].startswith(ref["group"] + "/")
    if provider == "envoy-gateway":
        direct = answer["spec"]["directResponse"]
        assert (direct["statusCode"], direct["contentType"]) == (404, "application/json")
        body = json.loads(direct["body"]["inline"])
        assert direct["body"]["type"] == "Inline"
    else:
        assert answer["spec"]["status"] == 404
        body = json.loads(answer["spec"]["body"])
    assert body["error"]["code"] == "model_not_found"
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("provider", sorted(CATCH_ALL_KINDS))
def test_catch_all_route_to_a_service_or_off(provider: str) -> None:
    backend = {"catchAllRoute": {"backend": {"name": "fallback-llm", "port": 8080}}}
    manifests = render({"provider": {"name": provider, **backend}})
    (route,) = of_kind(manifests, "HTTPRoute")
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {"group": "", "kind": "Service", "name": "fallback-llm", "port": 8080}
    ]
    assert not of_kind(manifests, CATCH_ALL_KINDS[provider])
    off = render({"provider": {"name": provider, "catchAllRoute": {"enabled": False}}})
    assert not of_kind(off, "HTTPRoute")


@pytest.mark.parametrize(
    ("events", "streaming", "complaint"),
    [
        (
            ["RequestHeaders", "RequestBody", "RequestTrailers"],
            False,
            "sends request trailers only",
        ),
        (
            ["RequestHeaders", "RequestBody", "ResponseTrailers"],
            True,
            "cannot send response trailers",
        ),
    ],
)
def test_envoy_gateway_refuses_trailer_events_it_cannot_send(
    events: list[str], streaming: bool, complaint: str
) -> None:
    values = {
        "provider": {"name": "envoy-gateway", "supportedEvents": events},
        "bbr": {"streaming": streaming},
    }
    with pytest.raises(HelmError, match=complaint):
        render(values)
    # With streaming, request trailers come with the FullDuplexStreamed body.
    values["bbr"] = {"streaming": True}
    values["provider"]["supportedEvents"] = ["RequestHeaders", "RequestBody", "RequestTrailers"]
    assert envoy_modes("envoy-gateway", render(values)) == ONLY_REQUEST_STREAMED


def test_routes_to_services_for_gateways_without_inference_pools() -> None:
    models = [{**MODELS[0], "port": 8080}, MODELS[1]]
    values = {"models": models, "httpRoute": {"enabled": True, "backendKind": "Service"}}
    routes = of_kind(render(values), "HTTPRoute")
    backends = {r["spec"]["rules"][0]["backendRefs"][0]["name"]: r for r in routes}
    (llama,) = backends["vllm-llama3-8b-instruct"]["spec"]["rules"][0]["backendRefs"]
    assert llama == {
        "group": "",
        "kind": "Service",
        "name": "vllm-llama3-8b-instruct",
        "port": 8080,
    }
    (deepseek,) = backends["deepseek"]["spec"]["rules"][0]["backendRefs"]
    assert deepseek["port"] == 8000


# --- gke: against the Inference Extension's own chart ---------------------------------------------


def test_gke_routes_have_no_request_timeout() -> None:
    """The Inference Extension's inferencepool chart leaves timeouts out for gke on purpose."""
    for provider in PROVIDERS:
        values = provider_values(provider, "models-and-routes")
        routes = [
            r for r in of_kind(render(values), "HTTPRoute") if r["spec"]["rules"][0].get("matches")
        ]
        model_rules = [
            r["spec"]["rules"][0]
            for r in routes
            if "headers" in r["spec"]["rules"][0]["matches"][0]
        ]
        assert model_rules
        if provider == "gke":
            assert all("timeouts" not in rule for rule in model_rules)
        else:
            assert all(rule["timeouts"] == {"request": "300s"} for rule in model_rules)


@pytest.mark.parametrize(
    ("timeout", "ok"),
    [
        ("10s", True),
        ("10ms", True),
        ("1s", True),
        ("10000ms", True),
        ("11s", False),
        ("9ms", False),
        ("1m", False),
        ("10001ms", False),
    ],
)
def test_gke_extension_timeout_at_most_10s(timeout: str, ok: bool) -> None:
    values = {"provider": {"name": "gke", "messageTimeout": timeout}}
    if ok:
        (chain,) = one(render(values), "GCPRoutingExtension")["spec"]["extensionChains"]
        assert chain["extensions"][0]["timeout"] == timeout
    else:
        with pytest.raises(HelmError, match="/provider/messageTimeout"):
            render(values)
    # Other gateways take longer timeouts.
    render({"provider": {"name": "envoy-gateway", "messageTimeout": "30s"}})


# --- the bbr Deployment -------------------------------------------------------------------------


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_container_args_are_bbr_flags(scenario: str) -> None:
    values = provider_values("none", scenario)
    manifests = render(values)
    args = serve_args(manifests)
    bbr = values.get("bbr", {})
    assert args.kubernetes is True
    assert args.model_map is None
    assert args.grpc_port == bbr.get("port", 9004)
    assert args.grpc_health_port == bbr.get("healthCheckPort", 9005)
    assert args.metrics_port == bbr.get("metricsPort", 9090)
    assert len({args.grpc_port, args.grpc_health_port, args.metrics_port}) == 3
    assert args.unknown_model == bbr.get("unknownModel", "pass")
    assert args.max_body_bytes == bbr.get("maxBodyBytes", 16 * 1024 * 1024)
    assert args.workers == bbr.get("workers", 1)
    assert args.log_level == bbr.get("logLevel", "info")
    assert args.log_format == bbr.get("logFormat", "json")
    assert bool(args.streaming) == bbr.get("streaming", False)
    assert bool(args.models_endpoint) == bbr.get("modelsEndpoint", False)
    # What `bbr serve` checks after parsing.
    if args.client_ca:
        assert args.secure_serving
    if args.cert_path or args.client_ca:
        mounts = {m["mountPath"] for m in container(manifests)["volumeMounts"]}
        assert "/etc/bbr/tls" in mounts
    env = {e["name"]: e for e in container(manifests)["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_tracing_flag_and_otel_env() -> None:
    """bbr.tracing.enabled adds --tracing and the OTEL_* variables; off, neither."""
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector.observability:4317",
        "OTEL_EXPORTER_OTLP_INSECURE": True,
        "OTEL_TRACES_SAMPLER_ARG": 0.1,
    }
    manifests = render({"bbr": {"tracing": {"enabled": True, "env": otel}}})
    assert serve_args(manifests).tracing is True
    env = {e["name"]: e.get("value") for e in container(manifests)["env"]}
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.observability:4317"
    assert env["OTEL_EXPORTER_OTLP_INSECURE"] == "true"
    assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.1"
    off = render({"bbr": {"tracing": {"enabled": False, "env": otel}}})
    assert not serve_args(off).tracing
    assert not any(e["name"].startswith("OTEL_") for e in container(off)["env"])
    with pytest.raises(HelmError) as failure:
        render({"bbr": {"tracing": {"enabled": True, "env": {"ENDPOINT": "x"}}}})
    assert "'ENDPOINT' does not match" in str(failure.value)


def test_image_reference() -> None:
    default = container(render())
    assert (
        default["image"]
        == f"bbr:{yaml.safe_load((CHART / 'Chart.yaml').read_text())['appVersion']}"
    )
    pinned = container(render(provider_values("none", "everything")))
    assert pinned["image"] == "registry.example/ml/bbr@sha256:" + "ab" * 32
    tagged = container(render({"bbr": {"image": {"registry": "ghcr.io/x/", "tag": "1.2.3"}}}))
    assert tagged["image"] == "ghcr.io/x/bbr:1.2.3"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_probes_on_the_health_port(scenario: str) -> None:
    manifests = render(provider_values("none", scenario))
    bbr = container(manifests)
    health_port = serve_args(manifests).grpc_health_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert bbr[probe]["grpc"] == {"port": health_port}, probe
    assert {"name": "grpc-health", "containerPort": health_port, "protocol": "TCP"} in bbr["ports"]
    service = {p["name"]: p for p in one(manifests, "Service")["spec"]["ports"]}
    assert service["grpc-health"]["port"] == health_port


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_locked_down_pod(scenario: str) -> None:
    manifests = render(provider_values("none", scenario))
    pod = one(manifests, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532  # the image's user
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    bbr = container(manifests)
    context = bbr["securityContext"]
    assert context["readOnlyRootFilesystem"] is True
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in context
    requests = bbr["resources"]["requests"]
    assert requests["cpu"] and requests["memory"] and bbr["resources"]["limits"]["memory"]
    # The read-only root filesystem leaves /tmp to an emptyDir (--workers keeps metrics there).
    tmp = [m for m in bbr["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert tmp and any(v["name"] == tmp[0]["name"] and "emptyDir" in v for v in pod["volumes"])
    assert pod["serviceAccountName"] == one(manifests, "ServiceAccount")["metadata"]["name"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_rbac_configmaps_and_events_in_the_watched_namespaces_only(scenario: str) -> None:
    values = provider_values("none", scenario)
    manifests = render(values)
    args = serve_args(manifests)
    account = one(manifests, "ServiceAccount")["metadata"]["name"]
    roles = of_kind(manifests, "Role") + of_kind(manifests, "ClusterRole")
    bindings = of_kind(manifests, "RoleBinding") + of_kind(manifests, "ClusterRoleBinding")
    assert roles and len(roles) == len(bindings)
    for role in roles:
        assert role["rules"] == [
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch"]},
            # Kubernetes Events on the ConfigMaps (SPEC §5), nothing more.
            {
                "apiGroups": ["", "events.k8s.io"],
                "resources": ["events"],
                "verbs": ["create", "patch"],
            },
        ]
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
        ]
        kind = "ClusterRole" if binding["kind"] == "ClusterRoleBinding" else "Role"
        (role,) = [
            r
            for r in roles
            if r["kind"] == kind
            and r["metadata"]["name"] == binding["roleRef"]["name"]
            and r["metadata"].get("namespace") == binding["metadata"].get("namespace")
        ]
        assert binding["roleRef"]["apiGroup"] == "rbac.authorization.k8s.io"

    wanted = values.get("bbr", {}).get("watchNamespaces") or [NAMESPACE]
    if values.get("bbr", {}).get("multiNamespace"):
        wanted = ["*"]
    assert args.namespace == wanted
    if wanted == ["*"]:
        assert {r["kind"] for r in roles} == {"ClusterRole"}
    else:
        assert {r["kind"] for r in roles} == {"Role"}
        assert sorted(r["metadata"]["namespace"] for r in roles) == sorted(wanted)


def test_watch_everywhere_with_a_star() -> None:
    manifests = render({"bbr": {"watchNamespaces": ["team-a", "*"]}})
    assert serve_args(manifests).namespace == ["*"]
    assert {m["kind"] for m in manifests} >= {"ClusterRole", "ClusterRoleBinding"}
    assert not of_kind(manifests, "Role")


# --- model ConfigMaps and HTTPRoutes -------------------------------------------------------------


def test_model_configmaps_are_valid_bbr_maps() -> None:
    text = template_text({"models": MODELS}, show_only="templates/configmaps.yaml")
    parsed = modelmap.parse_file_text(text, path="chart")
    assert parsed.errors == []
    got = {c.base_model: list(c.adapters) for c in parsed.configs}
    assert got == {m["baseModel"]: m.get("adapters", []) for m in MODELS}
    assert {c.ref.namespace for c in parsed.configs} == {NAMESPACE}
    for configmap in (doc for doc in yaml.safe_load_all(text) if doc):
        assert configmap["metadata"]["labels"][MANAGED_LABEL] == "true"
        assert all(isinstance(v, str) for v in configmap["data"].values())
    names = sorted(c.ref.name for c in parsed.configs)
    assert names == [
        "body-based-router-deepseek",
        "body-based-router-meta-llama-llama-3-1-8b-instruct",
        "body-based-router-phi",
    ]


def test_no_models_no_configmaps() -> None:
    assert not of_kind(render(), "ConfigMap")


@pytest.mark.parametrize("scenario", ["models-and-routes", "gateway-elsewhere", "everything"])
def test_http_routes_send_each_base_model_to_its_pool(scenario: str) -> None:
    values = provider_values("none", scenario)
    manifests = render(values)
    routes = of_kind(manifests, "HTTPRoute")
    assert len(routes) == len(values["models"])
    parent = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway_name(values)}
    if gateway_namespace(values) != NAMESPACE:
        parent["namespace"] = gateway_namespace(values)
    pools = {}
    for route in routes:
        assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
        assert route["spec"]["parentRefs"] == [parent]
        (rule,) = route["spec"]["rules"]
        (match,) = rule["matches"]
        assert match["path"] == {"type": "PathPrefix", "value": "/"}
        (header,) = match["headers"]
        assert header["type"] == "Exact" and header["name"] == BASE_HEADER
        (backend,) = rule["backendRefs"]
        assert backend["group"] == "inference.networking.k8s.io"
        assert backend["kind"] == "InferencePool"
        pools[header["value"]] = backend["name"]
    assert pools == {
        "meta-llama/Llama-3.1-8B-Instruct": "vllm-llama3-8b-instruct",
        "deepseek/vllm-deepseek-r1": "deepseek",
        "microsoft/Phi-4-mini-instruct": "phi",
    }


def test_no_http_routes_unless_enabled() -> None:
    assert not of_kind(render({"models": MODELS}), "HTTPRoute")


# --- availability and monitoring ----------------------------------------------------------------


def test_pdb_hpa_and_monitoring() -> None:
    defaults = render(provider_values("none", "defaults"))
    pod_labels = one(defaults, "Deployment")["spec"]["template"]["metadata"]["labels"]
    pdb = one(defaults, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert not of_kind(defaults, "HorizontalPodAutoscaler")
    assert not of_kind(defaults, "ServiceMonitor")
    annotations = one(defaults, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(serve_args(defaults).metrics_port)

    everything = render(provider_values("none", "everything"))
    deployment = one(everything, "Deployment")
    assert "replicas" not in deployment["spec"]  # the HPA owns it
    hpa = one(everything, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert one(everything, "PodDisruptionBudget")["spec"] == {
        "minAvailable": 1,
        "selector": pdb["spec"]["selector"],
    }
    monitor = one(everything, "ServiceMonitor")
    service = one(everything, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    (endpoint,) = monitor["spec"]["endpoints"]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports[endpoint["port"]] == serve_args(everything).metrics_port
    assert monitor["metadata"]["labels"]["release"] == "prom"


def test_service_speaks_http2_to_the_gateway() -> None:
    service = one(render(), "Service")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["grpc-health"]["appProtocol"] == "kubernetes.io/h2c"
    assert ports["http-metrics"]["port"] == 9090


# --- NOTES.txt ---------------------------------------------------------------------------------


def render_notes(values: Mapping[str, Any]) -> str:
    """NOTES.txt as `helm install` would print it (helm template skips it, so a copy of the
    chart renders it through tpl)."""
    with tempfile.TemporaryDirectory() as tmp:
        chart = Path(tmp) / "chart"
        shutil.copytree(CHART, chart)
        (chart / "templates" / "NOTES.txt").rename(chart / "notes-under-test.txt")
        (chart / "templates" / "zz-notes.yaml").write_text(
            'notes: {{ tpl (.Files.Get "notes-under-test.txt") . | toJson }}\n'
        )
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
            json.dump(values, handle)
        try:
            result = run_helm(
                "template",
                RELEASE,
                "--namespace",
                NAMESPACE,
                "--values",
                handle.name,
                "--show-only",
                "templates/zz-notes.yaml",
                chart=chart,
            )
        finally:
            os.unlink(handle.name)
    assert result.returncode == 0, result.stderr
    notes: str = yaml.safe_load(result.stdout)["notes"]
    return notes


@pytest.mark.parametrize("provider", PROVIDERS)
def test_notes_say_what_to_do_next(provider: str) -> None:
    notes = render_notes({"provider": {"name": provider}})
    assert f"kubectl -n {NAMESPACE} rollout status deployment/body-based-router" in notes
    assert MANAGED_LABEL in notes and BASE_HEADER in notes
    expected = {
        "none": "nothing attaches bbr to a gateway",
        "istio": "EnvoyFilter",
        "gke": "GCPRoutingExtension",
        "envoy-gateway": "EnvoyExtensionPolicy",
        "kgateway": "TrafficPolicy",
    }[provider]
    assert expected in notes
    assert ("removes client-sent routing headers" in notes) == (provider in CATCH_ALL_KINDS)
    assert ("-catch-all matches every request first" in notes) == (provider in CATCH_ALL_KINDS)


def field_paths(node: Any, prefix: str = "") -> set[str]:
    """Every field path of a YAML object ("spec.a[].b"), list items folded together."""
    paths: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            paths.add(path)
            paths |= field_paths(value, path)
    elif isinstance(node, list):
        for item in node:
            paths |= field_paths(item, prefix + "[]")
    return paths


def inference_extension_chart() -> Path:
    """The Inference Extension's own body-based-routing chart, from the Go module `make crds`
    downloads (sigs.k8s.io/gateway-api-inference-extension, scripts/crds.sh's version)."""
    version = "v1.5.0"
    for line in (REPO_ROOT / "scripts" / "crds.sh").read_text().splitlines():
        if line.startswith("INFERENCE_EXTENSION_VERSION="):
            version = line.split(":-", 1)[1].rstrip('}"')
    cache = subprocess.run(
        ["go", "env", "GOMODCACHE"], capture_output=True, text=True, check=False
    ).stdout.strip() or str(Path.home() / "go" / "pkg" / "mod")
    chart = (
        Path(cache)
        / f"sigs.k8s.io/gateway-api-inference-extension@{version}"
        / "config/charts/body-based-routing"
    )
    if not (chart / "Chart.yaml").is_file():
        pytest.fail(f"the Inference Extension's chart is not at {chart}: run `make crds`")
    return chart


def test_gke_objects_field_by_field_against_the_inference_extensions_chart() -> None:
    """GKE's CRDs ship with GKE only: no API server here serves them. What can be had is the
    Inference Extension's own chart for gke (its GCPRoutingExtension and HealthCheckPolicy,
    rendered by the same helm) and Google's Service Extensions API reference (extension
    `timeout` 10 ms to 10 s, `failOpen`). Every field the chart renders must be one of
    those, with the same values where both set them. Not checked here: that GKE's
    controller accepts them, or what its load balancer does (needs a GKE cluster)."""
    reference_chart = inference_extension_chart()
    result = run_helm(
        "template",
        "bbr",
        "--namespace",
        NAMESPACE,
        "--set",
        "provider.name=gke",
        chart=reference_chart,
    )
    assert result.returncode == 0, result.stderr
    reference = {m["kind"]: m for m in yaml.safe_load_all(result.stdout) if m}
    ours = render({"provider": {"name": "gke"}})
    documented_extras = {"spec.extensionChains[].extensions[].failOpen"}  # Google's API reference
    for kind in ("GCPRoutingExtension", "HealthCheckPolicy"):
        mine, theirs = one(ours, kind), reference[kind]
        assert mine["apiVersion"] == theirs["apiVersion"] == "networking.gke.io/v1"
        unknown = field_paths(mine["spec"], "spec") - field_paths(theirs["spec"], "spec")
        assert unknown <= documented_extras, (kind, unknown)
    (chain,) = one(ours, "GCPRoutingExtension")["spec"]["extensionChains"]
    (their_chain,) = reference["GCPRoutingExtension"]["spec"]["extensionChains"]
    (extension,) = chain["extensions"]
    (their_extension,) = their_chain["extensions"]
    assert extension["supportedEvents"] == their_extension["supportedEvents"]
    assert extension["requestBodySendMode"] == their_extension["requestBodySendMode"]
    for key in ("group", "kind", "port"):
        assert extension["backendRef"][key] == their_extension["backendRef"][key]
    health = one(ours, "HealthCheckPolicy")["spec"]
    assert health["default"] == reference["HealthCheckPolicy"]["spec"]["default"]


# kgateway's API (gateway.kgateway.dev/v1alpha1), as its Go types declare it: read through the
# search tool's read-only lookups of github.com/kgateway-dev/kgateway (api/v1alpha1/kgateway/
# gateway_extensions_types.go @049cb625, ext_proc_types.go @43e35f15, traffic_policy_types.go,
# listener_policy_types.go @028d2df5, direct_response_types.go @3b673ddb) because the Go
# module proxy refuses the module (403), so neither its CRDs nor its translator can run
# here. Path → allowed values (None: any value of the type named in the comment).
_MODES = {"DEFAULT", "SEND", "SKIP"}
_BODY_MODES = {"NONE", "STREAMED", "BUFFERED", "BUFFERED_PARTIAL", "FULL_DUPLEX_STREAMED"}
_PROCESSING_MODE = {
    "requestHeaderMode": _MODES,
    "responseHeaderMode": _MODES,
    "requestBodyMode": _BODY_MODES,
    "responseBodyMode": _BODY_MODES,
    "requestTrailerMode": _MODES,
    "responseTrailerMode": _MODES,
}
_TARGET_REF = {"group": None, "kind": None, "name": None, "sectionName": None}
KGATEWAY_API: dict[str, dict[str, Any]] = {
    "GatewayExtension": {
        # Deprecated in the newest API ("has no effect"), required by older releases.
        "spec.type": {"ExtAuth", "ExtProc", "RateLimit", "JWT", "OAuth2"},
        "spec.extProc": None,
        "spec.extProc.grpcService": None,
        "spec.extProc.grpcService.backendRef": None,  # Gateway API BackendRef
        **{
            f"spec.extProc.grpcService.backendRef.{k}": None
            for k in ("group", "kind", "name", "namespace", "port")
        },
        "spec.extProc.failOpen": {True, False},  # kgateway's default: true
        "spec.extProc.messageTimeout": "duration",
        "spec.extProc.processingMode": None,
        **{f"spec.extProc.processingMode.{k}": v for k, v in _PROCESSING_MODE.items()},
    },
    "TrafficPolicy": {
        "spec.targetRefs": None,
        **{f"spec.targetRefs[].{k}": v for k, v in _TARGET_REF.items()},
        "spec.extProc": None,
        "spec.extProc.extensionRef": None,
        "spec.extProc.extensionRef.name": None,
        "spec.extProc.extensionRef.namespace": None,
        "spec.extProc.processingMode": None,
        **{f"spec.extProc.processingMode.{k}": v for k, v in _PROCESSING_MODE.items()},
    },
    "ListenerPolicy": {
        "spec.targetRefs": None,
        **{f"spec.targetRefs[].{k}": None for k in ("group", "kind", "name")},
        "spec.default": None,
        "spec.default.perConnectionBufferLimitBytes": "int32",
        "spec.default.httpSettings": None,
        # Gateway API HTTPHeaderFilter
        "spec.default.httpSettings.earlyRequestHeaderModifier": None,
        "spec.default.httpSettings.earlyRequestHeaderModifier.remove": None,
    },
    "DirectResponse": {"spec.status": "status", "spec.body": "body"},
}


def _values_at(node: Any, path: list[str]) -> list[Any]:
    if not path:
        return [node]
    key, rest = path[0], path[1:]
    if key.endswith("[]"):
        return [v for item in node.get(key[:-2], []) for v in _values_at(item, rest)]
    return _values_at(node[key], rest) if key in node else []


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_kgateway_objects_field_by_field_against_its_api(scenario: str) -> None:
    """Every field of every kgateway object the chart renders is in kgateway's API
    (KGATEWAY_API above), with a value it allows. Not checked here, because kgateway's
    module cannot be fetched: that its CRDs' CEL rules accept them, and what its translator
    makes of them (the per-route ext_proc, the early header removal) in a real Envoy."""
    manifests = render(provider_values("kgateway", scenario))
    checked = set()
    for manifest in manifests:
        if not manifest["apiVersion"].startswith("gateway.kgateway.dev/"):
            continue
        assert manifest["apiVersion"] == "gateway.kgateway.dev/v1alpha1"
        api = KGATEWAY_API[manifest["kind"]]
        checked.add(manifest["kind"])
        for path in field_paths(manifest["spec"], "spec"):
            assert path in api, (manifest["kind"], path)
            allowed = api[path]
            for value in _values_at(manifest, path.split(".")):
                if isinstance(allowed, set):
                    assert value in allowed, (manifest["kind"], path, value)
                elif allowed == "duration":
                    assert re.fullmatch(r"([0-9]{1,5}(h|m|s|ms)){1,4}", value), value
                elif allowed == "int32":
                    assert isinstance(value, int) and 0 <= value < 2**31, value
                elif allowed == "status":
                    assert isinstance(value, int) and 200 <= value <= 599, value
                elif allowed == "body":
                    assert isinstance(value, str) and 1 <= len(value) <= 4096, value
    assert checked == {"GatewayExtension", "TrafficPolicy", "ListenerPolicy", "DirectResponse"}
    extension = one(manifests, "GatewayExtension")["spec"]["extProc"]
    assert extension["failOpen"] is False  # kgateway's default would let unrouted requests by
