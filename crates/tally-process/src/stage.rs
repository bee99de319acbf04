//! The process stage: read the event log, enrich, hand on to the sink, commit.
//!
//! One thread owns the loop. It starts from the position the sink stored with its last write
//! (the sink records it atomically with the events, so a crash neither loses nor repeats an
//! event), or the log's consumed position if the sink has none. For each batch it decodes and
//! enriches the events, on several threads when the batch is large, writes them to the sink with
//! the position after the batch, and then tells the log that position is consumed (so the log can
//! drop old segments and ingest's back-pressure sees the stage keeping up). A sink failure is
//! retried with the same batch; nothing moves on until it succeeds.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tally_core::event::{EnrichedEvent, EventSink, LoggedEvent};
use tally_core::log::EventLog;
use tally_core::worker::{BackgroundCpus, StoppableThread};
use tally_ingest::EmbeddedEventLog;
use tally_ingest::log::LogEntry;

use crate::access::RawEvent;
use crate::enrich::{EnrichMemo, Enrichers};
use crate::geo::GeoDatabase;

/// Ingest counts as idle, and background threads may use every CPU, once the log has not grown
/// for this long.
pub const INGEST_IDLE_AFTER: Duration = Duration::from_millis(250);

/// Settings of the process stage.
#[derive(Debug, Clone)]
pub struct StageConfig {
    /// Read up to this many bytes of log per batch.
    pub max_batch_bytes: usize,
    /// Threads that enrich a large batch in parallel.
    pub threads: usize,
    /// How long to wait when the log has nothing new.
    pub idle_wait: Duration,
    /// After a small batch (under a quarter of `max_batch_bytes`: the stage has caught up), the
    /// least time between one read of the log and the next, so events gather into bigger
    /// batches (`process.linger_ms`).
    pub linger: Duration,
    /// Scheduling niceness of the stage's threads (0 = same as ingest; higher yields to it).
    pub niceness: i32,
    /// Where the stage's threads run (`None`: anywhere): off the CPUs kept for ingest while it
    /// is busy (`process.reserved_ingest_cpus`). The stage tells the plan whether ingest is
    /// busy: the log grew within [`INGEST_IDLE_AFTER`].
    pub cpus: Option<Arc<BackgroundCpus>>,
}

impl Default for StageConfig {
    fn default() -> Self {
        Self {
            max_batch_bytes: 4 << 20,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            idle_wait: Duration::from_millis(5),
            linger: Duration::ZERO,
            niceness: 10,
            cpus: None,
        }
    }
}

/// The stage's counters.
#[derive(Debug, Clone, Default)]
pub struct StageMetrics {
    /// Events handed to the sink.
    pub events: Counter,
    /// Log records that could not be decoded.
    pub bad_records: Counter,
    /// Failed sink writes (each retried).
    pub sink_errors: Counter,
}

impl StageMetrics {
    /// Counters registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "tally_process_events",
            "Events enriched and handed to the store by the process stage",
            metrics.events.clone(),
        );
        registry.register(
            "tally_process_bad_records",
            "Log records the process stage could not decode (logged with their position)",
            metrics.bad_records.clone(),
        );
        registry.register(
            "tally_process_sink_errors",
            "Failed writes to the store (retried)",
            metrics.sink_errors.clone(),
        );
        metrics
    }
}

/// The running stage.
#[derive(Debug)]
pub struct ProcessStage {
    thread: StoppableThread,
}

impl ProcessStage {
    /// Starts the stage thread.
    pub fn start(
        log: Arc<EmbeddedEventLog>,
        sink: Arc<dyn EventSink>,
        enrichers: Arc<Enrichers>,
        config: StageConfig,
        registry: &mut Registry,
    ) -> std::io::Result<Self> {
        let metrics = StageMetrics::register(registry);
        let thread = StoppableThread::spawn("tally-process", move |stop| {
            run(&log, sink.as_ref(), &enrichers, &config, &metrics, stop)
        })?;
        Ok(Self { thread })
    }

    /// Asks the stage to stop after the batch in hand, and waits for it.
    pub fn stop(self) {
        self.thread.stop();
    }
}

