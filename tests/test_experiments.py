"""The experiment suite: parameters, statistics, claims, report; one real quick run."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

from testbed.experiments import __main__ as cli
from testbed.experiments import plots, store
from testbed.experiments.claims import (
    Cells,
    Outcome,
    Verdict,
    combine,
    evaluate,
)
from testbed.experiments.connsetup import RateRun, rate_run, splits, summarize_rates
from testbed.experiments.cost import Cost
from testbed.experiments.keepalive import (
    KEEPALIVE,
    KeepaliveRun,
    connections_per_worker,
    keepalive_run,
)
from testbed.experiments.keepalive import summarize as summarize_keepalive
from testbed.experiments.memory import (
    Holder,
    MemoryRound,
    counts,
    fit_slope,
    idle_splices,
)
from testbed.experiments.memory import summarize as summarize_memory
from testbed.experiments.modes import Mode, dante_config, tinyproxy_config
from testbed.experiments.params import HTTP_MODES, UsageError, parse_args
from testbed.experiments.report import ReportInput, render
from testbed.experiments.runner import (
    Sample,
    cost_plan,
    loadgen_argv,
    parse_loadgen,
    plan_steps,
    rotated,
)
from testbed.experiments.stats import cells, median_ci, percentile, summarize

from .conftest import unique_prefix

K, M = 1 << 10, 1 << 20

# -- parameters ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--modes", "router,bogus"], "unknown mode 'bogus'"),
        (["--modes", ","], "--modes is empty"),
        (["--sizes", "1K,12Q"], "bad size '12Q'"),
        (["--sizes", "0"], "at least 1 byte"),
        (["--concurrency", "0"], "bad concurrency '0'"),
        (["--concurrency", "eight"], "bad concurrency 'eight'"),
        (["--concurrency", "100000"], "bad concurrency"),
        (["--repeat", "-1"], "bad --repeat"),
        (["--shape", "delay=fast"], "--shape"),
        (["--prefix-for-tests", "Bad-Name"], "bad prefix"),
        (["--frobnicate"], "unrecognized arguments"),
        (["--experiments", "keepalive,10"], "unknown experiment '10'"),
        (["--experiments", "fig61"], "unknown experiment 'fig61'"),
        (["--keepalive-requests", "0"], "bad --keepalive-requests '0'"),
        (["--keepalive-workers", "many"], "bad --keepalive-workers"),
        (["--keepalive-sizes", "1K,1X"], "--keepalive-sizes"),
    ],
)
def test_bad_input_is_a_usage_error_naming_the_problem(argv: list[str], says: str) -> None:
    with pytest.raises(UsageError, match=None) as err:
        parse_args(argv)
    assert says in str(err.value)


def test_bad_input_prints_one_line_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--modes", "router,ftp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "python -m testbed.experiments: error: unknown mode 'ftp': choose from "
        "router,plain,endpoint,spliced,spliced-kernel,spliced-kernel-after,spliced-py,dante,"
        "microsocks,tinyproxy,http11,http11-copy"
    ]


def test_quick_shrinks_the_defaults_and_skips_shaped_runs() -> None:
    p = parse_args(["--quick"])
    assert p.quick and not p.shaped and not p.wan and p.cost
    assert p.concurrency == (2,) and p.repeat == 1
    assert max(p.sizes) <= M and max(p.load_sizes) <= 64 * K


def test_defaults_follow_the_thesis_sizes_plus_64m() -> None:
    p = parse_args([])
    assert p.sizes[0] == K and p.sizes[-2:] == (16 * M, 64 * M)
    assert p.concurrency == (8, 32, 64) and p.shaped and p.prefix == "tsplice"
    assert max(p.shaped_sizes) <= M  # 1% loss and 10 ms: big sizes would take minutes


def test_setup_rate_and_memory_run_unless_switched_off_and_quick_holds_fewer_splices() -> None:
    default, quick = parse_args([]), parse_args(["--quick"])
    assert default.setup_rate and default.memory and quick.setup_rate and quick.memory
    assert default.memory_splices == (500, 1000, 2000) and max(quick.memory_splices) <= 400
    assert quick.setup_rate_concurrency * quick.setup_rate_connections <= 100
    assert default.setup_rate_size == 1 and default.setup_rate_repeat == 3
    off = parse_args(["--no-setup-rate", "--no-memory"])
    assert not off.setup_rate and not off.memory and off.cost


def test_explicit_flags_win_over_quick_and_lists_are_normalized() -> None:
    p = parse_args(["--quick", "--sizes", "64K,1K,1K", "--concurrency", "4,2", "--repeat", "3"])
    assert p.sizes == (K, 64 * K) and p.concurrency == (2, 4) and p.repeat == 3
    assert parse_args(["--modes", "plain,router,plain"]).modes == ("plain", "router")
    assert parse_args(["--no-cost", "--no-shaped"]).cost is False


# -- statistics ---------------------------------------------------------------


def test_percentiles_interpolate_between_order_statistics() -> None:
    data = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert percentile(data, 50) == 3.0
    assert percentile(data, 0) == 1.0 and percentile(data, 100) == 5.0
    assert percentile(data, 25) == 2.0
    assert percentile([1.0, 2.0], 95) == pytest.approx(1.95)
    assert math.isnan(percentile([], 50))


def test_median_ci_is_min_max_for_five_samples_with_its_real_coverage() -> None:
    low, high, coverage = median_ci([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (low, high) == (1.0, 5.0)
    assert coverage == pytest.approx(1 - 2 / 32)


def test_median_ci_of_twenty_samples_uses_the_6th_and_15th() -> None:
    low, high, coverage = median_ci([float(i) for i in range(1, 21)])
    assert (low, high) == (6.0, 15.0)
    assert 0.95 <= coverage < 0.96


def test_median_ci_of_thousands_of_samples_is_tight_and_does_not_overflow() -> None:
    # 2^n overflows a float beyond n = 1023; a setup-rate cell holds thousands of requests.
    low, high, coverage = median_ci([float(i) for i in range(1, 5001)])
    assert 2425 < low < 2500 < high < 2575 and 0.95 <= coverage < 0.96


def test_failures_are_counted_by_error_and_never_become_times() -> None:
    s = summarize([0.1, 0.2, 0.3], ["reset", "timeout", "reset"])
    assert (s.n_ok, s.n_failed, s.n) == (3, 3, 6)
    assert s.errors == {"reset": 2, "timeout": 1}
    assert s.median == 0.2
    none = summarize([], ["refused"])
    assert none.n_ok == 0 and math.isnan(none.median)


def _sample(mode: str, size: int, t: float | None, exp: str = "min_load") -> Sample:
    return Sample(exp, "unshaped", mode, size, 1, 0, t is not None, t, size, None, None, 0, 0.0)


def test_cells_group_requests_by_experiment_mode_and_size() -> None:
    rows = [_sample("plain", K, 0.1), _sample("plain", K, None), _sample("router", K, 0.05)]
    rows[1].error = "short"
    grouped = cells(rows)
    assert grouped[("min_load", "unshaped", "plain", 1, K)].errors == {"short": 1}
    assert grouped[("min_load", "unshaped", "router", 1, K)].median == 0.05


# -- runner (pure parts) ------------------------------------------------------


def test_requests_the_load_client_never_reported_become_lost_failures() -> None:
    out = "\n".join(
        [
            json.dumps({"size": 1024, "ok": True, "response_time_s": 0.001, "bytes": 1024}),
            "loadgen: noise that is not JSON",
            "{broken json",
        ]
    )
    rows = parse_loadgen(out, sizes=[1024, 2048], repeat=1, concurrency=2, why_lost="crashed")
    assert len(rows) == 4
    lost = [r for r in rows if r.get("error") == "lost"]
    assert sorted(r["size"] for r in lost) == [1024, 2048, 2048]
    assert all(r["detail"] == "crashed" and not r["ok"] for r in lost)


def test_each_round_starts_with_another_mode() -> None:
    modes = [Mode(n, None, ()) for n in ("a", "b", "c")]
    assert [m.name for m in rotated(modes, 0)] == ["a", "b", "c"]
    assert [m.name for m in rotated(modes, 4)] == ["b", "c", "a"]
    assert rotated([], 3) == []


def test_cost_run_is_long_enough_at_the_measured_rate() -> None:
    assert cost_plan(100e6, 5.0, 16 * M) == math.ceil(500e6 / (16 * M))
    assert cost_plan(0.0, 5.0, 16 * M) == math.ceil(50e6 * 5 / (16 * M))  # no estimate: 50 MB/s
    assert cost_plan(1e9, 0.001, 16 * M) == 1  # at least one request


def test_dante_config_allows_everything_without_auth() -> None:
    conf = dante_config("192.0.2.1", 1090, "203.0.113.1")
    assert "internal: 192.0.2.1 port = 1090" in conf
    assert "external: 203.0.113.1" in conf
    assert "clientmethod: none" in conf and "socksmethod: none" in conf
    assert conf.count("from: 0.0.0.0/0 to: 0.0.0.0/0") == 2


# -- connection set-up (pure) ---------------------------------------------------


def _request(ok: bool, start: float, end: float | None, error: str | None = None) -> dict[str, Any]:
    return {"size": 1, "ok": ok, "start": start, "end": end, "error": error}


def test_setup_rate_is_successes_over_the_wall_clock_span_and_failures_are_kept() -> None:
    raw = [
        _request(True, 100.0, 100.5),
        _request(True, 100.2, 101.0),
        _request(False, 100.4, 102.0, "reset"),  # a failure still takes time
        {"size": 1, "ok": False, "start": None, "end": None, "error": "lost"},
    ]
    run = rate_run(raw, "plain", 2, 8)
    assert (run.attempted, run.ok, run.failed) == (4, 2, 2)
    assert run.errors == {"reset": 1, "lost": 1}
    assert run.span_s == pytest.approx(2.0) and run.rate == pytest.approx(1.0)
    none = rate_run([_request(False, 1.0, 2.0, "refused")], "x", 0, 1)
    assert none.ok == 0 and math.isnan(none.rate)


def test_setup_rate_summary_is_the_median_over_rounds_and_a_dead_round_counts_as_zero() -> None:
    def run(mode: str, rnd: int, rate: float, failed: int = 0) -> RateRun:
        errors = {"timeout": failed} if failed else {}
        return RateRun(mode, rnd, 8, 800, 800 - failed, failed, errors, 1.0, rate)

    runs = [run("spliced", 0, 300.0), run("spliced", 1, 250.0, 3), run("spliced", 2, math.nan)]
    runs += [run("router", 0, 1000.0)]
    router, spliced = summarize_rates(runs, ["router", "spliced", "dante"])
    assert (router.mode, router.median) == ("router", 1000.0)
    assert (spliced.median, spliced.low, spliced.high) == (250.0, 0.0, 300.0)
    assert (spliced.connections, spliced.failed, spliced.errors) == (2400, 3, {"timeout": 3})


def _timed(mode: str, size: int, setup: float | None, transfer: float | None) -> Sample:
    ok = transfer is not None
    row = Sample("min_load", "unshaped", mode, size, 1, 0, ok, transfer, size, None, None, 0, 0.0)
    row.setup_s, row.error = setup, None if ok else "reset"
    return row


def test_small_requests_split_into_median_set_up_and_transfer() -> None:
    rows = [
        _timed("spliced", K, 0.003, 0.001),
        _timed("spliced", K, 0.005, 0.002),
        _timed("spliced", K, 0.004, 0.009),
        _timed("spliced", K, 0.004, None),  # failed: counted, not timed
        _timed("router", K, 0.0002, 0.0005),
        _timed("router", M, 0.0002, 0.002),  # above the size limit
    ]
    rows.append(Sample("high_load", "unshaped", "router", K, 8, 0, True, 1.0, K, None, None, 0, 0))
    spliced, router = splits(rows, ["spliced", "router"], 64 * K)
    assert (spliced.mode, spliced.size, spliced.n, spliced.failed) == ("spliced", K, 3, 1)
    assert (spliced.setup, spliced.transfer) == (0.004, 0.002)
    # The median of the sums (4, 7, 13 ms) is not the sum of the medians (6 ms).
    assert spliced.total == pytest.approx(0.007)
    assert spliced.setup_share == pytest.approx(2 / 3)
    assert (router.size, router.n, router.setup, router.transfer) == (K, 1, 0.0002, 0.0005)


# -- memory (pure, and the holder on loopback) ------------------------------------


def test_kib_per_splice_is_the_least_squares_slope() -> None:
    assert fit_slope([(0, 1000), (500, 5500), (1000, 10000), (2000, 19000)]) == pytest.approx(9.0)
    assert fit_slope([(0, 100), (10, 150), (20, 140)]) == pytest.approx(2.0)
    assert math.isnan(fit_slope([(0, 1000)])) and math.isnan(fit_slope([(5, 1), (5, 2)]))


def test_idle_splices_are_spliced_both_ways_with_no_byte_relayed() -> None:
    idle = {"client_state": "SPLICED", "server_state": "SPLICED", "bytes_c2s": 0, "bytes_s2c": 0}
    stats = {
        "connections": 3,
        "splices": [
            idle,
            dict(idle),
            dict(idle, bytes_s2c=1124),  # a finished request
            dict(idle, client_state="TIMEWAIT"),
            dict(idle, client_state="PRE_SPLICED"),  # the CONNECT reply not yet acked
        ],
    }
    assert idle_splices(stats) == 2
    assert counts(stats) == (3, 5)
    assert idle_splices({}) == 0 and counts({}) == (0, 0)


def _round(
    mode: str,
    rnd: int,
    slope: float,
    *,
    start: int = 40_000,
    settled: bool = True,
    failed: int = 0,
) -> MemoryRound:
    points = tuple((n, start + round(slope * n)) for n in (0, 500, 1000, 2000))
    errors = {"timeout": failed} if failed else {}
    after = points[-1][1]
    return MemoryRound(mode, rnd, points, after, failed, errors, 2000 - failed, settled)


def test_memory_per_splice_is_round_1s_slope_and_what_rounds_leave_is_the_leak_check() -> None:
    # Round 1 grows 9 KiB per splice to 58000; round 2 reuses that memory (flat);
    # round 3 keeps 100 KiB more after closing than round 1 did.
    rounds = [
        _round("spliced", 1, 0.0, start=58_000, settled=False),
        _round("spliced", 0, 9.0),
        _round("spliced", 2, 0.05, start=58_000, failed=2),
    ]
    # Round 2 starts from what round 1 left (58300) and dips: that start is no peak.
    rounds[0] = dataclasses.replace(rounds[0], points=((0, 58_300), *rounds[0].points[1:]))
    (m,) = summarize_memory(rounds, ["router", "spliced"])
    assert (m.rounds, m.held, m.failed, m.unsettled) == (3, 2000, 2, 1)
    assert m.kib_per_splice == pytest.approx(9.0)  # not the median over rounds (0.05)
    assert m.over_start == pytest.approx((9.0, 18_100 / 2000))
    assert m.retained_kib == 100
    (one,) = summarize_memory([_round("spliced", 0, 6.0)], ["spliced"])
    assert one.retained_kib is None and one.over_start == pytest.approx((6.0, 6.0))


class _LocalHost:
    """Stands in for a testbed host: runs the command here, as its own process group."""

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(argv, start_new_session=True, **kw)


@contextmanager
def _fake_spliced_socks(refuse: set[int]) -> Iterator[tuple[tuple[str, int], list[int]]]:
    """A SOCKS5 server that answers CONNECT (code 5 for the `refuse`-th ones, 1-based)
    and keeps each connection until the client closes it; yields (address, closed)."""
    listener = socket.create_server(("127.0.0.1", 0))
    closed: list[int] = []
    count = 0

    def serve(conn: socket.socket, n: int) -> None:
        with conn, suppress(OSError):
            conn.recv(3)
            conn.sendall(b"\x05\x00")
            conn.recv(10)
            code = 5 if n in refuse else 0
            conn.sendall(bytes([5, code, 0, 1, 127, 0, 0, 1, 0, 80]))
            if not code:
                while conn.recv(64):
                    pass
                closed.append(n)

    def accept() -> None:
        nonlocal count
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            count += 1
            threading.Thread(target=serve, args=(conn, count), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield listener.getsockname()[:2], closed
    finally:
        listener.close()


def test_the_holder_grows_step_by_step_counts_refusals_and_closes_everything() -> None:
    with _fake_spliced_socks({2}) as (address, closed):
        holder = Holder(_LocalHost(), address, ("192.0.2.9", 9000))
        try:
            assert holder.hold(4) == (3, {"socks5:0x05": 1})  # the 2nd was refused
            assert holder.hold(6) == (6, {"socks5:0x05": 1})  # 3 more, none retried
            assert holder.close() == 6
            for _ in range(50):
                if len(closed) == 6:
                    break
                threading.Event().wait(0.1)
            assert sorted(closed) == [1, 3, 4, 5, 6, 7]
        finally:
            holder.stop()
    assert holder.proc.returncode == 0


# -- claims -------------------------------------------------------------------


def _cells(times: dict[tuple[str, str, int, int], list[float]]) -> Cells:
    return {(e, "unshaped", m, c, s): summarize(v, []) for (e, m, c, s), v in times.items()}


def _spread(center: float) -> list[float]:
    return [center * f for f in (0.98, 0.99, 1.0, 1.01, 1.02)]


def _thesis_world(large_spliced: float = 0.55) -> Cells:
    """Synthetic numbers shaped like the thesis's figures (seconds)."""
    t: dict[tuple[str, str, int, int], list[float]] = {}
    for size, router, plain, spliced in (
        (K, 0.001, 0.002, 0.004),
        (64 * K, 0.002, 0.003, 0.005),
        (4 * M, 0.5, 0.9, large_spliced),
        (16 * M, 2.0, 3.6, 4 * large_spliced),
    ):
        t[("min_load", "router", 1, size)] = _spread(router)
        t[("min_load", "plain", 1, size)] = _spread(plain)
        t[("min_load", "spliced", 1, size)] = _spread(spliced)
    for size in (K, 64 * K):
        t[("high_load", "plain", 8, size)] = _spread(0.01)
        t[("high_load", "spliced", 8, size)] = _spread(0.006)
    return _cells(t)


