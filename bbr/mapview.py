"""`GET /modelmap` on the metrics port: the map in force as JSON, and its server.

The view answers "is my adapter live?" without logs or a restart: each name with its
base model, kind and the ConfigMap (and file) it comes from, the conflicts, the
ConfigMaps that are invalid and why, and when the map last changed. It is rendered at
most once per snapshot (cached on it), in steps that let the request loop run, and its
size is bounded by the map's (about 200 bytes a name).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import msgspec
from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from bbr.modelmap import ModelConfig, ModelMap, yield_gil

PATH = "/modelmap"
CONTENT_TYPE = "application/json"
_render_lock = threading.Lock()


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _source(config: ModelConfig) -> dict[str, Any]:
    """Where a name comes from: its ConfigMap, and the file document if from a file."""
    from_api = config.source.startswith("configmap ")
    return {"configmap": str(config.ref), "file": None if from_api else config.source}


def document(snapshot: ModelMap) -> dict[str, Any]:
    """The view as a JSON-ready dict (see the README for its shape)."""
    models: dict[str, Any] = {}
    owners = snapshot.owners
    for count, (name, base) in enumerate(snapshot.items(), start=1):
        owner = owners[name]
        models[name] = {
            "base_model": base,
            "kind": "base" if name == base else "adapter",
            **_source(owner),
        }
        if count % 1024 == 0:
            yield_gil()
    return {
        "last_change": _time(snapshot.changed_at),
        "updated": _time(snapshot.created_at),
        "counts": {
            "base_models": snapshot.base_count,
            "adapters": snapshot.adapter_count,
            "conflicts": snapshot.conflict_count,
            "invalid": len(snapshot.problems),
        },
        "models": models,
        "conflicts": [
            {
                "name": c.name,
                "winner": str(c.winner),
                "winner_base": c.winner_base,
                "loser": str(c.loser),
                "loser_base": c.loser_base,
            }
            for c in snapshot.conflicts
        ],
        "invalid": [
            {
                "configmap": str(p.ref) if p.ref else None,
                "source": p.source,
                "key": p.key,
                "reason": p.reason,
            }
            for p in snapshot.problems
        ],
    }


def render(snapshot: ModelMap) -> bytes:
    """The view's JSON body, built once per snapshot."""
    cached = snapshot._view
    if cached is None:
        with _render_lock:  # two scrapes at once build it once
            cached = snapshot._view
            if cached is None:
                cached = snapshot._view = msgspec.json.encode(document(snapshot))
    assert isinstance(cached, bytes)
    return cached


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def app(
    current: Callable[[], ModelMap] | None, registry: Any = REGISTRY
) -> Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]:
    """Prometheus' WSGI app, with `GET /modelmap` answered from `current()`."""
    metrics = make_wsgi_app(registry)

    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != PATH:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        if current is None:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"no model map in this process\n"]
        body = render(current())
        start_response(
            "200 OK",
            [
                ("Content-Type", CONTENT_TYPE),
                ("Content-Length", str(len(body))),
                ("Cache-Control", "no-store"),
            ],
        )
        return [b"" if environ["REQUEST_METHOD"] == "HEAD" else body]

    return serve


def start(
    port: int, current: Callable[[], ModelMap] | None, registry: Any = REGISTRY
) -> WSGIServer:
    """Serve /metrics and /modelmap on `port` from a daemon thread (raises OSError)."""
    server = make_server(
        "0.0.0.0", port, app(current, registry), ThreadingWSGIServer, handler_class=_Quiet
    )
    thread = threading.Thread(target=server.serve_forever, name="bbr-metrics", daemon=True)
    thread.start()
    return server
