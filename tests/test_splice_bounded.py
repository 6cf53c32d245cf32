"""Bounded splice and the hand-back, without root: real TCBs, golden packets, actions out.

A bounded splice relays exactly N bytes of each peer's stream and then
returns both connections to the proxy (daemon/splice/relay.py, "Bounded
splice").  These tests hold the relay to the byte: where a segment is cut,
what is held for the resuming TCB, that the TCBs resume with sequence
numbers, windows and timestamps continuous for their peers, and that the
pair can be spliced again.  Helpers and addresses are the relay tests'.
"""

from __future__ import annotations

import pytest

from daemon.splice.relay import (
    Action,
    HandBack,
    InstallFastPath,
    Relay,
    TapData,
    TapEnd,
)
from daemon.splice.state import SpliceState
from daemon.tcp.connection import TcpConnection
from daemon.tcp.state import TcpState
from daemon.wire.ipv4 import Ipv4Packet
from daemon.wire.tcp import ACK, FIN, PSH, TcpOptions, TcpSegment, parse_tcp
from tests.test_splice_relay import (
    C_IRS,
    C_ISS,
    CFG,
    CLIENT,
    DAEMON_S,
    S_IRS,
    S_ISS,
    SERVER,
    SERVER_PEER,
    T0,
    Bed,
    emitted,
    from_client,
    from_server,
    intended,
    of,
    writes,
)

S = SpliceState


def pair(*, early_server: bytes = b"", early_client: bytes = b"") -> Bed:
    """Both TCBs, intended (the relay tests' ``intended``), with bytes each holds unread."""
    relay, ct, st, counters = intended(T0)
    if early_client:  # after intend_splice the daemon holds the client's bytes back
        ct.on_segment(
            TcpSegment(
                40000, 1080, C_IRS + 1, C_ISS + 1, ACK | PSH, 512,
                TcpOptions(timestamp=(5001, ct.ts_now(T0))), early_client,
            ),
            T0,
        )  # fmt: skip
        ct.poll_output(T0)
    if early_server:
        st.on_segment(
            TcpSegment(
                SERVER_PEER[1], DAEMON_S[1], S_IRS + 1, S_ISS + 1, ACK | PSH, 1000,
                TcpOptions(timestamp=(8001, st.ts_now(T0))), early_server,
            ),
            T0,
        )  # fmt: skip
        st.poll_output(T0)
    return Bed(relay, ct, st, counters, 5001, 8001 if early_server else 8000)


def bounded(
    to_client: int,
    to_server: int = 0,
    *,
    length: int = 0,
    early_server: bytes = b"",
    early_client: bytes = b"",
) -> tuple[Bed, list[Action]]:
    bed = pair(early_server=early_server, early_client=early_client)
    return bed, bed.relay.splice(length, b"", T0, limits=(to_client, to_server))


def hand_back(actions: list[Action]) -> HandBack:
    (hb,) = of(actions, HandBack)
    assert isinstance(hb, HandBack)
    return hb


def feed(tcb: TcpConnection, raw: bytes, now: float) -> None:
    """A held segment through the TCB's ordinary input, as the shell re-injects it."""
    ip = Ipv4Packet(memoryview(raw))
    tcb.on_segment(parse_tcp(ip.payload, ip.src_addr, ip.dst_addr, verify_checksum=True), now)


