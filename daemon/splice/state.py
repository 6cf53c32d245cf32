"""Splice states of a spliced connection pair (thesis 5.1, Fig. 5.1).

Theory of operation
===================

A splice couples two TCP connections that the daemon terminates: the
*client connection* and the *server connection*.  The daemon's end of each
is an *interface* (``Iface.CLIENT``, ``Iface.SERVER``), and each interface
has its own splice state.  The two machines are almost the same (thesis
5.1: "they are shown separately for convenience"); they differ only at the
start, where the server interface waits in CLOSE for its connect.

The state of an interface says what happens to segments travelling
*toward* it, i.e. segments arriving on the other connection whose payload
the daemon would forward to this interface's peer:

* CLOSE, ESTABLISHED, PRE_SPLICED: they are *queued*.  In ESTABLISHED the
  proxy application may still talk on this connection; in PRE_SPLICED the
  daemon is waiting for this interface's own TCP to drain (everything the
  proxy wrote has been sent and acknowledged), because relaying into a
  connection that is still busy would only make its congestion worse.
* SPLICED, FIN_RELAYED, SHUTDOWN, TIMEWAIT: they are *relayed*, with the
  headers rewritten (thesis 5.2-5.4).
* GONE: the splice is torn down; the daemon answers with a RST.

A *bounded* splice (beyond the thesis: its 7.1 "asymmetric splice", which
hands the connections back to the proxy) relays a fixed number of bytes
toward each interface and then returns both connections to the proxy:

* PRE_BOUNDED: queued, like PRE_SPLICED (this interface's TCB drains).
* BOUNDED: relayed, up to the limit; a segment that crosses it is cut and
  what lies beyond (a FIN included) is held for the TCB that resumes.
* LIMIT_REACHED: every byte up to the limit was relayed *and acknowledged*
  by this interface's peer; segments toward it still relay their ACKs
  (the other direction may not be done), their payload is held.
* Both LIMIT_REACHED: the hand-back (a joint rule) makes both ESTABLISHED
  again, the TCBs resume where the relay left them, and the proxy may talk
  or splice again.

That is the one question the daemon asks on every packet:
``relays_toward(pair.state(destination_iface))``, a frozenset lookup.

Transitions come from two places, both tables that can be held against
Fig. 5.1:

1. ``EVENT_TRANSITIONS[iface][state][event] -> new_state``: something
   happened on one interface (the application called ``splice``, the write
   queue drained, a FIN was relayed toward this interface's peer, ...).
   An event with no entry is a bug in the caller and raises
   ``SpliceStateError`` naming the interface, the state and the event.
2. ``JOINT_TRANSITIONS[(client_state, server_state)] -> {iface: new}``:
   transitions triggered by the *pair* of states, applied after every event
   until nothing changes.  Both SHUTDOWN gives both TIMEWAIT (thesis 5.1,
   SHUTDOWN/TIMEWAIT); one GONE takes the other with it (a RST is relayed
   and the whole splice torn down, thesis 5.1 last paragraph; 2MSL expiry
   ends both).

``SplicePair.handle`` returns every ``Transition`` it made, in order, so the
I/O shell knows when to flush a queue (``starts_relaying``), when to arm
the single 2MSL timer of the pair (``enters_timewait``), and when to tear
the splice down (``torn_down``).  Nothing here does I/O or reads a clock.

Modelling choices, where the thesis leaves room:

* INTEND_SPLICE creates the pair (``SplicePair()`` starts in
  ``INITIAL_STATES``); there is no state before it, so INTEND_SPLICE on an
  existing pair is illegal, like a second ``intend_splice`` call.
* ESTABLISHED -> SPLICED directly (thesis 5.1: the write queue is already
  empty at ``splice``) is SPLICE followed at once by WRITE_QUEUE_DRAINED:
  one edge fewer, and the drain check lives in one place.
* The "special transitions" ESTABLISHED/PRE_SPLICED -> FIN_RELAYED (thesis
  5.1, FIN_RELAYED) happen in the thesis when a queued FIN is flushed while
  the state is changing.  Here the flush follows the reported entry into
  SPLICED, so a flushed FIN is an ordinary SPLICED -> FIN_RELAYED.  A FIN
  is never relayed toward an interface that queues.
* Events mean "the first time": a retransmitted FIN or a repeated ACK of a
  FIN is relayed like any segment and is not an event.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Iface(enum.Enum):
    """The daemon's end of the client connection or of the server connection."""

    CLIENT = "client"
    SERVER = "server"

    @property
    def other(self) -> Iface:
        """The interface at the other end of the splice."""
        return Iface.SERVER if self is Iface.CLIENT else Iface.CLIENT


