"""The model map from files: parsing, conflicts, last-good versions, reloads."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bbr.modelmap import MapFileError, MapHolder, ModelMap, parse_file_text
from bbr.sources.files import FileSource


def cm(name: str, base: str | None, adapters: str | None = None, *, extra: str = "") -> str:
    lines = ["apiVersion: v1", "kind: ConfigMap", f"metadata: {{name: {name}{extra}}}", "data:"]
    if base is not None:
        lines.append(f"  baseModel: {base!r}")
    if adapters is not None:
        lines.append("  adapters: |")
        lines.extend(f"    {line}" for line in adapters.splitlines())
    if base is None and adapters is None:
        lines[-1] = "data: {}"
    return "\n".join(lines) + "\n"


def build(text: str) -> ModelMap:
    return ModelMap(parse_file_text(text, path="m.yaml").configs)


def test_multi_document_and_list() -> None:
    listed = (
        "apiVersion: v1\nkind: List\nitems:\n"
        "- {apiVersion: v1, kind: ConfigMap, metadata: {name: b}, data: {baseModel: B}}\n"
    )
    snapshot = build(cm("a", "A", "- a1\n- a2") + "---\n" + listed)
    assert dict(snapshot.items()) == {"A": "A", "a1": "A", "a2": "A", "B": "B"}
    assert snapshot.bases == {"A", "B"} and snapshot.adapters == {"a1", "a2"}


def test_names_are_trimmed_and_case_sensitive() -> None:
    snapshot = build(cm("a", "  A  ", "- ' x '\n- X"))
    assert dict(snapshot.items()) == {"A": "A", "x": "A", "X": "A"}


def test_other_kinds_are_ignored() -> None:
    text = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\n---\n" + cm("a", "A")
    assert dict(build(text).items()) == {"A": "A"}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (cm("a", None, "- x"), "data.baseModel"),
        (cm("a", ""), "data.baseModel"),
        (cm("a", "A", "- ''"), "data.adapters[0]"),
        (cm("a", "A", "- 'bad\\tname'".replace("'", '"')), "data.adapters[0]"),
        (cm("a", "A", "- " + "x" * 257), "data.adapters[0]"),
        (cm("a", "A", "just a string"), "data.adapters"),
        (cm("a", "A", "- [nested]"), "data.adapters[0]"),
        (cm("a", "A", "- x\n- {"), "data.adapters"),
        (cm("a", "A", "- x\n- '   '"), "data.adapters[1]"),
        (cm("a", "A", "- x\n- key: value"), "data.adapters[1]"),
        (cm("a", "A", "- x\n- {key: value}"), "data.adapters[1]"),
        (cm("a", "A", '- "del\\x7f"'), "data.adapters[0]"),
        (cm("a", "A", '- "nul\\0"'), "data.adapters[0]"),
    ],
    ids=[
        "no-base",
        "empty-base",
        "empty-adapter",
        "control-char",
        "too-long",
        "not-list",
        "nested",
        "bad-yaml",
        "quoted-blank",
        "mapping",
        "flow-mapping",
        "del",
        "nul",
    ],
)
def test_one_bad_name_invalidates_its_configmap(text: str, key: str) -> None:
    parsed = parse_file_text(text + "---\n" + cm("b", "B"), path="m.yaml")
    assert [c.ref.name for c in parsed.configs] == ["b"]
    assert [(e.key, e.ref.name if e.ref else None) for e in parsed.errors] == [(key, "a")]
    assert str(parsed.errors[0]).startswith("m.yaml#1")


def test_several_configmaps_per_base_model() -> None:
    snapshot = build(cm("a", "A", "- x") + "---\n" + cm("b", "A", "- y"))
    assert dict(snapshot.items()) == {"A": "A", "x": "A", "y": "A"}
    assert not snapshot.conflicts


def test_conflict_earlier_document_wins() -> None:
    snapshot = build(cm("a", "A", "- shared") + "---\n" + cm("b", "B", "- shared\n- own"))
    assert snapshot.lookup("shared") == "A"
    assert snapshot.lookup("own") == "B"
    [conflict] = snapshot.conflicts
    assert (conflict.name, conflict.winner.name, conflict.loser.name) == ("shared", "a", "b")


def test_conflict_older_creation_timestamp_wins_then_name() -> None:
    from bbr.modelmap import parse_configmap

    def api(name: str, base: str, created: str | None, ns: str = "default") -> object:
        meta: dict[str, object] = {"name": name, "namespace": ns}
        if created:
            meta["creationTimestamp"] = created
        return parse_configmap(
            {"metadata": meta, "data": {"baseModel": base, "adapters": "- shared"}}, source="api"
        )

    newer = api("a", "A", "2026-02-01T00:00:00Z")
    older = api("z", "Z", "2026-01-01T00:00:00Z")
    assert ModelMap([newer, older]).lookup("shared") == "Z"  # type: ignore[list-item]
    same_a = api("b", "B", "2026-01-01T00:00:00Z", ns="ns1")
    same_b = api("a", "A", "2026-01-01T00:00:00Z", ns="ns2")
    assert ModelMap([same_b, same_a]).lookup("shared") == "B"  # type: ignore[list-item]


def test_not_yaml_names_the_line() -> None:
    with pytest.raises(MapFileError) as info:
        parse_file_text(cm("a", "A") + "data: [unclosed\n  x: {\n", path="bad.yaml")
    assert info.value.line is not None and info.value.line >= 5
    assert str(info.value).startswith(f"bad.yaml:{info.value.line}:")


def test_namespace_defaults_and_identity() -> None:
    [config] = parse_file_text(cm("a", "A"), path="m.yaml").configs
    assert str(config.ref) == "default/a"


# --- FileSource: reloads without a server ---------------------------------------------


def source_for(*paths: Path) -> tuple[FileSource, MapHolder]:
    holder = MapHolder()
    source = FileSource([str(p) for p in paths], holder)
    source.load()
    return source, holder


def test_invalid_configmap_keeps_last_good_version(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text(cm("a", "A", "- a1") + "---\n" + cm("b", "B"))
    source, holder = source_for(path)
    path.write_text(cm("a", None, "- a2") + "---\n" + cm("b", "B", "- b1"))
    report = source.reload()
    assert report.changed and not report.ok
    assert dict(holder.current.items()) == {"A": "A", "a1": "A", "B": "B", "b1": "B"}


def test_garbage_leaves_previous_map_and_recovers(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text(cm("a", "A"))
    source, holder = source_for(path)
    before = holder.current
    path.write_text("{{{{ not yaml")
    report = source.reload()
    assert report.file_errors and holder.current is before
    assert not source.reload().file_errors  # a file that stays broken is reported once
    path.write_text(cm("a", "A2"))
    source.reload()
    assert dict(holder.current.items()) == {"A2": "A2"}


def test_deleted_configmap_and_base_change(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text(cm("a", "A", "- x") + "---\n" + cm("b", "B") + "---\n" + cm("c", "B"))
    source, holder = source_for(path)
    path.write_text(cm("a", "A2", "- x") + "---\n" + cm("c", "B"))
    source.reload()
    assert dict(holder.current.items()) == {"A2": "A2", "x": "A2", "B": "B"}


def test_missing_file_keeps_the_map(tmp_path: Path) -> None:
    path = tmp_path / "map.yaml"
    path.write_text(cm("a", "A"))
    source, holder = source_for(path)
    path.unlink()
    assert source.reload().file_errors
    assert dict(holder.current.items()) == {"A": "A"}


def test_directory_rules(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(cm("a", "A"))
    (tmp_path / "b.yml").write_text(cm("b", "B"))
    (tmp_path / "c.json").write_text(
        '{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"},'
        ' "data": {"baseModel": "C"}}'
    )
    (tmp_path / "d.txt").write_text(cm("d", "D"))
    (tmp_path / ".hidden.yaml").write_text(cm("h", "H"))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.yaml").write_text(cm("e", "E"))
    (tmp_path / "link.yaml").symlink_to(tmp_path / "sub" / "e.yaml")
    _, holder = source_for(tmp_path)
    assert set(dict(holder.current.items())) == {"A", "B", "C", "E"}


def test_kubelet_data_symlink_swap(tmp_path: Path) -> None:
    volume = tmp_path / "vol"
    volume.mkdir()
    first = volume / "..2026_11_23_01"
    first.mkdir()
    (first / "models.yaml").write_text(cm("a", "A"))
    (volume / "..data").symlink_to(first.name)
    (volume / "models.yaml").symlink_to("..data/models.yaml")
    source, holder = source_for(volume)
    second = volume / "..2026_11_23_02"
    second.mkdir()
    (second / "models.yaml").write_text(cm("a", "A", "- swapped"))
    (volume / "..data_tmp").symlink_to(second.name)
    os.replace(volume / "..data_tmp", volume / "..data")
    source.reload()
    assert holder.current.lookup("swapped") == "A"


GO_STYLE = """\
- food-review-1
- 1234
- 1.10
-
- yes
- 2024-01-01
- " padded "
- "a\\x85b"
"""


def test_adapters_are_read_as_their_literal_text_as_the_go_bbr_does() -> None:
    """A ConfigMap that worked with the Go BBR keeps working: no item is typed."""
    parsed = parse_file_text(cm("a", "A", GO_STYLE), path="m.yaml")
    assert not parsed.errors
    [config] = parsed.configs
    assert config.adapters == (
        "food-review-1",
        "1234",
        "1.10",  # safe_load would make this 1.1
        "yes",
        "2024-01-01",
        "padded",
        "a\x85b",  # U+0085 is not a control character under the one rule
    )
    warned = {w.key: str(w) for w in parsed.warnings}
    assert "empty item skipped" in warned["data.adapters[3]"]
    for key, shown in (("[1]", '"1234"'), ("[2]", '"1.10"'), ("[4]", '"yes"')):
        assert f"taken as the name {shown}" in warned[f"data.adapters{key}"]
        assert "quote it" in warned[f"data.adapters{key}"]
    assert "trimmed" in warned["data.adapters[6]"]
    assert "data.adapters[0]" not in warned and "data.adapters[7]" not in warned


def test_inline_adapter_list_in_a_file_reads_like_the_api_string() -> None:
    """`adapters:` as a YAML list in a file takes the same path as the API's string."""
    inline = (
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\ndata:\n  baseModel: A\n"
        "  adapters:\n" + "".join(f"  {line}\n" for line in GO_STYLE.splitlines())
    )
    listed = (
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ConfigMap\n"
        "  metadata: {name: a}\n  data:\n    baseModel: A\n    adapters: [1.10, 007]\n"
    )
    [from_string] = parse_file_text(cm("a", "A", GO_STYLE), path="m.yaml").configs
    [from_list] = parse_file_text(inline, path="m.yaml").configs
    assert from_list.adapters == from_string.adapters
    [from_list_kind] = parse_file_text(listed, path="m.yaml").configs
    assert from_list_kind.adapters == ("1.10", "007")


