//! The web UI and what it stands on: the served files, the dashboards API, the live event
//! stream, and the end-to-end test in headless Chromium (`tests/ui/e2e.mjs`).
//!
//! The README's test command installs Debian's `chromium` and `playwright-core` from npm and
//! names them in `TALLY_CHROMIUM` and `TALLY_PLAYWRIGHT`, with `TALLY_REQUIRE_ALL_TESTS=1` so a
//! missing browser fails the run; a plain `cargo test` without them skips the browser test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};
use tally_core::clock::{Clock, SystemClock};

use crate::support::{TestServer, assert_error, call, status_json};

/// Timestamps inside `this_7_days` whatever the hour: the last two days.
fn hours_ago(hours: i64) -> String {
    let ms = SystemClock.now_ms() - hours * 3_600_000;
    tally_core::time::format_timestamp_ms(ms)
}

async fn put(server: &TestServer, rest: &str, key: &str, body: &Value) -> reqwest::Response {
    call(
        server,
        Method::PUT,
        &server.project_url(rest),
        Some(key),
        Some(body),
    )
    .await
}

async fn get(server: &TestServer, rest: &str, key: &str) -> reqwest::Response {
    call(server, Method::GET, &server.project_url(rest), Some(key), None).await
}

/// Creates an access key; returns the key.
async fn access_key(server: &TestServer, definition: Value) -> String {
    let master = server.project.master_key.as_str();
    let response = call(
        server,
        Method::POST,
        &server.project_url("/keys"),
        Some(master),
        Some(&definition),
    )
    .await;
    let (status, body) = status_json(response).await;
    assert_eq!(status, 201, "{body}");
    body["key"].as_str().unwrap().to_owned()
}

/// Five purchases of two customers (acme: 10 + 20 + 30, globex: 100 + 200) and one event in a
/// collection whose name is markup.
async fn seed(server: &TestServer) {
    let purchases = [
        ("acme", 10, 1),
        ("acme", 20, 5),
        ("acme", 30, 30),
        ("globex", 100, 2),
        ("globex", 200, 26),
    ];
    for (customer, amount, hours) in purchases {
        let event =
            json!({"customer": {"id": customer}, "amount": amount, "keen": {"timestamp": hours_ago(hours)}});
        assert_eq!(server.post("/events/purchases", &event).await.status(), 201);
    }
    let odd = "<b>bold</b><img src=x onerror=window.__xss=3>";
    let encoded: String = form_urlencoded::byte_serialize(odd.as_bytes()).collect();
    let response = server
        .post(
            &format!("/events/{}", encoded.replace('+', "%20")),
            &json!({"a": 1}),
        )
        .await;
    assert_eq!(response.status(), 201);
    server.wait_enriched(6).await;
}

