"""TLS on the gRPC port: given, self-signed, mutual, hot-reloaded; checked with real clients."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bbr import h2grpc
from bbr.health import Health
from bbr.service import health_check
from bbr.tls import CertificateReloader, Material, TLSError, server_tls
from tests.pki import Authority, Pair, SecretVolume, served_certificate

FAST = 0.1  # reload interval in tests: a look at the files every 100 ms
WAIT = 5.0  # how long a reload may take to show before a test fails

# --- certificates -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority("bbr test CA")


@pytest.fixture(scope="module")
def other_ca() -> Authority:
    return Authority("some other CA")


def write_atomic(path: Path, data: bytes) -> None:
    """Write as careful tools do: a temporary file renamed over the old one."""
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_bytes(data)
    os.replace(temp, path)


def put_pair(directory: Path, pair: Pair) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(directory / "tls.crt", pair.cert)
    write_atomic(directory / "tls.key", pair.key)


# --- bbr's TLS server in its own thread, real gRPC clients in the test's ---------------------


class TLSServer:
    """bbr's ext_proc port (health Check only) on 127.0.0.1 with the given TLS context."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        health = Health()
        health.status[""] = health_pb2.HealthCheckResponse.SERVING
        self.server = h2grpc.Server(
            {"/grpc.health.v1.Health/Check": health_check(health)}, max_message=1024 * 1024
        )
        self.port: int = self._run(self.server.listen("127.0.0.1", 0, ssl_context=context))

    def _run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def close(self) -> None:
        self._run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


Serve = Callable[[ssl.SSLContext], TLSServer]


@pytest.fixture
def serve() -> Iterator[Serve]:
    servers: list[TLSServer] = []

    def start(context: ssl.SSLContext) -> TLSServer:
        servers.append(TLSServer(context))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def rpc(
    port: int,
    root: bytes | None,
    client: Pair | None = None,
    *,
    secure: bool = True,
) -> grpc.StatusCode:
    """One health check over a fresh connection; the status code it ended with."""
    target = f"127.0.0.1:{port}"
    options = [("grpc.use_local_subchannel_pool", 1)]  # no connection shared between checks
    if secure:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=root,
            private_key=client.key if client else None,
            certificate_chain=client.cert if client else None,
        )
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    with channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


def wait_for_certificate(port: int, der: bytes) -> float:
    """Seconds until new connections are shown `der`; fails after WAIT."""
    start = time.monotonic()
    while served_certificate(port) != der:
        if time.monotonic() - start > WAIT:
            pytest.fail("the new certificate was not served in time")
        time.sleep(0.05)
    return time.monotonic() - start


# --- serving ---------------------------------------------------------------------------


def test_given_certificate_is_served(
    tmp_path: Path, ca: Authority, other_ca: Authority, serve: Serve
) -> None:
    pair = ca.issue("bbr")
    put_pair(tmp_path / "certs", pair)
    tls = server_tls(str(tmp_path / "certs"), None)
    assert tls.certificate_pem == pair.cert and not tls.mutual
    server = serve(tls.context)

    assert served_certificate(server.port) == pair.der
    assert rpc(server.port, ca.pem) == grpc.StatusCode.OK
    assert rpc(server.port, other_ca.pem) == grpc.StatusCode.UNAVAILABLE


def test_self_signed_when_no_certificate_given(serve: Serve) -> None:
    tls = server_tls(None, None)
    server = serve(tls.context)
    # The client verifies the chain and the SAN 127.0.0.1 against the generated certificate.
    assert rpc(server.port, tls.certificate_pem) == grpc.StatusCode.OK

    cert = x509.load_pem_x509_certificate(tls.certificate_pem)
    assert served_certificate(server.port) == cert.public_bytes(serialization.Encoding.DER)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert datetime.timedelta(days=365) <= lifetime <= datetime.timedelta(days=366)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    # Each start makes its own key.
    assert server_tls(None, None).certificate_pem != tls.certificate_pem


