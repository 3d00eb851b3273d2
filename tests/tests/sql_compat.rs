//! Every statement the aggregator and the query API send runs on the stack's ClickHouse 18.16
//! (`scripts/chdb-check.py` runs the same list on the current engine).

use meterline_tests::stack::ClickHouse;
use meterline_tests::{free_port, stack_var};

#[tokio::test]
async fn every_statement_runs_on_clickhouse_18_16() {
    let ch = ClickHouse::shared();
    let database = ch.database(&format!("compat_{}", free_port())).await;
    let client = reqwest::Client::new();
    let url = format!("{}/?database={database}", stack_var("METERLINE_TEST_CLICKHOUSE_URL"));
    let statements: Vec<String> = meterline_clickhouse::compat_statements();
    assert!(statements.len() > 10);
    for sql in &statements {
        let response = client.post(&url).body(sql.clone()).send().await.expect("request");
        let status = response.status();
        let body = response.text().await.expect("body");
        assert!(status.is_success(), "ClickHouse 18.16 refused:\n{sql}\n{body}");
    }
    let sums = ch.query(&format!("SELECT sum(events), sum(markers) FROM {database}.rollups_minute")).await;
    assert_eq!(sums.trim(), "1\t2", "the sample event rolled up once, with a marker per range");
    let version = ch.query("SELECT version()").await;
    assert!(version.starts_with("18.16"), "the integration stack runs 18.16, got {version}");
}
