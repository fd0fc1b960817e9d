#!/usr/bin/env bash
# Builds apfvm's Linux guest from Debian's linux-source-6.1 package:
#   OUT_DIR/vmlinux            ELF kernel with the PVH note (what apfvm should boot)
#   OUT_DIR/bzImage            the same kernel as a bzImage
#   OUT_DIR/System.map         symbols, to map a RIP from an emulation failure
#   OUT_DIR/initramfs.cpio     busybox + /init + apfvm-workload, uncompressed (boots fastest,
#                              see README.md)
#   OUT_DIR/initramfs.cpio.gz  the same, gzip-compressed
#
# Usage: resources/linux/build.sh [OUT_DIR]      (default: <repo>/.cache/linux)
# Environment:
#   APFVM_INITRAMFS_EXTRA=DIR  copy DIR's tree into the initramfs root too (e.g. DIR/bin/prog)
#   APFVM_KERNEL_JOBS=N        make -jN (default: number of CPUs)
#
# Cached: the inputs (source package version, guest-kernel-patches/*.patch, apfvm.config,
# init, busybox, apfvm-workload, the extra dir, this script) are hashed into stamps; with nothing changed
# it only prints the output paths. A change rebuilds incrementally: a changed patch series
# is reversed and re-applied in place, a changed fragment regenerates .config, and make
# recompiles what depends on the difference. Missing tools are installed with apt-get
# (root needed then). Safe to run concurrently: builds are serialized with flock.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=${1:-$REPO/.cache/linux}
# Absolute: the build steps cd into the source tree.
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PATCH_DIR=$REPO/guest-kernel-patches
FRAGMENT=$HERE/apfvm.config
INIT=$HERE/init
TARBALL=/usr/src/linux-source-6.1.tar.xz
EXTRA=${APFVM_INITRAMFS_EXTRA:-}
JOBS=${APFVM_KERNEL_JOBS:-$(nproc)}
BUSYBOX=/bin/busybox

