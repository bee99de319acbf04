//! `tally bench ingest`: drives a running Tally over loopback and prints throughput and
//! acknowledgement latency.
//!
//! Phases, all against the same server in one run:
//!
//! * `ping`: `POST /ping` with the single-event bodies; answered 204 without touching the log.
//!   This is the ceiling for HTTP handling on this machine.
//! * `single`: one event per `POST /3.0/projects/P/events/C`, over keep-alive connections.
//! * `batch`: `POST /3.0/projects/P/events` with batch bodies (500 events from gen_events.py).
//! * `single@half`, `batch@half`: the same at half the rate the closed-loop phase reached, paced
//!   open-loop so latency is measured from when each request was due (no coordinated omission).
//!
//! Every request is checked: a non-2xx answer counts as an error, and errors are printed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Ingest throughput and latency against a running server.
    Ingest(IngestArgs),
    /// Process-stage throughput with the enrichment add-ons, and GeoIP lookups per core.
    Process(crate::bench_process::ProcessArgs),
    /// Kafka inbound and outbound throughput and end-to-end latency against a real broker.
    Kafka(crate::bench_kafka::KafkaArgs),
}

#[derive(Debug, clap::Args)]
pub struct IngestArgs {
    /// Server address, host:port.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Project id.
    #[arg(long)]
    project: String,
    /// Write key.
    #[arg(long)]
    write_key: String,
    /// gen_events.py output in jsonl format: {"collection": ..., "event": {...}} per line.
    #[arg(long)]
    events: PathBuf,
    /// gen_events.py output in batch format: one batch body per line.
    #[arg(long)]
    batches: PathBuf,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 128)]
    connections: usize,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Threads for the load generator (the rest of the machine serves).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Run only the closed-loop single-event phase (for profiling).
    #[arg(long)]
    only_single: bool,
}

/// One request to send: path and body; `events` is how many events it carries.
#[derive(Clone)]
struct Job {
    path: String,
    body: Bytes,
    events: u64,
}

struct PhaseResult {
    name: String,
    requests: u64,
    events: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    first_error: Option<String>,
}

impl PhaseResult {
    fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
            requests: 0,
            events: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            latencies_us: Vec::new(),
            first_error: None,
        }
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.latencies_us.clone();
        sorted.sort_unstable();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
        f64::from(sorted[rank - 1]) / 1000.0
    }
    fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    let args = match command {
        BenchCommand::Ingest(args) => args,
        BenchCommand::Process(args) => return crate::bench_process::run(args),
        BenchCommand::Kafka(args) => return crate::bench_kafka::run(args),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(ingest(args))
}