def test_numbers_like_the_thesis_make_every_claim_hold() -> None:
    results = {r.key: r for r in evaluate(_thesis_world())}
    assert {k: r.verdict for k, r in results.items()} == dict.fromkeys("abcd", Verdict.HOLDS)
    assert [c.size for c in results["a"].checks] == [K, 64 * K]
    assert [c.size for c in results["c"].checks] == [4 * M, 16 * M]  # 1M itself is not "above"
    assert [(c.concurrency, c.size) for c in results["d"].checks] == [(8, K), (8, 64 * K)]


def test_a_spliced_path_as_slow_as_the_copy_proxy_fails_b_and_c() -> None:
    results = {r.key: r for r in evaluate(_thesis_world(large_spliced=0.9))}
    assert results["b"].verdict is Verdict.FAILS  # 0.9 s vs the router's 0.5 s
    assert results["c"].verdict is Verdict.FAILS  # the same as plain: no 25% gain
    assert [round(c.ratio, 2) for c in results["c"].checks] == [1.0, 1.0]


def test_a_gain_just_short_of_25_percent_inside_the_noise_is_a_tie() -> None:
    world = dict(_thesis_world())
    base = world[("min_load", "unshaped", "plain", 1, 4 * M)].median  # 0.9 s
    world[("min_load", "unshaped", "spliced", 1, 4 * M)] = summarize(
        [base * f for f in (0.70, 0.74, 0.76, 0.78, 0.80)], []
    )
    (c,) = [r for r in evaluate(world) if r.key == "c"]
    assert [x.outcome for x in c.checks] == [Outcome.TIE, Outcome.SUPPORTS]
    assert c.verdict is Verdict.PARTLY


