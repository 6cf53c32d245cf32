"""Spliced transfers over a link with real delay, against the router in the same testbed.

A LAN at 0.1 ms RTT hides window limits and congestion-control traps; here
one link at a time gets 10 ms of delay each way (20 ms RTT) and a
content-checked 32 MB transfer through the spliced SOCKS5 proxy must finish
within twice the router's time, each direction, each link, with BBR (this
machine's default) and cubic on the server, on the kernel fast path and on
the Python relay (the client sends with the host's default, BBR here).  What
the two traps were (thesis-era window scale 0 and a server RTT taken from
the proxy's handshake) is in docs/architecture.md, "Over real latency".

The mirror case has a limit that the daemon cannot lift on its own: with
the delay on the *server* link, the client timed the proxy link (its SYN-ACK
and the SOCKS exchange) before any byte of the server path was known, so a
client uploading with BBR or cubic's HyStart holds a tiny window.  The
daemon's ``--client-ack-delay`` (opt-in: every connection's setup pays it)
lifts it; without it the case is an expected failure, kept strict so that it
is noticed when it starts passing.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from testbed.net import Testbed
from tests.conftest import unique_prefix
from tests.helpers import loadgen

pytestmark = pytest.mark.root

SIZE = "32M"
DELAY = "delay=10ms"


ORIGIN_PORT = 8080  # an origin of the test's own, with the congestion control asked for


@dataclass
class Wan:
    bed: Testbed
    origin: tuple[str, int]


@contextmanager
def origin_with(bed: Testbed, cc: str) -> Iterator[tuple[str, int]]:
    """An origin server whose every connection runs ``cc`` (set per socket)."""
    addr = (bed.origin[0], ORIGIN_PORT)
    proc = bed.host("server").popen(
        [
            sys.executable,
            "-m",
            "servers.origin",
            "--quiet",
            "--listen",
            f"{addr[0]}:{addr[1]}",
            "--congestion",
            cc,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield addr
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(
    scope="module",
    params=[("fastpath", "bbr"), ("fastpath", "cubic"), ("python", "bbr"), ("python", "cubic")],
    ids=lambda p: "-".join(p),
)
def wan(request: pytest.FixtureRequest) -> Iterator[Wan]:
    path, cc = request.param
    bed = Testbed(unique_prefix(), msl=1.0, fastpath="on" if path == "fastpath" else "off")
    try:
        bed.up()
        with origin_with(bed, cc) as origin:
            yield Wan(bed, origin)
    finally:
        bed.down()


def transfer(w: Wan, upload: bool, socks: tuple[str, int] | None) -> dict[str, Any]:
    args = ["--server", "{}:{}".format(*w.origin), "--size", SIZE, "--timeout", "60"]
    if upload:
        args.append("--upload")  # the sink answers the body's SHA-256; loadgen checks it
    if socks is not None:
        args += ["--socks5", "{}:{}".format(*socks)]
    (result,) = loadgen(w.bed.host("client"), *args, timeout=90)
    assert result["ok"], result  # content-checked: a corrupt byte is an error, not a time
    return result


def router_and_spliced(
    w: Wan,
    link: str,
    upload: bool,
    bound: float = 2.0,
    retry: bool = True,
    socks: tuple[str, int] | None = None,
) -> tuple[float, float]:
    """The router's best of two and the splice's time, over a shaped ``link``.

    The splice gets a second try only if its first is over ``bound`` times the
    router's: one 32 MB cubic transfer over the (Python) delay line varies from
    0.7x to 2.1x the router's time from run to run (measured here and in CI),
    while the traps this test is for make every run slow.  Best of two on
    both sides is the same rule for both.  No second try where a slow splice
    is the expected outcome (``retry=False``): it would only cost time.
    ``socks``: the proxy (default: the spliced SOCKS5)."""
    proxy = socks or w.bed.spliced_socks
    w.bed.link(link).shape(DELAY)
    try:
        router = min(transfer(w, upload, None)["response_time_s"] for _ in range(2))
        spliced = transfer(w, upload, proxy)["response_time_s"]
        if retry and spliced > bound * router:
            spliced = min(spliced, transfer(w, upload, proxy)["response_time_s"])
    finally:
        w.bed.link(link).clear()
    return router, spliced


@pytest.mark.parametrize("direction", ["download", "upload"])
@pytest.mark.parametrize("link", ["client-proxy", "proxy-server"])
def test_a_spliced_transfer_over_a_10ms_link_keeps_up_with_the_router(
    wan: Wan, link: str, direction: str, request: pytest.FixtureRequest
) -> None:
    expected_slow = link == "proxy-server" and direction == "upload"
    if expected_slow:
        request.applymarker(
            pytest.mark.xfail(
                strict=True,
                reason="the client timed the short proxy link; see --client-ack-delay",
            )
        )
    bound = 2.0
    data_crosses_the_delay_first = (link == "client-proxy") == (direction == "upload")
    if data_crosses_the_delay_first and wan.bed.fastpath != "on":
        # The impairment re-injects the sender's segments one by one (no
        # GSO), so the Python relay reads every 1448-byte packet, and shares
        # the 2 cores with the (Python) impairment itself: CPU-bound near
        # 2x the router's time here (docs/architecture.md).  The fast path is
        # held to 2x; this bound still catches a collapse.
        bound = 3.0
    router, spliced = router_and_spliced(
        wan, link, direction == "upload", bound, retry=not expected_slow
    )
    assert spliced <= bound * router, f"router {router:.2f} s, spliced {spliced:.2f} s"


@pytest.mark.parametrize("direction", ["download", "upload"])
def test_the_kernel_socks5_over_a_10ms_client_link_keeps_up_with_the_router(
    wan: Wan, direction: str
) -> None:
    """The kernel SOCKS5 (``splice_sockets``) connects to the origin itself: its kernel's
    prompt ACK of the SYN-ACK gave the origin's BBR a 20 us minimum RTT, and spliced
    downloads ran at 0.04x the router's rate until the ACK waited for the client's
    request (proxies/socks5_kernel.connect_first)."""
    if wan.bed.fastpath != "on":
        pytest.skip("only the fast path takes sockets over")
    router, spliced = router_and_spliced(
        wan, "client-proxy", direction == "upload", socks=wan.bed.kernel_socks
    )
    assert spliced <= 2 * router, f"router {router:.2f} s, spliced {spliced:.2f} s"


@pytest.fixture(scope="module")
def far_servers() -> Iterator[Wan]:
    """A daemon told that its servers are far: accepted connections ack after 20 ms."""
    bed = Testbed(
        unique_prefix(), msl=1.0, fastpath="on", daemon_args=("--client-ack-delay", "0.02")
    )
    try:
        bed.up()
        yield Wan(bed, bed.origin)
    finally:
        bed.down()


def test_client_ack_delay_lets_a_client_upload_across_a_far_server_link(far_servers: Wan) -> None:
    router, spliced = router_and_spliced(far_servers, "proxy-server", upload=True)
    assert spliced <= 2 * router, f"router {router:.2f} s, spliced {spliced:.2f} s"
