//! What a plugin may reach over HTTP, and which credentials the host adds.
//!
//! Parsed once when the plugin's settings load, checked before every request
//! and every redirect hop. A plugin's policy defaults to nothing: no origin
//! is reachable until the operator lists it.

use std::net::IpAddr;
use std::path::PathBuf;

use ipnet::IpNet;
use url::Url;

use crate::secret::Secret;

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid origin `{origin}`: {reason}")]
pub struct OriginError {
    pub origin: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq)]
enum HostPattern {
    /// A host name, compared case-insensitively.
    Name(String),
    /// `*.example.com`: any subdomain of `example.com`, not the apex.
    Subdomains(String),
    /// An IP literal or a CIDR block; matches IP-literal URLs only (names
    /// are not resolved, so a name never matches a CIDR rule).
    Net(IpNet),
}

/// One allowed origin: scheme, host pattern and port (`None` = any port).
#[derive(Debug, Clone, PartialEq)]
pub struct OriginRule {
    scheme: String,
    host: HostPattern,
    port: Option<u16>,
    text: String,
}

impl OriginRule {
    /// Parses `scheme://host[:port]`, where host may be `*.domain`, an IP
    /// literal or a CIDR block (`10.0.0.0/8`, `[fd00::/8]`), and port may be
    /// `*`. Without a port the scheme's default port is meant.
    pub fn parse(text: &str) -> Result<OriginRule, OriginError> {
        let err = |reason: &str| OriginError {
            origin: text.to_owned(),
            reason: reason.to_owned(),
        };
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| err("expected scheme://host[:port]"))?;
        let scheme = scheme.to_ascii_lowercase();
        let default_port = match scheme.as_str() {
            "http" => 80,
            "https" => 443,
            _ => return Err(err("the scheme must be http or https")),
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains(['?', '#', '@']) || rest.is_empty() {
            return Err(err("an origin has no path, query, user or fragment"));
        }
        let (host, port, bracketed) =
            split_host_port(rest).ok_or_else(|| err("unbalanced brackets"))?;
        let port = match port {
            None => Some(default_port),
            Some("*") => None,
            Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => Some(
                p.parse::<u16>()
                    .map_err(|_| err("the port must be a number or *"))?,
            ),
            Some(_) => return Err(err("the port must be a number or *")),
        };
        // Names are read by the URL parser the HTTP client uses, so a rule
        // means what a request's URL means (case, IDNA, percent-escapes).
        let host = if let Some(domain) = host.strip_prefix("*.") {
            match url::Host::parse(domain) {
                Ok(url::Host::Domain(d)) if !d.contains('*') => {
                    HostPattern::Subdomains(format!(".{d}"))
                }
                _ => return Err(err("a wildcard must look like *.example.com")),
            }
        } else if let Ok(net) = host.parse::<IpNet>() {
            HostPattern::Net(net)
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            HostPattern::Net(IpNet::from(ip))
        } else {
            match url::Host::parse(host) {
                Ok(url::Host::Domain(d)) if !d.contains('*') => HostPattern::Name(d),
                Ok(url::Host::Ipv4(ip)) => HostPattern::Net(IpNet::from(IpAddr::V4(ip))),
                Ok(url::Host::Ipv6(ip)) => HostPattern::Net(IpNet::from(IpAddr::V6(ip))),
                _ => {
                    return Err(err(
                        "the host must be a name, *.domain, an IP address or a CIDR block",
                    ))
                }
            }
        };
        // A URL parser reads `[f]` as a bad IPv6 address, never as host `f`,
        // so a rule must not either.
        if bracketed && !matches!(host, HostPattern::Net(IpNet::V6(_))) {
            return Err(err("brackets enclose an IPv6 address or block only"));
        }
        Ok(OriginRule {
            scheme,
            host,
            port,
            text: text.to_owned(),
        })
    }

    pub fn matches(&self, url: &Url) -> bool {
        if url.scheme() != self.scheme {
            return false;
        }
        if let Some(port) = self.port {
            if url.port_or_known_default() != Some(port) {
                return false;
            }
        }
        match (&self.host, url.host()) {
            // Both sides come from the URL parser: lower case, ASCII.
            (HostPattern::Name(name), Some(url::Host::Domain(d))) => d == name,
            (HostPattern::Subdomains(suffix), Some(url::Host::Domain(d))) => {
                d.ends_with(suffix.as_str())
            }
            (HostPattern::Net(net), Some(url::Host::Ipv4(ip))) => net.contains(&IpAddr::V4(ip)),
            (HostPattern::Net(net), Some(url::Host::Ipv6(ip))) => net.contains(&IpAddr::V6(ip)),
            _ => false,
        }
    }

