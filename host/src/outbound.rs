//! The host's outbound HTTP clients and proxies.
//!
//! reqwest follows `HTTP_PROXY`/`HTTPS_PROXY` by default, which would send
//! Prism's Basic auth and the plugins' injected credentials to whatever
//! proxy the environment names, over plain HTTP for `http://` targets.
//! prismhook ignores the environment unless `proxy_from_env` is set, and
//! then uses only `HTTPS_PROXY` (with `NO_PROXY`) for `https://` targets:
//! through a CONNECT tunnel, so the proxy sees host names but no
//! credentials. `http://` targets are always reached directly.
//!
//! Certificates are checked as [`TlsMode`] says: the public roots, a CA
//! file, or one pinned certificate (what Prism and most firewalls ship with
//! is self-signed).
//!
//! Plugins' names resolve through [`NoLocalNames`]: a name on an allowlist
//! (a wildcard especially) must not lead a plugin to the host itself or to
//! a cloud's metadata service.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

pub use prismhook_core::policy::TlsMode;

/// `builder` without the environment's proxies, or with `HTTPS_PROXY` for
/// `https://` targets when `from_env` is set. The error names the variable,
/// never its value (a proxy URL may hold a password).
pub fn with_proxy_policy(
    builder: reqwest::ClientBuilder,
    from_env: bool,
) -> Result<reqwest::ClientBuilder, String> {
    let builder = builder.no_proxy();
    if !from_env {
        return Ok(builder);
    }
    let Some((var, url)) = ["HTTPS_PROXY", "https_proxy"].into_iter().find_map(|v| {
        std::env::var(v)
            .ok()
            .filter(|u| !u.is_empty())
            .map(|u| (v, u))
    }) else {
        return Ok(builder);
    };
    let proxy = reqwest::Proxy::https(&url)
        .map_err(|_| format!("`{var}` is not a proxy URL"))?
        .no_proxy(reqwest::NoProxy::from_env());
    Ok(builder.proxy(proxy))
}

/// Why an answer's body was not read whole.
#[derive(Debug)]
pub enum BodyError {
    /// It is (or says it is) longer than allowed.
    TooLarge,
    /// The connection failed while reading.
    Transport(reqwest::Error),
}

