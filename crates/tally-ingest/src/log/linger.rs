//! Whether the log writer lingers before taking the next group (`log.group_commit_linger_us`).
//!
//! Each group commit costs the writer a write and an `fdatasync` (a flush, and on the development
//! machine's journal-less ext4 often a write of the file's inode block too): two or three disk
//! commands that put its thread to sleep two or three times; on a small machine every wake-up
//! takes a CPU from the HTTP handlers. Waiting a little after a busy group lets more appends
//! share one commit, which saves that CPU, but every append in the group waits that much longer
//! for its answer. Which one wins depends on the senders, and nothing the server can see cheaply
//! tells them apart:
//!
//! * many concurrent senders on few cores: requests queue for a CPU, and what a commit saves
//!   serves them sooner (single events over 128 connections on 2 cores: 33k to 37k req/s at
//!   200 µs);
//! * a few senders that each wait for their answer before sending again: the CPUs idle while
//!   the writer waits, and each sender loses what it waits (8 connections: 22.6k to 12.6k
//!   req/s; 32 connections: 32.1k to 28.3k).
//!
//! Tried as signals on 2 cores, and overlapping between 32 connections (lingering loses) and
//! 128 (it wins): the size of the groups, the size of the group gathered while lingering, the
//! machine's CPU use, the request threads' run-queue wait, and the share of time tokio's
//! workers were busy ("Measured" in `docs/ARCHITECTURE.md`).
//!
//! So the writer measures what it is after, the rate of appends, both ways ([`LingerTrial`]):
//! while the log is busy, a trial alternates short slices of lingering and not, and the writer
//! then lingers for [`KEEP_FOR`] if the lingering slices committed appends at a rate at least
//! [`LINGER_WINS_BY`] times that of the slices beside them, and does not otherwise. Each
//! lingering slice is compared with the slice after it and the median of those ratios decides,
//! so a drift of the machine's speed or a stall of a few tens of milliseconds (frequent on the
//! shared machine this was built on) does not. Senders held to a fixed rate commit at the same
//! rate either way, so they wait only in the trials' lingering slices. A trial that the log's
//! going quiet interrupts (a slice of more than [`SLICE_AT_MOST`]) is dropped, and the next busy
//! group starts a new one. The writer never lingers after a group of fewer than
//! [`LINGER_AFTER_GROUP_OF`] requests, so a lone client does not wait (but for its first request
//! after a busy spell, which follows a busy group).
//!
//! Senders held to a fixed rate gain nothing a trial can see, yet lingering is free for them:
//! their next request comes when it comes. So when the HTTP layer says most open connections
//! have no request in flight ([`tally_core::senders::Senders`]), the writer lingers after any
//! group of [`LINGER_FOR_OWN_CLOCKS_AFTER_GROUP_OF`] or more, without a trial.

use std::time::{Duration, Instant};

/// A group of at least this many requests means appends are arriving faster than the log
/// commits them one by one; only then may the writer linger before the next group. Single
/// events over 128 connections on 2 cores made groups of 11 to 12 requests on average at their
/// maximum rate and 6 to 7 at half of it; a lone client makes groups of one.
pub(super) const LINGER_AFTER_GROUP_OF: usize = 6;

/// While most clients send on their own clock, a group of at least this many requests is
/// enough to linger, without a trial: their requests keep coming while the writer waits, and
/// none of them is held back by it. Single events paced at half the maximum rate over 128
/// connections made groups of about five (150,921 requests in 32,219 syncs in one 8 s phase).
pub(super) const LINGER_FOR_OWN_CLOCKS_AFTER_GROUP_OF: usize = 3;

/// How long each slice of a trial lasts (it ends with the first commit after that).
const SLICE: Duration = Duration::from_millis(25);

/// A slice this long was interrupted by the log going quiet: its rate would measure the pause,
/// so the trial is dropped.
const SLICE_AT_MOST: Duration = Duration::from_millis(100);

