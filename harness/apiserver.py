"""A real kube-apiserver and etcd on loopback, for the tests and the benchmarks.

`ApiServer(workdir).start()` runs etcd and kube-apiserver on free loopback ports with
throwaway credentials: a CA, a serving certificate for 127.0.0.1, an admin bearer token
and an admin client certificate (both in `system:masters`), a token for the unprivileged
user `bbr`, and service-account signing keys, all generated at start with `openssl`.
Authorization is RBAC, as in a real cluster. It waits for `/readyz` and writes
kubeconfigs (`kubeconfig(user)`), can stop and restart the API server on the same port
over the same etcd data (`restart()`), compact etcd so that old resourceVersions expire
(`compact()`), and removes everything on `stop()`.

The binaries come from `make kube-tools` (scripts/kube-tools.sh), which `make test`
runs; when they are missing the tests fail and say so.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.processes import free_port

TOOLS = Path(os.environ.get("BBR_TOOLS") or Path.home() / ".cache" / "bbr-tools")
BIN = TOOLS / "bin"
ADMIN_TOKEN = "admin-token-for-tests"
BBR_TOKEN = "bbr-token-for-tests"
READY_TIMEOUT = 60.0


class ToolsMissing(Exception):
    pass


def binary(name: str) -> str:
    path = BIN / name
    if not os.access(path, os.X_OK):
        raise ToolsMissing(
            f"{path} is missing: run `make kube-tools` (make test installs it) to build "
            "kube-apiserver and etcd from the Go module proxy"
        )
    return str(path)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_certs(directory: Path) -> None:
    """CA, serving cert (127.0.0.1, localhost), admin client cert, SA keys."""
    d = directory
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", "/CN=bbr-test-ca", "-keyout", "ca.key", "-out", "ca.crt", cwd=d)  # fmt: skip
    (d / "serving.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth\n"
    )
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subject, ext in (
        ("serving", "/CN=kube-apiserver", "serving.ext"),
        ("admin", "/O=system:masters/CN=admin", "client.ext"),
    ):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "2", "-extfile", ext, "-out", f"{name}.crt",
                 cwd=d)  # fmt: skip
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=d)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=d)
    (d / "tokens.csv").write_text(
        f"{ADMIN_TOKEN},admin,admin-uid,system:masters\n{BBR_TOKEN},bbr,bbr-uid\n"
    )


class ApiServer:
    def __init__(self, workdir: Path, *, configmap_watch_cache: bool = True) -> None:
        self.dir = workdir
        self.configmap_watch_cache = configmap_watch_cache
        self.etcd_port = free_port()
        self.peer_port = free_port()
        self.port = free_port()
        self.etcd: subprocess.Popen[bytes] | None = None
        self.apiserver: subprocess.Popen[bytes] | None = None
        self.url = f"https://127.0.0.1:{self.port}"
        self.starts = 0

    # -- lifecycle

    def start(self) -> ApiServer:
        etcd = binary("etcd")
        binary("kube-apiserver")  # fail before starting anything
        self.dir.mkdir(parents=True, exist_ok=True)
        make_certs(self.dir)
        self._ca = ssl.create_default_context(cafile=str(self.dir / "ca.crt"))
        self.etcd = self._spawn(
            "etcd",
            [etcd, "--name", "test", "--data-dir", str(self.dir / "etcd"),
             "--listen-client-urls", f"http://127.0.0.1:{self.etcd_port}",
             "--advertise-client-urls", f"http://127.0.0.1:{self.etcd_port}",
             "--listen-peer-urls", f"http://127.0.0.1:{self.peer_port}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer_port}",
             "--initial-cluster", f"test=http://127.0.0.1:{self.peer_port}",
             "--unsafe-no-fsync", "--log-level", "warn"],
        )  # fmt: skip
        self._wait(lambda: self._etcd_call("/health") is not None, "etcd", self.etcd)
        self.start_apiserver()
        return self

    def start_apiserver(self, extra: Sequence[str] = ()) -> None:
        d = self.dir
        args = [
            binary("kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.port}",
            f"--cert-dir={d / 'certs'}",
            f"--tls-cert-file={d / 'serving.crt'}",
            f"--tls-private-key-file={d / 'serving.key'}",
            f"--client-ca-file={d / 'ca.crt'}",
            f"--token-auth-file={d / 'tokens.csv'}",
            "--authorization-mode=RBAC",
            f"--service-account-key-file={d / 'sa.pub'}",
            f"--service-account-signing-key-file={d / 'sa.key'}",
            "--service-account-issuer=https://kubernetes.default.svc",
            "--service-cluster-ip-range=10.96.0.0/24",
            "--enable-priority-and-fairness=false",
            "--profiling=false",
            "--etcd-compaction-interval=0",  # the tests compact when they want to
            *([] if self.configmap_watch_cache else ["--watch-cache-sizes=configmaps#0"]),
            *extra,
        ]
        self.starts += 1
        self.apiserver = self._spawn(f"kube-apiserver.{self.starts}", args)
        self._wait(self.ready, "kube-apiserver", self.apiserver)

    def stop_apiserver(self, *, kill: bool = True) -> None:
        """Stop the API server (SIGKILL by default: a crash); etcd keeps running."""
        proc, self.apiserver = self.apiserver, None
        if proc is not None:
            _end(proc, signal.SIGKILL if kill else signal.SIGTERM)

    def restart(self) -> None:
        """Kill the API server and start it again on the same port and etcd data."""
        self.stop_apiserver()
        self.start_apiserver()

    def stop(self) -> None:
        self.stop_apiserver()
        proc, self.etcd = self.etcd, None
        if proc is not None:
            _end(proc, signal.SIGTERM)
        shutil.rmtree(self.dir, ignore_errors=True)

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - lives with the process
        try:
            return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        finally:
            log.close()

    def _wait(self, check: Any, what: str, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited {proc.returncode}:\n{self.log_tail(what)}")
            if check():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{what} not ready in {READY_TIMEOUT}s:\n{self.log_tail(what)}")

    def log_tail(self, what: str, lines: int = 30) -> str:
        logs = sorted(self.dir.glob(f"{what}*.log"), key=lambda p: p.stat().st_mtime)
        if not logs:
            return ""
        return "\n".join(logs[-1].read_text(errors="replace").splitlines()[-lines:])

    # -- API

    def ready(self) -> bool:
        request = urllib.request.Request(
            self.url + "/readyz", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        try:
            with urllib.request.urlopen(request, timeout=2, context=self._ca) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def kubeconfig(self, user: str = "admin", *, namespace: str | None = None,
                   server: str | None = None, cert_auth: bool = False) -> Path:  # fmt: skip
        """Write a kubeconfig for `user` (admin or bbr): bearer token with inline CA,
        or with `cert_auth` the admin client certificate and CA as files."""
        ca = (self.dir / "ca.crt").read_bytes()
        cluster: dict[str, Any] = {"server": server or self.url}
        user_entry: dict[str, Any]
        if cert_auth:
            cluster["certificate-authority"] = "ca.crt"
            user_entry = {"client-certificate": "admin.crt", "client-key": "admin.key"}
        else:
            cluster["certificate-authority-data"] = base64.b64encode(ca).decode()
            user_entry = {"token": ADMIN_TOKEN if user == "admin" else BBR_TOKEN}
        context: dict[str, Any] = {"cluster": "test", "user": user}
        if namespace:
            context["namespace"] = namespace
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "test", "cluster": cluster}],
            "users": [{"name": user, "user": user_entry}],
            "contexts": [{"name": "test", "context": context}],
            "current-context": "test",
        }
        path = self.dir / f"kubeconfig-{user}-{namespace or ''}-{int(cert_auth)}-{free_port()}"
        path.write_text(json.dumps(config))  # JSON is YAML
        return path

    # -- etcd

    def _etcd_call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.etcd_port}{path}", data=data)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            return None

    def revision(self) -> int:
        answer = self._etcd_call("/v3/kv/range", {"key": base64.b64encode(b"/").decode()})
        return int(answer["header"]["revision"])

    def compact(self) -> int:
        """Compact etcd at its current revision: every older resourceVersion is gone."""
        revision = self.revision()
        answer = self._etcd_call("/v3/kv/compaction", {"revision": revision, "physical": True})
        if answer is None:
            raise RuntimeError("etcd compaction failed")
        return revision


def _end(proc: subprocess.Popen[bytes], sig: int) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
