//! Reading what the plugins directory holds, which may be anything.
//!
//! Whoever can write the plugins directory can put a FIFO, a device or a
//! huge file where a component is expected. A plain `fs::read` of a FIFO
//! blocks until a writer comes (forever, holding the reload task), and one
//! fed endlessly grows without bound. Here a file is opened without
//! blocking, must be a regular file (symlinks to one are followed), and is
//! read only up to a limit.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

/// Why a file in the plugins directory was not read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{}: cannot read: {source}", .file.display())]
    Io {
        file: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("{}: is {kind}, not a regular file; only regular files are read", .file.display())]
    NotRegular {
        file: std::path::PathBuf,
        kind: &'static str,
    },
    #[error("{}: is larger than the limit of {limit} bytes (`plugins.max_file_mib`)", .file.display())]
    TooLarge {
        file: std::path::PathBuf,
        limit: u64,
    },
}

impl FileError {
    /// The file does not exist (it was removed).
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
    }
}

/// A component file's bytes with their sha256, read once for both the
/// reload task's change check and the compiler.
pub struct ComponentBytes {
    pub bytes: Vec<u8>,
    pub sha256: String,
}

/// [`read_regular`], hashed.
pub fn read_component(path: &Path, limit: u64) -> Result<ComponentBytes, FileError> {
    let bytes = read_regular(path, limit)?;
    let sha256 = super::sha256_hex(&bytes);
    Ok(ComponentBytes { bytes, sha256 })
}

/// The whole content of `path`, if it is a regular file of at most `limit`
/// bytes. Blocking (plain file I/O): call it off the async threads.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>, FileError> {
    let io = |source| FileError::Io {
        file: path.to_owned(),
        source,
    };
    // O_NONBLOCK: opening a FIFO with no writer would otherwise wait for
    // one. It changes nothing for reads of a regular file.
    let file: File = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    // The type of what was opened, not of what the path named a moment
    // before: the check cannot be raced by swapping the file.
    let meta = file.metadata().map_err(io)?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let kind = if kind.is_fifo() {
            "a FIFO (named pipe)"
        } else if kind.is_dir() {
            "a directory"
        } else if kind.is_char_device() {
            "a character device"
        } else if kind.is_block_device() {
            "a block device"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "a special file"
        };
        return Err(FileError::NotRegular {
            file: path.to_owned(),
            kind,
        });
    }
    let too_large = || FileError::TooLarge {
        file: path.to_owned(),
        limit,
    };
    if meta.len() > limit {
        return Err(too_large());
    }
    // The size may change while we read: never take more than the limit.
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(too_large());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_at_once_without_waiting_for_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("x.wasm");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let err = read_regular(&fifo, 1 << 20).unwrap_err();
        assert!(
            err.to_string()
                .contains("is a FIFO (named pipe), not a regular file"),
            "{err}"
        );
    }

    #[test]
    fn a_directory_or_device_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_regular(dir.path(), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
        let err = read_regular(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("is a character device"), "{err}");
    }

    #[test]
    fn a_file_over_the_limit_is_refused_and_one_at_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big.wasm");
        std::fs::write(&file, vec![7u8; 1000]).unwrap();
        let err = read_regular(&file, 999).unwrap_err();
        assert!(
            err.to_string()
                .contains("larger than the limit of 999 bytes"),
            "{err}"
        );
        assert_eq!(read_regular(&file, 1000).unwrap().len(), 1000);
    }

    #[test]
    fn a_symlink_to_a_regular_file_is_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("real.wasm");
        std::fs::write(&target, b"\0asm").unwrap();
        let link = dir.path().join("link.wasm");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert_eq!(read_regular(&link, 10).unwrap(), b"\0asm");
        assert!(read_regular(&dir.path().join("gone.wasm"), 10)
            .unwrap_err()
            .is_not_found());
    }
}
