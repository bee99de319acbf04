//! The `tally` command.
//!
//! * `tally serve`: run the server (embedded log and catalog under `--data-dir`);
//! * `tally project create NAME`: create a project in a data directory no server is using;
//! * `tally log dump`: print the events in the event log as JSON lines;
//! * `tally bench ingest`: drive a running server and print ingest throughput and latency.
//!
//! Configuration is read once here (defaults, then `--config FILE`, then `TALLY_*` variables,
//! then flags) into a [`Config`] that is passed down.

mod bench;
mod bench_client;
mod bench_kafka;
mod bench_process;
mod bench_store;

/// glibc's allocator showed up as ~10% of ingest CPU (many small, short-lived allocations
/// across threads); mimalloc handles that pattern with far less contention.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use tally_core::clock::{Clock, SystemClock};
use tally_core::config::{Config, LogFormat, Role};
use tally_core::event::LoggedEvent;
use tally_core::time::format_timestamp_ms;
use tally_ingest::log::LogReader;
use tally_server::{DataDir, Tally};
use tally_store::{Catalog, EmbeddedCatalog, NewProject};

#[derive(Debug, Parser)]
#[command(
    name = "tally",
    version,
    about = "Self-hosted event data platform, compatible with Keen IO's API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Settings shared by the commands that open a data directory.
#[derive(Debug, clap::Args)]
struct Common {
    /// Data directory [default: ./tally-data; env: TALLY_DATA_DIR]
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// TOML configuration file (every setting can also be given as TALLY_<NAME>, nested keys
    /// joined by __, e.g. TALLY_LOG__SEGMENT_BYTES)
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        #[command(flatten)]
        common: Common,
        /// Address to listen on [default: 127.0.0.1:8080; env: TALLY_LISTEN]
        #[arg(long)]
        listen: Option<String>,
        /// Admin key that may create projects over HTTP [env: TALLY_ADMIN_KEY]
        #[arg(long)]
        admin_key: Option<String>,
        /// GeoIP database for keen:ip_to_geo (GeoLite2/GeoIP2 City or DB-IP Lite City .mmdb);
        /// repeat for DB-IP's separate IPv4 and IPv6 files [config: enrich.geoip_db]
        #[arg(long)]
        geoip_db: Vec<PathBuf>,
        /// What this node does: all (default), or a comma-separated list of ingest, process,
        /// query. Nodes apart need Kafka as the event log [config: roles]
        #[arg(long)]
        role: Option<String>,
    },
    /// Manage projects.
    Project {
        #[command(subcommand)]
        command: ProjectCommand,
    },
    /// Inspect the event log.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// Benchmarks against a running server.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ProjectCommand {
    /// Create a project and print {"id","name","master_key","write_key","read_key"}.
    Create {
        /// The project's name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Subcommand)]
enum LogCommand {
    /// Print every event in the log as one JSON object per line:
    /// {"position","project_id","collection","event"}.
    Dump {
        #[command(flatten)]
        common: Common,
    },
}

/// Builds the configuration: defaults < file < TALLY_* environment < flags.
fn load_config(common: &Common, flags: &[(&str, Option<String>)]) -> anyhow::Result<Config> {
    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some(file) = &common.config {
        if !file.is_file() {
            anyhow::bail!("configuration file {} does not exist", file.display());
        }
        figment = figment.merge(Toml::file(file));
    }
    // Only variables naming a real setting: TALLY_* variables meant for other tools (the test
    // scripts, say) must not make start-up fail.
    let known: Vec<String> = match serde_json::to_value(Config::default())? {
        serde_json::Value::Object(map) => map.keys().cloned().collect(),
        _ => Vec::new(),
    };
    figment = figment.merge(Env::prefixed("TALLY_").split("__").filter(move |key| {
        // The key arrives with `__` already turned into `.`, but not yet lowercased.
        let top = key.as_str().split('.').next().unwrap_or("");
        known.iter().any(|k| k.eq_ignore_ascii_case(top))
    }));
    if let Some(dir) = &common.data_dir {
        figment = figment.merge(Serialized::default("data_dir", dir));
    }
    for (name, value) in flags {
        if let Some(value) = value {
            figment = figment.merge(Serialized::default(name, value));
        }
    }
    figment
        .extract::<Config>()
        .map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
}

/// `all`, or a comma-separated list of `ingest`, `process`, `query`.
fn parse_roles(text: &str) -> anyhow::Result<Vec<Role>> {
    let mut roles = Vec::new();
    for word in text.split(',').map(str::trim) {
        let all = [Role::Ingest, Role::Process, Role::Query];
        match all.iter().find(|r| r.as_str() == word) {
            Some(role) => roles.push(*role),
            None if word == "all" => roles.extend(all),
            None => anyhow::bail!("--role: {word:?} is not one of all, ingest, process, query"),
        }
    }
    roles.dedup();
    Ok(roles)
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    tally_core::worker::disable_transparent_huge_pages();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            common,
            listen,
            admin_key,
            geoip_db,
            role,
        } => load_config(&common, &[("listen", listen), ("admin_key", admin_key)])
            .and_then(|mut config| {
                if !geoip_db.is_empty() {
                    config.enrich.geoip_db = geoip_db;
                }
                if let Some(role) = role {
                    config.roles = parse_roles(&role)?;
                }
                Ok(config)
            })
            .and_then(serve),
        Command::Project {
            command: ProjectCommand::Create { name, common },
        } => load_config(&common, &[]).and_then(|config| create_project(&config, &name)),
        Command::Log {
            command: LogCommand::Dump { common },
        } => load_config(&common, &[]).and_then(|config| dump_log(&config.data_dir)),
        Command::Bench { command } => bench::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tally: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    init_tracing(config.log_format);
    // On shards (`http.shards`) requests are served on threads of their own; this runtime then
    // accepts connections, ingests batches and runs the background tasks.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.http.runtime_threads_for(cpus))
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let tally = Tally::start(config, clock).await?;
        print_banner(&tally);
        wait_for_shutdown(&tally).await;
        tracing::info!("shutting down: finishing in-flight requests");
        tally.shutdown().await.context("shutting down")?;
        Ok(())
    })
}