def test_kubernetes_source_parses_adapters_as_files_do() -> None:
    """The API hands `adapters` over as a string inside JSON: same names, same errors."""
    import json

    from bbr.modelmap import ConfigMapRef
    from bbr.sources.kubernetes import KubernetesSource

    def api(adapters: str) -> object:
        obj = json.loads(
            json.dumps(
                {
                    "metadata": {"name": "a", "namespace": "default"},
                    "data": {"baseModel": "A", "adapters": adapters},
                }
            )
        )
        return KubernetesSource._parse(ConfigMapRef("default", "a"), obj, "1")

    [from_file] = parse_file_text(cm("a", "A", GO_STYLE), path="m.yaml").configs
    parsed = api(GO_STYLE)
    assert parsed.error is None and parsed.config is not None
    assert parsed.config.adapters == from_file.adapters
    bad = api("- x\n- {key: value}\n")
    assert bad.config is None and bad.error is not None
    assert bad.error.key == "data.adapters[1]"
    blank = api('- "  "\n')
    assert blank.error is not None and "empty name" in blank.error.reason


def test_one_control_character_rule_for_map_names_and_request_models() -> None:
    """A name is good in a map exactly when it is good as a request model."""
    from bbr import decision
    from bbr.modelmap import name_problem

    for name in ["a\x85b", "a\u00a0b", "a\u2028b", "a\tb", "a\x7fb", "a\x00b", "a\x1fb", "ok"]:
        assert (name_problem(name) is None) == (decision.model_problem(name) is None), name
    assert name_problem("a\x85b") is None
    assert name_problem("a\x7fb") == "contains a control character"


def test_file_source_logs_each_warning_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.WARNING, logger="bbr.sources")
    path = tmp_path / "map.yaml"
    path.write_text(cm("a", "A", "- a1\n-\n- 1.10"))
    source, holder = source_for(path)
    assert dict(holder.current.items()) == {"A": "A", "a1": "A", "1.10": "A"}
    logged = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(logged) == 2, caplog.text
    assert any("empty item skipped" in str(r.__dict__) for r in logged), caplog.text
    caplog.clear()
    source.reload()  # unchanged file: not parsed again, not logged again
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
