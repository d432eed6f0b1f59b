"""aegis_edge_core: the sans-I/O domain library of aegis-edge.

Nothing in this package opens a socket or a file, starts a thread or a task, sleeps, reads
the clock or draws randomness by itself. Callers pass ``now`` (seconds since the Unix epoch,
as a float) and random bytes or a ``random.Random`` in, and get values, events or lists of
actions back. See ``docs/embedding.md`` for a tour.
"""

from __future__ import annotations

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
"""Major version of the daemon stream protocol (``aegis.edge.v1``)."""
DEFAULT_HEARTBEAT_INTERVAL_SECS = 30.0
"""How often daemons heartbeat, told to each daemon when the relay accepts its stream.

Here rather than in :mod:`aegis_edge_core.health` (which re-exports it): the daemon needs
only this number of the relay's health rules."""

__all__ = ["DEFAULT_HEARTBEAT_INTERVAL_SECS", "PROTOCOL_VERSION", "__version__"]
