"""Byte-level helpers shared by the identity modules: base64url and transcripts.

Base64url decoding here is *canonical*: a segment decodes only if encoding the result
gives back exactly the same text. Python's decoder is lenient (it skips characters
outside the alphabet and ignores the unused low bits of the last character), which would
let one valid token be spelled many ways; tokens and signatures must have exactly one.

A transcript is what a key signs. It starts with a domain label that names the purpose
and the protocol generation, ends the label with a NUL, and length-prefixes every field,
so that no signature made for one purpose (attestation, enrollment, rotation) can be
replayed as another, and no two different field lists encode to the same bytes.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Final

from cryptography.hazmat.primitives import hashes

_B64URL_RE: Final = re.compile(r"[A-Za-z0-9_-]*")


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes | None:
    """Decode unpadded base64url; None if ``text`` is not the one canonical spelling."""
    if len(text) % 4 == 1 or _B64URL_RE.fullmatch(text) is None:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
    if b64url_encode(data) != text:
        return None
    return data


def sha256(data: bytes) -> bytes:
    """SHA-256 through cryptography, which every identity module loads anyway: ``hashlib``
    would add its own OpenSSL binding and BLAKE2 module (~0.7 MB) to a daemon for two
    digests."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(data)
    return digest.finalize()


def transcript(label: bytes, *fields: bytes) -> bytes:
    """``aegis-edge/v1/<label> NUL`` followed by each field as u32-big-endian length + bytes."""
    parts = [b"aegis-edge/v1/", label, b"\x00"]
    for field in fields:
        parts.append(len(field).to_bytes(4, "big"))
        parts.append(field)
    return b"".join(parts)
