"""Fixtures for the Kubernetes source tests: one real API server per module.

`api` starts etcd + kube-apiserver (tests/k8s/apiserver.py) once per module; `kube` is an
admin client; `namespace` a fresh namespace per test; `watch(...)` starts a
KubernetesSource and waits for its first full list.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from bbr.modelmap import MANAGED_LABELS, MapHolder
from bbr.sources.files import LoadReport
from bbr.sources.kubernetes import ApiError, KubeClient, KubernetesSource
from harness.apiserver import ApiServer, ToolsMissing

BBR_LABEL, LLMD_LABEL = MANAGED_LABELS
# SPEC §3: an API event is in force within 2 s. Poll with a little slack.
DEADLINE = 2.5


_SERVERS: list[ApiServer] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "k8s: against a real kube-apiserver and etcd")
    # k8s tests are also e2e: `make unit` (-m 'not e2e') does not need the built tools.
    config.addinivalue_line("markers", "e2e: end-to-end against real servers (slower)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed and item.get_closest_marker("k8s"):
        for server in _SERVERS:
            report.sections.append((f"kube-apiserver log ({server.dir})", server.log_tail("kube")))
    return report


def start_api(tmp: Path, **kwargs: Any) -> ApiServer:
    server = ApiServer(tmp, **kwargs)
    try:
        server.start()
        _SERVERS.append(server)
        return server
    except ToolsMissing as exc:
        missing = str(exc)
    except BaseException:
        server.stop()
        raise
    pytest.fail(missing, pytrace=False)  # not skipped: `make test` installs the tools


def stop_api(server: ApiServer) -> None:
    server.stop()
    if server in _SERVERS:
        _SERVERS.remove(server)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = start_api(tmp_path_factory.mktemp("kube"))
    yield server
    stop_api(server)


class Kube:
    """Admin operations through the API, for arranging a test."""

    def __init__(self, client: KubeClient) -> None:
        self.client = client

    def create_namespace(self, name: str) -> None:
        with contextlib.suppress(ApiError):
            self.client.request("POST", "/api/v1/namespaces", body={"metadata": {"name": name}})

    def apply(
        self,
        namespace: str,
        name: str,
        *,
        data: dict[str, Any] | None = None,
        base: str | None = None,
        adapters: Sequence[str] = (),
        labels: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Create the ConfigMap, or replace it (data and labels) if it exists."""
        if data is None:
            data = {"baseModel": base or ""}
            if adapters:
                data["adapters"] = "".join(f"- {a}\n" for a in adapters)
        labels = {BBR_LABEL: "true"} if labels is None else labels
        path = f"/api/v1/namespaces/{namespace}/configmaps"
        try:
            current = self.client.request("GET", f"{path}/{name}")
        except ApiError as exc:
            if exc.status != 404:
                raise
            body = {"metadata": {"name": name, "labels": labels}, "data": data}
            result: dict[str, Any] = self.client.request("POST", path, body=body)
            return result
        current["metadata"]["labels"] = labels
        current["data"] = data
        result = self.client.request("PUT", f"{path}/{name}", body=current)
        return result

    def labels(self, namespace: str, name: str, labels: dict[str, str | None]) -> None:
        self.client.request(
            "PATCH",
            f"/api/v1/namespaces/{namespace}/configmaps/{name}",
            body={"metadata": {"labels": labels}},
            content_type="application/merge-patch+json",
        )

    def delete(self, namespace: str, name: str) -> None:
        self.client.request("DELETE", f"/api/v1/namespaces/{namespace}/configmaps/{name}")


@pytest.fixture(scope="module")
def kube(api: ApiServer) -> Kube:
    return Kube(KubeClient.from_kubeconfig(str(api.kubeconfig())))


@pytest.fixture
def namespace(kube: Kube) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kube.create_namespace(name)
    return name


class Watch:
    def __init__(self, holder: MapHolder, source: KubernetesSource) -> None:
        self.holder = holder
        self.source = source
        self.reports: list[LoadReport] = []

    def table(self) -> dict[str, str]:
        return dict(self.holder.current.items())

    def wait(
        self, check: Callable[[dict[str, str]], bool], deadline: float = DEADLINE
    ) -> dict[str, str]:
        """Poll the map in force until `check` holds; fail after `deadline` seconds."""
        end = time.monotonic() + deadline
        while True:
            table = self.table()
            if check(table):
                return table
            if time.monotonic() > end:
                pytest.fail(f"not within {deadline}s; the map is {table}")
            time.sleep(0.02)

    def wait_for(self, expected: dict[str, str], deadline: float = DEADLINE) -> None:
        self.wait(lambda table: table == expected, deadline)

    def steady(self, expected: dict[str, str], seconds: float = 1.0) -> None:
        """The map is `expected` now and stays so for `seconds`."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            assert self.table() == expected
            time.sleep(0.05)


@pytest.fixture
def watch(api: ApiServer) -> Iterator[Callable[..., Watch]]:
    sources: list[KubernetesSource] = []

    def start(
        namespaces: Sequence[str],
        *,
        kubeconfig: Path | None = None,
        wait_loaded: bool = True,
        **kwargs: Any,
    ) -> Watch:
        holder = MapHolder()
        reports: list[LoadReport] = []
        source = KubernetesSource(
            holder,
            list(namespaces),
            kubeconfig=str(kubeconfig or api.kubeconfig()),
            on_reload=reports.append,
            **kwargs,
        )
        sources.append(source)
        watch = Watch(holder, source)
        watch.reports = reports
        started = time.monotonic()
        source.start()
        if wait_loaded:
            assert holder.loaded.wait(10), "first list not done in 10 s"
            logging.getLogger(__name__).info("loaded in %.2fs", time.monotonic() - started)
        return watch

    yield start
    for source in sources:
        source.stop()
