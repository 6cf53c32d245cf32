"""A splice read back from the fast path's map relays like the one that wrote it.

A daemon that dies leaves its splices in the kernel's map; the next one
adopts them from the entries alone (daemon/fastpath/adopt.py,
``Relay.adopt``).  These tests take a relay as the daemon drives it,
write its two entries the way the splicer does (``layout.encode`` with
each side's Fig. 5.1 state and FIN watch), "restart" (adopt from the
entries), and feed the original and the adopted relay the same segments:
the packets out and the states must be the same.  No root.
"""

from __future__ import annotations

import ctypes
import ipaddress

import pytest

from daemon.fastpath.adopt import InheritedSplice, adoptable
from daemon.fastpath.layout import FlowKey, SpliceXlate, decode, encode
from daemon.splice.relay import (
    Action,
    ArmTimewait,
    InstallFastPath,
    Relay,
    RelayCounters,
    TearDown,
    WatchFinAck,
    Write,
)
from daemon.splice.state import Iface, SpliceState
from daemon.splice.translator import peek, translate
from tests.test_splice_relay import (
    C_IRS,
    C_ISS,
    CFG,
    S_IRS,
    S_ISS,
    T0,
    Bed,
    fin_from_client,
    from_client,
    from_server,
    of,
    spliced,
)

CLIENT, SERVER = Iface.CLIENT, Iface.SERVER
S = SpliceState
PREFIX = ipaddress.ip_network("198.51.100.0/24")
LINK = 7


def ours(addr: bytes) -> bool:
    return ipaddress.ip_address(addr) in PREFIX


class Map:
    """The flow map as the splicer keeps it: install, then watch updates with states."""

    def __init__(self, bed: Bed, install: InstallFastPath) -> None:
        self.bed = bed
        self.values: dict[FlowKey, SpliceXlate] = {}
        for (key, t, fin_ack, limit), iface in zip(install.entries, (CLIENT, SERVER), strict=True):
            state = bed.relay.pair.state(iface)
            self.values[key] = encode(t, LINK, limit, fin_ack, iface, state)

    def apply(self, actions: list[Action]) -> None:
        relay = self.bed.relay
        for a in actions:
            if isinstance(a, WatchFinAck) and a.key in self.values:
                iface = CLIENT if a.key == relay.client.key else SERVER
                fresh = encode(
                    decode(self.values[a.key], offload=False),
                    LINK,
                    None,
                    a.fin_ack,
                    iface,
                    relay.pair.state(iface),
                )
                self.values[a.key] = fresh

    def entries(self) -> list[tuple[FlowKey, SpliceXlate]]:
        return list(self.values.items())


def offloaded() -> tuple[Bed, Map]:
    bed, actions = spliced(0)
    (install,) = of(actions, InstallFastPath)
    assert isinstance(install, InstallFastPath)
    return bed, Map(bed, install)


def adopt(m: Map, now: float) -> tuple[Relay, list[Action], InheritedSplice]:
    splices, left_out = adoptable(m.entries(), ours=ours, links={LINK}, offload=False)
    assert left_out == 0
    (inh,) = splices
    relay, actions = Relay.adopt(
        99,
        (inh.client_key, inh.server_key),
        inh.c2s,
        inh.s2c,
        inh.states,
        inh.fin_acks,
        msl=CFG.msl,
        offload=False,
        counters=RelayCounters(),
        now=now,
    )
    return relay, actions, inh


def packets(actions: list[Action]) -> list[bytes]:
    return [bytes(a.packet) for a in actions if isinstance(a, Write)]


def both(bed: Bed, adopted: Relay, iface: Iface, pkt: memoryview, now: float) -> list[Action]:
    """Feed one segment to the original and the adopted relay: the same output."""
    want = bed.relay.on_packet(iface, None, memoryview(bytearray(pkt)), now)
    got = adopted.on_packet(iface, None, memoryview(bytearray(pkt)), now)
    assert packets(got) == packets(want)
    assert (adopted.pair.client, adopted.pair.server) == (
        bed.relay.pair.client,
        bed.relay.pair.server,
    )
    return got