def test_plaintext_client_is_refused(serve: Serve) -> None:
    server = serve(server_tls(None, None).context)
    assert rpc(server.port, None, secure=False) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls(tmp_path: Path, ca: Authority, other_ca: Authority, serve: Serve) -> None:
    put_pair(tmp_path / "certs", ca.issue("bbr"))
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    tls = server_tls(str(tmp_path / "certs"), str(tmp_path / "ca.crt"))
    assert tls.mutual
    server = serve(tls.context)

    assert rpc(server.port, ca.pem) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    assert rpc(server.port, ca.pem, ca.issue("envoy", client=True)) == grpc.StatusCode.OK
    stranger = other_ca.issue("envoy", client=True)
    assert rpc(server.port, ca.pem, stranger) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_with_self_signed_server_certificate(
    tmp_path: Path, ca: Authority, serve: Serve
) -> None:
    (tmp_path / "ca.crt").write_bytes(ca.pem)
    tls = server_tls(None, str(tmp_path / "ca.crt"))
    server = serve(tls.context)
    assert rpc(server.port, tls.certificate_pem) == grpc.StatusCode.UNAVAILABLE
    client = ca.issue("envoy", client=True)
    assert rpc(server.port, tls.certificate_pem, client) == grpc.StatusCode.OK


# --- hot reload ------------------------------------------------------------------------


def test_reload_after_atomic_replace(
    tmp_path: Path, ca: Authority, other_ca: Authority, serve: Serve
) -> None:
    first, second = ca.issue("bbr-1"), other_ca.issue("bbr-2")
    put_pair(tmp_path, first)
    server = serve(server_tls(str(tmp_path), None, reload_interval=FAST).context)
    assert served_certificate(server.port) == first.der

    put_pair(tmp_path, second)
    assert wait_for_certificate(server.port, second.der) < WAIT
    assert rpc(server.port, other_ca.pem) == grpc.StatusCode.OK
    assert rpc(server.port, ca.pem) == grpc.StatusCode.UNAVAILABLE


def test_reload_after_kubelet_symlink_swap(tmp_path: Path, ca: Authority, serve: Serve) -> None:
    first, second = ca.issue("bbr-1"), ca.issue("bbr-2")
    volume = SecretVolume(tmp_path / "secret", first)
    server = serve(server_tls(str(volume.root), None, reload_interval=FAST).context)
    assert served_certificate(server.port) == first.der

    volume.update(second)
    wait_for_certificate(server.port, second.der)
    assert rpc(server.port, ca.pem) == grpc.StatusCode.OK


def test_reload_with_default_interval(tmp_path: Path, ca: Authority, serve: Serve) -> None:
    first, second = ca.issue("bbr-1"), ca.issue("bbr-2")
    put_pair(tmp_path, first)
    server = serve(server_tls(str(tmp_path), None).context)
    put_pair(tmp_path, second)
    assert wait_for_certificate(server.port, second.der) < 3


