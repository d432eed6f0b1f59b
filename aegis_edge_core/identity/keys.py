"""Ed25519 keys: the node key (a daemon's identity) and the relay's signing key.

A key never comes out of thin air here: the core draws no randomness, so a new key is
made from a 32-byte seed the caller draws (``NodeKey.from_seed(os.urandom(32))``). An
Ed25519 private key *is* its 32-byte seed, so this costs nothing in strength and makes
every test reproducible.

Keys are stored as unencrypted PKCS#8 PEM (what ``openssl genpkey -algorithm ed25519``
writes); the file's protection is its mode (0600 in a 0700 directory), not a passphrase a
daemon could not type at boot. Loading is strict and explains itself: the caller passes
the bytes and the path it read them from (``source``), the core never opens the file,
and the error names the path, what was wrong (not PEM, encrypted, another key type,
corrupt) and what to do. It never quotes the file's contents.

A public key is named by its RFC 7638 JWK thumbprint: SHA-256 over the canonical JWK
``{"crv":"Ed25519","kty":"OKP","x":...}``, base64url without padding. The node token binds
a node key by this thumbprint (``cnf.jkt``) and the relay's signing key is picked by it
(``kid``), so both sides name keys the same way any JOSE library would.
"""

from __future__ import annotations

import json
from typing import Final

import attrs
from cryptography.exceptions import InternalError, InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519, x448, x25519
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from aegis_edge_core.identity._codec import b64url_encode, sha256
from aegis_edge_core.identity.errors import KeyFileError

__all__ = [
    "PUBLIC_KEY_SIZE",
    "SEED_SIZE",
    "SIGNATURE_SIZE",
    "NodeKey",
    "PublicKey",
    "RelaySigningKey",
    "jwk_thumbprint",
    "load_node_key",
    "load_relay_signing_key",
]

SEED_SIZE: Final = 32
PUBLIC_KEY_SIZE: Final = 32
SIGNATURE_SIZE: Final = 64


def jwk_thumbprint(public_key: bytes) -> str:
    """RFC 7638 thumbprint of a raw 32-byte Ed25519 public key (RFC 8037 OKP JWK)."""
    _check_public_bytes(public_key)
    # RFC 7638 §3: required members only, sorted, no whitespace.
    canonical = json.dumps(
        {"crv": "Ed25519", "kty": "OKP", "x": b64url_encode(public_key)},
        separators=(",", ":"),
        sort_keys=True,
    )
    return b64url_encode(sha256(canonical.encode("ascii")))


def _check_public_bytes(raw: bytes) -> None:
    if not isinstance(raw, bytes):
        raise TypeError(f"an Ed25519 public key is bytes, not {type(raw).__name__}")
    if len(raw) != PUBLIC_KEY_SIZE:
        raise ValueError(f"an Ed25519 public key is {PUBLIC_KEY_SIZE} bytes, not {len(raw)}")


def _validate_public(instance: object, attribute: attrs.Attribute[bytes], value: bytes) -> None:
    _check_public_bytes(value)


@attrs.frozen(kw_only=True)
class PublicKey:
    """A raw 32-byte Ed25519 public key, as the wire and the store carry it."""

    raw: bytes = attrs.field(validator=_validate_public)

    @property
    def thumbprint(self) -> str:
        """The RFC 7638 JWK thumbprint: ``cnf.jkt`` for node keys, ``kid`` for the relay."""
        return jwk_thumbprint(self.raw)

    def to_jwk(self) -> dict[str, str]:
        """The public JWK (RFC 8037), e.g. for publishing the relay's verifying keys."""
        return {"kty": "OKP", "crv": "Ed25519", "x": b64url_encode(self.raw)}

    def to_cryptography(self) -> ed25519.Ed25519PublicKey:
        return ed25519.Ed25519PublicKey.from_public_bytes(self.raw)

    def verify(self, signature: bytes, data: bytes) -> bool:
        """True if ``signature`` is this key's Ed25519 signature over ``data``.

        Answers a bool rather than raising, because every caller turns a bad signature into
        its own refusal with its own reason.
        """
        if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
            return False
        try:
            self.to_cryptography().verify(signature, data)
        except (InvalidSignature, ValueError):
            return False
        return True


