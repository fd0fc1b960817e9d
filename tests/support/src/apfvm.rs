//! The lines apfvm writes to stderr when a VM has stopped, as programs read them.

use serde_json::Value;

/// How the pager's final summary line on stderr starts (`apfvm: pager: {json}`); the same
/// string as `vmm::vm::PAGER_SUMMARY`, which prints it (a unit test of apfvm's binary checks).
pub const PAGER_SUMMARY: &str = "apfvm: pager: ";

/// The pager's summary in what apfvm wrote to stderr, parsed.
pub fn pager_summary(stderr: &str) -> Option<Value> {
    stderr
        .lines()
        .find_map(|l| l.strip_prefix(PAGER_SUMMARY))
        .and_then(|json| serde_json::from_str(json).ok())
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
