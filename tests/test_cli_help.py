"""Every command a user is told about answers `--help` (argparse formats
each help string with %-interpolation, so one bare '%' is a crash)."""

from __future__ import annotations

import subprocess
import sys

import pytest

COMMANDS = [
    ["daemon"],
    ["testbed"],
    ["testbed", "up"],
    ["testbed", "shape"],
    ["testbed", "capture"],
    ["testbed.experiments"],
    ["proxies.socks5"],
    ["proxies.socks5_spliced"],
    ["proxies.socks5_endpoint"],
    ["proxies.http_proxy"],
    ["proxies.http11_proxy"],
    ["servers.origin"],
    ["clients.loadgen"],
    ["bench.bench_modes"],
    ["bench.bench_wan"],
    ["bench.bench_splice_memory"],
    ["bench.bench_http11"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_help_prints_usage(argv: list[str]) -> None:
    res = subprocess.run(
        [sys.executable, "-m", *argv, "--help"], capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    assert "usage:" in res.stdout
