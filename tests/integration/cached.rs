//! Saved and cached queries, the `max_age` result cache, and cached datasets, end to end.
//!
//! Time is a manual clock: cached-query schedules and moving dataset windows are exercised by
//! moving it and running one refresher tick (`Tally::answers().run_due()`), never by sleeping.
//! Dataset results are compared with the equivalent ad-hoc query for every index value and
//! several sub-timeframes, before and after new events and after the window moves.

use std::sync::Arc;

use serde_json::{Value, json};
use tally_core::clock::ManualClock;

use crate::support::{TestServer, assert_error, status_json};

/// 2026-03-12T12:00:00Z.
const NOW_MS: i64 = 1_773_316_800_000;

async fn manual_server(adjust: impl FnOnce(&mut tally_core::config::Config)) -> (TestServer, ManualClock) {
    let clock = ManualClock::new(NOW_MS);
    let server = TestServer::start_with_clock(Arc::new(clock.clone()), |config| {
        // The background refresher stays out of the way: the tests tick it themselves.
        config.cache.refresh_tick_ms = 3_600_000;
        adjust(config);
    })
    .await;
    (server, clock)
}

async fn send(
    server: &TestServer,
    method: reqwest::Method,
    rest: &str,
    key: &str,
    body: Option<&Value>,
) -> reqwest::Response {
    let mut request = server
        .http
        .request(method, server.project_url(rest))
        .header("Authorization", key);
    if let Some(body) = body {
        request = request.json(body);
    }
    request.send().await.unwrap()
}

