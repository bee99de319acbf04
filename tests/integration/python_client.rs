//! Keen's own Python client (`keen` from PyPI) against a real Tally: single events, batches, an
//! image beacon, and the access-key calls.
//!
//! The README's test command installs the client into a virtualenv and names its interpreter in
//! `TALLY_TEST_PYTHON`, with `TALLY_REQUIRE_ALL_TESTS=1` so that a missing client fails the run.
//! A plain `cargo test` without it reports the test as skipped.

use std::process::Command;

use serde_json::json;

use crate::support::TestServer;

const SCRIPT: &str = r#"
import sys, urllib.request
from keen.client import KeenClient

base_url, project_id, write_key = sys.argv[1:4]
client = KeenClient(project_id=project_id, write_key=write_key, base_url=base_url)
client.add_event("purchases", {"price": 5, "item": {"name": "hat"}})
client.add_events({"purchases": [{"price": 6}, {"price": 7}], "signups": [{"user": "ada"}]})
# generate_image_beacon calls write_key.decode(), so on Python 3 it needs the key as bytes.
beacon_client = KeenClient(project_id=project_id, write_key=write_key.encode(), base_url=base_url)
# A payload whose standard base64 holds '+' and '/', which this client does not URL-escape.
url = beacon_client.generate_image_beacon("pageviews", {"path": "/a?b=c>>>", "n": "~~~??>"})
assert "+" in url or "/" in url.split("data=")[1], url
response = urllib.request.urlopen(url)
assert response.status == 200, response.status
assert response.headers["Content-Type"] == "image/gif", response.headers
assert len(response.read()) == 43
print("ok")
"#;

fn python() -> Option<String> {
    let candidate = std::env::var("TALLY_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_keen = Command::new(&candidate)
        .args(["-c", "import keen"])
        .output()
        .is_ok_and(|o| o.status.success());
    if has_keen {
        return Some(candidate);
    }
    assert!(
        std::env::var("TALLY_REQUIRE_ALL_TESTS").is_err(),
        "the Python keen client is not installed for {candidate}; scripts/test.sh installs it"
    );
    None
}

#[tokio::test]
async fn keens_python_client_sends_events_batches_and_beacons() {
    let Some(python) = python() else {
        println!("SKIPPED: the Python keen client is not installed (run scripts/test.sh)");
        return;
    };
    let server = TestServer::start().await;
    let (base, id, key) = (
        server.base.clone(),
        server.project.id.to_string(),
        server.project.write_key.clone(),
    );
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .args(["-c", SCRIPT, &base, &id, &key])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let logged = server.logged();
    let summary: Vec<(String, serde_json::Value)> = logged
        .iter()
        .map(|(c, e)| {
            let mut e = e.clone();
            e.as_object_mut().unwrap().remove("keen");
            (c.clone(), e)
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("purchases".into(), json!({"price": 5, "item": {"name": "hat"}})),
            ("purchases".into(), json!({"price": 6})),
            ("purchases".into(), json!({"price": 7})),
            ("signups".into(), json!({"user": "ada"})),
            ("pageviews".into(), json!({"path": "/a?b=c>>>", "n": "~~~??>"})),
        ]
    );
}

/// Keen's access-key calls, through the client: create with a filter, query with the new key
/// (the client's read key), the partial updates that read the key object back and post it
/// whole, revoke, unrevoke, list and delete.
const ACCESS_KEYS_SCRIPT: &str = r#"
import sys, time
from keen.client import KeenClient
from keen import exceptions

base_url, project_id, write_key, master_key = sys.argv[1:5]
admin = KeenClient(project_id=project_id, write_key=write_key, master_key=master_key, base_url=base_url)
admin.add_events({"purchases": [{"customer": {"id": "a"}, "price": 1},
                                {"customer": {"id": "a"}, "price": 2},
                                {"customer": {"id": "b"}, "price": 40}]})
created = admin.create_access_key("customer a", True, ["queries"],
    {"queries": {"filters": [{"property_name": "customer.id", "operator": "eq", "property_value": "a"}]}})
key = created["key"]
assert created["is_active"] is True and created["permitted"] == ["queries"], created

scoped = KeenClient(project_id=project_id, read_key=key, base_url=base_url)
unscoped = KeenClient(project_id=project_id, read_key=master_key, base_url=base_url)
for _ in range(500):
    if unscoped.count("purchases", timeframe="this_1_days") == 3:
        break
    time.sleep(0.01)
assert scoped.sum("purchases", target_property="price", timeframe="this_1_days") == 3
assert unscoped.sum("purchases", target_property="price", timeframe="this_1_days") == 43

renamed = admin.update_access_key_name(key, "customer a, renamed")
assert renamed["name"] == "customer a, renamed", renamed
widened = admin.add_access_key_permissions(key, ["schema"])
assert sorted(widened["permitted"]) == ["queries", "schema"], widened
assert admin.get_access_key(key)["options"]["queries"]["filters"][0]["property_value"] == "a"

admin.revoke_access_key(key)
try:
    scoped.count("purchases", timeframe="this_1_days")
    raise SystemExit("a revoked key still answered")
except exceptions.KeenApiError as e:
    assert "InvalidApiKeyError" in str(e), e
admin.unrevoke_access_key(key)
assert scoped.count("purchases", timeframe="this_1_days") == 2
assert [k["name"] for k in admin.list_access_keys()] == ["customer a, renamed"]
assert admin.delete_access_key(key) is True
assert admin.list_access_keys() == []
print("ok")
"#;

#[tokio::test]
async fn keens_python_client_manages_access_keys() {
    let Some(python) = python() else {
        println!("SKIPPED: the Python keen client is not installed (run scripts/test.sh)");
        return;
    };
    let server = TestServer::start().await;
    let args = [
        server.base.clone(),
        server.project.id.to_string(),
        server.project.write_key.clone(),
        server.project.master_key.clone(),
    ];
    let output = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg("-c")
            .arg(ACCESS_KEYS_SCRIPT)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("ok"),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
