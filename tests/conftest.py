"""Shared pytest configuration.

Tests marked ``root`` need root and network namespaces; they are skipped
otherwise.  Every testbed a test builds gets a unique name prefix and is
removed in a ``finally``, so tests never touch a user's testbed.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest


def pytest_configure(config: pytest.Config) -> None:
    # pytest turns only SIGINT into a clean stop.  SIGTERM (`timeout`, a CI
    # job's time limit, kill) would end the process with every testbed's
    # namespaces and services left behind; as KeyboardInterrupt it runs the
    # fixtures' finally blocks like Ctrl-C does.
    from testbed.process import sigterm_as_ctrl_c

    sigterm_as_ctrl_c()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (builds network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


def unique_prefix(tag: str = "t") -> str:
    """A fresh testbed prefix such as ``t3fa9c1``: never the user's ``tsplice``."""
    return tag + secrets.token_hex(3)


@pytest.fixture(scope="module")
def testbed() -> Iterator[object]:
    """One testbed with services for a whole test module, removed afterwards."""
    from testbed.net import Testbed

    tb = Testbed(unique_prefix())
    try:
        tb.up()
        yield tb
    finally:
        tb.down()


@pytest.fixture(scope="module")
def tb() -> Iterator[object]:
    """A testbed whose splice daemon has a 1 s MSL, so TIME-WAIT ends within a test."""
    from testbed.net import Testbed

    bed = Testbed(unique_prefix(), msl=1.0)
    try:
        bed.up()
        yield bed
    finally:
        bed.down()


@pytest.fixture(scope="module", params=["fastpath", "python"])
def spliced_tb(request: pytest.FixtureRequest) -> Iterator[object]:
    """Like ``tb``, once with the kernel fast path carrying spliced flows, once without."""
    from testbed.net import Testbed

    mode = "on" if request.param == "fastpath" else "off"
    bed = Testbed(unique_prefix(), msl=1.0, fastpath=mode)
    try:
        bed.up()
        yield bed
    finally:
        bed.down()
