"""The click application: the command group, its lazily loaded commands, and the error handler.

Commands live in one module per concept and are imported lazily, so `cowfs --help` and short
commands do not pay for FUSE, HTTP or runtime imports. Library errors (CowfsError) become one line
`Error: ...` and the error's exit code; nothing else is printed. Entered through cowfs.cli.main.
"""

from __future__ import annotations

import importlib
import sys

import click

from cowfs.errors import CowfsError

# command name -> "module:attribute". Each module owns its commands; add new ones here.
COMMANDS: dict[str, str] = {
    "image": "cowfs.cli.image:image",
    "fsck": "cowfs.cli.image:fsck",
    "gc": "cowfs.cli.image:gc",
    "mount": "cowfs.cli.mount:mount",
    "umount": "cowfs.cli.mount:umount",
    "diff": "cowfs.cli.mount:diff",
    "commit": "cowfs.cli.mount:commit",
    "run": "cowfs.cli.container:run",
    "ps": "cowfs.cli.container:ps",
    "start": "cowfs.cli.container:start",
    "stop": "cowfs.cli.container:stop",
    "kill": "cowfs.cli.container:kill",
    "rm": "cowfs.cli.container:rm",
    "logs": "cowfs.cli.container:logs",
    "exec": "cowfs.cli.container:exec_",
    "inspect": "cowfs.cli.container:inspect",
    "export": "cowfs.cli.container:export",
    "bundle": "cowfs.cli.container:bundle",
    "pull": "cowfs.cli.registry:pull",
    "push": "cowfs.cli.registry:push",
    "bench": "cowfs.cli.bench:bench",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        lazy = {name for name in COMMANDS if self._load(name) is not None}
        return sorted(lazy | set(super().list_commands(ctx)))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return self._load(cmd_name) or super().get_command(ctx, cmd_name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module_name, attr = target.split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # that part is not built yet
                return None
            raise
        return getattr(module, attr, None)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--root",
    envvar="COWFS_ROOT",
    type=click.Path(file_okay=False),
    default=None,
    help="Store location (default: $COWFS_ROOT, else /var/lib/cowfs as root, "
    "else ~/.local/share/cowfs).",
)
@click.version_option(package_name="cowfs")
@click.pass_context
def cli(ctx: click.Context, root: str | None) -> None:
    """cowfs: copy-on-write layered filesystem, image store and container runtime."""
    from cowfs.paths import default_root

    ctx.obj = {"root": root or default_root()}


def main(argv: list[str] | None = None) -> None:
    try:
        rv = cli.main(args=argv, prog_name="cowfs", standalone_mode=False)
    except CowfsError as exc:
        click.echo(f"Error: {exc.message}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(141)
    # With standalone_mode off, ctx.exit(n) comes back as n: that is how `cowfs run` passes
    # the container's exit code on.
    if isinstance(rv, int):
        sys.exit(rv)
