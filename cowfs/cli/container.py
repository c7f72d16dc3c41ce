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
    """End an attached run/exec at once with the container's code. Skipping the interpreter's
    teardown (every module and object freed) is ~10% of a short container's start-to-exit.
    Only with real stdio: under click's CliRunner the normal exit path is kept."""
    import os

    try:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout.fileno()
    except Exception:  # noqa: BLE001 - io.UnsupportedOperation and friends: not a real file
        return
    os._exit(code)


def _ago(t: float | None) -> str:
    if not t:
        return ""
    secs = max(0, int(time.time() - t))
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if secs >= size:
            n = secs // size
            return f"{n} {unit}{'s' if n > 1 else ''}"
    return f"{secs} second{'s' if secs != 1 else ''}"


@click.command(context_settings={"ignore_unknown_options": False,
                                 "allow_interspersed_args": False})  # fmt: skip
@click.option("--name", help="Name the container.")
@click.option("--rm", "auto_remove", is_flag=True, help="Remove the container when it exits.")
@click.option("-d", "--detach", is_flag=True, help="Run in the background; print its id.")
@click.option("-i", "--interactive", is_flag=True, help="Keep stdin attached.")
@click.option("-t", "--tty", is_flag=True, help="Give the command a terminal.")
@click.option("-e", "--env", multiple=True, help="Set an environment variable (KEY=VALUE).")
@click.option("-w", "--workdir", help="Working directory inside the container.")
@click.option("-u", "--user", help="UID[:GID] or name[:group] to run as.")
@click.option("--hostname", help="Container host name (default: its short id).")
@click.option("-v", "--volume", multiple=True, help="Bind mount HOST:CONTAINER[:ro].")
@click.option("--read-only", is_flag=True, help="Mount the root file system read-only.")
@click.option("--network", type=click.Choice(["none", "host"]), default="none",
              show_default=True, help="none: its own loopback only; host: the host's network.")
@click.option("-m", "--memory", help="Memory limit (e.g. 64m, 1g).")
@click.option("--pids-limit", type=int, help="Maximum number of processes.")
@click.option("--cpus", type=float, help="CPU quota in CPUs (e.g. 0.5).")
@click.option("--entrypoint", help="Override the image's entrypoint.")
@click.argument("image")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def run(ctx: click.Context, name, auto_remove, detach, interactive, tty, env, workdir, user,
        hostname, volume, read_only, network, memory, pids_limit, cpus, entrypoint, image,
        command) -> int:  # fmt: skip
    """Run COMMAND in a new container of IMAGE, on a cowfs mount of it."""
    from runtime.spec import RunOptions

    if tty and not detach and not sys.stdin.isatty() and interactive:
        raise InvalidInput("the input device is not a TTY (drop -t, or run from a terminal)")
    opts = RunOptions(
        command=list(command), entrypoint=entrypoint, env=list(env), workdir=workdir,
        user=user, hostname=hostname, volumes=list(volume), read_only=read_only,
        network=network, memory=memory, pids_limit=pids_limit, cpus=cpus, tty=tty,
        interactive=interactive,
    )
    rt = _runtime(ctx)
    from cowfs.cli.registry import image_for

    image = image_for(rt.store, image)  # pulled from its registry when not in the store
    state = rt.create(image, opts, name=name, auto_remove=auto_remove)
    from runtime.container import _phase

    _phase("created")
    code = rt.run(state, detach=detach)
    if detach:
        click.echo(state.id)
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
            "Created": s.created, "Status": s.status.value, "ExitCode": s.exit_code,
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
