"""The experiment suite: parameters, statistics, claims, report; one real quick run."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testbed.experiments import __main__ as cli
from testbed.experiments.claims import (
    Cells,
    Outcome,
    Verdict,
    combine,
    evaluate,
)
from testbed.experiments.cost import Cost
from testbed.experiments.modes import Mode, dante_config
from testbed.experiments.params import UsageError, parse_args
from testbed.experiments.report import ReportInput, render
from testbed.experiments.runner import Sample, cost_plan, parse_loadgen, rotated
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
        "router,plain,endpoint,spliced,spliced-py,dante,microsocks"
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


# -- a real quick run ---------------------------------------------------------


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
        for name in ("fig6_1_min_load.png", "fig6_2_high_load.png", "throughput.png", "cost.png"):
            assert (run / name).read_bytes()[:4] == b"\x89PNG", name
        info = json.loads((run / "run.json").read_text())
        expected = {"router", "plain", "endpoint"}
        expected |= {
            n for n, b in (("dante", "danted"), ("microsocks", "microsocks")) if shutil.which(b)
        }
        assert expected <= set(info["modes"])
        assert info["params"]["prefix"] == prefix and info["machine"]["cores"]
        with open(run / "samples.csv") as f:
            rows = list(csv.DictReader(f))
        for mode in info["modes"]:
            assert any(r["mode"] == mode and r["experiment"] == "min_load" for r in rows), mode
        report = (run / "report.md").read_text()
        for key in "abcd":
            assert f"| ({key}) |" in report
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
