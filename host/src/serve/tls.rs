//! The certificate the listener and the admin API serve, read again when
//! its files change.
//!
//! Certificates are renewed every few weeks (ACME, cert-manager, an
//! internal CA's agent), and the tools that renew them replace the files
//! and expect the server to notice: a host that read them once would serve
//! the old certificate until it expired and every Prism and operator was
//! refused. So each handshake that comes at least [`RECHECK`] after the
//! last look reads the files and loads them again when their contents
//! differ from what is served: contents, not modification times, which
//! some filesystems keep to the second and which a symlink swap (how
//! Kubernetes updates a mounted secret) leaves as they were.
//! A pair that does not load (half written, a key that is not the
//! certificate's) leaves the served one in place, with a warning, and is
//! tried again only when the files change once more: a renewal caught
//! between writing the certificate and the key is served once the key
//! lands. The look runs on the blocking pool while the handshake goes on
//! with the pair served so far: files on a mount that hangs must not hold
//! handshakes (their timeout cannot fire on a blocked thread), and one
//! look at a time is all there is.

use std::fmt;
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{Error as PemError, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// How often at most a handshake looks at the files: reading a few
/// kilobytes a second costs nothing beside a handshake, and a renewal is
/// served within it.
pub const RECHECK: Duration = Duration::from_secs(1);

/// Why a certificate and key could not be served.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("reading the certificate {path}: {source}")]
    Cert {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("the certificate file {0} holds no certificate")]
    NoCert(PathBuf),
    #[error("reading the key {path}: {source}")]
    Key {
        path: PathBuf,
        source: rustls::pki_types::pem::Error,
    },
    #[error("the certificate {cert} and the key {key} do not go together: {source}")]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

/// A digest of the two files' contents (or of their absence), so that the
/// key's bytes are not kept beside the key rustls holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp(u64);

/// The two files as read at one moment: what is stamped is what is loaded.
struct Read {
    cert: std::io::Result<Vec<u8>>,
    key: std::io::Result<Vec<u8>>,
}

impl Read {
    fn now(cert: &Path, key: &Path) -> Read {
        Read {
            cert: std::fs::read(cert),
            key: std::fs::read(key),
        }
    }

    fn stamp(&self) -> Stamp {
        let mut digest = std::hash::DefaultHasher::new();
        for file in [&self.cert, &self.key] {
            file.as_ref().ok().hash(&mut digest);
        }
        Stamp(digest.finish())
    }
}

/// A certificate chain and key from PEM files, served by rustls and loaded
/// again when the files change.
pub struct CertFiles {
    files: Arc<Files>,
}

/// What a look on the blocking pool needs.
struct Files {
    cert: PathBuf,
    key: PathBuf,
    provider: Arc<CryptoProvider>,
    state: Mutex<Served>,
}

struct Served {
    key: Arc<CertifiedKey>,
    stamp: Stamp,
    looked: Instant,
    /// The version of the files that last failed to load, not tried again.
    refused: Option<Stamp>,
    /// A look is under way.
    looking: bool,
}

impl fmt::Debug for CertFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertFiles")
            .field("cert", &self.files.cert)
            .field("key", &self.files.key)
            .finish_non_exhaustive()
    }
}

impl CertFiles {
    /// Loads the pair, or says what is wrong with it.
    pub fn load(cert: &Path, key: &Path, provider: Arc<CryptoProvider>) -> Result<Self, CertError> {
        let read = Read::now(cert, key);
        let stamp = read.stamp();
        let served = load(read, cert, key, &provider)?;
        let files = Files {
            cert: cert.to_owned(),
            key: key.to_owned(),
            provider,
            state: Mutex::new(Served {
                key: Arc::new(served),
                stamp,
                looked: Instant::now(),
                refused: None,
                looking: false,
            }),
        };
        Ok(CertFiles {
            files: Arc::new(files),
        })
    }

    /// The pair to serve now. When the last look is [`RECHECK`] old, a new
    /// one starts: on the blocking pool when there is a runtime (what it
    /// loads is served from a later handshake on), else here.
    fn current(&self) -> Arc<CertifiedKey> {
        let mut served = self.files.state();
        if served.looking || served.looked.elapsed() < RECHECK {
            return served.key.clone();
        }
        served.looked = Instant::now();
        served.looking = true;
        let key = served.key.clone();
        drop(served);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let files = self.files.clone();
                runtime.spawn_blocking(move || files.look());
                key
            }
            Err(_) => {
                self.files.look();
                self.files.state().key.clone()
            }
        }
    }
}

impl Files {
    fn state(&self) -> std::sync::MutexGuard<'_, Served> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads the files (holding no lock) and serves them if they changed
    /// and load.
    fn look(&self) {
        let read = Read::now(&self.cert, &self.key);
        let stamp = read.stamp();
        let known = {
            let served = self.state();
            stamp == served.stamp || Some(stamp) == served.refused
        };
        let loaded = (!known).then(|| load(read, &self.cert, &self.key, &self.provider));
        let mut served = self.state();
        served.looking = false;
        match loaded {
            None => {}
            Some(Ok(renewed)) => {
                tracing::info!(cert = %self.cert.display(), "serving the certificate as its files changed");
                served.key = Arc::new(renewed);
                served.stamp = stamp;
                served.refused = None;
            }
            Some(Err(error)) => {
                tracing::warn!(cert = %self.cert.display(), "the certificate's files changed but do not load; still serving the one before: {error}");
                served.refused = Some(stamp);
            }
        }
    }
}

