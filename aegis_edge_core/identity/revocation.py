"""The revocation list: token ids and key thumbprints the relay no longer honours.

Two kinds of entry, because they live for different lengths of time:

* A revoked **token** (by ``jti``) only needs remembering while the token could still be
  accepted somewhere it would not be caught otherwise. Each entry carries a
  ``prune_after`` time; :meth:`RevocationList.prune` forgets entries past it, so the list
  does not grow forever. Pass the token's ``exp`` (plus leeway) for operator and
  enrollment tokens. A node token stays usable *for attestation* after it expires (the
  key is the identity, see :mod:`.attestation`), but attestation also checks the node's
  stored key and status: after a rotation the old token's ``cnf`` no longer matches the
  stored key, and after a revoke the key itself is on this list. So pruning a node token
  after its ``exp`` is safe as long as the node's key was replaced or revoked too.
* A revoked **key** (by RFC 7638 thumbprint) is remembered forever: a key has no expiry.

The list is a plain in-memory structure the relay fills from its store at start and
updates in the same transaction that marks a daemon Revoked. Code that checks
revocation takes anything with the two ``is_*_revoked`` methods
(:class:`Revocations`), so a store can answer directly instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Protocol

import attrs

__all__ = ["RevocationList", "Revocations"]


class Revocations(Protocol):
    """What verification needs to know about revocations."""

    def is_token_revoked(self, jti: str) -> bool: ...

    def is_key_revoked(self, thumbprint: str) -> bool: ...


def _check_id(what: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")


@attrs.define(kw_only=True)
class RevocationList:
    """Revoked token ids (with a prune-after time) and revoked key thumbprints."""

    _tokens: dict[str, float] = attrs.field(factory=dict)
    _keys: set[str] = attrs.field(factory=set)

    @classmethod
    def from_entries(
        cls, *, tokens: Mapping[str, float] | None = None, keys: Iterable[str] = ()
    ) -> RevocationList:
        """Rebuild the list from what the store persisted (``jti -> prune_after``, thumbprints)."""
        result = cls()
        for jti, prune_after in (tokens or {}).items():
            result.revoke_token(jti, prune_after=prune_after)
        for thumbprint in keys:
            result.revoke_key(thumbprint)
        return result

    def revoke_token(self, jti: str, *, prune_after: float) -> None:
        """Blacklist a token id until ``prune_after`` (usually the token's ``exp`` + leeway)."""
        _check_id("jti", jti)
        if not math.isfinite(prune_after):
            raise ValueError("prune_after must be a finite time")
        # Revoking twice keeps the later time: forgetting early would un-revoke.
        self._tokens[jti] = max(prune_after, self._tokens.get(jti, -math.inf))

    def revoke_key(self, thumbprint: str) -> None:
        """Blacklist a key for good: every token bound to it fails from now on."""
        _check_id("thumbprint", thumbprint)
        self._keys.add(thumbprint)

    def is_token_revoked(self, jti: str) -> bool:
        return jti in self._tokens

    def is_key_revoked(self, thumbprint: str) -> bool:
        return thumbprint in self._keys

    def prune(self, now: float) -> int:
        """Forget token entries whose ``prune_after`` has passed; returns how many."""
        stale = [jti for jti, until in self._tokens.items() if until < now]
        for jti in stale:
            del self._tokens[jti]
        return len(stale)

    @property
    def tokens(self) -> Mapping[str, float]:
        """A snapshot of ``jti -> prune_after``, for persisting."""
        return dict(self._tokens)

    @property
    def keys(self) -> frozenset[str]:
        """A snapshot of the revoked key thumbprints, for persisting."""
        return frozenset(self._keys)

    def __len__(self) -> int:
        return len(self._tokens) + len(self._keys)
