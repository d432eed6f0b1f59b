"""The relay's TLS material: a private CA and a server certificate made on first start.

The CA is ECDSA P-256 (what every gRPC/BoringSSL build speaks); its certificate is written
to ``D/ca.pem`` for operators and daemons to pin. The server certificate's SANs are the
listen host, ``localhost``, ``127.0.0.1`` and ``::1``. Keys are written 0600, atomically.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from aegis_edge_relay.files import atomic_write

__all__ = ["TlsMaterial", "ensure_tls", "load_tls"]

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"


@attrs.frozen(kw_only=True)
class TlsMaterial:
    cert_chain: bytes
    private_key: bytes = attrs.field(repr=False)
    ca_cert: bytes
    ca_path: Path | None

    @property
    def ca_der(self) -> bytes:
        return x509.load_pem_x509_certificate(self.ca_cert).public_bytes(serialization.Encoding.DER)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san_for(host: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for h in (host, "localhost", "127.0.0.1", "::1"):
        if not h or h in seen or h in ("0.0.0.0", "::"):  # noqa: S104 - names, not binds
            continue
        seen.add(h)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return names


def _make_ca(now: datetime.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aegis-edge relay CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_server(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    host: str,
    now: datetime.datetime,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "aegis-edge relay")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(_san_for(host)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _server_covers(cert_pem: bytes, host: str) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    wanted = {str(n.value) for n in _san_for(host)}
    have = {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
        str(v) for v in san.get_values_for_type(x509.IPAddress)
    }
    not_after = cert.not_valid_after_utc
    fresh = not_after > datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=7)
    return wanted <= have and fresh


def ensure_tls(data_dir: Path, listen_host: str) -> TlsMaterial:
    """Load the CA and server certificate in ``data_dir``, making what is missing.

    A server certificate that does not cover ``listen_host`` (or is about to expire) is
    re-issued from the same CA, so daemons that pinned ``ca.pem`` keep trusting the relay.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_cert_path = data_dir / CA_CERT
    ca_key_path = data_dir / CA_KEY
    if ca_cert_path.exists() and ca_key_path.exists():
        ca_key_loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
        if not isinstance(ca_key_loaded, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key_path}: not an EC private key; move it away to regenerate")
        ca_key = ca_key_loaded
        ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    else:
        ca_key, ca_cert = _make_ca(now)
        atomic_write(ca_key_path, _key_pem(ca_key), mode=0o600)
        atomic_write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    server_cert_path = data_dir / SERVER_CERT
    server_key_path = data_dir / SERVER_KEY
    if not (
        server_cert_path.exists()
        and server_key_path.exists()
        and _server_covers(server_cert_path.read_bytes(), listen_host)
    ):
        key, cert = _make_server(ca_key, ca_cert, listen_host, now)
        atomic_write(server_key_path, _key_pem(key), mode=0o600)
        atomic_write(server_cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
    ca_pem = ca_cert_path.read_bytes()
    # Serve the full chain: `aegis edge enroll` finds the CA it pins (the token's `cap`)
    # among the certificates the relay presents, before it trusts anything.
    return TlsMaterial(
        cert_chain=server_cert_path.read_bytes() + ca_pem,
        private_key=server_key_path.read_bytes(),
        ca_cert=ca_pem,
        ca_path=ca_cert_path,
    )


def load_tls(cert_path: Path, key_path: Path, data_dir: Path) -> TlsMaterial:
    """An operator's own certificate and key (``--tls-cert/--tls-key``).

    ``ca.pem`` in ``data_dir`` is then the last certificate of the chain (the operator's
    issuer if they gave a chain, else the certificate itself), for pinning.
    """
    chain = cert_path.read_bytes()
    key = key_path.read_bytes()
    certs = x509.load_pem_x509_certificates(chain)
    if not certs:
        raise ValueError(f"{cert_path}: no PEM certificate in it")
    serialization.load_pem_private_key(key, None)  # fail early, with a clear error
    ca_pem = certs[-1].public_bytes(serialization.Encoding.PEM)
    ca_path = data_dir / CA_CERT
    if not ca_path.exists() or ca_path.read_bytes() != ca_pem:
        atomic_write(ca_path, ca_pem, mode=0o644)
    return TlsMaterial(cert_chain=chain, private_key=key, ca_cert=ca_pem, ca_path=ca_path)
