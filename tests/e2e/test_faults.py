"""Faults with real processes: a client, a real Envoy, bbr and the model servers.

- a client that resets its connection mid-body: Envoy resets the ext_proc stream, bbr
  frees it (``bbr_active_streams`` back to 0) and the next request routes;
- a streamed body that never finishes (``--stream-idle-timeout 1``): bbr drops the
  stream, Envoy answers the client 500 itself (``failure_mode_allow: false``);
- the model-map file deleted, unreadable (to bbr running unprivileged), replaced by a
  dangling symlink, by an empty directory or by garbage (atomically or in place):
  bbr counts a failed reload, routing goes on with the last good map, a good file
  restores;
- SIGTERM under load: streams that had started finish, health turns NOT_SERVING, exit 0;
- Envoy killed and restarted while bbr runs: no stream left behind, routing resumes.

Deadlines are generous (the machine is shared); no assertion is about speed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bbr.logs import FLUSH_SECONDS
from harness.stack import DEEPSEEK, LLAMA, MODEL_MAP, ModelServers, Reply

from .live import PATIENCE, HeldRequest, Live, assert_routes, chat_body, poll, served_by

pytestmark = pytest.mark.e2e

# model → base model, from config/model-map.yaml
KNOWN = {
    LLAMA: LLAMA,
    "food-review-1": LLAMA,
    "movie-critique": LLAMA,
    DEEPSEEK: DEEPSEEK,
    "ski-resorts": DEEPSEEK,
}
RELOAD_ERRORS = 'bbr_model_map_reloads_total{result="error"}'


def live_stack(
    workdir: Path,
    model_servers: ModelServers,
    *,
    streaming: bool = False,
    flags: list[str] | None = None,
    prefix: list[str] | None = None,
) -> Live:
    workdir.mkdir(parents=True, exist_ok=True)
    model_map = workdir / "model-map.yaml"
    shutil.copyfile(MODEL_MAP, model_map)
    model_map.chmod(0o644)  # readable by a bbr running unprivileged (mapped_live)
    live = Live(
        workdir,
        model_servers,
        model_map,
        streaming=streaming,
        bbr_flags=list(flags or []),
        bbr_prefix=list(prefix or []),
    )
    return live.start()


@contextlib.contextmanager
def running(live: Live) -> Iterator[Live]:
    try:
        yield live
    finally:
        live.close()


def idle(live: Live) -> None:
    assert live.bbr is not None
    live.bbr.wait_active(lambda n: n == 0, "== 0")


@pytest.fixture(scope="module")
def buffered_live(
    tmp_path_factory: pytest.TempPathFactory, model_servers: ModelServers
) -> Iterator[Live]:
    with running(live_stack(tmp_path_factory.mktemp("faults-buffered"), model_servers)) as live:
        yield live


@pytest.fixture(scope="module")
def streaming_live(
    tmp_path_factory: pytest.TempPathFactory, model_servers: ModelServers
) -> Iterator[Live]:
    workdir = tmp_path_factory.mktemp("faults-streaming")
    with running(live_stack(workdir, model_servers, streaming=True)) as live:
        yield live


# --- a client that resets mid-body -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["buffered", "streaming"])
def test_client_reset_mid_body_frees_the_stream(
    request: pytest.FixtureRequest, model_servers: ModelServers, mode: str
) -> None:
    """Five clients send headers and half a body, then reset; bbr lets go of all five.

    Buffered: bbr has answered the headers and waits for the body Envoy is buffering.
    Streaming: bbr holds the first half of each body. Either way Envoy resets the ext_proc
    stream when the client goes, and bbr must notice and release it.
    """
    live: Live = request.getfixturevalue(f"{mode}_live")
    assert live.bbr is not None
    live.wait_routing()
    idle(live)
    clients = [
        HeldRequest(live.port, chat_body("food-review-1", 4096), chunked=live.streaming)
        for _ in range(5)
    ]
    try:
        for client in clients:
            client.open()
        live.bbr.wait_active(lambda n: n >= 5, ">= 5 (Envoy opened a stream per client)")
        for client in clients:
            client.reset()
        idle(live)
    finally:
        for client in clients:
            client.close()
    assert live.bbr.child.exited() is None
    assert_routes(live, model_servers, KNOWN)
    idle(live)


# --- a streamed body that never finishes ------------------------------------------------------


def test_streamed_body_that_never_finishes_is_dropped(
    tmp_path_factory: pytest.TempPathFactory, model_servers: ModelServers
) -> None:
    """``--stream-idle-timeout 1``: a client that stops sending mid-body loses its stream.

    What the client sees: bbr ends the ext_proc stream with DEADLINE_EXCEEDED; Envoy, with
    ``failure_mode_allow: false``, answers the client 500 itself (ext_proc's default
    ``status_on_error``) and closes the connection. Envoy's own timers do not fire: its
    ``message_timeout`` counter stays 0 and its stream-failure counter goes up, so it was
    bbr that ended the wait.
    """
    workdir = tmp_path_factory.mktemp("faults-idle")
    flags = ["--stream-idle-timeout", "1"]
    with running(live_stack(workdir, model_servers, streaming=True, flags=flags)) as live:
        assert live.bbr is not None and live.envoy is not None
        live.wait_routing()
        idle(live)
        failed_before = live.envoy.ext_proc_stat("streams_failed")
        client = HeldRequest(live.port, chat_body("ski-resorts", 8192), chunked=True)
        try:
            client.open()
            reply = client.answer()  # no more body: wait for whatever comes
        finally:
            client.close()
        assert reply.status == 500, str(reply)
        assert served_by(reply) is None
        idle(live)
        assert live.envoy.ext_proc_stat("streams_failed") > failed_before
        assert live.envoy.ext_proc_stat("message_timeouts") == 0
        # bbr is fine, and so is the next request (streamed, and plain).
        assert live.bbr.child.exited() is None
        reply = live.send(chat_body("ski-resorts", 8192), chunked=True)
        assert served_by(reply) == model_servers.name_of(DEEPSEEK), str(reply)
        assert_routes(live, model_servers, KNOWN)
        idle(live)


# --- the model-map file goes bad --------------------------------------------------------------


def good_map_text(probe: str) -> str:
    """The repo's model map plus adapter ``probe`` on DeepSeek (to see a restore land)."""
    text = MODEL_MAP.read_text(encoding="utf-8")
    assert text.endswith("- ski-resorts\n")
    return text + f"    - {probe}\n"


