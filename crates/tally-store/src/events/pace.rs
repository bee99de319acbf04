//! Pacing of the store's background work, so that it does not arrive in bursts.
//!
//! Flushes and merges run on one background thread ([`super::EventStore::start_maintenance`]).
//! Unpaced, each is a burst: at about 19,000 events/s, a merge of eight flushed segments took
//! 100–205 ms on that thread, and a flush 20–120 ms, once a second. On a 2-core machine a burst
//! like that delays the acknowledgements ingest is sending while it runs, however low the
//! thread's priority (a half-second busy loop at nice 10 raised the half-rate p99 to 27 ms; the
//! same work done 2 ms on, 6 ms off to 12.7 ms: "Measured" in ARCHITECTURE.md, 2026-12-06).
//!
//! So the work calls [`Pacer::pace`] at points where it can stop (between columns, every so
//! many rows or bytes), and while ingest is busy the pacer rests there in proportion to the work
//! done since its last rest. The rests of one maintenance round are capped ([`Pacer::new`]):
//! the thread counts them as time waited for its next round, so pacing spreads a round over the
//! flush interval but never slows the store's throughput by more than one interval per round.

use std::time::{Duration, Instant};

/// Rest per unit of work while ingest is busy: the work gets a quarter of the thread's time.
const REST_PER_WORK: u32 = 3;
/// Work done between rests: long enough that sleeping costs little, short enough that ingest
/// on the same core waits at most about this long.
const SLICE: Duration = Duration::from_millis(2);
/// The longest single rest, after a long stretch between pace points: whether ingest is still
/// busy (and the server not stopping) is asked again at least this often.
const LONGEST_REST: Duration = Duration::from_millis(50);

/// Spreads one maintenance round's work over time while ingest is busy.
pub(crate) struct Pacer<'a> {
    /// Whether ingest is busy now (rest only then: an idle server should catch up at full speed).
    /// `None` never rests (direct calls: tests, deletes, shutdown).
    ingest_busy: Option<&'a dyn Fn() -> bool>,
    /// The most this round may rest in all.
    budget: Duration,
    /// Rested so far this round.
    rested: Duration,
    /// When the work since the last rest began.
    since: Instant,
}

impl<'a> Pacer<'a> {
    /// A pacer that rests while `ingest_busy()` says so, at most `budget` in all.
    pub(crate) fn new(ingest_busy: &'a dyn Fn() -> bool, budget: Duration) -> Self {
        Self {
            ingest_busy: Some(ingest_busy),
            budget,
            rested: Duration::ZERO,
            since: Instant::now(),
        }
    }

    /// A pacer that never rests.
    pub(crate) fn unpaced() -> Self {
        Self {
            ingest_busy: None,
            budget: Duration::ZERO,
            rested: Duration::ZERO,
            since: Instant::now(),
        }
    }

    /// A point where the work may stop: rests if enough work was done since the last rest,
    /// ingest is busy and the budget allows.
    pub(crate) fn pace(&mut self) {
        let Some(busy) = self.ingest_busy else {
            return;
        };
        let worked = self.since.elapsed();
        if worked < SLICE {
            return;
        }
        let rest = (worked * REST_PER_WORK)
            .min(LONGEST_REST)
            .min(self.budget.saturating_sub(self.rested));
        if !rest.is_zero() && busy() {
            std::thread::sleep(rest);
            self.rested += rest;
        }
        self.since = Instant::now();
    }

    /// How long this round rested.
    pub(crate) fn rested(&self) -> Duration {
        self.rested
    }
}

/// A writer that paces every `every` bytes written through it.
pub(crate) struct PacedWrite<'p, 'a, W> {
    inner: W,
    pacer: &'p mut Pacer<'a>,
    every: usize,
    since_pace: usize,
}

impl<'p, 'a, W> PacedWrite<'p, 'a, W> {
    pub(crate) fn new(inner: W, pacer: &'p mut Pacer<'a>, every: usize) -> Self {
        Self {
            inner,
            pacer,
            every,
            since_pace: 0,
        }
    }
}

impl<W: std::io::Write> std::io::Write for PacedWrite<'_, '_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.since_pace += n;
        if self.since_pace >= self.every {
            self.since_pace = 0;
            self.pacer.pace();
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(d: Duration) {
        let start = Instant::now();
        while start.elapsed() < d {
            std::hint::spin_loop();
        }
    }

    #[test]
    fn rests_in_proportion_while_ingest_is_busy_up_to_the_budget() {
        let busy = || true;
        let mut pacer = Pacer::new(&busy, Duration::from_millis(40));
        spin(Duration::from_millis(5));
        pacer.pace();
        assert!(
            pacer.rested() >= Duration::from_millis(15),
            "{:?}",
            pacer.rested()
        );
        for _ in 0..10 {
            spin(Duration::from_millis(5));
            pacer.pace();
        }
        assert_eq!(pacer.rested(), Duration::from_millis(40), "capped by the budget");
    }

    #[test]
    fn does_not_rest_while_ingest_is_idle_or_unpaced() {
        let idle = || false;
        let mut pacer = Pacer::new(&idle, Duration::from_secs(1));
        spin(Duration::from_millis(5));
        pacer.pace();
        assert_eq!(pacer.rested(), Duration::ZERO);
        let mut pacer = Pacer::unpaced();
        spin(Duration::from_millis(5));
        pacer.pace();
        assert_eq!(pacer.rested(), Duration::ZERO);
    }

    #[test]
    fn short_work_does_not_rest() {
        let busy = || true;
        let mut pacer = Pacer::new(&busy, Duration::from_secs(1));
        pacer.pace();
        assert_eq!(pacer.rested(), Duration::ZERO);
    }
}
