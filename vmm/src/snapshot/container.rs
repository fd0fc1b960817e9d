//! The container of apfvm's snapshot files (the state file, the working set): a fixed header,
//! then the contents as JSON.
//!
//! ```text
//! offset  size  field
//!      0     8  magic: "APFVMSNP" (state file), "APFVMWSF" (working set)
//!      8     4  format version, little endian
//!     12     4  CRC-32 (IEEE) of the payload, little endian
//!     16     8  payload length in bytes, little endian
//!     24     n  payload: the state as UTF-8 JSON, every field named
//! ```
//!
//! Version policy: a reader accepts exactly the versions it knows (today only
//! `Format::version`); an older file is refused with its version named until a migration for
//! it exists, a newer one is refused as made by a newer apfvm. The header never changes, so
//! any version can always be told apart. Plain data, no I/O: the callers read and write files.

/// One kind of file in the container: its magic, the version this apfvm writes (and the only
/// one it reads), and its name in errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub magic: [u8; 8],
    pub version: u32,
    pub name: &'static str,
}

pub const STATE_FILE: Format = Format {
    magic: *b"APFVMSNP",
    version: 1,
    name: "state file",
};

pub const WORKING_SET: Format = Format {
    magic: *b"APFVMWSF",
    version: 1,
    name: "working set",
};

const HEADER_LEN: usize = 24;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContainerError {
    #[error("not an apfvm {0} (its magic is missing)")]
    BadMagic(&'static str),
    #[error("truncated: {have} bytes, the header says {want}")]
    Truncated { have: u64, want: u64 },
    #[error("format version {found} is newer than this apfvm reads ({reads}): use a newer apfvm")]
    NewerVersion { found: u32, reads: u32 },
    #[error("format version {found} is older than this apfvm reads ({reads}) and has no migration")]
    OlderVersion { found: u32, reads: u32 },
    #[error(
        "checksum mismatch (CRC-32 {found:#010x}, header says {expected:#010x}): the file is corrupted"
    )]
    Checksum { expected: u32, found: u32 },
    #[error("{0} bytes follow the payload")]
    TrailingBytes(u64),
}

/// The whole file for `payload`.
pub fn encode(format: Format, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&format.magic);
    out.extend_from_slice(&format.version.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of a whole file, after every check of the header.
pub fn decode(format: Format, file: &[u8]) -> Result<&[u8], ContainerError> {
    if file.len() < format.magic.len() || file[..format.magic.len()] != format.magic {
        return Err(ContainerError::BadMagic(format.name));
    }
    if file.len() < HEADER_LEN {
        return Err(ContainerError::Truncated {
            have: file.len() as u64,
            want: HEADER_LEN as u64,
        });
    }
    let word = |at: usize| u32::from_le_bytes(file[at..at + 4].try_into().expect("4 bytes"));
    let (found, reads) = (word(8), format.version);
    if found > reads {
        return Err(ContainerError::NewerVersion { found, reads });
    }
    if found < reads {
        return Err(ContainerError::OlderVersion { found, reads });
    }
    let expected = word(12);
    let len = u64::from_le_bytes(file[16..24].try_into().expect("8 bytes"));
    let have = (file.len() - HEADER_LEN) as u64;
    if have < len {
        return Err(ContainerError::Truncated {
            have: file.len() as u64,
            want: HEADER_LEN as u64 + len,
        });
    }
    if have > len {
        return Err(ContainerError::TrailingBytes(have - len));
    }
    let payload = &file[HEADER_LEN..];
    let found = crc32fast::hash(payload);
    if found != expected {
        return Err(ContainerError::Checksum { expected, found });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let file = encode(STATE_FILE, b"{\"a\":1}");
        assert_eq!(&file[..8], b"APFVMSNP");
        assert_eq!(decode(STATE_FILE, &file).unwrap(), b"{\"a\":1}");
        assert_eq!(
            decode(WORKING_SET, &file),
            Err(ContainerError::BadMagic("working set")),
            "one kind of file is not read as another"
        );
    }

    #[test]
    fn every_damage_is_named() {
        let file = encode(STATE_FILE, b"{\"vcpus\":2}");
        let decode = |bytes: &[u8]| decode(STATE_FILE, bytes).map(<[u8]>::to_vec);
        assert_eq!(
            decode(b"ELF\x7f"),
            Err(ContainerError::BadMagic("state file"))
        );
        assert!(matches!(
            decode(&file[..20]),
            Err(ContainerError::Truncated { have: 20, want: 24 })
        ));
        assert!(matches!(
            decode(&file[..file.len() - 1]),
            Err(ContainerError::Truncated { .. })
        ));
        let mut flipped = file.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(matches!(
            decode(&flipped),
            Err(ContainerError::Checksum { .. })
        ));
        let mut newer = file.clone();
        newer[8] = 2;
        assert_eq!(
            decode(&newer),
            Err(ContainerError::NewerVersion { found: 2, reads: 1 })
        );
        let mut older = file.clone();
        older[8] = 0;
        assert_eq!(
            decode(&older),
            Err(ContainerError::OlderVersion { found: 0, reads: 1 })
        );
        let mut longer = file.clone();
        longer.push(b' ');
        assert_eq!(decode(&longer), Err(ContainerError::TrailingBytes(1)));
    }
}
