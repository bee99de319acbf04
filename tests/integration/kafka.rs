//! Kafka, against a real Apache Kafka broker: `scripts/test.sh` starts one with
//! `scripts/kafka.sh` (Kafka from Maven Central, single-node KRaft on 127.0.0.1) and names it in
//! `TALLY_TEST_KAFKA`. Without it these tests report themselves skipped, unless
//! `TALLY_REQUIRE_ALL_TESTS` is set, when they fail.
//!
//! * inbound topics become events; invalid records land in the dead-letter topic with their
//!   reason; a standard consumer reads every event on the outbound topic; a restart re-reads
//!   nothing;
//! * Kafka as the event log through a broker restart (a broker of the test's own, started and
//!   restarted with the same script): every event stored exactly once, outbound missing none;
//! * an ingest node and a process node as separate `tally` processes; the process node is
//!   killed with -9 mid-stream and replaced: every event stored exactly once.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde_json::{Value, json};
use tally_core::config::Config;

use crate::support::{TestServer, serve_child, stored_events, tally_bin};

/// The shared test broker, or `None` (the test is skipped) when the run has none.
fn broker() -> Option<String> {
    match std::env::var("TALLY_TEST_KAFKA") {
        Ok(brokers) if !brokers.is_empty() => Some(brokers),
        _ => {
            assert!(
                std::env::var("TALLY_REQUIRE_ALL_TESTS").is_err(),
                "TALLY_TEST_KAFKA is not set: scripts/test.sh starts a broker with scripts/kafka.sh"
            );
            eprintln!("skipped: no Kafka broker (TALLY_TEST_KAFKA); run scripts/test.sh");
            None
        }
    }
}

/// A prefix no other test run uses.
fn unique() -> String {
    format!("t{:08x}", rand_u32())
}

fn rand_u32() -> u32 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    nanos ^ std::process::id().rotate_left(16)
}

fn producer(brokers: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .create()
        .unwrap()
}

fn produce(producer: &BaseProducer, topic: &str, value: &[u8], headers: &[(&str, &[u8])]) {
    let mut owned = OwnedHeaders::new();
    for (key, value) in headers {
        owned = owned.insert(Header {
            key,
            value: Some(*value),
        });
    }
    let record = BaseRecord::<(), [u8]>::to(topic).payload(value).headers(owned);
    producer.send(record).map_err(|(e, _)| e).unwrap();
    producer.poll(Duration::ZERO);
}

