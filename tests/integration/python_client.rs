//! Keen's own Python client (`keen` from PyPI) against a real Tally: single events, batches and
//! an image beacon.
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