#[tokio::test]
async fn the_ui_is_served_from_the_binary_with_a_strict_policy() {
    let server = TestServer::start().await;
    let page = server.http.get(format!("{}/", server.base)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let csp = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert!(page.text().await.unwrap().contains("/ui/app.js"));
    for (file, kind) in [
        ("app.js", "text/javascript"),
        ("charts.js", "text/javascript"),
        ("app.css", "text/css"),
    ] {
        let asset = server
            .http
            .get(format!("{}/ui/{file}", server.base))
            .send()
            .await
            .unwrap();
        assert_eq!(asset.status(), 200, "{file}");
        assert!(
            asset.headers()["content-type"]
                .to_str()
                .unwrap()
                .starts_with(kind),
            "{file}"
        );
        assert!(
            !asset.text().await.unwrap().contains("innerHTML"),
            "{file} must not write HTML"
        );
    }
    let missing = server
        .http
        .get(format!("{}/ui/secret.txt", server.base))
        .send()
        .await
        .unwrap();
    assert_error(missing, 404, "ResourceNotFoundError").await;
}

#[tokio::test]
async fn dashboards_are_stored_validated_and_scoped_to_the_viewer() {
    let server = TestServer::start().await;
    let master = server.project.master_key.clone();
    for name in ["signups", "revenue"] {
        let saved = json!({"query": {"analysis_type": "count", "event_collection": name, "timeframe": "this_7_days"}, "refresh_rate": 0});
        assert!(
            put(&server, &format!("/queries/saved/{name}"), &master, &saved)
                .await
                .status()
                .is_success()
        );
    }
    let board = json!({"title": "Overview", "tiles": [
        {"query_name": "signups", "x": 0, "y": 0, "w": 6, "h": 4},
        {"query_name": "revenue", "x": 6, "y": 0, "w": 6, "h": 4, "chart": "bar"}
    ]});

    // Refusals, in Keen's error shape.
    let missing = json!({"tiles": [{"query_name": "nope", "x": 0, "y": 0, "w": 1, "h": 1}]});
    assert_error(
        put(&server, "/dashboards/overview", &master, &missing).await,
        400,
        "InvalidParameterError",
    )
    .await;
    let off_grid = json!({"tiles": [{"query_name": "signups", "x": 10, "y": 0, "w": 6, "h": 1}]});
    assert_error(
        put(&server, "/dashboards/overview", &master, &off_grid).await,
        400,
        "InvalidParameterError",
    )
    .await;
    assert_error(
        put(&server, "/dashboards/bad%20name", &master, &board).await,
        400,
        "InvalidParameterError",
    )
    .await;
    assert_error(
        put(&server, "/dashboards/overview", &server.project.read_key, &board).await,
        401,
        "AdminOnlyEndpointError",
    )
    .await;

    let (status, created) = status_json(put(&server, "/dashboards/overview", &master, &board).await).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["tiles"][1]["chart"], "bar");
    let (status, again) = status_json(put(&server, "/dashboards/overview", &master, &board).await).await;
    assert_eq!(status, 200);
    assert_eq!(again["created_date"], created["created_date"]);

    // The read key reads; the write key does not.
    let (status, read) =
        status_json(get(&server, "/dashboards/overview", &server.project.read_key).await).await;
    assert_eq!((status, read["tiles"].as_array().unwrap().len()), (200, 2));
    assert_error(
        get(&server, "/dashboards/overview", &server.project.write_key).await,
        401,
        "InsufficientPermissionsError",
    )
    .await;

    // A key allowed one saved query sees only that tile; a key without saved-query permission
    // sees nothing.
    let one = access_key(
        &server,
        json!({"name": "embed", "permitted": ["saved_queries"], "options": {"saved_queries": {"allowed": ["revenue"]}}}),
    )
    .await;
    let (_, scoped) = status_json(get(&server, "/dashboards", &one).await).await;
    let tiles: Vec<&str> = scoped[0]["tiles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["query_name"].as_str().unwrap())
        .collect();
    assert_eq!(tiles, ["revenue"]);
    // A key that may read none of a dashboard's tiles does not see the dashboard at all.
    let other = json!({"title": "Another customer", "tiles": [{"query_name": "signups", "x": 0, "y": 0, "w": 6, "h": 4}]});
    assert_eq!(
        put(&server, "/dashboards/other", &master, &other).await.status(),
        201
    );
    assert_eq!(scoped.as_array().unwrap().len(), 1, "{scoped}");
    let (_, listed) = status_json(get(&server, "/dashboards", &one).await).await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_error(
        get(&server, "/dashboards/other", &one).await,
        404,
        "ResourceNotFoundError",
    )
    .await;
    let writer = access_key(&server, json!({"name": "w", "permitted": ["writes"]})).await;
    assert_error(
        get(&server, "/dashboards/overview", &writer).await,
        401,
        "InsufficientPermissionsError",
    )
    .await;

    // Stored in the catalog: there after a restart; deleted: gone.
    let server = server.restart().await;
    let (status, _) = status_json(get(&server, "/dashboards/overview", &server.project.read_key).await).await;
    assert_eq!(status, 200);
    let deleted = server
        .http
        .delete(server.project_url("/dashboards/overview"))
        .header("Authorization", &server.project.master_key)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    assert_error(
        get(&server, "/dashboards/overview", &server.project.read_key).await,
        404,
        "ResourceNotFoundError",
    )
    .await;
}

/// Reads server-sent events from a streaming response until `done` says so.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    async fn open(server: &TestServer, collection: &str, key: &str, query: &str) -> reqwest::Response {
        server
            .http
            .get(server.project_url(&format!("/events/{collection}/stream{query}")))
            .header("Authorization", key)
            .send()
            .await
            .unwrap()
    }

    /// The next event as (type, data); `None` when the stream ends.
    async fn next(&mut self) -> Option<(String, String)> {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut kind = "message".to_owned();
                let mut data = Vec::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        kind = v.trim().to_owned();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some((kind, data.join("\n")));
            }
            // A hang guard, not a timing assertion.
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.response.chunk())
                .await
                .expect("the stream went quiet")
                .unwrap()?;
            self.buffer.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }

    /// The events' `customer` values, until `n` events have arrived.
    async fn customers(&mut self, n: usize) -> Vec<String> {
        let mut seen = Vec::new();
        while seen.len() < n {
            let (kind, data) = self.next().await.expect("the stream ended early");
            assert_eq!(kind, "message", "{data}");
            let event: Value = serde_json::from_str(&data).unwrap();
            assert!(event["keen"]["id"].is_string(), "the event as stored: {event}");
            seen.push(event["customer"].as_str().unwrap().to_owned());
        }
        seen
    }
}

async fn open_stream(server: &TestServer, collection: &str, key: &str, query: &str) -> SseReader {
    let response = SseReader::open(server, collection, key, query).await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut reader = SseReader {
        response,
        buffer: String::new(),
    };
    assert_eq!(reader.next().await.unwrap().0, "open");
    reader
}

