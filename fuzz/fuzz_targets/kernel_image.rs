//! Kernel image loading (ELF with or without the PVH note, bzImage) from arbitrary bytes:
//! every input must load or be refused with an error, never panic or write outside RAM.
#![no_main]

use std::io::Cursor;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm::arch::x86_64::loader;

const RAM: u64 = 32 << 20;

fn memory() -> &'static GuestMemoryMmap {
    static MEM: OnceLock<GuestMemoryMmap> = OnceLock::new();
    MEM.get_or_init(|| {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).expect("guest RAM")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut image = Cursor::new(data);
    let _ = loader::load_kernel(memory(), RAM, &mut image, "fuzz input");
});
