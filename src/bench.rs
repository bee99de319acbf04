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
//!   A thread of its own ([`Pacer`]) wakes each connection when its request is due; the table
//!   shows how late requests left (`sent late`), which is part of their latency. A connection
//!   sends only once its previous answer is in, so a request also leaves late when that answer
//!   took longer than the connection's interval (128 connections at 18k req/s: 7 ms): `sent
//!   late` is the server's delays as much as the generator's.
//! * `ping-half`: `/ping` paced at `single-half`'s rate (half the last single phase's): the
//!   tail of HTTP alone at that rate, beside the single events' (not in the default list).
//!
//! `--phases` chooses, orders and repeats them (default `ping,single,single-half,batch,
//! batch-half`); the single/ping ratio is taken over every single and ping phase, so
//! interleaving them evens out a machine whose speed drifts.
//!
//! Every request is checked: a non-2xx answer counts as an error, and errors are printed.
//! Around each phase the bench reads the server's `/metrics`, and prints per phase: CPU time per
//! request of the server (`process_cpu_seconds_total`) and of the bench itself (steadier on a
//! shared machine than a rate), the process stage's backlog at the start and end, the log's
//! syncs, slow group commits, lingers and segment rolls; then the stalls (requests of 10 ms or more,
//! grouped into episodes by when they were due, with the phase's wall-clock start to find them
//! in the server's debug log).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use tokio::sync::Notify;

use crate::bench_client::{Connection, encode_path_segment, encode_post};

#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Ingest throughput and latency against a running server.
    Ingest(IngestArgs),
    /// Process-stage throughput with the enrichment add-ons, and GeoIP lookups per core.
    Process(crate::bench_process::ProcessArgs),
    /// The event store's write path (build, flush, merge): CPU per event and memory held.
    Store(crate::bench_store::StoreArgs),
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
    /// Run only the closed-loop single-event phase (for profiling); the same as
    /// `--phases single`.
    #[arg(long)]
    only_single: bool,
    /// The phases to run, in order, comma-separated: ping, single, single-half, batch,
    /// batch-half, ping-half. A half-rate phase paces itself at half the rate of the last
    /// closed-loop phase of its kind; `ping-half` paces pings at `single-half`'s rate (half the
    /// last single phase), the latency of HTTP alone at that rate. Repeating ping and single
    /// (`ping,single,ping,single`) evens out a machine whose speed drifts; the single/ping ratio
    /// is taken over all of them.
    #[arg(long, default_value = "ping,single,single-half,batch,batch-half")]
    phases: String,
}

/// The kinds of phase (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PhaseKind {
    Ping,
    Single,
    SingleHalf,
    Batch,
    BatchHalf,
    PingHalf,
}

impl PhaseKind {
    const ALL: [PhaseKind; 6] = [
        PhaseKind::Ping,
        PhaseKind::Single,
        PhaseKind::SingleHalf,
        PhaseKind::Batch,
        PhaseKind::BatchHalf,
        PhaseKind::PingHalf,
    ];

    fn name(self) -> &'static str {
        match self {
            PhaseKind::Ping => "ping",
            PhaseKind::Single => "single",
            PhaseKind::SingleHalf => "single-half",
            PhaseKind::Batch => "batch",
            PhaseKind::BatchHalf => "batch-half",
            PhaseKind::PingHalf => "ping-half",
        }
    }

    fn label(self) -> &'static str {
        match self {
            PhaseKind::Ping => "ping (204, no log)",
            PhaseKind::Single => "single event POST",
            PhaseKind::SingleHalf => "single @ half max rate",
            PhaseKind::Batch => "batch POST (500)",
            PhaseKind::BatchHalf => "batch @ half max rate",
            PhaseKind::PingHalf => "ping @ single's half rate",
        }
    }

    /// The closed-loop phase whose rate a paced phase halves.
    fn closed_loop_of(self) -> Option<PhaseKind> {
        match self {
            PhaseKind::SingleHalf | PhaseKind::PingHalf => Some(PhaseKind::Single),
            PhaseKind::BatchHalf => Some(PhaseKind::Batch),
            _ => None,
        }
    }

    fn parse_list(list: &str) -> anyhow::Result<Vec<PhaseKind>> {
        list.split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(|name| {
                Self::ALL.into_iter().find(|k| k.name() == name).with_context(|| {
                    let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
                    format!("unknown phase {name:?}; the phases are {}", names.join(", "))
                })
            })
            .collect()
    }
}

