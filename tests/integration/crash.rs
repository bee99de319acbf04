//! Crash test: `kill -9` the real binary during sustained concurrent ingest, restart it, and
//! check that every acknowledged event is in the log exactly once and nothing half-written is.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{read_log, tally_bin};

struct Running {
    child: Child,
    base: String,
}

fn start(data_dir: &Path) -> Running {
    let mut child = Command::new(tally_bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir)
        // Small segments, so that the test crosses several rolls.
        .env("TALLY_LOG__SEGMENT_BYTES", "262144")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("the banner").unwrap();
    let base = first.rsplit(' ').next().unwrap().to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "{first}");
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Running { child, base }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_ingest_loses_and_duplicates_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(tally_bin())
        .args(["project", "create", "crash", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let project: Value = serde_json::from_slice(&output.stdout).unwrap();
    let (id, key) = (
        project["id"].as_str().unwrap().to_string(),
        project["write_key"].as_str().unwrap().to_string(),
    );

    let mut server = start(dir.path());
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let http = reqwest::Client::new();
    let mut writers = Vec::new();
    for writer in 0..16 {
        let (http, acked, base, id, key) = (
            http.clone(),
            acked.clone(),
            server.base.clone(),
            id.clone(),
            key.clone(),
        );
        writers.push(tokio::spawn(async move {
            for n in 0.. {
                let tag = format!("w{writer}-{n}");
                let result = if n % 4 == 0 {
                    // A batch of three events.
                    let events: Vec<Value> = (0..3)
                        .map(|i| json!({"tag": format!("{tag}-{i}"), "pad": "x".repeat(200)}))
                        .collect();
                    http.post(format!("{base}/3.0/projects/{id}/events"))
                        .header("Authorization", &key)
                        .json(&json!({"crash": events}))
                        .send()
                        .await
                        .map(|r| {
                            (
                                r.status().as_u16(),
                                (0..3).map(|i| format!("{tag}-{i}")).collect::<Vec<_>>(),
                            )
                        })
                } else {
                    http.post(format!("{base}/3.0/projects/{id}/events/crash"))
                        .header("Authorization", &key)
                        .json(&json!({"tag": tag, "keen": {"uniqueness_token": tag}}))
                        .send()
                        .await
                        .map(|r| (r.status().as_u16(), vec![tag.clone()]))
                };
                match result {
                    Ok((200 | 201, tags)) => acked.lock().unwrap().extend(tags),
                    Ok((status, _)) => panic!("unexpected status {status}"),
                    Err(_) => return, // the server is gone
                }
            }
        }));
    }
    // Let ingest run, then kill -9 in the middle of it.
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if acked.lock().unwrap().len() >= 2_000 {
            break;
        }
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    for writer in writers {
        writer.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 2_000);

    // Restart: recovery cuts any torn tail; every record left must decode (read_log asserts it).
    let mut server = start(dir.path());
    let logged = read_log(dir.path());
    let mut counts: HashMap<String, usize> = HashMap::new();
    for (_, event) in &logged {
        *counts
            .entry(event["tag"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    for tag in &acked {
        assert_eq!(
            counts.get(tag),
            Some(&1),
            "acknowledged event {tag} must be logged exactly once"
        );
    }
    assert!(counts.values().all(|n| *n == 1), "no event is logged twice");
    println!(
        "crash test: {} acknowledged, {} logged (the rest were in flight at the kill)",
        acked.len(),
        logged.len()
    );

    // Uniqueness tokens of acknowledged events are remembered across the crash (rebuilt from the log).
    let token = acked.iter().find(|t| t.matches('-').count() == 1).unwrap();
    let response = http
        .post(format!("{}/3.0/projects/{id}/events/crash", server.base))
        .header("Authorization", &key)
        .json(&json!({"tag": token, "keen": {"uniqueness_token": token}}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["duplicate"], true);
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}
