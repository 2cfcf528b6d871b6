"""Helpers for the Kubernetes tests: the API servers started, an admin client, a watch.

`start_api`/`stop_api` run a real etcd + kube-apiserver (harness/apiserver.py) and keep
`STARTED` for failure reports; `Kube` arranges objects as an admin; `Watch` polls the map
a KubernetesSource keeps; `serve_exits` runs `bbr serve --kubernetes` to its usage
error. tests/k8s/conftest.py holds the fixtures built on these.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from bbr.modelmap import MANAGED_LABELS, MapHolder
from bbr.sources import LoadReport
from bbr.sources.kubeclient import ApiError, KubeClient
from bbr.sources.kubernetes import KubernetesSource
from harness.apiserver import ApiServer, ToolsMissing
from harness.processes import REPO_ROOT, bbr_port_flags, free_ports
from tests.support import last_line

BBR_LABEL, LLMD_LABEL = MANAGED_LABELS
# SPEC §3: an API event is in force within 2 s. Poll with a little slack.
DEADLINE = 2.5

STARTED: list[ApiServer] = []
"""API servers started and not yet stopped (a failed test shows their logs)."""


def start_api(tmp: Path, **kwargs: Any) -> ApiServer:
    server = ApiServer(tmp, **kwargs)
    try:
        server.start()
        STARTED.append(server)
        return server
    except ToolsMissing as exc:
        missing = str(exc)
    except BaseException:
        server.stop()
        raise
    pytest.fail(missing, pytrace=False)  # not skipped: `make test` installs the tools


def stop_api(server: ApiServer) -> None:
    server.stop()
    if server in STARTED:
        STARTED.remove(server)


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

    def grant_bbr(self, namespace: str, rules: list[dict[str, Any]]) -> None:
        """A Role `bbr` with `rules` in `namespace`, bound to the unprivileged user `bbr`."""
        group = "rbac.authorization.k8s.io"
        rbac = f"/apis/{group}/v1/namespaces/{namespace}"
        role = {"metadata": {"name": "bbr"}, "rules": rules}
        self.client.request("POST", f"{rbac}/roles", body=role)
        binding = {
            "metadata": {"name": "bbr"},
            "roleRef": {"apiGroup": group, "kind": "Role", "name": "bbr"},
            "subjects": [{"apiGroup": group, "kind": "User", "name": "bbr"}],
        }
        self.client.request("POST", f"{rbac}/rolebindings", body=binding)


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


def serve_exits(kubeconfig: Path, home: Path) -> subprocess.CompletedProcess[str]:
    """`bbr serve --kubernetes` with KUBECONFIG=`kubeconfig`, outside any pod."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BBR_", "KUBERNETES_"))}
    env |= {"KUBECONFIG": str(kubeconfig), "HOME": str(home), "PYTHONUNBUFFERED": "1"}
    flags = bbr_port_flags(*free_ports(3))
    return subprocess.run(
        [sys.executable, "-m", "bbr", "serve", "--kubernetes", *flags],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_usage_error(result: subprocess.CompletedProcess[str], *words: str) -> None:
    """SPEC §2: exit 2, one line naming the flag, no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for word in ("--kubernetes", *words):
        assert word in last_line(result.stderr), result.stderr
