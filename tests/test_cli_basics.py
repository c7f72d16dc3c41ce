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
