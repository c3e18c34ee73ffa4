"""One console workload, timed inside the process (bench/console.py runs it natively and in enclaves).

    python console_print.py WORKLOAD COUNT TIMEFILE

WORKLOAD: ``lines`` (COUNT ``print`` calls of a 60-byte log-like line, stdout buffered as
python buffers a pipe), ``lines-flush`` (the same, each flushed: one write per line, as
``logging`` to stderr does), ``bytes`` (COUNT writes of 64 KiB to ``sys.stdout.buffer``).
Writes to TIMEFILE (stdout is the measured stream) the ``time.monotonic()`` at which it
began writing: the benchmark takes the time its last byte came out of the pipe (a write
may return before its bytes are on the host: the console shield writes behind the app).
"""

import sys
import time


def main() -> None:
    workload, count, timefile = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    out = sys.stdout
    start = time.monotonic()
    if workload == "lines":
        for i in range(count):
            print(f"2026-01-01 12:00:00 INFO request {i:08d} served in 1.2 ms", file=out)
    elif workload == "lines-flush":
        for i in range(count):
            print(f"2026-01-01 12:00:00 INFO request {i:08d} served in 1.2 ms", file=out, flush=True)
    elif workload == "bytes":
        block = bytes(range(256)) * 256
        for _ in range(count):
            out.buffer.write(block)
    else:
        raise SystemExit(f"error: no workload {workload!r}")
    out.flush()
    with open(timefile, "w") as f:
        f.write(f"{start}\n")


if __name__ == "__main__":
    main()
