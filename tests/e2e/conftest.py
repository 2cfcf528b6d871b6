"""Fixtures for the end-to-end tests: each stack is started once per session."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import pytest

from harness.stack import RUNNING, ModelServers, Stack, demo_pools, start_stack


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: end-to-end through a real Envoy, bbr and model servers (slower)"
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call" and report.failed and item.get_closest_marker("e2e"):
        for stack in RUNNING:
            report.sections.append((f"logs of stack {stack.name}", stack.log_tails()))
    return report


@pytest.fixture(scope="session")
def model_servers() -> Iterator[ModelServers]:
    pools, _ = demo_pools()
    servers = ModelServers(pools)
    yield servers
    servers.close()


def _stack(
    name: str,
    tmp_path_factory: pytest.TempPathFactory,
    model_servers: ModelServers,
    flags: list[str],
    *,
    streaming: bool = False,
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp(name)
    stack = start_stack(name, workdir, model_servers, flags, streaming=streaming)
    try:
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="session")
def buffered(
    tmp_path_factory: pytest.TempPathFactory, model_servers: ModelServers
) -> Iterator[Stack]:
    """Default bbr (buffered, ``--unknown-model pass``) with ``--models-endpoint``."""
    yield from _stack("buffered", tmp_path_factory, model_servers, ["--models-endpoint"])


@pytest.fixture(scope="session")
def strict(
    tmp_path_factory: pytest.TempPathFactory, model_servers: ModelServers
) -> Iterator[Stack]:
    """bbr with ``--unknown-model reject --max-body-bytes 65536``."""
    flags = ["--unknown-model", "reject", "--max-body-bytes", "65536"]
    yield from _stack("strict", tmp_path_factory, model_servers, flags)


@pytest.fixture(scope="session")
def streaming(
    tmp_path_factory: pytest.TempPathFactory, model_servers: ModelServers
) -> Iterator[Stack]:
    """bbr ``--streaming`` behind Envoy in ``FULL_DUPLEX_STREAMED`` mode."""
    yield from _stack("streaming", tmp_path_factory, model_servers, [], streaming=True)