def test_without_the_spliced_mode_no_claim_can_be_judged() -> None:
    world = {k: v for k, v in _thesis_world().items() if k[2] != "spliced"}
    results = evaluate(world)
    assert [r.key for r in results] == ["a", "b", "c", "d"]
    assert all(r.verdict is Verdict.CANNOT_JUDGE for r in results)
    assert "spliced" in results[0].reason


def test_verdicts_combine_per_size_outcomes() -> None:
    s, c, t = Outcome.SUPPORTS, Outcome.CONTRADICTS, Outcome.TIE
    assert combine([s, s]) is Verdict.HOLDS
    assert combine([s, c]) is Verdict.PARTLY
    assert combine([c, t]) is Verdict.FAILS
    assert combine([t, t]) is Verdict.UNCLEAR
    assert combine([]) is Verdict.CANNOT_JUDGE


# -- report -------------------------------------------------------------------


def _report(world: Cells, modes: list[str], skipped: dict[str, str]) -> str:
    failing = dict(world)
    failing[("min_load", "unshaped", "plain", 1, 256 * K)] = summarize([], ["reset", "reset"])
    cost = Cost("plain", "unshaped", 100_000_000, 1.0, 0.1, 0.2, 50, 0.5, 900, 0, "")
    return render(
        ReportInput(
            title="t",
            started="s",
            finished="f",
            command="python -m testbed.experiments --quick",
            machine={"cpu_model": "CPU", "cores": 2, "kernel": "6.18"},
            params={"repeat": 5, "load_repeat": 3, "cost_seconds": 5},
            modes=modes,
            skipped=skipped,
            cells=failing,
            costs=[cost],
            claims={"plain": evaluate(failing)},
        )
    )


