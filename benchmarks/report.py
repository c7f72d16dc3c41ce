"""The results document as people read it: a Markdown report, the JSON file and an SVG chart.

The Markdown table gives each system's median (min–max) and cowfs's ratio to kernel overlayfs and
to fuse-overlayfs; the targets the issues set are checked against the same run. The chart is
plain SVG written here, so it needs no plotting library.
"""

from __future__ import annotations

import json
import os
from html import escape
from pathlib import Path

from benchmarks.machine import unordered_warning

# The store mount first: it is how cowfs is normally used; the others are shown beside it.
COWFS = ("cowfs", "cowfs-dirs", "cowfs-threads", "cowfs-writeback")
COLORS = {
    "native": "#9e9e9e",
    "overlayfs": "#1f77b4",
    "fuse-overlayfs": "#ff7f0e",
    "cowfs": "#2ca02c",
    "cowfs-dirs": "#98df8a",
    "cowfs-threads": "#9467bd",
    "cowfs-writeback": "#8c564b",
}

CHURN = "issue 3: small-file churn no slower than fuse-overlayfs"

# (metric, compared with, highest allowed ratio, where the target comes from)
TARGETS = [
    ("stat-walk-find-cold", "fuse-overlayfs", 0.7, "issue 3: stat-walk cold ≤ 0.7× fuse-overlayfs"),
    ("stat-walk-ls-cold", "fuse-overlayfs", 0.7, "issue 3: stat-walk cold ≤ 0.7× fuse-overlayfs"),
    ("read-all-cold", "fuse-overlayfs", 0.5, "issue 3: read every file cold ≤ 0.5× fuse-overlayfs"),
    ("seq-read-cold", "overlayfs", 1.1, "issue 3: sequential read cold ≤ 1.1× kernel overlayfs"),
    ("seq-write", "fuse-overlayfs", 1.0, "issue 3: writes no slower than fuse-overlayfs"),
    ("copy-up-big", "fuse-overlayfs", 1.0, "issue 3: writes no slower than fuse-overlayfs"),
    ("create-small", "fuse-overlayfs", 1.0, CHURN),
    ("unlink-small", "fuse-overlayfs", 1.0, CHURN),
    ("container-run", "overlayfs", 2.0, "issue 4: cowfs run ≤ 2× runc on kernel overlayfs"),
]
CONTAINER_ABS_LIMIT = 0.5  # issue 4: cowfs run … true in at most 0.5 s
IMPORT_MB_S = 100  # issue 2: import throughput of uncompressed input
STORE_RATIO = 0.45  # issue 2: store size against the uncompressed rootfs


def write_all(doc: dict, out: Path, report: Path | None = None) -> dict[str, Path]:
    """Write results.json, chart.svg and results.md into out (and the report copy, if asked)."""
    out.mkdir(parents=True, exist_ok=True)
    doc["targets"] = targets(doc)
    paths = {"json": out / "results.json", "chart": out / "chart.svg", "md": out / "results.md"}
    _atomic(paths["json"], json.dumps(doc, indent=1) + "\n")
    _atomic(paths["chart"], chart_svg(doc))
    _atomic(paths["md"], markdown(doc, paths, paths["md"].parent))
    if report is not None:
        _atomic(report, markdown(doc, paths, report.parent))
        paths["report"] = report
    return paths


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def systems_in(doc: dict) -> list[dict]:
    return [s for s in doc["systems"] if s["available"]]


def primary_cowfs(doc: dict) -> str | None:
    names = {s["name"] for s in systems_in(doc)}
    return next((c for c in COWFS if c in names), None)


def ratio(entry: dict, a: str, b: str) -> float | None:
    med = entry.get("median", {})
    if a in med and b in med and med[b] > 0:
        return med[a] / med[b]
    return None


