"""Queries per second through psycopg 3 (libpq), for bench/pg.py: natively and in the enclave.

    python pg_queries.py CONNINFO setup            # the 10,000-row table (once, natively)
    python pg_queries.py CONNINFO select1|point N  # N queries after a warm-up; prints one JSON line

``point`` selects one row by primary key (a random key per query, the same sequence every
run); psycopg prepares the statement after its fifth execution, as an app's would be.
"""

from __future__ import annotations

import json
import random
import sys
import time

import psycopg

ROWS = 10_000
WARMUP = 200


def main() -> int:
    conninfo, what = sys.argv[1], sys.argv[2]
    with psycopg.connect(conninfo, autocommit=True) as c:
        if what == "setup":
            c.execute("drop table if exists bench")
            c.execute("create table bench (k integer primary key, v text not null)")
            with c.cursor() as cur, cur.copy("copy bench (k, v) from stdin") as copy:
                for k in range(ROWS):
                    copy.write_row((k, f"value-{k:05d}"))
            c.execute("analyze bench")
            return 0
        n = int(sys.argv[3])
        rng = random.Random(7)
        keys = [rng.randrange(ROWS) for _ in range(n + WARMUP)]

        def run(ks: list[int]) -> None:
            if what == "select1":
                for _ in ks:
                    c.execute("select 1").fetchone()
            else:
                for k in ks:
                    row = c.execute("select v from bench where k = %s", (k,)).fetchone()
                    assert row is not None and row[0] == f"value-{k:05d}"

        run(keys[:WARMUP])
        t = time.perf_counter()
        run(keys[WARMUP:])
        took = time.perf_counter() - t
    print(json.dumps({"queries": n, "seconds": took, "qps": n / took}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
