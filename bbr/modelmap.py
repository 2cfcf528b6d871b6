"""The model map: which base model serves each model name.

ConfigMaps are parsed into `ModelConfig`s; `build` folds any number of them into an
immutable `ModelMap` snapshot. Readers take the snapshot reference once and never see
it change; writers swap a whole new snapshot in (`MapHolder`).
"""

from __future__ import annotations

import threading
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping
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


@dataclass(frozen=True, slots=True, order=True)
class ConfigMapRef:
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ModelConfig:
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
    """Why one ConfigMap (or document) was not taken."""

    source: str
    key: str
    reason: str
    ref: ConfigMapRef | None = None

    def __str__(self) -> str:
        who = f" ConfigMap {self.ref}" if self.ref else ""
        return f"{self.source}:{who} {self.key}: {self.reason}"


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
    """Why `name` (already trimmed) cannot be a model name, or None."""
    if not name:
        return "empty name"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    if not name.isprintable() and any(unicodedata.category(c) in ("Cc", "Cs") for c in name):
        return "contains a control character"
    return None


def is_managed(labels: Mapping[str, Any] | None) -> bool:
    """True for ConfigMaps carrying either project's bbr label."""
    if not labels:
        return False
    return any(str(labels.get(key, "")).lower() == "true" for key in MANAGED_LABELS)


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
) -> ModelConfig:
    """Turn one ConfigMap object into a ModelConfig, or raise ConfigMapParseError.

    `rank=None` means "from the API": order by creationTimestamp, then namespace/name.
    """
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping):
        raise ConfigMapParseError(ConfigMapError(source, "metadata", "missing or not a mapping"))
    name = metadata.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigMapParseError(ConfigMapError(source, "metadata.name", "missing"))
    namespace = metadata.get("namespace") or "default"
    ref = ConfigMapRef(str(namespace), name)
    created = _timestamp(metadata.get("creationTimestamp"))

    def fail(key: str, reason: str) -> ConfigMapParseError:
        return ConfigMapParseError(ConfigMapError(source, key, reason, ref))

    data = obj.get("data")
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise fail("data", "not a mapping")
    base = data.get("baseModel")
    if base is None:
        raise fail("data.baseModel", "required")
    if not isinstance(base, str):
        raise fail("data.baseModel", "must be a string")
    base = base.strip()
    if problem := name_problem(base):
        raise fail("data.baseModel", problem)

    raw_adapters = data.get("adapters")
    if isinstance(raw_adapters, str):
        try:
            raw_adapters = yaml.load(raw_adapters, Loader=_Loader)
        except yaml.YAMLError as exc:
            raise fail("data.adapters", f"not valid YAML: {_yaml_reason(exc)}") from None
    if raw_adapters is None:
        raw_adapters = []
    if not isinstance(raw_adapters, list):
        raise fail("data.adapters", "must be a YAML list of strings")
    adapters: dict[str, None] = {}  # ordered and de-duplicated in one pass
    for i, item in enumerate(raw_adapters):
        if not isinstance(item, str):
            raise fail(f"data.adapters[{i}]", "must be a string")
        item = item.strip()
        if problem := name_problem(item):
            raise fail(f"data.adapters[{i}]", problem)
        adapters[item] = None

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


def parse_file_text(
    text: str | bytes, *, path: str, position: tuple[int, ...] = (), created: int = 0
) -> ParsedFile:
    """Parse a model-map file: YAML (or JSON) documents of ConfigMaps and Lists.

    Raises MapFileError, with the line, when the file is not valid YAML.
    """
    try:
        documents = list(yaml.load_all(text, Loader=_Loader))
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
                    )
                )
            except ConfigMapParseError as exc:
                parsed.errors.append(exc.error)
                if exc.error.ref is not None:
                    parsed.invalid_refs.append(exc.error.ref)
    return parsed


class ModelMap:
    """An immutable snapshot of the model map. Never mutate one: build another."""

    __slots__ = ("_routes", "adapters", "bases", "conflicts", "created_at", "models_body", "owners")

    def __init__(self, configs: Iterable[ModelConfig] = ()) -> None:
        routes: dict[str, str] = {}
        owners: dict[str, ModelConfig] = {}
        conflicts: list[Conflict] = []
        for config in sorted(configs, key=lambda c: c.rank):
            for name in (config.base_model, *config.adapters):
                held = routes.get(name)
                if held is None:
                    routes[name] = config.base_model
                    owners[name] = config
                elif held != config.base_model:
                    owner = owners[name]
                    conflicts.append(Conflict(name, owner.ref, held, config.ref, config.base_model))
        self._routes = routes
        self.owners = owners
        self.bases = frozenset(name for name, base in routes.items() if name == base)
        self.adapters = frozenset(name for name, base in routes.items() if name != base)
        self.conflicts = tuple(conflicts)
        self.created_at = time.time()
        self.models_body = msgspec.json.encode(
            {
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": owners[name].created,
                        "owned_by": "bbr",
                    }
                    for name in sorted(routes)
                ],
            }
        )

    def lookup(self, model: str) -> str | None:
        """The base model serving `model`, or None when it is not in the map."""
        return self._routes.get(model)

    def items(self) -> Iterator[tuple[str, str]]:
        return iter(sorted(self._routes.items()))

    def __len__(self) -> int:
        return len(self._routes)

    def __contains__(self, model: object) -> bool:
        return model in self._routes


class MapHolder:
    """The map in force, fed by any number of sources, swapped atomically.

    Each source publishes its whole set of ModelConfigs; the holder rebuilds one
    snapshot from the union of all sources. Readers just read `.current`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_source: dict[str, tuple[ModelConfig, ...]] = {}
        self._expected: set[str] = set()
        self.current: ModelMap = ModelMap()
        self.loaded = threading.Event()
        self._listeners: list[Callable[[ModelMap], None]] = []

    def expect(self, source: str) -> None:
        """Declare a source that must report once before the map counts as loaded."""
        with self._lock:
            self._expected.add(source)

    def subscribe(self, listener: Callable[[ModelMap], None]) -> None:
        self._listeners.append(listener)

    def publish(self, source: str, configs: Iterable[ModelConfig]) -> ModelMap:
        with self._lock:
            self._by_source[source] = tuple(configs)
            snapshot = ModelMap(c for group in self._by_source.values() for c in group)
            self.current = snapshot
            ready = self._expected.issubset(self._by_source)
        for listener in self._listeners:
            listener(snapshot)
        if ready:
            self.loaded.set()
        return snapshot
