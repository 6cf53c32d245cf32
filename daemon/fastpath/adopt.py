"""Which entries of a dead daemon's flow map a new daemon can adopt as splices.

A daemon that dies (SIGKILL, a crash, an upgrade) leaves its tc filters
attached: the program and its flow map live on with them, and the splices
in the map keep flowing in the kernel with nobody to relay their FINs.
The next daemon reads that map (``loader.read_flows_of``) and takes the
splices over: this module decides which, from the entries alone (pure, no
I/O; tests/test_fastpath_adopt.py).

An entry holds one direction's translation (everything ``translate``
needs, ``layout.decode``) and the daemon's notes on the connection its
segments arrive on: which side it is and that side's Fig. 5.1 state
(SPLICED, FIN_RELAYED with the FIN's ACK in ``fin_ack``, SHUTDOWN; both
SHUTDOWN is TIMEWAIT).  A splice is adoptable when both of its entries are
there and agree:

* one CLIENT and one SERVER entry, each the other's reverse: the output
  4-tuple of one is the input 4-tuple of the other, reversed;
* both local addresses are the new daemon's: in its splice prefix, or,
  for a splice of two kernel connections the daemon took over (entries
  that punt to the daemon's TUN, ``punt_ifindex``), addresses of the host
  itself; a map entry for addresses it does not own would only misdirect
  traffic;
* the state is one of the three above, a FIN watch exactly in
  FIN_RELAYED, no byte limit (a bounded splice hands its connections back
  to a proxy, whose TCBs died with the daemon), and the egress link is one
  the new program is attached to.

Everything else is left out, and its 4-tuples then get what any unknown
segment gets from the daemon: a RST (RFC 9293 3.10.7.1), so neither peer
hangs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from daemon.fastpath.layout import (
    SIDE_OF_CODE,
    STATE_OF_CODE,
    FlowKey,
    SpliceXlate,
    decode,
    reverse_key,
)
from daemon.splice.state import Iface, SpliceState
from daemon.splice.translator import Translator

__all__ = ["InheritedSplice", "adoptable"]


@dataclass(frozen=True, slots=True)
class InheritedSplice:
    """One splice read back from a dead daemon's map."""

    client_key: FlowKey  # 4-tuple of the segments arriving from the client
    server_key: FlowKey
    c2s: Translator
    s2c: Translator
    states: tuple[SpliceState, SpliceState]  # (client, server), as Relay.adopt takes them
    # The ACK of the FIN relayed toward a side in FIN_RELAYED (its entry's watch).
    fin_acks: tuple[int | None, int | None]
    # The raw entries, for the new map (counters carried over).
    client_value: SpliceXlate
    server_value: SpliceXlate


def _usable(value: SpliceXlate, links: set[int] | None) -> bool:
    state = STATE_OF_CODE.get(value.state)
    return (
        state is not None
        and value.side in SIDE_OF_CODE
        and not value.has_limit
        and not value.hold  # a take-over the dead daemon never finished
        and bool(value.fin_watch) == (state is SpliceState.FIN_RELAYED)
        and (links is None or value.egress_ifindex in links)
    )


def _none(_addr: bytes) -> bool:
    return False


def adoptable(
    entries: Iterable[tuple[FlowKey, SpliceXlate]],
    *,
    ours: Callable[[bytes], bool],
    links: set[int] | None,
    offload: bool,
    host: Callable[[bytes], bool] | None = None,
) -> tuple[list[InheritedSplice], int]:
    """The splices among ``entries``, and how many entries were left out.

    ``ours``: is this address one of the daemon's; ``host``: one of the
    host's own, where a taken-over kernel connection's entries live (None:
    such splices are left out); ``links``: the ifindexes
    the new program runs on (None: the daemon's own map, any); ``offload``:
    the daemon's TUN mode (the translators' output format).
    """
    table = dict(entries)
    splices: list[InheritedSplice] = []
    for key, v in table.items():
        if SIDE_OF_CODE.get(v.side) is not Iface.CLIENT or not _usable(v, links):
            continue
        # The server's segments arrive on the output connection, reversed.
        server_key = reverse_key(v)
        w = table.get(server_key)
        if w is None or SIDE_OF_CODE.get(w.side) is not Iface.SERVER or not _usable(w, links):
            continue
        if reverse_key(w) != key:
            continue
        # A taken-over kernel connection's addresses are the host's (its
        # entries punt to the TUN: the kernel has no socket for them).
        if bool(v.punt_ifindex) != bool(w.punt_ifindex):
            continue
        local = (host or _none) if v.punt_ifindex else ours
        if not (local(key[2]) and local(server_key[2])):
            continue
        splices.append(
            InheritedSplice(
                client_key=key,
                server_key=server_key,
                c2s=decode(v, offload),
                s2c=decode(w, offload),
                states=(STATE_OF_CODE[v.state], STATE_OF_CODE[w.state]),
                fin_acks=(v.fin_ack if v.fin_watch else None, w.fin_ack if w.fin_watch else None),
                client_value=v,
                server_value=w,
            )
        )
    return splices, len(table) - 2 * len(splices)