    /// Whether the rule names one origin: a host name or a single address,
    /// and a port (not `*.domain`, a block or `:*`).
    pub fn is_exact(&self) -> bool {
        let one_host = match &self.host {
            HostPattern::Name(_) => true,
            HostPattern::Subdomains(_) => false,
            HostPattern::Net(net) => net.prefix_len() == net.max_prefix_len(),
        };
        one_host && self.port.is_some()
    }

    /// The rule as the operator wrote it.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

/// Splits `host[:port]`, keeping CIDR slashes intact; says whether the host
/// was in brackets (which it returns without them).
fn split_host_port(s: &str) -> Option<(&str, Option<&str>, bool)> {
    if let Some(inner) = s.strip_prefix('[') {
        let (host, after) = inner.split_once(']')?;
        return match after {
            "" => Some((host, None, true)),
            p => Some((host, Some(p.strip_prefix(':')?), true)),
        };
    }
    match s.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') => Some((host, Some(port), false)),
        _ => Some((s, None, false)),
    }
}

/// How an outbound peer's certificate is checked: Prism's (a cluster's
/// `tls`) or the origins of a plugin (its `tls`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum TlsMode {
    /// The public web roots bundled with the client.
    #[default]
    System,
    /// Only the CA certificates in this PEM (or DER) file.
    CaFile(PathBuf),
    /// Exactly this certificate (PEM or DER), whatever its issuer, names or
    /// dates: the pin is the whole trust decision, which suits the
    /// self-signed certificates Prism and firewalls come with, often issued
    /// for an IP no one connects to.
    PinnedCert(PathBuf),
    /// No verification at all; for labs only.
    Insecure,
}

/// A header the host adds to requests for one origin.
#[derive(Debug, Clone)]
pub struct InjectedHeader {
    pub origin: OriginRule,
    pub name: http::HeaderName,
    pub value: Secret,
}

/// A session login: the host signs in to an origin with the operator's
/// username and password, and adds the token it gets to that origin's
/// requests. Neither the password nor the token reaches the plugin.
#[derive(Debug, Clone)]
pub struct Login {
    pub origin: OriginRule,
    /// Where to sign in; always an URL of `origin`.
    pub url: Url,
    pub send: LoginSend,
    pub username: String,
    pub password: Secret,
    /// The body's names for the username and password.
    pub username_field: String,
    pub password_field: String,
    /// Further fields of the body (`loginProviderName = "tmos"`).
    pub fields: Vec<(String, String)>,
    pub token: TokenAt,
    /// The header the token goes in, and what comes before it.
    pub header: http::HeaderName,
    pub prefix: String,
    /// Sign in again after this long, without waiting for a 401 or 403.
    pub lifetime: Option<std::time::Duration>,
}

/// How the username and password are sent to the login URL.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoginSend {
    /// `POST` a JSON object (BIG-IP's `/mgmt/shared/authn/login`).
    #[default]
    Json,
    /// `POST` an HTML form (PAN-OS `type=keygen`).
    Form,
    /// `POST` with no body and `Authorization: Basic` (Cisco FMC's
    /// `generatetoken`).
    Basic,
}

/// Where the token is in the login answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenAt {
    /// A JSON pointer into the body (`/token/token`).
    JsonPointer(String),
    /// A header of the answer (`X-auth-access-token`).
    Header(http::HeaderName),
    /// The text of the element at this path of an XML body
    /// (`/response/result/key`).
    XmlPath(Vec<String>),
}

/// A plugin's outbound policy.
#[derive(Debug, Clone, Default)]
pub struct OutboundPolicy {
    allow: Vec<OriginRule>,
    inject: Vec<InjectedHeader>,
    logins: Vec<Login>,
}

impl OutboundPolicy {
    pub fn new(allow: Vec<OriginRule>, inject: Vec<InjectedHeader>) -> OutboundPolicy {
        OutboundPolicy {
            allow,
            inject,
            logins: Vec::new(),
        }
    }

    pub fn with_logins(mut self, logins: Vec<Login>) -> OutboundPolicy {
        self.logins = logins;
        self
    }

    /// The login whose token `url`'s requests carry, with its index.
    pub fn login_for(&self, url: &Url) -> Option<(usize, &Login)> {
        self.logins
            .iter()
            .enumerate()
            .find(|(_, l)| l.origin.matches(url))
    }