fn load_jobs(args: &IngestArgs) -> anyhow::Result<(Vec<Job>, Vec<Job>, Vec<Job>)> {
    let mut singles = Vec::new();
    let mut pings = Vec::new();
    for line in std::fs::read_to_string(&args.events)
        .with_context(|| format!("reading {}", args.events.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        let record: serde_json::Value = serde_json::from_str(line)?;
        let collection = record["collection"]
            .as_str()
            .context("a line without collection")?;
        let body = Bytes::from(serde_json::to_vec(&record["event"])?);
        singles.push(Job {
            path: format!("/3.0/projects/{}/events/{collection}", args.project),
            body: body.clone(),
            events: 1,
        });
        pings.push(Job {
            path: "/ping".into(),
            body,
            events: 1,
        });
    }
    let mut batches = Vec::new();
    for line in std::fs::read_to_string(&args.batches)
        .with_context(|| format!("reading {}", args.batches.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
    {
        let parsed: serde_json::Map<String, serde_json::Value> = serde_json::from_str(line)?;
        let events = parsed
            .values()
            .filter_map(|v| v.as_array())
            .map(|a| a.len() as u64)
            .sum();
        batches.push(Job {
            path: format!("/3.0/projects/{}/events", args.project),
            body: Bytes::from(line.to_string()),
            events,
        });
    }
    anyhow::ensure!(
        !singles.is_empty() && !batches.is_empty(),
        "no events or batches to send"
    );
    Ok((pings, singles, batches))
}

async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let (pings, singles, batches) = load_jobs(&args)?;
    let duration = Duration::from_secs_f64(args.seconds);
    println!(
        "tally bench ingest: {} connections, {:.0} s per phase, {} load-generator thread(s), {} single events, {} batches",
        args.connections,
        args.seconds,
        args.threads,
        singles.len(),
        batches.len()
    );
    let mut results = Vec::new();
    let ping = if args.only_single {
        None
    } else {
        Some(
            phase(
                &args,
                "ping (204, no log)",
                &pings,
                args.connections,
                duration,
                None,
            )
            .await?,
        )
    };
    let single = phase(
        &args,
        "single event POST",
        &singles,
        args.connections,
        duration,
        None,
    )
    .await?;
    let Some(ping) = ping else {
        println!(
            "single: {:.0} req/s, p99 {:.2} ms",
            single.requests_per_sec(),
            single.percentile_ms(99.0)
        );
        return Ok(());
    };
    let half_single = single.requests_per_sec() / 2.0;
    let single_half = phase(
        &args,
        "single @ half max rate",
        &singles,
        args.connections,
        duration,
        Some(half_single),
    )
    .await?;
    let batch_connections = args.connections.min(8);
    let batch = phase(
        &args,
        "batch POST (500)",
        &batches,
        batch_connections,
        duration,
        None,
    )
    .await?;
    let half_batch = batch.requests_per_sec() / 2.0;
    let batch_half = phase(
        &args,
        "batch @ half max rate",
        &batches,
        batch_connections,
        duration,
        Some(half_batch),
    )
    .await?;
    let single_vs_ping = single.requests_per_sec() / ping.requests_per_sec();
    results.extend([ping, single, single_half, batch, batch_half]);

    println!(
        "\n{:<26} {:>10} {:>12} {:>10} {:>10} {:>8}",
        "phase", "req/s", "events/s", "p50 ms", "p99 ms", "errors"
    );
    for r in &results {
        println!(
            "{:<26} {:>10.0} {:>12.0} {:>10.2} {:>10.2} {:>8}",
            r.name,
            r.requests_per_sec(),
            r.events_per_sec(),
            r.percentile_ms(50.0),
            r.percentile_ms(99.0),
            r.errors
        );
        if let Some(e) = &r.first_error {
            println!("    first error: {e}");
        }
    }
    println!("\nsingle-event rate / ping rate = {:.0}%", single_vs_ping * 100.0);
    Ok(())
}

async fn phase(
    args: &IngestArgs,
    name: &str,
    jobs: &[Job],
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> anyhow::Result<PhaseResult> {
    let jobs = Arc::new(jobs.to_vec());
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (jobs, addr, key) = (jobs.clone(), args.addr.clone(), args.write_key.clone());
        // Open-loop pacing: each connection sends every `interval`, latency counted from when
        // the request was due.
        let interval = rate.map(|r| Duration::from_secs_f64(connections as f64 / r.max(1.0)));
        tasks.push(tokio::spawn(async move {
            connection_loop(c, connections, &addr, &key, &jobs, deadline, interval).await
        }));
    }
    let mut result = PhaseResult::new(name);
    for task in tasks {
        let part = task.await??;
        result.requests += part.requests;
        result.events += part.events;
        result.errors += part.errors;
        result.latencies_us.extend(part.latencies_us);
        result.first_error = result.first_error.or(part.first_error);
    }
    result.elapsed = started.elapsed();
    Ok(result)
}

async fn connection_loop(
    index: usize,
    connections: usize,
    addr: &str,
    key: &str,
    jobs: &[Job],
    deadline: Instant,
    interval: Option<Duration>,
) -> anyhow::Result<PhaseResult> {
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut part = PhaseResult::new("");
    // Spread the connections' first sends evenly over one interval.
    let mut next_due =
        Instant::now() + interval.map_or(Duration::ZERO, |i| i.mul_f64(index as f64 / connections as f64));
    let mut n = index * 7919;
    loop {
        if interval.is_some() {
            tokio::time::sleep_until(next_due.into()).await;
        }
        let due = if interval.is_some() {
            next_due
        } else {
            Instant::now()
        };
        if due >= deadline {
            break;
        }
        let job = &jobs[n % jobs.len()];
        n += 1;
        let request = Request::post(job.path.as_str())
            .header("host", addr)
            .header("authorization", key)
            .header("content-type", "application/json")
            .body(Full::new(job.body.clone()))?;
        sender.ready().await?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        part.latencies_us
            .push(due.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        part.requests += 1;
        if status.is_success() {
            part.events += job.events;
        } else {
            part.errors += 1;
            if part.first_error.is_none() {
                part.first_error = Some(format!("{status}: {}", String::from_utf8_lossy(&body)));
            }
        }
        if let Some(interval) = interval {
            next_due += interval;
        }
    }
    Ok(part)
}
