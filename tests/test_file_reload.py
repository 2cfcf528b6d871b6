"""Model-map files are hot-reloaded (SPEC §3) by a real `bbr serve` process.

Every change must show within 2 s in how bbr routes (observed through ext_proc calls,
as Envoy would see it) or in `/metrics`; a bad edit must leave the map in force.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest

from harness.modelmaps import configmap_yaml, replace_model_map, write_model_map
from harness.processes import poll_until
from tests import extproc
from tests.extproc import set_headers
from tests.support import BASE_HEADER, MODEL_HEADER, BbrProcess, Conversation, StartBbr, base_model

RELOAD_DEADLINE = 2.5  # SPEC: within 2 s; a little slack for the poll itself

LLAMA = configmap_yaml("llama", "llama", ["food"])
QWEN = configmap_yaml("qwen", "qwen", ["poem"])


def expect_route(channel: grpc.Channel, model: str, base: str | None) -> None:
    """`model` routes to `base` (None: unknown) within the reload deadline."""
    took = poll_until(lambda: base_model(channel, model) == base, timeout=RELOAD_DEADLINE)
    assert took is not None, (
        f"{model!r} still routes to {base_model(channel, model)!r}, not {base!r}, "
        f"{RELOAD_DEADLINE} s after the change"
    )


def routes(channel: grpc.Channel, *models: str) -> dict[str, str | None]:
    return {model: base_model(channel, model) for model in models}


def reload_errors(process: BbrProcess) -> float:
    return process.metric("bbr_model_map_reloads_total", result="error") or 0.0


@pytest.fixture
def map_path(tmp_path: Path) -> Path:
    return write_model_map(tmp_path / "model-map.yaml", LLAMA, QWEN)


def test_invalid_configmap_at_start_is_reported_and_skipped(
    tmp_path: Path, start_bbr: StartBbr
) -> None:
    path = write_model_map(
        tmp_path / "model-map.yaml",
        configmap_yaml("bad", "mistral", ["ok", "tab\there"]),
        configmap_yaml("good", "  llama  ", ["  Food  "]),  # names are trimmed
    )
    process = start_bbr(model_map=path)
    channel = process.channel()
    assert routes(channel, "llama", "Food", "food", "mistral", "ok") == {
        "llama": "llama",
        "Food": "llama",
        "food": None,  # case-sensitive
        "mistral": None,  # one bad name makes its whole ConfigMap invalid
        "ok": None,
    }
    assert reload_errors(process) >= 1
    logged = [
        r
        for r in process.log_records()
        if r.get("level") == "error" and "default/bad" in str(r.values())
    ]
    assert logged, "the invalid ConfigMap was not reported"


def test_with_workers_a_bad_edit_is_reported_once_per_worker(
    map_path: Path, start_bbr: StartBbr
) -> None:
    """With --workers each worker reports a failed reload (one line, one count); the
    supervisor, which watches the same files for its own copy of the map, adds none."""
    process = start_bbr("--workers", "2", model_map=map_path)
    channel = process.channel()
    errors = reload_errors(process)
    map_path.write_text("kind: [not, closed\n")
    took = poll_until(lambda: reload_errors(process) >= errors + 2, timeout=RELOAD_DEADLINE)
    assert took is not None, f"{reload_errors(process) - errors} reload errors counted"
    time.sleep(1.0)  # two more polls: a report from the supervisor would be in by now
    assert reload_errors(process) == errors + 2
    message = "model map file not loaded; the map in force stays"
    assert [r.get("msg") for r in process.log_records()].count(message) == 2
    assert routes(channel, "food") == {"food": "llama"}  # the map in force stays


def test_atomic_replace_adds_an_adapter(map_path: Path, start_bbr: StartBbr) -> None:
    process = start_bbr(model_map=map_path)
    channel = process.channel()
    assert routes(channel, "food", "movie") == {"food": "llama", "movie": None}
    successes = process.metric("bbr_model_map_reloads_total", result="success") or 0
    replace_model_map(map_path, configmap_yaml("llama", "llama", ["food", "movie"]), QWEN)
    expect_route(channel, "movie", "llama")
    assert process.metric("bbr_model_map_reloads_total", result="success") == successes + 1
    assert process.metric("bbr_model_map_models", kind="adapter") == 3
    assert routes(channel, "food", "poem") == {"food": "llama", "poem": "qwen"}


def test_in_place_rewrite(map_path: Path, start_bbr: StartBbr) -> None:
    process = start_bbr(model_map=map_path)
    channel = process.channel()
    with open(map_path, "w") as f:  # same inode, new content
        f.write(configmap_yaml("llama", "llama", ["food", "review"]) + "---\n" + QWEN)
    expect_route(channel, "review", "llama")
    before = process.metric("bbr_model_map_models", kind="adapter")
    assert before == 3
    with open(map_path, "r+") as f:  # rewritten without truncation, same size
        text = f.read()
        assert "review" in text
        f.seek(0)
        f.write(text.replace("review", "weiver"))
    expect_route(channel, "weiver", "llama")
    assert base_model(channel, "review") is None


def kubelet_dir(root: Path, stamp: str, *documents: str) -> None:
    """One version of a mounted ConfigMap volume, as the kubelet writes it."""
    version = root / f"..{stamp}"
    version.mkdir()
    write_model_map(version / "model-map.yaml", *documents)


def test_kubelet_data_symlink_swap(tmp_path: Path, start_bbr: StartBbr) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    kubelet_dir(volume, "2026_01_01_00_00_00.1", LLAMA)
    (volume / "..data").symlink_to("..2026_01_01_00_00_00.1")
    (volume / "model-map.yaml").symlink_to("..data/model-map.yaml")
    process = start_bbr(model_map=volume)
    channel = process.channel()
    assert routes(channel, "food", "poem") == {"food": "llama", "poem": None}

    # The kubelet's update: a new timestamped directory, a new link renamed over ..data,
    # then the old directory removed.
    kubelet_dir(volume, "2026_01_01_00_01_00.2", configmap_yaml("llama", "llama", ["poem"]))
    (volume / "..data_tmp").symlink_to("..2026_01_01_00_01_00.2")
    os.rename(volume / "..data_tmp", volume / "..data")
    for stale in (volume / "..2026_01_01_00_00_00.1").iterdir():
        stale.unlink()
    (volume / "..2026_01_01_00_00_00.1").rmdir()
    expect_route(channel, "poem", "llama")
    assert base_model(channel, "food") is None
    assert reload_errors(process) == 0


def test_directory_gains_and_loses_files(tmp_path: Path, start_bbr: StartBbr) -> None:
    folder = tmp_path / "maps"
    folder.mkdir()
    write_model_map(folder / "llama.yaml", LLAMA)
    process = start_bbr(model_map=folder)
    channel = process.channel()
    replace_model_map(folder / "qwen.yml", QWEN)
    expect_route(channel, "poem", "qwen")
    (folder / "llama.yaml").unlink()
    expect_route(channel, "food", None)
    assert base_model(channel, "llama") is None
    assert base_model(channel, "qwen") == "qwen"


def test_garbage_rewrite_keeps_the_previous_map(map_path: Path, start_bbr: StartBbr) -> None:
    process = start_bbr(model_map=map_path)
    channel = process.channel()
    errors = reload_errors(process)
    replace_model_map(map_path, "apiVersion: v1\nkind: ConfigMap\ndata: {baseModel: [oops\n")
    took = poll_until(lambda: reload_errors(process) > errors, timeout=RELOAD_DEADLINE)
    assert took is not None, "a file that does not parse was not counted as a failed reload"
    assert routes(channel, "food", "poem", "llama") == {
        "food": "llama",
        "poem": "qwen",
        "llama": "llama",
    }
    assert process.metric("bbr_model_map_models", kind="base") == 2
    failures = [
        r
        for r in process.log_records()
        if r.get("level") == "error" and str(map_path) in str(r.values())
    ]
    assert failures, "the failed reload was not logged with the file"
    # Fixing the file takes effect again.
    replace_model_map(map_path, LLAMA)
    expect_route(channel, "poem", None)
    assert base_model(channel, "food") == "llama"


def test_new_broken_file_in_directory_is_reported_once(tmp_path: Path, start_bbr: StartBbr) -> None:
    folder = tmp_path / "maps"
    folder.mkdir()
    write_model_map(folder / "llama.yaml", LLAMA)
    process = start_bbr(model_map=folder)
    channel = process.channel()
    errors = reload_errors(process)
    replace_model_map(folder / "new.yaml", "kind: ConfigMap\ndata: {baseModel: [oops\n")
    took = poll_until(lambda: reload_errors(process) > errors, timeout=RELOAD_DEADLINE)
    assert took is not None, "the broken new file was not counted"
    assert base_model(channel, "food") == "llama"
    counted = reload_errors(process)
    time.sleep(1.6)  # three more polls of an unchanged directory
    assert reload_errors(process) == counted, "the same failure is counted again and again"
    logged = [r for r in process.log_records() if "new.yaml" in str(r.values())]
    assert len(logged) == 1, logged


def test_invalid_configmap_keeps_its_last_good_version(map_path: Path, start_bbr: StartBbr) -> None:
    process = start_bbr(model_map=map_path)
    channel = process.channel()
    errors = reload_errors(process)
    # llama loses its baseModel (invalid) and gains an adapter; qwen's edit is valid.
    replace_model_map(
        map_path,
        configmap_yaml("llama", None, ["food", "extra"]),
        configmap_yaml("qwen", "qwen", ["poem", "sonnet"]),
    )
    expect_route(channel, "sonnet", "qwen")
    assert routes(channel, "food", "llama", "extra", "poem") == {
        "food": "llama",
        "llama": "llama",
        "extra": None,
        "poem": "qwen",
    }
    assert reload_errors(process) > errors
    logged = [
        r
        for r in process.log_records()
        if r.get("level") == "error" and "baseModel" in str(r.values())
    ]
    assert logged, "the invalid ConfigMap was not logged with its key"
    # Another valid edit beside the still-invalid one: its last good version stays.
    replace_model_map(
        map_path,
        configmap_yaml("llama", None, ["food", "extra"]),
        configmap_yaml("qwen", "qwen", ["poem", "haiku"]),
    )
    expect_route(channel, "haiku", "qwen")
    assert routes(channel, "food", "sonnet") == {"food": "llama", "sonnet": None}
    # Once it is valid again, its new version is the one in force.
    replace_model_map(map_path, configmap_yaml("llama", "llama", ["extra"]), QWEN)
    expect_route(channel, "extra", "llama")
    assert base_model(channel, "food") is None


def test_deleting_a_configmap_removes_its_models(map_path: Path, start_bbr: StartBbr) -> None:
    process = start_bbr(model_map=map_path)
    channel = process.channel()
    replace_model_map(map_path, QWEN)
    expect_route(channel, "food", None)
    assert routes(channel, "llama", "poem", "qwen") == {
        "llama": None,
        "poem": "qwen",
        "qwen": "qwen",
    }
    assert process.metric("bbr_model_map_models", kind="base") == 1
    assert process.metric("bbr_model_map_models", kind="adapter") == 1


def test_changing_base_model_drops_the_old_one(tmp_path: Path, start_bbr: StartBbr) -> None:
    path = write_model_map(
        tmp_path / "model-map.yaml",
        configmap_yaml("llama", "llama", ["food"]),
        configmap_yaml("qwen-a", "qwen", ["poem"]),
        configmap_yaml("qwen-b", "qwen", ["song"]),
    )
    process = start_bbr(model_map=path)
    channel = process.channel()
    replace_model_map(
        path,
        configmap_yaml("llama", "mistral", ["food"]),  # llama: declared by no one now
        configmap_yaml("qwen-a", "gemma", ["poem"]),  # qwen: still declared by qwen-b
        configmap_yaml("qwen-b", "qwen", ["song"]),
    )
    expect_route(channel, "food", "mistral")
    assert routes(channel, "llama", "mistral", "poem", "gemma", "qwen", "song") == {
        "llama": None,
        "mistral": "mistral",
        "poem": "gemma",
        "gemma": "gemma",
        "qwen": "qwen",
        "song": "qwen",
    }


def test_conflict_earlier_document_wins(map_path: Path, start_bbr: StartBbr) -> None:
    process = start_bbr(model_map=map_path)
    channel = process.channel()
    assert process.metric("bbr_model_map_conflicts") == 0
    claimer = configmap_yaml("claimer", "mistral", ["food", "other"])
    replace_model_map(map_path, LLAMA, QWEN, claimer)
    expect_route(channel, "other", "mistral")
    # `food` stays with llama (the earlier document); the loser's other names still work.
    assert routes(channel, "food", "mistral") == {"food": "llama", "mistral": "mistral"}
    assert process.metric("bbr_model_map_conflicts") == 1
    warned = [r for r in process.log_records() if "food" in str(r.values()) and "claimer" in str(r)]
    assert warned, "the conflict was not logged"
    # Moved before llama, the claimer is the earlier document: it wins.
    replace_model_map(map_path, claimer, LLAMA, QWEN)
    expect_route(channel, "food", "mistral")
    assert process.metric("bbr_model_map_conflicts") == 1
    # Resolved: the gauge goes back to 0.
    replace_model_map(map_path, LLAMA, QWEN)
    expect_route(channel, "other", None)
    assert process.metric("bbr_model_map_conflicts") == 0


@pytest.mark.parametrize("streaming", [False, True], ids=["buffered", "streamed"])
def test_request_uses_the_map_of_its_headers(
    map_path: Path, start_bbr: StartBbr, streaming: bool
) -> None:
    process = start_bbr(model_map=map_path)
    channel = process.channel()
    conversation = Conversation(channel)
    conversation.send(extproc.headers({"content-type": "application/json"}, streaming=streaming))
    if not streaming:
        assert set_headers([conversation.recv()]) == {}
    # The headers are in; now `poem` leaves the map.
    replace_model_map(map_path, LLAMA)
    expect_route(channel, "poem", None)
    conversation.send(extproc.body(b'{"model": "poem"}'))
    answer = conversation.recv()
    assert set_headers([answer]) == {BASE_HEADER: "qwen", MODEL_HEADER: "poem"}
    conversation.rest()
