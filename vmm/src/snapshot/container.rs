//! The state file's container: a fixed header, then the state as JSON.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "APFVMSNP"
//!      8     4  format version, little endian
//!     12     4  CRC-32 (IEEE) of the payload, little endian
//!     16     8  payload length in bytes, little endian
//!     24     n  payload: the state as UTF-8 JSON, every field named
//! ```
//!
//! Version policy: a reader accepts exactly the versions it knows (today only
//! `FORMAT_VERSION`); an older file is refused with its version named until a migration for
//! it exists, a newer one is refused as made by a newer apfvm. The header never changes, so
//! any version can always be told apart. Plain data, no I/O: the callers read and write files.

/// First bytes of every apfvm state file.
pub const MAGIC: [u8; 8] = *b"APFVMSNP";
/// The format this apfvm writes (and the only one it reads).
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 24;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContainerError {
    #[error("not an apfvm state file (no APFVMSNP magic)")]
    BadMagic,
    #[error("truncated: {have} bytes, the header says {want}")]
    Truncated { have: u64, want: u64 },
    #[error(
        "format version {0} is newer than this apfvm reads ({FORMAT_VERSION}): restore with a newer apfvm"
    )]
    NewerVersion(u32),
    #[error(
        "format version {0} is older than this apfvm reads ({FORMAT_VERSION}) and has no migration"
    )]
    OlderVersion(u32),
    #[error(
        "checksum mismatch (CRC-32 {found:#010x}, header says {expected:#010x}): the file is corrupted"
    )]
    Checksum { expected: u32, found: u32 },
    #[error("{0} bytes follow the payload")]
    TrailingBytes(u64),
}

/// The whole file for `payload`.
pub fn encode(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// The payload of a whole file, after every check of the header.
pub fn decode(file: &[u8]) -> Result<&[u8], ContainerError> {
    if file.len() < MAGIC.len() || file[..MAGIC.len()] != MAGIC {
        return Err(ContainerError::BadMagic);
    }
    if file.len() < HEADER_LEN {
        return Err(ContainerError::Truncated {
            have: file.len() as u64,
            want: HEADER_LEN as u64,
        });
    }
    let word = |at: usize| u32::from_le_bytes(file[at..at + 4].try_into().expect("4 bytes"));
    let version = word(8);
    if version > FORMAT_VERSION {
        return Err(ContainerError::NewerVersion(version));
    }
    if version < FORMAT_VERSION {
        return Err(ContainerError::OlderVersion(version));
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
        let file = encode(b"{\"a\":1}");
        assert_eq!(&file[..8], b"APFVMSNP");
        assert_eq!(decode(&file).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn every_damage_is_named() {
        let file = encode(b"{\"vcpus\":2}");
        assert_eq!(decode(b"ELF\x7f"), Err(ContainerError::BadMagic));
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
        assert_eq!(decode(&newer), Err(ContainerError::NewerVersion(2)));
        let mut older = file.clone();
        older[8] = 0;
        assert_eq!(decode(&older), Err(ContainerError::OlderVersion(0)));
        let mut longer = file.clone();
        longer.push(b' ');
        assert_eq!(decode(&longer), Err(ContainerError::TrailingBytes(1)));
    }
}
