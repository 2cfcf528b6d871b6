"""The rendered chart, accepted by a real API server: server-side dry run (`dryRun=All`).

Every object `helm template` renders for every provider and scenario of tests/chart.py
is POSTed to a real kube-apiserver (harness/apiserver.py) with `dryRun=All` and
`fieldValidation=Strict`, so schema errors, CEL rules of the CRDs, unknown or misspelled
fields and bad enum values fail the test. The API server first gets the CRDs that
`make crds` (scripts/crds.sh) fetched from the providers' Go modules into
$BBR_TOOLS/crds; when they are missing the test fails (not skips) and names `make crds`.
It runs twice: with Gateway API's standard channel and with its experimental channel.

CRD sources (versions pinned in scripts/crds.sh):
    Gateway API          sigs.k8s.io/gateway-api config/crd/{standard,experimental}
    Inference Extension  sigs.k8s.io/gateway-api-inference-extension config/crd/bases
    Istio                istio.io/api kubernetes/customresourcedefinitions.gen.yaml
    Envoy Gateway        github.com/envoyproxy/gateway charts/gateway-helm/charts/crds
    prometheus-operator  github.com/prometheus-operator/prometheus-operator (ServiceMonitor)

Objects not checked (every other object of those renders is):
    kgateway  `gateway.kgateway.dev` GatewayExtension, TrafficPolicy, ListenerPolicy,
              DirectResponse (field by field in tests/test_chart.py): the Go module proxy
              refuses github.com/kgateway-dev/kgateway/v2 (403), so its CRDs cannot be
              fetched the way every other CRD is.
    gke       `networking.gke.io` GCPRoutingExtension, HealthCheckPolicy: GKE installs
              these CRDs itself; they are published in no public module.
`test_only_the_documented_objects_are_unchecked` fails when the chart renders any other
kind the API server does not serve, so this list cannot silently grow.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from bbr.sources.kubeclient import ApiError, KubeClient
from harness.apiserver import TOOLS, ApiServer
from tests.chart import (
    COMBINATIONS,
    NAMESPACE,
    Manifest,
    provider_values,
    render,
    rendered_manifests,
)
from tests.k8s.support import start_api, stop_api

pytestmark = [pytest.mark.k8s, pytest.mark.e2e]

CRDS = TOOLS / "crds"
COMMON_SETS = ("inference-extension", "istio", "envoy-gateway", "prometheus-operator")
CHANNELS = ("standard", "experimental")
# API groups whose CRDs cannot be fetched from a public module; see the docstring.
UNCHECKED: dict[str, str] = {
    "gateway.kgateway.dev": "kgateway CRDs: the Go module proxy refuses kgateway's module",
    "networking.gke.io": "GKE CRDs: installed by GKE itself, in no public module",
}
UNCHECKED_KINDS = {
    ("gateway.kgateway.dev", "GatewayExtension"),
    ("gateway.kgateway.dev", "TrafficPolicy"),
    ("gateway.kgateway.dev", "ListenerPolicy"),
    ("gateway.kgateway.dev", "DirectResponse"),
    ("networking.gke.io", "GCPRoutingExtension"),
    ("networking.gke.io", "HealthCheckPolicy"),
}
ESTABLISH_TIMEOUT = 60.0


def crd_files(channel: str) -> list[Path]:
    """The CRD YAML files for a Gateway API channel plus every other provider's."""
    files: list[Path] = []
    missing: list[str] = []
    for name in (f"gateway-api-{channel}", *COMMON_SETS):
        found = sorted((CRDS / name).glob("*.yaml"))
        if not found:
            missing.append(str(CRDS / name))
        files += found
    if missing:
        pytest.fail(
            f"CRDs missing ({', '.join(missing)}): run `make crds` (make test runs it) to "
            "fetch them from the providers' Go modules",
            pytrace=False,
        )
    return files


