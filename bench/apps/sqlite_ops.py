"""One SQLite workload, timed inside the process (bench/sqlite.py runs it natively and in enclaves).

    python sqlite_ops.py DB WORKLOAD COUNT

WORKLOAD: ``select`` (COUNT point selects by primary key from a 10,000-row table),
``commit-1`` (COUNT single-row inserts, each its own transaction), ``commit-100`` (COUNT
single-row inserts committed 100 at a time).  Prints operations per second (the last line).
The database is made before the clock starts; Python's sqlite3 defaults otherwise (rollback
journal, ``synchronous=FULL``).
"""

import sqlite3
import sys
import time

ROWS = 10_000


def main() -> None:
    path, workload, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    con = sqlite3.connect(path)
    con.execute("create table if not exists t (k integer primary key, v text)")
    with con:
        con.execute("delete from t")
        con.executemany("insert into t values (?, ?)", [(i, f"value {i:08d}") for i in range(ROWS)])
    start = time.perf_counter()
    if workload == "select":
        cur = con.cursor()
        for i in range(count):
            cur.execute("select v from t where k = ?", ((i * 7919) % ROWS,)).fetchone()
    elif workload.startswith("commit-"):
        per = int(workload.split("-")[1])
        for i in range(0, count, per):
            with con:
                for j in range(i, min(i + per, count)):
                    con.execute("insert into t (v) values (?)", (f"new {j}",))
    else:
        raise SystemExit(f"error: no workload {workload!r}")
    seconds = time.perf_counter() - start
    con.close()
    print(f"{count / seconds:.1f}")


if __name__ == "__main__":
    main()
