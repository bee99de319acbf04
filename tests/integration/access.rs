//! Access keys and tenant isolation, end to end (issue: access keys and tenant isolation).
//!
//! * the keys API lifecycle, and revocation taking effect on the very next request;
//! * the isolation matrix: every endpoint × every kind of key × own and other project, each
//!   with the exact status (and error code) it must get;
//! * properties that a scoped key's filters cannot be escaped: random queries (with `or`
//!   filters, `group_by`, `limit`, extraction `property_names`, funnels over other collections,
//!   saved queries written by the master key) answer for the scoped key exactly what the master
//!   key gets with the key's filter added by hand, and never mention another tenant's values;
//! * autofill, scoped schema, SQL and dataset results, rate limits;
//! * fairness: one project floods expensive queries while another's cheap ones still answer
//!   (latencies are printed, not asserted).

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use reqwest::Method;
use serde_json::{Value, json};
use tally_core::clock::ManualClock;

use crate::support::{ADMIN_KEY, TestServer, assert_error, call, ok_json, status_json};

/// The customers of every fixture project; the scoped reader sees only `cust-a`.
const CUSTOMERS: [&str; 2] = ["cust-a", "cust-b"];
const ITEMS: [&str; 3] = ["hat", "shoe", "sock"];
const TIMEFRAME: &str = r#"{"start":"2026-03-01T00:00:00Z","end":"2026-03-08T00:00:00Z"}"#;

/// One project with its keys and named objects.
struct Fixture {
    id: String,
    master: String,
    write: String,
    read: String,
    /// Reads everything, only `customer.id = cust-a`, dataset results only for `cust-a`.
    scoped_reader: String,
    /// Writes only; fills `customer.id = cust-a` into every event.
    scoped_writer: String,
    /// An access key that has been revoked.
    revoked: String,
    /// An access key the matrix revokes and restores.
    spare_id: String,
}

fn scoped_filter() -> Value {
    json!({"property_name": "customer.id", "operator": "eq", "property_value": "cust-a"})
}

fn url(server: &TestServer, project: &str, rest: &str) -> String {
    format!("{}/3.0/projects/{project}{rest}", server.base)
}

/// The purchases of one project: every customer buys every item on several days; `cust-b`'s
/// events carry a property only it has.
fn purchases() -> Vec<Value> {
    let mut events = Vec::new();
    for day in 1..=6 {
        for (c, customer) in CUSTOMERS.iter().enumerate() {
            for (i, item) in ITEMS.iter().enumerate() {
                let mut event = json!({
                    "customer": {"id": customer},
                    "user": format!("{customer}-user-{}", (day + i) % 3),
                    "item": item,
                    "price": (day * 10 + i * 3 + c * 100) as f64,
                    "tags": [item, customer],
                    "keen": {"timestamp": format!("2026-03-0{day}T1{i}:00:00Z")},
                });
                if *customer == "cust-b" {
                    event["b_secret"] = json!("only-b-has-this");
                }
                events.push(event);
            }
        }
    }
    events
}

fn signups() -> Vec<Value> {
    let mut events = Vec::new();
    for customer in CUSTOMERS {
        for u in 0..3 {
            events.push(json!({
                "customer": {"id": customer},
                "user": format!("{customer}-user-{u}"),
                "keen": {"timestamp": format!("2026-03-01T0{u}:00:00Z")},
            }));
        }
    }
    events
}

/// Loads a project and creates its keys and named objects.
async fn fixture(server: &TestServer, id: &str, master: &str, write: &str, read: &str) -> Fixture {
    let batch = json!({"purchases": purchases(), "signups": signups()});
    let answer = ok_json(
        call(
            server,
            Method::POST,
            &url(server, id, "/events"),
            Some(write),
            Some(&batch),
        )
        .await,
    )
    .await;
    assert!(
        answer.to_string().matches("\"success\":true").count() == 36 + 6,
        "{answer}"
    );
    let key = |body: Value| async move {
        ok_json(
            call(
                server,
                Method::POST,
                &url(server, id, "/keys"),
                Some(master),
                Some(&body),
            )
            .await,
        )
        .await
    };
    let scoped_reader = key(json!({
        "name": "customer a reports",
        "permitted": ["queries", "saved_queries", "cached_queries", "datasets", "schema"],
        "options": {
            "queries": {"filters": [scoped_filter()]},
            "datasets": {"operations": ["read", "list", "retrieve"],
                         "allowed": {"by_customer": {"index_by": {"customer.id": ["cust-a"]}}, "by_item": {}}}
        }
    }))
    .await;
    let scoped_writer = key(json!({
        "name": "customer a tracking",
        "permitted": ["writes"],
        "options": {"writes": {"autofill": {"customer": {"id": "cust-a"}}}}
    }))
    .await;
    let revoked = key(json!({"name": "gone", "permitted": ["queries", "writes", "schema"]})).await;
    ok_json(
        call(
            server,
            Method::POST,
            &url(
                server,
                id,
                &format!("/keys/{}/revoke", revoked["key"].as_str().unwrap()),
            ),
            Some(master),
            None,
        )
        .await,
    )
    .await;
    let spare = key(json!({"name": "spare", "permitted": ["queries"]})).await;
    let put = |rest: String, body: Value| async move {
        ok_json(
            call(
                server,
                Method::PUT,
                &url(server, id, &rest),
                Some(master),
                Some(&body),
            )
            .await,
        )
        .await
    };
    let timeframe: Value = serde_json::from_str(TIMEFRAME).unwrap();
    put(
        "/queries/saved/total".into(),
        json!({"refresh_rate": 0, "query": {"analysis_type": "sum", "event_collection": "purchases", "target_property": "price", "timeframe": timeframe}}),
    )
    .await;
    put(
        "/queries/saved/cached_total".into(),
        json!({"refresh_rate": 3600, "query": {"analysis_type": "count", "event_collection": "purchases", "group_by": "customer.id", "timeframe": timeframe}}),
    )
    .await;
    put(
        "/queries/saved/newq".into(),
        json!({"query": {"analysis_type": "count", "event_collection": "purchases", "timeframe": timeframe}}),
    )
    .await;
    for (name, index) in [("by_customer", "customer.id"), ("by_item", "item")] {
        put(
            format!("/datasets/{name}"),
            json!({"display_name": name, "index_by": index, "query": {"analysis_type": "count", "event_collection": "purchases", "interval": "daily", "timeframe": timeframe}}),
        )
        .await;
    }
    Fixture {
        id: id.to_owned(),
        master: master.to_owned(),
        write: write.to_owned(),
        read: read.to_owned(),
        scoped_reader: scoped_reader["key"].as_str().unwrap().to_owned(),
        scoped_writer: scoped_writer["key"].as_str().unwrap().to_owned(),
        revoked: revoked["key"].as_str().unwrap().to_owned(),
        spare_id: spare["id"].as_str().unwrap().to_owned(),
    }
}

