"""Model-map ConfigMaps from the Kubernetes API: list, then watch (SPEC §3).

What is watched
    ConfigMaps labelled `inference.networking.k8s.io/bbr-managed: "true"` or
    `inference.llm-d.ai/ipp-managed: "true"`, in each `--namespace` (`*` = all; default
    the pod's own namespace, else the kubeconfig context's, else `default`).

    A label selector cannot OR two keys, so there is one list+watch *stream* per
    (namespace, label). The alternative, watching every ConfigMap and filtering on the
    labels in bbr, was rejected: cluster-wide (`*`) it would download and hold every
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

The API client (kubeconfig, credentials, TLS, proxies, requests) is bbr.sources.kubeclient.
"""

from __future__ import annotations

import contextlib
import gc
import http.client
import json
import logging
import random
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from bbr import metrics
from bbr.logs import fields
from bbr.modelmap import (
    MANAGED_LABELS,
    SWITCH_INTERVAL,
    ConfigMapError,
    ConfigMapParseError,
    ConfigMapRef,
    MapHolder,
    ModelConfig,
    Pacer,
    parse_configmap,
)
from bbr.sources import LoadReport, warn
from bbr.sources.events import EventRecorder
from bbr.sources.kubeclient import (
    SERVICE_ACCOUNT_DIR,
    ApiError,
    Gone,
    KubeClient,
    KubeConfigError,
    default_namespace,
    describe,
    error_reason,
)

log = logging.getLogger("bbr.sources.kubernetes")

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
# catches a vanished host sooner).
WATCH_SECONDS = 120
READ_GRACE = 30.0
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
NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


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
        """Raises KubeConfigError when there is no usable config. `on_reload` gets the
        LoadReport of each map update that changed something or met an invalid
        ConfigMap (`bbr.sources.report` when bbr serves). `record_events`: post
        Kubernetes Events on the ConfigMaps (bbr.sources.events)."""
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
        holder.expect(self.name)

    # -- lifecycle

    def start(self) -> None:
        """Start one daemon thread per stream, the map builder and the thread that asks
        about deletes; returns at once."""
        # The builder gives the GIL up after GIL_BUDGET of map work (Pacer); the switch
        # interval holds the other threads (watch decoding, listeners) to less when the
        # request loop waits (CPython's default lets one run on for 5 ms): see
        # SWITCH_INTERVAL.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
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
            reason=describe(exc),
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
            self._synced(stream)  # a watch is open: the API is back
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
                extra=fields(configmap=str(ref), reason=describe(exc), seconds=DELETE_GRACE),
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
        changed = bool(changes)
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
            warn(warning)
        return _Parsed(version, config, None, obj.get("data"))

    def uid_of(self, ref: ConfigMapRef) -> str | None:
        """The uid of a ConfigMap this source has in force, else None."""
        good = self._last_good.get(ref)
        return good[0] if good is not None else None


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
