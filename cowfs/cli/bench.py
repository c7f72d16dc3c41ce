"""`cowfs bench`: the benchmark suite (benchmarks/) from the command line."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
from pathlib import Path

import click

from cowfs.errors import BenchError, InvalidInput


@click.command()
@click.option("--quick", is_flag=True, help="Tiny data and one run: checks the harness end to end.")
@click.option(
    "--only",
    "only",
    multiple=True,
    metavar="NAME",
    help="Run only workloads whose name starts with NAME (repeatable, or comma-separated).",
)
@click.option(
    "--system",
    "system_names",
    multiple=True,
    metavar="NAME",
    help="Measure only these systems: native, overlayfs, fuse-overlayfs, cowfs, cowfs-dirs; "
    "also cowfs-threads, cowfs-writeback, cowfs-native, cowfs-libfuse (cowfs with other FUSE "
    "settings or engines).",
)
@click.option("--runs", type=click.IntRange(1, 100), default=None, help="Runs per system.")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("bench-out"),
    show_default=True,
    help="Where results.json, results.md and chart.svg go (and the cached data, under data/).",
)
@click.option(
    "--data",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the generated data is cached (default: OUT/data, or $COWFS_BENCH_DATA).",
)
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the Markdown report here (make bench: benchmarks/RESULTS.md).",
)
@click.option(
    "--budget",
    type=click.FloatRange(min=1),
    default=None,
    metavar="MINUTES",
    help="Start no run that would end past this many minutes (at the last run's pace).",
)
@click.option(
    "--pin/--no-pin",
    "pin_code",
    default=True,
    show_default=True,
    help="Measure cowfs as of git HEAD (exported under OUT/code), not the working tree.",
)
@click.option("--list", "list_only", is_flag=True, help="List workloads and systems, then exit.")
def bench(
    quick: bool,
    only: tuple[str, ...],
    system_names: tuple[str, ...],
    runs: int | None,
    out: Path,
    data: Path | None,
    report: Path | None,
    budget: float | None,
    pin_code: bool,
    list_only: bool,
) -> None:
    """Measure cowfs against kernel overlayfs, fuse-overlayfs and native on the same data."""
    from benchmarks import report as report_mod
    from benchmarks import runner, systems, workloads
    from benchmarks.profile import FULL, QUICK

    profile = QUICK if quick else FULL
    all_w = workloads.all_workloads()
    all_s = systems.all_systems()
    if list_only:
        for w in all_w:
            for m in w.metrics(profile):
                click.echo(f"{m.key:24} {m.title}")
        click.echo("systems: " + " ".join(s.name for s in all_s))
        click.echo("variants: " + " ".join(s.name for s in systems.variant_systems()))
        return
    names = [n for item in only for n in item.split(",") if n]
    chosen = workloads.select(all_w, names)
    if not chosen:
        raise InvalidInput(f"no workload matches {', '.join(names)} (see cowfs bench --list)")
    if system_names:
        every = all_s + systems.variant_systems()
        known = [s.name for s in every]
        wanted = [n for item in system_names for n in item.split(",") if n]
        unknown = sorted(set(wanted) - set(known))
        if unknown:
            raise InvalidInput(f"unknown system {', '.join(unknown)} (known: {', '.join(known)})")
        all_s = [s for s in every if s.name in wanted]
    if os.geteuid() != 0:
        raise BenchError("cowfs bench needs root (it mounts filesystems and drops caches)")

    # `make`, `timeout` and CI stop with SIGTERM: end like Ctrl-C, which keeps what was measured.
    signal.signal(signal.SIGTERM, _interrupt)
    out = out.resolve()
    data_dir = (data or runner.default_data_dir(out)).resolve()
    report = report.resolve() if report else None
    out.mkdir(parents=True, exist_ok=True)
    # `python -m` puts the current directory first on sys.path: run from the out dir so that a
    # checkout's cowfs/ never shadows the pinned copy in the daemons this suite starts.
    os.chdir(out)
    started = time.monotonic()

    def log(msg: str) -> None:
        click.echo(f"[{time.monotonic() - started:7.1f}s] {msg}", err=True)

    doc = runner.run_suite(
        profile=profile,
        systems=all_s,
        workloads=chosen,
        runs=runs or profile.runs,
        out=out,
        data_dir=data_dir,
        command=_command_line(),
        log=log,
        budget_s=budget * 60 if budget else None,
        on_run=lambda partial: report_mod.write_all(partial, out, report),
        pin_code=pin_code,
    )
    paths = report_mod.write_all(doc, out, report)
    for kind, path in paths.items():
        click.echo(f"{kind}: {path}")
    if doc.get("stopped_early", "").startswith("interrupted"):
        raise SystemExit(130)  # the partial report is written, but the suite did not finish


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _command_line() -> str:
    """How this run was invoked, for the report (`cowfs bench` and its own options)."""
    argv = sys.argv
    args = argv[argv.index("bench") + 1 :] if "bench" in argv else []
    return shlex.join(["cowfs", "bench", *args])
