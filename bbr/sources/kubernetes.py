"""Model-map ConfigMaps from the Kubernetes API: list, then watch (SPEC §3).

What is watched
    ConfigMaps labelled `inference.networking.k8s.io/bbr-managed: "true"` or
    `inference.llm-d.ai/ipp-managed: "true"`, in each `--namespace` (`*` = all; default
    the pod's own namespace, else the kubeconfig context's, else `default`).

    A label selector cannot OR two keys, so there is one list+watch *stream* per
    (namespace, label). The alternative, watching every ConfigMap and filtering with
    `is_managed`, was rejected: cluster-wide (`*`) it would download and hold every
    ConfigMap of the cluster (`kube-root-ca.crt` in every namespace, application
    configs, ...) to keep a handful, and the RBAC needed is the same either way. With
    server-side selectors the API server also turns "label removed" into a DELETED
    event for that stream. A ConfigMap carrying both labels is seen by both streams;
    the newest copy (highest resourceVersion, then latest arrival) is the one used,
    and it stays while either stream still has it.

How it is kept current
    Each stream lists (paginated), then watches from the list's resourceVersion with
    bookmarks on, resuming from the last resourceVersion seen whenever a watch ends or
    the connection drops. `410 Gone` (as an HTTP status or an ERROR event) means the
    resourceVersion was compacted away: the stream relists and replaces what it held
    in one step (no gap). While the API fails the stream retries fast for the first
    FAST_RETRY_SECONDS (0.125-1 s, jittered), then doubling to BACKOFF_CAP (30 s),
    honouring Retry-After; the failure is logged with its reason at once and every
    WARN_EVERY while it lasts, and counted (`bbr_kubernetes_watch_errors_total`), and
    the map in force does not change. The first map is published only when every
    stream has completed its first full list, so the server's readiness
    (`MapHolder.loaded`) waits for it.

    Events feed one map-builder thread: it takes every ConfigMap changed since its last
    round (a burst coalesces) and puts them in force with one `MapHolder.apply`, which
    costs work in proportion to them. Lists and events are decoded straight into what
    the map needs (`decode_page`, `decode_event`). A DELETED event reads the same for a
    delete and for a move to the other label (the object as it was, with the new
    resourceVersion), so its copy stays in force while a thread of its own asks the
    API server about that one ConfigMap: gone or no managed label, it goes at once;
    otherwise it stays until the other label's stream reports it, passes that version
    without it, or DELETE_GRACE (1 s) ends, which is also what happens when the API
    server cannot answer.

ConfigMap rules are the files' rules: `parse_configmap(rank=None)` orders conflicts by
creationTimestamp then namespace/name; an invalid ConfigMap keeps its last good
version (of the same object: a ConfigMap deleted and re-created invalid has none);
deletion or label removal drops its entries at once.

Client: a small stdlib (`http.client` + `ssl`) client rather than the official
`kubernetes` package. bbr needs two read-only calls (list and watch ConfigMaps) as raw
JSON, which is what `parse_configmap` takes; the official client would add ~10
transitive dependencies (urllib3, google-auth, requests-oauthlib, websocket-client...)
to the image, deserialize into typed models to be converted back, and gives little
control over the watch socket's timeouts and its abort on shutdown. This client
supports what bbr runs with: in-cluster config (service-account token re-read on every
request, so rotated tokens work, and the cluster CA), and kubeconfig files (`KUBECONFIG`
list or `~/.kube/config`) with bearer tokens (`token`, `tokenFile`), client
certificates and CAs given as files or inline `-data`, `insecure-skip-tls-verify`,
`exec` credential plugins, and plain-http servers (`kubectl proxy`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import gc
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
import yaml

from bbr import metrics
from bbr.logs import fields
from bbr.modelmap import (
    GIL_BUDGET,
    MANAGED_LABELS,
    ConfigMapError,
    ConfigMapParseError,
    ConfigMapRef,
    MapHolder,
    ModelConfig,
    Pacer,
    parse_configmap,
)
from bbr.sources.events import EventRecorder
from bbr.sources.files import LoadReport

log = logging.getLogger("bbr.sources.kubernetes")

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
ALL_NAMESPACES = "*"
# Retrying while the API fails (SPEC §3: API events in force within 2 s, including the
# first ones after a short outage such as an API server restart): for the first
# FAST_RETRY_SECONDS of an outage a stream retries within BACKOFF_BASE..FAST_CAP
# (doubling, jittered between half and all of it); after that the wait doubles from
# FAST_CAP to BACKOFF_CAP, so 40 streams of a replica stay under ~2 requests/s against
# a failing API server. A 429/503 Retry-After is waited out (up to RETRY_AFTER_CAP).
BACKOFF_BASE = 0.25
FAST_CAP = 1.0
FAST_RETRY_SECONDS = 30.0
BACKOFF_CAP = 30.0
RETRY_AFTER_CAP = 60.0
# A persisting failure is logged again, with its reason, this often (SPEC §5).
WARN_EVERY = 180.0
# The server ends each watch after this long (jittered) and the stream resumes from
# its resourceVersion; the socket gives up after WATCH_SECONDS + READ_GRACE of silence,
# which catches a half-open connection to an API server that vanished (TCP keepalive
# catches a vanished host sooner). Connecting (TCP, proxy CONNECT, TLS handshake) has
# its own CONNECT_TIMEOUT per step: a watch may be silent for minutes, a handshake not.
WATCH_SECONDS = 120
READ_GRACE = 30.0
CONNECT_TIMEOUT = 10.0
KEEPALIVE = (30, 10, 3)  # idle seconds, interval, probes
REQUEST_TIMEOUT = 30.0
ERROR_BODY_LIMIT = 64 * 1024  # of an error answer to a watch
PROXY_HEAD_LIMIT = 8 * 1024  # of a proxy's answer to CONNECT
LIST_PAGE = 250  # ConfigMaps per list page: ~0.6 ms to decode at most
# How long a ConfigMap that moved from one managed label to the other stays in force
# waiting for the other label's stream to report it (it normally does within ms).
HANDOVER_SECONDS = 5.0
# A DELETED event does not say whether the ConfigMap was deleted or moved to the other
# label (the API server sends the object as it was). bbr asks the API server which it
# was (`_check_once`) and drops the names as soon as it answers "gone" or "no managed
# label" (SPEC §3: at once); while it cannot answer, the names stay this long at most,
# waiting for the other label's stream.
DELETE_GRACE = 1.0
# That question's timeout, connecting and reading: an answer after the grace is moot.
CHECK_TIMEOUT = DELETE_GRACE


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line (YAML errors span several)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None)
    if problem and mark is not None:
        return f"not valid YAML: {problem} (line {mark.line + 1})"
    return " ".join(str(exc).split()) or type(exc).__name__


class KubeConfigError(Exception):
    """No usable in-cluster config or kubeconfig, or a bad namespace; the message says
    why and `flag` is the command-line flag to name (`--kubernetes`, `--namespace`)."""

    def __init__(self, message: str, flag: str = "--kubernetes") -> None:
        super().__init__(message)
        self.flag = flag


NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class ApiError(Exception):
    """The API answered with an error status; `retry_after` is its Retry-After (s)."""

    def __init__(self, status: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.retry_after = retry_after


class Gone(ApiError):
    """410 Gone: the resourceVersion (or list continue token) has expired."""


class CredentialError(ApiError):
    """No credential to send: an exec plugin failed, or the token file is unreadable."""

    def __init__(self, message: str) -> None:
        Exception.__init__(self, message)
        self.status = 0
        self.retry_after = None


class ProxyError(OSError):
    """The proxy refused to open a tunnel to the API server."""


# --------------------------------------------------------------------------- client

EXEC_API_VERSIONS = ("client.authentication.k8s.io/v1", "client.authentication.k8s.io/v1beta1")
EXEC_TIMEOUT = 60.0
EXEC_STDERR_KEPT = 400  # characters of a failing plugin's stderr kept in the error
EXEC_EXTENSION = "client.authentication.k8s.io/exec"  # cluster extension for provideClusterInfo


@dataclass
class _ExecPlugin:
    """A client-go exec credential plugin (`users[].user.exec`).

    One run at a time (a lock), however many streams ask: the first caller runs it and
    the others wait and take its credential. The credential is kept until its
    `expirationTimestamp`, or until the API answers 401 with it (`refresh`).
    """

    command: str
    args: list[str]
    env: dict[str, str]
    base_dir: str
    api_version: str = EXEC_API_VERSIONS[0]
    install_hint: str = ""
    cluster: dict[str, Any] | None = None  # sent as spec.cluster (provideClusterInfo)
    token: str | None = None
    cert: tuple[str, str] | None = None
    expires: float | None = None
    generation: int = 0  # bumped by every successful run
    runs: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def credential(self) -> tuple[str | None, tuple[str, str] | None, int]:
        """The current credential (running the plugin if there is none or it expired)
        and its generation, to hand to `refresh` if the API rejects it."""
        with self._lock:
            if (self.token is None and self.cert is None) or (
                self.expires is not None and time.time() > self.expires - 10
            ):
                self._run()
            return self.token, self.cert, self.generation

    def refresh(self, rejected: int) -> None:
        """The API answered 401 to the credential of generation `rejected`: run the
        plugin again, unless another caller already did since."""
        with self._lock:
            if self.generation == rejected:
                self._run()

    def _run(self) -> None:
        command = self.command
        if os.sep in command and not os.path.isabs(command):
            command = os.path.join(self.base_dir, command)
        spec: dict[str, Any] = {"interactive": False}
        if self.cluster is not None:
            spec["cluster"] = self.cluster
        env = {**os.environ, **self.env}
        env["KUBERNETES_EXEC_INFO"] = json.dumps(
            {"apiVersion": self.api_version, "kind": "ExecCredential", "spec": spec}
        )
        self.runs += 1
        name = f"exec credential plugin {self.command!r}"
        try:
            done = subprocess.run(
                [command, *self.args],
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=EXEC_TIMEOUT,
                check=False,
            )
        except FileNotFoundError:
            hint = f" ({_clean(self.install_hint)})" if self.install_hint else ""
            raise CredentialError(f"{name}: not found{hint}") from None
        except (OSError, subprocess.SubprocessError) as exc:
            raise CredentialError(f"{name}: {_describe(exc)}") from None
        stderr = _clean(done.stderr.decode("utf-8", "replace"))[-EXEC_STDERR_KEPT:]
        if done.returncode != 0:
            raise CredentialError(
                f"{name} exited {done.returncode}" + (f": {stderr}" if stderr else "")
            )
        try:
            answer = json.loads(done.stdout)
            if not isinstance(answer, dict) or answer.get("kind") != "ExecCredential":
                raise ValueError("not an ExecCredential")
            if answer.get("apiVersion") != self.api_version:
                raise ValueError(
                    f"apiVersion {answer.get('apiVersion')!r}, expected {self.api_version!r}"
                )
            status = answer.get("status")
            if not isinstance(status, dict):
                raise ValueError("no status")
            token = status.get("token") or None
            cert_pem, key_pem = status.get("clientCertificateData"), status.get("clientKeyData")
            if token is not None and not isinstance(token, str):
                raise ValueError("status.token is not a string")
            if bool(cert_pem) != bool(key_pem):
                raise ValueError("clientCertificateData and clientKeyData go together")
            cert = (str(cert_pem), str(key_pem)) if cert_pem else None
            if token is None and cert is None:
                raise ValueError("neither a token nor a client certificate")
            expires_text = status.get("expirationTimestamp")
            expires = (
                datetime.fromisoformat(str(expires_text).replace("Z", "+00:00")).timestamp()
                if expires_text
                else None
            )
        except (ValueError, TypeError) as exc:
            detail = _one_line(exc) + (f" (stderr: {stderr})" if stderr else "")
            raise CredentialError(f"{name}: bad output: {detail}") from None
        self.token, self.cert, self.expires = token, cert, expires
        self.generation += 1


def _clean(text: str) -> str:
    """Text from elsewhere on one line, without control characters."""
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def no_proxy_matches(host: str, port: int, no_proxy: str) -> bool:
    """Whether NO_PROXY exempts host:port, by the rules of Go's httpproxy (which
    client-go uses): `*`; IP addresses and CIDRs; `example.com` (that domain and its
    subdomains), `.example.com` / `*.example.com` (subdomains only); an optional `:port`."""
    host = host.lower().strip("[]")
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        network = None
        with contextlib.suppress(ValueError):
            network = ipaddress.ip_network(entry, strict=False)
        if network is not None:  # an IP address or a CIDR: matches IP hosts only
            if ip is not None and ip in network:
                return True
            continue
        name, entry_port = entry, ""
        if entry.startswith("["):  # [::1]:port
            name, _, rest = entry[1:].partition("]")
            entry_port = rest.lstrip(":")
        elif entry.count(":") == 1:
            name, entry_port = entry.split(":")
        if entry_port and entry_port != str(port):
            continue
        address = None
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(name)
        if address is not None:  # an IP address with a port
            if ip is not None and ip == address:
                return True
            continue
        if name.startswith("*."):
            name = name[1:]
        if name.startswith("."):
            if host.endswith(name):
                return True
        elif host == name or host.endswith("." + name):
            return True
    return False


def proxy_for(
    scheme: str, host: str, port: int, proxy_url: str | None, environ: Mapping[str, str]
) -> urllib.parse.SplitResult | None:
    """The proxy to reach the API server through, as client-go picks it: the
    kubeconfig's `proxy-url` always; else HTTPS_PROXY (for https servers) or
    HTTP_PROXY (for http), upper case first, then lower case, except for loopback
    hosts and hosts NO_PROXY (or no_proxy) exempts."""
    where = "proxy-url"
    if not proxy_url:
        names = ("HTTP_PROXY", "http_proxy")
        if scheme == "https":
            names = ("HTTPS_PROXY", "https_proxy")
        where, proxy_url = next(((n, environ[n]) for n in names if environ.get(n)), ("", ""))
        if not proxy_url or _is_loopback(host):
            return None
        no_proxy = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
        if no_proxy_matches(host, port, no_proxy):
            return None
        if "://" not in proxy_url:  # Go reads a bare host:port as http://host:port
            proxy_url = "http://" + proxy_url
    url = urllib.parse.urlsplit(proxy_url)
    if url.scheme.startswith("socks"):
        raise KubeConfigError(f"{where} {url.scheme}://...: SOCKS proxies are not supported")
    if url.scheme not in ("http", "https") or not url.hostname:
        raise KubeConfigError(f"{where}: {_clean(proxy_url)[:200]!r} is not an http(s) proxy URL")
    try:
        url.port  # noqa: B018 - validates it
    except ValueError:
        raise KubeConfigError(f"{where}: bad port in {_clean(proxy_url)[:200]!r}") from None
    return url


def _proxy_authorization(proxy: urllib.parse.SplitResult) -> str | None:
    if proxy.username is None:
        return None
    user = urllib.parse.unquote(proxy.username)
    password = urllib.parse.unquote(proxy.password or "")
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class _Connection(http.client.HTTPConnection):
    """One connection to the API server, direct or through a proxy. Connecting (TCP,
    proxy CONNECT, TLS handshake) times out after the client's `connect_timeout`;
    reads after `timeout` (a watch may be silent for its whole timeoutSeconds)."""

    def __init__(
        self, client: KubeClient, timeout: float, connect_timeout: float | None = None
    ) -> None:
        super().__init__(client.host, client.port, timeout=timeout)
        self._client = client
        self._read_timeout = timeout
        self._connect_timeout = connect_timeout

    def connect(self) -> None:
        self.sock = self._client.open_socket(self._read_timeout, self._connect_timeout)


def _tunnel(sock: socket.socket, host: str, port: int, authorization: str | None) -> None:
    """HTTP CONNECT through a proxy (RFC 9110 §9.3.6); raises ProxyError unless 2xx."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", "User-Agent: bbr"]
    if authorization:
        lines.append(f"Proxy-Authorization: {authorization}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # byte by byte: nothing of the tunnel is read
        byte = sock.recv(1)
        if not byte:
            raise ProxyError("proxy closed the connection during CONNECT")
        head += byte
        if len(head) > PROXY_HEAD_LIMIT:
            raise ProxyError(f"proxy answer to CONNECT over {PROXY_HEAD_LIMIT} bytes")
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].startswith("2"):
        raise ProxyError(f"proxy refused CONNECT {target}: {_clean(status)[:200]}")