log() { echo "linux/build.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------------
# Dependencies
# ---------------------------------------------------------------------------------------------
PACKAGES=(linux-source-6.1 build-essential flex bison bc libelf-dev cpio busybox-static
          xz-utils gzip)

missing_packages() {
	local p
	for p in "${PACKAGES[@]}"; do
		dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" ||
			echo "$p"
	done
}

install_packages() {
	local missing
	missing=$(missing_packages)
	[ -z "$missing" ] && return 0
	# shellcheck disable=SC2086
	log "installing:" $missing
	local sudo=
	if [ "$(id -u)" != 0 ]; then
		command -v sudo >/dev/null || die "packages missing ($missing) and not root; install them"
		sudo="sudo -n"
	fi
	export DEBIAN_FRONTEND=noninteractive
	# shellcheck disable=SC2086
	if ! $sudo apt-get install -y --no-install-recommends $missing >&2; then
		log "apt-get install failed; running apt-get update and retrying"
		$sudo apt-get update >&2
		# shellcheck disable=SC2086
		$sudo apt-get install -y --no-install-recommends $missing >&2
	fi
	missing=$(missing_packages)
	[ -z "$missing" ] || die "still missing after apt-get: $missing"
}

# ---------------------------------------------------------------------------------------------
# Hashing of inputs
# ---------------------------------------------------------------------------------------------
hash_stdin() { sha256sum | cut -d' ' -f1; }

patch_series() { # the series, in order
	find "$PATCH_DIR" -maxdepth 1 -name '*.patch' -type f 2>/dev/null | LC_ALL=C sort
}

source_hash() { # what the patched source tree depends on
	{
		dpkg-query -W -f='${Version}\n' linux-source-6.1
		stat -c '%s %Y' "$TARBALL"
		local p
		while read -r p; do
			[ -n "$p" ] || continue
			echo "== $(basename "$p")"
			cat "$p"
		done < <(patch_series)
	} | hash_stdin
}

kernel_hash() { # what vmlinux depends on
	{
		source_hash
		cat "$FRAGMENT"
		sed -n '/^# >>> kernel build/,/^# <<< kernel build/p' "${BASH_SOURCE[0]}"
	} | hash_stdin
}

# apfvm-workload (resources/linux/workload), linked statically for the initramfs. Its own
# target dir: a static build must not invalidate the workspace's normal one.
WORKLOAD_TARGET=$REPO/target/workload-static
WORKLOAD=$WORKLOAD_TARGET/release/apfvm-workload
build_workload() {
	command -v cargo > /dev/null || die "cargo not found: apfvm-workload is built with it"
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --quiet --release \
		--manifest-path "$REPO/Cargo.toml" -p apfvm-workload --target-dir "$WORKLOAD_TARGET" >&2 ||
		die "building apfvm-workload failed"
}

initramfs_hash() { # what the initramfs depends on
	{
		sha256sum "$BUSYBOX" "$WORKLOAD" | cut -d' ' -f1
		cat "$INIT"
		sed -n '/^# >>> initramfs build/,/^# <<< initramfs build/p' "${BASH_SOURCE[0]}"
		if [ -n "$EXTRA" ]; then
			(cd "$EXTRA" && find . -printf '%p %y %m %l\n' | LC_ALL=C sort &&
				find . -type f -print0 | LC_ALL=C sort -z | xargs -0r sha256sum)
		fi
	} | hash_stdin
}

# ---------------------------------------------------------------------------------------------
# Source tree: unpack once, keep the applied series next to it so that a changed series is
# reverted from the first changed patch on and re-applied in place (make then rebuilds only
# what those patches touch).
# ---------------------------------------------------------------------------------------------
BUILD=$OUT/build
SRC=$BUILD/linux-source-6.1
APPLIED=$BUILD/applied-patches

fresh_source() {
	log "unpacking $TARBALL"
	rm -rf "$SRC" "$APPLIED"
	mkdir -p "$BUILD"
	tar -C "$BUILD" -xf "$TARBALL"
	[ -d "$SRC" ] || die "$TARBALL did not unpack to $(basename "$SRC")"
	mkdir -p "$APPLIED"
}

applied_series() { # what is applied, in order
	find "$APPLIED" -maxdepth 1 -name '*.patch' -type f 2>/dev/null | LC_ALL=C sort
}

common_prefix() { # how many leading patches of the series are applied unchanged
	local -a want have
	mapfile -t want < <(patch_series)
	mapfile -t have < <(applied_series)
	local n=0
	while [ $n -lt ${#want[@]} ] && [ $n -lt ${#have[@]} ] &&
		[ "$(basename "${want[$n]}")" = "$(basename "${have[$n]}")" ] &&
		cmp -s "${want[$n]}" "${have[$n]}"; do
		n=$((n + 1))
	done
	echo $n
}

unapply_after() { # reverse the applied patches after the first $1, last first
	local keep=$1 p i=0 total
	total=$(applied_series | wc -l)
	while read -r p; do
		[ -n "$p" ] || continue
		[ $((total - i)) -gt "$keep" ] || break
		i=$((i + 1))
		log "reverting $(basename "$p")"
		patch -d "$SRC" -p1 -R -s --no-backup-if-mismatch < "$p" >&2 || return 1
		rm -f "$p"
	done < <(applied_series | LC_ALL=C sort -r)
}

apply_after() { # apply the series' patches after the first $1
	local skip=$1 p i=0
	while read -r p; do
		[ -n "$p" ] || continue
		i=$((i + 1))
		[ $i -gt "$skip" ] || continue
		log "applying $(basename "$p")"
		if ! patch -d "$SRC" -p1 -s -N --dry-run < "$p" >&2; then
			# The tree holds the series up to the previous patch (recorded in $APPLIED), so
			# the next run can still revert it; nothing of this patch was applied.
			die "$(basename "$p") does not apply to linux-source-6.1 $(dpkg-query -W -f='${Version}' linux-source-6.1)"
		fi
		if ! patch -d "$SRC" -p1 -s -N --no-backup-if-mismatch < "$p" >&2; then
			rm -f "$BUILD/tarball.stamp" # half-applied: unpack afresh next time
			die "applying $(basename "$p") failed halfway"
		fi
		cp "$p" "$APPLIED/"
	done < <(patch_series)
}

prepare_source() {
	local want have=
	want=$(source_hash)
	[ -f "$BUILD/source.stamp" ] && have=$(cat "$BUILD/source.stamp")
	[ "$want" = "$have" ] && [ -d "$SRC" ] && return 0
	rm -f "$BUILD/source.stamp"
	local base_have= base_want
	base_want=$(dpkg-query -W -f='${Version}' linux-source-6.1; stat -c '%s %Y' "$TARBALL")
	[ -f "$BUILD/tarball.stamp" ] && base_have=$(cat "$BUILD/tarball.stamp")
	local keep=0
	if [ -d "$SRC" ] && [ -d "$APPLIED" ] && [ "$base_want" = "$base_have" ] &&
		keep=$(common_prefix) && unapply_after "$keep"; then
		: # patches that changed (and those after them) reverted, build products kept
	else
		keep=0
		fresh_source
		echo "$base_want" > "$BUILD/tarball.stamp"
	fi
	apply_after "$keep"
	echo "$want" > "$BUILD/source.stamp"
}

# >>> kernel build (this block is hashed into the kernel stamp)
build_kernel() {
	local kmake=(make -C "$SRC" -j"$JOBS" KBUILD_BUILD_USER=apfvm KBUILD_BUILD_HOST=apfvm)
	log "configuring: tinyconfig + $(basename "$FRAGMENT")"
	"${kmake[@]}" -s tinyconfig >/dev/null
	# allnoconfig with tinyconfig's symbols and the fragment as KCONFIG_ALLCONFIG: what
	# `make tinyconfig` does, plus our fragment. It reports requested values that did not
	# make it into .config.
	(cd "$SRC" && KCONFIG_CONFIG=.config scripts/kconfig/merge_config.sh -n \
		.config "$FRAGMENT" > "$BUILD/merge_config.log" 2>&1) ||
		{ cat "$BUILD/merge_config.log" >&2; die "merge_config.sh failed"; }
	check_config
	log "building vmlinux and bzImage (make -j$JOBS)"
	"${kmake[@]}" vmlinux bzImage > "$BUILD/make.log" 2>&1 ||
		{ tail -40 "$BUILD/make.log" >&2; die "kernel build failed (log: $BUILD/make.log)"; }
}

check_config() { # every "=y"/"is not set"/value line of the fragment must hold in .config
	local line sym bad=0
	while IFS= read -r line; do
		case $line in
		CONFIG_*=*) sym=${line%%=*} ;;
		"# CONFIG_"*" is not set") sym=${line#"# "}; sym=${sym%% *}; line="# $sym is not set" ;;
		*) continue ;;
		esac
		if [[ $line == "# "* ]]; then
			grep -q "^$sym=" "$SRC/.config" && { log "config: $sym is set, fragment wants it off"; bad=1; }
		else
			grep -qx "$line" "$SRC/.config" ||
				{ log "config: wanted $line, got: $(grep "^$sym=\|^# $sym is not set" "$SRC/.config" || echo unset)"; bad=1; }
		fi
	done < "$FRAGMENT"
	[ $bad = 0 ] || die "the fragment does not apply cleanly (see above; $BUILD/merge_config.log)"
}
# <<< kernel build

# >>> initramfs build (this block is hashed into the initramfs stamp)
build_initramfs() {
	local gen=$BUILD/gen_init_cpio stage=$BUILD/initramfs list=$BUILD/initramfs.list
	if [ ! -x "$gen" ] || [ "$SRC/usr/gen_init_cpio.c" -nt "$gen" ]; then
		cc -O2 -o "$gen" "$SRC/usr/gen_init_cpio.c"
	fi
	rm -rf "$stage"
	mkdir -p "$stage"
	printf '%s\n' \
		'proc     /proc proc     defaults 0 0' \
		'sysfs    /sys  sysfs    defaults 0 0' \
		'devtmpfs /dev  devtmpfs defaults 0 0' > "$stage/fstab"
	{
		local d dirs=" /dev /proc /sys /tmp /root /etc /bin /sbin /usr /usr/bin /usr/sbin "
		for d in $dirs; do
			echo "dir $d 0755 0 0"
		done
		echo "nod /dev/console 0600 0 0 c 5 1"
		echo "file /init $INIT 0755 0 0"
		echo "file /etc/fstab $stage/fstab 0644 0 0"
		echo "file /bin/busybox $BUSYBOX 0755 0 0"
		# Only /bin/sh: every initramfs entry costs ~35 ms of emulated kernel time when it
		# is unpacked. busybox's ash runs all other applets by name without links
		# (FEATURE_SH_STANDALONE); programs that exec applets themselves can use
		# `busybox APPLET` or `sh -c`.
		echo "slink /bin/sh busybox 0777 0 0"
		echo "file /bin/apfvm-workload $WORKLOAD 0755 0 0"
		if [ -n "$EXTRA" ]; then
			[ -d "$EXTRA" ] || die "APFVM_INITRAMFS_EXTRA=$EXTRA is not a directory"
			local abs path type mode target
			abs=$(cd "$EXTRA" && pwd)
			while IFS=' ' read -r path type mode target; do
				path=${path#.}
				[ -n "$path" ] || continue
				case $type in
				d) [[ $dirs == *" $path "* ]] || echo "dir $path $mode 0 0" ;;
				f) echo "file $path $abs$path $mode 0 0" ;;
				l) echo "slink $path $target 0777 0 0" ;;
				*) die "APFVM_INITRAMFS_EXTRA: unsupported file type of $path" ;;
				esac
			done < <(cd "$abs" && find . -printf '%p %y %m %l\n' | LC_ALL=C sort)
		fi
	} > "$list"
	"$gen" "$list" > "$BUILD/initramfs.cpio.tmp"
	gzip -9 -n -c "$BUILD/initramfs.cpio.tmp" > "$BUILD/initramfs.cpio.gz.tmp"
}
# <<< initramfs build