class SpliceState(enum.Enum):
    """Per-interface splice state: thesis 5.1, plus GONE for a torn-down splice."""

    CLOSE = "CLOSE"
    ESTABLISHED = "ESTABLISHED"
    PRE_SPLICED = "PRE_SPLICED"
    SPLICED = "SPLICED"
    FIN_RELAYED = "FIN_RELAYED"
    SHUTDOWN = "SHUTDOWN"
    TIMEWAIT = "TIMEWAIT"
    PRE_BOUNDED = "PRE_BOUNDED"
    BOUNDED = "BOUNDED"
    LIMIT_REACHED = "LIMIT_REACHED"
    GONE = "GONE"


class Event(enum.Enum):
    """Something that happened to one interface of a splice."""

    INTEND_SPLICE = "INTEND_SPLICE"
    SERVER_CONNECTED = "SERVER_CONNECTED"
    SPLICE = "SPLICE"
    WRITE_QUEUE_DRAINED = "WRITE_QUEUE_DRAINED"
    FIN_RELAYED = "FIN_RELAYED"
    FIN_ACKED = "FIN_ACKED"
    RESET = "RESET"
    TIMEWAIT_EXPIRED = "TIMEWAIT_EXPIRED"
    SPLICE_BOUNDED = "SPLICE_BOUNDED"
    LIMIT_ACKED = "LIMIT_ACKED"


class SpliceStateError(Exception):
    """An event that has no transition from the interface's current state."""

    def __init__(self, iface: Iface, state: SpliceState, event: Event) -> None:
        super().__init__(f"{iface.value} interface: event {event.name} is illegal in {state.name}")
        self.iface = iface
        self.state = state
        self.event = event


CLIENT = Iface.CLIENT
SERVER = Iface.SERVER

CLOSE = SpliceState.CLOSE
ESTABLISHED = SpliceState.ESTABLISHED
PRE_SPLICED = SpliceState.PRE_SPLICED
SPLICED = SpliceState.SPLICED
FIN_RELAYED = SpliceState.FIN_RELAYED
SHUTDOWN = SpliceState.SHUTDOWN
TIMEWAIT = SpliceState.TIMEWAIT
PRE_BOUNDED = SpliceState.PRE_BOUNDED
BOUNDED = SpliceState.BOUNDED
LIMIT_REACHED = SpliceState.LIMIT_REACHED
GONE = SpliceState.GONE

E = Event

# What INTEND_SPLICE creates (thesis 5.1, CLOSE and ESTABLISHED): the client
# connection is already established; the server connection is not yet.
INITIAL_STATES: dict[Iface, SpliceState] = {CLIENT: ESTABLISHED, SERVER: CLOSE}

# Thesis 5.1: segments toward an interface are relayed from SPLICED on.
RELAYING_STATES: frozenset[SpliceState] = frozenset(
    {SPLICED, FIN_RELAYED, SHUTDOWN, TIMEWAIT, BOUNDED, LIMIT_REACHED}
)
QUEUEING_STATES: frozenset[SpliceState] = frozenset({CLOSE, ESTABLISHED, PRE_SPLICED, PRE_BOUNDED})
# A bounded splice: relaying stops at a byte count, then the hand-back.
BOUNDED_STATES: frozenset[SpliceState] = frozenset({PRE_BOUNDED, BOUNDED, LIMIT_REACHED})

# Every state but GONE: a RST relayed in any of them tears the splice down
# (thesis 5.1, last paragraph).
LIVE_STATES: tuple[SpliceState, ...] = tuple(s for s in SpliceState if s is not GONE)


