//! Crash tests: `kill -9` the real binary during sustained concurrent ingest, restart it, and
//! check that every acknowledged event is in the log exactly once and nothing half-written is;
//! and `kill -9` it while the event store flushes and merges, and check that after restart the
//! store holds exactly the events of the log, each once.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{read_log, serve_child, tally_bin};

struct Running {
    child: Child,
    base: String,
}

impl Drop for Running {
    /// A failing test must not leave a server behind.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tally project create crash`: `{"id", "master_key", "write_key", "read_key", ...}`.
fn create_project(data_dir: &Path) -> Value {
    let output = Command::new(tally_bin())
        .args(["project", "create", "crash", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap();
    serde_json::from_slice(&output.stdout).unwrap()
}

fn start(data_dir: &Path) -> Running {
    start_with(data_dir, &[])
}

fn start_with(data_dir: &Path, env: &[(&str, &str)]) -> Running {
    // Small segments, so that the test crosses several rolls.
    let mut env = env.to_vec();
    env.insert(0, ("TALLY_LOG__SEGMENT_BYTES", "262144"));
    let (child, base) = serve_child(data_dir, &[], &env);
    Running { child, base }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_ingest_loses_and_duplicates_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let project = create_project(dir.path());
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

/// The store flushes every 20 ms and merges as soon as two small segments exist, so kills land
/// in the middle of flushes and merges.
const BUSY_STORE: [(&str, &str); 3] = [
    ("TALLY_STORE__FLUSH_INTERVAL_MS", "20"),
    ("TALLY_STORE__MERGE_MIN_SEGMENTS", "2"),
    ("TALLY_STORE__MERGE_TARGET_ROWS", "3000"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_store_flushes_and_merges_keeps_exactly_the_logged_events() {
    let dir = tempfile::tempdir().unwrap();
    let project = create_project(dir.path());
    let id = project["id"].as_str().unwrap().to_string();
    let (write_key, read_key) = (
        project["write_key"].as_str().unwrap().to_string(),
        project["read_key"].as_str().unwrap().to_string(),
    );
    let http = reqwest::Client::new();
    let mut sent = 0usize;
    for round in 0..3 {
        let mut server = start_with(dir.path(), &BUSY_STORE);
        let acked = Arc::new(Mutex::new(0usize));
        let mut writers = Vec::new();
        for writer in 0..4 {
            let (http, acked, base, id, key) = (
                http.clone(),
                acked.clone(),
                server.base.clone(),
                id.clone(),
                write_key.clone(),
            );
            writers.push(tokio::spawn(async move {
                for n in 0.. {
                    let events: Vec<Value> = (0..20)
                        .map(|i| json!({"tag": format!("r{round}-w{writer}-{n}-{i}"), "n": i}))
                        .collect();
                    let response = http
                        .post(format!("{base}/3.0/projects/{id}/events"))
                        .header("Authorization", &key)
                        .json(&json!({"crash": events}))
                        .send()
                        .await;
                    match response {
                        Ok(r) if r.status() == 200 => *acked.lock().unwrap() += 20,
                        Ok(r) => panic!("unexpected status {}", r.status()),
                        Err(_) => return,
                    }
                }
            }));
        }
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if *acked.lock().unwrap() >= 3_000 {
                break;
            }
        }
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        for writer in writers {
            writer.await.unwrap();
        }
        sent += *acked.lock().unwrap();

        // A start that writes nothing before it is killed: its idle flushes must keep the
        // store's log position.
        let mut idle = start_with(dir.path(), &BUSY_STORE);
        tokio::time::sleep(Duration::from_millis(200)).await;
        idle.child.kill().unwrap();
        idle.child.wait().unwrap();
    }

    // Restart with the store quiet; the process stage catches up from the store's position.
    let mut server = start(dir.path());
    let logged = read_log(dir.path());
    assert!(logged.len() >= sent, "every acknowledged event is logged");
    let query = |analysis: &'static str, extra: Value| {
        let (http, base, id, key) = (http.clone(), server.base.clone(), id.clone(), read_key.clone());
        async move {
            let mut body = json!({"event_collection": "crash", "timeframe": {"start": "2000-01-01T00:00:00Z", "end": "2100-01-01T00:00:00Z"}});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let answer: Value = http
                .post(format!("{base}/3.0/projects/{id}/queries/{analysis}"))
                .header("Authorization", &key)
                .json(&body)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            answer["result"].clone()
        }
    };
    // A hang guard while the stage catches up, not a timing assertion.
    let mut stored = 0;
    for _ in 0..3000 {
        stored = query("count", json!({})).await.as_u64().unwrap() as usize;
        if stored >= logged.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let extracted = query("extraction", json!({"property_names": ["tag"]})).await;
    let mut in_store: HashMap<String, usize> = HashMap::new();
    for event in extracted.as_array().unwrap() {
        *in_store
            .entry(event["tag"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let mut in_log: HashMap<String, usize> = HashMap::new();
    for (_, event) in &logged {
        *in_log
            .entry(event["tag"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let logged_twice: Vec<_> = in_log.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(logged_twice.is_empty(), "logged twice: {logged_twice:?}");
    let twice: Vec<_> = in_store.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(twice.is_empty(), "stored twice: {twice:?}");
    let missing: Vec<_> = in_log
        .keys()
        .filter(|t| !in_store.contains_key(*t))
        .take(5)
        .collect();
    assert!(missing.is_empty(), "logged but not stored: {missing:?}");
    let extra: Vec<_> = in_store
        .keys()
        .filter(|t| !in_log.contains_key(*t))
        .take(5)
        .collect();
    assert!(extra.is_empty(), "stored but not logged: {extra:?}");
    assert_eq!(stored, logged.len(), "the store holds every logged event");
    println!(
        "store crash test: 6 kills (3 busy, 3 idle), {sent} acknowledged, {} logged and stored exactly once",
        logged.len()
    );
    server.child.kill().unwrap();
    server.child.wait().unwrap();
}
