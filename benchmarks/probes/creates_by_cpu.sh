#!/bin/bash
# 10,000 creates through a FUSE daemon and its client pinned to CPUs of your choice.
#   creates_by_cpu.sh DATA cowfs|fuse-overlayfs DAEMON_CPUS CLIENT_CPUS
# DATA: the bench's data dir for the full profile (e.g. /var/tmp/cowfs-bench/data/full). The
# upper and work dirs go beside it, so on its filesystem. Example, same CPU then different ones:
#   for c in "0 0" "0 1" "0,1 0,1"; do creates_by_cpu.sh $D cowfs $c; done
set -eu
D=$1 SYS=$2 DCPU=$3 CCPU=$4
here=$(cd "$(dirname "$0")" && pwd) top=$(cd "$here/../.." && pwd)
B=$(dirname "$D")/probe-creates
rm -rf "$B"; mkdir -p "$B/u" "$B/w" "$B/m"
if [ "$SYS" = cowfs ]; then
	taskset -c "$DCPU" "$top/.venv/bin/cowfs" --root "$D/store" mount bench:latest "$B/m" --upper "$B/u" --work "$B/w"
else
	lower=$(ls -d "$D"/layers/* | sort -rn | paste -sd:)
	taskset -c "$DCPU" fuse-overlayfs -o "lowerdir=$lower,upperdir=$B/u,workdir=$B/w" "$B/m" 2>/dev/null
fi
trap 'if [ "$SYS" = cowfs ]; then "$top/.venv/bin/cowfs" umount "$B/m"; else fusermount3 -u "$B/m"; fi && rm -rf "$B"' EXIT
mkdir "$B/m/bench-scratch"
sync
echo "$SYS daemon on $DCPU, client on $CCPU: $(taskset -c "$CCPU" python3 "$here/create_loop.py" "$B/m/bench-scratch/x")"