@attrs.frozen(kw_only=True, eq=False, repr=False)
class _SigningKey:
    # The private key object stays out of repr and equality: a repr ends up in logs.
    _private: ed25519.Ed25519PrivateKey

    @classmethod
    def _from_seed_bytes(cls, seed: bytes) -> ed25519.Ed25519PrivateKey:
        if not isinstance(seed, bytes):
            raise TypeError(f"a key seed is bytes, not {type(seed).__name__}")
        if len(seed) != SEED_SIZE:
            raise ValueError(f"an Ed25519 seed is {SEED_SIZE} bytes, not {len(seed)}")
        return ed25519.Ed25519PrivateKey.from_private_bytes(seed)

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(
            raw=self._private.public_key().public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
        )

    @property
    def thumbprint(self) -> str:
        return self.public_key.thumbprint

    def sign(self, data: bytes) -> bytes:
        """Ed25519 signature over ``data``.

        Pass only transcripts built by this package (domain-separated); a key that signs
        arbitrary caller bytes can be talked into signing another protocol's message.
        """
        return self._private.sign(data)

    def to_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM: the ``node.key`` file format."""
        return self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def to_cryptography(self) -> ed25519.Ed25519PrivateKey:
        return self._private

    def __repr__(self) -> str:
        return f"{type(self).__name__}(thumbprint={self.thumbprint!r})"


@attrs.frozen(kw_only=True, eq=False, repr=False)
class NodeKey(_SigningKey):
    """A daemon's Ed25519 identity key (``node.key``). The key *is* the node's identity."""

    @classmethod
    def from_seed(cls, seed: bytes) -> NodeKey:
        """The key whose 32-byte seed is ``seed``; callers pass ``os.urandom(32)``."""
        return cls(private=cls._from_seed_bytes(seed))


@attrs.frozen(kw_only=True, eq=False, repr=False)
class RelaySigningKey(_SigningKey):
    """The relay's Ed25519 JWT signing key. ``kid`` is its thumbprint, so verifiers holding
    several public keys (during a rollover) pick the right one without trial and error."""

    @classmethod
    def from_seed(cls, seed: bytes) -> RelaySigningKey:
        """The key whose 32-byte seed is ``seed``; callers pass ``os.urandom(32)``."""
        return cls(private=cls._from_seed_bytes(seed))

    @property
    def kid(self) -> str:
        return self.thumbprint


def load_node_key(pem: bytes, *, source: str) -> NodeKey:
    """Load a ``node.key`` from PKCS#8 PEM bytes the caller read from ``source``.

    Raises :class:`KeyFileError` (reason ``not_pem``, ``encrypted``, ``wrong_key_type`` or
    ``corrupt``) naming ``source``.
    """
    return NodeKey(private=_load_ed25519(pem, source=source))


def load_relay_signing_key(pem: bytes, *, source: str) -> RelaySigningKey:
    """Load the relay's signing key; errors as for :func:`load_node_key`."""
    return RelaySigningKey(private=_load_ed25519(pem, source=source))


_KEY_TYPE_NAMES: Final[tuple[tuple[type[object], str], ...]] = (
    (ed448.Ed448PrivateKey, "Ed448"),
    (x25519.X25519PrivateKey, "X25519"),
    (x448.X448PrivateKey, "X448"),
)


def _describe_key_type(key: PrivateKeyTypes) -> str:
    for cls, name in _KEY_TYPE_NAMES:
        if isinstance(key, cls):
            return name
    # RSAPrivateKey -> RSA, EllipticCurvePrivateKey -> EC, DSAPrivateKey -> DSA.
    name = type(key).__name__.removeprefix("_")
    for suffix in ("PrivateKey", "EllipticCurve"):
        name = name.replace(suffix, "")
    return name or "unknown"


def _load_ed25519(pem: bytes, *, source: str) -> ed25519.Ed25519PrivateKey:
    if not isinstance(pem, bytes):
        raise TypeError(f"pass the key file's bytes, not {type(pem).__name__}")
    if not pem.strip():
        raise KeyFileError("the key file is empty", reason="not_pem", source=source)
    if b"-----BEGIN " not in pem:
        raise KeyFileError("not a PEM file", reason="not_pem", source=source)
    # Look at the armour first: it tells an encrypted or public key apart from a corrupt
    # one far more clearly than the parser's exceptions do.
    if b"ENCRYPTED" in pem.split(b"-----END", 1)[0]:
        raise KeyFileError("the private key is encrypted", reason="encrypted", source=source)
    if b"-----BEGIN OPENSSH PRIVATE KEY-----" in pem:
        raise KeyFileError(
            "an OpenSSH private key, not a PKCS#8 PEM key", reason="wrong_key_type", source=source
        )
    if b"-----BEGIN PRIVATE KEY-----" not in pem and (
        b"-----BEGIN PUBLIC KEY-----" in pem or b"-----BEGIN CERTIFICATE-----" in pem
    ):
        raise KeyFileError(
            "holds a public key or certificate, not a private key",
            reason="wrong_key_type",
            source=source,
        )
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:
        # cryptography's way of saying "this one needs a password".
        raise KeyFileError(
            "the private key is encrypted", reason="encrypted", source=source
        ) from None
    except UnsupportedAlgorithm:
        raise KeyFileError(
            "a private key of an unsupported type, not Ed25519",
            reason="wrong_key_type",
            source=source,
        ) from None
    except (ValueError, InternalError):
        # Some damaged DER makes OpenSSL fail inside the parser (InternalError) instead of
        # reporting a ValueError; to the host owner both are a corrupt file.
        # `from None`: the parser's message may quote bytes of the key.
        raise KeyFileError(
            "the PEM data is corrupt or not a private key", reason="corrupt", source=source
        ) from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise KeyFileError(
            f"a {_describe_key_type(key)} private key, not Ed25519",
            reason="wrong_key_type",
            source=source,
        )
    return key
