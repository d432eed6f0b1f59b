"""Finding the relay's CA by its pin, and gRPC channel credentials from it.

An enrollment token carries the relay endpoint and ``cap``, the sha256 of the relay CA
certificate (DER). gRPC Python cannot pin a hash, so at enrollment the host makes one TLS
handshake with verification off, reads the chain the server presents, and keeps the
certificate whose hash is the pin -- that is then the only root the host trusts for this
relay (``ca.pem``), and every later connection verifies the server normally against it.
"""

from __future__ import annotations

import hashlib
import socket
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from aegis_edge_core.errors import AegisError

__all__ = ["PinError", "fetch_pinned_ca", "split_endpoint", "verify_pin"]


class PinError(AegisError):
    """The relay's certificate chain does not contain the pinned CA."""


def split_endpoint(endpoint: str) -> tuple[str, int]:
    text = endpoint.strip()
    for prefix in ("grpcs://", "https://", "dns:///"):
        text = text.removeprefix(prefix)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    else:
        host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise AegisError(
            f"relay endpoint {endpoint!r} is not host:port",
            hint="the enrollment token is damaged; issue a fresh one",
        )
    return host, int(port)


def verify_pin(ca_pem: bytes, pin: str) -> bool:
    """True if some certificate in ``ca_pem`` has DER sha256 ``pin``."""
    for cert in x509.load_pem_x509_certificates(ca_pem):
        if hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest() == pin:
            return True
    return False


def fetch_pinned_ca(endpoint: str, pin: str, *, timeout: float = 10.0) -> bytes:
    """The PEM of the certificate in the relay's presented chain whose sha256 is ``pin``."""
    host, port = split_endpoint(endpoint)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            sslobj = tls._sslobj  # type: ignore[attr-defined]
            chain = sslobj.get_unverified_chain() or []
            ders = [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain]  # type: ignore[attr-defined]
            if not ders:
                leaf = tls.getpeercert(binary_form=True)
                ders = [leaf] if leaf else []
    except OSError as err:
        raise AegisError(
            f"cannot reach the relay at {endpoint}: {err.strerror or err}",
            hint="check the network path to the relay (firewall, DNS) and retry",
        ) from None
    for der in ders:
        if hashlib.sha256(der).hexdigest() == pin:
            cert = x509.load_der_x509_certificate(der)
            return cert.public_bytes(serialization.Encoding.PEM)
    raise PinError(
        f"the relay at {endpoint} did not present the pinned CA certificate "
        f"(sha256 {pin[:16]}...; {len(ders)} certificate(s) presented)",
        hint="the relay must serve its full chain, or pass the relay's CA with --ca-cert; "
        "if the relay was not re-keyed, someone may be intercepting the connection",
    )
