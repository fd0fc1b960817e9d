#!/usr/bin/env bash
# fetch.sh CACHE_DIR
#
# Obtain Debian bookworm's real cloud kernel (linux-image-6.1*-cloud-amd64)
# for apfvm's boot test, and extract the uncompressed ELF vmlinux from its
# bzImage so the test does not have to run the bzImage's decompressor.
#
# Produces:
#   CACHE_DIR/vmlinuz   the bzImage exactly as Debian ships it (/boot/vmlinuz-*)
#   CACHE_DIR/vmlinux   the ELF64 x86-64 kernel decompressed from it
#   CACHE_DIR/version   the kernel release, e.g. 6.1.0-48-cloud-amd64
#   CACHE_DIR/package   the .deb it came from: "NAME VERSION"
#
# Idempotent: when vmlinuz, vmlinux and version all exist it only prints the
# paths (one per line on stdout: vmlinuz, vmlinux, version) and exits 0.
# Progress goes to stderr. Every failure exits non-zero naming its step.
#
# Needs: apt-get/apt-cache/dpkg-deb (Debian), python3, and a decompressor for
# the payload's format (installed with apt-get when missing, which needs root).
# Override the package with DEBIAN_KERNEL_PACKAGE=linux-image-... if wanted.

set -euo pipefail

log() { printf 'debian-kernel: %s\n' "$*" >&2; }
STEP="start"
REPORTED=0
die() { printf 'debian-kernel: FAILED at step "%s": %s\n' "$STEP" "$*" >&2; REPORTED=1; exit 1; }
WORK=
on_exit() {
    local rc=$?
    [ -n "$WORK" ] && rm -rf "$WORK"
    if [ $rc -ne 0 ] && [ "$REPORTED" -eq 0 ]; then
        printf 'debian-kernel: FAILED at step "%s" (exit %d)\n' "$STEP" "$rc" >&2
    fi
}
trap on_exit EXIT

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: $0 CACHE_DIR" >&2
    REPORTED=1
    exit 2
fi

STEP="prepare cache dir"
mkdir -p "$1" || die "cannot create $1"
CACHE=$(cd "$1" && pwd)

print_paths() {
    echo "$CACHE/vmlinuz"
    echo "$CACHE/vmlinux"
    echo "$CACHE/version"
}

already_done() {
    if [ -s "$CACHE/vmlinuz" ] && [ -s "$CACHE/vmlinux" ] && [ -s "$CACHE/version" ]; then
        log "already fetched: $(cat "$CACHE/version") in $CACHE"
        print_paths
        exit 0
    fi
}
already_done

# Tests may run in parallel: one fetch at a time per cache dir; whoever waited
# finds the work done.
STEP="lock $CACHE/.lock"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE/.lock"
    flock -w 1200 9 || die "timed out waiting for another fetch.sh on $CACHE"
    already_done
fi

STEP="check tools"
for t in apt-cache apt-get dpkg-deb python3; do
    command -v "$t" >/dev/null 2>&1 || die "'$t' not found (this script needs a Debian system with python3)"
done

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"
    elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
    else die "need root to run: $*"
    fi
}

APT_UPDATED=0
apt_update() {
    [ "$APT_UPDATED" -eq 1 ] && return 0
    log "running apt-get update"
    as_root timeout 600 apt-get update -qq >&2 || die "apt-get update failed"
    APT_UPDATED=1
}

