"""Fixtures for the Kubernetes source tests: one real API server per module.

`api` starts etcd + kube-apiserver (harness/apiserver.py) once per module; `kube` is an
admin client; `namespace` a fresh namespace per test; `watch(...)` starts a
KubernetesSource and waits for its first full list. Helpers: tests/k8s/support.py.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from bbr.modelmap import MapHolder
from bbr.sources import LoadReport, report
from bbr.sources.kubeclient import KubeClient
from bbr.sources.kubernetes import KubernetesSource
from harness.apiserver import ApiServer
from tests.k8s.support import STARTED, Kube, Watch, start_api, stop_api


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
        for server in STARTED:
            report.sections.append((f"kube-apiserver log ({server.dir})", server.log_tail("kube")))
    return report


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    server = start_api(tmp_path_factory.mktemp("kube"))
    yield server
    stop_api(server)


@pytest.fixture(scope="module")
def kube(api: ApiServer) -> Kube:
    return Kube(KubeClient.from_kubeconfig(str(api.kubeconfig())))


@pytest.fixture
def namespace(kube: Kube) -> str:
    name = f"t-{uuid.uuid4().hex[:8]}"
    kube.create_namespace(name)
    return name


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

        def on_reload(load: LoadReport) -> None:
            reports.append(load)
            report(load)  # as `bbr serve` does: logged and counted

        source = KubernetesSource(
            holder,
            list(namespaces),
            kubeconfig=str(kubeconfig or api.kubeconfig()),
            on_reload=on_reload,
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
