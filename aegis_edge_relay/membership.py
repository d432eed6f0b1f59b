"""Joining a cluster: the cluster row, the shared CA, and the join bundle that carries it.

Several relays over one PostgreSQL store are one cluster (``--cluster NAME``). They share
one CA, so one ``cap`` pin in an enrollment token covers every relay: each relay signs its
own server certificate with the cluster CA. The CA's *certificate* is in the store (the
``clusters`` row the first relay creates); its *private key* never is. A second relay gets
the key from a join bundle the operator copies from a relay of the cluster::

    aegis relay join-bundle --data-dir D1 --out bundle.json    # on relay 1 (0600 file)
    aegis relay serve --data-dir D2 --join-bundle bundle.json  # on relay 2

The bundle holds the cluster name, the store URL *without* its password (give that with
``--store``/``AEGIS_STORE_URL``, or PGPASSWORD/.pgpass), and the CA certificate and key.
A relay whose CA is not the cluster's refuses to start: its daemons would pin another CA.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Any, Final

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from aegis_edge_core.identity import ca_pin
from aegis_edge_relay.files import atomic_write
from aegis_edge_relay.startup import StartupError
from aegis_edge_relay.store import StoreWorker
from aegis_edge_relay.tls import CA_CERT, CA_KEY

__all__ = [
    "CLUSTER_JSON",
    "JoinBundle",
    "check_cluster_store",
    "install_bundle",
    "join_cluster",
    "read_join_bundle",
    "url_without_password",
    "write_cluster_json",
    "write_join_bundle",
]

CLUSTER_JSON: Final = "cluster.json"
"""``D/cluster.json``: the cluster a relay serves in and its store (no password), for
``aegis relay join-bundle``."""

_BUNDLE_VERSION: Final = 1
_POSTGRES_SCHEMES: Final = ("postgresql", "postgres")


def url_without_password(url: str) -> str:
    """``url`` with any password left out (not masked: the bundle's URL must connect)."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}@{hostport}"
    query = urllib.parse.urlencode(
        [
            (k, v)
            for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if k != "password"
        ]
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def check_cluster_store(cluster: str, store_url: str | None) -> None:
    """``--cluster`` needs the shared PostgreSQL store; SQLite is one relay's file."""
    scheme = urllib.parse.urlsplit(store_url or "").scheme.lower()
    if scheme not in _POSTGRES_SCHEMES:
        raise StartupError(
            f"--cluster {cluster}: a cluster needs a PostgreSQL store shared by its relays; "
            "pass --store postgresql://USER@HOST/DB (or AEGIS_STORE_URL)"
        )


def _pem_of(der: bytes) -> str:
    cert = x509.load_der_x509_certificate(der)
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _pin_of_pem(pem: str) -> str:
    cert = x509.load_pem_x509_certificate(pem.encode("ascii"))
    return ca_pin(cert.public_bytes(serialization.Encoding.DER))


async def join_cluster(db: StoreWorker, name: str, ca_der: bytes, now: float) -> None:
    """Create cluster ``name`` with this relay's CA, or check that the CA is the cluster's."""
    stored = await db.call(db.store.join_cluster, name, _pem_of(ca_der), now)
    if _pin_of_pem(stored) != ca_pin(ca_der):
        raise StartupError(
            f"this relay's CA is not cluster {name!r}'s (CA sha256 {ca_pin(ca_der)[:16]}... "
            f"vs {_pin_of_pem(stored)[:16]}...); start it with --join-bundle from a relay of "
            "the cluster, on a fresh --data-dir"
        )


def write_cluster_json(data_dir: Path, cluster: str, store_url: str) -> None:
    body = {"cluster": cluster, "store": url_without_password(store_url)}
    atomic_write(data_dir / CLUSTER_JSON, json.dumps(body, indent=2).encode() + b"\n", mode=0o644)


@attrs.frozen(kw_only=True)
class JoinBundle:
    cluster: str
    store: str
    ca_cert: str
    ca_key: str = attrs.field(repr=False)


def write_join_bundle(data_dir: Path, out: Path) -> JoinBundle:
    """Write the join bundle of the cluster relay in ``data_dir`` to ``out`` (0600)."""
    try:
        info = json.loads((data_dir / CLUSTER_JSON).read_text())
        bundle = JoinBundle(
            cluster=str(info["cluster"]),
            store=str(info["store"]),
            ca_cert=(data_dir / CA_CERT).read_text(),
            ca_key=(data_dir / CA_KEY).read_text(),
        )
    except (OSError, ValueError, KeyError) as err:
        raise StartupError(
            f"{data_dir}: no cluster relay's data dir ({err}); start its relay with "
            "--cluster NAME --store postgresql://... first"
        ) from None
    body: dict[str, Any] = {"version": _BUNDLE_VERSION, **attrs.asdict(bundle)}
    atomic_write(out, json.dumps(body, indent=2).encode() + b"\n", mode=0o600)
    return bundle


def read_join_bundle(path: Path) -> JoinBundle:
    try:
        body = json.loads(path.read_text())
        if body.get("version") != _BUNDLE_VERSION:
            raise ValueError(f"version {body.get('version')!r}, not {_BUNDLE_VERSION}")
        bundle = JoinBundle(
            cluster=str(body["cluster"]),
            store=str(body["store"]),
            ca_cert=str(body["ca_cert"]),
            ca_key=str(body["ca_key"]),
        )
        x509.load_pem_x509_certificate(bundle.ca_cert.encode("ascii"))
        serialization.load_pem_private_key(bundle.ca_key.encode("ascii"), None)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        # the error names the file, never its contents (they hold the CA key)
        raise StartupError(
            f"--join-bundle {path}: not a join bundle ({type(err).__name__}); write one "
            "with `aegis relay join-bundle --data-dir D --out FILE` on a relay of the cluster"
        ) from None
    return bundle


def install_bundle(bundle: JoinBundle, data_dir: Path) -> None:
    """Put the bundle's CA in ``data_dir`` (the server certificate is then signed by it);
    a data dir that already holds another CA is refused, not overwritten."""
    ca_path, key_path = data_dir / CA_CERT, data_dir / CA_KEY
    if ca_path.exists() or key_path.exists():
        have = ca_path.read_text() if ca_path.exists() else ""
        if have.strip() != bundle.ca_cert.strip() or not key_path.exists():
            raise StartupError(
                f"{data_dir} already holds another CA than cluster {bundle.cluster!r}'s; "
                "use a fresh --data-dir with --join-bundle"
            )
        return
    atomic_write(key_path, bundle.ca_key.encode("ascii"), mode=0o600)
    atomic_write(ca_path, bundle.ca_cert.encode("ascii"), mode=0o644)