fn run(
    log: &EmbeddedEventLog,
    sink: &dyn EventSink,
    enrichers: &Arc<Enrichers>,
    config: &StageConfig,
    metrics: &StageMetrics,
    stop: &AtomicBool,
) {
    // First, so that the enrichment threads started next inherit the CPUs.
    tally_core::worker::lower_priority(config.niceness);
    let mut applied_cpus = None;
    if let Some(cpus) = &config.cpus {
        cpus.follow(&mut applied_cpus);
    }
    let pool = match config.threads {
        0 | 1 => None,
        n => match WorkerPool::new(n, enrichers.clone(), metrics.clone(), config) {
            Ok(pool) => Some(pool),
            Err(e) => {
                tracing::error!(error = %e, "process stage: cannot start enrichment threads; enriching on one");
                None
            }
        },
    };
    let stopped = || stop.load(Ordering::Acquire);
    let backoff = Duration::from_millis(500);
    let mut position = loop {
        match sink.committed_position() {
            Ok(Some(position)) => break position,
            Ok(None) => break tally_core::log::EventLog::status(log).consumed,
            Err(e) => {
                tracing::error!(error = %e, "process stage: cannot read the store's position; retrying");
                if stopped() {
                    return;
                }
                std::thread::sleep(backoff);
            }
        }
    };
    tracing::info!(position, "process stage started");
    let mut reader = log.reader(position);
    // The batch read while the previous one was enriched, if the stage was behind.
    let mut read_ahead: Option<Vec<LogEntry>> = None;
    let (mut log_end, mut log_grew) = (log.status().durable_end, Instant::now());
    while !stopped() {
        let read_at = Instant::now();
        if let Some(cpus) = &config.cpus {
            let end = log.status().durable_end;
            if end != log_end {
                (log_end, log_grew) = (end, read_at);
            }
            cpus.ingest_busy(read_at.duration_since(log_grew) < INGEST_IDLE_AFTER);
            cpus.follow(&mut applied_cpus);
        }
        let batch = match read_ahead
            .take()
            .map_or_else(|| reader.read_batch(config.max_batch_bytes), Ok)
        {
            Ok(batch) => batch,
            Err(e) => {
                tracing::error!(error = %e, position, "process stage: reading the log failed; retrying");
                std::thread::sleep(backoff);
                reader = log.reader(position);
                continue;
            }
        };
        let Some(next) = batch.last().map(|entry| entry.next) else {
            report_durable(log, sink);
            std::thread::sleep(config.idle_wait);
            continue;
        };
        let behind = next - position >= (config.max_batch_bytes / 4) as u64;
        let (events, sizes) = match &pool {
            Some(pool) => {
                let pending = pool.dispatch(batch);
                // While the enrichment threads work, a stage that is behind reads its next
                // batch: with O_DIRECT that is mostly waiting for the disk, which would otherwise
                // hold up the next batch (about 8% of the stage's time, measured). Reading ahead
                // through the page cache had cost CPU the enrichment threads needed, and was
                // slower on two cores.
                if behind {
                    match reader.read_batch(config.max_batch_bytes) {
                        Ok(ahead) => read_ahead = Some(ahead),
                        Err(e) => {
                            tracing::error!(error = %e, position = next, "process stage: reading the log failed; retrying");
                            reader = log.reader(next);
                        }
                    }
                }
                pending.collect()
            }
            None => (process_batch(&batch, enrichers, metrics), Vec::new()),
        };
        while let Err(e) = sink.write(&events, next) {
            metrics.sink_errors.inc();
            tracing::error!(error = %e, position, "process stage: the store refused a batch; retrying it");
            if stopped() {
                return;
            }
            std::thread::sleep(backoff);
        }
        report_durable(log, sink);
        metrics.events.inc_by(events.len() as u64);
        position = next;
        if let Some(pool) = &pool {
            pool.free(events, &sizes);
        }
        if !behind {
            // Caught up: let the next events gather (see `StageConfig::linger`).
            while let Some(rest) = config.linger.checked_sub(read_at.elapsed()) {
                if stopped() || rest.is_zero() {
                    break;
                }
                std::thread::sleep(rest.min(Duration::from_millis(50)));
            }
        }
    }
}

