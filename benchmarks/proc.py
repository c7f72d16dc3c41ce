"""Running the tools a benchmark drives, with a time limit that also ends their children."""

from __future__ import annotations

import os
import signal
import subprocess

from cowfs.errors import BenchError, CowfsError

DEFAULT_TIMEOUT = 1800.0  # no single operation of the full suite comes near this


def run(
    cmd: list[str],
    what: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    error: type[CowfsError] = BenchError,
    stdout: int | None = subprocess.DEVNULL,
) -> str:
    """Run cmd in its own process group; raise `error` naming `what` on failure or timeout.

    A timed-out command is killed with its whole group (`sh -c 'find | xargs cat'` included), so
    nothing it started keeps a FUSE mount busy. Returns stdout when asked for (stdout=PIPE).
    """
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise error(f"{what}: timed out after {timeout:.0f} s") from None
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    if proc.returncode != 0:
        # The first line usually names the cause (tar: x: Cannot open: …); the last sums up.
        lines = [ln for ln in (err or "").strip().splitlines() if ln.strip()]
        if not lines:
            raise error(f"{what}: exit status {proc.returncode}")
        msg = lines[0] if len(lines) == 1 else f"{lines[0][:200]} … {lines[-1][:120]}"
        raise error(f"{what}: {msg}")
    return out or ""
