//! Who is sending: how many clients are connected, and how many of them wait for an answer now.
//!
//! The HTTP server counts both ([`Senders::connection_opened`], [`Senders::request_started`]);
//! the event log's writer reads them to decide whether it may let appends gather before a group
//! commit. Lingering delays the answers in the group, and a client that sends its next request
//! only after that answer (a closed loop: a load generator, a bulk loader) is slowed by it. A
//! client that sends on its own clock (a page view, a device reporting every second) is not: its
//! next request comes when it comes. When most connected clients have no request in flight,
//! most senders are of the second kind, and the writer can save the commits without costing
//! anyone a request.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Fewer connections than this say nothing about the senders (one or two clients may be a
/// closed loop between their requests).
const FEWEST_CONNECTIONS: usize = 16;

/// Counts of connections and requests in flight, shared by the HTTP server and the event log.
#[derive(Debug, Default)]
pub struct Senders {
    open: AtomicUsize,
    in_flight: AtomicUsize,
}

impl Senders {
    /// Counts a connection until the returned guard is dropped.
    pub fn connection_opened(self: &Arc<Self>) -> OpenConnection {
        self.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(self.clone())
    }

    /// Counts a request in flight until the returned guard is dropped.
    pub fn request_started(self: &Arc<Self>) -> RequestInFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        RequestInFlight(self.clone())
    }

    /// Open connections.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Requests received and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether most connected clients have no request in flight (and there are enough of them
    /// for that to mean something): their requests do not wait on each other's answers.
    pub fn mostly_waiting_on_their_own_clock(&self) -> bool {
        let open = self.open();
        open >= FEWEST_CONNECTIONS && self.in_flight() * 2 < open
    }
}

/// A counted connection; dropping it uncounts it.
#[derive(Debug)]
pub struct OpenConnection(Arc<Senders>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A counted request; dropping it uncounts it.
#[derive(Debug)]
pub struct RequestInFlight(Arc<Senders>);

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_the_guards_and_idle_connections_mean_own_clocks() {
        let senders = Arc::new(Senders::default());
        let mut connections: Vec<_> = (0..32).map(|_| senders.connection_opened()).collect();
        assert_eq!(senders.open(), 32);
        let requests: Vec<_> = (0..15).map(|_| senders.request_started()).collect();
        assert!(senders.mostly_waiting_on_their_own_clock(), "15 of 32 busy");
        let more: Vec<_> = (0..1).map(|_| senders.request_started()).collect();
        assert!(!senders.mostly_waiting_on_their_own_clock(), "16 of 32 busy");
        drop(more);
        drop(requests);
        assert_eq!(senders.in_flight(), 0);
        connections.truncate(12);
        assert_eq!(senders.open(), 12);
        assert!(
            !senders.mostly_waiting_on_their_own_clock(),
            "too few connections to tell"
        );
    }
}
