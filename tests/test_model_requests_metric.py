"""bbr_model_requests_total{base_model}: per-pool traffic, label values bounded by the map."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from prometheus_client import REGISTRY, generate_latest

from bbr import metrics
from bbr.modelmap import ConfigMapRef, MapHolder, ModelConfig
from harness.modelmaps import configmap_yaml, replace_model_map, write_model_map
from harness.processes import poll_until
from tests.support import StartBbr, json_body, metric_samples, request

NAME = "bbr_model_requests_total"


def per_base(text: str) -> dict[str, float]:
    return {
        dict(labels)["base_model"]: value
        for (name, labels), value in metric_samples(text).items()
        if name == NAME
    }


def send(channel: grpc.Channel, *models: str) -> None:
    for model in models:
        request(channel, json_body(model))


@pytest.mark.parametrize("workers", ["1", "2"])
def test_counts_per_base_model_of_the_map_only(
    tmp_path: Path, start_bbr: StartBbr, workers: str
) -> None:
    path = write_model_map(
        tmp_path / "model-map.yaml",
        configmap_yaml("llama", "llama", ["food", "movie"]),
        configmap_yaml("qwen", "qwen"),
    )
    bbr = start_bbr("--workers", workers, "--unknown-model", "pass", model_map=path)
    # Every base model of the map has its series from the start, at 0.
    assert per_base(bbr.metrics_text()) == {"llama": 0, "qwen": 0}
    send(bbr.channel(), "food", "movie", "llama", "qwen", "not-in-the-map", "")
    request(bbr.channel(), b"{broken")
    # Adapters count for their base model; unknown models and errors are never a label.
    assert per_base(bbr.metrics_text()) == {"llama": 3, "qwen": 1}


def test_a_base_model_that_leaves_the_map_leaves_the_metric(
    tmp_path: Path, start_bbr: StartBbr
) -> None:
    path = write_model_map(
        tmp_path / "model-map.yaml",
        configmap_yaml("llama", "llama", ["food"]),
        configmap_yaml("qwen", "qwen"),
    )
    bbr = start_bbr(model_map=path)
    send(bbr.channel(), "food", "qwen")
    replace_model_map(
        path, configmap_yaml("llama", "llama", ["food"]), configmap_yaml("mistral", "mistral")
    )
    assert poll_until(lambda: "qwen" not in per_base(bbr.metrics_text()), timeout=10) is not None
    # A base model that stays keeps its count; a new one starts at 0.
    assert per_base(bbr.metrics_text()) == {"llama": 1, "mistral": 0}
    send(bbr.channel(), "mistral")
    assert per_base(bbr.metrics_text()) == {"llama": 1, "mistral": 1}


def test_follows_the_map_by_its_changes_only() -> None:
    """In the server the series follow each map through what changed (`snapshot.changes`):
    a base model declared by two ConfigMaps stays while either does, one that leaves is
    dropped, one that arrives starts at 0, and no change walks the whole map."""

    def config(name: str, base: str, *adapters: str) -> ModelConfig:
        ref = ConfigMapRef("metric-test", name)
        return ModelConfig(ref, base, adapters, (1, 0, ref.namespace, name), name, 0)

    def series() -> dict[str, float]:
        found = per_base(generate_latest(REGISTRY).decode())
        return {base: value for base, value in found.items() if base.startswith("mt-")}

    holder = MapHolder()
    holder.subscribe(metrics.observe_map)
    a, b = config("a", "mt-llama", "mt-food"), config("b", "mt-llama", "mt-movie")
    holder.apply("api", {a.ref: a, b.ref: b, ("c",): config("c", "mt-qwen")})
    assert series() == {"mt-llama": 0, "mt-qwen": 0}
    metrics._BY_BASE["mt-llama"].inc(2)
    holder.apply("api", {a.ref: None})  # b still declares mt-llama
    assert holder.current._bases is None  # followed by changes, not by the set of bases
    assert series() == {"mt-llama": 2, "mt-qwen": 0}
    holder.apply("api", {b.ref: None, ("c",): config("c", "mt-mistral")})
    assert holder.current._bases is None
    assert series() == {"mt-mistral": 0}
    holder.apply("api", {("c",): None})
    assert series() == {}
