"""Where the relay is and how to prove who we are to it: :class:`Connection`, resolved from
arguments, the environment or a local relay's data directory, the same way for the SDK
and for every ``aegis edge`` operator command."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from aegis_edge_relay.operator.errors import AdminSettingsError

__all__ = [
    "ENV_CA_CERT",
    "ENV_RELAY",
    "ENV_RELAY_DATA_DIR",
    "ENV_TLS_SERVER_NAME",
    "ENV_TOKEN",
    "Connection",
]

ENV_RELAY: Final = "AEGIS_RELAY"
ENV_CA_CERT: Final = "AEGIS_CA_CERT"
ENV_TOKEN: Final = "AEGIS_OPERATOR_TOKEN"  # noqa: S105 -- a variable name, not a secret
ENV_TLS_SERVER_NAME: Final = "AEGIS_TLS_SERVER_NAME"
ENV_RELAY_DATA_DIR: Final = "AEGIS_RELAY_DATA_DIR"


@dataclass(frozen=True)
class Connection:
    """Where the relay is and how to prove who we are to it."""

    relay: str
    ca_pem: bytes
    token: str
    server_name: str = ""
    """TLS name to verify instead of the host of ``relay`` (``--tls-server-name``)."""
    insecure: bool = False
    """Plaintext, for a relay started with ``--insecure`` (``ca_pem`` is then empty)."""

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    def __repr__(self) -> str:  # the token never reaches a log line or traceback
        return f"Connection(relay={self.relay!r}, insecure={self.insecure})"

    @classmethod
    def resolve(
        cls,
        relay: str | None = None,
        *,
        ca_cert: str | None = None,
        token: str | None = None,
        tls_server_name: str | None = None,
        data_dir: str | None = None,
        insecure: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> Connection:
        """The settings from arguments first, then the environment.

        ``token`` may be ``@PATH``, a file holding it. ``data_dir`` (or
        ``AEGIS_RELAY_DATA_DIR``) fills whatever is not given from the ``relay.json`` a
        local ``aegis relay serve --data-dir D`` writes: its address, CA and admin token.
        Given as an argument it beats the environment; from the environment it only fills
        gaps. Raises :class:`AdminSettingsError`.
        """
        env = os.environ if environ is None else environ
        dir_arg = data_dir or ""
        data_dir = dir_arg or env.get(ENV_RELAY_DATA_DIR, "")
        info = _relay_json(data_dir) if data_dir else {}

        def pick(given: str | None, env_name: str, from_dir: str) -> tuple[str, bool]:
            if given:
                return given.strip(), False
            if dir_arg and from_dir:
                return from_dir, True
            if env.get(env_name, "").strip():
                return env[env_name].strip(), False
            return from_dir, bool(from_dir)

        address, address_from_dir = pick(relay, ENV_RELAY, _relay_from_json(info))
        if not address:
            raise AdminSettingsError(
                f"no relay address: pass --relay HOST:PORT or set {ENV_RELAY} "
                "(or --relay-data-dir D for a local relay)",
                setting="relay",
            )
        for scheme in ("grpcs://", "https://"):
            address = address.removeprefix(scheme)
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise AdminSettingsError(
                f"--relay: expected HOST:PORT, got {address!r}", setting="relay"
            )

        insecure = insecure or (address_from_dir and info.get("tls") is False)
        ca_pem = b""
        if not insecure:
            ca_from_dir = info.get("ca_cert") if isinstance(info.get("ca_cert"), str) else ""
            ca_path, _ = pick(ca_cert, ENV_CA_CERT, str(ca_from_dir or ""))
            if not ca_path:
                raise AdminSettingsError(
                    f"no CA certificate: pass --ca-cert PATH or set {ENV_CA_CERT} "
                    "(the relay writes it to <data-dir>/ca.pem)",
                    setting="ca_cert",
                )
            ca_pem = _read_file(ca_path, "CA certificate", "--ca-cert", "ca_cert")
            if b"-----BEGIN CERTIFICATE-----" not in ca_pem:
                raise AdminSettingsError(
                    f"--ca-cert: {ca_path!r} is not a PEM certificate", setting="ca_cert"
                )

        token_file = info.get("operator_token")
        secret, _ = pick(
            token, ENV_TOKEN, f"@{token_file}" if isinstance(token_file, str) and token_file else ""
        )
        if not secret:
            raise AdminSettingsError(
                f"no operator token: pass --token TOKEN (or @FILE) or set {ENV_TOKEN} "
                "(the relay writes an admin token to <data-dir>/operator.token)",
                setting="token",
            )
        if secret.startswith("@"):
            path = secret[1:]
            secret = _read_file(path, "token file", "--token", "token").decode("utf-8", "replace")
            secret = secret.strip()
            if not secret:
                raise AdminSettingsError(
                    f"--token: the token file {path!r} is empty", setting="token"
                )
        if any(ch.isspace() for ch in secret) or not secret.isprintable():
            raise AdminSettingsError(
                "--token: the operator token contains whitespace or control characters",
                setting="token",
            )
        server_name = (tls_server_name or env.get(ENV_TLS_SERVER_NAME, "")).strip()
        return cls(
            relay=address, ca_pem=ca_pem, token=secret, server_name=server_name, insecure=insecure
        )


def _read_file(path: str, what: str, flag: str, setting: str) -> bytes:
    try:
        with open(os.path.expanduser(path), "rb") as fh:
            return fh.read()
    except OSError as err:
        raise AdminSettingsError(
            f"{flag}: cannot read the {what} {path!r}: {err.strerror or err}", setting=setting
        ) from None


def _relay_json(data_dir: str) -> dict[str, Any]:
    path = os.path.join(os.path.expanduser(data_dir), "relay.json")
    raw = _read_file(path, "relay description", "--relay-data-dir", "data_dir")
    try:
        info = json.loads(raw)
    except ValueError as err:
        raise AdminSettingsError(
            f"--relay-data-dir: {path!r} is not JSON ({err})", setting="data_dir"
        ) from None
    if not isinstance(info, dict):
        raise AdminSettingsError(
            f"--relay-data-dir: {path!r} is not a JSON object", setting="data_dir"
        )
    return info


def _relay_from_json(info: Mapping[str, Any]) -> str:
    host, port = info.get("host"), info.get("port")
    if not isinstance(host, str) or not isinstance(port, int):
        listen = info.get("listen")
        return listen if isinstance(listen, str) else ""
    if host in ("", "0.0.0.0", "::", "[::]"):  # noqa: S104 -- a bind-all address, not a bind
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
