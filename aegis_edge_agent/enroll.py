"""``aegis edge enroll <token>``: make a key, redeem the token, write the state directory."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from aegis_edge_agent.errors import refusal_of
from aegis_edge_agent.settings import render_settings
from aegis_edge_agent.statedir import StateDir
from aegis_edge_agent.tls import fetch_pinned_ca, verify_pin
from aegis_edge_agent.tools import BUILTIN, reported_hostname
from aegis_edge_core import __version__, tools_spec
from aegis_edge_core import hoststate as hs
from aegis_edge_core.config import parse_config, parse_label
from aegis_edge_core.errors import AegisError
from aegis_edge_core.identity import NodeKey, peek_enrollment_token
from aegis_edge_core.identity.enrollment import sign_enrollment
from aegis_edge_core.identity.errors import enrollment_refusal
from aegis_edge_core.policy import DEFAULT_ALLOWED_TOOLS, ToolPolicy
from aegis_edge_core.wire import enrollment_pb2, enrollment_pb2_grpc

__all__ = ["EnrollError", "enroll", "parse_labels"]


class EnrollError(AegisError):
    pass


def parse_labels(items: Sequence[str]) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in items:
        key, value = parse_label(item)
        labels[key] = value
    return labels


def enroll(
    token: str,
    state: StateDir,
    *,
    allow_tools: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
    force: bool = False,
    ca_cert: Path | None = None,
    timeout: float = 15.0,
) -> hs.NodeInfo:
    """Redeem ``token`` and write the state directory; returns what node.json holds."""
    claims = peek_enrollment_token(token.strip())
    existing = state.existing_enrollment()
    if existing and not force:
        raise EnrollError(
            f"{state.path} already holds an enrollment ({', '.join(existing)})",
            hint="pass --force to replace it (the old node stays on the relay until revoked: "
            "aegis edge keys revoke-remote <node-id>)",
        )
    allow = list(dict.fromkeys([*DEFAULT_ALLOWED_TOOLS, *allow_tools]))
    labels = dict(labels or {})
    # Validate the config before anything is redeemed: a bad flag must not cost the token.
    config_text = render_settings(relay=claims.relay_endpoint, allow=allow, labels=labels)
    parse_config(config_text, source="aegis-config.yaml (from the enroll flags)")

    if ca_cert is not None:
        ca_pem = ca_cert.read_bytes()
        if not verify_pin(ca_pem, claims.ca_pin):
            raise EnrollError(
                f"{ca_cert} is not the CA the enrollment token pins",
                hint="use the relay's ca.pem, or leave --ca-cert out",
            )
    else:
        ca_pem = fetch_pinned_ca(claims.relay_endpoint, claims.ca_pin, timeout=timeout)

    key = NodeKey.from_seed(os.urandom(32))
    policy = ToolPolicy(allow=allow)
    caps = tools_spec.capabilities(
        os=platform.system(),
        arch=platform.machine(),
        tools=[t for t in BUILTIN if policy.allows_tool(t)],
        labels=labels,
        hostname=reported_hostname(),
        agent_version=__version__,
    )
    request = enrollment_pb2.EnrollRequest(
        enrollment_token=token.strip(),
        public_key=key.public_key.raw,
        proof=sign_enrollment(key, token_jti=claims.jti),
        capabilities=caps,
        host_time=time.time(),
    )
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    with grpc.secure_channel(claims.relay_endpoint, creds) as channel:
        stub = enrollment_pb2_grpc.EnrollmentStub(channel)
        try:
            response: enrollment_pb2.EnrollResponse = stub.Enroll(request, timeout=timeout)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = err.details() if hasattr(err, "details") else str(err)
            name = code.name if code is not None else "UNKNOWN"
            if name == "UNAVAILABLE":
                raise EnrollError(
                    f"cannot reach the relay at {claims.relay_endpoint}: {details}",
                    hint="check the network path to the relay and retry",
                ) from None
            refusal = refusal_of(err)
            reason = refusal.reason if refusal is not None else _legacy_reason(err)
            message, hint = enrollment_refusal(reason, details or "")
            raise EnrollError(message, hint=hint) from None

    node = hs.NodeInfo(
        node_id=response.node_id,
        tenant_id=response.tenant_id,
        relay=claims.relay_endpoint,
        key_thumbprint=key.thumbprint,
        enrolled_at=time.time(),
        ca_sha256=claims.ca_pin,
        relays=claims.relay_endpoints,
    )
    state.ensure()
    for stale in (hs.RESULT_SPOOL, hs.NODE_KEY_NEXT, hs.STATUS_JSON, hs.REVOKED_JSON):
        state.file(stale).unlink(missing_ok=True)
    state.write(hs.CA_PEM, ca_pem)
    state.write(hs.NODE_KEY, key.to_pem())
    state.write(hs.NODE_TOKEN, response.node_token + "\n")
    state.write(hs.CONFIG_FILE, config_text)
    # node.json last: its presence with node.key is what "enrolled" means.
    state.write(hs.NODE_JSON, node.to_json())
    return node


def _legacy_reason(err: grpc.RpcError) -> str:
    """The reason a relay older than the rich status put in its own trailing metadata."""
    if isinstance(err, grpc.Call):
        for key, value in err.trailing_metadata() or ():
            if key == "aegis-refusal-reason":
                return value if isinstance(value, str) else value.decode()
    return ""
