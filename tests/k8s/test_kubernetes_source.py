"""`bbr serve --kubernetes` (SPEC §3) against a real kube-apiserver and etcd.

Every edit is made through the API and must be in force within DEADLINE (2 s + slack).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bbr.modelmap import MapHolder, ModelMap
from bbr.sources import kubernetes
from bbr.sources.kubeclient import ApiError, KubeClient, KubeConfigError
from bbr.sources.kubernetes import KubernetesSource
from harness.apiserver import ADMIN_TOKEN, ApiServer
from tests.k8s.proxy import CuttableProxy
from tests.k8s.support import BBR_LABEL, DEADLINE, LLMD_LABEL, Kube, Watch, start_api, stop_api

pytestmark = [pytest.mark.k8s, pytest.mark.e2e]

Start = Callable[..., Watch]


def test_create_edit_delete(kube: Kube, namespace: str, watch: Start) -> None:
    w = watch([namespace])
    assert w.table() == {}
    kube.apply(namespace, "llama", base="llama-8b", adapters=["food-review", "movie"])
    w.wait_for({"llama-8b": "llama-8b", "food-review": "llama-8b", "movie": "llama-8b"})
    # adapter added
    kube.apply(namespace, "llama", base="llama-8b", adapters=["food-review", "movie", "sql"])
    w.wait_for(
        {"llama-8b": "llama-8b", "food-review": "llama-8b", "movie": "llama-8b", "sql": "llama-8b"}
    )
    # adapter removed
    kube.apply(namespace, "llama", base="llama-8b", adapters=["sql"])
    w.wait_for({"llama-8b": "llama-8b", "sql": "llama-8b"})
    kube.delete(namespace, "llama")
    w.wait_for({})


def test_first_list_before_ready(kube: Kube, namespace: str, watch: Start) -> None:
    kube.apply(namespace, "a", base="base-a", adapters=["x"])
    kube.apply(namespace, "b", base="base-b", labels={LLMD_LABEL: "true"})
    w = watch([namespace], wait_loaded=False)
    assert w.holder.loaded.wait(10)
    # The first map published is the full list: ready never means "empty so far".
    assert w.table() == {"base-a": "base-a", "x": "base-a", "base-b": "base-b"}


def test_base_model_changed(kube: Kube, namespace: str, watch: Start) -> None:
    w = watch([namespace])
    kube.apply(namespace, "one", base="old-base", adapters=["a1"])
    kube.apply(namespace, "two", base="old-base", adapters=["a2"])
    w.wait_for({"old-base": "old-base", "a1": "old-base", "a2": "old-base"})
    # Another ConfigMap still declares old-base: it stays.
    kube.apply(namespace, "one", base="new-base", adapters=["a1"])
    w.wait_for({"old-base": "old-base", "a2": "old-base", "new-base": "new-base", "a1": "new-base"})
    # Nobody declares it any more: gone.
    kube.apply(namespace, "two", base="new-base", adapters=["a2"])
    w.wait_for({"new-base": "new-base", "a1": "new-base", "a2": "new-base"})


def test_label_removed_and_restored(kube: Kube, namespace: str, watch: Start) -> None:
    w = watch([namespace])
    kube.apply(namespace, "m", base="b1", adapters=["x1"])
    w.wait_for({"b1": "b1", "x1": "b1"})
    kube.labels(namespace, "m", {BBR_LABEL: None})
    w.wait_for({})
    kube.labels(namespace, "m", {BBR_LABEL: "true"})
    w.wait_for({"b1": "b1", "x1": "b1"})
    kube.labels(namespace, "m", {BBR_LABEL: "false"})
    w.wait_for({})


def test_llmd_label_and_both_labels(kube: Kube, namespace: str, watch: Start) -> None:
    w = watch([namespace])
    kube.apply(namespace, "llmd", base="b-llmd", labels={LLMD_LABEL: "true"})
    kube.apply(namespace, "both", base="b-both", labels={LLMD_LABEL: "true", BBR_LABEL: "true"})
    w.wait_for({"b-llmd": "b-llmd", "b-both": "b-both"})
    # Edits of a ConfigMap seen by both watches apply (the newest copy wins).
    kube.apply(
        namespace,
        "both",
        base="b-both",
        adapters=["z"],
        labels={LLMD_LABEL: "true", BBR_LABEL: "true"},
    )
    w.wait_for({"b-llmd": "b-llmd", "b-both": "b-both", "z": "b-both"})
    kube.labels(namespace, "both", {BBR_LABEL: None})  # still carries llm-d's
    w.steady({"b-llmd": "b-llmd", "b-both": "b-both", "z": "b-both"}, 0.5)
    kube.labels(namespace, "both", {LLMD_LABEL: None})
    w.wait_for({"b-llmd": "b-llmd"})


def test_moving_between_the_labels_never_leaves_a_gap(
    kube: Kube, namespace: str, watch: Start
) -> None:
    """One edit swaps the labels: the stream it leaves reports DELETED and the one it
    joins ADDED, in either order. No map put in force in between may lack its names
    (every snapshot is checked, not a sample)."""
    w = watch([namespace])
    kube.apply(namespace, "mover", base="moving", adapters=["m1"])
    w.wait_for({"moving": "moving", "m1": "moving"})
    seen: list[tuple[str | None, str | None]] = []
    w.holder.subscribe(
        lambda snapshot: seen.append((snapshot.lookup("m1"), snapshot.lookup("moving")))
    )
    labels: dict[str, str | None] = {}
    for i in range(20):
        labels = (
            {BBR_LABEL: None, LLMD_LABEL: "true"}
            if i % 2 == 0
            else {BBR_LABEL: "true", LLMD_LABEL: None}
        )
        kube.labels(namespace, "mover", labels)
        time.sleep(0.05)
    final = {key: value for key, value in labels.items() if value}
    kube.apply(namespace, "mover", base="moving", adapters=["m1", "done"], labels=final)
    w.wait_for({"moving": "moving", "m1": "moving", "done": "moving"})
    assert len(seen) >= 1
    assert all(pair == ("moving", "moving") for pair in seen), seen
    assert not w.source._handover  # nothing left in transit


def _time_until_gone(w: Watch, name: str, act: Callable[[], None]) -> float:
    """Seconds from just before `act()` (an API call) to the first map put in force
    without `name`, as the holder's listener sees it (every snapshot, not a poll)."""
    gone: list[float] = []
    done = threading.Event()

    def listener(snapshot: ModelMap) -> None:
        if not gone and snapshot.lookup(name) is None:
            gone.append(time.monotonic())
            done.set()

    w.holder.subscribe(listener)
    start = time.monotonic()
    act()
    assert done.wait(DEADLINE), f"{name!r} still routable {DEADLINE}s after the change"
    return gone[0] - start


