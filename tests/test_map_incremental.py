"""The incremental map equals a from-scratch build, whatever the sequence of changes.

`MapHolder` recomputes only the names a change touches; `ModelMap(configs)` is the
plain fold over every ConfigMap in conflict order. After any random sequence of adds,
edits, deletes and label moves (through the Kubernetes source's own event handling,
the two label streams interleaved at random) both must agree on every name, owner,
conflict (and its order), count and the /v1/models body.
"""

from __future__ import annotations

import gc
import json
import time
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bbr import modelmap
from bbr.modelmap import (
    MANAGED_LABELS,
    ConfigMapRef,
    Conflict,
    MapHolder,
    ModelConfig,
    ModelMap,
)
from bbr.sources import kubernetes
from bbr.sources.kubernetes import KubernetesSource, decode_event, decode_page

BASES = ["B0", "B1", "B2", "x0"]  # x0 is also an adapter name: a base may collide
ADAPTERS = ["x0", "x1", "x2", "x3", "B1"]
REFS = [ConfigMapRef(ns, n) for ns in ("ns-a", "ns-b") for n in ("c0", "c1", "c2", "c3")]


def api_config(
    ref: ConfigMapRef, base: str, adapters: tuple[str, ...], created: int
) -> ModelConfig:
    return ModelConfig(
        ref=ref,
        base_model=base,
        adapters=adapters,
        rank=(1, created, ref.namespace, ref.name),
        source=f"configmap {ref}",
        created=created,
    )


def assert_same(incremental: ModelMap, configs: list[ModelConfig]) -> None:
    scratch = ModelMap(configs)
    assert list(incremental.items()) == list(scratch.items())
    assert incremental.owners == scratch.owners
    assert incremental.conflicts == scratch.conflicts
    assert incremental.conflict_count == len(scratch.conflicts)
    assert incremental.bases == scratch.bases and incremental.adapters == scratch.adapters
    assert (incremental.base_count, incremental.adapter_count) == (
        len(scratch.bases),
        len(scratch.adapters),
    )
    assert incremental.models_body == scratch.models_body
    for name in ("B0", "x0", "x3", "nope"):
        assert incremental.lookup(name) == scratch.lookup(name)


configs_st = st.builds(
    api_config,
    st.sampled_from(REFS),
    st.sampled_from(BASES),
    st.lists(st.sampled_from(ADAPTERS), max_size=4, unique=True).map(tuple),
    st.integers(0, 3),
)
op_st = st.one_of(
    st.tuples(st.just("set"), configs_st),
    st.tuples(st.just("delete"), st.sampled_from(REFS)),
    st.tuples(
        st.just("files"),
        st.lists(
            st.tuples(st.sampled_from(REFS), st.sampled_from(BASES), st.sampled_from(ADAPTERS)),
            max_size=4,
        ),
    ),
)


class Follower:
    """A holder listener that follows the map only through `snapshot.changes`, as the
    metrics and Events listeners do: it must end up with the same base models and
    conflicts as the snapshot itself."""

    def __init__(self) -> None:
        self.bases: set[str] = set()
        self.conflicts: dict[str, tuple[Conflict, ...]] = {}
        self.seen: list[ModelMap] = []

    def __call__(self, snapshot: ModelMap) -> None:
        assert snapshot.changes is not None
        self.seen.append(snapshot)
        for name, is_base in snapshot.changes.bases.items():
            (self.bases.add if is_base else self.bases.discard)(name)
        for name in snapshot.changes.conflicted:
            self.conflicts[name] = snapshot.conflicts_of(name)
            if not self.conflicts[name]:
                del self.conflicts[name]

    def check(self, snapshot: ModelMap) -> None:
        assert self.seen[-1] is snapshot
        assert self.bases == snapshot.bases
        followed = Counter(c for group in self.conflicts.values() for c in group)
        assert followed == Counter(snapshot.conflicts)


def run_holder_ops(ops: list[Any]) -> None:
    holder = MapHolder()
    follower = Follower()
    holder.subscribe(follower)
    api: dict[ConfigMapRef, ModelConfig] = {}
    files: list[ModelConfig] = []
    for op in ops:
        if op[0] == "set":
            config = op[1]
            api[config.ref] = config
            holder.apply("kubernetes", {config.ref: config})
        elif op[0] == "delete":
            api.pop(op[1], None)
            holder.apply("kubernetes", {op[1]: None})
        else:
            files = [
                ModelConfig(ref, base, (adapter,), (0, i), f"f#{i}", 0)
                for i, (ref, base, adapter) in enumerate(op[1])
            ]
            holder.publish("files", files)
        # Sources in the order they first published, as the holder saw them.
        assert_same(holder.current, [*files, *api.values()])
        follower.check(holder.current)


