"""charts/body-based-routing rendered by the real `helm` (`make helm` installs it).

`render()` and `rendered_manifests()` return plain dicts, one per object, for every
provider and value scenario, so that the chart's unit checks (tests/test_chart.py), the
server-side dry run (tests/k8s) and the gateway and image tests reuse exactly these renders.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from harness.processes import REPO_ROOT
from tests.tools import tool

CHART = REPO_ROOT / "charts" / "body-based-routing"
RELEASE = "bbr"
NAMESPACE = "bbr-system"
PROVIDERS = ("none", "istio", "gke", "envoy-gateway", "kgateway")
Manifest = dict[str, Any]

# Models with names that YAML would misread if the chart did not quote them.
MODELS: list[dict[str, Any]] = [
    {
        "baseModel": "meta-llama/Llama-3.1-8B-Instruct",
        "adapters": ["food-review-1", "movie-critique", "yes", "null", "1e3", 'a"b: c', "modèle"],
        "inferencePool": "vllm-llama3-8b-instruct",
    },
    {"name": "deepseek", "baseModel": "deepseek/vllm-deepseek-r1", "adapters": ["ski-resorts"]},
    {"name": "phi", "baseModel": "microsoft/Phi-4-mini-instruct"},
]

# Value combinations every provider is rendered with.
SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "models-and-routes": {"models": MODELS, "httpRoute": {"enabled": True}},
    "streaming": {"bbr": {"streaming": True}, "models": MODELS[:1]},
    "gateway-elsewhere": {
        "inferenceGateway": {"name": "llm-gw", "namespace": "gateways"},
        "bbr": {"watchNamespaces": ["team-a", "team-b"]},
        "models": MODELS,
        "httpRoute": {"enabled": True},
    },
    "everything": {
        "bbr": {
            "replicas": 3,
            "image": {"registry": "registry.example/ml", "digest": "sha256:" + "ab" * 32},
            "multiNamespace": True,
            "secureServing": True,
            "tls": {"secretName": "bbr-tls", "clientCA": True},
            "unknownModel": "reject",
            "maxBodyBytes": 33554432,
            "modelsEndpoint": True,
            "workers": 2,
            "logLevel": "debug",
            "logFormat": "text",
            "flags": {"models-endpoint": "true"},
            "autoscaling": {"enabled": True},
            "podDisruptionBudget": {"minAvailable": 1},
            "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        },
        "provider": {
            "supportedEvents": ["RequestHeaders", "RequestBody", "ResponseHeaders", "ResponseBody"],
            "envoyGateway": {"clientTrafficPolicy": {"bufferLimit": "20Mi"}},
        },
        "models": MODELS,
        "httpRoute": {"enabled": True, "hostnames": ["llm.example.com"], "requestTimeout": ""},
    },
}


# Combinations the chart refuses, with the reason it gives.
UNSUPPORTED = {
    ("gke", "gateway-elsewhere"): "install this release in the Gateway's namespace",
}
COMBINATIONS = [(p, s) for p in PROVIDERS for s in SCENARIOS if (p, s) not in UNSUPPORTED]


# --- helm -------------------------------------------------------------------------------


def helm_binary() -> str:
    """The helm that `make helm` installed (or $BBR_HELM, or on PATH)."""
    return tool("helm", env="BBR_HELM", path=True)


def run_helm(*args: str, chart: Path = CHART) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm_binary(), *args, str(chart)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Deep merge of value layers (later wins), as helm merges -f files."""
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = value
    return out


@functools.cache
def _template(values_json: str, namespace: str, show_only: str | None) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        handle.write(values_json)
    try:
        args = ["template", RELEASE, "--namespace", namespace, "--values", handle.name]
        if show_only:
            args += ["--show-only", show_only]
        result = run_helm(*args)
    finally:
        os.unlink(handle.name)
    if result.returncode != 0:
        raise HelmError(result.stderr.strip())
    return result.stdout


class HelmError(Exception):
    pass


def template_text(
    values: Mapping[str, Any] | None = None,
    *,
    namespace: str = NAMESPACE,
    show_only: str | None = None,
) -> str:
    """`helm template` output, as text (raises HelmError with helm's stderr)."""
    return _template(json.dumps(values or {}, sort_keys=True), namespace, show_only)


def render(
    values: Mapping[str, Any] | None = None, *, namespace: str = NAMESPACE
) -> list[Manifest]:
    """Every object `helm template` renders for `values`, as dicts."""
    text = template_text(values, namespace=namespace)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def provider_values(provider: str, scenario: str) -> dict[str, Any]:
    return merge(SCENARIOS[scenario], {"provider": {"name": provider}})


def rendered_manifests() -> Iterator[tuple[str, str, list[Manifest]]]:
    """(provider, scenario, objects) for every supported provider and scenario."""
    for provider, scenario in COMBINATIONS:
        yield provider, scenario, render(provider_values(provider, scenario))
