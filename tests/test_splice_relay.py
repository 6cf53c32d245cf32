"""The splice relay's rules without root: real TCBs, golden packets in, actions out.

Each test builds the two TCBs the daemon would hold (a client connection
accepted from a SYN, a server connection opened with ``connect``), creates
the ``Relay`` as intend_splice does and drives it with IPv4/TCP packets as
the TUN would deliver them.  What comes back is checked as the I/O shell
would carry it out: relayed packets (parsed again, checksums verified),
the TCBs' own segments, timers, the fast path requests, teardown.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from daemon.splice.relay import (
    QUEUE_LIMIT,
    Action,
    ArmTimer,
    ArmTimewait,
    Emit,
    InstallFastPath,
    ProxyMisuse,
    Relay,
    RelayCounters,
    Reopen,
    TearDown,
    WatchFinAck,
    Write,
)
from daemon.splice.session import TS_MARGIN
from daemon.splice.state import Iface, SpliceState
from daemon.tcp.config import TcpConfig
from daemon.tcp.connection import TcpConnection
from daemon.tcp.state import TcpState
from daemon.wire.ipv4 import Ipv4Packet
from daemon.wire.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TcpOptions,
    TcpSegment,
    build_ipv4_tcp,
    parse_tcp,
)

CLIENT, SERVER = Iface.CLIENT, Iface.SERVER
S = SpliceState

CLIENT_PEER = (bytes([192, 0, 2, 2]), 40000)
DAEMON_C = (bytes([198, 51, 100, 1]), 1080)
DAEMON_S = (bytes([198, 51, 100, 2]), 50000)
SERVER_PEER = (bytes([203, 0, 113, 2]), 80)
CFG = TcpConfig(rcv_wscale=7, delayed_ack=None, msl=1.0)
C_ISS, C_IRS = 7000, 1000  # daemon's ISS toward the client, the client's ISN
S_ISS, S_IRS = 9000, 3000  # daemon's ISS toward the server, the server's ISN
T0 = 100.0
MSS = 1448


@dataclass
class Bed:
    relay: Relay
    client: TcpConnection
    server: TcpConnection
    counters: RelayCounters
    c_ts: int  # newest TSval the client peer sent
    s_ts: int


def client_tcb(now: float) -> tuple[TcpConnection, int]:
    syn = TcpSegment(
        CLIENT_PEER[1],
        DAEMON_C[1],
        C_IRS,
        0,
        SYN,
        65535,
        TcpOptions(mss=1460, wscale=7, sack_permitted=True, timestamp=(5000, 0)),
    )
    tcb = TcpConnection.accept_syn(CFG, DAEMON_C, CLIENT_PEER, syn, C_ISS, now)
    synack = tcb.poll_output(now)[0]
    assert synack.options.timestamp is not None
    tcb.on_segment(
        TcpSegment(
            CLIENT_PEER[1],
            DAEMON_C[1],
            C_IRS + 1,
            C_ISS + 1,
            ACK,
            512,
            TcpOptions(timestamp=(5001, synack.options.timestamp[0])),
        ),
        now,
    )
    assert tcb.state is TcpState.ESTABLISHED
    return tcb, 5001


def server_tcb(config: TcpConfig, now: float) -> tuple[TcpConnection, int]:
    tcb = TcpConnection.connect(config, DAEMON_S, SERVER_PEER, S_ISS, now)
    syn = tcb.poll_output(now)[0]
    assert syn.options.timestamp is not None
    tcb.on_segment(
        TcpSegment(
            SERVER_PEER[1],
            DAEMON_S[1],
            S_IRS,
            S_ISS + 1,
            SYN | ACK,
            65535,
            TcpOptions(
                mss=1460, wscale=7, sack_permitted=True, timestamp=(8000, syn.options.timestamp[0])
            ),
        ),
        now,
    )
    tcb.poll_output(now)  # the handshake ACK
    assert tcb.state is TcpState.ESTABLISHED
    return tcb, 8000


def intended(now: float = T0) -> tuple[Relay, TcpConnection, TcpConnection, RelayCounters]:
    counters = RelayCounters()
    ct, _ = client_tcb(now)
    relay = Relay.intend(1, ct, 2, CFG, msl=CFG.msl, offload=False, counters=counters)
    st, _ = server_tcb(relay.server_config, now)
    relay.server_connected(st)
    return relay, ct, st, counters


def spliced(
    length: int = 0, now: float = T0, early_server: bytes = b""
) -> tuple[Bed, list[Action]]:
    relay, ct, st, counters = intended(now)
    if early_server:
        st.on_segment(
            TcpSegment(
                SERVER_PEER[1],
                DAEMON_S[1],
                S_IRS + 1,
                S_ISS + 1,
                ACK | PSH,
                1000,
                TcpOptions(timestamp=(8001, st.ts_now(now))),
                early_server,
            ),
            now,
        )
        st.poll_output(now)
    actions = relay.splice(length, b"", now)
    return Bed(relay, ct, st, counters, 5001, 8001 if early_server else 8000), actions


def from_client(
    bed: Bed,
    *,
    seq: int,
    ack: int,
    flags: int = ACK,
    payload: bytes = b"",
    sack: tuple[tuple[int, int], ...] = (),
    window: int = 512,
) -> memoryview:
    bed.c_ts += 1
    opts = TcpOptions(timestamp=(bed.c_ts, 0), sack_blocks=sack)
    seg = TcpSegment(CLIENT_PEER[1], DAEMON_C[1], seq, ack, flags, window, opts, payload)
    return memoryview(build_ipv4_tcp(seg, CLIENT_PEER[0], DAEMON_C[0]))


def from_server(
    bed: Bed, *, seq: int, ack: int, flags: int = ACK, payload: bytes = b""
) -> memoryview:
    bed.s_ts += 1
    opts = TcpOptions(timestamp=(bed.s_ts, 0))
    seg = TcpSegment(SERVER_PEER[1], DAEMON_S[1], seq, ack, flags, 1000, opts, payload)
    return memoryview(build_ipv4_tcp(seg, SERVER_PEER[0], DAEMON_S[0]))


def writes(actions: list[Action]) -> list[tuple[Ipv4Packet, TcpSegment]]:
    """The relayed packets, parsed with their checksums verified."""
    out = []
    for a in actions:
        if isinstance(a, Write):
            assert a.vnet is None  # plain mode in these tests
            ip = Ipv4Packet(memoryview(bytes(a.packet)))
            assert ip.verify_checksum()
            out.append((ip, parse_tcp(ip.payload, ip.src_addr, ip.dst_addr, verify_checksum=True)))
    return out


def emitted(actions: list[Action], iface: Iface) -> list[TcpSegment]:
    return [seg for a in actions if isinstance(a, Emit) and a.iface is iface for seg in a.segments]


def of(actions: list[Action], kind: type) -> list[Action]:
    return [a for a in actions if isinstance(a, kind)]


# ------------------------------------------------------------- splicing


def test_intend_splice_offers_the_server_the_clients_mss_and_scale() -> None:
    relay, ct, _, _ = intended()
    assert relay.server_config.mss == ct.peer_mss == 1460
    assert relay.server_config.rcv_wscale == ct.snd_wscale == 7
    assert relay.server_config.timestamps and relay.server_config.sack


@pytest.mark.parametrize(("client_rtt", "expected"), [(0.02, 0.02), (0.0001, 0.0001), (3.0, 0.25)])
def test_the_server_side_acks_nothing_sooner_than_the_client_paths_rtt(
    client_rtt: float, expected: float
) -> None:
    ct, _ = client_tcb(T0)
    ct.rto.min_rtt = client_rtt
    relay = Relay.intend(1, ct, 2, CFG, msl=1.0, offload=False, counters=RelayCounters())
    assert relay.server_config.min_ack_delay == expected


def test_splice_with_nothing_to_drain_relays_at_once_and_offers_the_fast_path() -> None:
    bed, actions = spliced(0)
    assert bed.relay.pair.client is S.SPLICED and bed.relay.pair.server is S.SPLICED
    (install,) = of(actions, InstallFastPath)
    assert isinstance(install, InstallFastPath)
    keys = [e[0] for e in install.entries]
    assert keys == [(*CLIENT_PEER, *DAEMON_C), (*SERVER_PEER, *DAEMON_S)]
    assert all(e[2] is None for e in install.entries)  # no FIN to watch for
    # Both TCBs are dropped: nothing of them is left to drive.
    assert bed.relay.client.tcb is None and bed.relay.server is not None
    assert bed.relay.server.tcb is None
    assert bed.counters.spliced == 1 and bed.counters.fast_path_installed == 1


def test_a_sealed_splice_shares_empty_buffers_and_still_relays() -> None:
    bed, _ = spliced(10)
    relay = bed.relay
    assert not relay.seal()  # the client side still owes the proxy's 10 bytes
    assert relay.server_config is not None
    bed2, _ = spliced(0)
    relay = bed2.relay
    assert relay.seal()
    assert relay.server_config is None  # only a connect needed it
    assert relay.server is not None
    assert relay.client.queue is relay.server.outbox  # one shared instance
    with pytest.raises(RuntimeError):
        relay.client.queue.append((None, b""))
    # Relaying needs none of them.
    pkt = from_client(bed2, seq=C_IRS + 1, ack=C_ISS + 1, flags=ACK | PSH, payload=b"GET /")
    ((_, seg),) = writes(relay.on_packet(CLIENT, None, pkt, T0 + 0.01))
    assert bytes(seg.payload) == b"GET /"
    assert relay.stats()["queued"] == 0


def test_client_data_is_relayed_in_the_servers_sequence_space() -> None:
    bed, _ = spliced(0)
    pkt = from_client(bed, seq=C_IRS + 1, ack=C_ISS + 1, flags=ACK | PSH, payload=b"GET /")
    ((ip, seg),) = writes(bed.relay.on_packet(CLIENT, None, pkt, T0 + 0.01))
    assert (ip.src_addr, seg.src_port) == DAEMON_S and (ip.dst_addr, seg.dst_port) == SERVER_PEER
    assert seg.seq == S_ISS + 1  # the server TCB's next byte: nothing was sent before
    assert seg.ack == S_IRS + 1
    assert bytes(seg.payload) == b"GET /"
    assert bed.relay.bytes_c2s == 5 and bed.relay.packets_c2s == 1


def test_len_bytes_keep_the_client_side_pre_spliced_until_written_and_acked() -> None:
    bed, actions = spliced(10)
    relay = bed.relay
    assert relay.pair.client is S.PRE_SPLICED and relay.pair.server is S.SPLICED
    assert not of(actions, InstallFastPath)
    # Server data toward the client waits: the client TCB still speaks.
    data = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 1, flags=ACK | PSH, payload=b"x" * 100)
    assert writes(relay.on_packet(SERVER, None, data, T0)) == []
    assert len(relay.client.queue) == 1
    # The proxy writes its 10 bytes: the client TCB sends them itself.
    sent = emitted(relay.on_proxy_data(CLIENT, b"0123456789", T0), CLIENT)
    assert [bytes(s.payload) for s in sent] == [b"0123456789"]
    assert sent[0].seq == C_ISS + 1
    # The client acknowledges them: the side drains, the queue is flushed
    # right behind the 10 bytes, and the pair may leave for the kernel.
    ack = from_client(bed, seq=C_IRS + 1, ack=C_ISS + 11)
    actions = relay.on_packet(CLIENT, None, ack, T0 + 0.01)
    assert relay.pair.client is S.SPLICED
    out = writes(actions)
    assert [len(s.payload) for _, s in out] == [100, 0]  # the queued data, then the ACK relayed
    ip, seg = out[0]
    assert (ip.dst_addr, seg.dst_port) == CLIENT_PEER and seg.seq == C_ISS + 11
    assert of(actions, InstallFastPath)
    assert ArmTimer(CLIENT, None) in actions


def test_more_than_len_is_discarded_and_reported_once_per_fd() -> None:
    bed, _ = spliced(3)
    a = bed.relay.on_proxy_data(CLIENT, b"ok\nTOO MUCH", T0)
    assert [bytes(s.payload) for s in emitted(a, CLIENT)] == [b"ok\n"]
    misuse = [m for m in a if isinstance(m, ProxyMisuse)]
    assert [m.iface for m in misuse] == [CLIENT] and "more than len" in misuse[0].message
    assert of(bed.relay.on_proxy_data(CLIENT, b"more", T0), ProxyMisuse) == []
    b = bed.relay.on_proxy_data(SERVER, b"nor this", T0)
    assert [m.iface for m in b if isinstance(m, ProxyMisuse)] == [SERVER]
    assert emitted(b, SERVER) == []
    assert bed.relay.proxy_discarded == 8 + 4 + 8


def test_a_proxy_that_closes_short_of_len_lets_the_side_drain() -> None:
    bed, _ = spliced(10)
    bed.relay.on_proxy_data(CLIENT, b"abc", T0)
    bed.relay.on_proxy_done(CLIENT, T0)
    ack = from_client(bed, seq=C_IRS + 1, ack=C_ISS + 4)
    bed.relay.on_packet(CLIENT, None, ack, T0)
    assert bed.relay.pair.client is S.SPLICED


def test_server_bytes_unread_at_splice_cross_to_the_client_after_the_len_bytes() -> None:
    bed, _ = spliced(5, early_server=b"EARLY")
    a = bed.relay.on_proxy_data(CLIENT, b"reply", T0)
    payload = b"".join(bytes(s.payload) for s in emitted(a, CLIENT))
    assert payload == b"replyEARLY"
    # The server direction starts after the early bytes the server TCB received.
    ack = from_client(bed, seq=C_IRS + 1, ack=C_ISS + 11)
    bed.relay.on_packet(CLIENT, None, ack, T0)
    data = from_server(bed, seq=S_IRS + 6, ack=S_ISS + 1, flags=ACK | PSH, payload=b"more")
    ((_, seg),) = writes(bed.relay.on_packet(SERVER, None, data, T0))
    assert seg.seq == C_ISS + 11


def test_client_bytes_unread_at_splice_go_to_the_server_first() -> None:
    relay, ct, _, _ = intended()
    ct.on_segment(
        TcpSegment(
            CLIENT_PEER[1],
            DAEMON_C[1],
            C_IRS + 1,
            C_ISS + 1,
            ACK | PSH,
            512,
            TcpOptions(timestamp=(5002, ct.ts_now(T0))),
            b"pipelined",
        ),
        T0,
    )
    relay.reclaimed = b"req:"  # what the shell had taken out for the proxy's fd
    actions = relay.splice(0, b"unread|", T0)
    sent = emitted(actions, SERVER)
    assert b"".join(bytes(s.payload) for s in sent) == b"unread|req:pipelined"
    assert relay.pair.server is S.PRE_SPLICED


def test_relayed_data_repeating_snd_una_is_no_duplicate_ack_for_a_draining_tcb() -> None:
    bed, _ = spliced(4000)
    relay = bed.relay
    relay.on_proxy_data(CLIENT, bytes(4000), T0)
    # The client keeps sending data (toward the server, relayed) without
    # acknowledging the reply yet: each segment repeats SND.UNA.
    seq = C_IRS + 1
    for i in range(5):
        pkt = from_client(bed, seq=seq, ack=C_ISS + 1, flags=ACK | PSH, payload=b"d" * 100)
        seq += 100
        actions = relay.on_packet(CLIENT, None, pkt, T0 + 0.001 * i)
        assert emitted(actions, CLIENT) == []  # no fast retransmit
        assert len(writes(actions)) == 1
    assert bed.client.stats.dup_acks == 0 and bed.client.stats.fast_retransmits == 0


def test_pure_duplicate_acks_do_drive_a_draining_tcbs_fast_retransmit() -> None:
    bed, _ = spliced(4000)
    relay = bed.relay
    first = emitted(relay.on_proxy_data(CLIENT, bytes(4000), T0), CLIENT)
    assert sum(len(s.payload) for s in first) == 4000
    retransmitted: list[TcpSegment] = []
    for i in range(4):  # a new ACK, then three duplicates of it
        pkt = from_client(bed, seq=C_IRS + 1, ack=C_ISS + 1 + 1448)
        retransmitted += emitted(relay.on_packet(CLIENT, None, pkt, T0 + 0.01 * (i + 1)), CLIENT)
    assert [s.seq for s in retransmitted if s.payload] == [C_ISS + 1 + 1448]


def test_a_draining_tcb_retransmits_on_its_timer() -> None:
    bed, _ = spliced(10)
    bed.relay.on_proxy_data(CLIENT, b"0123456789", T0)
    assert bed.client.rto_deadline is not None
    later = bed.client.rto_deadline + 0.001
    again = emitted(bed.relay.on_timer(CLIENT, later), CLIENT)
    assert [bytes(s.payload) for s in again] == [b"0123456789"]


def test_a_draining_tcbs_ts_clock_stops_where_the_relayed_ones_begin() -> None:
    """Its retransmission seconds later carries a TSval short of the splice's plus
    TS_MARGIN, so the TSvals the relay maps in its name stay the newest the peer has seen
    (PAWS), and the margin can stay small (daemon/splice/session.py: port reuse)."""
    bed, _ = spliced(10)
    at_splice = bed.client.ts_now(T0)
    assert bed.relay.client.base is not None
    assert bed.relay.client.base.ts_sent == (at_splice + TS_MARGIN) & 0xFFFFFFFF
    bed.relay.on_proxy_data(CLIENT, b"0123456789", T0)
    later = T0 + 5.0
    again = emitted(bed.relay.on_timer(CLIENT, later), CLIENT)
    assert again and all(seg.options.timestamp is not None for seg in again)
    stopped = (at_splice + TS_MARGIN - 1) & 0xFFFFFFFF
    assert {seg.options.timestamp[0] for seg in again} == {stopped}  # type: ignore[index]


def test_a_tcb_giving_up_while_draining_resets_both_sides() -> None:
    bed, _ = spliced(10)
    relay = bed.relay
    relay.on_proxy_data(CLIENT, b"0123456789", T0)
    now = T0
    actions: list[Action] = []
    for _ in range(CFG.max_retries + 2):
        deadline = bed.client.next_deadline()
        if deadline is None:
            break
        now = deadline + 0.001
        actions = relay.on_timer(CLIENT, now)
        if of(actions, TearDown):
            break
    assert of(actions, TearDown)
    assert relay.pair.client is S.GONE and relay.pair.server is S.GONE
    assert any(s.flags & RST for s in emitted(actions, CLIENT))


# ------------------------------------------------------------ teardown


def fin_from_client(bed: Bed, seq: int = C_IRS + 1) -> memoryview:
    return from_client(bed, seq=seq, ack=C_ISS + 1, flags=ACK | FIN)


def test_fin_relayed_then_acked_is_watched_for_in_the_fast_path() -> None:
    bed, _ = spliced(0)
    relay = bed.relay
    a = relay.on_packet(CLIENT, None, fin_from_client(bed), T0)
    ((_, seg),) = writes(a)
    assert seg.flags & FIN and seg.seq == S_ISS + 1
    assert relay.pair.server is S.FIN_RELAYED
    server_key = (*SERVER_PEER, *DAEMON_S)
    # The watch is set before the FIN leaves: its ACK may come straight back.
    watch = a.index(WatchFinAck(server_key, S_ISS + 2))
    assert watch < next(i for i, x in enumerate(a) if isinstance(x, Write))
    # The server acknowledges the FIN: SHUTDOWN, and the watch ends.
    b = relay.on_packet(SERVER, None, from_server(bed, seq=S_IRS + 1, ack=S_ISS + 2), T0)
    assert relay.pair.server is S.SHUTDOWN
    assert WatchFinAck(server_key, None) in b
    # An ACK below the FIN does not count.
    bed2, _ = spliced(0)
    bed2.relay.on_packet(CLIENT, None, fin_from_client(bed2), T0)
    bed2.relay.on_packet(SERVER, None, from_server(bed2, seq=S_IRS + 1, ack=S_ISS + 1), T0)
    assert bed2.relay.pair.server is S.FIN_RELAYED


def test_both_fins_acked_arm_timewait_and_its_expiry_tears_down() -> None:
    bed, _ = spliced(0)
    relay = bed.relay
    relay.on_packet(CLIENT, None, fin_from_client(bed), T0)
    relay.on_packet(
        SERVER, None, from_server(bed, seq=S_IRS + 1, ack=S_ISS + 2, flags=ACK | FIN), T0
    )
    assert relay.pair.client is S.FIN_RELAYED
    a = relay.on_packet(CLIENT, None, from_client(bed, seq=C_IRS + 2, ack=C_ISS + 2), T0 + 0.5)
    assert relay.pair.client is S.TIMEWAIT and relay.pair.server is S.TIMEWAIT
    assert of(a, ArmTimewait) == [ArmTimewait(T0 + 0.5 + 2 * CFG.msl)]
    # Late segments are still relayed during TIMEWAIT (the last ACK may be lost).
    again = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 2, flags=ACK | FIN)
    assert len(writes(relay.on_packet(SERVER, None, again, T0 + 1))) == 1
    done = relay.on_timewait_expired(T0 + 3)
    assert of(done, TearDown) and relay.pair.client is S.GONE
    assert bed.counters.torn_down == 1


def test_a_new_syn_during_timewait_reopens_the_four_tuple() -> None:
    bed, _ = spliced(0)
    relay = bed.relay
    relay.on_packet(CLIENT, None, fin_from_client(bed), T0)
    relay.on_packet(
        SERVER, None, from_server(bed, seq=S_IRS + 1, ack=S_ISS + 2, flags=ACK | FIN), T0
    )
    relay.on_packet(CLIENT, None, from_client(bed, seq=C_IRS + 2, ack=C_ISS + 2), T0)
    syn = from_client(bed, seq=C_IRS + 100000, ack=0, flags=SYN)
    a = relay.on_packet(CLIENT, None, syn, T0 + 0.1)
    assert of(a, Reopen) and of(a, TearDown) and writes(a) == []
    assert bed.counters.timewait_reopened == 1


def test_a_fin_that_came_before_the_splice_is_sent_by_the_tcb_and_counts_as_relayed() -> None:
    relay, ct, _, _ = intended()
    ct.on_segment(
        TcpSegment(
            CLIENT_PEER[1],
            DAEMON_C[1],
            C_IRS + 1,
            C_ISS + 1,
            ACK | FIN,
            512,
            TcpOptions(timestamp=(5002, ct.ts_now(T0))),
        ),
        T0,
    )
    actions = relay.splice(0, b"", T0)
    fins = [s for s in emitted(actions, SERVER) if s.flags & FIN]
    assert len(fins) == 1 and relay.pair.server is S.PRE_SPLICED
    st = relay.server
    assert st is not None and st.tcb is not None
    ack = TcpSegment(80, 50000, S_IRS + 1, S_ISS + 2, ACK, 1000, TcpOptions(timestamp=(8001, 0)))
    pkt = memoryview(build_ipv4_tcp(ack, SERVER_PEER[0], DAEMON_S[0]))
    relay.on_packet(SERVER, None, pkt, T0)
    assert relay.pair.server is S.SHUTDOWN


def test_rst_is_relayed_and_tears_the_splice_down() -> None:
    bed, _ = spliced(0)
    rst = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 1, flags=RST | ACK)
    a = bed.relay.on_packet(SERVER, None, rst, T0)
    ((ip, seg),) = writes(a)
    assert seg.flags & RST and (ip.dst_addr, seg.dst_port) == CLIENT_PEER
    assert seg.seq == C_ISS + 1
    assert of(a, TearDown) and bed.counters.resets_relayed == 1


def test_rst_toward_a_side_still_draining_is_sent_by_its_own_tcb() -> None:
    bed, _ = spliced(10)  # client side PRE_SPLICED: no server -> client translation yet
    rst = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 1, flags=RST | ACK)
    a = bed.relay.on_packet(SERVER, None, rst, T0)
    assert writes(a) == []
    (reset,) = emitted(a, CLIENT)
    assert reset.flags & RST and reset.seq == bed.client.snd_max
    assert of(a, TearDown)


def test_queue_over_its_limit_drops_like_a_congested_link() -> None:
    bed, _ = spliced(10)
    big = b"q" * 60000
    seq = S_IRS + 1
    for _ in range(QUEUE_LIMIT // 60000 + 5):
        bed.relay.on_packet(SERVER, None, from_server(bed, seq=seq, ack=S_ISS + 1, payload=big), T0)
        seq += len(big)
    assert bed.relay.queue_drops >= 4 and bed.relay.queued_bytes <= QUEUE_LIMIT


def test_a_malformed_packet_is_counted_and_not_relayed() -> None:
    bed, _ = spliced(0)
    pkt = bytearray(from_client(bed, seq=C_IRS + 1, ack=C_ISS + 1, payload=b"x"))
    pkt[32] = 0x10  # data offset 4 words: shorter than the fixed header
    assert bed.relay.on_packet(CLIENT, None, memoryview(pkt), T0) == []
    assert bed.counters.relay_malformed == 1


def test_sack_blocks_move_into_the_receivers_space() -> None:
    bed, _ = spliced(0)
    pkt = from_client(
        bed, seq=C_IRS + 1, ack=C_ISS + 1 + 5000, sack=((C_ISS + 6001, C_ISS + 8001),)
    )
    ((_, seg),) = writes(bed.relay.on_packet(CLIENT, None, pkt, T0))
    assert seg.options.sack_blocks == ((S_IRS + 1 + 6000, S_IRS + 1 + 8000),)
    assert seg.ack == S_IRS + 1 + 5000


@pytest.mark.parametrize("length", [0, 10])
def test_stats_name_each_interfaces_state(length: int) -> None:
    bed, _ = spliced(length)
    st = bed.relay.stats()
    assert st["client_state"] == ("SPLICED" if length == 0 else "PRE_SPLICED")
    assert st["server_state"] == "SPLICED"
    assert st["fast_path"] is (length == 0)
