"""The model map: which base model serves each model name.

ConfigMaps are parsed into `ModelConfig`s; `build` folds any number of them into an
immutable `ModelMap` snapshot. Readers take the snapshot reference once and never see
it change; writers swap a whole new snapshot in (`MapHolder`).
"""

from __future__ import annotations

import re
import sys
import threading
import time
from bisect import bisect_left, bisect_right, insort
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
import yaml

MAX_NAME_BYTES = 256
MANAGED_LABELS = (
    "inference.networking.k8s.io/bbr-managed",  # Gateway API Inference Extension
    "inference.llm-d.ai/ipp-managed",  # llm-d inference payload processor
)

try:  # the C loader is ~10x faster; fall back when libyaml is absent
    _Loader: Any = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on the PyYAML build
    _Loader = yaml.SafeLoader

# The one control-character rule, for map names and request models alike: C0 and DEL.
# (Envoy refuses these in a header value; U+0080-U+009F travel as UTF-8 bytes.)
CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# Plain YAML scalars that a YAML 1.1 reader (PyYAML, Helm's sprig) would not read as
# text: bbr, like the Go BBR, keeps their literal text.
_RESOLVER: Any = yaml.resolver.Resolver()
_STR_TAG = "tag:yaml.org,2002:str"


# The map's long-lived per-ConfigMap objects are msgspec Structs with gc=False: Python's
# cyclic GC neither tracks nor walks them (they hold only strings, ints and tuples of
# them, so they can be in no cycle), nor the dicts and tuples that hold only them. As
# dataclasses, each edit left a few tracked objects behind and a fold made a 10 k-entry
# dict of them: young collections walked those while the request loop waited.


class ConfigMapRef(msgspec.Struct, frozen=True, order=True, gc=False):
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class ModelConfig(msgspec.Struct, frozen=True, gc=False):
    """One valid ConfigMap: a base model and the adapters that run on it."""

    ref: ConfigMapRef
    base_model: str
    adapters: tuple[str, ...]
    # Conflict order, oldest first: (0, document position) for files,
    # (1, creationTimestamp, namespace, name) for the API.
    rank: tuple[Any, ...]
    source: str
    created: int


@dataclass(frozen=True, slots=True)
class ConfigMapError:
    """Why one ConfigMap (or document) was not taken (or, as a warning, what was odd).

    `value` is the offending text, already quoted and cut (`show`); `hint` says how to fix it.
    """

    source: str
    key: str
    reason: str
    ref: ConfigMapRef | None = None
    value: str | None = None
    hint: str | None = None

    def __str__(self) -> str:
        who = f" ConfigMap {self.ref}" if self.ref else ""
        what = f" {self.value}" if self.value is not None else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{self.source}:{who} {self.key}:{what} {self.reason}{hint}"


SHOW_BYTES = 64


def show(value: str) -> str:
    """`value` for a message: double-quoted, unprintables escaped, cut at 64 bytes."""
    raw = value.encode("utf-8", "surrogatepass")
    cut = len(raw) > SHOW_BYTES
    if cut:
        value = raw[:SHOW_BYTES].decode("utf-8", "ignore")
    out = []
    for char in value:
        if char in '"\\':
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        elif ord(char) <= 0xFF:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(f"\\u{ord(char):04x}")
    return '"' + "".join(out) + '"' + ("…" if cut else "")


class MapFileError(Exception):
    """A model-map file that cannot be used at all (unreadable, or not YAML)."""

    def __init__(self, path: str, reason: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else path
        super().__init__(f"{where}: {reason}")
        self.path = path
        self.line = line
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Conflict:
    """`name` is claimed by two base models; the older ConfigMap won."""

    name: str
    winner: ConfigMapRef
    winner_base: str
    loser: ConfigMapRef
    loser_base: str

    def __str__(self) -> str:
        return (
            f"{self.name!r} is claimed by {self.winner} (base {self.winner_base!r}) and "
            f"{self.loser} (base {self.loser_base!r}); the older, {self.winner}, wins"
        )


def name_problem(name: str) -> str | None:
    """Why `name` cannot be a model name (a header value), or None.

    The one rule for map names (already trimmed) and request models (never trimmed):
    non-empty, at most 256 bytes of UTF-8, no U+0000-U+001F or U+007F, no lone
    surrogate. `decision` asks this too, so a name is good in both places or in neither.
    """
    if not name:
        return "empty name"
    if len(name) > MAX_NAME_BYTES or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    if name.isprintable():  # the common case: nothing below is possible
        return None
    if CONTROL_CHARACTER.search(name):
        return "contains a control character"
    if _SURROGATE.search(name):
        return "contains a lone surrogate"
    return None


def _timestamp(value: Any) -> int | None:
    if isinstance(value, datetime):
        return int(value.timestamp())
    if isinstance(value, str) and value:
        try:
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
        except ValueError:
            return None
    return None


def parse_configmap(
    obj: Mapping[str, Any],
    *,
    source: str,
    rank: tuple[Any, ...] | None = None,
    default_created: int = 0,
    warnings: list[ConfigMapError] | None = None,
) -> ModelConfig:
    """Turn one ConfigMap object into a ModelConfig, or raise ConfigMapParseError.

    `rank=None` means "from the API": order by creationTimestamp, then namespace/name.
    What was accepted but read differently from what a user may expect (skipped empty
    items, unquoted names another YAML reader would not take as text) is appended to
    `warnings`.
    """
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping):
        raise ConfigMapParseError(
            ConfigMapError(
                source, "metadata", "missing or not a mapping", hint="add metadata: {name: ...}"
            )
        )
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigMapParseError(
            ConfigMapError(source, "metadata.name", "missing", hint="every ConfigMap needs a name")
        )
    namespace = metadata.get("namespace") or "default"
    ref = ConfigMapRef(str(namespace), name)
    created = _timestamp(metadata.get("creationTimestamp"))

    def fail(
        key: str, reason: str, value: str | None = None, hint: str | None = None
    ) -> ConfigMapParseError:
        shown = show(value) if value is not None else None
        return ConfigMapParseError(ConfigMapError(source, key, reason, ref, shown, hint))

    data = obj.get("data")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise fail("data", "not a mapping", hint="data holds baseModel: and adapters:")
    base = data.get("baseModel")
    if base is None:
        raise fail("data.baseModel", "required", hint="name the base model its pool serves")
    if not isinstance(base, str):
        raise fail("data.baseModel", "must be a string", hint='quote it: baseModel: "..."')
    if problem := name_problem(base.strip()):
        raise fail("data.baseModel", problem, base, _hint(problem))
    base = base.strip()

    adapters = _adapters(data.get("adapters"), fail, warnings, source, ref)
    if rank is None:
        rank = (1, created if created is not None else 2**62, ref.namespace, ref.name)
    return ModelConfig(
        ref=ref,
        base_model=base,
        adapters=tuple(adapters),
        rank=rank,
        source=source,
        created=created if created is not None else default_created,
    )


