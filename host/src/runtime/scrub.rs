//! Keeping injected credentials out of what a plugin reads.
//!
//! A plugin never holds the secrets the host injects into its requests, but
//! a server (or a hostile plugin's own echo endpoint on an allowed origin)
//! can send them back: in a body, a header, or a redirect's `Location` that
//! then shows up in an error message. Replacing the literal value is not
//! enough — an echo may carry it base64- or hex-encoded, percent- or
//! JSON-escaped, or upper-cased. [`Scrubber`] knows every such spelling of
//! every secret of one policy and replaces each by `[redacted]`. Escapes
//! can also be mixed, an encoder escaping only some characters (Python's
//! `quote` leaves `/`, PHP's JSON writes `\/`, .NET's `\u002B`, HTML
//! `&#43;`): the text is also read with every such escape decoded, and a
//! secret found there is redacted as spelled.

use aho_corasick::AhoCorasick;
use base64::Engine as _;

use crate::secret::Secret;

/// What replaces a secret.
pub const REDACTED: &[u8] = b"[redacted]";

/// Encoded forms shorter than this are not searched for: they would match
/// by chance. Secrets are far longer.
const MIN_NEEDLE: usize = 6;

/// Every spelling of a set of secrets that [`Scrubber::scrub`] removes.
///
/// Each set of needles is one automaton, so an answer is read once however
/// many spellings of however many secrets there are (a plugin with sign-ins
/// keeps scores of tokens): a search per needle over an 8 MiB answer, on
/// the async threads, took seconds.
#[derive(Debug, Clone, Default)]
pub struct Scrubber {
    /// Text and hex spellings, compared ignoring ASCII case.
    folded: Option<AhoCorasick>,
    /// Base64 spellings, case-exact.
    exact: Option<AhoCorasick>,
    /// The secrets as they are, for the text read with its escapes decoded
    /// (ignoring ASCII case).
    raw: Option<AhoCorasick>,
}

/// One automaton finding every occurrence of `needles`, overlapping ones too.
fn automaton(needles: &[Vec<u8>], fold_case: bool) -> Option<AhoCorasick> {
    if needles.is_empty() {
        return None;
    }
    let built = AhoCorasick::builder()
        .ascii_case_insensitive(fold_case)
        .build(needles);
    // Only a pattern set past the automaton's size limits fails to build:
    // secrets are a few hundred bytes each.
    Some(built.expect("the secrets' spellings build an automaton"))
}

/// Every range `automaton` finds in `text`, overlapping ones included.
fn ranges(automaton: &Option<AhoCorasick>, text: &[u8]) -> Vec<(usize, usize)> {
    automaton.as_ref().map_or_else(Vec::new, |a| {
        a.find_overlapping_iter(text)
            .map(|m| (m.start(), m.end()))
            .collect()
    })
}

/// `text` with each of `found` (ranges of it, in any order, overlapping or
/// not) replaced by one [`REDACTED`] per run of overlapping ranges.
fn redact(text: &[u8], mut found: Vec<(usize, usize)>) -> Option<Vec<u8>> {
    if found.is_empty() {
        return None;
    }
    found.sort_unstable();
    let mut out = Vec::with_capacity(text.len());
    let mut copied = 0;
    for (start, end) in found {
        // Overlapping finds (two secrets or spellings sharing text) are one
        // redaction.
        if start < copied {
            copied = copied.max(end);
            continue;
        }
        out.extend_from_slice(&text[copied..start]);
        out.extend_from_slice(REDACTED);
        copied = end;
    }
    out.extend_from_slice(&text[copied..]);
    Some(out)
}

