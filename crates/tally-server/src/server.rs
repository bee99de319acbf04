//! A running Tally: opening the data directory, wiring the components, serving, and shutting
//! down in order.
//!
//! Data directory layout:
//!
//! ```text
//! LOCK               held (flock) by the one process using the directory
//! catalog.json       projects and hashed keys
//! log/               the embedded event log
//! dedupe.snapshot    the uniqueness-token table as of a log position
//! store/             the columnar event store (manifest.json, segments/)
//! results/           cached query results and dataset buckets (see `tally_store::results`)
//! ```
//!
//! Shutdown (SIGTERM/SIGINT in the binary, [`Tally::shutdown`] in tests): stop accepting
//! connections, let in-flight requests finish (up to a grace period), stop the log writer after
//! it has synced what it holds, snapshot the de-duplication table, release the lock.

use std::fs::{self, File, TryLockError};
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt as _;
use prometheus_client::registry::Registry;
use tally_core::clock::Clock;
use tally_core::config::{Config, Role};
use tally_core::event::EventSink;
use tally_core::ids::KeyHash;
use tally_core::ids::ProjectId;
use tally_core::log::EventLog;
use tally_core::senders::Senders;
use tally_core::time::format_timestamp_ms;
use tally_core::worker::BackgroundCpus;
use tally_ingest::dedupe::{self, Dedupe};
use tally_ingest::{EmbeddedEventLog, Ingestor};
use tally_kafka::stage::KafkaStageConfig;
use tally_kafka::{Inbound, KafkaClients, KafkaEventLog, KafkaProcessStage, KafkaSetupError, OutboundSink};
use tally_process::{Enrichers, GeoIp, ProcessStage, StageConfig};
use tally_store::events::{EventStore, Maintenance, StoreConfig};
use tally_store::results::ResultFiles;
use tally_store::{Catalog, CatalogError, EmbeddedCatalog, NewProject};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::answers::CachedAnswers;
use crate::app::{AppInner, AppState, router};
use crate::connections::CountedListener;
use crate::limits::{FairnessMetrics, QueryGate, RateLimiter};
use crate::live::{LiveSink, LiveTail};
use crate::metrics::ServerMetrics;
use crate::shards::serve_sharded;

