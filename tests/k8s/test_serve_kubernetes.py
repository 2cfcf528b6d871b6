"""A real `python -m bbr serve --kubernetes` process against a real kube-apiserver.

bbr gets the harness's kubeconfig through KUBECONFIG (no --model-map unless a test says
so), ConfigMaps are created, edited and deleted through the API, and every change must
route (an ext_proc call over gRPC, as Envoy makes it) within DEADLINE: SPEC §3's 2 s plus
a little slack. Health (SPEC §5) is SERVING only once the first list is in.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import grpc
import pytest

from harness.apiserver import ApiServer
from harness.modelmaps import configmap_yaml, write_model_map
from harness.processes import poll_until
from tests.k8s.proxy import CuttableProxy
from tests.k8s.support import BBR_LABEL, DEADLINE, LLMD_LABEL, Kube, assert_usage_error, serve_exits
from tests.support import (
    BASE_HEADER,
    CHANNEL_OPTIONS,
    NOT_SERVING,
    SERVING,
    BbrProcess,
    StartBbr,
    metric_value,
    route,
)

pytestmark = [pytest.mark.k8s, pytest.mark.e2e]

Routes = Mapping[str, str | None]  # model -> base model it routes to (None: not in the map)
START = 30.0  # a fresh bbr process on 2 shared cores: import, first list, health


def start(
    start_bbr: StartBbr,
    api: ApiServer,
    *args: str,
    kubeconfig: Path | None = None,
    wait: bool = True,
    model_map: Path | None = None,
) -> BbrProcess:
    """`bbr serve --kubernetes ARGS` with KUBECONFIG pointing at the harness."""
    env = {"KUBECONFIG": str(kubeconfig or api.kubeconfig())}
    bbr = start_bbr("--kubernetes", *args, env=env, model_map=model_map, wait=False)
    if wait:
        bbr.wait_serving(START)
    return bbr


def routes(channel: grpc.Channel, models: Iterable[str]) -> dict[str, str | None]:
    return {m: route(channel, m).get(BASE_HEADER) for m in models}


def wait_routes(bbr: BbrProcess, expected: Routes, deadline: float = DEADLINE) -> float:
    """Poll through ext_proc until every model routes as `expected`; the seconds it took."""
    channel = bbr.channel()
    took = poll_until(lambda: routes(channel, expected) == dict(expected), timeout=deadline)
    if took is None:
        pytest.fail(
            f"not routed within {deadline}s: {routes(channel, expected)} != {dict(expected)}\n"
            f"bbr stderr (tail):\n{tail(bbr)}"
        )
    return took


def steady_routes(bbr: BbrProcess, expected: Routes, seconds: float) -> None:
    channel = bbr.channel()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        assert routes(channel, expected) == dict(expected)
        time.sleep(0.1)


def tail(bbr: BbrProcess, lines: int = 20) -> str:
    return "\n".join(bbr.stderr_text().splitlines()[-lines:])


def map_models(bbr: BbrProcess) -> tuple[float | None, float | None]:
    """bbr_model_map_models for (base, adapter)."""
    text = bbr.metrics_text()
    return (
        metric_value(text, "bbr_model_map_models", kind="base"),
        metric_value(text, "bbr_model_map_models", kind="adapter"),
    )


def wait_metric(bbr: BbrProcess, base: int, adapter: int) -> None:
    if poll_until(lambda: map_models(bbr) == (base, adapter), timeout=DEADLINE) is None:
        pytest.fail(f"bbr_model_map_models is {map_models(bbr)}, not ({base}, {adapter})")


def health_or_none(bbr: BbrProcess) -> int | None:
    """The health status, or None while the health port does not answer."""
    try:
        return bbr.health("", timeout=0.5)
    except grpc.RpcError:
        return None


# --- lifecycle of one ConfigMap ---------------------------------------------------------


def test_create_edit_rebase_delete_route(
    start_bbr: StartBbr, api: ApiServer, kube: Kube, namespace: str
) -> None:
    bbr = start(start_bbr, api, "--namespace", namespace)
    assert bbr.health() == SERVING
    assert bbr.health("envoy.service.ext_proc.v3.ExternalProcessor") == SERVING
    wait_metric(bbr, 0, 0)
    models = ("llama-8b", "food-review", "movie", "sql", "qwen")

    kube.apply(namespace, "llama", base="llama-8b", adapters=["food-review", "movie"])
    llama: dict[str, str | None] = dict.fromkeys(models)
    llama |= dict.fromkeys(("llama-8b", "food-review", "movie"), "llama-8b")
    wait_routes(bbr, llama)
    wait_metric(bbr, 1, 2)

    # `kubectl edit`: a PUT of the whole object with one more adapter.
    kube.apply(namespace, "llama", base="llama-8b", adapters=["food-review", "movie", "sql"])
    wait_routes(bbr, dict.fromkeys(models[:4], "llama-8b") | {"qwen": None})
    wait_metric(bbr, 1, 3)

    # baseModel changed: the adapters follow, the old base is gone.
    kube.apply(namespace, "llama", base="qwen", adapters=["food-review", "movie", "sql"])
    wait_routes(bbr, dict.fromkeys(models[1:], "qwen") | {"llama-8b": None})
    wait_metric(bbr, 1, 3)

    kube.delete(namespace, "llama")
    wait_routes(bbr, dict.fromkeys(models))
    wait_metric(bbr, 0, 0)
    assert bbr.health() == SERVING  # an empty map is a loaded map


@pytest.mark.parametrize("label", [BBR_LABEL, LLMD_LABEL], ids=["gaie", "llm-d"])
def test_either_label_routes(
    start_bbr: StartBbr, api: ApiServer, kube: Kube, namespace: str, label: str
) -> None:
    bbr = start(start_bbr, api, "--namespace", namespace)
    kube.apply(namespace, "m", base="labelled", adapters=["a"], labels={label: "true"})
    kube.apply(namespace, "plain", base="unlabelled", labels={})
    wait_routes(bbr, {"labelled": "labelled", "a": "labelled", "unlabelled": None})
    kube.labels(namespace, "m", {label: None})  # label removed: entries gone
    wait_routes(bbr, {"labelled": None, "a": None})
    kube.labels(namespace, "plain", {label: "true"})
    wait_routes(bbr, {"unlabelled": "unlabelled"})


def test_preexisting_configmaps_route_at_once(
    start_bbr: StartBbr, api: ApiServer, kube: Kube, namespace: str
) -> None:
    """SERVING means the first list is in: no window where known models are unknown."""
    kube.apply(namespace, "gaie", base="pre-a", adapters=["pre-x"])
    kube.apply(namespace, "llmd", base="pre-b", labels={LLMD_LABEL: "true"})
    bbr = start(start_bbr, api, "--namespace", namespace)
    assert routes(bbr.channel(), ["pre-a", "pre-x", "pre-b"]) == {
        "pre-a": "pre-a",
        "pre-x": "pre-a",
        "pre-b": "pre-b",
    }
    assert map_models(bbr) == (2, 1)


# --- health before the first list --------------------------------------------------------


@pytest.mark.parametrize("with_file", [False, True], ids=["kubernetes", "file-and-kubernetes"])
def test_not_serving_until_the_first_list(
    start_bbr: StartBbr, api: ApiServer, kube: Kube, namespace: str, tmp_path: Path,
    with_file: bool,
) -> None:  # fmt: skip
    """Health stays NOT_SERVING until every source is in force: a model-map file loaded at
    once does not make bbr serve without the Kubernetes list (it did: the file published
    before the Kubernetes source declared itself)."""
    kube.apply(namespace, "m", base="first-list", adapters=["fl"])
    path = None
    if with_file:
        path = write_model_map(tmp_path / "map.yaml", configmap_yaml("f", "file-base", ["fa"]))
    proxy = CuttableProxy(api.port)
    try:
        proxy.cut()  # the API is unreachable: no list can complete
        bbr = start(
            start_bbr, api, "--namespace", namespace,
            kubeconfig=api.kubeconfig(server=proxy.url), wait=False, model_map=path,
        )  # fmt: skip
        seen: set[int | None] = set()
        end = time.monotonic() + 4.0  # long enough for several retries
        while time.monotonic() < end:
            assert bbr.returncode is None, tail(bbr)
            seen.add(health_or_none(bbr))
            time.sleep(0.1)
        assert SERVING not in seen, seen
        assert NOT_SERVING in seen, f"health never answered: {seen}\n{tail(bbr)}"
        proxy.restore()
        took = poll_until(lambda: health_or_none(bbr) == SERVING, timeout=DEADLINE + 1)
        assert took is not None, tail(bbr)
        # The first map published is the whole list.
        assert routes(bbr.channel(), ["first-list", "fl"]) == {
            "first-list": "first-list",
            "fl": "first-list",
        }
    finally:
        proxy.close()


# --- namespaces and sources ----------------------------------------------------------------


def test_all_namespaces(start_bbr: StartBbr, api: ApiServer, kube: Kube) -> None:
    suffix = os.urandom(3).hex()
    ns_a, ns_b = f"star-a-{suffix}", f"star-b-{suffix}"
    for ns in (ns_a, ns_b):
        kube.create_namespace(ns)
    kube.apply(ns_a, "m", base=f"base-{ns_a}")
    bbr = start(start_bbr, api, "--namespace", "*")
    assert routes(bbr.channel(), [f"base-{ns_a}"]) == {f"base-{ns_a}": f"base-{ns_a}"}
    kube.apply(ns_b, "m", base=f"base-{ns_b}", adapters=[f"ad-{suffix}"])
    wait_routes(bbr, {f"base-{ns_b}": f"base-{ns_b}", f"ad-{suffix}": f"base-{ns_b}"})
    kube.delete(ns_a, "m")
    wait_routes(bbr, {f"base-{ns_a}": None, f"base-{ns_b}": f"base-{ns_b}"})


def test_only_the_watched_namespaces(
    start_bbr: StartBbr, api: ApiServer, kube: Kube, namespace: str
) -> None:
    other = f"other-{os.urandom(3).hex()}"
    kube.create_namespace(other)
    bbr = start(start_bbr, api, "--namespace", namespace)
    kube.apply(other, "m", base="elsewhere")
    kube.apply(namespace, "m", base="here")
    wait_routes(bbr, {"here": "here"})
    steady_routes(bbr, {"elsewhere": None, "here": "here"}, 0.5)


def test_model_map_file_and_kubernetes_together(
    start_bbr: StartBbr, api: ApiServer, kube: Kube, namespace: str, tmp_path: Path
) -> None:
    path = write_model_map(
        tmp_path / "map.yaml", configmap_yaml("from-file", "file-base", ["file-adapter"])
    )
    kube.apply(namespace, "m", base="kube-base", adapters=["kube-adapter"])
    bbr = start(start_bbr, api, "--namespace", namespace, model_map=path)
    union = {
        "file-base": "file-base",
        "file-adapter": "file-base",
        "kube-base": "kube-base",
        "kube-adapter": "kube-base",
    }
    assert routes(bbr.channel(), union) == union
    assert map_models(bbr) == (2, 2)
    # Each source keeps changing the map, and neither drops the other's entries.
    kube.apply(namespace, "m", base="kube-base", adapters=["kube-adapter", "kube-2"])
    wait_routes(bbr, union | {"kube-2": "kube-base"})
    write_model_map(path, configmap_yaml("from-file", "file-base", ["file-adapter", "file-2"]))
    wait_routes(bbr, union | {"kube-2": "kube-base", "file-2": "file-base"})
    kube.delete(namespace, "m")
    wait_routes(
        bbr,
        {"file-base": "file-base", "file-2": "file-base", "kube-base": None, "kube-2": None},
    )
    wait_metric(bbr, 1, 2)


# --- errors, conflicts, env twins ---------------------------------------------------------


def test_invalid_configmap_keeps_last_good_and_is_counted(
    start_bbr: StartBbr, api: ApiServer, kube: Kube, namespace: str
) -> None:
    bbr = start(start_bbr, api, "--namespace", namespace)
    kube.apply(namespace, "m", base="good", adapters=["g1"])
    wait_routes(bbr, {"good": "good", "g1": "good"})
    errors = bbr.metric("bbr_model_map_reloads_total", result="error") or 0.0
    kube.apply(namespace, "m", data={"baseModel": "good", "adapters": "not: [a, list"})
    kube.apply(namespace, "marker", base="after-bad")  # proves the bad event was seen
    wait_routes(bbr, {"good": "good", "g1": "good", "after-bad": "after-bad"})
    took = poll_until(
        lambda: (bbr.metric("bbr_model_map_reloads_total", result="error") or 0.0) > errors
    )
    assert took is not None, bbr.metrics_text()
    assert any(
        f"{namespace}/m" in str(record) and "adapters" in str(record)
        for record in bbr.log_records()
    ), tail(bbr)
    kube.apply(namespace, "m", base="better", adapters=["g1"])
    wait_routes(bbr, {"good": None, "better": "better", "g1": "better"})


def test_conflict_oldest_wins_and_is_reported(
    start_bbr: StartBbr, api: ApiServer, kube: Kube, namespace: str
) -> None:
    bbr = start(start_bbr, api, "--namespace", namespace)
    kube.apply(namespace, "z-old", base="base-old", adapters=["shared"])
    time.sleep(1.1)  # creationTimestamp has whole seconds
    kube.apply(namespace, "a-new", base="base-new", adapters=["shared"])
    wait_routes(bbr, {"base-old": "base-old", "base-new": "base-new", "shared": "base-old"})
    assert bbr.metric("bbr_model_map_conflicts") == 1
    kube.delete(namespace, "z-old")
    wait_routes(bbr, {"base-old": None, "shared": "base-new"})
    assert poll_until(lambda: bbr.metric("bbr_model_map_conflicts") == 0) is not None


def test_env_twins(start_bbr: StartBbr, api: ApiServer, kube: Kube, namespace: str) -> None:
    """BBR_KUBERNETES and BBR_NAMESPACE (comma-separated) instead of the flags."""
    other = f"twin-{os.urandom(3).hex()}"
    kube.create_namespace(other)
    kube.apply(namespace, "m", base="twin-a")
    kube.apply(other, "m", base="twin-b")
    env = {
        "KUBECONFIG": str(api.kubeconfig()),
        "BBR_KUBERNETES": "true",
        "BBR_NAMESPACE": f"{namespace},{other}",
    }
    bbr = start_bbr(env=env, wait=False)
    bbr.wait_serving(START)
    assert routes(bbr.channel(), ["twin-a", "twin-b"]) == {"twin-a": "twin-a", "twin-b": "twin-b"}


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_with_the_watch_open_exits_promptly(
    start_bbr: StartBbr, api: ApiServer, kube: Kube, namespace: str, workers: str
) -> None:
    kube.apply(namespace, "m", base="bye")
    bbr = start(start_bbr, api, "--namespace", namespace, "--workers", workers)
    assert routes(bbr.channel(), ["bye"]) == {"bye": "bye"}
    time.sleep(0.5)  # the watch requests are open and idle
    started = time.monotonic()
    bbr.terminate()
    with contextlib.suppress(grpc.RpcError):  # NOT_SERVING while draining, then gone
        assert bbr.health() == NOT_SERVING
    assert bbr.wait(timeout=15) == 0, tail(bbr)
    assert time.monotonic() - started < 5, "the open watch held up the exit"


# --- workers ----------------------------------------------------------------------------


def fresh_routes(bbr: BbrProcess, models: Iterable[str], connections: int) -> list[Routes]:
    """`routes` over `connections` separate TCP connections (SO_REUSEPORT spreads them
    over the workers)."""
    answers: list[Routes] = []
    for _ in range(connections):
        options = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(f"127.0.0.1:{bbr.grpc_port}", options=options) as channel:
            answers.append(routes(channel, models))
    return answers


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def test_workers(start_bbr: StartBbr, api: ApiServer, kube: Kube, namespace: str) -> None:
    kube.apply(namespace, "m", base="w-base", adapters=["w1"])
    bbr = start(start_bbr, api, "--namespace", namespace, "--workers", "2")
    assert bbr.health() == SERVING
    assert len(children(bbr.pid)) == 2, children(bbr.pid)
    expected = {"w-base": "w-base", "w1": "w-base", "w2": None}
    assert fresh_routes(bbr, expected, 8) == [expected] * 8
    # Every worker watches: an edit reaches all of them within the deadline.
    kube.apply(namespace, "m", base="w-base", adapters=["w1", "w2"])
    expected = {"w-base": "w-base", "w1": "w-base", "w2": "w-base"}
    took = poll_until(lambda: fresh_routes(bbr, expected, 8) == [expected] * 8, timeout=DEADLINE)
    assert took is not None, fresh_routes(bbr, expected, 8)
    wait_metric_max(bbr)


def wait_metric_max(bbr: BbrProcess) -> None:
    """Across workers the gauge is still the map's size, not a sum per worker."""
    if poll_until(lambda: map_models(bbr) == (1, 2), timeout=DEADLINE) is None:
        pytest.fail(f"bbr_model_map_models with 2 workers: {map_models(bbr)}, want (1, 2)")


