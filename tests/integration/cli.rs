//! The `tally` command line: project creation, the data-directory lock, log dump, configuration.

use std::process::Command;

use serde_json::Value;

use crate::support::{TestServer, tally_bin};

#[test]
fn project_create_prints_the_project_and_its_keys_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(tally_bin())
        .args(["project", "create", "shop", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let created: Value = serde_json::from_slice(&output.stdout).unwrap();
    let text = String::from_utf8(output.stdout.clone()).unwrap();
    let positions: Vec<usize> = [
        "\"id\"",
        "\"name\"",
        "\"master_key\"",
        "\"write_key\"",
        "\"read_key\"",
    ]
    .iter()
    .map(|key| text.find(key).unwrap_or_else(|| panic!("{key} missing: {text}")))
    .collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "printed in order: {text}"
    );
    assert_eq!(created.as_object().unwrap().len(), 5);
    assert_eq!(created["name"], "shop");
    let catalog = std::fs::read_to_string(dir.path().join("catalog.json")).unwrap();
    assert!(
        !catalog.contains(created["write_key"].as_str().unwrap()),
        "keys are stored hashed"
    );
}

#[tokio::test]
async fn the_cli_refuses_a_data_dir_a_server_holds_and_dumps_its_log() {
    let server = TestServer::start().await;
    server
        .post("/events/c", &serde_json::json!({"hello": "world"}))
        .await;
    let output = Command::new(tally_bin())
        .args(["project", "create", "x", "--data-dir"])
        .arg(&server.data_dir)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("in use"),
        "{output:?}"
    );

    let output = Command::new(tally_bin())
        .args(["log", "dump", "--data-dir"])
        .arg(&server.data_dir)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["collection"], "c");
    assert_eq!(lines[0]["project_id"], server.project.id.to_string());
    assert_eq!(lines[0]["event"]["hello"], "world");
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tally.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nno_such_setting = 1\n").unwrap();
    let output = output_or_kill(
        Command::new(tally_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(dir.path().join("data")),
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("no_such_setting"), "{stderr}");

    let output = output_or_kill(
        Command::new(tally_bin())
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .env("TALLY_LOG__SEGMENT_BYTES", "not a number"),
    );
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .to_lowercase()
            .contains("segment_bytes"),
        "{output:?}"
    );
}

#[test]
fn roles_and_kafka_settings_that_cannot_work_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let serve = |args: &[&str], env: &[(&str, &str)]| {
        let output = output_or_kill(
            Command::new(tally_bin())
                .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
                .arg(dir.path().join("data"))
                .args(args)
                .envs(env.iter().copied()),
        );
        assert!(!output.status.success(), "{output:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let stderr = serve(&["--role", "reporting"], &[]);
    assert!(
        stderr.contains("is not one of all, ingest, process, query"),
        "{stderr}"
    );
    let stderr = serve(&["--role", "ingest"], &[]);
    assert!(stderr.contains("Kafka as the event log"), "{stderr}");
    let stderr = serve(
        &["--role", "query"],
        &[
            ("TALLY_KAFKA__LOG__ENABLED", "true"),
            ("TALLY_KAFKA__BROKERS", "127.0.0.1:1"),
        ],
    );
    assert!(stderr.contains("--role process,query"), "{stderr}");
    let stderr = serve(&[], &[("TALLY_KAFKA__OUTBOUND__ENABLED", "true")]);
    assert!(stderr.contains("kafka.brokers is empty"), "{stderr}");
    let stderr = serve(
        &[],
        &[
            ("TALLY_KAFKA__BROKERS", "127.0.0.1:1"),
            ("TALLY_KAFKA__OUTBOUND__ENABLED", "true"),
            ("TALLY_KAFKA__SECURITY__SASL_PASSWORD_FILE", "/nonexistent/secret"),
        ],
    );
    assert!(stderr.contains("/nonexistent/secret"), "{stderr}");
}

/// Runs a command that is expected to exit by itself; if it is still running after a generous
/// while (a server that started when it should have refused to), kills it so the test fails
/// instead of hanging.
fn output_or_kill(command: &mut Command) -> std::process::Output {
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let guard = std::thread::spawn(move || {
        if wait.recv_timeout(std::time::Duration::from_secs(60)).is_err() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
    });
    let output = child.wait_with_output().unwrap();
    let _ = done.send(());
    guard.join().unwrap();
    output
}

/// `tally bench ingest` against a server: each phase of the default list sends requests, none
/// gets an error, and the server accepted exactly the events the bench saw acknowledged. One
/// connection and 1 s phases: this checks the load generator, not the server's speed (a paced
/// phase's first request is due one interval in, so it needs a closed-loop rate above 2 req/s).
#[tokio::test]
async fn the_ingest_bench_drives_every_phase_without_errors() {
    let server = TestServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let batches = dir.path().join("batches.jsonl");
    // A collection name that must be percent-encoded in the request's path.
    let lines: Vec<String> = (0..3)
        .map(|i| serde_json::json!({"collection": "page views", "event": {"n": i}}).to_string())
        .collect();
    std::fs::write(&events, lines.join("\n")).unwrap();
    let batch = |k: usize| {
        let orders: Vec<_> = (0..5).map(|i| serde_json::json!({"k": k, "i": i})).collect();
        serde_json::json!({ "orders": orders })
    };
    std::fs::write(&batches, format!("{}\n{}\n", batch(0), batch(1))).unwrap();

    let mut command = Command::new(tally_bin());
    command
        .args(["bench", "ingest", "--addr"])
        .arg(server.base.trim_start_matches("http://"))
        .args(["--project", &server.project.id.to_string()])
        .args(["--write-key", &server.project.write_key])
        .arg("--events")
        .arg(&events)
        .arg("--batches")
        .arg(&batches)
        .args(["--connections", "1", "--seconds", "1"]);
    let output = tokio::task::spawn_blocking(move || output_or_kill(&mut command))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!stdout.contains("first error"), "{stdout}");
    for phase in [
        "ping (204",
        "single event POST",
        "single @ half",
        "batch POST",
        "batch @ half",
    ] {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(phase))
            .unwrap_or_else(|| panic!("no {phase} row: {stdout}"));
        // The phase's name fills the first 26 columns (and may hold spaces); figures follow.
        let columns: Vec<&str> = row[26..].split_whitespace().collect();
        let (rate, errors): (f64, u64) = (columns[0].parse().unwrap(), columns[4].parse().unwrap());
        assert!(rate > 0.0 && errors == 0, "{row}");
    }
    let acknowledged: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("events acknowledged (2xx) in all phases but the pings: "))
        .unwrap_or_else(|| panic!("no total: {stdout}"))
        .parse()
        .unwrap();
    let metrics = server.metrics().await;
    let accepted = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tally_events_accepted_total "))
        .unwrap();
    assert!(acknowledged > 0, "{stdout}");
    assert_eq!(accepted, acknowledged.to_string(), "{stdout}");
    let logged = server.logged();
    assert!(
        logged.iter().any(|(collection, _)| collection == "page views"),
        "{logged:?}"
    );
}
