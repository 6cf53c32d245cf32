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
