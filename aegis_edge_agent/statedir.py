"""The state directory on disk: atomic writes, modes, and loading with clear errors.

Names, modes and formats are the core's (:mod:`aegis_edge_core.hoststate`); this module
does the file I/O around them.
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

from aegis_edge_core import hoststate as hs
from aegis_edge_core.identity import NodeKey, load_node_key, peek_node_token
from aegis_edge_core.identity.errors import TokenError
from aegis_edge_core.identity.tokens import NodeClaims
from aegis_edge_core.wire import stream_pb2

__all__ = ["StateDir", "atomic_write", "default_state_dir"]


def default_state_dir() -> Path:
    return Path(os.path.expanduser(hs.DEFAULT_STATE_DIR))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | str, *, mode: int) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same dir, fsync, rename.

    The temp file is created with ``mode`` from the start, so a secret is never readable by
    others, not even for a moment. A crash leaves either the old file or the new one.
    """
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


class StateDir:
    """One host's state directory."""

    def __init__(self, path: Path | str | None = None) -> None:
        self.path = Path(path).expanduser() if path is not None else default_state_dir()

    def __repr__(self) -> str:
        return f"StateDir({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def key_path(self) -> Path:
        return self.file(hs.NODE_KEY)

    @property
    def token_path(self) -> Path:
        return self.file(hs.NODE_TOKEN)

    @property
    def ca_path(self) -> Path:
        return self.file(hs.CA_PEM)

    @property
    def config_path(self) -> Path:
        return self.file(hs.CONFIG_FILE)

    @property
    def node_json_path(self) -> Path:
        return self.file(hs.NODE_JSON)

    @property
    def status_path(self) -> Path:
        return self.file(hs.STATUS_JSON)

    @property
    def logs_dir(self) -> Path:
        return self.file(hs.LOGS_DIR)

    # -- creation

    def ensure(self) -> None:
        """Create the directory (0700) if missing, and tighten its mode if it is looser."""
        self.path.mkdir(parents=True, exist_ok=True, mode=hs.DIR_MODE)
        st = self.path.stat()
        if st.st_mode & 0o077:
            os.chmod(self.path, hs.DIR_MODE)

    def tighten_modes(self) -> list[tuple[str, int]]:
        """Make the directory 0700 and every private file that exists 0600, where looser
        (state written by an older version, or by hand); returns ``(name, old mode)`` for
        each change so the caller can say so."""
        changed: list[tuple[str, int]] = []
        try:
            perm = stat.S_IMODE(self.path.stat().st_mode)
        except FileNotFoundError:
            return changed
        if perm & 0o077:
            os.chmod(self.path, hs.DIR_MODE)
            changed.append((".", perm))
        for name, mode in hs.REQUIRED_MODES.items():
            if mode != hs.SECRET_MODE:
                continue
            path = self.file(name)
            try:
                perm = stat.S_IMODE(path.lstat().st_mode)
            except FileNotFoundError:
                continue
            if perm & 0o077 and not stat.S_ISLNK(path.lstat().st_mode):
                os.chmod(path, hs.SECRET_MODE)
                changed.append((name, perm))
        return changed

    def write(self, name: str, data: bytes | str) -> None:
        atomic_write(self.file(name), data, mode=hs.REQUIRED_MODES.get(name, hs.SECRET_MODE))

    def existing_enrollment(self) -> list[str]:
        """The credential files of a live enrollment (see hoststate.enrollment_to_protect)."""
        names = (*hs.ENROLLMENT_FILES, hs.REVOKED_JSON)
        return hs.enrollment_to_protect(n for n in names if self.file(n).exists())

    def is_enrolled(self) -> bool:
        return self.key_path.exists() and self.node_json_path.exists()

    # -- loading

    def _read(self, name: str, *, what: str) -> bytes:
        path = self.file(name)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise hs.HostStateError(
                f"{what} is missing",
                source=str(path),
                hint="enroll this host first (aegis edge enroll <token>)",
            ) from None
        except PermissionError:
            raise hs.HostStateError(
                f"{what} is not readable by this user", source=str(path)
            ) from None

    def check_secret_mode(self, name: str) -> None:
        path = self.file(name)
        mode = path.stat().st_mode
        problem = hs.mode_problem(name, stat.S_IMODE(mode))
        if problem:
            raise hs.HostStateError(problem, source=str(path), hint="secrets must be 0600")

    def load_key(self) -> NodeKey:
        data = self._read(hs.NODE_KEY, what="the node key")
        self.check_secret_mode(hs.NODE_KEY)
        return load_node_key(data, source=str(self.key_path))

    def load_token(self) -> str:
        data = self._read(hs.NODE_TOKEN, what="the node token")
        self.check_secret_mode(hs.NODE_TOKEN)
        text = data.decode("utf-8", errors="replace").strip()
        if not text:
            raise hs.HostStateError(
                "the node token is empty",
                source=str(self.token_path),
                hint="re-enroll this host (aegis edge enroll <token> --force)",
            )
        try:
            peek_node_token(text)  # shape only: the relay verifies; an expired one is fine
        except TokenError as err:
            raise hs.HostStateError(
                f"the node token is damaged ({err.reason})",
                source=str(self.token_path),
                hint="restore node.token from a backup or re-enroll this host "
                "(aegis edge enroll <token> --force)",
            ) from None
        return text

    def token_claims(self) -> NodeClaims | None:
        """The node token's claims (unverified), or None if absent or unreadable."""
        try:
            return peek_node_token(self.load_token())
        except (hs.HostStateError, TokenError, OSError):
            return None

    def load_node(self) -> hs.NodeInfo:
        data = self._read(hs.NODE_JSON, what="node.json")
        return hs.parse_node_json(data, source=str(self.node_json_path))

    def load_ca(self) -> bytes:
        return self._read(hs.CA_PEM, what="the relay CA certificate")

    def load_status(self) -> hs.DaemonStatus | None:
        try:
            data = self.status_path.read_bytes()
        except FileNotFoundError:
            return None
        return hs.parse_status_json(data, source=str(self.status_path))

    def write_status(self, status: hs.DaemonStatus) -> None:
        self.write(hs.STATUS_JSON, status.to_json())

    # -- result spool

    def load_spool(self) -> tuple[list[stream_pb2.CommandResult], list[str]]:
        path = self.file(hs.RESULT_SPOOL)
        try:
            text = path.read_text("utf-8", errors="replace")
        except FileNotFoundError:
            return [], []
        return hs.decode_result_spool(text, source=str(path))

    def write_spool(self, results: Iterable[stream_pb2.CommandResult]) -> None:
        items = list(results)
        path = self.file(hs.RESULT_SPOOL)
        if not items:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        self.write(hs.RESULT_SPOOL, hs.encode_result_spool(items))

    # -- child pid spool

    def load_children(self) -> list[hs.ChildProcess]:
        path = self.file(hs.CHILD_PIDS)
        try:
            return hs.decode_child_pids(path.read_text("utf-8", errors="replace"), source=str(path))
        except FileNotFoundError:
            return []

    def write_children(self, children: Iterable[hs.ChildProcess]) -> None:
        items = list(children)
        path = self.file(hs.CHILD_PIDS)
        if not items:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return
        self.write(hs.CHILD_PIDS, hs.encode_child_pids(items))

    # -- logout

    def remove_credentials(self) -> list[str]:
        removed = []
        for name in (hs.NODE_TOKEN, hs.NODE_KEY):
            with contextlib.suppress(FileNotFoundError):
                self.file(name).unlink()
                removed.append(name)
        if removed:
            _fsync_dir(self.path)
        return removed