def targets(doc: dict) -> list[dict]:
    by_metric = {e["metric"]: e for e in doc["results"]}
    out = []
    for metric, against, limit, source in TARGETS:
        entry = by_metric.get(metric)
        if entry is None:
            continue
        for c in COWFS:
            r = ratio(entry, c, against)
            if r is None or (metric == "container-run" and c != "cowfs"):
                continue  # only the store variant runs `cowfs run`; the others run runc
            row = {
                "metric": metric,
                "system": c,
                "against": against,
                "limit": limit,
                "ratio": round(r, 3),
                "met": r <= limit,
                "source": source,
            }
            row["measured"] = f"{r:.2f}× {against}"
            if metric == "container-run":
                secs = entry["median"][c]
                row["seconds"] = secs
                row["met"] = row["met"] and secs <= CONTAINER_ABS_LIMIT
                row["source"] = "issue 4: cowfs run ≤ 0.5 s and ≤ 2× runc on kernel overlayfs"
                row["measured"] += f", {secs:.2f} s"
            out.append(row)
    imp = doc.get("import")
    if imp and "error" not in imp:
        for kind in ("tar", "gzip"):
            mbs = imp[f"import_{kind}"]["mb_per_s"]
            out.append(
                {"metric": f"import-{kind}", "system": "cowfs", "limit": IMPORT_MB_S,
                 "measured": f"{mbs:.0f} MB/s", "met": mbs >= IMPORT_MB_S,
                 "source": "issue 2: import ≥ 100 MB/s of uncompressed input"}
            )  # fmt: skip
        ratio_ = imp["store_vs_rootfs"]
        out.append(
            {"metric": "store-size", "system": "cowfs", "limit": STORE_RATIO,
             "measured": f"{ratio_:.2f}× rootfs", "met": ratio_ <= STORE_RATIO,
             "source": "issue 2: store ≤ 0.45× the uncompressed rootfs"}
        )  # fmt: skip
    return out


# ------------------------------------------------------------------------------------ Markdown


