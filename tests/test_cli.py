"""The command line (SPEC §2), run as a real `python -m bbr` process.

Bad input is an operator's typo: exit 2, one last stderr line naming the culprit, no
traceback. `bbr validate` is what CI runs on model-map files.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import bbr
from harness.modelmaps import configmap_yaml, write_model_map
from harness.processes import bbr_port_flags, free_port, free_ports
from tests.support import (
    BASE_HEADER,
    MODEL_HEADER,
    StartBbr,
    immediate,
    json_body,
    last_line,
    request,
    route,
    run_bbr,
    validate_table,
)

EXIT_USAGE = 2


@pytest.fixture
def map_file(tmp_path: Path) -> Path:
    return write_model_map(
        tmp_path / "model-map.yaml",
        configmap_yaml("llama", "llama", ["food"]),
    )


def assert_usage_error(result_stderr: str, returncode: int, *names: str) -> str:
    """Exit 2, no traceback, and the last stderr line names every one of `names`."""
    assert returncode == EXIT_USAGE, result_stderr
    assert "Traceback" not in result_stderr, result_stderr
    line = last_line(result_stderr)
    for name in names:
        assert name in line, f"last stderr line does not name {name!r}: {line!r}"
    return line


def port_flags() -> list[str]:
    return bbr_port_flags(*free_ports(3))


# --- bad flags ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--grpc-port", "abc"], "--grpc-port"),
        (["--metrics-port", "70000"], "--metrics-port"),
        (["--grpc-port", "0"], "--grpc-port"),
        (["--grpc-port", "-1"], "--grpc-port"),
        (["--unknown-model", "maybe"], "--unknown-model"),
        (["--streaming", "maybe"], "--streaming"),
        (["--max-body-bytes", "lots"], "--max-body-bytes"),
        (["--log-level", "loud"], "--log-level"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_flag_exits_2_naming_it(map_file: Path, flags: list[str], named: str) -> None:
    result = run_bbr("serve", "--model-map", str(map_file), *flags)
    assert_usage_error(result.stderr, result.returncode, named)


@pytest.mark.parametrize(
    ("variable", "value", "named"),
    [
        ("BBR_STREAMING", "maybe", "--streaming"),
        ("BBR_MODELS_ENDPOINT", "2", "--models-endpoint"),
        ("BBR_MAX_BODY_BYTES", "12k", "--max-body-bytes"),
        ("BBR_MAX_BODY_BYTES", "0", "--max-body-bytes"),
        ("BBR_GRPC_PORT", "http", "--grpc-port"),
        ("BBR_UNKNOWN_MODEL", "drop", "--unknown-model"),
        ("BBR_MAX_CONNECTIONS", "0", "--max-connections"),
        ("BBR_STREAM_WINDOW", "2147483648", "--stream-window"),
        ("BBR_HANDSHAKE_TIMEOUT", "soon", "--handshake-timeout"),
        ("BBR_MAX_RESETS_PER_SECOND", "-1", "--max-resets-per-second"),
        # Budgets that cannot hold one message of --max-body-bytes (16 MiB + 64 KiB).
        ("BBR_CONNECTION_BUFFER_BYTES", "1048576", "--connection-buffer-bytes"),
        ("BBR_PROCESS_BUFFER_BYTES", "20000000", "--process-buffer-bytes"),
    ],
)
def test_bad_env_twin_exits_2_naming_the_flag(
    map_file: Path, variable: str, value: str, named: str
) -> None:
    result = run_bbr("serve", "--model-map", str(map_file), env={variable: value})
    assert_usage_error(result.stderr, result.returncode, named)


def test_same_port_for_two_flags(map_file: Path) -> None:
    port = free_port()
    result = run_bbr(
        "serve",
        "--model-map",
        str(map_file),
        "--grpc-port",
        str(port),
        "--grpc-health-port",
        str(free_port()),
        "--metrics-port",
        str(port),
    )
    line = assert_usage_error(result.stderr, result.returncode, str(port))
    assert "--metrics-port" in line or "--grpc-port" in line, line


def test_same_port_through_env_and_flag(map_file: Path) -> None:
    port = free_port()
    result = run_bbr(
        "serve",
        "--model-map",
        str(map_file),
        "--grpc-port",
        str(port),
        env={"BBR_GRPC_HEALTH_PORT": str(port), "BBR_METRICS_PORT": str(free_port())},
    )
    line = assert_usage_error(result.stderr, result.returncode, str(port))
    assert "--grpc-health-port" in line or "--grpc-port" in line, line


# --- map sources at start -------------------------------------------------------------------


def test_missing_map_file_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "model-map.yaml"
    result = run_bbr("serve", "--model-map", str(missing), *port_flags())
    assert_usage_error(result.stderr, result.returncode, str(missing))


def test_missing_map_file_through_env_names_the_path(tmp_path: Path, map_file: Path) -> None:
    missing = tmp_path / "gone.yaml"
    result = run_bbr(*["serve", *port_flags()], env={"BBR_MODEL_MAP": f"{map_file},{missing}"})
    assert_usage_error(result.stderr, result.returncode, str(missing))


NOT_YAML = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: broken
data:
  baseModel: llama: 3
"""


