"""`bbr validate`: parse model-map files exactly as `serve` does and show the result."""

from __future__ import annotations

import sys
from collections.abc import Sequence

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