/// An answer's body, refused as soon as it would pass `max` bytes: before
/// reading when its length says so, else as it arrives, so a peer cannot
/// make the host buffer more than it allows.
pub async fn read_body(mut resp: reqwest::Response, max: u64) -> Result<Vec<u8>, BodyError> {
    if resp.content_length().is_some_and(|len| len > max) {
        return Err(BodyError::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(BodyError::Transport)? {
        if body.len() as u64 + chunk.len() as u64 > max {
            return Err(BodyError::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// `builder` trusting what `tls` says instead of (or, for `System`, as) the
/// public roots. The error names the file and what is wrong with it.
pub fn with_tls(
    builder: reqwest::ClientBuilder,
    tls: &TlsMode,
) -> Result<reqwest::ClientBuilder, String> {
    Ok(match tls {
        TlsMode::System => builder,
        TlsMode::CaFile(path) => {
            let bytes = read(path, "CA file")?;
            let certs = if looks_like_pem(&bytes) {
                reqwest::Certificate::from_pem_bundle(&bytes)
            } else {
                reqwest::Certificate::from_der(&bytes).map(|c| vec![c])
            }
            .map_err(|e| {
                format!(
                    "CA file {}: {}",
                    path.display(),
                    prismhook_core::text::error_chain(&e)
                )
            })?;
            if certs.is_empty() {
                return Err(format!("CA file {}: no certificate in it", path.display()));
            }
            certs
                .into_iter()
                .fold(builder.tls_built_in_root_certs(false), |b, cert| {
                    b.add_root_certificate(cert)
                })
        }
        TlsMode::PinnedCert(path) => {
            let bytes = read(path, "pinned certificate")?;
            let pinned = if looks_like_pem(&bytes) {
                CertificateDer::from_pem_slice(&bytes).map_err(|e| {
                    format!(
                        "pinned certificate {}: no PEM certificate: {e}",
                        path.display()
                    )
                })?
            } else {
                CertificateDer::from(bytes)
            };
            builder.use_preconfigured_tls(pinned_tls(pinned))
        }
        TlsMode::Insecure => builder.danger_accept_invalid_certs(true),
    })
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

fn looks_like_pem(bytes: &[u8]) -> bool {
    bytes.windows(11).any(|w| w == b"-----BEGIN ")
}

/// A rustls configuration that trusts one certificate and nothing else.
fn pinned_tls(pinned: CertificateDer<'static>) -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = PinnedCertVerifier {
        pinned,
        algorithms: provider.signature_verification_algorithms,
    };
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    // The client speaks HTTP/1.1 only; reqwest sets this itself for the
    // configurations it builds, but not for a preconfigured one.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// Accepts the server when its end-entity certificate is byte for byte the
/// pinned one. The handshake signatures are still verified against that
/// certificate's key, so a server that merely replays the certificate
/// without its private key is refused.
#[derive(Debug)]
struct PinnedCertVerifier {
    pinned: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

struct NotThePinnedCertificate;

impl fmt::Display for NotThePinnedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the server's certificate is not the pinned one")
    }
}

// rustls shows this error with `{:?}`: make that readable too.
impl fmt::Debug for NotThePinnedCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::error::Error for NotThePinnedCertificate {}

impl ServerCertVerifier for PinnedCertVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.pinned.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(NotThePinnedCertificate)),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Resolves the names plugins ask for, without the addresses of the host
/// itself and of its link (loopback, unspecified, link-local: where a
/// cloud's metadata service answers; and every address of the host's own
/// interfaces, where services bound to all addresses answer). A zone may
/// point any name there (`localhost.example.com`, a record for
/// 169.254.169.254 or for the host's LAN address), and a rule such as
/// `https://*.example.com` would let a plugin pick it. `localhost` itself
/// is left alone; other such services are allowed by address.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLocalNames;

impl reqwest::dns::Resolve for NoLocalNames {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let name = name.as_str().to_owned();
        Box::pin(async move {
            let kept = lookup_not_local(&name).await??;
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// [`NoLocalNames`]'s rule for a request a proxy sends, which resolves the
/// name itself: refused if the name leads only where a name may not. A name
/// the host cannot resolve is the proxy's to resolve.
pub async fn refuse_local_name(name: &str) -> Result<(), String> {
    match lookup_not_local(name).await {
        Ok(kept) => kept.map(drop),
        Err(_) => Ok(()),
    }
}

/// `name`'s addresses without the local ones, or why none is left; the
/// outer error is a name that does not resolve.
async fn lookup_not_local(name: &str) -> std::io::Result<Result<Vec<SocketAddr>, String>> {
    let found = tokio::net::lookup_host((name, 0)).await?.collect();
    Ok(not_local(name, found, &own_addresses()))
}

/// `found` without the local addresses and the host's `own`, or why
/// nothing is left.
fn not_local(
    name: &str,
    found: Vec<SocketAddr>,
    own: &[IpAddr],
) -> Result<Vec<SocketAddr>, String> {
    if name.eq_ignore_ascii_case("localhost") || found.is_empty() {
        return Ok(found);
    }
    let kept: Vec<SocketAddr> = found
        .into_iter()
        .filter(|a| !local(a.ip()) && !own.contains(&embedded_v4(a.ip())))
        .collect();
    if kept.is_empty() {
        return Err(format!(
            "{name} resolves only to loopback or link-local addresses or to this host's own, \
             where a name may not lead; allow such a service by its address"
        ));
    }
    Ok(kept)
}

/// The IPv4 address an IPv6 one carries (mapped `::ffff:a.b.c.d`,
/// compatible `::a.b.c.d`, or NAT64's `64:ff9b::a.b.c.d`), which is where it
/// leads; otherwise the address itself.
fn embedded_v4(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    let s = v6.segments();
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    let compatible = s[..6] == [0; 6] && !v6.is_loopback() && !v6.is_unspecified();
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None if nat64 || compatible => {
            let [.., a, b, c, d] = v6.octets();
            IpAddr::V4(std::net::Ipv4Addr::new(a, b, c, d))
        }
        None => ip,
    }
}

fn local(ip: IpAddr) -> bool {
    let ip = embedded_v4(ip);
    ip.is_loopback()
        || ip.is_unspecified()
        || match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
        }
}

/// The addresses of the host's interfaces now (they change with DHCP and
/// VPNs, so they are read at each lookup); none if they cannot be read.
fn own_addresses() -> Vec<IpAddr> {
    let mut own = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs hands over a list that freeifaddrs takes back; each
    // entry's address is read as the structure its family names.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return own;
        }
        let mut entry = head;
        while !entry.is_null() {
            let addr = (*entry).ifa_addr;
            if !addr.is_null() {
                match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let v4 = &*addr.cast::<libc::sockaddr_in>();
                        // In network order, as it lies in memory.
                        own.push(IpAddr::from(v4.sin_addr.s_addr.to_ne_bytes()));
                    }
                    libc::AF_INET6 => {
                        let v6 = &*addr.cast::<libc::sockaddr_in6>();
                        own.push(IpAddr::from(v6.sin6_addr.s6_addr));
                    }
                    _ => {}
                }
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    own
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 0)
    }

    #[test]
    fn a_name_does_not_lead_to_the_host_or_its_link() {
        for ip in [
            "127.0.0.1",
            "127.9.9.9",
            "0.0.0.0",
            "169.254.169.254",
            "::1",
            "::",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
        ] {
            let refused = not_local("a.example.com", vec![at(ip)], &[]).unwrap_err();
            assert!(
                refused.contains("a.example.com resolves only to loopback"),
                "{ip}: {refused}"
            );
        }
        let mixed = vec![
            at("127.0.0.1"),
            at("10.1.2.3"),
            at("fd00::5"),
            at("169.254.0.1"),
        ];
        assert_eq!(
            not_local("fw.example.com", mixed, &[]).unwrap(),
            [at("10.1.2.3"), at("fd00::5")]
        );
        assert_eq!(
            not_local("LOCALHOST", vec![at("127.0.0.1")], &[]).unwrap(),
            [at("127.0.0.1")]
        );
    }

    #[tokio::test]
    async fn a_name_a_proxy_will_resolve_is_held_to_the_same_rule_first() {
        let refused = refuse_local_name("127.0.0.2").await.unwrap_err();
        assert!(refused.contains("resolves only to loopback"), "{refused}");
        refuse_local_name("10.1.2.3").await.unwrap();
        refuse_local_name("localhost").await.unwrap();
        refuse_local_name("no-such-name.invalid").await.unwrap();
    }

    #[test]
    fn a_name_does_not_lead_to_an_address_of_the_hosts_own_interfaces() {
        let own = own_addresses();
        assert!(
            own.iter().any(|ip| ip.is_loopback()),
            "the interfaces are read: {own:?}"
        );
        let own = ["10.0.0.5".parse().unwrap()];
        for ip in ["10.0.0.5", "::ffff:10.0.0.5", "64:ff9b::a00:5"] {
            let refused = not_local("svc.example.com", vec![at(ip)], &own).unwrap_err();
            assert!(refused.contains("this host's own"), "{ip}: {refused}");
        }
        assert_eq!(
            not_local("fw.example.com", vec![at("10.0.0.5"), at("10.0.0.6")], &own).unwrap(),
            [at("10.0.0.6")]
        );
    }
}