def _hint(problem: str) -> str:
    """How to fix a name with `problem` (from name_problem)."""
    if problem == "empty name":
        return "write a name, or delete the item"
    if problem.startswith("longer"):
        return f"a name is at most {MAX_NAME_BYTES} bytes of UTF-8"
    if "surrogate" in problem:
        return "a name must be valid Unicode"
    return "remove tabs, line breaks and other control characters (U+0000-U+001F, U+007F)"


_Fail = Callable[..., "ConfigMapParseError"]


class AdapterItems:
    """`data.adapters` written in a file as a YAML list rather than a string: its node.

    Kept as the node so its items are read by the same rule as a string's (their
    literal text), not as the typed values a YAML loader would make of them.
    """

    __slots__ = ("node",)

    def __init__(self, node: yaml.SequenceNode) -> None:
        self.node = node


def _adapters(
    raw: Any,
    fail: _Fail,
    warnings: list[ConfigMapError] | None,
    source: str,
    ref: ConfigMapRef,
) -> tuple[str, ...]:
    """The adapter names of `data.adapters`, read as the Go BBR reads them.

    Through the API the value is a string holding a YAML list; every scalar item is its
    literal text (`- 1.10` is the name "1.10", as Go's YAML decoding into []string
    gives), a plain item with nothing after the dash is skipped, and a mapping or list
    item is an error. The same function reads a file's inline list (AdapterItems).
    """
    node: yaml.Node | None
    if raw is None:
        return ()
    if isinstance(raw, AdapterItems):
        node = raw.node
    elif isinstance(raw, str):
        try:
            node = yaml.compose(raw, Loader=_Loader)
        except yaml.YAMLError as exc:
            raise fail(
                "data.adapters",
                f"not valid YAML: {_yaml_reason(exc)}",
                hint="write one '- name' per line",
            ) from None
    else:
        raise fail(
            "data.adapters",
            f"must be a YAML list of names, not {_kind(raw)}",
            hint="write `adapters: |` then one '- name' per line",
        )
    if node is None:  # empty, or only comments
        return ()
    if not isinstance(node, yaml.SequenceNode):
        value = node.value if isinstance(node, yaml.ScalarNode) else None
        raise fail(
            "data.adapters",
            "must be a YAML list of names",
            value,
            "write one '- name' per line, even for a single adapter",
        )
    names: dict[str, None] = {}  # ordered and de-duplicated in one pass
    for i, item in enumerate(node.value):
        key = f"data.adapters[{i}]"
        if not isinstance(item, yaml.ScalarNode):
            what = "a mapping" if isinstance(item, yaml.MappingNode) else "a list"
            raise fail(
                key,
                f"must be a name, not {what}",
                hint="quote a name that contains ': ' or starts with '[' or '{'",
            )
        text: str = item.value
        plain = not item.style  # None (PyYAML) or "" (libyaml) for a plain scalar
        if plain and not text:
            _warn(warnings, source, key, "empty item skipped (as the Go BBR does)", ref)
            continue
        name = text.strip()
        if problem := name_problem(name):
            raise fail(key, problem, text, _hint(problem))
        tag = _RESOLVER.resolve(yaml.ScalarNode, text, (True, False)) if plain else _STR_TAG
        if tag != _STR_TAG:
            _warn(warnings, source, key, _unquoted(name, tag), ref, hint=f'quote it: - "{name}"')
        elif name != text:
            _warn(warnings, source, key, f"trimmed to {show(name)}", ref, show(text))
        if name in names:
            _warn(warnings, source, key, f"{show(name)} is listed twice", ref)
        names[name] = None
    return tuple(names)


_TYPED = {
    "tag:yaml.org,2002:int": "a number",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:timestamp": "a date",
}