def _common(
    first: dict[SpliceState, dict[Event, SpliceState]],
) -> dict[SpliceState, dict[Event, SpliceState]]:
    """``first`` plus the part of Fig. 5.1 the two interfaces share."""
    table: dict[SpliceState, dict[Event, SpliceState]] = {
        **first,
        # Thesis 5.1 ESTABLISHED: the application calls splice (or, beyond
        # the thesis, a splice bounded by a byte count per direction).
        ESTABLISHED: {E.SPLICE: PRE_SPLICED, E.SPLICE_BOUNDED: PRE_BOUNDED},
        # Thesis 5.1 PRE_SPLICED: this interface's write queue is empty (and,
        # for the client, the proxy has written the bytes it announced).
        PRE_SPLICED: {E.WRITE_QUEUE_DRAINED: SPLICED},
        # Thesis 5.1 SPLICED: a FIN is relayed toward this interface's peer.
        SPLICED: {E.FIN_RELAYED: FIN_RELAYED},
        # Thesis 5.1 FIN_RELAYED: the peer acknowledges the relayed FIN.
        FIN_RELAYED: {E.FIN_ACKED: SHUTDOWN},
        # Thesis 5.1 SHUTDOWN: nothing but RST; TIMEWAIT comes from the joint table.
        SHUTDOWN: {},
        # Thesis 5.1 TIMEWAIT: 2MSL later the splice is torn down.
        TIMEWAIT: {E.TIMEWAIT_EXPIRED: GONE},
        # Bounded splice (thesis 7.1's asymmetric splice): drained, then
        # relaying up to the limit, then the limit acknowledged; the
        # hand-back to ESTABLISHED is the joint rule below.
        PRE_BOUNDED: {E.WRITE_QUEUE_DRAINED: BOUNDED},
        BOUNDED: {E.LIMIT_ACKED: LIMIT_REACHED},
        LIMIT_REACHED: {},
        GONE: {},
    }
    for state in LIVE_STATES:
        if state in table:
            table[state][E.RESET] = GONE
    return table


# Fig. 5.1, one machine per interface: {iface: {state: {event: new_state}}}.
EVENT_TRANSITIONS: dict[Iface, dict[SpliceState, dict[Event, SpliceState]]] = {
    CLIENT: _common({}),
    # Thesis 5.1 CLOSE: entered only by the server interface, left when its
    # TCP connection reaches ESTABLISHED.
    SERVER: _common({CLOSE: {E.SERVER_CONNECTED: ESTABLISHED}}),
}

# Transitions triggered by the joint state, applied until nothing changes:
# {(client_state, server_state): {iface: new_state}}.
JOINT_TRANSITIONS: dict[tuple[SpliceState, SpliceState], dict[Iface, SpliceState]] = {
    # Thesis 5.1 SHUTDOWN/TIMEWAIT: both FINs relayed and acknowledged.
    (SHUTDOWN, SHUTDOWN): {CLIENT: TIMEWAIT, SERVER: TIMEWAIT},
    # The hand-back of a bounded splice: both limits relayed and acknowledged.
    (LIMIT_REACHED, LIMIT_REACHED): {CLIENT: ESTABLISHED, SERVER: ESTABLISHED},
    # Thesis 5.1, last paragraph: a RST tears down the whole splice; so does
    # the 2MSL timeout, which the caller reports on one interface.
    **{(GONE, state): {SERVER: GONE} for state in LIVE_STATES},
    **{(state, GONE): {CLIENT: GONE} for state in LIVE_STATES},
}

# What each event is in this daemon: the thesis-to-code notes of the doc.
TRIGGERS: dict[Event, str] = {
    E.INTEND_SPLICE: (
        "The proxy calls `intend_splice(client, server)` (API op); this creates the"
        " `SplicePair`. The client TCP is established, the server TCP is not yet."
    ),
    E.SERVER_CONNECTED: ("The server-side `TcpConnection` reaches ESTABLISHED (thesis 5.1 CLOSE)."),
    E.SPLICE: (
        "The proxy calls `splice(client, server, len)`; the daemon fires it on both"
        " interfaces. If an interface is already drained the daemon fires"
        " WRITE_QUEUE_DRAINED right after (the thesis's ESTABLISHED -> SPLICED)."
    ),
    E.SPLICE_BOUNDED: (
        "The proxy calls `splice` with `server_limit` (and maybe `client_limit`): the"
        " daemon fires it on both interfaces; the rest is as for SPLICE."
    ),
    E.LIMIT_ACKED: (
        "Every byte up to this interface's limit was relayed toward its peer (a FIN"
        " before the limit ends it there) and the peer acknowledged the last of them."
    ),
    E.WRITE_QUEUE_DRAINED: (
        "This interface's own TCP has nothing unsent or unacknowledged; for the client"
        " interface the proxy has also written the `len` bytes it announced at `splice`."
    ),
    E.FIN_RELAYED: (
        "The daemon relays a FIN toward this interface's peer, fresh or flushed from"
        " the queue (the thesis's special transitions). Retransmitted FINs are not events."
    ),
    E.FIN_ACKED: (
        "A segment from this interface's peer acknowledges the relayed FIN (the first such ACK)."
    ),
    E.RESET: (
        "A RST arrives on either connection: the daemon relays it and fires RESET on"
        " either interface; the joint rule takes the other interface along."
    ),
    E.TIMEWAIT_EXPIRED: (
        "The pair's single 2MSL timer, armed when TIMEWAIT is entered, fires; the daemon"
        " fires it on either interface and removes the splice."
    ),
}


