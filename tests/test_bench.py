"""`cowfs bench`: the harness end to end on tiny data, and its report from a known document.

The end-to-end test mounts every system for real (kernel overlayfs, fuse-overlayfs, cowfs from
the store and from directory lowers) and checks the outputs are well-formed. It asserts nothing
about speed: figures come from `make bench`, not from tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks import machine, report, runner, workloads
from benchmarks.profile import QUICK
from cowfs.cli import cli
from tests.conftest import ext4_mounted, need_fuse, need_tool

SYSTEMS = ["native", "overlayfs", "fuse-overlayfs", "cowfs", "cowfs-dirs"]
PEERS = ["native", "overlayfs", "fuse-overlayfs"]  # not under test here: they must not fail
COWFS = Path(sys.executable).with_name("cowfs")


def _leftover_processes(base: Path) -> list[str]:
    needle = str(base).encode()
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    cmd = f.read()
            except OSError:
                continue
            if needle in cmd:
                found.append(cmd.replace(b"\0", b" ").decode(errors="replace"))
    return found


def _mounts_under(base: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f if ln.split()[4].startswith(str(base) + "/")]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    need_fuse()
    need_tool("fuse-overlayfs", "runc", "fio", "busybox")
    out = tmp_path_factory.mktemp("bench") / "out"
    proc = subprocess.run(
        [str(COWFS), "bench", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        (out / "bench.log").write_text(proc.stderr)
        yield out
    finally:
        # The harness must have released everything itself; the assert below says so, and this
        # makes sure nothing outlives the test even when it did not.
        leftovers = _mounts_under(out)
        for mnt in sorted(leftovers, key=len, reverse=True):
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        assert not leftovers, f"bench left mounts behind: {leftovers}"


def test_quick_run_writes_json_with_every_system(quick_run: Path) -> None:
    doc = json.loads((quick_run / "results.json").read_text())
    assert doc["schema"] == "cowfs-bench/1"
    assert doc["profile"]["name"] == "quick" and doc["runs"] == 1
    machine_keys = {"cpu_model", "cores", "ram_bytes", "kernel", "data_filesystem",
                    "work_filesystem"}  # fmt: skip
    assert machine_keys <= set(doc["machine"])
    assert isinstance(doc["machine"]["work_filesystem"]["metadata_in_order"], bool)
    assert doc["dataset"]["files"] > 100 and doc["dataset"]["layers"] == 4
    systems = {s["name"]: s for s in doc["systems"]}
    assert list(systems) == SYSTEMS
    for name in SYSTEMS:
        assert systems[name]["available"], systems[name].get("reason")
        assert systems[name]["mount_options"]
    keys = [e["metric"] for e in doc["results"]]
    expected = [m.key for w in workloads.all_workloads() for m in w.metrics(QUICK)]
    assert keys == expected
    for e in doc["results"]:
        assert set(e) >= {"title", "cache", "unit", "samples", "median", "min", "max", "errors"}
        for name in PEERS:
            assert not e["errors"].get(name), (e["metric"], name, e["errors"][name])
        # every system the workload applies to has one sample or one recorded error
        for name in SYSTEMS:
            got = len(e["samples"].get(name, [])) + len(e["errors"].get(name, []))
            skipped = e["metric"] == "mount-time" and name == "native"
            assert got == (0 if skipped else 1), (e["metric"], name)
            if name in e["median"]:
                assert e["min"][name] <= e["median"][name] <= e["max"][name]
    # cowfs was really measured, not only reported as failing
    walk = next(e for e in doc["results"] if e["metric"] == "stat-walk-find-cold")
    assert set(SYSTEMS) <= set(walk["median"])
    assert "import" in doc and "import_tar" in doc["import"], doc.get("import")


def test_each_workload_of_a_run_starts_with_an_untimed_warm_up(quick_run: Path) -> None:
    """The first sample after another workload was slow whichever system took it: each
    workload's samples of a run follow one untimed sample of it on the first system. That one is
    not recorded (test_quick_run_writes_json_with_every_system: one sample per system)."""
    doc = json.loads((quick_run / "results.json").read_text())
    assert doc["warmup"] is True
    lines = (quick_run / "bench.log").read_text().splitlines()
    sample = re.compile(r"run 1 (\S+)\s+(\S+)\s+[\d.]+ s$")
    keys = {w.name: {m.key for m in w.metrics(QUICK)} for w in workloads.all_workloads()}
    warmed = []
    for i, line in enumerate(lines):
        m = re.search(r"run 1 (\S+)\s+(\S+)\s+warm-up, untimed$", line)
        if m is None:
            continue
        name, system = m.groups()
        warmed.append(name)
        after = next(s.groups() for ln in lines[i + 1 :] if (s := sample.search(ln)))
        assert after[1] == system and after[0] in keys[name], (line, after)
    assert warmed == [w.name for w in workloads.all_workloads() if not w.once]


def test_quick_run_writes_markdown_table_and_chart(quick_run: Path) -> None:
    md = (quick_run / "results.md").read_text()
    doc = json.loads((quick_run / "results.json").read_text())
    labels = [s["label"] for s in doc["systems"]]
    header = next(line for line in md.splitlines() if line.startswith("| workload |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    assert cells == ["workload", *labels, "cowfs ÷ overlayfs", "cowfs ÷ fuse-overlayfs"]
    lines = md.splitlines()
    start = lines.index(header)
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    assert len(rows) == len(doc["results"])
    for row in rows:  # escaped pipes inside titles must not add cells
        assert len(row.replace("\\|", "").strip("|").split("|")) == len(cells)
    assert "## Machine" in md and "## Targets" in md and "## How each system ran" in md
    svg = ET.parse(quick_run / "chart.svg").getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    fills = {r.get("fill") for r in svg.iter("{http://www.w3.org/2000/svg}rect")}
    assert {report.COLORS[n] for n in SYSTEMS} <= fills


def test_quick_run_leaves_no_process_or_work_dir(quick_run: Path) -> None:
    assert _leftover_processes(quick_run) == []
    assert not (quick_run / "work").exists()


# --------------------------------------------------------------------- no root needed from here


def _doc() -> dict:
    def entry(metric: str, **medians: float) -> dict:
        return {
            "metric": metric, "workload": metric, "title": f"{metric} | title", "cache": "cold",
            "unit": "s", "samples": {k: [v, v] for k, v in medians.items()},
            "median": dict(medians), "min": dict(medians), "max": dict(medians),
            "errors": {}, "notes": {},
        }  # fmt: skip

    systems = [
        {"name": n, "label": n.upper(), "kind": "x", "setup": "s", "available": True,
         "mount_options": "o"} for n in ("overlayfs", "fuse-overlayfs", "cowfs")
    ]  # fmt: skip
    return {
        "schema": "cowfs-bench/1", "created": "2026-01-01T00:00:00Z", "command": "cowfs bench",
        "profile": {"name": "full", "seq_bytes": 2**29, "copyup_small": 2**20,
                    "copyup_big": 2**28},
        "runs": 2, "duration_s": 60.0,
        "machine": {"cpu_model": "cpu", "cores": 2, "ram_bytes": 2**34, "kernel": "k", "os": "d",
                    "data_filesystem": {"fstype": "ext4", "device": "/dev/x", "options": "rw"},
                    "tools": {}},
        "dataset": {"source": "src", "files": 1, "dirs": 1, "symlinks": 0, "bytes": 1,
                    "layers": 4, "layer_files": [1, 0, 0, 0], "notes": []},
        "systems": systems,
        "results": [
            entry("stat-walk-find-cold", overlayfs=1.0, **{"fuse-overlayfs": 4.0}, cowfs=2.0),
            entry("seq-read-cold", overlayfs=1.0, **{"fuse-overlayfs": 1.0}, cowfs=1.5),
        ],
    }  # fmt: skip


def test_targets_compare_against_the_named_system() -> None:
    got = {t["metric"]: t for t in report.targets(_doc())}
    assert got["stat-walk-find-cold"]["ratio"] == 0.5 and got["stat-walk-find-cold"]["met"]
    assert got["seq-read-cold"]["ratio"] == 1.5 and not got["seq-read-cold"]["met"]


def test_report_files_from_a_document(tmp_path: Path) -> None:
    paths = report.write_all(_doc(), tmp_path / "out", tmp_path / "RESULTS.md")
    md = paths["report"].read_text()
    assert "](out/chart.svg)" in md  # links are relative to where the report is
    assert "| stat-walk-find-cold \\| title | 1.00 (1.00–1.00) | 4.00 (4.00–4.00) |" in md
    assert "| 2.00× | 0.50× |" in md
    ET.parse(paths["chart"])
    assert json.loads(paths["json"].read_text())["targets"]


def test_the_report_warns_of_uppers_on_a_filesystem_without_ordered_metadata(
        tmp_path: Path) -> None:  # fmt: skip
    doc = _doc()
    fs = doc["machine"]["data_filesystem"]
    doc["machine"]["work_filesystem"] = {**fs, "metadata_in_order": False}
    md = report.markdown(doc, {k: tmp_path / k for k in ("json", "chart", "md")}, tmp_path)
    assert "**Warning:** the uppers are on ext4 (/dev/x)" in md
    assert "**metadata not in order**" in md
    doc["machine"]["work_filesystem"]["metadata_in_order"] = True
    md = report.markdown(doc, {k: tmp_path / k for k in ("json", "chart", "md")}, tmp_path)
    assert "Warning" not in md and ", metadata in order" in md


def test_the_machine_tells_a_journaled_ext4_from_one_without(tmp_path: Path) -> None:
    for journal in (True, False):
        with ext4_mounted(tmp_path / str(journal), journal=journal) as fs:
            got = machine.filesystem_of(fs)
            assert got["fstype"] == "ext4" and got["mountpoint"] == str(fs)
            assert got["metadata_in_order"] is journal
            assert bool(machine.unordered_warning(got)) is not journal


def test_each_system_leads_a_run_and_follows_more_than_one_other() -> None:
    """Samples of one workload rotate across runs, and alternate direction: a rotation alone
    would keep each system behind the same neighbour (what that sample leaves in memory and on
    the disk would always land on it)."""
    systems = ["native", "overlayfs", "fuse-overlayfs", "cowfs"]
    orders = [runner.sample_order(systems, r, 2) for r in range(4)]
    for order in orders:
        assert sorted(order) == sorted(systems)
    assert {order[0] for order in orders} == set(systems)
    for s in systems[1:]:
        behind = {order[order.index(s) - 1] for order in orders if order.index(s) > 0}
        assert len(behind) > 1, (s, orders)


def test_select_by_prefix() -> None:
    chosen = workloads.select(workloads.all_workloads(), ["stat-walk", "unlink"])
    assert [w.name for w in chosen] == ["stat-walk-find", "stat-walk-ls", "small-files"]
    assert workloads.select(workloads.all_workloads(), ["read-all-warm"])[0].name == "read-all"


def test_unknown_workload_is_a_one_line_error() -> None:
    proc = subprocess.run(
        [str(COWFS), "bench", "--only", "nosuch"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("Error: no workload matches nosuch")
    assert proc.stderr.count("\n") == 1


def test_list_names_workloads_and_systems() -> None:
    result = CliRunner().invoke(cli, ["bench", "--quick", "--list"])
    assert result.exit_code == 0
    assert "stat-walk-find-cold" in result.output
    assert "systems: native overlayfs fuse-overlayfs cowfs cowfs-dirs" in result.output
