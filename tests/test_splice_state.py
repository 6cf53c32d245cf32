"""Splice state machine of thesis 5.1 (Fig. 5.1): tables, joint rules, relay predicate.

Every state is reached through the public API only (``PATHS``), so each
test also checks that the state is reachable the way the daemon reaches it.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from daemon.splice.state import (
    EVENT_TRANSITIONS,
    INITIAL_STATES,
    JOINT_TRANSITIONS,
    RELAYING_STATES,
    TRIGGERS,
    Event,
    Iface,
    SplicePair,
    SpliceState,
    SpliceStateError,
    Transition,
    relays_toward,
    render_markdown,
)

CLIENT, SERVER = Iface.CLIENT, Iface.SERVER
S = SpliceState
E = Event
DOC = Path(__file__).resolve().parent.parent / "docs" / "splice-states.md"

# How the daemon brings ``me`` into each state; "other" is the other interface.
_TO_SPLICED = [
    ("server", E.SERVER_CONNECTED),
    ("me", E.SPLICE),
    ("other", E.SPLICE),
    ("me", E.WRITE_QUEUE_DRAINED),
    ("other", E.WRITE_QUEUE_DRAINED),
]
PATHS: dict[S, list[tuple[str, Event]]] = {
    S.CLOSE: [],
    S.ESTABLISHED: [("server", E.SERVER_CONNECTED)],
    S.PRE_SPLICED: _TO_SPLICED[:3],
    S.SPLICED: _TO_SPLICED,
    S.FIN_RELAYED: [*_TO_SPLICED, ("me", E.FIN_RELAYED)],
    S.SHUTDOWN: [*_TO_SPLICED, ("me", E.FIN_RELAYED), ("me", E.FIN_ACKED)],
    S.TIMEWAIT: [
        *_TO_SPLICED,
        ("me", E.FIN_RELAYED),
        ("other", E.FIN_RELAYED),
        ("me", E.FIN_ACKED),
        ("other", E.FIN_ACKED),
    ],
    S.PRE_BOUNDED: [
        ("server", E.SERVER_CONNECTED),
        ("me", E.SPLICE_BOUNDED),
        ("other", E.SPLICE_BOUNDED),
    ],
    S.BOUNDED: [
        ("server", E.SERVER_CONNECTED),
        ("me", E.SPLICE_BOUNDED),
        ("other", E.SPLICE_BOUNDED),
        ("me", E.WRITE_QUEUE_DRAINED),
        ("other", E.WRITE_QUEUE_DRAINED),
    ],
    S.LIMIT_REACHED: [
        ("server", E.SERVER_CONNECTED),
        ("me", E.SPLICE_BOUNDED),
        ("other", E.SPLICE_BOUNDED),
        ("me", E.WRITE_QUEUE_DRAINED),
        ("other", E.WRITE_QUEUE_DRAINED),
        ("me", E.LIMIT_ACKED),
    ],
    S.GONE: [("me", E.RESET)],
}


def reach(iface: Iface, state: SpliceState) -> SplicePair:
    pair = SplicePair()
    for who, event in PATHS[state]:
        target = {"me": iface, "other": iface.other, "server": SERVER}[who]
        pair.handle(target, event)
    assert pair.state(iface) is state, (iface, state, pair)
    return pair


def states_of(iface: Iface) -> list[SpliceState]:
    """States the interface can be in: the client interface is never CLOSE."""
    return [s for s in SpliceState if not (iface is CLIENT and s is S.CLOSE)]


LEGAL = [
    (iface, old, event, new)
    for iface, table in EVENT_TRANSITIONS.items()
    for old, edges in table.items()
    for event, new in edges.items()
]
ILLEGAL = [
    (iface, state, event)
    for iface in Iface
    for state, event in itertools.product(states_of(iface), Event)
    if event not in EVENT_TRANSITIONS[iface].get(state, {})
]


def _id(value: object) -> str:
    return value.name if isinstance(value, Iface | SpliceState | Event) else str(value)


# --- the tables -----------------------------------------------------------------


@pytest.mark.parametrize(("iface", "old", "event", "new"), LEGAL, ids=_id)
def test_every_legal_transition_of_the_table(
    iface: Iface, old: SpliceState, event: Event, new: SpliceState
) -> None:
    pair = reach(iface, old)
    changes = pair.handle(iface, event)
    assert changes[0] == Transition(iface, old, new, event)
    assert pair.state(iface) is new


@pytest.mark.parametrize(("iface", "state", "event"), ILLEGAL, ids=_id)
def test_every_illegal_event_raises_naming_interface_state_and_event(
    iface: Iface, state: SpliceState, event: Event
) -> None:
    pair = reach(iface, state)
    before = repr(pair)
    with pytest.raises(SpliceStateError) as info:
        pair.handle(iface, event)
    message = str(info.value)
    assert iface.value in message
    assert state.name in message
    assert event.name in message
    assert (info.value.iface, info.value.state, info.value.event) == (iface, state, event)
    assert repr(pair) == before  # an illegal event changes nothing


def test_legal_and_illegal_cover_the_whole_cartesian_product() -> None:
    total = sum(len(states_of(iface)) for iface in Iface) * len(Event)
    assert len(LEGAL) + len(ILLEGAL) == total


def test_tables_name_every_state_the_interface_can_be_in() -> None:
    for iface in Iface:
        assert set(EVENT_TRANSITIONS[iface]) == set(states_of(iface))


def test_intend_splice_creates_the_pair_client_established_server_close() -> None:
    pair = SplicePair()
    assert (pair.client, pair.server) == (S.ESTABLISHED, S.CLOSE)
    assert INITIAL_STATES == {CLIENT: S.ESTABLISHED, SERVER: S.CLOSE}


def test_intend_splice_on_an_existing_pair_is_illegal() -> None:
    with pytest.raises(SpliceStateError, match="INTEND_SPLICE"):
        SplicePair().handle(CLIENT, E.INTEND_SPLICE)


def test_splice_before_the_server_connection_is_established_is_illegal() -> None:
    with pytest.raises(
        SpliceStateError, match="server interface: event SPLICE is illegal in CLOSE"
    ):
        SplicePair().handle(SERVER, E.SPLICE)


def test_only_the_server_interface_waits_for_a_connect() -> None:
    with pytest.raises(SpliceStateError, match="client interface"):
        SplicePair().handle(CLIENT, E.SERVER_CONNECTED)


# --- joint rules ----------------------------------------------------------------


@pytest.mark.parametrize("first", list(Iface), ids=_id)
def test_both_shutdown_gives_both_timewait_whichever_fin_is_acked_last(first: Iface) -> None:
    pair = reach(first, S.SPLICED)
    pair.handle(first, E.FIN_RELAYED)
    pair.handle(first.other, E.FIN_RELAYED)
    assert pair.handle(first, E.FIN_ACKED) == [
        Transition(first, S.FIN_RELAYED, S.SHUTDOWN, E.FIN_ACKED)
    ]
    changes = pair.handle(first.other, E.FIN_ACKED)
    assert changes == [
        Transition(first.other, S.FIN_RELAYED, S.SHUTDOWN, E.FIN_ACKED),
        Transition(CLIENT, S.SHUTDOWN, S.TIMEWAIT, None),
        Transition(SERVER, S.SHUTDOWN, S.TIMEWAIT, None),
    ]
    assert (pair.client, pair.server) == (S.TIMEWAIT, S.TIMEWAIT)


def test_one_interface_shutdown_alone_stays_shutdown_and_keeps_relaying() -> None:
    pair = reach(CLIENT, S.SHUTDOWN)
    assert (pair.client, pair.server) == (S.SHUTDOWN, S.SPLICED)
    assert pair.relays_toward(CLIENT)
    assert pair.relays_toward(SERVER)


def test_timewait_is_reported_on_both_interfaces_for_one_2msl_timer() -> None:
    pair = reach(CLIENT, S.SHUTDOWN)
    pair.handle(SERVER, E.FIN_RELAYED)
    changes = pair.handle(SERVER, E.FIN_ACKED)
    assert [c.iface for c in changes if c.enters_timewait] == [CLIENT, SERVER]


@pytest.mark.parametrize("iface", list(Iface), ids=_id)
def test_timewait_expiry_on_either_interface_tears_down_both(iface: Iface) -> None:
    pair = reach(iface, S.TIMEWAIT)
    changes = pair.handle(iface, E.TIMEWAIT_EXPIRED)
    assert changes == [
        Transition(iface, S.TIMEWAIT, S.GONE, E.TIMEWAIT_EXPIRED),
        Transition(iface.other, S.TIMEWAIT, S.GONE, None),
    ]
    assert all(c.torn_down for c in changes)


@pytest.mark.parametrize(
    ("iface", "state"),
    [(iface, state) for iface in Iface for state in states_of(iface) if state is not S.GONE],
    ids=_id,
)
def test_reset_from_every_state_tears_down_both_interfaces(
    iface: Iface, state: SpliceState
) -> None:
    pair = reach(iface, state)
    other = pair.state(iface.other)
    changes = pair.handle(iface, E.RESET)
    assert changes == [
        Transition(iface, state, S.GONE, E.RESET),
        Transition(iface.other, other, S.GONE, None),
    ]
    assert (pair.client, pair.server) == (S.GONE, S.GONE)
    assert not pair.relays_toward(CLIENT)
    assert not pair.relays_toward(SERVER)


def test_joint_rules_never_chain_forever() -> None:
    for (client, server), result in JOINT_TRANSITIONS.items():
        after = {CLIENT: client, SERVER: server} | result
        assert (after[CLIENT], after[SERVER]) not in JOINT_TRANSITIONS


# --- relay predicate ------------------------------------------------------------


@pytest.mark.parametrize("state", list(SpliceState), ids=_id)
def test_relays_toward(state: SpliceState) -> None:
    relaying = {S.SPLICED, S.FIN_RELAYED, S.SHUTDOWN, S.TIMEWAIT, S.BOUNDED, S.LIMIT_REACHED}
    assert relays_toward(state) is (state in relaying)
    assert isinstance(RELAYING_STATES, frozenset)


def test_segments_from_either_side_are_queued_before_splice() -> None:
    pair = reach(SERVER, S.ESTABLISHED)
    assert not pair.relays_toward(CLIENT)
    assert not pair.relays_toward(SERVER)


def test_fin_from_server_while_client_pre_spliced_is_queued() -> None:
    pair = reach(CLIENT, S.PRE_SPLICED)
    pair.handle(SERVER, E.WRITE_QUEUE_DRAINED)  # the server side is drained already
    assert (pair.client, pair.server) == (S.PRE_SPLICED, S.SPLICED)
    assert not pair.relays_toward(CLIENT)  # server -> client: queued
    assert pair.relays_toward(SERVER)  # client -> server: relayed


def test_segments_from_client_are_queued_while_server_pre_spliced() -> None:
    pair = reach(SERVER, S.PRE_SPLICED)
    pair.handle(CLIENT, E.WRITE_QUEUE_DRAINED)
    assert not pair.relays_toward(SERVER)
    assert pair.relays_toward(CLIENT)


def test_client_draining_starts_relaying_so_the_daemon_flushes_the_server_queue() -> None:
    pair = reach(CLIENT, S.PRE_SPLICED)
    (change,) = pair.handle(CLIENT, E.WRITE_QUEUE_DRAINED)
    assert change.starts_relaying
    assert not change.enters_timewait
    assert not change.torn_down


def test_only_entering_spliced_or_bounded_starts_relaying() -> None:
    for iface, old, event, new in LEGAL:
        starts = Transition(iface, old, new, event).starts_relaying
        assert starts is (new in (S.SPLICED, S.BOUNDED))


# --- bounded splice (beyond the thesis: the hand-back of its 7.1) ------------------


@pytest.mark.parametrize("first", list(Iface), ids=_id)
def test_both_limits_acked_hand_both_interfaces_back_whichever_is_last(first: Iface) -> None:
    pair = reach(first, S.LIMIT_REACHED)
    assert pair.state(first.other) is S.BOUNDED
    changes = pair.handle(first.other, E.LIMIT_ACKED)
    assert (pair.client, pair.server) == (S.ESTABLISHED, S.ESTABLISHED)
    backs = [c for c in changes if c.hands_back]
    assert {c.iface for c in backs} == {CLIENT, SERVER}
    assert not any(c.torn_down or c.enters_timewait for c in changes)


def test_one_limit_acked_alone_keeps_relaying_toward_both() -> None:
    pair = reach(CLIENT, S.LIMIT_REACHED)
    assert pair.relays_toward(CLIENT) and pair.relays_toward(SERVER)


def test_a_handed_back_pair_can_be_spliced_again_bounded_or_not() -> None:
    pair = reach(CLIENT, S.LIMIT_REACHED)
    pair.handle(SERVER, E.LIMIT_ACKED)
    for iface in Iface:
        pair.handle(iface, E.SPLICE_BOUNDED)
    assert (pair.client, pair.server) == (S.PRE_BOUNDED, S.PRE_BOUNDED)
    assert not pair.relays_toward(CLIENT)


@pytest.mark.parametrize("state", [S.PRE_BOUNDED, S.BOUNDED, S.LIMIT_REACHED], ids=_id)
def test_no_fin_is_ever_relayed_by_a_bounded_splice(state: SpliceState) -> None:
    pair = reach(CLIENT, state)
    with pytest.raises(SpliceStateError):
        pair.handle(CLIENT, E.FIN_RELAYED)


def test_limit_acked_before_the_drain_is_illegal() -> None:
    pair = reach(CLIENT, S.PRE_BOUNDED)
    with pytest.raises(SpliceStateError, match="LIMIT_ACKED is illegal in PRE_BOUNDED"):
        pair.handle(CLIENT, E.LIMIT_ACKED)


def test_splice_when_already_drained_is_splice_then_write_queue_drained() -> None:
    # Thesis 5.1: ESTABLISHED -> SPLICED when the write queue is already empty.
    pair = reach(SERVER, S.ESTABLISHED)
    first = pair.handle(SERVER, E.SPLICE)
    second = pair.handle(SERVER, E.WRITE_QUEUE_DRAINED)
    assert [(c.old, c.new) for c in first + second] == [
        (S.ESTABLISHED, S.PRE_SPLICED),
        (S.PRE_SPLICED, S.SPLICED),
    ]
    assert second[0].starts_relaying


@pytest.mark.parametrize("state", [S.ESTABLISHED, S.PRE_SPLICED], ids=_id)
def test_fin_cannot_be_relayed_toward_an_interface_that_queues(state: SpliceState) -> None:
    pair = reach(CLIENT, state)
    with pytest.raises(SpliceStateError, match=f"FIN_RELAYED is illegal in {state.name}"):
        pair.handle(CLIENT, E.FIN_RELAYED)


def test_queued_fin_flushed_on_entering_spliced_is_an_ordinary_fin_relayed() -> None:
    # Thesis 5.1 "special transitions": the flush follows entry into SPLICED.
    pair = reach(CLIENT, S.PRE_SPLICED)
    (change,) = pair.handle(CLIENT, E.WRITE_QUEUE_DRAINED)
    assert change.starts_relaying  # the daemon flushes; the queue holds a FIN
    assert pair.handle(CLIENT, E.FIN_RELAYED) == [
        Transition(CLIENT, S.SPLICED, S.FIN_RELAYED, E.FIN_RELAYED)
    ]


def test_retransmitted_fin_is_not_an_event() -> None:
    pair = reach(SERVER, S.FIN_RELAYED)
    with pytest.raises(SpliceStateError):
        pair.handle(SERVER, E.FIN_RELAYED)


# --- a whole splice -------------------------------------------------------------


def test_whole_lifetime_of_a_splice_client_closes_first() -> None:
    pair = SplicePair()
    steps = [
        (SERVER, E.SERVER_CONNECTED),
        (CLIENT, E.SPLICE),
        (SERVER, E.SPLICE),
        (SERVER, E.WRITE_QUEUE_DRAINED),
        (CLIENT, E.WRITE_QUEUE_DRAINED),
        (SERVER, E.FIN_RELAYED),  # client's FIN relayed toward the server
        (SERVER, E.FIN_ACKED),
        (CLIENT, E.FIN_RELAYED),  # server's FIN relayed toward the client
        (CLIENT, E.FIN_ACKED),
        (CLIENT, E.TIMEWAIT_EXPIRED),
    ]
    seen: list[Transition] = []
    for iface, event in steps:
        seen += pair.handle(iface, event)
    assert [(c.iface, c.new) for c in seen if c.event is None] == [
        (CLIENT, S.TIMEWAIT),
        (SERVER, S.TIMEWAIT),
        (SERVER, S.GONE),
    ]
    assert (pair.client, pair.server) == (S.GONE, S.GONE)


def test_repr_names_both_states() -> None:
    pair = reach(CLIENT, S.PRE_SPLICED)
    assert repr(pair) == "SplicePair(client=PRE_SPLICED, server=PRE_SPLICED)"


# --- the doc --------------------------------------------------------------------


def test_every_event_has_a_thesis_to_code_note() -> None:
    assert set(TRIGGERS) == set(Event)


def test_committed_doc_is_the_one_rendered_from_the_table() -> None:
    assert DOC.read_text() == render_markdown(), (
        "docs/splice-states.md drifted; regenerate it with: .venv/bin/python -c "
        "'from daemon.splice.state import render_markdown; print(render_markdown(), end=\"\")'"
        " > docs/splice-states.md"
    )


def test_doc_diagram_has_every_edge_of_the_table() -> None:
    doc = render_markdown()
    for _iface, old, event, new in LEGAL:
        assert f"    {old.name} --> {new.name} : {event.name}\n" in doc
