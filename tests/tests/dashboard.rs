//! The admin dashboard in a real browser (headless Chromium over WebDriver):
//! served at `/` by the all-in-one binary and by the query API, it signs in
//! from `#key=`, shows the same top spender, user totals and open runaway
//! alerts as the public API, and sends a wrong key back to sign-in. Writes
//! screenshots under `target/screenshots/`.

use meterline_tests::browser::Browser;
use meterline_tests::stack::Process;
use meterline_tests::workload;
use meterline_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// An event for `user` `minutes_ago`, with exact cost and revenue.
fn spend(user: &str, n: usize, minutes_ago: i64, feature: &str, model: &str, cost: &str, revenue: &str) -> Value {
    json!({
        "idempotency_key": format!("{user}-{n}-{minutes_ago}"),
        "timestamp": (chrono::Utc::now() - chrono::Duration::minutes(minutes_ago)).to_rfc3339(),
        "user_id": user,
        "customer_id": format!("cust-{}", user.len() % 3),
        "feature": feature,
        "model": model,
        "input_tokens": 1200 + n,
        "output_tokens": 300,
        "cost_usd": cost,
        "revenue_usd": revenue,
    })
}

async fn post(url: &str, events: &[Value]) {
    let r = reqwest::Client::new().post(format!("{url}/v1/events")).bearer_auth("acme-ingest-key").json(events).send().await.expect("post");
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.expect("json");
    assert_eq!(body["accepted"], json!(events.len()), "{body}");
}

/// The range the page asked the API for, as a query string.
async fn page_range(b: &Browser) -> String {
    let from = b.attr("#range", "data-from").await.expect("the page names its range");
    let to = b.attr("#range", "data-to").await.expect("the page names its range");
    format!("from={from}&to={to}")
}

/// Signs in by fragment and checks the fragment left the address bar.
async fn sign_in(b: &Browser, url: &str) {
    b.goto(&format!("{url}/#key=acme-read-key")).await;
    b.wait_for("#overview-totals, #main .state.empty", WAIT).await;
    let here = b.client.current_url().await.expect("url");
    assert_eq!(here.fragment(), Some("/overview"), "the key left the address bar");
    assert_eq!(b.eval("return sessionStorage.getItem('meterline.readKey')").await, json!("acme-read-key"));
}

/// The top spender the page shows is `/v1/top-spenders`' first row, with its exact cost on hover.
async fn top_spender_matches(b: &Browser, url: &str) -> String {
    b.goto(&format!("{url}/#/top-spenders?range=30d&metric=cost")).await;
    b.wait_for("#top-spenders tbody tr", WAIT).await;
    let (status, api) = get_json(&format!("{url}/v1/top-spenders?{}", page_range(b).await), Some("acme-read-key")).await;
    assert_eq!(status, 200, "{api}");
    let first = &api["rows"][0];
    let user = first["user_id"].as_str().expect("a top spender").to_owned();
    let shown = b.wait_for_text("#top-spenders tbody tr:first-child .subject", WAIT, |t| !t.is_empty()).await;
    assert_eq!(shown, user, "the first row is the API's top spender");
    let cost = b.attr("#top-spenders tbody tr:first-child td:nth-child(4) span", "data-exact").await;
    assert_eq!(cost.as_deref(), first["cost_usd"].as_str(), "the exact cost is on the row");
    user
}

/// The user page's totals are the statement's, exactly.
async fn user_totals_match(b: &Browser, url: &str, user: &str) {
    b.goto(&format!("{url}/#/user/{user}")).await;
    b.wait_for("#user-totals", WAIT).await;
    let (status, statement) = get_json(&format!("{url}/v1/users/{user}/usage?{}", page_range(b).await), Some("acme-read-key")).await;
    assert_eq!(status, 200, "{statement}");
    for measure in ["cost_usd", "revenue_usd", "margin_usd"] {
        let shown = b.attr(&format!("#user-totals [data-measure={measure}] .value span"), "data-exact").await;
        assert_eq!(shown.as_deref(), statement["totals"][measure].as_str(), "{measure}");
    }
    let events = b.attr("#user-totals [data-measure=events] .value span", "data-exact").await;
    assert_eq!(events, Some(statement["totals"]["events"].to_string()));
    b.wait_for("#user-events tbody tr", WAIT).await;
}

