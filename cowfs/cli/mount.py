"""`cowfs mount`, `cowfs umount`, `cowfs diff` and `cowfs commit`: thin commands over mounting,
diff and commit."""

from __future__ import annotations

import json
import os
from typing import Any

import click

from cowfs.errors import InvalidInput, NotFound

json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _store(obj: dict):
    from cowfs.store import Store

    return Store(obj["root"])


# -- mount and umount ------------------------------------------------------------------------------


@click.command()
@click.argument("image_ref", metavar="IMAGE")
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--upper", type=click.Path(file_okay=False), help="Writable upper dir (with --work).")
@click.option("--work", type=click.Path(file_okay=False), help="Work dir (same fs as upper).")
@click.option("--read-only", is_flag=True, help="No upper: every change fails with EROFS.")
@click.option("--volatile", is_flag=True,
              help="Never force the upper to disk (as overlayfs's volatile): a throwaway upper.")
@click.option("--foreground", is_flag=True, help="Serve in this process until unmounted.")
@click.pass_obj
def mount(obj: dict, image_ref: str, mountpoint: str, upper: str | None, work: str | None,
          read_only: bool, volatile: bool, foreground: bool) -> None:  # fmt: skip
    """Mount IMAGE at MOUNTPOINT; returns once the mount is live (daemon in the background).

    Without --upper/--work, changes go to a fresh upper dir under the store.
    """
    from cowfs import mounting
    from cowfs.cli.registry import image_for

    store = _store(obj)
    image_ref = image_for(store, image_ref)  # pulled from its registry when not in the store
    mounting.mount(store, image_ref, mountpoint, upper, work, read_only, volatile=volatile,
                   foreground=foreground)  # fmt: skip


@click.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
def umount(mountpoint: str) -> None:
    """Flush and unmount MOUNTPOINT, and wait for its daemon to exit."""
    from cowfs import mounting

    mounting.umount(mountpoint)


# -- diff and commit -------------------------------------------------------------------------------


def _container(store: Any, ref: str) -> tuple[str, str]:
    """(image id, upper dir) of a container by name, id or unique id prefix.

    Reads <store>/containers/<id>/state.json directly (cowfs does not import the runtime)."""
    base = store.containers_dir
    found: list[tuple[str, dict]] = []
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        try:
            doc = json.loads((d / "state.json").read_text())
        except (OSError, ValueError):
            continue
        found.append((d.name, doc))
    for pick in (
        [f for f in found if f[0] == ref],
        [f for f in found if f[1].get("name") == ref],
        [f for f in found if len(ref) >= 3 and f[0].startswith(ref)],
    ):
        if len(pick) > 1:
            raise InvalidInput(f"container id prefix {ref} is ambiguous")
        if pick:
            cid, doc = pick[0]
            return doc["image_id"], str(base / cid / "upper")
    raise NotFound(f"no such container or directory: {ref}")


@click.command()
@click.argument("target")
@click.option("--image", "image_ref", help="Base image of an upper dir (default: unknown).")
@click.option("--lower", "lowers", multiple=True, type=click.Path(file_okay=False),
              help="Plain lower dir of an upper dir, top first (repeat).")  # fmt: skip
@json_option
@click.pass_obj
def diff(obj: dict, target: str, image_ref: str | None, lowers: tuple[str, ...],
         as_json: bool) -> None:  # fmt: skip
    """List what a container (or an upper dir) changed: A added, C changed, D deleted.

    TARGET is a container name or id, or an upper directory in kernel-overlayfs format. Without
    --image or --lower, an upper dir is compared with an unknown base: copied-up entries (they
    carry an origin xattr) show as C, the rest as A.
    """
    from cowfs import diff as diffmod

    if image_ref and lowers:
        raise InvalidInput("--image and --lower exclude each other")
    lower = None
    skip: set[str] = set()
    if os.path.isdir(target):
        upper = target
        if image_ref:
            lower = _image_tree(_store(obj), image_ref)
        elif lowers:
            from cowfs import index, overlaydir

            lower = index.merge([overlaydir.scan(d) for d in reversed(lowers)]).entries
    else:
        if lowers:
            raise InvalidInput("--lower is for an upper directory, not a container")
        store = _store(obj)
        image_id, upper = _container(store, target)
        lower = _image_tree(store, image_ref or image_id)
        from cowfs.commit import CONTAINER_PLACEHOLDERS, placeholders
        from cowfs.overlaydir import scan

        skip = placeholders(scan(upper), lower, CONTAINER_PLACEHOLDERS)
    found = diffmod.upper_changes(upper, lower, skip)
    if as_json:
        click.echo(json.dumps([c.to_json() for c in found], indent=2))
    else:
        for c in found:
            click.echo(str(c))


def _image_tree(store: Any, ref: str) -> dict:
    from cowfs import mounting

    return mounting.image_index(store, store.resolve(ref)).entries


@click.command()
@click.argument("refs", nargs=-1, required=True, metavar="[CONTAINER] NAME[:TAG]")
@click.option("--upper", type=click.Path(file_okay=False), help="Commit this upper dir ...")
@click.option("--image", "image_ref", help="... on top of this base image.")
@click.option("-m", "--message", default="", help="Comment for the history entry.")
@click.option("-a", "--author", default="", help="Author of the new image.")
@click.option("-c", "--change", "changes", multiple=True,
              help="Dockerfile instruction for the config: CMD, ENTRYPOINT, ENV, WORKDIR, USER, "
              "LABEL, EXPOSE, STOPSIGNAL (repeat).")  # fmt: skip
@click.pass_obj
def commit(obj: dict, refs: tuple[str, ...], upper: str | None, image_ref: str | None,
           message: str, author: str, changes: tuple[str, ...]) -> None:  # fmt: skip
    """Make a new image from a container's changes (or from --upper DIR --image BASE).

    The changes become one new layer on top of the base image's layers; prints the image id.
    """
    from cowfs.commit import apply_changes, commit_upper, parse_change

    store = _store(obj)
    if upper is not None:
        if image_ref is None:
            raise InvalidInput("--upper needs --image BASE")
        if len(refs) != 1:
            raise InvalidInput("with --upper, give only NAME[:TAG]")
        if not os.path.isdir(upper):
            raise NotFound(f"upper directory {upper} does not exist")
        base, tag, from_container = image_ref, refs[0], False
    else:
        if len(refs) != 2:
            raise InvalidInput("give CONTAINER NAME[:TAG], or --upper DIR --image BASE NAME[:TAG]")
        image_id, upper = _container(store, refs[0])
        base, tag, from_container = image_ref or image_id, refs[1], True
        from cowfs.settling import cut_short

        mark = cut_short(os.path.join(os.path.dirname(upper), "work"))
        if mark is not None:
            raise InvalidInput(f"container {refs[0]}: its mount was cut short by a host crash "
                               f"and may hold copy-ups with holes: start it once (its mount "
                               f"repairs them), then commit")  # fmt: skip
    config: dict[str, Any] = {}
    for text in changes:
        apply_changes(config, parse_change(text))
    image_id = commit_upper(store, base, upper, tag, config or None, message=message,
                            author=author, container_placeholders=from_container)  # fmt: skip
    click.echo(f"sha256:{image_id}")
