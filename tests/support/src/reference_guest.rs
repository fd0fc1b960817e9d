//! The project's reference guest (resources/guest, README there) as programs drive it: its
//! result line, and the command line of `hostile=msr-script`, the mode in which the guest
//! writes the async PF MSRs with values a fuzzer chose.

use serde_json::Value;

const RESULT: &str = "APFVM-RESULT ";

/// The guest's `APFVM-RESULT {json}` line in its serial output, parsed.
pub fn result(stdout: &str) -> Option<Value> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(RESULT))
        .and_then(|json| serde_json::from_str(json.trim()).ok())
}

/// Bytes per write of an MSR script: which MSR (the kind byte, modulo 3: INT, EN, ACK), then
/// the value, big-endian.
pub const MSR_WRITE_BYTES: usize = 9;
/// The most writes one script holds (the guest's MAX_MSR_OPS).
pub const MAX_MSR_WRITES: usize = 128;

/// apfvm's flags for an MSR script: 2 vCPUs whose RAM apfvm pages with random fetch times
/// (completions out of order), so that faults are pending at every write.
pub const MSR_SCRIPT_FLAGS: [&str; 8] = [
    "--vcpus",
    "2",
    "--mem",
    "64M",
    "--pager",
    "uffd",
    "--fault-latency",
    "200us-2ms",
];

/// The guest command line that runs `script` (MSR_WRITE_BYTES per write; a partial last
/// write and writes past MAX_MSR_WRITES are left out) during a paging workload: two passes
/// over 64 pages with the region evicted between them, busy tasks beside the touchers, a 20 s
/// watchdog. None if the script holds no whole write.
pub fn msr_script_cmdline(script: &[u8]) -> Option<String> {
    let writes: String = script
        .chunks_exact(MSR_WRITE_BYTES)
        .take(MAX_MSR_WRITES)
        .map(|w| {
            let value = u64::from_be_bytes(w[1..].try_into().expect("8 value bytes"));
            format!("{:02x}{value:016x}", w[0])
        })
        .collect();
    (!writes.is_empty()).then(|| {
        format!(
            "pages=64 touchers=2 busy=1 passes=2 evict=1 timeout_s=20 hostile=msr-script \
             msr_ops={writes}"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_script_is_written_as_hex_groups_of_whole_writes() {
        assert_eq!(msr_script_cmdline(&[1; 8]), None);
        let mut script = vec![0x01, 0, 0, 0, 0x0f, 0xff, 0, 0, 0x09];
        script.extend_from_slice(&[0x02, 0, 0, 0, 0, 0, 0, 0, 1, 0xaa]);
        let cmdline = msr_script_cmdline(&script).unwrap();
        assert!(
            cmdline.ends_with(" msr_ops=010000000fff000009020000000000000001"),
            "{cmdline}"
        );
        let long = msr_script_cmdline(&vec![0; MSR_WRITE_BYTES * (MAX_MSR_WRITES + 5)]).unwrap();
        let word = long.rsplit_once("msr_ops=").unwrap().1;
        assert_eq!(word.len(), 18 * MAX_MSR_WRITES);
    }

    #[test]
    fn result_line_is_found_and_parsed() {
        let out = "apfvm-ref: boot\nAPFVM-RESULT {\"verdict\":\"pass\",\"cpus\":2} \nexit 0\n";
        assert_eq!(result(out).unwrap()["cpus"], 2);
        assert_eq!(result("APFVM-RESULT {not json"), None);
    }
}
