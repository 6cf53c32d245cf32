"""``--family 6``: the experiments' view of the testbed, and its parsing (no root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed.experiments.family import IPv6View, view
from testbed.experiments.modes import IPV4_ONLY, resolve
from testbed.experiments.params import UsageError, parse_args
from testbed.experiments.runner import loadgen_argv
from testbed.net import Testbed


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


def test_modes_set_up_for_ipv4_only_are_skipped_with_the_reason(tmp_path: Path) -> None:
    found = resolve(view(Testbed("tfamv"), 6), tuple(sorted(IPV4_ONLY)), tmp_path)
    assert found.modes == [] and set(found.skipped) == IPV4_ONLY
    assert all("IPv4 only" in why for why in found.skipped.values())


def test_the_load_client_gets_bracketed_ipv6_addresses() -> None:
    six = view(Testbed("tfamv"), 6)
    found = resolve(six, ("router",), Path("/nonexistent"))
    argv = loadgen_argv(six.origin, found.modes[0], (1024,), 1, 1, 5.0, False, None)
    assert argv[argv.index("--server") + 1] == "[2001:db8:5::2]:80"
