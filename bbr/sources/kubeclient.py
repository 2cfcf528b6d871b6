"""A small Kubernetes API client: configuration, credentials, TLS, proxies, JSON
requests and watch streams. It knows nothing of model maps (bbr.sources.kubernetes).

A small stdlib (`http.client` + `ssl`) client rather than the official `kubernetes`
package. bbr lists and watches ConfigMaps as raw JSON (and posts Events), which is
what `parse_configmap` takes; the official client would add ~10 transitive
dependencies (urllib3, google-auth, requests-oauthlib, websocket-client...) to the
image, deserialize into typed models to be converted back, and gives little control
over the watch socket's timeouts and its abort on shutdown. This client supports what
bbr runs with: in-cluster config (service-account token re-read on every request, so
rotated tokens work, and the cluster CA), and kubeconfig files (`KUBECONFIG` list or
`~/.kube/config`) with bearer tokens (`token`, `tokenFile`), client certificates and
CAs given as files or inline `-data`, `insecure-skip-tls-verify`, `exec` credential
plugins, and plain-http servers (`kubectl proxy`).

The client key stays off disk: OpenSSL reads it from a memfd (`bbr.tls.in_memory`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import email.utils
import http.client
import ipaddress
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# Connecting (TCP, proxy CONNECT, TLS handshake) has its own CONNECT_TIMEOUT per step:
# a watch may be silent for minutes (its reads time out as its caller says), a handshake
# not. TCP keepalive catches a vanished host.
CONNECT_TIMEOUT = 10.0
KEEPALIVE = (30, 10, 3)  # idle seconds, interval, probes
REQUEST_TIMEOUT = 30.0
ERROR_BODY_LIMIT = 64 * 1024  # of an error answer to a watch
PROXY_HEAD_LIMIT = 8 * 1024  # of a proxy's answer to CONNECT


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
            raise CredentialError(f"{name}: {describe(exc)}") from None
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


def describe(exc: BaseException) -> str:
    """An error for a log line: its type and text (an API error's text says it all)."""
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, ApiError) else text
