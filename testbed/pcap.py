"""The TCP frames of a classic Ethernet pcap, IPv4 or IPv6: for the tests and benchmarks that
read captures (``Link.capture`` writes them)."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Frame:
    version: int  # 4 or 6
    src: bytes
    sport: int
    dst: bytes
    dport: int
    flags: int
    ecn: int  # the IP ECN field (RFC 3168 5)
    payload_len: int  # from the IP length fields, whatever the snaplen kept
    options: bytes  # TCP options, as far as the snaplen kept them
    seq: int
    ack: int
    flow_label: int  # IPv6's (RFC 6437); 0 for IPv4
    time: float = 0.0  # the capture's timestamp, seconds since the epoch

    @property
    def mss(self) -> int | None:
        """The MSS option's value, if the options carry one."""
        i, opts = 0, self.options
        while i + 1 < len(opts) and opts[i] != 0:
            if opts[i] == 1:
                i += 1
                continue
            if opts[i] == 2 and i + 4 <= len(opts):
                return int(struct.unpack("!H", opts[i + 2 : i + 4])[0])
            i += max(opts[i + 1], 2)
        return None


def tcp_frames(path: Path) -> list[Frame]:
    """Every Ethernet/IPv4 or IPv6/TCP frame (IPv6: TCP right after the fixed header)."""
    data = path.read_bytes()
    assert struct.unpack("<I", data[:4])[0] == 0xA1B2C3D4, "expected a microsecond pcap"
    out, off = [], 24
    while off + 16 <= len(data):
        sec, usec, incl = struct.unpack("<III", data[off : off + 12])
        frame = data[off + 16 : off + 16 + incl]
        off += 16 + incl
        if frame[12:14] == b"\x08\x00" and len(frame) >= 34 and frame[23] == 6:
            ihl = (frame[14] & 0x0F) * 4
            ip_payload = struct.unpack("!H", frame[16:18])[0] - ihl
            version, ecn, src, dst = 4, frame[15] & 3, frame[26:30], frame[30:34]
            label = 0
            tcp = frame[14 + ihl :]
        elif frame[12:14] == b"\x86\xdd" and len(frame) >= 54 and frame[20] == 6:
            ip_payload = struct.unpack("!H", frame[18:20])[0]
            version, ecn, src, dst = 6, (frame[15] >> 4) & 3, frame[22:38], frame[38:54]
            label = struct.unpack("!I", frame[14:18])[0] & 0xFFFFF
            tcp = frame[54:]
        else:
            continue
        if len(tcp) < 14:
            continue
        sport, dport, seq, ack = struct.unpack("!HHII", tcp[:12])
        hlen = (tcp[12] >> 4) * 4
        fields = (tcp[13], ecn, ip_payload - hlen, tcp[20:hlen], seq, ack, label)
        out.append(Frame(version, src, sport, dst, dport, *fields, sec + usec / 1e6))
    return out
