"""Container commands with docker's verbs and flags: a thin layer over runtime.container."""

from __future__ import annotations

import json
import sys
import time

import click

from cowfs.errors import InvalidInput


def _runtime(ctx: click.Context):
    from cowfs.store import Store
    from runtime.container import Runtime

    return Runtime(Store(ctx.obj["root"]))


def _exit_now(code: int) -> None:
    from cowfs.cli.runcmd import exit_now

    exit_now(code)


def _ago(t: float | None) -> str:
    if not t:
        return ""
    secs = max(0, int(time.time() - t))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if secs >= size:
            n = secs // size
            return f"{n} {unit}{'s' if n > 1 else ''}"
    return f"{secs} second{'s' if secs != 1 else ''}"


def _run_options(f):
    """The options of `run` from runcmd.RUN_OPTIONS (the quick parser reads the same table)."""
    from cowfs.cli.runcmd import RUN_OPTIONS

    for o in reversed(RUN_OPTIONS):
        kind = click.Choice(list(o.choices)) if o.choices else o.type
        f = click.option(*o.names, o.dest, is_flag=o.flag, multiple=o.multiple, type=kind,
                         default=o.default, show_default=o.default is not None,
                         help=o.help)(f)  # fmt: skip
    return f


@click.command(context_settings={"ignore_unknown_options": False,
                                 "allow_interspersed_args": False})  # fmt: skip
@_run_options
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, image: str, command: tuple[str, ...], **values) -> int:
    """Run COMMAND in a new container of IMAGE, on a cowfs mount of it."""
    from cowfs.cli.runcmd import execute
    from cowfs.store import Store

    code = execute(Store(ctx.obj["root"]), values, image, list(command))
    if values["detach"]:
        return 0
    _exit_now(code)
    ctx.exit(code)


@click.command()
@click.option("-a", "--attach", is_flag=True, help="Attach output and wait for the exit.")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def start(ctx: click.Context, attach: bool, containers: tuple[str, ...]) -> None:
    """Start stopped containers again, on their kept upper layer."""
    rt = _runtime(ctx)
    if attach and len(containers) > 1:
        raise InvalidInput("start -a takes one container")
    for ref in containers:
        state = rt.find(ref).load()
        code = rt.run(state, detach=not attach)
        if attach:
            ctx.exit(code)
        click.echo(ref)


@click.command()
@click.option("-t", "--time", "timeout", type=float, default=10, show_default=True,
              help="Seconds to wait after SIGTERM before SIGKILL.")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def stop(ctx: click.Context, timeout: float, containers: tuple[str, ...]) -> None:
    """Stop running containers: SIGTERM, then SIGKILL after the timeout."""
    rt = _runtime(ctx)
    for ref in containers:
        rt.stop(ref, timeout)
        click.echo(ref)


@click.command()
@click.option("-s", "--signal", "sig", default="KILL", show_default=True,
              help="Signal name or number.")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def kill(ctx: click.Context, sig: str, containers: tuple[str, ...]) -> None:
    """Send a signal to running containers (forwarded by their init to the command)."""
    rt = _runtime(ctx)
    for ref in containers:
        rt.kill(ref, sig)
        click.echo(ref)


@click.command()
@click.option("-f", "--force", is_flag=True, help="Kill a running container first.")
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def rm(ctx: click.Context, force: bool, containers: tuple[str, ...]) -> None:
    """Remove containers: their upper layer, state, cgroups and mount."""
    rt = _runtime(ctx)
    for ref in containers:
        rt.remove(ref, force=force)
        click.echo(ref)


@click.command()
@click.option("-a", "--all", "show_all", is_flag=True, help="Include stopped containers.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("-q", "--quiet", is_flag=True, help="Only ids.")
@click.pass_context
def ps(ctx: click.Context, show_all: bool, as_json: bool, quiet: bool) -> None:
    """List containers (running ones, or all with -a)."""
    rt = _runtime(ctx)
    states = [s for s in rt.states() if show_all or s.status == "running"]
    if as_json:
        click.echo(json.dumps([{
            "Id": s.id, "Name": s.name, "Image": s.image, "Command": s.spec.args,
            "Created": s.created, "Status": s.status, "ExitCode": s.exit_code,
            "Pid": s.pid,
        } for s in states], indent=2))  # fmt: skip
        return
    if quiet:
        for s in states:
            click.echo(s.id[:12])
        return
    rows = [("CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "NAMES")]
    for s in states:
        if s.status == "running":
            status = f"Up {_ago(s.started_at)}"
        elif s.status == "exited":
            status = f"Exited ({s.exit_code}) {_ago(s.finished_at)} ago"
        else:
            status = "Created"
        cmd = " ".join(s.spec.args)
        cmd = cmd if len(cmd) <= 22 else cmd[:21] + "…"
        rows.append((s.id[:12], s.image, f'"{cmd}"', f"{_ago(s.created)} ago", status, s.name))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


@click.command()
@click.option("-f", "--follow", is_flag=True, help="Keep printing while it runs.")
@click.argument("container")
@click.pass_context
def logs(ctx: click.Context, follow: bool, container: str) -> None:
    """Print a container's output (stdout and stderr to the matching streams)."""
    rt = _runtime(ctx)
    for stream, text in rt.logs(container, follow=follow):
        out = sys.stderr if stream == "stderr" else sys.stdout
        out.write(text)
        out.flush()


@click.command("exec", context_settings={"allow_interspersed_args": False})
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin attached.")
@click.option("-t", "--tty", is_flag=True, help="Give the command a terminal.")
@click.option("-e", "--env", multiple=True, help="Set an environment variable (KEY=VALUE).")
@click.option("-w", "--workdir", help="Working directory inside the container.")
@click.option("-u", "--user", help="UID[:GID] or name[:group] to run as.")
@click.argument("container")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_context
def exec_(ctx: click.Context, interactive, tty, env, workdir, user, container, command) -> None:
    """Run COMMAND in a running container (its namespaces and cgroup)."""
    rt = _runtime(ctx)
    code = rt.exec(container, list(command), tty=tty, interactive=interactive, env=list(env),
                   workdir=workdir, user=user)  # fmt: skip
    _exit_now(code)
    ctx.exit(code)


@click.command()
@click.argument("containers", nargs=-1, required=True)
@click.pass_context
def inspect(ctx: click.Context, containers: tuple[str, ...]) -> None:
    """Show containers' configuration and state as JSON."""
    rt = _runtime(ctx)
    click.echo(json.dumps([rt.inspect(ref) for ref in containers], indent=2))


@click.command()
@click.option("-o", "--output", help="Write to this file (default: the OUT argument).")
@click.argument("container")
@click.argument("out", required=False)
@click.pass_context
def export(ctx: click.Context, output: str | None, container: str, out: str | None) -> None:
    """Write a container's merged file system as a tar."""
    target = output or out
    if not target:
        raise InvalidInput("export needs an output file (OUT or -o)")
    _runtime(ctx).export(container, target)


@click.command()
@click.argument("container")
@click.argument("directory")
@click.pass_context
def bundle(ctx: click.Context, container: str, directory: str) -> None:
    """Write an OCI runtime bundle (config.json) whose root is the container's cowfs mount.

    The mount stays until `cowfs rm`; run it with e.g. `runc run --bundle DIRECTORY ID`."""
    click.echo(_runtime(ctx).bundle(container, directory))
