"""The hand-written Kubernetes client, against a real kube-apiserver (issue 14, SPEC §5).

Proxies (the kubeconfig's proxy-url, HTTPS_PROXY/NO_PROXY, HTTP CONNECT), tls-server-name,
the connect timeout apart from the watch's, exec credential plugins (one run at a time,
a re-run on 401, the configured apiVersion, stderr kept), refused or malformed kubeconfig
entries (exit 2 naming the field), client keys kept off disk, the backoff against a
failing API server (fast, then exponential with jitter, Retry-After honoured), the
warning repeated with its reason while a revoked credential keeps failing, and the
watch-error and last-sync metrics. What a real API server will not do on demand (answer
503 with Retry-After) comes from `FailingApi`.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from bbr.modelmap import MapHolder
from bbr.sources import kubernetes
from bbr.sources.kubeclient import (
    CredentialError,
    KubeClient,
    ProxyError,
    error_reason,
    no_proxy_matches,
)
from bbr.sources.kubernetes import KubernetesSource
from harness.apiserver import ADMIN_TOKEN, ApiServer
from harness.processes import poll_until
from tests.k8s.proxy import ConnectProxy, CuttableProxy, FailingApi
from tests.k8s.support import Kube, Watch, assert_usage_error, serve_exits

pytestmark = [pytest.mark.k8s, pytest.mark.e2e]

Start = Any  # the `watch` fixture's callable
CONFIGMAPS = "/api/v1/namespaces/default/configmaps"


def write_kubeconfig(
    path: Path, cluster: dict[str, Any], user: dict[str, Any], namespace: str | None = None
) -> Path:
    context: dict[str, Any] = {"cluster": "c", "user": "u"}
    if namespace:
        context["namespace"] = namespace
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": cluster}],
                "users": [{"name": "u", "user": user}],
                "contexts": [{"name": "x", "context": context}],
                "current-context": "x",
            }
        )
    )
    return path


def ca_b64(api: ApiServer) -> str:
    return base64.b64encode((api.dir / "ca.crt").read_bytes()).decode()


def cluster(api: ApiServer, **extra: Any) -> dict[str, Any]:
    return {"server": api.url, "certificate-authority-data": ca_b64(api), **extra}


def admin(**extra: Any) -> dict[str, Any]:
    return {"token": ADMIN_TOKEN, **extra}


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "bbr.sources.kubernetes" and r.levelno == logging.WARNING
    ]


# --- proxies ------------------------------------------------------------------------------


def test_proxy_url_tunnels_list_and_watch_with_credentials(
    api: ApiServer, kube: Kube, namespace: str, tmp_path: Path, watch: Start
) -> None:
    proxy = ConnectProxy(credentials="bbr:p@ss word")
    try:
        config = write_kubeconfig(
            tmp_path / "kubeconfig",
            cluster(api, **{"proxy-url": f"http://bbr:p%40ss%20word@127.0.0.1:{proxy.port}"}),
            admin(),
        )
        kube.apply(namespace, "m", base="via-proxy")
        w: Watch = watch([namespace], kubeconfig=config)
        assert w.table() == {"via-proxy": "via-proxy"}
        kube.apply(namespace, "m", base="via-proxy", adapters=["watched"])  # the watch, too
        w.wait_for({"via-proxy": "via-proxy", "watched": "via-proxy"})
        expected = "Basic " + base64.b64encode(b"bbr:p@ss word").decode()
        assert len(proxy.asked) >= 4  # a list and a watch per label stream
        assert set(proxy.asked) == {(f"127.0.0.1:{api.port}", expected)}
    finally:
        proxy.close()


def test_proxy_refusing_the_tunnel_is_a_proxy_error(api: ApiServer, tmp_path: Path) -> None:
    proxy = ConnectProxy(credentials="bbr:secret")
    try:
        config = write_kubeconfig(
            tmp_path / "kubeconfig",
            cluster(api, **{"proxy-url": f"http://bbr:wrong@127.0.0.1:{proxy.port}"}),
            admin(),
        )
        with pytest.raises(ProxyError, match="407") as caught:
            KubeClient.from_kubeconfig(str(config)).request("GET", CONFIGMAPS)
        assert error_reason(caught.value) == "proxy"  # the watch-error metric's label
    finally:
        proxy.close()


def test_https_proxy_from_the_environment_and_no_proxy(
    api: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As client-go: HTTPS_PROXY (or https_proxy) for an https server, unless NO_PROXY
    exempts it. The server is named by a host this machine cannot resolve (the serving
    certificate's `kubernetes.default.svc`): only the proxy can reach it."""
    proxy = ConnectProxy(hosts={"kubernetes.default.svc": api.port})
    server = f"https://kubernetes.default.svc:{api.port}"
    config = write_kubeconfig(tmp_path / "kubeconfig", cluster(api, server=server), admin())
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    try:
        monkeypatch.setenv("https_proxy", proxy.url)
        answer = KubeClient.from_kubeconfig(str(config)).request("GET", CONFIGMAPS)
        assert answer["kind"] == "ConfigMapList"
        assert proxy.asked == [(f"kubernetes.default.svc:{api.port}", None)]

        monkeypatch.setenv("NO_PROXY", "example.com,.svc")
        client = KubeClient.from_kubeconfig(str(config))
        assert client.proxy is None
        with pytest.raises(OSError):  # straight to a name that does not resolve
            client.request("GET", CONFIGMAPS)
        assert len(proxy.asked) == 1

        # A loopback API server is never proxied (Go's rule), whatever HTTPS_PROXY says.
        monkeypatch.delenv("NO_PROXY")
        local = write_kubeconfig(tmp_path / "local", cluster(api), admin())
        assert KubeClient.from_kubeconfig(str(local)).request("GET", CONFIGMAPS)
        assert len(proxy.asked) == 1
    finally:
        proxy.close()


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "exempt"),
    [
        ("api.example.com", 443, "example.com", True),  # the domain and its subdomains
        ("example.com", 443, ".example.com", False),  # subdomains only
        ("api.example.com", 443, "*.example.com", True),
        ("api.example.com", 443, "example.com:6443", False),  # another port
        ("api.example.com", 6443, "example.com:6443", True),
        ("10.1.2.3", 443, "10.0.0.0/8", True),
        ("10.1.2.3", 443, "10.1.2.4", False),
        ("fd00::1", 443, "fd00::/8", True),
        ("anything", 1, "*", True),
        ("notexample.com", 443, "example.com", False),
    ],
)
def test_no_proxy_rules(host: str, port: int, no_proxy: str, exempt: bool) -> None:
    assert no_proxy_matches(host, port, no_proxy) is exempt