    pub fn logins(&self) -> &[Login] {
        &self.logins
    }

    pub fn allows(&self, url: &Url) -> bool {
        self.rule_for(url).is_some()
    }

    /// The first allowlist rule that lets `url` through.
    pub fn rule_for(&self, url: &Url) -> Option<&OriginRule> {
        self.allow.iter().find(|rule| rule.matches(url))
    }

    /// Headers to add for `url`; never for an origin the rule does not
    /// match, so a redirect elsewhere does not carry the secret along.
    pub fn headers_for<'a>(&'a self, url: &'a Url) -> impl Iterator<Item = &'a InjectedHeader> {
        self.inject.iter().filter(move |h| h.origin.matches(url))
    }

    /// Every injected header name, so the plugin cannot set or override one.
    pub fn is_injected_name(&self, name: &http::HeaderName) -> bool {
        self.inject.iter().any(|h| h.name == *name) || self.logins.iter().any(|l| l.header == *name)
    }

    /// Every secret this policy can add, so responses can be scrubbed of
    /// echoes before the plugin sees them. (Session tokens are not known
    /// in advance: the caller adds the ones in use.)
    pub fn secrets(&self) -> impl Iterator<Item = &Secret> {
        self.inject
            .iter()
            .map(|h| &h.value)
            .chain(self.logins.iter().map(|l| &l.password))
    }

    pub fn allowed_origins(&self) -> impl Iterator<Item = &str> {
        self.allow.iter().map(OriginRule::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allows(rule: &str, url: &str) -> bool {
        OriginRule::parse(rule)
            .unwrap()
            .matches(&Url::parse(url).unwrap())
    }

    #[test]
    fn an_origin_without_a_port_means_the_default_port() {
        assert!(allows(
            "https://fw1.example.com",
            "https://FW1.example.com/api/"
        ));
        assert!(allows(
            "https://fw1.example.com:443",
            "https://fw1.example.com/api/"
        ));
        assert!(!allows(
            "https://fw1.example.com",
            "https://fw1.example.com:8443/"
        ));
        assert!(!allows(
            "https://fw1.example.com",
            "http://fw1.example.com/"
        ));
    }

    #[test]
    fn a_wildcard_matches_subdomains_but_not_the_apex_or_lookalikes() {
        assert!(allows("https://*.example.com", "https://a.b.example.com/"));
        assert!(!allows("https://*.example.com", "https://example.com/"));
        assert!(!allows("https://*.example.com", "https://evilexample.com/"));
    }

    #[test]
    fn a_cidr_matches_ip_literals_only() {
        assert!(allows("http://127.0.0.0/8:*", "http://127.0.0.5:9000/"));
        assert!(!allows("http://127.0.0.0/8:*", "http://10.0.0.1:9000/"));
        assert!(!allows("http://127.0.0.0/8:*", "http://localhost:9000/"));
        assert!(allows("http://[::1]:8080", "http://[::1]:8080/x"));
        assert!(allows("https://[fd00::/8]", "https://[fd12::1]/"));
    }

    #[test]
    fn rule_hosts_are_read_as_request_urls_are() {
        // Found by the origin_policy fuzz target: the `//m` of `*.//m` was
        // taken as part of a domain, where a URL parser reads host `m`.
        assert!(OriginRule::parse("https://*.//m").is_err());
        assert!(OriginRule::parse("https://x.example:+443").is_err());
        assert!(allows(
            "https://bücher.example",
            "https://xn--bcher-kva.example/"
        ));
        assert!(allows(
            "https://*.BÜCHER.example",
            "https://a.bücher.example/"
        ));
        assert!(allows("https://ex%61mple.com", "https://example.com/"));
        // Found by the origin_policy fuzz target: `[f]` was read as host `f`.
        for bracketed in [
            "https://[f]",
            "https://[f]:443",
            "http://[10.0.0.1]",
            "http://[10.0.0.0/8]",
        ] {
            let e = OriginRule::parse(bracketed).unwrap_err();
            assert!(e.reason.contains("IPv6"), "{bracketed}: {e}");
        }
        assert!(allows("https://[fd00::1]:8443", "https://[fd00::1]:8443/"));
    }

    #[test]
    fn malformed_origins_are_refused_with_the_reason() {
        for bad in [
            "fw1.example.com",
            "ftp://x",
            "https://x/path?q",
            "https://x:http",
            "https://a*.b",
        ] {
            let e = OriginRule::parse(bad).unwrap_err();
            assert_eq!(e.origin, bad);
        }
    }
}