/// Slices in a trial, alternating: lingering, then not, in pairs.
const SLICES: usize = 20;

// An even number of pairs, so the median is the mean of the middle two.
const _: () = assert!(SLICES.is_multiple_of(4));

/// How long the outcome of a trial is kept: the next trial starts with the first busy group
/// after that.
const KEEP_FOR: Duration = Duration::from_secs(5);

/// Lingering is kept only if its slices commit appends at least this many times as fast as the
/// slices without it (the median over the pairs): waiting costs each append latency, so a tie
/// goes to not waiting.
const LINGER_WINS_BY: f64 = 1.05;

/// The writer's decision to linger, kept between groups.
#[derive(Debug)]
pub(super) struct LingerTrial {
    /// How long to wait (`log.group_commit_linger_us`); zero: never.
    linger: Duration,
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Nothing measured yet: the next busy group starts a trial.
    Idle,
    /// A trial in progress: slice `slice` started at `started` and has committed `appends` so
    /// far; `rates` holds the appends per second of the slices before it.
    Trying {
        slice: usize,
        started: Instant,
        appends: u64,
        rates: [f64; SLICES],
    },
    /// The outcome of the last trial, kept until `until`.
    Keeping { linger: bool, until: Instant },
}

impl LingerTrial {
    pub(super) fn new(linger: Duration) -> Self {
        Self {
            linger,
            state: State::Idle,
        }
    }

    /// Whether the writer lingers now: the mode of the current slice, or the kept outcome.
    fn lingering(&self) -> bool {
        match self.state {
            State::Idle => false,
            State::Trying { slice, .. } => lingers_in(slice),
            State::Keeping { linger, .. } => linger,
        }
    }

    /// How long to wait before taking the next group, at `now`, given the size of the last one
    /// and whether most clients send on their own clock (`own_clocks`: see [`Senders`]).
    ///
    /// [`Senders`]: tally_core::senders::Senders
    pub(super) fn before_group(
        &mut self,
        last_group_requests: usize,
        own_clocks: bool,
        now: Instant,
    ) -> Option<Duration> {
        if self.linger.is_zero() {
            return None;
        }
        if own_clocks && last_group_requests >= LINGER_FOR_OWN_CLOCKS_AFTER_GROUP_OF {
            // A trial under way would compare lingering with lingering: it starts afresh with
            // the next busy group that the trial decides for.
            if matches!(self.state, State::Trying { .. }) {
                self.state = State::Idle;
            }
            return Some(self.linger);
        }
        if last_group_requests < LINGER_AFTER_GROUP_OF {
            return None;
        }
        match self.state {
            State::Idle => self.start_trial(now),
            State::Keeping { until, .. } if now >= until => self.start_trial(now),
            State::Trying { started, .. } if now.saturating_duration_since(started) > SLICE_AT_MOST => {
                self.start_trial(now)
            }
            _ => {}
        }
        self.lingering().then_some(self.linger)
    }

    /// Counts the appends of a group committed at `now`, and moves the trial on.
    pub(super) fn committed(&mut self, requests: usize, now: Instant) {
        let State::Trying {
            slice,
            started,
            appends,
            rates,
        } = &mut self.state
        else {
            return;
        };
        *appends += requests as u64;
        let elapsed = now.saturating_duration_since(*started);
        if elapsed > SLICE_AT_MOST {
            self.state = State::Idle;
            return;
        }
        if elapsed < SLICE {
            return;
        }
        rates[*slice] = *appends as f64 / elapsed.as_secs_f64();
        if *slice + 1 < SLICES {
            *slice += 1;
            *started = now;
            *appends = 0;
            return;
        }
        let gain = median_gain(rates);
        let linger = gain >= LINGER_WINS_BY;
        tracing::debug!(gain, linger, ?rates, "event log writer: lingering trial");
        self.state = State::Keeping {
            linger,
            until: now + KEEP_FOR,
        };
    }