# --- no config, API outage -----------------------------------------------------------------


def test_no_kubeconfig_is_a_usage_error(tmp_path: Path) -> None:
    assert_usage_error(serve_exits(tmp_path / "missing", tmp_path), "missing")


def kubeconfig_text(cluster: object, user: object) -> str:
    return json.dumps(
        {
            "clusters": [{"name": "c", "cluster": cluster}],
            "users": [{"name": "u", "user": user}],
            "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
            "current-context": "x",
        }
    )


SERVER = "https://127.0.0.1:1"
CA_FILE = {"server": SERVER, "certificate-authority": "/nonexistent/ca.crt"}
CA_NOT_BASE64 = {"server": SERVER, "certificate-authority-data": "!!!"}
CA_NOT_PEM = {"server": SERVER, "certificate-authority-data": "aGVsbG8="}  # "hello"
BAD_KUBECONFIGS = [
    pytest.param(b"clusters: [oops", ["kubeconfig"], id="not-yaml"),
    pytest.param(b"\xff\xfe\x00", ["kubeconfig"], id="not-utf8"),
    pytest.param(b"[]", ["kubeconfig"], id="not-a-mapping"),
    pytest.param(b"apiVersion: v1\nkind: Config\n", ["current-context"], id="no-context"),
    pytest.param(kubeconfig_text(CA_FILE, {}), [CA_FILE["certificate-authority"]], id="no-ca-file"),
    pytest.param(
        kubeconfig_text(CA_NOT_BASE64, {}), ["certificate-authority"], id="ca-data-not-base64",
    ),
    pytest.param(
        kubeconfig_text(CA_NOT_PEM, {}), ["certificate-authority"], id="ca-data-not-pem",
    ),
    pytest.param(
        kubeconfig_text({"server": SERVER}, "a-string"), ["kubeconfig"], id="user-not-a-mapping",
    ),
    pytest.param(kubeconfig_text({"server": "not a url"}, {}), ["not a url"], id="bad-server"),
]  # fmt: skip


