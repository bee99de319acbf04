//! A named background thread that runs one loop until asked to stop: the shape of the process
//! stages and of Kafka inbound, which each own a thread. The loop polls the flag it is given;
//! [`StoppableThread::stop`] sets it and waits, and dropping the handle only sets it (a stage
//! finishes the batch in hand on its own).
//!
//! Background threads (the process stage, the store's flushes and merges) also lower their
//! priority here ([`lower_priority`]) and keep off the CPUs kept for ingest while it is busy
//! ([`BackgroundCpus`]). The process as a whole keeps off transparent huge pages
//! ([`disable_transparent_huge_pages`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

/// A running loop on its own thread.
#[derive(Debug)]
pub struct StoppableThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl StoppableThread {
    /// Starts `work` on a thread named `name`; `work` returns once the flag it is given is set.
    pub fn spawn(name: &str, work: impl FnOnce(&AtomicBool) + Send + 'static) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name(name.to_owned())
                .spawn(move || work(&stop))?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Asks the loop to stop and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for StoppableThread {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// CPU time this process has used so far, user and system, in seconds (`getrusage`): what
/// `/metrics` exports as `process_cpu_seconds_total`, and what benchmarks divide by the work
/// done to get a cost per request that a noisy machine disturbs less than a rate.
pub fn process_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct it is given and reads nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return 0.0;
        }
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Lowers the calling thread's scheduling priority to `niceness` (0: unchanged; higher yields
/// more). Background work (the process stage, the store's flushes and merges) runs behind the
/// log, so when it competes with ingest for the cores, ingest, whose acknowledgements clients
/// wait for, should win and the background work catch up afterwards. Threads the caller starts
/// afterwards inherit it. Failure (a platform that refuses) is logged and otherwise ignored.
pub fn lower_priority(niceness: i32) {
    if niceness == 0 {
        return;
    }
    // SAFETY: gettid and setpriority take plain integers and only affect the calling thread.
    let result = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, niceness)
    };
    if result != 0 {
        tracing::debug!(niceness, "could not lower a background thread's priority");
    }
}

/// Turns transparent huge pages off for the whole process (`PR_SET_THP_DISABLE`), whatever
/// the machine's setting; called first thing in `main`. The allocator (mimalloc) asks for huge
/// pages on its memory, and every first touch of a huge page makes the kernel zero 2 MiB on the
/// faulting thread. The process stage builds and drops large buffers all the time (segments,
/// merges): measured on 2026-12-05 in a half-rate batch ingest run, the kernel's page zeroing,
/// nearly all on the stage's thread, was 15% of the server's CPU samples with huge pages and
/// 0.3% without, and the stage into the event store went from 83k–86k to 104k–105k events/s
/// (`tally bench process`, 600,000 events).
/// Failure (a kernel without the call) is ignored: huge pages then stay as the machine has them.
pub fn disable_transparent_huge_pages() {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integers and only sets a flag of the
    // calling process.
    let result = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if result != 0 {
        tracing::debug!("could not turn transparent huge pages off");
    }
}

/// The CPUs the calling thread may run on, in order: at the server's start, the process's
/// (its affinity mask, which `taskset` or a cgroup's cpuset may have narrowed). Empty where the
/// platform does not say (then nothing is confined).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `set` is a plain bitmask the call fills in; CPU_ISSET only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

/// The CPUs background threads may use when the first `kept_for_ingest` of `allowed` are kept
/// for ingest: the rest, or `None` (no confinement) when nothing would be left.
///
/// Why keep any: the process stage and the store work behind the log, and while they are behind
/// they are always runnable. At a lower priority they still cost ingest its tail when they can
/// run on every core: in `tally bench ingest`'s batch half-rate phase (stage backlogged), with
/// the stage's and store's threads on one of the two cores, 12 of 18 phases had p99 ≤ 10 ms
/// against 4 of 18 with them on both ("Measured" in ARCHITECTURE.md, 2026-12-05).
fn cpus_after(allowed: &[usize], kept_for_ingest: usize) -> Option<Vec<usize>> {
    (kept_for_ingest > 0 && allowed.len() > kept_for_ingest).then(|| allowed[kept_for_ingest..].to_vec())
}

