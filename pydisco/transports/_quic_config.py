"""Settings of the QUIC transport, and their translation (with an ``ssl.SSLContext``'s) into
aioquic's ``QuicConfiguration``.

QUIC always runs TLS 1.3, so the transport takes the same ``ssl_context`` argument as ``wss``
and maps what it can read from it:

==========================  =============================================================
``ssl.SSLContext``          ``QuicConfiguration``
==========================  =============================================================
``verify_mode``             ``verify_mode`` (``CERT_NONE`` turns verification off)
``check_hostname``          ``server_name`` = the URL's host when true, else ``None`` (then
                            aioquic neither checks the name nor sends SNI)
CA certificates loaded      ``cadata`` (PEM). Certificates in a ``capath`` directory are
from files or data          invisible until OpenSSL uses them; when none are visible the
                            platform's default verify paths are used instead
minimum/maximum version,    ignored: QUIC is TLS 1.3 only, and aioquic picks its own
ciphers                     cipher suites
the certificate chain and   **cannot be read back**: an ``SSLContext`` never returns its
private key                 private key. A server gets them from ``QuicSettings``, or from
                            a context made by ``pydisco.cloud.server_ssl_context(credentials)``,
                            which remembers the PEM it was built from
client certificates         not supported (aioquic does not request them); a server context
                            that requires one is refused with ``ConfigurationError``
==========================  =============================================================

``ssl_context=None`` on a client means ``ssl.create_default_context()``: verify the server
against the platform's trust store and check its name, as ``wss`` does.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import ssl
import warnings
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from pydisco._errors import ConfigurationError

ALPN = "pydisco/1"


@dataclasses.dataclass(frozen=True)
class QuicSettings:
    """What the QUIC transport needs beyond the contract's arguments. Defaults suit a real
    network; tests shorten ``idle_timeout``.

    TLS material (PEM bytes) here overrides what the ``ssl_context`` provides.
    """

    idle_timeout: float = 30.0
    """Seconds without a packet from the peer before the connection counts as lost (both ends
    propose one; the smaller wins)."""
    certificate_chain: bytes | None = None
    """Server: PEM certificates, leaf first, then intermediates; may also hold the key."""
    private_key: bytes | None = None
    """Server: PEM private key, when ``certificate_chain`` does not hold it."""
    ca_certificates: bytes | None = None
    """Client: PEM trust anchors, used instead of the context's."""
    verify_peer: bool | None = None
    """Client: verify the server's certificate; None takes it from the context (default on)."""
    server_name: str | None = None
    """Client: the name to verify and send as SNI; None takes the URL's host."""
    alpn: str = ALPN
    max_datagram_size: int = 1200
    """UDP payload bytes; 1200 is the size every QUIC path must carry."""
    ack_delay: float = 0.01
    """Seconds a receiver waits before acknowledging an ack-eliciting packet (below the 25 ms
    maximum that aioquic announces). aioquic's own 1 ms means an acknowledgement datagram for
    nearly every token datagram at a few hundred tokens/s per connection, each costing both
    ends a packet's work; 10 ms caps them at 100/s per connection. Data itself is not delayed:
    only the sender's view of what arrived is (loss recovery allows for the announced 25 ms)."""
    frame_queue: int = 64
    """Received frames held per connection before the transport stops reading from the peer."""
    send_buffer: int = 1 << 20
    """Unacknowledged bytes per connection before ``send_frame`` waits."""

    def __post_init__(self) -> None:
        if not self.idle_timeout > 0:
            raise ConfigurationError(f"idle_timeout must be > 0, got {self.idle_timeout!r}")
        if not 0 <= self.ack_delay < 0.025:
            raise ConfigurationError(f"ack_delay must be in [0, 0.025) s, got {self.ack_delay!r}")
        if self.frame_queue < 1 or self.send_buffer < 1:
            raise ConfigurationError("frame_queue and send_buffer must be >= 1")


@dataclasses.dataclass(frozen=True)
class _Credentials:
    certificate: Any
    chain: list[Any]
    private_key: Any