@pytest.mark.parametrize(("content", "words"), BAD_KUBECONFIGS)
def test_bad_kubeconfig_is_a_usage_error(
    tmp_path: Path, content: bytes | str, words: list[str]
) -> None:
    config = tmp_path / "kubeconfig"
    config.write_bytes(content.encode() if isinstance(content, str) else content)
    assert_usage_error(serve_exits(config, tmp_path), *words)


def test_api_server_down_keeps_the_map_then_edits_arrive(
    start_bbr: StartBbr, api: ApiServer, kube: Kube, namespace: str
) -> None:
    kube.apply(namespace, "m", base="kept", adapters=["k1"])
    bbr = start(start_bbr, api, "--namespace", namespace)
    kept = {"kept": "kept", "k1": "kept"}
    assert routes(bbr.channel(), kept) == kept
    api.stop_apiserver()  # SIGKILL; etcd keeps the data
    try:
        steady_routes(bbr, kept, 3.0)  # several reconnect attempts fail meanwhile
        assert bbr.health() == SERVING
        assert bbr.returncode is None
    finally:
        api.start_apiserver()
    kube.apply(namespace, "m", base="kept", adapters=["k1", "k2"])
    wait_routes(bbr, kept | {"k2": "kept"})
    kube.apply(namespace, "n", base="new-after-restart")
    wait_routes(bbr, {"new-after-restart": "new-after-restart"})
    assert bbr.health() == SERVING


@pytest.fixture(autouse=True)
def _api_up(api: ApiServer) -> Iterator[None]:
    """A test that stops the API server always leaves it running for the next one."""
    yield
    if api.apiserver is None:
        api.start_apiserver()
