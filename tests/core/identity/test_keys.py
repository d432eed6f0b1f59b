"""Node and relay keys: seeds, PKCS#8 PEM, thumbprints, and loading with clear errors."""

from __future__ import annotations

import base64
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, x25519
from joserfc.jwk import OKPKey

from aegis_edge_core.errors import AegisError
from aegis_edge_core.identity import (
    IdentityError,
    KeyFileError,
    NodeKey,
    PublicKey,
    RelaySigningKey,
    jwk_thumbprint,
    load_node_key,
    load_relay_signing_key,
)

from .helpers import node_key

SOURCE = "/var/lib/aegis/edge/node.key"


def _pkcs8(
    key: object, encryption: serialization.KeySerializationEncryption | None = None
) -> bytes:
    return key.private_bytes(  # type: ignore[attr-defined, no-any-return]
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        encryption or serialization.NoEncryption(),
    )


def _load_error(pem: bytes) -> KeyFileError:
    with pytest.raises(KeyFileError) as info:
        load_node_key(pem, source=SOURCE)
    err = info.value
    assert isinstance(err, IdentityError) and isinstance(err, AegisError)
    assert err.source == SOURCE
    assert SOURCE in str(err)
    assert err.hint
    return err


class TestSeedsAndPem:
    def test_same_seed_same_key(self) -> None:
        assert (
            NodeKey.from_seed(b"\x01" * 32).public_key == NodeKey.from_seed(b"\x01" * 32).public_key
        )
        assert (
            NodeKey.from_seed(b"\x01" * 32).public_key != NodeKey.from_seed(b"\x02" * 32).public_key
        )

    @pytest.mark.parametrize("seed", [b"", b"\x00" * 31, b"\x00" * 33])
    def test_seed_must_be_32_bytes(self, seed: bytes) -> None:
        with pytest.raises(ValueError, match="32 bytes"):
            NodeKey.from_seed(seed)

    def test_seed_must_be_bytes(self) -> None:
        with pytest.raises(TypeError):
            NodeKey.from_seed("x" * 32)  # type: ignore[arg-type]

    def test_pem_round_trip(self) -> None:
        key = node_key()
        pem = key.to_pem()
        assert pem.startswith(b"-----BEGIN PRIVATE KEY-----\n")
        loaded = load_node_key(pem, source=SOURCE)
        assert loaded.public_key == key.public_key
        assert loaded.sign(b"m") == key.sign(b"m")  # Ed25519 is deterministic

    def test_relay_key_round_trip_and_kid(self) -> None:
        key = RelaySigningKey.from_seed(b"\x05" * 32)
        loaded = load_relay_signing_key(key.to_pem(), source="relay.key")
        assert loaded.kid == key.kid == key.public_key.thumbprint

    def test_repr_shows_no_key_material(self) -> None:
        key = node_key()
        text = repr(key)
        assert key.thumbprint in text
        assert "PRIVATE" not in text and "private" not in text.lower().replace("thumbprint", "")


class TestThumbprint:
    def test_rfc8037_appendix_a3_vector(self) -> None:
        x = base64.urlsafe_b64decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo=")
        assert jwk_thumbprint(x) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"

    def test_matches_joserfc(self) -> None:
        key = node_key(3)
        jwk: dict[str, str | list[str]] = dict(key.public_key.to_jwk())
        assert OKPKey.import_key(jwk).thumbprint() == key.thumbprint

    def test_public_key_validation(self) -> None:
        with pytest.raises(ValueError):
            PublicKey(raw=b"\x00" * 31)
        with pytest.raises(TypeError):
            PublicKey(raw="x" * 32)  # type: ignore[arg-type]

    def test_verify_answers_bool(self) -> None:
        key = node_key()
        sig = key.sign(b"hello")
        assert key.public_key.verify(sig, b"hello")
        assert not key.public_key.verify(sig, b"hellO")
        assert not key.public_key.verify(sig[:-1], b"hello")
        assert not node_key(2).public_key.verify(sig, b"hello")