/// Tells the log how far the sink has made events durable, so it keeps every record the sink
/// could still need after a crash (a store may hold the newest events in memory for a while).
fn report_durable(log: &EmbeddedEventLog, sink: &dyn EventSink) {
    match sink.committed_position() {
        Ok(Some(position)) => {
            if let Err(e) = log.commit_consumed(position) {
                tracing::warn!(error = %e, "process stage: recording the consumed log position failed");
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(error = %e, "process stage: cannot read the store's durable position"),
    }
}

/// Work for a pool thread.
enum Work {
    /// Decode and enrich these records; send the events back, and the records too, so that
    /// the thread that read them frees them.
    Enrich(Vec<LogEntry>, mpsc::Sender<(Vec<EnrichedEvent>, Vec<LogEntry>)>),
    /// Free these events (the ones this thread made).
    Free(Vec<EnrichedEvent>),
}

/// Long-lived enrichment threads. Each enriches one chunk of a batch and later frees the same
/// events itself: with a thread per batch, or events freed on another thread, the allocator's
/// per-thread heaps were abandoned and reclaimed constantly, and over a quarter of the stage's time
/// went to freeing memory (measured with perf).
struct WorkerPool {
    senders: Vec<mpsc::Sender<Work>>,
    handles: Vec<JoinHandle<()>>,
}

impl WorkerPool {
    fn new(
        threads: usize,
        enrichers: Arc<Enrichers>,
        metrics: StageMetrics,
        config: &StageConfig,
    ) -> std::io::Result<Self> {
        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for i in 0..threads {
            let (sender, receiver) = mpsc::channel::<Work>();
            let (enrichers, metrics) = (enrichers.clone(), metrics.clone());
            let (niceness, cpus) = (config.niceness, config.cpus.clone());
            handles.push(
                std::thread::Builder::new()
                    .name(format!("tally-enrich-{i}"))
                    .spawn(move || {
                        tally_core::worker::lower_priority(niceness);
                        let mut memo = EnrichMemo::default();
                        let mut applied_cpus = None;
                        while let Ok(work) = receiver.recv() {
                            if let Some(cpus) = &cpus {
                                cpus.follow(&mut applied_cpus);
                            }
                            match work {
                                Work::Enrich(entries, reply) => {
                                    let geo = enrichers.geo().current();
                                    let events = entries
                                        .iter()
                                        .filter_map(|e| {
                                            process_one(e, &enrichers, geo.as_deref(), &mut memo, &metrics)
                                        })
                                        .collect();
                                    let _ = reply.send((events, entries));
                                }
                                Work::Free(events) => drop(events),
                            }
                        }
                    })?,
            );
            senders.push(sender);
        }
        Ok(Self { senders, handles })
    }

    /// Starts enriching `batch` across the threads; [`Pending::collect`] waits for the events.
    fn dispatch(&self, mut batch: Vec<LogEntry>) -> Pending {
        let chunk = batch.len().div_ceil(self.senders.len()).max(1);
        let mut replies = Vec::new();
        let mut chunks = Vec::new();
        while !batch.is_empty() {
            let rest = batch.split_off(chunk.min(batch.len()));
            chunks.push(std::mem::replace(&mut batch, rest));
        }
        for (sender, entries) in self.senders.iter().zip(chunks) {
            let (reply, answer) = mpsc::channel();
            sender
                .send(Work::Enrich(entries, reply))
                .expect("enrichment thread alive");
            replies.push(answer);
        }
        Pending { replies }
    }

    /// Hands each thread back the events it made, to free.
    fn free(&self, mut events: Vec<EnrichedEvent>, sizes: &[usize]) {
        for (sender, size) in self.senders.iter().zip(sizes) {
            let rest = events.split_off((*size).min(events.len()));
            let _ = sender.send(Work::Free(std::mem::replace(&mut events, rest)));
        }
    }
}

/// A batch being enriched by the pool.
struct Pending {
    replies: Vec<mpsc::Receiver<(Vec<EnrichedEvent>, Vec<LogEntry>)>>,
}

impl Pending {
    /// The events, in order, and how many came from each thread (to hand them back with
    /// [`WorkerPool::free`]). The log records are freed here, on the thread that read them:
    /// freed on another thread, the allocator kept taking fresh pages for new ones.
    fn collect(self) -> (Vec<EnrichedEvent>, Vec<usize>) {
        let mut events = Vec::new();
        let mut sizes = Vec::new();
        for answer in self.replies {
            let (part, entries) = answer.recv().expect("enrichment thread alive");
            drop(entries);
            sizes.push(part.len());
            events.extend(part);
        }
        (events, sizes)
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.senders.clear();
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

/// Decodes and enriches a batch on the calling thread. Order is kept.
pub fn process_batch(
    batch: &[LogEntry],
    enrichers: &Enrichers,
    metrics: &StageMetrics,
) -> Vec<EnrichedEvent> {
    let geo = enrichers.geo().current();
    let mut memo = EnrichMemo::default();
    batch
        .iter()
        .filter_map(|e| process_one(e, enrichers, geo.as_deref(), &mut memo, metrics))
        .collect()
}

fn process_one(
    entry: &LogEntry,
    enrichers: &Enrichers,
    geo: Option<&GeoDatabase>,
    memo: &mut EnrichMemo,
    metrics: &StageMetrics,
) -> Option<EnrichedEvent> {
    enrich_record(
        &entry.payload,
        &entry.position,
        RecordOrigin::OwnLog,
        enrichers,
        geo,
        memo,
        metrics,
    )
}

/// Decodes one log record and applies its add-ons: the work of the stage for one event,
/// whichever log it came from. `at` names the record in the error logged for an undecodable
/// one (which is counted and skipped). `memo` is the calling thread's own (one per thread, kept
/// from batch to batch).
pub fn enrich_record(
    payload: &[u8],
    at: &dyn std::fmt::Display,
    origin: RecordOrigin,
    enrichers: &Enrichers,
    geo: Option<&GeoDatabase>,
    memo: &mut EnrichMemo,
    metrics: &StageMetrics,
) -> Option<EnrichedEvent> {
    let decoded = LoggedEvent::decode(payload).map_err(|e| e.to_string());
    if let Ok(logged) = &decoded
        && origin == RecordOrigin::OwnLog
        && let Some(json) = stamped_as_sent(logged.keen_json, logged.body_json)
    {
        return Some(EnrichedEvent {
            project: logged.project,
            collection: logged.collection.to_string(),
            json,
        });
    }
    let decoded = decoded.and_then(|logged| {
        let (keen, addons) =
            RawEvent::parse_taking(logged.keen_json.as_bytes(), "addons").map_err(|e| e.to_string())?;
        let body = RawEvent::parse(logged.body_json, "keen").map_err(|e| e.to_string())?;
        Ok((logged, keen, addons, body))
    });
    let (logged, keen, addons, mut event) = match decoded {
        Ok(ok) => ok,
        Err(e) => {
            metrics.bad_records.inc();
            tracing::error!(position = %at, error = %e, "process stage: skipping an undecodable log record");
            return None;
        }
    };
    // The stamped keen goes in first: add-ons may read it (date_time_parser on keen.timestamp).
    event.push_front_text("keen", keen.to_json());
    if let Some(addons) = addons {
        enrichers.enrich_with(&mut event, addons, geo, memo);
    }
    Some(EnrichedEvent {
        project: logged.project,
        collection: logged.collection.to_string(),
        json: event.to_json(),
    })
}

/// Where a log record was read from, which decides how much it is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordOrigin {
    /// This node's embedded log: written by this node's ingest after validation, each record
    /// checksummed. Events without add-ons may take [`stamped_as_sent`], which does not parse
    /// the body again.
    OwnLog,
    /// A shared topic anything can produce to (Kafka as the log): every record is parsed, and
    /// one that is not a valid event is counted in `tally_process_bad_records` and skipped.
    SharedTopic,
}

/// The stored text of an event that asks for no add-ons: the stamped `keen` object, then the
/// body's other top-level members as the client sent them. This is what splitting the event
/// into its members and writing them out again gives (the same members in the same order;
/// spacing and escapes inside them as sent), found with a scan of the body's top level instead
/// of a parse: for such events that parse was most of the stage's own work. `None` for every
/// other event, which takes the general path.
///
/// The body's own `keen` members are left out (the stamped one replaces them). A name can be
/// spelt with `\u` escapes, which this scan does not decode, so bodies containing `\u` take
/// the general path. The body was validated as a JSON object at ingest; anything the scan does
/// not recognise also takes the general path.
fn stamped_as_sent(keen_json: &str, body: &[u8]) -> Option<String> {
    use std::sync::LazyLock;

    use memchr::memmem::Finder;
    // Built once: `memmem::find` builds a searcher on every call, twice per event here (seen in
    // the enrichment threads' profile). Constant tables, not state.
    static ADDONS: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\"addons\""));
    static ESCAPE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"\\u"));
    if ADDONS.find(keen_json.as_bytes()).is_some() || ESCAPE.find(body).is_some() {
        return None;
    }
    let body = std::str::from_utf8(body).ok()?;
    let mut json = String::with_capacity(keen_json.len() + body.len() + 10);
    json.push_str("{\"keen\":");
    json.push_str(keen_json);
    for member in TopLevelMembers::new(body.as_bytes())? {
        let (name, range) = member?;
        if name != b"keen" {
            json.push(',');
            json.push_str(&body[range]);
        }
    }
    json.push('}');
    Some(json)
}

