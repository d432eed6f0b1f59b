"""A dict-backed :class:`~aegis_edge_core.policy.HostPaths` for unit tests of the policy.

It models a merged-/usr host: ``/bin`` is a symlink to ``/usr/bin``, every listed program
lives in ``/usr/bin``, and the daemon's PATH is ``/usr/bin``. Tests of the real resolver over
a real tree (symlinks, ``..``) use the agent's ``DaemonPaths`` instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs

PROGRAMS = ("uptime", "ls", "rm", "echo", "id", "env", "systemctl", "sh", "touch", "printf")


@attrs.frozen
class FakePaths:
    programs: Mapping[str, str]
    """What ``program(word)`` answers, for bare names and absolute paths alike."""
    directories: Mapping[str, str]

    def program(self, word: str) -> str | None:
        return self.programs.get(word)

    def directory(self, path: str) -> str | None:
        return self.directories.get(path)


def fake_paths(
    names: Iterable[str] = PROGRAMS,
    *,
    extra: Mapping[str, str] | None = None,
    directories: Mapping[str, str] | None = None,
) -> FakePaths:
    programs: dict[str, str] = {}
    for name in names:
        real = f"/usr/bin/{name}"
        programs.update({name: real, real: real, f"/bin/{name}": real})
    programs.update(extra or {})
    dirs = {"/": "/", "/usr": "/usr", "/usr/bin": "/usr/bin", "/bin": "/usr/bin"}
    dirs.update(directories or {})
    return FakePaths(programs, dirs)


PATHS = fake_paths(extra={"/opt/aegis/upgrade.sh": "/opt/aegis/upgrade.sh"})