def _unquoted(name: str, tag: str) -> str:
    if tag == "tag:yaml.org,2002:null":
        return (
            f"unquoted; taken as the name {show(name)}, but YAML readers (Go's, PyYAML, Helm"
            " templates) take it as null"
        )
    what = _TYPED.get(tag, "something other than text")
    return (
        f"unquoted; taken as the name {show(name)}, as the Go BBR takes it, but other YAML"
        f" readers (PyYAML, Helm templates) take it as {what}"
    )


def _warn(
    warnings: list[ConfigMapError] | None,
    source: str,
    key: str,
    reason: str,
    ref: ConfigMapRef,
    value: str | None = None,
    hint: str | None = None,
) -> None:
    if warnings is not None:
        warnings.append(ConfigMapError(source, key, reason, ref, value, hint))


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return type(value).__name__


class ConfigMapParseError(Exception):
    def __init__(self, error: ConfigMapError) -> None:
        super().__init__(str(error))
        self.error = error


def _yaml_reason(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return str(problem)


@dataclass(slots=True)
class ParsedFile:
    """What one file holds: its valid ConfigMaps, and why the others were not taken.

    `invalid_refs` are ConfigMaps that are present but invalid: their last good version
    stays in force.
    """

    configs: list[ModelConfig] = field(default_factory=list)
    errors: list[ConfigMapError] = field(default_factory=list)
    invalid_refs: list[ConfigMapRef] = field(default_factory=list)
    warnings: list[ConfigMapError] = field(default_factory=list)


_ADAPTERS_TAG = "tag:bbr.invalid,2026:adapters"


class _FileLoader(_Loader):  # type: ignore[misc]
    """The file loader: a ConfigMap's inline `data.adapters` list stays a YAML node.

    Everything else loads as usual; the adapters list is read by `_adapters`, the same
    code that reads the API's string, so `- 1.10` means "1.10" in both.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        _keep_adapter_nodes(node)
        return super().construct_document(node)


def _adapter_items(loader: Any, node: yaml.ScalarNode) -> AdapterItems:
    return AdapterItems(node.bbr_items)  # type: ignore[attr-defined]


_FileLoader.add_constructor(_ADAPTERS_TAG, _adapter_items)


def _keep_adapter_nodes(node: yaml.Node) -> None:
    """Swap each ConfigMap's `data.adapters` sequence (in a List too) for a marker node."""
    if not isinstance(node, yaml.MappingNode):
        return
    for key, value in node.value:
        if not isinstance(key, yaml.ScalarNode):
            continue
        if key.value == "items" and isinstance(value, yaml.SequenceNode):
            for item in value.value:
                _keep_adapter_nodes(item)
        elif key.value == "data" and isinstance(value, yaml.MappingNode):
            for index, (name, held) in enumerate(value.value):
                if (
                    isinstance(name, yaml.ScalarNode)
                    and name.value == "adapters"
                    and isinstance(held, yaml.SequenceNode)
                ):
                    marker = yaml.ScalarNode(_ADAPTERS_TAG, "", held.start_mark, held.end_mark)
                    marker.bbr_items = held  # type: ignore[attr-defined]
                    value.value[index] = (name, marker)


def parse_file_text(
    text: str | bytes, *, path: str, position: tuple[int, ...] = (), created: int = 0
) -> ParsedFile:
    """Parse a model-map file: YAML (or JSON) documents of ConfigMaps and Lists.

    Raises MapFileError, with the line, when the file is not valid YAML.
    """
    try:
        documents = list(yaml.load_all(text, Loader=_FileLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise MapFileError(path, f"not valid YAML: {_yaml_reason(exc)}", line) from None
    except yaml.reader.ReaderError as exc:  # bytes that are not text: no mark, a position
        raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
        line = raw[: exc.position].count(b"\n") + 1
        raise MapFileError(path, f"not valid YAML: {exc.reason}", line) from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MapFileError(path, f"not valid YAML: {reason}") from None

    parsed = ParsedFile()
    for doc_index, doc in enumerate(documents, start=1):
        if doc is None:
            continue
        where = f"{path}#{doc_index}"
        if not isinstance(doc, Mapping):
            parsed.errors.append(ConfigMapError(where, "(document)", "not a mapping"))
            continue
        items: list[Any]
        if doc.get("kind") == "List":
            items = doc.get("items") or []
            if not isinstance(items, list):
                parsed.errors.append(ConfigMapError(where, "items", "not a list"))
                continue
        else:
            items = [doc]
        for item_index, item in enumerate(items):
            item_where = (
                where if len(items) == 1 and item is doc else f"{where}.items[{item_index}]"
            )
            if not isinstance(item, Mapping) or item.get("kind") != "ConfigMap":
                continue  # other kinds may share the file (kubectl apply -f)
            try:
                parsed.configs.append(
                    parse_configmap(
                        item,
                        source=item_where,
                        rank=(0, *position, doc_index, item_index),
                        default_created=created,
                        warnings=parsed.warnings,
                    )
                )
            except ConfigMapParseError as exc:
                parsed.errors.append(exc.error)
                if exc.error.ref is not None:
                    parsed.invalid_refs.append(exc.error.ref)
    return parsed


# --- sharing the GIL with the request loop ---------------------------------------------
#
# The map is built on threads (the Kubernetes builder, the file watcher) that share the
# GIL with the asyncio request loop. A thread running Python gives the GIL up only every
# `sys.getswitchinterval()` (5 ms) when another asks for it, and a single C call (a dict
# copy, a sort) never: so every long job here is cut into steps and calls a `Pacer`
# between them, which releases the GIL whenever the job has run GIL_BUDGET seconds.

GIL_BUDGET = 0.0005
# The GIL switch interval while a map source runs (`sys.setswitchinterval`). A thread
# that wants the GIL waits one interval before it asks the holder to drop it, and
# CPython then hands the GIL to whichever waiter wakes first: when it went to another
# thread, the asker waits a whole interval again. With the request loop, the builder
# and a watch stream all wanting it in a burst, the loop waited two intervals (1.0-1.3
# ms at 0.5 ms; `make bench-mapscale MAPSCALE_ARGS=--stalls`), so half the budget.
# Not less: at 0.1 ms the loop's wait in a burst fell at p99 (0.35 -> 0.21 ms), but with
# info logs the request loop's CPU per request rose 13-20 % during a burst (ghz against
# `bbr serve --kubernetes` at 50 k names; docs/performance.md).
SWITCH_INTERVAL = GIL_BUDGET / 2
# Every name-sized dict is split into shards by the key's hash, a power of two of them,
# doubled whenever they average more than SHARD_MAX entries: so no single C call of the
# map's upkeep (a dict growing past a resize threshold rehashes it whole; a copy)
# touches more than a few hundred entries, where one 50 k-entry dict's last resize
# took 1-4 ms holding the GIL. A snapshot shares its predecessor's shards and copies
# only the ones a change touched (whole: a lookup probes one dict). Up to SHARD_MAX
# names there is one shard, and `lookup` is that dict's own `get`.
SHARD_MAX = 256
# ids are addresses: ModelConfigs of one pymalloc size class sit one block apart (64
# bytes on CPython 3.11), so the low bits of their ids say nothing; with a shift of 4,
# three shards of four stayed empty and the others held four times SHARD_MAX.
ID_SHIFT = max(
    4, (sys.getsizeof(ModelConfig(ConfigMapRef("", ""), "", (), (), "", 0)) - 1).bit_length()
)


def yield_gil() -> None:
    """Let the request loop run: a real (tiny) sleep releases the GIL for certain;
    `sleep(0)` may take it straight back."""
    time.sleep(0.00002)


class Pacer:
    """Call between the steps of a long job: every `budget` seconds of the job's work
    it releases the GIL, so the request loop never waits longer than that for it.
    (Counting items cannot promise this: one item may cost a hundred times another.)"""

    __slots__ = ("_budget", "_due")

    def __init__(self, budget: float = GIL_BUDGET) -> None:
        self._budget = budget
        self._due = time.perf_counter() + budget

    def __call__(self) -> None:
        if time.perf_counter() >= self._due:
            yield_gil()
            self._due = time.perf_counter() + self._budget


_Frozen = tuple[dict[Any, Any], ...]  # a snapshot's shards of one dict, never changed
_EMPTY: dict[Any, Any] = {}  # never changed


def _shard_of(frozen: _Frozen, key: Any, shift: int = 0) -> dict[Any, Any]:
    return frozen[(hash(key) >> shift) & (len(frozen) - 1)]


def _split(d: dict[Any, Any], shift: int = 0) -> _Frozen:
    """`d` cut into shards by hash (for a map built from scratch)."""
    mask = _shards_for(len(d)) - 1
    shards: list[dict[Any, Any]] = [{} for _ in range(mask + 1)]
    for key, value in d.items():
        shards[(hash(key) >> shift) & mask][key] = value
    return tuple(shards)


def _shards_for(count: int) -> int:
    shards = 1
    while count > SHARD_MAX * shards:
        shards *= 2
    return shards


def _items(frozen: _Frozen) -> Iterator[tuple[Any, Any]]:
    for shard in frozen:
        yield from shard.items()


class _Shards:
    """A dict split into shards by the key's hash (see SHARD_MAX): the holder's own
    name- and ConfigMap-sized dicts, which no snapshot sees. Growing one shard rehashes
    only that shard; the shards double one key at a time, paced (`grow`)."""

    __slots__ = ("_shift", "count", "mask", "shards")

    def __init__(self, shift: int = 0) -> None:
        self.mask = 0
        self._shift = shift
        self.count = 0
        self.shards: list[dict[Any, Any]] = [{}]

    def shard(self, key: Any) -> dict[Any, Any]:
        return self.shards[(hash(key) >> self._shift) & self.mask]

    def get(self, key: Any, default: Any = None) -> Any:
        return self.shards[(hash(key) >> self._shift) & self.mask].get(key, default)

    def __getitem__(self, key: Any) -> Any:
        return self.shards[(hash(key) >> self._shift) & self.mask][key]

    def __contains__(self, key: object) -> bool:
        return key in self.shards[(hash(key) >> self._shift) & self.mask]

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Any]:
        for shard in self.shards:
            yield from shard

    def set(self, key: Any, value: Any) -> int:
        """Set `key`; the index of its shard."""
        index = (hash(key) >> self._shift) & self.mask
        shard = self.shards[index]
        if key not in shard:
            self.count += 1
        shard[key] = value
        return index

    def remove(self, key: Any) -> int:
        """Remove `key` (it must be there); the index of its shard."""
        index = (hash(key) >> self._shift) & self.mask
        del self.shards[index][key]
        self.count -= 1
        return index

    def _double(self, pace: Callable[[], None]) -> None:
        """Twice the shards: each splits in two by the next bit of its keys' hashes,
        one key at a time (paced), so no C call sees more than a few entries."""
        old = len(self.shards)
        mask = old * 2 - 1
        shift = self._shift
        shards: list[dict[Any, Any]] = [{} for _ in range(old * 2)]
        for shard in self.shards:
            for key, value in shard.items():
                shards[(hash(key) >> shift) & mask][key] = value
                pace()
        self.shards, self.mask = shards, mask

    def grow(self, pace: Callable[[], None]) -> None:
        """Keep the shards small: call between changes (a dict growing to the whole map
        in one shard would rehash all of it at once)."""
        while self.count > SHARD_MAX * len(self.shards):
            self._double(pace)


class _Sharded(_Shards):
    """The holder's side of one of a snapshot's dicts: its shards, changed in place, and
    the copies the last snapshot got; a new snapshot copies only the changed shards."""

    __slots__ = ("_frozen", "dirty", "frozen")

    def __init__(self, shift: int = 0) -> None:
        super().__init__(shift)
        self._frozen: list[dict[Any, Any]] = [_EMPTY]
        self.frozen: _Frozen = (_EMPTY,)
        self.dirty: set[int] = set()

    def set(self, key: Any, value: Any) -> int:
        index = _Shards.set(self, key, value)
        self.dirty.add(index)
        return index

    def remove(self, key: Any) -> int:
        index = _Shards.remove(self, key)
        self.dirty.add(index)
        return index

    def _double(self, pace: Callable[[], None]) -> None:
        _Shards._double(self, pace)
        self._frozen = [_EMPTY] * len(self.shards)
        self.dirty = set(range(len(self.shards)))

    def freeze(self, pace: Callable[[], None]) -> _Frozen:
        """The shards for a new snapshot, never to be changed: the changed ones copied
        (one C call of at most a shard each), the others shared with the last one."""
        self.grow(pace)
        if self.dirty:
            for index in self.dirty:
                self._frozen[index] = self.shards[index].copy()
                pace()
            self.dirty = set()
            self.frozen = tuple(self._frozen)
        return self.frozen


def _positions(config: ModelConfig, name: str) -> Iterator[int]:
    """Where `name` stands in (base_model, *adapters): a base may also be an adapter."""
    if config.base_model == name:
        yield 0
    if name in config.adapters:
        yield 1 + config.adapters.index(name)


_Key = tuple[Any, ...]  # conflict order: (rank, arrival)


class _Entry(msgspec.Struct, frozen=True, gc=False):
    """One ConfigMap's claim, in conflict order. A Struct the GC does not track, not a
    tuple: a tuple of tuples is untracked one level per GC pass, so each edit's claims
    would linger in the older generations."""

    key: _Key  # (rank, arrival)
    config: ModelConfig


_Claims = tuple[_Entry, ...] | list[_Entry]
CLAIMS_TUPLE_MAX = 16
_Group = tuple[tuple[_Key, Conflict], ...]  # one name's conflicts, each with its order


@dataclass(frozen=True, slots=True)
class MapChanges:
    """What changed between the snapshot the holder's listeners saw last and this one,
    so that they can follow the map in proportion to the change."""

    bases: Mapping[str, bool]  # name -> whether it is a base model now
    conflicted: frozenset[str]  # names whose conflicts changed


class ModelMap:
    """An immutable snapshot of the model map. Never mutate one: build another.

    `ModelMap(configs)` builds one from scratch (`bbr validate`, tests); `MapHolder`
    builds them incrementally: each dict is split into shards by hash, and a snapshot
    shares the shards of an older one but those a change touched (`lookup` hashes the
    name to its shard, then probes that one dict). What only operators read (the
    `/v1/models` body, the sets of names, the sorted conflicts, the owners) is computed
    on first use and cached.
    """

    __slots__ = (
        "_adapters",
        "_bases",
        "_configs",
        "_conflicts",
        "_groups",
        "_models_body",
        "_owners",
        "_owners_all",
        "_routes",
        "_view",
        "adapter_count",
        "base_count",
        "changed_at",
        "changes",
        "conflict_count",
        "created_at",
        "lookup",
        "problems",
        "route_mask",
        "route_shards",
    )

    # The base model serving a model name, or None when it is not in the map.
    lookup: Callable[[str], str | None]
    # The same, unrolled for the request path (`decision.route`, no Python frame):
    # route_shards[hash(model) & route_mask].get(model).
    route_shards: tuple[dict[str, str], ...]
    route_mask: int
    _routes: _Frozen
    # name -> id() of the ModelConfig in force for it, and id -> that ModelConfig: ints
    # are not tracked by Python's cyclic GC, so neither is the name-sized dict (a new
    # 50 k-entry dict of ModelConfigs made the next GC passes take milliseconds); only
    # the ConfigMap-sized `_configs` is.
    _owners: _Frozen
    _configs: _Frozen
    _groups: _Frozen  # name -> its conflicts (_Group)
    base_count: int
    adapter_count: int
    conflict_count: int
    # ConfigMaps that are not (or no longer) valid, with why: their last good version,
    # if any, is what is in force.
    problems: tuple[ConfigMapError, ...]
    created_at: float  # when this snapshot was made
    changed_at: float  # when the names, their base models or owners last changed
    # Set by the holder before its listeners see this snapshot; None: not known.
    changes: MapChanges | None
    _conflicts: tuple[Conflict, ...] | None

    def __init__(self, configs: Iterable[ModelConfig] = ()) -> None:
        routes: dict[str, str] = {}
        owners: dict[str, ModelConfig] = {}
        groups: dict[str, list[tuple[_Key, Conflict]]] = {}
        found = 0
        for config in sorted(configs, key=lambda c: c.rank):
            for name in (config.base_model, *config.adapters):
                held = routes.get(name)
                if held is None:
                    routes[name] = config.base_model
                    owners[name] = config
                elif held != config.base_model:
                    conflict = Conflict(name, owners[name].ref, held, config.ref, config.base_model)
                    groups.setdefault(name, []).append(((found,), conflict))
                    found += 1
        bases = sum(1 for name, base in routes.items() if name == base)
        now = time.time()
        frozen = {name: tuple(group) for name, group in groups.items()}
        ids = {name: id(config) for name, config in owners.items()}
        by_id = {id(config): config for config in owners.values()}
        self._init(
            _split(routes),
            _split(ids),
            _split(by_id, ID_SHIFT),
            _split(frozen),
            bases,
            len(routes) - bases,
        )
        self.conflict_count = found
        self.created_at = self.changed_at = now

    @classmethod
    def _make(
        cls,
        routes: _Frozen,
        owners: _Frozen,
        configs: _Frozen,
        groups: _Frozen,
        counts: tuple[int, int, int],
        problems: tuple[ConfigMapError, ...],
        changed_at: float,
    ) -> ModelMap:
        snapshot = cls.__new__(cls)
        snapshot._init(routes, owners, configs, groups, counts[0], counts[1])
        snapshot.conflict_count = counts[2]
        snapshot.problems = problems
        snapshot.created_at = time.time()
        snapshot.changed_at = changed_at
        return snapshot

    def _init(
        self,
        routes: _Frozen,
        owners: _Frozen,
        configs: _Frozen,
        groups: _Frozen,
        bases: int,
        adapters: int,
    ) -> None:
        self._routes = routes
        self._owners = owners
        self._configs = configs
        self._groups = groups
        self.base_count = bases
        self.adapter_count = adapters
        self.problems = ()
        self.changes = None
        self._conflicts = None
        self._models_body: bytes | None = None
        self._bases: frozenset[str] | None = None
        self._adapters: frozenset[str] | None = None
        self._owners_all: dict[str, ModelConfig] | None = None
        self._view: Any = None
        self.route_shards = routes
        self.route_mask = len(routes) - 1
        if len(routes) == 1:
            self.lookup = routes[0].get
        else:

            def lookup(
                model: str, _shards: _Frozen = routes, _mask: int = len(routes) - 1
            ) -> str | None:
                return _shards[hash(model) & _mask].get(model)

            self.lookup = lookup

    def names(self) -> Iterator[str]:
        """Every name in the map, in no particular order."""
        for shard in self._routes:
            yield from shard

    def items(self) -> Iterator[tuple[str, str]]:
        return iter(sorted(_items(self._routes)))

    def __len__(self) -> int:
        return self.base_count + self.adapter_count

    def __contains__(self, model: object) -> bool:
        return isinstance(model, str) and self.lookup(model) is not None

    @property
    def owners(self) -> dict[str, ModelConfig]:
        """Name -> the ConfigMap whose entry is in force (do not change it)."""
        if self._owners_all is None:
            configs = self._configs
            pace = Pacer()
            owners = {}
            for name, key in _items(self._owners):
                pace()
                owners[name] = _shard_of(configs, key, ID_SHIFT)[key]
            self._owners_all = owners
        return self._owners_all

    def owner(self, name: str) -> ModelConfig | None:
        key = _shard_of(self._owners, name).get(name)
        return None if key is None else _shard_of(self._configs, key, ID_SHIFT).get(key)

    @property
    def conflicts(self) -> tuple[Conflict, ...]:
        """Every name lost by a ConfigMap, in the loser's conflict order."""
        if self._conflicts is None:
            pairs = (pair for _, group in _items(self._groups) for pair in group)
            found = sorted(pairs, key=_first)
            self._conflicts = tuple(conflict for _, conflict in found)
        return self._conflicts

    def conflicts_of(self, name: str) -> tuple[Conflict, ...]:
        """The conflicts over one name (cheap: for following changes)."""
        group = _shard_of(self._groups, name).get(name)
        return tuple(conflict for _, conflict in group or ())

    @property
    def bases(self) -> frozenset[str]:
        if self._bases is None:
            self._bases = frozenset(n for n, b in _items(self._routes) if n == b)
        return self._bases

    @property
    def adapters(self) -> frozenset[str]:
        if self._adapters is None:
            self._adapters = frozenset(n for n, b in _items(self._routes) if n != b)
        return self._adapters

    @property
    def models_body(self) -> bytes:
        """The `GET /v1/models` answer, built on first use (tens of ms at 50 k names,
        so not on every change)."""
        if self._models_body is None:
            owners = self.owners
            self._models_body = msgspec.json.encode(
                {
                    "object": "list",
                    "data": [
                        {
                            "id": name,
                            "object": "model",
                            "created": owners[name].created,
                            "owned_by": "bbr",
                        }
                        for name in sorted(self.names())
                    ],
                }
            )
        return self._models_body


class MapHolder:
    """The map in force, fed by any number of sources, swapped atomically.

    Sources either publish their whole set of ModelConfigs (`publish`) or change some
    of them by key (`apply`). Either way only the names those ConfigMaps declare are
    recomputed: each name keeps its claimants ordered by conflict rank, so the winner
    is the first and a change touches only its names. The snapshot readers see
    (`.current`) is a new immutable ModelMap, swapped in with one assignment; it shares
    the shards of the one before and copies only those a change touched (each a small
    dict: one C call of ~200 entries at 50 k names, paced between).
    Readers just read `.current`. Listeners get each snapshot once, in order, with
    `snapshot.changes` saying what changed since the one they saw before.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._notify_lock = threading.Lock()
        # The holder's own name- and ConfigMap-sized dicts are sharded like the
        # snapshot's (`_Shards`): a whole 50 k-entry dict of names rehashed in one C
        # call (~4 ms holding the GIL) whenever inserts and deletes had filled its table.
        self._entries: dict[str, _Shards] = {}  # source -> key -> _Entry
        self._problems: dict[str, dict[Hashable, ConfigMapError]] = {}
        # name -> its claimants in conflict order: a tuple while there are few (most names
        # have one), which the cyclic GC stops tracking at its first pass (it holds only
        # tuples and untracked ModelConfigs), so an edit leaves no tracked list behind; a
        # list past CLAIMS_TUPLE_MAX (a base model many ConfigMaps declare), so an
        # insert never copies a long tuple.
        self._claims = _Shards()  # name -> _Claims
        # name -> how many of its claimants name each base model: a name claimed by one
        # base model only (a base model declared by 10 k ConfigMaps, say) has no
        # conflicts, and is settled without walking its claimants.
        self._claim_bases = _Shards()  # name -> {base model: claimants}
        self._routes = _Sharded()
        self._owners = _Sharded()  # name -> id(ModelConfig)
        self._configs = _Sharded(ID_SHIFT)  # id -> ModelConfig, while it owns a name
        self._owned = _Shards(ID_SHIFT)  # id(ModelConfig) -> how many names it owns
        self._groups = _Sharded()
        self._conflict_count = 0
        self._counts = [0, 0]  # bases, adapters
        self._seq = 0
        self._expected: set[str] = set()
        self._reported: set[str] = set()
        self.current: ModelMap = ModelMap()
        self._notified: ModelMap | None = None
        # What changed since the listeners were last told (see MapChanges).
        self._base_changes: dict[str, bool] = {}
        self._conflicted: set[str] = set()
        self.loaded = threading.Event()
        self._listeners: list[Callable[[ModelMap], None]] = []

    def expect(self, source: str) -> None:
        """Declare a source that must report once before the map counts as loaded."""
        with self._lock:
            self._expected.add(source)

    def subscribe(self, listener: Callable[[ModelMap], None]) -> None:
        self._listeners.append(listener)

    def publish(
        self,
        source: str,
        configs: Iterable[ModelConfig],
        problems: Iterable[ConfigMapError] | None = None,
    ) -> ModelMap:
        """Replace `source`'s whole set of ConfigMaps (and, if given, its problems)."""
        wanted: dict[Hashable, ModelConfig] = {}
        for config in configs:
            copy = 0
            while (config, copy) in wanted:  # the same ConfigMap twice counts twice
                copy += 1
            wanted[(config, copy)] = config
        with self._lock:
            held = self._entries.get(source) or _Shards()
            changes: dict[Hashable, ModelConfig | None] = dict.fromkeys(
                [key for key in held if key not in wanted]
            )
            changes.update((key, c) for key, c in wanted.items() if key not in held)
            problem_changes: dict[Hashable, ConfigMapError | None] | None = None
            if problems is not None:
                problem_changes = dict.fromkeys(self._problems.get(source, {}))
                problem_changes.update(enumerate(problems))
            snapshot = self._apply(source, changes, problem_changes)
        self._notify()
        return snapshot

    def apply(
        self,
        source: str,
        changes: Mapping[Hashable, ModelConfig | None],
        problems: Mapping[Hashable, ConfigMapError | None] | None = None,
    ) -> ModelMap:
        """Set (or with None, remove) some of `source`'s ConfigMaps and problems by key."""
        with self._lock:
            snapshot = self._apply(source, changes, problems)
        self._notify()
        return snapshot

    # -- under the lock

    def _apply(
        self,
        source: str,
        changes: Mapping[Hashable, ModelConfig | None],
        problems: Mapping[Hashable, ConfigMapError | None] | None,
    ) -> ModelMap:
        pace = Pacer()
        entries = self._entries.setdefault(source, _Shards())
        holder_dicts = (entries, self._claims, self._claim_bases)
        touched: set[str] = set()
        for step, (key, config) in enumerate(changes.items()):
            pace()
            if not step & 15:
                for sharded in holder_dicts:
                    sharded.grow(pace)
            old = entries.get(key)
            if old is not None and config is not None and old.config == config:
                continue
            if old is not None:
                entries.remove(key)
                for name in {old.config.base_model, *old.config.adapters}:
                    self._unclaim(name, old)
                    touched.add(name)
            if config is not None:
                self._seq += 1
                entry = _Entry((config.rank, self._seq), config)
                entries.set(key, entry)
                for name in {config.base_model, *config.adapters}:
                    self._claim(name, entry)
                    touched.add(name)
        changed = self._settle(touched, pace)
        problems_changed = False
        if problems:
            held = self._problems.setdefault(source, {})
            for key, problem in problems.items():
                if problem is None:
                    problems_changed |= held.pop(key, None) is not None
                elif held.get(key) != problem:
                    held[key] = problem
                    problems_changed = True
        first = source not in self._reported
        self._reported.add(source)
        if changed or problems_changed or first:
            self.current = self._snapshot(changed, pace)
        if self._expected.issubset(self._reported):
            self.loaded.set()
        return self.current

    # (A name already held is replaced in its shard directly: only adding or removing
    # a name goes through `_Shards`, which counts it.)

    def _claim(self, name: str, entry: _Entry) -> None:
        shard = self._claims.shard(name)
        claims = shard.get(name)
        if claims is None:
            self._claims.set(name, (entry,))
        elif isinstance(claims, list):
            insort(claims, entry, key=_entry_key)
        else:
            index = bisect_right(claims, entry.key, key=_entry_key)
            grown = (*claims[:index], entry, *claims[index:])
            shard[name] = list(grown) if len(grown) > CLAIMS_TUPLE_MAX else grown
        base = entry.config.base_model
        bases = self._claim_bases.shard(name).get(name)
        if bases is None:
            self._claim_bases.set(name, {base: 1})
        else:
            bases[base] = bases.get(base, 0) + 1

    def _unclaim(self, name: str, entry: _Entry) -> None:
        shard = self._claims.shard(name)
        claims = shard[name]
        index = bisect_left(claims, entry.key, key=_entry_key)
        assert claims[index] is entry or claims[index] == entry
        if isinstance(claims, list):
            del claims[index]
        else:
            claims = claims[:index] + claims[index + 1 :]
            shard[name] = claims
        if not claims:
            self._claims.remove(name)
        bases = self._claim_bases.shard(name)[name]
        base = entry.config.base_model
        bases[base] -= 1
        if not bases[base]:
            del bases[base]
            if not bases:
                self._claim_bases.remove(name)

    def _settle(self, names: Iterable[str], pace: Callable[[], None]) -> bool:
        """Recompute the winner and the conflicts of each name; True if any changed."""
        changed = False
        counts = self._counts
        routes, owners, groups = self._routes, self._owners, self._groups
        claim_shards, claim_bases = self._claims, self._claim_bases
        for step, name in enumerate(names):
            pace()
            if not step & 63:  # a shard outgrows SHARD_MAX by 64 entries at most
                for sharded in (routes, owners, groups, self._configs, self._owned):
                    sharded.grow(pace)
            key = hash(name)  # each name's shard, in each dict: one hash, no calls
            claims = claim_shards.shards[key & claim_shards.mask].get(name)
            old_base = routes.shards[key & routes.mask].get(name)
            old_owner = owners.shards[key & owners.mask].get(name)  # an id
            old_conflicts = groups.shards[key & groups.mask].get(name, ())
            if old_base is not None:
                counts[old_base != name] -= 1
            base = None
            if not claims:
                if old_base is not None:
                    routes.remove(name)
                    owners.remove(name)
                    if old_owner is not None:
                        self._disown(old_owner)
                    changed = True
                new_conflicts: _Group = ()
            else:
                winner = claims[0].config
                base = winner.base_model
                counts[base != name] += 1
                if old_base != base:
                    routes.set(name, base)
                    changed = True
                if old_owner != id(winner):
                    owners.set(name, id(winner))
                    self._own(winner)
                    if old_owner is not None:
                        self._disown(old_owner)
                    changed = True
                new_conflicts = ()
                if len(claim_bases.shards[key & claim_bases.mask][name]) > 1:
                    new_conflicts = tuple(
                        (
                            (claim.key, position),
                            Conflict(name, winner.ref, base, claim.config.ref, base_model),
                        )
                        for claim in claims[1:]
                        if (base_model := claim.config.base_model) != base
                        for position in _positions(claim.config, name)
                    )
            if (old_base == name) != (base == name):
                self._base_changes[name] = base == name
            if new_conflicts != old_conflicts:
                changed = True
                self._conflicted.add(name)
                self._conflict_count += len(new_conflicts) - len(old_conflicts)
                if new_conflicts:
                    groups.set(name, new_conflicts)
                else:
                    groups.remove(name)
        return changed

    def _own(self, config: ModelConfig) -> None:
        key = id(config)
        shard = self._owned.shard(key)
        count = shard.get(key)
        if count is None:
            self._configs.set(key, config)
            self._owned.set(key, 1)
        else:
            shard[key] = count + 1

    def _disown(self, key: int) -> None:
        shard = self._owned.shard(key)
        count = shard[key] - 1
        if count:
            shard[key] = count
        else:
            self._owned.remove(key)
            self._configs.remove(key)

    def _snapshot(self, changed: bool, pace: Callable[[], None]) -> ModelMap:
        previous = self.current
        problems = tuple(p for held in self._problems.values() for p in held.values())
        if not changed:
            return ModelMap._make(
                previous._routes,
                previous._owners,
                previous._configs,
                previous._groups,
                (previous.base_count, previous.adapter_count, previous.conflict_count),
                problems,
                previous.changed_at,
            )
        return ModelMap._make(
            self._routes.freeze(pace),
            self._owners.freeze(pace),
            self._configs.freeze(pace),
            self._groups.freeze(pace),
            (self._counts[0], self._counts[1], self._conflict_count),
            problems,
            time.time(),
        )

    def _notify(self) -> None:
        """Tell listeners about the map in force, in order, each snapshot once, with
        what changed since the snapshot they were told about before."""
        with self._notify_lock:
            with self._lock:
                snapshot = self.current
                if snapshot is self._notified:
                    return
                snapshot.changes = MapChanges(self._base_changes, frozenset(self._conflicted))
                self._base_changes, self._conflicted = {}, set()
            self._notified = snapshot
            for listener in self._listeners:
                listener(snapshot)


def _first(entry: tuple[_Key, Any]) -> _Key:
    return entry[0]


def _entry_key(entry: _Entry) -> _Key:
    return entry.key
