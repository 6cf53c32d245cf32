"""The one exception type the wire layer raises for malformed input.

Every parser in daemon/wire checks lengths before it reads a field, so bad
bytes from the TUN surface as ``WireError`` (with a message saying which
check failed), never as an IndexError or struct.error from deep inside.  The
I/O shell catches ``WireError`` at the edge, counts it and drops the packet.
"""

from __future__ import annotations


class WireError(ValueError):
    """A packet or header is malformed: too short, bad length field, bad checksum."""