    /// Starts a trial; its first slice lingers.
    fn start_trial(&mut self, now: Instant) {
        self.state = State::Trying {
            slice: 0,
            started: now,
            appends: 0,
            rates: [0.0; SLICES],
        };
    }
}

/// Whether a trial's slice `slice` lingers.
fn lingers_in(slice: usize) -> bool {
    slice.is_multiple_of(2)
}

/// The median, over the pairs of slices, of the lingering slice's rate over the other's. Every
/// rate is above zero: a slice ends with a commit, of one append at least.
fn median_gain(rates: &[f64; SLICES]) -> f64 {
    let mut gains: Vec<f64> = rates.chunks_exact(2).map(|pair| pair[0] / pair[1]).collect();
    gains.sort_by(f64::total_cmp);
    let middle = gains.len() / 2;
    (gains[middle - 1] + gains[middle]) / 2.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINGER: Duration = Duration::from_micros(200);

    /// Runs a whole trial from `start`: every millisecond a group of `without` requests in the
    /// slices without lingering, `with` in the lingering ones. Returns when it ended.
    fn run_trial(trial: &mut LingerTrial, start: Instant, without: usize, with: usize) -> Instant {
        let mut now = start;
        let mut last = LINGER_AFTER_GROUP_OF;
        loop {
            let waited = trial.before_group(last, false, now);
            let State::Trying { slice, .. } = trial.state else {
                panic!("no trial at {now:?}: {:?}", trial.state);
            };
            assert_eq!(waited.is_some(), slice.is_multiple_of(2), "even slices linger");
            last = if waited.is_some() { with } else { without };
            now += Duration::from_millis(1);
            trial.committed(last, now);
            if let State::Keeping { .. } = trial.state {
                return now;
            }
        }
    }

    #[test]
    fn a_lone_client_never_waits_and_zero_turns_it_off() {
        let mut trial = LingerTrial::new(LINGER);
        let now = Instant::now();
        assert_eq!(
            trial.before_group(0, false, now),
            None,
            "the first group is taken at once"
        );
        assert_eq!(trial.before_group(1, false, now), None);
        assert_eq!(trial.before_group(LINGER_AFTER_GROUP_OF - 1, false, now), None);
        assert_eq!(trial.state, State::Idle, "small groups start no trial");
        let mut off = LingerTrial::new(Duration::ZERO);
        assert_eq!(off.before_group(500, true, now), None);
        assert_eq!(off.state, State::Idle);
    }

    #[test]
    fn lingering_is_kept_when_it_commits_faster() {
        let mut trial = LingerTrial::new(LINGER);
        let start = Instant::now();
        let ended = run_trial(&mut trial, start, 10, 12);
        assert!(ended >= start + SLICE * SLICES as u32, "a trial lasts its slices");
        let kept_until = ended + KEEP_FOR;
        assert_eq!(
            trial.state,
            State::Keeping {
                linger: true,
                until: kept_until
            }
        );
        assert_eq!(trial.before_group(20, false, ended), Some(LINGER));
        assert_eq!(
            trial.before_group(3, false, ended),
            None,
            "not after a small group"
        );
        assert_eq!(
            trial.before_group(20, false, kept_until - Duration::from_millis(1)),
            Some(LINGER)
        );
        // Then a new trial, which starts lingering.
        assert_eq!(trial.before_group(20, false, kept_until), Some(LINGER));
        assert!(matches!(trial.state, State::Trying { slice: 0, .. }));
    }

    #[test]
    fn a_tie_or_a_loss_goes_to_not_waiting() {
        for (without, with) in [(10, 10), (10, 7), (100, 104)] {
            let mut trial = LingerTrial::new(LINGER);
            let ended = run_trial(&mut trial, Instant::now(), without, with);
            assert!(
                matches!(trial.state, State::Keeping { linger: false, .. }),
                "{without} against {with}: {:?}",
                trial.state
            );
            assert_eq!(trial.before_group(20, false, ended), None);
        }
    }

    #[test]
    fn a_trial_rates_each_slice_by_every_group_committed_in_it() {
        let mut trial = LingerTrial::new(LINGER);
        let start = Instant::now();
        trial.before_group(LINGER_AFTER_GROUP_OF, false, start);
        // Three groups inside the first slice, the last one ending it.
        trial.committed(7, start + Duration::from_millis(10));
        trial.committed(8, start + Duration::from_millis(20));
        trial.committed(10, start + SLICE);
        let State::Trying {
            slice,
            started,
            appends,
            rates,
        } = trial.state
        else {
            panic!("{:?}", trial.state);
        };
        assert_eq!((slice, started, appends), (1, start + SLICE, 0));
        assert_eq!(rates[0], 25.0 / SLICE.as_secs_f64());
    }

    #[test]
    fn a_stall_in_a_few_slices_does_not_decide() {
        // Lingering commits 10% slower, but three of the ten slices without it ran during a
        // stall, at a tenth of the rate: compared by their totals (900 against 730), lingering
        // would have looked 23% faster.
        let mut rates = [0.0; SLICES];
        for (pair, rate) in rates.chunks_exact_mut(2).enumerate() {
            rate[0] = 90.0;
            rate[1] = if pair < 3 { 10.0 } else { 100.0 };
        }
        let totals = rates.iter().step_by(2).sum::<f64>() / rates.iter().skip(1).step_by(2).sum::<f64>();
        assert!(totals >= LINGER_WINS_BY, "the totals would linger: {totals}");
        assert!(
            (median_gain(&rates) - 0.9).abs() < 1e-9,
            "{}",
            median_gain(&rates)
        );
    }

    #[test]
    fn a_trial_the_log_going_quiet_interrupts_is_dropped() {
        let mut trial = LingerTrial::new(LINGER);
        let start = Instant::now();
        assert_eq!(trial.before_group(20, false, start), Some(LINGER));
        trial.committed(20, start + Duration::from_millis(1));
        // The log is quiet for a second; the slice would have measured the pause.
        trial.committed(1, start + Duration::from_secs(1));
        assert_eq!(trial.state, State::Idle);
        // A busy group starts a new trial; one that never saw a commit is restarted the same way.
        let later = start + Duration::from_secs(2);
        assert_eq!(trial.before_group(20, false, later), Some(LINGER));
        let much_later = later + Duration::from_secs(1);
        assert_eq!(trial.before_group(20, false, much_later), Some(LINGER));
        assert!(matches!(
            trial.state,
            State::Trying { slice: 0, started, appends: 0, .. } if started == much_later
        ));
    }

    #[test]
    fn clients_on_their_own_clock_get_lingering_without_a_trial() {
        let now = Instant::now();
        let mut trial = LingerTrial::new(LINGER);
        assert_eq!(
            trial.before_group(LINGER_FOR_OWN_CLOCKS_AFTER_GROUP_OF, true, now),
            Some(LINGER)
        );
        assert_eq!(trial.state, State::Idle, "no trial started");
        assert_eq!(
            trial.before_group(LINGER_FOR_OWN_CLOCKS_AFTER_GROUP_OF - 1, true, now),
            None,
            "not after a small group"
        );
        // Closed-loop senders: the trial decides as before (its first slice lingers).
        assert_eq!(
            trial.before_group(LINGER_FOR_OWN_CLOCKS_AFTER_GROUP_OF, false, now),
            None
        );
        assert_eq!(
            trial.before_group(LINGER_AFTER_GROUP_OF, false, now),
            Some(LINGER)
        );
        assert!(matches!(trial.state, State::Trying { .. }));
        // Clients on their own clock again: the trial under way is dropped.
        assert_eq!(trial.before_group(LINGER_AFTER_GROUP_OF, true, now), Some(LINGER));
        assert_eq!(trial.state, State::Idle);
    }
}
