"""Read what no socket option tells from a kernel TCP connection: ts_recent, the peer's MSS.

The daemon takes a kernel connection over with TCP_REPAIR
(daemon/io/repair.py): sequence numbers, queues, windows, options and the
socket's own timestamp clock come from socket options, but the peer's
newest TSval (``ts_recent``, RFC 7323 4.3) and the MSS the peer offered
(``rx_opt.mss_clamp``) do not, and a splice needs both (thesis 5.4.3:
the TSval translation and the floor of pre-splice TSecr values start from
ts_recent; the peer's MSS bounds every segment sent to it).

``sockprobe.bpf.c`` reads them: a tc program run with BPF_PROG_TEST_RUN,
never attached, on a frame shaped like a segment arriving on the
connection; it looks the socket up in the caller's network namespace
(``bpf_sk_lookup_tcp``) and reads ``struct tcp_sock`` through BTF
(``bpf_skc_to_tcp_sock``, CO-RE offsets resolved by libbpf at load).
Loading it needs CAP_BPF and CAP_PERFMON (it reads kernel memory through
BTF pointers), one capability more than the splice program.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from daemon.fastpath import libbpf
from daemon.fastpath.loader import FastPathUnavailable, load_object

__all__ = ["DEFAULT_PROBE_OBJECT", "ProbedSocket", "SockProbe", "probe_frame"]

# Built by `make fastpath` beside the splice program.
DEFAULT_PROBE_OBJECT = (
    Path(__file__).resolve().parents[2] / "build" / "fastpath" / "sockprobe.bpf.o"
)
PROGRAM = b"sock_probe"

# sockprobe.h's return codes.
FOUND, NO_SOCKET, BAD_FRAME = 0, 1, 2

_ETH_IP, _ETH_IPV6 = b"\x08\x00", b"\x86\xdd"


class _SockProbeOut(ctypes.Structure):
    """sockprobe.h's ``struct sock_probe`` (host byte order)."""

    _fields_ = [
        ("state", ctypes.c_uint32),
        ("ts_recent", ctypes.c_uint32),
        ("rcv_nxt", ctypes.c_uint32),
        ("snd_una", ctypes.c_uint32),
        ("write_seq", ctypes.c_uint32),
        ("snd_nxt", ctypes.c_uint32),
        ("mss_clamp", ctypes.c_uint16),
        ("_pad", ctypes.c_uint16),
        ("txhash", ctypes.c_uint32),
    ]


@dataclass(frozen=True, slots=True)
class ProbedSocket:
    """What the probe read; the sequence numbers let a caller check its other sources."""

    state: int  # the kernel's TCP_* state (1 ESTABLISHED, 8 CLOSE_WAIT)
    ts_recent: int
    mss_clamp: int
    rcv_nxt: int
    snd_una: int
    write_seq: int
    snd_nxt: int
    txhash: int = 0  # sk_txhash (an IPv6 socket's automatic flow label is made from it)


def probe_frame(local: tuple[bytes, int], remote: tuple[bytes, int]) -> bytes:
    """The frame the probe looks the connection up by: a segment remote -> local.

    Addresses are packed (4 or 16 bytes, one family); room for the answer
    follows the TCP header.
    """
    (laddr, lport), (raddr, rport) = local, remote
    if len(laddr) != len(raddr) or len(laddr) not in (4, 16):
        raise ValueError("local and remote must be packed addresses of one family")
    tcp = struct.pack("!HHIIBBHHH", rport, lport, 0, 0, 5 << 4, 0x10, 0, 0, 0)
    room = bytes(ctypes.sizeof(_SockProbeOut))
    if len(laddr) == 4:
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40 + len(room), 0, 0, 64, 6, 0, raddr, laddr)
        return bytes(12) + _ETH_IP + ip + tcp + room
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, 20 + len(room), 6, 64, raddr, laddr)
    return bytes(12) + _ETH_IPV6 + ip6 + tcp + room


class SockProbe:
    """The loaded probe program; ``read`` one connection of the caller's namespace."""

    def __init__(self, obj: int, prog_fd: int) -> None:
        self._obj = obj
        self._prog_fd = prog_fd

    @classmethod
    def load(cls, obj_path: Path = DEFAULT_PROBE_OBJECT) -> SockProbe:
        """Load the probe (FastPathUnavailable with the reason if it cannot be).

        Reading a kernel ``tcp_sock`` (``bpf_skc_to_tcp_sock`` and its
        fields) takes CAP_PERFMON beside CAP_BPF: without it the verifier
        refuses the program, which is said first, before its log.
        """
        try:
            return cls(*load_object(obj_path, PROGRAM))
        except FastPathUnavailable as exc:
            if not _capable(CAP_PERFMON) and not _capable(CAP_SYS_ADMIN):
                raise FastPathUnavailable(
                    f"the socket probe needs CAP_PERFMON (beside CAP_BPF), "
                    f"which this process lacks: {exc}"
                ) from exc
            raise

    def read(self, local: tuple[bytes, int], remote: tuple[bytes, int]) -> ProbedSocket | None:
        """The connection local <-> remote in this thread's namespace; None if there is none."""
        frame = probe_frame(local, remote)
        data_in = ctypes.create_string_buffer(frame, len(frame))
        data_out = ctypes.create_string_buffer(len(frame) + 64)
        opts = libbpf.TestRunOpts(
            sz=ctypes.sizeof(libbpf.TestRunOpts),
            data_in=ctypes.cast(data_in, ctypes.c_void_p),
            data_out=ctypes.cast(data_out, ctypes.c_void_p),
            data_size_in=len(frame),
            data_size_out=len(data_out),
            repeat=1,
        )
        ret = libbpf.lib().prog_test_run_opts(self._prog_fd, ctypes.byref(opts))
        if ret < 0:
            raise OSError(libbpf.errno_of(ret), f"BPF_PROG_TEST_RUN: {libbpf.strerror(ret)}")
        if opts.retval == NO_SOCKET:
            return None
        if opts.retval != FOUND:
            raise ValueError(f"the probe refused its frame (code {opts.retval})")
        at = len(frame) - ctypes.sizeof(_SockProbeOut)
        out = _SockProbeOut.from_buffer_copy(data_out.raw[at : at + ctypes.sizeof(_SockProbeOut)])
        return ProbedSocket(
            out.state,
            out.ts_recent,
            out.mss_clamp,
            out.rcv_nxt,
            out.snd_una,
            out.write_seq,
            out.snd_nxt,
            out.txhash,
        )

    def close(self) -> None:
        if self._obj:
            libbpf.lib().object_close(self._obj)
            self._obj = 0

    def __enter__(self) -> SockProbe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


CAP_SYS_ADMIN = 21
CAP_PERFMON = 38


def _capable(cap: int) -> bool:
    """Is ``cap`` in this process's effective set (/proc/self/status CapEff)?"""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        pass
    return True  # cannot tell: do not blame a capability
