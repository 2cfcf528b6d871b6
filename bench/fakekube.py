"""A minimal Kubernetes API (discovery, ConfigMaps: get/list/watch) for the Go BBR.

The Go BBR reads its model map from labelled ConfigMaps through controller-runtime.
For load tests all it needs is to list them once and hold a watch open; a real etcd and
kube-apiserver would do, but cost a second core-hungry process on a 2-core machine while
measuring. Prefer `harness/apiserver.py` where it exists (see bench/loadtest.py).

Served: /api, /apis, /api/v1, /version, ConfigMap list/watch (cluster-wide and per
namespace) and get. Watches stay open and send nothing (the map never changes during a
run). client-go's WatchList (streaming list) must be off: KUBE_FEATURE_WatchListClient=false.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import yaml

RESOURCE_VERSION = "100"


def load_configmaps(path: Path) -> list[dict[str, Any]]:
    items = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        for cm in doc.get("items", [doc]) if doc.get("kind") == "List" else [doc]:
            meta = cm.setdefault("metadata", {})
            meta.setdefault("namespace", "default")
            meta.setdefault("uid", f"uid-{meta['name']}")
            meta.setdefault("resourceVersion", RESOURCE_VERSION)
            meta.setdefault("creationTimestamp", "2025-01-01T00:00:00Z")
            cm.setdefault("apiVersion", "v1")
            items.append(cm)
    return items


_RESOURCES = {
    "kind": "APIResourceList",
    "groupVersion": "v1",
    "resources": [
        {
            "name": "configmaps",
            "singularName": "configmap",
            "namespaced": True,
            "kind": "ConfigMap",
            "verbs": ["get", "list", "watch"],
        },
        {
            "name": "namespaces",
            "singularName": "namespace",
            "namespaced": False,
            "kind": "Namespace",
            "verbs": ["get", "list", "watch"],
        },
    ],
}


class FakeKube:
    """Serves `configmaps` on 127.0.0.1:`port` until `stop()`; writes a kubeconfig."""

    def __init__(self, configmaps: list[dict[str, Any]], port: int = 0) -> None:
        self.configmaps = configmaps
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                owner._get(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = int(self.httpd.server_address[1])
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> FakeKube:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def kubeconfig(self, path: Path) -> Path:
        server = f"http://127.0.0.1:{self.port}"
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": server}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": "default"},
                }
            ],
            "current-context": "fake",
        }
        path.write_text(yaml.safe_dump(config))
        return path

    def _get(self, req: BaseHTTPRequestHandler) -> None:
        url = urlparse(req.path)
        query = parse_qs(url.query)
        parts = [p for p in url.path.split("/") if p]
        if parts == ["api"]:
            return _json(req, {"kind": "APIVersions", "versions": ["v1"]})
        if parts == ["apis"]:
            return _json(req, {"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        if parts == ["api", "v1"]:
            return _json(req, _RESOURCES)
        if parts == ["version"]:
            return _json(req, {"major": "1", "minor": "35", "gitVersion": "v1.35.0-fake"})
        namespace = None
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) >= 5:
            namespace, parts = parts[3], ["api", "v1", *parts[4:]]
        if parts[:3] == ["api", "v1", "configmaps"]:
            items = [
                cm
                for cm in self.configmaps
                if namespace is None or cm["metadata"]["namespace"] == namespace
            ]
            if len(parts) == 4:
                for cm in items:
                    if cm["metadata"]["name"] == parts[3]:
                        return _json(req, cm)
                return _not_found(req, parts[3])
            if query.get("watch", ["false"])[0] in ("true", "1"):
                return self._watch(req)
            return _json(
                req,
                {
                    "kind": "ConfigMapList",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": RESOURCE_VERSION},
                    "items": items,
                },
            )
        return _not_found(req, url.path)

    def _watch(self, req: BaseHTTPRequestHandler) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        req.wfile.flush()
        # Nothing changes during a run: hold the watch until the client's timeout.
        deadline = time.monotonic() + 300
        while not self._closing.is_set() and time.monotonic() < deadline:
            self._closing.wait(1.0)
        with contextlib.suppress(OSError):
            req.wfile.write(b"0\r\n\r\n")


def _json(req: BaseHTTPRequestHandler, payload: dict[str, Any], status: int = 200) -> None:
    data = json.dumps(payload).encode()
    req.send_response(status)
    req.send_header("Content-Type", "application/json")
    req.send_header("Content-Length", str(len(data)))
    req.end_headers()
    req.wfile.write(data)


def _not_found(req: BaseHTTPRequestHandler, what: str) -> None:
    _json(
        req,
        {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "message": f"{what} not found",
            "reason": "NotFound",
            "code": 404,
        },
        404,
    )