def replace_atomically(path: Path, text: str | bytes) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    data = text.encode() if isinstance(text, str) else text
    temp.write_bytes(data)
    temp.chmod(0o644)
    os.replace(temp, path)


def remove_any(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


@pytest.fixture(scope="module")
def mapped_live(model_servers: ModelServers) -> Iterator[Live]:
    """A stack whose bbr cannot read past file permissions even when the tests run as root.

    chmod 000 does not stop root from reading a file; bbr in a pod does not run as root
    either. As root the tests start bbr without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    (``setpriv``): still uid 0, so the checkout and venv stay readable wherever CI put
    them, but a chmod 000 file is not.
    """
    workdir = Path(tempfile.mkdtemp(prefix="bbr-faults-map-"))
    workdir.chmod(0o755)
    prefix: list[str] = []
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot drop bbr's DAC capabilities")
        drop = "-dac_override,-dac_read_search"
        prefix = [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}"]
    try:
        live = live_stack(workdir, model_servers, prefix=prefix)
        with running(live):
            yield live
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _delete(path: Path) -> None:
    path.unlink()


def _unreadable(path: Path) -> None:
    path.chmod(0)


def _dangling_symlink(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("does-not-exist.yaml"))


def _directory(path: Path) -> None:
    """A volume mounted over the file, a botched deploy: the file bbr was given is gone."""
    path.unlink()
    path.mkdir()
    path.chmod(0o755)


def _garbage(path: Path) -> None:
    replace_atomically(path, b"\x00\xff{{ not: [yaml\n\tkind: ConfigMap\n")


def _garbage_in_place(path: Path) -> None:
    with path.open("r+b") as handle:  # truncate and scribble, as a careless editor might
        handle.truncate(0)
        handle.write(b"apiVersion: v1\nkind: ConfigMap\ndata: [\n")


FAULTS = {
    "deleted": _delete,
    "unreadable": _unreadable,
    "dangling-symlink": _dangling_symlink,
    "directory": _directory,
    "garbage": _garbage,
    "garbage-in-place": _garbage_in_place,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_model_map_fault_keeps_the_last_good_map(
    mapped_live: Live, model_servers: ModelServers, fault: str
) -> None:
    live = mapped_live
    bbr = live.bbr
    assert bbr is not None
    path = live.model_map
    live.wait_routing()
    errors_before = bbr.metric(RELOAD_ERRORS)

    FAULTS[fault](path)
    # bbr noticed (it counts the failed reload) ...
    poll("a failed reload counted", lambda: bbr.metric(RELOAD_ERRORS) > errors_before)
    # ... and goes on routing with the map it had, for as long as the file stays bad.
    assert_routes(live, model_servers, KNOWN)
    time.sleep(1.5)  # several more polls of the bad file
    assert_routes(live, model_servers, KNOWN)
    assert bbr.metric('bbr_model_map_models{kind="base"}') == 2

    # A good file again: a new adapter shows that it was read.
    probe = f"probe-{fault}"
    remove_any(path)
    replace_atomically(path, good_map_text(probe))
    live.wait_routing(probe, DEEPSEEK)
    assert_routes(live, model_servers, KNOWN)
    assert bbr.child.exited() is None


# --- SIGTERM under load -----------------------------------------------------------------------


@dataclass
class Outcome:
    model: str
    started: float
    ended: float
    reply: Reply | None
    error: str | None


def load(live: Live, stop: threading.Event, results: list[Outcome], index: int) -> None:
    """One client: requests for the known models in turn, each on a fresh connection."""
    models = list(KNOWN)
    n = index
    while not stop.is_set():
        model = models[n % len(models)]
        n += 1
        started = time.monotonic()
        try:
            reply: Reply | None = live.chat(model)
            error = None
        except Exception as exc:  # a dropped request: the test reports it
            reply, error = None, f"{type(exc).__name__}: {exc}"
        results.append(Outcome(model, started, time.monotonic(), reply, error))


def routed_count(live: Live) -> int:
    assert live.bbr is not None
    return sum(
        1
        for r in live.bbr.log_records()
        if r.get("msg") == "request" and r.get("outcome") == "routed"
    )


def test_sigterm_under_load_drops_no_started_request(
    tmp_path_factory: pytest.TempPathFactory, model_servers: ModelServers
) -> None:
    """20 clients through Envoy, plus 4 requests held mid-body; then SIGTERM to bbr.

    - The held requests had their ext_proc streams open when SIGTERM came: they finish
      after it, and each reaches its model server.
    - Health turns NOT_SERVING while bbr drains; bbr exits 0 once they are done.
    - Every load request gets an HTTP answer: its model server, or (only for requests
      answered after SIGTERM) Envoy's 500 because bbr no longer takes new streams.
    - Every request bbr routed reached a model server: as many 200s as bbr logged
      ``routed`` decisions, so no stream bbr had started was lost on the way.
    """
    workdir = tmp_path_factory.mktemp("faults-sigterm")
    with running(live_stack(workdir, model_servers)) as live:
        bbr = live.bbr
        assert bbr is not None
        live.wait_routing()
        idle(live)
        time.sleep(3 * FLUSH_SECONDS)  # log lines are written in batches, at most this late
        routed_before = routed_count(live)

        held = [
            HeldRequest(live.port, chat_body(model, 2048))
            for model in ("food-review-1", "ski-resorts", LLAMA, DEEPSEEK)
        ]
        results: list[Outcome] = []
        stop = threading.Event()
        clients = [
            threading.Thread(target=load, args=(live, stop, results, i), daemon=True)
            for i in range(20)
        ]
        try:
            for h in held:
                h.open()
            bbr.wait_active(lambda n: n >= len(held), f">= {len(held)} (held requests)")
            for client in clients:
                client.start()
            poll("load under way", lambda: sum(1 for r in results if r.reply) >= 40)
            sigterm_at = time.monotonic()
            bbr.child.proc.send_signal(signal.SIGTERM)

            from grpc_health.v1 import health_pb2

            poll(
                "health NOT_SERVING",
                lambda: bbr.health() == health_pb2.HealthCheckResponse.NOT_SERVING,
            )
            assert bbr.child.exited() is None, "bbr exited with streams still open"
            answers = [h.finish() for h in held]
        finally:
            for h in held:
                h.close()
            try:
                code = bbr.child.proc.wait(PATIENCE)
            finally:
                stop.set()
                for client in clients:
                    client.join(PATIENCE)

        assert code == 0, live.log_tails()
        for h, reply in zip(held, answers, strict=True):
            model = chat_body_model(h.body)
            assert served_by(reply) == model_servers.name_of(KNOWN[model]), str(reply)

        dropped = [r for r in results if r.error is not None]
        assert not dropped, f"{len(dropped)} requests got no HTTP answer: {dropped[:3]}"
        wrong = []
        for r in results:
            assert r.reply is not None
            server = served_by(r.reply)
            if server is not None:
                if server != model_servers.name_of(KNOWN[r.model]):
                    wrong.append(r)
            elif r.reply.status != 500 or r.ended < sigterm_at:
                wrong.append(r)
        assert not wrong, [f"{r.model}: {r.reply}" for r in wrong[:5]]
        ok = sum(1 for r in results if r.reply is not None and served_by(r.reply))
        failed = len(results) - ok
        print(f"load: {ok} routed, {failed} answered 500 after SIGTERM; {len(held)} held routed")
        assert ok >= 40
        # Every routed decision became a 200 at the client (held ones included).
        assert routed_count(live) - routed_before == ok + len(held), (
            f"bbr routed {routed_count(live) - routed_before}, clients got {ok} + {len(held)} "
            f"answers from model servers ({failed} answered 500 after SIGTERM)"
        )
        records = live.bbr.log_records() if live.bbr else []
        assert any(r.get("msg") == "draining" for r in records)
        assert any(r.get("msg") == "stopped" for r in records)


def chat_body_model(body: bytes) -> str:
    import json

    model = json.loads(body)["model"]
    assert isinstance(model, str)
    return model


# --- Envoy restarted while bbr runs -----------------------------------------------------------


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_envoy_restart_leaves_bbr_serving(
    tmp_path_factory: pytest.TempPathFactory, model_servers: ModelServers, how: str
) -> None:
    """Envoy dies with three requests mid-body; bbr frees their streams; a new Envoy on the
    same port routes again, through the same bbr process."""
    workdir = tmp_path_factory.mktemp(f"faults-envoy-{how.lower()}")
    with running(live_stack(workdir, model_servers, streaming=True)) as live:
        bbr, envoy = live.bbr, live.envoy
        assert bbr is not None and envoy is not None
        live.wait_routing()
        idle(live)
        pid = bbr.pid
        held = [
            HeldRequest(live.port, chat_body("movie-critique", 4096), chunked=True)
            for _ in range(3)
        ]
        try:
            for h in held:
                h.open()
            bbr.wait_active(lambda n: n >= 3, ">= 3 (held requests)")
            envoy.child.proc.send_signal(getattr(signal, how))
            envoy.child.proc.wait(PATIENCE)
            envoy.log_file.close()
            idle(live)  # bbr saw the connection go and released every stream
        finally:
            for h in held:
                h.close()

        assert bbr.child.exited() is None
        from grpc_health.v1 import health_pb2

        assert bbr.health() == health_pb2.HealthCheckResponse.SERVING
        live.start_envoy()
        live.wait_routing()
        assert_routes(live, model_servers, KNOWN)
        reply = live.send(chat_body("movie-critique", 8192), chunked=True)
        assert served_by(reply) == model_servers.name_of(LLAMA), str(reply)
        assert bbr.pid == pid and bbr.child.exited() is None
        idle(live)
