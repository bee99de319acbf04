//! Tally's configuration, as typed structs.
//!
//! The binary builds one [`Config`] at start-up from, in increasing precedence: the defaults
//! below, a TOML file (`--config`), `TALLY_*` environment variables (nested keys joined by `__`,
//! e.g. `TALLY_LOG__SEGMENT_BYTES`), and command-line flags. Everything below receives the part
//! it needs; nothing reads the environment later.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The whole configuration of one `tally serve`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the event log, catalog and store live.
    pub data_dir: PathBuf,
    /// The HTTP listen address.
    pub listen: SocketAddr,
    /// The server-wide admin key that may create projects (`POST /3.0/projects`). Without it,
    /// projects are created only on first start and with `tally project create`.
    pub admin_key: Option<String>,
    /// HTTP behaviour.
    pub http: HttpConfig,
    /// Limits on what one event or request may be.
    pub ingest: IngestConfig,
    /// The embedded event log.
    pub log: LogConfig,
    /// Enrichment add-ons.
    pub enrich: EnrichConfig,
    /// The process stage.
    pub process: ProcessConfig,
    /// The embedded event store.
    pub store: StoreConfig,
    /// Query limits.
    pub query: QueryConfig,
    /// Cached answers: the `max_age` result cache, cached queries and datasets.
    pub cache: CacheConfig,
    /// Per-key request rate limits.
    pub rate_limits: RateLimitConfig,
    /// Log output format for Tally's own logs: `text` or `json`.
    pub log_format: LogFormat,
    /// What this node does (`tally serve --role`): ingest, process, query, or all of them.
    pub roles: Vec<Role>,
    /// Apache Kafka: inbound topics, outbound topics, and Kafka as the event log.
    pub kafka: KafkaConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./tally-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_key: None,
            http: HttpConfig::default(),
            ingest: IngestConfig::default(),
            log: LogConfig::default(),
            enrich: EnrichConfig::default(),
            process: ProcessConfig::default(),
            store: StoreConfig::default(),
            query: QueryConfig::default(),
            cache: CacheConfig::default(),
            rate_limits: RateLimitConfig::default(),
            log_format: LogFormat::Text,
            roles: vec![Role::Ingest, Role::Process, Role::Query],
            kafka: KafkaConfig::default(),
        }
    }
}

/// Format of Tally's own logs.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// HTTP settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// How many reverse proxies in front of Tally to trust. 0 (the default) takes the client IP
    /// from the socket and ignores `X-Forwarded-For`, which anyone can forge; N takes the N-th
    /// address from the right of `X-Forwarded-For`, the one the outermost trusted proxy saw.
    pub trusted_proxy_hops: usize,
    /// Seconds to wait for in-flight requests on shutdown before closing them.
    pub shutdown_grace_secs: u64,
    /// Threads that serve requests; 0 (the default): one more than the CPUs the server may
    /// use. With [`HttpConfig::shards`] that many shards, and the main runtime (accepting,
    /// ingesting batches, background tasks) that many threads too. The spare is meant for the
    /// moments the kernel keeps a serving thread waiting behind a background thread (the
    /// process stage shares the CPUs, at a lower priority): another runtime thread can then
    /// take the tasks queued on the waiting one or, with [`HttpConfig::shards`], the other
    /// shards' connections go on. See [`HttpConfig::runtime_threads_for`].
    pub runtime_threads: usize,
    /// Serve on shards (the default): each serving thread runs a single-threaded runtime of its
    /// own and keeps the connections dealt to it for their life; batches are still ingested on
    /// the work-stealing runtime the server started on. `false`: every request on that one
    /// work-stealing runtime. `tally_server`'s `shards` module says why and what was measured.
    pub shards: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            trusted_proxy_hops: 0,
            shutdown_grace_secs: 30,
            runtime_threads: 0,
            shards: true,
        }
    }
}

impl HttpConfig {
    /// The runtime threads to start on a server that may use `cpus` CPUs.
    ///
    /// Measured on the 2-core development VM, when requests were served by one work-stealing
    /// runtime of that many threads (half-rate batch phases of `tally bench ingest`, five
    /// alternating runs of three phases each): p99 ≤ 10 ms in 14 of 15 phases with three
    /// threads (the worst 10.2 ms) against 11 of 15 with two (the worst 26.7 ms); the
    /// single-event rate and its ratio to `/ping` did not change. Four threads: 4 of 6 (the worst
    /// 46 ms).
    pub fn runtime_threads_for(&self, cpus: usize) -> usize {
        match self.runtime_threads {
            0 => cpus.max(1) + 1,
            n => n,
        }
    }
}

