//! Driving apfvm and its guests as a program does: what `apfvm bench` (in apfvm's binary) and
//! the integration tests share, kept in one place.
//!
//! - `child`: running a child process (apfvm) with a time limit, collecting its output;
//! - `apfvm`: reading the lines apfvm itself writes to stderr (the pager's summary);
//! - `reference_guest`: the reference guest's result line, its MSR-script command line;
//! - `linux_guest`: where the Linux guest's build is, its command line, its result lines.
//!
//! Not a dependency of the apfvm library, nor dependent on it (apfvm's binary depends on this
//! crate): the strings apfvm prints are repeated here, and apfvm's binary has a unit test
//! that they match.

pub mod apfvm;
pub mod child;
pub mod linux_guest;
pub mod reference_guest;