def test_report_sets_each_claim_beside_the_numbers() -> None:
    text = _report(_thesis_world(), ["router", "plain", "spliced"], {})
    for key in "abcd":
        assert f"| ({key}) |" in text
    assert text.count("**holds**") == 4
    assert "cannot be judged" not in text
    assert "| 4M: 0.61x, 16M: 0.61x |" in text.replace(" | **holds** |", " |")  # (c) ratios
    assert "reset: 2" in text and "**all 2 failed**" in text  # failures shown, not dropped
    assert "| plain | 100 |" in text  # cost row: MB relayed
    assert "2.00" in text  # 0.2 s system / 100 MB = 2.00 ms/MB


def test_report_without_spliced_says_the_claims_cannot_be_judged_yet() -> None:
    world = {k: v for k, v in _thesis_world().items() if k[2] != "spliced"}
    text = _report(world, ["router", "plain"], {"spliced": "not in this testbed yet"})
    assert "skipped **spliced**: not in this testbed yet" in text
    assert "claims (a)-(d) cannot be judged yet" in text
    for key in "abcd":
        assert f"| ({key}) |" in text
    assert "relative to the router" in text


def test_report_gives_wan_throughput_each_way_as_ratios_to_the_router() -> None:
    world = dict(_thesis_world())
    size = 32 * M
    for mode, down, up in (("router", 1.0, 1.0), ("spliced", 1.25, 2.0)):
        world[("wan", "download", mode, 1, size)] = summarize(_spread(down), [])
        world[("wan", "upload", mode, 1, size)] = summarize(_spread(up), ["timeout"])
    text = render(
        ReportInput(
            title="t",
            started="s",
            finished="f",
            command="c",
            machine={},
            params={"wan_shape": "delay=10ms", "wan_size": size},
            modes=["router", "spliced"],
            skipped={},
            cells=world,
            costs=[],
            claims={},
            environment={"congestion_control": {"client": "bbr", "server": "cubic"}},
        )
    )
    assert "## 6. Over real latency (delay=10ms on the client-proxy link)" in text
    assert "client bbr, server cubic" in text
    # 32 MB in 1 s is 268 Mbit/s; in 1.25 s 215 (0.80x); upload 2 s: 134 (0.50x).
    assert "| router | 268 | 1.00x | 268 | 1.00x | 1 |" in text
    assert "| spliced | 215 | 0.80x | 134 | 0.50x | 1 |" in text


def _setup_and_memory_report() -> ReportInput:
    rates = [
        RateRun("router", 0, 8, 800, 800, 0, {}, 0.8, 1000.0),
        RateRun("spliced", 0, 8, 800, 797, 3, {"timeout": 3}, 3.2, 249.0),
        RateRun("spliced", 1, 8, 800, 800, 0, {}, 3.0, 266.7),
    ]
    rows = [_timed("router", K, 0.0002, 0.0006), _timed("spliced", K, 0.003, 0.001)]
    memory = [_round("spliced", 0, 9.0)]
    memory.append(_round("spliced", 1, 0.0, start=58_000, settled=False, failed=2))
    return ReportInput(
        title="t",
        started="s",
        finished="f",
        command="c",
        machine={},
        params={"setup_rate_size": 1, "setup_rate_repeat": 2, "memory_splices": [500, 1000]},
        modes=["router", "spliced"],
        skipped={},
        cells={},
        costs=[],
        claims={},
        splits=splits(rows, ["router", "spliced"], 64 * K),
        rates=rates,
        memory=memory,
    )


