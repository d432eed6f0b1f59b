"""The errors of :class:`~.client.AdminClient`: one base, :class:`AdminError`, carrying the
relay's sentence and gRPC status, and a subclass for each case a caller branches on."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import grpc

__all__ = [
    "AdminAlreadyExists",
    "AdminError",
    "AdminFailedPrecondition",
    "AdminInvalidArgument",
    "AdminNotFound",
    "AdminPermissionDenied",
    "AdminSettingsError",
    "AdminUnauthenticated",
    "AdminUnavailable",
    "error_class",
]


class AdminError(Exception):
    """An Admin call failed. ``str(err)`` is one line for people: the relay's sentence, or
    for a relay that could not answer at all, what happened and what to check.

    ``code`` is the gRPC status (None for :class:`AdminSettingsError`, raised before any
    call); ``details`` is the relay's sentence as it sent it.
    """

    def __init__(
        self, message: str, *, code: grpc.StatusCode | None = None, details: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details


class AdminSettingsError(AdminError):
    """Where the relay is, its CA or the token is missing or unusable; nothing was sent.

    The message names the ``aegis`` flag and the environment variable of the setting
    (``--relay`` / ``AEGIS_RELAY``), the two ways it is usually given; ``setting`` names it
    for code: ``relay``, ``ca_cert``, ``token`` or ``data_dir``.
    """

    def __init__(self, message: str, *, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


class AdminNotFound(AdminError):
    """No such daemon, run or group -- or one outside the token's tenants, which the relay
    answers the same way so a token learns nothing about other tenants."""


class AdminAlreadyExists(AdminError):
    """The thing to create exists already (a group of that name in that tenant)."""


class AdminPermissionDenied(AdminError):
    """The token's role may not make this call (a viewer starting a run)."""


class AdminUnauthenticated(AdminError):
    """The token was refused: expired, revoked, forged or for another relay."""


class AdminInvalidArgument(AdminError):
    """The request is malformed: a selector, mode, tenant id or argument the relay refuses."""


class AdminFailedPrecondition(AdminError):
    """The request is well formed but the state forbids it (cancel a finished run, rerun
    one still running)."""


class AdminUnavailable(AdminError):
    """The relay did not answer: not running, unreachable, or its TLS certificate is not
    signed by the CA given. Worth retrying after a pause; nothing was done."""


def error_class(code: grpc.StatusCode | None) -> type[AdminError]:
    """The subclass for a status code; :class:`AdminError` itself for the others."""
    import grpc

    return {
        grpc.StatusCode.NOT_FOUND: AdminNotFound,
        grpc.StatusCode.ALREADY_EXISTS: AdminAlreadyExists,
        grpc.StatusCode.PERMISSION_DENIED: AdminPermissionDenied,
        grpc.StatusCode.UNAUTHENTICATED: AdminUnauthenticated,
        grpc.StatusCode.INVALID_ARGUMENT: AdminInvalidArgument,
        grpc.StatusCode.FAILED_PRECONDITION: AdminFailedPrecondition,
        grpc.StatusCode.UNAVAILABLE: AdminUnavailable,
    }.get(code, AdminError)  # type: ignore[arg-type]