/// Why Tally could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Another process holds the data directory.
    #[error("data directory {0} is in use by another Tally process")]
    DataDirLocked(PathBuf),
    /// The data directory could not be prepared.
    #[error("data directory {path}: {source}")]
    DataDir {
        /// The path.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// The catalog could not be opened.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The event log could not be opened or recovered.
    #[error("event log: {0}")]
    Log(io::Error),
    /// A configured GeoIP database is missing or damaged.
    #[error(transparent)]
    GeoIp(#[from] tally_process::geo::GeoError),
    /// The process stage or its store could not start.
    #[error("process stage: {0}")]
    Process(io::Error),
    /// The event store could not be opened.
    #[error(transparent)]
    Store(#[from] tally_store::events::StoreError),
    /// The node's roles do not fit together or with the configuration.
    #[error("roles: {0}")]
    Roles(String),
    /// Kafka could not be set up.
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: io::Error,
    },
}

/// An exclusively locked data directory.
#[derive(Debug)]
pub struct DataDir {
    path: PathBuf,
    _lock: File,
}

impl DataDir {
    /// Creates `path` if needed and takes its lock.
    pub fn lock(path: &Path) -> Result<Self, StartError> {
        let io_err = |source| StartError::DataDir {
            path: path.to_path_buf(),
            source,
        };
        fs::create_dir_all(path).map_err(io_err)?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path.join("LOCK"))
            .map_err(io_err)?;
        match lock.try_lock() {
            Ok(()) => Ok(Self {
                path: path.to_path_buf(),
                _lock: lock,
            }),
            Err(TryLockError::WouldBlock) => Err(StartError::DataDirLocked(path.to_path_buf())),
            Err(TryLockError::Error(e)) => Err(io_err(e)),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The catalog file.
    pub fn catalog_path(&self) -> PathBuf {
        self.path.join("catalog.json")
    }

    /// The event log directory.
    pub fn log_dir(&self) -> PathBuf {
        self.path.join("log")
    }

    /// The de-duplication snapshot.
    pub fn dedupe_snapshot_path(&self) -> PathBuf {
        self.path.join("dedupe.snapshot")
    }

    /// This data directory's lasting random identity (made on first use), which a node running
    /// on it presents to Kafka as its static group membership.
    pub fn node_id(&self) -> io::Result<String> {
        let path = self.path.join("node-id");
        match fs::read_to_string(&path) {
            Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
            Ok(_) => Err(io::Error::other(format!("{} is empty", path.display()))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let id = ProjectId::random().to_string();
                tally_core::fsutil::write_atomically(&path, id.as_bytes())?;
                Ok(id)
            }
            Err(e) => Err(e),
        }
    }

    /// Tally's own record of the Kafka inbound offsets.
    pub fn inbound_offsets_path(&self) -> PathBuf {
        self.path.join("inbound-offsets.json")
    }

    /// The event store.
    pub fn store_path(&self) -> PathBuf {
        self.path.join("store")
    }

    /// Cached query results and dataset buckets.
    pub fn results_path(&self) -> PathBuf {
        self.path.join("results")
    }
}

/// A running server.
#[derive(Debug)]
pub struct Tally {
    local_addr: SocketAddr,
    bootstrap: Option<NewProject>,
    catalog: Arc<EmbeddedCatalog>,
    log: Arc<EmbeddedEventLog>,
    ingestor: Arc<Ingestor>,
    clock: Arc<dyn Clock>,
    shutdown_grace: Duration,
    stop: watch::Sender<bool>,
    /// Told once the grace period is over: shards then stop at once (the single runtime's
    /// serving task is cancelled when the runtime is dropped).
    force_stop: watch::Sender<bool>,
    serve: JoinHandle<io::Result<()>>,
    background: Vec<JoinHandle<()>>,
    process: Option<ProcessStage>,
    /// The process stage reading Kafka as the event log (process nodes with Kafka).
    kafka_process: Option<KafkaProcessStage>,
    /// Kafka inbound consumption (ingest nodes with inbound on).
    inbound: Option<Inbound>,
    /// Kafka as the event log, when configured: flushed at shutdown.
    kafka_log: Option<Arc<KafkaEventLog>>,
    store: Arc<EventStore>,
    store_maintenance: Option<Maintenance>,
    /// Where the background threads run (`None`: anywhere).
    background_cpus: Option<Arc<BackgroundCpus>>,
    enrichers: Arc<Enrichers>,
    answers: Arc<CachedAnswers>,
    /// Live streams, ended first at shutdown.
    live: Arc<LiveTail>,
    data_dir: DataDir,
}

impl Tally {
    /// Opens the data directory, recovers the log and the de-duplication table, creates the
    /// `default` project on first start, and starts serving on `config.listen`.
    pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Result<Self, StartError> {
        check_roles(&config)?;
        let data_dir = DataDir::lock(&config.data_dir)?;
        let catalog = Arc::new(EmbeddedCatalog::open(&data_dir.catalog_path())?);
        let bootstrap = if catalog.projects().is_empty() {
            Some(catalog.create_project("default", &format_timestamp_ms(clock.now_ms()))?)
        } else {
            None
        };

        let mut registry = Registry::default();
        let senders = Arc::new(Senders::default());
        let log_dir = data_dir.log_dir();
        let log_config = config.log.clone();
        let log_senders = senders.clone();
        let (log, registry) = tokio::task::spawn_blocking(move || {
            let log = EmbeddedEventLog::open_for(&log_dir, log_config, &mut registry, Some(log_senders));
            (log, registry)
        })
        .await
        .expect("log open task");
        let mut registry = registry;
        let log = Arc::new(log.map_err(StartError::Log)?);
        if log.recovery().cut_bytes > 0 {
            tracing::warn!(
                cut_bytes = log.recovery().cut_bytes,
                "recovered the event log after a crash"
            );
        }

        // The GeoIP files are read and verified before anything is served: a damaged one is a
        // start-up error naming it.
        let geo_paths = config.enrich.geoip_db.clone();
        let geo = tokio::task::spawn_blocking(move || GeoIp::open(geo_paths))
            .await
            .expect("GeoIP open task")?;
        let enrichers = Arc::new(Enrichers::new(geo, &mut registry));
        let store_dir = data_dir.store_path();
        // The process stage and the store's flushes and merges stay off the CPUs kept for ingest
        // while it is busy (the embedded log's stage tells when it is idle).
        let allowed_cpus = tally_core::worker::allowed_cpus();
        let background_cpus =
            BackgroundCpus::new(allowed_cpus.clone(), config.process.reserved_ingest_cpus).map(Arc::new);
        tracing::info!(
            ?allowed_cpus,
            while_ingest_is_busy = ?background_cpus.as_ref().map(|c| c.current().to_vec()),
            "CPUs for the process stage and the store (None: any)"
        );
        let store_config = StoreConfig {
            flush_interval: Duration::from_millis(config.store.flush_interval_ms.max(10)),
            merge_target_rows: config.store.merge_target_rows.max(1),
            merge_min_segments: config.store.merge_min_segments.max(2),
            direct_io: config.log.direct_io,
            cpus: background_cpus.clone(),
            ..StoreConfig::default()
        };
        let store = Arc::new(
            tokio::task::spawn_blocking(move || EventStore::open(&store_dir, store_config))
                .await
                .expect("store open task")?,
        );
        let store_maintenance = Some(store.start_maintenance().map_err(StartError::Process)?);
        let kafka = &config.kafka;
        let kafka_clients = if kafka.log.enabled || kafka.inbound.enabled || kafka.outbound.enabled {
            Some(KafkaClients::new(kafka)?)
        } else {
            None
        };
        let live = LiveTail::new();
        let mut sink: Arc<dyn EventSink> = Arc::new(LiveSink {
            store: store.clone(),
            tail: live.clone(),
        });
        if let (true, Some(clients)) = (kafka.outbound.enabled, &kafka_clients) {
            sink = Arc::new(OutboundSink::new(clients, &kafka.outbound, sink, &mut registry)?);
        }
        let runs_process = config.roles.contains(&Role::Process) && config.process.enabled;
        let stage_config = StageConfig {
            max_batch_bytes: config.process.max_batch_bytes,
            threads: match config.process.threads {
                0 => StageConfig::default().threads,
                n => n,
            },
            linger: Duration::from_millis(config.process.linger_ms),
            cpus: background_cpus.clone(),
            ..StageConfig::default()
        };
        // The stage reads Kafka when Kafka is the log, the embedded log otherwise.
        let kafka_log_clients = kafka_clients.as_ref().filter(|_| kafka.log.enabled);
        let (process, kafka_process) = match (runs_process, kafka_log_clients) {
            (false, _) => {
                tracing::warn!("process stage disabled: events stay in the log until a stage runs");
                (None, None)
            }
            (true, Some(clients)) => {
                let stage = KafkaStageConfig {
                    log: kafka.log.clone(),
                    max_batch_records: 10_000,
                    instance_id: Some(format!(
                        "tally-{}",
                        data_dir.node_id().map_err(StartError::Process)?
                    )),
                };
                let stage = KafkaProcessStage::start(clients, stage, sink, enrichers.clone(), &mut registry)?;
                (None, Some(stage))
            }
            (true, None) => {
                let stage =
                    ProcessStage::start(log.clone(), sink, enrichers.clone(), stage_config, &mut registry)
                        .map_err(StartError::Process)?;
                (Some(stage), None)
            }
        };

        let dedupe = Arc::new(Dedupe::new(config.ingest.uniqueness_window_days));
        {
            let (dedupe, log, path, now) = (
                dedupe.clone(),
                log.clone(),
                data_dir.dedupe_snapshot_path(),
                clock.now_ms(),
            );
            let recovered = tokio::task::spawn_blocking(move || dedupe::recover(&dedupe, &path, &log, now))
                .await
                .expect("dedupe recovery task")
                .map_err(StartError::Log)?;
            tracing::info!(
                tokens = recovered.from_snapshot,
                replayed_records = recovered.replayed_records,
                "uniqueness tokens recovered"
            );
        }

        let kafka_log = match kafka_log_clients {
            Some(clients) => Some(Arc::new(
                KafkaEventLog::start(clients, &kafka.log, &mut registry).await?,
            )),
            None => None,
        };
        let ingest_log: Arc<dyn EventLog> = match &kafka_log {
            Some(kafka_log) => kafka_log.clone(),
            None => log.clone(),
        };
        let ingestor = Arc::new(Ingestor::new(
            ingest_log,
            dedupe,
            clock.clone(),
            config.ingest.clone(),
            &mut registry,
        ));
        let inbound = match (
            &kafka_clients,
            kafka.inbound.enabled && config.roles.contains(&Role::Ingest),
        ) {
            (Some(clients), true) => {
                let project: ProjectId = kafka.inbound.project.parse().map_err(|_| {
                    KafkaSetupError::Config(format!(
                        "kafka.inbound.project {:?} is not a project id (24 hex digits)",
                        kafka.inbound.project
                    ))
                })?;
                if catalog.project(&project).is_none() {
                    return Err(KafkaSetupError::Config(format!(
                        "kafka.inbound.project {project} is not a project of this Tally"
                    ))
                    .into());
                }
                Some(
                    Inbound::start(
                        clients,
                        kafka.inbound.clone(),
                        project,
                        ingestor.clone(),
                        &data_dir.inbound_offsets_path(),
                        &mut registry,
                    )
                    .await?,
                )
            }
            _ => None,
        };
        let answers = Arc::new(CachedAnswers::open(
            catalog.clone() as Arc<dyn Catalog>,
            store.clone(),
            ResultFiles::new(&data_dir.results_path()),
            clock.clone(),
            config.query.clone(),
            &config.cache,
            &mut registry,
        ));
        let fairness = FairnessMetrics::default();
        fairness.register(&mut registry);
        let state = AppState::new(AppInner {
            catalog: catalog.clone() as Arc<dyn Catalog>,
            ingestor: ingestor.clone(),
            rate_limiter: RateLimiter::new(config.rate_limits.clone(), clock.clone(), fairness.clone()),
            query_gate: QueryGate::new(&config.query, fairness),
            metrics: Arc::new(ServerMetrics::new(registry)),
            admin_key: config.admin_key.as_deref().map(KeyHash::of),
            http: config.http.clone(),
            clock: clock.clone(),
            store: store.clone(),
            query: config.query.clone(),
            answers: answers.clone(),
            live: live.clone(),
            roles: config.roles.clone(),
            senders: senders.clone(),
            work: tokio::runtime::Handle::current(),
        });

        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?;
        let local_addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let (stop, stopped) = watch::channel(false);
        let (force_stop, _) = watch::channel(false);
        let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
        let serve = if config.http.shards {
            let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
            let threads = config.http.runtime_threads_for(cpus);
            serve_sharded(
                listener,
                app,
                threads,
                senders,
                stopped.clone(),
                force_stop.subscribe(),
            )
            .map_err(|source| StartError::Bind {
                addr: config.listen,
                source,
            })?
        } else {
            let mut serve_stopped = stopped.clone();
            tokio::spawn(async move {
                // axum hands a custom listener's peer address to handlers (`ConnectInfo`) only
                // through `TapIo`; this tap does nothing else.
                axum::serve(CountedListener::new(listener, senders).tap_io(|_| {}), app)
                    .with_graceful_shutdown(async move {
                        let _ = serve_stopped.wait_for(|stop| *stop).await;
                    })
                    .await
            })
        };

        let snapshots = {
            let (log, ingestor, clock, path) = (
                log.clone(),
                ingestor.clone(),
                clock.clone(),
                data_dir.dedupe_snapshot_path(),
            );
            tokio::spawn(every(
                Duration::from_secs(config.log.dedupe_snapshot_secs.max(1)),
                stopped,
                "de-duplication snapshot",
                move || snapshot_once(&log, &ingestor, clock.now_ms(), &path),
            ))
        };

        let refresher = {
            let answers = answers.clone();
            tokio::spawn(every(
                Duration::from_millis(config.cache.refresh_tick_ms.max(10)),
                stop.subscribe(),
                "cached query and dataset refresh",
                move || {
                    answers.run_due();
                    Ok::<(), std::convert::Infallible>(())
                },
            ))
        };
        let mut background = vec![snapshots, refresher];
        if config.enrich.geoip_reload_secs > 0 && enrichers.geo().is_configured() {
            let enrichers = enrichers.clone();
            background.push(tokio::spawn(every(
                Duration::from_secs(config.enrich.geoip_reload_secs),
                stop.subscribe(),
                "GeoIP reload (the changed file is refused; the old database stays)",
                move || enrichers.geo().reload(false).map(|_| ()),
            )));
        }

        tracing::info!(%local_addr, data_dir = %data_dir.path().display(), "tally is serving");
        Ok(Self {
            local_addr,
            bootstrap,
            catalog,
            log,
            ingestor,
            clock,
            shutdown_grace: Duration::from_secs(config.http.shutdown_grace_secs),
            stop,
            force_stop,
            serve,
            background,
            process,
            kafka_process,
            inbound,
            kafka_log,
            store,
            store_maintenance,
            background_cpus,
            enrichers,
            answers,
            live,
            data_dir,
        })
    }

    /// The address actually listened on (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The project created on first start, with its keys; `None` on later starts.
    pub fn bootstrap(&self) -> Option<&NewProject> {
        self.bootstrap.as_ref()
    }

    /// The catalog (tests revoke keys through it).
    pub fn catalog(&self) -> &Arc<EmbeddedCatalog> {
        &self.catalog
    }

    /// Where the process stage's and the store's threads run (`None`: anywhere).
    pub fn background_cpus(&self) -> Option<&Arc<BackgroundCpus>> {
        self.background_cpus.as_ref()
    }

    /// The event store.
    pub fn store(&self) -> &Arc<EventStore> {
        &self.store
    }

    /// Cached queries and datasets (tests drive the refresher through it with a manual clock).
    pub fn answers(&self) -> &Arc<CachedAnswers> {
        &self.answers
    }

    /// Re-reads the GeoIP database files now (SIGHUP). A replacement that does not verify is
    /// refused and the database in use stays.
    pub async fn reload_geoip(&self) -> Result<bool, tally_process::geo::GeoError> {
        let enrichers = self.enrichers.clone();
        tokio::task::spawn_blocking(move || enrichers.geo().reload(true))
            .await
            .expect("GeoIP reload task")
    }

    /// Stops serving and shuts down in order.
    pub async fn shutdown(mut self) -> io::Result<()> {
        let _ = self.stop.send(true);
        // Live streams never end by themselves: end them so in-flight requests can finish.
        self.live.close();
        let mut serve = self.serve;
        match tokio::time::timeout(self.shutdown_grace, &mut serve).await {
            Ok(Ok(result)) => result?,
            Ok(Err(join)) => tracing::error!(error = %join, "server task failed"),
            Err(_) => {
                tracing::warn!("in-flight requests did not finish within the grace period");
                let _ = self.force_stop.send(true);
                let _ = tokio::time::timeout(Duration::from_secs(5), serve).await;
            }
        }
        for task in self.background {
            let _ = task.await;
        }
        // Inbound first: what it has appended is then all in the log the stage drains.
        if let Some(inbound) = self.inbound.take() {
            tokio::task::spawn_blocking(move || inbound.stop())
                .await
                .map_err(io::Error::other)?;
        }
        if let Some(kafka_log) = self.kafka_log.take() {
            tokio::task::spawn_blocking(move || kafka_log.flush(Duration::from_secs(10)))
                .await
                .map_err(io::Error::other)?;
        }
        if let Some(stage) = self.kafka_process.take() {
            tokio::task::spawn_blocking(move || stage.stop())
                .await
                .map_err(io::Error::other)?;
        }
        if let Some(process) = self.process.take() {
            tokio::task::spawn_blocking(move || process.stop())
                .await
                .map_err(io::Error::other)?;
        }
        if let Some(maintenance) = self.store_maintenance.take() {
            // One last flush: what the stage stored is durable before the log is told so.
            tokio::task::spawn_blocking(move || maintenance.stop())
                .await
                .map_err(io::Error::other)?;
        }
        if let Ok(Some(position)) = tally_core::event::EventSink::committed_position(self.store.as_ref()) {
            self.log.commit_consumed(position)?;
        }
        let (log, ingestor, clock, path) = (
            self.log,
            self.ingestor,
            self.clock,
            self.data_dir.dedupe_snapshot_path(),
        );
        tokio::task::spawn_blocking(move || {
            log.close();
            log.persist_consumed()?;
            snapshot_once(&log, &ingestor, clock.now_ms(), &path)
        })
        .await
        .map_err(io::Error::other)??;
        tracing::info!("tally stopped");
        drop(self.data_dir);
        Ok(())
    }
}

/// Runs blocking `work` every `period` on the blocking pool until `stopped`, logging failures as
/// `what`.
async fn every<E: std::fmt::Display + Send + 'static>(
    period: Duration,
    mut stopped: watch::Receiver<bool>,
    what: &'static str,
    work: impl Fn() -> Result<(), E> + Send + Sync + Clone + 'static,
) {
    let mut ticks = tokio::time::interval(period);
    ticks.tick().await;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stopped.wait_for(|stop| *stop) => return,
        }
        match tokio::task::spawn_blocking(work.clone()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "{what} failed"),
            Err(e) => tracing::error!(error = %e, "{what} task failed"),
        }
    }
}