def test_the_response_is_relayed_to_the_byte_and_the_rest_held_for_the_server_tcb() -> None:
    bed, actions = bounded(300)
    relay = bed.relay
    # Nothing to relay toward the server (limit 0): that side is done at once.
    assert (relay.pair.client, relay.pair.server) == (S.BOUNDED, S.LIMIT_REACHED)
    # The kernel may carry it, up to the limits: client segments only at the
    # limit toward the server (pure ACKs), server bytes wholly before the
    # limit toward the client; the client's ACK of the last byte goes up.
    (install,) = of(actions, InstallFastPath)
    assert isinstance(install, InstallFastPath)
    (_, _, c_watch, c_limit), (_, _, s_watch, s_limit) = install.entries
    assert (c_watch, c_limit) == (C_ISS + 301, C_IRS + 1)
    assert (s_watch, s_limit) == (None, S_IRS + 301)
    a = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 1, flags=ACK | PSH, payload=b"a" * 200)
    ((_, seg),) = writes(relay.on_packet(SERVER, None, a, T0))
    assert seg.seq == C_ISS + 1 and len(seg.payload) == 200
    crossing = b"b" * 100 + b"NEXT" * 25
    b = from_server(bed, seq=S_IRS + 201, ack=S_ISS + 1, flags=ACK | PSH, payload=crossing)
    ((_, seg),) = writes(relay.on_packet(SERVER, None, b, T0))
    assert seg.seq == C_ISS + 201 and bytes(seg.payload) == b"b" * 100
    assert not seg.flags & FIN
    assert relay.pair.client is S.BOUNDED  # relayed, not yet acknowledged
    # The client acknowledges the last byte of the limit: the hand-back.
    ack = from_client(bed, seq=C_IRS + 1, ack=C_ISS + 301)
    actions = relay.on_packet(CLIENT, None, ack, T0 + 0.01)
    ((_, relayed_ack),) = writes(actions)  # the server learns of it first
    assert relayed_ack.ack == S_IRS + 301
    hb = hand_back(actions)
    assert hb.relayed == (0, 300)
    assert (relay.pair.client, relay.pair.server) == (S.ESTABLISHED, S.ESTABLISHED)
    assert bed.counters.handed_back == 1 and bed.counters.bounded == 1
    # The TCBs resume past what was relayed, each in its own space.
    assert not bed.client.frozen and not bed.server.frozen
    assert bed.client.snd_una == bed.client.snd_nxt == C_ISS + 301
    assert bed.server.rcv_nxt == S_IRS + 301
    assert bed.client.snd_wnd == 512 << bed.client.snd_wscale
    # The held segment gives the server TCB exactly the bytes past the limit.
    (held,) = hb.held[SERVER]
    assert hb.held[CLIENT] == []
    feed(bed.server, held[1], T0 + 0.02)
    assert bed.server.recv(1000) == b"NEXT" * 25
    (acked,) = bed.server.poll_output(T0 + 0.02)
    assert acked.ack == S_IRS + 401


def test_the_resumed_tcbs_send_timestamps_their_peers_accept() -> None:
    bed, _ = bounded(100)
    relay = bed.relay
    data = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 1, flags=ACK | PSH, payload=b"r" * 100)
    ((_, relayed),) = writes(relay.on_packet(SERVER, None, data, T0))
    assert relayed.options.timestamp is not None
    last_tsval_to_client = relayed.options.timestamp[0]
    hand_back(relay.on_packet(CLIENT, None, from_client(bed, seq=C_IRS + 1, ack=C_ISS + 101), T0))
    # RFC 7323 5.3 (PAWS): the client drops a TSval older than the newest it saw.
    bed.client.send(b"hello")
    (seg,) = bed.client.poll_output(T0 + 0.001)
    assert seg.options.timestamp is not None
    assert (seg.options.timestamp[0] - last_tsval_to_client) % 2**32 < 2**31
    assert seg.options.timestamp[1] == bed.c_ts  # echoes the client's newest TSval
    assert seg.seq == C_ISS + 101 and seg.ack == C_IRS + 1


def test_pipelined_client_bytes_are_never_relayed_but_their_ack_is() -> None:
    bed, _ = bounded(100)
    relay = bed.relay
    data = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 1, flags=ACK | PSH, payload=b"r" * 100)
    relay.on_packet(SERVER, None, data, T0)
    # The next request, riding on a partial ACK: its ACK goes through as a
    # pure ACK at the limit; its bytes wait for the client TCB.
    nxt = from_client(bed, seq=C_IRS + 1, ack=C_ISS + 51, flags=ACK | PSH, payload=b"GET /2")
    ((_, seg),) = writes(relay.on_packet(CLIENT, None, nxt, T0))
    assert seg.payload == b"" and seg.seq == S_ISS + 1 and seg.ack == S_IRS + 51
    assert relay.pair.client is S.BOUNDED
    again = from_client(bed, seq=C_IRS + 1, ack=C_ISS + 101, flags=ACK | PSH, payload=b"GET /2")
    hb = hand_back(relay.on_packet(CLIENT, None, again, T0))
    assert len(hb.held[CLIENT]) == 2  # both copies; the TCB takes the bytes once
    for _, raw in hb.held[CLIENT]:
        feed(bed.client, raw, T0)
    assert bed.client.recv(100) == b"GET /2"


def test_a_fin_before_the_limit_ends_the_splice_there_and_goes_to_the_tcb() -> None:
    bed, _ = bounded(1000)
    relay = bed.relay
    short = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 1, flags=ACK | FIN, payload=b"s" * 40)
    ((_, seg),) = writes(relay.on_packet(SERVER, None, short, T0))
    assert bytes(seg.payload) == b"s" * 40 and not seg.flags & FIN  # never relayed
    hb = hand_back(
        relay.on_packet(CLIENT, None, from_client(bed, seq=C_IRS + 1, ack=C_ISS + 41), T0)
    )
    assert hb.relayed == (0, 40)
    (held,) = hb.held[SERVER]
    feed(bed.server, held[1], T0)
    assert bed.server.state is TcpState.CLOSE_WAIT  # the proxy reads EOF after the hand-back
    assert bed.server.recv(100) == b""


