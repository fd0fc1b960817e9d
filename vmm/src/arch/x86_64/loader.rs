//! Loading a kernel image into guest memory with linux-loader, and deciding how to enter it:
//! - ELF with a Xen PVH note → PVH entry (32-bit protected mode);
//! - ELF without one → Linux 64-bit boot protocol at `e_entry` (a vmlinux's entry is the
//!   physical address of `startup_64`);
//! - bzImage → Linux 64-bit boot protocol at the protected-mode code + 0x200.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{self as ll, BzImage, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, GuestAddress, GuestMemoryMmap, ReadVolatile};

use super::layout::HIMEM_START;
use super::regs::EntryMode;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Where the loaded kernel is and how to enter it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub mode: EntryMode,
    pub entry: GuestAddress,
    /// First byte after the image (including its BSS).
    pub end: u64,
    /// The bzImage setup header, which the zero page starts from.
    pub setup_header: Option<setup_header>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot read kernel image {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a kernel image apfvm can boot: neither an ELF (vmlinux) nor a bzImage \
         (no ELF magic, no 'HdrS' boot header)"
    )]
    UnknownFormat { path: String },
    #[error("bad kernel image {path}: {source}")]
    Invalid { path: String, source: ll::Error },
    #[error("bad kernel image {path}: the bzImage has no 64-bit entry point (XLF_KERNEL_64)")]
    No64BitEntry { path: String },
    #[error(
        "guest memory is too small for kernel {path}: the image needs memory up to {needed:#x} \
         but guest RAM ends at {ram_end:#x}; raise --mem"
    )]
    TooSmall {
        path: String,
        needed: u64,
        ram_end: u64,
    },
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: u64 = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
/// bzImage `xloadflags` bit: the kernel has a 64-bit entry at +0x200.
const XLF_KERNEL_64: u16 = 1;
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Tells the image format from its magic numbers.
pub fn detect_format<R: Read + Seek>(image: &mut R) -> std::io::Result<Option<KernelFormat>> {
    let mut magic = [0u8; 4];
    image.seek(SeekFrom::Start(0))?;
    if image.read_exact(&mut magic).is_ok() && &magic == ELF_MAGIC {
        return Ok(Some(KernelFormat::Elf));
    }
    image.seek(SeekFrom::Start(BZIMAGE_MAGIC_OFFSET))?;
    if image.read_exact(&mut magic).is_ok() && &magic == BZIMAGE_MAGIC {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

/// Loads the kernel at `path`.
pub fn load_kernel_file(
    mem: &GuestMemoryMmap,
    ram_end: u64,
    path: &Path,
) -> Result<LoadedKernel, LoaderError> {
    let name = path.display().to_string();
    let mut file = File::open(path).map_err(|source| LoaderError::Read {
        path: name.clone(),
        source,
    })?;
    load_kernel(mem, ram_end, &mut file, &name)
}

/// Loads a kernel image from any seekable reader; `name` is for messages.
pub fn load_kernel<R: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    ram_end: u64,
    image: &mut R,
    name: &str,
) -> Result<LoadedKernel, LoaderError> {
    let read_err = |source| LoaderError::Read {
        path: name.to_string(),
        source,
    };
    let format =
        detect_format(image)
            .map_err(read_err)?
            .ok_or_else(|| LoaderError::UnknownFormat {
                path: name.to_string(),
            })?;
    let image_len = image.seek(SeekFrom::End(0)).map_err(read_err)?;
    image.rewind().map_err(read_err)?;

    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START))),
        KernelFormat::BzImage => BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START))),
    }
    .map_err(|source| classify_load_error(source, name, image_len, ram_end))?;

    if result.kernel_end > ram_end {
        return Err(LoaderError::TooSmall {
            path: name.to_string(),
            needed: result.kernel_end,
            ram_end,
        });
    }
    entry_point(format, &result, name)
}

