#!/usr/bin/env python3
"""Runs every SQL statement Meterline sends to ClickHouse on the current engine.

Reads one JSON string per line (from `cargo run -p meterline-tests --bin
sql-statements`) and runs them in order in a fresh chDB session (chdb-core, an
in-process ClickHouse of the current release). Exits non-zero naming the
first statement the engine refuses. The same list runs on ClickHouse 18.16 in
the `sql_compat` test, so every statement is proven on both.
"""
import json
import sys
import tempfile

from chdb import session


def main() -> int:
    statements = [json.loads(line) for line in sys.stdin if line.strip()]
    if not statements:
        print("chdb-check: no statements on stdin", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as path:
        s = session.Session(path)
        version = s.query("SELECT version()", "CSV").bytes().decode().strip().strip('"')
        for n, sql in enumerate(statements, 1):
            try:
                s.query(sql, "JSONEachRow")
            except Exception as e:  # chDB raises its own error types
                print(f"chdb-check: statement {n} failed on ClickHouse {version}:\n{sql}\n{e}", file=sys.stderr)
                return 1
        # The sample rows must have landed as written.
        rows = s.query("SELECT sum(events) AS e, sum(markers) AS m FROM rollups_minute", "JSONEachRow").bytes().decode()
        got = json.loads(rows)
        if int(got["e"]) != 1 or int(got["m"]) != 2:
            print(f"chdb-check: unexpected rollup sums {got}", file=sys.stderr)
            return 1
        s.close()
    print(f"chdb-check: ClickHouse {version} (chDB) ran every statement")
    print(f"chdb-check: {len(statements)} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