# Prints the newest package among linux-image-6.1.X-NN-cloud-amd64 (not the
# 6.12 backport kernels bookworm also carries) that apt can
# actually install (has a candidate). Signed packages are preferred; the
# -unsigned variant only when no signed one exists; -dbg never.
find_package() {
    local names signed unsigned n cand
    names=$(apt-cache pkgnames linux-image-6.1 2>/dev/null \
        | grep -E '^linux-image-6\.1\.[0-9]+-[0-9]+-cloud-amd64(-unsigned)?$' || true)
    signed=$(printf '%s\n' "$names" | grep -v -- '-unsigned$' | grep . | sort -rV || true)
    unsigned=$(printf '%s\n' "$names" | grep -- '-unsigned$' | sort -rV || true)
    for n in $signed $unsigned; do
        cand=$(apt-cache policy "$n" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
        if [ -n "$cand" ] && [ "$cand" != "(none)" ]; then
            echo "$n"
            return 0
        fi
    done
    return 1
}

STEP="find package"
if [ -n "${DEBIAN_KERNEL_PACKAGE:-}" ]; then
    PKG=$DEBIAN_KERNEL_PACKAGE
else
    if ! PKG=$(find_package); then
        log "no linux-image-6.1*-cloud-amd64 in the package lists"
        apt_update
        PKG=$(find_package) || die "no linux-image-6.1*-cloud-amd64 package available from apt (is bookworm in sources.list?)"
    fi
fi
PKG_VERSION=$(apt-cache policy "$PKG" 2>/dev/null | awk '/Candidate:/ {print $2; exit}')
log "package: $PKG $PKG_VERSION"

STEP="make temp dir"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/debian-kernel.XXXXXX")
# apt-get download drops privileges to _apt; let it write here.
chmod 0777 "$WORK"

STEP="download $PKG"
dl() { (cd "$WORK" && timeout 900 apt-get download -q "$PKG" >&2); }
if ! dl; then
    log "download failed, package lists may be stale; updating and retrying"
    apt_update
    dl || die "apt-get download $PKG failed"
fi
DEB=$(ls "$WORK"/*.deb 2>/dev/null | head -n1)
[ -n "$DEB" ] || die "apt-get download produced no .deb"
log "downloaded $(basename "$DEB") ($(stat -c %s "$DEB") bytes)"

STEP="extract $PKG"
mkdir "$WORK/root"
dpkg-deb -x "$DEB" "$WORK/root" || die "dpkg-deb -x failed"
VMLINUZ=$(ls "$WORK"/root/boot/vmlinuz-* 2>/dev/null | head -n1)
[ -n "$VMLINUZ" ] || die "no /boot/vmlinuz-* in $PKG"
RELEASE=${VMLINUZ##*/vmlinuz-}
log "kernel release: $RELEASE, vmlinuz $(stat -c %s "$VMLINUZ") bytes"

STEP="parse bzImage header"
# Writes the compressed payload to $WORK/payload and prints
# "FORMAT PAYLOAD_LEN UNCOMPRESSED_SIZE".
read -r FORMAT PAYLOAD_LEN USIZE < <(python3 - "$VMLINUZ" "$WORK/payload" <<'PY'
import struct, sys
src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
def fail(msg):
    sys.stderr.write("debian-kernel: " + msg + "\n")
    sys.exit(1)
if len(data) < 0x250:
    fail("file too small to be a bzImage")
if data[0x202:0x206] != b"HdrS":
    fail("no 'HdrS' boot protocol signature at 0x202: not a bzImage")
proto = struct.unpack_from("<H", data, 0x206)[0]
if proto < 0x208:
    fail("boot protocol %#x < 2.08 has no payload_offset field" % proto)
setup_sects = data[0x1f1] or 4
pm_start = (setup_sects + 1) * 512
payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
start = pm_start + payload_offset
end = start + payload_length
if payload_length == 0 or end > len(data):
    fail("payload [%#x, %#x) outside the file (size %#x)" % (start, end, len(data)))
payload = data[start:end]
magics = [
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x5d\x00", "lzma"),
    (b"BZh", "bzip2"),
    (b"\x89LZO", "lzo"),
]
fmt = next((name for magic, name in magics if payload.startswith(magic)), None)
if fmt is None:
    fail("unknown payload compression, magic %s" % payload[:8].hex())
# The kernel build appends the uncompressed size as a little-endian u32
# (size_append) to every format except zstd, whose frame already has it; it
# is also the last 4 bytes of the payload for zstd in practice. Used only as
# a cross-check.
usize = struct.unpack_from("<I", payload, len(payload) - 4)[0]
open(dst, "wb").write(payload)
sys.stderr.write("debian-kernel: boot protocol %d.%02d, setup_sects %d, payload at %#x, %d bytes, %s\n"
                 % (proto >> 8, proto & 0xff, setup_sects, start, payload_length, fmt))
print(fmt, payload_length, usize)
PY
) || die "could not parse $VMLINUZ"
[ -n "${FORMAT:-}" ] || die "could not parse $VMLINUZ"

STEP="install $FORMAT decompressor"
case $FORMAT in
    gzip)  TOOL=gzip;  APTPKG=gzip;      DECOMP=(gzip -dc) ;;
    xz)    TOOL=xz;    APTPKG=xz-utils;  DECOMP=(xz -dc --single-stream) ;;
    lzma)  TOOL=xz;    APTPKG=xz-utils;  DECOMP=(xz -dc --format=lzma) ;;
    lz4)   TOOL=lz4;   APTPKG=lz4;       DECOMP=(lz4 -dc) ;;
    zstd)  TOOL=zstd;  APTPKG=zstd;      DECOMP=(zstd -dc) ;;
    bzip2) TOOL=bzip2; APTPKG=bzip2;     DECOMP=(bzip2 -dc) ;;
    lzo)   TOOL=lzop;  APTPKG=lzop;      DECOMP=(lzop -dc) ;;