def test_report_gives_set_up_split_rate_and_memory_with_their_failures() -> None:
    text = render(_setup_and_memory_report())
    assert "### Small requests: set-up and transfer" in text
    assert "| 1K | spliced | 3 ms | 1 ms | 4 ms | 75% | 1 |" in text
    assert "| 1K | router | 0.2 ms | 0.6 ms | 0.8 ms | 25% | 1 |" in text
    assert (
        "## 7. Connection set-up rate" in text and "8 load-client workers, each making 100" in text
    )
    # spliced: median of 249 and 266.7; 3 of 1600 requests failed, shown with the code.
    assert "| spliced | 258 | 249-267 | 0.26x | 1600 | **3** (timeout: 3) |" in text
    assert "| router | 1000 | 1000-1000 | 1.00x | 800 | 0 |" in text
    assert "## 8. Memory per idle splice" in text and "N = 0, 500, 1000 in turn" in text
    assert "| spliced | 9.0 | 9.0-9.0 | +0 KiB | 2000 | **2** | **1 of 2** |" in text
    assert "0: 40000 / 500: 44500 / 1000: 49000 / 2000: 58000" in text
    assert "0: 58000 / 500: 58000 / 1000: 58000 / 2000: 58000" in text
    assert "| spliced | 2 |" in text and "| **no** |" in text
    failures = text.split("## Failures", 1)[1]
    assert "| memory | round 2 | spliced |" in failures and "not back to baseline" in failures


def test_without_those_runs_the_report_has_no_such_sections() -> None:
    text = _report(_thesis_world(), ["router", "plain", "spliced"], {})
    for title in ("set-up and transfer", "## 7.", "## 8."):
        assert title not in text


def test_the_run_directory_gets_the_new_tables_as_csv_and_in_run_json(tmp_path: Path) -> None:
    data = _setup_and_memory_report()
    store.write_raw(
        tmp_path,
        [],
        {},
        [],
        {"command": "c"},
        rates=data.rates,
        splits=data.splits,
        memory=data.memory,
    )
    with open(tmp_path / "setup_rate.csv") as f:
        rates = list(csv.DictReader(f))
    assert [(r["mode"], r["ok"], r["errors"]) for r in rates][:2] == [
        ("router", "800", ""),
        ("spliced", "797", "timeout=3"),
    ]
    with open(tmp_path / "memory.csv") as f:
        points = list(csv.DictReader(f))
    assert len(points) == 8 and points[3]["splices"] == "2000" and points[3]["rss_kib"] == "58000"
    assert float(points[0]["kib_per_splice"]) == pytest.approx(9.0)
    with open(tmp_path / "setup_split.csv") as f:
        split = list(csv.DictReader(f))
    assert [r["mode"] for r in split] == ["router", "spliced"]
    run = json.loads((tmp_path / "run.json").read_text())
    assert len(run["setup_rate"]) == 3 and len(run["memory"]) == 8 and len(run["setup_split"]) == 2


# -- experiment 9: keep-alive -------------------------------------------------


def test_experiments_are_picked_by_name_or_number_and_no_flags_take_them_out() -> None:
    only = parse_args(["--experiments", "keepalive"])
    assert only.keepalive and not any(
        (only.min_load, only.high_load, only.throughput, only.cost, only.shaped, only.wan)
    )
    assert not (only.setup_rate or only.memory)
    mixed = parse_args(["--quick", "--experiments", "1,shaped,9", "--no-keepalive"])
    assert (mixed.min_load, mixed.shaped, mixed.keepalive, mixed.high_load) == (
        True,
        True,
        False,
        False,
    )
    every = parse_args([])
    assert all((every.min_load, every.high_load, every.throughput, every.keepalive))
    assert not parse_args(["--no-keepalive"]).keepalive


def test_keepalive_defaults_are_the_issues_sizes_ten_requests_and_a_few_workers() -> None:
    p, quick = parse_args([]), parse_args(["--quick"])
    assert p.keepalive_sizes == (K, 64 * K, M, 16 * M)
    assert (p.keepalive_requests, p.keepalive_workers, p.keepalive_repeat) == (10, 4, 3)
    assert max(quick.keepalive_sizes) <= M and quick.keepalive_repeat == 1
    assert quick.keepalive_run_bytes < p.keepalive_run_bytes
    mine = parse_args(["--keepalive-sizes", "4K", "--keepalive-requests", "3"])
    assert (mine.keepalive_sizes, mine.keepalive_requests) == ((4 * K,), 3)
    assert {"tinyproxy", "http11", "http11-copy"} <= set(p.modes)


def test_keepalive_runs_move_about_the_budget_in_at_most_the_cap_of_connections() -> None:
    budget = 256 * M
    assert connections_per_worker(16 * M, 4, 10, budget, 10) == 1  # 640 MB already
    assert connections_per_worker(M, 4, 10, budget, 10) == 7  # ceil(256 / 40)
    assert connections_per_worker(K, 4, 10, budget, 10) == 10  # the cap
    assert connections_per_worker(M, 4, 10, 1, 10) == 1  # at least one


def _ka(index: int, setup: float | None, start: float, end: float, **kw: Any) -> dict[str, Any]:
    row = {"size": 1000, "ok": True, "bytes": 1000, "response_time_s": 0.001, "error": None}
    row |= {"index_on_conn": index, "setup_s": setup, "start": start, "end": end}
    return row | kw


