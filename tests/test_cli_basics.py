from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from cowfs.cli import cli
from cowfs.errors import CowfsError, NotFound


def test_help_lists_commands() -> None:
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    assert "copy-on-write" in result.output


def test_error_is_one_line_and_nonzero() -> None:
    code = (
        "import click, cowfs.cli as c\n"
        "from cowfs.errors import NotFound\n"
        "@c.cli.command('boom')\n"
        "def boom():\n"
        "    raise NotFound('image foo:bar not found')\n"
        "c.main(['boom'])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == NotFound.exit_code
    assert proc.stderr == "Error: image foo:bar not found\n"
    assert proc.stdout == ""


def test_error_family() -> None:
    assert issubclass(NotFound, CowfsError)
    assert NotFound("x").errno == 2


# -- the quick `run` path (no click) ----------------------------------------------------------


def test_quick_run_parser_reads_what_click_reads() -> None:
    from cowfs.cli.runcmd import parse

    root, v, image, command = parse(["--root", "/r", "run", "--rm", "-it", "-e", "A=1", "-eB=2",
                                     "--network=host", "--pids-limit", "5", "--cpus", "0.5",
                                     "-w/w", "img", "sh", "-c", "x --rm"])  # fmt: skip
    assert (root, image, command) == ("/r", "img", ["sh", "-c", "x --rm"])
    assert v["auto_remove"] and v["interactive"] and v["tty"] and not v["detach"]
    assert v["env"] == ["A=1", "B=2"] and v["network"] == "host" and v["workdir"] == "/w"
    assert v["pids_limit"] == 5 and v["cpus"] == 0.5 and v["name"] is None
    _, v, image, command = parse(["run", "img", "--rm"])  # after IMAGE: the command's
    assert (image, command, v["auto_remove"], v["network"]) == ("img", ["--rm"], False, "none")


def test_quick_run_parser_leaves_anything_doubtful_to_click() -> None:
    from cowfs.cli.runcmd import parse

    for args in (["run", "--help", "img"], ["run", "-h"], ["run", "--", "img"], ["run"],
                 ["run", "--network", "bad", "img"], ["run", "--pids-limit", "x", "img"],
                 ["run", "--rm=1", "img"], ["run", "-e"], ["run", "--name", "-x", "img"],
                 ["run", "--bogus", "img"], ["-x", "run", "img"], ["--root"], ["ps"],
                 ["--root", "-x", "run", "img"], ["run", "--rm"]):  # fmt: skip
        assert parse(args) is None, args


def test_quick_run_table_is_the_click_command() -> None:
    from cowfs.cli.container import run
    from cowfs.cli.runcmd import RUN_OPTIONS

    options = [p for p in run.params if p.param_type_name == "option"]
    assert [tuple(p.opts) for p in options] == [o.names for o in RUN_OPTIONS]
    assert [p.name for p in options] == [o.dest for o in RUN_OPTIONS]


# What the start path of a container (the CLI and its FUSE daemon) never imports, and what it
# would cost (docs/ARCHITECTURE.md, "The start path"). tests/test_runtime_e2e.py checks a real
# `cowfs run` against the same list, lazy imports included.
START_PATH_NEVER = (
    "click",  # ~35 ms: the quick parser runs instead (cowfs/cli/runcmd.py)
    "dataclasses", "inspect",  # ~25 ms with the classes: cowfs/record.py
    "typing", "re", "enum", "functools", "collections", "contextlib",  # ~17 ms together
    "pathlib", "json", "socket", "signal", "shutil", "threading", "queue",  # ~30 ms more
    "hashlib", "base64", "platform", "zstandard",  # the package's __init__: cowfs/zstd.py
)  # fmt: skip


def test_run_path_modules_do_not_load_what_only_other_commands_need() -> None:
    """And not the object and TOC code that only the FUSE daemon (forked early) uses."""
    heavy = [*START_PATH_NEVER, "xxhash", "cowfs.toc", "cowfs.objects", "cowfs.index"]
    code = ("import sys, cowfs.cli, cowfs.cli.runcmd, runtime.container, cowfs.mounting\n"
            f"print([m for m in {heavy!r} if m in sys.modules])\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout == "[]\n", out.stderr


def test_the_fuse_daemons_imports_do_not_load_what_the_start_path_never_needs() -> None:
    """A container's daemon imports these on the way to its first instruction (mounter.py)."""
    heavy = START_PATH_NEVER
    code = ("import sys, cowfs.fuse, cowfs.mounting, cowfs.store, runtime.mounter\n"
            "cowfs.fuse.preload()\n"
            "import cowfs.objects, cowfs.index, cowfs.toc\n"
            f"print([m for m in {heavy!r} if m in sys.modules])\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout == "[]\n", out.stderr
