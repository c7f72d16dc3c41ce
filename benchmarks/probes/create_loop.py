"""The bench's create loop alone: 10,000 files of 1 KiB in 100 new dirs under DIR (left there).

    python3 create_loop.py DIR     prints the wall time and this process's own CPU time
"""

import os
import sys
import time

base = sys.argv[1]
os.makedirs(base, exist_ok=True)
data = b"s" * 1024
t0, c0 = time.perf_counter(), os.times()
for i in range(10_000):
    d = f"{base}/d{i // 100}"
    if i % 100 == 0:
        os.mkdir(d)
    fd = os.open(f"{d}/f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, data)
    os.close(fd)
t1, c1 = time.perf_counter(), os.times()
print(f"create {t1 - t0:.3f}s sys {c1.system - c0.system:.2f} user {c1.user - c0.user:.2f}")
