"""The cluster's relay endpoints ride on Accepted; a single relay sends none."""

from __future__ import annotations

import pytest

from aegis_edge_core.session import DaemonSession, RelaySession, SessionAccepted

from .session_rig import NOW, Identity, caps, to_daemon, to_relay


def accepted(endpoints: tuple[str, ...]) -> SessionAccepted:
    ident = Identity.make()
    daemon, relay = DaemonSession(), RelaySession()
    daemon.hello(node_id="node-1", node_token=ident.token, capabilities=caps(), now=NOW)
    (hello,) = to_relay(daemon, relay)
    relay.challenge(b"n" * 32, NOW)
    (ch,) = to_daemon(relay, daemon)
    daemon.attest(ident.sign(ch.nonce))  # type: ignore[attr-defined]
    (att,) = to_relay(daemon, relay)
    relay.accept(
        ident.verify(hello, att),
        heartbeat_interval_secs=30,
        stale_threshold_secs=90,
        now=NOW,
        relay_endpoints=endpoints,
    )
    (acc,) = to_daemon(relay, daemon)
    assert isinstance(acc, SessionAccepted)
    return acc


@pytest.mark.parametrize("endpoints", [(), ("a:1", "b:2", "c:3")])
def test_the_endpoint_list_reaches_the_daemon_as_sent(endpoints: tuple[str, ...]) -> None:
    assert accepted(endpoints).relay_endpoints == endpoints
