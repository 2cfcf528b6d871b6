"""`bbr validate`: parse model-map files exactly as `serve` does and show the result."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from bbr.modelmap import ConfigMapError, MapFileError, ModelConfig, ModelMap, parse_file_text
from bbr.sources.files import expand, read_file


def run(paths: Sequence[str]) -> int:
    """Print the resolved table; exit 1 listing every error (conflicts included)."""
    errors: list[str] = []
    warnings: list[str] = []
    configs: list[ModelConfig] = []
    files: list[tuple[tuple[int, ...], str]] = []
    for index, raw in enumerate(paths):
        try:
            files.extend(((index, *pos[1:]), path) for pos, path in expand([raw]))
        except MapFileError as exc:
            errors.append(str(exc))
    for position, path in files:
        try:
            data, mtime = read_file(path)
            parsed = parse_file_text(data, path=path, position=position, created=mtime)
        except MapFileError as exc:
            errors.append(str(exc))
            continue
        configs.extend(parsed.configs)
        errors.extend(_line(e) for e in parsed.errors)
        warnings.extend(_line(w) for w in parsed.warnings)
    seen: dict[object, str] = {}
    for config in configs:
        if config.ref in seen:
            errors.append(
                f"{config.source}: ConfigMap {config.ref}: also defined at {seen[config.ref]}"
            )
        seen.setdefault(config.ref, config.source)
    snapshot = ModelMap(configs)
    errors.extend(f"conflict: {conflict}" for conflict in snapshot.conflicts)

    rows = [(name, base, snapshot.owners[name]) for name, base in snapshot.items()]
    if rows:
        width_model = max(len("MODEL"), *(len(r[0]) for r in rows))
        width_base = max(len("BASE MODEL"), *(len(r[1]) for r in rows))
        print(f"{'MODEL':<{width_model}}  {'BASE MODEL':<{width_base}}  SOURCE")
        for name, base, owner in rows:
            print(f"{name:<{width_model}}  {base:<{width_base}}  {owner.source} ({owner.ref})")
    else:
        print("(no models)")
    files_seen = len({path for _, path in files})
    print(
        f"\naccepted {len(configs)} ConfigMap(s) from {files_seen} file(s): "
        f"{len(snapshot.bases)} base model(s), {len(snapshot.adapters)} adapter(s)"
    )
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    if errors:
        print(f"\n{len(errors)} error(s):", file=sys.stderr)
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        return 1
    return 0


def _line(error: ConfigMapError) -> str:
    """file#document: ConfigMap ns/name: key: "value" reason (hint: ...)."""
    who = f"ConfigMap {error.ref}: " if error.ref else ""
    value = f"{error.value} " if error.value is not None else ""
    hint = f" (hint: {error.hint})" if error.hint else ""
    return f"{error.source}: {who}{error.key}: {value}{error.reason}{hint}"


LIVE_TIMEOUT = 10.0
LIVE_MAX_BYTES = 256 * 1024 * 1024


class LiveError(Exception):
    """The URL is bad, the server unreachable, or its answer not a model map."""


def fetch_live(url: str, timeout: float = LIVE_TIMEOUT) -> dict[str, Any]:
    """GET the map in force from a running bbr's metrics port (`/modelmap`)."""
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise LiveError(f"{url!r} is not an http(s) URL")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/modelmap")
    target = urllib.parse.urlunsplit(parts)
    try:
        with urllib.request.urlopen(target, timeout=timeout) as response:
            data = response.read(LIVE_MAX_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise LiveError(f"{target}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise LiveError(f"{target}: {reason}") from None
    if len(data) > LIVE_MAX_BYTES:
        raise LiveError(f"{target}: answer larger than {LIVE_MAX_BYTES} bytes")
    try:
        doc = json.loads(data)
    except ValueError:
        raise LiveError(f"{target}: not JSON (is this bbr's metrics port?)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), dict):
        raise LiveError(f"{target}: not a bbr model map (no 'models')")
    return doc


def run_live(url: str) -> int:
    """`bbr validate --live URL`: the map in force in a running bbr, printed like a
    file's table; exit 1 when it has conflicts or invalid ConfigMaps, 2 when the URL
    cannot be read."""
    try:
        doc = fetch_live(url)
    except LiveError as exc:
        print(f"bbr: error: --live: {exc}", file=sys.stderr)
        return 2
    rows = []
    for name, entry in sorted(doc["models"].items()):
        entry = entry if isinstance(entry, dict) else {}
        where = entry.get("file") or f"configmap {entry.get('configmap')}"
        rows.append((name, str(entry.get("base_model")), f"{where} ({entry.get('configmap')})"))
    if rows:
        width_model = max(len("MODEL"), *(len(r[0]) for r in rows))
        width_base = max(len("BASE MODEL"), *(len(r[1]) for r in rows))
        print(f"{'MODEL':<{width_model}}  {'BASE MODEL':<{width_base}}  SOURCE")
        for name, base, source in rows:
            print(f"{name:<{width_model}}  {base:<{width_base}}  {source}")
    else:
        print("(no models)")
    print(f"\nlast change: {doc.get('last_change')}")
    errors = [
        f"{p.get('source')}: "
        + (f"ConfigMap {p['configmap']}: " if p.get("configmap") else "")
        + f"{p.get('key')}: {p.get('reason')}"
        for p in doc.get("invalid") or []
        if isinstance(p, dict)
    ]
    errors.extend(
        f"conflict: {c.get('name')!r} is claimed by {c.get('winner')} "
        f"(base {c.get('winner_base')!r}) and {c.get('loser')} (base {c.get('loser_base')!r}); "
        f"the older, {c.get('winner')}, wins"
        for c in doc.get("conflicts") or []
        if isinstance(c, dict)
    )
    if errors:
        print(f"\n{len(errors)} error(s):", file=sys.stderr)
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        return 1
    return 0
