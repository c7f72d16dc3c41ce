"""`cowfs image ...`, `cowfs fsck` and `cowfs gc`: thin commands over oci, rootfs, maintenance."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from cowfs.errors import InUse, InvalidInput

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _store(obj: dict):
    from cowfs.store import Store

    return Store(obj["root"])


def human_size(n: float) -> str:
    """1536 -> '1.5 KiB'; bytes below 1 KiB stay exact."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


@contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[int], None] | None]:
    """A byte progress bar on stderr when it is a terminal (None otherwise: no overhead)."""
    if not total or not sys.stderr.isatty():
        yield None
        return
    with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
        yield bar.update


def _source_size(path: str) -> int:
    base = path if os.path.exists(path) else path.rpartition(":")[0]
    if os.path.isfile(base):
        return os.path.getsize(base)
    total = 0
    for dirpath, _, files in os.walk(os.path.join(base, "blobs")):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    return total


@click.group()
def image() -> None:
    """Import, export, list and remove images."""


@image.command("import")
@click.argument("src")
@click.argument("name", required=False)
@click.pass_obj
def import_(obj: dict, src: str, name: str | None) -> None:
    """Import SRC: an OCI layout DIR[:TAG], an OCI archive or a docker-save archive.

    NAME:TAG is the tag it gets (default: the name the source gives it). Prints the image id.
    """
    from cowfs.oci import import_image

    store = _store(obj)
    with progress_bar(_source_size(src), "importing") as progress:
        image_id = import_image(store, src, name, progress=progress)
    click.echo(image_id)


@image.command("import-rootfs")
@click.argument("src", metavar="DIR|TAR")
@click.argument("name", metavar="NAME:TAG")
@click.pass_obj
def import_rootfs(obj: dict, src: str, name: str) -> None:
    """Make a one-layer image NAME:TAG from a root filesystem directory or tar."""
    from cowfs.rootfs import import_rootfs as do_import

    store = _store(obj)
    size = os.path.getsize(src) if os.path.isfile(src) else 0
    with progress_bar(size, "importing") as progress:
        image_id = do_import(store, src, name, progress=progress)
    click.echo(image_id)


@image.command("export")
@click.argument("ref", metavar="NAME:TAG")
@click.argument("out")
@click.option("--format", "fmt", type=click.Choice(["oci", "docker-archive"]), default="oci",
              show_default=True, help="An OCI layout directory (OUT may be DIR:TAG) or a "
              "docker-save tar.")  # fmt: skip
@click.option("--compression", type=click.Choice(["gzip", "zstd", "none"]), default="gzip",
              show_default=True, help="Layer compression (oci only; docker-archive layers are "
              "uncompressed).")  # fmt: skip
@click.pass_obj
def export(obj: dict, ref: str, out: str, fmt: str, compression: str) -> None:
    """Export image NAME:TAG to OUT. Prints the manifest (or config) digest."""
    from cowfs.oci import export_image

    store = _store(obj)
    img = store.resolve(ref)
    total = sum(store.layer_meta(layer).size for layer in img.layers)
    with progress_bar(total, "exporting") as progress:
        digest = export_image(store, ref, out, fmt=fmt,
                              compression=None if compression == "none" else compression,
                              progress=progress)  # fmt: skip
    click.echo(digest)


@image.command("ls")
@json_option
@click.pass_obj
def ls(obj: dict, as_json: bool) -> None:
    """List images with their size on disk, split into bytes shared with other images and
    bytes only this image uses."""
    from cowfs.maintenance import usage

    rows = usage(_store(obj))
    if as_json:
        click.echo(json.dumps([u.to_json() for u in rows], indent=2))
        return
    table = [("NAME", "IMAGE ID", "LAYERS", "CONTENT", "STORED", "SHARED", "UNIQUE")]
    for u in sorted(rows, key=lambda u: (u.tags[0] if u.tags else "~", u.image_id)):
        for name in u.tags or ["<none>"]:
            table.append((name, u.image_id[:12], str(u.layers), human_size(u.content),
                          human_size(u.stored), human_size(u.shared),
                          human_size(u.unique)))  # fmt: skip
    _print_table(table)


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@image.command("inspect")
@click.argument("ref", metavar="NAME:TAG|ID")
@click.pass_obj
def inspect(obj: dict, ref: str) -> None:
    """Show an image as JSON: id, tags, layers (with their OCI digests) and config."""
    store = _store(obj)
    img = store.resolve(ref)
    layers = []
    for layer_id in img.layers:
        meta = store.layer_meta(layer_id)
        layers.append({"id": layer_id, "diff_id": meta.diff_id, "blobs": meta.blobs,
                       "size": meta.size, "entries": meta.entries})  # fmt: skip
    doc = {"id": img.id, "tags": store.tags_of(img.id), "layers": layers, "config": img.config}
    click.echo(json.dumps(doc, indent=2))


