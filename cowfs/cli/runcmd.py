"""`cowfs run`: its options (one table), its body, and a start path that does not load click.

A container start is dominated by interpreter start-up and imports, and click is the largest
import of all (~35 ms of ~0.1 s). So `main()` first offers the arguments to `quick_main()`,
which parses the common, valid forms of `[--root DIR] run [OPTIONS] IMAGE [COMMAND]...` with
the same option table the click command is built from, and runs the same body. Anything it is
not sure about (help, unknown or malformed options, `--`, a value click would reject, an image
that must be pulled first) is handed to click untouched, so usage, help and every error message
stay click's. This module must not import click.
"""

from __future__ import annotations

import os
import sys

# Annotations only: `typing` (with the enum and re it loads) is ~17 ms of a start here, and
# nothing on the start path needs it at run time (docs/ARCHITECTURE.md, "The start path").
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from cowfs.store import Store
    from runtime.mounter import CowfsMounter


class Opt:
    """One option of `cowfs run`. (Not a NamedTuple: building that class costs ~5 ms.)"""

    __slots__ = ("names", "dest", "help", "flag", "multiple", "type", "choices", "default")

    def __init__(self, names: tuple[str, ...], dest: str, help: str, *, flag: bool = False,
                 multiple: bool = False, type: type | None = None,
                 choices: tuple[str, ...] | None = None, default: Any = None) -> None:  # fmt: skip
        self.names, self.dest, self.help = names, dest, help
        self.flag, self.multiple = flag, multiple
        self.type = type  # int or float; str when None
        self.choices, self.default = choices, default


# The options of `cowfs run`, in --help order. cowfs.cli.container builds the click command
# from this table; quick_main() parses with it.
RUN_OPTIONS: tuple[Opt, ...] = (
    Opt(("--name",), "name", "Name the container."),
    Opt(("--rm",), "auto_remove", "Remove the container when it exits.", flag=True),
    Opt(("-d", "--detach"), "detach", "Run in the background; print its id.", flag=True),
    Opt(("-i", "--interactive"), "interactive", "Keep stdin attached.", flag=True),
    Opt(("-t", "--tty"), "tty", "Give the command a terminal.", flag=True),
    Opt(("-e", "--env"), "env", "Set an environment variable (KEY=VALUE).", multiple=True),
    Opt(("-w", "--workdir"), "workdir", "Working directory inside the container."),
    Opt(("-u", "--user"), "user", "UID[:GID] or name[:group] to run as."),
    Opt(("--hostname",), "hostname", "Container host name (default: its short id)."),
    Opt(("-v", "--volume"), "volume", "Bind mount HOST:CONTAINER[:ro].", multiple=True),
    Opt(("--read-only",), "read_only", "Mount the root file system read-only.", flag=True),
    Opt(("--network",), "network", "none: its own loopback only; host: the host's network.",
        choices=("none", "host"), default="none"),  # fmt: skip
    Opt(("-m", "--memory"), "memory", "Memory limit (e.g. 64m, 1g)."),
    Opt(("--pids-limit",), "pids_limit", "Maximum number of processes.", type=int),
    Opt(("--cpus",), "cpus", "CPU quota in CPUs (e.g. 0.5).", type=float),
    Opt(("--entrypoint",), "entrypoint", "Override the image's entrypoint."),
)
_BY_NAME = {name: opt for opt in RUN_OPTIONS for name in opt.names}


def execute(store: Store, values: dict[str, Any], image: str, command: list[str],
            mounter: CowfsMounter | None = None) -> int:  # fmt: skip
    """The body of `cowfs run` (either parser): the container's exit code when attached, 0
    when detached (its id is printed). `mounter` may have its daemon prepared already."""
    from cowfs.errors import InvalidInput, NotFound
    from runtime.container import Runtime, _phase
    from runtime.spec import RunOptions

    v = values
    if v["tty"] and not v["detach"] and not sys.stdin.isatty() and v["interactive"]:
        raise InvalidInput("the input device is not a TTY (drop -t, or run from a terminal)")
    opts = RunOptions(
        command=list(command), entrypoint=v["entrypoint"], env=list(v["env"]),
        workdir=v["workdir"], user=v["user"], hostname=v["hostname"],
        volumes=list(v["volume"]), read_only=v["read_only"], network=v["network"],
        memory=v["memory"], pids_limit=v["pids_limit"], cpus=v["cpus"], tty=v["tty"],
        interactive=v["interactive"],
    )  # fmt: skip
    rt = Runtime(store, mounter=mounter)
    try:
        store.resolve(image)
    except NotFound:
        from cowfs.cli.registry import image_for  # (imports click)

        image = image_for(store, image)  # pulled from its registry, as docker run does
    state = rt.create(image, opts, name=v["name"], auto_remove=v["auto_remove"])
    _phase("created")
    code = rt.run(state, detach=v["detach"])
    if v["detach"]:
        sys.stdout.write(state.id + "\n")
        sys.stdout.flush()
        return 0
    return code