/// Saves the de-duplication table and lets the log drop what neither a replay nor the process
/// stage still needs.
fn snapshot_once(log: &EmbeddedEventLog, ingestor: &Ingestor, now_ms: i64, path: &Path) -> io::Result<()> {
    let status = log.status();
    let snapshot = ingestor.dedupe().snapshot(status.durable_end, now_ms);
    dedupe::save_snapshot(path, &snapshot)?;
    log.retain_from(status.consumed.min(snapshot.replay_from))?;
    Ok(())
}

/// Refuses role sets this build cannot serve: nodes apart need Kafka as the shared log, and a
/// query node needs the store of the process stage beside it until a shared store exists.
fn check_roles(config: &Config) -> Result<(), StartError> {
    let roles = &config.roles;
    if roles.is_empty() {
        return Err(StartError::Roles(
            "a node needs at least one of ingest, process, query".into(),
        ));
    }
    let all = [Role::Ingest, Role::Process, Role::Query]
        .iter()
        .all(|r| roles.contains(r));
    if !all && !config.kafka.log.enabled {
        return Err(StartError::Roles(
            "ingest and process run on separate nodes only with Kafka as the event log \
             (kafka.brokers and kafka.log.enabled); the embedded log belongs to one node"
                .into(),
        ));
    }
    if roles.contains(&Role::Query) && !roles.contains(&Role::Process) {
        return Err(StartError::Roles(
            "a query node reads the embedded store its process stage writes: run it as \
             --role process,query (query-only nodes need a shared store)"
                .into(),
        ));
    }
    Ok(())
}
