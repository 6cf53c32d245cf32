"""Netem-equivalent link impairment on a bridged wire, without sch_netem.

Theory of operation
-------------------
A wire is a namespace holding bridge ``br0`` with ports ``wa`` (toward host
A) and ``wb`` (toward host B).  br_netfilter runs bridged IP packets through
the iptables FORWARD chain, where an NFQUEUE rule hands them to this
process (see :mod:`testbed.nfqueue`).  The kernel keeps each packet until we
answer with a verdict, and verdicts may be given in any order, so:

* loss      -> DROP verdict at once; with the ``ecn`` flag (netem's), a
               packet that would be lost is CE-marked instead when it is
               ECN-capable (ECT(0) or ECT(1), RFC 3168 5) and accepted, as an
               AQM marks rather than drops; a Not-ECT one is still dropped;
* delay     -> ACCEPT verdict when the packet's delay line slot comes due;
* corrupt   -> ACCEPT with a replacement payload that has one bit flipped
               past the IP header: the IPv4 header checksum stays valid, so
               the packet is delivered and then rejected by the transport
               checksum, as a real bit error would be;
* duplicate -> the original is accepted as usual and a copy is *injected*
               on the outgoing port through an AF_PACKET socket, because a
               verdict cannot multiply a packet;
* reorder   -> netem's meaning: P% of packets skip the delay and leave at
               once, overtaking the delayed ones (so it needs a delay);
* rate      -> not here: a tbf qdisc on the bridge ports (testbed.shaping).

Jitter follows netem's default: each packet's delay is drawn uniformly from
[delay - jitter, delay + jitter] (clamped at 0) and the delay line releases
packets in time order, so jitter larger than the packet spacing reorders
packets, exactly as netem's tfifo does when no rate is set.  Duplicates draw
their own delay, as netem re-enqueues the copy and delays it again.

The engine (:class:`Impairment`) is sans-I/O: packets and ``now`` go in,
actions come out.  ``main()`` is the I/O shell run as
``python -m testbed.impair --netns NS --queue N --stats FILE [words...]``.

Peer MAC addresses for injected duplicates are *learned*: the NFQA_HWADDR
of a packet is the source MAC of the frame that arrived on its physical in
port, i.e. the MAC of the host behind that port.  A duplicate that would
leave a port whose host has not sent anything yet is not injected and is
counted as ``inject_skipped`` (in TCP the peer has always spoken before data
flows, so this only touches a handshake's first SYN).
"""

from __future__ import annotations

import argparse
import ctypes
import enum
import heapq
import json
import math
import os
import random
import re
import selectors
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from testbed import nfqueue

# ----------------------------------------------------------------------------
# The spec: netem-like words
# ----------------------------------------------------------------------------

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}  # to milliseconds
_RATE_UNITS = {"kbit": 1e-3, "mbit": 1.0, "gbit": 1e3}  # to Mbit/s
_NUMBER = r"([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)"
_KEYS = {
    "delay": "delay_ms",
    "jitter": "jitter_ms",
    "loss": "loss_pct",
    "reorder": "reorder_pct",
    "duplicate": "duplicate_pct",
    "corrupt": "corrupt_pct",
    "rate": "rate_mbit",
    "seed": "seed",
}


def _fmt(value: float) -> str:
    """Shortest text that parses back to exactly ``value``."""
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _parse_value(word: str, key: str, text: str) -> float | int:
    if key == "seed":
        if not re.fullmatch(r"[0-9]+", text):
            raise ValueError(f"{word!r}: seed must be a non-negative integer")
        return int(text)
    if key in ("delay", "jitter"):
        units, kind = _TIME_UNITS, "a time with unit us, ms or s (e.g. 10ms)"
    elif key == "rate":
        units, kind = _RATE_UNITS, "a rate with unit kbit, mbit or gbit (e.g. 100mbit)"
    else:
        units, kind = {"%": 1.0}, "a percentage (e.g. 1%)"
    m = re.fullmatch(_NUMBER + r"(us|ms|s|%|kbit|mbit|gbit)", text.lower())
    if m is None or m.group(2) not in units:
        raise ValueError(f"{word!r}: {key} must be {kind}")
    value = float(m.group(1)) * units[m.group(2)]
    if not math.isfinite(value):
        raise ValueError(f"{word!r}: {key} is not finite")
    return value