impl ResolvesServerCert for CertFiles {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The pair `read` holds; `cert` and `key` name the files in errors.
fn load(
    read: Read,
    cert: &Path,
    key: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, CertError> {
    let chain = read
        .cert
        .map_err(PemError::Io)
        .and_then(|pem| CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>())
        .map_err(|source| CertError::Cert {
            path: cert.to_owned(),
            source,
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCert(cert.to_owned()));
    }
    let private = read
        .key
        .map_err(PemError::Io)
        .and_then(|pem| PrivateKeyDer::from_pem_slice(&pem))
        .map_err(|source| CertError::Key {
            path: key.to_owned(),
            source,
        })?;
    CertifiedKey::from_der(chain, private, provider).map_err(|source| CertError::Mismatch {
        cert: cert.to_owned(),
        key: key.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> Arc<CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    fn issue(dir: &Path, cert: &str, key: &str) -> Vec<u8> {
        let issued = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(dir.join(cert), issued.cert.pem()).unwrap();
        std::fs::write(dir.join(key), issued.key_pair.serialize_pem()).unwrap();
        issued.cert.der().to_vec()
    }

    fn served(files: &CertFiles) -> Vec<u8> {
        files.current().cert[0].to_vec()
    }

    /// As if the last look were a while ago.
    fn look_now(files: &CertFiles) {
        files.files.state().looked = Instant::now() - RECHECK;
    }

    #[test]
    fn a_pair_that_does_not_load_is_refused_naming_the_files() {
        let dir = tempfile::tempdir().unwrap();
        issue(dir.path(), "a.pem", "a.key");
        issue(dir.path(), "b.pem", "b.key");
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        let p = |name: &str| dir.path().join(name);

        let mismatch = CertFiles::load(&p("a.pem"), &p("b.key"), provider()).unwrap_err();
        let no_cert = CertFiles::load(&p("empty.pem"), &p("a.key"), provider()).unwrap_err();
        let no_key = CertFiles::load(&p("a.pem"), &p("empty.pem"), provider()).unwrap_err();
        let missing = CertFiles::load(&p("gone.pem"), &p("a.key"), provider()).unwrap_err();

        assert!(matches!(mismatch, CertError::Mismatch { .. }), "{mismatch}");
        assert!(mismatch.to_string().contains("a.pem") && mismatch.to_string().contains("b.key"));
        assert!(matches!(no_cert, CertError::NoCert(_)), "{no_cert}");
        assert!(matches!(no_key, CertError::Key { .. }), "{no_key}");
        assert!(missing.to_string().contains("gone.pem"), "{missing}");
    }

    #[test]
    fn changed_files_are_served_once_they_load_and_not_before_the_next_look() {
        let dir = tempfile::tempdir().unwrap();
        let first = issue(dir.path(), "cert.pem", "key.pem");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let files = CertFiles::load(&cert, &key, provider()).unwrap();

        // A renewal caught halfway: the new certificate, the old key.
        let renewed = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        std::fs::write(&cert, renewed.cert.pem()).unwrap();
        let too_soon = served(&files);
        look_now(&files);
        let halfway = served(&files);
        let refused = files.files.state().refused;
        std::fs::write(&key, renewed.key_pair.serialize_pem()).unwrap();
        look_now(&files);
        let whole = served(&files);

        assert_eq!(too_soon, first);
        assert_eq!(
            halfway, first,
            "a certificate without its key is not served"
        );
        assert!(refused.is_some());
        assert_eq!(whole, renewed.cert.der().to_vec());
        assert_eq!(files.files.state().refused, None);
    }

    #[tokio::test]
    async fn a_look_at_files_that_hang_never_holds_a_handshake() {
        let dir = tempfile::tempdir().unwrap();
        let first = issue(dir.path(), "cert.pem", "key.pem");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        let files = CertFiles::load(&cert, &key, provider()).unwrap();
        // A FIFO: reading it blocks until a writer comes, as a file on a
        // mount that hangs does.
        std::fs::remove_file(&cert).unwrap();
        let made = std::process::Command::new("mkfifo").arg(&cert).status();
        assert!(made.unwrap().success());
        look_now(&files);

        let during = served(&files);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let still = served(&files);
        assert_eq!(during, first);
        assert_eq!(still, first);
        assert!(files.files.state().looking, "one look, still blocked");

        // The writer comes and goes: the look reads nothing, and refuses it.
        drop(std::fs::OpenOptions::new().write(true).open(&cert).unwrap());
        let until = Instant::now() + Duration::from_secs(10);
        while files.files.state().looking {
            assert!(Instant::now() < until, "the look ends once the read does");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(files.files.state().refused.is_some());
        assert_eq!(served(&files), first);
    }
}
