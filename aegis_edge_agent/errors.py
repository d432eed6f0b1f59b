"""Why the daemon stops or redials, and the exit codes it stops with."""

from __future__ import annotations

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_REVOKED", "ConnectFailed", "Fatal", "Revoked"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_REVOKED = 3


class Revoked(Exception):
    """The relay says this node is revoked: stop, do not retry."""


class Fatal(Exception):
    """Retrying cannot help (credentials gone or unreadable): stop with this message."""

    def __init__(self, message: str, *, exit_code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class ConnectFailed(Exception):
    """This attempt failed; the reconnect loop tries again (after ``retry_after`` if set)."""

    def __init__(self, message: str, *, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after