@dataclass(frozen=True, slots=True)
class LinkShape:
    """What a link does to packets, per direction (both directions alike)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    reorder_pct: float = 0.0
    duplicate_pct: float = 0.0
    corrupt_pct: float = 0.0
    rate_mbit: float | None = None  # None = unlimited
    seed: int | None = None  # None = a fresh random seed per run
    ecn: bool = False  # loss CE-marks ECN-capable packets instead (tc-netem(8) "ecn")

    def __post_init__(self) -> None:
        for name in ("delay_ms", "jitter_ms"):
            if not 0.0 <= getattr(self, name) < math.inf:
                raise ValueError(f"{name[:-3]} must be >= 0, got {getattr(self, name)}")
        for name in ("loss_pct", "reorder_pct", "duplicate_pct", "corrupt_pct"):
            if not 0.0 <= getattr(self, name) <= 100.0:
                raise ValueError(
                    f"{name[:-4]} must be between 0% and 100%, got {getattr(self, name)}%"
                )
        if self.rate_mbit is not None and not 0.0 < self.rate_mbit < math.inf:
            raise ValueError(f"rate must be > 0, got {self.rate_mbit}mbit")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        # tc-netem(8) refuses these too: reordering means "skip the delay",
        # and jitter is a spread around a delay.
        if self.reorder_pct > 0 and self.delay_ms == 0:
            raise ValueError("reorder needs a delay: reordering not possible without delay=")
        if self.jitter_ms > 0 and self.delay_ms == 0:
            raise ValueError("jitter needs a delay: give delay= as well")
        if self.ecn and self.loss_pct == 0:
            raise ValueError("ecn marks what loss= would drop: give loss= as well")

    @classmethod
    def parse(cls, words: list[str]) -> LinkShape:
        """Parse ``delay=10ms jitter=2ms loss=1% ... rate=100mbit seed=7``, and the ``ecn`` flag."""
        values: dict[str, float | int] = {}
        ecn = False
        for word in words:
            key, sep, text = word.partition("=")
            key = key.strip().lower()
            if key == "ecn" and not sep:
                if ecn:
                    raise ValueError(f"{word!r}: ecn given twice")
                ecn = True
                continue
            if not sep or not text:
                raise ValueError(f"{word!r}: expected key=value, e.g. delay=10ms")
            if key not in _KEYS:
                raise ValueError(f"{word!r}: unknown key {key!r}; known: {', '.join(_KEYS)}")
            if _KEYS[key] in values:
                raise ValueError(f"{word!r}: {key} given twice")
            values[_KEYS[key]] = _parse_value(word, key, text.strip())
        return cls(**values, ecn=ecn)  # type: ignore[arg-type]

    def words(self) -> list[str]:
        out: list[str] = []
        if self.delay_ms:
            out.append(f"delay={_fmt(self.delay_ms)}ms")
        if self.jitter_ms:
            out.append(f"jitter={_fmt(self.jitter_ms)}ms")
        for key in ("loss", "reorder", "duplicate", "corrupt"):
            value: float = getattr(self, f"{key}_pct")
            if value:
                out.append(f"{key}={_fmt(value)}%")
        if self.ecn:
            out.append("ecn")
        if self.rate_mbit is not None:
            out.append(f"rate={_fmt(self.rate_mbit)}mbit")
        if self.seed is not None:
            out.append(f"seed={self.seed}")
        return out

    def __str__(self) -> str:
        return " ".join(self.words())

    @property
    def is_empty(self) -> bool:
        """True when the link is left as it is (a seed alone changes nothing)."""
        return self.rate_mbit is None and not self.needs_queue

    @property
    def needs_queue(self) -> bool:
        """True when packets must pass through the NFQUEUE engine."""
        return any(
            (
                self.delay_ms,
                self.jitter_ms,
                self.loss_pct,
                self.reorder_pct,
                self.duplicate_pct,
                self.corrupt_pct,
            )
        )


# ----------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------


class Direction(enum.IntEnum):
    A_TO_B = 0  # arrived on port wa, leaves on wb
    B_TO_A = 1

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Accept:
    """Accept queued packet ``packet_id``, replacing its bytes if ``payload``."""

    packet_id: int
    payload: bytes | None = None


@dataclass(frozen=True, slots=True)
class Drop:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Inject:
    """Send a copy (a duplicate) of an IP packet out of the direction's port."""

    direction: Direction
    payload: bytes