def exit_now(code: int) -> None:
    """End an attached run/exec at once with the container's code. Skipping the interpreter's
    teardown (every module and object freed) is ~10% of a short container's start-to-exit.
    Only with real stdio: under click's CliRunner the normal exit path is kept."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        sys.stdout.fileno()
    except Exception:  # noqa: BLE001 - io.UnsupportedOperation and friends: not a real file
        return
    os._exit(code)


# -- the quick parser ------------------------------------------------------------------------


def parse(args: list[str]) -> tuple[str | None, dict[str, Any], str, list[str]] | None:
    """(root, option values, image, command) of `[--root DIR] run ...`, or None whenever click
    should have the final word."""
    root = None
    i = 0
    while i < len(args) and args[i] != "run":
        name, eq, value = args[i].partition("=")
        if name != "--root":
            return None
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("-"):
                return None
            i += 1
            value = args[i]
        root = value
        i += 1
    if i >= len(args) or "--" in args:
        return None
    values: dict[str, Any] = {o.dest: [] if o.multiple else (False if o.flag else o.default)
                              for o in RUN_OPTIONS}  # fmt: skip
    rest = args[i + 1 :]
    while rest and rest[0].startswith("-") and rest[0] != "-":
        arg = rest.pop(0)
        if arg.startswith("--"):
            name, eq, value = arg.partition("=")
            opt = _BY_NAME.get(name)
            if opt is None or (opt.flag and eq):
                return None
            if not opt.flag and not eq:
                if not rest:
                    return None
                value = rest.pop(0)
            if not _set(values, opt, value):
                return None
            continue
        for j in range(1, len(arg)):  # -it, -e KEY=V, -eKEY=V
            opt = _BY_NAME.get("-" + arg[j])
            if opt is None:
                return None
            if opt.flag:
                values[opt.dest] = True
                continue
            value = arg[j + 1 :]
            if not value:
                if not rest:
                    return None
                value = rest.pop(0)
            if not _set(values, opt, value):
                return None
            break
    if not rest:
        return None  # IMAGE is missing: click says so
    return root, values, rest[0], rest[1:]


def _set(values: dict[str, Any], opt: Opt, value: str) -> bool:
    if opt.flag:
        values[opt.dest] = True
        return True
    if value.startswith("-"):
        return False  # click reads it as the value too, but such forms are rare: let it decide
    if opt.choices is not None and value not in opt.choices:
        return False
    if opt.type is not None:
        try:
            value = opt.type(value)
        except ValueError:
            return False
    if opt.multiple:
        values[opt.dest].append(value)
    else:
        values[opt.dest] = value
    return True


def quick_main(args: list[str]) -> int | None:
    """Run `cowfs run` without click when `args` are plainly valid; None to use click.
    Exits the process (as main() would) once the container has run."""
    if "_COWFS_COMPLETE" in os.environ:  # click's shell completion
        return None
    parsed = parse(args)
    if parsed is None:
        return None
    root, values, image, command = parsed
    root = root or os.environ.get("COWFS_ROOT") or None
    if root is not None:
        # click.Path(file_okay=False) refuses an existing file or an unreadable path.
        try:
            st = os.stat(root)
        except OSError:
            pass
        else:
            import stat

            if stat.S_ISREG(st.st_mode) or not os.access(root, os.R_OK):
                return None
    from cowfs.errors import CowfsError, NotFound

    try:
        from cowfs.paths import default_root

        root = root or default_root()
        mounter = None
        if not values["detach"]:
            # Its FUSE daemon starts now, on the other CPU, while this process imports the
            # store and the runtime and sets the container up. (Detached, the monitor process
            # mounts: it forks its own.)
            from runtime.mounter import CowfsMounter

            mounter = CowfsMounter()
            mounter.prepare(root, image)
            # And the kernel readies the container's cgroup join meanwhile (~10 ms here).
            import _thread

            from runtime.cgroups import warm_attach

            _thread.start_new_thread(warm_attach, ())
        from cowfs.store import Store

        store = Store(root)
        try:
            store.resolve(image)
        except NotFound:
            if mounter is not None:
                mounter.cancel()
            return None  # a pull shows click's progress bar: the full CLI does it
        code = execute(store, values, image, command, mounter)
    except CowfsError as exc:
        sys.stderr.write(f"Error: {exc.message}\n")
        sys.stderr.flush()
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141
    exit_now(code)
    return code