impl Scrubber {
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a Secret>) -> Scrubber {
        // Text and hex are compared ignoring ASCII case; base64 is case-exact.
        let (mut folded, mut exact, mut raws) = (Vec::new(), Vec::new(), Vec::new());
        for secret in secrets {
            for raw in parts(secret.expose()) {
                let raw = raw.as_bytes();
                if raw.is_empty() {
                    continue;
                }
                raws.push(raw.to_vec());
                let add = |needles: &mut Vec<Vec<u8>>, bytes: Vec<u8>| {
                    if bytes.len() >= MIN_NEEDLE.min(raw.len()) && !needles.contains(&bytes) {
                        needles.push(bytes);
                    }
                };
                add(&mut folded, raw.to_vec());
                add(&mut folded, hex::encode(raw).into_bytes());
                for form in percent_encoded(raw) {
                    add(&mut folded, form);
                }
                add(&mut folded, json_unicode_escaped(raw));
                if let Ok(json) = serde_json::to_string(&String::from_utf8_lossy(raw)) {
                    add(&mut folded, json.trim_matches('"').as_bytes().to_vec());
                }
                for engine in [
                    &base64::engine::general_purpose::STANDARD_NO_PAD,
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                ] {
                    for part in base64_cores(raw, engine) {
                        add(&mut exact, part);
                    }
                }
            }
        }
        Scrubber {
            folded: automaton(&folded, true),
            exact: automaton(&exact, false),
            raw: automaton(&raws, true),
        }
    }

    /// `text` with every spelling of every secret replaced; `None` when it
    /// holds none (nothing copied).
    pub fn scrub(&self, text: &[u8]) -> Option<Vec<u8>> {
        let escaped = self.scrub_escaped(text);
        let current = escaped.as_deref().unwrap_or(text);
        let mut found = ranges(&self.folded, current);
        found.extend(ranges(&self.exact, current));
        redact(current, found).or(escaped)
    }

    /// [`Scrubber::scrub`] for text.
    pub fn scrub_str(&self, text: &str) -> String {
        match self.scrub(text.as_bytes()) {
            Some(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            None => text.to_owned(),
        }
    }

    /// `text` with each secret redacted that shows once its escapes are
    /// decoded, whatever mix of them spells it; `None` when none does.
    fn scrub_escaped(&self, text: &[u8]) -> Option<Vec<u8>> {
        if self.raw.is_none() || !text.iter().any(|b| matches!(b, b'%' | b'\\' | b'&')) {
            return None;
        }
        let decoded = Decoded::of(text);
        if !decoded.escaped {
            return None;
        }
        let found = ranges(&self.raw, &decoded.bytes)
            .into_iter()
            .map(|(start, end)| (decoded.origin(start).0, decoded.origin(end - 1).1))
            .collect();
        redact(text, found)
    }
}

/// A secret, and the parts of it a server may quote alone: the credential
/// of an `Authorization`-style value (`Bearer <token>`, `Basic <base64>`),
/// and for Basic its decoded `user:password` and the password. Parts
/// shorter than [`MIN_NEEDLE`] would match by chance and are left out.
fn parts(secret: &str) -> Vec<String> {
    let mut parts = vec![secret.to_owned()];
    let Some((scheme, credential)) = secret.split_once(' ') else {
        return parts;
    };
    let credential = credential.trim();
    let scheme_like = (1..=20).contains(&scheme.len())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !scheme_like || credential.contains(' ') {
        return parts;
    }
    parts.push(credential.to_owned());
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(credential)
            .ok()
            .and_then(|d| String::from_utf8(d).ok());
        if let Some(decoded) = decoded {
            if let Some((_, password)) = decoded.split_once(':') {
                parts.push(password.to_owned());
            }
            parts.push(decoded);
        }
    }
    parts.retain(|p| p == secret || p.len() >= MIN_NEEDLE);
    parts
}

/// A text read with its escapes decoded: `%XX`, JSON's `\uXXXX` (surrogate
/// pairs joined) and `\/ \" \\ \'`, HTML's `&#NN;`, `&#xHH;` and the five
/// named entities. Bytes outside escapes are kept, so most of a body is one
/// run between the escapes.
///
/// Where a decoded byte came from is found again by decoding forward from
/// the last mark before it: marks every [`MARK_EVERY`] decoded bytes cost a
/// few kilobytes for the largest answer, where a record per escape would
/// cost many times the answer in a body made of escapes.
struct Decoded<'t> {
    text: &'t [u8],
    bytes: Vec<u8>,
    /// (decoded position, text position) at an element's start, about
    /// every [`MARK_EVERY`] decoded bytes, from (0, 0).
    marks: Vec<(usize, usize)>,
    escaped: bool,
}

const MARK_EVERY: usize = 4096;

/// One element of a text: an escape, or a byte kept as it is.
fn element_at(text: &[u8], i: usize, buf: &mut [u8; 4]) -> (usize, usize) {
    match escape_at(text, i) {
        Some((Spelled::Byte(b), len)) => {
            buf[0] = b;
            (1, len)
        }
        Some((Spelled::Char(c), len)) => (c.encode_utf8(buf).len(), len),
        None => {
            buf[0] = text[i];
            (1, 1)
        }
    }
}