Action = Accept | Drop | Inject


@dataclass(frozen=True, slots=True)
class Decision:
    """What happened to one packet; ``ready`` are the actions due right now."""

    ready: tuple[Action, ...]
    dropped: bool = False
    duplicated: bool = False
    corrupted: bool = False
    reordered: bool = False
    delayed: bool = False
    marked: bool = False


@dataclass(slots=True)
class DirectionCounters:
    seen: int = 0
    dropped: int = 0
    marked: int = 0  # CE-marked instead of dropped (ecn)
    duplicated: int = 0
    corrupted: int = 0
    reordered: int = 0
    delayed: int = 0


def corrupt_payload(packet: bytes, rng: random.Random) -> bytes | None:
    """Flip one random bit after the IP header; None if there is nothing there.

    Leaving the IPv4 header intact keeps its checksum valid, so the packet
    is forwarded and delivered and the damage is caught where a real bit
    error would be: the TCP/UDP checksum (RFC 793 3.1, RFC 768).
    """
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        start = (packet[0] & 0x0F) * 4
    elif version == 6:
        start = 40  # fixed header; extension headers count as payload
    else:
        return None
    if len(packet) <= start:
        return None
    bit = rng.randrange((len(packet) - start) * 8)
    out = bytearray(packet)
    out[start + bit // 8] ^= 0x80 >> (bit % 8)
    return bytes(out)


def mark_ce(packet: bytes) -> bytes | None:
    """The packet with its ECN field set to CE (RFC 3168 5); None if it is Not-ECT.

    IPv4: the low two bits of the TOS byte, and the header checksum updated
    for them (RFC 1624 eqn. 3); IPv6: the low two bits of the traffic class,
    no header checksum.
    """
    if len(packet) < 2:
        return None
    version = packet[0] >> 4
    if version == 4 and len(packet) >= 20:
        if packet[1] & 0x03 == 0:
            return None
        out = bytearray(packet)
        old_word = (out[0] << 8) | out[1]
        out[1] |= 0x03
        new_word = (out[0] << 8) | out[1]
        csum = (out[10] << 8) | out[11]
        s = (~csum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
        s = (s & 0xFFFF) + (s >> 16)
        s = (s & 0xFFFF) + (s >> 16)
        csum = ~s & 0xFFFF
        out[10], out[11] = csum >> 8, csum & 0xFF
        return bytes(out)
    if version == 6 and len(packet) >= 40:
        if (packet[1] >> 4) & 0x03 == 0:
            return None
        out = bytearray(packet)
        out[1] |= 0x30
        return bytes(out)
    return None


@dataclass(slots=True)
class _DelayLine:
    """Packets waiting for their release time, in time order (netem's tfifo)."""

    heap: list[tuple[float, int, Action]] = field(default_factory=list)


class Impairment:
    """The sans-I/O engine: one delay line and one counter set per direction."""

    def __init__(self, shape: LinkShape, rng: random.Random) -> None:
        self.shape = shape
        self._rng = rng
        self._lines = (_DelayLine(), _DelayLine())
        self.counters = (DirectionCounters(), DirectionCounters())
        self._order = 0  # tie-breaker: equal release times keep arrival order

    def _chance(self, pct: float) -> bool:
        return pct > 0 and self._rng.random() * 100.0 < pct

    def _delay_s(self) -> float:
        delay = self.shape.delay_ms
        if self.shape.jitter_ms:
            delay += self._rng.uniform(-self.shape.jitter_ms, self.shape.jitter_ms)
        return max(delay, 0.0) / 1e3

    def _hold(self, direction: Direction, at: float, action: Action) -> None:
        self._order += 1
        heapq.heappush(self._lines[direction].heap, (at, self._order, action))

    def on_packet(
        self, direction: Direction, packet_id: int, payload: bytes, now: float
    ) -> Decision:
        count = self.counters[direction]
        count.seen += 1
        shape = self.shape
        replacement = None
        marked = False
        if self._chance(shape.loss_pct):
            replacement = mark_ce(payload) if shape.ecn else None
            if replacement is None:
                count.dropped += 1
                return Decision(ready=(Drop(packet_id),), dropped=True)
            marked = True
            count.marked += 1
            payload = replacement
        duplicated = self._chance(shape.duplicate_pct)
        corrupted = False
        if self._chance(shape.corrupt_pct):
            damaged = corrupt_payload(payload, self._rng)
            if damaged is not None:
                replacement = damaged
                corrupted = True
                count.corrupted += 1
        ready: list[Action] = []
        original = Accept(packet_id, replacement)
        reordered = delayed = False
        if shape.delay_ms and self._chance(shape.reorder_pct):
            # netem: with probability P the packet skips the delay (tc-netem(8)).
            reordered = True
            count.reordered += 1
            ready.append(original)
        else:
            wait = self._delay_s()
            if wait > 0:
                delayed = True
                count.delayed += 1
                self._hold(direction, now + wait, original)
            else:
                ready.append(original)
        if duplicated:
            count.duplicated += 1
            copy = Inject(direction, payload)
            wait = self._delay_s()
            if wait > 0:
                self._hold(direction, now + wait, copy)
            else:
                ready.append(copy)
        return Decision(
            ready=tuple(ready),
            duplicated=duplicated,
            corrupted=corrupted,
            reordered=reordered,
            delayed=delayed,
            marked=marked,
        )

    def due(self, now: float) -> list[Action]:
        """Pop every held action whose time has come, oldest release first."""
        out: list[tuple[float, int, Action]] = []
        for line in self._lines:
            while line.heap and line.heap[0][0] <= now:
                out.append(heapq.heappop(line.heap))
        out.sort(key=lambda entry: (entry[0], entry[1]))
        return [action for _at, _order, action in out]

    def flush(self) -> list[Action]:
        """Everything still held, for shutdown: let it go now rather than lose it."""
        return self.due(math.inf)

    def next_deadline(self) -> float | None:
        heads = [line.heap[0][0] for line in self._lines if line.heap]
        return min(heads) if heads else None

    def held(self) -> int:
        return sum(len(line.heap) for line in self._lines)


# ----------------------------------------------------------------------------
# The I/O shell
# ----------------------------------------------------------------------------

ETH_P_IP = 0x0800
CLONE_NEWNET = 0x40000000  # linux/sched.h
_libc = ctypes.CDLL(None, use_errno=True)
ETH_P_IPV6 = 0x86DD


@dataclass(slots=True)
class ShellCounters:
    enobufs: int = 0
    netlink_errors: int = 0
    injected: int = 0
    inject_skipped: int = 0
    unknown_port: int = 0


def enter_netns(name: str) -> None:
    """Move this (single-threaded) process into network namespace ``name``."""
    path = Path("/run/netns") / name
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise SystemExit(f"impair: network namespace {name!r} does not exist ({path})") from None
    try:
        # os.setns arrives only in Python 3.12; call libc directly.
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name!r}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _write_json(path: Path, data: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file


class _Shell:
    def __init__(self, args: argparse.Namespace, shape: LinkShape) -> None:
        self.shape = shape
        self.queue: int = args.queue
        self.stats_path: Path = args.stats
        seed = shape.seed if shape.seed is not None else random.SystemRandom().randrange(2**32)
        self.seed = seed
        self.engine = Impairment(shape, random.Random(seed))
        self.counters = ShellCounters()
        port_a, port_b = args.ports.split(",")
        self.port_names = {Direction.A_TO_B: port_b, Direction.B_TO_A: port_a}  # out ports
        self.in_port = {
            socket.if_nametoindex(port_a): Direction.A_TO_B,
            socket.if_nametoindex(port_b): Direction.B_TO_A,
        }
        self.peer_mac: dict[Direction, bytes] = {}  # MAC of the host a direction comes from
        self.nfq = nfqueue.NfqueueSocket(self.queue, maxlen=args.maxlen)
        self.raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)  # send-only
        self.stop = False

    def stats(self) -> dict[str, object]:
        self.counters.enobufs = self.nfq.enobufs
        self.counters.netlink_errors = self.nfq.errors
        return {
            "pid": os.getpid(),
            "queue": self.queue,
            "shape": str(self.shape),
            "seed": self.seed,
            "held": self.engine.held(),
            "time": time.time(),
            **{d.label: asdict(self.engine.counters[d]) for d in Direction},
            "shell": asdict(self.counters),
        }

    def execute(self, actions: list[Action]) -> None:
        verdicts: list[bytes] = []
        for action in actions:
            if isinstance(action, Accept):
                verdicts.append(
                    nfqueue.build_verdict(
                        self.queue, action.packet_id, nfqueue.Verdict.ACCEPT, action.payload
                    )
                )
            elif isinstance(action, Drop):
                verdicts.append(
                    nfqueue.build_verdict(self.queue, action.packet_id, nfqueue.Verdict.DROP)
                )
            else:
                self.inject(action)
        self.nfq.send(verdicts)

    def inject(self, action: Inject) -> None:
        src = self.peer_mac.get(action.direction)
        dst = self.peer_mac.get(Direction(1 - action.direction))
        if src is None or dst is None or not action.payload:
            self.counters.inject_skipped += 1
            return
        proto = ETH_P_IPV6 if action.payload[0] >> 4 == 6 else ETH_P_IP
        frame = dst + src + proto.to_bytes(2, "big") + action.payload
        try:
            self.raw.sendto(frame, (self.port_names[action.direction], proto))
            self.counters.injected += 1
        except OSError:
            self.counters.inject_skipped += 1

    def on_readable(self, now: float) -> None:
        actions: list[Action] = []
        for pkt in self.nfq.receive():
            direction = self.in_port.get(pkt.physindev)
            if direction is None:
                self.counters.unknown_port += 1
                actions.append(Accept(pkt.packet_id))
                continue
            if len(pkt.hwaddr) == 6:
                self.peer_mac[direction] = pkt.hwaddr
            actions.extend(self.engine.on_packet(direction, pkt.packet_id, pkt.payload, now).ready)
        self.execute(actions)

    def run(self) -> None:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno())

        def request_stop(_signum: int, _frame: object) -> None:
            self.stop = True

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        sel = selectors.DefaultSelector()
        sel.register(self.nfq.fileno(), selectors.EVENT_READ, "nfq")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        _write_json(self.stats_path, self.stats())  # also the "bound and ready" marker
        next_stats = time.monotonic() + 1.0
        try:
            while not self.stop:
                now = time.monotonic()
                deadline = self.engine.next_deadline()
                until = next_stats if deadline is None else min(deadline, next_stats)
                for key, _ev in sel.select(max(until - now, 0.0)):
                    if key.data == "nfq":
                        self.on_readable(time.monotonic())
                    else:
                        wake_r.recv(4096)
                now = time.monotonic()
                self.execute(self.engine.due(now))
                if now >= next_stats:
                    _write_json(self.stats_path, self.stats())
                    next_stats = now + 1.0
        finally:
            self.execute(self.engine.flush())
            _write_json(self.stats_path, self.stats())
            self.nfq.close()
            self.raw.close()
            sel.close()
            signal.set_wakeup_fd(-1)
            wake_r.close()
            wake_w.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m testbed.impair",
        description="Impair bridged traffic of a wire namespace through NFQUEUE (netem-like).",
    )
    parser.add_argument("--netns", required=True, help="wire namespace (in /run/netns)")
    parser.add_argument("--queue", type=int, required=True, help="NFQUEUE number")
    parser.add_argument("--stats", type=Path, required=True, help="counters JSON file")
    parser.add_argument("--ports", default="wa,wb", help="bridge ports toward A and B")
    parser.add_argument("--maxlen", type=int, default=8192, help="kernel queue length")
    parser.add_argument("words", nargs="*", help="e.g. delay=10ms loss=1%%")
    args = parser.parse_args(argv)
    try:
        shape = LinkShape.parse(args.words)
    except ValueError as exc:
        parser.error(str(exc))
    enter_netns(args.netns)
    shell = _Shell(args, shape)
    shell.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
