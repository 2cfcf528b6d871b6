"""`GET /modelmap` on the metrics port, and `bbr validate --live URL` (SPEC §5)."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bbr import mapview
from bbr.modelmap import ConfigMapError, ConfigMapRef, MapHolder, ModelConfig, parse_file_text
from harness.modelmaps import configmap_yaml, replace_model_map, write_model_map
from harness.processes import free_port, poll_until
from tests.support import StartBbr, last_line, run_bbr, validate_table


def get(port: int, path: str = "/modelmap") -> tuple[int, dict[str, str], bytes]:
    url = f"http://127.0.0.1:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def view(port: int) -> dict[str, Any]:
    status, headers, body = get(port)
    assert status == 200 and headers["Content-Type"] == "application/json"
    doc: dict[str, Any] = json.loads(body)
    return doc


CONFLICTED = (
    configmap_yaml("llama", "llama", ["food", "shared"]),
    configmap_yaml("qwen", "qwen", ["shared"], namespace="ml"),
    configmap_yaml("broken", None, ["x"]),  # no baseModel: invalid
)


def test_modelmap_shows_names_sources_conflicts_invalid(
    start_bbr: StartBbr, tmp_path: Path
) -> None:
    path = write_model_map(tmp_path / "map.yaml", *CONFLICTED)
    bbr = start_bbr(model_map=path)
    doc = view(bbr.metrics_port)
    assert doc["models"] == {
        "llama": {
            "base_model": "llama",
            "kind": "base",
            "configmap": "default/llama",
            "file": f"{path}#1",
        },
        "food": {
            "base_model": "llama",
            "kind": "adapter",
            "configmap": "default/llama",
            "file": f"{path}#1",
        },
        "shared": {
            "base_model": "llama",
            "kind": "adapter",
            "configmap": "default/llama",
            "file": f"{path}#1",
        },
        "qwen": {"base_model": "qwen", "kind": "base", "configmap": "ml/qwen", "file": f"{path}#2"},
    }
    assert doc["conflicts"] == [
        {
            "name": "shared",
            "winner": "default/llama",
            "winner_base": "llama",
            "loser": "ml/qwen",
            "loser_base": "qwen",
        }
    ]
    [invalid] = doc["invalid"]
    assert invalid["configmap"] == "default/broken" and invalid["key"] == "data.baseModel"
    assert invalid["reason"] == "required"
    assert doc["counts"] == {"base_models": 2, "adapters": 2, "conflicts": 1, "invalid": 1}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["last_change"])
    # /metrics is still served beside it.
    status, _, body = get(bbr.metrics_port, "/metrics")
    assert status == 200 and b"bbr_model_map_conflicts 1.0" in body

    # An edit shows up (within the 2 s of SPEC §3), with a later last_change.
    replace_model_map(path, configmap_yaml("llama", "llama", ["food", "new-one"]))
    assert poll_until(lambda: "new-one" in view(bbr.metrics_port)["models"], timeout=5)
    after = view(bbr.metrics_port)
    assert after["last_change"] > doc["last_change"]
    assert after["conflicts"] == [] and after["invalid"] == []
    assert set(after["models"]) == {"llama", "food", "new-one"}


def test_validate_live_prints_the_table_and_fails_on_conflicts(
    start_bbr: StartBbr, tmp_path: Path
) -> None:
    path = write_model_map(tmp_path / "map.yaml", *CONFLICTED)
    bbr = start_bbr(model_map=path)
    result = run_bbr("validate", "--live", f"http://127.0.0.1:{bbr.metrics_port}")
    assert result.returncode == 1, result.stderr
    rows = validate_table(result.stdout)
    assert {name: base for name, (base, _) in rows.items()} == {
        "food": "llama",
        "llama": "llama",
        "qwen": "qwen",
        "shared": "llama",
    }
    assert f"{path}#2 (ml/qwen)" in rows["qwen"][1]
    assert "error: conflict: 'shared' is claimed by default/llama" in result.stderr
    assert "ConfigMap default/broken: data.baseModel: required" in result.stderr
    # The same file, validated offline, lists the same table.
    offline = run_bbr("validate", str(path))
    assert offline.returncode == 1
    assert {n: b for n, (b, _) in validate_table(offline.stdout).items()} == {
        n: b for n, (b, _) in rows.items()
    }


def test_validate_live_clean_map_exits_0(start_bbr: StartBbr, tmp_path: Path) -> None:
    path = write_model_map(tmp_path / "map.yaml", configmap_yaml("m", "base", ["a"]))
    bbr = start_bbr(model_map=path)
    result = run_bbr("validate", "--live", f"127.0.0.1:{bbr.metrics_port}/modelmap")
    assert result.returncode == 0, result.stderr
    assert validate_table(result.stdout) == {
        "a": ("base", f"{path}#1 (default/m)"),
        "base": ("base", f"{path}#1 (default/m)"),
    }


@pytest.mark.parametrize(
    "url",
    ["ftp://127.0.0.1/x", "http://", "http://127.0.0.1:{closed}", "http://127.0.0.1:{closed}/x"],
)
def test_validate_live_bad_or_unreachable_url_is_one_line_exit_2(url: str) -> None:
    result = run_bbr("validate", "--live", url.format(closed=free_port()))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert last_line(result.stderr).startswith("bbr: error: --live:")


def test_validate_live_not_bbr_is_exit_2(start_bbr: StartBbr, simple_map: Path) -> None:
    bbr = start_bbr(model_map=simple_map)
    result = run_bbr("validate", "--live", f"http://127.0.0.1:{bbr.metrics_port}/metrics")
    assert result.returncode == 2 and "not JSON" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_validate_live_and_paths_are_exclusive(simple_map: Path) -> None:
    result = run_bbr("validate", "--live", "http://127.0.0.1:1", str(simple_map))
    assert result.returncode == 2 and "--live" in last_line(result.stderr)
    result = run_bbr("validate")
    assert result.returncode == 2 and "PATH" in last_line(result.stderr)


def test_view_rendered_once_per_snapshot() -> None:
    holder = MapHolder()
    text = configmap_yaml("m", "base", ["a"])
    holder.publish("files", parse_file_text(text, path="m.yaml").configs)
    first = holder.current
    body = mapview.render(first)
    assert mapview.render(first) is body  # cached
    holder.publish("files", parse_file_text(configmap_yaml("m", "b2"), path="m.yaml").configs)
    assert json.loads(mapview.render(holder.current))["models"] == {
        "b2": {"base_model": "b2", "kind": "base", "configmap": "default/m", "file": "m.yaml#1"}
    }
    assert mapview.render(first) is body  # the old snapshot keeps its own view


ENCODE_CHUNK = mapview.ENCODE_CHUNK


def test_a_large_view_is_built_in_steps_and_reads_the_same() -> None:
    """Past the sort run and the encode chunk (names, conflicts and invalid ConfigMaps
    alike) the view built in paced steps is the same document, in name order."""
    holder = MapHolder()
    configs = {}
    for i in range(1200):
        ref = ConfigMapRef(f"ns-{i % 7}", f"cm-{i}")
        adapters = tuple(f"a{i}-{j}" for j in range(3)) + (("shared",) if i % 2 else ())
        configs[ref] = ModelConfig(ref, f"b{i % 9}", adapters, (1, i, ref.namespace, ref.name),
                                   f"configmap {ref}", 0)  # fmt: skip
    problems = {i: ConfigMapError(f"configmap ns/bad-{i}", "data", f"bad {i}") for i in range(600)}
    holder.apply("kubernetes", configs, problems)
    snapshot = holder.current
    body = mapview.render(snapshot)
    assert body == msgspec.json.encode(mapview.document(snapshot))
    doc = json.loads(body)
    assert list(doc["models"]) == sorted(dict(snapshot.items()))
    assert len(doc["models"]) == 1200 * 3 + 9 + 1
    # "shared": the oldest (cm-1, base b1) wins; every other base model's claim loses.
    losers = sum(1 for i in range(1, 1200, 2) if i % 9 != 1)
    assert len(doc["conflicts"]) == snapshot.conflict_count == losers > ENCODE_CHUNK
    assert [p["reason"] for p in doc["invalid"]] == [f"bad {i}" for i in range(600)]