/// Keen's limits on events and requests (reference §1.4 and §9).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// The largest request body, in bytes (413 above it).
    pub max_body_bytes: usize,
    /// The most events in one batch request (413 above it).
    pub max_batch_events: usize,
    /// The largest single event, in bytes of JSON.
    pub max_event_bytes: usize,
    /// The deepest nesting of objects and arrays in an event.
    pub max_depth: usize,
    /// Strings must be shorter than this many characters.
    pub max_string_chars: usize,
    /// How long a `keen.uniqueness_token` is remembered, in days.
    pub uniqueness_window_days: u32,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 10 * 1024 * 1024,
            max_batch_events: 50_000,
            max_event_bytes: 900_000,
            max_depth: 100,
            max_string_chars: 10_000,
            uniqueness_window_days: 31,
        }
    }
}

/// The embedded event log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Segment files roll over at this size; each is zero-filled to it in advance.
    pub segment_bytes: u64,
    /// Bytes accepted but not yet fsync'd, at most; past it ingest answers 503.
    pub max_pending_bytes: u64,
    /// Bytes durable in the log but not yet consumed by the process stage, at most; past it
    /// ingest answers 503 until the process stage catches up.
    pub max_unconsumed_bytes: u64,
    /// How often the de-duplication table is snapshotted, in seconds (restart replays the log
    /// from the last snapshot).
    pub dedupe_snapshot_secs: u64,
    /// Write and read segments with `O_DIRECT`, past the page cache (each byte is written and
    /// read once, and filling the cache costs more CPU than the I/O); the event store's segment
    /// files are written the same way. Where the file system refuses it (tmpfs), the page
    /// cache is used anyway.
    pub direct_io: bool,
    /// Microseconds the log's writer waits before taking the next group of appends, when the
    /// last group held several requests and waiting measurably raises the rate of appends, so
    /// that more requests share each write and `fdatasync`; 0: never wait. Each group costs the
    /// writer two disk commands and puts its thread to sleep two or three times, and on a small
    /// machine that CPU is taken from the HTTP handlers: at 200 µs, single events over 128
    /// connections on 2 cores went from 33k to 37k req/s in a quiet hour. But a few clients
    /// that each wait for one answer before sending again lose what the writer waits (8 such
    /// connections went from 22.6k to 12.6k req/s), so while the log is busy the writer tries
    /// both ways every few seconds and keeps the faster (`tally_ingest::log::linger`).
    pub group_commit_linger_us: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 64 * 1024 * 1024,
            max_pending_bytes: 256 * 1024 * 1024,
            max_unconsumed_bytes: 16 * 1024 * 1024 * 1024,
            dedupe_snapshot_secs: 60,
            direct_io: true,
            group_commit_linger_us: 200,
        }
    }
}

/// Enrichment add-ons.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct EnrichConfig {
    /// MaxMind-format databases for `keen:ip_to_geo` (GeoIP2/GeoLite2 City, or DB-IP Lite City,
    /// which ships IPv4 and IPv6 as two files). Empty: the add-on is skipped and counted.
    pub geoip_db: Vec<PathBuf>,
    /// How often to check the database files for a replacement, in seconds (0: only on SIGHUP).
    pub geoip_reload_secs: u64,
}

impl Default for EnrichConfig {
    fn default() -> Self {
        Self {
            geoip_db: Vec::new(),
            geoip_reload_secs: 30,
        }
    }
}

/// The process stage (log → enrichment → store).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessConfig {
    /// Run the process stage on this node. Off, the node only ingests: events wait in the log
    /// (up to `log.max_unconsumed_bytes`, then ingest answers 503) until a node with the stage
    /// on opens the data directory and catches up from where the last one stopped.
    pub enabled: bool,
    /// Bytes of log read per batch.
    pub max_batch_bytes: usize,
    /// Threads that enrich a batch (0: one per core).
    pub threads: usize,
    /// Once the stage has caught up (a batch under a quarter of `max_batch_bytes`), it reads
    /// again only this many milliseconds after it last read, so that events gather into fewer,
    /// bigger batches: every batch has fixed costs (new in-memory segments, waking the
    /// enrichment threads), which with many small batches cost more than the events in them.
    /// Events become queryable up to this much later. 0 reads again at once.
    pub linger_ms: u64,
    /// CPUs kept for ingest: while ingest is busy (the log grew in the last 250 ms), the process
    /// stage's threads (on the embedded log; the stage that reads Kafka is not confined) and the
    /// store's flushes and merges do not run on the first this many CPUs the server may use
    /// (when at least one other is left); while it is idle they use them all. Behind the log,
    /// that work is always runnable, and even at a lower priority it cost ingest's
    /// acknowledgements their tail whenever it could run on every core. 0: it runs anywhere.
    pub reserved_ingest_cpus: usize,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_batch_bytes: 4 * 1024 * 1024,
            threads: 0,
            linger_ms: 25,
            reserved_ingest_cpus: 1,
        }
    }
}

