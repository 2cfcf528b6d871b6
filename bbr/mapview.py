"""`GET /modelmap` on the metrics port: the map in force as JSON, and its server.

The view answers "is my adapter live?" without logs or a restart: each name with its
base model, kind and the ConfigMap (and file) it comes from, the conflicts, the
ConfigMaps that are invalid and why, and when the map last changed. It is rendered at
most once per snapshot (cached on it), in paced steps that let the request loop run
(sorted in runs, encoded in chunks), and its size is bounded by the map's (about 100
bytes a name).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import msgspec
from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from bbr.modelmap import ModelConfig, ModelMap, Pacer

PATH = "/modelmap"
CONTENT_TYPE = "application/json"
_render_lock = threading.Lock()


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def _source(config: ModelConfig) -> dict[str, Any]:
    """Where a name comes from: its ConfigMap, and the file document if from a file."""
    from_api = config.source.startswith("configmap ")
    return {"configmap": str(config.ref), "file": None if from_api else config.source}


# The view is built on the metrics thread, which shares the GIL with the request loop: a
# sort or an encode of a 50 k-name map in one C call would hold the loop for tens of ms.
# So names are sorted in runs of SORT_RUN and merged, and encoded ENCODE_CHUNK at a time,
# with a Pacer between the steps.
SORT_RUN = 2048
ENCODE_CHUNK = 512


def _sorted(names: Iterable[str], pace: Callable[[], None]) -> Iterator[str]:
    everything = list(names)
    runs = []
    for start in range(0, len(everything), SORT_RUN):
        runs.append(sorted(everything[start : start + SORT_RUN]))
        pace()
    return heapq.merge(*runs)


def _encode_object(pairs: Iterable[tuple[str, Any]], pace: Callable[[], None]) -> bytes:
    """`{"k": v, ...}` of `pairs` (in their order), encoded a chunk at a time."""
    parts: list[bytes] = []
    chunk: dict[str, Any] = {}
    for key, value in pairs:
        pace()
        chunk[key] = value
        if len(chunk) == ENCODE_CHUNK:
            parts.append(msgspec.json.encode(chunk)[1:-1])
            chunk = {}
    if chunk:
        parts.append(msgspec.json.encode(chunk)[1:-1])
    return b"{" + b",".join(parts) + b"}"


def _encode_list(items: Iterable[Any], pace: Callable[[], None]) -> bytes:
    parts: list[bytes] = []
    chunk: list[Any] = []
    for item in items:
        pace()
        chunk.append(item)
        if len(chunk) == ENCODE_CHUNK:
            parts.append(msgspec.json.encode(chunk)[1:-1])
            chunk = []
    if chunk:
        parts.append(msgspec.json.encode(chunk)[1:-1])
    return b"[" + b",".join(parts) + b"]"


def _models(snapshot: ModelMap, pace: Callable[[], None]) -> Iterator[tuple[str, Any]]:
    for name in _sorted(snapshot.names(), pace):
        base = snapshot.lookup(name)
        owner = snapshot.owner(name)
        assert base is not None and owner is not None
        yield (
            name,
            {"base_model": base, "kind": "base" if name == base else "adapter"} | (_source(owner)),
        )


def _head(snapshot: ModelMap) -> dict[str, Any]:
    return {
        "last_change": _time(snapshot.changed_at),
        "updated": _time(snapshot.created_at),
        "counts": {
            "base_models": snapshot.base_count,
            "adapters": snapshot.adapter_count,
            "conflicts": snapshot.conflict_count,
            "invalid": len(snapshot.problems),
        },
    }


def _conflicts(snapshot: ModelMap) -> Iterator[dict[str, Any]]:
    for c in snapshot.conflicts:
        yield {
            "name": c.name,
            "winner": str(c.winner),
            "winner_base": c.winner_base,
            "loser": str(c.loser),
            "loser_base": c.loser_base,
        }


def _invalid(snapshot: ModelMap) -> Iterator[dict[str, Any]]:
    for p in snapshot.problems:
        yield {
            "configmap": str(p.ref) if p.ref else None,
            "source": p.source,
            "key": p.key,
            "reason": p.reason,
        }


def document(snapshot: ModelMap) -> dict[str, Any]:
    """The view as a JSON-ready dict (see the README for its shape)."""
    pace = Pacer()
    return _head(snapshot) | {
        "models": dict(_models(snapshot, pace)),
        "conflicts": list(_conflicts(snapshot)),
        "invalid": list(_invalid(snapshot)),
    }


def _render(snapshot: ModelMap) -> bytes:
    """`document(snapshot)` encoded, in paced steps (the same bytes as one encode)."""
    pace = Pacer()
    head = msgspec.json.encode(_head(snapshot))[:-1]
    return b"".join(
        (
            head,
            b',"models":',
            _encode_object(_models(snapshot, pace), pace),
            b',"conflicts":',
            _encode_list(_conflicts(snapshot), pace),
            b',"invalid":',
            _encode_list(_invalid(snapshot), pace),
            b"}",
        )
    )


def render(snapshot: ModelMap) -> bytes:
    """The view's JSON body, built once per snapshot."""
    cached = snapshot._view
    if cached is None:
        with _render_lock:  # two scrapes at once build it once
            cached = snapshot._view
            if cached is None:
                cached = snapshot._view = _render(snapshot)
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
