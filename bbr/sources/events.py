"""Kubernetes Events on model-map ConfigMaps, where `kubectl describe configmap` shows them.

Recorded: a ConfigMap turned invalid (with the reason; its last good version stays in
force), one of its names lost a conflict (naming the older ConfigMap that won), and it
turned valid again. Like client-go's recorder, a repeat of the same event on the same
object within `DEDUP_SECONDS` patches the first one's `count` and `lastTimestamp`
instead of creating another; each object has a token bucket (`PER_OBJECT_BURST`
events, then one per `PER_OBJECT_REFILL` seconds) and so has the whole process
(`TOTAL_BURST`, then `TOTAL_PER_SECOND`). Events wait in a bounded queue
(`QUEUE_SIZE`) and one daemon thread posts them, so recording never blocks the map
builder or the request path; an event over a limit, or one the API refuses, is dropped
and logged, nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from bbr.logs import fields
from bbr.modelmap import ConfigMapRef, Conflict, ModelMap

log = logging.getLogger("bbr.sources.events")

COMPONENT = "bbr"
DEDUP_SECONDS = 600.0
PER_OBJECT_BURST = 10
PER_OBJECT_REFILL = 60.0
TOTAL_BURST = 50
TOTAL_PER_SECOND = 5.0
QUEUE_SIZE = 1000
MAX_TRACKED = 4096  # objects with a bucket, and remembered events, each
MAX_MESSAGE = 1024  # events.k8s.io/v1 caps `note` at 1 KiB; the same bound here
FAILURE_LOG_SECONDS = 300.0

INVALID = "InvalidModelMap"
VALID = "ModelMapValid"
CONFLICT = "ModelNameConflict"


class Client(Protocol):
    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any: ...


@dataclass(slots=True)
class _Event:
    ref: ConfigMapRef
    uid: str
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(slots=True)
class _Posted:
    name: str
    count: int
    first: str
    last_seen: float


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, burst: float) -> None:
        self.tokens = burst
        self.stamp = time.monotonic()

    def take(self, burst: float, per_second: float) -> bool:
        now = time.monotonic()
        self.tokens = min(burst, self.tokens + (now - self.stamp) * per_second)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class EventRecorder:
    """Posts Events about ConfigMaps from a background thread; see the module doc."""

    def __init__(
        self,
        client: Client,
        *,
        uid_of: Callable[[ConfigMapRef], str | None] = lambda ref: None,
        instance: str | None = None,
    ) -> None:
        self.client = client
        self.uid_of = uid_of
        self.instance = instance or os.environ.get("POD_NAME") or socket.gethostname()
        self._queue: queue.Queue[_Event | None] = queue.Queue(QUEUE_SIZE)
        self._lock = threading.Lock()
        self._buckets: OrderedDict[tuple[ConfigMapRef, str], _Bucket] = OrderedDict()
        self._total = _Bucket(TOTAL_BURST)
        self._posted: OrderedDict[tuple[ConfigMapRef, str, str, str], _Posted] = OrderedDict()
        self._conflicts: dict[str, frozenset[Conflict]] = {}  # name -> its conflicts
        self._thread: threading.Thread | None = None
        self._failed_logged = 0.0
        self.stats = {"posted": 0, "patched": 0, "dropped": 0, "failed": 0}

    # -- what the source and the holder call (cheap, never blocking)

    def invalid(self, ref: ConfigMapRef, uid: str, reason: str) -> None:
        self._record(
            _Event(
                ref,
                uid,
                "Warning",
                INVALID,
                f"not loaded: {reason}; bbr keeps its last good version, if any, in force",
            )
        )

    def valid(self, ref: ConfigMapRef, uid: str) -> None:
        self._record(_Event(ref, uid, "Normal", VALID, "valid again; bbr has put it in force"))

    def observe(self, snapshot: ModelMap) -> None:
        """Holder listener: an Event on the losing ConfigMap for each new conflict.
        Only the names whose conflicts changed are looked at (`snapshot.changes`)."""
        changes = snapshot.changes
        if changes is not None:
            names: Iterable[str] = changes.conflicted
        elif snapshot.conflict_count or self._conflicts:
            names = {c.name for c in snapshot.conflicts} | self._conflicts.keys()
        else:
            return
        for name in names:
            seen = self._conflicts.pop(name, frozenset())
            now = snapshot.conflicts_of(name)
            for conflict in now:
                if conflict not in seen:
                    self._conflict(conflict)
            if now:
                self._conflicts[name] = frozenset(now)

    def _conflict(self, conflict: Conflict) -> None:
        uid = self.uid_of(conflict.loser)
        if uid is None:  # not a ConfigMap of the API (a file's)
            return
        self._record(
            _Event(
                conflict.loser,
                uid,
                "Warning",
                CONFLICT,
                f"model {conflict.name!r} (base {conflict.loser_base!r}) is also claimed "
                f"by ConfigMap {conflict.winner} (base {conflict.winner_base!r}), which "
                "is older and wins; this ConfigMap's entry for it is ignored",
            )
        )

    def _record(self, event: _Event) -> None:
        event.message = event.message[:MAX_MESSAGE]
        with self._lock:
            key = (event.ref, event.uid)
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = _Bucket(PER_OBJECT_BURST)
                if len(self._buckets) > MAX_TRACKED:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
            allowed = bucket.take(PER_OBJECT_BURST, 1 / PER_OBJECT_REFILL) and self._total.take(
                TOTAL_BURST, TOTAL_PER_SECOND
            )
        if allowed:
            try:
                self._queue.put_nowait(event)
                return
            except queue.Full:
                pass
        self.stats["dropped"] += 1
        log.debug(
            "Kubernetes Event dropped (rate limit)",
            extra=fields(configmap=str(event.ref), reason=event.reason),
        )

    # -- the posting thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bbr-kube-events", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(timeout)

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until every queued event was posted (for tests); True if it was."""
        end = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < end:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            try:
                if event is None:
                    return
                self._post(event)
            except Exception as exc:  # only logged: Events are a courtesy
                self.stats["failed"] += 1
                now = time.monotonic()
                if now - self._failed_logged > FAILURE_LOG_SECONDS:
                    self._failed_logged = now
                    log.warning(
                        "could not post a Kubernetes Event",
                        extra=fields(configmap=str(event.ref) if event else None, reason=str(exc)),
                    )
            finally:
                self._queue.task_done()

    def _post(self, event: _Event) -> None:
        ref = event.ref
        base = f"/api/v1/namespaces/{ref.namespace}/events"
        key = (ref, event.uid, event.reason, event.message)
        now = _now()
        seen = self._posted.get(key)
        if seen is not None and time.monotonic() - seen.last_seen < DEDUP_SECONDS:
            seen.count += 1
            seen.last_seen = time.monotonic()
            try:
                self.client.request(
                    "PATCH",
                    f"{base}/{seen.name}",
                    body={"count": seen.count, "lastTimestamp": now},
                    content_type="application/merge-patch+json",
                )
                self._posted.move_to_end(key)
                self.stats["patched"] += 1
                return
            except Exception:  # gone (events expire after an hour): create a new one
                del self._posted[key]
        name = f"{ref.name}.{time.time_ns():x}"
        self.client.request(
            "POST",
            base,
            body={
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": name, "namespace": ref.namespace},
                "involvedObject": {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "namespace": ref.namespace,
                    "name": ref.name,
                    "uid": event.uid,
                },
                "type": event.type,
                "reason": event.reason,
                "message": event.message,
                "count": 1,
                "firstTimestamp": now,
                "lastTimestamp": now,
                "source": {"component": COMPONENT, "host": self.instance},
                "reportingComponent": COMPONENT,
                "reportingInstance": self.instance,
            },
        )
        self.stats["posted"] += 1
        self._posted[key] = _Posted(name, 1, now, time.monotonic())
        if len(self._posted) > MAX_TRACKED:
            self._posted.popitem(last=False)