/// linux-loader reports "could not copy into guest memory" as a read error; when the image
/// itself is readable that means guest RAM is too small, which deserves a clearer message.
fn classify_load_error(source: ll::Error, name: &str, image_len: u64, ram_end: u64) -> LoaderError {
    let copy_failed = matches!(
        source,
        ll::Error::Elf(ll::elf::Error::ReadKernelImage)
            | ll::Error::Bzimage(ll::bzimage::Error::ReadBzImageCompressedKernel)
    );
    if copy_failed && HIMEM_START + image_len > ram_end {
        return LoaderError::TooSmall {
            path: name.to_string(),
            needed: HIMEM_START + image_len,
            ram_end,
        };
    }
    LoaderError::Invalid {
        path: name.to_string(),
        source,
    }
}

fn entry_point(
    format: KernelFormat,
    result: &KernelLoaderResult,
    name: &str,
) -> Result<LoadedKernel, LoaderError> {
    let (mode, entry) = match format {
        KernelFormat::Elf => match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => (EntryMode::Pvh, addr),
            _ => (EntryMode::Linux64, result.kernel_load),
        },
        KernelFormat::BzImage => {
            let hdr = result.setup_header.unwrap_or_default();
            if hdr.version < 0x20c || hdr.xloadflags & XLF_KERNEL_64 == 0 {
                return Err(LoaderError::No64BitEntry {
                    path: name.to_string(),
                });
            }
            (
                EntryMode::Linux64,
                result.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
            )
        }
    };
    Ok(LoadedKernel {
        format,
        mode,
        entry,
        end: result.kernel_end,
        setup_header: result.setup_header,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Cursor;
    use vm_memory::Bytes;

    const MEM: usize = 16 << 20;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
    }

    /// A minimal bzImage: boot sector + one setup sector holding a 2.12 header with a 64-bit
    /// entry, then `payload` as the protected-mode code.
    pub(crate) fn synthetic_bzimage(payload: &[u8], xloadflags: u16) -> Vec<u8> {
        let setup_sects = 1u8;
        let mut img = vec![0u8; (setup_sects as usize + 1) * 512];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020cu16.to_le_bytes());
        img[0x211] = 0x01; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        img[0x218..0x21c].copy_from_slice(&0u32.to_le_bytes());
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        img.extend_from_slice(payload);
        img
    }

    #[test]
    fn bzimage_loads_its_protected_mode_code_and_enters_at_0x200() {
        let m = mem();
        let payload: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let mut img = Cursor::new(synthetic_bzimage(&payload, XLF_KERNEL_64));
        let k = load_kernel(&m, MEM as u64, &mut img, "test-bzimage").unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        assert_eq!(k.mode, EntryMode::Linux64);
        assert_eq!(k.entry, GuestAddress(0x10_0200));
        assert_eq!(k.end, 0x10_0000 + payload.len() as u64);
        let mut loaded = vec![0u8; payload.len()];
        m.read_slice(&mut loaded, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(loaded, payload);
        assert_eq!({ k.setup_header.unwrap().version }, 0x20c);
    }

    #[test]
    fn bzimage_without_64bit_entry_is_refused() {
        let mut img = Cursor::new(synthetic_bzimage(&[0u8; 512], 0));
        let err = load_kernel(&mem(), MEM as u64, &mut img, "old").unwrap_err();
        assert!(matches!(err, LoaderError::No64BitEntry { .. }), "{err}");
    }

    #[test]
    fn garbage_is_neither_elf_nor_bzimage() {
        let mut img = Cursor::new(vec![0x55u8; 4096]);
        let err = load_kernel(&mem(), MEM as u64, &mut img, "junk").unwrap_err();
        assert!(err.to_string().contains("neither an ELF"), "{err}");
        let mut empty = Cursor::new(Vec::new());
        assert!(matches!(
            load_kernel(&mem(), MEM as u64, &mut empty, "empty"),
            Err(LoaderError::UnknownFormat { .. })
        ));
    }

    #[test]
    fn kernel_larger_than_ram_says_memory_is_too_small() {
        let small = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let payload = vec![0x90u8; 3 << 20];
        let mut img = Cursor::new(synthetic_bzimage(&payload, XLF_KERNEL_64));
        let err = load_kernel(&small, 2 << 20, &mut img, "big").unwrap_err();
        assert!(matches!(err, LoaderError::TooSmall { .. }), "{err}");
        assert!(err.to_string().contains("raise --mem"));
    }
}
