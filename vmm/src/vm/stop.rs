//! Why a VM stops: the first stop request wins (a guest exit, a vCPU fault, a failed apfvm
//! thread, a signal to apfvm); it wakes whoever waits for the VM (the main thread's event
//! loop), which then stops the VM.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use devices::{GuestStop, GuestStopHandler};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use crate::vcpu::VcpuFault;

#[derive(Debug, Clone)]
pub enum StopReason {
    /// The guest ended the VM itself.
    Guest(GuestStop),
    /// A vCPU hit something the VM cannot continue from.
    Fault(VcpuFault),
    /// apfvm received SIGINT/SIGTERM/SIGHUP.
    Signal(i32),
    /// A VMM thread failed.
    Vmm(String),
    /// The VM's owner stopped it (e.g. a library user done with it).
    Owner,
}

pub struct StopRequests {
    requested: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    /// Readable once a stop is requested; the event loop listens on it.
    pub event: EventFd,
}

impl StopRequests {
    pub fn new() -> std::io::Result<StopRequests> {
        Ok(StopRequests {
            requested: AtomicBool::new(false),
            reason: Mutex::new(None),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    pub fn request(&self, reason: StopReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            log::debug!("stop requested: {reason:?}");
            *slot = Some(reason);
        }
        self.requested.store(true, Ordering::SeqCst);
        // A full eventfd counter still wakes the loop; nothing to do on error.
        let _ = self.event.write(1);
    }

    /// What a failed apfvm thread reports to: the VM stops with its message.
    pub fn failure_report(self: &std::sync::Arc<Self>) -> crate::thread::FailureReport {
        let stop = self.clone();
        std::sync::Arc::new(move |message| stop.request(StopReason::Vmm(message)))
    }

    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    pub fn reason(&self) -> Option<StopReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl GuestStopHandler for StopRequests {
    fn guest_stop(&self, why: GuestStop) {
        self.request(StopReason::Guest(why));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_event_fires() {
        let s = StopRequests::new().unwrap();
        assert!(!s.is_requested());
        assert!(s.event.read().is_err(), "nothing pending yet");
        s.guest_stop(GuestStop::ExitCode(3));
        s.request(StopReason::Signal(15));
        assert!(s.is_requested());
        assert!(matches!(
            s.reason(),
            Some(StopReason::Guest(GuestStop::ExitCode(3)))
        ));
        assert_eq!(s.event.read().unwrap(), 2);
    }
}