class TestLoadErrors:
    def test_empty(self) -> None:
        assert _load_error(b"").reason == "not_pem"
        assert _load_error(b"  \n").reason == "not_pem"

    def test_not_pem(self) -> None:
        der = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        assert _load_error(der).reason == "not_pem"
        assert _load_error(b"hello world").reason == "not_pem"

    def test_encrypted(self) -> None:
        pem = _pkcs8(
            ed25519.Ed25519PrivateKey.generate(), serialization.BestAvailableEncryption(b"pw")
        )
        err = _load_error(pem)
        assert err.reason == "encrypted"
        assert "encrypted" in str(err)

    @pytest.mark.parametrize(
        ("make", "name"),
        [
            (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), "RSA"),
            (lambda: ec.generate_private_key(ec.SECP256R1()), "EC"),
            (ed448.Ed448PrivateKey.generate, "Ed448"),
            (x25519.X25519PrivateKey.generate, "X25519"),
        ],
    )
    def test_wrong_key_type(self, make: object, name: str) -> None:
        err = _load_error(_pkcs8(make()))  # type: ignore[operator]
        assert err.reason == "wrong_key_type"
        assert name in str(err)
        assert "not an Ed25519 PKCS#8 key" in err.hint

    def test_public_key_file(self) -> None:
        pem = (
            node_key()
            .to_cryptography()
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        assert _load_error(pem).reason == "wrong_key_type"

    def test_openssh_key(self) -> None:
        pem = (
            node_key()
            .to_cryptography()
            .private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
        )
        assert _load_error(pem).reason == "wrong_key_type"

    def test_corrupt(self) -> None:
        pem = node_key().to_pem()
        lines = pem.splitlines()
        body = bytearray(lines[1])
        body[10:20] = b"AAAAAAAAAA"
        corrupt = b"\n".join([lines[0], bytes(body), *lines[2:]]) + b"\n"
        err = _load_error(corrupt)
        assert err.reason == "corrupt"
        truncated = b"\n".join([lines[0], lines[1][:20], lines[-1]]) + b"\n"
        assert _load_error(truncated).reason == "corrupt"

    def test_message_never_quotes_the_file(self) -> None:
        pem = node_key().to_pem()
        body = pem.splitlines()[1].decode()
        for bad in (
            pem.replace(b"MC4CAQ", b"MC4CAX"),
            pem[:-40] + b"\n-----END PRIVATE KEY-----\n",
        ):
            with pytest.raises(KeyFileError) as info:
                load_node_key(bad, source=SOURCE)
            assert body[:12] not in str(info.value)
            assert info.value.__cause__ is None

    def test_str_is_not_bytes(self) -> None:
        with pytest.raises(TypeError):
            load_node_key(node_key().to_pem().decode(), source=SOURCE)  # type: ignore[arg-type]


OPENSSL = shutil.which("openssl")


@pytest.mark.skipif(OPENSSL is None, reason="openssl CLI not installed")
class TestOpenSSL:
    def test_openssl_reads_our_key(self, tmp_path: Path) -> None:
        path = tmp_path / "node.key"
        path.write_bytes(node_key().to_pem())
        result = subprocess.run(
            [str(OPENSSL), "pkey", "-in", str(path), "-noout"], capture_output=True, check=False
        )
        assert result.returncode == 0, result.stderr
        text = subprocess.run(
            [str(OPENSSL), "pkey", "-in", str(path), "-noout", "-text"],
            capture_output=True,
            check=True,
            text=True,
        ).stdout
        assert "ED25519" in text

    def test_we_read_openssls_key(self, tmp_path: Path) -> None:
        path = tmp_path / "node.key"
        subprocess.run(
            [str(OPENSSL), "genpkey", "-algorithm", "ed25519", "-out", str(path)],
            capture_output=True,
            check=True,
        )
        key = load_node_key(path.read_bytes(), source=str(path))
        der = subprocess.run(
            [str(OPENSSL), "pkey", "-in", str(path), "-pubout", "-outform", "DER"],
            capture_output=True,
            check=True,
        ).stdout
        assert der[-32:] == key.public_key.raw

    def test_openssl_ec_key_is_refused_by_name(self, tmp_path: Path) -> None:
        path = tmp_path / "node.key"
        subprocess.run(
            [
                str(OPENSSL),
                "genpkey",
                "-algorithm",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                str(path),
            ],
            capture_output=True,
            check=True,
        )
        with pytest.raises(KeyFileError) as info:
            load_node_key(path.read_bytes(), source=str(path))
        assert info.value.reason == "wrong_key_type"
        assert str(path) in str(info.value)