/// One request to send, made before the run; `events` is how many events it carries.
#[derive(Clone)]
struct Job {
    /// The whole request, head and body, as it goes on the wire.
    request: Bytes,
    events: u64,
}

struct PhaseResult {
    name: String,
    requests: u64,
    events: u64,
    errors: u64,
    elapsed: Duration,
    latencies_us: Vec<u32>,
    /// How late each request left this load generator: µs from when it was due to when it was
    /// handed to its connection. That is the generator's own delay, plus any wait for the
    /// connection's previous request to be answered (a server behind its schedule).
    sent_late_us: Vec<u32>,
    /// For each request slower than [`STALL_MS`]: when it was due (µs since the phase started)
    /// and its latency (µs). Grouped into episodes by [`stall_episodes`].
    slow: Vec<(u32, u32)>,
    first_error: Option<String>,
    /// When the phase started, UTC milliseconds (to line stalls up with the server's log).
    started_at_ms: i64,
    /// The server as it was when the phase started and ended.
    server_before: Option<ServerSample>,
    server_after: Option<ServerSample>,
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
            sent_late_us: Vec::new(),
            slow: Vec::new(),
            first_error: None,
            started_at_ms: 0,
            server_before: None,
            server_after: None,
        }
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        percentile_ms(&self.latencies_us, p)
    }
    fn requests_per_sec(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
    fn events_per_sec(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }
}

/// The `p`th percentile (0–100) of `samples_us`, in ms; NaN when there are none.
fn percentile_ms(samples_us: &[u32], p: f64) -> f64 {
    if samples_us.is_empty() {
        return f64::NAN;
    }
    let mut sorted = samples_us.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    f64::from(sorted[rank - 1]) / 1000.0
}