/// The top-level members of a JSON object's text, each as its name's raw bytes (between the
/// quotes) and the byte range of the whole member (`"name": value`). Yields `None` (and stops)
/// where the text is not one object followed by nothing but whitespace.
struct TopLevelMembers<'a> {
    text: &'a [u8],
    at: usize,
    done: bool,
}

impl<'a> TopLevelMembers<'a> {
    fn new(text: &'a [u8]) -> Option<Self> {
        let mut members = Self {
            text,
            at: 0,
            done: false,
        };
        members.skip_space();
        if members.text.get(members.at) != Some(&b'{') {
            return None;
        }
        members.at += 1;
        members.skip_space();
        if members.text.get(members.at) == Some(&b'}') {
            // An empty object: no members, and nothing may follow it.
            members.done = true;
            return members.ends_after_closing_brace().then_some(members);
        }
        Some(members)
    }

    /// Whether the object's closing brace, at `self.at`, is followed by nothing but whitespace.
    fn ends_after_closing_brace(&self) -> bool {
        self.text[self.at + 1..].iter().all(u8::is_ascii_whitespace)
    }

    fn skip_space(&mut self) {
        while self.text.get(self.at).is_some_and(|b| b.is_ascii_whitespace()) {
            self.at += 1;
        }
    }

    /// From an opening quote to just past its closing quote.
    fn skip_string(&mut self) -> Option<()> {
        let mut at = self.at + 1;
        loop {
            at += memchr::memchr2(b'"', b'\\', &self.text[at..])?;
            if self.text[at] == b'\\' {
                at += 2;
            } else {
                self.at = at + 1;
                return Some(());
            }
        }
    }

