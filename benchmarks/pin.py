"""Which cowfs is measured: the last commit, copied aside, not the shared working tree.

Teammates edit cowfs/ in the same checkout while a long suite runs, and every sample starts a
fresh FUSE daemon from source; without pinning, one run could measure three versions, or a
half-saved file. So the suite exports `git HEAD`'s cowfs/ and runtime/ into the out dir and puts
it first on PYTHONPATH, which every daemon, `cowfs` command and mount(8) helper inherits. The
report names the commit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cowfs

PACKAGES = ("cowfs", "runtime")


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise OSError(proc.stderr.strip() or f"git {args[0]} failed")
    return proc.stdout


def pin(dest: Path) -> dict[str, object]:
    """Export HEAD's packages under dest and make subprocesses import them; describe what ran."""
    repo = Path(cowfs.__file__).resolve().parent.parent
    try:
        head = _git(repo, "rev-parse", "HEAD").strip()
        changed = _git(repo, "status", "--porcelain", "--", *PACKAGES).splitlines()
    except OSError as exc:
        return {"pinned": False, "reason": f"not a git checkout ({exc}): the working tree ran"}
    snap = dest / f"cowfs-{head[:12]}"
    if not snap.exists():
        tmp = dest / f".cowfs-{head[:12]}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        archive = subprocess.Popen(
            ["git", "-C", str(repo), "archive", "HEAD", *PACKAGES], stdout=subprocess.PIPE
        )
        untar = subprocess.run(["tar", "-x", "-C", str(tmp)], stdin=archive.stdout)
        assert archive.stdout is not None
        archive.stdout.close()
        if archive.wait() != 0 or untar.returncode != 0:
            raise OSError("git archive of HEAD failed")
        # Byte-compiled here, as `make setup` does for the checkout: where
        # PYTHONDONTWRITEBYTECODE is set, every cowfs command and daemon would otherwise
        # compile the package again (~90 ms of each container start).
        compiled = subprocess.run([sys.executable, "-m", "compileall", "-q", str(tmp)],
                                  stdout=subprocess.DEVNULL)  # fmt: skip
        if compiled.returncode != 0:
            raise OSError("byte-compiling the pinned copy failed")
        tmp.rename(snap)
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(snap) + (os.pathsep + old if old else "")
    return {
        "pinned": True,
        "commit": head,
        "code": str(snap),
        "uncommitted_changes_not_measured": [line[3:] for line in changed],
    }
