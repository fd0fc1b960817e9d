#!/bin/sh
# Build the apfvm reference guest: build.sh OUTDIR -> OUTDIR/apfvm-ref-guest.elf
# The VMM's build.rs runs the same commands; keep the two in sync (README.md).
set -eu

out=${1:?usage: build.sh OUTDIR}
src=$(cd "$(dirname "$0")" && pwd)
CC=${CC:-gcc}
CFLAGS="-O2 -g -std=gnu11 -ffreestanding -nostdlib -fno-pic -fno-pie -fno-stack-protector \
-fno-asynchronous-unwind-tables -mgeneral-regs-only -mno-red-zone -mcmodel=small -fno-builtin \
-Wall -Wextra -Werror"
ASFLAGS="-g -fno-pic -fno-pie"

mkdir -p "$out"
objs=""
for f in "$src"/*.c; do
	o="$out/$(basename "$f" .c).o"
	$CC -c $CFLAGS -o "$o" "$f"
	objs="$objs $o"
done
for f in "$src"/*.S; do
	o="$out/$(basename "$f" .S).o"
	$CC -c $ASFLAGS -o "$o" "$f"
	objs="$objs $o"
done
# shellcheck disable=SC2086 # $objs is a list of paths without spaces
$CC -nostdlib -static -no-pie -Wl,--build-id=none -Wl,-T,"$src/guest.ld" \
	-o "$out/apfvm-ref-guest.elf" $objs
