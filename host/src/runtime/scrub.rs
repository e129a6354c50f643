//! Keeping injected credentials out of what a plugin reads.
//!
//! A plugin never holds the secrets the host injects into its requests, but
//! a server (or a hostile plugin's own echo endpoint on an allowed origin)
//! can send them back: in a body, a header, or a redirect's `Location` that
//! then shows up in an error message. Replacing the literal value is not
//! enough — an echo may carry it base64- or hex-encoded, percent- or
//! JSON-escaped, or upper-cased. [`Scrubber`] knows every such spelling of
//! every secret of one policy and replaces each by `[redacted]`.

use base64::Engine as _;

use crate::secret::Secret;

/// What replaces a secret.
pub const REDACTED: &[u8] = b"[redacted]";

/// Encoded forms shorter than this are not searched for: they would match
/// by chance. Secrets are far longer.
const MIN_NEEDLE: usize = 6;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Needle {
    bytes: Vec<u8>,
    /// Compared ignoring ASCII case (text and hex); base64 is case-exact.
    fold_case: bool,
}

/// Every spelling of a set of secrets that [`Scrubber::scrub`] removes.
#[derive(Debug, Clone, Default)]
pub struct Scrubber {
    needles: Vec<Needle>,
}

impl Scrubber {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a Secret>) -> Scrubber {
        let mut needles = Vec::new();
        for secret in secrets {
            let raw = secret.expose().as_bytes();
            if raw.is_empty() {
                continue;
            }
            let mut add = |bytes: Vec<u8>, fold_case: bool| {
                if bytes.len() >= MIN_NEEDLE.min(raw.len()) {
                    let n = Needle { bytes, fold_case };
                    if !needles.contains(&n) {
                        needles.push(n);
                    }
                }
            };
            add(raw.to_vec(), true);
            add(hex::encode(raw).into_bytes(), true);
            for form in percent_encoded(raw) {
                add(form, true);
            }
            add(json_unicode_escaped(raw), true);
            if let Ok(json) = serde_json::to_string(secret.expose()) {
                add(json.trim_matches('"').as_bytes().to_vec(), true);
            }
            for engine in [
                &base64::engine::general_purpose::STANDARD_NO_PAD,
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            ] {
                for part in base64_cores(raw, engine) {
                    add(part, false);
                }
            }
        }
        // Longest first, so that a long form is not cut up by a short one.
        needles.sort_by_key(|n| std::cmp::Reverse(n.bytes.len()));
        Scrubber { needles }
    }

    /// `text` with every spelling of every secret replaced; `None` when it
    /// holds none (nothing copied).
    pub fn scrub(&self, text: &[u8]) -> Option<Vec<u8>> {
        let mut out: Option<Vec<u8>> = None;
        for needle in &self.needles {
            let current = out.as_deref().unwrap_or(text);
            if let Some(replaced) = replace_all(current, needle) {
                out = Some(replaced);
            }
        }
        out
    }

    /// [`Scrubber::scrub`] for text.
    pub fn scrub_str(&self, text: &str) -> String {
        match self.scrub(text.as_bytes()) {
            Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            None => text.to_owned(),
        }
    }
}

/// The form-encoding of the secret (only what must be escaped), and every
/// byte as `%XX`.
fn percent_encoded(raw: &[u8]) -> [Vec<u8>; 2] {
    let minimal: String = url::form_urlencoded::byte_serialize(raw).collect();
    let full = raw
        .iter()
        .flat_map(|b| format!("%{b:02X}").into_bytes())
        .collect();
    [minimal.into_bytes(), full]
}

/// Every character as `\uXXXX`, as a JSON encoder that escapes all
/// non-ASCII (or everything) writes it.
fn json_unicode_escaped(raw: &[u8]) -> Vec<u8> {
    String::from_utf8_lossy(raw)
        .encode_utf16()
        .flat_map(|u| format!("\\u{u:04x}").into_bytes())
        .collect()
}

/// The base64 characters that depend on the secret's bytes only, for each
/// of the three alignments the secret can have inside a longer encoded
/// string: an echo of `user:secret` in base64 contains one of them.
fn base64_cores(raw: &[u8], engine: &base64::engine::GeneralPurpose) -> Vec<Vec<u8>> {
    (0..3usize)
        .map(|shift| {
            let mut padded = vec![0u8; shift];
            padded.extend_from_slice(raw);
            let encoded = engine.encode(&padded).into_bytes();
            // Characters covering only filler bits at the start, and those
            // mixing the last secret bits with what follows, are dropped.
            let start = (shift * 8).div_ceil(6);
            let end = ((shift + raw.len()) * 8 / 6).min(encoded.len());
            encoded
                .get(start..end)
                .map(<[u8]>::to_vec)
                .unwrap_or_default()
        })
        .collect()
}

fn replace_all(haystack: &[u8], needle: &Needle) -> Option<Vec<u8>> {
    let n = &needle.bytes;
    if n.is_empty() || haystack.len() < n.len() {
        return None;
    }
    let eq = |a: &[u8]| {
        if needle.fold_case {
            a.eq_ignore_ascii_case(n)
        } else {
            a == n.as_slice()
        }
    };
    let mut out: Option<Vec<u8>> = None;
    let mut copied = 0;
    let mut i = 0;
    while i + n.len() <= haystack.len() {
        if eq(&haystack[i..i + n.len()]) {
            let o = out.get_or_insert_with(|| Vec::with_capacity(haystack.len()));
            o.extend_from_slice(&haystack[copied..i]);
            o.extend_from_slice(REDACTED);
            i += n.len();
            copied = i;
        } else {
            i += 1;
        }
    }
    let mut o = out?;
    o.extend_from_slice(&haystack[copied..]);
    Some(o)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "pan-KEY/never+seen=0123";

    fn scrubbed(text: &str) -> String {
        Scrubber::new([&Secret::new(KEY)]).scrub_str(text)
    }

    #[test]
    fn every_common_spelling_of_a_secret_is_redacted() {
        let b64 = base64::engine::general_purpose::STANDARD;
        let url_b64 = base64::engine::general_purpose::URL_SAFE;
        let spellings = [
            KEY.to_owned(),
            KEY.to_uppercase(),
            KEY.to_lowercase(),
            hex::encode(KEY),
            hex::encode(KEY).to_uppercase(),
            url::form_urlencoded::byte_serialize(KEY.as_bytes()).collect(),
            KEY.bytes().map(|b| format!("%{b:02x}")).collect(),
            KEY.chars()
                .map(|c| format!("\\u{:04X}", c as u32))
                .collect(),
            b64.encode(KEY),
            url_b64.encode(KEY),
            b64.encode(format!("admin:{KEY}")),
            b64.encode(format!("ab:{KEY}")),
            b64.encode(format!("x{KEY}yz")),
        ];
        for s in spellings {
            let text = format!("echo: <{s}> end");
            let out = scrubbed(&text);
            assert!(out.contains("[redacted]"), "{s} survived in {out}");
            assert!(!out.contains(&s), "{s} survived in {out}");
        }
    }

    #[test]
    fn text_without_a_secret_is_left_alone() {
        let text = "<response status=\"success\"><result>ok</result></response>";
        assert_eq!(
            Scrubber::new([&Secret::new(KEY)]).scrub(text.as_bytes()),
            None
        );
        assert_eq!(scrubbed(text), text);
    }
}
