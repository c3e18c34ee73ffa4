"""One benchmark process: fork + exit + wait, N times, with a heap of HEAP_MB touched first.

    python fork_wait.py N HEAP_MB        -> prints {"per_s": ..., "ms": ...} on stdout

The child exits at once (``os._exit(0)``); the parent waits for it.  The heap is a bytearray
whose every page is written, so the fork really copies its page tables (as a worker of a
service with a loaded app does).
"""

import json
import os
import sys
import time

n, heap_mb = int(sys.argv[1]), int(sys.argv[2])
heap = bytearray(heap_mb << 20)
for i in range(0, len(heap), 4096):
    heap[i] = 1
for _ in range(3):  # warm-up: the first fork also maps what the runtime has not touched yet
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
start = time.perf_counter()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        sys.exit(f"child exited with status {status}")
elapsed = time.perf_counter() - start
print(json.dumps({"per_s": n / elapsed, "ms": elapsed / n * 1000}))
