"""Prometheus series (SPEC §5), including the Go BBR's, so dashboards keep working."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from bbr import __version__, mapview
from bbr.config import StartupError
from bbr.decision import Label
from bbr.modelmap import ModelMap
from bbr.protocol import RequestRecord

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series are noise
REQUESTS = Counter("bbr_requests", "ext_proc requests by outcome.", ["outcome"])
DURATION = Histogram(
    "bbr_request_duration_seconds",
    "Time from the request headers message to bbr's decision.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
BODY_BYTES = Histogram(
    "bbr_request_body_bytes",
    "Size of the request bodies bbr read.",
    buckets=tuple(2**n for n in range(8, 27, 2)),
)
ACTIVE_STREAMS = Gauge(
    "bbr_active_streams", "ext_proc streams open now.", multiprocess_mode="livesum"
)
MAP_MODELS = Gauge(
    "bbr_model_map_models",
    "Names in the model map in force.",
    ["kind"],
    multiprocess_mode="livemax",
)
MAP_RELOADS = Counter("bbr_model_map_reloads", "Model map reloads by result.", ["result"])
MAP_CONFLICTS = Gauge(
    "bbr_model_map_conflicts",
    "Model names claimed by two base models (older ConfigMap wins).",
    multiprocess_mode="livemax",
)
MODEL_REQUESTS = Counter(
    "bbr_model_requests",
    "Requests routed to each base model of the map in force (unknown models are not counted).",
    ["base_model"],
)
CONNECTIONS_CLOSED = Counter(
    "bbr_grpc_connections_closed",
    "gRPC-port connections bbr closed itself: HTTP/2 errors by code (ENHANCE_YOUR_CALM for"
    " floods), handshake_timeout, idle_timeout, refused (over --max-connections).",
    ["reason"],
)
INFO = Gauge("bbr_info", "bbr build information.", ["version"], multiprocess_mode="max")
# The Go BBR's series.
SUCCESS = Counter("bbr_success", "Requests whose model was read from the body and set as a header.")
FIELD_NOT_FOUND = Counter(
    "bbr_body_field_not_found", "Request bodies without the routing field.", ["field"]
)

_BY_LABEL = {label: REQUESTS.labels(outcome=label.value) for label in Label}
_MODEL_NOT_FOUND = FIELD_NOT_FOUND.labels(field="model")
_BASES = MAP_MODELS.labels(kind="base")
_ADAPTERS = MAP_MODELS.labels(kind="adapter")
RELOAD_OK = MAP_RELOADS.labels(result="success")
RELOAD_ERROR = MAP_RELOADS.labels(result="error")
INFO.labels(version=__version__).set(1)


# base model -> its bbr_model_requests_total child, bound when a map comes into force, so
# a request costs one dict lookup and the label values are the map's base models only.
_BY_BASE: dict[str, Any] = {}
# prometheus_client cannot drop a series in multiprocess mode (--workers): there the
# series of a base model that left the map stays, at its last value, until restart.
_CAN_PRUNE = "PROMETHEUS_MULTIPROC_DIR" not in os.environ


def start(port: int, registry: Any = None, current: Callable[[], ModelMap] | None = None) -> None:
    """The metrics port: /metrics and, from `current()`, `GET /modelmap` (bbr.mapview)."""
    try:
        if registry is None:
            mapview.start(port, current)
        else:
            mapview.start(port, current, registry)
    except OSError as exc:
        raise StartupError(f"--metrics-port {port}: {exc.strerror}") from None


def record(done: RequestRecord) -> None:
    """Count one finished request."""
    outcome = done.outcome
    _BY_LABEL[outcome.label].inc()
    if outcome.base_model is not None:
        child = _BY_BASE.get(outcome.base_model)
        if child is not None:  # None: its base model left the map since the request began
            child.inc()
    DURATION.observe(done.seconds)
    if done.body_bytes is not None:
        BODY_BYTES.observe(done.body_bytes)
    if outcome.continues and outcome.model is not None:
        SUCCESS.inc()
    elif outcome.label is Label.NO_MODEL:
        _MODEL_NOT_FOUND.inc()


def bind_base_models(bases: frozenset[str]) -> None:
    """One bbr_model_requests_total child per base model in `bases`; the others dropped."""
    _rebind({base: True for base in bases} | {base: False for base in _BY_BASE.keys() - bases})


def _rebind(changes: Mapping[str, bool]) -> None:
    """Bind the base models that came into the map (True), drop those that left (False).

    Changed in place: the request path only does `_BY_BASE.get`, which the GIL keeps
    atomic, and only the holder's listener (one at a time) changes or walks it."""
    by_base = _BY_BASE
    for base, present in changes.items():
        if present:
            if base not in by_base:
                by_base[base] = MODEL_REQUESTS.labels(base_model=base)
        elif by_base.pop(base, None) is not None and _CAN_PRUNE:
            MODEL_REQUESTS.remove(base)


def observe_map(snapshot: ModelMap) -> None:
    """Follow a new map in force: in proportion to what changed when the holder says
    what did (`snapshot.changes`), else from the whole set of base models."""
    if snapshot.changes is not None:
        _rebind(snapshot.changes.bases)
    else:
        bind_base_models(snapshot.bases)
    _BASES.set(snapshot.base_count)
    _ADAPTERS.set(snapshot.adapter_count)
    MAP_CONFLICTS.set(snapshot.conflict_count)


# The Kubernetes source (SPEC §5): alert on these, not on logs.
KUBE_WATCH_ERRORS = Counter(
    "bbr_kubernetes_watch_errors",
    "Failed Kubernetes API lists and watches, by reason (expired = 410 Gone, relisted).",
    ["reason"],
)
KUBE_LAST_SYNC = Gauge(
    "bbr_kubernetes_last_sync_timestamp_seconds",
    "Unix time every watch stream was last in step with the API (list done, watch open or "
    "ended by the server); 0 before the first.",
    multiprocess_mode="livemax",
)