def test_a_keepalive_run_counts_connections_bytes_span_and_set_up() -> None:
    raw = [
        _ka(0, 0.002, 10.0, 10.1),
        _ka(1, 0.0, 10.1, 10.2),
        _ka(2, 0.0, 10.2, 10.3, ok=False, bytes=10, error="reset", response_time_s=None),
        _ka(0, 0.003, 10.3, 10.5),  # the proxy closed: a new connection
        _ka(0, None, 10.5, 10.6, ok=False, bytes=0, error="refused"),  # never connected
        {"size": 1000, "ok": False, "error": "lost", "start": None, "end": None},
    ]
    run = keepalive_run(
        raw,
        mode="tinyproxy",
        size=1000,
        rnd=1,
        workers=2,
        per_conn=3,
        proc_cpu_s=0.04,
        machine_cpu_s=0.2,
    )
    assert (run.attempted, run.ok, run.failed, run.connections) == (6, 3, 3, 2)
    assert run.errors == {"lost": 1, "refused": 1, "reset": 1}
    assert run.bytes == 3000 and run.span_s == pytest.approx(0.6)
    assert run.setup_s == pytest.approx(0.005)
    assert run.throughput == pytest.approx(3000 / 0.6 / 1e6)


def _krun(mode: str, size: int, rnd: int, **kw: Any) -> KeepaliveRun:
    base: dict[str, Any] = {
        "mode": mode,
        "size": size,
        "round": rnd,
        "workers": 4,
        "per_conn": 10,
        "attempted": 400,
        "ok": 400,
        "failed": 0,
        "errors": {},
        "connections": 40,
        "bytes": 400 * size,
        "span_s": 1.0,
        "setup_s": 0.04,
        "proc_cpu_s": 0.2,
        "machine_cpu_s": 1.0,
    }
    return KeepaliveRun(**(base | kw))


def test_keepalive_summary_is_the_median_over_rounds_and_cpu_summed_per_request() -> None:
    runs = [
        _krun("http11", M, 0, span_s=2.0),
        _krun("http11", M, 1, span_s=1.0),
        _krun("http11", M, 2, ok=0, failed=400, errors={"timeout": 400}, bytes=0),
        _krun("tinyproxy", M, 0, connections=400, setup_s=0.4),
        _krun("router", M, 0, proc_cpu_s=None),
    ]
    http11, tiny, router = summarize_keepalive(runs, ["http11", "tinyproxy", "router", "x"])
    mb = 400 * M / 1e6
    assert http11.throughput == pytest.approx(mb / 2.0)  # median of mb/2, mb and 0 (dead round)
    assert (http11.throughput_low, http11.throughput_high) == (0.0, pytest.approx(mb))
    assert http11.requests_per_conn == pytest.approx(800 / 120)  # successes per connection
    assert http11.proc_cpu_per_request == pytest.approx(0.6 / 800)
    assert (http11.failed, http11.errors, http11.requests) == (400, {"timeout": 400}, 1200)
    assert tiny.requests_per_conn == 1.0 and tiny.setup_per_request == pytest.approx(0.001)
    assert router.proc_cpu_per_request is None  # no process of its own
    assert router.machine_cpu_per_request == pytest.approx(1.0 / 400)


def test_http_modes_run_only_the_warm_up_and_the_keepalive_experiment() -> None:
    p = parse_args(["--quick", "--no-memory", "--no-setup-rate"])
    socks_only = plan_steps(p, 3)
    with_http = plan_steps(p, 5, n_http=2)
    assert with_http - socks_only == 2 * (1 + len(p.keepalive_sizes))
    only = parse_args(["--experiments", "keepalive", "--keepalive-sizes", "1K,1M"])
    assert plan_steps(only, 4, n_http=2) == 4 * (1 + 3 * 2)  # warm-up, 3 rounds x 2 sizes


def test_http_modes_get_an_http_proxy_and_keepalive_runs_their_k() -> None:
    mode = Mode("tinyproxy", None, (1,), http_proxy=("192.0.2.1", 8888))
    argv = loadgen_argv(("203.0.113.2", 80), mode, [K], 3, 4, 10.0, keepalive=10)
    joined = " ".join(argv)
    assert "--http-proxy 192.0.2.1:8888" in joined and "--socks5" not in joined
    assert "--keepalive 10" in joined and "--repeat 3 --concurrency 4" in joined
    plain = loadgen_argv(("203.0.113.2", 80), Mode("plain", ("192.0.2.1", 1080), ()), [K], 1, 1, 1)
    assert "--keepalive" not in plain and "--http-proxy" not in plain


def test_tinyproxy_config_listens_on_the_client_side_and_binds_outgoing() -> None:
    conf = tinyproxy_config("192.0.2.1", 8888, "203.0.113.1").splitlines()
    assert {"Port 8888", "Listen 192.0.2.1", "Bind 203.0.113.1"} <= set(conf)
    assert not any(line.startswith(("Allow", "Deny", "User")) for line in conf)


def test_keepalive_runs_every_mode_while_http_modes_skip_the_other_experiments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from testbed.experiments import runner

    calls: list[tuple[str, int | None]] = []

    def fake_loadgen(
        tb: object, mode: Mode, sizes: list[int], *, repeat: int, concurrency: int, **kw: Any
    ) -> list[dict[str, Any]]:
        keepalive = kw.get("keepalive")
        calls.append((mode.name, keepalive))
        count = repeat * concurrency * (keepalive or 1)
        return [
            {
                "size": s,
                "ok": True,
                "response_time_s": 0.01,
                "bytes": s,
                "error": None,
                "setup_s": 0.001 if i % (keepalive or 1) == 0 else 0.0,
                "index_on_conn": i % (keepalive or 1),
                "start": 100.0 + i,
                "end": 100.5 + i,
                "worker": 0,
            }
            for s in sizes
            for i in range(count)
        ]

    monkeypatch.setattr(runner, "run_loadgen", fake_loadgen)
    params = parse_args(
        ["--quick", "--experiments", "1,keepalive", "--sizes", "1K", "--keepalive-sizes", "1K,1M"]
    )
    modes = [Mode("router", None, ()), Mode("tinyproxy", None, (), http_proxy=("192.0.2.1", 1))]
    into = runner.Collected()
    runner.run_all(object(), params, modes, lambda what: None, into)
    assert {(s.experiment, s.mode) for s in into.samples} == {
        ("min_load", "router"),
        (KEEPALIVE, "router"),
        (KEEPALIVE, "tinyproxy"),
    }
    assert [(r.mode, r.size) for r in into.keepalive] == [
        ("router", K),
        ("router", M),
        ("tinyproxy", K),
        ("tinyproxy", M),
    ]
    assert all(k == params.keepalive_requests for name, k in calls if k is not None)
    assert ("tinyproxy", None) in calls  # its warm-up, one request per connection
    mine = [s for s in into.samples if s.experiment == KEEPALIVE and s.size == K]
    assert {s.concurrency for s in mine} == {params.keepalive_workers}
    assert {s.index_on_conn for s in mine} == set(range(params.keepalive_requests))
    per_worker = connections_per_worker(
        K, 2, 10, params.keepalive_run_bytes, params.keepalive_max_connections
    )
    assert into.keepalive[0].connections == 2 * per_worker
    assert into.keepalive[0].proc_cpu_s is None  # the router has no process


