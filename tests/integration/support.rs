//! Test harness: start Tally on port 0 in a temporary data directory, talk to it, read its log.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use tally_core::clock::{Clock, SystemClock};
use tally_core::config::Config;
use tally_core::event::LoggedEvent;
use tally_ingest::log::LogReader;
use tally_server::Tally;
use tally_store::NewProject;

/// The admin key test servers start with.
pub const ADMIN_KEY: &str = "test-admin-key";

/// A running in-process server and what a client needs to talk to it.
pub struct TestServer {
    pub tally: Tally,
    pub config: Config,
    pub base: String,
    pub project: NewProject,
    pub data_dir: PathBuf,
    pub http: reqwest::Client,
    /// The server's clock (a manual one in tests that move time).
    pub clock: Arc<dyn Clock>,
    _dir: Option<tempfile::TempDir>,
}

fn test_config(data_dir: &Path) -> Config {
    Config {
        data_dir: data_dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        admin_key: Some(ADMIN_KEY.to_string()),
        // Small segments: each one is zero-filled in advance.
        log: tally_core::config::LogConfig {
            segment_bytes: 1 << 20,
            ..Default::default()
        },
        // Dozens of servers share this one test process: none keeps a CPU for its own ingest
        // (the test of that setting turns it on for its server).
        process: tally_core::config::ProcessConfig {
            reserved_ingest_cpus: 0,
            ..Default::default()
        },
        ..Config::default()
    }
}

impl TestServer {
    /// A fresh server with default settings.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A fresh server, with `adjust` applied to its configuration.
    pub async fn start_with(adjust: impl FnOnce(&mut Config)) -> Self {
        Self::start_with_clock(Arc::new(SystemClock), adjust).await
    }

    /// A fresh server on `clock`, with `adjust` applied to its configuration.
    pub async fn start_with_clock(clock: Arc<dyn Clock>, adjust: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = test_config(dir.path());
        adjust(&mut config);
        let tally = Tally::start(config.clone(), clock.clone()).await.unwrap();
        let project = tally.bootstrap().expect("first start creates a project").clone();
        Self::wrap(tally, config, project, dir.path().to_path_buf(), Some(dir), clock)
    }

