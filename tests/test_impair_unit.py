"""The impairment engine, the shape words and the NFQUEUE wire format, without root."""

from __future__ import annotations

import itertools
import random
import struct
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testbed import nfqueue
from testbed.impair import (
    Accept,
    Direction,
    Drop,
    Impairment,
    Inject,
    LinkShape,
    corrupt_payload,
    mark_ce,
)
from testbed.impair import main as impair_main

AB = Direction.A_TO_B
little_endian_only = pytest.mark.skipif(
    sys.byteorder != "little", reason="golden netlink headers are in x86 host order"
)


# --- checksums, written out here so the test does not trust the code under test


def ones_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ipv4_tcp_packet(payload: bytes) -> bytes:
    """A valid IPv4/TCP packet, 192.0.2.1:1234 -> 192.0.2.2:80, both checksums right."""
    src, dst = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])
    tcp = struct.pack("!HHIIBBHHH", 1234, 80, 1000, 2000, 5 << 4, 0x18, 65535, 0, 0) + payload
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    csum = 0xFFFF - ones_sum(pseudo + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", 0xFFFF - ones_sum(ip)) + ip[12:]
    return ip + tcp


def tcp_checksum_ok(packet: bytes) -> bool:
    ihl = (packet[0] & 0x0F) * 4
    tcp = packet[ihl:]
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(tcp))
    return ones_sum(pseudo + tcp) == 0xFFFF


# --- LinkShape words


def test_parse_reads_every_netem_like_word() -> None:
    words = "delay=10ms jitter=2ms loss=1% reorder=25% duplicate=1% corrupt=0.1% rate=100mbit"
    shape = LinkShape.parse([*words.split(), "seed=7"])
    assert shape == LinkShape(
        delay_ms=10,
        jitter_ms=2,
        loss_pct=1,
        reorder_pct=25,
        duplicate_pct=1,
        corrupt_pct=0.1,
        rate_mbit=100,
        seed=7,
    )


@pytest.mark.parametrize(
    ("word", "ms"), [("delay=250us", 0.25), ("delay=1.5s", 1500.0), ("delay=3MS", 3.0)]
)
def test_time_units(word: str, ms: float) -> None:
    assert LinkShape.parse([word]).delay_ms == pytest.approx(ms)