impl<'t> Decoded<'t> {
    fn of(text: &'t [u8]) -> Decoded<'t> {
        let mut bytes = Vec::with_capacity(text.len());
        let mut marks = vec![(0, 0)];
        let mut escaped = false;
        let mut i = 0;
        let mut buf = [0u8; 4];
        while i < text.len() {
            if bytes.len() >= marks.last().map_or(0, |m| m.0) + MARK_EVERY {
                marks.push((bytes.len(), i));
            }
            let (decoded, spelled) = element_at(text, i, &mut buf);
            escaped |= spelled > 1;
            bytes.extend_from_slice(&buf[..decoded]);
            i += spelled;
        }
        Decoded {
            text,
            bytes,
            marks,
            escaped,
        }
    }

    /// The range of the text the decoded byte at `at` came from.
    fn origin(&self, at: usize) -> (usize, usize) {
        let n = self.marks.partition_point(|(d, _)| *d <= at);
        let (mut d, mut t) = self.marks[n.saturating_sub(1)];
        let mut buf = [0u8; 4];
        loop {
            let (decoded, spelled) = element_at(self.text, t, &mut buf);
            if at < d + decoded {
                return (t, t + spelled);
            }
            d += decoded;
            t += spelled;
        }
    }
}

/// What an escape stands for: `%XX` is a byte (of UTF-8 or not), the
/// others a character.
enum Spelled {
    Byte(u8),
    Char(char),
}

/// What an escape at `text[i..]` spells, and the escape's length.
fn escape_at(text: &[u8], i: usize) -> Option<(Spelled, usize)> {
    let rest = &text[i..];
    // Digits only: `from_str_radix` would take a sign too.
    let number = |s: &[u8], radix: u32| -> Option<u32> {
        let digits =
            !s.is_empty() && s.len() <= 8 && s.iter().all(|b| (*b as char).is_digit(radix));
        digits.then(|| u32::from_str_radix(std::str::from_utf8(s).ok()?, radix).ok())?
    };
    let hex = |s: &[u8]| number(s, 16);
    match rest.first()? {
        b'%' => {
            let b = hex(rest.get(1..3)?)?;
            Some((Spelled::Byte(b as u8), 3))
        }
        b'\\' => match rest.get(1)? {
            b'/' | b'"' | b'\\' | b'\'' => Some((Spelled::Char(char::from(rest[1])), 2)),
            b'u' => {
                let unit = hex(rest.get(2..6)?)?;
                if (0xD800..0xDC00).contains(&unit) {
                    let low = rest
                        .get(6..8)
                        .filter(|p| p == b"\\u")
                        .and_then(|_| hex(rest.get(8..12)?))?;
                    if !(0xDC00..0xE000).contains(&low) {
                        return None;
                    }
                    let ch = char::from_u32(0x10000 + ((unit - 0xD800) << 10) + (low - 0xDC00))?;
                    return Some((Spelled::Char(ch), 12));
                }
                Some((Spelled::Char(char::from_u32(unit)?), 6))
            }
            _ => None,
        },
        b'&' => {
            let end = rest.iter().take(12).position(|&b| b == b';')?;
            let name = &rest[1..end];
            let ch = match name {
                b"amp" => '&',
                b"lt" => '<',
                b"gt" => '>',
                b"quot" => '"',
                b"apos" => '\'',
                [b'#', b'x' | b'X', digits @ ..] => char::from_u32(hex(digits)?)?,
                [b'#', digits @ ..] => char::from_u32(number(digits, 10)?)?,
                _ => return None,
            };
            Some((Spelled::Char(ch), end + 1))
        }
        _ => None,
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

    /// Encoders that escape some characters and not others, and escapes
    /// mixed in one spelling: found once the text is read decoded, and
    /// redacted as it was spelled, the text around it kept.
    #[test]
    fn a_secret_partly_escaped_is_redacted_as_spelled() {
        let spellings = [
            // Python's `quote`: `/` left as it is.
            "pan-KEY/never%2Bseen%3D0123".to_owned(),
            // PHP's json_encode: `/` escaped, the rest not.
            "pan-KEY\\/never+seen=0123".to_owned(),
            // .NET's JavaScriptEncoder: `+` escaped.
            "pan-KEY/never\\u002Bseen\\u003D0123".to_owned(),
            // HTML character references, decimal and hex.
            "pan-KEY&#47;never&#x2b;seen&#61;0123".to_owned(),
            // All of them at once, in lower case.
            "PAN-key\\/never%2bseen&#x3D;0123".to_owned(),
        ];
        for s in spellings {
            let text = format!("echo: <{s}> end");
            let out = scrubbed(&text);
            assert_eq!(out, "echo: <[redacted]> end", "{s}");
        }
        // A secret of characters outside ASCII, its UTF-8 bytes escaped,
        // some by JSON (a surrogate pair) and some by percent-encoding.
        let secret = Secret::new("clé-🔑-secrète");
        let text = "x clé-\\ud83d\\udd11-secr%C3%A8te y";
        assert_eq!(Scrubber::new([&secret]).scrub_str(text), "x [redacted] y");
    }

    /// Each character of the secret spelled any of five ways, amid text
    /// made of the same escapes' pieces: always redacted, never a panic.
    #[test]
    fn any_mix_of_escapes_is_redacted_and_broken_ones_are_harmless() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(16);
        let scrubber = Scrubber::new([&Secret::new(KEY)]);
        // No lone `\\`: before the secret it would escape the backslash of
        // a first `\\u`, and the text would spell it no more.
        let junk = [
            "%", "%2", "%zz", "\\u", "\\ud83d", "&#", "&#x;", "&amp", ";", "a", "é",
        ];
        for _ in 0..2_000 {
            let spelled: String = KEY
                .chars()
                .map(|c| match rng.random_range(0..5) {
                    0 => c.to_string(),
                    1 => format!("%{:02X}", c as u32),
                    2 => format!("\\u{:04x}", c as u32),
                    3 => format!("&#{};", c as u32),
                    _ => format!("&#x{:X};", c as u32),
                })
                .collect();
            let noise = |rng: &mut rand::rngs::StdRng| -> String {
                (0..rng.random_range(0..6))
                    .map(|_| junk[rng.random_range(0..junk.len())])
                    .collect()
            };
            let (before, after) = (noise(&mut rng), noise(&mut rng));
            let text = format!("{before}{spelled}{after}");
            let out = scrubber.scrub_str(&text);
            assert!(
                out.contains("[redacted]") && !out.contains(&spelled),
                "{text} -> {out}"
            );
            // Pieces of escapes alone: no panic, and nothing taken.
            let pieces = noise(&mut rng) + &noise(&mut rng);
            assert_eq!(scrubber.scrub(pieces.as_bytes()), None, "{pieces}");
        }
    }

    #[test]
    fn a_secret_spelled_with_escapes_far_into_a_body_of_escapes_is_redacted_where_it_is() {
        let scrubber = Scrubber::new([&Secret::new(KEY)]);
        let spelled = "pan-KEY\\/never%2Bseen&#61;0123";
        let text = format!("{}{spelled}.{}", "\\/".repeat(10_000), "%41".repeat(3_000));
        let out = scrubber.scrub_str(&text);
        assert_eq!(
            out,
            format!("{}[redacted].{}", "\\/".repeat(10_000), "%41".repeat(3_000))
        );
    }

    #[test]
    fn the_credential_of_an_authorization_value_is_redacted_on_its_own() {
        use base64::Engine as _;
        let bearer = Secret::new("Bearer eyJhbGciOi.token.part");
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("svc-prismhook:s3cret-pass")
        );
        let basic = Secret::new(basic);
        let scrubber = Scrubber::new([&bearer, &basic]);
        for echoed in [
            "invalid token eyJhbGciOi.token.part",
            &format!(
                "bad credentials {}",
                base64::engine::general_purpose::STANDARD.encode("svc-prismhook:s3cret-pass")
            ),
            "user svc-prismhook:s3cret-pass refused",
            "password s3cret-pass is wrong",
        ] {
            let out = scrubber.scrub_str(echoed);
            assert!(out.contains("[redacted]"), "{echoed} -> {out}");
            assert!(
                !out.contains("s3cret") && !out.contains("token.part"),
                "{out}"
            );
        }
        // A scheme alone, or words with spaces, are not secrets of their own.
        assert_eq!(scrubber.scrub(b"send a Bearer token, Basic auth"), None);
    }

    #[test]
    fn escapes_that_spell_no_secret_are_left_as_they_are() {
        let text = "a %2B b \\/ c &amp; d %+1 &#+43; \\ud800 \\u00zz &unknown; e";
        assert_eq!(
            Scrubber::new([&Secret::new(KEY)]).scrub(text.as_bytes()),
            None
        );
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