def test_an_entry_decodes_to_the_translation_it_was_encoded_from() -> None:
    bed, _ = offloaded()
    relay = bed.relay
    assert relay.c2s is not None and relay.s2c is not None
    for t in (relay.c2s, relay.s2c):
        back = decode(encode(t, LINK), offload=False)
        assert back.seq_delta == t.seq_delta and back.ack_delta == t.ack_delta
        assert (back.tsval_delta, back.tsecr_delta) == (t.tsval_delta, t.tsecr_delta)
        assert (back.tsecr_floor_in, back.tsecr_floor_out) == (t.tsecr_floor_in, t.tsecr_floor_out)
        assert (back.wnd_in_shift, back.wnd_out_shift, back.out_mss) == (
            t.wnd_in_shift,
            t.wnd_out_shift,
            t.out_mss,
        )
    # And translates a segment byte for byte as the original does.
    pkt = from_client(bed, seq=C_IRS + 1, ack=C_ISS + 1, payload=b"x" * 100, sack=((5, 9),))
    info = peek(pkt)
    assert info is not None
    want = [bytes(b) for _, b in translate(relay.c2s, None, memoryview(bytearray(pkt)), info)]
    got = [
        bytes(b)
        for _, b in translate(
            decode(encode(relay.c2s, LINK), offload=False), None, memoryview(bytearray(pkt)), info
        )
    ]
    assert got == want and len(got) == 1


def test_a_splice_adopted_in_the_middle_relays_data_and_its_teardown_alike() -> None:
    bed, m = offloaded()
    adopted, actions, inh = adopt(m, T0 + 1)
    assert actions == []
    assert inh.states == (S.SPLICED, S.SPLICED)
    # Data both ways, then the whole FIN handshake, through both relays.
    both(bed, adopted, CLIENT, from_client(bed, seq=C_IRS + 1, ack=C_ISS + 1, payload=b"a" * 50), 2)
    both(
        bed, adopted, SERVER, from_server(bed, seq=S_IRS + 1, ack=S_ISS + 51, payload=b"b" * 70), 2
    )
    a = both(bed, adopted, CLIENT, fin_from_client(bed, seq=C_IRS + 51), T0 + 2)
    assert adopted.pair.server is S.FIN_RELAYED and of(a, WatchFinAck)
    both(bed, adopted, SERVER, from_server(bed, seq=S_IRS + 71, ack=S_ISS + 52, flags=0x11), 3)
    a = both(bed, adopted, CLIENT, from_client(bed, seq=C_IRS + 52, ack=C_ISS + 72), T0 + 3)
    assert adopted.pair.client is S.TIMEWAIT
    assert of(a, ArmTimewait) == [ArmTimewait(T0 + 3 + 2 * CFG.msl)]
    assert of(adopted.on_timewait_expired(T0 + 6), TearDown)


def test_a_fin_relayed_before_the_restart_is_still_watched_and_completes() -> None:
    bed, m = offloaded()
    m.apply(bed.relay.on_packet(CLIENT, None, fin_from_client(bed), T0))
    adopted, _, inh = adopt(m, T0 + 1)
    assert inh.states[1] is S.FIN_RELAYED and inh.fin_acks[1] == S_ISS + 2
    # The server's ACK of that FIN (with its own FIN) reaches the adopted relay.
    a = both(bed, adopted, SERVER, from_server(bed, seq=S_IRS + 1, ack=S_ISS + 2, flags=0x11), 2)
    assert adopted.pair.server is S.SHUTDOWN and adopted.pair.client is S.FIN_RELAYED
    assert WatchFinAck(adopted.server.key, None) in a  # type: ignore[union-attr]


def test_a_splice_in_timewait_is_adopted_with_a_fresh_2msl() -> None:
    bed, m = offloaded()
    relay = bed.relay
    m.apply(relay.on_packet(CLIENT, None, fin_from_client(bed), T0))
    m.apply(
        relay.on_packet(
            SERVER, None, from_server(bed, seq=S_IRS + 1, ack=S_ISS + 2, flags=0x11), T0
        )
    )
    m.apply(relay.on_packet(CLIENT, None, from_client(bed, seq=C_IRS + 2, ack=C_ISS + 2), T0))
    assert relay.pair.client is S.TIMEWAIT
    adopted, actions, _ = adopt(m, T0 + 1.5)
    assert (adopted.pair.client, adopted.pair.server) == (S.TIMEWAIT, S.TIMEWAIT)
    assert actions == [ArmTimewait(T0 + 1.5 + 2 * CFG.msl)]
    # A retransmitted FIN during TIMEWAIT is still relayed, as by the original.
    again = from_server(bed, seq=S_IRS + 1, ack=S_ISS + 2, flags=0x11)
    assert len(packets(both(bed, adopted, SERVER, again, T0 + 2))) == 1


