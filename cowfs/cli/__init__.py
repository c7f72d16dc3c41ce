"""The `cowfs` command line: a thin layer over the library.

Commands live in one module per concept and are imported lazily (cowfs.cli.app), so `cowfs
--help` and short commands do not pay for FUSE, HTTP or runtime imports; `cowfs run` does not
even load click when its arguments are plainly valid (cowfs.cli.runcmd). Library errors
(CowfsError) become one line `Error: ...` and the error's exit code; nothing else is printed.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # `typing` is not loaded on the start path: see cowfs.cli.runcmd
if TYPE_CHECKING:
    from typing import Any


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if "run" in args:
        from cowfs.cli.runcmd import quick_main

        code = quick_main(args)
        if code is not None:
            sys.exit(code)
    from cowfs.cli.app import main as click_main

    click_main(args)


def __getattr__(name: str) -> Any:
    # `cli`, `COMMANDS`, `LazyGroup` (tests and plugins use cowfs.cli.cli) load click on demand.
    if name in ("cli", "COMMANDS", "LazyGroup"):
        from cowfs.cli import app

        return getattr(app, name)
    raise AttributeError(f"module 'cowfs.cli' has no attribute {name!r}")
