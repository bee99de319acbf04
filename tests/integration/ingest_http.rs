//! The HTTP Stream API over a real socket: every endpoint and error path of the ingest issue.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

use tally_store::Catalog;

use crate::support::{ADMIN_KEY, TestServer, assert_error, status_json};

fn is_event_id(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        s.len() == 24
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

#[tokio::test]
async fn a_single_event_is_stamped_logged_and_answered_201() {
    let server = TestServer::start().await;
    let response = server
        .post("/events/purchases", &json!({"price": 5, "item": {"name": "hat"}}))
        .await;
    assert_eq!(status_json(response).await, (201, json!({"created": true})));

    let backfilled = json!({"price": 6, "keen": {"timestamp": "2024-02-03T04:05:06.789+01:00"}});
    assert_eq!(
        status_json(server.post("/events/purchases", &backfilled).await)
            .await
            .0,
        201
    );

    let logged = server.logged();
    assert_eq!(logged.len(), 2);
    let (collection, first) = &logged[0];
    assert_eq!(collection, "purchases");
    assert_eq!(first["price"], 5);
    assert_eq!(first["item"]["name"], "hat");
    assert!(is_event_id(&first["keen"]["id"]), "{first}");
    assert_eq!(first["keen"]["timestamp"], first["keen"]["created_at"]);
    assert!(first["keen"]["timestamp"].as_str().unwrap().ends_with('Z'));
    assert_eq!(logged[1].1["keen"]["timestamp"], "2024-02-03T03:05:06.789Z");
    assert_ne!(logged[1].1["keen"]["id"], first["keen"]["id"]);
}

#[tokio::test]
async fn a_batch_answers_per_event_in_order_and_stores_the_valid_ones() {
    let server = TestServer::start().await;
    let batch = json!({
        "purchases": [{"price": 5}, {"price": 6}],
        "sign_ups": [{"username": "a"}, {"username": "b", "an.invalid.name": 1}],
        "_bad collection": [{"x": 1}]
    });
    let (status, body) = status_json(server.post("/events", &batch).await).await;
    assert_eq!(status, 200);
    assert_eq!(body["purchases"], json!([{"success": true}, {"success": true}]));
    assert_eq!(body["sign_ups"][0], json!({"success": true}));
    assert_eq!(body["sign_ups"][1]["success"], false);
    assert_eq!(body["sign_ups"][1]["error"]["name"], "InvalidPropertyNameError");
    assert_eq!(
        body["_bad collection"][0]["error"]["name"],
        "InvalidCollectionNameError"
    );
    let stored: Vec<_> = server
        .logged()
        .into_iter()
        .map(|(c, e)| (c, e.get("price").or(e.get("username")).cloned()))
        .collect();
    assert_eq!(
        stored,
        vec![
            ("purchases".into(), Some(json!(5))),
            ("purchases".into(), Some(json!(6))),
            ("sign_ups".into(), Some(json!("a")))
        ]
    );

    // JSON that breaks only serde's value rules (a number out of range, a lone surrogate) is one
    // event's error, as when batches were split by serde; text that is not JSON refuses the
    // batch, also under a collection name that is refused anyway.
    let (status, body) = status_json(
        server
            .post_text(
                "/events",
                r#"{"odd": [{"n": 1e400}, {"s": "\ud800"}, {"price": 7}]}"#,
            )
            .await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["odd"][0]["error"]["name"], "InvalidEventError");
    assert_eq!(body["odd"][1]["error"]["name"], "InvalidEventError");
    assert_eq!(body["odd"][2], json!({"success": true}));
    assert_eq!(server.logged().len(), 4);
    for not_json in [
        r#"{"odd": [{"price": 8}, {"n": }]}"#,
        r#"{"$bad": [{"x": }], "odd": [{"price": 8}]}"#,
        r#"{"odd": [{"price": 8}, {"$bad": 1, "x": tru}]}"#,
    ] {
        assert_error(
            server.post_text("/events", not_json).await,
            400,
            "InvalidBatchError",
        )
        .await;
    }
    assert_eq!(server.logged().len(), 4, "nothing of a refused batch is kept");

    for not_a_batch in [json!([{"a": 1}]), json!({"purchases": {"price": 5}}), json!("x")] {
        assert_error(
            server.post("/events", &not_a_batch).await,
            400,
            "InvalidBatchError",
        )
        .await;
    }
}

#[tokio::test]
async fn the_image_beacon_accepts_every_client_encoding() {
    let server = TestServer::start().await;
    let key = &server.project.write_key;
    // Bytes chosen so that standard base64 contains '+' and '/'.
    let event = json!({"path": "/a?b=c>>>", "n": "~~~??>"});
    let raw = event.to_string();
    let standard = STANDARD.encode(&raw);
    assert!(standard.contains('+') || standard.contains('/'), "{standard}");
    let encodings = [
        // keen-tracking: standard base64, then encodeURIComponent.
        form_escape(&standard),
        // Python: standard base64, not escaped ('+' arrives as a space).
        standard.clone(),
        // Ruby: URL-safe, here without padding.
        URL_SAFE_NO_PAD.encode(&raw),
    ];
    for data in &encodings {
        let url = format!(
            "{}?api_key={key}&data={data}&modified=1&c=clv1",
            server.project_url("/events/pageviews")
        );
        let response = server.http.get(url).send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["content-type"], "image/gif");
        assert_eq!(response.headers()["cache-control"], "no-store");
        let gif = response.bytes().await.unwrap();
        assert_eq!(gif.len(), 43);
        assert_eq!(&gif[..6], b"GIF89a");
    }
    let logged = server.logged();
    assert_eq!(logged.len(), 3);
    for (_, e) in &logged {
        assert_eq!((&e["path"], &e["n"]), (&event["path"], &event["n"]));
    }

    let redirect = format!(
        "{}?api_key={key}&data={}&redirect={}",
        server.project_url("/events/clicks"),
        form_escape(&standard),
        form_escape("https://example.com/landing?x=1")
    );
    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = no_follow.get(redirect).send().await.unwrap();
    assert_eq!(response.status(), 302);
    assert_eq!(response.headers()["location"], "https://example.com/landing?x=1");

    let get = |query: String| {
        server
            .http
            .get(format!(
                "{}?api_key={key}&{query}",
                server.project_url("/events/clicks")
            ))
            .send()
    };
    assert_error(
        get(format!("data={standard}&redirect=javascript:alert(1)"))
            .await
            .unwrap(),
        400,
        "InvalidParameterError",
    )
    .await;
    assert_error(get("data=%%%%".into()).await.unwrap(), 400, "InvalidEventError").await;
    assert_error(
        get(format!("data={}", STANDARD.encode("not json")))
            .await
            .unwrap(),
        400,
        "InvalidEventError",
    )
    .await;
    assert_error(
        get(String::new()).await.unwrap(),
        400,
        "MissingRequiredPropertyError",
    )
    .await;
    assert_eq!(server.logged().len(), 4, "only the redirect event was added");
}

