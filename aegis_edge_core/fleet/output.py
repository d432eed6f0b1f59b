"""Live output of a fleet run, bounded: what the relay forwards and what a watcher keeps.

Theory of operation
-------------------

Daemons stream a command's output to the relay in chunks (``CommandOutput``), up to the
host's ``output_cap_bytes`` per stream. Operators who follow a run (``fleet run --follow``,
``fleet watch --follow``) want those lines as they arrive, prefixed by host, as pssh and
salt print them. A chatty command (``yes``, a debug log) must not be able to flood the
relay's event loop, its memory or the operator's terminal, so two bounds stand between a
chunk and a terminal:

1. :class:`OutputGate` -- one per run, at the relay. Each chunk is cut into *segments*
   (a line with its ``\\n``, or at most ``max_line_bytes`` of a longer line) and admitted
   segment by segment while four token buckets all have room: bytes and lines of this
   target, bytes and lines of the whole run (:class:`OutputLimits`). The first segment
   that does not fit ends the chunk: it and the rest are dropped, so what is forwarded is
   always a prefix of what was received, and the order of lines never changes.
2. :class:`WatcherBuffer` -- one per watcher (an open event stream). Output waits there
   until the watcher's connection takes it; past ``max_bytes`` of waiting output, new
   output for that watcher is dropped. A slow watcher loses output, the relay's memory
   does not grow, and no other watcher notices. Control items (a target finished, the
   run finished) are never dropped: there are at most a few per target.

Nothing is dropped silently. Every dropped byte is counted for its target and reported
with the next item that reaches the watcher for that target -- the next output chunk, or a
marker just before that target's ``target_finished`` -- as ``dropped_before``; the CLI
prints it as :func:`dropped_marker` (``[N bytes of output dropped]``). So for every target,
bytes delivered + bytes reported dropped = bytes the daemon streamed.

Transition table of one segment at the gate:

==============================  =====================================================
all four buckets have room      taken from each; forwarded
any bucket lacks room           this and every later segment of the chunk are dropped
                                and counted; buckets untouched
==============================  =====================================================

:class:`LineAssembler` is the watcher's side: chunks in, whole lines out (a partial line
waits for its end, or is flushed when the target ends), decoded leniently.

Like the rest of the core this module does no I/O and reads no clock: ``now`` comes in.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping
from typing import Final, Generic, TypeVar

import attrs

from aegis_edge_core.ratelimit import Limit, TokenBucket

__all__ = [
    "DEFAULT_OUTPUT_LIMITS",
    "DEFAULT_WATCHER_BYTES",
    "Admitted",
    "Delivery",
    "LineAssembler",
    "OutputGate",
    "OutputLimits",
    "WatcherBuffer",
    "dropped_marker",
    "host_label",
]

T = TypeVar("T")

DEFAULT_WATCHER_BYTES: Final = 256 * 1024
"""Output a watcher may have waiting before new output for it is dropped."""

_HOST_LABEL: Final = "hostname"
_MAX_HOST_LABEL: Final = 64


def dropped_marker(dropped: int) -> str:
    """The line a watcher prints where output was dropped: ``[N bytes of output dropped]``."""
    return f"[{dropped} bytes of output dropped]"


def host_label(node_id: str, labels: Mapping[str, str]) -> str:
    """The prefix for a target's output lines: its ``hostname`` label if it has a usable
    one (printable, no spaces, at most 64 characters), else its node id."""
    name = labels.get(_HOST_LABEL, "")
    if (
        0 < len(name) <= _MAX_HOST_LABEL
        and name.isprintable()
        and not any(c.isspace() for c in name)
    ):
        return name
    return node_id


def _limit(burst: float, per_sec: float) -> Limit:
    return Limit(burst=burst, rate=per_sec)


def _positive_int(_inst: object, attr: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{attr.name} must be a whole number >= 1, got {value!r}")


def _limit_value(_inst: object, attr: attrs.Attribute[Limit], value: Limit) -> None:
    if not isinstance(value, Limit):
        raise TypeError(f"{attr.name} must be a Limit, got {value!r}")


@attrs.frozen(kw_only=True)
class OutputLimits:
    """The gate's four buckets and the longest segment.

    Each :class:`~aegis_edge_core.ratelimit.Limit` is a burst refilled at a rate per
    second. The defaults let a normal command's output through untouched (a burst of 64
    KiB or 400 lines per target) and bound a run to 64 KiB and 400 lines per second once
    its bursts are spent -- about what a terminal can show and a person can read.
    """

    target_bytes: Limit = attrs.field(
        factory=lambda: _limit(64 * 1024, 16 * 1024), validator=_limit_value
    )
    target_lines: Limit = attrs.field(factory=lambda: _limit(400, 100), validator=_limit_value)
    run_bytes: Limit = attrs.field(
        factory=lambda: _limit(256 * 1024, 64 * 1024), validator=_limit_value
    )
    run_lines: Limit = attrs.field(factory=lambda: _limit(2000, 400), validator=_limit_value)
    max_line_bytes: int = attrs.field(default=4096, validator=_positive_int)

    def __attrs_post_init__(self) -> None:
        if self.max_line_bytes > min(self.target_bytes.burst, self.run_bytes.burst):
            raise ValueError(
                "max_line_bytes must not exceed the byte bursts, or a long line could never pass"
            )


DEFAULT_OUTPUT_LIMITS: Final = OutputLimits()


@attrs.frozen(kw_only=True)
class Admitted:
    """What the gate lets through of one chunk: a prefix of each stream, and the bytes of
    this target dropped since its last forwarded chunk (including this chunk's rest)."""

    stdout: bytes = b""
    stderr: bytes = b""
    dropped_before: int = 0


@attrs.define
class _TargetBuckets:
    data: TokenBucket
    lines: TokenBucket
    dropped: int = 0


class OutputGate:
    """Per-run admission of live output (see the module docstring for the rules)."""

    def __init__(self, limits: OutputLimits = DEFAULT_OUTPUT_LIMITS, *, now: float) -> None:
        self.limits = limits
        self._run_bytes = TokenBucket.full(limits.run_bytes, now)
        self._run_lines = TokenBucket.full(limits.run_lines, now)
        self._targets: dict[str, _TargetBuckets] = {}
        self.forwarded_bytes = 0
        self.dropped_bytes = 0

    def _target(self, node_id: str, now: float) -> _TargetBuckets:
        target = self._targets.get(node_id)
        if target is None:
            target = _TargetBuckets(
                TokenBucket.full(self.limits.target_bytes, now),
                TokenBucket.full(self.limits.target_lines, now),
            )
            self._targets[node_id] = target
        return target

    def _prefix(self, data: bytes, target: _TargetBuckets, now: float) -> int:
        """How many leading bytes of ``data`` fit; takes their tokens."""
        pos, size, longest = 0, len(data), self.limits.max_line_bytes
        buckets = (target.data, target.lines, self._run_bytes, self._run_lines)
        while pos < size:
            newline = data.find(b"\n", pos, pos + longest)
            end = newline + 1 if newline >= 0 else min(size, pos + longest)
            costs = (end - pos, 1, end - pos, 1)
            if not all(b.peek(now, c).allowed for b, c in zip(buckets, costs, strict=True)):
                break
            for bucket, cost in zip(buckets, costs, strict=True):
                bucket.take(now, cost)
            pos = end
        return pos

    def admit(
        self,
        node_id: str,
        now: float,
        *,
        stdout: bytes = b"",
        stderr: bytes = b"",
        lost_before: int = 0,
    ) -> Admitted | None:
        """Admit what fits of one chunk; ``None`` when nothing is to be forwarded now (the
        chunk was dropped whole: its bytes wait in the count for the next item).
        ``lost_before``: bytes of this target lost before the chunk reached the gate (on
        its way from another relay), counted and reported as the gate's own drops are."""
        if lost_before < 0:
            raise ValueError("lost_before counts bytes: it cannot be negative")
        target = self._target(node_id, now)
        out_n = self._prefix(stdout, target, now) if stdout else 0
        err_n = self._prefix(stderr, target, now) if stderr else 0
        dropped = (len(stdout) - out_n) + (len(stderr) - err_n) + lost_before
        self.dropped_bytes += dropped
        self.forwarded_bytes += out_n + err_n
        target.dropped += dropped
        if out_n == 0 and err_n == 0:
            return None
        admitted = Admitted(
            stdout=stdout[:out_n], stderr=stderr[:err_n], dropped_before=target.dropped
        )
        target.dropped = 0
        return admitted

    def finish(self, node_id: str) -> int:
        """The target ended: forget its buckets; returns its dropped bytes not yet reported."""
        target = self._targets.pop(node_id, None)
        return target.dropped if target is not None else 0


@attrs.frozen(kw_only=True)
class Delivery(Generic[T]):
    """One item out of a :class:`WatcherBuffer`.

    ``item`` is ``None`` for a *marker*: only ``dropped_before`` bytes of ``node_id``'s
    output were lost and nothing else is to show. For output items, ``dropped_before`` is
    what was lost of that target just before this item.
    """

    item: T | None
    node_id: str | None = None
    dropped_before: int = 0
    output: bool = False


class WatcherBuffer(Generic[T]):
    """One watcher's queue: bounded output, unbounded (but few) control items."""

    def __init__(self, max_bytes: int = DEFAULT_WATCHER_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self.max_bytes = max_bytes
        self.waiting_bytes = 0
        self.dropped_bytes = 0
        self._queue: collections.deque[tuple[Delivery[T], int]] = collections.deque()
        self._lost: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._queue)

    def push_output(self, node_id: str, item: T, *, size: int, dropped_before: int = 0) -> bool:
        """Queue an output item of ``size`` bytes, or drop it if the watcher is too far
        behind; returns whether it was queued."""
        lost = self._lost.pop(node_id, 0) + dropped_before
        if self.waiting_bytes + size > self.max_bytes:
            self._lost[node_id] = lost + size
            self.dropped_bytes += size
            return False
        self.waiting_bytes += size
        self._queue.append(
            (Delivery(item=item, node_id=node_id, dropped_before=lost, output=True), size)
        )
        return True

    def note_dropped(self, node_id: str, dropped: int) -> None:
        """Output of ``node_id`` lost before it reached this buffer (the gate's rest)."""
        if dropped > 0:
            self._lost[node_id] = self._lost.get(node_id, 0) + dropped

    def push_control(self, item: T, *, node_id: str | None = None) -> None:
        """Queue an item that must arrive (never dropped). If it ends ``node_id``'s output,
        a marker for that target's unreported drops goes first."""
        if node_id is not None:
            lost = self._lost.pop(node_id, 0)
            if lost:
                self._queue.append(
                    (Delivery(item=None, node_id=node_id, dropped_before=lost, output=True), 0)
                )
        self._queue.append((Delivery(item=item, node_id=node_id), 0))

    def pop(self) -> Delivery[T] | None:
        if not self._queue:
            return None
        delivery, size = self._queue.popleft()
        self.waiting_bytes -= size
        return delivery


@attrs.define
class LineAssembler:
    """Chunks of one target's streams in, whole lines out.

    A line longer than ``max_line_bytes`` is cut there rather than held; :meth:`flush`
    returns what is left when the target ends. Bytes that are not UTF-8 are replaced.
    """

    max_line_bytes: int = 4096
    _partial: dict[tuple[str, str], bytearray] = attrs.field(factory=dict)

    def feed(self, node_id: str, stream: str, data: bytes) -> list[str]:
        buf = self._partial.setdefault((node_id, stream), bytearray())
        buf += data
        lines: list[str] = []
        pos, longest = 0, self.max_line_bytes
        while True:
            newline = buf.find(b"\n", pos, pos + longest)
            if newline >= 0:
                end, cut = newline, newline + 1
            elif len(buf) - pos >= longest:
                end = cut = pos + longest
            else:
                break
            lines.append(bytes(buf[pos:end]).decode("utf-8", "replace").rstrip("\r"))
            pos = cut
        del buf[:pos]
        return lines

    def flush(self, node_id: str) -> list[tuple[str, str]]:
        """(stream, line) for what is left of ``node_id``'s partial lines."""
        out: list[tuple[str, str]] = []
        for stream in ("stdout", "stderr"):
            buf = self._partial.pop((node_id, stream), None)
            if buf:
                out.append((stream, bytes(buf).decode("utf-8", "replace").rstrip("\r")))
        return out