@pytest.mark.parametrize("as_directory", [False, True], ids=["file", "in-directory"])
def test_map_file_not_yaml_at_start_names_file_and_line(tmp_path: Path, as_directory: bool) -> None:
    folder = tmp_path / "maps"
    folder.mkdir()
    write_model_map(folder / "good.yaml", configmap_yaml("good", "good"))
    broken = folder / "broken.yaml"
    broken.write_text(NOT_YAML)
    source = folder if as_directory else broken
    result = run_bbr("serve", "--model-map", str(source), *port_flags())
    assert_usage_error(result.stderr, result.returncode, f"{broken}:6")


BAD_BYTES = {
    # An editor saved "café" as Latin-1: not UTF-8, so not YAML.
    "latin-1": (
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndata:\n  baseModel: café\n"
    ).encode("latin-1"),
    # A stray control character (YAML forbids it in the stream).
    "control-character": b"apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"
    b"data:\n  baseModel: a\x07b\n",
}


@pytest.mark.parametrize("kind", list(BAD_BYTES))
def test_map_file_with_bad_bytes_at_start_names_file_and_line(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model-map.yaml"
    path.write_bytes(BAD_BYTES[kind])
    result = run_bbr("serve", "--model-map", str(path), *port_flags())
    assert_usage_error(result.stderr, result.returncode, f"{path}:5")


def test_no_map_source_mentions_model_map() -> None:
    result = run_bbr("serve", *port_flags())
    assert_usage_error(result.stderr, result.returncode, "--model-map")


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port someone else is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("0.0.0.0", 0))
        holder.listen()
        yield holder.getsockname()[1]


@pytest.mark.parametrize("flag", ["--grpc-port", "--grpc-health-port", "--metrics-port"])
def test_port_in_use_exits_2_naming_the_port(map_file: Path, busy_port: int, flag: str) -> None:
    flags = ["--grpc-port", "--grpc-health-port", "--metrics-port"]
    ports = dict(zip(flags, free_ports(3), strict=True))
    ports[flag] = busy_port
    args = [item for pair in ports.items() for item in (pair[0], str(pair[1]))]
    start = time.monotonic()
    result = run_bbr("serve", "--model-map", str(map_file), *args)
    assert time.monotonic() - start < 15
    assert_usage_error(result.stderr, result.returncode, str(busy_port))


