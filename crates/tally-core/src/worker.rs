//! A named background thread that runs one loop until asked to stop: the shape of the process
//! stages and of Kafka inbound, which each own a thread. The loop polls the flag it is given;
//! [`StoppableThread::stop`] sets it and waits, and dropping the handle only sets it (a stage
//! finishes the batch in hand on its own).

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

#[cfg(test)]
mod tests {
    use super::*;

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