def _keepalive_report(params: dict[str, Any] | None = None) -> ReportInput:
    runs = [
        _krun("router", K, 0, proc_cpu_s=None, span_s=0.5),
        _krun("tinyproxy", K, 0, connections=400, setup_s=0.08, span_s=1.0),
        _krun("http11", K, 0, span_s=0.8, proc_cpu_s=0.1, failed=2, errors={"reset": 2}),
        _krun("http11-copy", K, 0, span_s=0.4, proc_cpu_s=0.05),
    ]
    times = {"router": 0.0005, "tinyproxy": 0.002, "http11": 0.001, "http11-copy": 0.0007}
    world = {
        (KEEPALIVE, "unshaped", mode, 4, K): summarize(_spread(t), ["reset"] * (mode == "http11"))
        for mode, t in times.items()
    }
    return ReportInput(
        title="t",
        started="s",
        finished="f",
        command="c",
        machine={},
        params={
            "keepalive_repeat": 1,
            "keepalive_max_connections": 10,
            "keepalive_run_bytes": 256 * M,
            "min_load": False,
            "high_load": False,
            "throughput": False,
        }
        | (params or {}),
        modes=["router", "tinyproxy", "http11", "http11-copy"],
        skipped={},
        cells=world,
        costs=[],
        claims={},
        keepalive=runs,
    )


def test_report_gives_keepalive_per_size_and_mode_and_http11_against_tinyproxy() -> None:
    text = render(_keepalive_report())
    assert "## 9. Keep-alive HTTP" in text and "4 load-client workers" in text
    assert "moves about 256 MiB" in text
    # tinyproxy: a connection per request, its set-up paid by every one.
    assert "| 1K | tinyproxy | 2 ms [1.96 ms, 2.04 ms] | 2.04 ms | 0.2 ms | 1.0 |" in text
    assert "| 0.41 (0.41-0.41) | 0.50x | 0.5 | 2.5 | 0 |" in text
    assert "| 1K | http11 | 1 ms [0.98 ms, 1.02 ms] |" in text and "| **2** (reset: 2) |" in text
    assert "| 1K | router |" in text and "| 0.819 (0.819-0.819) | 1.00x | - | 2.5 | 0 |" in text
    # The splice against the same proxy copying, then against tinyproxy.
    copy, tiny = text.split("http11 against http11-copy, size by size:")[1].split(
        "http11 against tinyproxy, size by size:"
    )
    assert "- throughput: 1K 0.50x" in copy and "- proxy CPU per request: 1K 2.00x" in copy
    assert "- throughput: 1K 1.25x" in tiny and "- proxy CPU per request: 1K 0.50x" in tiny
    # Only 9 ran: no claims, no sections 1-3, and the failures are listed.
    assert "the thesis's claims are not judged" in text
    for title in ("## 1.", "## 2.", "## 3.", "| (a) |"):
        assert title not in text
    assert "| keepalive | unshaped | http11 | 4 | 1K | 1/6 | reset: 1 |" in text


def test_without_keepalive_runs_there_is_no_section_9_and_old_reports_keep_1_to_3() -> None:
    text = _report(_thesis_world(), ["router", "plain", "spliced"], {})
    assert "## 9." not in text
    for title in ("## 1.", "## 2.", "## 3.", "| (a) |"):
        assert title in text


def test_keepalive_runs_go_to_their_csv_run_json_and_figure(tmp_path: Path) -> None:
    data = _keepalive_report()
    store.write_raw(tmp_path, [], data.cells, [], {"command": "c"}, keepalive=data.keepalive)
    with open(tmp_path / "keepalive.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["mode"], r["connections"], r["errors"]) for r in rows] == [
        ("router", "40", ""),
        ("tinyproxy", "400", ""),
        ("http11", "40", "reset=2"),
        ("http11-copy", "40", ""),
    ]
    assert float(rows[1]["throughput_mb_s"]) == pytest.approx(400 * K / 1e6)
    assert rows[0]["proc_cpu_s"] == ""  # the router: no process, not zero
    assert len(json.loads((tmp_path / "run.json").read_text())["keepalive"]) == 4
    made = plots.write_all(tmp_path, data.cells, data.modes, [], keepalive=data.keepalive)
    assert made == ["keepalive.png"]
    assert (tmp_path / "keepalive.png").read_bytes()[:4] == b"\x89PNG"


# -- a real quick run ---------------------------------------------------------


def _check_setup_and_memory(info: dict[str, Any], report: str) -> None:
    """Experiments 7 and 8 and the set-up split of a real run: measured, none failed."""
    modes = [m for m in info["modes"] if m not in HTTP_MODES]  # they run 9 only
    # 7: every mode made its connections, each one succeeded.
    params = info["params"]
    each = params["setup_rate_concurrency"] * params["setup_rate_connections"]
    rates = info["setup_rate"]
    assert sorted(r["mode"] for r in rates) == sorted(modes)
    for r in rates:
        assert r["failed"] == 0 and r["ok"] == r["attempted"] == each and r["rate"] > 0, r
    assert "## 7. Connection set-up rate" in report
    # The split: 1 KB in every mode, both parts timed.
    split = {(r["mode"], r["size"]): r for r in info["setup_split"]}
    for mode in modes:
        r = split[(mode, K)]
        assert r["n"] == 1 and r["failed"] == 0 and r["setup"] > 0 and r["transfer"] > 0, r
    assert "### Small requests: set-up and transfer" in report
    # 8: the splice daemons held every idle splice, grew, and went back to baseline.
    steps = [0, *params["memory_splices"]]
    daemons = [m for m in ("spliced", "spliced-py") if m in modes]
    assert "spliced" in daemons
    for mode in daemons:
        points = [p for p in info["memory"] if p["mode"] == mode]
        assert [p["splices"] for p in points] == steps, points
        assert all(p["failed"] == 0 and p["settled"] for p in points), points
        assert points[0]["daemon_idle"] == steps[-1]  # the daemon listed them all, idle
        assert points[-1]["rss_kib"] > points[0]["rss_kib"]
        assert 1 < points[0]["kib_per_splice"] < 50, points  # KiB of RSS per idle splice
    assert "## 8. Memory per idle splice" in report


