"""struct virtio_net_hdr: the 10-byte header in front of every packet on a
TUN opened with IFF_VNET_HDR (virtio spec 1.x 5.1.6, linux/virtio_net.h).

Layout (legacy header, no num_buffers): flags u8, gso_type u8, hdr_len u16,
gso_size u16, csum_start u16, csum_offset u16.  The 16-bit fields are in the
host's byte order for a legacy TUN (no TUNSETVNETLE); this project runs on
x86, so they are little-endian.

What the fields mean to us:
* ``flags & F_NEEDS_CSUM``: the transport checksum is partial (see
  daemon.wire.checksum); the checksum is computed over [csum_start, end) and
  stored at csum_start + csum_offset.
* ``gso_type`` / ``gso_size``: a TCP super-packet to be cut into segments of
  gso_size payload bytes (the MSS); ``GSO_ECN`` is or-ed in when CWR must be
  kept on the first segment only (RFC 3168 6.1.2).
* ``hdr_len``: a hint of the header length.  Never trusted on input (older
  kernels and other writers set it loosely); we compute it on output.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from daemon.wire.error import WireError

VNET_HDR_LEN = 10

F_NEEDS_CSUM = 1
F_DATA_VALID = 2

GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_ECN = 0x80

TCP_CSUM_OFFSET = 16  # offset of the checksum field inside the TCP header

_VNET = struct.Struct("<BBHHHH")


@dataclass(slots=True, frozen=True)
class VnetHeader:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0

    @property
    def needs_csum(self) -> bool:
        return self.flags & F_NEEDS_CSUM != 0

    @property
    def is_gso(self) -> bool:
        return self.gso_type & ~GSO_ECN != GSO_NONE

    @classmethod
    def parse(cls, buffer: bytes | bytearray | memoryview) -> VnetHeader:
        if len(buffer) < VNET_HDR_LEN:
            raise WireError(f"virtio_net_hdr: {len(buffer)} bytes, need {VNET_HDR_LEN}")
        return cls(*_VNET.unpack_from(buffer))

    def emit(self, buffer: bytearray | memoryview, offset: int = 0) -> None:
        _VNET.pack_into(
            buffer,
            offset,
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )

    def to_bytes(self) -> bytes:
        return _VNET.pack(
            self.flags,
            self.gso_type,
            self.hdr_len,
            self.gso_size,
            self.csum_start,
            self.csum_offset,
        )


# A packet whose checksums are complete and that needs no segmentation.
VNET_NONE = VnetHeader()


def vnet_header_for_tcp(
    ip_header_len: int,
    tcp_header_len: int,
    payload_len: int,
    mss: int,
    *,
    ipv6: bool = False,
    ecn: bool = False,
) -> VnetHeader:
    """Header for an outgoing TCP packet whose checksum field holds the partial sum.

    The packet is marked NEEDS_CSUM (the kernel, or the NIC, completes the
    checksum) and, when the payload exceeds ``mss``, as a GSO packet the
    kernel cuts into ``mss``-byte segments (thesis 5.4.4's re-segmentation).
    ``ecn`` sets GSO_ECN, needed when the super-packet carries CWR.
    """
    hdr_len = ip_header_len + tcp_header_len
    if payload_len > mss:
        gso_type = GSO_TCPV6 if ipv6 else GSO_TCPV4
        if ecn:
            gso_type |= GSO_ECN
        gso_size = mss
    else:
        gso_type = GSO_NONE
        gso_size = 0
    return VnetHeader(
        flags=F_NEEDS_CSUM,
        gso_type=gso_type,
        hdr_len=hdr_len,
        gso_size=gso_size,
        csum_start=ip_header_len,
        csum_offset=TCP_CSUM_OFFSET,
    )