@image.command("rm")
@click.argument("refs", nargs=-1, required=True, metavar="NAME:TAG|ID...")
@click.option("-f", "--force", is_flag=True, help="Remove even if a container uses it.")
@click.pass_obj
def rm(obj: dict, refs: tuple[str, ...], force: bool) -> None:
    """Remove tags (an image goes with its last tag) or images by id. Space returns with gc."""
    from cowfs.maintenance import container_image_ids

    store = _store(obj)
    in_use = set() if force else container_image_ids(store)
    for ref in refs:
        img = store.resolve(ref)
        by_tag = ref != img.id and not img.id.startswith(ref.removeprefix("sha256:"))
        last_tag = len(store.tags_of(img.id)) <= 1
        if img.id in in_use and (not by_tag or last_tag):
            raise InUse(f"image {ref} is used by a container (remove it first, or use --force)")
        untagged = [ref] if by_tag else store.tags_of(img.id)  # by id: every tag goes
        deleted = store.remove_image(ref)
        for t in untagged:
            click.echo(f"Untagged: {t}")
        for image_id in deleted:
            click.echo(f"Deleted: {image_id}")


@image.command("tag")
@click.argument("source", metavar="NAME:TAG|ID")
@click.argument("target", metavar="NEW:TAG")
@click.pass_obj
def tag(obj: dict, source: str, target: str) -> None:
    """Give the image SOURCE the additional name TARGET."""
    store = _store(obj)
    store.tag(store.resolve(source).id, target)


@click.command()
@json_option
@click.pass_obj
def fsck(obj: dict, as_json: bool) -> None:
    """Rehash every object and check every layer, image and tag. Exit 3 if anything is broken."""
    from cowfs.errors import Corruption
    from cowfs.maintenance import fsck as do_fsck

    store = _store(obj)
    total = sum(1 for _ in store.objects)
    with progress_bar(total, "checking") as progress:
        report = do_fsck(store, progress=progress)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(f"checked {report.objects} objects, {report.layers} layers, "
                   f"{report.images} images: "
                   f"{'ok' if report.ok else f'{len(report.problems)} problem(s)'}")  # fmt: skip
        for p in report.problems:
            click.echo(f"{p.what}: {p.why}")
            for a in p.affects:
                click.echo(f"  affects {a}")
    if not report.ok:
        sys.exit(Corruption.exit_code)


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        return float(t[:-1]) * units[t[-1]] if t[-1:] in units else float(t)
    except (ValueError, IndexError):
        raise InvalidInput(f"{text!r} is not a duration (e.g. 0, 30s, 10m, 2h)") from None


@click.command()
@click.option("--dry-run", "-n", is_flag=True, help="Only report what would be removed.")
@click.option("--grace", default="10m", show_default=True,
              help="Keep unreferenced data younger than this (imports in progress own it).")
@json_option
@click.pass_obj
def gc(obj: dict, dry_run: bool, grace: str, as_json: bool) -> None:
    """Remove layers and objects that no image references."""
    from cowfs.maintenance import gc as do_gc

    report = do_gc(_store(obj), dry_run=dry_run, grace=_duration(grace))
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
        return
    verb = "would free" if dry_run else "freed"
    click.echo(f"{verb} {human_size(report.bytes_freed)}: {len(report.layers)} layer(s), "
               f"{report.objects} object(s), {report.cache_entries} cached index(es), "
               f"{report.tmp_entries} stale tmp entr(ies)")  # fmt: skip
    if report.kept_young:
        click.echo(f"kept {report.kept_young} unreferenced item(s) younger than {grace}")