def test_port_in_use_on_loopback_only(map_file: Path) -> None:
    """Something listening on 127.0.0.1 only still makes the port unusable."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        health_port, metrics_port = free_ports(2)
        result = run_bbr(
            "serve",
            "--model-map",
            str(map_file),
            "--grpc-port",
            str(port),
            "--grpc-health-port",
            str(health_port),
            "--metrics-port",
            str(metrics_port),
        )
    assert_usage_error(result.stderr, result.returncode, str(port))


# --- env twins ------------------------------------------------------------------------------


def two_maps(tmp_path: Path) -> tuple[Path, Path]:
    first = write_model_map(tmp_path / "first.yaml", configmap_yaml("llama", "llama", ["food"]))
    second = write_model_map(tmp_path / "second.yaml", configmap_yaml("qwen", "qwen", ["poem"]))
    return first, second


def test_env_twins_configure_everything_without_flags(tmp_path: Path, start_bbr: StartBbr) -> None:
    first, second = two_maps(tmp_path)
    grpc_port, health_port, metrics_port = free_ports(3)
    env = {
        "BBR_GRPC_PORT": str(grpc_port),
        "BBR_GRPC_HEALTH_PORT": str(health_port),
        "BBR_METRICS_PORT": str(metrics_port),
        "BBR_MODEL_MAP": f"{first},{second}",
        "BBR_UNKNOWN_MODEL": "reject",
        "BBR_MAX_BODY_BYTES": "2000",
        "BBR_STREAMING": "yes",
    }
    process = start_bbr(
        env=env,
        port_flags=False,
        grpc_port=grpc_port,
        health_port=health_port,
        metrics_port=metrics_port,
    )
    channel = process.channel()
    # BBR_MODEL_MAP, comma-separated: both files count.
    assert route(channel, "food")[BASE_HEADER] == "llama"
    assert route(channel, "poem")[BASE_HEADER] == "qwen"
    # BBR_UNKNOWN_MODEL=reject
    assert route(channel, "nope") == {":status": "404"}
    # BBR_MAX_BODY_BYTES=2000
    big = immediate(request(channel, json_body("food", pad="x" * 3000)))
    assert big is not None and big.status.code == 413
    # BBR_STREAMING=yes: without a protocol_config, bbr holds the headers answer and puts
    # the routing headers on it (buffered mode would answer headers at once, empty).
    responses = request(channel, json_body("food"))
    assert responses[0].WhichOneof("response") == "request_headers"
    assert responses[0].request_headers.response.header_mutation.set_headers
    assert responses[1].request_body.response.body_mutation.streamed_response.body
    # BBR_METRICS_PORT
    assert "bbr_info" in process.metrics_text()


def test_flags_win_over_env(tmp_path: Path, start_bbr: StartBbr) -> None:
    first, second = two_maps(tmp_path)
    env_grpc_port = free_port()
    env = {
        "BBR_GRPC_PORT": str(env_grpc_port),
        "BBR_MODEL_MAP": str(second),
        "BBR_UNKNOWN_MODEL": "reject",
        "BBR_STREAMING": "true",
    }
    process = start_bbr("--unknown-model", "pass", "--streaming", "no", env=env, model_map=first)
    channel = process.channel()
    assert route(channel, "food")[BASE_HEADER] == "llama"
    # --model-map replaced BBR_MODEL_MAP: qwen's adapter is unknown, and passed (flag).
    assert route(channel, "poem") == {MODEL_HEADER: "poem"}
    # --streaming no: buffered, the headers answer comes first and sets nothing.
    responses = request(channel, json_body("food"))
    assert not responses[0].request_headers.response.header_mutation.set_headers
    assert responses[1].request_body.response.header_mutation.set_headers
    # --grpc-port won: nothing listens on the env's port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        assert probe.connect_ex(("127.0.0.1", env_grpc_port)) != 0


def test_model_map_flag_repeatable(tmp_path: Path, start_bbr: StartBbr) -> None:
    first, second = two_maps(tmp_path)
    process = start_bbr("--model-map", str(first), "--model-map", str(second))
    channel = process.channel()
    assert route(channel, "food")[BASE_HEADER] == "llama"
    assert route(channel, "poem")[BASE_HEADER] == "qwen"


# --- bbr validate ---------------------------------------------------------------------------


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "error" in line.lower()]


def has_error(stderr: str, *parts: str) -> bool:
    return any(all(part in line for part in parts) for line in stderr.splitlines())


def test_validate_good_file_prints_the_table(tmp_path: Path) -> None:
    path = write_model_map(
        tmp_path / "models.yaml",
        configmap_yaml("llama", "meta-llama/Llama-3.1-8B-Instruct", ["food-review-1", "movie"]),
        configmap_yaml("qwen", "Qwen/Qwen2.5-7B", namespace="ml"),
    )
    result = run_bbr("validate", str(path))
    assert result.returncode == 0, result.stderr
    rows = validate_table(result.stdout)
    llama = "meta-llama/Llama-3.1-8B-Instruct"
    assert {name: base for name, (base, _) in rows.items()} == {
        llama: llama,
        "food-review-1": llama,
        "movie": llama,
        "Qwen/Qwen2.5-7B": "Qwen/Qwen2.5-7B",
    }
    for name, (_, source) in rows.items():
        assert str(path) in source, (name, source)
    assert "llama" in rows["movie"][1]
    assert "ml/qwen" in rows["Qwen/Qwen2.5-7B"][1]


INVALID_DOCS = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: no-base}
data:
  adapters: |
    - orphan
---
apiVersion: v1
kind: ConfigMap
metadata: {name: control}
data:
  baseModel: base-two
  adapters: |
    - fine
    - "bell\\u0007name"
---
apiVersion: v1
kind: ConfigMap
metadata: {name: not-a-list}
data:
  baseModel: base-three
  adapters: "just-one-string"
---
apiVersion: v1
kind: ConfigMap
metadata: {name: too-long}
data:
  baseModel: base-four
  adapters: |
    - "%(long)s"
---
apiVersion: v1
kind: ConfigMap
metadata: {name: valid}
data:
  baseModel: base-five
  adapters: |
    - "%(exact)s"
---
apiVersion: v1
kind: ConfigMap
metadata: {name: blank}
data:
  baseModel: base-six
  adapters: |
    - "   "
"""


