"""The identity service: the relay's signing key, the tokens it issues, and revocation.

Every decision is the core's: token issuing and verifying (:class:`TokenIssuer`,
:class:`TokenVerifier`), when a token is due (:func:`needs_refresh`, :func:`refresh_margin`),
which tokens a confirmation supersedes (:class:`TokenSuccession`), whether a rotation proof
holds (:func:`verify_rotation`). This module keeps the store, the in-memory node records
and the revocation list in step with those decisions.

Revoking a node (or deleting its tenant) also ends its live streams; that is the stream
handler's business, which hears of it through :meth:`IdentityService.on_revoked`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Final

import attrs

from aegis_edge_core.identity import (
    IssuedToken,
    NodeClaims,
    RelaySigningKey,
    RevocationList,
    TokenIssuer,
    TokenVerifier,
    ca_pin,
    endpoint_list,
    key_reload_due,
    load_relay_signing_key,
    new_jti,
    peek_kid,
    refresh_margin,
)
from aegis_edge_core.identity.rotation import (
    RotationProof,
    TokenSuccession,
    VerifiedRotation,
    verify_rotation,
)
from aegis_edge_core.ratelimit import Decision, KeyedLimiter, Limit
from aegis_edge_relay import jsonlog
from aegis_edge_relay.files import atomic_write
from aegis_edge_relay.state import Clock, NodeState
from aegis_edge_relay.store import StoreWorker

__all__ = [
    "SIGNING_KEY_FILE",
    "IdentityService",
    "Rotated",
    "load_or_create_signing_key",
]

SIGNING_KEY_FILE: Final = "relay-signing.key"
KEY_RELOAD_INTERVAL: Final = 1.0
"""At most one read of the cluster's published keys per this many seconds, however many
tokens with an unknown ``kid`` arrive (forged ones cost no database reads)."""
ENDPOINT_REFRESH_INTERVAL: Final = 30.0
"""How stale this relay's copy of the cluster's endpoints may get before an attestation
reads them again (relays join while it runs)."""
REVOCATION_MARGIN: Final = 3600.0
"""A revocation entry outlives its token's expiry by this much, so the verifier's clock
leeway never reopens a window for it."""

RevokedHook = Callable[[NodeState, str, float], None]


def load_or_create_signing_key(data_dir: Path) -> RelaySigningKey:
    """The relay's Ed25519 signing key (PKCS#8 PEM, 0600), made on first start."""
    path = data_dir / SIGNING_KEY_FILE
    if path.exists():
        return load_relay_signing_key(path.read_bytes(), source=str(path))
    key = RelaySigningKey.from_seed(os.urandom(32))
    atomic_write(path, key.to_pem(), mode=0o600)
    return key


@attrs.frozen
class Rotated:
    """A rotation the store has committed: the new token and the verified proof."""

    issued: IssuedToken[NodeClaims]
    verified: VerifiedRotation