# --- TLS and timeouts ---------------------------------------------------------------------


def test_tls_server_name_is_what_the_certificate_is_checked_against(
    api: ApiServer, tmp_path: Path
) -> None:
    good = write_kubeconfig(
        tmp_path / "good", cluster(api, **{"tls-server-name": "kubernetes.default.svc"}), admin()
    )
    assert KubeClient.from_kubeconfig(str(good)).request("GET", CONFIGMAPS)
    wrong = write_kubeconfig(
        tmp_path / "wrong", cluster(api, **{"tls-server-name": "not-the-api.example"}), admin()
    )
    with pytest.raises(ssl.SSLCertVerificationError, match=r"not-the-api\.example") as caught:
        KubeClient.from_kubeconfig(str(wrong)).request("GET", CONFIGMAPS)
    assert error_reason(caught.value) == "tls"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word (a hung TLS handshake)."""
    listener = socket.create_server(("127.0.0.1", 0))
    yield int(listener.getsockname()[1])
    listener.close()


def test_connecting_times_out_on_its_own_timeout(
    api: ApiServer, tmp_path: Path, silent_port: int
) -> None:
    config = write_kubeconfig(
        tmp_path / "kubeconfig", cluster(api, server=f"https://127.0.0.1:{silent_port}"), admin()
    )
    client = KubeClient.from_kubeconfig(str(config))
    client.connect_timeout = 0.5
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.request("GET", CONFIGMAPS, timeout=60)
    with pytest.raises(TimeoutError), client.stream(CONFIGMAPS, {"watch": "1"}, timeout=600):
        pass
    assert time.monotonic() - started < 5  # not the 60 s read nor the 600 s watch timeout
    # One request may connect with a shorter timeout than the client's (asking whether a
    # deleted ConfigMap moved: an answer after 1 s is moot).
    client.connect_timeout = 60
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        client.request("GET", CONFIGMAPS, timeout=60, connect_timeout=0.3)
    assert time.monotonic() - started < 5


def test_a_quiet_watch_outlives_the_connect_timeout(
    api: ApiServer, kube: Kube, namespace: str, watch: Start
) -> None:
    client = KubeClient.from_kubeconfig(str(api.kubeconfig()))
    client.connect_timeout = 0.3
    kube.apply(namespace, "m", base="quiet")
    w: Watch = watch([namespace], client=client)
    time.sleep(1.5)  # five connect timeouts without an event
    kube.apply(namespace, "m", base="quiet", adapters=["later"])
    w.wait_for({"quiet": "quiet", "later": "quiet"})
    assert w.source.stats["watches"] == 2  # one per label stream, never reopened
    assert w.source.stats["errors"] == 0


# --- exec credential plugins --------------------------------------------------------------

PLUGIN = """
import json, os, sys, time
runs, sleep, tokens, api_version = sys.argv[1], float(sys.argv[2]), sys.argv[3], sys.argv[4]
fd = os.open(os.path.join(runs, f"run-{os.getpid()}"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
os.write(fd, os.environ.get("KUBERNETES_EXEC_INFO", "").encode())
os.close(fd)
run = len(os.listdir(runs))
time.sleep(sleep)
token = tokens.split(",")[min(run, len(tokens.split(","))) - 1]
if token == "FAIL":
    print("error: token expired; run `login` again", file=sys.stderr)
    sys.exit(1)
print(json.dumps({"apiVersion": api_version, "kind": "ExecCredential",
                  "status": {"token": token}}))
"""


class Plugin:
    """An exec credential plugin that records each run (and its KUBERNETES_EXEC_INFO)
    and hands out `tokens` in turn (FAIL: exit 1 with a message on stderr)."""

    def __init__(self, tmp: Path, tokens: str, *, sleep: float = 0.0, api_version: str = "v1"):
        self.runs = tmp / "runs"
        self.runs.mkdir()
        script = tmp / "plugin.py"
        script.write_text(PLUGIN)
        self.api_version = f"client.authentication.k8s.io/{api_version}"
        self.exec = {
            "apiVersion": self.api_version,
            "command": sys.executable,
            "args": [str(script), str(self.runs), str(sleep), tokens, self.api_version],
        }

    def count(self) -> int:
        return len(os.listdir(self.runs))

    def infos(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in self.runs.iterdir()]


def test_exec_plugin_runs_once_for_all_streams(
    api: ApiServer, kube: Kube, namespace: str, tmp_path: Path, watch: Start
) -> None:
    plugin = Plugin(tmp_path, ADMIN_TOKEN, sleep=0.5)  # slow: the two streams ask at once
    config = write_kubeconfig(tmp_path / "kubeconfig", cluster(api), {"exec": plugin.exec})
    kube.apply(namespace, "m", base="one-run")
    w: Watch = watch([namespace], kubeconfig=config)
    assert w.table() == {"one-run": "one-run"}
    assert plugin.count() == 1


def test_exec_plugin_runs_again_on_401(
    api: ApiServer, kube: Kube, namespace: str, tmp_path: Path, watch: Start
) -> None:
    plugin = Plugin(tmp_path, f"expired-token,{ADMIN_TOKEN}")
    config = write_kubeconfig(tmp_path / "kubeconfig", cluster(api), {"exec": plugin.exec})
    kube.apply(namespace, "m", base="after-401")
    w: Watch = watch([namespace], kubeconfig=config)
    assert w.table() == {"after-401": "after-401"}
    assert plugin.count() == 2  # once rejected, once again: not once per stream
    assert w.source.stats["errors"] == 0  # the 401 was handled, not reported


@pytest.mark.parametrize("version", ["v1", "v1beta1"])
def test_exec_plugin_gets_the_configured_api_version(
    api: ApiServer, tmp_path: Path, version: str
) -> None:
    plugin = Plugin(tmp_path, ADMIN_TOKEN, api_version=version)
    config = write_kubeconfig(tmp_path / "kubeconfig", cluster(api), {"exec": plugin.exec})
    assert KubeClient.from_kubeconfig(str(config)).request("GET", CONFIGMAPS)
    [info] = plugin.infos()
    assert info["apiVersion"] == f"client.authentication.k8s.io/{version}"
    assert info["kind"] == "ExecCredential" and info["spec"]["interactive"] is False


def test_exec_plugin_failure_keeps_its_stderr(
    api: ApiServer, tmp_path: Path, watch: Start, caplog: pytest.LogCaptureFixture
) -> None:
    plugin = Plugin(tmp_path, "FAIL")
    config = write_kubeconfig(tmp_path / "kubeconfig", cluster(api), {"exec": plugin.exec})
    with pytest.raises(CredentialError, match="exited 1: error: token expired") as caught:
        KubeClient.from_kubeconfig(str(config)).request("GET", CONFIGMAPS)
    assert error_reason(caught.value) == "credential"
    caplog.set_level(logging.WARNING, "bbr.sources.kubernetes")
    w: Watch = watch(["default"], kubeconfig=config, wait_loaded=False)
    deadline = time.monotonic() + 5
    while not warnings_of(caplog) and time.monotonic() < deadline:
        time.sleep(0.05)
    reasons = [r.fields["reason"] for r in warnings_of(caplog)]  # type: ignore[attr-defined]
    assert reasons and "token expired; run `login` again" in reasons[0]
    assert not w.holder.loaded.is_set()


# --- refused and malformed kubeconfigs: exit 2, one line naming the field ------------------

BAD_USERS = [
    pytest.param(
        {"auth-provider": {"name": "gcp", "config": {}}}, ["auth-provider", "gcp"], id="auth"
    ),
    pytest.param({"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "x",
                           "env": "A=1"}}, ["exec.env"], id="exec-env-not-a-list"),
    pytest.param({"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "x",
                           "env": [{"name": "A"}]}}, ["exec.env[0]"], id="exec-env-no-value"),
    pytest.param({"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": "x",
                           "args": ["--a", 1]}}, ["exec.args"], id="exec-args-not-strings"),
    pytest.param({"exec": {"apiVersion": "v1", "command": "x"}}, ["exec.apiVersion"],
                 id="exec-bad-api-version"),
    pytest.param({"exec": {"apiVersion": "client.authentication.k8s.io/v1"}}, ["exec.command"],
                 id="exec-no-command"),
    pytest.param({"tokenFile": "/nonexistent/token"}, ["tokenFile", "/nonexistent/token"],
                 id="token-file-missing"),
    pytest.param({"tokenFile": ["a"]}, ["tokenFile"], id="token-file-not-a-string"),
]  # fmt: skip


@pytest.mark.parametrize(("user", "words"), BAD_USERS)
def test_refused_or_malformed_user_is_exit_2_naming_the_field(
    api: ApiServer, tmp_path: Path, user: dict[str, Any], words: list[str]
) -> None:
    config = write_kubeconfig(tmp_path / "kubeconfig", cluster(api), user)
    assert_usage_error(serve_exits(config, tmp_path), *words)


# --- client keys stay off disk ---------------------------------------------------------------


def test_client_keys_are_never_written_to_disk(
    api: ApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key from the kubeconfig (inline) or from an exec plugin goes to OpenSSL through a
    memfd: no temporary file is made and no file under TMPDIR or the cwd holds it."""
    key = (api.dir / "admin.key").read_bytes()
    cert = (api.dir / "admin.crt").read_bytes()
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(scratch)
    memfds: list[str] = []
    real_memfd = os.memfd_create

    def spy(name: str, flags: int = os.MFD_CLOEXEC) -> int:
        memfds.append(name)
        return real_memfd(name, flags)

    def no_temp_files(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a temporary file was made")

    monkeypatch.setattr(os, "memfd_create", spy)
    for name in ("mkstemp", "NamedTemporaryFile", "TemporaryFile", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, no_temp_files)
    inline = {
        "client-certificate-data": base64.b64encode(cert).decode(),
        "client-key-data": base64.b64encode(key).decode(),
    }
    config = write_kubeconfig(tmp_path / "inline", cluster(api), inline)
    answer = KubeClient.from_kubeconfig(str(config)).request("GET", CONFIGMAPS)
    assert answer["kind"] == "ConfigMapList"  # authenticated by the certificate
    assert len(memfds) >= 2  # certificate and key
    script = tmp_path / "cert-plugin.py"
    script.write_text(
        "import json\nprint(json.dumps({'apiVersion': 'client.authentication.k8s.io/v1', "
        "'kind': 'ExecCredential', 'status': {"
        f"'clientCertificateData': {cert.decode()!r}, 'clientKeyData': {key.decode()!r}}}}}))\n"
    )
    plugin = {
        "apiVersion": "client.authentication.k8s.io/v1",
        "command": sys.executable,
        "args": [str(script)],
    }
    config = write_kubeconfig(tmp_path / "exec", cluster(api), {"exec": plugin})
    before = len(memfds)
    assert KubeClient.from_kubeconfig(str(config)).request("GET", CONFIGMAPS)
    assert len(memfds) >= before + 2
    body = key.split(b"-----")[2].strip()[:40]  # a piece of the key's base64
    for root in (scratch, Path(tempfile.gettempdir())):
        for path in root.rglob("*"):
            if path.is_file():
                assert body not in path.read_bytes(), path


# --- a failing API server: backoff, Retry-After --------------------------------------------


def failing_source(api_url: str, tmp_path: Path, **kwargs: Any) -> KubernetesSource:
    config = write_kubeconfig(tmp_path / "kubeconfig", {"server": api_url}, {})
    return KubernetesSource(MapHolder(), ["default"], kubeconfig=str(config), **kwargs)


def test_backoff_is_fast_then_exponential_with_jitter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scaled down 5x: fast retries (at most FAST_CAP apart) during the first
    `fast_seconds`, then doubling to the cap, each wait jittered."""
    monkeypatch.setattr(kubernetes, "BACKOFF_BASE", 0.05)
    monkeypatch.setattr(kubernetes, "FAST_CAP", 0.2)
    failing = FailingApi(500)
    source = failing_source(failing.url, tmp_path, fast_seconds=1.0, backoff_cap=1.6, warn_every=60)
    try:
        source.start()
        time.sleep(6.0)
    finally:
        source.stop()
        failing.close()
    streams = failing.by_stream()
    assert len(streams) == 2  # one per label
    for times in streams.values():
        start = times[0]
        fast = [b - a for a, b in pairwise(times) if b - start <= 1.0]
        slow = [b - a for a, b in pairwise(times) if a - start > 1.2]
        assert len(fast) >= 4 and max(fast) <= 0.2 + 0.25, fast  # slack: a loaded machine
        assert slow and slow[-1] >= 0.8 - 0.05, slow  # at the cap: between cap/2 and cap
        assert max(slow) <= 1.6 + 0.3, slow
        assert len(times) <= 25, times  # against ~60 at a constant fast pace
        assert len({round(gap, 3) for gap in fast + slow}) > len(fast + slow) // 2  # jitter


def test_retry_after_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    failing = FailingApi(503, retry_after="1")
    source = failing_source(failing.url, tmp_path, warn_every=60)
    try:
        source.start()
        time.sleep(3.5)
    finally:
        source.stop()
        failing.close()
    for times in failing.by_stream().values():
        gaps = [b - a for a, b in pairwise(times)]
        assert gaps, times
        assert all(1.0 - 0.05 <= gap <= 1.1 + 0.4 for gap in gaps), gaps  # not the fast 0.25
    assert sample("bbr_kubernetes_watch_errors_total", reason="server_error")


# --- a revoked credential: repeated warnings, metrics, then recovery -------------------------


def test_revoked_token_is_reported_until_it_works_again(
    api: ApiServer,
    kube: Kube,
    namespace: str,
    tmp_path: Path,
    watch: Start,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A token revoked while bbr runs: the map in force stays, the warning comes back with
    its reason every `warn_every`, the watch-error counter counts `unauthorized` and the
    last-sync time stops; a good token again ends it and the time moves on."""
    token = tmp_path / "token"
    token.write_text(ADMIN_TOKEN)
    config = write_kubeconfig(tmp_path / "kubeconfig", cluster(api), {"tokenFile": str(token)})
    kube.apply(namespace, "m", base="kept")
    caplog.set_level(logging.INFO, "bbr.sources.kubernetes")
    errors_before = sample("bbr_kubernetes_watch_errors_total", reason="unauthorized") or 0
    w: Watch = watch([namespace], kubeconfig=config, warn_every=0.7, fast_seconds=60)
    synced = sample("bbr_kubernetes_last_sync_timestamp_seconds")
    assert synced is not None and abs(synced - time.time()) < 10

    token.write_text("revoked-token")
    time.sleep(1.1)  # the last sync is now visibly in the past
    w.source.drop_connections()  # the watches reconnect, with the revoked token
    time.sleep(2.5)
    assert w.table() == {"kept": "kept"}
    warnings = [
        r
        for r in warnings_of(caplog)
        if r.fields["error"] == "unauthorized"  # type: ignore[attr-defined]
    ]
    assert len(warnings) >= 3, [r.getMessage() for r in warnings]  # per stream, repeated
    assert "still failing" in warnings[-1].getMessage()
    for record in warnings:
        assert "HTTP 401" in record.fields["reason"]  # type: ignore[attr-defined]
    errors = sample("bbr_kubernetes_watch_errors_total", reason="unauthorized") or 0
    assert errors - errors_before >= 4
    stale = sample("bbr_kubernetes_last_sync_timestamp_seconds")
    assert stale is not None and time.time() - stale >= 2.5

    token.write_text(ADMIN_TOKEN)
    kube.apply(namespace, "m", base="kept", adapters=["after"])
    w.wait_for({"kept": "kept", "after": "kept"})

    # The gauge is the oldest stream's sync: another stream may still be in its (fast,
    # at most FAST_CAP) backoff when this one has delivered the edit.
    def moved_on() -> bool:
        fresh = sample("bbr_kubernetes_last_sync_timestamp_seconds")
        return fresh is not None and fresh > stale

    assert poll_until(moved_on, timeout=10) is not None, sample(
        "bbr_kubernetes_last_sync_timestamp_seconds"
    )
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_an_unreachable_api_counts_connection_errors(
    api: ApiServer, kube: Kube, namespace: str, watch: Start
) -> None:
    proxy = CuttableProxy(api.port)
    try:
        before = sample("bbr_kubernetes_watch_errors_total", reason="connection") or 0
        w: Watch = watch([namespace], kubeconfig=api.kubeconfig(server=proxy.url))
        proxy.cut()
        time.sleep(1.5)
        after = sample("bbr_kubernetes_watch_errors_total", reason="connection") or 0
        assert after - before >= 2
        assert proxy.attempts  # it kept trying
        proxy.restore()
        kube.apply(namespace, "m", base="back")
        w.wait_for({"back": "back"}, 3.5)
    finally:
        proxy.close()
