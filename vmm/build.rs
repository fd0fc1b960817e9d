//! Builds the reference guest (resources/guest: freestanding C and assembly) with gcc into an
//! ELF with a PVH note, and tells the crate where it is (`APFVM_REFERENCE_GUEST`).
//!
//! The flags keep gcc to plain integer x86-64 code: some hosts emulate guest kernel mode and
//! cannot run SSE, x87 or newer instructions there (see resources/guest/README.md).

use std::path::{Path, PathBuf};
use std::process::Command;

const C_FLAGS: &[&str] = &[
    "-O2",
    "-g",
    "-std=gnu11",
    "-ffreestanding",
    "-nostdlib",
    "-fno-pic",
    "-fno-pie",
    "-fno-stack-protector",
    "-fno-asynchronous-unwind-tables",
    "-mgeneral-regs-only",
    "-mno-red-zone",
    "-mcmodel=small",
    "-fno-builtin",
    "-Wall",
    "-Wextra",
    "-Werror",
];
const ASM_FLAGS: &[&str] = &["-g", "-fno-pic", "-fno-pie"];

fn run(cmd: &mut Command) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (the reference guest needs gcc: apt-get install gcc)")
    });
    assert!(status.success(), "{cmd:?} failed with {status}");
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    // APFVM_GUEST_SOURCES builds the VMM against another copy of the guest sources (e.g.
    // while the in-tree guest is being changed).
    println!("cargo:rerun-if-env-changed=APFVM_GUEST_SOURCES");
    let src = std::env::var_os("APFVM_GUEST_SOURCES")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../resources/guest"));
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("reference-guest");
    std::fs::create_dir_all(&out).unwrap();
    println!("cargo:rerun-if-changed={}", src.display());

    let mut sources: Vec<PathBuf> = std::fs::read_dir(&src)
        .unwrap_or_else(|e| panic!("reading {}: {e}", src.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("c" | "S")))
        .collect();
    sources.sort();
    for s in &sources {
        println!("cargo:rerun-if-changed={}", s.display());
    }
    println!("cargo:rerun-if-changed={}", src.join("guest.h").display());
    println!("cargo:rerun-if-changed={}", src.join("guest.ld").display());

    let mut objects = Vec::new();
    for source in &sources {
        let obj = out.join(Path::new(source.file_name().unwrap()).with_extension("o"));
        let flags = if source.extension().unwrap() == "c" {
            C_FLAGS
        } else {
            ASM_FLAGS
        };
        run(Command::new("gcc")
            .args(flags)
            .arg("-I")
            .arg(&src)
            .arg("-c")
            .arg(source)
            .arg("-o")
            .arg(&obj));
        objects.push(obj);
    }
    let elf = out.join("apfvm-ref-guest.elf");
    run(Command::new("gcc")
        .args(["-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none"])
        .arg(format!("-Wl,-T,{}", src.join("guest.ld").display()))
        .arg("-o")
        .arg(&elf)
        .args(&objects));
    println!("cargo:rustc-env=APFVM_REFERENCE_GUEST={}", elf.display());
}
