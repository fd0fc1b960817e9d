//! What the pager's threads coordinate on, under one lock: the due-time queue, whether the
//! pager is paused, draining or stopping, and how many copies and evictions are in
//! progress. One lock because the decisions that matter are joint: a worker takes a fetch
//! and counts its copy in one step, so `pause` can never miss a copy about to start, and a
//! change of state is never missed by a thread about to wait.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::workers::FetchQueue;

pub(super) struct Control {
    pub queue: FetchQueue,
    /// No copy for an asynchronous fault and no eviction (see `Pager::pause`).
    pub paused: bool,
    /// Everything queued or new is served at once (see `Pager::release_all`).
    pub draining: bool,
    /// The pager's threads end.
    pub stopping: bool,
    /// Copies and evictions in progress: one per live `Busy`.
    busy: usize,
}

impl Control {
    /// Whether a copy for an asynchronous fault may start now.
    pub fn may_copy_async(&self) -> bool {
        self.draining || !self.paused
    }
}

pub(super) struct Lifecycle {
    control: Mutex<Control>,
    /// Workers wait here for a fetch to fall due or for a change of state.
    pub work: Condvar,
    /// `pause` and `wait_drained` wait here for work in progress to finish.
    idle: Condvar,
    /// The evictor waits here for its next period or a stop.
    evictor: Condvar,
    /// Wakes the reader, which waits in poll on the userfaultfd rather than on a lock.
    pub reader_wake: EventFd,
}

/// A copy or an eviction in progress: `pause` waits until none is left.
pub(super) struct Busy<'a>(&'a Lifecycle);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        let mut control = self.0.lock();
        control.busy -= 1;
        if control.busy == 0 {
            self.0.idle.notify_all();
        }
    }
}

impl Lifecycle {
    pub fn new() -> std::io::Result<Lifecycle> {
        Ok(Lifecycle {
            control: Mutex::new(Control {
                queue: FetchQueue::default(),
                paused: false,
                draining: false,
                stopping: false,
                busy: 0,
            }),
            work: Condvar::new(),
            idle: Condvar::new(),
            evictor: Condvar::new(),
            reader_wake: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes the state under the lock, then wakes every thread that waits on it.
    fn change(&self, change: impl FnOnce(&mut Control)) {
        change(&mut self.lock());
        self.work.notify_all();
        self.idle.notify_all();
        self.evictor.notify_all();
        let _ = self.reader_wake.write(1);
    }

    /// Refuses new asynchronous copies and evictions, then waits for those in progress.
    pub fn pause(&self) {
        self.change(|c| c.paused = true);
        let control = self.lock();
        let _idle = self
            .idle
            .wait_while(control, |c| c.busy > 0)
            .unwrap_or_else(|e| e.into_inner());
    }

    pub fn resume(&self) {
        self.change(|c| c.paused = false);
    }

    pub fn release_all(&self) {
        self.change(|c| c.draining = true);
    }

    pub fn stop(&self) {
        self.change(|c| c.stopping = true);
    }

    /// Waits until nothing is queued and nothing in progress, for at most `timeout`.
    pub fn wait_drained(&self, timeout: Duration) {
        let control = self.lock();
        let _drained = self
            .idle
            .wait_timeout_while(control, timeout, |c| !c.queue.is_empty() || c.busy > 0)
            .unwrap_or_else(|e| e.into_inner());
    }

    fn begin(&self, allowed: impl FnOnce(&Control) -> bool) -> Option<Busy<'_>> {
        let mut control = self.lock();
        allowed(&control).then(|| self.begin_locked(&mut control))
    }

    /// A copy for a fault that stalls a vCPU thread: runs even while paused. The VM pauses
    /// its vCPUs before the pager, so none should come; one that does must not hang.
    pub fn begin_sync_copy(&self) -> Busy<'_> {
        let mut control = self.lock();
        self.begin_locked(&mut control)
    }

    /// A copy for an asynchronous fault, unless paused (a drain overrides the pause).
    pub fn try_begin_async_copy(&self) -> Option<Busy<'_>> {
        self.begin(Control::may_copy_async)
    }

    /// An eviction, unless paused.
    pub fn try_begin_eviction(&self) -> Option<Busy<'_>> {
        self.begin(|c| !c.paused)
    }

    /// Counts work decided on under the lock the caller holds (a worker taking a fetch).
    pub fn begin_locked(&self, control: &mut Control) -> Busy<'_> {
        control.busy += 1;
        Busy(self)
    }

    /// Waits `period` or until the pager stops; false once it stops.
    pub fn sleep(&self, period: Duration) -> bool {
        let control = self.lock();
        let (control, _) = self
            .evictor
            .wait_timeout_while(control, period, |c| !c.stopping)
            .unwrap_or_else(|e| e.into_inner());
        !control.stopping
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::mpsc::channel;
    use std::time::Instant;

    #[test]
    fn pause_refuses_async_copies_and_evictions_but_not_sync_copies() {
        let l = Lifecycle::new().unwrap();
        l.pause();
        assert!(l.try_begin_async_copy().is_none());
        assert!(l.try_begin_eviction().is_none());
        drop(l.begin_sync_copy());
        l.resume();
        assert!(l.try_begin_async_copy().is_some());
        assert!(l.try_begin_eviction().is_some());
    }

    #[test]
    fn a_drain_overrides_the_pause_for_copies_only() {
        let l = Lifecycle::new().unwrap();
        l.pause();
        l.release_all();
        assert!(l.try_begin_async_copy().is_some());
        assert!(l.try_begin_eviction().is_none());
    }

    #[test]
    fn pause_returns_once_work_in_progress_is_done() {
        let l = Arc::new(Lifecycle::new().unwrap());
        let copy = l.try_begin_async_copy().unwrap();
        let (paused, returned) = channel();
        let pauser = {
            let l = l.clone();
            std::thread::spawn(move || {
                l.pause();
                paused.send(()).unwrap();
            })
        };
        // Asserting an absence: a bounded wait is all there is.
        assert!(returned.recv_timeout(Duration::from_millis(100)).is_err());
        // Paused already, though not returned: nothing new starts meanwhile.
        assert!(l.try_begin_eviction().is_none());
        drop(copy);
        returned.recv_timeout(Duration::from_secs(5)).unwrap();
        pauser.join().unwrap();
    }

    #[test]
    fn sleep_ends_at_stop() {
        let l = Arc::new(Lifecycle::new().unwrap());
        assert!(
            l.sleep(Duration::from_millis(1)),
            "period over, not stopping"
        );
        let sleeper = {
            let l = l.clone();
            std::thread::spawn(move || l.sleep(Duration::from_secs(3600)))
        };
        let t0 = Instant::now();
        l.stop();
        assert!(!sleeper.join().unwrap());
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(!l.sleep(Duration::from_secs(3600)), "stopped already");
    }

    #[test]
    fn wait_drained_waits_for_work_in_progress() {
        let l = Arc::new(Lifecycle::new().unwrap());
        let copy = l.begin_sync_copy();
        let (drained, returned) = channel();
        let waiter = {
            let l = l.clone();
            std::thread::spawn(move || {
                l.wait_drained(Duration::from_secs(60));
                drained.send(()).unwrap();
            })
        };
        assert!(returned.recv_timeout(Duration::from_millis(100)).is_err());
        drop(copy);
        returned.recv_timeout(Duration::from_secs(5)).unwrap();
        waiter.join().unwrap();
    }
}