/// Confines the calling thread, and threads it starts afterwards, to `cpus`. Failure (a
/// platform that refuses) is logged and otherwise ignored: it only costs ingest latency.
fn confine_to_cpus(cpus: &[usize]) {
    // SAFETY: `set` is a plain bitmask built here; the call only affects the calling thread.
    let result = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus.iter().filter(|&&cpu| cpu < libc::CPU_SETSIZE as usize) {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if result != 0 {
        tracing::debug!(?cpus, "could not confine a background thread to its CPUs");
    }
}

/// Where the background threads run: off the CPUs kept for ingest while ingest is busy, on
/// every CPU while it is idle, so that a backlog is worked off on every core once clients stop.
/// The process stage, which sees the log grow, says which ([`BackgroundCpus::ingest_busy`]);
/// every background thread follows at its next step ([`BackgroundCpus::follow`]).
///
/// Kept off for good, the stage caught up with an 8 s burst 20–34% slower on two cores; moving
/// back while ingest is idle recovered most of it ("Measured" in ARCHITECTURE.md, 2026-12-05).
#[derive(Debug)]
pub struct BackgroundCpus {
    /// The CPUs left to background work while ingest is busy.
    kept_off: Vec<usize>,
    /// Every CPU the server may use, for while ingest is idle.
    all: Vec<usize>,
    /// Whether ingest is idle now. Starts false: ingest may be busy from the first request.
    idle: AtomicBool,
    /// The threads following this (Linux thread ids), for tests and operators to inspect.
    followers: std::sync::Mutex<Vec<i64>>,
}

impl BackgroundCpus {
    /// The plan for a server allowed `allowed` that keeps the first `kept_for_ingest` of them for
    /// ingest; `None` when nothing would be kept.
    pub fn new(allowed: Vec<usize>, kept_for_ingest: usize) -> Option<Self> {
        cpus_after(&allowed, kept_for_ingest).map(|kept_off| Self {
            kept_off,
            all: allowed,
            idle: AtomicBool::new(false),
            followers: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// Records whether ingest is busy; background threads follow at their next step.
    pub fn ingest_busy(&self, busy: bool) {
        self.idle.store(!busy, Ordering::Relaxed);
    }

    /// Whether ingest was busy when the process stage last said.
    pub fn is_ingest_busy(&self) -> bool {
        !self.idle.load(Ordering::Relaxed)
    }

    /// The CPUs background threads should be on now.
    pub fn current(&self) -> &[usize] {
        if self.idle.load(Ordering::Relaxed) {
            &self.all
        } else {
            &self.kept_off
        }
    }

    /// Moves the calling thread to [`BackgroundCpus::current`] if that changed since it last
    /// followed; `applied` is the thread's own record of what it applied (start with `None`).
    pub fn follow(&self, applied: &mut Option<bool>) {
        let idle = self.idle.load(Ordering::Relaxed);
        if *applied == Some(idle) {
            return;
        }
        if applied.is_none() {
            // SAFETY: gettid takes no arguments and only reads the calling thread's id.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) };
            self.followers.lock().unwrap_or_else(|p| p.into_inner()).push(tid);
        }
        confine_to_cpus(if idle { &self.all } else { &self.kept_off });
        *applied = Some(idle);
    }

    /// The Linux thread ids of the threads that follow this plan.
    pub fn followers(&self) -> Vec<i64> {
        self.followers.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transparent_huge_pages_are_off_for_the_process_once_asked() {
        disable_transparent_huge_pages();
        // SAFETY: PR_GET_THP_DISABLE only reads the calling process's flag.
        let disabled = unsafe { libc::prctl(libc::PR_GET_THP_DISABLE, 0, 0, 0, 0) };
        assert_eq!(disabled, 1);
    }

    #[test]
    fn background_threads_move_to_every_cpu_while_ingest_is_idle_and_back() {
        let allowed = allowed_cpus();
        let Some(plan) = BackgroundCpus::new(allowed.clone(), 1) else {
            return; // one CPU: nothing to keep
        };
        let plan = Arc::new(plan);
        let mine = |plan: &BackgroundCpus, applied: &mut Option<bool>| {
            plan.follow(applied);
            allowed_cpus()
        };
        let seen = std::thread::spawn({
            let plan = plan.clone();
            move || {
                let mut applied = None;
                let busy = mine(&plan, &mut applied);
                plan.ingest_busy(false);
                let idle = mine(&plan, &mut applied);
                plan.ingest_busy(true);
                (busy, idle, mine(&plan, &mut applied))
            }
        })
        .join()
        .expect("background thread");
        assert_eq!(
            seen,
            (allowed[1..].to_vec(), allowed.clone(), allowed[1..].to_vec())
        );
        assert_eq!(plan.followers().len(), 1);
    }

    #[test]
    fn background_threads_leave_the_first_cpus_to_ingest_when_some_remain() {
        assert_eq!(cpus_after(&[0, 1], 1), Some(vec![1]));
        assert_eq!(cpus_after(&[0, 1, 2, 3], 1), Some(vec![1, 2, 3]));
        assert_eq!(cpus_after(&[2, 5, 7], 2), Some(vec![7]));
        // Nothing kept, or nothing would be left: background threads run anywhere.
        assert_eq!(cpus_after(&[0, 1], 0), None);
        assert_eq!(cpus_after(&[0], 1), None);
        assert_eq!(cpus_after(&[0, 1], 2), None);
        assert_eq!(cpus_after(&[], 1), None);
    }

    #[test]
    fn a_confined_thread_runs_only_on_its_cpus() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty(), "Linux reports the affinity mask");
        let last = *allowed.last().expect("one CPU");
        let seen = std::thread::spawn(move || {
            confine_to_cpus(&[last]);
            // A thread it starts inherits the mask.
            std::thread::spawn(allowed_cpus).join().expect("inner thread")
        })
        .join()
        .expect("confined thread");
        assert_eq!(seen, vec![last]);
        assert_eq!(allowed_cpus(), allowed, "other threads keep theirs");
    }

    #[test]
    fn stop_sets_the_flag_and_waits() {
        let done = Arc::new(AtomicBool::new(false));
        let thread = {
            let done = done.clone();
            StoppableThread::spawn("test-loop", move |stop| {
                while !stop.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
                done.store(true, Ordering::Release);
            })
            .unwrap()
        };
        thread.stop();
        assert!(done.load(Ordering::Acquire));
    }
}