# SPEC §3: a delete or a label removal removes the entries "at once". A DELETED event
# may also be a move to the other label; bbr asks the API server which it was instead
# of holding the names for DELETE_GRACE (1 s), so it must be well under that.
AT_ONCE = 0.5


def test_a_delete_and_a_label_removal_take_effect_at_once(
    kube: Kube, namespace: str, watch: Start
) -> None:
    w = watch([namespace])
    cases: list[tuple[str, dict[str, str], Callable[[str], None]]] = [
        ("deleted", {BBR_LABEL: "true"}, lambda n: kube.delete(namespace, n)),
        ("deleted-llmd", {LLMD_LABEL: "true"}, lambda n: kube.delete(namespace, n)),
        ("unlabelled", {BBR_LABEL: "true"}, lambda n: kube.labels(namespace, n, {BBR_LABEL: None})),
        (
            "label-false",
            {LLMD_LABEL: "true"},
            lambda n: kube.labels(namespace, n, {LLMD_LABEL: "false"}),
        ),
    ]
    timings: dict[str, list[float]] = {}
    for round_ in range(3):
        for name, labels, _ in cases:
            kube.apply(namespace, name, base=f"{name}-{round_}", labels=labels)
        w.wait_for({f"{name}-{round_}": f"{name}-{round_}" for name, _, _ in cases})
        for name, _, act in cases:
            took = _time_until_gone(w, f"{name}-{round_}", functools.partial(act, name))
            timings.setdefault(name, []).append(took)
        w.wait_for({})
        for name, _, _ in cases:  # gone or unlabelled: start the next round afresh
            with contextlib.suppress(ApiError):
                kube.delete(namespace, name)
    logging.getLogger(__name__).info("delete to map change: %s", timings)
    assert all(t < AT_ONCE for ts in timings.values() for t in ts), timings
    assert not w.source._handover