async fn count_all(server: &TestServer, collection: &str) -> u64 {
    let body = json!({"event_collection": collection, "timeframe": {"start": "2000-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}});
    let (status, answer) = status_json(
        send(
            server,
            reqwest::Method::POST,
            "/queries/count",
            &server.project.read_key,
            Some(&body),
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    answer["result"].as_u64().unwrap()
}

/// Posts events and waits until the collection holds `total` (a hang guard, not a timing
/// assertion).
async fn post_events(server: &TestServer, collection: &str, events: Vec<Value>, total: u64) {
    let (status, answer) = status_json(server.post("/events", &json!({ collection: events })).await).await;
    assert_eq!(status, 200, "{answer}");
    for _ in 0..2000 {
        if count_all(server, collection).await >= total {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    panic!("{collection} never reached {total} events");
}

fn purchase(ts: &str, customer: Value, product: &str, price: f64, user: &str) -> Value {
    json!({"keen": {"timestamp": ts}, "customer": {"id": customer}, "product": product, "price": price, "user": user})
}

async fn saved_result(server: &TestServer, name: &str, key: &str) -> Value {
    let (status, body) = status_json(
        send(
            server,
            reqwest::Method::GET,
            &format!("/queries/saved/{name}/result"),
            key,
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn saved_and_cached_queries_refresh_on_schedule_keep_good_results_and_survive_restart() {
    let (server, clock) = manual_server(|c| c.query.max_extraction_events = 5).await;
    let p = server.project.clone();
    let events: Vec<Value> = (0..6)
        .map(|i| {
            purchase(
                &format!("2026-03-1{}T10:00:00Z", i % 3),
                json!("a"),
                "x",
                10.0 * (i + 1) as f64,
                "u",
            )
        })
        .collect();
    post_events(&server, "purchases", events, 6).await;
    let put = |name: &str, body: Value| {
        let (server, name, master) = (&server, name.to_string(), p.master_key.clone());
        async move {
            send(
                server,
                reqwest::Method::PUT,
                &format!("/queries/saved/{name}"),
                &master,
                Some(&body),
            )
            .await
        }
    };

    // A plain saved query: created, then replaced; its result is computed on each request.
    let count = json!({"refresh_rate": 0, "query": {"analysis_type": "count", "event_collection": "purchases", "timeframe": "this_7_days"}, "metadata": {"display_name": "Purchases"}});
    let (status, object) = status_json(put("purchases-7d", count.clone()).await).await;
    assert_eq!(status, 201, "{object}");
    assert_eq!(object["query_name"], "purchases-7d");
    assert_eq!(object["refresh_rate"], 0);
    assert_eq!(object["query"]["filters"], json!([]));
    assert_eq!(object["metadata"]["display_name"], "Purchases");
    assert_eq!(object["run_information"], Value::Null);
    assert_eq!(
        object["urls"]["cached_query_results_url"],
        format!("/3.0/projects/{}/queries/saved/purchases-7d/result", p.id)
    );
    assert!(object["created_date"].as_str().unwrap().ends_with("+00:00"));
    assert_eq!(put("purchases-7d", count).await.status(), 200);
    assert_eq!(
        saved_result(&server, "purchases-7d", &p.read_key).await["result"],
        6
    );

    // A cached query: served from the cache until its refresh is due.
    let sum = json!({"refresh_rate": 3600, "query": {"analysis_type": "sum", "event_collection": "purchases", "target_property": "price", "timeframe": "this_7_days"}});
    assert_eq!(put("revenue", sum).await.status(), 201);
    // Requests racing the first computation wait for it (one refresh, no failed writes).
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let request = server
                .http
                .get(server.project_url("/queries/saved/revenue/result"))
                .header("Authorization", &p.read_key);
            tokio::spawn(async move { request.send().await.unwrap().status().as_u16() })
        })
        .collect();
    for racer in racers {
        assert_eq!(racer.await.unwrap(), 200);
    }
    let first = saved_result(&server, "revenue", &p.read_key).await;
    assert_eq!(first["result"], 210);
    assert_eq!(first["run_information"]["last_run_status"], "success");
    post_events(
        &server,
        "purchases",
        vec![purchase("2026-03-12T11:00:00Z", json!("a"), "x", 100.0, "u")],
        7,
    )
    .await;
    assert_eq!(
        saved_result(&server, "revenue", &p.read_key).await["result"],
        210,
        "served from the cache"
    );
    assert_eq!(
        saved_result(&server, "purchases-7d", &p.read_key).await["result"],
        7,
        "plain saved queries run"
    );
    assert_eq!(server.tally.answers().run_due().saved, 0, "not due yet");
    clock.advance_ms(3_600_000);
    assert_eq!(server.tally.answers().run_due().saved, 1);
    assert_eq!(saved_result(&server, "revenue", &p.read_key).await["result"], 310);

    // A refresh that fails keeps the last good result and says why.
    let extraction = json!({"refresh_rate": 3600, "query": {"analysis_type": "extraction", "event_collection": "small", "timeframe": "this_7_days"}});
    post_events(
        &server,
        "small",
        vec![json!({"keen": {"timestamp": "2026-03-12T11:00:00Z"}, "n": 1})],
        1,
    )
    .await;
    assert_eq!(put("small-list", extraction).await.status(), 201);
    assert_eq!(
        saved_result(&server, "small-list", &p.read_key).await["result"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let more: Vec<Value> = (2..9)
        .map(|n| json!({"keen": {"timestamp": "2026-03-12T11:00:00Z"}, "n": n}))
        .collect();
    post_events(&server, "small", more, 8).await;
    clock.advance_ms(3_600_000);
    server.tally.answers().run_due();
    let kept = saved_result(&server, "small-list", &p.read_key).await;
    assert_eq!(kept["result"].as_array().unwrap().len(), 1, "{kept}");
    assert_eq!(kept["run_information"]["last_run_status"], "failure");
    assert!(
        kept["run_information"]["last_run_message"]
            .as_str()
            .unwrap()
            .contains("latest")
    );
    assert!(
        server
            .metrics()
            .await
            .contains("tally_cache_refreshes_total{kind=\"cached_query\",outcome=\"failure\"}")
    );

    // Listing and keys: the master key administers; the read key only reads results.
    let (status, all) = status_json(
        send(
            &server,
            reqwest::Method::GET,
            "/queries/saved",
            &p.master_key,
            None,
        )
        .await,
    )
    .await;
    assert_eq!(status, 200);
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["query_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["purchases-7d", "revenue", "small-list"]);
    assert_error(
        send(&server, reqwest::Method::GET, "/queries/saved", &p.read_key, None).await,
        401,
        "AdminOnlyEndpointError",
    )
    .await;
    assert_error(
        send(
            &server,
            reqwest::Method::PUT,
            "/queries/saved/x",
            &p.read_key,
            Some(&json!({})),
        )
        .await,
        401,
        "AdminOnlyEndpointError",
    )
    .await;
    assert_error(
        send(
            &server,
            reqwest::Method::GET,
            "/queries/saved/revenue/result",
            &p.write_key,
            None,
        )
        .await,
        401,
        "InsufficientPermissionsError",
    )
    .await;

    // Bad definitions are refused at PUT; unknown names are 404.
    let q = |extra: Value| {
        let mut body = json!({"query": {"analysis_type": "count", "event_collection": "purchases", "timeframe": "this_7_days"}});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    for (body, code) in [
        (q(json!({"refresh_rate": 5})), "InvalidParameterError"),
        (q(json!({"refresh_rate": "soon"})), "InvalidParameterError"),
        (
            q(json!({"query": {"analysis_type": "nope", "event_collection": "a", "timeframe": "this_day"}})),
            "InvalidAnalysisTypeError",
        ),
        (
            q(json!({"query": {"analysis_type": "funnel", "steps": [{"event_collection": "a"}]}})),
            "MissingRequiredPropertyError",
        ),
        (json!({"refresh_rate": 0}), "MissingRequiredPropertyError"),
    ] {
        assert_error(put("bad", body.clone()).await, 400, code).await;
    }
    assert_error(
        put("bad%20name", q(json!({}))).await,
        400,
        "InvalidParameterError",
    )
    .await;
    assert_error(
        send(
            &server,
            reqwest::Method::GET,
            "/queries/saved/nope/result",
            &p.read_key,
            None,
        )
        .await,
        404,
        "ResourceNotFoundError",
    )
    .await;
    assert_eq!(
        send(
            &server,
            reqwest::Method::DELETE,
            "/queries/saved/purchases-7d",
            &p.master_key,
            None
        )
        .await
        .status(),
        204
    );
    assert_error(
        send(
            &server,
            reqwest::Method::GET,
            "/queries/saved/purchases-7d",
            &p.master_key,
            None,
        )
        .await,
        404,
        "ResourceNotFoundError",
    )
    .await;
    assert_error(
        send(
            &server,
            reqwest::Method::DELETE,
            "/queries/saved/purchases-7d",
            &p.master_key,
            None,
        )
        .await,
        404,
        "ResourceNotFoundError",
    )
    .await;

    // After a restart the cached result is served at once, stale and with its age, then
    // refreshed by the next tick.
    post_events(
        &server,
        "purchases",
        vec![purchase("2026-03-12T11:30:00Z", json!("b"), "y", 1.0, "v")],
        8,
    )
    .await;
    let server = server.restart().await;
    clock.advance_ms(60_000);
    let stale = saved_result(&server, "revenue", &p.read_key).await;
    assert_eq!(stale["result"], 310, "{stale}");
    assert!(
        stale["run_information"]["result_age_seconds"].as_i64().unwrap() >= 60,
        "{stale}"
    );
    assert!(server.tally.answers().run_due().saved >= 1);
    assert_eq!(saved_result(&server, "revenue", &p.read_key).await["result"], 311);
    server.tally.shutdown().await.unwrap();
}

#[tokio::test]
async fn max_age_answers_are_reused_only_while_the_data_they_read_is_unchanged() {
    let (server, _clock) = manual_server(|_| {}).await;
    let key = server.project.read_key.clone();
    post_events(
        &server,
        "visits",
        vec![json!({"keen": {"timestamp": "2026-03-10T10:00:00Z"}, "n": 1})],
        1,
    )
    .await;
    let ask = |body: Value| {
        let (server, key) = (&server, key.clone());
        async move {
            let response = send(server, reqwest::Method::POST, "/queries/count", &key, Some(&body)).await;
            let age = response.headers().get("age").is_some();
            let (status, answer) = status_json(response).await;
            assert_eq!(status, 200, "{answer}");
            (answer["result"].as_u64().unwrap(), age)
        }
    };
    let march_10 = json!({"event_collection": "visits", "timeframe": {"start": "2026-03-10T00:00:00Z", "end": "2026-03-11T00:00:00Z"}, "max_age": 300});
    assert_eq!(ask(march_10.clone()).await, (1, false));
    assert_eq!(ask(march_10.clone()).await, (1, true), "served from the cache");
    // The same question spelled differently shares the answer.
    let mut reordered = json!({"max_age": 600, "timeframe": {"end": "2026-03-11T00:00:00.000Z", "start": "2026-03-10T00:00:00Z"}});
    reordered["event_collection"] = json!("visits");
    assert_eq!(ask(reordered).await, (1, true));
    // Without max_age nothing is reused.
    let mut fresh = march_10.clone();
    fresh.as_object_mut().unwrap().remove("max_age");
    assert_eq!(ask(fresh).await, (1, false));
    // A change outside the range read leaves the answer valid; one inside replaces it.
    post_events(
        &server,
        "visits",
        vec![json!({"keen": {"timestamp": "2026-03-12T10:00:00Z"}, "n": 2})],
        2,
    )
    .await;
    assert_eq!(ask(march_10.clone()).await, (1, true));
    post_events(
        &server,
        "visits",
        vec![json!({"keen": {"timestamp": "2026-03-10T11:00:00Z"}, "n": 3})],
        3,
    )
    .await;
    assert_eq!(
        ask(march_10.clone()).await,
        (2, false),
        "never served after its data changed"
    );
    assert_eq!(ask(march_10).await, (2, true));
    server.tally.shutdown().await.unwrap();
}

/// The events of the dataset tests: customers a, b, c and the number 7, two products, over
/// 2026-03-05 … 03-12.
fn shop_events() -> Vec<Value> {
    let customers = [json!("a"), json!("b"), json!("c"), json!(7)];
    (0..64)
        .map(|i: usize| {
            let day = 5 + (i / 4) % 8;
            let hour = (i * 7) % 24;
            purchase(
                &format!("2026-03-{day:02}T{hour:02}:15:00Z"),
                customers[i % 4].clone(),
                if i.is_multiple_of(3) { "x" } else { "y" },
                (i % 5) as f64 + 0.5,
                &format!("u{}", i % 6),
            )
        })
        .collect()
}

async fn get_json(server: &TestServer, rest: &str, key: &str) -> (u16, Value) {
    status_json(send(server, reqwest::Method::GET, rest, key, None).await).await
}

fn encode(value: &Value) -> String {
    let text = match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// Compares the dataset's results with the equivalent ad-hoc query for every index value and
/// sub-timeframe.
async fn assert_matches_ad_hoc(
    server: &TestServer,
    name: &str,
    definition: &Value,
    index_values: &[Value],
    timeframes: &[Value],
) {
    let read = &server.project.read_key;
    let query = definition["query"].clone();
    let index_by: Vec<String> = match &definition["index_by"] {
        Value::String(s) => vec![s.clone()],
        list => list
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect(),
    };
    for index in index_values {
        for timeframe in timeframes {
            let rest = format!(
                "/datasets/{name}/results?index_by={}&timeframe={}",
                encode(index),
                encode(timeframe)
            );
            let (status, from_dataset) = get_json(server, &rest, read).await;
            assert_eq!(status, 200, "{rest}: {from_dataset}");
            let mut ad_hoc = query.clone();
            ad_hoc["timeframe"] = timeframe.clone();
            let mut filters = ad_hoc.get("filters").cloned().unwrap_or(json!([]));
            for property in &index_by {
                let value = if index.is_object() {
                    index[property].clone()
                } else {
                    index.clone()
                };
                filters
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"property_name": property, "operator": "eq", "property_value": value}));
            }
            ad_hoc["filters"] = filters;
            let analysis = query["analysis_type"].as_str().unwrap();
            let (status, expected) = status_json(
                send(
                    server,
                    reqwest::Method::POST,
                    &format!("/queries/{analysis}"),
                    read,
                    Some(&ad_hoc),
                )
                .await,
            )
            .await;
            assert_eq!(status, 200, "{expected}");
            assert_eq!(
                from_dataset, expected,
                "dataset {name}, index {index}, timeframe {timeframe}"
            );
        }
    }
}

#[tokio::test]
async fn datasets_answer_like_the_ad_hoc_query_and_refresh_only_the_buckets_that_changed() {
    let (server, clock) = manual_server(|_| {}).await;
    let p = server.project.clone();
    post_events(&server, "purchases", shop_events(), 64).await;
    let by_customer = json!({"display_name": "Daily purchases", "index_by": "customer.id",
        "query": {"analysis_type": "count", "event_collection": "purchases", "interval": "daily", "timeframe": "this_7_days", "timezone": "UTC"}});
    let revenue = json!({"display_name": "Revenue by product", "index_by": ["customer.id"],
        "query": {"analysis_type": "sum", "target_property": "price", "event_collection": "purchases", "group_by": "product",
                  "interval": "daily", "timeframe": "this_7_days", "timezone": "America/New_York",
                  "filters": [{"property_name": "price", "operator": "gt", "property_value": 1}]}});
    let uniques = json!({"display_name": "Users", "index_by": ["customer.id", "product"],
        "query": {"analysis_type": "count_unique", "target_property": "user", "event_collection": "purchases", "interval": "every_12_hours", "timeframe": "this_4_days", "timezone": "UTC"}});
    let median = json!({"index_by": "product",
        "query": {"analysis_type": "median", "target_property": "price", "event_collection": "purchases", "interval": "daily", "timeframe": "this_7_days"}});
    for (name, definition) in [
        ("by-customer", &by_customer),
        ("revenue", &revenue),
        ("uniques", &uniques),
        ("median", &median),
    ] {
        let (status, echo) = status_json(
            send(
                &server,
                reqwest::Method::PUT,
                &format!("/datasets/{name}"),
                &p.master_key,
                Some(definition),
            )
            .await,
        )
        .await;
        assert_eq!(status, 201, "{echo}");
        assert_eq!(echo["dataset_name"], name);
        assert_eq!(echo["project_id"], p.id.to_string());
        assert!(echo["index_by"].is_array());
        assert!(echo["run_information"].is_object(), "{echo}");
    }
    let customers = [json!("a"), json!("b"), json!("c"), json!(7), json!("nobody")];
    let timeframes = [
        json!("this_7_days"),
        json!("this_2_days"),
        json!("previous_3_days"),
        json!({"start": "2026-03-08T00:00:00.000Z", "end": "2026-03-10T00:00:00.000Z"}),
    ];
    let check_all = || async {
        assert_matches_ad_hoc(&server, "by-customer", &by_customer, &customers, &timeframes).await;
        assert_matches_ad_hoc(
            &server,
            "revenue",
            &revenue,
            &customers,
            &[json!("this_7_days"), json!("this_3_days")],
        )
        .await;
        let pairs: Vec<Value> = ["a", "b", "c"]
            .iter()
            .flat_map(|c| ["x", "y"].map(|p| json!({"customer.id": c, "product": p})))
            .collect();
        assert_matches_ad_hoc(
            &server,
            "uniques",
            &uniques,
            &pairs,
            &[json!("this_4_days"), json!("this_1_days")],
        )
        .await;
        assert_matches_ad_hoc(
            &server,
            "median",
            &median,
            &[json!("x"), json!("y")],
            &[json!("this_7_days")],
        )
        .await;
    };
    check_all().await;

    // The three forms of index_by name the same value.
    let forms = [
        "index_by=a",
        "index_by=%22a%22",
        "index_by=%7B%22customer.id%22%3A%22a%22%7D",
    ];
    let mut answers = Vec::new();
    for form in forms {
        let (status, body) = get_json(
            &server,
            &format!("/datasets/by-customer/results?{form}&timeframe=this_7_days"),
            &p.read_key,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        answers.push(body);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(answers[0]["result"].as_array().unwrap().len(), 7);
    assert!(
        answers[0]["result"]
            .as_array()
            .unwrap()
            .iter()
            .all(|b| b["value"].as_u64().unwrap() > 0),
        "{}",
        answers[0]
    );
    let (_, grouped) = get_json(
        &server,
        "/datasets/revenue/results?index_by=b&timeframe=this_7_days",
        &p.read_key,
    )
    .await;
    assert!(
        grouped["result"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["value"].as_array().unwrap().len() == 2),
        "{grouped}"
    );

    // New events today recompute only today's bucket; results still equal the ad-hoc query.
    let today: Vec<Value> = (0..5)
        .map(|i| purchase("2026-03-12T09:00:00Z", json!(["a", "b"][i % 2]), "x", 3.0, "u9"))
        .collect();
    post_events(&server, "purchases", today, 69).await;
    let dataset = crate::cached::stored(&server, "by-customer");
    let update = server
        .tally
        .answers()
        .refresh_dataset(p.id, "by-customer", &dataset)
        .unwrap();
    assert_eq!(update.set.len(), 1, "only today's bucket is recomputed");
    assert!(update.removed.is_empty());
    assert!(server.tally.answers().run_due().datasets >= 3);
    check_all().await;

    let (_, echo) = get_json(&server, "/datasets/by-customer", &p.read_key).await;
    assert_eq!(echo["run_information"]["last_run_status"], "success", "{echo}");
    assert!(
        echo["latest_subtimeframe_available"]
            .as_str()
            .unwrap()
            .starts_with("2026-03-13T00:00:00"),
        "{echo}"
    );
    // The window moves with the clock: a day drops out, a new one comes in.
    clock.advance_ms(86_400_000);
    post_events(
        &server,
        "purchases",
        vec![purchase("2026-03-13T01:00:00Z", json!("c"), "y", 9.0, "u1")],
        70,
    )
    .await;
    let update = server
        .tally
        .answers()
        .refresh_dataset(p.id, "by-customer", &dataset)
        .unwrap();
    assert_eq!((update.set.len(), update.removed.len()), (1, 1));
    server.tally.answers().run_due();
    check_all().await;

    // Bad definitions and requests.
    let put = |body: Value| {
        let (server, master) = (&server, p.master_key.clone());
        async move {
            send(
                server,
                reqwest::Method::PUT,
                "/datasets/bad",
                &master,
                Some(&body),
            )
            .await
        }
    };
    let base = json!({"analysis_type": "count", "event_collection": "purchases", "interval": "daily", "timeframe": "this_7_days"});
    let without = |field: &str| {
        let mut q = base.clone();
        q.as_object_mut().unwrap().remove(field);
        q
    };
    assert_error(
        put(json!({"query": without("interval"), "index_by": "a"})).await,
        400,
        "IntervalDefinitionError",
    )
    .await;
    assert_error(
        put(json!({"query": base.clone()})).await,
        400,
        "MissingRequiredPropertyError",
    )
    .await;
    assert_error(
        put(json!({"query": without("timeframe"), "index_by": "a"})).await,
        400,
        "TimeframeDefinitionError",
    )
    .await;
    let mut extraction = base.clone();
    extraction["analysis_type"] = json!("extraction");
    assert_error(
        put(json!({"query": extraction, "index_by": "a"})).await,
        400,
        "InvalidAnalysisTypeError",
    )
    .await;
    assert_error(
        send(
            &server,
            reqwest::Method::PUT,
            "/datasets/bad",
            &p.read_key,
            Some(&json!({})),
        )
        .await,
        401,
        "AdminOnlyEndpointError",
    )
    .await;
    let (status, body) = get_json(&server, "/datasets/nope/results?index_by=a", &p.read_key).await;
    assert_eq!(
        (status, body["error_code"].as_str()),
        (404, Some("ResourceNotFoundError"))
    );
    let (status, body) = get_json(
        &server,
        "/datasets/by-customer/results?index_by=a&timeframe=this_30_days",
        &p.read_key,
    )
    .await;
    assert_eq!(
        (status, body["error_code"].as_str()),
        (400, Some("TimeframeDefinitionError")),
        "{body}"
    );
    let (status, body) = get_json(
        &server,
        "/datasets/by-customer/results?timeframe=this_2_days",
        &p.read_key,
    )
    .await;
    assert_eq!(
        (status, body["error_code"].as_str()),
        (400, Some("MissingRequiredPropertyError")),
        "{body}"
    );
    let (status, body) = get_json(&server, "/datasets/uniques/results?index_by=a", &p.read_key).await;
    assert_eq!(
        (status, body["error_code"].as_str()),
        (400, Some("InvalidParameterError")),
        "{body}"
    );

    // Listing, a page at a time.
    let (status, page) = get_json(&server, "/datasets?limit=3", &p.read_key).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = page["datasets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["dataset_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["by-customer", "median", "revenue"]);
    let next = page["next_page_url"].as_str().unwrap();
    assert!(next.ends_with("/datasets?limit=3&after_name=revenue"), "{next}");
    let (_, page) = get_json(&server, "/datasets?limit=3&after_name=revenue", &p.read_key).await;
    assert_eq!(page["datasets"].as_array().unwrap().len(), 1);
    assert_eq!(page["next_page_url"], Value::Null);

    // A restart serves the kept buckets at once, then refreshes.
    let (_, before) = get_json(
        &server,
        "/datasets/revenue/results?index_by=b&timeframe=this_7_days",
        &p.read_key,
    )
    .await;
    let server = server.restart().await;
    let (status, after) = get_json(
        &server,
        "/datasets/revenue/results?index_by=b&timeframe=this_7_days",
        &p.read_key,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(before, after);
    server.tally.answers().run_due();
    check_all_after_restart(&server, &revenue, &customers).await;

    assert_eq!(
        send(
            &server,
            reqwest::Method::DELETE,
            "/datasets/revenue",
            &p.master_key,
            None
        )
        .await
        .status(),
        204
    );
    let (status, _) = get_json(&server, "/datasets/revenue", &p.read_key).await;
    assert_eq!(status, 404);
    server.tally.shutdown().await.unwrap();
}

async fn check_all_after_restart(server: &TestServer, revenue: &Value, customers: &[Value]) {
    assert_matches_ad_hoc(server, "revenue", revenue, customers, &[json!("this_7_days")]).await;
}

/// The stored definition of a dataset.
pub fn stored(server: &TestServer, name: &str) -> tally_query::dataset::Dataset {
    let stored = tally_store::Catalog::object(
        server.tally.catalog().as_ref(),
        &server.project.id,
        tally_store::ObjectKind::Dataset,
        name,
    )
    .unwrap();
    tally_query::dataset::Dataset::from_stored(&stored).unwrap()
}
