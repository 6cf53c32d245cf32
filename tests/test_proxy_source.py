"""Which source address a proxy attached to the daemon connects from (proxies/daemon_shell.py)."""

from __future__ import annotations

import pytest

from proxies.daemon_shell import destinations, local_for


@pytest.mark.parametrize(
    ("source", "remote", "local"),
    [
        (None, ("203.0.113.2", 80), None),
        ("198.51.100.2", ("203.0.113.2", 80), ("198.51.100.2", 0)),
        # --source names one family: the other's connects leave from the
        # daemon's own default of that family (--source6, --source).
        ("198.51.100.2", ("2001:db8:5::2", 80), None),
        ("2001:db8:d::2", ("2001:db8:5::2", 80), ("2001:db8:d::2", 0)),
        ("2001:db8:d::2", ("203.0.113.2", 80), None),
    ],
)
def test_local_for_keeps_the_source_only_for_its_own_family(
    source: str | None, remote: tuple[str, int], local: tuple[str, int] | None
) -> None:
    assert local_for(source, remote) == local


def test_address_literals_of_either_family_are_taken_as_they_are() -> None:
    assert destinations("2001:db8:5::2", 80, "198.51.100.2") == [("2001:db8:5::2", 80)]
    assert destinations("203.0.113.2", 80, "2001:db8:d::2") == [("203.0.113.2", 80)]


def test_a_name_resolves_to_both_families_the_sources_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import socket

    answers = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8:5::2", 80, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("203.0.113.2", 80)),
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2001:db8:5::3", 80, 0, 0)),
    ]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: answers)
    v6_first = [("2001:db8:5::2", 80), ("2001:db8:5::3", 80), ("203.0.113.2", 80)]
    assert destinations("origin.test", 80, None) == [v6_first[0], v6_first[2], v6_first[1]]
    assert destinations("origin.test", 80, "2001:db8:d::2") == v6_first
    assert destinations("origin.test", 80, "198.51.100.2") == [v6_first[2], *v6_first[:2]]
