"""Kubernetes Events on model-map ConfigMaps (SPEC §5), against a real kube-apiserver.

Events are looked up the way `kubectl describe configmap` does: by the involved
object's kind, namespace, name and uid.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from bbr.modelmap import ConfigMapRef
from bbr.sources import events as events_module
from bbr.sources.events import CONFLICT, INVALID, VALID, EventRecorder
from harness.apiserver import ApiServer
from tests.k8s.support import DEADLINE, Kube, Watch

pytestmark = [pytest.mark.k8s, pytest.mark.e2e]

Start = Callable[..., Watch]


def described(kube: Kube, namespace: str, name: str) -> list[dict[str, Any]]:
    """The Events `kubectl describe configmap NAME` lists."""
    cm = kube.client.request("GET", f"/api/v1/namespaces/{namespace}/configmaps/{name}")
    selector = ",".join(
        [
            "involvedObject.kind=ConfigMap",
            f"involvedObject.namespace={namespace}",
            f"involvedObject.name={name}",
            f"involvedObject.uid={cm['metadata']['uid']}",
        ]
    )
    answer = kube.client.request(
        "GET", f"/api/v1/namespaces/{namespace}/events", query={"fieldSelector": selector}
    )
    items: list[dict[str, Any]] = answer["items"]
    return sorted(items, key=lambda e: e["metadata"]["creationTimestamp"])


def wait_events(
    kube: Kube,
    namespace: str,
    name: str,
    check: Callable[[list[dict[str, Any]]], bool],
    deadline: float = DEADLINE + 2,
) -> list[dict[str, Any]]:
    end = time.monotonic() + deadline
    while True:
        found = described(kube, namespace, name)
        if check(found):
            return found
        if time.monotonic() > end:
            pytest.fail(f"not within {deadline}s; events are {found}")
        time.sleep(0.05)


BAD_ADAPTERS = '- ok\n- "bad\\tname"'  # YAML's double quotes: a TAB in the name


def reasons(found: list[dict[str, Any]]) -> list[str]:
    return [e["reason"] for e in found]


def test_invalid_then_valid_again(kube: Kube, namespace: str, watch: Start) -> None:
    w = watch([namespace], record_events=True)
    kube.apply(namespace, "m", base="good", adapters=["a"])
    w.wait_for({"good": "good", "a": "good"})
    kube.apply(namespace, "m", data={"baseModel": "good", "adapters": BAD_ADAPTERS})
    found = wait_events(kube, namespace, "m", lambda f: INVALID in reasons(f))
    [invalid] = [e for e in found if e["reason"] == INVALID]
    assert invalid["type"] == "Warning"
    assert "data.adapters[1]" in invalid["message"] and "control character" in invalid["message"]
    assert "last good version" in invalid["message"]
    assert invalid["source"]["component"] == "bbr" and invalid["count"] == 1
    assert w.table() == {"good": "good", "a": "good"}  # the last good version stays
    kube.apply(namespace, "m", base="better")
    found = wait_events(kube, namespace, "m", lambda f: VALID in reasons(f))
    assert [e["type"] for e in found if e["reason"] == VALID] == ["Normal"]
    # Invalid again for the same reason: the first event's count goes up (deduplicated).
    kube.apply(namespace, "m", data={"baseModel": "good", "adapters": BAD_ADAPTERS})
    found = wait_events(
        kube,
        namespace,
        "m",
        lambda f: any(e.get("count") == 2 for e in f if e["reason"] == INVALID),
    )
    assert reasons(found).count(INVALID) == 1
    # A valid edit of a valid ConfigMap records nothing.
    kube.apply(namespace, "m", base="best")
    kube.apply(namespace, "m", base="best", adapters=["z"])
    w.wait_for({"best": "best", "z": "best"})
    w.source.events.flush()  # type: ignore[union-attr]
    # Valid again twice: one Event, counted twice; the plain edit added nothing.
    [valid] = [e for e in described(kube, namespace, "m") if e["reason"] == VALID]
    assert valid["count"] == 2


def test_invalid_from_the_start(kube: Kube, namespace: str, watch: Start) -> None:
    kube.apply(namespace, "fresh", data={"baseModel": ""})
    watch([namespace], record_events=True)
    found = wait_events(kube, namespace, "fresh", lambda f: INVALID in reasons(f))
    assert "data.baseModel: empty name" in found[0]["message"]


def test_conflict_names_the_winner(kube: Kube, namespace: str, watch: Start) -> None:
    w = watch([namespace], record_events=True)
    kube.apply(namespace, "z-old", base="base-old", adapters=["shared"])
    time.sleep(1.1)  # creationTimestamp has whole seconds
    kube.apply(namespace, "a-new", base="base-new", adapters=["shared"])
    w.wait(lambda t: t.get("base-new") == "base-new")
    found = wait_events(kube, namespace, "a-new", lambda f: CONFLICT in reasons(f))
    [event] = found
    assert event["type"] == "Warning"
    assert f"ConfigMap {namespace}/z-old" in event["message"] and "'shared'" in event["message"]
    w.source.events.flush()  # type: ignore[union-attr]
    assert described(kube, namespace, "z-old") == []  # the winner gets none


def test_rate_limited_per_object(
    kube: Kube, namespace: str, watch: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events_module, "PER_OBJECT_BURST", 2)
    w = watch([namespace], record_events=True)
    recorder = w.source.events
    assert recorder is not None
    for i in range(6):  # six different reasons: no deduplication to hide behind
        bad_at_i = "".join(f"- ok{j}\n" for j in range(i)) + '- "x\\ty"'  # adapters[i]
        kube.apply(namespace, "flappy", data={"baseModel": "b", "adapters": bad_at_i})
        kube.apply(namespace, "marker", base=f"marker-{i}")  # proves each was processed
        w.wait(lambda t, i=i: f"marker-{i}" in t)
    recorder.flush()
    found = described(kube, namespace, "flappy")
    assert len(found) == 2 and recorder.stats["dropped"] >= 4


def test_without_rbac_for_events_the_map_still_works(
    api: ApiServer, kube: Kube, namespace: str, watch: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """The user `bbr` with list/watch on ConfigMaps only: posting fails, is logged, and
    nothing else changes. Granted the chart's rules, Events appear."""
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    rules: list[dict[str, Any]] = [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list", "watch"]}
    ]
    kube.grant_bbr(namespace, rules)
    w = watch([namespace], kubeconfig=api.kubeconfig("bbr"), record_events=True)
    kube.apply(namespace, "bad", data={"baseModel": "x\ty"})
    kube.apply(namespace, "ok", base="fine")
    w.wait_for({"fine": "fine"})
    recorder = w.source.events
    assert recorder is not None
    recorder.flush()
    assert recorder.stats["failed"] >= 1 and described(kube, namespace, "bad") == []
    assert any("could not post a Kubernetes Event" in r.getMessage() for r in caplog.records)
    # The chart's rule for events (charts/body-based-routing/templates/rbac.yaml).
    rules.append(
        {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]}
    )
    kube.client.request(
        "PUT", f"{rbac}/roles/bbr", body={"metadata": {"name": "bbr"}, "rules": rules}
    )
    time.sleep(0.5)  # RBAC changes apply asynchronously
    kube.apply(namespace, "bad2", data={"baseModel": "y\tz"})
    wait_events(kube, namespace, "bad2", lambda f: INVALID in reasons(f))


class _Stuck:
    """An API that never answers."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        self.calls += 1
        self.release.wait(30)
        return {}


def test_recording_never_blocks() -> None:
    client = _Stuck()
    recorder = EventRecorder(client)
    recorder.start()
    try:
        started = time.monotonic()
        for i in range(5000):
            recorder.invalid(ConfigMapRef("ns", f"cm{i}"), f"uid{i}", "reason")
        assert time.monotonic() - started < 2.0  # nothing waited for the API
        # The process-wide bucket let TOTAL_BURST through; the rest were dropped.
        assert recorder.stats["dropped"] >= 5000 - events_module.TOTAL_BURST - 10
    finally:
        client.release.set()
        recorder.stop()
