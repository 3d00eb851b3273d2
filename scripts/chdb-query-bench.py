#!/usr/bin/env python3
"""Times the query API's statements on the current ClickHouse engine (chDB).

Reads the JSON that `query-bench --sql USERS ROWS_PER_USER_DAY` prints: the
schema (the aggregator's migrations), the same server-side load as
query-bench, and each endpoint's statements. Runs them in a fresh chDB
session, then times each endpoint (its statements in sequence, as the API
sends them) RUNS times. Prints a table and one BENCH_JSON line.
"""
import json
import sys
import tempfile
import time

from chdb import session


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    doc = json.load(sys.stdin)
    with tempfile.TemporaryDirectory() as path:
        s = session.Session(path)
        version = s.query("SELECT version()", "CSV").bytes().decode().strip().strip('"')
        started = time.time()
        for sql in doc["setup"]:
            s.query(sql)
        s.query("OPTIMIZE TABLE rollups_minute FINAL")
        s.query("OPTIMIZE TABLE rollups_user_span FINAL")
        s.query("OPTIMIZE TABLE rollups_user_daily FINAL")
        loaded = time.time() - started
        daily = s.query("SELECT count() FROM rollups_user_span WHERE span_days = 1", "CSV").bytes().decode().strip()
        print(f"chdb-query-bench: {doc['users']} users, 30 days, {daily} daily per-user rows (loaded in {loaded:.1f} s), ClickHouse {version} (chDB)")
        print("| query | p50 ms | p99 ms |")
        print("|---|---:|---:|")
        results = []
        for q in doc["queries"]:
            for sql in q["sql"]:
                s.query(sql, "JSONEachRow")  # warm-up
            times = []
            for _ in range(runs):
                t = time.time()
                for sql in q["sql"]:
                    s.query(sql, "JSONEachRow").bytes()
                times.append((time.time() - t) * 1000)
            times.sort()
            p50, p99 = times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.99))]
            print(f"| {q['query']} | {p50:.1f} | {p99:.1f} |")
            results.append({"query": q["query"], "p50_ms": p50, "p99_ms": p99})
        s.close()
    print("BENCH_JSON " + json.dumps({"bench": "query_chdb", "engine": version, "users": doc["users"], "daily_rows": int(daily), "runs": runs, "queries": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
