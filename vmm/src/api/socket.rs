//! The API's Unix socket: created with mode 0600 from the start, never over an existing path,
//! and removed when apfvm is done with it.
//!
//! The mode is set on the socket before it is bound: Linux creates the socket file with the
//! socket inode's mode (less the umask, which can only take bits away), so the file never
//! exists with wider permissions, and apfvm does not touch the process-wide umask, which
//! other threads' file creation would see. `bind` itself refuses a path that exists
//! (EADDRINUSE), so nothing is ever replaced, also if the path appears after the check that
//! gives the clearer message.

use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};

use super::ApiError;

/// How many connections may wait to be accepted.
const BACKLOG: i32 = 16;

/// A bound, listening API socket.
pub struct ApiSocket {
    pub(super) listener: UnixListener,
    pub(super) file: SocketFile,
}

/// The socket's file, removed on drop if it is still the one apfvm created.
pub(super) struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl ApiSocket {
    /// Creates the socket at `path` (mode 0600), listening and non-blocking.
    pub fn bind(path: &Path) -> Result<ApiSocket, ApiError> {
        let name = || path.display().to_string();
        if path.symlink_metadata().is_ok() {
            return Err(ApiError::Exists { path: name() });
        }
        let bind_err = |source| ApiError::Bind {
            path: name(),
            source,
        };
        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(bind_err)?;
        // SAFETY: fchmod on the descriptor `socket` owns; no memory is involved.
        if unsafe { libc::fchmod(socket.as_raw_fd(), 0o600) } != 0 {
            return Err(bind_err(std::io::Error::last_os_error()));
        }
        let address = SockAddr::unix(path).map_err(bind_err)?;
        socket.bind(&address).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                ApiError::Exists { path: name() }
            } else {
                bind_err(e)
            }
        })?;
        // From here on the file is ours: removed again on any error below.
        let meta = path.symlink_metadata().map_err(bind_err)?;
        let file = SocketFile {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if meta.mode() & 0o777 != 0o600 {
            return Err(ApiError::Mode {
                path: name(),
                mode: meta.mode() & 0o777,
            });
        }
        socket.listen(BACKLOG).map_err(bind_err)?;
        socket.set_nonblocking(true).map_err(bind_err)?;
        Ok(ApiSocket {
            listener: socket.into(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.file.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Only our own socket: whoever replaced it meanwhile keeps theirs.
        if let Ok(meta) = self.path.symlink_metadata()
            && meta.dev() == self.dev
            && meta.ino() == self.ino
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            log::warn!("removing the API socket {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use vmm_sys_util::tempdir::TempDir;

    #[test]
    fn the_socket_is_0600_refuses_an_existing_path_and_goes_away() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("api.sock");
        let socket = ApiSocket::bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        let again = ApiSocket::bind(&path).err().unwrap().to_string();
        assert!(again.contains("already exists"), "{again}");
        drop(socket);
        assert!(!path.exists());

        let file = dir.as_path().join("a-file");
        std::fs::write(&file, b"keep me").unwrap();
        let err = ApiSocket::bind(&file).err().unwrap().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

        let missing = dir.as_path().join("no-such-dir/api.sock");
        let err = ApiSocket::bind(&missing).err().unwrap().to_string();
        assert!(err.contains("No such file or directory"), "{err}");
        let long = dir.as_path().join("x".repeat(200));
        assert!(ApiSocket::bind(&long).is_err());
    }

    #[test]
    fn a_socket_replaced_by_someone_else_is_left_alone() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("api.sock");
        let socket = ApiSocket::bind(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        std::fs::write(&path, b"theirs").unwrap();
        drop(socket);
        assert_eq!(std::fs::read(&path).unwrap(), b"theirs");
    }
}
