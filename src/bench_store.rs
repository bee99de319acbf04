//! `tally bench store`: what the embedded event store costs per event on its write path, step
//! by step: building fresh segments from events' JSON text (`EventStore::write`), flushing them
//! to disk (one merge per collection, encoding, an `O_DIRECT` write and fsync, the manifest),
//! and merging small durable segments into big ones, as the store's maintenance thread does.
//!
//! The process stage hands the store batches of a few thousand events and the maintenance
//! thread flushes every second; this bench does the same work in the same shapes, but on one
//! thread in turn, so each step's CPU time (the process's, including the threads a write
//! starts) is measured on its own. It also reports the memory the stored segments hold per
//! event, since every segment stays in memory. Compare two builds by running both on the same
//! events; nothing else in the process runs meanwhile.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::Value;
use tally_core::event::{EnrichedEvent, EventSink};
use tally_core::ids::{EventIdGenerator, ProjectId};
use tally_core::worker::process_cpu_seconds;
use tally_store::events::{EventStore, StoreConfig};

#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    /// gen_events.py output in jsonl format ({"collection": ..., "event": {...}} per line);
    /// repeated, with fresh event ids, until `--total` events.
    #[arg(long)]
    events: PathBuf,
    /// Events stored in all.
    #[arg(long, default_value_t = 2_000_000)]
    total: usize,
    /// Events per write (the process stage's batches are about 9,000 events of this size when
    /// it is behind).
    #[arg(long, default_value_t = 9_000)]
    batch: usize,
    /// Events between flushes (the maintenance thread flushes every second: this is a second
    /// at 200,000 events/s).
    #[arg(long, default_value_t = 200_000)]
    flush_every: usize,
}

/// CPU and wall time spent in one kind of step.
#[derive(Debug, Default)]
struct Spent {
    cpu: f64,
    wall: Duration,
    steps: usize,
}

impl Spent {
    fn measure<T>(&mut self, step: impl FnOnce() -> T) -> T {
        let (cpu, wall) = (process_cpu_seconds(), Instant::now());
        let out = step();
        self.cpu += process_cpu_seconds() - cpu;
        self.wall += wall.elapsed();
        self.steps += 1;
        out
    }
}

pub fn run(args: StoreArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.total > 0 && args.batch > 0 && args.flush_every > 0,
        "--total, --batch and --flush-every must be positive"
    );
    let records = crate::bench_process::read_json_lines(&args.events)?;
    anyhow::ensure!(!records.is_empty(), "no events in {}", args.events.display());
    let events = stored_events(&records, args.total);
    let bytes: usize = events.iter().map(|e| e.json.len()).sum();
    // Printed before the measured steps start (a profiler can wait for this line).
    println!(
        "tally bench store: {} events ({:.0} bytes of JSON each on average), writes of {}, a flush every {} events",
        events.len(),
        bytes as f64 / events.len() as f64,
        args.batch,
        args.flush_every
    );
    std::io::Write::flush(&mut std::io::stdout())?;

    let dir = tempfile::tempdir()?;
    let store = EventStore::open(dir.path(), StoreConfig::default())?;
    let (mut write, mut flush, mut merge) = (Spent::default(), Spent::default(), Spent::default());
    let mut since_flush = 0;
    let mut position = 0u64;
    for chunk in events.chunks(args.batch) {
        position += chunk.len() as u64;
        write.measure(|| store.write(chunk, position))?;
        since_flush += chunk.len();
        if since_flush >= args.flush_every {
            since_flush = 0;
            flush.measure(|| store.flush())?;
            merge.measure(|| store.merge_small())?;
        }
    }
    flush.measure(|| store.flush())?;
    merge.measure(|| store.merge_small())?;

    let n = events.len() as f64;
    println!("step                         CPU µs/event   wall ms/step   steps");
    for (name, spent) in [
        ("write (build segments)", &write),
        ("flush (merge, encode, fsync)", &flush),
        ("merge small segments", &merge),
    ] {
        println!(
            "{name:28} {:>12.3}   {:>12.2}   {:>5}",
            spent.cpu / n * 1e6,
            spent.wall.as_secs_f64() * 1e3 / spent.steps.max(1) as f64,
            spent.steps
        );
    }
    let total = write.cpu + flush.cpu + merge.cpu;
    println!("{:28} {:>12.3}", "all steps", total / n * 1e6);
    let mut held = 0usize;
    let mut segments = 0usize;
    for project in store.projects() {
        for collection in store.collections(project) {
            for stored in store.snapshot(project, &collection) {
                held += stored.segment.heap_bytes();
                segments += 1;
            }
        }
    }
    println!(
        "held in memory: {:.0} bytes/event in {} segments; on disk: {:.0} bytes/event",
        held as f64 / n,
        segments,
        dir_bytes(&dir.path().join("segments")) as f64 / n
    );
    Ok(())
}

/// `total` events as the process stage hands them to the store (the stamped `keen` object
/// first), cycling through `records` with a new event id each time.
fn stored_events(records: &[Value], total: usize) -> Vec<EnrichedEvent> {
    let project = ProjectId::random();
    let ids = EventIdGenerator::new();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    let now = tally_core::time::format_timestamp_ms(now_ms);
    records
        .iter()
        .cycle()
        .take(total)
        .map(|record| {
            let mut event = record["event"].as_object().cloned().unwrap_or_default();
            let mut keen = event
                .remove("keen")
                .and_then(|k| k.as_object().cloned())
                .unwrap_or_default();
            keen.entry("timestamp")
                .or_insert_with(|| Value::String(now.clone()));
            keen.insert("created_at".into(), Value::String(now.clone()));
            keen.insert("id".into(), Value::String(ids.next_id(now_ms)));
            let mut json = String::from("{\"keen\":");
            json.push_str(&Value::Object(keen).to_string());
            for (name, value) in event {
                json.push(',');
                json.push_str(&Value::String(name).to_string());
                json.push(':');
                json.push_str(&value.to_string());
            }
            json.push('}');
            EnrichedEvent {
                project,
                collection: record["collection"].as_str().unwrap_or("events").to_owned(),
                json,
            }
        })
        .collect()
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