/// The Limits view, signed in with the read key: the plan as `/v1/plans`
/// has it, and the "nearest their caps" table's first row as
/// `/v1/limits/nearest` ranks it, its exact share on hover.
async fn limits_match(b: &Browser, url: &str) -> Value {
    b.goto(&format!("{url}/#/limits")).await;
    b.wait_for("#plans tbody tr", WAIT).await;
    let (status, plans) = get_json(&format!("{url}/v1/plans"), Some("acme-read-key")).await;
    assert_eq!(status, 200, "{plans}");
    let shown = b.eval("return [...document.querySelectorAll('#plans tbody tr')].map(r => [r.cells[0].innerText, r.cells[1].innerText, r.cells[4].querySelector('span').dataset.exact])").await;
    let api: Vec<Value> = plans["plans"]
        .as_array()
        .expect("plans")
        .iter()
        .flat_map(|p| p["limits"].as_array().into_iter().flatten().map(move |l| json!([p["plan_id"], l["name"], l["amount"]])))
        .collect();
    assert_eq!(shown, json!(api), "the plans' limits, as the API has them");
    b.wait_for("#nearest tbody tr", WAIT).await;
    let (status, nearest) = get_json(&format!("{url}/v1/limits/nearest?limit=20"), Some("acme-read-key")).await;
    assert_eq!(status, 200, "{nearest}");
    let first = &nearest["subjects"][0];
    let row = b.eval("const r = document.querySelector('#nearest tbody tr'); return [r.querySelector('.subject').innerText, r.cells[2].innerText, r.cells[5].querySelector('span').dataset.exact, r.querySelector('a.subject') ? r.querySelector('a.subject').getAttribute('href') : null]").await;
    let user = first["subject_id"].as_str().expect("a subject");
    assert_eq!(row[0], json!(user), "the first row is the API's nearest: {nearest}");
    assert_eq!(row[1], json!(format!("{} ({})", first["name"].as_str().unwrap_or_default(), first["plan"].as_str().unwrap_or_default())));
    assert_eq!(row[2], first["ratio"], "the exact share is on the row");
    assert!(row[3].as_str().is_some_and(|h| h.starts_with(&format!("#/user/{user}"))), "a user links to the user's page: {row}");
    first.clone()
}

/// A wrong key, by fragment or left in the tab, lands on sign-in saying so.
async fn wrong_key_signs_out(b: &Browser, url: &str) {
    b.goto(&format!("{url}/#key=not-a-real-key")).await;
    let said = b.wait_for_text("#signin-error", WAIT, |t| !t.is_empty()).await;
    assert!(said.contains("not accepted"), "{said}");
    // A key that stops working mid-session (revoked, rotated) does the same.
    b.eval("sessionStorage.setItem('meterline.readKey', 'revoked-key')").await;
    b.goto(&format!("{url}/#/alerts")).await;
    let said = b.wait_for_text("#signin-error", WAIT, |t| !t.is_empty()).await;
    assert!(said.contains("refused"), "{said}");
    assert_eq!(b.eval("return sessionStorage.getItem('meterline.readKey')").await, Value::Null);
}

