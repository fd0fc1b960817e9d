//! The lines apfvm writes to stderr when a VM has stopped, as programs read them.

use serde_json::Value;

/// How the pager's final summary line on stderr starts (`apfvm: pager: {json}`); the same
/// string as `vmm::vm::PAGER_SUMMARY`, which prints it (a unit test of apfvm's binary checks).
pub const PAGER_SUMMARY: &str = "apfvm: pager: ";

/// How the line about a snapshot taken (on the guest's or the control API's request) starts
/// (`apfvm: snapshot: {json}`); the same string as `vmm::vm::SNAPSHOT_DONE`.
pub const SNAPSHOT_DONE: &str = "apfvm: snapshot: ";

/// How the line about a restored VM starts (`apfvm: restored: {json}`); the same string as
/// `vmm::vm::RESTORED`.
pub const RESTORED: &str = "apfvm: restored: ";

/// What apfvm said about the VM it restored (id, millis from the call to running vCPUs).
pub fn restored(stderr: &str) -> Option<Value> {
    json_lines(stderr, RESTORED).into_iter().next()
}

/// The JSON of every stderr line that starts with `prefix`, in order.
fn json_lines(stderr: &str, prefix: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|json| serde_json::from_str(json).ok())
        .collect()
}

/// The pager's summary in what apfvm wrote to stderr, parsed.
pub fn pager_summary(stderr: &str) -> Option<Value> {
    json_lines(stderr, PAGER_SUMMARY).into_iter().next()
}

/// Every snapshot apfvm took, on the guest's or the control API's request (id, dir,
/// memory_file, mem_size, data_pages, millis), in order.
pub fn snapshots_taken(stderr: &str) -> Vec<Value> {
    json_lines(stderr, SNAPSHOT_DONE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pager_summary_is_found_among_the_log_lines_and_parsed() {
        let err = "[warn] something\napfvm: pager: {\"faults\":3}\napfvm: kvm trace: {}\n";
        assert_eq!(pager_summary(err).unwrap()["faults"], 3);
        assert_eq!(pager_summary("apfvm: pager: {broken"), None);
        assert_eq!(pager_summary("no summary"), None);
    }
}