def relays_toward(state: SpliceState) -> bool:
    """Are segments destined to this interface's peer relayed (else queued)?

    Thesis 5.1: segments from the server are queued while the client
    interface is PRE_SPLICED (or earlier), and vice versa.
    """
    return state in RELAYING_STATES


@dataclass(frozen=True, slots=True)
class Transition:
    """One interface changing state; ``event`` is None for a joint transition."""

    iface: Iface
    old: SpliceState
    new: SpliceState
    event: Event | None

    @property
    def starts_relaying(self) -> bool:
        """The queue of segments toward this interface must now be flushed."""
        return self.new in RELAYING_STATES and self.old not in RELAYING_STATES

    @property
    def enters_timewait(self) -> bool:
        """Arm the pair's 2MSL timer (thesis 5.1 TIMEWAIT)."""
        return self.new is TIMEWAIT

    @property
    def hands_back(self) -> bool:
        """A bounded splice ends: the TCBs resume and the proxy has the conns again."""
        return self.new is ESTABLISHED and self.old is LIMIT_REACHED

    @property
    def torn_down(self) -> bool:
        """The splice of this interface no longer exists."""
        return self.new is GONE


class SplicePair:
    """The two splice states of one splice, created at ``intend_splice``."""

    __slots__ = ("client", "server")

    def __init__(self) -> None:
        self.client: SpliceState = INITIAL_STATES[CLIENT]
        self.server: SpliceState = INITIAL_STATES[SERVER]

    def state(self, iface: Iface) -> SpliceState:
        return self.client if iface is CLIENT else self.server

    def relays_toward(self, iface: Iface) -> bool:
        """Are segments destined to ``iface``'s peer relayed (else queued)?"""
        return (self.client if iface is CLIENT else self.server) in RELAYING_STATES

    def handle(self, iface: Iface, event: Event) -> list[Transition]:
        """Apply ``event`` to ``iface``, then the joint rules; return what changed."""
        old = self.state(iface)
        new = EVENT_TRANSITIONS[iface][old].get(event)
        if new is None:
            raise SpliceStateError(iface, old, event)
        changes = [Transition(iface, old, new, event)] if new is not old else []
        self._set(iface, new)
        while (joint := JOINT_TRANSITIONS.get((self.client, self.server))) is not None:
            for side, state in joint.items():
                changes.append(Transition(side, self.state(side), state, None))
                self._set(side, state)
        return changes

    def _set(self, iface: Iface, state: SpliceState) -> None:
        if iface is CLIENT:
            self.client = state
        else:
            self.server = state

    def __repr__(self) -> str:
        return f"SplicePair(client={self.client.name}, server={self.server.name})"


def _mermaid(iface: Iface) -> list[str]:
    lines = ["```mermaid", "stateDiagram-v2"]
    lines.append(f"    [*] --> {INITIAL_STATES[iface].name} : {E.INTEND_SPLICE.name}")
    for state, edges in EVENT_TRANSITIONS[iface].items():
        for event, new in edges.items():
            lines.append(f"    {state.name} --> {new.name} : {event.name}")
    lines.append(f"    {GONE.name} --> [*]")
    lines.append("```")
    return lines


def _toward(state: SpliceState) -> str:
    if state is GONE:
        return "RST (torn down)"
    return "relayed" if relays_toward(state) else "queued"


def _table(iface: Iface) -> list[str]:
    lines = ["| state | event | new state | segments toward this interface's peer |"]
    lines.append("|---|---|---|---|")
    initial = INITIAL_STATES[iface]
    lines.append(f"| (none) | {E.INTEND_SPLICE.name} | {initial.name} | {_toward(initial)} |")
    for state, edges in EVENT_TRANSITIONS[iface].items():
        for event, new in edges.items():
            lines.append(f"| {state.name} | {event.name} | {new.name} | {_toward(new)} |")
    return lines


