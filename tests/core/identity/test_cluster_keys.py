"""Cluster identity in the core: keys by ``kid``, the endpoint list, the dial order."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from aegis_edge_core.hoststate import HostStateError, NodeInfo, parse_node_json
from aegis_edge_core.identity import (
    TokenError,
    TokenVerifier,
    dial_order,
    endpoint_list,
    key_reload_due,
    peek_enrollment_token,
    peek_kid,
)
from aegis_edge_core.identity.tokens import UNKNOWN_KEY_MESSAGE

from .helpers import CA_PIN, NOW, issuer, jti, relay_key


def operator_token(relay: int) -> str:
    return (
        issuer(relay_key(relay))
        .issue_operator_token(subject="ops", role="admin", tenants="*", now=NOW, jti=jti())
        .token
    )


def cluster_verifier(own: int, *published: int) -> TokenVerifier:
    keys = {relay_key(n).kid: relay_key(n).public_key.raw for n in published}
    return TokenVerifier.for_cluster(relay_key(own), keys)


class TestKeysByKid:
    def test_a_token_of_any_published_relay_verifies(self) -> None:
        verifier = cluster_verifier(1, 1, 2, 3)
        for relay in (1, 2, 3):
            claims = verifier.verify_operator_token(operator_token(relay), now=NOW)
            assert claims.subject == "ops"

    def test_own_key_first_and_a_token_without_kid_is_refused(self) -> None:
        verifier = cluster_verifier(2, 1, 3)
        assert verifier.keys[0] == relay_key(2).public_key
        header = base64.urlsafe_b64encode(json.dumps({"alg": "EdDSA"}).encode()).rstrip(b"=")
        token = operator_token(2)
        _, payload, _ = token.split(".")
        signing_input = header + b"." + payload.encode()
        signature = base64.urlsafe_b64encode(relay_key(2).sign(signing_input)).rstrip(b"=")
        no_kid = (signing_input + b"." + signature).decode()
        assert peek_kid(no_kid) is None
        with pytest.raises(TokenError, match="names no signing key"):
            verifier.verify_operator_token(no_kid, now=NOW)

    def test_an_unpublished_kid_is_refused_as_unknown(self) -> None:
        verifier = cluster_verifier(1, 2)
        with pytest.raises(TokenError) as info:
            verifier.verify_operator_token(operator_token(9), now=NOW)
        assert info.value.reason == "bad_signature"
        assert info.value.message == UNKNOWN_KEY_MESSAGE

    def test_a_row_whose_kid_names_another_key_is_left_out(self) -> None:
        # relay 9's key published under relay 2's kid: neither kid may verify with it
        verifier = TokenVerifier.for_cluster(
            relay_key(1), {relay_key(2).kid: relay_key(9).public_key.raw}
        )
        assert verifier.keys == (relay_key(1).public_key,)
        for relay in (2, 9):
            with pytest.raises(TokenError):
                verifier.verify_operator_token(operator_token(relay), now=NOW)

    def test_reload_only_for_an_unknown_kid_and_at_most_once_per_interval(self) -> None:
        verifier = cluster_verifier(1, 2)
        unknown = relay_key(9).kid
        assert not key_reload_due(verifier, None, last_reload=0.0, now=NOW, interval=5.0)
        assert not key_reload_due(
            verifier, relay_key(2).kid, last_reload=0.0, now=NOW, interval=5.0
        )
        assert key_reload_due(verifier, unknown, last_reload=NOW - 5.0, now=NOW, interval=5.0)
        assert not key_reload_due(verifier, unknown, last_reload=NOW - 1, now=NOW, interval=5.0)

    def test_peek_kid_of_garbage_is_none(self) -> None:
        for garbage in ("", "x", "a.b.c", "!!!.b.c", 17, "e30.e30.e30"):
            assert peek_kid(garbage) is None
        assert peek_kid(operator_token(3)) == relay_key(3).kid


class TestEndpointsInTokens:
    def issue(self, rels: tuple[str, ...]) -> str:
        return (
            issuer()
            .issue_enrollment_token(
                tenant_id="t",
                relay_endpoint="a:1",
                ca_pin=CA_PIN,
                now=NOW,
                jti=jti(),
                relay_endpoints=rels,
            )
            .token
        )

    def test_a_single_relay_token_has_no_rels_claim(self) -> None:
        payload = self.issue(()).split(".")[1]
        decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        assert "rels" not in decoded
        assert peek_enrollment_token(self.issue(())).relay_endpoints == ()

    def test_the_cluster_list_round_trips(self) -> None:
        claims = peek_enrollment_token(self.issue(("a:1", "b:2", "c:3")))
        assert claims.relay_endpoints == ("a:1", "b:2", "c:3")
        verified = TokenVerifier.for_signing_key(relay_key()).verify_enrollment_token(
            self.issue(("a:1", "b:2")), now=NOW
        )
        assert verified.relay_endpoints == ("a:1", "b:2")

    def test_too_many_or_bad_endpoints_are_refused_at_issue(self) -> None:
        with pytest.raises(ValueError, match="at most"):
            self.issue(tuple(f"h{i}:1" for i in range(33)))
        with pytest.raises(ValueError, match="printable"):
            self.issue((" a:1",))


class TestDialOrder:
    def test_one_endpoint_is_always_that_one(self) -> None:
        for failures in range(5):
            assert dial_order(("lb:443",), "lb:443", failures) == "lb:443"

    def test_stays_while_it_works_then_walks_round_robin_from_it(self) -> None:
        eps = endpoint_list("a:1", ("a:1", "b:1", "c:1"))
        assert eps == ("a:1", "b:1", "c:1")
        assert dial_order(eps, "b:1", 0) == "b:1"
        assert [dial_order(eps, "b:1", f) for f in (1, 2, 3)] == ["c:1", "a:1", "b:1"]

    def test_an_unknown_last_good_starts_at_the_first(self) -> None:
        assert dial_order(("a:1", "b:1"), "", 0) == "a:1"
        assert dial_order(("a:1", "b:1"), "gone:1", 1) == "b:1"

    def test_no_endpoint_or_negative_failures_is_an_error(self) -> None:
        with pytest.raises(ValueError):
            dial_order((), "", 0)
        with pytest.raises(ValueError):
            dial_order(("a:1",), "a:1", -1)

    @given(
        st.lists(st.sampled_from(["a:1", "b:2", "c:3", "d:4", ""]), max_size=6),
        st.integers(min_value=0, max_value=50),
    )
    def test_every_endpoint_is_tried_within_len_failures(
        self, others: list[str], start: int
    ) -> None:
        eps = endpoint_list("p:0", others)
        assert eps[0] == "p:0" and len(set(eps)) == len(eps) and "" not in eps
        last_good = eps[start % len(eps)]
        tried = {dial_order(eps, last_good, f) for f in range(len(eps))}
        assert tried == set(eps)


class TestNodeJsonEndpoints:
    def info(self, relays: tuple[str, ...]) -> NodeInfo:
        return NodeInfo(
            node_id="n-1",
            tenant_id="t",
            relay="a:1",
            key_thumbprint="k",
            enrolled_at=1.0,
            relays=relays,
        )

    def test_a_single_relay_node_json_is_unchanged_and_old_ones_load(self) -> None:
        text = self.info(()).to_json()
        assert "relays" not in json.loads(text)
        loaded = parse_node_json(text, source="node.json")
        assert loaded.relays == () and loaded.endpoints == ("a:1",)

    def test_the_cluster_list_round_trips_with_the_relay_first(self) -> None:
        loaded = parse_node_json(self.info(("b:1", "a:1")).to_json(), source="node.json")
        assert loaded.relays == ("b:1", "a:1")
        assert loaded.endpoints == ("a:1", "b:1")

    def test_a_damaged_list_is_a_named_error(self) -> None:
        data = json.loads(self.info(()).to_json()) | {"relays": "a:1"}
        with pytest.raises(HostStateError, match="relays"):
            parse_node_json(json.dumps(data), source="node.json")


class DialMachine(RuleBasedStateMachine):
    """Relays come and go; a daemon dials as the agent does (``dial_order`` from the relay
    it last attested at, the failure count reset on each attestation). Whatever happened
    before, while some relay is up the daemon is attested within one pass over the list."""

    ENDPOINTS = ("a:1", "b:1", "c:1", "d:1")

    def __init__(self) -> None:
        super().__init__()
        self.up = set(self.ENDPOINTS)
        self.last_good = ""
        self.failures = 0
        self.attached = ""

    def _dial(self) -> bool:
        relay = dial_order(self.ENDPOINTS, self.last_good or self.ENDPOINTS[0], self.failures)
        self.failures += 1
        if relay in self.up:
            self.last_good, self.failures, self.attached = relay, 0, relay
            return True
        return False

    @rule(endpoint=st.sampled_from(ENDPOINTS))
    def relay_dies(self, endpoint: str) -> None:
        self.up.discard(endpoint)
        if self.attached == endpoint:
            self.attached = ""
            self.failures += 1  # the stream ended: counted as the agent's finally does

    @rule(endpoint=st.sampled_from(ENDPOINTS))
    def relay_returns(self, endpoint: str) -> None:
        self.up.add(endpoint)

    @rule()
    def one_dial(self) -> None:
        if not self.attached:
            self._dial()

    @invariant()
    def lands_within_one_pass(self) -> None:
        if self.attached or not self.up:
            return
        saved = (self.last_good, self.failures, self.attached)
        assert any(self._dial() for _ in self.ENDPOINTS), (self.up, saved)
        self.last_good, self.failures, self.attached = saved


TestDialMachine = DialMachine.TestCase
