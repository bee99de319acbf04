//! `tally bench process`: events/s through the process stage with the enrichment add-ons, and
//! `keen:ip_to_geo` lookups/s on one core.
//!
//! The events (gen_events.py `--addons` output) are first appended to a fresh embedded log, as
//! ingest would; then the real process stage drains the log (read, decode, enrich on every core,
//! hand on) into a sink, and the time to drain is measured. Two sinks are run: one that only
//! counts (the stage's own cost) and the event store with its flushes and merges running (what
//! a server does with each event after ingest), until the store's flushed position reaches the
//! end of the log. Separately, every event's IP address is looked up on one thread.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use prometheus_client::registry::Registry;
use serde_json::Value;
use tally_core::config::LogConfig;
use tally_core::event::{AcceptedEvent, EnrichedEvent, EventSink, SinkError};
use tally_core::ids::{EventIdGenerator, ProjectId};
use tally_core::log::EventLog;
use tally_ingest::EmbeddedEventLog;
use tally_process::geo::{GeoDatabase, GeoLookup, GeoRecordCache};
use tally_process::{Enrichers, GeoIp, ProcessStage, StageConfig};
use tally_store::events::{EventStore, StoreConfig};

#[derive(Debug, clap::Args)]
pub struct ProcessArgs {
    /// gen_events.py --addons output, jsonl format.
    #[arg(long)]
    events: PathBuf,
    /// GeoIP database files (repeat for DB-IP's IPv4 and IPv6 files).
    #[arg(long, required = true)]
    geoip_db: Vec<PathBuf>,
    /// Enrichment threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Also print a single-thread cost breakdown per add-on.
    #[arg(long)]
    breakdown: bool,
    /// Skip the separate lookup measurement (for profiling the stage alone).
    #[arg(long)]
    skip_lookups: bool,
    /// Drop each event's `keen.addons` before logging it: the stage's and the store's cost
    /// for events that ask for no enrichment (what `tally bench ingest` sends).
    #[arg(long)]
    without_addons: bool,
}

/// A sink that only counts.
#[derive(Debug, Default)]
struct CountingSink {
    events: AtomicU64,
    position: AtomicU64,
}

impl EventSink for CountingSink {
    fn write(&self, events: &[EnrichedEvent], log_position: u64) -> Result<(), SinkError> {
        self.events.fetch_add(events.len() as u64, Ordering::Relaxed);
        self.position.store(log_position, Ordering::Release);
        Ok(())
    }
    /// Counted is as good as stored here: the stage reports this position to the log as
    /// consumed, which is what the bench waits for.
    fn committed_position(&self) -> Result<Option<u64>, SinkError> {
        Ok(Some(self.position.load(Ordering::Acquire)).filter(|&p| p > 0))
    }
}

/// The JSON values of a JSON-lines file (gen_events.py's jsonl output), blank lines skipped.
pub(crate) fn read_json_lines(path: &std::path::Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.is_empty())
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading the events in {}", path.display()))
}

