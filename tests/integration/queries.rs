//! The query API end to end: events posted over HTTP, stored by the process stage, queried over
//! HTTP. Golden tests (request → expected JSON) for every analysis, result shape and decision
//! of reference §3 and §9, the schema and delete endpoints, and bad parameters.

use serde_json::{Value, json};

use crate::support::{TestServer, assert_error, status_json};

/// A small purchase log across the 2026-03-08 DST change in New York (UTC−5 → UTC−4 at 07:00Z).
fn purchases() -> Vec<Value> {
    vec![
        json!({"keen": {"timestamp": "2026-03-06T12:00:00.000Z"}, "user": {"id": "ann", "plan": "pro"}, "price": 10, "item": "hat", "tags": ["red", "sale"]}),
        json!({"keen": {"timestamp": "2026-03-07T12:00:00.000Z"}, "user": {"id": "bob", "plan": "free"}, "price": 20, "item": "shoe", "tags": ["blue"]}),
        json!({"keen": {"timestamp": "2026-03-08T12:00:00.000Z"}, "user": {"id": "ann", "plan": "pro"}, "price": 30, "item": "hat"}),
        json!({"keen": {"timestamp": "2026-03-08T13:00:00.000Z"}, "user": {"id": "cid"}, "price": "n/a", "item": "Hat box"}),
        json!({"keen": {"timestamp": "2026-03-09T12:00:00.000Z"}, "user": {"id": "dee", "plan": "pro"}, "price": 40, "item": null, "keen_location": 1}),
        json!({"keen": {"timestamp": "2026-03-11T12:00:00.000Z"}, "user": {"id": "bob", "plan": "free"}, "price": 5.5, "item": "sock"}),
    ]
}

const WEEK: &str = r#"{"start":"2026-03-06T00:00:00.000Z","end":"2026-03-13T00:00:00.000Z"}"#;

async fn loaded() -> TestServer {
    let server = TestServer::start().await;
    let (status, _) = status_json(server.post("/events", &json!({ "purchases": purchases() })).await).await;
    assert_eq!(status, 200);
    wait_count(&server, "purchases", 6).await;
    server
}