install_output() { # atomic: readers never see a half-written file
	cp "$1" "$OUT/.$2.tmp"
	mv -f "$OUT/.$2.tmp" "$OUT/$2"
}

print_outputs() {
	local f
	for f in vmlinux bzImage System.map initramfs.cpio initramfs.cpio.gz; do
		echo "$OUT/$f"
	done
}

main() {
	mkdir -p "$OUT"
	exec 9> "$OUT/.lock"
	flock 9

	local start=$SECONDS built=
	[ -f "$FRAGMENT" ] || die "missing $FRAGMENT"
	[ -f "$INIT" ] || die "missing $INIT"
	install_packages

	local khash ihash
	khash=$(kernel_hash)
	if [ "$khash" != "$(cat "$OUT/kernel.stamp" 2>/dev/null)" ] ||
		[ ! -f "$OUT/vmlinux" ] || [ ! -f "$OUT/bzImage" ] || [ ! -f "$OUT/System.map" ]; then
		rm -f "$OUT/kernel.stamp"
		prepare_source
		build_kernel
		install_output "$SRC/vmlinux" vmlinux
		install_output "$SRC/arch/x86/boot/bzImage" bzImage
		install_output "$SRC/System.map" System.map
		install_output "$SRC/.config" kernel.config
		echo "$khash" > "$OUT/kernel.stamp"
		built="kernel"
	fi

	build_workload # incremental: ~0.2 s when nothing changed
	ihash=$(initramfs_hash)
	if [ "$ihash" != "$(cat "$OUT/initramfs.stamp" 2>/dev/null)" ] ||
		[ ! -f "$OUT/initramfs.cpio" ] || [ ! -f "$OUT/initramfs.cpio.gz" ]; then
		rm -f "$OUT/initramfs.stamp"
		[ -f "$SRC/usr/gen_init_cpio.c" ] || prepare_source
		build_initramfs
		mv -f "$BUILD/initramfs.cpio.tmp" "$OUT/initramfs.cpio"
		mv -f "$BUILD/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
		echo "$ihash" > "$OUT/initramfs.stamp"
		built="${built:+$built + }initramfs"
	fi

	if [ -n "$built" ]; then
		log "built $built in $((SECONDS - start)) s"
	else
		log "up to date (nothing to do, $((SECONDS - start)) s)"
	fi
	print_outputs
}

main "$@"
