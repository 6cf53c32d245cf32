"""`python -m testbed.experiments`: thesis chapter 6, done properly and extended.

Uses the testbed named by --prefix (default tsplice): if it is up it is used
and left up; if not, it is brought up for the run and taken down after.
Results go to <out>/<timestamp>/: samples.csv/json, summary.csv, cost.csv,
setup_rate.csv, setup_split.csv, memory.csv, keepalive.csv, run.json, the
figures and report.md (see docs/experiments.md).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from testbed.experiments import family, plots, store
from testbed.experiments.claims import SMALL_MAX, evaluate
from testbed.experiments.connsetup import splits as setup_splits
from testbed.experiments.modes import ModeSet, resolve
from testbed.experiments.params import Params, UsageError, parse_args
from testbed.experiments.report import ReportInput, render
from testbed.experiments.runner import LINKS, Collected, http_modes, plan_steps, run_all
from testbed.experiments.stats import cells as summarize_cells
from testbed.net import Testbed, TestbedError
from testbed.process import ServiceError, sigterm_as_ctrl_c

PROG = "python -m testbed.experiments"
REFERENCES = ("plain", "dante")  # the thesis's "normal SOCKS server", ours and a C one


def _existing_shapes(tb: Testbed) -> list[str]:
    notes = []
    for name in LINKS:
        try:
            shape, _ = tb.link(name).shape_status()
        except Exception as err:
            notes.append(f"could not read the shape of link {name}: {err}")
            continue
        if shape is not None and not shape.is_empty:
            notes.append(f"link {name} was already shaped ({shape}): unshaped runs are not")
    return notes


def _experiment(tb: Any, params: Params, out_dir: Path, collected: Collected) -> ModeSet:
    modeset = resolve(tb, params.modes, out_dir)
    try:
        daemons = sum(m.splice_daemon is not None for m in modeset.modes)
        n_http = len(http_modes(modeset.modes))
        total = plan_steps(params, len(modeset.modes), daemons, n_http)
        with tqdm(total=total, unit="run", disable=None, file=sys.stderr) as bar:

            def step(what: str) -> None:
                bar.set_description(what)
                bar.update(1)

            run_all(tb, params, modeset.modes, step, collected)
    except KeyboardInterrupt:
        collected.interrupted = True
        collected.notes.append("interrupted by the user: the results are partial")
    except Exception as exc:
        # A bug or a testbed that broke mid-run: minutes of measurements are
        # already in ``collected``; report them (marked partial), then fail.
        traceback.print_exc()
        collected.interrupted = True
        collected.error = f"{type(exc).__name__}: {exc}"
        collected.notes.append(f"the run stopped on an error ({collected.error}): partial results")
    finally:
        modeset.stop()
    for name, why in collected.skipped.items():
        modeset.skipped[name] = why
    modeset.modes = [m for m in modeset.modes if m.name not in collected.skipped]
    return modeset


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        params = parse_args(args)
    except UsageError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print(f"{PROG}: error: needs root (it runs in network namespaces)", file=sys.stderr)
        return 2
    # SIGTERM (a CI timeout, `kill`, a job started with `&`, which ignores
    # SIGINT) ends the run like Ctrl-C: what was measured is written.
    sigterm_as_ctrl_c()
    started = time.time()
    out = store.new_run_dir(params.out, started)
    tb = Testbed(params.prefix)
    was_up = tb.is_up()
    collected = Collected()
    modeset = ModeSet()
    try:
        if was_up:
            collected.notes += _existing_shapes(tb)
        else:
            print(f"{PROG}: bringing up testbed {params.prefix!r} for this run", file=sys.stderr)
            tb.up()
        # --family 6: the same experiments, every address the IPv6 one.
        modeset = _experiment(family.view(tb, params.family), params, out, collected)
    except (TestbedError, ServiceError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 1
    finally:
        if not was_up:
            tb.down()
    finished = time.time()

    cells = summarize_cells(collected.samples)
    modes = modeset.names()
    refs = [m for m in REFERENCES if m in modes] or ["plain"]
    # Claim (b) compares with the router: once is enough.
    claims = {
        ref: [c for c in evaluate(cells, reference=ref) if c.key != "b" or ref == refs[0]]
        for ref in refs
    }
    # Claim (a)'s small transfers, split into connection set-up and transfer.
    splits = setup_splits(collected.samples, modes, SMALL_MAX)
    figures = plots.write_all(
        out,
        cells,
        modes,
        collected.costs,
        splits=splits,
        rates=collected.rates,
        memory=collected.memory,
        keepalive=collected.keepalive,
    )
    when = "%Y-%m-%d %H:%M:%S"
    data = ReportInput(
        title="Symmetric TCP splice: experiment report",
        started=time.strftime(when, time.localtime(started)),
        finished=time.strftime(when, time.localtime(finished)),
        command=" ".join([PROG, shlex.join(args)]).strip(),
        machine=store.machine(),
        params=params.to_json(),
        modes=modes,
        skipped=modeset.skipped,
        cells=cells,
        costs=collected.costs,
        claims=claims,
        notes=collected.notes,
        environment=collected.environment,
        figures=figures,
        interrupted=collected.interrupted,
        splits=splits,
        rates=collected.rates,
        memory=collected.memory,
        keepalive=collected.keepalive,
    )
    run = {
        "command": data.command,
        "started": started,
        "finished": finished,
        "machine": data.machine,
        "params": data.params,
        "modes": modes,
        "skipped": dict(modeset.skipped),
        "notes": collected.notes,
        "environment": collected.environment,
        "interrupted": collected.interrupted,
        "claims": {ref: store.claim_json(results) for ref, results in claims.items()},
    }
    store.write_raw(
        out,
        collected.samples,
        cells,
        collected.costs,
        run,
        rates=collected.rates,
        splits=splits,
        memory=collected.memory,
        keepalive=collected.keepalive,
    )
    (out / "report.md").write_text(render(data))
    print(f"{PROG}: {len(collected.samples)} requests in {finished - started:.0f} s -> {out}")
    if collected.error is not None:
        print(f"{PROG}: error: {collected.error} (partial results written)", file=sys.stderr)
        return 1
    return 130 if collected.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
