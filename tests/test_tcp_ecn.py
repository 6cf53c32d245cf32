"""RFC 3168 ECN in the endpoint: negotiation, ECT on new data, CE -> ECE until CWR, ECE -> half.

The peer is played by hand-built segments, as in test_tcp_states; the
namespace test with Linux peers and CE-marking links is
tests/test_ecn_ns.py.
"""

from __future__ import annotations

from daemon.tcp.config import TcpConfig
from daemon.tcp.connection import TcpConnection
from daemon.tcp.isn import IsnGenerator
from daemon.tcp.listener import TcpListener
from daemon.tcp.state import TcpState
from daemon.wire.ipv4 import ECN_CE, ECN_ECT0, ECN_NOT_ECT
from daemon.wire.tcp import ACK, CWR, ECE, PSH, SYN, TcpOptions, TcpSegment

L = (bytes([198, 51, 100, 1]), 33000)
R = (bytes([203, 0, 113, 9]), 80)
ISS = 1000
PISS = 5000
CFG = TcpConfig(timestamps=False, delayed_ack=0.04, min_rto=0.2, initial_rto=1.0)
MSS = 1460


def seg(
    seq: int,
    ack: int,
    flags: int,
    payload: bytes = b"",
    *,
    ecn: int = ECN_NOT_ECT,
    opts: TcpOptions | None = None,
) -> TcpSegment:
    return TcpSegment(
        R[1], L[1], seq, ack, flags, 65535, opts or TcpOptions(mss=MSS), payload, ecn=ecn
    )


def opened(synack_flags: int = SYN | ACK | ECE, cfg: TcpConfig = CFG) -> TcpConnection:
    """An active open answered with ``synack_flags``; its output drained."""
    conn = TcpConnection.connect(cfg, L, R, ISS, 0.0)
    conn.poll_output(0.0)
    conn.on_segment(seg(PISS, ISS + 1, synack_flags), 0.01)
    conn.poll_output(0.01)
    assert conn.state is TcpState.ESTABLISHED
    return conn


def accepted(syn_flags: int, cfg: TcpConfig = CFG) -> tuple[TcpConnection, TcpSegment]:
    """A passive open from a SYN with ``syn_flags``: the connection and its SYN-ACK."""
    conn = TcpConnection.accept_syn(cfg, L, R, seg(PISS, 0, syn_flags), ISS, 0.0)
    (synack,) = conn.poll_output(0.0)
    return conn, synack


# --- negotiation (RFC 3168 6.1.1) ---------------------------------------------------


def test_an_active_open_requests_ecn_and_a_synack_with_ece_alone_grants_it() -> None:
    conn = TcpConnection.connect(CFG, L, R, ISS, 0.0)
    (syn,) = conn.poll_output(0.0)
    assert syn.flags == SYN | ECE | CWR and syn.ecn == ECN_NOT_ECT  # 6.1.1: SYNs are never ECT
    assert opened(SYN | ACK | ECE).ecn_ok
    assert not opened(SYN | ACK).ecn_ok  # the peer does not do ECN
    # ECE and CWR both on a SYN-ACK: a peer reflecting the flags, not agreeing.
    assert not opened(SYN | ACK | ECE | CWR).ecn_ok


def test_ecn_off_sends_a_plain_syn_and_ignores_an_ece_synack() -> None:
    conn = TcpConnection.connect(TcpConfig(ecn=False), L, R, ISS, 0.0)
    (syn,) = conn.poll_output(0.0)
    assert syn.flags == SYN
    assert not opened(SYN | ACK | ECE, TcpConfig(ecn=False, timestamps=False)).ecn_ok


def test_a_retransmitted_syn_goes_without_the_ecn_request() -> None:
    """RFC 3168 6.1.1.1: in case a middlebox drops ECN-setup SYNs; then no ECN either way."""
    conn = TcpConnection.connect(CFG, L, R, ISS, 0.0)
    conn.poll_output(0.0)
    conn.on_timer(1.0)
    (again,) = conn.poll_output(1.0)
    assert again.flags == SYN
    conn.on_segment(seg(PISS, ISS + 1, SYN | ACK | ECE), 1.01)
    assert conn.state is TcpState.ESTABLISHED and not conn.ecn_ok