/// Waits for SIGTERM or SIGINT; SIGHUP meanwhile reloads the GeoIP database.
async fn wait_for_shutdown(tally: &Tally) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    let mut hangup = signal(SignalKind::hangup()).expect("installing the SIGHUP handler");
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = term.recv() => return,
            _ = hangup.recv() => match tally.reload_geoip().await {
                Ok(_) => tracing::info!("SIGHUP: GeoIP database reloaded"),
                Err(e) => tracing::error!(error = %e, "SIGHUP: the GeoIP database was not replaced"),
            },
        }
    }
}

fn print_banner(tally: &Tally) {
    let url = format!("http://{}", tally.local_addr());
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "Tally is listening on {url}");
    match tally.bootstrap() {
        Some(project) => {
            let _ = writeln!(
                out,
                "\nFirst start: created the project \"{}\". Keep these keys; they are shown only once.",
                project.name
            );
            let _ = writeln!(out, "  project id: {}", project.id);
            let _ = writeln!(out, "  master key: {}", project.master_key);
            let _ = writeln!(out, "  write key:  {}", project.write_key);
            let _ = writeln!(out, "  read key:   {}", project.read_key);
            let _ = writeln!(out, "\nSend an event:");
            let _ = writeln!(out, "{}", curl_example(&url, project));
        }
        None => {
            let ids: Vec<String> = tally
                .catalog()
                .projects()
                .iter()
                .map(|p| format!("{} ({})", p.id, p.name))
                .collect();
            let _ = writeln!(out, "Projects: {}", ids.join(", "));
        }
    }
    let _ = out.flush();
}

fn curl_example(url: &str, project: &NewProject) -> String {
    format!(
        "  curl -X POST '{url}/3.0/projects/{}/events/pageviews' \\\n    -H 'Authorization: {}' -H 'Content-Type: application/json' \\\n    -d '{{\"page\": \"/pricing\", \"user\": {{\"id\": \"u1\"}}}}'",
        project.id, project.write_key
    )
}

fn create_project(config: &Config, name: &str) -> anyhow::Result<()> {
    let data_dir = DataDir::lock(&config.data_dir).map_err(|e| match e {
        tally_server::StartError::DataDirLocked(path) => anyhow::anyhow!(
            "{} is in use by a running Tally; create the project with POST /3.0/projects and the admin key instead",
            path.display()
        ),
        other => other.into(),
    })?;
    let catalog = EmbeddedCatalog::open(&data_dir.catalog_path())?;
    let created = catalog.create_project(name, &format_timestamp_ms(SystemClock.now_ms()))?;
    println!("{}", serde_json::to_string(&created)?);
    Ok(())
}

fn dump_log(data_dir: &Path) -> anyhow::Result<()> {
    let log_dir = data_dir.join("log");
    if !log_dir.is_dir() {
        anyhow::bail!("{} holds no event log", data_dir.display());
    }
    let mut reader = LogReader::offline(&log_dir, tally_ingest::log::first_position(&log_dir)?);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let batch = reader.read_batch(8 << 20)?;
        if batch.is_empty() {
            break;
        }
        for entry in batch {
            let logged = LoggedEvent::decode(&entry.payload)
                .with_context(|| format!("record at position {}", entry.position))?;
            let line = serde_json::json!({
                "position": entry.position,
                "project_id": logged.project,
                "collection": logged.collection,
                "event": logged.to_json().with_context(|| format!("record at position {}", entry.position))?,
            });
            serde_json::to_writer(&mut out, &line)?;
            out.write_all(b"\n")?;
        }
    }
    out.flush()?;
    Ok(())
}
