"""TLS credentials: self-signed loopback certificates and the SSL contexts built from them.

The embedded default server and ``pydisco serve --self-signed`` need a certificate without a CA;
one is made here with ``cryptography`` (already required by aioquic). Server contexts keep the
PEM material they were built from (:func:`credentials_of`), because QUIC (aioquic) cannot take an
``ssl.SSLContext`` and needs the certificate and key themselves.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import os
import pathlib
import ssl
import tempfile
import weakref
from collections.abc import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .._errors import ConfigurationError

LOOPBACK_NAMES: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
ALPN = "pydisco/1"


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A certificate chain and its private key, PEM-encoded."""

    cert_pem: bytes
    key_pem: bytes = dataclasses.field(repr=False)

    @classmethod
    def from_files(cls, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> Credentials:
        try:
            return cls(pathlib.Path(cert_file).read_bytes(), pathlib.Path(key_file).read_bytes())
        except OSError as e:
            raise ConfigurationError(f"cannot read TLS certificate or key: {e}") from e

    def write(self, directory: str | os.PathLike[str]) -> tuple[pathlib.Path, pathlib.Path]:
        """Write ``cert.pem`` and ``key.pem`` (owner-only) into ``directory``; returns both paths."""
        folder = pathlib.Path(directory)
        cert, key = folder / "cert.pem", folder / "key.pem"
        cert.write_bytes(self.cert_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key_pem)
        return cert, key


def self_signed(
    names: Sequence[str] = LOOPBACK_NAMES, *, valid_for: datetime.timedelta = datetime.timedelta(days=30)
) -> Credentials:
    """A fresh P-256 key and a self-signed certificate for ``names`` (host names or IPs)."""
    if not names:
        raise ConfigurationError("a certificate needs at least one name")
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"pydisco self-signed {names[0]}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate a little clock skew
        .not_valid_after(now + valid_for)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Credentials(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )


def server_ssl_context(credentials: Credentials) -> ssl.SSLContext:
    """A TLS server context presenting ``credentials`` (TLS 1.2+); see :func:`credentials_of`."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # load_cert_chain only reads files: write them to a private temporary folder, then delete.
    with tempfile.TemporaryDirectory(prefix="pydisco-tls-") as folder:
        cert, key = credentials.write(folder)
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as e:
            raise ConfigurationError(f"the TLS certificate and key do not load: {e}") from e
    _CREDENTIALS[context] = credentials
    return context


def client_ssl_context(trust: Credentials | None = None, *, cafile: str | None = None) -> ssl.SSLContext:
    """A verifying TLS client context: system CAs, or only ``trust``'s certificate / ``cafile``."""
    if trust is not None:
        return ssl.create_default_context(cadata=trust.cert_pem.decode("ascii"))
    return ssl.create_default_context(cafile=cafile)


def credentials_of(context: ssl.SSLContext) -> Credentials | None:
    """The PEM credentials a context from :func:`server_ssl_context` was built from, else None."""
    return _CREDENTIALS.get(context)


_CREDENTIALS: weakref.WeakKeyDictionary[ssl.SSLContext, Credentials] = weakref.WeakKeyDictionary()