class IdentityService:
    """Tokens and revocations of one relay, over the fleet's node records."""

    def __init__(
        self,
        *,
        signing_key: RelaySigningKey,
        ca_der: bytes | None,
        nodes: Mapping[str, NodeState],
        db: StoreWorker,
        clock: Clock,
        node_token_ttl: float,
        refresh_limit: Limit | None,
    ) -> None:
        self._signing_key = signing_key
        self.issuer = TokenIssuer(signing_key=signing_key)
        self.verifier = TokenVerifier.for_signing_key(signing_key)
        self.cluster = ""
        """The cluster this relay serves in (``--cluster``); empty for a single relay."""
        self.cluster_endpoints: tuple[str, ...] = ()
        """Every relay endpoint of the cluster, for enrollment tokens (read at start)."""
        self._keys_loaded_at = float("-inf")
        self._endpoints_read_at = float("-inf")
        self.ca_pin = ca_pin(ca_der) if ca_der else "0" * 64
        self.revocations = RevocationList()
        self.relay_endpoint = ""
        """What enrollment tokens tell hosts to connect to (``host:port``); known once the
        relay listens."""
        self.node_token_ttl = node_token_ttl
        self.refresh_margin = refresh_margin(node_token_ttl)
        self.next_refresh_scan = 0.0
        """No live stream's token needs a refresh before this time (skip the scan)."""
        self._nodes = nodes
        self._db = db
        self.now = clock
        self._refresh_limit = KeyedLimiter(refresh_limit) if refresh_limit is not None else None
        self._revoked_hooks: list[RevokedHook] = []

    @property
    def relay_id(self) -> str:
        """This relay's id in the cluster: the ``kid`` of its signing key."""
        return self._signing_key.kid

    async def load(self) -> None:
        tokens, keys = await self._db.call(self._db.store.load_revocations)
        self.revocations = RevocationList.from_entries(tokens=tokens, keys=keys)
        if not self.cluster:
            return  # a single relay honours its own key only, as ever
        store = self._db.store
        key = self._signing_key
        await self._db.call(store.publish_relay_key, key.kid, key.public_key.raw, self.now())
        await self._reload_keys()

    async def publish_endpoint(self) -> None:
        """Publish where daemons reach this relay and read where they reach the others."""
        if not self.cluster:
            return
        store = self._db.store
        await self._db.call(
            store.publish_endpoint, self.relay_id, self.cluster, self.relay_endpoint, self.now()
        )
        await self.refresh_endpoints()

    async def refresh_endpoints(self) -> None:
        """Read the cluster's endpoints again (relays join after this one started)."""
        if not self.cluster:
            return
        self._endpoints_read_at = self.now()
        others = await self._db.call(self._db.store.cluster_endpoints, self.cluster)
        self.cluster_endpoints = endpoint_list(self.relay_endpoint, others)

    async def endpoints_for_daemon(self) -> tuple[str, ...]:
        """:attr:`shared_endpoints` for an Accepted, read again when they may be stale."""
        if self.cluster and self.now() - self._endpoints_read_at >= ENDPOINT_REFRESH_INTERVAL:
            await self.refresh_endpoints()
        return self.shared_endpoints

    @property
    def shared_endpoints(self) -> tuple[str, ...]:
        """The endpoints to tell daemons (tokens, Accepted): the cluster's when there is more
        than one; none for one, which says nothing ``rel`` does not (a single relay's
        tokens and messages stay exactly as they were)."""
        return self.cluster_endpoints if len(self.cluster_endpoints) > 1 else ()

    async def _reload_keys(self) -> None:
        published = await self._db.call(self._db.store.load_relay_keys)
        self.verifier = TokenVerifier.for_cluster(self._signing_key, published)

    async def know_signer(self, token: str) -> None:
        """Before verifying ``token``: if another relay of the cluster signed it with a key
        not loaded here yet, read the published keys (rate-limited by the core's rule)."""
        if self.cluster and key_reload_due(
            self.verifier,
            peek_kid(token),
            last_reload=self._keys_loaded_at,
            now=self.now(),
            interval=KEY_RELOAD_INTERVAL,
        ):
            # only reloads an unknown kid asked for count: the start's load does not
            self._keys_loaded_at = self.now()
            await self._reload_keys()

    async def verifier_for(self, token: str) -> TokenVerifier:
        """The verifier to check ``token`` with, its signer's key loaded if published."""
        await self.know_signer(token)
        return self.verifier

    def on_revoked(self, hook: RevokedHook) -> None:
        """Call ``hook(node, reason, now)`` after each committed revocation."""
        self._revoked_hooks.append(hook)

    # ------------------------------------------------------------------ node tokens

    def new_node_token(
        self, node_id: str, tenant_id: str, key_thumbprint: str, now: float
    ) -> IssuedToken[NodeClaims]:
        """A signed node token; recording it is the caller's (enrollment, rotation)."""
        return self.issuer.issue_node_token(
            node_id=node_id,
            tenant_id=tenant_id,
            key_thumbprint=key_thumbprint,
            now=now,
            jti=new_jti(os.urandom(16)),
            ttl=self.node_token_ttl,
        )

    async def issue_node_token(self, node: NodeState) -> IssuedToken[NodeClaims]:
        """A fresh node token bound to the node's current key, recorded in the store."""
        issued = self.new_node_token(node.node_id, node.tenant_id, node.key_thumbprint, self.now())
        await self._db.call(
            self._db.store.set_token, node.node_id, issued.claims.jti, issued.claims.expires_at
        )
        node.token_jti = issued.claims.jti
        node.token_expires_at = issued.claims.expires_at
        node.tokens.issued(issued.claims.jti, expires_at=issued.claims.expires_at)
        return issued

    def token_live(self, expires_at: float) -> None:
        """A token expiring at ``expires_at`` is held on a live stream: scan for refreshes
        by then."""
        self.next_refresh_scan = min(self.next_refresh_scan, expires_at - self.refresh_margin)

    def check_refresh(self, node_id: str, now: float) -> Decision | None:
        """May this node have a token it asked for? ``None`` when it may (the request is
        counted), else the refusing decision."""
        if self._refresh_limit is None:
            return None
        decision = self._refresh_limit.take(node_id, now)
        return None if decision.allowed else decision

    async def token_confirmed(self, node: NodeState, jti: str, now: float) -> None:
        """The daemon holds the token ``jti``: revoke the ones issued to it before.

        Only now, not when the new token was sent: a daemon that crashed before storing it
        would otherwise be left holding nothing the relay honours."""
        superseded = node.tokens.confirmed(jti)
        if not superseded:
            return
        for old_jti, expires_at in superseded:
            prune_after = max(expires_at, now) + REVOCATION_MARGIN
            await self._db.call(
                self._db.store.revoke_token, old_jti, prune_after=prune_after, now=now
            )
            self.revocations.revoke_token(old_jti, prune_after=prune_after)
        jsonlog.log(
            "info",
            "token.superseded",
            node_id=node.node_id,
            tenant_id=node.tenant_id,
            revoked=len(superseded),
        )

    def issue_enrollment_token(self, tenant_id: str, ttl: float) -> tuple[str, float]:
        issued = self.issuer.issue_enrollment_token(
            tenant_id=tenant_id,
            relay_endpoint=self.relay_endpoint or "localhost:7443",
            ca_pin=self.ca_pin,
            now=self.now(),
            jti=new_jti(os.urandom(16)),
            ttl=ttl,
            relay_endpoints=self.shared_endpoints,
        )
        jsonlog.log("info", "enrollment.token_issued", tenant_id=tenant_id)
        return issued.token, issued.claims.expires_at

    # ------------------------------------------------------------------ rotation

    async def rotate(
        self, node: NodeState, proof: RotationProof, nonce: bytes, now: float
    ) -> Rotated:
        """Swap the node's key for the one ``proof`` vouches for; raises ``RotationError``."""
        verified = verify_rotation(
            proof=proof,
            node_id=node.node_id,
            old_public_key=node.public_key,
            nonce=nonce,
            revocations=self.revocations,
        )
        old_jti, old_exp = node.token_jti, node.token_expires_at
        issued = self.new_node_token(node.node_id, node.tenant_id, verified.new_key_thumbprint, now)
        prune_after = max(old_exp, now) + REVOCATION_MARGIN
        await self._db.call(
            self._db.store.rotate_key,
            node.node_id,
            old_thumbprint=verified.old_key_thumbprint,
            new_public_key=verified.new_public_key,
            new_thumbprint=verified.new_key_thumbprint,
            new_jti=issued.claims.jti,
            new_expires_at=issued.claims.expires_at,
            old_jti_prune_after=prune_after,
            now=now,
        )
        node.public_key = verified.new_public_key
        node.key_thumbprint = verified.new_key_thumbprint
        node.token_jti = issued.claims.jti
        node.token_expires_at = issued.claims.expires_at
        # every earlier token is bound to the old key, now on the revocation list
        node.tokens = TokenSuccession.starting_with(
            issued.claims.jti, expires_at=issued.claims.expires_at
        )
        if old_jti:
            self.revocations.revoke_token(old_jti, prune_after=prune_after)
        self.revocations.revoke_key(verified.old_key_thumbprint)
        return Rotated(issued=issued, verified=verified)

    # ------------------------------------------------------------------ revocation

    async def revoke_node(self, node_id: str, reason: str) -> NodeState:
        now = self.now()
        node = self._nodes[node_id]
        rec = await self._db.call(
            self._db.store.revoke_node,
            node_id,
            reason=reason,
            now=now,
            token_prune_after=now + self.node_token_ttl + REVOCATION_MARGIN,
        )
        self._after_revoke(node, rec.revoked_reason, now)
        jsonlog.log("warning", "node.revoked", node_id=node_id, tenant_id=node.tenant_id)
        return node

    async def delete_tenant(self, tenant_id: str) -> int:
        """Delete a tenant and revoke every daemon of it (one store transaction)."""
        now = self.now()
        revoked = await self._db.call(
            self._db.store.delete_tenant,
            tenant_id,
            reason="tenant deleted",
            now=now,
            token_prune_after=now + self.node_token_ttl + REVOCATION_MARGIN,
        )
        for node_id in revoked:
            node = self._nodes.get(node_id)
            if node is not None:
                self._after_revoke(node, "tenant deleted", now)
        jsonlog.log("warning", "tenant.deleted", tenant_id=tenant_id, revoked=len(revoked))
        return len(revoked)

    def revoked_elsewhere(self, node: NodeState, reason: str) -> None:
        """Another relay of the cluster committed this node's revocation: mirror it."""
        self._after_revoke(node, reason, self.now())

    def _after_revoke(self, node: NodeState, reason: str, now: float) -> None:
        """Mirror a committed revocation: memory, revocation list, then the live side."""
        node.revoked = True
        node.revoked_reason = reason
        self.revocations.revoke_key(node.key_thumbprint)
        if node.token_jti:
            self.revocations.revoke_token(
                node.token_jti, prune_after=node.token_expires_at + REVOCATION_MARGIN
            )
        for hook in self._revoked_hooks:
            hook(node, reason, now)

    async def prune(self, now: float) -> None:
        """Forget revocations of tokens that have expired for good, in memory and store."""
        self.revocations.prune(now)
        await self._db.call(self._db.store.prune_revocations, now)