@settings(max_examples=300, deadline=None)
@given(st.lists(op_st, max_size=40))
def test_holder_apply_equals_scratch(ops: list[Any]) -> None:
    run_holder_ops(ops)


@settings(max_examples=150, deadline=None)
@given(st.lists(op_st, max_size=40))
def test_holder_shards_equal_scratch(ops: list[Any]) -> None:
    """The same, with a shard per two entries (in production SHARD_MAX, 256): the shards double
    as the names come, split and change by several names at once."""
    saved = modelmap.SHARD_MAX
    modelmap.SHARD_MAX = 2
    try:
        run_holder_ops(ops)
    finally:
        modelmap.SHARD_MAX = saved


def test_a_change_copies_only_what_changed() -> None:
    """At scale a change must not copy the map: the new snapshot shares the old one's
    shards (each of a few hundred names at most) and copies only those it touched."""
    holder = MapHolder()
    configs = {
        i: api_config(ConfigMapRef("ns", f"c{i}"), f"base{i % 7}", (f"a{i}",), i)
        for i in range(5000)
    }
    holder.apply("kubernetes", {c.ref: c for c in configs.values()})
    before = holder.current
    edited = api_config(configs[42].ref, "base0", ("a42", "new"), 42)
    holder.apply("kubernetes", {edited.ref: edited})
    after = holder.current
    # Only the shards the change touched ("new"'s, "a42"'s owner's) are new dicts.
    touched = [
        modelmap._shard_of(after._routes, "new"),
        modelmap._shard_of(after._owners, "new"),
        modelmap._shard_of(after._owners, "a42"),
    ]
    old = {id(s) for s in (*before._routes, *before._owners)}
    fresh = [s for s in (*after._routes, *after._owners) if id(s) not in old]
    assert fresh and all(any(s is t for t in touched) for s in fresh), len(fresh)
    shard = modelmap._shard_of(after._routes, "new")
    assert len(after._routes) == 32 and len(shard) <= modelmap.SHARD_MAX + 64
    # So are the holder's own name- and ConfigMap-sized dicts: no insert rehashes more
    # than a shard (a whole 50 k-entry dict's took ~4 ms holding the GIL).
    own = (holder._claims, holder._claim_bases, holder._owned, holder._entries["kubernetes"])
    for sharded in own:
        assert len(sharded.shards) >= 16
        assert max(map(len, sharded.shards)) <= modelmap.SHARD_MAX + 64
    assert after.lookup("new") == "base0" and before.lookup("new") is None
    assert after.lookup("a43") == "base1" and after.owner("a42") is edited
    # The name-sized dicts hold only strings and ints: Python's cyclic GC never walks
    # them (a new 50 k-entry dict of ModelConfigs made its next passes take ms).
    assert not any(gc.is_tracked(s) for s in (*after._routes, *after._owners))
    # Nor the ConfigMap-sized one, nor what an edit leaves: ModelConfigs and their refs
    # are untracked, and so is a name's (short) tuple of claimants once the GC saw it.
    assert not gc.is_tracked(edited) and not gc.is_tracked(edited.ref)
    assert not any(gc.is_tracked(s) for s in after._configs)
    gc.collect()  # one pass: a tuple of tuples would take one pass per level
    assert not gc.is_tracked(holder._claims["new"]) and not gc.is_tracked(holder._claims["a42"])
    holder.apply("kubernetes", {edited.ref: None})
    gone = holder.current
    assert gone.lookup("a42") is None and gone.lookup("new") is None and "a42" not in gone
    assert gone.changes is not None and gone.changes.bases == {}
    assert len(gone) == len(before) - 1


# --- through the Kubernetes source: events of both label streams, interleaved --------


class _NoClient:
    namespace = "default"


def _object(ref: ConfigMapRef, version: int, base: str, adapters: list[str], labels: set[str]):
    return {
        "metadata": {
            "name": ref.name,
            "namespace": ref.namespace,
            "uid": f"uid-{ref}",
            "resourceVersion": str(version),
            "creationTimestamp": f"2026-01-01T00:00:0{REFS.index(ref) % 8}Z",
            "labels": {label: "true" for label in labels},
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:data": {}}}],
        },
        "data": {"baseModel": base, "adapters": json.dumps(adapters), "notes": "x" * 100},
    }


def _source() -> tuple[KubernetesSource, MapHolder]:
    holder = MapHolder()
    source = KubernetesSource(holder, ["*"], client=_NoClient())  # type: ignore[arg-type]
    for stream in source._streams:
        stream.listed = True
        stream.resource_version = "1"
    return source, holder


