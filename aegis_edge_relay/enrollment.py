"""Enrollment: the ``Enrollment`` servicer and the redemption of an enrollment token.

The decisions are the core's: whether the capability snapshot is acceptable
(:func:`check_capabilities`), whether the token and the key's proof hold
(:func:`redeem_enrollment`), whether this address may try now (:class:`AttemptLimits`).
Single use is the store's: redeeming the token's ``jti`` and inserting the node are one
transaction, so of two concurrent redemptions exactly one wins.
"""

from __future__ import annotations

import os
from typing import Any, Final

import grpc

from aegis_edge_core.capability_limits import CapabilityError, check_capabilities
from aegis_edge_core.identity import EnrollmentError
from aegis_edge_core.identity.enrollment import EnrollmentGrant, redeem_enrollment
from aegis_edge_core.ratelimit import AttemptLimits, source_of
from aegis_edge_core.wire import enrollment_pb2, enrollment_pb2_grpc
from aegis_edge_relay import jsonlog
from aegis_edge_relay.fleetview import FleetView
from aegis_edge_relay.identity import IdentityService
from aegis_edge_relay.metrics import RelayMetrics
from aegis_edge_relay.refusals import abort_refused
from aegis_edge_relay.state import NodeState, capabilities_from_proto
from aegis_edge_relay.store import (
    NodeRecord,
    StoreError,
    StoreUnavailable,
    StoreWorker,
    TokenAlreadyRedeemed,
)

__all__ = ["EnrollmentService"]

Context = grpc.aio.ServicerContext[Any, Any]

# Old daemons read the reason from this trailing metadata key; kept beside the rich status.
_LEGACY_REASON_KEY: Final = "aegis-refusal-reason"


class EnrollmentService(enrollment_pb2_grpc.EnrollmentServicer):
    def __init__(
        self,
        *,
        identity: IdentityService,
        fleet: FleetView,
        db: StoreWorker,
        metrics: RelayMetrics,
        limits: AttemptLimits,
        heartbeat_interval: float,
    ) -> None:
        self.identity = identity
        self.fleet = fleet
        self._db = db
        self.metrics = metrics
        self.limits = limits
        self.heartbeat_interval = heartbeat_interval
        self.now = fleet.now

    async def Enroll(
        self, request: enrollment_pb2.EnrollRequest, context: Context
    ) -> enrollment_pb2.EnrollResponse:
        decision = self.limits.check(self.now(), source=source_of(context.peer()))
        if not decision.allowed:
            retry = round(max(decision.retry_after, 0.001), 3)
            self.metrics.enrollment_refusals.labels(reason="rate_limited").inc()
            jsonlog.log("warning", "enrollment.refused", reason="rate_limited", peer=context.peer())
            await abort_refused(
                context,
                "rate_limited",
                f"enrollment refused (rate_limited): too many attempts from this address; "
                f"retry in {retry:g}s",
                self.now(),
                retry_after_secs=retry,
                extra_metadata=(
                    (_LEGACY_REASON_KEY, "rate_limited"),
                    ("retry-after", f"{retry:g}"),
                ),
            )
        try:
            return await self.enroll(request)
        except EnrollmentError as err:
            self.metrics.enrollment_refusals.labels(reason=err.reason).inc()
            jsonlog.log("warning", "enrollment.refused", reason=err.reason, error=err.message)
            await abort_refused(
                context,
                err.reason,
                str(err),
                self.now(),
                extra_metadata=((_LEGACY_REASON_KEY, err.reason),),
            )

    async def enroll(self, req: enrollment_pb2.EnrollRequest) -> enrollment_pb2.EnrollResponse:
        """Redeem an enrollment token; raises ``EnrollmentError`` or ``StoreError``."""
        now = self.now()
        try:
            # Before the token: a refused snapshot must not cost the host its token.
            check_capabilities(req.capabilities)
        except CapabilityError as err:
            raise EnrollmentError(
                f"capability snapshot refused: {err.message}",
                reason="malformed",
                hint=err.hint or "enroll with fewer or shorter labels",
            ) from None
        identity = self.identity
        await identity.know_signer(req.enrollment_token)
        grant: EnrollmentGrant = redeem_enrollment(
            token=req.enrollment_token,
            public_key=req.public_key,
            proof=req.proof,
            verifier=identity.verifier,
            already_redeemed=lambda _jti: False,  # the store's unique jti decides, atomically
            now=now,
            revocations=identity.revocations,
        )
        node_id = "n-" + os.urandom(8).hex()
        issued = identity.new_node_token(node_id, grant.tenant_id, grant.key_thumbprint, now)
        record = NodeRecord(
            node_id=node_id,
            tenant_id=grant.tenant_id,
            public_key=grant.public_key,
            key_thumbprint=grant.key_thumbprint,
            enrolled_at=now,
            capabilities=capabilities_from_proto(req.capabilities),
            token_jti=issued.claims.jti,
            token_expires_at=issued.claims.expires_at,
        )
        try:
            await self._db.call(
                self._db.store.enroll,
                jti=grant.token_jti,
                token_expires_at=grant.token_expires_at,
                node=record,
            )
        except TokenAlreadyRedeemed:
            raise EnrollmentError(
                "this enrollment token has already been used", reason="replayed"
            ) from None
        except StoreUnavailable:
            raise
        except StoreError as err:
            raise EnrollmentError(err.message, reason="wrong_tenant", hint=err.hint) from None
        self.fleet.enrolled(NodeState.from_record(record))
        jsonlog.log("info", "enrollment.redeemed", node_id=node_id, tenant_id=grant.tenant_id)
        return enrollment_pb2.EnrollResponse(
            node_id=node_id,
            tenant_id=grant.tenant_id,
            node_token=issued.token,
            token_expires_at=issued.claims.expires_at,
            heartbeat_interval_secs=self.heartbeat_interval,
        )