/// A server with two loaded projects: the bootstrap one and a second made over the admin API.
async fn two_tenants(adjust: impl FnOnce(&mut tally_core::config::Config)) -> (TestServer, Fixture, Fixture) {
    let server = TestServer::start_with(adjust).await;
    let p = server.project.clone();
    let own = fixture(
        &server,
        &p.id.to_string(),
        &p.master_key,
        &p.write_key,
        &p.read_key,
    )
    .await;
    let other = ok_json(
        call(
            &server,
            Method::POST,
            &format!("{}/3.0/projects", server.base),
            Some(ADMIN_KEY),
            Some(&json!({"name": "other tenant"})),
        )
        .await,
    )
    .await;
    let s = |f: &str| other[f].as_str().unwrap().to_owned();
    let other = fixture(
        &server,
        &s("id"),
        &s("master_key"),
        &s("write_key"),
        &s("read_key"),
    )
    .await;
    wait_for_events(&server, &own, 42).await;
    wait_for_events(&server, &other, 42).await;
    (server, own, other)
}

async fn wait_for_events(server: &TestServer, project: &Fixture, n: u64) {
    let query = json!({"event_collection": "purchases", "timeframe": {"start": "2000-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}});
    for _ in 0..1000 {
        let purchases = ok_json(
            call(
                server,
                Method::POST,
                &url(server, &project.id, "/queries/count"),
                Some(&project.master),
                Some(&query),
            )
            .await,
        )
        .await;
        let signups = ok_json(
            call(
                server,
                Method::POST,
                &url(server, &project.id, "/queries/count"),
                Some(&project.master),
                Some(&json!({"event_collection": "signups", "timeframe": query["timeframe"]})),
            )
            .await,
        )
        .await;
        if purchases["result"].as_u64().unwrap() + signups["result"].as_u64().unwrap() >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("events were not queryable");
}

#[tokio::test]
async fn the_keys_api_creates_lists_updates_revokes_and_deletes() {
    let server = TestServer::start().await;
    let master = server.project.master_key.clone();
    let keys_url = server.project_url("/keys");
    let created = call(
        &server,
        Method::POST,
        &keys_url,
        Some(&master),
        Some(&json!({"name": "Bob_Key", "permitted": ["queries"], "options": {"queries": {"filters": [scoped_filter()]}}})),
    )
    .await;
    let (status, created) = status_json(created).await;
    assert_eq!(status, 201, "{created}");
    let key = created["key"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(key.len() >= 32, "at least 128 bits: {key}");
    assert_eq!(created["is_active"], true);
    assert_eq!(created["project_id"], server.project.id.to_string());
    assert_eq!(
        created["options"]["writes"],
        Value::Null,
        "unset options come back as null"
    );
    assert_eq!(created["options"]["queries"]["filters"][0], scoped_filter());

    // Listed by id only: the key itself is not kept.
    let listed = ok_json(call(&server, Method::GET, &keys_url, Some(&master), None).await).await;
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["key"], Value::Null);
    assert_eq!(listed[0]["id"], id.as_str());
    let catalog = std::fs::read_to_string(server.data_dir.join("catalog.json")).unwrap_or_default();
    assert!(!catalog.contains(&key), "the access key is stored in the clear");
    for name in [&key, &id] {
        let got = ok_json(
            call(
                &server,
                Method::GET,
                &format!("{keys_url}/{name}"),
                Some(&master),
                None,
            )
            .await,
        )
        .await;
        assert_eq!(got["name"], "Bob_Key");
    }

    let count = server.project_url("/queries/count?event_collection=x&timeframe=this_1_days");
    assert_eq!(
        call(&server, Method::GET, &count, Some(&key), None)
            .await
            .status(),
        200
    );

    // Update: narrowed permissions apply on the next request.
    let updated = ok_json(
        call(
            &server,
            Method::POST,
            &format!("{keys_url}/{key}"),
            Some(&master),
            Some(&json!({"name": "Bob_Key 2", "permitted": ["schema"], "options": null})),
        )
        .await,
    )
    .await;
    assert_eq!(updated["name"], "Bob_Key 2");
    assert_eq!(updated["key"], key.as_str());
    assert_error(
        call(&server, Method::GET, &count, Some(&key), None).await,
        401,
        "InsufficientPermissionsError",
    )
    .await;

    // Revoke takes effect at once; unrevoke restores it.
    let revoked = ok_json(
        call(
            &server,
            Method::POST,
            &format!("{keys_url}/{id}/revoke"),
            Some(&master),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(revoked["is_active"], false);
    let schema = server.project_url("/events");
    assert_error(
        call(&server, Method::GET, &schema, Some(&key), None).await,
        401,
        "InvalidApiKeyError",
    )
    .await;
    let restored = ok_json(
        call(
            &server,
            Method::POST,
            &format!("{keys_url}/{key}/unrevoke"),
            Some(&master),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(restored["is_active"], true);
    assert_eq!(
        call(&server, Method::GET, &schema, Some(&key), None)
            .await
            .status(),
        200
    );

    // Bad definitions are refused in Keen's error shape, naming what is wrong.
    for (body, code) in [
        (json!({"permitted": ["queries"]}), "MissingRequiredPropertyError"),
        (
            json!({"name": "k", "permitted": ["everything"]}),
            "InvalidParameterError",
        ),
        (
            json!({"name": "k", "permitted": [], "options": {"queries": {"filters": [{"property_name": "a", "operator": "eq"}]}}}),
            "FilterDefinitionError",
        ),
        (
            json!({"name": "k", "permitted": [], "options": {"writes": {"autofill": {"keen": {"id": "x"}}}}}),
            "InvalidParameterError",
        ),
    ] {
        assert_error(
            call(&server, Method::POST, &keys_url, Some(&master), Some(&body)).await,
            400,
            code,
        )
        .await;
    }
    let not_json = server
        .http
        .post(&keys_url)
        .header("Authorization", &master)
        .body("{nope")
        .send()
        .await
        .unwrap();
    assert_error(not_json, 400, "InvalidParameterError").await;
    // The project's own keys are not access keys, and unknown keys are 404.
    for name in [server.project.read_key.as_str(), "0123456789abcdef", "nope"] {
        assert_error(
            call(
                &server,
                Method::GET,
                &format!("{keys_url}/{name}"),
                Some(&master),
                None,
            )
            .await,
            404,
            "ResourceNotFoundError",
        )
        .await;
        assert_error(
            call(
                &server,
                Method::POST,
                &format!("{keys_url}/{name}/revoke"),
                Some(&master),
                None,
            )
            .await,
            404,
            "ResourceNotFoundError",
        )
        .await;
    }
    // Only the master key administers keys.
    assert_error(
        call(
            &server,
            Method::GET,
            &keys_url,
            Some(&server.project.read_key),
            None,
        )
        .await,
        401,
        "AdminOnlyEndpointError",
    )
    .await;
    assert_error(
        call(&server, Method::GET, &keys_url, Some(&key), None).await,
        401,
        "AdminOnlyEndpointError",
    )
    .await;

    // Survives a restart; deleted keys stop working at once.
    let server = server.restart().await;
    assert_eq!(
        call(
            &server,
            Method::GET,
            &server.project_url("/events"),
            Some(&key),
            None
        )
        .await
        .status(),
        200
    );
    let deleted = call(
        &server,
        Method::DELETE,
        &format!("{}/{key}", server.project_url("/keys")),
        Some(&master),
        None,
    )
    .await;
    assert_eq!(deleted.status(), 204);
    assert_error(
        call(
            &server,
            Method::GET,
            &server.project_url("/events"),
            Some(&key),
            None,
        )
        .await,
        401,
        "InvalidApiKeyError",
    )
    .await;
    assert_error(
        call(
            &server,
            Method::DELETE,
            &format!("{}/{key}", server.project_url("/keys")),
            Some(&master),
            None,
        )
        .await,
        404,
        "ResourceNotFoundError",
    )
    .await;
}

/// What an endpoint needs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Needs {
    Writes,
    Queries,
    Schema,
    /// GET on a collection without `data`: schema, but a write key meant to send an event.
    CollectionSchema,
    Saved,
    Cached,
    Datasets,
    Master,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum KeyRole {
    Master,
    Write,
    Read,
    ScopedReader,
    ScopedWriter,
    Revoked,
}

fn expected(role: KeyRole, own: bool, needs: Needs, success: u16) -> (u16, &'static str) {
    const OK: &str = "";
    if !own || role == KeyRole::Revoked {
        return (401, "InvalidApiKeyError");
    }
    let writer = matches!(role, KeyRole::Write | KeyRole::ScopedWriter);
    match (role, needs) {
        (KeyRole::Master, _) => (success, OK),
        (_, Needs::Master) => (401, "AdminOnlyEndpointError"),
        (_, Needs::Writes) if writer => (success, OK),
        (_, Needs::Writes) => (401, "InsufficientPermissionsError"),
        (_, Needs::CollectionSchema) if writer => (400, "MissingRequiredPropertyError"),
        (_, _) if writer => (401, "InsufficientPermissionsError"),
        _ => (success, OK),
    }
}

/// Every endpoint with what it needs and the status it answers when allowed.
fn endpoints(fixture: &Fixture) -> Vec<(Method, String, Option<Value>, Needs, u16)> {
    let timeframe: Value = serde_json::from_str(TIMEFRAME).unwrap();
    let pixel = base64::engine::general_purpose::STANDARD.encode(br#"{"item":"pixel"}"#);
    let tf = form_urlencoded::byte_serialize(TIMEFRAME.as_bytes()).collect::<String>();
    let count = json!({"event_collection": "purchases", "timeframe": timeframe});
    let funnel = json!({"steps": [
        {"event_collection": "signups", "actor_property": "user", "timeframe": timeframe},
        {"event_collection": "purchases", "actor_property": "user", "timeframe": timeframe}]});
    let saved =
        json!({"query": {"analysis_type": "count", "event_collection": "purchases", "timeframe": timeframe}});
    let dataset = json!({"display_name": "d", "index_by": "item", "query": {"analysis_type": "count", "event_collection": "purchases", "interval": "daily", "timeframe": timeframe}});
    let key = json!({"name": "matrix", "permitted": ["queries"]});
    vec![
        (
            Method::POST,
            "/events/matrix".into(),
            Some(json!({"n": 1})),
            Needs::Writes,
            201,
        ),
        (
            Method::POST,
            "/events".into(),
            Some(json!({"matrix": [{"n": 2}]})),
            Needs::Writes,
            200,
        ),
        (
            Method::GET,
            format!("/events/matrix?data={pixel}"),
            None,
            Needs::Writes,
            200,
        ),
        (
            Method::POST,
            "/queries/count".into(),
            Some(count.clone()),
            Needs::Queries,
            200,
        ),
        (
            Method::GET,
            format!("/queries/sum?event_collection=purchases&target_property=price&timeframe={tf}"),
            None,
            Needs::Queries,
            200,
        ),
        (
            Method::POST,
            "/queries/extraction".into(),
            Some(count.clone()),
            Needs::Queries,
            200,
        ),
        (
            Method::POST,
            "/queries/funnel".into(),
            Some(funnel),
            Needs::Queries,
            200,
        ),
        (
            Method::POST,
            "/queries/multi_analysis".into(),
            Some(
                json!({"event_collection": "purchases", "timeframe": timeframe, "analyses": {"n": {"analysis_type": "count"}}}),
            ),
            Needs::Queries,
            200,
        ),
        (
            Method::POST,
            "/sql".into(),
            Some(json!({"query": "SELECT count(*) AS n FROM purchases"})),
            Needs::Queries,
            200,
        ),
        (Method::GET, "/events".into(), None, Needs::Schema, 200),
        (
            Method::GET,
            "/events/purchases".into(),
            None,
            Needs::CollectionSchema,
            200,
        ),
        (
            Method::GET,
            "/events/purchases/properties/price".into(),
            None,
            Needs::Schema,
            200,
        ),
        (
            Method::GET,
            "/queries/saved/total/result".into(),
            None,
            Needs::Saved,
            200,
        ),
        (
            Method::GET,
            "/queries/saved/cached_total/result".into(),
            None,
            Needs::Cached,
            200,
        ),
        (Method::GET, "/queries/saved".into(), None, Needs::Master, 200),
        (
            Method::GET,
            "/queries/saved/total".into(),
            None,
            Needs::Master,
            200,
        ),
        (
            Method::PUT,
            "/queries/saved/newq".into(),
            Some(saved),
            Needs::Master,
            200,
        ),
        (
            Method::DELETE,
            "/queries/saved/never_existed".into(),
            None,
            Needs::Master,
            404,
        ),
        (Method::GET, "/datasets".into(), None, Needs::Datasets, 200),
        (
            Method::GET,
            "/datasets/by_customer".into(),
            None,
            Needs::Datasets,
            200,
        ),
        (
            Method::GET,
            "/datasets/by_customer/results?index_by=cust-a".into(),
            None,
            Needs::Datasets,
            200,
        ),
        (
            Method::PUT,
            "/datasets/by_item".into(),
            Some(dataset),
            Needs::Master,
            200,
        ),
        (
            Method::DELETE,
            "/datasets/never_existed".into(),
            None,
            Needs::Master,
            404,
        ),
        (Method::DELETE, "/events/scratch".into(), None, Needs::Master, 204),
        (
            Method::DELETE,
            "/events/scratch/properties/x".into(),
            None,
            Needs::Master,
            204,
        ),
        (Method::GET, "/keys".into(), None, Needs::Master, 200),
        (
            Method::POST,
            "/keys".into(),
            Some(key.clone()),
            Needs::Master,
            201,
        ),
        (
            Method::GET,
            format!("/keys/{}", fixture.spare_id),
            None,
            Needs::Master,
            200,
        ),
        (
            Method::POST,
            format!("/keys/{}", fixture.spare_id),
            Some(key),
            Needs::Master,
            200,
        ),
        (
            Method::POST,
            format!("/keys/{}/revoke", fixture.spare_id),
            None,
            Needs::Master,
            200,
        ),
        (
            Method::POST,
            format!("/keys/{}/unrevoke", fixture.spare_id),
            None,
            Needs::Master,
            200,
        ),
        (
            Method::DELETE,
            "/keys/0000000000000000".into(),
            None,
            Needs::Master,
            404,
        ),
    ]
}

#[tokio::test]
async fn the_isolation_matrix_gives_every_key_exactly_its_status() {
    let (server, own, other) = two_tenants(|_| {}).await;
    let mut checked = 0;
    for (target, peer) in [(&own, &other), (&other, &own)] {
        let mut keys: Vec<(String, Option<&str>, bool, KeyRole)> = Vec::new();
        for (fixture, is_own) in [(target, true), (peer, false)] {
            for (role, key) in [
                (KeyRole::Master, &fixture.master),
                (KeyRole::Write, &fixture.write),
                (KeyRole::Read, &fixture.read),
                (KeyRole::ScopedReader, &fixture.scoped_reader),
                (KeyRole::ScopedWriter, &fixture.scoped_writer),
                (KeyRole::Revoked, &fixture.revoked),
            ] {
                let label = format!(
                    "{role:?} key of {} project",
                    if is_own { "this" } else { "another" }
                );
                keys.push((label, Some(key.as_str()), is_own, role));
            }
        }
        keys.push(("no key".into(), None, true, KeyRole::Revoked));
        for (method, rest, body, needs, success) in endpoints(target) {
            for (label, key, is_own, role) in &keys {
                let (status, code) = expected(*role, *is_own, needs, success);
                let response = call(
                    &server,
                    method.clone(),
                    &url(&server, &target.id, &rest),
                    *key,
                    body.as_ref(),
                )
                .await;
                let got = response.status().as_u16();
                let text = response.text().await.unwrap();
                assert_eq!(got, status, "{method} {rest} with the {label}: {text}");
                if !code.is_empty() {
                    let body: Value = serde_json::from_str(&text).unwrap();
                    assert_eq!(
                        body["error_code"], code,
                        "{method} {rest} with the {label}: {text}"
                    );
                }
                checked += 1;
            }
        }
    }
    // A project that does not exist is 404 whatever the key.
    for key in [Some(own.master.as_str()), Some(own.read.as_str()), None] {
        assert_error(
            call(
                &server,
                Method::GET,
                &url(&server, "0123456789abcdef01234567", "/events"),
                key,
                None,
            )
            .await,
            404,
            "ResourceNotFoundError",
        )
        .await;
    }
    println!("isolation matrix: {checked} requests, each with the status it must get");
}

/// A random query over the fixture's collections, in the parameter form both keys send.
fn arbitrary_query() -> impl Strategy<Value = (String, Value)> {
    use proptest::prelude::*;
    let property = prop::sample::select(vec!["customer.id", "item", "price", "user", "tags", "b_secret"]);
    let leaf = (
        property.clone(),
        prop::sample::select(vec!["eq", "ne", "in", "contains", "exists", "gt", "lt"]),
        prop::sample::select(vec![
            json!("cust-b"),
            json!("cust-a"),
            json!("hat"),
            json!(40.0),
            json!(["cust-b", "shoe"]),
            json!(true),
            json!("only-b-has-this"),
        ]),
    )
        .prop_map(|(p, op, v)| {
            let v = match op {
                "in" if !v.is_array() => json!([v]),
                "exists" => json!(v.is_boolean()),
                "contains" if !v.is_string() => json!("b"),
                _ if v.is_array() => v[0].clone(),
                _ => v,
            };
            json!({"property_name": p, "operator": op, "property_value": v})
        });
    let filter = leaf.prop_recursive(2, 8, 3, |inner| {
        prop::collection::vec(inner, 1..3).prop_map(|fs| json!({"operator": "or", "property_value": fs}))
    });
    let filters = prop::collection::vec(filter, 0..3);
    let group_by = prop::sample::subsequence(vec!["customer.id", "item", "b_secret"], 0..=2);
    let analysis = prop::sample::select(vec![
        "count",
        "count_unique",
        "sum",
        "maximum",
        "select_unique",
        "extraction",
        "funnel",
        "multi_analysis",
    ]);
    let collection = prop::sample::select(vec!["purchases", "signups"]);
    (analysis, filters, group_by, collection.clone(), collection, any::<bool>(), 1usize..4).prop_map(
        |(analysis, filters, group_by, c1, c2, limited, limit)| {
            let timeframe: Value = serde_json::from_str(TIMEFRAME).unwrap();
            let mut q = json!({"event_collection": c1, "timeframe": timeframe, "filters": filters});
            match analysis {
                "funnel" => {
                    q = json!({"timeframe": timeframe, "steps": [
                        {"event_collection": c1, "actor_property": "user", "filters": filters, "with_actors": true},
                        {"event_collection": c2, "actor_property": "user", "optional": limited},
                        {"event_collection": "purchases", "actor_property": "user", "inverted": !limited && limit == 2},
                    ]});
                }
                "multi_analysis" => {
                    q["analyses"] = json!({"n": {"analysis_type": "count"}, "who": {"analysis_type": "select_unique", "target_property": "customer.id"}});
                    q["group_by"] = json!(group_by);
                }
                "extraction" => {
                    q["property_names"] = json!(["customer.id", "b_secret", "item", "keen.timestamp"]);
                    if limited {
                        q["latest"] = json!(limit);
                    }
                }
                "count" => {
                    q["group_by"] = json!(group_by);
                    if limited && !group_by.is_empty() {
                        q["order_by"] = json!([{"property_name": "result", "direction": "DESC"}]);
                        q["limit"] = json!(limit);
                    }
                }
                _ => {
                    q["target_property"] = json!(if analysis == "select_unique" { "customer.id" } else { "price" });
                    q["group_by"] = json!(group_by);
                }
            }
            (analysis.to_owned(), q)
        },
    )
}

/// The query with the scoped key's filter added by hand to everything it reads.
fn with_scope_filter(analysis: &str, query: &Value) -> Value {
    let mut q = query.clone();
    if analysis == "funnel" {
        for step in q["steps"].as_array_mut().unwrap() {
            let mut filters = step.get("filters").cloned().unwrap_or(json!([]));
            filters.as_array_mut().unwrap().push(scoped_filter());
            step["filters"] = filters;
        }
    } else {
        q["filters"].as_array_mut().unwrap().push(scoped_filter());
    }
    q
}

/// What an answer says about the data: a funnel's echo of its steps (which shows the filters
/// each request sent) is left out.
fn answer_part(analysis: &str, body: Value) -> Value {
    if analysis == "funnel" && body.get("result").is_some() {
        json!({"result": body["result"], "actors": body.get("actors")})
    } else {
        body
    }
}

#[tokio::test]
async fn a_scoped_keys_filters_cannot_be_escaped() {
    let (server, own, _other) = two_tenants(|_| {}).await;
    let mut runner = TestRunner::new(ProptestConfig::with_cases(200));
    let strategy = arbitrary_query();
    let mut saved = 0;
    for case in 0..200 {
        let (analysis, query) = strategy.new_tree(&mut runner).unwrap().current();
        let query_url = url(&server, &own.id, &format!("/queries/{analysis}"));
        let scoped = call(
            &server,
            Method::POST,
            &query_url,
            Some(&own.scoped_reader),
            Some(&query),
        )
        .await;
        let (status, scoped) = status_json(scoped).await;
        let by_hand = call(
            &server,
            Method::POST,
            &query_url,
            Some(&own.master),
            Some(&with_scope_filter(&analysis, &query)),
        )
        .await;
        let (hand_status, by_hand) = status_json(by_hand).await;
        let (scoped, by_hand) = (answer_part(&analysis, scoped), answer_part(&analysis, by_hand));
        assert_eq!(
            (status, &scoped),
            (hand_status, &by_hand),
            "case {case}: {analysis} {query}"
        );
        let text = if status == 200 {
            scoped.to_string()
        } else {
            String::new()
        };
        for leak in ["cust-b", "only-b-has-this"] {
            assert!(
                !text.contains(leak),
                "case {case}: {leak} leaked into {text} for {query}"
            );
        }
        // The same query saved by the master key, read by the scoped key.
        if status == 200 {
            let mut definition = query.clone();
            definition["analysis_type"] = json!(analysis);
            let name = format!("prop_{case}");
            let refresh_rate = if case % 2 == 0 { 0 } else { 3600 };
            let put = call(
                &server,
                Method::PUT,
                &url(&server, &own.id, &format!("/queries/saved/{name}")),
                Some(&own.master),
                Some(&json!({"refresh_rate": refresh_rate, "query": definition})),
            )
            .await;
            if put.status().is_success() {
                let result = ok_json(
                    call(
                        &server,
                        Method::GET,
                        &url(&server, &own.id, &format!("/queries/saved/{name}/result")),
                        Some(&own.scoped_reader),
                        None,
                    )
                    .await,
                )
                .await;
                let got = if analysis == "funnel" {
                    answer_part(&analysis, result["result"].clone())
                } else {
                    result["result"].clone()
                };
                let expected = if analysis == "funnel" {
                    by_hand.clone()
                } else {
                    by_hand["result"].clone()
                };
                assert_eq!(got, expected, "saved case {case}: {query}");
                assert!(!got.to_string().contains("cust-b"), "saved case {case}: {got}");
                saved += 1;
            }
        }
    }
    assert!(saved > 100, "only {saved} saved-query cases ran");
}

#[tokio::test]
async fn scoped_keys_see_only_their_rows_in_schema_sql_datasets_and_writes() {
    let (server, own, _other) = two_tenants(|_| {}).await;
    let get = |rest: &str, key: &str| {
        let (server, url) = (&server, url(&server, &own.id, rest));
        let key = key.to_owned();
        async move { call(server, Method::GET, &url, Some(&key), None).await }
    };

    // Schema: another tenant's property names do not show.
    let schema = ok_json(get("/events/purchases", &own.scoped_reader).await).await;
    assert!(schema["properties"].get("price").is_some(), "{schema}");
    assert!(schema["properties"].get("b_secret").is_none(), "{schema}");
    assert!(
        ok_json(get("/events/purchases", &own.master).await).await["properties"]
            .get("b_secret")
            .is_some()
    );
    assert_error(
        get("/events/purchases/properties/b_secret", &own.scoped_reader).await,
        404,
        "ResourceNotFoundError",
    )
    .await;
    assert!(
        !ok_json(get("/events", &own.scoped_reader).await)
            .await
            .to_string()
            .contains("b_secret")
    );

    // SQL: the filters are part of every table.
    let sql = |query: &str| json!({"query": query});
    let sql_url = url(&server, &own.id, "/sql");
    let grouped = ok_json(
        call(
            &server,
            Method::POST,
            &sql_url,
            Some(&own.scoped_reader),
            Some(&sql(
                r#"SELECT "customer.id" AS c, count(*) AS n FROM purchases GROUP BY 1"#,
            )),
        )
        .await,
    )
    .await;
    assert_eq!(grouped["result"], json!([{"c": "cust-a", "n": 18}]));
    let star = ok_json(
        call(
            &server,
            Method::POST,
            &sql_url,
            Some(&own.scoped_reader),
            Some(&sql("SELECT * FROM purchases")),
        )
        .await,
    )
    .await;
    assert!(!star.to_string().contains("b_secret") && !star.to_string().contains("cust-b"));
    let (status, escaped) = status_json(
        call(
            &server,
            Method::POST,
            &sql_url,
            Some(&own.scoped_reader),
            Some(&sql("SELECT b_secret FROM purchases")),
        )
        .await,
    )
    .await;
    assert_eq!(status, 400, "{escaped}");

    // Datasets: allowed index values only; filters applied to any index.
    let results = ok_json(
        get(
            "/datasets/by_customer/results?index_by=cust-a",
            &own.scoped_reader,
        )
        .await,
    )
    .await;
    let master_results =
        ok_json(get("/datasets/by_customer/results?index_by=cust-a", &own.master).await).await;
    assert_eq!(results, master_results);
    assert_error(
        get(
            "/datasets/by_customer/results?index_by=cust-b",
            &own.scoped_reader,
        )
        .await,
        401,
        "InsufficientPermissionsError",
    )
    .await;
    let by_item = ok_json(get("/datasets/by_item/results?index_by=hat", &own.scoped_reader).await).await;
    let expected = ok_json(
        call(
            &server,
            Method::POST,
            &url(&server, &own.id, "/queries/count"),
            Some(&own.master),
            Some(&json!({"event_collection": "purchases", "interval": "daily", "timeframe": serde_json::from_str::<Value>(TIMEFRAME).unwrap(),
                         "filters": [{"property_name": "item", "operator": "eq", "property_value": "hat"}, scoped_filter()]})),
        )
        .await,
    )
    .await;
    assert_eq!(by_item["result"], expected["result"]);
    let unscoped = ok_json(get("/datasets/by_item/results?index_by=hat", &own.read).await).await;
    assert_ne!(by_item, unscoped, "the read key sees both customers");
    let listed = ok_json(get("/datasets", &own.scoped_reader).await).await;
    assert_eq!(listed["datasets"].as_array().unwrap().len(), 2);

    // Names: a key that may only list datasets lists the allowed ones; a blocked saved query
    // cannot be told from a missing one; another tenant's collection is not a SQL table.
    let lister = ok_json(
        call(&server, Method::POST, &url(&server, &own.id, "/keys"), Some(&own.master), Some(&json!({
            "name": "lister", "permitted": ["datasets", "saved_queries", "queries"],
            "options": {"datasets": {"operations": ["list"], "blocked": ["by_item"]},
                        "saved_queries": {"blocked": ["total", "ghost"]},
                        "queries": {"filters": [{"property_name": "customer.id", "operator": "eq", "property_value": "nobody"}]}}
        }))).await,
    )
    .await;
    let lister = lister["key"].as_str().unwrap().to_owned();
    let names: Vec<Value> = ok_json(get("/datasets", &lister).await).await["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["dataset_name"].clone())
        .collect();
    assert_eq!(names, vec![json!("by_customer")]);
    assert_error(
        get("/datasets/by_customer", &lister).await,
        401,
        "InsufficientPermissionsError",
    )
    .await;
    // "total" exists, "ghost" does not: both blocked, both answered alike.
    for name in ["total", "ghost"] {
        let path = format!("/queries/saved/{name}/result");
        assert_error(get(&path, &lister).await, 401, "InsufficientPermissionsError").await;
    }
    assert_eq!(
        get("/queries/saved/no_such_query/result", &lister).await.status(),
        404
    );
    let hidden = call(
        &server,
        Method::POST,
        &sql_url,
        Some(&lister),
        Some(&sql("SELECT count(*) FROM purchases")),
    )
    .await;
    let (status, body) = status_json(hidden).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("not found"), "{body}");

    // Autofill: the key's values win over the event's.
    let forged = json!({"customer": {"id": "cust-b", "plan": "gold"}, "item": "forged"});
    let response = call(
        &server,
        Method::POST,
        &url(&server, &own.id, "/events/purchases"),
        Some(&own.scoped_writer),
        Some(&forged),
    )
    .await;
    assert_eq!(response.status(), 201);
    let extraction = json!({"event_collection": "purchases", "timeframe": "this_1_days",
                            "filters": [{"property_name": "item", "operator": "eq", "property_value": "forged"}]});
    let mut stored = Value::Null;
    for _ in 0..500 {
        stored = ok_json(
            call(
                &server,
                Method::POST,
                &url(&server, &own.id, "/queries/extraction"),
                Some(&own.master),
                Some(&extraction),
            )
            .await,
        )
        .await;
        if !stored["result"].as_array().unwrap().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        stored["result"][0]["customer"],
        json!({"id": "cust-a", "plan": "gold"}),
        "{stored}"
    );
}

#[tokio::test]
async fn over_its_rate_limit_a_key_gets_429_with_retry_after() {
    let clock = ManualClock::new(1_773_316_800_000);
    let server = TestServer::start_with_clock(Arc::new(clock.clone()), |config| {
        config.rate_limits.queries_per_minute = 5;
    })
    .await;
    let count = server.project_url("/queries/count?event_collection=x&timeframe=this_1_days");
    let read = server.project.read_key.clone();
    for _ in 0..5 {
        assert_eq!(
            call(&server, Method::GET, &count, Some(&read), None)
                .await
                .status(),
            200
        );
    }
    let refused = call(&server, Method::GET, &count, Some(&read), None).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "12");
    assert_error(refused, 429, "TooManyRequestsError").await;
    // Per key: the master key has its own bucket; writes are not limited.
    assert_eq!(
        call(
            &server,
            Method::GET,
            &count,
            Some(&server.project.master_key),
            None
        )
        .await
        .status(),
        200
    );
    assert_eq!(server.post("/events/x", &json!({"a": 1})).await.status(), 201);
    clock.advance_ms(12_000);
    assert_eq!(
        call(&server, Method::GET, &count, Some(&read), None)
            .await
            .status(),
        200
    );
    assert!(
        server
            .metrics()
            .await
            .contains("tally_requests_refused_total{reason=\"rate_limit_queries\"} 1")
    );
}

/// Latency percentiles in milliseconds.
fn summary(mut ms: Vec<f64>) -> String {
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |p: f64| ms[((p * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    format!(
        "n={} p50={:.1} ms p90={:.1} ms max={:.1} ms",
        ms.len(),
        at(0.5),
        at(0.9),
        at(1.0)
    )
}

#[tokio::test]
async fn one_projects_flood_of_heavy_queries_does_not_stall_anothers_cheap_ones() {
    let server = TestServer::start_with(|config| {
        config.query.max_concurrent_per_project = 1;
        config.query.max_queued_per_project = 4;
        config.query.queue_timeout_ms = 2_000;
    })
    .await;
    // The noisy tenant: 40,000 events with a high-cardinality property.
    let noisy = server.project.clone();
    for chunk in 0..2 {
        let events: Vec<Value> = (0..20_000)
            .map(|i| json!({"session": format!("s{chunk}-{i}"), "price": i % 977, "page": format!("/p/{}", i % 5000)}))
            .collect();
        let response = call(
            &server,
            Method::POST,
            &url(&server, &noisy.id.to_string(), "/events"),
            Some(&noisy.write_key),
            Some(&json!({"views": events})),
        )
        .await;
        assert_eq!(response.status(), 200);
    }
    let quiet = ok_json(
        call(
            &server,
            Method::POST,
            &format!("{}/3.0/projects", server.base),
            Some(ADMIN_KEY),
            Some(&json!({"name": "quiet"})),
        )
        .await,
    )
    .await;
    let quiet_id = quiet["id"].as_str().unwrap().to_owned();
    let quiet_read = quiet["read_key"].as_str().unwrap().to_owned();
    let response = call(
        &server,
        Method::POST,
        &url(&server, &quiet_id, "/events/clicks"),
        Some(quiet["write_key"].as_str().unwrap()),
        Some(&json!({"n": 1})),
    )
    .await;
    assert_eq!(response.status(), 201);
    let heavy = json!({"event_collection": "views", "timeframe": "this_1_days", "target_property": "session", "group_by": "page"});
    let heavy_url = url(&server, &noisy.id.to_string(), "/queries/count_unique");
    // Until the noisy tenant's events are all queryable.
    for _ in 0..3000 {
        let n = ok_json(
            call(
                &server,
                Method::GET,
                &url(
                    &server,
                    &noisy.id.to_string(),
                    "/queries/count?event_collection=views&timeframe=this_1_days",
                ),
                Some(&noisy.read_key),
                None,
            )
            .await,
        )
        .await;
        if n["result"] == 40_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cheap_url = url(
        &server,
        &quiet_id,
        "/queries/count?event_collection=clicks&timeframe=this_1_days",
    );
    for _ in 0..3000 {
        let n = ok_json(call(&server, Method::GET, &cheap_url, Some(&quiet_read), None).await).await;
        if n["result"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let cheap = |server: &TestServer| {
        let (http, cheap_url, key) = (server.http.clone(), cheap_url.clone(), quiet_read.clone());
        async move {
            let started = Instant::now();
            let response = http
                .get(&cheap_url)
                .header("Authorization", &key)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "the quiet tenant's query was refused");
            assert_eq!(response.json::<Value>().await.unwrap()["result"], 1);
            started.elapsed().as_secs_f64() * 1000.0
        }
    };
    let mut idle = Vec::new();
    for _ in 0..20 {
        idle.push(cheap(&server).await);
    }
    let one_heavy = Instant::now();
    ok_json(
        call(
            &server,
            Method::POST,
            &heavy_url,
            Some(&noisy.read_key),
            Some(&heavy),
        )
        .await,
    )
    .await;
    let heavy_ms = one_heavy.elapsed().as_secs_f64() * 1000.0;

    // The flood: 8 clients sending heavy queries back to back.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flooders = Vec::new();
    for _ in 0..8 {
        let (http, heavy_url, heavy, key, stop) = (
            server.http.clone(),
            heavy_url.clone(),
            heavy.clone(),
            noisy.read_key.clone(),
            stop.clone(),
        );
        flooders.push(tokio::spawn(async move {
            let (mut answered, mut refused) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let response = http
                    .post(&heavy_url)
                    .header("Authorization", &key)
                    .json(&heavy)
                    .send()
                    .await
                    .unwrap();
                match response.status().as_u16() {
                    200 => answered += 1,
                    429 => {
                        refused += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => panic!("a heavy query got {other}"),
                }
            }
            (answered, refused)
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut loaded = Vec::new();
    for _ in 0..20 {
        loaded.push(cheap(&server).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut answered, mut refused) = (0, 0);
    for flooder in flooders {
        let (a, r) = flooder.await.unwrap();
        answered += a;
        refused += r;
    }
    println!("fairness: one heavy count_unique over 40,000 events: {heavy_ms:.0} ms");
    println!(
        "fairness: quiet tenant's count, idle server:      {}",
        summary(idle)
    );
    println!(
        "fairness: quiet tenant's count, during the flood: {}",
        summary(loaded)
    );
    println!(
        "fairness: noisy tenant's heavy queries during the flood: {answered} answered, {refused} refused with 429"
    );
    assert!(answered > 0, "the noisy tenant's own queries still run");
}
