//! `POST /3.0/projects/{PID}/sql`: read-only SQL over one project's collections, each a table of
//! its dotted properties; writes, files and other projects are out of reach.

use serde_json::{Value, json};

use tally_store::Catalog;

use crate::support::{TestServer, assert_error, status_json};

async fn sql(server: &TestServer, key: &str, query: &str) -> reqwest::Response {
    server
        .http
        .post(server.project_url("/sql"))
        .header("Authorization", key)
        .json(&json!({ "query": query }))
        .send()
        .await
        .unwrap()
}

async fn rows(server: &TestServer, query: &str) -> Value {
    let (status, body) = status_json(sql(server, &server.project.read_key, query).await).await;
    assert_eq!(status, 200, "{query}: {body}");
    body["result"].clone()
}

async fn loaded() -> TestServer {
    let server = TestServer::start().await;
    let events = json!({"purchases": [
        {"keen": {"timestamp": "2026-03-06T12:00:00Z"}, "user": {"plan": "pro"}, "price": 10, "ok": true, "mixed": 1},
        {"keen": {"timestamp": "2026-03-07T12:00:00Z"}, "user": {"plan": "free"}, "price": 20, "ok": false, "mixed": "one"},
        {"keen": {"timestamp": "2026-03-09T12:00:00Z"}, "user": {"plan": "pro"}, "price": 30.5, "tags": ["a", "b"]},
    ]});
    assert_eq!(status_json(server.post("/events", &events).await).await.0, 200);
    server.wait_enriched(3).await;
    server
}

#[tokio::test]
async fn collections_are_tables_of_dotted_properties() {
    let server = loaded().await;
    assert_eq!(
        rows(&server, r#"SELECT "user.plan" AS plan, count(*) AS n, sum(price) AS total FROM purchases GROUP BY 1 ORDER BY 1"#).await,
        json!([{"plan": "free", "n": 1, "total": 20}, {"plan": "pro", "n": 2, "total": 40.5}])
    );
    assert_eq!(
        rows(&server, r#"SELECT count(*) AS n FROM purchases WHERE "keen.timestamp" >= '2026-03-07T00:00:00Z' AND ok IS NOT TRUE"#).await,
        json!([{"n": 2}])
    );
    // A property with two JSON types is text; lists are their JSON text; times print as Keen's.
    assert_eq!(
        rows(
            &server,
            r#"SELECT mixed, tags, "keen.timestamp" AS t FROM purchases ORDER BY "keen.timestamp""#
        )
        .await,
        json!([
            {"mixed": "1", "tags": null, "t": "2026-03-06T12:00:00.000Z"},
            {"mixed": "one", "tags": null, "t": "2026-03-07T12:00:00.000Z"},
            {"mixed": null, "tags": "[\"a\",\"b\"]", "t": "2026-03-09T12:00:00.000Z"},
        ])
    );
}

#[tokio::test]
async fn only_reads_of_this_project_are_allowed() {
    let server = loaded().await;
    let read = server.project.read_key.clone();
    for statement in [
        "CREATE TABLE copy AS SELECT * FROM purchases",
        "INSERT INTO purchases (price) VALUES (1)",
        "COPY purchases TO '/tmp/tally-sql-copy.csv'",
        "CREATE EXTERNAL TABLE secrets STORED AS CSV LOCATION '/etc/passwd'",
        "SET datafusion.execution.batch_size = 1",
        "DROP TABLE purchases",
        "SELECT * FROM nothing_here",
        "SELECT FROM WHERE",
    ] {
        assert_error(sql(&server, &read, statement).await, 400, "InvalidParameterError").await;
    }
    assert!(!std::path::Path::new("/tmp/tally-sql-copy.csv").exists());

    // Another project's collection is not a table here, and its keys do not open this one.
    let other = server
        .tally
        .catalog()
        .create_project("other", "2026-01-01T00:00:00.000Z")
        .unwrap();
    let response = server
        .http
        .post(format!(
            "{}/3.0/projects/{}/events/secrets",
            server.base, other.id
        ))
        .header("Authorization", &other.write_key)
        .json(&json!({"code": 42}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    server.wait_enriched(4).await;
    assert_error(
        sql(&server, &read, "SELECT * FROM secrets").await,
        400,
        "InvalidParameterError",
    )
    .await;
    assert_error(
        sql(&server, &other.read_key, "SELECT 1").await,
        401,
        "InvalidApiKeyError",
    )
    .await;
    assert_error(
        sql(&server, &server.project.write_key, "SELECT 1").await,
        401,
        "InsufficientPermissionsError",
    )
    .await;
    let missing = server
        .http
        .post(server.project_url("/sql"))
        .header("Authorization", &read)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_error(missing, 400, "MissingRequiredPropertyError").await;
}