def test_a_passive_open_grants_ecn_only_to_an_ecn_setup_syn() -> None:
    conn, synack = accepted(SYN | ECE | CWR)
    assert conn.ecn_ok and synack.flags == SYN | ACK | ECE
    for flags in (SYN, SYN | ECE, SYN | CWR):
        conn, synack = accepted(flags)
        assert not conn.ecn_ok and synack.flags == SYN | ACK
    conn, synack = accepted(SYN | ECE | CWR, TcpConfig(ecn=False))
    assert not conn.ecn_ok and synack.flags == SYN | ACK


def test_a_syn_cookie_connection_goes_without_ecn() -> None:
    """The cookie keeps no room for it (Linux hides it in the TSval; ours keeps wscale, SACK)."""
    cfg = TcpConfig(syn_backlog=0)
    lst = TcpListener(cfg, L, IsnGenerator(bytes(16)))
    assert lst.on_segment(R, seg(PISS, 0, SYN | ECE | CWR), 0.0) is None
    ((_, synack),) = lst.poll_output()
    assert synack.flags == SYN | ACK and lst.cookies_sent == 1
    conn = lst.on_segment(R, seg(PISS + 1, synack.seq + 1, ACK), 0.01)
    assert conn is not None and conn.state is TcpState.ESTABLISHED and not conn.ecn_ok


# --- the data sender (6.1.2, 6.1.4, 6.1.5) --------------------------------------------


def test_new_data_is_ect0_and_pure_acks_and_retransmissions_are_not() -> None:
    conn = opened()
    conn.send(b"x" * 3000)
    data = conn.poll_output(0.02)
    assert data and all(s.ecn == ECN_ECT0 for s in data)
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK | PSH, b"hello"), 0.03)
    conn.on_timer(0.03 + CFG.delayed_ack)  # type: ignore[operator]
    (ack,) = conn.poll_output(0.1)
    assert not ack.payload and ack.ecn == ECN_NOT_ECT
    conn.on_timer(2.0)  # the RTO: the flight goes again
    resent = conn.poll_output(2.0)
    assert resent and resent[0].seq == ISS + 1 and all(s.ecn == ECN_NOT_ECT for s in resent)


def test_without_ecn_nothing_is_ect() -> None:
    conn = opened(SYN | ACK)
    conn.send(b"x" * 3000)
    assert all(s.ecn == ECN_NOT_ECT for s in conn.poll_output(0.02))


def flight_of(conn: TcpConnection, segments: int, now: float) -> int:
    """Send ``segments`` full segments; the sequence number after them."""
    conn.send(b"d" * (segments * MSS))
    sent = conn.poll_output(now)
    assert sum(len(s.payload) for s in sent) == segments * MSS
    return ISS + 1 + segments * MSS


def test_an_ece_halves_the_window_once_per_flight_and_cwr_goes_on_the_next_new_data() -> None:
    conn = opened()
    end = flight_of(conn, 10, 0.02)
    assert conn.cc.cwnd == 10 * MSS
    conn.on_segment(seg(PISS + 1, ISS + 1 + MSS, ACK | ECE), 0.05)
    assert conn.cc.cwnd == conn.cc.ssthresh == 9 * MSS // 2  # half the flight
    assert conn.stats.ecn_reductions == 1
    # A second ECE for the same flight: no second halving (6.1.2).
    conn.on_segment(seg(PISS + 1, ISS + 1 + 2 * MSS, ACK | ECE), 0.06)
    assert conn.stats.ecn_reductions == 1
    assert conn.cc.cwnd == 9 * MSS // 2
    conn.on_segment(seg(PISS + 1, end - MSS, ACK), 0.065)  # room in the halved window
    conn.send(b"n" * (2 * MSS))
    new = [s for s in conn.poll_output(0.07) if s.payload]
    assert new and new[0].flags & CWR and new[0].seq == end
    assert not any(s.flags & CWR for s in new[1:])  # once only
    # Nothing was lost: no retransmission, no recovery.
    assert conn.stats.retransmits == 0 and not conn.cc.in_recovery
    # Once the flight outstanding at the reduction is acknowledged, a new ECE counts.
    conn.on_segment(seg(PISS + 1, end, ACK), 0.08)
    conn.on_segment(seg(PISS + 1, end + MSS, ACK | ECE), 0.09)
    assert conn.stats.ecn_reductions == 2