def test_bytes_past_the_limit_at_the_freeze_go_back_to_the_proxy() -> None:
    bed, actions = bounded(4, 0, early_server=b"BODYNEXT", early_client=b"GET /2")
    relay = bed.relay
    # The client TCB sends the 4 body bytes itself; nothing else crosses.
    assert [bytes(s.payload) for s in emitted(actions, CLIENT)] == [b"BODY"]
    assert emitted(actions, SERVER) == []
    hb = hand_back(
        relay.on_packet(CLIENT, None, from_client(bed, seq=C_IRS + 7, ack=C_ISS + 5), T0)
    )
    assert hb.returned == {CLIENT: b"GET /2", SERVER: b"NEXT"}
    assert hb.relayed == (0, 4)  # every byte the splice moved: the TCB sent them
    assert bed.client.snd_nxt == C_ISS + 5  # nothing relayed past them


def test_a_handed_back_pair_splices_again_in_continuous_sequence_spaces() -> None:
    bed, _ = bounded(100)
    relay = bed.relay
    data = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 1, flags=ACK | PSH, payload=b"1" * 100)
    relay.on_packet(SERVER, None, data, T0)
    hand_back(relay.on_packet(CLIENT, None, from_client(bed, seq=C_IRS + 1, ack=C_ISS + 101), T0))
    # The proxy forwards the next request itself, then splices the next response.
    bed.server.send(b"GET /2\r\n")
    (req,) = bed.server.poll_output(T0 + 0.1)
    assert req.seq == S_ISS + 1 and req.ack == S_IRS + 101
    bed.server.on_segment(
        TcpSegment(
            SERVER_PEER[1], DAEMON_S[1], S_IRS + 101, S_ISS + 9, ACK, 1000,
            TcpOptions(timestamp=(bed.s_ts + 1, req.options.timestamp[0])),  # type: ignore[index]
        ),
        T0 + 0.1,
    )  # fmt: skip
    bed.s_ts += 1
    second = Relay.intend(1, bed.client, 3, CFG, msl=CFG.msl, offload=False, counters=bed.counters)
    second.server_connected(bed.server)
    second.splice(0, b"", T0 + 0.2, limits=(50, 0))
    bed.relay = second
    data = from_server(bed, seq=S_IRS + 101, ack=S_ISS + 9, flags=ACK | PSH, payload=b"2" * 50)
    ((_, seg),) = writes(second.on_packet(SERVER, None, data, T0 + 0.2))
    assert seg.seq == C_ISS + 101 and seg.ack == C_IRS + 1
    hb = hand_back(
        second.on_packet(CLIENT, None, from_client(bed, seq=C_IRS + 1, ack=C_ISS + 151), T0 + 0.3)
    )
    assert hb.relayed == (0, 50) and bed.counters.handed_back == 2
    assert bed.client.snd_nxt == C_ISS + 151 and bed.server.rcv_nxt == S_IRS + 151


@pytest.mark.parametrize("to_server", [0, 6])
def test_a_request_body_of_known_length_is_relayed_to_the_server_too(to_server: int) -> None:
    bed, _ = bounded(10, to_server)
    relay = bed.relay
    body = from_client(bed, seq=C_IRS + 1, ack=C_ISS + 1, flags=ACK | PSH, payload=b"body=xMORE")
    ((_, seg),) = writes(relay.on_packet(CLIENT, None, body, T0))
    assert bytes(seg.payload) == b"body=x"[:to_server]
    resp = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 1 + to_server, flags=ACK, payload=b"k" * 10)
    relay.on_packet(SERVER, None, resp, T0)
    hb = hand_back(
        relay.on_packet(CLIENT, None, from_client(bed, seq=C_IRS + 11, ack=C_ISS + 11), T0)
    )
    assert hb.relayed == (to_server, 10)
    assert bed.server.snd_nxt == S_ISS + 1 + to_server
    feed(bed.client, hb.held[CLIENT][0][1], T0)
    assert bed.client.recv(100) == b"body=xMORE"[to_server:]


def test_a_bounded_splice_is_never_sealed() -> None:
    bed, _ = bounded(10)
    assert not bed.relay.seal()
    assert bed.relay.stats()["bounded"] is True


# ------------------------------------------------------------ TCP tap (thesis 4.4)


def tapped(actions: list[Action]) -> bytes:
    return b"".join(a.data for a in actions if isinstance(a, TapData))