def _events_for(
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    label: str,
    version: int,
    as_it_was: bool,
) -> list[dict[str, Any]]:
    """What the API server sends the stream selecting `label` for one change. A DELETED
    (deleted, or no longer matching) carries the object as it was with the change's
    resourceVersion, as kube-apiserver sends it (`as_it_was`), or the object as it is."""

    def has(obj: dict[str, Any] | None) -> bool:
        return obj is not None and obj["metadata"]["labels"].get(label) == "true"

    if has(after):
        return [{"type": "MODIFIED" if has(before) else "ADDED", "object": after}]
    if has(before):
        assert before is not None
        gone = json.loads(json.dumps(before))
        gone["metadata"]["resourceVersion"] = str(version)
        return [{"type": "DELETED", "object": gone if as_it_was or after is None else after}]
    return []


def _build(source: KubernetesSource) -> None:
    if source._dirty or not source._published_once:
        source._build_once()


change_st = st.tuples(
    st.sampled_from(REFS),
    st.one_of(
        st.none(),
        st.tuples(
            st.sampled_from(BASES),
            st.lists(st.sampled_from(ADAPTERS), max_size=3, unique=True),
            st.sets(st.sampled_from(MANAGED_LABELS), max_size=2),
        ),
    ),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(change_st, max_size=25), st.randoms(use_true_random=False))
def test_source_events_equal_scratch(changes: list[Any], rnd: Any) -> None:
    source, holder = _source()
    streams = {s.label: s for s in source._streams}
    truth: dict[ConfigMapRef, dict[str, Any]] = {}
    queues: dict[str, list[dict[str, Any]]] = {label: [] for label in MANAGED_LABELS}
    version = 1
    for ref, change in changes:
        version += 1
        before = truth.get(ref)
        after = None
        if change is not None:
            base, adapters, labels = change
            after = _object(ref, version, base, adapters, labels)
            truth[ref] = after
        else:
            truth.pop(ref, None)
        as_it_was = rnd.random() < 0.5
        for label in MANAGED_LABELS:
            queues[label].extend(_events_for(before, after, label, version, as_it_was))
    # Deliver the two streams' events interleaved at random, each in its own order.
    while any(queues.values()):
        label = rnd.choice([label for label, q in queues.items() if q])
        source._event(streams[label], queues[label].pop(0))
        if rnd.random() < 0.3:
            _build(source)
    # Both streams catch up (a bookmark): what was only maybe moved is now known gone.
    for stream in source._streams:
        source._event(
            stream, {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": str(version)}}}
        )
    source._expire_handovers()
    _build(source)
    assert not source._handover  # nothing is in transit
    managed = [
        api_config(
            ref,
            obj["data"]["baseModel"],
            tuple(json.loads(obj["data"]["adapters"])),
            int(obj["metadata"]["creationTimestamp"][-3:-1]),
        )
        for ref, obj in truth.items()
        if obj["metadata"]["labels"]
    ]
    current = holder.current
    assert list(current.items()) == list(ModelMap(managed).items())
    assert [(c.name, c.winner, c.loser) for c in current.conflicts] == [
        (c.name, c.winner, c.loser) for c in ModelMap(managed).conflicts
    ]
    # Only what the map needs of each object is kept.
    for stream in source._streams:
        for copy in stream.objects.values():
            assert "managedFields" not in copy.obj["metadata"]
            assert set(copy.obj["data"]) <= {"baseModel", "adapters"}


@pytest.mark.parametrize("as_it_was", [True, False])
def test_label_move_has_no_gap(as_it_was: bool) -> None:
    """Moving a ConfigMap between the two labels: the stream it leaves reports first
    (DELETED, with the object as it was, as kube-apiserver sends it, or as it is), the
    one it joins later (ADDED); its names stay routable throughout."""
    source, holder = _source()
    bbr, llmd = (next(s for s in source._streams if s.label == label) for label in MANAGED_LABELS)
    ref = REFS[0]
    v1 = _object(ref, 2, "B0", ["x1"], {MANAGED_LABELS[0]})
    source._event(bbr, {"type": "ADDED", "object": v1})
    _build(source)
    assert holder.current.lookup("x1") == "B0"
    v2 = _object(ref, 3, "B0", ["x1"], {MANAGED_LABELS[1]})
    was = _object(ref, 3, "B0", ["x1"], {MANAGED_LABELS[0]})
    source._event(bbr, {"type": "DELETED", "object": was if as_it_was else v2})
    _build(source)
    assert holder.current.lookup("x1") == "B0"  # in transit: still in force
    source._event(llmd, {"type": "ADDED", "object": v2})
    _build(source)
    assert holder.current.lookup("x1") == "B0" and not source._handover
    # A delete: the other stream has passed it (a later event) without the ConfigMap.
    source._event(
        llmd, {"type": "DELETED", "object": _object(ref, 4, "B0", ["x1"], {MANAGED_LABELS[1]})}
    )
    source._event(bbr, {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "5"}}})
    source._expire_handovers()
    _build(source)
    assert holder.current.lookup("x1") is None and not source._handover