    fn wrap(
        tally: Tally,
        config: Config,
        project: NewProject,
        data_dir: PathBuf,
        dir: Option<tempfile::TempDir>,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            base: format!("http://{}", tally.local_addr()),
            tally,
            config,
            project,
            data_dir,
            http: reqwest::Client::new(),
            clock,
            _dir: dir,
        }
    }

    /// Shuts down gracefully and starts again on the same data directory.
    pub async fn restart(self) -> Self {
        self.restart_with(|_| {}).await
    }

    /// Like [`TestServer::restart`], with `adjust` applied to the configuration first.
    pub async fn restart_with(self, adjust: impl FnOnce(&mut Config)) -> Self {
        let TestServer {
            tally,
            mut config,
            project,
            data_dir,
            _dir,
            clock,
            ..
        } = self;
        tally.shutdown().await.unwrap();
        adjust(&mut config);
        let tally = Tally::start(config.clone(), clock.clone()).await.unwrap();
        assert!(
            tally.bootstrap().is_none(),
            "a restart does not create another project"
        );
        Self::wrap(tally, config, project, data_dir, _dir, clock)
    }

    /// `/3.0/projects/{id}` + `rest`.
    pub fn project_url(&self, rest: &str) -> String {
        format!("{}/3.0/projects/{}{rest}", self.base, self.project.id)
    }

    /// POSTs a JSON body with the write key.
    pub async fn post(&self, rest: &str, body: &Value) -> reqwest::Response {
        self.http
            .post(self.project_url(rest))
            .header("Authorization", &self.project.write_key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    /// POSTs `body` as it is (text that need not be JSON) with the write key.
    pub async fn post_text(&self, rest: &str, body: &str) -> reqwest::Response {
        self.http
            .post(self.project_url(rest))
            .header("Authorization", &self.project.write_key)
            .header("Content-Type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .unwrap()
    }

    /// The enriched events the process stage has committed: `{"project_id","collection","event"}`.
    pub fn enriched(&self) -> Vec<Value> {
        stored_events(self.tally.store())
    }

    /// Waits until the process stage has committed at least `n` enriched events, and returns them.
    pub async fn wait_enriched(&self, n: usize) -> Vec<Value> {
        // A hang guard, not a timing assertion.
        for _ in 0..3000 {
            let enriched = self.enriched();
            if enriched.len() >= n {
                return enriched;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the process stage did not enrich {n} events");
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        let response = self
            .http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .unwrap();
        response.text().await.unwrap()
    }

    /// Every event in the log, as `(collection, event)`.
    pub fn logged(&self) -> Vec<(String, Value)> {
        read_log(&self.data_dir)
    }
}

/// Every event in the log under `data_dir`.
pub fn read_log(data_dir: &Path) -> Vec<(String, Value)> {
    let mut reader = LogReader::offline(&data_dir.join("log"), 0);
    let mut out = Vec::new();
    loop {
        let batch = reader.read_batch(8 << 20).unwrap();
        if batch.is_empty() {
            return out;
        }
        for entry in batch {
            let event = LoggedEvent::decode(&entry.payload).expect("every logged record decodes");
            out.push((
                event.collection.to_string(),
                event.to_json().expect("every logged event is JSON"),
            ));
        }
    }
}

/// Sends a request with an optional key (`Authorization`) and JSON body.
pub async fn call(
    server: &TestServer,
    method: reqwest::Method,
    url: &str,
    key: Option<&str>,
    body: Option<&Value>,
) -> reqwest::Response {
    let mut request = server.http.request(method, url);
    if let Some(key) = key {
        request = request.header("Authorization", key);
    }
    if let Some(body) = body {
        request = request.json(body);
    }
    request.send().await.unwrap()
}

/// The JSON body of a 2xx answer (anything else fails the test).
pub async fn ok_json(response: reqwest::Response) -> Value {
    let (status, body) = status_json(response).await;
    assert!((200..300).contains(&status), "{status}: {body}");
    body
}

/// The status and JSON body of a response.
pub async fn status_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

/// Asserts a Keen error answer.
pub async fn assert_error(response: reqwest::Response, status: u16, code: &str) {
    let (got_status, body) = status_json(response).await;
    assert_eq!(
        (got_status, body["error_code"].as_str()),
        (status, Some(code)),
        "{body}"
    );
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{body}");
}

/// A file of the shared GeoIP test data.
pub fn geoip_testdata(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/testdata/geoip")
        .join(name)
}

/// Starts `tally serve --listen 127.0.0.1:0 --data-dir DIR` plus `args` as a child process with
/// `env`, and returns it with its base URL (read from the banner; stdout is drained after).
pub fn serve_child(data_dir: &Path, args: &[&str], env: &[(&str, &str)]) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(tally_bin())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .arg("--data-dir")
        .arg(data_dir)
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("the banner").unwrap();
    let base = first.rsplit(' ').next().unwrap().to_string();
    assert!(base.starts_with("http://127.0.0.1:"), "{first}");
    // Keep draining stdout so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, base)
}

/// The path to the `tally` binary built for these tests.
pub fn tally_bin() -> &'static str {
    env!("CARGO_BIN_EXE_tally")
}

/// Every event in the store, as `{"project_id", "collection", "event"}`, in the order they were
/// accepted (`keen.id` is time-ordered).
pub fn stored_events(store: &tally_store::events::EventStore) -> Vec<Value> {
    let mut out = Vec::new();
    for project in store.projects() {
        for collection in store.collections(project) {
            for stored in store.snapshot(project, &collection) {
                for row in 0..stored.segment.rows() {
                    out.push(serde_json::json!({
                        "project_id": project.to_string(),
                        "collection": collection,
                        "event": stored.segment.event_json(row),
                    }));
                }
            }
        }
    }
    out.sort_by(|a, b| {
        a["event"]["keen"]["id"]
            .as_str()
            .cmp(&b["event"]["keen"]["id"].as_str())
    });
    out
}
