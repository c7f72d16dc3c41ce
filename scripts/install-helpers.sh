#!/usr/bin/env bash
# System-side helpers that the Debian packages do not provide.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
# mount(8) runs /sbin/mount.fuse.cowfs for `mount -t fuse.cowfs`; it hands over to the venv's CLI.
if [ -f "$here/scripts/mount.fuse.cowfs" ]; then
	sed "s|@VENV@|$here/.venv|" "$here/scripts/mount.fuse.cowfs" > /sbin/mount.fuse.cowfs.tmp
	chmod 755 /sbin/mount.fuse.cowfs.tmp
	mv /sbin/mount.fuse.cowfs.tmp /sbin/mount.fuse.cowfs
fi