def test_a_delete_is_in_force_within_the_grace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DELETED that may be a move keeps the names DELETE_GRACE at most, then they go."""
    monkeypatch.setattr(kubernetes, "DELETE_GRACE", 0.05)
    source, holder = _source()
    bbr = next(s for s in source._streams if s.label == MANAGED_LABELS[0])
    ref = REFS[2]
    source._event(
        bbr, {"type": "ADDED", "object": _object(ref, 2, "B2", ["x2"], {MANAGED_LABELS[0]})}
    )
    _build(source)
    source._event(
        bbr, {"type": "DELETED", "object": _object(ref, 3, "B2", ["x2"], {MANAGED_LABELS[0]})}
    )
    _build(source)
    assert holder.current.lookup("x2") == "B2"
    time.sleep(0.06)
    source._expire_handovers()
    _build(source)
    assert holder.current.lookup("x2") is None and not source._handover


def test_label_removed_without_the_other_removes_at_once() -> None:
    source, holder = _source()
    bbr = next(s for s in source._streams if s.label == MANAGED_LABELS[0])
    ref = REFS[1]
    source._event(bbr, {"type": "ADDED", "object": _object(ref, 2, "B1", [], {MANAGED_LABELS[0]})})
    _build(source)
    assert holder.current.lookup("B1") == "B1"
    source._event(bbr, {"type": "DELETED", "object": _object(ref, 3, "B1", [], set())})
    _build(source)
    assert holder.current.lookup("B1") is None and not source._handover


def test_lists_and_events_are_decoded_to_what_the_map_needs() -> None:
    """Pages and watch events are decoded typed (managedFields and other data keys never
    built); the result is the slim object (the metadata the map reads, the managed
    labels, baseModel and adapters), also for an object the API would not send (a
    non-string data value: the general decoder's turn)."""
    full = _object(REFS[0], 7, "B0", ["x1"], {MANAGED_LABELS[0]})
    full["metadata"]["labels"]["app"] = "other"
    kept = ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
    labels = {"labels": {MANAGED_LABELS[0]: "true"}}  # the managed ones only
    slim = {
        "metadata": {k: full["metadata"][k] for k in kept} | labels,
        "data": {"baseModel": "B0", "adapters": full["data"]["adapters"]},
    }
    page = {"metadata": {"continue": "next", "resourceVersion": "9"}, "items": [full]}
    decoded = decode_page(json.dumps(page).encode())
    assert decoded == {"metadata": page["metadata"], "items": [slim]}
    odd = json.loads(json.dumps(full))
    odd["data"]["baseModel"] = 5  # not a string
    odd_slim = {**slim, "data": {**slim["data"], "baseModel": 5}}
    assert decode_page(json.dumps({"items": [odd]}).encode())["items"] == [odd_slim]
    for kind in ("ADDED", "MODIFIED", "DELETED"):
        event = decode_event(json.dumps({"type": kind, "object": full}).encode())
        assert event == {"type": kind, "object": slim}
    gone = {"type": "ERROR", "object": {"kind": "Status", "code": 410, "message": "too old"}}
    assert decode_event(json.dumps(gone).encode()) == {
        "type": "ERROR",
        "object": {"code": 410, "message": "too old"},
    }


def test_a_move_that_also_edits_puts_the_edit_in_force() -> None:
    """The DELETED of a move carries the object as it was with the new resourceVersion:
    the same version as the moved object's ADDED, other data. The edit must win."""
    source, holder = _source()
    bbr, llmd = (next(s for s in source._streams if s.label == label) for label in MANAGED_LABELS)
    ref = REFS[3]
    source._event(
        bbr, {"type": "ADDED", "object": _object(ref, 2, "B0", ["x0"], {MANAGED_LABELS[0]})}
    )
    was = _object(ref, 3, "B0", ["x0"], {MANAGED_LABELS[0]})
    source._event(bbr, {"type": "DELETED", "object": was})
    _build(source)  # the copy as it was is parsed (version 3) and kept in force
    assert holder.current.lookup("x0") == "B0"
    source._event(
        llmd, {"type": "ADDED", "object": _object(ref, 3, "B0", ["y0"], {MANAGED_LABELS[1]})}
    )
    _build(source)
    assert holder.current.lookup("y0") == "B0" and holder.current.lookup("x0") is None
