//! Any origin rule and any URL: the rule parser never panics, and a rule it
//! accepts decides every URL as a simple reference does, which leans on the
//! `url` crate (the same parser the host's HTTP client uses) to read the
//! rule's host and port instead of parsing them itself.
//!
//! Input: the rule, NUL, the URL.

#![no_main]

use std::net::IpAddr;

use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;
use prismhook_core::policy::OriginRule;
use url::{Host, Url};

/// What the operator meant by `rule` for `url`; `None` when the reference
/// cannot read the rule at all.
fn reference(rule: &str, url: &Url) -> Option<bool> {
    let (scheme, rest) = rule.split_once("://")?;
    let rest = rest.trim_end_matches('/');
    let (rest, any_port) = match rest.strip_suffix(":*") {
        Some(rest) => (rest, true),
        None => (rest, false),
    };
    let port_ok = |wanted: Option<u16>| any_port || url.port_or_known_default() == wanted;
    if let Some(domain) = rest.strip_prefix("*.") {
        let apex = Url::parse(&format!("{scheme}://{domain}/")).ok()?;
        let Some(Host::Domain(apex_host)) = apex.host() else {
            return None;
        };
        let host_ok =
            matches!(url.host(), Some(Host::Domain(d)) if d.ends_with(&format!(".{apex_host}")));
        return Some(
            url.scheme() == apex.scheme() && host_ok && port_ok(apex.port_or_known_default()),
        );
    }
    if rest.contains('/') {
        // A CIDR block, bracketed when IPv6, with an optional port.
        let (net, port) = match rest.strip_prefix('[') {
            Some(inner) => {
                let (net, after) = inner.split_once(']')?;
                (net, after.strip_prefix(':'))
            }
            None => match rest.rsplit_once(':') {
                Some((net, port)) if !net.contains(':') => (net, Some(port)),
                _ => (rest, None),
            },
        };
        let net: IpNet = net.parse().ok()?;
        let origin = Url::parse(&format!("{scheme}://example.invalid/")).ok()?;
        let wanted = match port {
            Some(p) => Some(p.parse::<u16>().ok()?),
            None => origin.port_or_known_default(),
        };
        let ip = match url.host() {
            Some(Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        };
        let host_ok = ip.is_some_and(|ip| net.contains(&ip));
        return Some(url.scheme() == origin.scheme() && host_ok && port_ok(wanted));
    }
    // An IP literal may be written without brackets when it has no port.
    let rest = match rest.parse::<IpAddr>() {
        Ok(IpAddr::V6(ip)) => format!("[{ip}]"),
        _ => rest.to_owned(),
    };
    let origin = Url::parse(&format!("{scheme}://{rest}/")).ok()?;
    Some(
        url.scheme() == origin.scheme()
            && url.host() == origin.host()
            && port_ok(origin.port_or_known_default()),
    )
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some((rule_text, url_text)) = text.split_once('\0') else {
        return;
    };
    let Ok(rule) = OriginRule::parse(rule_text) else {
        return;
    };
    assert_eq!(rule.as_str(), rule_text);
    let Ok(url) = Url::parse(url_text) else {
        return;
    };
    let decided = rule.matches(&url);
    match reference(rule_text, &url) {
        Some(expected) => assert_eq!(
            decided, expected,
            "rule {:?} and {url} disagree with the reference",
            rule_text
        ),
        // A rule the reference cannot read must not let anything through.
        None => assert!(!decided, "rule {:?} allows {url}", rule_text),
    }
});
