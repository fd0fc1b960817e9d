//! How a running VM comes to an end: the first stop request wins (a guest exit, a vCPU
//! fault, a signal to apfvm); it wakes the main thread's event loop, which then stops every
//! vCPU.

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
    /// apfvm received SIGINT/SIGTERM.
    Signal(i32),
    /// A VMM thread failed.
    Vmm(String),
}

pub struct VmStop {
    requested: AtomicBool,
    reason: Mutex<Option<StopReason>>,
    /// Readable once a stop is requested; the event loop listens on it.
    pub event: EventFd,
}

impl VmStop {
    pub fn new() -> std::io::Result<VmStop> {
        Ok(VmStop {
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

impl GuestStopHandler for VmStop {
    fn guest_stop(&self, why: GuestStop) {
        self.request(StopReason::Guest(why));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_event_fires() {
        let s = VmStop::new().unwrap();
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