    /// Past one value: a string, an object or array (brackets counted outside strings), or a
    /// number or literal (up to the next delimiter).
    fn skip_value(&mut self) -> Option<()> {
        match *self.text.get(self.at)? {
            b'"' => self.skip_string(),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match *self.text.get(self.at)? {
                        b'"' => {
                            self.skip_string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.at += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.at += 1;
                }
            }
            _ => {
                let rest = &self.text[self.at..];
                let len = rest
                    .iter()
                    .position(|b| matches!(b, b',' | b'}' | b']') || b.is_ascii_whitespace())?;
                (len > 0).then(|| self.at += len)
            }
        }
    }

    fn next_member(&mut self) -> Option<(&'a [u8], std::ops::Range<usize>)> {
        let start = self.at;
        if self.text.get(start) != Some(&b'"') {
            return None;
        }
        self.skip_string()?;
        let name = &self.text[start + 1..self.at - 1];
        self.skip_space();
        if self.text.get(self.at) != Some(&b':') {
            return None;
        }
        self.at += 1;
        self.skip_space();
        self.skip_value()?;
        let end = self.at;
        self.skip_space();
        match self.text.get(self.at) {
            Some(b',') => {
                self.at += 1;
                self.skip_space();
            }
            Some(b'}') if self.ends_after_closing_brace() => self.done = true,
            _ => return None,
        }
        Some((name, start..end))
    }
}