/// A customer's page, on its own port (its origin is what the tenant
/// allows): its origin, and the HTML it serves at `/`.
async fn customer_page() -> (String, std::sync::Arc<std::sync::Mutex<String>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let page_origin = format!("http://{}", listener.local_addr().expect("addr"));
    let html: std::sync::Arc<std::sync::Mutex<String>> = std::sync::Arc::default();
    let served = html.clone();
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let served = served.clone();
            async move { axum::response::Html(served.lock().expect("lock").clone()) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    (page_origin, html)
}

/// `token` with one character changed in the middle: the signature no longer matches.
fn tamper(token: &str) -> String {
    let mut tampered: Vec<char> = token.chars().collect();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == 'A' { 'B' } else { 'A' };
    tampered.into_iter().collect()
}

/// The customer's page: `url`'s widget with `token`, and again with `tampered`.
fn widget_page(url: &str, token: &str, tampered: &str) -> String {
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Acme app</title></head>\
         <body style=\"font-family: sans-serif; padding: 24px; max-width: 520px\"><h1>Your usage</h1>\
         <div id=\"usage\"></div><h2>Tampered token</h2><div id=\"tampered\"></div>\
         <script src=\"{url}/widget.js\" data-token=\"{token}\" data-target=\"usage\"></script>\
         <script src=\"{url}/widget.js\" data-token=\"{tampered}\" data-target=\"tampered\"></script></body></html>"
    )
}

