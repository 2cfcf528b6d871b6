"""TLS for the ext_proc port: a mounted certificate (hot-reloaded) or a self-signed one.

Same conventions as the Go BBR of the Gateway API Inference Extension: `--cert-path` is a
directory holding `tls.crt` and `tls.key` (a Kubernetes TLS Secret mount); without it a
self-signed certificate is made at start. `--client-ca` turns on mutual TLS.

Reloading happens at handshakes: the listening `ssl.SSLContext` asks the reloader at each
one (the reloader looks at the files at most once a second) and, when the files' bytes
changed and the new pair is valid, hands the connection a context built from them; a
half-written Secret never replaces a working certificate. Open connections keep theirs.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bbr.logs import fields

log = logging.getLogger("bbr.tls")

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
RELOAD_INTERVAL = 1.0
"""Seconds between looks at the files; every handshake asks, the disk needs less."""

SELF_SIGNED_DAYS = 365
SELF_SIGNED_HOSTS = ("localhost", "127.0.0.1", "::1")

_READ_ATTEMPTS = 3


class TLSError(Exception):
    """A certificate, key or CA file that cannot be used; the message is one line."""

    def __init__(self, flag: str, path: str, reason: str) -> None:
        super().__init__(f"{flag} {path}: {reason}")
        self.flag = flag
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class Material:
    """What is served: certificate chain, its private key and the client CA bundle (PEM)."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None

    def context(self) -> ssl.SSLContext:
        """A server context for HTTP/2 (ALPN h2, TLS 1.2+), mutual when a CA is given."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["h2"])
        with in_memory(self.certificate_chain) as chain, in_memory(self.private_key) as key:
            context.load_cert_chain(chain, key)
        if self.client_ca is not None:
            context.load_verify_locations(cadata=self.client_ca.decode("ascii", "replace"))
            context.verify_mode = ssl.CERT_REQUIRED
        return context


@contextmanager
def in_memory(data: bytes) -> Iterator[str]:
    """A path to `data` for OpenSSL, which loads certificates and keys from files only.

    A memfd where there is one (the key never touches a disk), else a private temp file.
    """
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("bbr-tls", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="bbr-tls-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        yield path
    finally:
        os.unlink(path)


@dataclass(frozen=True)
class ServerTLS:
    """The listening context for the ext_proc port, plus the certificate served at start.

    `certificate_pem` lets a client (or a test) trust a self-signed certificate.
    """

    context: ssl.SSLContext
    certificate_pem: bytes
    mutual: bool
    reloader: CertificateReloader


def server_tls(
    cert_path: str | None,
    client_ca: str | None,
    *,
    reload_interval: float = RELOAD_INTERVAL,
) -> ServerTLS:
    """Load (or make) the server certificate and build a hot-reloading server context.

    Raises `TLSError` when a file is missing, unreadable or invalid, so that a bad
    Secret fails the start instead of every handshake.
    """
    if cert_path is None:
        chain, key = self_signed_certificate()
        material = Material(chain, key, None)
    else:
        material = _load_directory(cert_path)
    if client_ca is not None:
        material = Material(
            material.certificate_chain,
            material.private_key,
            _check_ca(_read(client_ca, "--client-ca", "client CA"), client_ca),
        )
    reloader = CertificateReloader(cert_path, client_ca, material, interval=reload_interval)
    try:
        listening = material.context()
    except ssl.SSLError as exc:
        raise TLSError(
            "--cert-path" if cert_path else "--client-ca",
            cert_path or client_ca or "",
            f"rejected by OpenSSL: {exc.reason or exc}",
        ) from None
    current = [listening]  # serves handshakes until the files change

    def handshake(connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        fresh = reloader()
        if fresh is not None:
            try:
                current[0] = fresh.context()
            except ssl.SSLError as exc:  # validated, yet OpenSSL refuses it: keep the old
                log.error(
                    "tls files rejected; previous certificate kept", extra=fields(error=str(exc))
                )
        if current[0] is not listening:
            connection.context = current[0]

    listening.sni_callback = handshake
    _describe("tls certificate loaded", material, cert_path)
    return ServerTLS(listening, material.certificate_chain, client_ca is not None, reloader)


class CertificateReloader:
    """Asked at every handshake: the new material when the files changed, else None.

    Files are compared by content, not mtime, so the kubelet's `..data` symlink swap and
    in-place rewrites are both seen. A pair that does not parse or does not match keeps
    the previous one in force; the error is logged once per distinct bad content.
    """

    def __init__(
        self,
        cert_path: str | None,
        client_ca: str | None,
        initial: Material,
        *,
        interval: float = RELOAD_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cert_path = cert_path
        self._client_ca = client_ca
        self._current = initial
        self._interval = interval
        self._clock = clock
        self._next_check = clock() + interval
        self._rejected: Material | None = None
        self._last_error: str | None = None
        self._lock = threading.Lock()

    @property
    def current(self) -> Material:
        return self._current

    def __call__(self) -> Material | None:
        """Called at each handshake; never raises (a handshake is no place for it)."""
        if self._cert_path is None and self._client_ca is None:
            return None
        with self._lock:
            now = self._clock()
            if now < self._next_check:
                return None
            self._next_check = now + self._interval
            try:
                return self._check()
            except Exception:
                log.exception("tls reload failed; previous certificate kept")
                return None

    def _check(self) -> Material | None:
        try:
            material = self._load()
        except TLSError as exc:
            self._report(str(exc))
            return None
        if material is None:
            return None
        self._rejected = None
        self._last_error = None
        if material == self._current:
            return None
        self._current = material
        _describe("tls certificate reloaded", material, self._cert_path)
        return material

    def _load(self) -> Material | None:
        """The files' content if usable, None if already rejected; raises `TLSError`.

        Re-reads when the content changed between reads: a reader racing the Secret's
        symlink swap may see the old tls.crt with the new tls.key, which is no error.
        """
        previous: Material | None = None
        error: TLSError | None = None
        for _ in range(_READ_ATTEMPTS):
            material = self._read()
            if material == self._current:
                return material
            if material == self._rejected:
                return None
            if material == previous:
                break
            try:
                return self._validate(material)
            except TLSError as exc:
                previous, error = material, exc
        assert previous is not None and error is not None
        self._rejected = previous
        raise error

    def _read(self) -> Material:
        if self._cert_path is None:
            chain, key = self._current.certificate_chain, self._current.private_key
        else:
            chain = _read(os.path.join(self._cert_path, CERT_FILE), "--cert-path", "certificate")
            key = _read(os.path.join(self._cert_path, KEY_FILE), "--cert-path", "private key")
        ca = None if self._client_ca is None else _read(self._client_ca, "--client-ca", "client CA")
        return Material(chain, key, ca)

    def _validate(self, material: Material) -> Material:
        if self._cert_path is not None:
            _check_pair(material.certificate_chain, material.private_key, self._cert_path)
        if self._client_ca is not None and material.client_ca is not None:
            _check_ca(material.client_ca, self._client_ca)
        return material

    def _report(self, reason: str) -> None:
        """Log each distinct failure once, not at every handshake."""
        if reason != self._last_error:
            self._last_error = reason
            log.error("tls files rejected; previous certificate kept", extra=fields(error=reason))


def self_signed_certificate(
    hosts: tuple[str, ...] = SELF_SIGNED_HOSTS,
    *,
    days: int = SELF_SIGNED_DAYS,
) -> tuple[bytes, bytes]:
    """A fresh ECDSA P-256 certificate and PKCS#8 key (PEM) for `hosts`, valid `days` days.

    For clusters without cert-manager: Envoy then connects without verifying bbr.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "bbr"),
            x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "bbr"),
        ]
    )
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return (
        certificate.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _load_directory(cert_path: str) -> Material:
    """tls.crt and tls.key at start, validated; any problem is a `TLSError`."""
    if not os.path.isdir(cert_path):
        reason = "not a directory (expected tls.crt and tls.key in it)"
        if not os.path.exists(cert_path):
            reason = "no such directory"
        raise TLSError("--cert-path", cert_path, reason)
    chain = _read(os.path.join(cert_path, CERT_FILE), "--cert-path", "certificate")
    key = _read(os.path.join(cert_path, KEY_FILE), "--cert-path", "private key")
    _check_pair(chain, key, cert_path)
    return Material(chain, key, None)


def _read(path: str, flag: str, what: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise TLSError(flag, path, f"cannot read {what}: {exc.strerror or exc}") from None


def _check_pair(chain: bytes, key: bytes, cert_path: str) -> None:
    """Both parse and the key belongs to the first certificate, as gRPC will need."""
    cert_file = os.path.join(cert_path, CERT_FILE)
    key_file = os.path.join(cert_path, KEY_FILE)
    try:
        certificates = x509.load_pem_x509_certificates(chain)
    except ValueError:
        raise TLSError("--cert-path", cert_file, "no valid PEM certificate") from None
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except TypeError:
        raise TLSError(
            "--cert-path", key_file, "encrypted private keys are not supported"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TLSError("--cert-path", key_file, "no valid PEM private key") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if certificates[0].public_key().public_bytes(
        der, spki
    ) != private_key.public_key().public_bytes(der, spki):
        raise TLSError(
            "--cert-path", cert_path, "tls.key does not match the certificate in tls.crt"
        )


def _check_ca(data: bytes, path: str) -> bytes:
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TLSError("--client-ca", path, "no valid PEM certificate") from None
    return data


def _describe(message: str, material: Material, cert_path: str | None) -> None:
    """Log which certificate is served; warn when it is outside its validity period."""
    leaf = x509.load_pem_x509_certificates(material.certificate_chain)[0]
    now = datetime.datetime.now(datetime.UTC)
    not_after = leaf.not_valid_after_utc
    log.info(
        message,
        extra=fields(
            source=cert_path or "self-signed",
            subject=leaf.subject.rfc4514_string(),
            not_after=not_after.isoformat(),
            sha256=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
            client_auth=material.client_ca is not None,
        ),
    )
    if not (leaf.not_valid_before_utc <= now <= not_after):
        log.warning(
            "tls certificate outside its validity period",
            extra=fields(
                source=cert_path or "self-signed",
                not_before=leaf.not_valid_before_utc.isoformat(),
                not_after=not_after.isoformat(),
            ),
        )