def test_an_ece_without_ecn_negotiated_changes_nothing() -> None:
    conn = opened(SYN | ACK)
    flight_of(conn, 10, 0.02)
    conn.on_segment(seg(PISS + 1, ISS + 1 + MSS, ACK | ECE), 0.05)
    assert conn.stats.ecn_reductions == 0 and conn.cc.cwnd > 10 * MSS


# --- the data receiver (6.1.3) --------------------------------------------------------


def test_ce_is_echoed_at_once_and_on_every_ack_until_the_peers_cwr() -> None:
    conn = opened()
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, b"a" * 100, ecn=ECN_CE), 0.02)
    (echo,) = conn.poll_output(0.02)  # not held for the delayed-ACK timer
    assert echo.flags & ECE and echo.ack == PISS + 101
    assert conn.stats.ecn_ce_received == 1
    # Unmarked data after it: still ECE, the sender may not have seen the first.
    conn.on_segment(seg(PISS + 101, ISS + 1, ACK, b"b" * 100, ecn=ECN_ECT0), 0.03)
    conn.on_segment(seg(PISS + 201, ISS + 1, ACK, b"c" * 100, ecn=ECN_ECT0), 0.031)
    (ack,) = conn.poll_output(0.031)
    assert ack.flags & ECE
    # Our data carries it too.
    conn.send(b"reply")
    (data,) = conn.poll_output(0.032)
    assert data.flags & ECE and data.payload == b"reply"
    # The sender's CWR ends the echo.
    conn.on_segment(seg(PISS + 301, ISS + 6, ACK | CWR, b"d" * 100, ecn=ECN_ECT0), 0.04)
    conn.on_segment(seg(PISS + 401, ISS + 6, ACK, b"e" * 100, ecn=ECN_ECT0), 0.041)
    (after,) = conn.poll_output(0.041)
    assert not after.flags & ECE


def test_cwr_and_ce_on_one_segment_is_a_new_congestion_signal() -> None:
    conn = opened()
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, b"a" * 100, ecn=ECN_CE), 0.02)
    conn.poll_output(0.02)
    conn.on_segment(seg(PISS + 101, ISS + 1, ACK | CWR, b"b" * 100, ecn=ECN_CE), 0.03)
    (ack,) = conn.poll_output(0.03)
    assert ack.flags & ECE and conn.stats.ecn_ce_received == 2


def test_ce_without_ecn_negotiated_is_not_echoed() -> None:
    conn = opened(SYN | ACK)
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, b"a" * 100, ecn=ECN_CE), 0.02)
    conn.on_segment(seg(PISS + 101, ISS + 1, ACK, b"b" * 100, ecn=ECN_CE), 0.021)
    (ack,) = conn.poll_output(0.021)
    assert not ack.flags & ECE and conn.stats.ecn_ce_received == 0


def test_a_frozen_tcb_stops_echoing() -> None:
    """After splice() the peers' own ECE and CWR cross the splice (daemon/splice/translator.py)."""
    conn = opened()
    conn.on_segment(seg(PISS + 1, ISS + 1, ACK, b"a" * 100, ecn=ECN_CE), 0.02)
    conn.poll_output(0.02)
    conn.freeze()
    conn.send(b"left")
    (data,) = conn.poll_output(0.03)
    assert not data.flags & ECE


def test_two_endpoints_negotiate_and_converge() -> None:
    """Ours on both ends: the SYN's request, the SYN-ACK's grant, the final ACK."""
    client = TcpConnection.connect(CFG, L, R, ISS, 0.0)
    (syn,) = client.poll_output(0.0)
    server = TcpConnection.accept_syn(CFG, R, L, syn, PISS, 0.0)
    (synack,) = server.poll_output(0.0)
    client.on_segment(synack, 0.01)
    (ack,) = client.poll_output(0.01)
    server.on_segment(ack, 0.02)
    assert client.ecn_ok and server.ecn_ok
    assert client.state is server.state is TcpState.ESTABLISHED