esac
if ! command -v "$TOOL" >/dev/null 2>&1; then
    log "installing $APTPKG for $TOOL"
    if ! as_root timeout 600 env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$APTPKG" >&2; then
        apt_update
        as_root timeout 600 env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$APTPKG" >&2 \
            || die "apt-get install $APTPKG failed"
    fi
fi

STEP="decompress $FORMAT payload"
# The payload carries trailing bytes (the appended size) that some tools
# complain about; their exit status is ignored and the output is judged by
# the ELF check below instead.
set +e
timeout 300 "${DECOMP[@]}" < "$WORK/payload" > "$WORK/vmlinux" 2> "$WORK/decomp.err"
DRC=$?
set -e
if [ "$DRC" -ne 0 ]; then
    msg=$(head -c 300 "$WORK/decomp.err" | tr '\r\n' '  ')
    log "$TOOL exited $DRC, expected: the kernel appends its 4-byte size after the stream (${msg:-no message}); the ELF check decides"
fi
[ "$DRC" -ne 124 ] || die "$TOOL timed out"

STEP="verify vmlinux"
python3 - "$WORK/vmlinux" "$USIZE" <<'PY' || die "decompressed payload is not an ELF64 x86-64 kernel (see above)"
import os, struct, sys
path, usize = sys.argv[1], int(sys.argv[2])
size = os.path.getsize(path)
with open(path, "rb") as f:
    h = f.read(64)
def fail(msg):
    sys.stderr.write("debian-kernel: " + msg + "\n")
    sys.exit(1)
if len(h) < 64 or h[:4] != b"\x7fELF":
    fail("output (%d bytes) does not start with \\x7fELF: %s" % (size, h[:8].hex()))
if h[4] != 2:
    fail("not ELFCLASS64 (EI_CLASS=%d)" % h[4])
if h[5] != 1:
    fail("not little-endian (EI_DATA=%d)" % h[5])
e_type, e_machine = struct.unpack_from("<HH", h, 16)
if e_machine != 0x3e:
    fail("e_machine %#x is not EM_X86_64" % e_machine)
if e_type != 2:
    fail("e_type %d is not ET_EXEC" % e_type)
if usize != size:
    sys.stderr.write("debian-kernel: note: appended size field says %d, got %d bytes\n" % (usize, size))
PY

STEP="install into $CACHE"
# Write version last: its presence marks a complete cache.
rm -f "$CACHE/version"
cp "$VMLINUZ" "$CACHE/vmlinuz.tmp" && mv -f "$CACHE/vmlinuz.tmp" "$CACHE/vmlinuz"
mv -f "$WORK/vmlinux" "$CACHE/vmlinux.tmp" && mv -f "$CACHE/vmlinux.tmp" "$CACHE/vmlinux"
echo "$PKG $PKG_VERSION" > "$CACHE/package"
echo "$RELEASE" > "$CACHE/version.tmp" && mv -f "$CACHE/version.tmp" "$CACHE/version"

log "done: $PKG $PKG_VERSION, release $RELEASE, $FORMAT payload $PAYLOAD_LEN bytes"
log "  vmlinuz $(stat -c %s "$CACHE/vmlinuz") bytes, vmlinux $(stat -c %s "$CACHE/vmlinux") bytes"
STEP="done"
print_paths