/// Every record of partition 0 of `topic` from the start, read until `expect` have arrived
/// (and a little longer, to see extra ones), as (key, value, headers).
fn consume_all(
    brokers: &str,
    topic: &str,
    expect: usize,
) -> Vec<(Option<String>, Value, BTreeMap<String, String>)> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", unique()))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let mut idle = 0;
    // A hang guard, not a timing assertion.
    while idle < 30 && (out.len() < expect || idle < 3) {
        match consumer.poll(Duration::from_millis(500)) {
            Some(Ok(m)) => {
                idle = 0;
                let headers = m
                    .headers()
                    .map(|h| {
                        h.iter()
                            .map(|h| {
                                (
                                    h.key.to_owned(),
                                    String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let value = serde_json::from_slice(m.payload().unwrap_or_default()).unwrap_or_else(|_| {
                    Value::String(String::from_utf8_lossy(m.payload().unwrap_or_default()).into())
                });
                out.push((
                    m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                    value,
                    headers,
                ));
            }
            Some(Err(e)) => panic!("consuming {topic}: {e}"),
            None => idle += 1,
        }
    }
    out
}

/// Waits until the store holds at least `n` events of `collection` (a hang guard, not a timing
/// assertion) and returns them.
async fn wait_stored(server: &TestServer, collection: &str, n: usize) -> Vec<Value> {
    let mut events = Vec::new();
    for _ in 0..1200 {
        events = stored_events(server.tally.store())
            .into_iter()
            .filter(|e| e["collection"] == collection)
            .map(|e| e["event"].clone())
            .collect();
        if events.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    events
}

/// The `n` properties of `events`, sorted, and whether each came once.
fn ns(events: &[Value]) -> Vec<u64> {
    let mut ns: Vec<u64> = events.iter().map(|e| e["n"].as_u64().unwrap()).collect();
    ns.sort_unstable();
    ns
}

fn inbound_config(config: &mut Config, brokers: &str, u: &str, project: &str) {
    config.kafka.brokers = brokers.to_owned();
    config.kafka.inbound.enabled = true;
    config.kafka.inbound.project = project.to_owned();
    config.kafka.inbound.topic_prefix = format!("{u}.in.");
    config.kafka.inbound.topics = vec![format!("{u}.mixed")];
    config.kafka.inbound.group = format!("{u}-inbound");
    config.kafka.inbound.dead_letter_topic = format!("{u}.dead");
    config.kafka.outbound.enabled = true;
    config.kafka.outbound.topic_template = format!("{u}.out.{{collection}}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_records_become_events_bad_ones_are_dead_lettered_and_outbound_sees_every_event() {
    let Some(brokers) = broker() else { return };
    let u = unique();
    let server = TestServer::start().await;
    let project = server.project.id.to_string();
    let server = server
        .restart_with(|config| inbound_config(config, &brokers, &u, &project))
        .await;

    let producer = producer(&brokers);
    for n in 0..300 {
        let event = json!({"n": n, "user": {"id": format!("u{}", n % 7)}});
        produce(
            &producer,
            &format!("{u}.in.clicks"),
            event.to_string().as_bytes(),
            &[],
        );
    }
    for n in 0..50 {
        let event = json!({"n": n});
        produce(
            &producer,
            &format!("{u}.mixed"),
            event.to_string().as_bytes(),
            &[("collection", b"views")],
        );
    }
    // Five records that are not events, each for its own reason.
    produce(
        &producer,
        &format!("{u}.in.clicks"),
        b"{not json",
        &[("trace", b"a")],
    );
    produce(
        &producer,
        &format!("{u}.in.clicks"),
        b"[1, 2]",
        &[("trace", b"b")],
    );
    produce(
        &producer,
        &format!("{u}.in.clicks"),
        br#"{"keen": {"timestamp": "yesterday"}}"#,
        &[("trace", b"c")],
    );
    produce(&producer, &format!("{u}.in.clicks"), b"", &[("trace", b"d")]);
    produce(
        &producer,
        &format!("{u}.mixed"),
        br#"{"n": 1}"#,
        &[("trace", b"e")],
    );
    producer.flush(Duration::from_secs(30)).unwrap();

    let clicks = wait_stored(&server, "clicks", 300).await;
    assert_eq!(
        ns(&clicks),
        (0..300).collect::<Vec<_>>(),
        "every inbound record once"
    );
    assert!(
        clicks
            .iter()
            .all(|e| e["keen"]["id"].is_string() && e["keen"]["timestamp"].is_string())
    );
    let views = wait_stored(&server, "views", 50).await;
    assert_eq!(
        ns(&views),
        (0..50).collect::<Vec<_>>(),
        "the collection header names the collection"
    );

    // The dead-letter topic holds the five, each with its reason and where it came from.
    let dead = consume_all(&brokers, &format!("{u}.dead"), 5);
    let by_trace: BTreeMap<&str, (&str, &str)> = dead
        .iter()
        .map(|(_, _, h)| {
            assert!(h["tally.source"].contains('@'), "{h:?}");
            (
                h["trace"].as_str(),
                (h["tally.error_code"].as_str(), h["tally.error"].as_str()),
            )
        })
        .collect();
    assert_eq!(dead.len(), 5, "{by_trace:?}");
    assert_eq!(by_trace["a"].0, "InvalidEventError", "{by_trace:?}");
    assert!(by_trace["a"].1.contains("not valid JSON"), "{by_trace:?}");
    assert_eq!(by_trace["b"].0, "InvalidEventError", "{by_trace:?}");
    assert_eq!(by_trace["c"].0, "InvalidPropertyValueError", "{by_trace:?}");
    assert_eq!(by_trace["d"].0, "InvalidEventError", "{by_trace:?}");
    assert_eq!(by_trace["e"].0, "InvalidCollectionNameError", "{by_trace:?}");
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("tally_kafka_inbound_stored_total 350"),
        "{metrics}"
    );

    // A standard consumer sees every enriched event on the outbound topic, keyed by keen.id.
    let out = consume_all(&brokers, &format!("{u}.out.clicks"), 300);
    let seen: BTreeSet<u64> = out.iter().map(|(_, v, _)| v["n"].as_u64().unwrap()).collect();
    assert_eq!(seen, (0..300).collect(), "outbound misses none");
    for (key, value, _) in &out {
        assert_eq!(key.as_deref(), value["keen"]["id"].as_str());
    }

    // After a restart nothing is read twice, and new records still arrive.
    let server = server.restart().await;
    for n in 300..310 {
        let event = json!({"n": n});
        produce(
            &producer,
            &format!("{u}.in.clicks"),
            event.to_string().as_bytes(),
            &[],
        );
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let clicks = wait_stored(&server, "clicks", 310).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let clicks_after = wait_stored(&server, "clicks", 310).await;
    assert_eq!(clicks.len(), clicks_after.len());
    assert_eq!(ns(&clicks_after), (0..310).collect::<Vec<_>>());
    server.tally.shutdown().await.unwrap();
}

/// A broker of the test's own, on its own port and directory, stopped when the test ends.
struct OwnBroker {
    env: Vec<(&'static str, String)>,
    brokers: String,
}

impl OwnBroker {
    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh")
    }

    fn run(&self, command: &str) {
        let status = Command::new("bash")
            .arg(Self::script())
            .arg(command)
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "scripts/kafka.sh {command} failed");
    }

    fn start(port: u16) -> Self {
        let broker = Self {
            env: vec![
                ("TALLY_KAFKA_PORT", port.to_string()),
                ("TALLY_KAFKA_RUN_DIR", format!("/tmp/tally-kafka-{port}")),
            ],
            brokers: format!("127.0.0.1:{port}"),
        };
        broker.run("start");
        broker
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        self.run("stop");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_as_the_log_through_a_broker_restart_stores_every_event_exactly_once() {
    if broker().is_none() {
        return;
    }
    let broker = OwnBroker::start(19192);
    let u = unique();
    let brokers = broker.brokers.clone();
    let server = TestServer::start_with(|config| {
        config.kafka.brokers = brokers.clone();
        config.kafka.log.enabled = true;
        config.kafka.log.topic = format!("{u}.log");
        config.kafka.log.partitions = 3;
        config.kafka.log.group = format!("{u}-process");
        config.kafka.outbound.enabled = true;
        config.kafka.outbound.topic_template = format!("{u}.out.{{collection}}");
    })
    .await;

    // One client sends batch after batch; halfway through, the broker is restarted under it.
    // The client pauses at halfway until the stage has stored something: the restart then
    // comes while the stage is consuming, not while its consumer is still joining its group
    // (a restart during that first join is a different case; see below).
    let (batches, per_batch) = (40u64, 100u64);
    let acked = Arc::new(AtomicU64::new(0));
    let go_on = Arc::new(tokio::sync::Notify::new());
    let sender = {
        let (http, url, key, acked, go_on) = (
            server.http.clone(),
            server.project_url("/events"),
            server.project.write_key.clone(),
            acked.clone(),
            go_on.clone(),
        );
        tokio::spawn(async move {
            for b in 0..batches {
                if b == batches / 2 {
                    go_on.notified().await;
                }
                let body = json!({"orders": (0..per_batch).map(|i| json!({"n": b * per_batch + i})).collect::<Vec<_>>()});
                let response = http
                    .post(&url)
                    .header("Authorization", &key)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(
                    response.status(),
                    200,
                    "batch {b}: {}",
                    response.text().await.unwrap()
                );
                acked.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    // A hang guard, not a timing assertion.
    for _ in 0..600 {
        if acked.load(Ordering::SeqCst) >= batches / 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let during = acked.load(Ordering::SeqCst);
    assert!(
        !wait_stored(&server, "orders", 1).await.is_empty(),
        "the stage stores events before the restart"
    );
    go_on.notify_one();
    tokio::task::block_in_place(|| broker.run("restart"));
    sender.await.unwrap();
    assert!(during < batches, "the restart came in the middle of the stream");
    let total = batches * per_batch;
    let orders = wait_stored(&server, "orders", total as usize).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let orders_after = wait_stored(&server, "orders", total as usize).await;
    assert_eq!(orders.len(), orders_after.len(), "nothing more arrives later");
    assert_eq!(
        ns(&orders_after),
        (0..total).collect::<Vec<_>>(),
        "every event exactly once"
    );

    let out = consume_all(&brokers, &format!("{u}.out.orders"), total as usize);
    let seen: BTreeSet<u64> = out.iter().map(|(_, v, _)| v["n"].as_u64().unwrap()).collect();
    assert_eq!(
        seen.len() as u64,
        total,
        "outbound misses none ({} records)",
        out.len()
    );
    server.tally.shutdown().await.unwrap();
}

/// A `tally serve` child process, killed when dropped.
struct Node {
    child: Child,
    base: String,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn node(data_dir: &Path, role: &str, env: &[(&str, String)]) -> Node {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let (child, base) = serve_child(data_dir, &["--role", role], &env);
    Node { child, base }
}

async fn query(
    http: &reqwest::Client,
    node: &Node,
    project: &str,
    key: &str,
    analysis: &str,
    extra: Value,
) -> Value {
    let mut body = json!({"event_collection": "orders", "timeframe": "this_2_days"});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let response = http
        .post(format!("{}/3.0/projects/{project}/queries/{analysis}", node.base))
        .header("Authorization", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    body["result"].clone()
}

/// Waits until the node counts at least `n` orders (a hang guard, not a timing assertion).
async fn wait_count(http: &reqwest::Client, node: &Node, project: &str, key: &str, n: u64) {
    for _ in 0..600 {
        let count = query(http, node, project, key, "count", json!({})).await;
        if count.as_u64() >= Some(n) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_node_killed_mid_stream_is_replaced_and_every_event_is_stored_once() {
    let Some(brokers) = broker() else { return };
    let u = unique();
    let dirs = tempfile::tempdir().unwrap();
    let (ingest_dir, process_dir) = (dirs.path().join("ingest"), dirs.path().join("process"));
    let output = Command::new(tally_bin())
        .args(["project", "create", "split", "--data-dir"])
        .arg(&ingest_dir)
        .output()
        .unwrap();
    let project: Value = serde_json::from_slice(&output.stdout).unwrap();
    let (id, write_key, read_key) = (
        project["id"].as_str().unwrap().to_owned(),
        project["write_key"].as_str().unwrap().to_owned(),
        project["read_key"].as_str().unwrap().to_owned(),
    );
    // Until the catalog lives in a shared store, the nodes share it by copy.
    std::fs::create_dir_all(&process_dir).unwrap();
    std::fs::copy(ingest_dir.join("catalog.json"), process_dir.join("catalog.json")).unwrap();
    let env = vec![
        ("TALLY_KAFKA__BROKERS", brokers.clone()),
        ("TALLY_KAFKA__LOG__ENABLED", "true".to_owned()),
        ("TALLY_KAFKA__LOG__TOPIC", format!("{u}.log")),
        ("TALLY_KAFKA__LOG__PARTITIONS", "4".to_owned()),
        ("TALLY_KAFKA__LOG__GROUP", format!("{u}-process")),
        // No group commits during the test: the replacement must carry on from the store's own
        // record of its offsets, not from the group's.
        ("TALLY_KAFKA__LOG__GROUP_COMMIT_INTERVAL_MS", "600000".to_owned()),
    ];
    let ingest = node(&ingest_dir, "ingest", &env);
    let mut process = node(&process_dir, "process,query", &env);
    let http = reqwest::Client::new();

    // The ingest node does not answer queries, and the process node does not take events.
    let refused = http
        .post(format!("{}/3.0/projects/{id}/queries/count", ingest.base))
        .header("Authorization", &read_key)
        .json(&json!({"event_collection": "orders"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error_code"], "ResourceNotFoundError");
    assert!(body["message"].as_str().unwrap().contains("ingest"), "{body}");
    let refused = http
        .post(format!("{}/3.0/projects/{id}/events/orders", process.base))
        .header("Authorization", &write_key)
        .json(&json!({"n": -1}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 404);

    let (batches, per_batch) = (60u64, 50u64);
    let send = |b: u64| {
        let body =
            json!({"orders": (0..per_batch).map(|i| json!({"n": b * per_batch + i})).collect::<Vec<_>>()});
        http.post(format!("{}/3.0/projects/{id}/events", ingest.base))
            .header("Authorization", &write_key)
            .json(&body)
            .send()
    };
    for b in 0..20 {
        assert_eq!(send(b).await.unwrap().status(), 200);
    }
    // The process node has stored the first third, and its store has flushed it (every second).
    wait_count(&http, &process, &id, &read_key, 20 * per_batch).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    for b in 20..30 {
        assert_eq!(send(b).await.unwrap().status(), 200);
    }
    // It dies mid-stream; a replacement takes over its volume.
    process.child.kill().unwrap();
    process.child.wait().unwrap();
    process = node(&process_dir, "process,query", &env);
    for b in 30..batches {
        assert_eq!(send(b).await.unwrap().status(), 200);
    }
    let total = batches * per_batch;
    wait_count(&http, &process, &id, &read_key, total).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let count = query(&http, &process, &id, &read_key, "count", json!({})).await;
    let distinct = query(
        &http,
        &process,
        &id,
        &read_key,
        "count_unique",
        json!({"target_property": "n"}),
    )
    .await;
    assert_eq!(count, json!(total), "no event twice");
    assert_eq!(distinct, json!(total), "no event missing");
    drop(ingest);
}