def _check_keepalive(info: dict[str, Any], report: str) -> None:
    """Experiment 9 of a real run: every mode and size, none failed, keep-alive where kept."""
    params = info["params"]
    runs = info["keepalive"]
    assert sorted({(r["mode"], r["size"]) for r in runs}) == sorted(
        (m, s) for m in info["modes"] for s in params["keepalive_sizes"]
    )
    for r in runs:
        assert r["failed"] == 0 and r["ok"] == r["attempted"] > 0 and r["bytes"] > 0, r
        per_conn = r["ok"] / r["connections"]
        # tinyproxy ends every connection after one response; every other path keeps it.
        if r["mode"] == "tinyproxy":
            assert per_conn == 1, r
        else:
            assert per_conn == params["keepalive_requests"], r
    assert "## 9. Keep-alive HTTP" in report


@pytest.mark.root
def test_quick_run_writes_data_figures_and_a_report(tmp_path: Path) -> None:
    prefix = unique_prefix("tbl")
    try:
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "testbed.experiments",
                "--quick",
                "--out",
                str(tmp_path),
                "--prefix-for-tests",
                prefix,
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        (run,) = list(tmp_path.iterdir())
        for name in ("samples.csv", "samples.json", "summary.csv", "cost.csv", "run.json"):
            assert (run / name).stat().st_size > 0, name
        for name in ("setup_rate.csv", "setup_split.csv", "memory.csv", "keepalive.csv"):
            assert len((run / name).read_text().splitlines()) > 1, name
        for name in ("fig6_1_min_load.png", "fig6_2_high_load.png", "throughput.png", "cost.png"):
            assert (run / name).read_bytes()[:4] == b"\x89PNG", name
        for name in ("fig6_1_setup_split.png", "setup_rate.png", "memory.png", "keepalive.png"):
            assert (run / name).read_bytes()[:4] == b"\x89PNG", name
        info = json.loads((run / "run.json").read_text())
        expected = {"router", "plain", "endpoint", "http11", "http11-copy"}
        expected |= {
            n
            for n, b in (
                ("dante", "danted"),
                ("microsocks", "microsocks"),
                ("tinyproxy", "tinyproxy"),
            )
            if shutil.which(b)
        }
        assert expected <= set(info["modes"])
        assert info["params"]["prefix"] == prefix and info["machine"]["cores"]
        with open(run / "samples.csv") as f:
            rows = list(csv.DictReader(f))
        for mode in info["modes"]:
            runs = {r["experiment"] for r in rows if r["mode"] == mode}
            assert KEEPALIVE in runs and ("min_load" in runs) == (mode not in HTTP_MODES), mode
        report = (run / "report.md").read_text()
        for key in "abcd":
            assert f"| ({key}) |" in report
        _check_setup_and_memory(info, report)
        _check_keepalive(info, report)
        # The suite brought its testbed up, so it took it down again.
        assert not list(Path("/run/netns").glob(f"{prefix}-*"))
    finally:
        from testbed.net import Testbed

        Testbed(prefix).down()


def test_one_round_cells_are_ties_not_verdicts() -> None:
    world = {k: summarize([v.median], []) for k, v in _thesis_world().items() if k[0] == "min_load"}
    results = {r.key: r for r in evaluate(world)}
    assert results["a"].verdict is Verdict.UNCLEAR
    assert results["c"].verdict is Verdict.UNCLEAR
    assert results["d"].verdict is Verdict.CANNOT_JUDGE  # no high-load cells at all


def test_a_mode_failing_its_whole_warm_up_is_dropped_with_the_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from testbed.experiments import runner

    calls: list[str] = []

    def fake_loadgen(
        tb: object, mode: Mode, sizes: list[int], **kw: object
    ) -> list[dict[str, object]]:
        calls.append(mode.name)
        ok = mode.name != "broken"
        return [
            {
                "size": s,
                "ok": ok,
                "response_time_s": 0.01 if ok else None,
                "bytes": s,
                "error": None if ok else "timeout",
            }
            for s in sizes
        ]

    monkeypatch.setattr(runner, "run_loadgen", fake_loadgen)
    params = parse_args(["--quick", "--no-cost", "--sizes", "1K"])
    modes = [Mode("router", None, ()), Mode("broken", ("192.0.2.1", 1), ())]
    into = runner.Collected()
    runner.run_all(object(), params, modes, lambda what: None, into)
    assert [m.name for m in modes] == ["router"]
    assert into.skipped == {"broken": "every warm-up request failed (timeout)"}
    assert calls.count("broken") == 1  # the warm-up only
    assert {s.mode for s in into.samples} == {"router"}


def test_an_error_mid_run_keeps_what_was_measured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A crash after minutes of measurements must not lose them: the run is reported
    as partial with the error, and main() then exits 1."""
    from testbed.experiments import __main__ as cli
    from testbed.experiments import runner
    from testbed.experiments.modes import ModeSet

    def failing_run_all(
        tb: object, params: object, modes: object, step: object, into: runner.Collected
    ) -> None:
        into.notes.append("measured something")
        into.samples.append(
            runner.Sample(
                "min_load", "unshaped", "router", 1024, 1, 0, True, 0.001, 1024, None, None, 0, 0.0
            )
        )
        raise RuntimeError("boom")

    monkeypatch.setattr(cli, "resolve", lambda tb, wanted, work_dir: ModeSet())
    monkeypatch.setattr(cli, "run_all", failing_run_all)
    collected = runner.Collected()
    cli._experiment(object(), parse_args(["--quick"]), tmp_path, collected)  # type: ignore[arg-type]
    assert collected.error == "RuntimeError: boom"
    assert collected.interrupted
    assert len(collected.samples) == 1
    assert any("boom" in note and "partial" in note for note in collected.notes)
