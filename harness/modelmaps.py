"""Model-map files: ConfigMap documents written for bbr, and read back as the demo needs."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bbr.modelmap import parse_file_text


def configmap_yaml(
    name: str,
    base: str | None,
    adapters: Sequence[str] | None = (),
    *,
    namespace: str | None = None,
) -> str:
    """One ConfigMap manifest; `base=None` leaves baseModel out, `adapters=None` the list."""
    data: dict[str, Any] = {}
    if base is not None:
        data["baseModel"] = base
    if adapters:
        data["adapters"] = "".join(f"- {json.dumps(a)}\n" for a in adapters)
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    doc = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
    # JSON is YAML; it keeps every name exactly as given (no YAML re-interpretation).
    return json.dumps(doc, indent=2) + "\n"


def model_map_text(*documents: str) -> str:
    return "---\n".join(documents)


def write_model_map(path: str | os.PathLike[str], *documents: str) -> Path:
    """Write ConfigMap documents (see `configmap_yaml`) to `path`, in place."""
    target = Path(path)
    target.write_text(model_map_text(*documents))
    return target


def replace_model_map(path: str | os.PathLike[str], *documents: str) -> Path:
    """Atomically replace `path` (write a temporary file, then rename over it)."""
    target = Path(path)
    temp = target.with_name(f".{target.name}.tmp")
    temp.write_text(model_map_text(*documents))
    os.replace(temp, target)
    return target


def read_model_map(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Base model → pool name, and every model name → its base model, in file order.

    Read with bbr's own parser (so `- 1.10` is the name "1.10" here too); only what the
    demo and the e2e tests need to start model servers and print examples. Invalid
    ConfigMaps are left out, as bbr leaves them out.
    """
    parsed = parse_file_text(path.read_bytes(), path=str(path))
    pools: dict[str, str] = {}
    models: dict[str, str] = {}
    for config in parsed.configs:
        base = config.base_model
        pools.setdefault(base, f"pool-{config.ref.name}")
        for name in (base, *config.adapters):
            models.setdefault(name, base)
    return pools, models
