"""Where things live on the host."""

from __future__ import annotations

import os
from pathlib import Path


def default_root() -> str:
    """The store root: $COWFS_ROOT, else /var/lib/cowfs for root, else the XDG data dir."""
    env = os.environ.get("COWFS_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/cowfs"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return str(Path(base) / "cowfs")
