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
