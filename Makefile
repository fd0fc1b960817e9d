# Longer-running checks that are not part of `cargo test --workspace`.
FUZZ_TARGETS := kernel_image config devices apf_msrs

# `fuzz` is also the name of the fuzz/ directory: phony, or make calls it up to date.
.PHONY: soak fuzz fuzz-short fuzz-long test-under-load

# The whole test suite, RUNS times in a row (default 3), with every core busy and a disk
# writer running: what must pass before any submission.
RUNS ?= 3
test-under-load:
	tests/under-load.sh $(RUNS)

soak:
	cargo soak

fuzz-short:
	$(MAKE) fuzz SECONDS=60

fuzz-long:
	$(MAKE) fuzz SECONDS=3600

fuzz:
	# New inputs go to fuzz/work/<target> (ignored by git); corpus/<target> is read only.
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p work/$$t && \
		RUSTC_BOOTSTRAP=1 cargo fuzz run $$t work/$$t corpus/$$t -- -max_total_time=$(SECONDS) -timeout=60 -close_fd_mask=1 \
			|| exit 1; \
	done