#[tokio::test]
async fn all_in_one_dashboard() {
    let dir = temp_dir("dashboard");
    let server = Embedded::start(&dir, "[storage]\nalert_eval_ms = 100\n[alerts]\ninterval_secs = 1\n").await;
    let url = server.url.clone();
    // A plan before the traffic (events count toward limits as they are
    // written): the Limits view lists it and ranks who is nearest its caps.
    let plan = json!({"limits": [
        {"name": "monthly-spend", "measure": "cost_usd", "period": "month", "amount": "25"},
        {"name": "monthly-calls", "measure": "events", "period": "month", "amount": "100", "hard": false}]});
    let r = reqwest::Client::new().put(format!("{url}/v1/plans/default")).bearer_auth("acme-admin-key").json(&plan).send().await.expect("plan");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());

    // A week of ordinary traffic across features and models, a user who
    // costs more than they pay, and one runaway: $20 in the last minutes
    // against the default $10 an hour absolute rule.
    let mut events = Vec::new();
    let features = ["chat", "search", "summarize"];
    let models = ["gpt-4o", "gpt-4.1-mini", "claude-sonnet"];
    for (u, user) in ["alice", "bob", "carol", "dave", "erin", "frank"].iter().enumerate() {
        for n in 0..12 {
            let minutes_ago = 30 + (n as i64) * 11 * 60 + (u as i64) * 7;
            let cost = format!("0.{:03}", 20 + u * 37 + n * 3);
            events.push(spend(user, n, minutes_ago, features[n % 3], models[(n + u) % 3], &cost, "0.25"));
        }
    }
    for n in 0..8 {
        events.push(spend("loss-leader", n, 90 + n as i64 * 240, "agent", "gpt-4o", "0.90", "0.10"));
    }
    for n in 0..4 {
        events.push(spend("runaway", n, 2 + n as i64, "agent", "gpt-4o", "5.00", "0.50"));
    }
    post(&url, &events).await;
    let alert = poll_until(Duration::from_secs(30), "the runaway's absolute alert to open", || async {
        let (_, body) = get_json(&format!("{url}/v1/alerts?state=open&user_id=runaway"), Some("acme-read-key")).await;
        body["alerts"].as_array().and_then(|a| a.iter().find(|x| x["rule"] == "absolute").cloned())
    })
    .await;

    let b = Browser::start().await;
    // Served at `/`, from the binary.
    b.goto(&format!("{url}/")).await;
    b.wait_for("#signin", WAIT).await;

    sign_in(&b, &url).await;
    b.wait_for("#overview-chart .uplot", WAIT).await;
    b.screenshot("overview").await;

    let top = top_spender_matches(&b, &url).await;
    assert_eq!(top, "runaway");
    b.screenshot("top-spenders").await;

    // The open alert stands out, with its rule, observed and threshold.
    b.goto(&format!("{url}/#/alerts")).await;
    b.wait_for("#alerts-open tbody tr.open", WAIT).await;
    let rows = b.eval("return [...document.querySelectorAll('#alerts-open tbody tr.open')].map(r => [r.cells[0].innerText, r.cells[2].innerText, r.cells[3].querySelector('span').dataset.exact])").await;
    let observed = rows.as_array().expect("rows").iter().find(|r| r[0] == "runaway" && r[1] == "absolute").map(|r| r[2].clone());
    assert_eq!(observed.as_ref(), Some(&alert["observed_usd"]), "the runaway's open absolute alert, as the API has it: {rows}");
    b.screenshot("alerts").await;

    // Money-losing users: the loss leader is there.
    b.goto(&format!("{url}/#/losing")).await;
    let losing = b.wait_for_text("#losing tbody", WAIT, |t| t.contains("loss-leader")).await;
    assert!(losing.contains("runaway"), "runaway also pays less than it costs: {losing}");
    b.screenshot("losing").await;

    user_totals_match(&b, &url, "runaway").await;
    b.wait_for("#user-alerts tbody tr.open", WAIT).await;
    b.wait_for("#user-chart .uplot", WAIT).await;
    b.screenshot("user").await;

    let first = limits_match(&b, &url).await;
    assert_eq!((first["subject_id"].as_str(), first["name"].as_str(), first["ratio"].as_str()), (Some("runaway"), Some("monthly-spend"), Some("0.8")), "$20 of $25 this month: {first}");
    // The plans and the ranking, below the key's reach table.
    b.eval("document.querySelector('#plans').closest('.panel').previousElementSibling.scrollIntoView()").await;
    b.screenshot("limits").await;

    // A phone's width: the same overview, one column.
    b.resize(390, 844).await;
    b.goto(&format!("{url}/#/overview?range=7d")).await;
    b.wait_for("#overview-chart .uplot", WAIT).await;
    b.screenshot("overview-phone").await;
    b.resize(1280, 800).await;

    wrong_key_signs_out(&b, &url).await;
    b.screenshot("signin-error").await;
    b.stop().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn query_api_dashboard() {
    let Pipeline { brokers, ch, topic, database, ingest } = Pipeline::start("dashboard").await;
    let agg_config = aggregator_config(free_port(), &brokers, &topic, &ch.url, &database, "");
    let _agg = Process::start("meterline-aggregator", &agg_config);
    let now = chrono::Utc::now();
    let work = workload::generate(13, 600, 40, 200, now);
    for batch in &work.batches {
        let r = reqwest::Client::new().post(format!("{}/v1/events", ingest.url)).bearer_auth("acme-ingest-key").json(batch).send().await.expect("post");
        assert_eq!(r.status(), 202);
    }
    workload::wait_rolled_up(&ch, &database, &[("acme", work.unique_events)]).await;
    let api = QueryApi::start(&ch.url, &database).await;

    let b = Browser::start().await;
    sign_in(&b, &api.url).await;
    let top = top_spender_matches(&b, &api.url).await;
    b.screenshot("query-api-top-spenders").await;
    user_totals_match(&b, &api.url, &top).await;
    // The query API serves no limits: the user page says so rather than failing.
    let limits = b.wait_for_text("#main", WAIT, |t| t.contains("does not serve limits")).await;
    assert!(!limits.is_empty());
    wrong_key_signs_out(&b, &api.url).await;
    b.stop().await;
}

