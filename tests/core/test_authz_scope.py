"""Which fleet runs a token sees: every tenant a run spans must be one of the token's."""

from __future__ import annotations

from aegis_edge_core.authz import Principal, Role


def test_an_all_tenants_token_sees_every_run_even_one_of_unknown_scope() -> None:
    admin = Principal(subject="admin", role=Role.ADMIN)
    assert admin.sees_all(("a", "b"))
    assert admin.sees_all(())
    assert admin.sees_all(None)


def test_a_scoped_token_sees_a_run_only_if_it_sees_all_its_tenants() -> None:
    ops = Principal(subject="ops", role=Role.OPERATOR, tenants={"a", "b"})
    assert ops.sees_all(("a",))
    assert ops.sees_all(("a", "b"))
    assert not ops.sees_all(("a", "c"))  # one tenant it does not see hides the run
    assert not ops.sees_all(None)  # a run stored without a scope: admins only