def test_broken_replacement_keeps_previous_certificate(
    tmp_path: Path, ca: Authority, serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bbr.tls")
    first, second, third = ca.issue("bbr-1"), ca.issue("bbr-2"), ca.issue("bbr-3")
    put_pair(tmp_path, first)
    server = serve(server_tls(str(tmp_path), None, reload_interval=FAST).context)

    def still_first() -> None:
        for _ in range(6):  # several handshakes over several reload intervals
            assert served_certificate(server.port) == first.der
            assert rpc(server.port, ca.pem) == grpc.StatusCode.OK
            time.sleep(FAST)

    def rejections() -> list[str]:
        return [r.fields["error"] for r in caplog.records if r.levelno == logging.ERROR]  # type: ignore[attr-defined]

    write_atomic(tmp_path / "tls.crt", first.cert[: len(first.cert) // 2])  # half-written
    still_first()
    assert len(rejections()) == 1 and "tls.crt: no valid PEM certificate" in rejections()[0]

    write_atomic(tmp_path / "tls.crt", second.cert)  # a certificate without its key
    still_first()
    assert len(rejections()) == 2 and "does not match" in rejections()[1]

    write_atomic(tmp_path / "tls.key", b"")  # key gone, the mismatched certificate stays
    still_first()
    assert len(rejections()) == 3 and "tls.key: no valid PEM private key" in rejections()[2]

    (tmp_path / "tls.key").unlink()
    still_first()
    assert len(rejections()) == 4 and "cannot read private key" in rejections()[3]

    put_pair(tmp_path, third)  # repaired: the next good pair is taken
    wait_for_certificate(server.port, third.der)
    assert any(r.getMessage() == "tls certificate reloaded" for r in caplog.records)


def test_client_ca_is_reloaded(
    tmp_path: Path, ca: Authority, other_ca: Authority, serve: Serve
) -> None:
    put_pair(tmp_path / "certs", ca.issue("bbr"))
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.pem)
    tls = server_tls(str(tmp_path / "certs"), str(ca_file), reload_interval=FAST)
    server = serve(tls.context)
    ours, theirs = ca.issue("envoy", client=True), other_ca.issue("envoy", client=True)
    assert rpc(server.port, ca.pem, theirs) == grpc.StatusCode.UNAVAILABLE

    write_atomic(ca_file, other_ca.pem)
    deadline = time.monotonic() + WAIT
    while rpc(server.port, ca.pem, theirs) != grpc.StatusCode.OK:
        assert time.monotonic() < deadline, "the new client CA was not used in time"
        time.sleep(0.05)
    assert rpc(server.port, ca.pem, ours) == grpc.StatusCode.UNAVAILABLE


def test_reloader_reads_files_at_most_once_per_interval(tmp_path: Path, ca: Authority) -> None:
    first, second = ca.issue("bbr-1"), ca.issue("bbr-2")
    put_pair(tmp_path, first)
    now = [100.0]
    reloader = CertificateReloader(
        str(tmp_path),
        None,
        Material(first.cert, first.key, None),
        interval=1.0,
        clock=lambda: now[0],
    )
    put_pair(tmp_path, second)
    assert reloader() is None  # within the interval: not even looked at
    now[0] += 1.0
    assert reloader() == Material(second.cert, second.key, None)
    assert reloader.current == Material(second.cert, second.key, None)
    now[0] += 0.5
    assert reloader() is None
    now[0] += 1.0
    assert reloader() is None  # unchanged content: nothing new to serve


def test_reloader_retries_a_pair_read_mid_swap(tmp_path: Path, ca: Authority) -> None:
    """A tls.crt from one Secret version and tls.key from the next is a race, not an error."""
    first, second = ca.issue("bbr-1"), ca.issue("bbr-2")
    put_pair(tmp_path, first)
    reloader = CertificateReloader(
        str(tmp_path), None, Material(first.cert, first.key, None), interval=0
    )
    write_atomic(tmp_path / "tls.crt", second.cert)
    original = reloader._read
    reads: list[int] = []

    def read_then_finish_swap() -> Material:
        reads.append(1)
        material = original()
        write_atomic(tmp_path / "tls.key", second.key)
        return material

    reloader._read = read_then_finish_swap  # type: ignore[method-assign]
    assert reloader() == Material(second.cert, second.key, None)
    assert len(reads) == 2 and reloader.current.private_key == second.key


# --- errors at start -------------------------------------------------------------------


def _encrypted_key(pair: Pair) -> bytes:
    key = serialization.load_pem_private_key(pair.key, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


@pytest.mark.parametrize(
    ("case", "flag", "named", "reason"),
    [
        ("missing dir", "--cert-path", "nowhere", "no such directory"),
        ("file as dir", "--cert-path", "file", "not a directory"),
        ("no key", "--cert-path", "certs/tls.key", "cannot read private key"),
        ("garbage cert", "--cert-path", "certs/tls.crt", "no valid PEM certificate"),
        ("garbage key", "--cert-path", "certs/tls.key", "no valid PEM private key"),
        ("encrypted key", "--cert-path", "certs/tls.key", "encrypted private keys"),
        ("mismatch", "--cert-path", "certs", "does not match"),
        ("missing ca", "--client-ca", "ca.crt", "cannot read client CA"),
        ("garbage ca", "--client-ca", "ca.crt", "no valid PEM certificate"),
    ],
)
def test_unusable_files_at_start(
    tmp_path: Path, ca: Authority, case: str, flag: str, named: str, reason: str
) -> None:
    pair, other = ca.issue("bbr"), ca.issue("other")
    certs = tmp_path / "certs"
    put_pair(certs, pair)
    (tmp_path / "file").write_text("x")
    ca_file = tmp_path / "ca.crt"
    ca_file.write_bytes(ca.pem)
    cert_path, client_ca = str(certs), str(ca_file)
    if case == "missing dir":
        cert_path = str(tmp_path / "nowhere")
    elif case == "file as dir":
        cert_path = str(tmp_path / "file")
    elif case == "no key":
        (certs / "tls.key").unlink()
    elif case == "garbage cert":
        (certs / "tls.crt").write_text("-----BEGIN CERTIFICATE-----\nnope\n")
    elif case == "garbage key":
        (certs / "tls.key").write_text("not a key")
    elif case == "encrypted key":
        (certs / "tls.key").write_bytes(_encrypted_key(pair))
    elif case == "mismatch":
        (certs / "tls.key").write_bytes(other.key)
    elif case == "missing ca":
        ca_file.unlink()
    elif case == "garbage ca":
        ca_file.write_text("")

    with pytest.raises(TLSError) as caught:
        server_tls(cert_path, client_ca)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{flag} {tmp_path / named}: ")
    assert reason in message
    assert caught.value.flag == flag and caught.value.path == str(tmp_path / named)
