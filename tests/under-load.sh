#!/usr/bin/env bash
# Runs the test command from README.md RUNS times in a row (default 3) while every core is
# kept busy and one more process writes and syncs a file in a loop: the suite must pass on
# a loaded machine, as CI's and the developers' shared machines are. Stops at the first
# failing run; the load ends with the script whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-3}

load=()
io_file=$(mktemp "${TMPDIR:-/tmp}/apfvm-io-load.XXXXXX")
stop_load() {
	for pid in "${load[@]}"; do kill "$pid" 2>/dev/null || true; done
	wait 2>/dev/null || true
	rm -f "$io_file"
}
trap stop_load EXIT

# Build first, so that the load falls on the tests, not on the compiler.
cargo test --workspace --no-run

for _ in $(seq "$(nproc)"); do
	(while :; do :; done) &
	load+=($!)
done
(while :; do dd if=/dev/zero of="$io_file" bs=1M count=256 conv=fsync status=none; done) &
load+=($!)
echo "test-under-load: $(nproc) busy loops and a writer running"

for run in $(seq "$runs"); do
	echo "test-under-load: run $run of $runs"
	start=$SECONDS
	cargo test --workspace
	echo "test-under-load: run $run of $runs passed in $((SECONDS - start)) s"
done
echo "test-under-load: $runs of $runs runs passed under load"