def crds(channel: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in crd_files(channel):
        with path.open() as handle:
            docs += [
                d
                for d in yaml.safe_load_all(handle)
                if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"
            ]
    return docs


def group_of(api_version: str) -> str:
    return api_version.rpartition("/")[0]


@dataclass(frozen=True)
class Resource:
    plural: str
    namespaced: bool


class Cluster:
    """An API server with the CRDs installed, and its discovery: (apiVersion, kind) ->
    REST resource."""

    def __init__(self, api: ApiServer, channel: str) -> None:
        self.api = api
        self.channel = channel
        self.client = KubeClient.from_kubeconfig(str(api.kubeconfig()))
        self.resources: dict[tuple[str, str], Resource] = {}

    def install_crds(self) -> None:
        names = []
        for crd in crds(self.channel):
            crd.pop("status", None)
            self.client.request(
                "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", body=crd
            )
            names.append(crd["metadata"]["name"])
        deadline = time.monotonic() + ESTABLISH_TIMEOUT
        pending = set(names)
        while pending:
            for name in sorted(pending):
                crd = self.client.request(
                    "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
                )
                conditions = crd.get("status", {}).get("conditions", [])
                if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
                    pending.discard(name)
            if pending and time.monotonic() > deadline:
                pytest.fail(f"CRDs not established in {ESTABLISH_TIMEOUT}s: {sorted(pending)}")
            if pending:
                time.sleep(0.2)

    def discover(self, wanted_groups: set[str]) -> None:
        """Map (apiVersion, kind) to resources, waiting for every CRD group to be served."""
        deadline = time.monotonic() + ESTABLISH_TIMEOUT
        while True:
            self.resources.clear()
            versions = ["v1"]
            core = self.client.request("GET", "/api/v1")
            self._add("v1", core)
            groups = self.client.request("GET", "/apis")["groups"]
            served = {g["name"] for g in groups}
            for group in groups:
                for version in group["versions"]:
                    versions.append(version["groupVersion"])
            if wanted_groups <= served:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"API groups not served: {sorted(wanted_groups - served)}")
            time.sleep(0.2)
        for group_version in versions[1:]:
            self._add(group_version, self.client.request("GET", f"/apis/{group_version}"))

    def _add(self, group_version: str, listing: dict[str, Any]) -> None:
        for resource in listing["resources"]:
            if "/" in resource["name"]:
                continue  # subresources
            self.resources[(group_version, resource["kind"])] = Resource(
                resource["name"], resource["namespaced"]
            )

    def collection(self, manifest: Manifest) -> str | None:
        """The REST path to POST `manifest` to (None: the API server does not serve it)."""
        api_version, kind = manifest["apiVersion"], manifest["kind"]
        resource = self.resources.get((api_version, kind))
        if resource is None:
            return None
        prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        if resource.namespaced:
            namespace = manifest["metadata"].get("namespace") or NAMESPACE
            return f"{prefix}/namespaces/{namespace}/{resource.plural}"
        return f"{prefix}/{resource.plural}"

    def create_namespace(self, name: str) -> None:
        try:
            self.client.request("POST", "/api/v1/namespaces", body={"metadata": {"name": name}})
        except ApiError as exc:
            if exc.status != 409:
                raise

    def dry_run(self, manifest: Manifest) -> str | None:
        """POST with dryRun=All; the API server's complaint, or None when it accepts."""
        path = self.collection(manifest)
        assert path is not None
        try:
            self.client.request(
                "POST", path, query={"dryRun": "All", "fieldValidation": "Strict"}, body=manifest
            )
        except ApiError as exc:
            return str(exc)
        return None


