//! `tally bench kafka`: Kafka inbound and outbound throughput and end-to-end latency, against a
//! real broker, in one run (`scripts/bench-kafka.sh` starts the broker and calls this).
//!
//! 1. The events of a gen_events.py file are produced to one topic (one partition), each with a
//!    `collection` header.
//! 2. The ceilings: how fast librdkafka (the client Tally uses) reads that topic, and, printed by
//!    the script, Kafka's own ConsumerPerformance on the same topic.
//! 3. `inbound`: a `tally serve` child consumes the topic into a fresh data directory; the rate
//!    is events stored by the process stage (queryable) per second, from the first stored event
//!    to the last, read from `/metrics` every 20 ms.
//! 4. `inbound+outbound`: the same with outbound on: every event is also produced to its
//!    outbound topic and acknowledged before it is stored.
//! 5. `latency`: with that server still running, records are produced at a fixed rate, each
//!    carrying the time it was produced; a live stream (`…/events/latency/stream`, which sees an
//!    event when the store has it, so when it is queryable) receives them; p50/p99/max of
//!    receipt minus production.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use http_body_util::BodyExt;
use serde_json::Value;
use tally_kafka::tools::{BenchProducer, create_topic, read_to_end};

#[derive(Debug, clap::Args)]
pub struct KafkaArgs {
    /// Bootstrap servers of the broker to use.
    #[arg(long)]
    brokers: String,
    /// gen_events.py output in jsonl format: {"collection": ..., "event": {...}} per line.
    #[arg(long)]
    events: PathBuf,
    /// Records for the latency phase.
    #[arg(long, default_value_t = 5_000)]
    latency_events: usize,
    /// Records per second in the latency phase.
    #[arg(long, default_value_t = 1_000.0)]
    latency_rate: f64,
    /// The topic to produce the events to (default: a new one).
    #[arg(long)]
    topic: Option<String>,
    /// Only produce the events, then stop (the script then runs Kafka's ConsumerPerformance).
    #[arg(long)]
    only_produce: bool,
    /// The topic already holds the events (an earlier `--only-produce`): do not produce them.
    #[arg(long)]
    reuse_topic: bool,
}

/// A `tally serve` child, stopped when dropped.
struct Server {
    child: Child,
    base: String,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

pub fn run(args: KafkaArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(bench(args))
}

async fn bench(args: KafkaArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.events)
        .with_context(|| format!("reading {}", args.events.display()))?;
    let mut events = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let value: Value = serde_json::from_str(line).context("an events line is not JSON")?;
        let collection = value["collection"]
            .as_str()
            .context("a line without collection")?
            .to_owned();
        events.push((collection, value["event"].to_string()));
    }
    let n = events.len();
    let bytes: usize = events.iter().map(|(_, e)| e.len()).sum();
    let topic = args
        .topic
        .clone()
        .unwrap_or_else(|| format!("tallybench{:x}.events", now_us()));
    let producer = BenchProducer::new(&args.brokers)?;
    println!(
        "events: {n} from {} ({} bytes on average)",
        args.events.display(),
        bytes / n.max(1)
    );
    println!("topic: {topic}");
    if !args.reuse_topic {
        create_topic(&args.brokers, &topic, 1).await?;
        let started = Instant::now();
        for (collection, event) in &events {
            producer.send(&topic, event.as_bytes(), Some(collection))?;
        }
        producer.flush()?;
        let secs = started.elapsed().as_secs_f64();
        println!("produce (acks=all): {:>10.0} events/s", n as f64 / secs);
    }
    if args.only_produce {
        return Ok(());
    }
    let read = tokio::task::spawn_blocking({
        let (brokers, topic) = (args.brokers.clone(), topic.clone());
        move || read_to_end(&brokers, &topic, n)
    })
    .await??;
    println!(
        "ceiling, librdkafka consumer reading the topic: {:>10.0} events/s",
        n as f64 / read.as_secs_f64()
    );

    let tally = std::env::current_exe()?;
    for outbound in [false, true] {
        let name = if outbound { "inbound+outbound" } else { "inbound" };
        let (server, project, read_key) = start_server(&tally, &args.brokers, &topic, outbound)?;
        let (first, at_first, last) = wait_stored(&server, n).await?;
        if at_first >= n {
            bail!("all {n} events were stored between two polls: use more events");
        }
        // Events stored after the first poll that saw any, over the time since that poll.
        let rate = (n - at_first) as f64 / (last - first).as_secs_f64();
        println!("{name:>16}: {rate:>10.0} events/s into queryable storage ({n} events)");
        if outbound {
            let metrics = get(&server.base, "/metrics", None).await?;
            let produced = metric(&metrics, "tally_kafka_outbound_events_total").unwrap_or(0.0);
            println!(
                "{:>16}: {produced:.0} events produced to the outbound topics and acknowledged",
                "outbound"
            );
            if args.latency_events > 0 {
                latency(&args, &server, &project, &read_key, &topic, &producer).await?;
            }
        }
    }
    Ok(())
}

