#!/bin/bash
# The bench's cold sequential read of its 512 MiB file (1 MiB reads) through a fresh mount of
# cowfs, fuse-overlayfs or kernel overlayfs, PAUSE s after the cache drop; for cowfs, also the CPU
# time each of the daemon's threads spent on it (ticks of 10 ms, the serving thread first).
#   seqread_cold.sh DATA cowfs|fuse-overlayfs|overlayfs [PAUSE]   DATA as for creates_by_cpu.sh
set -eu
D=$1 SYS=$2 PAUSE=${3:-0.3}
top=$(cd "$(dirname "$0")/../.." && pwd)
B=$(dirname "$D")/probe-seqread
lower=$(ls -d "$D"/layers/* | sort -rn | paste -sd:)
rm -rf "$B"; mkdir -p "$B/u" "$B/w" "$B/m"
case $SYS in
cowfs) "$top/.venv/bin/cowfs" --root "$D/store" mount bench:latest "$B/m" --upper "$B/u" --work "$B/w";;
fuse-overlayfs) fuse-overlayfs -o "lowerdir=$lower,upperdir=$B/u,workdir=$B/w" "$B/m" 2>/dev/null;;
overlayfs) mount -t overlay overlay -o "lowerdir=$lower,upperdir=$B/u,workdir=$B/w" "$B/m";;
esac
ticks() { for t in /proc/"$1"/task/*; do awk '{printf "%d ", $14 + $15}' "$t/stat"; done; }
pid=""
[ "$SYS" = cowfs ] && pid=$(pgrep -n -f "cowfs.*$B/m")
stat "$B/m/bench" >/dev/null
sync; echo 3 >/proc/sys/vm/drop_caches; sleep "$PAUSE"
before=$([ -n "$pid" ] && ticks "$pid" || true)
python3 -c "
import os, sys, time
t = time.perf_counter(); fd = os.open(sys.argv[1], os.O_RDONLY)
while os.read(fd, 1 << 20):
    pass
os.close(fd)
print(sys.argv[2], '%.3f s' % (time.perf_counter() - t))" "$B/m/bench/seq.bin" "$SYS"
[ -n "$pid" ] && echo "  daemon threads' CPU ticks before: $before after: $(ticks "$pid")"
case $SYS in cowfs) "$top/.venv/bin/cowfs" umount "$B/m";; fuse-overlayfs) fusermount3 -u "$B/m";; overlayfs) umount "$B/m";; esac
rm -rf "$B"