fn form_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn beacons_sent_as_text_plain_and_cors_preflights_work() {
    let server = TestServer::start().await;
    let url = format!(
        "{}?api_key={}",
        server.project_url("/events/beacons"),
        server.project.write_key
    );
    let response = server
        .http
        .post(url)
        .header("Content-Type", "text/plain;charset=UTF-8")
        .body(r#"{"via": "sendBeacon"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(status_json(response).await, (201, json!({"created": true})));

    let preflight = server
        .http
        .request(reqwest::Method::OPTIONS, server.project_url("/events/beacons"))
        .header("Origin", "https://shop.example.com")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type,keen-sdk",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    let headers = preflight.headers();
    assert_eq!(headers["access-control-allow-origin"], "*");
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for h in ["authorization", "content-type", "keen-sdk"] {
        assert!(allowed.contains(h), "{allowed}");
    }
    assert!(
        headers["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
}

#[tokio::test]
async fn keys_and_projects_are_checked_on_every_write() {
    let server = TestServer::start().await;
    let other = {
        let response = server
            .http
            .post(format!("{}/3.0/projects", server.base))
            .header("Authorization", ADMIN_KEY)
            .json(&json!({"name": "other"}))
            .send()
            .await
            .unwrap();
        let (status, body) = status_json(response).await;
        assert_eq!(status, 201, "{body}");
        body
    };
    let url = server.project_url("/events/c");
    let send = |key: Option<&str>, param: Option<&str>| {
        let url = match param {
            Some(p) => format!("{url}?api_key={p}"),
            None => url.clone(),
        };
        let mut request = server.http.post(url).json(&json!({"a": 1}));
        if let Some(key) = key {
            request = request.header("Authorization", key);
        }
        request.send()
    };
    let p = &server.project;
    assert_eq!(send(Some(&p.master_key), None).await.unwrap().status(), 201);
    assert_eq!(send(None, Some(&p.write_key)).await.unwrap().status(), 201);
    assert_error(send(None, None).await.unwrap(), 401, "InvalidApiKeyError").await;
    assert_error(
        send(Some("0123ABCD"), None).await.unwrap(),
        401,
        "InvalidApiKeyError",
    )
    .await;
    assert_error(
        send(Some(&p.read_key), None).await.unwrap(),
        401,
        "InsufficientPermissionsError",
    )
    .await;
    assert_error(
        send(Some(other["write_key"].as_str().unwrap()), None)
            .await
            .unwrap(),
        401,
        "InvalidApiKeyError",
    )
    .await;
    // The header wins over the parameter.
    assert_error(
        send(Some(&p.read_key), Some(&p.write_key)).await.unwrap(),
        401,
        "InsufficientPermissionsError",
    )
    .await;

    server
        .tally
        .catalog()
        .set_key_active(&p.id, &p.write_key, false)
        .unwrap();
    assert_error(
        send(Some(&p.write_key), None).await.unwrap(),
        401,
        "InvalidApiKeyError",
    )
    .await;
    server
        .tally
        .catalog()
        .set_key_active(&p.id, &p.write_key, true)
        .unwrap();
    assert_eq!(send(Some(&p.write_key), None).await.unwrap().status(), 201);

    for project in ["000000000000000000000000", "not-a-project"] {
        let response = server
            .http
            .post(format!("{}/3.0/projects/{project}/events/c", server.base))
            .header("Authorization", &p.write_key)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_error(response, 404, "ResourceNotFoundError").await;
    }
    // The other project's own key writes to it.
    let response = server
        .http
        .post(format!(
            "{}/3.0/projects/{}/events/c",
            server.base,
            other["id"].as_str().unwrap()
        ))
        .header("Authorization", other["write_key"].as_str().unwrap())
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_eq!(server.logged().len(), 4);
}

#[tokio::test]
async fn bad_input_gets_keens_errors_and_loses_nothing_accepted_before() {
    let server = TestServer::start_with(|c| c.ingest.max_body_bytes = 2 * 1024 * 1024).await;
    let url = server.project_url("/events/c");
    let key = server.project.write_key.clone();
    let raw = |body: Vec<u8>, content_type: &'static str| {
        server
            .http
            .post(url.clone())
            .header("Authorization", key.clone())
            .header("Content-Type", content_type)
            .body(body)
            .send()
    };
    let mut accepted = 0;
    for n in 0..5 {
        assert_eq!(server.post("/events/c", &json!({"n": n})).await.status(), 201);
        accepted += 1;
    }
    let json_type = "application/json";
    let deep = format!("{}1{}", "{\"a\":".repeat(101), "}".repeat(101));
    let very_deep = format!("{}1{}", "[".repeat(100_000), "]".repeat(100_000));
    let cases: Vec<(Vec<u8>, &str, u16, &str)> = vec![
        (b"{\"a\":".to_vec(), json_type, 400, "InvalidEventError"),
        (b"[1,2]".to_vec(), json_type, 400, "InvalidEventError"),
        (b"42".to_vec(), json_type, 400, "InvalidEventError"),
        (
            b"{\"a\":\"\xff\xfe\"}".to_vec(),
            json_type,
            400,
            "InvalidEventError",
        ),
        (deep.into_bytes(), json_type, 400, "InvalidEventError"),
        (very_deep.into_bytes(), json_type, 400, "InvalidEventError"),
        (
            vec![b' '; 3 * 1024 * 1024],
            json_type,
            413,
            "RequestTooLargeError",
        ),
        (
            b"{}".to_vec(),
            "multipart/form-data; boundary=x",
            415,
            "UnsupportedContentTypeError",
        ),
        (
            b"{}".to_vec(),
            "application/json; charset=latin-1",
            415,
            "UnsupportedContentTypeError",
        ),
    ];
    for (body, content_type, status, code) in cases {
        assert_error(raw(body, content_type).await.unwrap(), status, code).await;
    }
    let big_event = json!({"a": "x".repeat(9_000), "b": vec!["y".repeat(9_000); 100]});
    assert_error(
        server.post("/events/c", &big_event).await,
        400,
        "InvalidEventError",
    )
    .await;
    assert_error(
        server.post("/events/_hidden", &json!({})).await,
        400,
        "InvalidCollectionNameError",
    )
    .await;
    assert_error(
        server.post("/events/a$b", &json!({})).await,
        400,
        "InvalidCollectionNameError",
    )
    .await;
    assert_error(
        server
            .post(&format!("/events/{}", "c".repeat(65)), &json!({}))
            .await,
        400,
        "InvalidCollectionNameError",
    )
    .await;
    assert_error(
        server.post("/events/c", &json!({"a.b": 1})).await,
        400,
        "InvalidPropertyNameError",
    )
    .await;
    assert_error(
        server.post("/events/c", &json!({"s": "x".repeat(10_000)})).await,
        400,
        "InvalidPropertyValueError",
    )
    .await;
    assert_error(
        server.post("/events/c", &json!({"keen": "x"})).await,
        400,
        "NamespaceTypeError",
    )
    .await;
    assert_error(
        server.post("/events/c", &json!({"keen": {"secret": 1}})).await,
        400,
        "InvalidKeenNamespaceProperty",
    )
    .await;
    assert_error(
        server
            .post("/events/c", &json!({"keen": {"timestamp": "noon"}}))
            .await,
        400,
        "InvalidPropertyValueError",
    )
    .await;
    let bad_addon = json!({"keen": {"addons": [{"name": "keen:ip_to_geo", "input": {}, "output": "geo"}]}});
    assert_error(
        server.post("/events/c", &bad_addon).await,
        400,
        "InvalidPropertyValueError",
    )
    .await;
    let under_keen = json!({"keen": {"addons": [{"name": "keen:ua_parser", "input": {"ua_string": "ua"}, "output": "keen.ua"}]}});
    assert_error(
        server.post("/events/c", &under_keen).await,
        400,
        "InvalidPropertyValueError",
    )
    .await;
    let too_many: Vec<Value> = (0..50_001).map(|_| json!({})).collect();
    assert_error(
        server.post("/events", &json!({"c": too_many})).await,
        413,
        "RequestTooLargeError",
    )
    .await;

    let good_addons = json!({"ip": "1.2.3.4", "keen": {"addons": [
        {"name": "keen:ip_to_geo", "input": {"ip": "ip", "remove_ip_property": true}, "output": "geo"}]}});
    assert_eq!(server.post("/events/c", &good_addons).await.status(), 201);
    accepted += 1;

    let logged = server.logged();
    assert_eq!(logged.len(), accepted);
    assert_eq!(
        logged.last().unwrap().1["keen"]["addons"][0]["name"],
        "keen:ip_to_geo",
        "add-ons are carried with the event"
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("tally_events_rejected_total{reason=\"InvalidEventError\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("tally_events_accepted_total 6"), "{metrics}");
}

#[tokio::test]
async fn placeholders_use_the_socket_address_unless_a_proxy_is_trusted() {
    let event = json!({"ip": "${keen.ip}", "nested": {"ua": "${keen.user_agent}"}, "keep": "${keen.ip} "});
    let send = |server: &TestServer| {
        server
            .http
            .post(server.project_url("/events/visits"))
            .header("Authorization", &server.project.write_key)
            .header("User-Agent", "Mozilla/5.0 (test)")
            .header("X-Forwarded-For", "198.51.100.7, 203.0.113.9")
            .json(&event)
            .send()
    };
    let direct = TestServer::start().await;
    assert_eq!(send(&direct).await.unwrap().status(), 201);
    let stored = &direct.logged()[0].1;
    assert_eq!(
        stored["ip"], "127.0.0.1",
        "X-Forwarded-For is not trusted by default"
    );
    assert_eq!(stored["nested"]["ua"], "Mozilla/5.0 (test)");
    assert_eq!(stored["keep"], "${keen.ip} ");

    let proxied = TestServer::start_with(|c| c.http.trusted_proxy_hops = 1).await;
    assert_eq!(send(&proxied).await.unwrap().status(), 201);
    assert_eq!(proxied.logged()[0].1["ip"], "203.0.113.9");
}

#[tokio::test]
async fn uniqueness_tokens_deduplicate_per_collection_and_survive_restarts() {
    let server = TestServer::start().await;
    let event = |token: &str| json!({"order": 1, "keen": {"uniqueness_token": token}});
    assert_eq!(
        status_json(server.post("/events/orders", &event("t-1")).await).await,
        (201, json!({"created": true}))
    );
    assert_eq!(
        status_json(server.post("/events/orders", &event("t-1")).await).await,
        (201, json!({"created": true, "duplicate": true}))
    );
    assert_eq!(
        server.post("/events/refunds", &event("t-1")).await.status(),
        201,
        "another collection"
    );
    let (_, body) = status_json(
        server
            .post(
                "/events",
                &json!({"orders": [event("t-1"), event("t-2"), event("t-2")]}),
            )
            .await,
    )
    .await;
    assert_eq!(
        body["orders"],
        json!([{"success": true, "duplicate": true}, {"success": true}, {"success": true, "duplicate": true}])
    );
    assert_eq!(server.logged().len(), 3);
    // A batch whose second event is not JSON is refused whole (the split does not parse events;
    // the ingestor finds it before reserving tokens): nothing is logged, and the token of its
    // first event is not held.
    let not_json = r#"{"orders":[{"order":1,"keen":{"uniqueness_token":"t-9"}},{"order":}]}"#;
    assert_error(
        server.post_text("/events", not_json).await,
        400,
        "InvalidBatchError",
    )
    .await;
    assert_eq!(server.logged().len(), 3);
    assert_eq!(
        status_json(server.post("/events/orders", &event("t-9")).await).await,
        (201, json!({"created": true}))
    );
    assert_eq!(server.logged().len(), 4);

    let server = server.restart().await;
    assert_eq!(
        status_json(server.post("/events/orders", &event("t-2")).await)
            .await
            .1["duplicate"],
        true
    );
    assert_eq!(
        status_json(server.post("/events/orders", &event("t-3")).await)
            .await
            .1,
        json!({"created": true})
    );
    assert_eq!(server.logged().len(), 5);
}

#[tokio::test]
async fn projects_are_created_over_http_with_the_admin_key_only() {
    let server = TestServer::start().await;
    let create = |key: Option<&str>, body: Value| {
        let mut request = server
            .http
            .post(format!("{}/3.0/projects", server.base))
            .json(&body);
        if let Some(key) = key {
            request = request.header("Authorization", key);
        }
        request.send()
    };
    let (status, created) =
        status_json(create(Some(ADMIN_KEY), json!({"name": "shop"})).await.unwrap()).await;
    assert_eq!(status, 201);
    assert_eq!(created["name"], "shop");
    assert!(is_event_id(&created["id"]), "24 lowercase hex digits: {created}");
    for key in ["master_key", "write_key", "read_key"] {
        assert!(
            created[key].as_str().unwrap().len() >= 32,
            "at least 128 bits: {created}"
        );
    }
    let response = server
        .http
        .post(format!(
            "{}/3.0/projects/{}/events/c",
            server.base,
            created["id"].as_str().unwrap()
        ))
        .header("Authorization", created["write_key"].as_str().unwrap())
        .json(&json!({"x": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);

    assert_error(
        create(None, json!({"name": "x"})).await.unwrap(),
        401,
        "InvalidApiKeyError",
    )
    .await;
    let master = server.project.master_key.clone();
    assert_error(
        create(Some(&master), json!({"name": "x"})).await.unwrap(),
        401,
        "AdminOnlyEndpointError",
    )
    .await;
    assert_error(
        create(Some(ADMIN_KEY), json!({})).await.unwrap(),
        400,
        "MissingRequiredPropertyError",
    )
    .await;
    assert_error(
        create(Some(ADMIN_KEY), json!({"name": ""})).await.unwrap(),
        400,
        "InvalidParameterError",
    )
    .await;

    let no_admin = TestServer::start_with(|c| c.admin_key = None).await;
    let response = no_admin
        .http
        .post(format!("{}/3.0/projects", no_admin.base))
        .header("Authorization", ADMIN_KEY)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_error(response, 401, "AdminOnlyEndpointError").await;
}

#[tokio::test]
async fn operational_endpoints_answer() {
    let server = TestServer::start().await;
    server.post("/events/c", &json!({"a": 1})).await;
    let health = server
        .http
        .get(format!("{}/healthz", server.base))
        .send()
        .await
        .unwrap();
    let (status, body) = status_json(health).await;
    assert_eq!((status, &body["status"]), (200, &json!("ok")));
    assert!(body["log"]["durable_end"].as_u64().unwrap() > 0);
    let ping = server
        .http
        .post(format!("{}/ping", server.base))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(ping.status(), 204);
    let metrics = server.metrics().await;
    for name in [
        "tally_http_requests_total",
        "tally_events_accepted_total",
        "tally_log_fsync_seconds_bucket",
        "tally_log_size_bytes",
        "tally_log_consumer_lag_bytes",
        "tally_log_group_commit_records",
    ] {
        assert!(metrics.contains(name), "missing {name}:\n{metrics}");
    }
    assert_error(
        server
            .http
            .get(format!("{}/nowhere", server.base))
            .send()
            .await
            .unwrap(),
        404,
        "ResourceNotFoundError",
    )
    .await;
    let wrong_method = server
        .http
        .delete(server.project_url("/events"))
        .send()
        .await
        .unwrap();
    assert_error(wrong_method, 405, "MethodNotAllowedError").await;
}

#[tokio::test]
async fn over_the_log_bound_ingest_answers_503_and_keeps_what_it_accepted() {
    // No process stage consumes the log, so it falls behind by every event accepted.
    let server = TestServer::start_with(|c| {
        c.log.max_unconsumed_bytes = 2_000;
        c.process.enabled = false;
    })
    .await;
    let mut accepted = 0;
    let mut refused = None;
    for n in 0..100 {
        let response = server
            .post("/events/c", &json!({"n": n, "pad": "x".repeat(100)}))
            .await;
        if response.status() == 201 {
            accepted += 1;
        } else {
            refused = Some(response);
            break;
        }
    }
    let response = refused.expect("the bound is reached");
    assert_eq!(response.status(), 503);
    assert!(response.headers().get("retry-after").is_some());
    assert_error(response, 503, "ServiceUnavailableError").await;
    assert!(accepted > 0);
    assert_eq!(server.logged().len(), accepted);
    assert!(server.enriched().is_empty());

    // With the stage back, it catches up on everything accepted and ingest answers again.
    let server = server.restart_with(|c| c.process.enabled = true).await;
    let enriched = server.wait_enriched(accepted).await;
    let mut numbers: Vec<u64> = enriched
        .iter()
        .map(|e| e["event"]["n"].as_u64().unwrap())
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (0..accepted as u64).collect::<Vec<_>>());
    let mut answered = None;
    for _ in 0..200 {
        let response = server.post("/events/c", &json!({"n": "after"})).await;
        if response.status() == 201 {
            answered = Some(());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(
        answered.is_some(),
        "ingest accepts again once the stage has consumed the log"
    );
}

/// The process stage's and the store's threads keep off the CPU kept for ingest while ingest is
/// busy (`process.reserved_ingest_cpus`, 1 by default; the other tests' servers set 0), and use
/// every CPU while it is idle.
#[tokio::test]
async fn background_threads_keep_off_the_cpu_kept_for_ingest_while_it_is_busy() {
    let server = TestServer::start_with(|c| {
        c.process.reserved_ingest_cpus = tally_core::config::ProcessConfig::default().reserved_ingest_cpus
    })
    .await;
    let allowed = tally_core::worker::allowed_cpus();
    let Some(plan) = server.tally.background_cpus().cloned() else {
        assert!(allowed.len() < 2, "with two CPUs or more, one is kept for ingest");
        return;
    };
    let kept_off = allowed[1..].to_vec();
    // Each thread following the plan (at least the stage's and the store's) is on `want`, or
    // has ended. Enrichment threads move when they next get work, so an idle one may still be
    // where it was: `all` says whether to count them.
    let all_on = |want: &[usize], all: bool| {
        let followers = plan.followers();
        followers.len() >= 2
            && followers.iter().all(|tid| {
                let task = format!("/proc/self/task/{tid}");
                let (Ok(comm), Ok(status)) = (
                    std::fs::read_to_string(format!("{task}/comm")),
                    std::fs::read_to_string(format!("{task}/status")),
                ) else {
                    return true;
                };
                if !all && comm.trim().starts_with("tally-enrich") {
                    return true;
                }
                let list = status
                    .lines()
                    .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                    .expect("Linux reports each thread's CPUs");
                parse_cpu_list(list.trim()) == want
            })
    };
    let wait_for = |want: Vec<usize>, all: bool| {
        let all_on = &all_on;
        async move {
            for _ in 0..200 {
                if all_on(&want, all) {
                    return true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            false
        }
    };
    assert!(wait_for(allowed.clone(), true).await, "idle: every CPU");

    let sending = Arc::new(AtomicBool::new(true));
    let sender = {
        let (http, url, key, sending) = (
            server.http.clone(),
            server.project_url("/events/c"),
            server.project.write_key.clone(),
            sending.clone(),
        );
        tokio::spawn(async move {
            while sending.load(Ordering::Relaxed) {
                let response = http
                    .post(&url)
                    .header("Authorization", &key)
                    .json(&json!({"n": 1}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 201);
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
    };
    let busy = wait_for(kept_off.clone(), true).await;
    sending.store(false, Ordering::Relaxed);
    sender.await.unwrap();
    assert!(busy, "busy: off the first CPU ({kept_off:?})");
    assert!(
        wait_for(allowed.clone(), false).await,
        "idle again: every CPU for the stage and the store"
    );
}

/// A kernel CPU list such as `0-2,5`.
fn parse_cpu_list(list: &str) -> Vec<usize> {
    list.split(',')
        .filter(|part| !part.is_empty())
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap(),
            None => {
                let cpu = part.parse::<usize>().unwrap();
                cpu..=cpu
            }
        })
        .collect()
}

/// `http.shards` (the default) and one work-stealing runtime: every connection is served (each
/// client below has its own, so they land on every shard), the peer address still reaches
/// `${keen.ip}`, a batch (ingested off the shard) and a query are answered, and a restart shuts
/// the serving threads down gracefully.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shards_or_one_runtime_every_connection_is_served_and_shutdown_is_graceful() {
    for shards in [true, false] {
        served_by_every_connection(shards).await;
    }
}

async fn served_by_every_connection(shards: bool) {
    let server = TestServer::start_with(|c| {
        c.http.shards = shards;
        c.http.runtime_threads = 3;
    })
    .await;
    const CLIENTS: usize = 7;
    const EVENTS_EACH: usize = 15;
    let mut sends = Vec::new();
    for client in 0..CLIENTS {
        // A client of its own: its own connection.
        let http = reqwest::Client::new();
        let url = server.project_url("/events/shards");
        let key = server.project.write_key.clone();
        sends.push(tokio::spawn(async move {
            for n in 0..EVENTS_EACH {
                let response = http
                    .post(&url)
                    .header("Authorization", &key)
                    .json(&json!({"client": client, "n": n, "ip": "${keen.ip}"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 201, "shards: {shards}");
            }
        }));
    }
    for send in sends {
        send.await.unwrap();
    }
    let batch =
        json!({"shards": [{"client": CLIENTS, "n": 0}, {"client": CLIENTS, "n": 1}, "not an object"]});
    let (status, answer) = status_json(server.post("/events", &batch).await).await;
    assert_eq!(status, 200, "shards: {shards}: {answer}");
    assert_eq!(answer["shards"][0]["success"], true);
    assert_eq!(answer["shards"][2]["success"], false);
    let total = CLIENTS * EVENTS_EACH + 2;

    let logged = server.logged();
    assert_eq!(logged.len(), total, "shards: {shards}");
    let mut seen: Vec<(u64, u64)> = logged
        .iter()
        .map(|(_, e)| (e["client"].as_u64().unwrap(), e["n"].as_u64().unwrap()))
        .collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), total, "every event once");
    assert!(
        logged
            .iter()
            .filter(|(_, e)| e["client"].as_u64() != Some(CLIENTS as u64))
            .all(|(_, e)| e["ip"] == "127.0.0.1")
    );

    server.wait_enriched(total).await;
    let count = server
        .http
        .get(server.project_url("/queries/count"))
        .query(&[
            ("api_key", server.project.read_key.as_str()),
            ("event_collection", "shards"),
            ("timeframe", "this_1_days"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(count.status(), 200);
    assert_eq!(count.json::<Value>().await.unwrap()["result"], json!(total));

    let server = server.restart().await;
    assert_eq!(server.logged().len(), total);
    let response = server
        .post("/events/shards", &json!({"client": CLIENTS, "n": 2}))
        .await;
    assert_eq!(response.status(), 201);
}

/// A request still in flight when the grace period ends does not hold up shutdown, on shards
/// or on one runtime: here a body that never arrives in full. On shards its connection is cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_a_request_that_outlasts_the_grace_period() {
    use tokio::io::AsyncWriteExt;
    for shards in [true, false] {
        let server = TestServer::start_with(|c| {
            c.http.shards = shards;
            c.http.shutdown_grace_secs = 1;
        })
        .await;
        let mut stream = tokio::net::TcpStream::connect(server.tally.local_addr())
            .await
            .unwrap();
        let head = format!(
            "POST /3.0/projects/{}/events/c HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"a\":",
            server.project.id, server.project.write_key
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        // Another connection is served meanwhile.
        let health = reqwest::get(format!("{}/healthz", server.base)).await.unwrap();
        assert_eq!(health.status(), 200);
        // A hang guard, not a timing assertion.
        let stopped =
            tokio::time::timeout(std::time::Duration::from_secs(120), server.tally.shutdown()).await;
        stopped
            .expect("shutdown finished after the grace period")
            .unwrap();
        if shards {
            // The shards were stopped, and the stuck connection with them: the client reads the
            // end of the stream (or a reset), not silence. (On one runtime, connections live
            // on as the runtime's tasks, which in a server end with the process.)
            use tokio::io::AsyncReadExt;
            let mut rest = Vec::new();
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(120), stream.read_to_end(&mut rest))
                    .await
                    .expect("the server closed the connection it could not finish");
            if read.is_ok() {
                let answer = String::from_utf8_lossy(&rest);
                assert!(
                    !answer.contains("201"),
                    "an incomplete event was not acknowledged: {answer}"
                );
            }
        }
        drop(stream);
    }
}

/// The connections and requests in flight that the log's writer reads (`tally_core::senders`)
/// are counted on both ways of serving, and uncounted when the connections close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_and_requests_in_flight_are_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    fn gauge(metrics: &str, name: &str) -> u64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
    }
    for shards in [true, false] {
        let server = TestServer::start_with(|c| c.http.shards = shards).await;
        // The test client's own connections.
        let before = gauge(&server.metrics().await, "tally_http_connections_open");
        let mut idle = Vec::new();
        for _ in 0..20 {
            let mut stream = tokio::net::TcpStream::connect(server.tally.local_addr())
                .await
                .unwrap();
            stream
                .write_all(b"GET /ping HTTP/1.1\r\nHost: t\r\n\r\n")
                .await
                .unwrap();
            let mut answer = [0u8; 12];
            stream.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"HTTP/1.1 204", "served before it is counted idle");
            idle.push(stream);
        }
        // One request waits for a body that has not arrived: it is in flight.
        let mut waiting = tokio::net::TcpStream::connect(server.tally.local_addr())
            .await
            .unwrap();
        let head = format!(
            "POST /3.0/projects/{}/events/c HTTP/1.1\r\nHost: t\r\nAuthorization: {}\r\n\
             Content-Type: application/json\r\nContent-Length: 10\r\n\r\n{{",
            server.project.id, server.project.write_key
        );
        waiting.write_all(head.as_bytes()).await.unwrap();
        // A hang guard, not a timing assertion: the waiting request reaches the handler.
        let mut metrics = server.metrics().await;
        for _ in 0..500 {
            if gauge(&metrics, "tally_http_requests_in_flight") >= 2 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            metrics = server.metrics().await;
        }
        assert!(
            gauge(&metrics, "tally_http_connections_open") >= before + 21,
            "20 idle and one waiting (shards {shards}):\n{metrics}"
        );
        assert_eq!(
            gauge(&metrics, "tally_http_requests_in_flight"),
            2,
            "the waiting request and this scrape (shards {shards})"
        );
        drop(idle);
        waiting.write_all(b"\"a\": 1}  ").await.unwrap();
        let mut answer = [0u8; 12];
        waiting.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"HTTP/1.1 201");
        drop(waiting);
        // Closed connections are uncounted once the server sees them close (a hang guard).
        for _ in 0..500 {
            metrics = server.metrics().await;
            if gauge(&metrics, "tally_http_connections_open") <= before + 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert!(
            gauge(&metrics, "tally_http_connections_open") <= before + 1,
            "shards {shards}:\n{metrics}"
        );
        assert_eq!(gauge(&metrics, "tally_http_requests_in_flight"), 1, "this scrape");
    }
}