impl<'a> Iterator for TopLevelMembers<'a> {
    /// A member, or `None` where the text is not what it should be (the last item then).
    type Item = Option<(&'a [u8], std::ops::Range<usize>)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let member = self.next_member();
        if member.is_none() {
            self.done = true;
        }
        Some(member)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use bytes::Bytes;
    use serde_json::json;
    use tally_core::ProjectId;
    use tally_core::config::LogConfig;
    use tally_core::event::AcceptedEvent;
    use tally_core::log::EventLog;

    use super::*;
    use crate::geo::GeoIp;
    use crate::sink::{JsonLinesSink, MemorySink, read_committed};

    fn geoip() -> GeoIp {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/testdata/geoip/GeoIP2-City-Test.mmdb");
        GeoIp::open(vec![path]).unwrap()
    }

    fn event(n: u64) -> AcceptedEvent {
        let addons = json!([
            {"name": "keen:ip_to_geo", "input": {"ip": "ip", "remove_ip_property": true}, "output": "geo"},
            {"name": "keen:url_parser", "input": {"url": "page"}, "output": "parsed.page"},
            {"name": "keen:referrer_parser", "input": {"referrer_url": "ref", "page_url": "page"}, "output": "referrer"},
            {"name": "keen:date_time_parser", "input": {"date_time": "keen.timestamp"}, "output": "time"},
            {"name": "keen:ua_parser", "input": {"ua_string": "missing.ua"}, "output": "ua"}
        ]);
        AcceptedEvent {
            project: ProjectId::from_bytes([3; 12]),
            collection: "visits".into(),
            uniqueness_token: None,
            created_at_ms: 0,
            keen_json:
                json!({"timestamp": "2026-03-08T23:30:05.123Z", "id": format!("{n:024}"), "addons": addons})
                    .to_string(),
            body_json: Bytes::from(
                json!({"n": n, "ip": "81.2.69.142", "page": "https://shop.example.com/a?x=1",
                       "ref": "https://www.google.com/search?q=tally"})
                .to_string(),
            ),
        }
    }

    fn wait_for(mut done: impl FnMut() -> bool) {
        // A hang guard, not a timing assertion.
        for _ in 0..6000 {
            if done() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("the process stage did not catch up");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_stage_enriches_removes_addons_and_counts_skips() {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = Registry::default();
        let log = Arc::new(EmbeddedEventLog::open(dir.path(), LogConfig::default(), &mut registry).unwrap());
        log.append(&[event(1)]).await.unwrap();
        let sink = Arc::new(MemorySink::default());
        let enrichers = Arc::new(Enrichers::new(geoip(), &mut registry));
        let stage = ProcessStage::start(
            log.clone(),
            sink.clone(),
            enrichers,
            StageConfig::default(),
            &mut registry,
        )
        .unwrap();
        wait_for(|| sink.events().len() == 1);
        stage.stop();
        let stored = &sink.events()[0];
        assert_eq!(stored.collection, "visits");
        let event = stored.to_value();
        assert_eq!(event["keen"].get("addons"), None, "keen.addons is removed");
        assert_eq!(event.get("ip"), None, "remove_ip_property");
        assert_eq!(event["geo"]["city"], "London");
        assert_eq!(event["parsed"]["page"]["domain"], "shop.example.com");
        assert_eq!(
            event["referrer"],
            json!({"medium": "SEARCH", "source": "Google", "term": "tally"})
        );
        assert_eq!(event["time"]["day_of_week_string"], "Sunday");
        assert_eq!(event.get("ua"), None, "missing input leaves the output out");
        assert_eq!(
            tally_core::log::EventLog::status(log.as_ref()).lag_bytes(),
            0,
            "consumed is committed"
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(r#"tally_enrich_skipped_total{addon="keen:ua_parser",reason="missing_input"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"tally_enrich_applied_total{addon="keen:ip_to_geo"} 1"#),
            "{text}"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_stage_resumes_where_the_sink_left_off_and_writes_nothing_twice() {
        let dir = tempfile::tempdir().unwrap();
        let sink_path = dir.path().join("enriched/events.jsonl");
        let mut registry = Registry::default();
        let log = Arc::new(
            EmbeddedEventLog::open(&dir.path().join("log"), LogConfig::default(), &mut registry).unwrap(),
        );
        let enrichers = Arc::new(Enrichers::new(GeoIp::none(), &mut registry));
        for n in 0..300 {
            log.append(&[event(n)]).await.unwrap();
        }
        let sink = Arc::new(JsonLinesSink::open(&sink_path).unwrap());
        let config = StageConfig {
            max_batch_bytes: 4096,
            ..StageConfig::default()
        };
        let stage = ProcessStage::start(
            log.clone(),
            sink,
            enrichers.clone(),
            config.clone(),
            &mut registry,
        )
        .unwrap();
        wait_for(|| read_committed(&sink_path).unwrap().0.len() == 300);
        stage.stop();
        // A crash in the middle of a sink write leaves an uncommitted tail: it is dropped on open.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&sink_path)
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, b"{\"project_id\":\"x\",\"collection\":\"half")
            })
            .unwrap();
        for n in 300..350 {
            log.append(&[event(n)]).await.unwrap();
        }
        let sink = Arc::new(JsonLinesSink::open(&sink_path).unwrap());
        let stage = ProcessStage::start(log.clone(), sink, enrichers, config, &mut registry).unwrap();
        wait_for(|| read_committed(&sink_path).unwrap().0.len() >= 350);
        stage.stop();
        let (lines, position, _) = read_committed(&sink_path).unwrap();
        let ns: Vec<u64> = lines.iter().map(|l| l["event"]["n"].as_u64().unwrap()).collect();
        assert_eq!(ns, (0..350).collect::<Vec<_>>());
        assert_eq!(
            position,
            Some(tally_core::log::EventLog::status(log.as_ref()).durable_end)
        );
    }
}

/// The shortcut for events without add-ons against the general path it stands in for.
#[cfg(test)]
mod stamped_as_sent_tests {
    use proptest::prelude::*;
    use serde_json::Value;

    use super::stamped_as_sent;
    use crate::access::RawEvent;

    /// The general path's text for an event without add-ons.
    fn general(keen_json: &str, body: &str) -> String {
        let (keen, addons) = RawEvent::parse_taking(keen_json.as_bytes(), "addons").unwrap();
        assert!(addons.is_none());
        let mut event = RawEvent::parse(body.as_bytes(), "keen").unwrap();
        event.push_front_text("keen", keen.to_json());
        event.to_json()
    }

    /// An object's members in order, repeated names kept, each value parsed.
    fn members_of(json: &str) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        let mut de = serde_json::Deserializer::from_str(json);
        struct Members<'o>(&'o mut Vec<(String, Value)>);
        impl<'de> serde::de::Visitor<'de> for Members<'_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
                while let Some(name) = map.next_key::<String>()? {
                    self.0.push((name, map.next_value()?));
                }
                Ok(())
            }
        }
        serde::Deserializer::deserialize_map(&mut de, Members(&mut out)).unwrap();
        de.end().unwrap();
        out
    }

    const KEEN: &str = r#"{"timestamp":"2026-01-01T00:00:00.000Z","created_at":"2026-01-01T00:00:01.000Z","id":"0123456789abcdef01234567","location":{"coordinates":[1,2]}}"#;

    #[test]
    fn ordinary_events_take_the_shortcut_and_others_do_not() {
        let body = r#"{"page":{"url":"https://a.example/x"},"n":1}"#;
        let fast = stamped_as_sent(KEEN, body.as_bytes()).expect("shortcut");
        assert_eq!(fast, general(KEEN, body));
        assert_eq!(stamped_as_sent(KEEN, b" {} \n").unwrap(), general(KEEN, "{}"));
        // The body's own keen (what clients send to set keen.timestamp) is replaced.
        let body = r#"{"a":1, "keen" : {"timestamp":"2020-01-01T00:00:00Z"},"b":[{"keen":2}]}"#;
        assert_eq!(
            stamped_as_sent(KEEN, body.as_bytes()).unwrap(),
            format!(r#"{{"keen":{KEEN},"a":1,"b":[{{"keen":2}}]}}"#)
        );
        assert_eq!(
            stamped_as_sent(KEEN, body.as_bytes()).unwrap(),
            general(KEEN, body)
        );
        for body in [
            r#"{"\u006been":{"id":"forged"},"a":1}"#,
            "[1]",
            r#"{"a" 1}"#,
            r#"{"a":1"#,
            r#"{"a":1}}"#,
            r#"{"a":1} x"#,
            r#"{"a":1,}"#,
            "{} x",
        ] {
            assert!(stamped_as_sent(KEEN, body.as_bytes()).is_none(), "{body}");
        }
        let with_addons = r#"{"timestamp":"2026-01-01T00:00:00.000Z","addons":[]}"#;
        assert!(stamped_as_sent(with_addons, b"{}").is_none());
    }

    /// Property names, with or without the `\u` spelling of `keen`.
    fn name_from(escaped_keen: bool) -> impl Strategy<Value = String> {
        let mut names = vec![
            r#""a""#.to_string(),
            r#""b""#.to_string(),
            r#""keen""#.to_string(),
            r#""k\"een""#.to_string(),
            "\"\u{e9}t\u{e9}\"".to_string(),
        ];
        if escaped_keen {
            names.push(r#""\u006been""#.to_string());
        }
        prop::sample::select(names)
    }

    fn value_from(escaped_keen: bool) -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            any::<i32>().prop_map(|n| n.to_string()),
            Just(r#""keen""#.to_string()),
            Just(r#""x\"y\\z""#.to_string()),
            Just("null".to_string()),
            Just("[ 1 , {\"keen\" : 2} ]".to_string()),
        ];
        leaf.prop_recursive(2, 8, 3, move |inner| {
            prop::collection::vec((name_from(escaped_keen), inner), 0..3).prop_map(|members| {
                let members: Vec<String> = members.into_iter().map(|(n, v)| format!("{n}:{v}")).collect();
                format!("{{{}}}", members.join(","))
            })
        })
    }

    /// An object's text from its members' name and value texts, `space` around every token.
    fn object_text(members: &[(String, String)], space: &str) -> String {
        let members: Vec<String> = members
            .iter()
            .map(|(n, v)| format!("{n}{space}:{space}{v}"))
            .collect();
        format!(
            "{space}{{{space}{}{space}}}{space}",
            members.join(&format!(",{space}"))
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Wherever the shortcut applies, it gives the same members, in the same order, as the
        /// general path (spacing and escapes may differ: they are as the client sent them).
        #[test]
        fn the_shortcut_gives_what_the_general_path_gives(
            members in prop::collection::vec((name_from(true), value_from(true)), 0..5),
            space in prop::sample::select(vec!["", " ", "\n\t "]),
        ) {
            let body = object_text(&members, space);
            if let Some(fast) = stamped_as_sent(KEEN, body.as_bytes()) {
                prop_assert_eq!(members_of(&fast), members_of(&general(KEEN, &body)));
            }
        }

        /// Without `\u` escapes, every object body takes the shortcut, `keen` members and all.
        #[test]
        fn bodies_without_escaped_names_always_take_the_shortcut(
            members in prop::collection::vec((name_from(false), value_from(false)), 0..5),
            space in prop::sample::select(vec!["", " ", "\n\t "]),
        ) {
            let body = object_text(&members, space);
            let fast = stamped_as_sent(KEEN, body.as_bytes());
            prop_assert!(fast.is_some(), "{}", body);
            prop_assert_eq!(members_of(&fast.unwrap()), members_of(&general(KEEN, &body)));
        }
    }
}