_KEY_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]*PRIVATE KEY)-----.+?-----END \1-----", re.DOTALL)


def _parse_credentials(chain_pem: bytes, key_pem: bytes | None) -> _Credentials:
    key_match = _KEY_BLOCK.search(key_pem if key_pem is not None else chain_pem)
    if key_match is None:
        raise ConfigurationError("no PEM private key found for the QUIC server's certificate")
    try:
        certificates = x509.load_pem_x509_certificates(chain_pem)  # skips the key block
    except ValueError as exc:
        raise ConfigurationError(f"no PEM certificate for the QUIC server: {exc}") from exc
    return _Credentials(
        certificate=certificates[0],
        chain=certificates[1:],
        private_key=serialization.load_pem_private_key(key_match.group(0), None),
    )


def _base(settings: QuicSettings, *, is_client: bool) -> QuicConfiguration:
    return QuicConfiguration(
        is_client=is_client,
        alpn_protocols=[settings.alpn],
        idle_timeout=settings.idle_timeout,
        max_datagram_size=settings.max_datagram_size,
    )


def server_configuration(
    settings: QuicSettings, ssl_context: ssl.SSLContext | None
) -> QuicConfiguration:
    """The server's configuration; ``ConfigurationError`` when it has no certificate."""
    if ssl_context is not None and ssl_context.verify_mode != ssl.CERT_NONE:
        raise ConfigurationError(
            "the QUIC transport cannot request client certificates; "
            "use a server context with verify_mode = CERT_NONE"
        )
    if settings.certificate_chain is not None:
        creds = _parse_credentials(settings.certificate_chain, settings.private_key)
    else:
        from pydisco.cloud._tls import credentials_of  # only servers need it

        pem = credentials_of(ssl_context) if ssl_context is not None else None
        if pem is None:
            raise ConfigurationError(
                "the QUIC server needs its certificate and private key, and an ssl.SSLContext "
                "cannot hand its key back: build the context with "
                "pydisco.cloud.server_ssl_context(credentials), or pass "
                "settings=QuicSettings(certificate_chain=..., private_key=...)"
            )
        creds = _parse_credentials(pem.cert_pem, pem.key_pem)
    config = _base(settings, is_client=False)
    config.certificate = creds.certificate
    config.certificate_chain = creds.chain
    config.private_key = creds.private_key
    return config


@functools.lru_cache(maxsize=8)
def _pem_bundle(der_certs: tuple[bytes, ...]) -> bytes:
    """The certificates as one PEM bundle for aioquic, leaving out those ``cryptography``
    refuses or warns about (some system bundles hold CAs with non-positive serial numbers):
    aioquic parses the whole bundle on every handshake, so one such certificate would
    fail every verification once ``cryptography`` turns the warning into an error."""
    pems = []
    for der in der_certs:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                x509.load_der_x509_certificate(der)
            except (ValueError, Warning):
                continue
        pems.append(ssl.DER_cert_to_PEM_cert(der))
    return "".join(pems).encode("ascii")


def client_configuration(
    settings: QuicSettings, ssl_context: ssl.SSLContext | None, host: str
) -> QuicConfiguration:
    """The client's configuration for a server reached as ``host``."""
    ctx = ssl_context if ssl_context is not None else ssl.create_default_context()
    config = _base(settings, is_client=True)
    verify = settings.verify_peer
    if verify is None:
        verify = ctx.verify_mode != ssl.CERT_NONE
    config.verify_mode = ssl.CERT_REQUIRED if verify else ssl.CERT_NONE
    if settings.server_name is not None:
        config.server_name = settings.server_name
    elif ctx.check_hostname:
        config.server_name = host
    if settings.ca_certificates is not None:
        config.cadata = settings.ca_certificates
    else:
        der_certs = ctx.get_ca_certs(binary_form=True)
        if der_certs:
            config.cadata = _pem_bundle(tuple(der_certs))
        else:
            paths = ssl.get_default_verify_paths()
            config.cafile, config.capath = paths.cafile, paths.capath
    return config