/// The widget and the Limits view against the query API over the test
/// stack, its limits in a private Redis: the plan written to the store
/// directly (the query API serves limits read-only), the counters filled by
/// the aggregator from the pipeline's events.
#[tokio::test]
async fn query_api_widget_and_limits() {
    use meterline_limits::LimitStore;
    let (page_origin, html) = customer_page().await;
    let redis = meterline_tests::stack::Redis::private().await;
    let store = meterline_redis::RedisLimits::connect(&redis.url()).await.expect("redis");
    let plan = json!({"limits": [
        {"name": "monthly-spend", "measure": "cost_usd", "period": "cycle", "amount": "5"},
        {"name": "daily-calls", "measure": "events", "period": "day", "amount": "100", "hard": false}]});
    let plan = meterline_limits::parse_plan(&plan.to_string()).expect("plan").view(meterline_limits::DEFAULT_PLAN);
    store.put_plan("acme", &plan).await.expect("put plan");
    let sub = meterline_limits::SubscriptionView { plan: meterline_limits::DEFAULT_PLAN.to_owned(), cycle_start: None };
    store.put_subscription("acme", &meterline_limits::Subject::user("widget-user"), &sub).await.expect("put subscription");

    let Pipeline { brokers, ch, topic, database, ingest } = Pipeline::start("dashboard_limits").await;
    let limits = format!("[limits]\nredis_url = \"{}\"\n", redis.url());
    let _agg = Process::start("meterline-aggregator", &aggregator_config(free_port(), &brokers, &topic, &ch.url, &database, &limits));
    post(
        &ingest.url,
        &[
            spend("widget-user", 1, 3, "chat", "gpt-4o", "1.25", "2"),
            spend("someone-else", 1, 3, "chat", "gpt-4o", "7", "7"),
            spend("third-user", 1, 3, "chat", "gpt-4o", "2.50", "3"),
        ],
    )
    .await;

    // The query API, in-process, over the same ClickHouse and Redis; the
    // tenant allows the customer's page.
    let tenants = tenants_toml_with(&[("acme", &format!("portal_secret = \"widget-secret-0123456789abcdef\"\nportal_origins = [\"{page_origin}\"]"))]);
    let text = format!("[clickhouse]\nurl = \"{}\"\ndatabase = \"{database}\"\n{limits}{tenants}", ch.url);
    let config = meterline_query_api::Config::load(&text, []).expect("query config");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        meterline_query_api::serve(config, listener, async {
            let _ = stopped.await;
        })
        .await
        .expect("query api serve")
    });

    let r = reqwest::Client::new().post(format!("{url}/v1/portal/tokens")).bearer_auth("acme-admin-key").json(&json!({"user_id": "widget-user"})).send().await.expect("mint");
    assert_eq!(r.status(), 200);
    let token = r.json::<Value>().await.expect("json")["token"].as_str().expect("token").to_owned();
    let tampered = tamper(&token);
    // Counted by the aggregator into Redis: the query API answers the token from there.
    let portal = poll_until(Duration::from_secs(30), "the widget user's usage on the query API", || async {
        let (status, body) = get_json(&format!("{url}/v1/portal/usage"), Some(&token)).await;
        (status == 200 && body["limits"][0]["used"] == json!("1.25")).then_some(body)
    })
    .await;
    assert_eq!(portal["limits"][0]["remaining"], json!("3.75"), "{portal}");
    // The three users land on different partitions, each applied to Redis
    // on its own flush: the ranking is only settled once all three count.
    poll_until(Duration::from_secs(30), "every user's spend counted in Redis", || async {
        let (status, body) = get_json(&format!("{url}/v1/limits/nearest?limit=20"), Some("acme-read-key")).await;
        let spends = body["subjects"].as_array().map(|s| s.iter().filter(|s| s["name"] == json!("monthly-spend") && s["used"] != json!("0")).count());
        (status == 200 && spends == Some(3)).then_some(())
    })
    .await;
    let (status, _) = get_json(&format!("{url}/v1/portal/usage"), Some(&tampered)).await;
    assert_eq!(status, 401, "a tampered token is refused");
    *html.lock().expect("lock") = widget_page(&url, &token, &tampered);

    let b = Browser::start().await;
    b.goto(&format!("{page_origin}/")).await;
    b.wait_for("#usage[data-meterline-state=ok]", WAIT).await;
    let shown = b.text("#usage").await.unwrap_or_default();
    assert!(shown.contains("$1.25") && shown.contains("$3.75"), "the token's numbers: {shown} (API: {portal})");
    assert!(!shown.contains("$7") && !shown.contains("$2.50"), "nobody else's: {shown}");
    b.wait_for("#tampered[data-meterline-state=unavailable]", WAIT).await;
    let refused = b.text("#tampered").await.unwrap_or_default();
    assert!(!refused.contains('$'), "no numbers for a tampered token: {refused}");
    b.screenshot("query-api-widget").await;

    // The Limits view on the query API: the plan from Redis, and who is
    // nearest their caps as `/v1/limits/nearest` ranks them ($7 of $5).
    sign_in(&b, &url).await;
    let first = limits_match(&b, &url).await;
    assert_eq!((first["subject_id"].as_str(), first["name"].as_str(), first["ratio"].as_str()), (Some("someone-else"), Some("monthly-spend"), Some("1.4")), "{first}");
    b.eval("document.querySelector('#plans').closest('.panel').previousElementSibling.scrollIntoView()").await;
    b.screenshot("query-api-limits").await;
    b.stop().await;
    let _ = stop.send(());
}