/// Polls `count` until it reaches `n` (a hang guard, not a timing assertion).
async fn wait_count(server: &TestServer, collection: &str, n: u64) {
    for _ in 0..1000 {
        let body = json!({"event_collection": collection, "timeframe": {"start": "2000-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}});
        let (status, answer) = status_json(query(server, "count", &body).await).await;
        assert_eq!(status, 200, "{answer}");
        if answer["result"].as_u64() == Some(n) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{collection} never reached {n} events");
}

async fn query(server: &TestServer, analysis: &str, body: &Value) -> reqwest::Response {
    server
        .http
        .post(server.project_url(&format!("/queries/{analysis}")))
        .header("Authorization", &server.project.read_key)
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn get_query(server: &TestServer, analysis: &str, query_string: &str) -> reqwest::Response {
    server
        .http
        .get(format!(
            "{}?api_key={}&{query_string}",
            server.project_url(&format!("/queries/{analysis}")),
            server.project.read_key
        ))
        .send()
        .await
        .unwrap()
}

async fn result(server: &TestServer, analysis: &str, mut body: Value) -> Value {
    body["event_collection"] = json!("purchases");
    if body.get("timeframe").is_none() {
        body["timeframe"] = serde_json::from_str(WEEK).unwrap();
    }
    let (status, answer) = status_json(query(server, analysis, &body).await).await;
    assert_eq!(status, 200, "{analysis} {body}: {answer}");
    answer["result"].clone()
}

#[tokio::test]
async fn every_analysis_gives_keens_numbers() {
    let server = loaded().await;
    let cases = [
        ("count", json!({}), json!(6)),
        ("count_unique", json!({"target_property": "user.id"}), json!(4)),
        // Only numbers count: "n/a" is ignored.
        ("sum", json!({"target_property": "price"}), json!(105.5)),
        ("average", json!({"target_property": "price"}), json!(21.1)),
        ("minimum", json!({"target_property": "price"}), json!(5.5)),
        ("maximum", json!({"target_property": "price"}), json!(40)),
        // Nearest rank over [5.5, 10, 20, 30, 40]: median is the 3rd value.
        ("median", json!({"target_property": "price"}), json!(20)),
        (
            "percentile",
            json!({"target_property": "price", "percentile": 50}),
            json!(20),
        ),
        (
            "percentile",
            json!({"target_property": "price", "percentile": 100}),
            json!(40),
        ),
        (
            "percentile",
            json!({"target_property": "price", "percentile": 0}),
            json!(5.5),
        ),
        (
            "percentile",
            json!({"target_property": "price", "percentile": 99.99}),
            json!(40),
        ),
        (
            "standard_deviation",
            json!({"target_property": "price"}),
            json!(14.179_210_133_149_166),
        ),
        (
            "select_unique",
            json!({"target_property": "item"}),
            json!(["Hat box", "hat", "shoe", "sock"]),
        ),
        // Numbers before strings.
        (
            "select_unique",
            json!({"target_property": "price"}),
            json!([5.5, 10, 20, 30, 40, "n/a"]),
        ),
        ("sum", json!({"target_property": "nothing"}), json!(0)),
        ("average", json!({"target_property": "nothing"}), json!(null)),
        ("count_unique", json!({"target_property": "nothing"}), json!(0)),
    ];
    for (analysis, params, expected) in cases {
        let got = result(&server, analysis, params.clone()).await;
        if let (Some(g), Some(e)) = (got.as_f64(), expected.as_f64()) {
            assert!((g - e).abs() < 1e-9, "{analysis} {params}: {got} != {expected}");
        } else {
            assert_eq!(got, expected, "{analysis} {params}");
        }
    }
}

#[tokio::test]
async fn keens_gem_statistics_over_ten_and_twenty() {
    let server = TestServer::start().await;
    let events = json!({"s": [{"v": 10, "keen": {"timestamp": "2026-01-01T00:00:00Z"}}, {"v": 20, "keen": {"timestamp": "2026-01-01T00:00:01Z"}}]});
    assert_eq!(status_json(server.post("/events", &events).await).await.0, 200);
    wait_count(&server, "s", 2).await;
    let tf = json!({"start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"});
    for (analysis, extra, expected) in [
        ("median", json!({}), 10),
        ("percentile", json!({"percentile": 50}), 10),
        ("percentile", json!({"percentile": 100}), 20),
        ("average", json!({}), 15),
    ] {
        let mut body = json!({"event_collection": "s", "target_property": "v", "timeframe": tf});
        if let Some(p) = extra.get("percentile") {
            body["percentile"] = p.clone();
        }
        let (_, answer) = status_json(query(&server, analysis, &body).await).await;
        assert_eq!(answer, json!({"result": expected}), "{analysis}");
    }
}

#[tokio::test]
async fn group_by_order_by_and_limit() {
    let server = loaded().await;
    // Missing `user.plan` groups under null; groups sorted by key, null first.
    assert_eq!(
        result(&server, "count", json!({"group_by": "user.plan"})).await,
        json!([{"user.plan": null, "result": 1}, {"user.plan": "free", "result": 2}, {"user.plan": "pro", "result": 3}])
    );
    assert_eq!(
        result(&server, "count_unique", json!({"target_property": "user.id", "group_by": ["user.plan", "item"], "filters": [{"property_name": "user.plan", "operator": "eq", "property_value": "pro"}]})).await,
        json!([
            {"user.plan": "pro", "item": null, "result": 1},
            {"user.plan": "pro", "item": "hat", "result": 1},
        ])
    );
    assert_eq!(
        result(&server, "sum", json!({"target_property": "price", "group_by": "user.plan", "order_by": [{"property_name": "result", "direction": "DESC"}], "limit": 2})).await,
        json!([{"user.plan": "pro", "result": 80}, {"user.plan": "free", "result": 25.5}])
    );
}

#[tokio::test]
async fn daily_intervals_in_new_york_across_the_dst_change() {
    let server = loaded().await;
    let got = result(
        &server,
        "count",
        json!({"interval": "daily", "timezone": "America/New_York",
               "timeframe": {"start": "2026-03-07T00:00:00-05:00", "end": "2026-03-10T00:00:00-04:00"}}),
    )
    .await;
    assert_eq!(
        got,
        json!([
            {"timeframe": {"start": "2026-03-07T00:00:00.000-05:00", "end": "2026-03-08T00:00:00.000-05:00"}, "value": 1},
            // A 23-hour day.
            {"timeframe": {"start": "2026-03-08T00:00:00.000-05:00", "end": "2026-03-09T00:00:00.000-04:00"}, "value": 2},
            {"timeframe": {"start": "2026-03-09T00:00:00.000-04:00", "end": "2026-03-10T00:00:00.000-04:00"}, "value": 1},
        ])
    );
    // Empty buckets appear, with each analysis's empty value; grouped buckets hold lists.
    let got = result(
        &server,
        "average",
        json!({"target_property": "price", "interval": "every_2_days",
        "timeframe": {"start": "2026-03-09T00:00:00Z", "end": "2026-03-13T00:00:00Z"}}),
    )
    .await;
    assert_eq!(
        got,
        json!([
            {"timeframe": {"start": "2026-03-09T00:00:00.000Z", "end": "2026-03-11T00:00:00.000Z"}, "value": 40},
            {"timeframe": {"start": "2026-03-11T00:00:00.000Z", "end": "2026-03-13T00:00:00.000Z"}, "value": 5.5},
        ])
    );
    let got = result(
        &server,
        "count",
        json!({"interval": "daily", "group_by": "item",
        "timeframe": {"start": "2026-03-09T00:00:00Z", "end": "2026-03-11T00:00:00Z"}}),
    )
    .await;
    assert_eq!(
        got,
        json!([
            {"timeframe": {"start": "2026-03-09T00:00:00.000Z", "end": "2026-03-10T00:00:00.000Z"}, "value": [{"item": null, "result": 1}]},
            {"timeframe": {"start": "2026-03-10T00:00:00.000Z", "end": "2026-03-11T00:00:00.000Z"}, "value": []},
        ])
    );
}

#[tokio::test]
async fn filters_follow_tallys_decisions() {
    let server = loaded().await;
    let count = |filters: Value| {
        let server = &server;
        async move { result(server, "count", json!({ "filters": filters })).await }
    };
    let f = |p: &str, op: &str, v: Value| json!({"property_name": p, "operator": op, "property_value": v});
    assert_eq!(count(json!([f("item", "eq", json!("hat"))])).await, json!(2));
    assert_eq!(count(json!([f("item", "eq", json!(null))])).await, json!(1));
    assert_eq!(count(json!([f("item", "ne", json!(null))])).await, json!(5));
    // `ne` matches only present, non-null values.
    assert_eq!(count(json!([f("item", "ne", json!("hat"))])).await, json!(3));
    assert_eq!(
        count(json!([f("user.plan", "exists", json!(false))])).await,
        json!(1)
    );
    assert_eq!(count(json!([f("price", "gt", json!(10))])).await, json!(3));
    // A number filter never matches a string value, and the other way round.
    assert_eq!(count(json!([f("price", "lt", json!("z"))])).await, json!(1));
    assert_eq!(
        count(json!([f("price", "in", json!([10, 40, "n/a"]))])).await,
        json!(3)
    );
    assert_eq!(count(json!([f("item", "contains", json!("at"))])).await, json!(3));
    assert_eq!(
        count(json!([f("item", "not_contains", json!("at"))])).await,
        json!(2)
    );
    assert_eq!(
        count(json!([f("item", "regex", json!("^[Hh]at"))])).await,
        json!(3)
    );
    // Lists: eq tests membership, in tests overlap.
    assert_eq!(count(json!([f("tags", "eq", json!("sale"))])).await, json!(1));
    assert_eq!(
        count(json!([f("tags", "in", json!(["blue", "sale"]))])).await,
        json!(2)
    );
    assert_eq!(
        count(json!([{"operator": "or", "property_value": [f("item", "eq", json!("sock")), f("user.id", "eq", json!("cid"))]}])).await,
        json!(2)
    );
    assert_eq!(
        count(json!([f("keen.timestamp", "gte", json!("2026-03-09T00:00:00Z"))])).await,
        json!(2)
    );
}

#[tokio::test]
async fn within_measures_miles_from_coordinates() {
    let server = TestServer::start().await;
    let at = |lon: f64, lat: f64| json!({"keen": {"timestamp": "2026-01-01T00:00:00Z", "location": {"coordinates": [lon, lat]}}});
    // New York, Newark (~9 mi), Boston (~190 mi).
    let events = json!({"geo": [at(-74.006, 40.7128), at(-74.1724, 40.7357), at(-71.0589, 42.3601)]});
    assert_eq!(status_json(server.post("/events", &events).await).await.0, 200);
    wait_count(&server, "geo", 3).await;
    let body = json!({"event_collection": "geo", "timeframe": {"start": "2026-01-01T00:00:00Z", "end": "2026-01-02T00:00:00Z"},
        "filters": [{"property_name": "keen.location.coordinates", "operator": "within",
                     "property_value": {"coordinates": [-74.006, 40.7128], "max_distance_miles": 20}}]});
    let (_, answer) = status_json(query(&server, "count", &body).await).await;
    assert_eq!(answer, json!({"result": 2}));
}

#[tokio::test]
async fn extraction_latest_property_names_and_csv() {
    let server = loaded().await;
    let all = result(&server, "extraction", json!({})).await;
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 6);
    assert_eq!(all[0]["user"], json!({"id": "ann", "plan": "pro"}));
    assert_eq!(all[0]["tags"], json!(["red", "sale"]));
    assert_eq!(all[0]["keen"]["timestamp"], "2026-03-06T12:00:00.000Z");
    assert_eq!(all[0]["keen"]["id"].as_str().unwrap().len(), 24);
    assert_eq!(all[4]["item"], Value::Null);
    let latest = result(
        &server,
        "extraction",
        json!({"latest": 2, "property_names": ["item", "user.id"]}),
    )
    .await;
    assert_eq!(
        latest,
        json!([{"item": null, "user": {"id": "dee"}}, {"item": "sock", "user": {"id": "bob"}}])
    );
    let response = query(
        &server,
        "extraction",
        &json!({"event_collection": "purchases", "timeframe": serde_json::from_str::<Value>(WEEK).unwrap(),
                "latest": 2, "property_names": ["user.id", "price"], "content_type": "text/csv"}),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    assert_eq!(response.text().await.unwrap(), "user.id,price\ndee,40\nbob,5.5\n");
}

#[tokio::test]
async fn get_parameters_mean_the_same_as_post_bodies() {
    let server = loaded().await;
    let filters = r#"[{"property_name":"price","operator":"gte","property_value":20}]"#;
    let qs = format!(
        "event_collection=purchases&timeframe={}&timezone=%22UTC%22&&target_property=price&group_by=%5B%22user.plan%22%5D&filters={}&",
        urlencode(WEEK),
        urlencode(filters)
    );
    let (status, got) = status_json(get_query(&server, "sum", &qs).await).await;
    assert_eq!(status, 200, "{got}");
    assert_eq!(
        got,
        json!({"result": [{"user.plan": "free", "result": 20}, {"user.plan": "pro", "result": 70}]})
    );
    let (_, meta) = status_json(
        get_query(
            &server,
            "count",
            &format!(
                "event_collection=purchases&timeframe={}&include_metadata=true",
                urlencode(WEEK)
            ),
        )
        .await,
    )
    .await;
    assert_eq!(meta["result"], 6);
    assert_eq!(meta["execution_metadata"]["events_scanned"], 6);
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn bad_parameters_get_keens_error_codes() {
    let server = loaded().await;
    let tf: Value = serde_json::from_str(WEEK).unwrap();
    let cases = [
        (
            "count_everything",
            json!({"event_collection": "purchases", "timeframe": tf}),
            "InvalidAnalysisTypeError",
        ),
        ("count", json!({"timeframe": tf}), "MissingRequiredPropertyError"),
        (
            "count",
            json!({"event_collection": "purchases"}),
            "MissingRequiredPropertyError",
        ),
        (
            "sum",
            json!({"event_collection": "purchases", "timeframe": tf}),
            "MissingRequiredPropertyError",
        ),
        (
            "count",
            json!({"event_collection": "purchases", "timeframe": "this_7_fortnights"}),
            "TimeframeDefinitionError",
        ),
        (
            "count",
            json!({"event_collection": "purchases", "timeframe": tf, "interval": "every_day_or_so"}),
            "IntervalDefinitionError",
        ),
        (
            "count",
            json!({"event_collection": "purchases", "timeframe": tf, "filters": [{"property_name": "a", "operator": "starts_with", "property_value": "x"}]}),
            "FilterDefinitionError",
        ),
        (
            "count",
            json!({"event_collection": "purchases", "timeframe": tf, "filters": [{"property_name": "a", "operator": "regex", "property_value": "(unclosed"}]}),
            "FilterDefinitionError",
        ),
        (
            "percentile",
            json!({"event_collection": "purchases", "timeframe": tf, "target_property": "price", "percentile": 101}),
            "InvalidParameterError",
        ),
        (
            "count",
            json!({"event_collection": "purchases", "timeframe": tf, "timezone": "Mars/Olympus_Mons"}),
            "InvalidParameterError",
        ),
    ];
    for (analysis, body, code) in cases {
        assert_error(query(&server, analysis, &body).await, 400, code).await;
    }
    // The write key may not query.
    let response = server
        .http
        .post(server.project_url("/queries/count"))
        .header("Authorization", &server.project.write_key)
        .json(&json!({"event_collection": "purchases", "timeframe": tf}))
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "InsufficientPermissionsError").await;
}

#[tokio::test]
async fn schema_lists_collections_and_property_types() {
    let server = loaded().await;
    let get = |path: String| {
        let server = &server;
        async move {
            status_json(
                server
                    .http
                    .get(server.project_url(&path))
                    .header("Authorization", &server.project.read_key)
                    .send()
                    .await
                    .unwrap(),
            )
            .await
        }
    };
    let (status, all) = get("/events".into()).await;
    assert_eq!(status, 200);
    assert_eq!(all[0]["name"], "purchases");
    let props = &all[0]["properties"];
    assert_eq!(props["keen.timestamp"], "datetime");
    assert_eq!(props["user.id"], "string");
    assert_eq!(props["price"], "num");
    assert_eq!(props["tags"], "list");
    let (_, one) = get("/events/purchases".into()).await;
    assert_eq!(&one["properties"], props);
    let (_, prop) = get("/events/purchases/properties/user.plan".into()).await;
    assert_eq!(prop["type"], "string");
    assert_eq!(prop["property_name"], "user.plan");
    assert_eq!(get("/events/nothing".into()).await.0, 404);
}

#[tokio::test]
async fn deletes_need_the_master_key_and_remove_exactly_what_matches() {
    let server = loaded().await;
    let filters = urlencode(r#"[{"property_name":"user.id","operator":"eq","property_value":"bob"}]"#);
    let url = format!("{}?filters={filters}", server.project_url("/events/purchases"));
    let response = server
        .http
        .delete(&url)
        .header("Authorization", &server.project.read_key)
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "AdminOnlyEndpointError").await;
    let response = server
        .http
        .delete(&url)
        .header("Authorization", &server.project.master_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(result(&server, "count", json!({})).await, json!(4));
    let response = server
        .http
        .delete(server.project_url("/events/purchases/properties/price"))
        .header("Authorization", &server.project.master_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(
        result(&server, "sum", json!({"target_property": "price"})).await,
        json!(0)
    );
    // Deletes are durable.
    let server = server.restart().await;
    assert_eq!(result(&server, "count", json!({})).await, json!(4));
    assert_eq!(
        result(&server, "sum", json!({"target_property": "price"})).await,
        json!(0)
    );
    let response = server
        .http
        .delete(server.project_url("/events/purchases"))
        .header("Authorization", &server.project.master_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 204);
    assert_eq!(result(&server, "count", json!({})).await, json!(0));
}

#[tokio::test]
async fn stored_events_survive_a_restart_exactly_once() {
    let server = loaded().await;
    let server = server.restart().await;
    assert_eq!(result(&server, "count", json!({})).await, json!(6));
    let (status, _) = status_json(server.post("/events/purchases", &purchases()[0]).await).await;
    assert_eq!(status, 201);
    wait_count(&server, "purchases", 7).await;
    let server = server.restart().await;
    assert_eq!(result(&server, "count", json!({})).await, json!(7));
}

#[tokio::test]
async fn a_query_over_its_limits_is_stopped_not_the_server() {
    // A zero time limit: every query that reads a segment is past it.
    let server = TestServer::start_with(|c| c.query.timeout_ms = 0).await;
    assert_eq!(
        status_json(server.post("/events", &json!({ "purchases": purchases() })).await)
            .await
            .0,
        200
    );
    server.wait_enriched(6).await;
    let body =
        json!({"event_collection": "purchases", "timeframe": serde_json::from_str::<Value>(WEEK).unwrap()});
    assert_error(query(&server, "count", &body).await, 504, "QueryTimeoutError").await;

    // A tiny memory budget: a query with many groups is refused with a clear message; one
    // without groups still answers.
    let server = server
        .restart_with(|c| {
            c.query.timeout_ms = 60_000;
            c.query.max_memory_bytes = 256;
        })
        .await;
    let mut grouped = body.clone();
    grouped["group_by"] = json!(["user.id", "price"]);
    let response = query(&server, "count", &grouped).await;
    let (status, answer) = status_json(response).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error_code"], "InvalidParameterError");
    assert!(
        answer["message"].as_str().unwrap().contains("more memory"),
        "{answer}"
    );
    let (status, answer) = status_json(query(&server, "count", &body).await).await;
    assert_eq!((status, &answer["result"]), (200, &json!(6)));
    // The server is still up for everyone else.
    assert_eq!(
        server.post("/events/purchases", &purchases()[0]).await.status(),
        201
    );
}

#[tokio::test]
async fn funnels_count_actors_step_by_step() {
    let server = TestServer::start().await;
    let at = |user: &str, extra: Value| {
        let mut e = json!({"keen": {"timestamp": "2026-03-06T12:00:00Z"}, "user": {"id": user}});
        e.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        e
    };
    let events = json!({
        "visits": [at("ann", json!({"page": "/pricing"})), at("ann", json!({"page": "/"})), at("bob", json!({"page": "/pricing"})),
                   at("cid", json!({"page": "/"})), at("dee", json!({"page": "/pricing"})), at("", json!({})), {"keen": {"timestamp": "2026-03-06T12:00:00Z"}}],
        "signups": [at("ann", json!({})), at("bob", json!({})), at("cid", json!({}))],
        "purchases": [at("ann", json!({})), at("dee", json!({})), at("eve", json!({}))],
    });
    assert_eq!(status_json(server.post("/events", &events).await).await.0, 200);
    wait_count(&server, "visits", 7).await;
    wait_count(&server, "signups", 3).await;
    wait_count(&server, "purchases", 3).await;
    let step = |c: &str| json!({"event_collection": c, "actor_property": "user.id"});
    let funnel = |steps: Value| {
        let server = &server;
        async move {
            let body = json!({"steps": steps, "timeframe": serde_json::from_str::<Value>(WEEK).unwrap(), "timezone": "UTC"});
            let (status, answer) = status_json(query(server, "funnel", &body).await).await;
            assert_eq!(status, 200, "{answer}");
            answer
        }
    };
    // Visitors "ann", "bob", "cid", "dee" and "" (an empty string is a value; a missing one is not).
    let plain = funnel(json!([step("visits"), step("signups"), step("purchases")])).await;
    assert_eq!(plain["result"], json!([5, 3, 1]));
    assert_eq!(plain.get("actors"), None, "no step asked for actors");
    assert_eq!(
        plain["steps"][1],
        json!({"event_collection": "signups", "actor_property": "user.id", "timeframe": serde_json::from_str::<Value>(WEEK).unwrap(),
               "timezone": "UTC", "filters": [], "optional": false, "inverted": false, "with_actors": false})
    );
    // An optional step is counted but does not narrow the next one.
    let mut optional = step("signups");
    optional["optional"] = json!(true);
    assert_eq!(
        funnel(json!([step("visits"), optional, step("purchases")])).await["result"],
        json!([5, 3, 2])
    );
    // Inverted: who signed up and did not buy.
    let mut inverted = step("purchases");
    inverted["inverted"] = json!(true);
    inverted["with_actors"] = json!(true);
    let answer = funnel(json!([step("visits"), step("signups"), inverted])).await;
    assert_eq!(answer["result"], json!([5, 3, 2]));
    assert_eq!(answer["actors"], json!([null, null, ["bob", "cid"]]));
    // Step filters and a step's own timeframe.
    let mut pricing = step("visits");
    pricing["filters"] = json!([{"property_name": "page", "operator": "eq", "property_value": "/pricing"}]);
    let mut later = step("purchases");
    later["timeframe"] = json!({"start": "2026-03-07T00:00:00Z", "end": "2026-03-08T00:00:00Z"});
    assert_eq!(
        funnel(json!([pricing.clone(), step("signups")])).await["result"],
        json!([3, 2])
    );
    assert_eq!(funnel(json!([pricing, later])).await["result"], json!([3, 0]));
    // Bad steps are refused with Keen's error shape.
    let bad = json!({"steps": [{"event_collection": "visits"}], "timeframe": "this_7_days"});
    assert_error(
        query(&server, "funnel", &bad).await,
        400,
        "MissingRequiredPropertyError",
    )
    .await;
    let bad = json!({"steps": [], "timeframe": "this_7_days"});
    assert_error(query(&server, "funnel", &bad).await, 400, "InvalidParameterError").await;
}

#[tokio::test]
async fn multi_analysis_joins_labelled_results() {
    let server = loaded().await;
    let analyses = json!({"total": {"analysis_type": "count"}, "revenue": {"analysis_type": "sum", "target_property": "price"}});
    let multi = |extra: Value| {
        let server = &server;
        let analyses = analyses.clone();
        async move {
            let mut body = json!({"event_collection": "purchases", "timeframe": serde_json::from_str::<Value>(WEEK).unwrap(), "analyses": analyses});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let (status, answer) = status_json(query(server, "multi_analysis", &body).await).await;
            assert_eq!(status, 200, "{answer}");
            answer["result"].clone()
        }
    };
    assert_eq!(multi(json!({})).await, json!({"total": 6, "revenue": 105.5}));
    assert_eq!(
        multi(json!({"group_by": "user.plan"})).await,
        json!([
            {"user.plan": null, "total": 1, "revenue": 0},
            {"user.plan": "free", "total": 2, "revenue": 25.5},
            {"user.plan": "pro", "total": 3, "revenue": 80},
        ])
    );
    let by_day = multi(json!({"interval": "daily", "timeframe": {"start": "2026-03-10T00:00:00Z", "end": "2026-03-12T00:00:00Z"}})).await;
    assert_eq!(
        by_day,
        json!([
            {"timeframe": {"start": "2026-03-10T00:00:00.000Z", "end": "2026-03-11T00:00:00.000Z"}, "value": {"total": 0, "revenue": 0}},
            {"timeframe": {"start": "2026-03-11T00:00:00.000Z", "end": "2026-03-12T00:00:00.000Z"}, "value": {"total": 1, "revenue": 5.5}},
        ])
    );
    let bad = json!({"event_collection": "purchases", "timeframe": "this_7_days", "analyses": {"x": {"analysis_type": "funnel"}}});
    assert_error(
        query(&server, "multi_analysis", &bad).await,
        400,
        "InvalidAnalysisTypeError",
    )
    .await;
}
