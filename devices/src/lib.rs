//! Device models of apfvm's guests, all on the x86 I/O port space.
//!
//! Each device implements `vm_device::MutDevicePio`, so the VMM registers it on a
//! `vm_device::device_manager::IoManager` and dispatches vCPU port exits there. Devices that
//! end the VM (the i8042 reset line, the debug-exit port) report through [`GuestStopHandler`]
//! so that they know nothing of how the VMM shuts down.

pub mod debug_exit;
pub mod i8042;
pub mod pager_control;
pub mod serial;
pub mod snapshot_request;

pub use debug_exit::DebugExit;
pub use i8042::I8042;
pub use pager_control::{EvictionRequests, PagerControl};
pub use serial::{IrqTrigger, SerialConsole};
pub use snapshot_request::{SnapshotRequest, SnapshotRequestHandler};

/// Why a guest asked to stop the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStop {
    /// Reset through the keyboard controller (Linux `reboot=k`, also how it powers off here).
    Reset,
    /// A test guest's chosen exit code, written to the debug-exit port.
    ExitCode(u8),
}

/// Receives the stop requests of devices; implemented by the VMM.
pub trait GuestStopHandler: Send + Sync {
    fn guest_stop(&self, why: GuestStop);
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::{GuestStop, GuestStopHandler};
    use std::sync::Mutex;

    /// Records the stop requests a device makes.
    #[derive(Default)]
    pub struct Recorder(pub Mutex<Vec<GuestStop>>);

    impl GuestStopHandler for Recorder {
        fn guest_stop(&self, why: GuestStop) {
            self.0.lock().unwrap().push(why);
        }
    }
}
