//! Serving HTTP on shards: threads that each run a single-threaded runtime and keep every
//! connection they are given for the connection's life.
//!
//! One task accepts connections on the listener ([`serve_sharded`]) and deals them out in
//! turn to the shards; each shard runs `axum::serve` over the connections dealt to it
//! ([`ShardListener`]), with the same router and the same graceful shutdown as a single
//! server. Everything else (the background tasks, start and shutdown) stays on the runtime
//! that called [`serve_sharded`].
//!
//! **Why shards, not one work-stealing runtime.** A single-event request waits for the log's
//! group commit and is woken by the log's writer thread. A multi-threaded runtime resumes it on
//! whichever worker takes it from the shared queue, so the connection's buffers, and everything
//! the request allocated before waiting, are touched and freed on another core; and with more
//! workers than there is work for, idle workers park and are unparked around every commit. On
//! the 2-core development machine the runtime's threads spent 24–31 µs per single event with
//! three workers against 17–24 µs with one, and 24–25 µs on three shards; the single-event
//! rate against `/ping` rose by ~5 points on shards (ARCHITECTURE.md, "Measured", 2026-12-06).
//!
//! **Batches are not ingested on the shard** (`AppInner::work`). A shard the kernel keeps
//! waiting (behind the stage, the blocking pool's validators or the writer, on an
//! oversubscribed machine) holds every connection dealt to it, where a work-stealing runtime
//! lets another worker take their tasks. With whole batches on the shards, half-rate batch
//! phases' p99 went from ~10.5 to 12–20 ms; with a batch's validation and append on the
//! work-stealing runtime, and only its body and answer on the shard, it came back to the
//! work-stealing runtime's. A single event's work is small and waits on the log, so it stays.
//!
//! **Dealing, not racing.** Shards accepting from the shared socket themselves split the
//! connections unevenly (a burst of connections went mostly to whichever shard woke first: one
//! shard did 59% of the work while the others idled). Dealing in turn gives each shard as many
//! connections; a connection cannot move afterwards, which is the point.

use std::future::IntoFuture;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::connect_info::IntoMakeServiceWithConnectInfo;
use axum::serve::{Listener, ListenerExt};
use tally_core::senders::Senders;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::connections::CountedListener;

/// Connections dealt to a shard but not yet taken by it. A shard takes each as soon as its
/// runtime gets to it, so this only smooths a burst of new connections.
const DEALT_AHEAD: usize = 64;

/// How long a shard that was told to stop at once waits for its remaining tasks.
const FORCED_STOP_WAIT: Duration = Duration::from_millis(100);

/// The connections dealt to one shard, as `axum::serve` takes them.
struct ShardListener {
    dealt: mpsc::Receiver<(std::net::TcpStream, SocketAddr)>,
    local_addr: SocketAddr,
}

impl Listener for ShardListener {
    type Io = TcpStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (TcpStream, SocketAddr) {
        loop {
            match self.dealt.recv().await {
                // Registered with this shard's runtime, where the connection then lives.
                Some((stream, peer)) => match TcpStream::from_std(stream) {
                    Ok(stream) => return (stream, peer),
                    Err(e) => tracing::warn!(error = %e, %peer, "could not take a connection"),
                },
                // The dealer stopped (shutdown): no more connections; the graceful shutdown
                // that stopped it ends this shard's server.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local_addr)
    }
}

/// Serves `app` on `shards` threads (at least one), dealing the connections accepted on
/// `listener` to them in turn, until `stopped` turns true. The returned task ends once every
/// shard has finished its in-flight requests and stopped, with the first error any met; when
/// `forced` turns true (the grace period is over), the shards stop at once, cutting what is
/// still in flight.
pub fn serve_sharded(
    listener: TcpListener,
    app: IntoMakeServiceWithConnectInfo<Router, SocketAddr>,
    shards: usize,
    senders: Arc<Senders>,
    stopped: watch::Receiver<bool>,
    forced: watch::Receiver<bool>,
) -> io::Result<JoinHandle<io::Result<()>>> {
    let local_addr = listener.local_addr()?;
    let mut dealt_to = Vec::new();
    let mut finished = Vec::new();
    for i in 0..shards.max(1) {
        // Built here, so that a shard that cannot start fails the server's start.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (deal, dealt) = mpsc::channel(DEALT_AHEAD);
        let listener = CountedListener::new(ShardListener { dealt, local_addr }, senders.clone());
        let (app, mut stopped, mut forced) = (app.clone(), stopped.clone(), forced.clone());
        let (done, finish) = oneshot::channel();
        std::thread::Builder::new()
            .name(format!("tally-http-{i}"))
            .spawn(move || {
                let outcome = runtime.block_on(async move {
                    // axum hands a custom listener's peer address to handlers (`ConnectInfo`) only
                    // through `TapIo`; this tap does nothing else.
                    let serve = axum::serve(listener.tap_io(|_| {}), app)
                        .with_graceful_shutdown(async move {
                            let _ = stopped.wait_for(|stop| *stop).await;
                        })
                        .into_future();
                    tokio::select! {
                        served = serve => served,
                        _ = forced.wait_for(|force| *force) => Ok(()),
                    }
                });
                // Connections cut by a forced stop, and blocking work, are not waited for.
                runtime.shutdown_timeout(FORCED_STOP_WAIT);
                let _ = done.send(outcome);
            })?;
        dealt_to.push(deal);
        finished.push(finish);
    }
    let dealer = tokio::spawn(deal_connections(listener, dealt_to, stopped));
    Ok(tokio::spawn(async move {
        let _ = dealer.await;
        let mut outcome = Ok(());
        for finish in finished {
            let result = finish
                .await
                .unwrap_or_else(|_| Err(io::Error::other("an HTTP serving thread panicked")));
            if outcome.is_ok() {
                outcome = result;
            }
        }
        outcome
    }))
}

/// Accepts connections and deals them to the shards in turn until `stopped` turns true.
async fn deal_connections(
    listener: TcpListener,
    shards: Vec<mpsc::Sender<(std::net::TcpStream, SocketAddr)>>,
    mut stopped: watch::Receiver<bool>,
) {
    let mut next = 0;
    loop {
        let accepted = tokio::select! {
            _ = stopped.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // A client that gave up while waiting in the backlog.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of file descriptors and the like: the error would repeat at once.
                tracing::error!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Deregistered from this runtime; the shard registers it with its own.
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, %peer, "could not hand over a connection");
                continue;
            }
        };
        // In turn, passing over a shard that has stopped (its thread failed): its channel is
        // closed and hands the connection back.
        let mut connection = Some((stream, peer));
        for _ in 0..shards.len() {
            let Some(dealt) = connection.take() else { break };
            let shard = &shards[next % shards.len()];
            next += 1;
            if let Err(mpsc::error::SendError(back)) = shard.send(dealt).await {
                connection = Some(back);
            }
        }
        if connection.is_some() {
            tracing::error!("every HTTP serving thread has stopped; not accepting");
            return;
        }
    }
}

/// Errors of one connection, after which the listener is fine.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
    )
}
