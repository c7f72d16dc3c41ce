"""Run the selected workloads on every available system, interleaved run by run.

Run r goes through every workload, and within a workload through every system, in an order that
rotates with r, so slow drifts of the machine (other users of the 2 cores, the disk's own caches)
spread over all systems instead of landing on one. Every other run goes the other way round: a
rotation alone keeps each system behind the same one in every run, and what a sample leaves
behind (page cache, memory the host takes back, writeback) then lands on the same neighbour.
Each workload's samples in a run follow one untimed sample of the same workload on the first
system: the first sample after another workload was slower whichever system took it (in the full
bench at 79feb52, a 256 MiB copy-up's first sample took 1.3-2.3× the median of the others of
its system, a 512 MiB write's 1.2-4.8×), and with 5 runs over 4 systems one system is first
twice as often as the others.
A failing sample is recorded with its error and the suite goes on; every mount a sample made is
released before the next one starts.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from benchmarks import dataset as _dataset
from benchmarks import machine, pin
from benchmarks.profile import Profile
from benchmarks.systems import System, mount_options, mounted, release
from benchmarks.workloads import Context, Workload
from cowfs.errors import BenchError, CowfsError

Log = Callable[[str], None]
SCHEMA = "cowfs-bench/1"
T = TypeVar("T")
SAMPLE_TIMEOUT = 900.0  # seconds; the slowest sample of the full suite takes about two minutes


def run_suite(
    *,
    profile: Profile,
    systems: list[System],
    workloads: list[Workload],
    runs: int,
    out: Path,
    data_dir: Path,
    command: str,
    log: Log,
    budget_s: float | None = None,
    on_run: Callable[[dict], None] | None = None,
    pin_code: bool = True,
) -> dict:
    """Build or load the data, measure everything, and return the results document (JSON-able).

    on_run gets the document after every completed run (so a long suite leaves results even if it
    is stopped); with budget_s, no run starts that would, at the last run's pace, end past it.
    """
    started = time.time()
    load_start = [round(x, 2) for x in os.getloadavg()]  # the 2 cores may be shared: say so
    code = pin.pin(out / "code") if pin_code else {"pinned": False, "reason": "--no-pin"}
    if code.get("pinned"):
        log(f"measuring cowfs as of commit {str(code['commit'])[:12]} (exported to {code['code']})")
    ds = _dataset.load_or_build(data_dir, profile, log)
    work = out / "work"
    _clean_work(work)
    work.mkdir(parents=True)
    warning = machine.unordered_warning(machine.filesystem_of(work))
    if warning:
        log("warning: " + warning)
    ctx = Context(ds=ds, profile=profile, work=work)

    sys_info: list[dict] = []
    live: list[System] = []
    for s in systems:
        why = s.unavailable()
        if why is None:
            try:
                s.prepare(ds, data_dir, log)
            except (CowfsError, OSError) as exc:
                why = f"set-up failed: {exc}"
        entry = {"name": s.name, "label": s.label, "kind": s.kind, "setup": s.describe()}
        if why is None:
            try:  # one trial mount: a system that cannot mount at all is reported once
                entry["mount_options"] = _probe_options(s, ctx)
                live.append(s)
            except (CowfsError, OSError) as exc:
                why = f"trial mount failed: {exc}"
        entry["available"] = why is None
        if why:
            entry["reason"] = why
            log(f"skipping {s.name}: {why}")
        sys_info.append(entry)

    metrics: dict[str, dict] = {}
    order: list[str] = []
    for w in workloads:
        for m in w.metrics(profile):
            order.append(m.key)
            metrics[m.key] = {
                "metric": m.key,
                "workload": w.name,
                "title": m.title,
                "cache": m.cache,
                "unit": "s",
                "samples": {},
                "errors": {},
                "notes": {},
            }

    once: dict[str, object] = {}
    done = 0  # runs completed
    stopped = ""

    def document() -> dict:
        results = []
        for key in order:
            entry = dict(metrics[key])
            _summarize(entry)
            results.append(entry)
        doc = {
            "schema": SCHEMA,
            "created": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "command": command,
            "profile": profile.as_dict(),
            "runs": done,
            "runs_requested": runs,
            "warmup": True,  # each workload's samples of a run follow an untimed one
            "duration_s": round(time.time() - started, 1),
            "machine": machine.describe(data_dir, work),
            "cowfs_code": code,
            "load_average": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
            "dataset": ds.summary(),
            "systems": sys_info,
            "results": results,
            **once,
        }
        if stopped:
            doc["stopped_early"] = stopped
        return doc

    try:
        # Once-per-suite measurements first, so every checkpoint report has them.
        for w in workloads:
            if w.once:
                log(f"{w.name}: measuring once")
                try:
                    once[w.name] = w.measure_once(ctx)
                except (CowfsError, OSError, subprocess.SubprocessError) as exc:
                    once[w.name] = {"error": str(exc)}
                    log(f"{w.name}: ERROR {exc}")
        for r in range(runs):
            run_started = time.time()
            for wi, w in enumerate(workloads):
                eligible = [s for s in live if w.applies_to(s)]
                if not eligible:
                    continue
                turn = sample_order(eligible, r, wi)
                _one_sample(ctx, w, turn[0], r, metrics, log, timed=False)  # the warm-up
                for s in turn:
                    _one_sample(ctx, w, s, r, metrics, log)
            done = r + 1
            if on_run is not None:
                on_run(document())  # a checkpoint: the report of the runs so far
            took = time.time() - run_started
            if budget_s is not None and done < runs and time.time() - started + took > budget_s:
                stopped = f"time budget: another run would end past {budget_s / 60:.0f} min"
                log(f"stopping after {done} run(s): {stopped}")
                break
    except KeyboardInterrupt:
        # Keep what was measured: the samples of the unfinished run are kept too.
        stopped = f"interrupted during run {done + 1}"
        log(stopped)
    finally:
        _clean_work(work)
    return document()


def sample_order(systems: list[T], run: int, workload: int) -> list[T]:
    """The order of one workload's samples in one run (see the module's docstring)."""
    n = len(systems)
    k = (run + workload) % n
    if run % 2:  # the same first system as a rotation by k, then the others the other way
        backwards = systems[::-1]
        return backwards[n - 1 - k :] + backwards[: n - 1 - k]
    return systems[k:] + systems[:k]


def _one_sample(ctx: Context, w: Workload, s: System, r: int, metrics: dict, log: Log,
                timed: bool = True) -> None:  # fmt: skip
    """One sample of `w` on `s`, recorded in `metrics`; `timed=False`: a warm-up, only logged
    (a failure too: the timed sample that follows records its own)."""
    run_dir = ctx.work / f"{w.name}.{s.name}.{r}"
    # A FUSE daemon that stops answering would hang this process in the kernel for good; past the
    # limit, aborting the connection makes every pending call fail with ENOTCONN instead.
    watchdog = threading.Timer(SAMPLE_TIMEOUT, _abort_fuse_under, [run_dir, log])
    watchdog.daemon = True
    watchdog.start()
    try:
        sample = w.measure(ctx, s, run_dir)
    except (CowfsError, OSError, subprocess.SubprocessError) as exc:
        msg = str(exc.args[0]) if isinstance(exc, CowfsError) else f"{type(exc).__name__}: {exc}"
        for m in w.metrics(ctx.profile) if timed else ():
            metrics[m.key]["errors"].setdefault(s.name, []).append(msg)
        log(f"run {r + 1} {w.name:22} {s.name:15} ERROR {msg}{'' if timed else ' (warm-up)'}")
        return
    finally:
        watchdog.cancel()
        _remove_run_dir(run_dir)
    if not timed:
        log(f"run {r + 1} {w.name:22} {s.name:15} warm-up, untimed")
        return
    for key, seconds in sample.values.items():
        metrics[key]["samples"].setdefault(s.name, []).append(round(seconds, 6))
        if sample.notes:
            metrics[key]["notes"].setdefault(s.name, []).append(sample.notes)
        log(f"run {r + 1} {key:22} {s.name:15} {seconds:9.3f} s")


def _abort_fuse_under(run_dir: Path, log: Log) -> None:
    """Abort the FUSE connection of every FUSE mount below run_dir (a hung sample's)."""
    base = str(run_dir) + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            fstype = parts[parts.index("-") + 1]
            if parts[4].startswith(base) and fstype.startswith("fuse"):
                minor = parts[2].split(":")[1]
                log(f"sample exceeded {SAMPLE_TIMEOUT:.0f} s: aborting FUSE connection {minor}")
                try:
                    with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as ab:
                        ab.write("1")
                except OSError:
                    pass


def _summarize(entry: dict) -> None:
    entry["samples"] = {k: list(v) for k, v in entry["samples"].items()}
    for field in ("median", "min", "max"):
        entry[field] = {}
    for name, xs in entry["samples"].items():
        entry["median"][name] = round(statistics.median(xs), 6)
        entry["min"][name] = min(xs)
        entry["max"][name] = max(xs)


def _probe_options(s: System, ctx: Context) -> str:
    """Mount once and read back the options the kernel shows for it."""
    run_dir = ctx.work / f"probe.{s.name}"
    try:
        view = s.mount(ctx.ds, run_dir)
        try:
            os.listdir(view.path)
            if view.path == ctx.ds.tree:
                fs = machine.filesystem_of(view.path)
                return f"{fs['fstype']} {fs['options']}"
            return mount_options(view.path) + _granted(view.path)
        finally:
            release(view)
    finally:
        _remove_run_dir(run_dir)


def _granted(mnt: Path) -> str:
    """What the kernel granted a cowfs daemon at INIT, as it recorded it (not shown in
    /proc/mounts); nothing for other systems."""
    from cowfs import mounting

    info = mounting.daemon_info(mnt)
    granted = [k for k in ("passthrough", "writeback") if isinstance(info.get(k), bool)]
    if not granted:
        return ""
    return "; FUSE INIT granted: " + ", ".join(f"{k}={info[k]}" for k in granted)


def _remove_run_dir(run_dir: Path) -> None:
    """Delete a sample's upper/work dirs, never through a mount that is somehow still live."""
    mnt = run_dir / "mnt"
    if mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
    if mounted(mnt):
        raise BenchError(f"{mnt} is still mounted; not deleting {run_dir}")
    shutil.rmtree(run_dir, ignore_errors=True)


def _clean_work(work: Path) -> None:
    """Release anything an interrupted earlier run left under the work dir, then remove it."""
    if not work.exists():
        return
    base = str(work.resolve())
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4].replace("\\040", " ") for line in f]
    for mnt in sorted(mounts, key=len, reverse=True):
        if mnt.startswith(base + "/"):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
    with open("/proc/self/mountinfo") as f:
        if any(line.split()[4].startswith(base + "/") for line in f):
            raise BenchError(f"mounts remain under {work}; unmount them first")
    shutil.rmtree(work)


def default_data_dir(out: Path) -> Path:
    return Path(os.environ.get("COWFS_BENCH_DATA", out / "data"))