/// The portal's `/widget.js` on a customer's page (another origin): it shows
/// its token's numbers, and nothing for a tampered token.
#[tokio::test]
async fn usage_widget_on_another_origin() {
    let (page_origin, html) = customer_page().await;

    let dir = temp_dir("dashboard-widget");
    let tenants = tenants_toml_with(&[("acme", &format!("portal_secret = \"widget-secret-0123456789abcdef\"\nportal_origins = [\"{page_origin}\"]"))]);
    let server = Embedded::start_with_tenants(&dir, "", &tenants).await;
    let url = server.url.clone();
    let client = reqwest::Client::new();
    let plan = json!({"limits": [{"name": "monthly-spend", "measure": "cost_usd", "period": "cycle", "amount": "5"}]});
    let r = client.put(format!("{url}/v1/plans/default")).bearer_auth("acme-admin-key").json(&plan).send().await.expect("plan");
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    post(&url, &[spend("widget-user", 1, 3, "chat", "gpt-4o", "1.25", "2"), spend("someone-else", 1, 3, "chat", "gpt-4o", "7", "7")]).await;
    let r = client.post(format!("{url}/v1/portal/tokens")).bearer_auth("acme-admin-key").json(&json!({"user_id": "widget-user"})).send().await.expect("mint");
    assert_eq!(r.status(), 200);
    let token = r.json::<Value>().await.expect("json")["token"].as_str().expect("token").to_owned();
    // One character changed in the middle: the signature no longer matches.
    let tampered = tamper(&token);
    // The widget's numbers come from the same answer the API gives the token.
    let (_, portal) = poll_until(Duration::from_secs(20), "the widget user's usage", || async {
        let (status, body) = get_json(&format!("{url}/v1/portal/usage"), Some(&token)).await;
        (status == 200 && body["limits"][0]["used"] == json!("1.25")).then_some((status, body))
    })
    .await;
    *html.lock().expect("lock") = widget_page(&url, &token, &tampered);

    let b = Browser::start().await;
    b.goto(&format!("{page_origin}/")).await;
    b.wait_for("#usage[data-meterline-state=ok]", WAIT).await;
    let shown = b.text("#usage").await.unwrap_or_default();
    // Used and remaining, as the API answers the token ($5 limit, $1.25 used).
    assert_eq!(portal["limits"][0]["remaining"], json!("3.75"));
    assert!(shown.contains("$1.25") && shown.contains("$3.75"), "the token's numbers: {shown} (API: {portal})");
    assert!(!shown.contains("$7"), "nobody else's: {shown}");
    b.wait_for("#tampered[data-meterline-state=unavailable]", WAIT).await;
    let refused = b.text("#tampered").await.unwrap_or_default();
    assert!(!refused.contains('$'), "no numbers for a tampered token: {refused}");
    b.screenshot("widget").await;
    b.stop().await;
    server.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