def _secs(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    if x >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def _cell(entry: dict, name: str) -> str:
    if name in entry.get("median", {}):
        med, lo, hi = entry["median"][name], entry["min"][name], entry["max"][name]
        if len(entry["samples"][name]) == 1:
            cell = _secs(med)
        else:
            cell = f"{_secs(med)} ({_secs(lo)}–{_secs(hi)})"
        if entry["errors"].get(name):
            cell += " ⚠"
        return cell
    if entry["errors"].get(name):
        return "error"
    return "–"


def _ratio_cell(entry: dict, against: str, cowfs: list[str]) -> str:
    parts = []
    for c in cowfs:
        r = ratio(entry, c, against)
        if r is not None:
            parts.append(f"{r:.2f}×" if c == cowfs[0] else f"({_short(c)} {r:.2f}×)")
    return " ".join(parts) or "–"


def _load_line(doc: dict) -> list[str]:
    load = doc.get("load_average")
    if not load:
        return []
    fmt = ", ".join
    return [
        "",
        f"Load average (1, 5, 15 min) when the suite started: {fmt(map(str, load['start']))}; "
        f"at the end: {fmt(map(str, load['end']))} — on {doc['machine']['cores']} cores, anything "
        "well above the suite's own ~1–2 means other work shared the machine during the run.",
    ]


def _code_line(doc: dict) -> list[str]:
    code = doc.get("cowfs_code") or {}
    if code.get("pinned"):
        text = f"cowfs measured as of commit `{str(code['commit'])[:12]}`"
        pending = code.get("uncommitted_changes_not_measured") or []
        if pending:
            text += f" (uncommitted changes to {len(pending)} file(s) were not measured)"
        return [text + ".", ""]
    if code:
        return [f"cowfs code: {code.get('reason', 'working tree')}.", ""]
    return []


def _stopped(doc: dict) -> str:
    if not doc.get("stopped_early"):
        return ""
    return f" (of {doc.get('runs_requested', '?')} requested; {doc['stopped_early']})"


def _short(system: str) -> str:
    return {"cowfs": "store"}.get(system, system.removeprefix("cowfs-"))


def _fs_cell(fs: dict) -> str:
    order = {True: ", metadata in order", False: ", **metadata not in order**"}
    known = order.get(fs.get("metadata_in_order"), "")  # type: ignore[call-overload]
    return f"{fs['fstype']} ({fs['device']}, {fs['options']}{known})"


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(doc: dict, paths: dict[str, Path], base: Path) -> str:
    systems = systems_in(doc)
    names = [s["name"] for s in systems]
    cowfs = [c for c in COWFS if c in names]
    m = doc["machine"]
    ds = doc["dataset"]
    fs = m["data_filesystem"]
    wfs = m.get("work_filesystem", fs)  # (results from before it was recorded: the same disk)
    warning = unordered_warning(wfs)
    rel = {k: os.path.relpath(v, base) for k, v in paths.items()}
    warmup = " (each workload's samples of a run after an untimed one)" if doc.get("warmup") else ""
    lines = [
        "# cowfs benchmark results",
        "",
        f"`{doc['command']}` — {doc['created']}, profile **{doc['profile']['name']}**, "
        f"{doc['runs']} run(s) per system{_stopped(doc)}, interleaved{warmup}; the whole suite "
        f"took {doc['duration_s'] / 60:.1f} min. Raw samples: [{rel['json']}]({rel['json']}); "
        f"chart: [{rel['chart']}]({rel['chart']}). Reproduce with `make bench` as root (it "
        "builds the data once: debootstrap needs the Debian mirror apt uses; on a host whose "
        "filesystem has no journal, put BENCH_OUT on one: scripts/bench-disk.sh).",
        "",
        *_code_line(doc),
        "## Machine",
        "",
        "| CPU | cores | RAM | kernel | OS | data on | uppers on |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {m['cpu_model']} | {m['cores']} | {_gib(m['ram_bytes'])} | {m['kernel']} | {m['os']} "
        f"| {_fs_cell(fs)} | {_fs_cell(wfs)} |",
        "",
        *([f"**Warning:** {warning}", ""] if warning else []),
        "Tools: " + "; ".join(f"{k}: {v}" for k, v in m["tools"].items()) + ".",
        *_load_line(doc),
        "",
        "## Data",
        "",
        f"{ds['source']}: {ds['files']} files, {ds['dirs']} directories, {ds['symlinks']} "
        f"symlinks, {_gib(ds['bytes'])} (including the large random files in `bench/`). "
        f"{ds['layers']} lower layers, bottom first, with "
        f"{', '.join(str(n) for n in ds['layer_files'])} non-directory entries each; the top "
        f"layer holds the large random files "
        f"({doc['profile']['seq_bytes'] // 2**20} MiB sequential-read file, "
        f"{doc['profile']['copyup_small'] // 2**20} MiB and "
        f"{doc['profile']['copyup_big'] // 2**20} MiB copy-up files). Every system sees exactly "
        "these layers; cowfs (store) sees them imported from the same OCI layout.",
    ]
    for note in ds.get("notes", []):
        lines += ["", f"Note: {note}"]
    lines += [
        "",
        "## Results",
        "",
        "Median seconds over the runs (min–max); lower is better. The ratio columns are cowfs "
        "÷ the other system — cowfs (store) first, other cowfs variants in parentheses (dirs = "
        "cowfs on the same plain-directory lowers as overlayfs): below 1 means cowfs is faster. "
        "⚠ marks a system for which some samples failed (see the notes).",
        "",
        "| workload | " + " | ".join(s["label"] for s in systems)
        + (" | cowfs ÷ overlayfs | cowfs ÷ fuse-overlayfs |" if cowfs else " |"),
        "| --- | " + " | ".join("---:" for _ in systems) + (" | ---: | ---: |" if cowfs else " |"),
    ]  # fmt: skip
    for e in doc["results"]:
        title = e["title"].replace("|", "\\|")  # a pipe inside a cell ends it otherwise
        row = f"| {title} | " + " | ".join(_cell(e, n) for n in names)
        if cowfs:
            row += f" | {_ratio_cell(e, 'overlayfs', cowfs)}"
            row += f" | {_ratio_cell(e, 'fuse-overlayfs', cowfs)}"
        lines.append(row + " |")
    if doc.get("targets"):
        caveat = (
            ["", "Quick profile: tiny data and one run, so these verdicts mean nothing."]
            if doc["profile"]["name"] == "quick"
            else []
        )
        lines += [
            "",
            "## Targets",
            *caveat,
            "",
            "| target | metric | cowfs variant | measured | met |",
            "| --- | --- | --- | ---: | --- |",
        ]
        for t in doc["targets"]:
            variant = _short(t["system"])
            lines.append(
                f"| {t['source']} | {t['metric']} | {variant} | {t['measured']} | "
                f"{'yes' if t['met'] else '**no**'} |"
            )
    lines += _import_section(doc)
    lines += [
        "",
        "## How each system ran",
        "",
        "| system | set-up | options the kernel shows for the mount |",
        "| --- | --- | --- |",
    ]
    for s in doc["systems"]:
        if s["available"]:
            lines.append(f"| {s['label']} | {s['setup']} | `{s.get('mount_options', '')}` |")
        else:
            lines.append(f"| {s['label']} | not run: {s.get('reason', '')} | |")
    lines += [
        "",
        "Treated the same for every system: each sample mounts afresh with an empty upper dir "
        "and unmounts after (so FUSE kernel caches and daemons start cold every time); *cold* "
        "means syncfs of the mount and the disk, then `echo 3 > /proc/sys/vm/drop_caches`, after "
        "that fresh mount and before the "
        "timed operation; *warm* means the operation ran once, untimed, on the same mount first. "
        "What differs by design: cowfs (store) reads all lower metadata from a per-image index "
        "cache file, not from the layer directories: its table is loaded at mount (its cost is "
        "in the mount-time row) and each directory's record when first looked up (from the "
        "disk after drop_caches, as the other systems read their directories), "
        "and its lower file contents come from its object store rather than from the layer "
        "directories; the FUSE options cowfs chooses for itself (kernel_cache, long entry/attr "
        "timeouts, see cowfs/fuse.py) are not given to fuse-overlayfs, which runs with its own "
        "defaults. The container rows time `cowfs run --rm bench:latest true` for cowfs (store) "
        "and mount + `runc run` (runc's default spec, process `true`) + umount for the others, "
        "each after one untimed run of the same (so neither runtime's own files come from the "
        "disk; the rootfs is mounted afresh either way).",
    ]
    notes = _notes(doc)
    if notes:
        lines += ["", "## Notes from the run", ""] + notes
    lines += ["", f"![benchmark chart]({rel['chart']})", ""]
    return "\n".join(lines)


def _import_section(doc: dict) -> list[str]:
    imp = doc.get("import")
    if not imp:
        return []
    head = ["", "## Import into the store", ""]
    if "error" in imp:
        return head + [f"benchmarks/import_store.py failed: {imp['error']}"]
    mb = 1_000_000
    lines = head + [
        f"benchmarks/import_store.py on the dataset's rootfs (without `bench/`) as one layer: "
        f"{imp['entries']} entries, {imp['rootfs_bytes'] / mb:.0f} MB of file content "
        f"({imp['rootfs_disk_bytes'] / mb:.0f} MB on disk), tar {imp['tar_bytes'] / mb:.0f} MB, "
        f"gzip -6 tar {imp['gzip_bytes'] / mb:.0f} MB. Throughput is MB/s of uncompressed tar "
        "input, wall clock, into a fresh store; measured once, before the interleaved runs.",
        "",
        "| input | seconds | MB/s | store (content) | store (on disk) | objects | loose | packs |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for kind in ("tar", "gzip"):
        r = imp[f"import_{kind}"]
        lines.append(
            f"| {kind} | {r['seconds']:.1f} | {r['mb_per_s']:.0f} | "
            f"{r['store_apparent_bytes'] / mb:.0f} MB | {r['store_bytes'] / mb:.0f} MB | "
            f"{r['objects']} | {r.get('loose_objects', '')} | {r.get('packs', '')} |"
        )
    lines += [
        "",
        f"Store ÷ rootfs content: {imp['store_vs_rootfs']:.2f}×; store on disk ÷ rootfs on disk: "
        f"{imp['store_disk_vs_rootfs_disk']:.2f}×; store ÷ gzip tar: {imp['store_vs_gzip']:.2f}×.",
    ]
    return lines


def _notes(doc: dict) -> list[str]:
    out = []
    labels = {s["name"]: s["label"] for s in doc["systems"]}
    for e in doc["results"]:
        for name, errs in e["errors"].items():
            uniq = sorted(set(errs))
            out.append(
                f"- {e['metric']} on {labels.get(name, name)}: {len(errs)} failed sample(s): "
                + "; ".join(uniq[:3])
            )
        for name, notes in e["notes"].items():
            merged: dict[str, list] = {}
            for n in notes:
                for k, v in n.items():
                    merged.setdefault(k, []).append(v)
            text = ", ".join(
                f"{k} {v[0] if len(set(map(str, v))) == 1 else v}" for k, v in merged.items()
            )
            if text and not text.startswith("runtime"):
                out.append(f"- {e['metric']} on {labels.get(name, name)}: {text}")
    return out


# ----------------------------------------------------------------------------------------- SVG


def chart_svg(doc: dict) -> str:
    """One group of horizontal bars per metric, each group scaled to its slowest system."""
    systems = systems_in(doc)
    results = [e for e in doc["results"] if e.get("median")]
    width, left, bar_h, gap, right = 980, 360, 13, 14, 90
    plot_w = width - left - right
    group_h = bar_h * len(systems) + gap
    top = 70
    height = top + group_h * len(results) + 30
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="10" y="20" font-size="15" font-weight="bold">cowfs benchmark — median '
        f"seconds, lower is better ({escape(doc['created'])}, {doc['runs']} run"
        f"{'s' if doc['runs'] != 1 else ''})</text>",
    ]
    x = 10
    for s in systems:
        color = COLORS.get(s["name"], "#777")
        out.append(f'<rect x="{x}" y="34" width="12" height="12" fill="{color}"/>')
        out.append(f'<text x="{x + 16}" y="44">{escape(s["label"])}</text>')
        x += 30 + 7 * len(s["label"])
    y = top
    for e in results:
        scale = max(e["median"].values()) or 1.0
        label = e["metric"]
        out.append(f'<text x="10" y="{y + group_h / 2}" font-weight="bold">{escape(label)}</text>')
        for i, s in enumerate(systems):
            by = y + i * bar_h
            med = e["median"].get(s["name"])
            if med is None:
                out.append(f'<text x="{left + 4}" y="{by + bar_h - 3}" fill="#999">n/a</text>')
                continue
            w = max(1.0, plot_w * med / scale)
            color = COLORS.get(s["name"], "#777")
            out.append(
                f'<rect x="{left}" y="{by + 1}" width="{w:.1f}" height="{bar_h - 2}" '
                f'fill="{color}"><title>{escape(s["label"])}: {med:.4f} s</title></rect>'
            )
            out.append(f'<text x="{left + w + 4:.1f}" y="{by + bar_h - 3}">{_secs(med)} s</text>')
        out.append(
            f'<line x1="{left}" y1="{y + group_h - gap / 2}" x2="{width - 10}" '
            f'y2="{y + group_h - gap / 2}" stroke="#eee"/>'
        )
        y += group_h
    out.append("</svg>")
    return "\n".join(out) + "\n"