def test_validate_lists_every_invalid_configmap(tmp_path: Path) -> None:
    # 129 x "é" is 258 bytes but only 129 characters; 128 of them is exactly 256 bytes.
    path = tmp_path / "invalid.yaml"
    path.write_text(INVALID_DOCS % {"long": "é" * 129, "exact": "é" * 128})
    result = run_bbr("validate", str(path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    report = result.stdout + result.stderr
    assert has_error(report, f"{path}#1", "baseModel"), report
    assert has_error(report, f"{path}#2", "adapters[1]"), report
    assert has_error(report, f"{path}#3", "adapters"), report
    assert has_error(report, f"{path}#4", "adapters[0]"), report
    assert not has_error(result.stderr, f"{path}#5"), report
    assert has_error(report, f"{path}#6", "adapters[0]"), report  # empty once trimmed
    # The valid ConfigMap (with a name of exactly 256 bytes) is still in the table; no
    # name from an invalid ConfigMap is.
    rows = validate_table(result.stdout)
    assert set(rows) == {"base-five", "é" * 128}


MIGRATED = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: migrated}
data:
  baseModel: meta-llama/Llama-3.1-8B-Instruct
  adapters: |
    - food-review-1
    - 1.10
    -
    - 1234
---
apiVersion: v1
kind: ConfigMap
metadata: {name: broken}
data:
  baseModel: qwen
  adapters: |
    - ok
    - "%(bad)s"
"""


def test_validate_accepts_go_bbr_adapters_and_warns_what_differs(tmp_path: Path) -> None:
    """A ConfigMap the Go BBR loaded loads here; validate says what it took and warns."""
    path = tmp_path / "migrated.yaml"
    path.write_text(MIGRATED % {"bad": "ok"})
    result = run_bbr("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert {"food-review-1", "1.10", "1234"} <= set(validate_table(result.stdout))
    assert "accepted 2 ConfigMap(s) from 1 file(s): 2 base model(s), 4 adapter(s)" in (
        result.stdout
    )
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert has_error("\n".join(warnings), "#1", "data.adapters[1]", '"1.10"', "quote it")
    assert has_error("\n".join(warnings), "#1", "data.adapters[2]", "empty item skipped")
    assert has_error("\n".join(warnings), "#1", "data.adapters[3]", '"1234"')
    assert not has_error("\n".join(warnings), "data.adapters[0]")


def test_validate_error_names_the_value_quoted_and_cut_with_a_hint(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    bad = "tab\\there " + "x" * 100  # a TAB escape in a double-quoted YAML string
    path.write_text(MIGRATED % {"bad": bad})
    result = run_bbr("validate", str(path))
    assert result.returncode == 1
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    shown = '"tab\\x09here ' + "x" * (64 - len("tab\there ")) + '"…'
    assert f"#2: ConfigMap default/broken: data.adapters[1]: {shown} contains a control" in line
    assert "(hint: remove tabs" in line


def test_validate_long_base_model_name(tmp_path: Path) -> None:
    path = write_model_map(tmp_path / "long.yaml", configmap_yaml("long", "m" * 257))
    result = run_bbr("validate", str(path))
    assert result.returncode == 1
    assert has_error(result.stdout + result.stderr, f"{path}#1", "baseModel")


def test_validate_conflict_is_an_error(tmp_path: Path) -> None:
    path = write_model_map(
        tmp_path / "conflict.yaml",
        configmap_yaml("first", "llama", ["shared"]),
        configmap_yaml("second", "qwen", ["shared"]),
    )
    result = run_bbr("validate", str(path))
    assert result.returncode == 1, result.stdout
    assert has_error(result.stderr, "shared", "first", "second"), result.stderr
    # The earlier document wins.
    assert validate_table(result.stdout)["shared"][0] == "llama"


def test_validate_same_base_in_two_configmaps_is_no_conflict(tmp_path: Path) -> None:
    path = write_model_map(
        tmp_path / "same-base.yaml",
        configmap_yaml("a", "llama", ["food"]),
        configmap_yaml("b", "llama", ["movie"]),
    )
    result = run_bbr("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert {n: b for n, (b, _) in validate_table(result.stdout).items()} == {
        "llama": "llama",
        "food": "llama",
        "movie": "llama",
    }


LIST_AND_DOCUMENTS = """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: ConfigMap
  metadata: {name: one}
  data: {baseModel: base-one, adapters: "- one-a\\n- one-b\\n"}
- apiVersion: v1
  kind: ConfigMap
  metadata:
    name: two
    namespace: team
    labels: {inference.networking.k8s.io/bbr-managed: "false"}  # files: every one counts
  data: {baseModel: base-two}
---
apiVersion: v1
kind: Service
metadata: {name: not-a-configmap}
spec: {ports: [{port: 80}]}
---
---
apiVersion: v1
kind: ConfigMap
metadata: {name: three}
data:
  baseModel: base-three
  adapters: |
    - three-a
"""


def test_validate_kind_list_and_multiple_documents(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(LIST_AND_DOCUMENTS)
    result = run_bbr("validate", str(path))
    assert result.returncode == 0, result.stderr
    assert {n: b for n, (b, _) in validate_table(result.stdout).items()} == {
        "base-one": "base-one",
        "one-a": "base-one",
        "one-b": "base-one",
        "base-two": "base-two",
        "base-three": "base-three",
        "three-a": "base-three",
    }


def test_validate_not_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(NOT_YAML)
    result = run_bbr("validate", str(path))
    assert result.returncode == 1
    assert f"{path}:6" in result.stdout + result.stderr


def test_validate_directory(tmp_path: Path) -> None:
    folder = tmp_path / "maps"
    folder.mkdir()
    write_model_map(folder / "a.yaml", configmap_yaml("a", "base-a"))
    write_model_map(folder / "b.yml", configmap_yaml("b", "base-b"))
    write_model_map(folder / "c.json", configmap_yaml("c", "base-c"))
    elsewhere = write_model_map(tmp_path / "elsewhere.txt", configmap_yaml("d", "base-d"))
    os.symlink(elsewhere, folder / "linked.yaml")  # symlinks are followed
    # Skipped: hidden entries, other suffixes, subdirectories, dangling links.
    write_model_map(folder / ".hidden.yaml", configmap_yaml("h", "hidden"))
    write_model_map(folder / "notes.txt", configmap_yaml("n", "notes"))
    write_model_map(folder / "README.md", configmap_yaml("r", "readme"))
    (folder / "sub").mkdir()
    write_model_map(folder / "sub" / "deep.yaml", configmap_yaml("s", "deep"))
    (folder / "subdir.yaml").mkdir()
    os.symlink(tmp_path / "missing.yaml", folder / "dangling.yaml")
    (folder / "..data").symlink_to("sub")
    result = run_bbr("validate", str(folder))
    assert result.returncode == 0, result.stderr
    assert {n: b for n, (b, _) in validate_table(result.stdout).items()} == {
        "base-a": "base-a",
        "base-b": "base-b",
        "base-c": "base-c",
        "base-d": "base-d",
    }


def test_validate_several_paths(tmp_path: Path) -> None:
    first, second = two_maps(tmp_path)
    result = run_bbr("validate", str(first), str(second))
    assert result.returncode == 0, result.stderr
    rows = validate_table(result.stdout)
    assert rows["food"][0] == "llama" and str(first) in rows["food"][1]
    assert rows["poem"][0] == "qwen" and str(second) in rows["poem"][1]


def test_version() -> None:
    result = run_bbr("--version")
    assert result.returncode == 0
    assert bbr.__version__ in result.stdout + result.stderr
    assert re.fullmatch(r"bbr \S+\s*", result.stdout), result.stdout


def test_go_bbr_flags_are_accepted_and_named_in_warnings() -> None:
    from bbr.cli import build_parser, go_compat_warnings

    parser, _ = build_parser()
    args = parser.parse_args(
        [
            "serve",
            "--model-map",
            "m.yaml",
            "--streaming",
            "--v",
            "3",
            "--enable-pprof",
            "--metrics-endpoint-auth=false",
            "--zap-log-level",
            "debug",
        ]
    )
    assert args.streaming is True and args.model_map == ["m.yaml"]
    warnings = go_compat_warnings(args)
    assert len(warnings) == 4 and all("Go BBR flag" in w for w in warnings)
    assert go_compat_warnings(parser.parse_args(["serve", "--model-map", "m.yaml"])) == []


def test_tracing_is_bbr_flag_go_bbr_spellings_included() -> None:
    """The Go BBR's `--tracing=false` / `--tracing` keep working, now with their meaning."""
    from bbr.cli import build_parser, go_compat_warnings

    parser, _ = build_parser()
    for argv, expected in (
        (["--tracing=false"], False),
        (["--tracing"], True),
        (["--tracing=true"], True),
        ([], None),  # unset: BBR_TRACING, then the default (off)
    ):
        args = parser.parse_args(["serve", "--model-map", "m.yaml", *argv])
        assert args.tracing is expected
        assert go_compat_warnings(args) == []


def test_go_bbr_plugin_flag_is_refused_with_a_reason(map_file: Path) -> None:
    result = run_bbr("serve", "--model-map", str(map_file), "--plugin", "body-field:model")
    assert result.returncode == 2
    assert "--plugin" in result.stderr.strip().splitlines()[-1]