@pytest.mark.parametrize(
    ("word", "mbit"), [("rate=512kbit", 0.512), ("rate=2gbit", 2000.0), ("rate=20mbit", 20.0)]
)
def test_rate_units(word: str, mbit: float) -> None:
    assert LinkShape.parse([word]).rate_mbit == pytest.approx(mbit)


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["delay=10"], r"'delay=10': delay must be a time with unit"),
        (["loss=1"], r"'loss=1': loss must be a percentage"),
        (["loss=101%"], r"loss must be between 0% and 100%"),
        (["loss=-1%"], r"'loss=-1%': loss must be a percentage"),
        (["rate=10mb"], r"'rate=10mb': rate must be a rate with unit kbit"),
        (["rate=0mbit"], r"rate must be > 0"),
        (["bogus=1"], r"'bogus=1': unknown key 'bogus'"),
        (["delay"], r"'delay': expected key=value"),
        (["delay=1ms", "delay=2ms"], r"'delay=2ms': delay given twice"),
        (["reorder=25%"], r"reorder needs a delay"),
        (["jitter=2ms"], r"jitter needs a delay"),
        (["seed=x"], r"'seed=x': seed must be a non-negative integer"),
        (["delay=1e999ms"], r"not finite"),
        (["ecn"], r"ecn marks what loss= would drop"),
        (["loss=1%", "ecn", "ecn"], r"'ecn': ecn given twice"),
        (["ecn=1"], r"unknown key 'ecn'"),
    ],
)
def test_bad_words_are_named_in_the_error(words: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LinkShape.parse(words)


pct = st.one_of(st.just(0.0), st.floats(0, 100, allow_nan=False))


@st.composite
def shapes(draw: st.DrawFn) -> LinkShape:
    delay = draw(st.one_of(st.just(0.0), st.floats(0, 1e6, allow_nan=False)))
    return LinkShape(
        delay_ms=delay,
        jitter_ms=draw(st.floats(0, 1e6, allow_nan=False)) if delay else 0.0,
        loss_pct=(loss := draw(pct)),
        reorder_pct=draw(pct) if delay else 0.0,
        duplicate_pct=draw(pct),
        corrupt_pct=draw(pct),
        rate_mbit=draw(st.one_of(st.none(), st.floats(1e-3, 1e6, allow_nan=False))),
        seed=draw(st.one_of(st.none(), st.integers(0, 2**63))),
        ecn=draw(st.booleans()) if loss else False,
    )


@given(shapes())
def test_str_parses_back_to_the_same_shape(shape: LinkShape) -> None:
    assert LinkShape.parse(str(shape).split()) == shape


def test_empty_shape_and_what_needs_the_queue() -> None:
    assert LinkShape.parse([]).is_empty
    assert LinkShape(seed=3).is_empty
    assert str(LinkShape()) == ""
    assert not LinkShape(rate_mbit=20).is_empty
    assert not LinkShape(rate_mbit=20).needs_queue
    assert LinkShape(loss_pct=1).needs_queue


# --- the engine


def run(shape: LinkShape, n: int, seed: int = 1, payload: bytes = b"") -> Impairment:
    engine = Impairment(shape, random.Random(seed))
    packet = payload or ipv4_tcp_packet(b"x" * 100)
    for i in range(n):
        engine.on_packet(AB, i, packet, now=i * 1e-4)
    return engine


def test_loss_1pct_of_100000_packets_drops_about_1000() -> None:
    engine = run(LinkShape(loss_pct=1), 100_000)
    count = engine.counters[AB]
    assert count.seen == 100_000
    assert 900 <= count.dropped <= 1100
    assert engine.counters[Direction.B_TO_A].seen == 0


def test_lost_packet_gets_a_drop_verdict_at_once() -> None:
    engine = Impairment(LinkShape(loss_pct=100), random.Random(1))
    decision = engine.on_packet(AB, 7, b"\x45" + b"\0" * 39, now=0.0)
    assert decision.dropped
    assert decision.ready == (Drop(7),)
    assert engine.next_deadline() is None


def test_duplicate_emits_an_injected_copy_beside_the_accept() -> None:
    packet = ipv4_tcp_packet(b"dup")
    engine = Impairment(LinkShape(duplicate_pct=10), random.Random(2))
    copies = 0
    for i in range(20_000):
        decision = engine.on_packet(AB, i, packet, now=0.0)
        assert decision.ready[0] == Accept(i)
        injects = [a for a in decision.ready if isinstance(a, Inject)]
        assert injects in ([], [Inject(AB, packet)])
        copies += len(injects)
    assert copies == engine.counters[AB].duplicated
    assert 1800 <= copies <= 2200


def test_corrupt_flips_one_payload_bit_and_keeps_the_ipv4_header_valid() -> None:
    packet = ipv4_tcp_packet(b"hello corrupted world" * 10)
    assert tcp_checksum_ok(packet)
    rng = random.Random(3)
    for _ in range(200):
        bad = corrupt_payload(packet, rng)
        assert bad is not None and len(bad) == len(packet)
        assert bad[:20] == packet[:20] and ones_sum(bad[:20]) == 0xFFFF
        diff = int.from_bytes(bad, "big") ^ int.from_bytes(packet, "big")
        assert bin(diff).count("1") == 1
        assert not tcp_checksum_ok(bad)


def test_corrupt_100pct_replaces_the_payload_in_the_verdict() -> None:
    packet = ipv4_tcp_packet(b"abc")
    engine = Impairment(LinkShape(corrupt_pct=100), random.Random(4))
    decision = engine.on_packet(AB, 1, packet, now=0.0)
    assert decision.corrupted and engine.counters[AB].corrupted == 1
    (action,) = decision.ready
    assert isinstance(action, Accept) and action.payload is not None
    assert action.payload != packet and action.payload[:20] == packet[:20]


def with_tos(packet: bytes, tos: int) -> bytes:
    """``packet`` with another TOS byte and its IPv4 header checksum redone."""
    ip = bytearray(packet[:20])
    ip[1] = tos
    ip[10:12] = b"\0\0"
    ip[10:12] = struct.pack("!H", 0xFFFF - ones_sum(bytes(ip)))
    return bytes(ip) + packet[20:]


def test_parse_reads_the_ecn_flag_as_netem_does() -> None:
    shape = LinkShape.parse(["loss=2%", "ecn"])
    assert shape == LinkShape(loss_pct=2, ecn=True)
    assert str(shape) == "loss=2% ecn"


@pytest.mark.parametrize("codepoint", [1, 2])
def test_with_ecn_a_lost_ect_packet_is_marked_ce_instead(codepoint: int) -> None:
    packet = with_tos(ipv4_tcp_packet(b"abc"), 0xB8 | codepoint)  # EF, ECT
    engine = Impairment(LinkShape(loss_pct=100, ecn=True), random.Random(1))
    decision = engine.on_packet(AB, 1, packet, now=0.0)
    assert decision.marked and not decision.dropped
    assert engine.counters[AB].marked == 1 and engine.counters[AB].dropped == 0
    (action,) = decision.ready
    assert isinstance(action, Accept) and action.payload is not None
    marked = action.payload
    assert marked[1] == 0xB8 | 3  # CE, DSCP kept
    assert ones_sum(marked[:20]) == 0xFFFF  # the header checksum follows
    assert marked[2:10] == packet[2:10] and marked[12:] == packet[12:]
    assert tcp_checksum_ok(marked)


def test_with_ecn_a_lost_not_ect_packet_is_still_dropped() -> None:
    engine = Impairment(LinkShape(loss_pct=100, ecn=True), random.Random(1))
    decision = engine.on_packet(AB, 1, ipv4_tcp_packet(b"abc"), now=0.0)
    assert decision.dropped and decision.ready == (Drop(1),)
    assert engine.counters[AB].dropped == 1 and engine.counters[AB].marked == 0


def test_mark_ce_in_an_ipv6_traffic_class() -> None:
    header = bytes([0x60 | 0x0B, 0x80 | 0x20]) + bytes(38)  # TC 0xB8 | ECT(0), flow 0
    marked = mark_ce(header)
    assert marked is not None and marked[0] == 0x6B and marked[1] == 0xB0
    assert mark_ce(bytes([0x6B, 0x80]) + bytes(38)) is None  # Not-ECT
    assert mark_ce(b"\x45") is None


def test_corrupt_skips_a_packet_with_nothing_after_the_ip_header() -> None:
    assert corrupt_payload(ipv4_tcp_packet(b"")[:20], random.Random(1)) is None
    assert corrupt_payload(b"\x10\x00", random.Random(1)) is None


def test_delay_holds_the_packet_until_its_time() -> None:
    engine = Impairment(LinkShape(delay_ms=10), random.Random(5))
    decision = engine.on_packet(AB, 9, b"\x45", now=100.0)
    assert decision.delayed and decision.ready == ()
    assert engine.next_deadline() == pytest.approx(100.010)
    assert engine.due(100.0099) == []
    assert engine.due(100.0101) == [Accept(9)]
    assert engine.next_deadline() is None


def test_directions_have_their_own_delay_lines_and_counters() -> None:
    engine = Impairment(LinkShape(delay_ms=10), random.Random(5))
    engine.on_packet(AB, 1, b"\x45", now=0.0)
    engine.on_packet(Direction.B_TO_A, 2, b"\x45", now=0.001)
    assert engine.held() == 2
    assert engine.due(0.0105) == [Accept(1)]
    assert engine.due(0.0115) == [Accept(2)]
    assert [c.delayed for c in engine.counters] == [1, 1]


def release_order(shape: LinkShape, n: int, seed: int) -> list[int]:
    """Packets arriving every 1 ms; the ids in the order the engine lets them go."""
    engine = Impairment(shape, random.Random(seed))
    order: list[int] = []
    for i in range(n):
        now = i * 1e-3
        order += [a.packet_id for a in engine.due(now) if isinstance(a, Accept)]
        decision = engine.on_packet(AB, i, b"\x45", now)
        order += [a.packet_id for a in decision.ready if isinstance(a, Accept)]
    order += [a.packet_id for a in engine.flush() if isinstance(a, Accept)]
    return order


def test_reorder_25pct_sends_a_quarter_at_once_ahead_of_delayed_packets() -> None:
    shape = LinkShape(delay_ms=10, reorder_pct=25)
    order = release_order(shape, 10_000, seed=6)
    assert sorted(order) == list(range(10_000))
    overtakes = sum(1 for x, y in itertools.pairwise(order) if x > y)
    assert overtakes > 1000
    engine = run(shape, 10_000, seed=6)
    assert 2300 <= engine.counters[AB].reordered <= 2700


def test_delay_without_jitter_or_reorder_keeps_order() -> None:
    assert release_order(LinkShape(delay_ms=10), 1000, seed=7) == list(range(1000))


def test_jitter_spreads_delay_and_reorders_like_netem() -> None:
    engine = Impairment(LinkShape(delay_ms=10, jitter_ms=4), random.Random(8))
    for i in range(1000):
        engine.on_packet(AB, i, b"\x45", now=0.0)
    waits = sorted(entry[0] for entry in engine._lines[AB].heap)
    assert 0.006 <= waits[0] < 0.007 and 0.013 < waits[-1] <= 0.014
    assert release_order(LinkShape(delay_ms=10, jitter_ms=4), 1000, seed=8) != list(range(1000))


def test_same_seed_gives_the_same_decisions() -> None:
    shape = LinkShape(delay_ms=5, jitter_ms=1, loss_pct=5, reorder_pct=10, duplicate_pct=5)

    def trace(seed: int) -> list[object]:
        engine = Impairment(shape, random.Random(seed))
        packet = ipv4_tcp_packet(b"seed")
        return [engine.on_packet(AB, i, packet, i * 1e-3) for i in range(2000)] + [engine.flush()]

    assert trace(11) == trace(11)
    assert trace(11) != trace(12)


# --- NFQUEUE wire format (golden bytes)


@little_endian_only
def test_verdict_message_golden_bytes() -> None:
    msg = nfqueue.build_verdict(3, 42, nfqueue.Verdict.ACCEPT)
    assert msg == bytes.fromhex(
        "20000000 0103 0100 00000000 00000000"  # nlmsghdr: len 32, QUEUE|VERDICT
        "00000003"  # nfgenmsg: AF_UNSPEC, v0, queue 3 (big-endian)
        "0c000200 00000001 0000002a"  # NFQA_VERDICT_HDR: ACCEPT, id 42
    )


@little_endian_only
def test_verdict_with_replacement_payload_is_padded() -> None:
    msg = nfqueue.build_verdict(3, 1, nfqueue.Verdict.DROP, b"\x45\x00\x01")
    assert msg[-8:] == bytes.fromhex("07000a00 450001 00")  # NFQA_PAYLOAD, 3 bytes + pad
    # Like the kernel's nla_put and libmnl, nlmsg_len counts the attribute's pad.
    assert struct.unpack_from("=I", msg)[0] == len(msg) == 40


@little_endian_only
def test_config_bind_and_params_golden_bytes() -> None:
    assert nfqueue.build_config(3, command=nfqueue.CfgCmd.BIND, seq=1) == bytes.fromhex(
        "1c000000 0203 0500 01000000 00000000"  # CONFIG, REQUEST|ACK, seq 1
        "00000003"
        "08000100 01000000"  # NFQA_CFG_CMD: BIND, pad, pf 0
    )
    msg = nfqueue.build_config(
        3,
        copy_mode=nfqueue.CopyMode.PACKET,
        copy_range=0xFFFF,
        maxlen=8192,
        flags=nfqueue.NO_FLAGS,
        flags_mask=nfqueue.CfgFlag.GSO | nfqueue.CfgFlag.FAIL_OPEN,
        ack=False,
    )
    assert msg[20:] == bytes.fromhex(
        "09000200 0000ffff 02 000000"  # NFQA_CFG_PARAMS: range 65535, PACKET
        "08000300 00002000"  # NFQA_CFG_QUEUE_MAXLEN 8192
        "08000500 00000000"  # NFQA_CFG_FLAGS: none (GSO stays off)
        "08000400 00000005"  # NFQA_CFG_MASK: GSO | FAIL_OPEN
    )


KERNEL_PACKET = bytes.fromhex(
    # nlmsghdr: len 84, type QUEUE|PACKET, flags 0, seq 0, portid 0
    "54000000 0003 0000 00000000 00000000"
    "02000003"  # nfgenmsg: AF_INET, v0, queue 3
    "0b000100 0000002a 0800 02 00"  # PACKET_HDR: id 42, ETH_P_IP, FORWARD, pad
    "08000500 00000004"  # IFINDEX_INDEV 4 (br0)
    "08000700 00000005"  # IFINDEX_PHYSINDEV 5 (wa)
    "08000800 00000006"  # IFINDEX_PHYSOUTDEV 6 (wb)
    "10000900 0006 0000 020000000001 0000"  # HWADDR: len 6, pad, mac + 2
    "0a000a00 450000140001 0000"  # PAYLOAD: 6 bytes + pad
)


@little_endian_only
def test_kernel_packet_message_parses() -> None:
    (msg,) = list(nfqueue.parse_messages(KERNEL_PACKET))
    assert msg == nfqueue.QueuedPacket(
        queue=3,
        packet_id=42,
        hw_protocol=0x0800,
        hook=2,
        payload=bytes.fromhex("450000140001"),
        indev=4,
        physindev=5,
        physoutdev=6,
        hwaddr=bytes.fromhex("020000000001"),
    )


@little_endian_only
def test_several_messages_in_one_datagram_and_an_ack() -> None:
    ack = bytes.fromhex("24000000 0200 0000 07000000 00000000") + b"\0" * 20
    msgs = list(nfqueue.parse_messages(KERNEL_PACKET + ack + KERNEL_PACKET))
    assert [type(m).__name__ for m in msgs] == ["QueuedPacket", "NetlinkAck", "QueuedPacket"]
    assert msgs[1] == nfqueue.NetlinkAck(seq=7, error=0)


@little_endian_only
@pytest.mark.parametrize("cut", [30, 50, 83])
def test_truncated_packet_message_is_malformed_not_an_exception(cut: int) -> None:
    msgs = list(nfqueue.parse_messages(KERNEL_PACKET[:cut]))
    assert len(msgs) == 1 and isinstance(msgs[0], nfqueue.Malformed)


@little_endian_only
def test_attribute_longer_than_its_message_is_malformed() -> None:
    data = bytearray(KERNEL_PACKET)
    data[72:74] = (64).to_bytes(2, "little")  # NFQA_PAYLOAD claims 64 bytes, 8 remain
    (msg,) = list(nfqueue.parse_messages(bytes(data)))
    assert msg == nfqueue.Malformed("attribute type 10 has bad length 64")


@little_endian_only
def test_packet_without_header_attribute_is_malformed() -> None:
    data = bytes.fromhex("14000000 0003 0000 00000000 00000000 02000003")
    (msg,) = list(nfqueue.parse_messages(data))
    assert msg == nfqueue.Malformed("packet message without NFQA_PACKET_HDR")


def test_cli_rejects_bad_words_before_touching_any_namespace(
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["--netns", "tbi-none", "--queue", "0", "--stats", "/nonexistent/x", "loss=200%"]
    with pytest.raises(SystemExit) as exc:
        impair_main(argv)
    assert exc.value.code == 2
    assert "loss must be between 0% and 100%" in capsys.readouterr().err
