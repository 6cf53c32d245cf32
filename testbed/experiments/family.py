"""The testbed as one address family sees it, for ``--family 6``.

Every experiment asks the testbed where the origin, the sink and each proxy
are (``tb.origin``, ``tb.spliced_socks``, ...).  ``IPv6View`` answers with
the IPv6 addresses of the same services and passes everything else through,
so the experiments run unchanged over IPv6, and the modes this suite
starts itself (dante, microsocks, tinyproxy, the second daemon of
spliced-py, http11-copy) are configured with the addresses it gives
(``modes.resolve``).
"""

from __future__ import annotations

from typing import Any

from testbed.net import Host, Testbed
from testbed.topology import SPLICE_SERVICE6


class IPv6View:
    """``tb`` with its services' IPv6 addresses; ``family`` says which view it is."""

    family = 6

    def __init__(self, tb: Testbed) -> None:
        self._tb = tb

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tb, name)

    def host(self, role: str) -> Host:
        """The host with its IPv6 addresses first (``addr`` is then IPv6)."""
        h = self._tb.host(role)
        return Host(h.role, h.ns, h.addrs6, h.addrs6)

    @property
    def origin(self) -> tuple[str, int]:
        return self._tb.origin6

    @property
    def sink(self) -> tuple[str, int]:
        return self._tb.sink6

    @property
    def socks(self) -> tuple[str, int]:
        return self._tb.socks6

    @property
    def spliced_socks(self) -> tuple[str, int]:
        return self._tb.spliced_socks6

    @property
    def endpoint_socks(self) -> tuple[str, int]:
        return self._tb.endpoint_socks6

    @property
    def kernel_socks(self) -> tuple[str, int]:
        return self._tb.kernel_socks6

    @property
    def http11_proxy(self) -> tuple[str, int]:
        return (SPLICE_SERVICE6, self._tb.http11_proxy[1])


def view(tb: Testbed, family: int) -> Any:
    """``tb`` itself for IPv4, its IPv6 view for 6."""
    return IPv6View(tb) if family == 6 else tb