@pytest.fixture(scope="module")
def renders() -> dict[tuple[str, str], list[Manifest]]:
    """`rendered_manifests()`: every supported provider and scenario (helm's output is
    cached, so it is rendered first a few processes at a time)."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda c: render(provider_values(*c)), COMBINATIONS))
    return {(provider, scenario): objects for provider, scenario, objects in rendered_manifests()}


@pytest.fixture(scope="module", params=CHANNELS)
def cluster(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    renders: dict[tuple[str, str], list[Manifest]],
) -> Iterator[Cluster]:
    channel: str = request.param
    crd_files(channel)  # fail before starting anything
    api = start_api(tmp_path_factory.mktemp(f"kube-dry-run-{channel}"))
    try:
        cluster = Cluster(api, channel)
        cluster.install_crds()
        groups = {c["spec"]["group"] for c in crds(channel)}
        cluster.discover(groups)
        namespaces = {NAMESPACE}
        for manifests in renders.values():
            for manifest in manifests:
                if manifest["kind"] == "Namespace":
                    continue
                namespaces.add(manifest["metadata"].get("namespace") or NAMESPACE)
        for namespace in sorted(namespaces):
            cluster.create_namespace(namespace)
        yield cluster
    finally:
        stop_api(api)


def checked(manifests: list[Manifest]) -> tuple[list[Manifest], list[Manifest]]:
    """(objects to dry-run, objects of the documented unobtainable CRDs)."""
    check: list[Manifest] = []
    skip: list[Manifest] = []
    for manifest in manifests:
        (skip if group_of(manifest["apiVersion"]) in UNCHECKED else check).append(manifest)
    return check, skip


def describe(manifest: Manifest) -> str:
    meta = manifest["metadata"]
    where = f"{meta.get('namespace') or NAMESPACE}/" if "namespace" in meta else ""
    return f"{manifest['apiVersion']} {manifest['kind']} {where}{meta['name']}"


@pytest.mark.parametrize(("provider", "scenario"), COMBINATIONS)
def test_rendered_objects_pass_a_server_side_dry_run(
    cluster: Cluster,
    renders: dict[tuple[str, str], list[Manifest]],
    provider: str,
    scenario: str,
) -> None:
    check, _ = checked(renders[provider, scenario])
    assert check
    not_served = [describe(m) for m in check if cluster.collection(m) is None]
    assert not not_served, (
        f"no CRD serves these objects (Gateway API {cluster.channel}); "
        f"scripts/crds.sh should install them: {not_served}"
    )
    with ThreadPoolExecutor(max_workers=4) as pool:
        answers = list(pool.map(cluster.dry_run, check))
    rejected = [f"{describe(m)}: {a}" for m, a in zip(check, answers, strict=True) if a]
    assert not rejected, "\n".join(rejected)


def test_only_the_documented_objects_are_unchecked(
    cluster: Cluster, renders: dict[tuple[str, str], list[Manifest]]
) -> None:
    unchecked: set[tuple[str, str]] = set()
    for manifests in renders.values():
        _, skip = checked(manifests)
        unchecked |= {(group_of(m["apiVersion"]), m["kind"]) for m in skip}
    assert unchecked == UNCHECKED_KINDS
    # Nothing installed serves them here (else they would be checked, not skipped).
    served_groups = {group_of(api_version) for api_version, _ in cluster.resources}
    assert not served_groups & set(UNCHECKED)
    for provider, scenario in COMBINATIONS:
        _, skip = checked(renders[provider, scenario])
        assert {m["kind"] for m in skip} <= {k for _, k in UNCHECKED_KINDS}, provider
        assert not skip or provider in ("kgateway", "gke"), (provider, scenario)


def test_a_bad_object_is_rejected(cluster: Cluster) -> None:
    """The dry run has teeth: a misspelled field and a CEL/schema violation fail it."""
    route = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "bad", "namespace": NAMESPACE},
        "spec": {"parentRefs": [{"name": "gw"}], "rules": [{"matchez": []}]},
    }
    assert "matchez" in (cluster.dry_run(route) or "")
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": "bad", "namespace": NAMESPACE},
        "spec": {"selector": {}, "endpoints": [{"scheme": "gopher"}]},
    }
    assert cluster.dry_run(monitor)
    # And a dry run creates nothing.
    with pytest.raises(ApiError) as caught:
        cluster.client.request(
            "GET", f"/apis/gateway.networking.k8s.io/v1/namespaces/{NAMESPACE}/httproutes/bad"
        )
    assert caught.value.status == 404


def test_crd_sources_are_recorded() -> None:
    """`make crds` says where each CRD set came from (module@version and paths)."""
    for name in ("gateway-api-standard", "gateway-api-experimental", *COMMON_SETS):
        source = CRDS / name / ".source"
        if not source.is_file():
            pytest.fail(f"{source} missing: run `make crds`", pytrace=False)
        assert "@v" in source.read_text(), source
    assert os.access(Path(__file__).parents[2] / "scripts" / "crds.sh", os.X_OK)
