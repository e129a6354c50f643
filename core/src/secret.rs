//! Secrets read from the environment or files, kept out of logs.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

/// A secret value. `Debug` and `Display` print `[redacted]`, so a secret
/// that ends up in a log line or an error message by mistake says nothing.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Secret {
        Secret(value.into())
    }

    /// The value itself: call only where it leaves the process (a header
    /// sent to its origin, a comparison).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `presented` is this secret. Digests of equal length are
    /// compared without an early exit, so the time taken tells neither how
    /// much of a guess was right nor how long the secret is.
    pub fn matches(&self, presented: &[u8]) -> bool {
        digests_match(presented, self.0.as_bytes())
    }
}

/// [`Secret::matches`] for a secret put together at the comparison (a
/// user and password), or for none at all: `expected = None` costs the
/// same and never matches, so an unknown name takes as long as a known one.
pub fn matches_if_any(presented: &[u8], expected: Option<&[u8]>) -> bool {
    let same = digests_match(presented, expected.unwrap_or_default());
    expected.is_some() && same
}

fn digests_match(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    Sha256::digest(a).ct_eq(&Sha256::digest(b)).into()
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Where a secret comes from, as written in the config file: exactly one of
/// an environment variable, a file, or (for tests and demos) the value.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SecretSource {
    pub env: Option<String>,
    pub file: Option<PathBuf>,
    pub value: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SecretError {
    #[error("give exactly one of `env`, `file` or `value`")]
    Ambiguous,
    #[error("environment variable `{0}` is not set")]
    MissingEnv(String),
    #[error("cannot read secret file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    #[error("the secret is empty")]
    Empty,
}

impl SecretSource {
    pub fn resolve(&self) -> Result<Secret, SecretError> {
        let value = match (&self.env, &self.file, &self.value) {
            (Some(var), None, None) => {
                std::env::var(var).map_err(|_| SecretError::MissingEnv(var.clone()))?
            }
            (None, Some(path), None) => read_secret_file(path)
                .map_err(|reason| SecretError::File {
                    path: path.clone(),
                    reason,
                })?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
            (None, None, Some(value)) => value.clone(),
            _ => return Err(SecretError::Ambiguous),
        };
        if value.is_empty() {
            return Err(SecretError::Empty);
        }
        Ok(Secret::new(value))
    }
}

/// A secret file is a token, a password or a PEM key: anything longer is a
/// wrong path (`/dev/zero`, a log file), refused rather than read whole.
pub const MAX_SECRET_FILE_BYTES: u64 = 64 << 10;

fn read_secret_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut text = String::new();
    // Not a size check up front: a pipe or device has no size to check.
    file.take(MAX_SECRET_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| e.to_string())?;
    if text.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(format!(
            "longer than {} KiB; a secret file holds one secret",
            MAX_SECRET_FILE_BYTES >> 10
        ));
    }
    Ok(text)
}

/// A user name and password that a peer presents with HTTP Basic auth (the
/// credentials Prism sends with each notification, and registers with its
/// webhook).
#[derive(Clone, Debug)]
pub struct BasicCredentials {
    pub user: String,
    pub password: Secret,
}

/// Creates `dir` (and its parents) private to this user (0700). A directory
/// that is there already is left as it is, the operator's to set (see
/// [`is_private`]): a data directory given as `/tmp` or `/var/lib` by
/// mistake must not be closed to every other user.
pub fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent)?;
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        made => made,
    }
}

/// Whether no other user may read or enter `dir`.
pub fn is_private(dir: &std::path::Path) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(dir)?.permissions().mode() & 0o077 == 0)
}

/// Writes a file only this user can read (0600), durably.
pub fn write_private(path: &std::path::Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // `mode` applies only to a file it creates.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_matches_only_itself() {
        let t = Secret::new("s3cret-token");
        assert!(t.matches(b"s3cret-token"));
        assert!(!t.matches(b"s3cret-tokeN"));
        assert!(!t.matches(b"s3cret-token2"));
        assert!(!t.matches(b""));
    }

    #[test]
    fn nothing_matches_no_secret_not_even_nothing() {
        assert!(matches_if_any(b"user:pw", Some(b"user:pw")));
        assert!(!matches_if_any(b"user:pw", Some(b"user:pW")));
        assert!(!matches_if_any(b"", None));
        assert!(!matches_if_any(b"user:pw", None));
    }

    #[test]
    fn a_secret_never_prints_its_value() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s} {s:?}"), "[redacted] [redacted]");
    }

    #[test]
    fn a_source_must_name_exactly_one_origin() {
        let both = SecretSource {
            env: Some("X".into()),
            file: None,
            value: Some("v".into()),
        };
        assert_eq!(both.resolve(), Err(SecretError::Ambiguous));
    }

    #[test]
    fn private_files_and_directories_are_for_this_user_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let private = dir.path().join("a/b");
        create_private_dir(&private).unwrap();
        let file = private.join("key");
        std::fs::write(&file, "old").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&file, "new").unwrap();
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&private), 0o700);
        assert!(is_private(&private).unwrap());
        assert_eq!(mode(&file), 0o600, "an existing file is made private too");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "new");

        // A directory that was there is the operator's: left as it is.
        let shared = dir.path().join("shared");
        std::fs::create_dir(&shared).unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&shared).unwrap();
        assert_eq!(mode(&shared), 0o755);
        assert!(!is_private(&shared).unwrap());
    }

    #[test]
    fn a_secret_file_that_never_ends_is_refused_after_the_bound() {
        let src = SecretSource {
            env: None,
            file: Some("/dev/zero".into()),
            value: None,
        };
        let e = src.resolve().unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot read secret file /dev/zero: longer than 64 KiB; a secret file holds one secret"
        );
    }

    #[test]
    fn a_secret_file_loses_its_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, "abc\n").unwrap();
        let src = SecretSource {
            env: None,
            file: Some(path),
            value: None,
        };
        assert_eq!(src.resolve().unwrap().expose(), "abc");
    }
}