def _states(states: set[SpliceState]) -> str:
    if states == set(LIVE_STATES):
        return "any but GONE"
    return ", ".join(state.name for state in SpliceState if state in states)


def _joint_rows() -> list[str]:
    """JOINT_TRANSITIONS, one row per result when its pairs form a product of sets."""
    by_result: dict[str, list[tuple[SpliceState, SpliceState]]] = {}
    for pair, result in JOINT_TRANSITIONS.items():
        becomes = ", ".join(f"{side.value} {state.name}" for side, state in result.items())
        by_result.setdefault(becomes, []).append(pair)
    lines = ["| client state | server state | becomes |", "|---|---|---|"]
    for becomes, pairs in by_result.items():
        clients = {client for client, _ in pairs}
        servers = {server for _, server in pairs}
        if len(pairs) == len(clients) * len(servers):
            lines.append(f"| {_states(clients)} | {_states(servers)} | {becomes} |")
        else:
            lines += [f"| {c.name} | {s.name} | {becomes} |" for c, s in pairs]
    return lines


def render_markdown() -> str:
    """docs/splice-states.md, generated from the tables above."""
    out = [
        "# Splice states (thesis 5.1, Fig. 5.1)",
        "",
        "<!-- Generated by daemon.splice.state.render_markdown(); do not edit. Regenerate:",
        "     .venv/bin/python -c 'from daemon.splice.state import render_markdown;"
        ' print(render_markdown(), end="")\' > docs/splice-states.md -->',
        "",
        "Each interface of a splice (the daemon's end of the client connection and of",
        "the server connection) has a splice state. The state of an interface says",
        "what happens to segments destined to that interface's peer: they are",
        "**queued** in " + ", ".join(s.name for s in SpliceState if s in QUEUEING_STATES),
        "and **relayed** in "
        + ", ".join(s.name for s in SpliceState if s in RELAYING_STATES)
        + ".",
        "In GONE the splice is torn down and segments get a RST.",
        "",
        "Source of truth: `EVENT_TRANSITIONS` and `JOINT_TRANSITIONS` in",
        "`daemon/splice/state.py`. Any event not listed is illegal in that state and",
        "raises `SpliceStateError`.",
    ]
    for iface in Iface:
        out += ["", f"## {iface.value.capitalize()} interface", ""]
        out += _table(iface)
        out += [""]
        out += _mermaid(iface)
    out += [
        "",
        "## Joint rules",
        "",
        "Applied after every event, until nothing changes.",
        "",
    ]
    out += _joint_rows()
    out += [
        "",
        "Entering TIMEWAIT arms the pair's single 2MSL timer (`Transition.enters_timewait`);",
        "entering a relaying state flushes the queue toward that interface",
        "(`Transition.starts_relaying`); GONE removes the splice (`Transition.torn_down`);",
        "LIMIT_REACHED -> ESTABLISHED returns the connections to the proxy",
        "(`Transition.hands_back`).",
        "",
        "## Thesis to code: what triggers each event in this daemon",
        "",
        "| event | trigger |",
        "|---|---|",
    ]
    for event in Event:
        out.append(f"| {event.name} | {TRIGGERS[event]} |")
    out += [
        "",
        "## Where this differs from the figure",
        "",
        "* ESTABLISHED -> SPLICED (already drained at `splice`) is SPLICE followed at once",
        "  by WRITE_QUEUE_DRAINED.",
        "* The special transitions ESTABLISHED/PRE_SPLICED -> FIN_RELAYED: a queued FIN",
        "  is flushed only after the interface has entered SPLICED, so it is an ordinary",
        "  SPLICED -> FIN_RELAYED. A FIN is never relayed toward an interface that queues.",
        "* GONE is not in the figure: the splice after a relayed RST or after 2MSL.",
        "* PRE_BOUNDED, BOUNDED and LIMIT_REACHED are not in the thesis either: its 7.1",
        "  names an asymmetric splice that hands control back as future work. A bounded",
        "  splice relays a byte count per direction and then hands both connections",
        "  back (LIMIT_REACHED on both: ESTABLISHED on both). A FIN is never relayed by",
        "  a bounded splice: one before the limit ends the direction there and is held,",
        "  with any bytes beyond the limit, for the TCB that resumes.",
    ]
    return "\n".join(out) + "\n"