def test_a_burst_of_deletes_asks_once_per_configmap_at_most(
    kube: Kube, namespace: str, watch: Start
) -> None:
    """Each DELETED costs one question to the API server at most (no retries), and a
    hold its stream settled first costs none; every name goes."""
    count = 60
    w = watch([namespace])
    for i in range(count):
        kube.apply(namespace, f"burst-{i}", base=f"burst-{i}", adapters=[f"a{i}"])
    w.wait(lambda table: len(table) == 2 * count, DEADLINE * 4)
    asked = w.source.stats["checks"] + w.source.stats["check_errors"]
    gone_at: dict[str, float] = {}

    def listener(snapshot: ModelMap) -> None:
        now = time.monotonic()
        for i in range(count):
            if f"burst-{i}" not in gone_at and snapshot.lookup(f"burst-{i}") is None:
                gone_at[f"burst-{i}"] = now

    w.holder.subscribe(listener)
    deleted_at = {}
    for i in range(count):
        deleted_at[f"burst-{i}"] = time.monotonic()
        kube.delete(namespace, f"burst-{i}")
    w.wait_for({})
    delays = sorted(gone_at[name] - deleted_at[name] for name in deleted_at)
    logging.getLogger(__name__).info(
        "burst of %d deletes: delete to map change p50 %.3fs max %.3fs; questions %d",
        count,
        delays[count // 2],
        delays[-1],
        w.source.stats["checks"] + w.source.stats["check_errors"] - asked,
    )
    assert w.source.stats["checks"] + w.source.stats["check_errors"] - asked <= count
    assert not w.source._handover and not w.source._asks


def test_a_delete_while_the_api_refuses_new_connections_still_goes(
    api: ApiServer, kube: Kube, namespace: str, watch: Start
) -> None:
    """The watch already open reports the DELETED, but bbr cannot ask the API server
    whether it was a move: the names go after the bounded hold, and the map is right."""
    proxy = CuttableProxy(api.port)
    try:
        w = watch([namespace], kubeconfig=api.kubeconfig(server=proxy.url))
        kube.apply(namespace, "gone", base="gone")
        kube.apply(namespace, "stays", base="stays")
        w.wait_for({"gone": "gone", "stays": "stays"})
        errors = w.source.stats["check_errors"]
        proxy.refuse_new()
        took = _time_until_gone(w, "gone", lambda: kube.delete(namespace, "gone"))
        assert took >= kubernetes.DELETE_GRACE * 0.9, took  # held: it may have moved
        assert w.table() == {"stays": "stays"}
        assert w.source.stats["check_errors"] > errors and proxy.attempts
        assert not w.source._handover
        proxy.restore()
        kube.apply(namespace, "stays", base="stays", adapters=["after"])
        w.wait_for({"stays": "stays", "after": "stays"})
        assert _time_until_gone(w, "stays", lambda: kube.delete(namespace, "stays")) < AT_ONCE
    finally:
        proxy.close()


def test_unlabelled_ignored(kube: Kube, namespace: str, watch: Start) -> None:
    w = watch([namespace])
    kube.apply(namespace, "plain", base="nope", labels={})
    kube.apply(namespace, "other", base="nope2", labels={"app": "x", BBR_LABEL: "no"})
    kube.apply(namespace, "marker", base="yes")
    w.wait_for({"yes": "yes"})
    w.steady({"yes": "yes"}, 0.3)


def test_invalid_keeps_last_good(
    kube: Kube, namespace: str, watch: Start, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="bbr.sources")
    w = watch([namespace])
    kube.apply(namespace, "m", base="good", adapters=["a"])
    w.wait_for({"good": "good", "a": "good"})
    kube.apply(namespace, "m", data={"baseModel": "good", "adapters": "not: [a, list"})
    kube.apply(namespace, "marker", base="after-bad")  # proves the bad event was processed
    w.wait_for({"good": "good", "a": "good", "after-bad": "after-bad"})
    assert any(r.errors and "adapters" in r.errors[0].key for r in w.reports), w.reports
    assert any(f"{namespace}/m" in str(r.__dict__) for r in caplog.records), caplog.text
    # Another invalid version: still the last good one.
    kube.apply(namespace, "m", data={"adapters": "- b"})
    w.steady({"good": "good", "a": "good", "after-bad": "after-bad"}, 0.5)
    # Valid again: the new version applies.
    kube.apply(namespace, "m", base="better", adapters=["b"])
    w.wait_for({"better": "better", "b": "better", "after-bad": "after-bad"})
    # Invalid, then deleted: its entries go.
    kube.apply(namespace, "m", data={"baseModel": "bad\tname"})
    kube.delete(namespace, "m")
    w.wait_for({"after-bad": "after-bad"})
    # Invalid from the start: nothing, and reported.
    kube.apply(namespace, "fresh", data={"baseModel": ""})
    kube.apply(namespace, "marker", base="after-bad", adapters=["m2"])
    w.wait_for({"after-bad": "after-bad", "m2": "after-bad"})
    assert any(e.ref and e.ref.name == "fresh" for r in w.reports for e in r.errors)


def test_go_bbr_style_adapters_load_through_the_api(
    kube: Kube, namespace: str, watch: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """A ConfigMap the Go BBR loaded (unquoted numbers, an empty item) loads here too."""
    caplog.set_level(logging.WARNING, logger="bbr.sources")
    w = watch([namespace])
    kube.apply(namespace, "m", data={"baseModel": "b", "adapters": "- 1.10\n-\n- 1234\n- x\n"})
    w.wait_for({"b": "b", "1.10": "b", "1234": "b", "x": "b"})
    assert any("empty item skipped" in str(r.__dict__) for r in caplog.records), caplog.text
    # Really broken stays refused: a mapping item invalidates the ConfigMap.
    kube.apply(namespace, "m", data={"baseModel": "b", "adapters": "- y\n- key: value\n"})
    kube.apply(namespace, "marker", base="after-bad")
    w.wait_for({"b": "b", "1.10": "b", "1234": "b", "x": "b", "after-bad": "after-bad"})
    assert any(e.key == "data.adapters[1]" for r in w.reports for e in r.errors), w.reports


def test_conflict_oldest_wins(kube: Kube, namespace: str, watch: Start) -> None:
    w = watch([namespace])
    # Name order is the reverse of age order: creationTimestamp must decide.
    kube.apply(namespace, "z-old", base="base-old", adapters=["shared"])
    time.sleep(1.1)  # creationTimestamp has whole seconds
    kube.apply(namespace, "a-new", base="base-new", adapters=["shared", "mine"])
    w.wait_for(
        {"base-old": "base-old", "shared": "base-old", "base-new": "base-new", "mine": "base-new"}
    )
    w.steady(
        {"base-old": "base-old", "shared": "base-old", "base-new": "base-new", "mine": "base-new"},
        0.2,
    )
    assert [c.name for c in w.holder.current.conflicts] == ["shared"]
    kube.delete(namespace, "z-old")
    w.wait_for({"base-new": "base-new", "shared": "base-new", "mine": "base-new"})


def test_namespaces(kube: Kube, watch: Start) -> None:
    suffix = os.urandom(3).hex()
    ns_a, ns_b = f"ns-a-{suffix}", f"ns-b-{suffix}"
    for ns in (ns_a, ns_b):
        kube.create_namespace(ns)
        kube.apply(ns, "m", base=f"base-{ns}")
    only_a = watch([ns_a])
    assert only_a.table() == {f"base-{ns_a}": f"base-{ns_a}"}
    both = watch([ns_a, ns_b])
    assert both.table() == {f"base-{ns_a}": f"base-{ns_a}", f"base-{ns_b}": f"base-{ns_b}"}
    everywhere = watch(["*"])
    assert {f"base-{ns_a}", f"base-{ns_b}"} <= set(everywhere.table())
    kube.apply(ns_b, "m2", base=f"late-{ns_b}")
    everywhere.wait(lambda t: f"late-{ns_b}" in t)
    both.wait(lambda t: f"late-{ns_b}" in t)
    only_a.steady({f"base-{ns_a}": f"base-{ns_a}"}, 0.3)


def test_api_server_restarted_mid_watch(
    api: ApiServer, kube: Kube, namespace: str, watch: Start
) -> None:
    w = watch([namespace])
    kube.apply(namespace, "m", base="before")
    w.wait_for({"before": "before"})
    api.restart()  # SIGKILL, then the same port and etcd data
    assert w.table() == {"before": "before"}  # the map stays while the API is away
    kube.apply(namespace, "m", base="after", adapters=["x"])
    w.wait_for({"after": "after", "x": "after"})
    kube.apply(namespace, "n", base="second")
    w.wait_for({"after": "after", "x": "after", "second": "second"})


def test_api_unreachable_keeps_map_then_resumes(
    api: ApiServer, kube: Kube, namespace: str, watch: Start
) -> None:
    proxy = CuttableProxy(api.port)
    try:
        w = watch([namespace], kubeconfig=api.kubeconfig(server=proxy.url))
        kube.apply(namespace, "m", base="kept", adapters=["a"])
        w.wait_for({"kept": "kept", "a": "kept"})
        watches = w.source.stats["watches"]
        proxy.cut()
        kube.apply(namespace, "m", base="changed-while-away")
        w.steady({"kept": "kept", "a": "kept"}, 2.5)
        assert w.source.stats["errors"] > 0
        assert w.holder.loaded.is_set()
        proxy.restore()
        # Reconnects within the backoff cap (1 s), then resumes from its resourceVersion.
        w.wait_for({"changed-while-away": "changed-while-away"}, DEADLINE + 1)
        assert w.source.stats["watches"] > watches
        kube.apply(namespace, "m", base="after-restore")
        w.wait_for({"after-restore": "after-restore"})
    finally:
        proxy.close()


@pytest.fixture(scope="module")
def api_etcd_watch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """An API server without a ConfigMap watch cache: watches are served by etcd, so
    compacting etcd makes old resourceVersions expire (410 Gone)."""
    server = start_api(tmp_path_factory.mktemp("kube-nocache"), configmap_watch_cache=False)
    yield server
    stop_api(server)


def test_watch_expired_relists(api_etcd_watch: ApiServer, watch: Start) -> None:
    api = api_etcd_watch
    kube = Kube(KubeClient.from_kubeconfig(str(api.kubeconfig())))
    namespace = f"t-{os.urandom(3).hex()}"
    kube.create_namespace(namespace)
    proxy = CuttableProxy(api.port)
    try:
        w = watch([namespace], kubeconfig=api.kubeconfig(server=proxy.url))
        kube.apply(namespace, "gone", base="deleted-during-gap")
        kube.apply(namespace, "stay", base="v1")
        w.wait_for({"deleted-during-gap": "deleted-during-gap", "v1": "v1"})
        lists = w.source.stats["lists"]
        proxy.cut()
        kube.delete(namespace, "gone")
        kube.apply(namespace, "stay", base="v2", adapters=["new"])
        kube.apply(namespace, "added", base="added-during-gap")
        api.compact()  # every resourceVersion the source knows is now gone
        proxy.restore()
        w.wait_for({"v2": "v2", "new": "v2", "added-during-gap": "added-during-gap"}, DEADLINE + 1)
        assert w.source.stats["gone"] > 0
        assert w.source.stats["lists"] > lists
        # And it keeps watching after the relist.
        kube.apply(namespace, "stay", base="v3")
        w.wait_for({"v3": "v3", "added-during-gap": "added-during-gap"})
    finally:
        proxy.close()


def test_a_relist_never_leaves_a_gap(
    api_etcd_watch: ApiServer, watch: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After 410 Gone the stream relists (paginated here) and replaces what it held in
    one step: ConfigMaps that did not change stay routable in every map in between."""
    api = api_etcd_watch
    monkeypatch.setattr(kubernetes, "LIST_PAGE", 4)
    kube = Kube(KubeClient.from_kubeconfig(str(api.kubeconfig())))
    namespace = f"t-{os.urandom(3).hex()}"
    kube.create_namespace(namespace)
    for i in range(15):
        kube.apply(namespace, f"keep-{i}", base="kept", adapters=[f"k{i}"])
    proxy = CuttableProxy(api.port)
    try:
        w = watch([namespace], kubeconfig=api.kubeconfig(server=proxy.url))
        kept = {"kept": "kept"} | {f"k{i}": "kept" for i in range(15)}
        assert w.table() == kept
        gaps: list[int] = []
        w.holder.subscribe(
            lambda snapshot: gaps.append(sum(snapshot.lookup(n) is None for n in kept))
        )
        lists = w.source.stats["lists"]
        proxy.cut()
        kube.apply(namespace, "new", base="during-the-gap")
        kube.apply(namespace, "new", base="during-the-gap", adapters=["n1"])
        api.compact()  # the revision after the one the streams know is gone
        proxy.restore()
        w.wait_for(
            kept | {"during-the-gap": "during-the-gap", "n1": "during-the-gap"}, DEADLINE + 1
        )
        # Relisted: after the 410, or (when the cut broke an event mid-line) after the
        # undecodable line; both go through the same one-step replacement.
        assert w.source.stats["lists"] > lists, w.source.stats
        assert gaps and not any(gaps), gaps
    finally:
        proxy.close()


def test_large_configmap_and_paginated_list(
    kube: Kube, namespace: str, watch: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kubernetes, "LIST_PAGE", 2)  # 5 ConfigMaps: 3 pages
    for i in range(5):
        kube.apply(namespace, f"cm{i}", base=f"page-{i}")
    w = watch([namespace])
    assert w.table() == {f"page-{i}": f"page-{i}" for i in range(5)}
    assert w.source.stats["lists"] == 2  # one per label, each paginated
    # A ~1 MB watch event (a ConfigMap's limit), read across many HTTP chunks.
    readme = "".join(f"line {i} of a long readme\n" for i in range(30000))  # ~0.8 MB
    kube.apply(
        namespace, "big", data={"baseModel": "big-base", "adapters": "[a1]", "notes": readme}
    )
    w.wait(lambda t: t.get("a1") == "big-base")
    assert len(w.table()) == 7


def test_client_certificate_kubeconfig(
    api: ApiServer, kube: Kube, namespace: str, watch: Start
) -> None:
    kube.apply(namespace, "m", base="by-cert")
    w = watch([namespace], kubeconfig=api.kubeconfig(cert_auth=True))
    assert w.table() == {"by-cert": "by-cert"}


def test_default_namespace_from_kubeconfig(
    api: ApiServer, kube: Kube, namespace: str, watch: Start
) -> None:
    kube.apply(namespace, "m", base="ctx-ns")
    w = watch([], kubeconfig=api.kubeconfig(namespace=namespace))
    assert w.source.namespaces == [namespace]
    assert w.table() == {"ctx-ns": "ctx-ns"}


def test_in_cluster_config(
    api: ApiServer,
    kube: Kube,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(ADMIN_TOKEN + "\n")
    (sa / "ca.crt").write_bytes((api.dir / "ca.crt").read_bytes())
    (sa / "namespace").write_text(namespace)
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(api.port))
    kube.apply(namespace, "m", base="in-cluster")
    holder = MapHolder()
    source = KubernetesSource(holder, [], service_account_dir=str(sa))
    assert source.client.in_cluster
    assert source.namespaces == [namespace]  # the pod's own namespace
    source.start()
    try:
        assert holder.loaded.wait(10)
        assert dict(holder.current.items()) == {"in-cluster": "in-cluster"}
    finally:
        source.stop()


def test_rbac_list_watch_is_enough(
    api: ApiServer, kube: Kube, namespace: str, watch: Start
) -> None:
    """The unprivileged user `bbr` needs list and watch on ConfigMaps, nothing else;
    without them it is not ready, and it becomes ready once granted."""
    kube.apply(namespace, "m", base="rbac")
    w = watch([namespace], kubeconfig=api.kubeconfig("bbr"), wait_loaded=False)
    time.sleep(1)
    assert not w.holder.loaded.is_set()
    kube.grant_bbr(
        namespace, [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list", "watch"]}]
    )
    assert w.holder.loaded.wait(DEADLINE + 1)
    assert w.table() == {"rbac": "rbac"}
    kube.apply(namespace, "m", base="rbac2")
    w.wait_for({"rbac2": "rbac2"})
    # Asking whether a deleted ConfigMap moved is a list by name: `list` is enough.
    errors = w.source.stats["check_errors"]
    assert _time_until_gone(w, "rbac2", lambda: kube.delete(namespace, "m")) < AT_ONCE
    assert w.source.stats["check_errors"] == errors


def test_no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    with pytest.raises(KubeConfigError, match="no Kubernetes config"):
        KubernetesSource(MapHolder(), [], service_account_dir=str(tmp_path))


def test_exec_credential_plugin(
    api: ApiServer, kube: Kube, namespace: str, tmp_path: Path, watch: Start
) -> None:
    """kubeconfigs of managed clusters (GKE, EKS) get their token from an exec plugin."""
    plugin = tmp_path / "plugin.sh"
    plugin.write_text(
        "#!/bin/sh\n"
        'echo \'{"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",'
        f' "status": {{"token": "{ADMIN_TOKEN}"}}}}\'\n'
    )
    plugin.chmod(0o755)
    config = tmp_path / "kubeconfig"
    ca = (api.dir / "ca.crt").read_text()
    config.write_text(
        json.dumps(
            {
                "clusters": [
                    {
                        "name": "c",
                        "cluster": {
                            "server": api.url,
                            "certificate-authority-data": base64.b64encode(ca.encode()).decode(),
                        },
                    }
                ],
                "users": [
                    {
                        "name": "u",
                        "user": {
                            "exec": {
                                "apiVersion": "client.authentication.k8s.io/v1",
                                "command": str(plugin),
                            }
                        },
                    }
                ],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    kube.apply(namespace, "m", base="via-exec")
    w = watch([namespace], kubeconfig=config)
    assert w.table() == {"via-exec": "via-exec"}


@pytest.mark.parametrize("bad", ["Upper", "has space", "a" * 64, "-x", "a/b"])
def test_bad_namespace(bad: str) -> None:
    with pytest.raises(KubeConfigError) as caught:
        KubernetesSource(MapHolder(), [bad], kubeconfig="/nonexistent")
    assert caught.value.flag == "--namespace"
