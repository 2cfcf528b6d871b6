"""TLS between a real Envoy and bbr: given certificate, self-signed, mutual TLS, reloads.

A throwaway CA issues bbr's server certificate (``localhost``/127.0.0.1) and Envoy's client
certificate; bbr reads them from a ``--cert-path`` directory laid out as the kubelet mounts a
TLS Secret (``tls.crt -> ..data/tls.crt``), so a rotation is the kubelet's atomic symlink
swap. Envoy's ext_proc filter keeps ``failure_mode_allow: false``: when Envoy cannot reach
bbr, the client gets Envoy's 500 and no model server sees the request.
"""

from __future__ import annotations

import shutil
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from harness.envoy_config import BbrTLS
from harness.stack import DEEPSEEK, LLAMA, MODEL_MAP, ModelServers, Reply
from tests.pki import Authority, SecretVolume

from .live import Live, assert_routes, poll, served_by

pytestmark = pytest.mark.e2e

KNOWN = {LLAMA: LLAMA, "food-review-1": LLAMA, DEEPSEEK: DEEPSEEK, "ski-resorts": DEEPSEEK}
SERVER_NAME = "localhost"


# --- certificates --------------------------------------------------------------------------


@dataclass
class PKI:
    ca: Authority
    other_ca: Authority
    files: Path

    def write(self, name: str, data: bytes) -> str:
        path = self.files / name
        path.write_bytes(data)
        return str(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    files = tmp_path_factory.mktemp("pki")
    pki = PKI(Authority("bbr test CA"), Authority("some other CA"), files)
    pki.write("ca.crt", pki.ca.pem)
    pki.write("other-ca.crt", pki.other_ca.pem)
    client = pki.ca.issue("envoy", client=True)
    pki.write("envoy.crt", client.cert)
    pki.write("envoy.key", client.key)
    stranger = pki.other_ca.issue("envoy", client=True)
    pki.write("stranger.crt", stranger.cert)
    pki.write("stranger.key", stranger.key)
    return pki


def envoy_tls(pki: PKI, *, client: str | None = "envoy", ca: str | None = "ca") -> BbrTLS:
    """What Envoy trusts (``ca``) and which client certificate it shows (``client``)."""
    return BbrTLS(
        ca_file=str(pki.files / f"{ca}.crt") if ca else None,
        cert_file=str(pki.files / f"{client}.crt") if client else None,
        key_file=str(pki.files / f"{client}.key") if client else None,
        sni=SERVER_NAME,
    )


def tls_stack(
    workdir: Path,
    model_servers: ModelServers,
    bbr_flags: list[str],
    bbr_tls: BbrTLS | None,
) -> Live:
    workdir.mkdir(parents=True, exist_ok=True)
    model_map = workdir / "model-map.yaml"
    shutil.copyfile(MODEL_MAP, model_map)
    live = Live(workdir, model_servers, model_map, bbr_flags=bbr_flags, bbr_tls=bbr_tls)
    return live.start()


@pytest.fixture
def stacks() -> Iterator[list[Live]]:
    """Every stack a test starts is closed at its end."""
    started: list[Live] = []
    yield started
    for live in started:
        live.close()


def refused(reply: Reply) -> None:
    """Envoy could not get an answer from bbr: its own 500, no model server involved."""
    assert reply.status == 500, str(reply)
    assert served_by(reply) is None, str(reply)
    assert b"x_bbr_demo" not in reply.body, str(reply)


def served_certificate(port: int, pki: PKI, *, client: bool) -> bytes:
    """The DER certificate bbr shows a new TLS connection (verified against the CA)."""
    context = ssl.create_default_context(cafile=str(pki.files / "ca.crt"))
    context.set_alpn_protocols(["h2"])
    if client:
        context.load_cert_chain(str(pki.files / "envoy.crt"), str(pki.files / "envoy.key"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
        context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def anonymous_client_refused(port: int, pki: PKI) -> bool:
    """True when bbr ends a TLS connection that shows no client certificate.

    With TLS 1.3 the client's handshake completes before the server has checked the
    client's certificate; the server's refusal then arrives as an alert on the first read
    (instead of the HTTP/2 SETTINGS frame a gRPC server sends first).
    """
    context = ssl.create_default_context(cafile=str(pki.files / "ca.crt"))
    context.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
            context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
        ):
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            return tls.recv(1) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def ssl_failures(live: Live) -> int:
    """Envoy's TLS failures towards the bbr cluster (handshake errors, failed verification)."""
    assert live.envoy is not None
    return sum(
        value
        for name, value in live.envoy.stats().items()
        if name.startswith("cluster.bbr.ssl.") and ("error" in name or "fail" in name)
    )


# --- tests ----------------------------------------------------------------------------------


def test_given_certificate(
    tmp_path: Path, pki: PKI, model_servers: ModelServers, stacks: list[Live]
) -> None:
    """``--secure-serving --cert-path``: Envoy verifies bbr against the CA and routes."""
    server = pki.ca.issue("bbr")
    SecretVolume(tmp_path / "certs", server)
    flags = ["--secure-serving", "--cert-path", str(tmp_path / "certs")]
    live = tls_stack(tmp_path / "stack", model_servers, flags, envoy_tls(pki, client=None))
    stacks.append(live)
    assert_routes(live, model_servers, KNOWN)
    assert served_certificate(live.grpc_port, pki, client=False) == server.der


def test_self_signed_certificate(
    tmp_path: Path, pki: PKI, model_servers: ModelServers, stacks: list[Live]
) -> None:
    """``--secure-serving`` alone: a self-signed certificate; Envoy encrypts, unverified."""
    bbr_tls = envoy_tls(pki, client=None, ca=None)
    live = tls_stack(tmp_path, model_servers, ["--secure-serving"], bbr_tls)
    stacks.append(live)
    assert_routes(live, model_servers, KNOWN)


def test_envoy_refuses_a_bbr_certificate_it_does_not_trust(
    tmp_path: Path, pki: PKI, model_servers: ModelServers, stacks: list[Live]
) -> None:
    """Envoy trusts another CA: it will not talk to bbr, and nothing is routed."""
    SecretVolume(tmp_path / "certs", pki.ca.issue("bbr"))
    flags = ["--secure-serving", "--cert-path", str(tmp_path / "certs")]
    bbr_tls = envoy_tls(pki, client=None, ca="other-ca")
    live = tls_stack(tmp_path / "stack", model_servers, flags, bbr_tls)
    stacks.append(live)
    for model in KNOWN:
        refused(live.chat(model))
    assert ssl_failures(live) > 0


def test_plaintext_envoy_cannot_reach_a_tls_bbr(
    tmp_path: Path, pki: PKI, model_servers: ModelServers, stacks: list[Live]
) -> None:
    SecretVolume(tmp_path / "certs", pki.ca.issue("bbr"))
    flags = ["--secure-serving", "--cert-path", str(tmp_path / "certs")]
    live = tls_stack(tmp_path / "stack", model_servers, flags, None)
    stacks.append(live)
    for model in KNOWN:
        refused(live.chat(model))


@pytest.fixture
def mtls_flags(tmp_path: Path, pki: PKI) -> tuple[list[str], SecretVolume]:
    mount = SecretVolume(tmp_path / "certs", pki.ca.issue("bbr"))
    flags = [
        "--secure-serving",
        "--cert-path",
        str(tmp_path / "certs"),
        "--client-ca",
        str(pki.files / "ca.crt"),
    ]
    return flags, mount


def test_mutual_tls_routes(
    tmp_path: Path,
    pki: PKI,
    model_servers: ModelServers,
    stacks: list[Live],
    mtls_flags: tuple[list[str], SecretVolume],
) -> None:
    flags, _ = mtls_flags
    live = tls_stack(tmp_path / "stack", model_servers, flags, envoy_tls(pki))
    stacks.append(live)
    assert_routes(live, model_servers, KNOWN)
    # Spoofed routing headers still never survive over TLS.
    reply = live.chat("ski-resorts", {"x-gateway-base-model-name": LLAMA})
    assert served_by(reply) == model_servers.name_of(DEEPSEEK), str(reply)


@pytest.mark.parametrize("client", [None, "stranger"], ids=["no-client-cert", "foreign-ca"])
def test_mutual_tls_without_a_trusted_client_certificate_is_not_routed(
    tmp_path: Path,
    pki: PKI,
    model_servers: ModelServers,
    stacks: list[Live],
    mtls_flags: tuple[list[str], SecretVolume],
    client: str | None,
) -> None:
    """bbr requires a client certificate from its CA: without one the handshake fails, the
    ext_proc stream cannot start, and Envoy (failure_mode_allow false) answers 500."""
    flags, _ = mtls_flags
    live = tls_stack(tmp_path / "stack", model_servers, flags, envoy_tls(pki, client=client))
    stacks.append(live)
    for model in KNOWN:
        refused(live.chat(model))
    assert live.envoy is not None
    assert live.envoy.ext_proc_stat("streams_failed") + ssl_failures(live) > 0
    # A raw client without a certificate is refused by bbr too.
    assert anonymous_client_refused(live.grpc_port, pki)


def test_certificate_rotation_is_picked_up(
    tmp_path: Path,
    pki: PKI,
    model_servers: ModelServers,
    stacks: list[Live],
    mtls_flags: tuple[list[str], SecretVolume],
) -> None:
    """The Secret is rotated (same CA, new key and serial) while bbr and Envoy run.

    New handshakes see the new certificate within a few seconds; the running Envoy keeps
    routing (its connection to bbr predates the swap, so it is not re-verified), and a new
    Envoy, which must handshake afresh, routes too.
    """
    flags, mount = mtls_flags
    live = tls_stack(tmp_path / "stack", model_servers, flags, envoy_tls(pki))
    stacks.append(live)
    first = served_certificate(live.grpc_port, pki, client=True)
    assert_routes(live, model_servers, KNOWN)

    second = pki.ca.issue("bbr")
    assert second.certificate.serial_number != x509.load_der_x509_certificate(first).serial_number
    mount.update(second)
    poll(
        "bbr serves the rotated certificate",
        lambda: served_certificate(live.grpc_port, pki, client=True) == second.der,
    )
    assert_routes(live, model_servers, KNOWN)

    assert live.envoy is not None
    live.envoy.child.stop()
    live.envoy.log_file.close()
    live.start_envoy()
    assert_routes(live, model_servers, KNOWN)
    assert live.bbr is not None and live.bbr.child.exited() is None
