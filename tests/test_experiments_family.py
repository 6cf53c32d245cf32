"""``--family 6``: the experiments' view of the testbed, and its parsing (no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.experiments.family import IPv6View, view
from testbed.experiments.modes import resolve
from testbed.experiments.params import UsageError, parse_args
from testbed.experiments.runner import loadgen_argv
from testbed.net import Testbed
from tests.helpers import loadgen


def test_family_defaults_to_4_and_takes_6() -> None:
    assert parse_args([]).family == 4
    assert parse_args(["--family", "6"]).family == 6
    with pytest.raises((UsageError, SystemExit)):
        parse_args(["--family", "5"])


def test_the_ipv6_view_answers_every_service_with_its_ipv6_address() -> None:
    tb = Testbed("tfamv")
    six = view(tb, 6)
    assert view(tb, 4) is tb and isinstance(six, IPv6View)
    assert six.origin == ("2001:db8:5::2", 80) and six.sink == ("2001:db8:5::2", 9000)
    assert six.socks == ("2001:db8:c::1", 1080)
    assert six.spliced_socks == ("2001:db8:d::1", 1080)
    assert six.endpoint_socks == ("2001:db8:d::1", 1082)
    assert six.http11_proxy == ("2001:db8:d::1", 3129)
    assert six.host("server").addr == "2001:db8:5::2"
    assert six.prefix == "tfamv" and six.run_dir == tb.run_dir  # the rest passes through


SELF_CONFIGURED = ("dante", "microsocks", "tinyproxy", "spliced-py", "http11-copy")


@pytest.mark.root
def test_the_modes_the_suite_starts_itself_serve_ipv6(testbed: Testbed, tmp_path: Path) -> None:
    """dante, microsocks, tinyproxy, the second daemon of spliced-py and http11-copy come
    up on the IPv6 view's addresses, and a content-checked request crosses each over IPv6."""
    six = view(testbed, 6)
    found = resolve(six, SELF_CONFIGURED, tmp_path)
    try:
        assert found.skipped == {}, found.skipped
        assert [m.name for m in found.modes] == list(SELF_CONFIGURED)
        for mode in found.modes:
            via = mode.socks or mode.http_proxy
            assert via is not None and ":" in via[0], (mode.name, via)
            results = loadgen(
                testbed.host("client"), *loadgen_argv(six.origin, mode, (1 << 20,), 2, 1, 10.0)[3:]
            )
            assert [r["ok"] for r in results] == [True, True], (mode.name, results)
    finally:
        found.stop()


def test_the_load_client_gets_bracketed_ipv6_addresses() -> None:
    six = view(Testbed("tfamv"), 6)
    found = resolve(six, ("router",), Path("/nonexistent"))
    argv = loadgen_argv(six.origin, found.modes[0], (1024,), 1, 1, 5.0, False, None)
    assert argv[argv.index("--server") + 1] == "[2001:db8:5::2]:80"
