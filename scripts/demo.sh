#!/usr/bin/env bash
# `make demo`: import a busybox image built from Debian's busybox-static, then run containers
# on a cowfs (FUSE) mount of it. Everything lives in a temporary store that is removed at the end.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cowfs="$here/.venv/bin/cowfs"

if [ "$(id -u)" != 0 ]; then
	echo "demo: run as root (containers need namespaces, cgroups and FUSE allow_other)" >&2
	exit 1
fi

work=$(mktemp -d /tmp/cowfs-demo.XXXXXX)
export COWFS_ROOT="$work/store"
cleanup() {
	"$cowfs" rm -f demo >/dev/null 2>&1 || true
	rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { printf '$ %s\n' "$*"; "$@"; }

step "a root file system from Debian's busybox-static"
mkdir -p "$work/rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,root}
chmod 1777 "$work/rootfs/tmp"
cp /bin/busybox "$work/rootfs/bin/busybox"
for applet in $(/bin/busybox --list-full); do
	[ -e "$work/rootfs/$applet" ] || ln -s /bin/busybox "$work/rootfs/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' \
	>"$work/rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' >"$work/rootfs/etc/group"
show "$cowfs" image import-rootfs "$work/rootfs" busybox:demo

step "a throw-away container: its root is the cowfs mount, PID 1 is its init"
show "$cowfs" run --rm --hostname demo-box busybox:demo \
	sh -c 'echo "hello from $(hostname)"; mount | head -1; ps; ls /dev'

step "limits bite: 8 processes at most"
show "$cowfs" run --rm --pids-limit 8 busybox:demo \
	sh -c 'for i in 1 2 3 4 5 6 7 8 9 10; do sleep 5 & done' || echo "(exit $?: the fork bomb stopped)"

step "a background container, exec into it, logs, stop, start again on its kept upper layer"
show "$cowfs" run -d --name demo busybox:demo sh -c 'echo boot >> /boots; echo "boot #$(wc -l < /boots)"; exec sleep 1000'
show "$cowfs" ps
show "$cowfs" exec demo sh -c 'echo "inside: $(ps | wc -l) lines of ps, caps $(grep CapEff /proc/self/status)"'
show "$cowfs" stop -t 1 demo
show "$cowfs" start demo
show "$cowfs" logs demo
show "$cowfs" ps -a
show "$cowfs" rm -f demo

step "nothing left behind"
show sh -c "grep -c cowfs-demo /proc/self/mountinfo || true"
echo "demo done"