/// The embedded event store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// How often events held in memory (already queryable) are written to disk, in
    /// milliseconds. After a crash, at most this much is re-read from the event log.
    pub flush_interval_ms: u64,
    /// Small segments are merged up to about this many events.
    pub merge_target_rows: usize,
    /// A collection's small segments of about one size (within this factor) are merged once
    /// there are this many.
    pub merge_min_segments: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            flush_interval_ms: 1000,
            merge_target_rows: 1 << 20,
            merge_min_segments: 8,
        }
    }
}

/// Limits on one query, so that no query can take the server down.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct QueryConfig {
    /// A query still running after this many milliseconds is stopped and answered 504.
    pub timeout_ms: u64,
    /// The most memory one query may hold for its groups, distinct values and sorted values,
    /// in bytes; past it the query is refused with a 400 asking for a narrower question.
    pub max_memory_bytes: usize,
    /// The most events one extraction returns (Keen: 100,000); more is refused, asking for
    /// `latest` or a narrower timeframe.
    pub max_extraction_events: usize,
    /// The most queries of one project that run at once; more wait in the project's queue. This
    /// is what keeps one project's heavy queries from taking every core from the others. 0 (the
    /// default): the number of cores.
    pub max_concurrent_per_project: usize,
    /// The most queries of one project waiting for a slot; one more is refused at once (429).
    pub max_queued_per_project: usize,
    /// How long a query may wait in its project's queue before it is refused (429), in
    /// milliseconds. Keen failed a query fast when it could not start within 10 seconds.
    pub queue_timeout_ms: u64,
}

impl Default for QueryConfig {
    fn default() -> Self {
        Self {
            timeout_ms: 60_000,
            max_memory_bytes: 2 << 30,
            max_extraction_events: 100_000,
            max_concurrent_per_project: 0,
            max_queued_per_project: 32,
            queue_timeout_ms: 10_000,
        }
    }
}

/// Per-key request rate limits, in requests per minute for each key (0: unlimited). Each key has
/// a bucket per class that holds a minute's worth of requests and refills continuously; an
/// empty bucket answers 429 with `Retry-After`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests that compute over events: analyses, funnels, extractions, SQL, schema, and saved
    /// query or dataset results computed on request (Keen: 200 a minute). Results served from a
    /// cache do not count.
    pub queries_per_minute: u32,
    /// Requests to master-key endpoints: keys, deletes, saved query and dataset definitions.
    pub admin_per_minute: u32,
    /// Requests that record events (Keen: no limit).
    pub writes_per_minute: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            queries_per_minute: 1_200,
            admin_per_minute: 600,
            writes_per_minute: 0,
        }
    }
}

/// Cached answers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Bytes of answers the `max_age` result cache keeps (0 turns it off).
    pub result_cache_bytes: usize,
    /// The shortest `refresh_rate` a cached query may have, in seconds. Keen's clients allow
    /// 4 hours; a self-hosted Tally may refresh more often.
    pub min_refresh_rate_secs: u64,
    /// The longest `refresh_rate`, in seconds (Keen's Explorer: 48 hours).
    pub max_refresh_rate_secs: u64,
    /// How often the refresher looks for cached queries that are due and datasets whose data
    /// changed, in milliseconds; a dataset is at most about this much behind its events.
    pub refresh_tick_ms: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            result_cache_bytes: 256 << 20,
            min_refresh_rate_secs: 60,
            max_refresh_rate_secs: 172_800,
            refresh_tick_ms: 2_000,
        }
    }
}

/// One of the things a node does. A single node does all three; with Kafka as the event log,
/// ingest nodes and process nodes run apart (`tally serve --role ingest`, `--role process,query`).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Accept events: the HTTP Stream API and Kafka inbound.
    Ingest,
    /// Read the event log, enrich, store, and stream out to Kafka.
    Process,
    /// Answer queries, serve the web UI.
    Query,
}

impl Role {
    /// The name used in `--role` and the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Process => "process",
            Role::Query => "query",
        }
    }
}

/// Apache Kafka. Empty `brokers` means no Kafka at all; each use of it is switched on on its own.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, `host:port,host:port`.
    pub brokers: String,
    /// The client id Tally's producers and consumers present.
    pub client_id: String,
    /// TLS and SASL.
    pub security: KafkaSecurity,
    /// Kafka as the event log between ingest and process nodes.
    pub log: KafkaLogConfig,
    /// Events consumed from the user's topics into a project.
    pub inbound: KafkaInboundConfig,
    /// Enriched events produced to a topic per project and collection.
    pub outbound: KafkaOutboundConfig,
    /// Further librdkafka properties passed to every client as they are (for example
    /// `"socket.keepalive.enable" = "true"`); for settings Tally does not name itself.
    pub properties: std::collections::BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: String::new(),
            client_id: "tally".into(),
            security: KafkaSecurity::default(),
            log: KafkaLogConfig::default(),
            inbound: KafkaInboundConfig::default(),
            outbound: KafkaOutboundConfig::default(),
            properties: Default::default(),
        }
    }
}

