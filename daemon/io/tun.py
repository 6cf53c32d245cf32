"""The daemon's TUN device, with virtio-net offloads when the kernel allows.

Why offloads (DESIGN.md "Performance"): one Python read per 1500-byte
packet tops out near 0.15 GB/s; with IFF_VNET_HDR + TUNSETOFFLOAD the kernel
hands over 64 KB GSO super-packets and accepts them back whole, ~10x more.

Modes:
* ``"offload"``: every packet on the fd is preceded by a 10-byte
  virtio_net_hdr (daemon.wire.vnet).  TUN_F_CSUM means most packets arrive
  with NEEDS_CSUM (a partial TCP checksum, see daemon.wire.checksum) and we
  may write such packets; TUN_F_TSO4/6/ECN mean GSO super-packets both ways.
* ``"plain"``: no header; every packet is a complete, checksummed IP packet
  of at most the MTU.  Used when the kernel refuses the offloads, or forced.

The fd is non-blocking: ``read`` raises BlockingIOError when nothing is
queued, for the event loop to wait on ``fileno()``.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
from collections.abc import Iterable
from typing import Any, Literal

import pytun

from daemon.wire.error import WireError
from daemon.wire.vnet import VNET_HDR_LEN, VnetHeader

# linux/if_tun.h.  _IOW('T', nr, type) = (1 << 30) | (sizeof(type) << 16) | ('T' << 8) | nr
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNSETVNETHDRSZ = 0x400454D8  # _IOW('T', 216, int)
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN

# The largest IP packet (64 KB - 1, a GSO super-packet at most) plus the header.
READ_BUFFER_LEN = 65535 + VNET_HDR_LEN

TunMode = Literal["offload", "plain"]


def new_read_buffer() -> bytearray:
    """A buffer large enough for any packet ``TunDevice.read`` can return."""
    return bytearray(READ_BUFFER_LEN)


class TunDevice:
    """A TUN interface (IFF_TUN | IFF_NO_PI) opened in the calling thread's netns."""

    def __init__(self, name: str, *, offload: bool = True) -> None:
        """Create ``name``; try offload mode unless ``offload`` is False.

        If the kernel refuses IFF_VNET_HDR or any of the offloads, the device
        is reopened without them and ``mode`` says "plain".
        """
        self.name = name
        self.mode: TunMode = "plain"
        self._dev: Any = None
        if offload:
            try:
                self._dev = self._open_offload(name)
                self.mode = "offload"
            except OSError:
                self._dev = None
        if self._dev is None:
            self._dev = pytun.TunTapDevice(name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI)
        self._fd: int = self._dev.fileno()
        os.set_blocking(self._fd, False)
        self._zero_vnet = VnetHeader().to_bytes()

    @staticmethod
    def _open_offload(name: str) -> Any:
        dev = pytun.TunTapDevice(
            name=name, flags=pytun.IFF_TUN | pytun.IFF_NO_PI | pytun.IFF_VNET_HDR
        )
        try:
            fcntl.ioctl(dev.fileno(), TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            fcntl.ioctl(dev.fileno(), TUNSETOFFLOAD, OFFLOADS)
        except OSError:
            dev.close()
            raise
        return dev

    @property
    def offload(self) -> bool:
        return self.mode == "offload"

    def fileno(self) -> int:
        return self._fd

    def read(self, buffer: bytearray) -> tuple[VnetHeader | None, memoryview]:
        """Read one packet into ``buffer`` (at least READ_BUFFER_LEN bytes, reused).

        Returns the virtio header (None in plain mode) and a view of the IP
        packet inside ``buffer``: valid until the next read into it.  Raises
        BlockingIOError when no packet is queued, WireError for a read too
        short to hold the virtio header.
        """
        n = os.readv(self._fd, [buffer])
        view = memoryview(buffer)[:n]
        if self.mode == "plain":
            return None, view
        if n < VNET_HDR_LEN:
            raise WireError(f"TUN: read of {n} bytes, no room for a virtio_net_hdr")
        return VnetHeader.parse(view), view[VNET_HDR_LEN:]

    def write(
        self, vnet_hdr: bytes | bytearray | None, packet: bytes | bytearray | memoryview
    ) -> int:
        """Write one IP packet; in offload mode ``vnet_hdr`` goes in front (None: all zeros).

        In plain mode there is no header and the packet's checksums must be
        complete; passing a header then is a caller bug (ValueError), since a
        NEEDS_CSUM or GSO packet would go out corrupt.  Returns the bytes
        written, header included.
        """
        if self.mode == "plain":
            if vnet_hdr is not None:
                raise ValueError("TUN in plain mode: no virtio_net_hdr may be written")
            return os.write(self._fd, packet)
        return os.writev(self._fd, [self._zero_vnet if vnet_hdr is None else vnet_hdr, packet])

    def close(self) -> None:
        if self._dev is not None:
            self._dev.close()
            self._dev = None

    def __enter__(self) -> TunDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def configure_tun(
    ipr: Any,
    name: str,
    *,
    mtu: int = 1500,
    addresses: Iterable[tuple[str, int]] = (),
    routes: Iterable[str] = (),
) -> int:
    """Bring ``name`` up with ``mtu``, add ``addresses`` and route ``routes`` into it.

    ``ipr`` is a pyroute2 IPRoute (or NetNS) handle for the device's
    namespace; ``addresses`` are (address, prefixlen) pairs, ``routes``
    destination prefixes like "198.51.100.0/24".  Returns the ifindex.
    Remember DESIGN.md: the daemon's own endpoint addresses must be routed
    into the TUN, not be local addresses of the namespace.
    """
    found = ipr.link_lookup(ifname=name)
    if not found:
        raise OSError(f"no interface {name!r} in this namespace")
    index = int(found[0])
    ipr.link("set", index=index, mtu=mtu, state="up")
    for address, prefixlen in addresses:
        ipr.addr("add", index=index, address=address, prefixlen=prefixlen)
    for dst in routes:
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        ipr.route("add", dst=dst, oif=index, family=family)
    return index
