"""Join bundles and the cluster's CA, without a relay: files, modes and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aegis_edge_relay.membership import (
    check_cluster_store,
    install_bundle,
    read_join_bundle,
    url_without_password,
    write_cluster_json,
    write_join_bundle,
)
from aegis_edge_relay.startup import StartupError
from aegis_edge_relay.tls import ensure_tls


def cluster_dir(tmp_path: Path, name: str = "a") -> Path:
    data = tmp_path / name
    data.mkdir()
    ensure_tls(data, "127.0.0.1")
    write_cluster_json(
        data, "prod", "postgresql://relay:s3cret@db:5432/st?password=x&sslmode=require"
    )
    return data


def test_the_url_keeps_everything_but_the_password() -> None:
    assert (
        url_without_password("postgresql://relay:s3cret@db:5432/st?password=x&sslmode=require")
        == "postgresql://relay@db:5432/st?sslmode=require"
    )
    assert url_without_password("postgresql://db/st") == "postgresql://db/st"


def test_a_bundle_is_0600_carries_no_password_and_installs_the_same_ca(tmp_path: Path) -> None:
    a = cluster_dir(tmp_path)
    out = tmp_path / "bundle.json"
    write_join_bundle(a, out)
    assert out.stat().st_mode & 0o777 == 0o600
    assert "s3cret" not in out.read_text() and "password" not in out.read_text()
    bundle = read_join_bundle(out)
    assert (
        bundle.cluster == "prod" and bundle.store == "postgresql://relay@db:5432/st?sslmode=require"
    )
    assert "ca_key" not in repr(bundle) and "PRIVATE" not in repr(bundle)

    b = tmp_path / "b"
    b.mkdir()
    install_bundle(bundle, b)
    assert (b / "ca.pem").read_bytes() == (a / "ca.pem").read_bytes()
    assert (b / "ca.key").stat().st_mode & 0o777 == 0o600
    install_bundle(bundle, b)  # a restart with the same bundle is fine
    assert ensure_tls(b, "127.0.0.1").ca_der == ensure_tls(a, "127.0.0.1").ca_der


def test_a_data_dir_with_another_ca_is_refused_not_overwritten(tmp_path: Path) -> None:
    a = cluster_dir(tmp_path)
    write_join_bundle(a, tmp_path / "bundle.json")
    other = cluster_dir(tmp_path, "other")
    before = (other / "ca.pem").read_bytes()
    with pytest.raises(StartupError, match="already holds another CA"):
        install_bundle(read_join_bundle(tmp_path / "bundle.json"), other)
    assert (other / "ca.pem").read_bytes() == before


def test_damaged_bundles_and_non_cluster_dirs_are_named_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    for body in ("not json", json.dumps({"version": 2}), json.dumps({"version": 1})):
        bad.write_text(body)
        with pytest.raises(StartupError, match="not a join bundle") as info:
            read_join_bundle(bad)
        assert str(bad) in str(info.value)
    plain = tmp_path / "plain"
    plain.mkdir()
    ensure_tls(plain, "127.0.0.1")
    with pytest.raises(StartupError, match="--cluster NAME"):
        write_join_bundle(plain, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_a_cluster_needs_a_postgresql_store() -> None:
    for url in (None, "", "sqlite:///x"):
        with pytest.raises(StartupError, match="needs a PostgreSQL store"):
            check_cluster_store("prod", url)
    check_cluster_store("prod", "postgres://db/st")