pub fn run(args: ProcessArgs) -> anyhow::Result<()> {
    let records = read_json_lines(&args.events)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = args.threads.unwrap_or(cores);
    println!(
        "tally bench process: {} events, {} enrichment thread(s) on {} core(s), GeoIP: {:?}",
        records.len(),
        threads,
        cores,
        args.geoip_db
    );

    let started = Instant::now();
    let geo = GeoIp::open(args.geoip_db.clone())?;
    println!(
        "GeoIP database opened and verified in {:.2} s",
        started.elapsed().as_secs_f64()
    );

    // ip_to_geo lookups on their own, one thread.
    let database: Arc<GeoDatabase> = geo.current().context("no GeoIP database")?;
    let ips: Vec<std::net::IpAddr> = records
        .iter()
        .filter_map(|r| r["event"]["ip_address"].as_str()?.parse().ok())
        .collect();
    let mut found = 0u64;
    let started = Instant::now();
    let mut lookups = 0u64;
    while !args.skip_lookups && started.elapsed() < Duration::from_secs(3) {
        for ip in &ips {
            if let GeoLookup::Found(_) = database.lookup(*ip) {
                found += 1;
            }
        }
        lookups += ips.len() as u64;
    }
    let rate = lookups as f64 / started.elapsed().as_secs_f64();
    println!(
        "ip_to_geo lookups, 1 thread: {:.0}/s ({} distinct addresses, {:.0}% found)",
        rate,
        ips.len(),
        100.0 * found as f64 / lookups.max(1) as f64
    );
    // The same through a record cache as the stage's threads keep one, started empty for every
    // pass over the distinct addresses, so each pass pays for decoding every record it meets
    // first (the cold cost, not a warmed cache).
    let started = Instant::now();
    let mut lookups = 0u64;
    let mut cached_at_end = 0usize;
    while !args.skip_lookups && started.elapsed() < Duration::from_secs(3) {
        let mut cache = GeoRecordCache::default();
        for ip in &ips {
            std::hint::black_box(database.lookup_cached(*ip, &mut cache));
        }
        cached_at_end = cache.len();
        lookups += ips.len() as u64;
    }
    println!(
        "ip_to_geo lookups with the stage's record cache, emptied every pass, 1 thread: {:.0}/s ({} records cached at the end of a pass)",
        lookups as f64 / started.elapsed().as_secs_f64(),
        cached_at_end
    );

    let enrichers = Arc::new(Enrichers::new(geo, &mut Registry::default()));
    enrichers.user_agents().warm_up().map_err(anyhow::Error::msg)?;
    if args.breakdown {
        breakdown(&records, &enrichers, &database)?;
    }
    let addons = if args.without_addons {
        "no add-ons"
    } else {
        "ip_to_geo + ua_parser + url_parser + referrer_parser"
    };
    for (name, into_store) in [
        ("counting sink", false),
        ("event store (flushes and merges running)", true),
    ] {
        let dir = tempfile::tempdir()?;
        let log = Arc::new(EmbeddedEventLog::open(
            &dir.path().join("log"),
            LogConfig::default(),
            &mut Registry::default(),
        )?);
        fill_log(&log, &records, args.without_addons)?;
        let end = log.status().durable_end;
        if args.skip_lookups {
            // A moment to attach a profiler to just the stage.
            println!("log filled; stage starts in 2 s");
            std::thread::sleep(Duration::from_secs(2));
        }
        let mut maintenance = None;
        let sink: Arc<dyn EventSink> = if into_store {
            let store = Arc::new(EventStore::open(
                &dir.path().join("store"),
                StoreConfig::default(),
            )?);
            maintenance = Some(store.start_maintenance()?);
            store
        } else {
            Arc::new(CountingSink::default())
        };
        // The stage reports the sink's durable position to the log as consumed: the store's
        // after a flush, which the wait below includes.
        let config = StageConfig {
            threads,
            idle_wait: Duration::from_micros(200),
            ..StageConfig::default()
        };
        let started = Instant::now();
        let stage = ProcessStage::start(
            log.clone(),
            sink.clone(),
            enrichers.clone(),
            config,
            &mut Registry::default(),
        )?;
        while log.status().consumed < end {
            std::thread::sleep(Duration::from_micros(500));
        }
        let elapsed = started.elapsed();
        stage.stop();
        if let Some(maintenance) = maintenance {
            maintenance.stop();
        }
        println!(
            "process stage, {addons}, {name}: {:.0} events/s ({} events in {:.2} s)",
            records.len() as f64 / elapsed.as_secs_f64(),
            records.len(),
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}

/// Appends the events to the log in batches of 500, stamped as ingest would, without their
/// `keen.addons` if asked.
fn fill_log(log: &EmbeddedEventLog, records: &[Value], without_addons: bool) -> anyhow::Result<()> {
    let ids = EventIdGenerator::new();
    let project = ProjectId::from_bytes([1; 12]);
    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    for chunk in records.chunks(500) {
        let events: Vec<AcceptedEvent> = chunk
            .iter()
            .map(|record| {
                let mut event = record["event"].clone();
                if without_addons && let Some(keen) = event.get_mut("keen").and_then(Value::as_object_mut) {
                    keen.remove("addons");
                }
                let mut keen = event["keen"].as_object().cloned().unwrap_or_default();
                keen.insert(
                    "created_at".into(),
                    keen.get("timestamp").cloned().unwrap_or(Value::Null),
                );
                keen.insert("id".into(), Value::String(ids.next_id(0)));
                AcceptedEvent {
                    project,
                    collection: record["collection"].as_str().unwrap_or("events").to_string(),
                    uniqueness_token: None,
                    created_at_ms: 0,
                    keen_json: Value::Object(keen).to_string(),
                    body_json: Bytes::from(event.to_string()),
                }
            })
            .collect();
        runtime.block_on(log.append(&events))?;
    }
    Ok(())
}

/// Single-thread cost of each step, per event, to show where the stage's time goes.
fn breakdown(records: &[Value], enrichers: &Enrichers, database: &GeoDatabase) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let log = EmbeddedEventLog::open(
        &dir.path().join("log"),
        LogConfig::default(),
        &mut Registry::default(),
    )?;
    fill_log(&log, records, false)?;
    let mut reader = log.reader(0);
    let mut entries = Vec::new();
    loop {
        let batch = reader.read_batch(64 << 20)?;
        if batch.is_empty() {
            break;
        }
        entries.extend(batch);
    }
    let n = entries.len() as f64;
    let time = |label: &str, f: &mut dyn FnMut()| {
        let started = Instant::now();
        f();
        println!(
            "  {label:<44} {:>7.2} µs/event",
            started.elapsed().as_secs_f64() * 1e6 / n
        );
    };
    println!("breakdown, one thread:");
    let mut decoded = Vec::new();
    // The first pass touches fresh memory; the second shows the steady cost.
    for pass in ["cold", "warm"] {
        time(&format!("decode record + parse event JSON ({pass})"), &mut || {
            decoded = entries
                .iter()
                .map(|e| {
                    tally_core::event::LoggedEvent::decode(&e.payload)
                        .unwrap()
                        .to_json()
                        .unwrap()
                })
                .collect();
        });
    }
    let addon = |name: &str| -> Vec<Value> {
        decoded
            .iter()
            .map(|e| {
                let mut e = e.clone();
                let keen = e["keen"].as_object_mut().unwrap();
                let addons: Vec<Value> = keen["addons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|a| a["name"] == name)
                    .cloned()
                    .collect();
                keen.insert("addons".into(), Value::Array(addons));
                e
            })
            .collect()
    };
    let geo = Some(database);
    let mut copies = addon("none");
    time("clone event (baseline for the rows below)", &mut || {
        for e in copies.iter_mut() {
            std::hint::black_box(e.clone());
        }
    });
    for name in [
        "keen:ip_to_geo",
        "keen:ua_parser",
        "keen:url_parser",
        "keen:referrer_parser",
    ] {
        let mut events = addon(name);
        time(&format!("{name} (incl. clone)"), &mut || {
            for e in events.iter_mut() {
                let mut e = e.clone();
                enrichers.enrich(e.as_object_mut().unwrap(), geo);
            }
        });
    }
    let mut events = decoded.clone();
    time("all four add-ons", &mut || {
        for e in events.iter_mut() {
            enrichers.enrich(e.as_object_mut().unwrap(), geo);
        }
    });
    Ok(())
}