/// A secret setting: shown as `***` by `Debug`, so configuration dumps and logs never hold it.
/// It comes from the environment (`TALLY_KAFKA__SECURITY__SASL_PASSWORD`) or, with the `*_file`
/// setting beside it, from a file.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

/// TLS and SASL settings, passed to librdkafka.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaSecurity {
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub protocol: Option<String>,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub sasl_mechanism: Option<String>,
    /// The SASL user name.
    pub sasl_username: Option<String>,
    /// The SASL password (set it through the environment, not the file).
    pub sasl_password: Option<Secret>,
    /// A file holding the SASL password (trailing newline ignored).
    pub sasl_password_file: Option<PathBuf>,
    /// CA certificates (PEM) to verify the brokers with.
    pub ssl_ca_location: Option<PathBuf>,
    /// The client's certificate (PEM), for mutual TLS.
    pub ssl_certificate_location: Option<PathBuf>,
    /// The client's private key (PEM), for mutual TLS.
    pub ssl_key_location: Option<PathBuf>,
    /// The private key's password.
    pub ssl_key_password: Option<Secret>,
    /// A file holding the private key's password.
    pub ssl_key_password_file: Option<PathBuf>,
}

/// Kafka as the event log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaLogConfig {
    /// Use Kafka instead of the embedded log.
    pub enabled: bool,
    /// The topic of accepted events.
    pub topic: String,
    /// Partitions of the topic when Tally creates it; process nodes share them.
    pub partitions: i32,
    /// Replication factor when Tally creates the topic (-1: the broker's default).
    pub replication_factor: i32,
    /// The process nodes' consumer group.
    pub group: String,
    /// How long an append may wait for Kafka (`message.timeout.ms`) before ingest answers 503.
    pub append_timeout_ms: u64,
    /// Events produced but not yet acknowledged, at most; past it ingest answers 503.
    pub max_in_flight_events: usize,
    /// How often process nodes commit their stored offsets to the group, in milliseconds. The
    /// store's own record is what makes the store exactly once; the group's is for monitoring
    /// tools and for a node that has no record of its own.
    pub group_commit_interval_ms: u64,
}

impl Default for KafkaLogConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            topic: "tally-events".into(),
            partitions: 6,
            replication_factor: -1,
            group: "tally-process".into(),
            append_timeout_ms: 120_000,
            max_in_flight_events: 200_000,
            group_commit_interval_ms: 1_000,
        }
    }
}

/// Kafka inbound: the user's topics consumed into one project.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaInboundConfig {
    /// Consume inbound topics.
    pub enabled: bool,
    /// The project (24 hex digits) events are written to.
    pub project: String,
    /// Topics named `<prefix><collection>` are consumed, one collection each.
    pub topic_prefix: String,
    /// Further topics whose records name their collection in the `collection_header` header.
    pub topics: Vec<String>,
    /// The header naming a record's collection (on a prefixed topic it overrides the topic's).
    pub collection_header: String,
    /// The consumer group.
    pub group: String,
    /// Where invalid records go, with the reason in the `tally.error` and `tally.error_code`
    /// headers.
    pub dead_letter_topic: String,
    /// Records taken per batch, at most.
    pub max_batch_records: usize,
}

impl Default for KafkaInboundConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            project: String::new(),
            topic_prefix: "tally.in.".into(),
            topics: Vec::new(),
            collection_header: "collection".into(),
            group: "tally-inbound".into(),
            dead_letter_topic: "tally.dead-letter".into(),
            max_batch_records: 5_000,
        }
    }
}

/// Kafka outbound: enriched events out to Kafka.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaOutboundConfig {
    /// Produce enriched events.
    pub enabled: bool,
    /// The topic name; `{project}` and `{collection}` are replaced (characters Kafka does not
    /// allow in topic names become `_`).
    pub topic_template: String,
}

impl Default for KafkaOutboundConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            topic_template: "tally.out.{project}.{collection}".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_gets_one_thread_more_than_the_cpus_unless_configured() {
        let mut http = HttpConfig::default();
        assert_eq!(http.runtime_threads_for(2), 3);
        assert_eq!(http.runtime_threads_for(0), 2);
        http.runtime_threads = 5;
        assert_eq!(http.runtime_threads_for(2), 5);
    }
}