#[tokio::test]
async fn the_live_stream_sends_stored_events_through_the_keys_filters() {
    let server = TestServer::start().await;
    let scoped = access_key(
        &server,
        json!({"name": "acme", "permitted": ["queries"], "options": {"queries": {"filters": [
            {"property_name": "customer", "operator": "eq", "property_value": "acme"}]}}}),
    )
    .await;
    let mut everything = open_stream(&server, "orders", &server.project.read_key, "").await;
    let mut acme_only = open_stream(&server, "orders", &scoped, "").await;
    // A key's own filter parameter narrows further; it cannot widen the key's filters.
    let widen =
        json!([{"property_name": "customer", "operator": "in", "property_value": ["acme", "globex"]}]);
    let query = format!(
        "?filters={}",
        form_urlencoded::byte_serialize(widen.to_string().as_bytes()).collect::<String>()
    );
    let mut widened = open_stream(&server, "orders", &scoped, &query).await;
    let big = json!([{"property_name": "n", "operator": "gt", "property_value": 2}]);
    let query = format!(
        "?filters={}",
        form_urlencoded::byte_serialize(big.to_string().as_bytes()).collect::<String>()
    );
    let mut big_orders = open_stream(&server, "orders", &server.project.read_key, &query).await;

    for (n, customer) in ["globex", "acme", "globex", "acme", "acme"]
        .into_iter()
        .enumerate()
    {
        let response = server
            .post("/events/orders", &json!({"customer": customer, "n": n}))
            .await;
        assert_eq!(response.status(), 201);
    }
    assert_eq!(
        server
            .post("/events/other", &json!({"customer": "acme"}))
            .await
            .status(),
        201
    );

    let mut all = everything.customers(5).await;
    all.sort();
    assert_eq!(all, ["acme", "acme", "acme", "globex", "globex"]);
    assert_eq!(acme_only.customers(3).await, ["acme", "acme", "acme"]);
    assert_eq!(widened.customers(3).await, ["acme", "acme", "acme"]);
    let mut big = big_orders.customers(2).await;
    big.sort();
    assert_eq!(big, ["acme", "acme"]);

    // A key holds at most 8 streams open.
    let mut held = Vec::new();
    for _ in 0..6 {
        held.push(open_stream(&server, "orders", &scoped, "").await);
    }
    assert_error(
        SseReader::open(&server, "orders", &scoped, "").await,
        429,
        "TooManyRequestsError",
    )
    .await;
    drop(held);

    // Refusals in Keen's shape.
    let write_key = server.project.write_key.clone();
    assert_error(
        SseReader::open(&server, "orders", &write_key, "").await,
        401,
        "InsufficientPermissionsError",
    )
    .await;
    assert_error(
        SseReader::open(&server, "orders", "nope", "").await,
        401,
        "InvalidApiKeyError",
    )
    .await;
    let read_key = server.project.read_key.clone();
    assert_error(
        SseReader::open(&server, "_bad", &read_key, "").await,
        400,
        "InvalidCollectionNameError",
    )
    .await;
    assert_error(
        SseReader::open(
            &server,
            "orders",
            &read_key,
            "?filters=%5B%7B%22operator%22%3A%22eq%22%7D%5D",
        )
        .await,
        400,
        "FilterDefinitionError",
    )
    .await;

    // Shutdown ends open streams instead of waiting for them.
    let TestServer { tally, .. } = server;
    tally.shutdown().await.unwrap();
    while let Some((kind, _)) = everything.next().await {
        assert_ne!(kind, "message", "no events after the last one stored");
    }
}

fn playwright() -> Option<(PathBuf, PathBuf)> {
    let found = (|| {
        let package = PathBuf::from(std::env::var_os("TALLY_PLAYWRIGHT")?);
        let browser = PathBuf::from(std::env::var_os("TALLY_CHROMIUM")?);
        (package.join("index.mjs").is_file() && browser.is_file()).then_some((package, browser))
    })();
    if found.is_none() {
        assert!(
            std::env::var("TALLY_REQUIRE_ALL_TESTS").is_err(),
            "chromium or playwright-core is missing (TALLY_CHROMIUM, TALLY_PLAYWRIGHT); scripts/test.sh installs them"
        );
    }
    found
}

#[tokio::test]
async fn the_ui_end_to_end_in_headless_chromium() {
    let Some((package, browser)) = playwright() else {
        println!("SKIPPED: chromium and playwright-core are not installed (run scripts/test.sh)");
        return;
    };
    let server = TestServer::start().await;
    seed(&server).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/e2e.mjs");
    let failures = tempfile::tempdir().unwrap();
    let mut command = Command::new("node");
    command
        .arg(&script)
        .env("TALLY_URL", &server.base)
        .env("TALLY_PROJECT", server.project.id.to_string())
        .env("TALLY_MASTER_KEY", &server.project.master_key)
        .env("TALLY_WRITE_KEY", &server.project.write_key)
        .env("TALLY_PLAYWRIGHT", &package)
        .env("TALLY_CHROMIUM", &browser)
        .env("TALLY_FAILURE_DIR", failures.path())
        .env("TZ", "UTC");
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!("{stdout}");
    if !output.status.success() {
        let kept = failures.keep();
        panic!(
            "the browser test failed:\n{stdout}\n{stderr}\n(screenshot in {})",
            kept.display()
        );
    }
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}