def _mutated(m: Map, key_index: int, **fields: int) -> list[tuple[FlowKey, SpliceXlate]]:
    out = []
    for i, (k, v) in enumerate(m.entries()):
        v2 = SpliceXlate.from_buffer_copy(bytes(v))
        if i == key_index:
            for name, value in fields.items():
                setattr(v2, name, value)
        out.append((k, v2))
    return out


@pytest.mark.parametrize(
    ("index", "fields", "why"),
    [
        (0, {"has_limit": 1}, "a bounded splice: its proxy's TCBs died with the daemon"),
        (1, {"state": 255}, "a state the map cannot carry (OTHER)"),
        (0, {"fin_watch": 1}, "a FIN watch outside FIN_RELAYED"),
        (1, {"egress_ifindex": LINK + 1}, "an egress the new program is not on"),
        (1, {"side": 0}, "two client entries (an older daemon: no side/state notes)"),
        (0, {"sport": (ctypes.c_uint8 * 2)(0, 81)}, "entries that are not each other's reverse"),
        (1, {"hold": 1}, "a kernel connection's take-over that never finished"),
    ],
)
def test_entries_that_do_not_make_a_sound_splice_are_left_out(
    index: int, fields: dict[str, object], why: str
) -> None:
    _, m = offloaded()
    splices, left_out = adoptable(
        _mutated(m, index, **fields),  # type: ignore[arg-type]
        ours=ours,
        links={LINK},
        offload=False,
    )
    assert splices == [] and left_out == 2, why


def test_a_splice_of_other_addresses_or_a_lone_entry_is_left_out() -> None:
    _, m = offloaded()
    entries = m.entries()
    assert adoptable(entries, ours=lambda a: False, links={LINK}, offload=False) == ([], 2)
    assert adoptable(entries[:1], ours=ours, links={LINK}, offload=False) == ([], 1)
    splices, left = adoptable(entries, ours=ours, links={LINK}, offload=False)
    assert len(splices) == 1 and left == 0


def test_a_taken_over_kernel_splice_is_adopted_by_the_hosts_addresses() -> None:
    """A splice of two kernel connections (``splice_sockets``) lives on the host's own
    addresses, outside the daemon's prefix; its entries punt to the TUN (punt_ifindex).
    It is adopted when those addresses are the host's (``host``), never by the prefix,
    and an ordinary splice never by the host's addresses."""
    _, m = offloaded()
    kernel = _mutated_all(m.entries(), punt_ifindex=9)
    assert adoptable(kernel, ours=ours, links={LINK}, offload=False) == ([], 2)
    splices, left = adoptable(kernel, ours=ours, links={LINK}, offload=False, host=ours)
    assert len(splices) == 1 and left == 0 and splices[0].client_value.punt_ifindex == 9
    none = lambda _a: False  # noqa: E731
    assert adoptable(kernel, ours=ours, links={LINK}, offload=False, host=none) == ([], 2)
    # One entry punting to the TUN and one not: not one splice.
    assert adoptable(
        _mutated(m, 1, punt_ifindex=9), ours=ours, links={LINK}, offload=False, host=ours
    ) == ([], 2)
    # An ordinary splice is not adopted for being on the host's addresses.
    assert adoptable(m.entries(), ours=none, links={LINK}, offload=False, host=ours) == ([], 2)


def _mutated_all(
    entries: list[tuple[FlowKey, SpliceXlate]], **fields: int
) -> list[tuple[FlowKey, SpliceXlate]]:
    out = []
    for k, v in entries:
        v2 = SpliceXlate.from_buffer_copy(bytes(v))
        for name, value in fields.items():
            setattr(v2, name, value)
        out.append((k, v2))
    return out
