#!/bin/bash
# The cold copy-up of the bench's 256 MiB file, started 0.3 s or 6 s after the cache drop, through
# cowfs and fuse-overlayfs, ROUNDS times.
#   copyup_after_pause.sh DATA [ROUNDS]     DATA as for creates_by_cpu.sh
set -eu
D=$1 ROUNDS=${2:-3}
top=$(cd "$(dirname "$0")/../.." && pwd)
B=$(dirname "$D")/probe-copyup
for i in $(seq "$ROUNDS"); do
	for sys in cowfs fuse-overlayfs; do
		for pause in 0.3 6; do
			rm -rf "$B"; mkdir -p "$B/u" "$B/w" "$B/m"
			if [ $sys = cowfs ]; then
				"$top/.venv/bin/cowfs" --root "$D/store" mount bench:latest "$B/m" --upper "$B/u" --work "$B/w"
			else
				fuse-overlayfs -o "lowerdir=$(ls -d "$D"/layers/* | sort -rn | paste -sd:),upperdir=$B/u,workdir=$B/w" "$B/m" 2>/dev/null
			fi
			stat "$B/m/bench" >/dev/null
			sync; echo 3 >/proc/sys/vm/drop_caches; sleep $pause
			python3 -c "
import os, sys, time
t = time.perf_counter()
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND); os.write(fd, b'x'); os.close(fd)
print(sys.argv[2], '%.3f s' % (time.perf_counter() - t))" "$B/m/bench/copyup-big.bin" "$sys, ${pause} s after the drop:"
			if [ $sys = cowfs ]; then "$top/.venv/bin/cowfs" umount "$B/m"; else fusermount3 -u "$B/m"; fi
		done
	done
done
rm -rf "$B"