def test_the_tap_gets_the_servers_bytes_in_order_and_once_whatever_the_arrival() -> None:
    bed = pair()
    relay, counters = bed.relay, bed.counters
    actions = relay.splice(0, b"", T0, limits=(300, 0), tap=True)
    assert tapped(actions) == b""
    seg = [bytes([65 + i]) * 100 for i in range(3)]
    got = b""
    # The second and third arrive first (the first was lost before the relay).
    for i in (1, 2):
        pkt = from_server(bed, seq=S_IRS + 1 + 100 * i, ack=S_ISS + 1, flags=ACK, payload=seg[i])
        got += tapped(relay.on_packet(SERVER, None, pkt, T0))
    assert got == b""  # nothing out of order
    first = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 1, flags=ACK, payload=seg[0])
    got += tapped(relay.on_packet(SERVER, None, first, T0))
    assert got == b"".join(seg)
    # A retransmission (lost toward the client this time) adds nothing.
    again = from_server(bed, seq=S_IRS + 101, ack=S_ISS + 1, flags=ACK, payload=seg[1])
    assert tapped(relay.on_packet(SERVER, None, again, T0)) == b""
    actions = relay.on_packet(CLIENT, None, from_client(bed, seq=C_IRS + 1, ack=C_ISS + 301), T0)
    kinds = [type(a) for a in actions if isinstance(a, TapEnd | HandBack)]
    assert kinds == [TapEnd, HandBack]  # the tap is complete before the conns come back
    assert relay.tap is not None and relay.tap.copied == 300
    assert counters.tapped == 1 and counters.tapped_bytes == 300


def test_an_unbounded_tap_ends_at_the_fin_only_once_the_hole_before_it_is_filled() -> None:
    bed = pair()
    relay = bed.relay
    actions = relay.splice(0, b"", T0, tap=True)
    assert not of(actions, InstallFastPath)  # the kernel would not copy for the tap
    last = from_server(bed, seq=S_IRS + 51, ack=S_ISS + 1, flags=ACK | FIN, payload=b"z" * 50)
    out = relay.on_packet(SERVER, None, last, T0)
    assert not of(out, TapEnd) and tapped(out) == b""
    first = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 1, flags=ACK, payload=b"y" * 50)
    out = relay.on_packet(SERVER, None, first, T0)
    assert tapped(out) == b"y" * 50 + b"z" * 50 and of(out, TapEnd)


def test_server_bytes_that_crossed_at_the_freeze_are_tapped_first() -> None:
    actions = pair(early_server=b"EARLYNEXT").relay.splice(0, b"", T0, limits=(5, 0), tap=True)
    assert tapped(actions) == b"EARLY"  # past the limit is the proxy's, not the tap's


def test_the_resumed_tcb_accepts_all_the_window_the_relay_offered_its_peer() -> None:
    # The client's window, relayed, let the server send far past what the
    # server TCB's own buffer would: the server keeps that right edge (a
    # window never shrinks), so the resumed TCB must take a burst up to it.
    bed, _ = bounded(100)
    relay = bed.relay
    data = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 1, flags=ACK | PSH, payload=b"r" * 100)
    relay.on_packet(SERVER, None, data, T0)
    big = from_client(bed, seq=C_IRS + 1, ack=C_ISS + 101, window=65535)  # 8 MB at scale 7
    hand_back(relay.on_packet(CLIENT, None, big, T0))
    edge = S_IRS + 101 + (65535 << 7)
    assert bed.server.rcv_accept == edge % 2**32
    # It advertises its own buffer again: the peer's next burst waits there.
    assert bed.server.rcv_adv == S_IRS + 101 + bed.server.recv_buf.capacity
    burst = b"n" * (bed.server.recv_buf.capacity + 1000)  # more than its own buffer
    bed.server.on_segment(
        TcpSegment(
            SERVER_PEER[1], DAEMON_S[1], S_IRS + 101, S_ISS + 1, ACK, 1000,
            TcpOptions(timestamp=(bed.s_ts + 1, bed.server.ts_now(T0))), burst,
        ),
        T0,
    )  # fmt: skip
    assert len(bed.server.recv_buf) == len(burst)


def test_the_window_offered_while_the_other_side_still_drains_counts_too() -> None:
    # The whole body crossed at the freeze: the client TCB sends it, and the
    # client's ACKs go to the server with the server TCB's fixed ACK and the
    # client's window.  That window is offered too.
    bed, _ = bounded(4, 0, early_server=b"BODY")
    relay = bed.relay
    partial = from_client(bed, seq=C_IRS + 1, ack=C_ISS + 3, window=65535)
    relay.on_packet(CLIENT, None, partial, T0)
    hand_back(relay.on_packet(CLIENT, None, from_client(bed, seq=C_IRS + 1, ack=C_ISS + 5), T0))
    assert bed.server.rcv_accept == (S_IRS + 5 + (65535 << 7)) % 2**32