class KubeClient:
    """Just enough of a Kubernetes API client: JSON requests and watch streams."""

    def __init__(
        self,
        server: str,
        *,
        ca_data: bytes | None = None,
        insecure: bool = False,
        token: str | None = None,
        token_file: str | None = None,
        client_cert: tuple[bytes, bytes] | None = None,
        exec_plugin: _ExecPlugin | None = None,
        namespace: str = "default",
        in_cluster: bool = False,
        tls_server_name: str | None = None,
        proxy_url: str | None = None,
        basic_auth: tuple[str, str] | None = None,
        impersonate: Sequence[tuple[str, str]] = (),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        url = urllib.parse.urlsplit(server)
        try:
            url.port  # noqa: B018 - validates it
        except ValueError:
            raise KubeConfigError(f"server {server!r}: bad port") from None
        if url.scheme not in ("http", "https") or not url.hostname:
            raise KubeConfigError(f"server {server!r} is not an http(s) URL")
        self.server = server
        self.scheme = url.scheme
        self.host = url.hostname
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self.namespace = namespace
        self.in_cluster = in_cluster
        self.tls_server_name = tls_server_name or None
        self.connect_timeout = CONNECT_TIMEOUT
        self.proxy = proxy_for(
            self.scheme, self.host, self.port, proxy_url, os.environ if environ is None else environ
        )
        self._proxy_auth = _proxy_authorization(self.proxy) if self.proxy else None
        self._token = token
        self._token_file = token_file
        self._file_token: str | None = None  # last token read from token_file
        self._exec = exec_plugin
        self._basic = (
            "Basic " + base64.b64encode(f"{basic_auth[0]}:{basic_auth[1]}".encode()).decode()
            if basic_auth
            else None
        )
        self._impersonate = list(impersonate)
        self._ca_data = ca_data
        self._insecure = insecure
        self._client_cert = client_cert
        self._ssl: ssl.SSLContext | None = None
        self._proxy_ssl: ssl.SSLContext | None = None
        self._ssl_cert_from_exec: tuple[str, str] | None = None
        if self.scheme == "https":
            self._ssl = self._context(client_cert)
        if self.proxy is not None and self.proxy.scheme == "https":
            # Go's transport verifies an https proxy with the cluster's TLS settings.
            self._proxy_ssl = self._context(None)
        if token_file:
            self._read_token_file()  # unreadable at start: a config error (exit 2)

    # -- configuration

    @classmethod
    def load(
        cls, kubeconfig: str | None = None, *, service_account_dir: str = SERVICE_ACCOUNT_DIR
    ) -> KubeClient:
        """In-cluster config when running in a pod (and no kubeconfig is given), else
        the kubeconfig: `kubeconfig`, else $KUBECONFIG, else ~/.kube/config."""
        if kubeconfig is None:
            in_cluster = cls.in_cluster_config(service_account_dir)
            if in_cluster is not None:
                return in_cluster
        return cls.from_kubeconfig(kubeconfig)

    @classmethod
    def in_cluster_config(cls, service_account_dir: str = SERVICE_ACCOUNT_DIR) -> KubeClient | None:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT")
        token_file = os.path.join(service_account_dir, "token")
        if not host or not port or not os.path.isfile(token_file):
            return None
        try:
            ca = Path(service_account_dir, "ca.crt").read_bytes()
        except OSError as exc:
            raise KubeConfigError(f"in-cluster CA {service_account_dir}/ca.crt: {exc}") from None
        if ":" in host:
            host = f"[{host}]"
        try:
            return cls(
                f"https://{host}:{port}",
                ca_data=ca,
                token_file=token_file,
                namespace=pod_namespace(service_account_dir) or "default",
                in_cluster=True,
            )
        except CredentialError as exc:
            raise KubeConfigError(f"in-cluster config: {exc}") from None

    @classmethod
    def from_kubeconfig(cls, path: str | None = None) -> KubeClient:
        paths = (
            [path]
            if path
            else [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
            or [os.path.expanduser("~/.kube/config")]
        )
        merged: dict[str, Any] = {"clusters": {}, "users": {}, "contexts": {}}
        current: str | None = None
        found = []
        for candidate in paths:
            try:
                doc = yaml.safe_load(Path(candidate).read_text())
            except FileNotFoundError:
                continue
            except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
                raise KubeConfigError(f"kubeconfig {candidate}: {_one_line(exc)}") from None
            if not isinstance(doc, dict):
                raise KubeConfigError(f"kubeconfig {candidate}: not a mapping")
            found.append(candidate)
            base_dir = os.path.dirname(os.path.abspath(candidate))
            current = current or doc.get("current-context")
            for kind, key in (("clusters", "cluster"), ("users", "user"), ("contexts", "context")):
                entries = doc.get(kind) or []
                if not isinstance(entries, list):
                    raise KubeConfigError(f"kubeconfig {candidate}: {kind} is not a list")
                for entry in entries:
                    if not isinstance(entry, dict) or entry.get("name") in merged[kind]:
                        continue
                    section = entry.get(key) or {}
                    if not isinstance(section, dict):
                        raise KubeConfigError(
                            f"kubeconfig {candidate}: {kind} {entry.get('name')!r}: "
                            f"{key} is not a mapping"
                        )
                    merged[kind][entry.get("name")] = (dict(section), base_dir)
        if not found:
            raise KubeConfigError(
                "no Kubernetes config: not in a pod and no kubeconfig at " + ", ".join(paths)
            )
        where = ", ".join(found)
        if not current or current not in merged["contexts"]:
            raise KubeConfigError(f"kubeconfig {where}: no current-context")
        context, _ = merged["contexts"][current]
        if context.get("cluster") not in merged["clusters"]:
            raise KubeConfigError(f"kubeconfig {where}: context {current!r} has no cluster")
        cluster, cluster_dir = merged["clusters"][context["cluster"]]
        user_name = context.get("user")
        user, user_dir = merged["users"].get(user_name, ({}, cluster_dir))
        in_user = f"kubeconfig {where}: user {user_name!r}"

        def fail(message: str) -> KubeConfigError:
            return KubeConfigError(f"{in_user}: {message}")

        def text(section: dict[str, Any], key: str, owner: str) -> str | None:
            value = section.get(key)
            if value is None or value == "":
                return None
            if not isinstance(value, str):
                raise KubeConfigError(f"{owner}: {key} is not a string")
            return value

        def data(section: dict[str, Any], base_dir: str, key: str, owner: str) -> bytes | None:
            if section.get(f"{key}-data"):
                try:
                    return base64.b64decode(section[f"{key}-data"], validate=True)
                except (binascii.Error, TypeError, ValueError):
                    raise KubeConfigError(f"{owner}: {key}-data: not base64") from None
            name = text(section, key, owner)
            if name:
                file = os.path.join(base_dir, os.path.expanduser(name))
                try:
                    return Path(file).read_bytes()
                except OSError as exc:
                    raise KubeConfigError(f"{owner}: {key} {file}: {exc.strerror}") from None
            return None

        in_cluster = f"kubeconfig {where}: cluster {context['cluster']!r}"
        server = text(cluster, "server", in_cluster)
        if not server:
            raise KubeConfigError(f"{in_cluster}: no server")
        if user.get("auth-provider"):
            provider = user["auth-provider"]
            name = provider.get("name") if isinstance(provider, dict) else None
            raise fail(
                f"auth-provider {name!r} is not supported (client-go removed the gcp and "
                "azure providers in 1.26): use an exec credential plugin instead "
                "(gke-gcloud-auth-plugin, kubelogin, aws eks get-token)"
            )
        cert_pem = data(user, user_dir, "client-certificate", in_user)
        key_pem = data(user, user_dir, "client-key", in_user)
        if bool(cert_pem) != bool(key_pem):
            raise fail("client-certificate and client-key go together")
        ca_data = data(cluster, cluster_dir, "certificate-authority", in_cluster)
        exec_plugin = None
        if user.get("exec") is not None:
            exec_plugin = _exec_plugin(user["exec"], user_dir, in_user, cluster, ca_data)
        token = text(user, "token", in_user)
        token_file = text(user, "tokenFile", in_user)
        username, password = text(user, "username", in_user), text(user, "password", in_user)
        if username and (token or token_file):
            raise fail("username/password and a token are two authentication methods; use one")
        impersonate: list[tuple[str, str]] = []
        for key, header in (("as", "Impersonate-User"), ("as-uid", "Impersonate-Uid")):
            if value := text(user, key, in_user):
                impersonate.append((header, value))
        groups = user.get("as-groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise fail("as-groups is not a list of strings")
        impersonate += [("Impersonate-Group", g) for g in groups]
        extra = user.get("as-user-extra") or {}
        if not isinstance(extra, dict) or not all(
            isinstance(v, list) and all(isinstance(i, str) for i in v) for v in extra.values()
        ):
            raise fail("as-user-extra is not a mapping of lists of strings")
        for key, values in extra.items():
            header = "Impersonate-Extra-" + urllib.parse.quote(str(key), safe="-!#$&'*+.^_`|~")
            impersonate += [(header, v) for v in values]
        if impersonate and not any(h == "Impersonate-User" for h, _ in impersonate):
            raise fail("as-groups, as-uid and as-user-extra need as (the user to impersonate)")
        namespace = text(context, "namespace", f"kubeconfig {where}: context {current!r}")
        try:
            return cls(
                server,
                ca_data=ca_data,
                insecure=bool(cluster.get("insecure-skip-tls-verify")),
                token=token,
                token_file=os.path.join(user_dir, os.path.expanduser(token_file))
                if token_file
                else None,
                client_cert=(cert_pem, key_pem) if cert_pem and key_pem else None,
                exec_plugin=exec_plugin,
                namespace=namespace or "default",
                tls_server_name=text(cluster, "tls-server-name", in_cluster),
                proxy_url=text(cluster, "proxy-url", in_cluster),
                basic_auth=(username, password or "") if username else None,
                impersonate=impersonate,
            )
        except CredentialError as exc:
            raise fail(f"tokenFile: {exc}") from None
        except KubeConfigError as exc:
            raise KubeConfigError(f"kubeconfig {where}: {exc}") from None

    def _context(self, client_cert: tuple[bytes, bytes] | None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        if self._insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        elif self._ca_data:
            try:
                context = ssl.create_default_context(
                    cadata=self._ca_data.decode("ascii", "replace")
                )
            except ssl.SSLError as exc:
                raise KubeConfigError(
                    f"certificate-authority: not a PEM certificate ({exc.reason})"
                ) from None
        if client_cert is not None:
            from bbr.tls import in_memory  # the key stays off disk (a memfd)

            with in_memory(client_cert[0]) as cert_path, in_memory(client_cert[1]) as key_path:
                try:
                    context.load_cert_chain(cert_path, key_path)
                except ssl.SSLError as exc:
                    raise KubeConfigError(f"client certificate: {exc}") from None
        return context

    # -- requests

    def _headers(self) -> dict[str, str]:
        return self._authorized()[0]

    def _read_token_file(self) -> str:
        assert self._token_file is not None
        try:  # re-read every time: projected service-account tokens rotate
            self._file_token = Path(self._token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            if self._file_token is None:  # else the last token read stays in use
                reason = getattr(exc, "strerror", None) or _one_line(exc)
                raise CredentialError(f"token file {self._token_file}: {reason}") from None
        return self._file_token

    def _authorized(self) -> tuple[dict[str, str], int | None]:
        """Request headers with the current credential, and the exec plugin's credential
        generation (None without a plugin), to refresh it on 401."""
        headers = {"Accept": "application/json", "User-Agent": "bbr"}
        token = self._token
        generation = None
        if self._token_file:
            token = self._read_token_file()
        if self._exec is not None:
            exec_token, exec_cert, generation = self._exec.credential()
            token = exec_token or token
            if exec_cert is not None and exec_cert != self._ssl_cert_from_exec:
                self._ssl = self._context((exec_cert[0].encode(), exec_cert[1].encode()))
                self._ssl_cert_from_exec = exec_cert
        if token:
            headers["Authorization"] = f"Bearer {token}"
        elif self._basic:
            headers["Authorization"] = self._basic
        if self._proxy_auth and self.scheme == "http":  # forwarded, not tunnelled
            headers["Proxy-Authorization"] = self._proxy_auth
        return headers, generation

    def open_socket(
        self, read_timeout: float, connect_timeout: float | None = None
    ) -> socket.socket:
        """A connected socket to the API server (through the proxy, TLS done), with
        `connect_timeout` (default the client's) on every step of connecting and
        `read_timeout` after."""
        proxy = self.proxy
        if proxy is None:
            address = (self.host, self.port)
        else:
            assert proxy.hostname is not None
            address = (proxy.hostname, proxy.port or (443 if proxy.scheme == "https" else 80))
        connect_timeout = self.connect_timeout if connect_timeout is None else connect_timeout
        sock: socket.socket = socket.create_connection(address, timeout=connect_timeout)
        try:
            _keepalive(sock)
            if proxy is not None and self._proxy_ssl is not None:
                sock = self._proxy_ssl.wrap_socket(sock, server_hostname=proxy.hostname)
            if proxy is not None and self.scheme == "https":
                _tunnel(sock, self.host, self.port, self._proxy_auth)
            if self.scheme == "https":
                assert self._ssl is not None
                sock = self._ssl.wrap_socket(
                    sock, server_hostname=self.tls_server_name or self.host
                )
            sock.settimeout(read_timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    def connect(
        self, timeout: float, connect_timeout: float | None = None
    ) -> http.client.HTTPConnection:
        """A connection (not yet open) whose reads time out after `timeout`."""
        return _Connection(self, timeout, connect_timeout)

    def url(self, path: str, query: Mapping[str, str | int] | None = None) -> str:
        target = self.prefix + path + ("?" + urllib.parse.urlencode(query) if query else "")
        if self.proxy is not None and self.scheme == "http":  # a forward proxy: absolute
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"http://{host}:{self.port}{target}"
        return target

    def _send(
        self,
        conn: http.client.HTTPConnection,
        method: str,
        target: str,
        headers: Mapping[str, str],
        body: bytes | None = None,
    ) -> http.client.HTTPResponse:
        """Send one request; impersonation headers may repeat, so no `conn.request`."""
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in [*headers.items(), *self._impersonate]:
            conn.putheader(name, value)
        if body is not None or method in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", str(len(body or b"")))
        conn.endheaders(body)
        return conn.getresponse()

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str | int] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float = REQUEST_TIMEOUT,
        connect_timeout: float | None = None,
        decode: Callable[[bytes], Any] = json.loads,
    ) -> Any:
        """One JSON request; returns the answer as `decode` makes it, raises ApiError or
        OSError. `timeout` is for reads, `connect_timeout` (default the client's) for
        connecting. A 401 to an exec plugin's credential runs the plugin again and
        retries once."""
        payload = json.dumps(body).encode() if body is not None else None
        for attempt in (1, 2):
            headers, generation = self._authorized()  # may change the TLS context
            if payload is not None:
                headers["Content-Type"] = content_type
            conn = self.connect(timeout, connect_timeout)
            try:
                response = self._send(conn, method, self.url(path, query), headers, payload)
                data = response.read()
            finally:
                conn.close()
            if response.status == 401 and attempt == 1 and generation is not None:
                assert self._exec is not None
                self._exec.refresh(generation)
                continue
            _raise_for_status(response.status, data, response.getheader("Retry-After"))
            return decode(data) if data else None
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def stream(
        self,
        path: str,
        query: Mapping[str, str | int],
        *,
        timeout: float,
        on_connect: Callable[[http.client.HTTPConnection | None], None] = lambda _: None,
        decode: Callable[[bytes], Any] = json.loads,
    ) -> Iterator[Iterator[dict[str, Any]]]:
        """A watch: yields an iterator of decoded events. `on_connect(conn)` lets the
        caller keep the connection to abort it from another thread (and gets None
        when it is closed). `timeout` is for reads; connecting has `connect_timeout`."""
        for attempt in (1, 2):
            headers, generation = self._authorized()  # may change the TLS context
            conn = self.connect(timeout)
            on_connect(conn)
            try:
                conn.connect()
                response = self._send(conn, "GET", self.url(path, query), headers)
                if response.status == 401 and attempt == 1 and generation is not None:
                    assert self._exec is not None
                    response.read()
                    self._exec.refresh(generation)
                    continue
                if response.status != 200:
                    _raise_for_status(
                        response.status,
                        response.read(ERROR_BODY_LIMIT),
                        response.getheader("Retry-After"),
                    )

                def events(
                    response: http.client.HTTPResponse = response,
                ) -> Iterator[dict[str, Any]]:
                    while True:
                        line = response.readline()
                        if not line:
                            return
                        if line.strip():
                            event = decode(line)
                            if isinstance(event, dict):
                                yield event

                yield events()
                return
            finally:
                on_connect(None)
                conn.close()


def _keepalive(sock: socket.socket | None) -> None:
    if sock is None:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        idle, interval, count = KEEPALIVE
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    with contextlib.suppress(TypeError, ValueError, IndexError, OverflowError):
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return None


def _raise_for_status(status: int, data: bytes, retry_after: str | None = None) -> None:
    if status < 400:
        return
    message = data[:500].decode("utf-8", "replace")
    with contextlib.suppress(ValueError, AttributeError):
        message = json.loads(data).get("message") or message
    message = _clean(message)[:500]
    if status == 410:
        raise Gone(status, message)
    raise ApiError(status, message, _retry_after(retry_after) if status in (429, 503) else None)


def _exec_plugin(
    spec: Any,
    base_dir: str,
    owner: str,
    cluster: Mapping[str, Any],
    ca_data: bytes | None,
) -> _ExecPlugin:
    """`user.exec`, checked field by field (a bad field is a config error naming it)."""
    if not isinstance(spec, dict):
        raise KubeConfigError(f"{owner}: exec is not a mapping")
    command = spec.get("command")
    if not isinstance(command, str) or not command:
        raise KubeConfigError(f"{owner}: exec.command: missing or not a string")
    api_version = spec.get("apiVersion")
    if api_version not in EXEC_API_VERSIONS:
        raise KubeConfigError(
            f"{owner}: exec.apiVersion {api_version!r}: not one of " + ", ".join(EXEC_API_VERSIONS)
        )
    args = spec.get("args") or []
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise KubeConfigError(f"{owner}: exec.args: not a list of strings")
    env: dict[str, str] = {}
    entries = spec.get("env") or []
    if not isinstance(entries, list):
        raise KubeConfigError(f"{owner}: exec.env: not a list")
    for i, entry in enumerate(entries):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("name"), str)
            and entry["name"]
            and isinstance(entry.get("value"), str)
        ):
            raise KubeConfigError(f"{owner}: exec.env[{i}]: needs a string name and value")
        env[entry["name"]] = entry["value"]
    mode = spec.get("interactiveMode") or "IfAvailable"
    if mode == "Always":
        raise KubeConfigError(
            f"{owner}: exec.interactiveMode Always: bbr has no terminal to prompt on"
        )
    if mode not in ("Never", "IfAvailable"):
        raise KubeConfigError(f"{owner}: exec.interactiveMode {mode!r}: not Never/IfAvailable")
    hint = spec.get("installHint")
    cluster_info = None
    if spec.get("provideClusterInfo"):
        cluster_info = {"server": cluster.get("server")}
        for key, out in (
            ("tls-server-name", "tls-server-name"),
            ("insecure-skip-tls-verify", "insecure-skip-tls-verify"),
            ("proxy-url", "proxy-url"),
        ):
            if cluster.get(key):
                cluster_info[out] = cluster[key]
        if ca_data:
            cluster_info["certificate-authority-data"] = base64.b64encode(ca_data).decode()
        for extension in cluster.get("extensions") or []:
            if isinstance(extension, dict) and extension.get("name") == EXEC_EXTENSION:
                cluster_info["config"] = extension.get("extension")
    return _ExecPlugin(
        command=command,
        args=list(args),
        env=env,
        base_dir=base_dir,
        api_version=api_version,
        install_hint=hint if isinstance(hint, str) else "",
        cluster=cluster_info,
    )


def pod_namespace(service_account_dir: str = SERVICE_ACCOUNT_DIR) -> str | None:
    try:
        namespace = Path(service_account_dir, "namespace").read_text().strip()
    except OSError:
        return None
    return namespace or None


def default_namespace(
    client: KubeClient | None, service_account_dir: str = SERVICE_ACCOUNT_DIR
) -> str:
    """The pod's own namespace, else the kubeconfig context's, else `default`."""
    return pod_namespace(service_account_dir) or (client.namespace if client else "default")


# --------------------------------------------------------------------------- source


class _Copy(msgspec.Struct, frozen=True, gc=False):
    """One stream's latest copy of a ConfigMap: only what the map needs of it
    (`_slim`), not the whole object (managedFields, other data keys, ...). Like
    ModelConfig, untracked by the cyclic GC (decoded JSON holds no cycle), and so are
    its two dicts of strings (labels, read on arrival only, are left out: a dict in a
    dict would be tracked), so the copies an edit leaves are never walked."""

    metadata: dict[str, Any]
    data: Any
    version: int
    seq: int

    @property
    def obj(self) -> dict[str, Any]:
        return {"metadata": self.metadata, "data": self.data}


_KEEP_METADATA = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
_KEEP_DATA = ("baseModel", "adapters")


def _slim(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a ConfigMap that `parse_configmap` and the streams read."""
    metadata = obj.get("metadata")
    if isinstance(metadata, Mapping):
        kept = {key: metadata[key] for key in _KEEP_METADATA if key in metadata}
        labels = metadata.get("labels")
        if isinstance(labels, Mapping):
            kept["labels"] = {key: labels[key] for key in MANAGED_LABELS if key in labels}
        metadata = kept
    data = obj.get("data")
    if isinstance(data, Mapping):
        data = {key: data[key] for key in _KEEP_DATA if key in data}
    return {"metadata": metadata, "data": data}


# Lists and watch events are decoded straight into what the map needs (msgspec, typed):
# managedFields and other data keys are skipped without being built, ~8x faster than
# json.loads on a 500-item page, which would otherwise hold the GIL (and the request
# loop) for ~10 ms per page at scale. Values are checked as the API guarantees them
# (strings); anything else falls back to json.loads and `_slim`.


class _Meta(msgspec.Struct):
    name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    resourceVersion: str | None = None
    creationTimestamp: str | None = None
    labels: dict[str, str] | None = None


class _Object(msgspec.Struct):
    metadata: _Meta | None = None
    data: dict[str, msgspec.Raw] | None = None
    # A watch ERROR event's object is a Status:
    code: int | None = None
    message: str | None = None


class _Page(msgspec.Struct):
    items: list[_Object] | None = None
    metadata: dict[str, Any] | None = None


class _Event(msgspec.Struct):
    type: str | None = None
    object: _Object | None = None


_PAGE = msgspec.json.Decoder(_Page)
_EVENT = msgspec.json.Decoder(_Event)
_TEXT = msgspec.json.Decoder(str)


def _slim_typed(obj: _Object) -> dict[str, Any]:
    """`_slim` of a typed object: plain dicts, only what the map needs."""
    meta = obj.metadata
    metadata: dict[str, Any] | None = None
    if meta is not None:
        metadata = {
            key: value
            for key, value in (
                ("name", meta.name),
                ("namespace", meta.namespace),
                ("uid", meta.uid),
                ("resourceVersion", meta.resourceVersion),
                ("creationTimestamp", meta.creationTimestamp),
            )
            if value is not None
        }
        if meta.labels is not None:
            metadata["labels"] = {k: meta.labels[k] for k in MANAGED_LABELS if k in meta.labels}
    data: dict[str, Any] | None = None
    if obj.data is not None:
        data = {key: _TEXT.decode(obj.data[key]) for key in _KEEP_DATA if key in obj.data}
    return {"metadata": metadata, "data": data}


def decode_page(raw: bytes) -> dict[str, Any]:
    """A list answer: {"metadata": ..., "items": [slim ConfigMaps]}."""
    try:
        page = _PAGE.decode(raw)
        items = [_slim_typed(item) for item in page.items or ()]
    except msgspec.ValidationError:  # not as the API sends it: the general way
        answer = json.loads(raw)
        if not isinstance(answer, dict):
            raise ValueError("a list answer that is not an object") from None
        items = [_slim(i) for i in answer.get("items") or () if isinstance(i, Mapping)]
        return {"metadata": answer.get("metadata") or {}, "items": items}
    return {"metadata": page.metadata or {}, "items": items}


def decode_event(raw: bytes) -> dict[str, Any]:
    """A watch event: {"type": ..., "object": slim ConfigMap, or a Status's code and message}."""
    try:
        event = _EVENT.decode(raw)
        obj = event.object
        if obj is None:
            return {"type": event.type}
        if event.type == "ERROR":
            return {"type": "ERROR", "object": {"code": obj.code, "message": obj.message}}
        return {"type": event.type, "object": _slim_typed(obj)}
    except msgspec.ValidationError:  # not as the API sends it: the general way
        answer = json.loads(raw)
        if not isinstance(answer, dict):
            return {}
        if isinstance(answer.get("object"), Mapping) and answer.get("type") != "ERROR":
            answer["object"] = _slim(answer["object"])
        return answer


def _labelled(obj: Mapping[str, Any], label: str) -> bool:
    labels = _meta(obj, "labels")
    return isinstance(labels, Mapping) and labels.get(label) == "true"


@dataclass(slots=True)
class _Stream:
    namespace: str | None  # None: all namespaces
    label: str
    objects: dict[ConfigMapRef, _Copy] = field(default_factory=dict)
    resource_version: str | None = None
    listed: bool = False
    conn: http.client.HTTPConnection | None = None
    failures: int = 0  # consecutive, for the backoff
    slow_failures: int = 0  # of those, after the fast-retry phase
    gone_streak: int = 0  # 410s without a good watch in between
    outage_since: float | None = None
    warned_at: float | None = None  # monotonic time of the last warning of this outage
    warned_reason: str | None = None
    synced_at: float | None = None  # monotonic: last list done or watch open/ended well
    synced_wall: float = 0.0  # the same, Unix time (the gauge)

    @property
    def path(self) -> str:
        if self.namespace is None:
            return "/api/v1/configmaps"
        return f"/api/v1/namespaces/{urllib.parse.quote(self.namespace, safe='')}/configmaps"

    @property
    def selector(self) -> str:
        return f"{self.label}=true"

    def __str__(self) -> str:
        return f"{self.namespace or ALL_NAMESPACES} [{self.selector}]"


class _Parsed(msgspec.Struct, frozen=True, gc=False):  # untracked, as _Copy
    version: str
    config: ModelConfig | None
    error: ConfigMapError | None
    # A DELETED event carries the object as it was with the *new* resourceVersion, so the
    # version alone does not say what was parsed: the data it was parsed from, too.
    data: Any = None


def _ref(obj: Mapping[str, Any]) -> ConfigMapRef | None:
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping) or not metadata.get("name"):
        return None
    return ConfigMapRef(str(metadata.get("namespace") or "default"), str(metadata["name"]))


def _meta(obj: Mapping[str, Any], key: str) -> Any:
    metadata = obj.get("metadata")
    return metadata.get(key) if isinstance(metadata, Mapping) else None


def _version(obj: Mapping[str, Any]) -> int:
    return _rv(_meta(obj, "resourceVersion"))


def _rv(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


class KubernetesSource:
    """Keeps the model map in step with labelled ConfigMaps; feeds a MapHolder."""

    name = "kubernetes"

    def __init__(
        self,
        holder: MapHolder,
        namespaces: Sequence[str] = (),
        *,
        on_reload: Callable[[LoadReport], None] | None = None,
        kubeconfig: str | None = None,
        client: KubeClient | None = None,
        service_account_dir: str = SERVICE_ACCOUNT_DIR,
        backoff_cap: float = BACKOFF_CAP,
        watch_seconds: int = WATCH_SECONDS,
        fast_seconds: float = FAST_RETRY_SECONDS,
        warn_every: float = WARN_EVERY,
        record_events: bool = False,
    ) -> None:
        """Raises KubeConfigError when there is no usable config. `record_events`:
        post Kubernetes Events on the ConfigMaps (bbr.sources.events)."""
        self.holder = holder
        self.on_reload = on_reload
        chosen = [ns.strip() for ns in namespaces if ns.strip()]
        for ns in chosen:
            if ns != ALL_NAMESPACES and not (len(ns) <= 63 and NAMESPACE_RE.fullmatch(ns)):
                raise KubeConfigError(f"{ns!r} is not a namespace name", "--namespace")
        self.client = client or KubeClient.load(kubeconfig, service_account_dir=service_account_dir)
        if not chosen:
            chosen = [default_namespace(self.client, service_account_dir)]
        scopes: list[str | None] = (
            [None] if ALL_NAMESPACES in chosen else list(dict.fromkeys(chosen))
        )
        self.namespaces = [ns or ALL_NAMESPACES for ns in scopes]
        self._streams = [_Stream(ns, label) for ns in scopes for label in MANAGED_LABELS]
        self.backoff_cap = backoff_cap
        self.fast_seconds = fast_seconds
        self.warn_every = warn_every
        self.watch_seconds = watch_seconds
        self._lock = threading.Lock()
        self._seq = 0
        self._parsed: dict[ConfigMapRef, _Parsed] = {}
        # Last good version of each ConfigMap (with its uid), kept while it is invalid.
        self._last_good: dict[ConfigMapRef, tuple[str, ModelConfig]] = {}
        # What the map builder must look at again, and what it put in force.
        self._dirty: set[ConfigMapRef] = set()
        self._wake = threading.Condition(self._lock)
        self._in_force: dict[ConfigMapRef, ModelConfig] = {}
        self._invalid: dict[ConfigMapRef, ConfigMapError] = {}
        self._published_once = False
        # A ConfigMap that left one label's stream but still carries the other label:
        # kept (copy, target label, deadline) until that stream has it, so moving
        # between the labels never leaves a gap.
        self._handover: dict[ConfigMapRef, tuple[_Copy, str, float]] = {}
        # ConfigMaps whose DELETED may have been a move, to ask the API server about:
        # an ordered set, so a ConfigMap has one question pending at most.
        self._asks: dict[ConfigMapRef, None] = {}
        self._asked = threading.Condition(self._lock)
        self.events: EventRecorder | None = None
        if record_events:
            self.events = EventRecorder(self.client, uid_of=self.uid_of)
            holder.subscribe(self.events.observe)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # Counters, for logs and tests: lists, relists after 410, watches opened, failures,
        # questions about a DELETED answered and not answered.
        self.stats = {
            "lists": 0,
            "gone": 0,
            "watches": 0,
            "errors": 0,
            "events": 0,
            "checks": 0,
            "check_errors": 0,
        }
        self.first_list_done = threading.Event()
        holder.expect(self.name)

    # -- lifecycle

    def start(self) -> None:
        """Start one daemon thread per stream, the map builder and the thread that asks
        about deletes; returns at once."""
        # The builder gives the GIL up after GIL_BUDGET of map work (Pacer); the switch
        # interval holds the other threads (watch decoding, listeners) to the same when
        # the request loop waits (CPython's default lets one run on for 5 ms).
        sys.setswitchinterval(min(sys.getswitchinterval(), GIL_BUDGET))
        if self.events is not None:
            self.events.start()
        for target, name in ((self._build, "bbr-kube-map"), (self._check, "bbr-kube-check")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            self._threads.append(thread)
            thread.start()
        for stream in self._streams:
            thread = threading.Thread(
                target=self._run, args=(stream,), name=f"bbr-kube-{stream}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        deadline = time.monotonic() + 5
        for thread in self._threads:
            while thread.is_alive() and time.monotonic() < deadline:
                self.drop_connections()  # again: a thread may have been connecting
                thread.join(timeout=0.1)
        if self.events is not None:
            self.events.stop()

    def drop_connections(self) -> None:
        """Close every open watch connection (the streams resume from their
        resourceVersion). For shutdown, and for tests."""
        for stream in self._streams:
            conn = stream.conn
            if conn is not None and conn.sock is not None:
                with contextlib.suppress(OSError):
                    conn.sock.shutdown(socket.SHUT_RDWR)

    # -- one stream: list, then watch; relist on 410; back off while unreachable

    def _run(self, stream: _Stream) -> None:
        while not self._stop.is_set():
            try:
                if stream.resource_version is None:
                    self._list(stream)
                    self._synced(stream)
                started = time.monotonic()
                self._watch(stream)
                if not self._stop.is_set():
                    self._synced(stream)  # the server ended the watch: in step until now
                if time.monotonic() - started < 1 and not self._stop.is_set():
                    self._stop.wait(self._backoff(1))  # a server ending watches at once
            except Gone as exc:
                self.stats["gone"] += 1
                metrics.KUBE_WATCH_ERRORS.labels(reason="expired").inc()
                stream.gone_streak += 1
                log.info(
                    "watch expired (410 Gone); relisting",
                    extra=fields(stream=str(stream), reason=str(exc)),
                )
                stream.resource_version = None
                if stream.gone_streak > 1:  # relisting did not help: do not hammer
                    self._stop.wait(self._backoff(stream.gone_streak - 1))
            except Exception as exc:  # the watcher must never die
                if self._stop.is_set():
                    return
                self._failed(stream, exc)
                if isinstance(exc, ValueError):  # undecodable answer: start over
                    stream.resource_version = None
                self._stop.wait(self._retry_delay(stream, exc))

    def _failed(self, stream: _Stream, exc: Exception) -> None:
        """Count a failed list or watch; warn at once, then again every `warn_every`
        while it persists, and at once when its reason changes."""
        reason = error_reason(exc)
        metrics.KUBE_WATCH_ERRORS.labels(reason=reason).inc()
        self.stats["errors"] += 1
        stream.failures += 1
        now = time.monotonic()
        if stream.outage_since is None:
            stream.outage_since = now
        elif now - stream.outage_since >= self.fast_seconds:
            stream.slow_failures += 1
        details = fields(
            stream=str(stream),
            reason=_describe(exc),
            error=reason,
            failing_seconds=_since(stream.outage_since),
            failures=stream.failures,
            last_sync_seconds_ago=_since(stream.synced_at) if stream.synced_at else None,
        )
        if (
            stream.warned_at is None
            or now - stream.warned_at >= self.warn_every
            or reason != stream.warned_reason
        ):
            first = stream.warned_at is None
            stream.warned_at, stream.warned_reason = now, reason
            log.warning(
                "Kubernetes API unreachable or failing; the map in force stays"
                if first
                else "Kubernetes API still failing; the map in force stays and may be stale",
                extra=details,
            )
        else:
            log.debug("Kubernetes API still failing", extra=details)

    def _synced(self, stream: _Stream) -> None:
        """The stream is in step with the API (a list done, a watch open or ended by the
        server): end its outage, and move the last-sync gauge to the oldest stream's."""
        stream.synced_at = time.monotonic()
        stream.synced_wall = time.time()
        stream.failures = stream.slow_failures = 0
        if stream.outage_since is not None:
            log.info(
                "Kubernetes API reachable again; watching",
                extra=fields(stream=str(stream), down_seconds=_since(stream.outage_since)),
            )
            stream.outage_since = None
        stream.warned_at = stream.warned_reason = None
        oldest = min(s.synced_wall for s in self._streams)
        if oldest:
            metrics.KUBE_LAST_SYNC.set(oldest)

    def _connected(self, stream: _Stream) -> None:
        """A watch is open: the API is back."""
        self._synced(stream)

    def _backoff(self, failures: int, slow_failures: int = 0) -> float:
        """The wait before retry number `failures` of an outage: fast (up to FAST_CAP)
        until `slow_failures` start counting, then doubling up to `backoff_cap`."""
        if slow_failures <= 0:
            ceiling = min(FAST_CAP, BACKOFF_BASE * 2 ** min(failures - 1, 16))
        else:
            ceiling = min(self.backoff_cap, max(FAST_CAP, FAST_CAP * 2 ** min(slow_failures, 16)))
        return random.uniform(ceiling / 2, ceiling)

    def _retry_delay(self, stream: _Stream, exc: BaseException) -> float:
        delay = self._backoff(stream.failures, stream.slow_failures)
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:  # the server says when; a little jitter spreads streams
            delay = max(delay, min(float(retry_after), RETRY_AFTER_CAP) * random.uniform(1, 1.1))
        return delay

    def _list(self, stream: _Stream) -> None:
        objects: dict[ConfigMapRef, dict[str, Any]] = {}
        query: dict[str, str | int] = {"labelSelector": stream.selector, "limit": LIST_PAGE}
        pace = Pacer()
        while True:
            answer = self.client.request("GET", stream.path, query=query, decode=decode_page)
            for item in answer["items"]:
                pace()
                if (ref := _ref(item)) is not None:
                    objects[ref] = item
            metadata = answer.get("metadata") or {}
            if not metadata.get("continue"):
                break
            query["continue"] = metadata["continue"]
        version = str(metadata.get("resourceVersion") or "")
        self.stats["lists"] += 1
        with self._lock:
            # Replace the stream's copies in one step (no gap during a relist); only
            # ConfigMaps that are new, changed or gone go to the map builder.
            held = stream.objects
            fresh: dict[ConfigMapRef, _Copy] = {}
            pace = Pacer()
            for ref, obj in objects.items():
                pace()
                old = held.get(ref)
                if old is not None and old.version == _version(obj) >= 0:
                    fresh[ref] = old
                else:
                    fresh[ref] = self._copy(obj)
                    self._dirty.add(ref)
            for ref in held:
                pace()
                if ref not in fresh:
                    self._dirty.add(ref)
            stream.objects = fresh
            stream.resource_version = version or None
            stream.listed = True
            self._wake.notify()
        log.debug(
            "listed ConfigMaps",
            extra=fields(stream=str(stream), count=len(objects), resource_version=version),
        )

    def _watch(self, stream: _Stream) -> None:
        assert stream.resource_version is not None
        seconds = int(self.watch_seconds * random.uniform(0.9, 1.0)) or 1
        query: dict[str, str | int] = {
            "watch": "1",
            "labelSelector": stream.selector,
            "resourceVersion": stream.resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": seconds,
        }

        def keep(conn: http.client.HTTPConnection | None) -> None:
            stream.conn = conn

        with self.client.stream(
            stream.path, query, timeout=seconds + READ_GRACE, on_connect=keep, decode=decode_event
        ) as events:
            self.stats["watches"] += 1
            self._connected(stream)
            for event in events:
                if self._stop.is_set():
                    return
                self._event(stream, event)

    def _event(self, stream: _Stream, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, dict):
            return
        if kind == "ERROR":
            code = obj.get("code")
            message = str(obj.get("message") or obj)
            if code == 410:
                raise Gone(410, message)
            raise ApiError(int(code) if isinstance(code, int) else 0, message)
        version = _meta(obj, "resourceVersion")
        if kind == "BOOKMARK":
            if version:
                stream.resource_version = str(version)
            return
        ref = _ref(obj)
        if ref is None or kind not in ("ADDED", "MODIFIED", "DELETED"):
            return
        self.stats["events"] += 1
        stream.gone_streak = 0
        obj = _slim(obj)
        with self._lock:
            handover = self._handover.get(ref)
            caught_up = (
                handover is not None
                and handover[1] == stream.label
                and _version(obj) >= handover[0].version
            )
            if caught_up:  # the stream it went to has it now, or says it is gone too
                del self._handover[ref]
            # The server sends DELETED when an object stops matching the selector, with
            # the object as it was before (its labels included) and the new
            # resourceVersion: a delete and a move to the other label look the same.
            if kind == "DELETED" or not _labelled(obj, stream.label):
                stream.objects.pop(ref, None)
                target = next(
                    (label for label in MANAGED_LABELS if label != stream.label), stream.label
                )
                others = [s for s in self._streams if s is not stream and ref in s.objects]
                if caught_up:
                    pass
                elif not _labelled(obj, stream.label) and _labelled(obj, target):
                    # Moved to the other label (the object as it is now): its stream
                    # will say so; until then this copy stays in force.
                    deadline = time.monotonic() + HANDOVER_SECONDS
                    self._handover[ref] = (self._copy(obj), target, deadline)
                elif kind == "DELETED" and _labelled(obj, stream.label) and not others:
                    # Deleted, or moved to the other label: its stream reports a move
                    # within milliseconds. Keep it in force until then (no gap), and
                    # ask the API server: gone or unlabelled, it goes at once. Else
                    # DELETE_GRACE at most, or until that stream has passed this
                    # resourceVersion without it (`_expire_handovers`).
                    deadline = time.monotonic() + DELETE_GRACE
                    self._handover[ref] = (self._copy(obj), target, deadline)
                    if ref not in self._asks:
                        self._asks[ref] = None
                        self._asked.notify()
                else:
                    self._handover.pop(ref, None)
            else:
                stream.objects[ref] = self._copy(obj)
            if version:
                stream.resource_version = str(version)
            self._dirty.add(ref)
            self._wake.notify()

    def _copy(self, obj: dict[str, Any]) -> _Copy:
        self._seq += 1
        metadata = obj.get("metadata")
        kept = (
            {k: v for k, v in metadata.items() if k != "labels"}
            if isinstance(metadata, Mapping)
            else {}
        )
        return _Copy(kept, obj.get("data"), _version(obj), self._seq)

    # -- a DELETED that may be a move: ask the API server which it was

    def _check(self) -> None:
        """The thread that asks about deletes, one at a time (`_check_once`)."""
        while not self._stop.is_set():
            try:
                self._check_once()
            except Exception:  # it must never die; the hold still ends at its deadline
                log.exception("asking about a deleted ConfigMap failed")
                self._stop.wait(0.1)

    def _check_once(self) -> None:
        """Ask about the next ConfigMap held after a DELETED: one list of that one name
        (the `list` verb bbr already has; no resourceVersion, so a consistent read),
        CHECK_TIMEOUT, no retry. Gone, or carrying neither managed label: the hold ends
        and its names go now. Still labelled (moved, or back): the hold stays until its
        stream reports it. No answer: the hold stays, DELETE_GRACE at most. A hold that
        ended before its turn costs no request, so a burst of deletes costs one request
        each at most, one at a time."""
        with self._lock:
            while not self._asks:
                if self._stop.is_set():
                    return
                self._asked.wait(0.25)
            ref = next(iter(self._asks))
            del self._asks[ref]
            held = self._handover.get(ref)
            if held is None or time.monotonic() >= held[2]:
                return  # settled meanwhile: its stream reported it, or the grace ended
            copy = held[0]
        path = f"/api/v1/namespaces/{urllib.parse.quote(ref.namespace, safe='')}/configmaps"
        try:
            answer = self.client.request(
                "GET",
                path,
                query={"fieldSelector": f"metadata.name={ref.name}"},
                timeout=CHECK_TIMEOUT,
                connect_timeout=CHECK_TIMEOUT,
                decode=decode_page,
            )
        except Exception as exc:
            self.stats["check_errors"] += 1
            log.debug(
                "could not ask whether a deleted ConfigMap moved; its names stay a moment",
                extra=fields(configmap=str(ref), reason=_describe(exc), seconds=DELETE_GRACE),
            )
            return
        self.stats["checks"] += 1
        items = [item for item in answer["items"] if _ref(item) == ref]
        labelled = any(_labelled(item, label) for item in items for label in MANAGED_LABELS)
        as_of = _rv((answer.get("metadata") or {}).get("resourceVersion"))
        if labelled or as_of < copy.version:
            return  # a stream will report it (or the answer predates the delete)
        with self._lock:
            held = self._handover.get(ref)
            if held is not None and held[0] is copy:
                del self._handover[ref]
                self._dirty.add(ref)
                self._wake.notify()

    # -- the map: union of the streams, last good versions, publish

    def _build(self) -> None:
        """The map builder: takes the ConfigMaps that changed since its last round
        (however many events that was: a burst coalesces) and puts them in force in
        one `MapHolder.apply`, which costs work in proportion to those ConfigMaps."""
        while not self._stop.is_set():
            try:
                self._build_once()
            except Exception:  # the builder must never die
                log.exception("model map update failed; retrying")
                self._stop.wait(1)

    def _build_once(self) -> None:
        with self._lock:
            while not self._stop.is_set():
                if all(s.listed for s in self._streams):
                    self._expire_handovers()
                    if self._dirty or not self._published_once:
                        break
                self._wake.wait(self._handover_wait())
            if self._stop.is_set():
                return
            batch, self._dirty = self._dirty, set()
            changes: dict[Hashable, ModelConfig | None] = {}
            problems: dict[Hashable, ConfigMapError | None] = {}
            errors: list[ConfigMapError] = []
            turned: list[tuple[ConfigMapRef, str, ConfigMapError | None]] = []
            pace = Pacer()
            for ref in sorted(batch):
                pace()
                config, uid, problem, fresh = self._resolve(ref)
                if config != self._in_force.get(ref):
                    changes[ref] = config
                    if config is None:
                        del self._in_force[ref]
                    else:
                        self._in_force[ref] = config
                if problem != self._invalid.get(ref):
                    problems[ref] = problem
                    was_invalid = ref in self._invalid
                    if problem is not None:
                        self._invalid[ref] = problem
                        turned.append((ref, uid, problem))
                    else:
                        del self._invalid[ref]
                        if was_invalid and uid:
                            turned.append((ref, uid, None))
                if fresh is not None:
                    errors.append(fresh)
            first = not self._published_once
            self._published_once = True
        # Only this thread applies, so changes are in force in the order they came.
        if changes or problems or first:
            self.holder.apply(self.name, changes, problems)
            _collect_young(first)
        self.first_list_done.set()
        changed = bool(changes)
        for error in errors:
            log.error(
                "ConfigMap not loaded; its last good version stays in force",
                extra=fields(
                    configmap=str(error.ref) if error.ref else None,
                    key=error.key,
                    reason=error.reason,
                ),
            )
        if self.events is not None:
            for ref, uid, problem in turned:
                if problem is None:
                    self.events.valid(ref, uid)
                else:
                    self.events.invalid(ref, uid, f"{problem.key}: {problem.reason}")
        if (changed or errors) and self.on_reload is not None:
            try:
                self.on_reload(LoadReport(changed=changed, errors=errors))
            except Exception:  # a reporting bug must not stop the watch
                log.exception("on_reload callback failed")

    def _newest(self, ref: ConfigMapRef) -> _Copy | None:
        """The newest copy of `ref` any stream holds (highest resourceVersion, then
        latest arrival), or the one handed over between labels."""
        newest: _Copy | None = None
        for stream in self._streams:
            copy = stream.objects.get(ref)
            if copy is not None and (
                newest is None or (copy.version, copy.seq) > (newest.version, newest.seq)
            ):
                newest = copy
        handover = self._handover.get(ref)
        if handover is not None:
            copy = handover[0]
            if newest is not None and newest.version >= copy.version:
                del self._handover[ref]  # the other stream has it: handed over
            elif newest is None or (copy.version, copy.seq) > (newest.version, newest.seq):
                newest = copy
        return newest

    def _expire_handovers(self) -> None:
        """Drop handovers the target stream will not confirm: it has listed or
        watched past that version without the ConfigMap, or the deadline passed."""
        now = time.monotonic()
        for ref, (copy, target, deadline) in list(self._handover.items()):
            passed = any(
                s.label == target
                and s.listed
                and ref not in s.objects
                and _rv(s.resource_version) >= copy.version >= 0
                and (s.namespace is None or s.namespace == ref.namespace)
                for s in self._streams
            )
            if passed or now >= deadline:
                del self._handover[ref]
                self._dirty.add(ref)

    def _handover_wait(self) -> float:
        """How long the builder may sleep: until the next handover deadline, and
        never long, so it sees `stop()`."""
        if not self._handover:
            return 0.25
        due = min(d for _, _, d in self._handover.values()) - time.monotonic()
        return min(0.25, max(0.01, due))

    def _resolve(
        self, ref: ConfigMapRef
    ) -> tuple[ModelConfig | None, str, ConfigMapError | None, ConfigMapError | None]:
        """What `ref` puts in force now, its uid, what is wrong with it, and that
        problem again if this version was parsed just now. Called with the lock held."""
        copy = self._newest(ref)
        if copy is None:
            self._parsed.pop(ref, None)
            self._last_good.pop(ref, None)
            return None, "", None, None
        obj = copy.obj
        version = str(_meta(obj, "resourceVersion") or "")
        uid = str(_meta(obj, "uid") or "")
        parsed = self._parsed.get(ref)
        fresh = None
        if (
            parsed is None
            or parsed.version != version
            or not version
            or parsed.data != obj.get("data")
        ):
            parsed = self._parse(ref, obj, version)
            self._parsed[ref] = parsed
            fresh = parsed.error
        if parsed.config is not None:
            self._last_good[ref] = (uid, parsed.config)
            return parsed.config, uid, None, fresh
        if (good := self._last_good.get(ref)) is not None and good[0] == uid:
            return good[1], uid, parsed.error, fresh
        self._last_good.pop(ref, None)
        return None, uid, parsed.error, fresh

    @staticmethod
    def _parse(ref: ConfigMapRef, obj: Mapping[str, Any], version: str) -> _Parsed:
        warnings: list[ConfigMapError] = []
        try:
            config = parse_configmap(obj, source=f"configmap {ref}", rank=None, warnings=warnings)
        except ConfigMapParseError as exc:
            return _Parsed(version, None, exc.error, obj.get("data"))
        for warning in warnings:
            log.warning(
                "ConfigMap loaded with a warning",
                extra=fields(configmap=str(ref), key=warning.key, reason=str(warning)),
            )
        return _Parsed(version, config, None, obj.get("data"))

    def uid_of(self, ref: ConfigMapRef) -> str | None:
        """The uid of a ConfigMap this source has in force, else None."""
        good = self._last_good.get(ref)
        return good[0] if good is not None else None

    def errors(self) -> list[ConfigMapError]:
        """What is wrong with the ConfigMaps seen now."""
        with self._lock:
            return [p.error for p in self._parsed.values() if p.error is not None]


def _collect_young(first: bool) -> None:
    """Keep Python's cyclic GC off the request loop (docs/performance.md, "The model map
    at scale"); the map builder calls it after each round, off the loop.

    After the first lists, freeze what is alive (imports, server, map) once: full
    collections never walk it again; cyclic garbage alive then is never collected.
    After later rounds, a young collection walks only that round's leftovers: CPython
    would run none, as an edit frees as many objects as it makes (its trigger counts
    allocations minus frees), and the young generation would grow without bound.
    """
    if first:
        gc.freeze()
    else:
        gc.collect(1 if gc.get_count()[1] >= gc.get_threshold()[1] else 0)


def _since(start: float) -> float:
    return round(time.monotonic() - start, 1)


def error_reason(exc: BaseException) -> str:
    """A bounded label value for a failed list or watch (the error metric's `reason`)."""
    if isinstance(exc, CredentialError):
        return "credential"
    if isinstance(exc, Gone):
        return "expired"
    if isinstance(exc, ApiError):
        named = {401: "unauthorized", 403: "forbidden", 404: "not_found", 429: "throttled"}
        if exc.status in named:
            return named[exc.status]
        return "server_error" if exc.status >= 500 else "http_error"
    if isinstance(exc, ProxyError):
        return "proxy"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return "connection"  # closed during the handshake: the network, not TLS
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return "tls"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError):
        return "connection"
    if isinstance(exc, ValueError | http.client.HTTPException):
        return "bad_response"
    return "other"


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, ApiError) else text
