"""Fixtures shared by the tests: bbr processes on free ports, a small model map, an OTLP
receiver.

The helpers they use live in tests/support.py and harness/; test modules import those,
never this file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.modelmaps import configmap_yaml, write_model_map
from tests.otlp import Receiver
from tests.support import Launcher, StartBbr


@pytest.fixture
def start_bbr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartBbr]:
    """Start `bbr serve ARGS` on free ports; wait for SERVING; always stop it at teardown.

    start_bbr(*args, env=None, model_map=None, port_flags=True, wait=True,
              grpc_port=None, health_port=None, metrics_port=None) -> BbrProcess

    `model_map` (a path) adds `--model-map PATH`. Ports not given are free ones; they go
    on the command line unless `port_flags=False` (then pass them through `env`).
    `wait=False` returns at once, without waiting for health SERVING.
    """
    launcher = Launcher(tmp_path_factory.mktemp("bbr"))
    try:
        yield launcher.start
    finally:
        launcher.close()


@pytest.fixture(scope="module")
def start_bbr_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartBbr]:
    """`start_bbr` for a process shared by the tests of one module."""
    launcher = Launcher(tmp_path_factory.mktemp("bbr"))
    try:
        yield launcher.start
    finally:
        launcher.close()


@pytest.fixture
def simple_map(tmp_path: Path) -> Path:
    """A model map: base `llama` with adapters `food` and `movie`; base `qwen`."""
    return write_model_map(
        tmp_path / "model-map.yaml",
        configmap_yaml("llama", "llama", ["food", "movie"]),
        configmap_yaml("qwen", "qwen"),
    )


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    """An OTLP/gRPC trace receiver on a free port (tests/otlp.py), for a module's tests."""
    found = Receiver()
    try:
        yield found
    finally:
        found.close()