pub fn run(command: BenchCommand) -> anyhow::Result<()> {
    let args = match command {
        BenchCommand::Ingest(args) => args,
        BenchCommand::Process(args) => return crate::bench_process::run(args),
        BenchCommand::Kafka(args) => return crate::bench_kafka::run(args),
        BenchCommand::Store(args) => return crate::bench_store::run(args),
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
        let body = serde_json::to_vec(&record["event"])?;
        let path = format!(
            "/3.0/projects/{}/events/{}",
            args.project,
            encode_path_segment(collection)
        );
        singles.push(Job {
            request: encode_post(&args.addr, &path, &args.write_key, &body)?,
            events: 1,
        });
        pings.push(Job {
            request: encode_post(&args.addr, "/ping", &args.write_key, &body)?,
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
        let path = format!("/3.0/projects/{}/events", args.project);
        batches.push(Job {
            request: encode_post(&args.addr, &path, &args.write_key, line.as_bytes())?,
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
    let phases = if args.only_single {
        vec![PhaseKind::Single]
    } else {
        PhaseKind::parse_list(&args.phases)?
    };
    println!(
        "tally bench ingest: {} connections, {} s per phase, {} load-generator thread(s), {} single events, {} batches",
        args.connections,
        args.seconds,
        args.threads,
        singles.len(),
        batches.len()
    );
    let mut results: Vec<(PhaseKind, PhaseResult)> = Vec::new();
    for kind in phases {
        // A paced phase runs at half the rate its closed-loop phase reached last.
        let rate = match kind.closed_loop_of() {
            None => None,
            Some(max) => {
                let Some((_, last)) = results.iter().rev().find(|(k, _)| *k == max) else {
                    anyhow::bail!("{} needs a {} phase before it", kind.name(), max.name());
                };
                Some(last.requests_per_sec() / 2.0)
            }
        };
        let (jobs, connections) = match kind {
            PhaseKind::Ping | PhaseKind::PingHalf => (&pings, args.connections),
            PhaseKind::Single | PhaseKind::SingleHalf => (&singles, args.connections),
            PhaseKind::Batch | PhaseKind::BatchHalf => (&batches, args.connections.min(8)),
        };
        let result = phase(&args, kind.label(), jobs, connections, duration, rate).await?;
        results.push((kind, result));
    }
    let rate_of = |kind: PhaseKind| {
        let (requests, seconds) = results
            .iter()
            .filter(|(k, _)| *k == kind)
            .fold((0u64, 0.0), |(n, t), (_, r)| {
                (n + r.requests, t + r.elapsed.as_secs_f64())
            });
        (seconds > 0.0).then(|| requests as f64 / seconds)
    };
    let single_vs_ping = rate_of(PhaseKind::Single).zip(rate_of(PhaseKind::Ping));
    // What the server should count as accepted (`tally_events_accepted_total`), pings aside.
    let acknowledged: u64 = results
        .iter()
        .filter(|(k, _)| !matches!(k, PhaseKind::Ping | PhaseKind::PingHalf))
        .map(|(_, r)| r.events)
        .sum();
    let results: Vec<PhaseResult> = results.into_iter().map(|(_, r)| r).collect();

    println!(
        "\n{:<26} {:>10} {:>12} {:>10} {:>10} {:>8} {:>14} {:>14}",
        "phase", "req/s", "events/s", "p50 ms", "p99 ms", "errors", "sent late p50", "sent late p99"
    );
    for r in &results {
        println!(
            "{:<26} {:>10.0} {:>12.0} {:>10.2} {:>10.2} {:>8} {:>14.2} {:>14.2}",
            r.name,
            r.requests_per_sec(),
            r.events_per_sec(),
            r.percentile_ms(50.0),
            r.percentile_ms(99.0),
            r.errors,
            percentile_ms(&r.sent_late_us, 50.0),
            percentile_ms(&r.sent_late_us, 99.0)
        );
        if let Some(e) = &r.first_error {
            println!("    first error: {e}");
        }
    }
    if let Some((single, ping)) = single_vs_ping {
        println!(
            "\nsingle-event rate / ping rate = {:.0}% ({single:.0} / {ping:.0} req/s, over all single and ping phases)",
            single / ping * 100.0
        );
    }
    println!("\nevents acknowledged (2xx) in all phases but the pings: {acknowledged}");
    println!(
        "\nserver during each phase: CPU per request (server and this load generator), the stage's \
         backlog (events accepted, not yet processed), the log's syncs, lingers and rolls:"
    );
    println!(
        "{:<26} {:>11} {:>11} {:>14} {:>14} {:>10} {:>14} {:>18} {:>8} {:>8} {:>13}",
        "phase",
        "server µs/r",
        "bench µs/r",
        "backlog start",
        "backlog end",
        "fsyncs",
        "fsync mean ms",
        "commits > 12.8 ms",
        "lingers",
        "rolls",
        "roll mean ms"
    );
    for r in &results {
        let (Some(before), Some(after)) = (&r.server_before, &r.server_after) else {
            println!("{:<26} (metrics unavailable)", r.name);
            continue;
        };
        // The mean over the phase of a histogram read as (sum, count) before and after it.
        let mean_ms = |sum: f64, count: f64| {
            if count > 0.0 {
                sum / count * 1000.0
            } else {
                f64::NAN
            }
        };
        let syncs = after.fsyncs - before.fsyncs;
        let rolls = after.rolls - before.rolls;
        let slow_commits = (after.commits - after.commits_fast) - (before.commits - before.commits_fast);
        let per_request = |seconds: f64| seconds / r.requests.max(1) as f64 * 1e6;
        println!(
            "{:<26} {:>11.1} {:>11.1} {:>14.0} {:>14.0} {:>10.0} {:>14.3} {:>18.0} {:>8.0} {:>8.0} {:>13.2}",
            r.name,
            per_request(after.cpu_seconds - before.cpu_seconds),
            per_request(after.bench_cpu_seconds - before.bench_cpu_seconds),
            before.backlog(),
            after.backlog(),
            syncs,
            mean_ms(after.fsync_seconds - before.fsync_seconds, syncs),
            slow_commits,
            after.lingers - before.lingers,
            rolls,
            mean_ms(after.roll_seconds - before.roll_seconds, rolls)
        );
    }
    println!(
        "\nstalls: requests of {STALL_MS} ms or more, grouped by when they were due (a gap of {EPISODE_GAP_MS} ms or more starts a new episode)"
    );
    for r in &results {
        let episodes = stall_episodes(&r.slow);
        let slow: usize = episodes.iter().map(|e| e.requests).sum();
        println!(
            "{:<26} {slow} slow of {} requests, {} episodes (phase started {})",
            r.name,
            r.latencies_us.len(),
            episodes.len(),
            tally_core::time::format_timestamp_ms(r.started_at_ms)
        );
        let mut worst = episodes;
        worst.sort_by_key(|e| std::cmp::Reverse(e.requests));
        for e in worst.iter().take(5) {
            println!(
                "    at {:>7.3} s for {:>6.1} ms: {:>5} requests, worst {:>7.1} ms",
                f64::from(e.first_due_us) / 1e6,
                f64::from(e.last_due_us - e.first_due_us) / 1e3,
                e.requests,
                f64::from(e.worst_us) / 1e3
            );
        }
    }
    Ok(())
}

/// A request at least this slow (ms) counts as stalled in the stall report.
const STALL_MS: u32 = 10;
/// Slow requests due this close together (ms) belong to one episode.
const EPISODE_GAP_MS: u32 = 50;

/// Slow requests due close together: one stall of the server, as the clients saw it.
#[derive(Debug, Clone, PartialEq)]
struct StallEpisode {
    first_due_us: u32,
    last_due_us: u32,
    requests: usize,
    worst_us: u32,
}

/// Groups slow requests `(due µs, latency µs)` into episodes: sorted by due time, a gap of
/// [`EPISODE_GAP_MS`] or more between consecutive ones starts a new episode.
fn stall_episodes(slow: &[(u32, u32)]) -> Vec<StallEpisode> {
    let mut sorted = slow.to_vec();
    sorted.sort_unstable();
    let mut episodes: Vec<StallEpisode> = Vec::new();
    for (due, latency) in sorted {
        match episodes.last_mut() {
            Some(e) if due - e.last_due_us < EPISODE_GAP_MS * 1000 => {
                e.last_due_us = due;
                e.requests += 1;
                e.worst_us = e.worst_us.max(latency);
            }
            _ => episodes.push(StallEpisode {
                first_due_us: due,
                last_due_us: due,
                requests: 1,
                worst_us: latency,
            }),
        }
    }
    episodes
}

/// What the bench reads from the server's `/metrics` around each phase.
#[derive(Debug, Clone, Default)]
struct ServerSample {
    accepted: f64,
    processed: f64,
    fsyncs: f64,
    fsync_seconds: f64,
    /// The server's CPU time so far (`process_cpu_seconds_total`).
    cpu_seconds: f64,
    /// The bench's own CPU time when the sample was taken.
    bench_cpu_seconds: f64,
    /// Group commits, and those that took at most [`SLOW_COMMIT_BUCKET`] seconds.
    commits: f64,
    commits_fast: f64,
    rolls: f64,
    roll_seconds: f64,
    /// Times the log writer waited for more appends (`log.group_commit_linger_us`).
    lingers: f64,
}

/// The `tally_log_group_commit_seconds` bucket bound the bench counts slow commits above.
const SLOW_COMMIT_BUCKET: f64 = 0.0128;

impl ServerSample {
    /// Events accepted but not yet through the process stage.
    fn backlog(&self) -> f64 {
        (self.accepted - self.processed).max(0.0)
    }

    /// Reads `/metrics`; `None` if the server does not answer (the bench goes on without it).
    async fn fetch(addr: &str) -> Option<Self> {
        let text = crate::bench_kafka::get(addr, "/metrics", None).await.ok()?;
        Some(Self {
            bench_cpu_seconds: tally_core::worker::process_cpu_seconds(),
            ..Self::parse(&text)
        })
    }

    fn parse(text: &str) -> Self {
        let mut sample = Self::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            if let Some(le) = name
                .strip_prefix("tally_log_group_commit_seconds_bucket{le=\"")
                .and_then(|rest| rest.strip_suffix("\"}"))
                .and_then(|le| le.parse::<f64>().ok())
            {
                if (le - SLOW_COMMIT_BUCKET).abs() < 1e-9 {
                    sample.commits_fast = value;
                }
                continue;
            }
            match name {
                "process_cpu_seconds_total" => sample.cpu_seconds = value,
                "tally_log_group_commit_seconds_count" => sample.commits = value,
                "tally_log_roll_seconds_count" => sample.rolls = value,
                "tally_log_roll_seconds_sum" => sample.roll_seconds = value,
                "tally_log_group_commit_lingers_total" => sample.lingers = value,
                "tally_events_accepted_total" => sample.accepted = value,
                "tally_process_events_total" => sample.processed = value,
                "tally_log_fsync_seconds_count" => sample.fsyncs = value,
                "tally_log_fsync_seconds_sum" => sample.fsync_seconds = value,
                _ => {}
            }
        }
        sample
    }
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
    let server_before = ServerSample::fetch(&args.addr).await;
    let started = Instant::now();
    let started_at_ms = tally_core::clock::Clock::now_ms(&tally_core::clock::SystemClock);
    let deadline = started + duration;
    // Open-loop pacing: each connection sends every `interval`, latency counted from when the
    // request was due. The pacer thread wakes each connection when its request is due.
    let pacing = rate.map(|r| {
        let interval = Duration::from_secs_f64(connections as f64 / r.max(1.0));
        let pacer = Pacer::start(connections, first_due(started, interval), deadline, interval);
        (interval, pacer)
    });
    let mut tasks = Vec::new();
    for c in 0..connections {
        let (jobs, addr) = (jobs.clone(), args.addr.clone());
        let pace = pacing
            .as_ref()
            .map(|(interval, pacer)| (*interval, pacer.wakers[c].clone()));
        tasks.push(tokio::spawn(async move {
            connection_loop(c, connections, &addr, &jobs, started, deadline, pace).await
        }));
    }
    let mut result = PhaseResult::new(name);
    for task in tasks {
        let part = task.await??;
        result.requests += part.requests;
        result.events += part.events;
        result.errors += part.errors;
        result.latencies_us.extend(part.latencies_us);
        result.sent_late_us.extend(part.sent_late_us);
        result.slow.extend(part.slow);
        result.first_error = result.first_error.or(part.first_error);
    }
    result.elapsed = started.elapsed();
    result.started_at_ms = started_at_ms;
    result.server_before = server_before;
    result.server_after = ServerSample::fetch(&args.addr).await;
    Ok(result)
}

/// When a paced phase's first request is due: one interval in, so that the connections are open
/// by then (connecting is not part of any request's latency).
fn first_due(started: Instant, interval: Duration) -> Instant {
    started + interval
}

/// The time between one connection's due request and the next one's.
fn pacing_step(interval: Duration, connections: usize) -> Duration {
    interval.div_f64(connections as f64)
}

/// When the `k`-th request of a paced phase is due.
fn due_at(first: Instant, step: Duration, k: u32) -> Instant {
    first + step * k
}

/// The requests from the `k`-th on that are due by `now` (and before `deadline`).
fn due_by(first: Instant, step: Duration, k: u32, now: Instant, deadline: Instant) -> std::ops::Range<u32> {
    let mut end = k;
    while due_at(first, step, end) <= now && due_at(first, step, end) < deadline {
        end += 1;
    }
    k..end
}

/// The pacer wakes at most this often; at higher rates each wake-up sends every request due
/// by then. Waking the generator for each request instead (every 63 µs in a half-rate
/// single-event phase) sent that phase's requests up to 6.5 and 11.9 ms late at p99 in two
/// runs (p99 latency 14.3 and 20.2 ms).
const PACER_TICK: Duration = Duration::from_millis(1);

/// Wakes each paced connection when its next request is due, from a thread of its own.
///
/// Tokio's timers have a resolution of one millisecond and fire late by up to that much, so
/// with them every request left about a millisecond after it was due (the median in a
/// half-rate batch phase: 1.0 ms), and that counted in its latency. A thread sleeping with the
/// OS's timer wakes within tens of microseconds, up to [`PACER_TICK`] late.
struct Pacer {
    /// One per connection, in connection order.
    wakers: Vec<Arc<Notify>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Pacer {
    /// Connection `c` is due at `first + interval * (c / connections + k)` for k = 0, 1, …
    /// until `deadline`; then every connection is woken once more to see the deadline.
    fn start(connections: usize, first: Instant, deadline: Instant, interval: Duration) -> Self {
        let wakers: Vec<Arc<Notify>> = (0..connections).map(|_| Arc::new(Notify::new())).collect();
        let thread = {
            let wakers = wakers.clone();
            let step = pacing_step(interval, connections);
            std::thread::Builder::new()
                .name("bench-pacer".into())
                .spawn(move || {
                    let mut k = 0u32;
                    while due_at(first, step, k) < deadline {
                        let next = due_at(first, step, k);
                        let now = Instant::now();
                        std::thread::sleep(next.max(now + PACER_TICK).saturating_duration_since(now));
                        let due_now = due_by(first, step, k, Instant::now(), deadline);
                        for k in due_now.clone() {
                            wakers[k as usize % wakers.len()].notify_one();
                        }
                        k = due_now.end;
                    }
                    std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
                    wakers.iter().for_each(|w| w.notify_one());
                })
                .expect("spawning the bench pacer")
        };
        Self {
            wakers,
            thread: Some(thread),
        }
    }
}

impl Drop for Pacer {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Waits for the pacer's wake-up at or after `due`. A wake-up left over from a request that
/// went out late may come early, so the time is looked at again after each.
async fn wait_until(due: Instant, woken: &Notify) {
    while Instant::now() < due {
        woken.notified().await;
    }
}

#[allow(clippy::too_many_arguments)]
async fn connection_loop(
    index: usize,
    connections: usize,
    addr: &str,
    jobs: &[Job],
    started: Instant,
    deadline: Instant,
    pace: Option<(Duration, Arc<Notify>)>,
) -> anyhow::Result<PhaseResult> {
    let interval = pace.as_ref().map(|(interval, _)| *interval);
    let mut connection = Connection::open(addr).await?;
    let mut part = PhaseResult::new("");
    // The connections' sends are spread evenly over each interval; the k-th request due in the
    // phase is connection k % connections's (computed as the pacer does, to the nanosecond).
    let mut k = index as u32;
    let mut next_due = match interval {
        Some(i) => due_at(first_due(started, i), pacing_step(i, connections), k),
        None => Instant::now(),
    };
    let mut n = index * 7919;
    loop {
        if let Some((_, due_now)) = &pace {
            wait_until(next_due.min(deadline), due_now).await;
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
        part.sent_late_us
            .push(due.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        let answer = connection.exchange(&job.request).await?;
        let latency_us = due.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        part.latencies_us.push(latency_us);
        if latency_us >= STALL_MS * 1000 {
            let due_us = due
                .saturating_duration_since(started)
                .as_micros()
                .min(u128::from(u32::MAX)) as u32;
            part.slow.push((due_us, latency_us));
        }
        part.requests += 1;
        if (200..300).contains(&answer.status) {
            part.events += job.events;
        } else {
            part.errors += 1;
            if part.first_error.is_none() {
                part.first_error = Some(format!(
                    "{}: {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                ));
            }
        }
        if let Some(interval) = interval {
            k += connections as u32;
            next_due = due_at(
                first_due(started, interval),
                pacing_step(interval, connections),
                k,
            );
        }
    }
    Ok(part)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pacer_wake_up_sends_exactly_the_requests_due_by_then() {
        let first = Instant::now();
        let step = Duration::from_micros(100);
        let deadline = first + Duration::from_micros(1_000);
        let at = |us: u64| first + Duration::from_micros(us);
        assert_eq!(due_by(first, step, 0, at(0), deadline), 0..1);
        assert_eq!(due_by(first, step, 1, at(99), deadline), 1..1);
        assert_eq!(due_by(first, step, 1, at(100), deadline), 1..2);
        assert_eq!(due_by(first, step, 2, at(450), deadline), 2..5);
        // Nothing at or past the deadline is sent, however late the wake-up.
        assert_eq!(due_by(first, step, 5, at(5_000), deadline), 5..10);
    }

    /// Every paced request is sent at or after its due time, and each connection gets its
    /// share: connection c is due at first + interval * (c / n + k) until the deadline.
    #[test]
    fn the_pacer_wakes_each_connection_for_each_due_request_and_never_early() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (connections, interval) = (3usize, Duration::from_millis(6));
            let started = Instant::now();
            let first = first_due(started, interval);
            let deadline = started + Duration::from_millis(60);
            let pacer = Pacer::start(connections, first, deadline, interval);
            let step = pacing_step(interval, connections);
            let mut tasks = Vec::new();
            for c in 0..connections {
                let woken = pacer.wakers[c].clone();
                tasks.push(tokio::spawn(async move {
                    let mut sent = Vec::new();
                    let mut k = c as u32;
                    loop {
                        let due = due_at(first, step, k);
                        wait_until(due.min(deadline), &woken).await;
                        if due >= deadline {
                            return sent;
                        }
                        sent.push((due, Instant::now()));
                        k += connections as u32;
                    }
                }));
            }
            for (c, task) in tasks.into_iter().enumerate() {
                let sent = task.await.unwrap();
                let expected = (0u32..)
                    .map(|j| due_at(first, step, c as u32 + j * connections as u32))
                    .take_while(|due| *due < deadline)
                    .count();
                assert_eq!(sent.len(), expected, "connection {c}");
                for (due, at) in sent {
                    assert!(at >= due, "connection {c} sent {:?} early", due - at);
                }
            }
        });
    }

    #[test]
    fn slow_requests_due_close_together_are_one_episode() {
        let ms = |m: u32| m * 1000;
        let slow = [
            (ms(1_000), ms(30)),
            (ms(1_020), ms(60)),
            (ms(1_060), ms(12)),
            (ms(3_000), ms(11)),
            (ms(1_010), ms(45)),
        ];
        assert_eq!(
            stall_episodes(&slow),
            vec![
                StallEpisode {
                    first_due_us: ms(1_000),
                    last_due_us: ms(1_060),
                    requests: 4,
                    worst_us: ms(60),
                },
                StallEpisode {
                    first_due_us: ms(3_000),
                    last_due_us: ms(3_000),
                    requests: 1,
                    worst_us: ms(11),
                },
            ]
        );
    }

    #[test]
    fn phase_lists_parse_and_refuse_unknown_names() {
        assert_eq!(
            PhaseKind::parse_list("ping, single,ping,batch-half,ping-half").unwrap(),
            vec![
                PhaseKind::Ping,
                PhaseKind::Single,
                PhaseKind::Ping,
                PhaseKind::BatchHalf,
                PhaseKind::PingHalf
            ]
        );
        assert_eq!(
            PhaseKind::PingHalf.closed_loop_of(),
            Some(PhaseKind::Single),
            "paced pings run at single-half's rate"
        );
        assert!(PhaseKind::parse_list("ping,pong").is_err());
    }

    #[test]
    fn metrics_text_gives_the_backlog_and_fsyncs() {
        let text = "# HELP x\ntally_events_accepted_total 120\ntally_process_events_total 100\n\
                    tally_log_fsync_seconds_sum 0.5\ntally_log_fsync_seconds_count 1000\n\
                    tally_log_fsync_seconds_bucket{le=\"0.001\"} 999\n\
                    tally_log_group_commit_seconds_bucket{le=\"0.0128\"} 990\n\
                    tally_log_group_commit_seconds_count 1000\n\
                    tally_log_group_commit_lingers_total 40\n\
                    process_cpu_seconds_total 12.5\n";
        let sample = ServerSample::parse(text);
        assert_eq!(sample.backlog(), 20.0);
        assert_eq!(sample.fsyncs, 1000.0);
        assert_eq!(sample.fsync_seconds, 0.5);
        assert_eq!(sample.commits - sample.commits_fast, 10.0);
        assert_eq!(sample.cpu_seconds, 12.5);
        assert_eq!(sample.lingers, 40.0);
    }
}