fn start_server(
    tally: &Path,
    brokers: &str,
    topic: &str,
    outbound: bool,
) -> anyhow::Result<(Server, String, String)> {
    let dir = tempfile::tempdir()?;
    let output = Command::new(tally)
        .args(["project", "create", "bench", "--data-dir"])
        .arg(dir.path())
        .output()?;
    let project: Value = serde_json::from_slice(&output.stdout).context("tally project create")?;
    let id = project["id"].as_str().context("project id")?.to_owned();
    let read_key = project["read_key"].as_str().context("read key")?.to_owned();
    let group = format!("tallybench-{}", now_us());
    let config = dir.path().join("tally.toml");
    let mut file = std::fs::File::create(&config)?;
    writeln!(
        file,
        "[kafka]\nbrokers = {brokers:?}\n[kafka.inbound]\nenabled = true\nproject = {id:?}\ntopic_prefix = \"\"\n\
         topics = [{topic:?}]\ngroup = {group:?}\ndead_letter_topic = \"{topic}.dead\"\n\
         [kafka.outbound]\nenabled = {outbound}\ntopic_template = \"{group}.out.{{collection}}\""
    )?;
    let mut child = Command::new(tally)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let first = lines.next().context("no banner")??;
    let base = first.rsplit(' ').next().unwrap_or_default().to_owned();
    std::thread::spawn(move || lines.for_each(drop));
    if !base.starts_with("http://") {
        bail!("unexpected banner: {first}");
    }
    Ok((
        Server {
            child,
            base,
            _dir: dir,
        },
        id,
        read_key,
    ))
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
}

/// The time of the first poll that saw a stored event and how many it saw, and the time of
/// the poll that saw all `n`.
async fn wait_stored(server: &Server, n: usize) -> anyhow::Result<(Instant, usize, Instant)> {
    let mut first = None;
    let give_up = Instant::now() + Duration::from_secs(600);
    loop {
        let metrics = get(&server.base, "/metrics", None).await?;
        let stored = metric(&metrics, "tally_process_events_total").unwrap_or(0.0) as usize;
        let now = Instant::now();
        if stored > 0 {
            first.get_or_insert((now, stored));
        }
        if stored >= n {
            let (first, at_first) = first.unwrap_or((now, stored));
            return Ok((first, at_first, now));
        }
        if now > give_up {
            bail!("only {stored} of {n} events were stored");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn connect(
    base: &str,
) -> anyhow::Result<hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>> {
    let addr = base.trim_start_matches("http://");
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// GETs `path` from the server at `base` (`http://host:port` or `host:port`) as text.
pub(crate) async fn get(base: &str, path: &str, key: Option<&str>) -> anyhow::Result<String> {
    let mut sender = connect(base).await?;
    let mut request = hyper::Request::get(path).header("host", "bench");
    if let Some(key) = key {
        request = request.header("authorization", key);
    }
    let response = sender
        .send_request(request.body(http_body_util::Empty::new())?)
        .await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

async fn latency(
    args: &KafkaArgs,
    server: &Server,
    project: &str,
    read_key: &str,
    topic: &str,
    producer: &BenchProducer,
) -> anyhow::Result<()> {
    let mut sender = connect(&server.base).await?;
    let request = hyper::Request::get(format!("/3.0/projects/{project}/events/latency/stream"))
        .header("host", "bench")
        .header("authorization", read_key)
        .body(http_body_util::Empty::new())?;
    let response = sender.send_request(request).await?;
    if !response.status().is_success() {
        bail!("live stream: {}", response.status());
    }
    let expect = args.latency_events;
    let receiver = tokio::spawn(async move {
        let mut body = response.into_body();
        let mut pending = String::new();
        let mut latencies = Vec::with_capacity(expect);
        while latencies.len() < expect {
            let Some(frame) = body.frame().await else { break };
            let Ok(frame) = frame else { break };
            let Some(data) = frame.data_ref() else { continue };
            let at = now_us();
            pending.push_str(&String::from_utf8_lossy(data));
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                let sent = line
                    .strip_prefix("data:")
                    .and_then(|json| serde_json::from_str::<Value>(json.trim()).ok())
                    .and_then(|event| event["sent_us"].as_u64());
                if let Some(sent) = sent {
                    latencies.push(at.saturating_sub(sent));
                }
            }
        }
        latencies
    });
    // Give the stream a moment to be registered before the first record.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let interval = Duration::from_secs_f64(1.0 / args.latency_rate.max(1.0));
    let started = Instant::now();
    for i in 0..expect {
        let due = started + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        let event = format!(r#"{{"i":{i},"sent_us":{}}}"#, now_us());
        producer.send(topic, event.as_bytes(), Some("latency"))?;
    }
    producer.flush()?;
    let mut latencies = tokio::time::timeout(Duration::from_secs(120), receiver).await??;
    latencies.sort_unstable();
    if latencies.is_empty() {
        bail!("no event came back on the live stream");
    }
    let pick = |q: f64| latencies[((latencies.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    println!(
        "{:>16}: produced → queryable, {} of {expect} events at {:.0}/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        "latency",
        latencies.len(),
        args.latency_rate,
        pick(0.5),
        pick(0.99),
        pick(1.0)
    );
    Ok(())
}
