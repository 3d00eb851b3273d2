//! Prints every SQL statement Meterline's services send to ClickHouse, with sample
//! values, one JSON string per line: the input of `scripts/chdb-check.py`,
//! which runs them on the current ClickHouse engine (chDB). The `sql_compat`
//! test runs the same list on the stack's ClickHouse 18.16.

fn main() {
    for statement in meterline_clickhouse::compat_statements() {
        println!("{}", serde_json::Value::String(statement));
    }
}
