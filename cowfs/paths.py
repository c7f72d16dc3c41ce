"""Where things live on the host."""

from __future__ import annotations

import os


def default_root() -> str:
    """The store root: $COWFS_ROOT, else /var/lib/cowfs for root, else the XDG data dir."""
    env = os.environ.get("COWFS_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/cowfs"
    # os.path, not pathlib: this is on the start path (docs/ARCHITECTURE.md)
    home = os.path.expanduser("~")
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(home, ".local", "share")
    return os.path.join(base, "cowfs")
