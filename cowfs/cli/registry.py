"""`cowfs pull` and `cowfs push`: thin commands over cowfs.registry."""

from __future__ import annotations

import sys
import threading
from typing import TYPE_CHECKING

import click

# Nothing of cowfs.registry is imported up here: `run` and `mount` import this module for
# image_for(), and a container start must not pay for http.client and ssl when the image is local.

if TYPE_CHECKING:
    from cowfs.store import Store


class BarProgress:
    """A byte progress bar on stderr when it is a terminal; silent otherwise (a
    cowfs.registry.pull.Progress)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self._bar = None
        self._lock = threading.Lock()  # workers report from their threads

    def begin(self, total_bytes: int, layers: int) -> None:
        if sys.stderr.isatty() and total_bytes:
            self._bar = click.progressbar(
                length=total_bytes, label=f"{self.label} {layers} layer(s)", file=sys.stderr
            )
            self._bar.__enter__()

    def advance(self, nbytes: int) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.update(nbytes)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _size(text: str | None) -> int | None:
    if text is None:
        return None
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = units.get(t[-1:], 1)
    try:
        return int(t[:-1] if t[-1:] in units else t) * mult
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (e.g. 5M)") from None


insecure_option = click.option(
    "--insecure",
    is_flag=True,
    help="Allow plain HTTP and unverified TLS (plain HTTP is always allowed for localhost).",
)
authfile_option = click.option(
    "--authfile",
    type=click.Path(dir_okay=False),
    help="docker-style config.json with credentials (default: $DOCKER_CONFIG/config.json or "
    "~/.docker/config.json, then the auth.json of `skopeo login`).",
)


@click.command()
@click.argument("ref")
@click.option("--platform", help="os/arch[/variant] to pick from an index (default linux/amd64).")
@insecure_option
@authfile_option
@click.option("--jobs", type=click.IntRange(1, 16), default=3, show_default=True,
              help="Layers downloaded in parallel.")  # fmt: skip
@click.pass_obj
def pull(obj: dict, ref: str, platform: str | None, insecure: bool, authfile: str | None,
         jobs: int) -> None:  # fmt: skip
    """Pull image REF ([registry/]repo[:tag|@digest]) into the store; prints the image id."""
    from cowfs.registry.pull import pull as do_pull
    from cowfs.store import Store

    store = Store(obj["root"])
    res = do_pull(store, ref, platform=platform, insecure=insecure, authfile=authfile, jobs=jobs,
                  progress=BarProgress("pulling"))  # fmt: skip
    click.echo(
        f"Pulled {res.tag or res.reference} ({res.manifest_digest}): {res.layers} layer(s), "
        f"{res.downloaded} downloaded ({_human(res.downloaded_bytes)}), "
        f"{res.layers - res.downloaded} already present",
        err=True,
    )
    click.echo(res.image_id)


@click.command()
@click.argument("image")
@click.argument("ref")
@click.option("--compression", type=click.Choice(["zstd", "gzip", "none"]), default="zstd",
              show_default=True,
              help="Layer compression; gzip writes a Docker schema 2 manifest for older "
              "registries and clients.")  # fmt: skip
@click.option("--chunk-size", metavar="SIZE",
              help="Upload blobs larger than SIZE (e.g. 16M) in PATCH chunks of SIZE.")  # fmt: skip
@insecure_option
@authfile_option
@click.option("--jobs", type=click.IntRange(1, 16), default=3, show_default=True,
              help="Layers exported and uploaded in parallel.")  # fmt: skip
@click.pass_obj
def push(obj: dict, image: str, ref: str, compression: str, chunk_size: str | None,
         insecure: bool, authfile: str | None, jobs: int) -> None:  # fmt: skip
    """Push stored IMAGE (name:tag or id) to REF ([registry/]repo:tag); prints the digest."""
    from cowfs.registry.push import push as do_push
    from cowfs.store import Store

    store = Store(obj["root"])
    res = do_push(store, image, ref, compression=compression, chunk_size=_size(chunk_size),
                  insecure=insecure, authfile=authfile, jobs=jobs,
                  progress=BarProgress("pushing"))  # fmt: skip
    click.echo(
        f"Pushed {res.reference}: {res.layers} layer(s), {res.uploaded} uploaded "
        f"({_human(res.uploaded_bytes)}), {res.mounted} mounted, {res.present} already there",
        err=True,
    )
    click.echo(res.manifest_digest)


def image_for(store: Store, ref: str) -> str:
    """How `mount` and `run` should name image REF: REF itself when the store has it, else the
    id of the image pulled for it now (as `docker run` pulls a missing image)."""
    from cowfs.errors import NotFound, RegistryError

    try:
        store.resolve(ref)
        return ref
    except NotFound:
        pass
    from cowfs.errors import AuthError, TransferError
    from cowfs.registry.pull import ensure_image
    from cowfs.registry.reference import DOCKER_HUB, parse

    try:
        return ensure_image(store, ref, progress=_AnnouncedBar(ref))
    except (AuthError, TransferError, RegistryError) as exc:
        # A bare name ("nosuch:img") that Docker Hub does not have, or that cannot be looked
        # up there (offline), is first of all an image this store lacks: say that. A registry
        # the user named explicitly gets its own error.
        unknown = (
            isinstance(exc, AuthError | TransferError) or getattr(exc, "http_status", None) == 404
        )
        implicit_hub = parse(ref).registry == DOCKER_HUB and not ref.startswith(
            ("docker.io/", "index.docker.io/")
        )
        if unknown and implicit_hub:
            raise NotFound(f"image {ref} not found") from None
        raise


class _AnnouncedBar(BarProgress):
    """Says why a mount or run is downloading before the bar starts."""

    def __init__(self, ref: str) -> None:
        super().__init__("pulling")
        self.ref = ref

    def begin(self, total_bytes: int, layers: int) -> None:
        click.echo(f"Unable to find image '{self.ref}' locally: pulling it", err=True)
        super().begin(total_bytes, layers)
