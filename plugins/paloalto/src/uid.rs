//! The requests the plugin sends: User-ID `uid-message`s and the
//! registered-IP query, as `application/x-www-form-urlencoded` bodies.
//!
//! One message per batch keeps the firewall's load and the request count
//! low; PAN-OS takes POST bodies up to 5 MB, so a diff is split only when
//! its encoded body would pass `max_message_bytes`. Sizes are counted on the
//! encoded body, because that is what the limit applies to and markup
//! grows about threefold when percent-encoded.
//!
//! Every IP and tag is XML-escaped: tags are sanitised already, but the
//! escaping must not depend on that.

use crate::config::Config;
use crate::state::Diff;

/// How many entries the firewall returns per registered-IP page.
pub const PAGE_SIZE: usize = 500;

/// Where a document goes: as it is, percent-encoded into a form body, or
/// only counted. Writing, encoding and measuring share one description of
/// the markup, so the sizes `split` counts are the bodies' sizes by
/// construction, and neither builds the XML as a string first (it was most
/// of a batch's encoding time in Wasm).
trait Sink {
    /// Writes markup as given.
    fn raw(&mut self, text: &str);

    /// Writes text for XML content and attribute values alike, escaped.
    fn text(&mut self, text: &str) {
        let mut rest = text;
        // Bytes, not chars: the five are ASCII, and a byte scan is what is fast in Wasm.
        while let Some(at) = rest.bytes().position(|b| entity(b).is_some()) {
            self.raw(&rest[..at]);
            self.raw(entity(rest.as_bytes()[at]).unwrap_or_default());
            rest = &rest[at + 1..];
        }
        self.raw(rest);
    }
}

/// The XML entity that stands for `byte`, if it needs one.
const fn entity(byte: u8) -> Option<&'static str> {
    match byte {
        b'&' => Some("&amp;"),
        b'<' => Some("&lt;"),
        b'>' => Some("&gt;"),
        b'"' => Some("&quot;"),
        b'\'' => Some("&apos;"),
        _ => None,
    }
}

impl Sink for String {
    fn raw(&mut self, text: &str) {
        self.push_str(text);
    }
}

/// `application/x-www-form-urlencoded` encoding of what is written.
struct FormEncoded(Vec<u8>);

impl Sink for FormEncoded {
    fn raw(&mut self, text: &str) {
        const HEX: &[u8; 16] = b"0123456789ABCDEF";
        self.0.reserve(3 * text.len());
        for &b in text.as_bytes() {
            match FORM[usize::from(b)] {
                Form::Keep => self.0.push(b),
                Form::Plus => self.0.push(b'+'),
                Form::Escape => self.0.extend_from_slice(&[
                    b'%',
                    HEX[usize::from(b >> 4)],
                    HEX[usize::from(b & 15)],
                ]),
            }
        }
    }
}

impl FormEncoded {
    fn into_string(self) -> String {
        String::from_utf8(self.0).expect("form encoding is ASCII")
    }
}

/// The length of what is written, form-encoded.
#[derive(Default)]
struct EncodedLen(usize);

impl Sink for EncodedLen {
    fn raw(&mut self, text: &str) {
        self.0 += encoded_len(text);
    }

    fn text(&mut self, text: &str) {
        self.0 += text
            .bytes()
            .map(|b| usize::from(ESCAPED_LEN[usize::from(b)]))
            .sum::<usize>();
    }
}

/// Per byte, the length of its form encoding once XML-escaped.
const ESCAPED_LEN: [u8; 256] = {
    let mut table = [0; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        table[b] = match entity(byte) {
            Some(entity) => const_encoded_len(entity.as_bytes()),
            None => const_encoded_len(&[byte]),
        };
        b += 1;
    }
    table
};

const fn const_encoded_len(bytes: &[u8]) -> u8 {
    let mut len = 0;
    let mut i = 0;
    while i < bytes.len() {
        len += match FORM[bytes[i] as usize] {
            Form::Keep | Form::Plus => 1,
            Form::Escape => 3,
        };
        i += 1;
    }
    len
}

#[derive(Clone, Copy)]
enum Form {
    Keep,
    Plus,
    Escape,
}

/// How form encoding writes each byte, looked up rather than tested.
const FORM: [Form; 256] = {
    let mut table = [Form::Escape; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        if byte == b' ' {
            table[b] = Form::Plus;
        } else if byte.is_ascii_alphanumeric() || matches!(byte, b'*' | b'-' | b'.' | b'_') {
            table[b] = Form::Keep;
        }
        b += 1;
    }
    table
};

/// The length of `text` form-encoded, without encoding it.
fn encoded_len(text: &str) -> usize {
    text.bytes()
        .map(|b| usize::from(const_encoded_len(&[b])))
        .sum()
}

/// A form body: `type=…&cmd=…` plus `vsys` and `target` when configured;
/// `cmd` writes the command's XML, which is encoded as it is written.
fn form_body(config: &Config, kind: &str, cmd: impl FnOnce(&mut FormEncoded)) -> String {
    let mut out = FormEncoded(Vec::new());
    // The field names and `kind` are unreserved: they go in as they are.
    out.0
        .extend_from_slice(format!("type={kind}&cmd=").as_bytes());
    cmd(&mut out);
    for (name, value) in [("vsys", &config.vsys), ("target", &config.target)] {
        if let Some(value) = value {
            out.0.extend_from_slice(format!("&{name}=").as_bytes());
            out.raw(value);
        }
    }
    out.into_string()
}

/// The bytes [`form_body`] adds around the encoded command.
fn form_overhead(config: &Config, kind: &str) -> usize {
    let mut bytes = "type=&cmd=".len() + kind.len();
    for (name, value) in [("vsys", &config.vsys), ("target", &config.target)] {
        if let Some(value) = value {
            bytes += "&=".len() + name.len() + encoded_len(value);
        }
    }
    bytes
}

/// The body asking for one page of registered IPs (`start` is 1-based).
pub fn registered_ip_query(config: &Config, start: usize) -> String {
    let cmd = format!(
        "<show><object><registered-ip><limit>{PAGE_SIZE}</limit><start-point>{start}</start-point></registered-ip></object></show>"
    );
    form_body(config, "op", |out| out.raw(&cmd))
}

const HEAD: &str = "<uid-message><version>1.0</version><type>update</type><payload>";
const TAIL: &str = "</payload></uid-message>";

/// One `uid-message`'s content: `(ip, tags)` entries per section, borrowed
/// from the diff it was split from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message<'a> {
    pub register: Vec<(&'a str, Vec<&'a str>)>,
    pub unregister: Vec<(&'a str, Vec<&'a str>)>,
}

/// The opening tag of a member: register members carry the timeout.
fn member_open(register: bool, timeout: u64) -> String {
    if register {
        format!("<member timeout=\"{timeout}\">")
    } else {
        "<member>".to_owned()
    }
}

fn write_member(out: &mut impl Sink, member_open: &str, tag: &str) {
    out.raw(member_open);
    out.text(tag);
    out.raw("</member>");
}

fn write_entry<'t>(
    out: &mut impl Sink,
    ip: &str,
    member_open: &str,
    tags: impl IntoIterator<Item = &'t str>,
) {
    out.raw("<entry ip=\"");
    out.text(ip);
    out.raw("\"><tag>");
    for tag in tags {
        write_member(out, member_open, tag);
    }
    out.raw("</tag></entry>");
}

/// A section, `register` or `unregister`, around what `entries` writes.
fn write_section<S: Sink>(out: &mut S, name: &str, entries: impl FnOnce(&mut S)) {
    out.raw("<");
    out.raw(name);
    out.raw(">");
    entries(out);
    out.raw("</");
    out.raw(name);
    out.raw(">");
}

impl Message<'_> {
    fn is_empty(&self) -> bool {
        self.register.is_empty() && self.unregister.is_empty()
    }

    fn write(&self, out: &mut impl Sink, timeout: u64) {
        out.raw(HEAD);
        // Unregisters first: at the platform's limit of registered IPs they
        // make the room the registers need. A diff's pairs are disjoint, so
        // the order changes nothing else.
        for (register, section, entries) in [
            (false, "unregister", &self.unregister),
            (true, "register", &self.register),
        ] {
            if entries.is_empty() {
                continue;
            }
            let member = member_open(register, timeout);
            write_section(out, section, |out| {
                for (ip, tags) in entries {
                    write_entry(out, ip, &member, tags.iter().copied());
                }
            });
        }
        out.raw(TAIL);
    }

    /// The `uid-message` document; register members carry `timeout`.
    pub fn to_xml(&self, timeout: u64) -> String {
        let mut xml = String::new();
        self.write(&mut xml, timeout);
        xml
    }
}

/// Splits a diff into messages whose encoded bodies each stay within
/// `config.max_message_bytes`. An IP's tags may be spread over two
/// messages; every `(ip, tag)` pair appears exactly once.
pub fn split<'a>(config: &Config, diff: &'a Diff) -> Vec<Message<'a>> {
    let timeout = config.registration_timeout;
    let encoded = |write: &dyn Fn(&mut EncodedLen)| {
        let mut len = EncodedLen::default();
        write(&mut len);
        len.0
    };
    // A message with both sections open is the fixed cost of each.
    let fixed = form_overhead(config, "user-id")
        + encoded(&|out| {
            out.raw(HEAD);
            write_section(out, "register", |_| {});
            write_section(out, "unregister", |_| {});
            out.raw(TAIL);
        });

    let mut messages = Vec::new();
    let mut current = Message::default();
    let mut size = fixed;
    // Unregisters first, in the first messages, as in each message.
    for (register, side) in [(false, &diff.unregister), (true, &diff.register)] {
        let member = member_open(register, timeout);
        let member_cost = encoded(&|out| write_member(out, &member, ""));
        for (ip, tags) in side {
            let entry_cost = encoded(&|out| write_entry(out, ip, &member, []));
            let mut open = false;
            for tag in tags {
                let cost = member_cost + encoded(&|out| out.text(tag));
                if size + cost + if open { 0 } else { entry_cost } > config.max_message_bytes
                    && !current.is_empty()
                {
                    messages.push(std::mem::take(&mut current));
                    size = fixed;
                    open = false;
                }
                let entries = if register {
                    &mut current.register
                } else {
                    &mut current.unregister
                };
                match entries.last_mut() {
                    Some((_, members)) if open => members.push(tag.as_str()),
                    _ => {
                        entries.push((ip.as_str(), vec![tag.as_str()]));
                        size += entry_cost;
                        open = true;
                    }
                }
                size += cost;
            }
        }
    }
    if !current.is_empty() {
        messages.push(current);
    }
    messages
}

/// The form body that sends one message.
pub fn uid_body(config: &Config, message: &Message) -> String {
    let timeout = config.registration_timeout;
    form_body(config, "user-id", |out| message.write(out, timeout))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::tags::IpTags;

    fn config(json: &str) -> Config {
        Config::parse(json).unwrap()
    }

    fn fixture(name: &str) -> String {
        let path = format!(
            "{}/../../tests/fixtures/panos/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// The fixture with the indentation between tags removed.
    fn compact(xml: &str) -> String {
        xml.lines().map(str::trim).collect()
    }

    fn ip_tags(entries: &[(&str, &[&str])]) -> IpTags {
        entries
            .iter()
            .map(|(ip, t)| {
                (
                    (*ip).to_owned(),
                    t.iter().map(|s| (*s).to_owned()).collect(),
                )
            })
            .collect()
    }

    fn decode_form(body: &str) -> Vec<(String, String)> {
        body.split('&')
            .map(|pair| {
                let (name, value) = pair.split_once('=').unwrap();
                let bytes = value.as_bytes();
                let mut out = Vec::new();
                let mut i = 0;
                while i < bytes.len() {
                    match bytes[i] {
                        b'+' => out.push(b' '),
                        b'%' => {
                            out.push(u8::from_str_radix(&value[i + 1..i + 3], 16).unwrap());
                            i += 2;
                        }
                        b => out.push(b),
                    }
                    i += 1;
                }
                (name.to_owned(), String::from_utf8(out).unwrap())
            })
            .collect()
    }

    #[test]
    fn register_and_unregister_messages_match_the_library_fixtures() {
        let config = config(r#"{"firewall": "https://fw"}"#);
        let web = "ntnx.PC-pc1.CL-ncn-dev-sandbox.AppTier.Web";
        let register = Diff {
            register: ip_tags(&[
                ("10.23.129.96", &[web, "ntnx.vm.web-01"]),
                ("10.40.142.61", &[web]),
            ]),
            unregister: IpTags::new(),
        };
        let messages = split(&config, &register);
        assert_eq!(messages.len(), 1);
        assert_eq!(messages[0].to_xml(0), compact(&fixture("uid_register.xml")));

        let unregister = Diff {
            register: IpTags::new(),
            unregister: ip_tags(&[("10.23.129.96", &[web, "ntnx.vm.web-01"])]),
        };
        assert_eq!(
            split(&config, &unregister)[0].to_xml(0),
            compact(&fixture("uid_unregister.xml"))
        );
    }

    #[test]
    fn register_members_carry_the_configured_timeout() {
        let config = config(r#"{"firewall": "https://fw", "registration_timeout": 3600}"#);
        let diff = Diff {
            register: ip_tags(&[("10.0.0.1", &["ntnx.a"])]),
            unregister: ip_tags(&[("10.0.0.2", &["ntnx.b"])]),
        };
        let xml = split(&config, &diff)[0].to_xml(config.registration_timeout);
        assert_eq!(
            xml,
            "<uid-message><version>1.0</version><type>update</type><payload>\
             <unregister><entry ip=\"10.0.0.2\"><tag><member>ntnx.b</member></tag></entry></unregister>\
             <register><entry ip=\"10.0.0.1\"><tag><member timeout=\"3600\">ntnx.a</member></tag></entry></register>\
             </payload></uid-message>"
        );
    }

    #[test]
    fn names_and_values_are_xml_escaped() {
        let message = Message {
            register: vec![("1.2.3.4\"/><x a=\"", vec!["x'\"]<&>"])],
            unregister: vec![],
        };
        let xml = message.to_xml(0);
        assert!(
            xml.contains("<entry ip=\"1.2.3.4&quot;/&gt;&lt;x a=&quot;\">"),
            "{xml}"
        );
        assert!(
            xml.contains(">x&apos;&quot;]&lt;&amp;&gt;</member>"),
            "{xml}"
        );
        let plain = Message {
            register: vec![("1.2.3.4", vec!["x"])],
            unregister: vec![],
        };
        assert_eq!(
            xml.matches('<').count(),
            plain.to_xml(0).matches('<').count(),
            "injected markup: {xml}"
        );
    }

    #[test]
    fn the_form_body_encodes_cmd_and_adds_vsys_and_target() {
        let config = config(r#"{"firewall": "https://fw", "vsys": "vsys1", "target": "0071"}"#);
        let message = Message {
            register: vec![("10.0.0.1", vec!["ntnx.a b&c"])],
            unregister: vec![],
        };
        let body = uid_body(&config, &message);
        assert!(
            body.starts_with("type=user-id&cmd=%3Cuid-message%3E"),
            "{body}"
        );
        let fields = decode_form(&body);
        assert_eq!(fields[0], ("type".into(), "user-id".into()));
        assert_eq!(fields[1], ("cmd".into(), message.to_xml(0)));
        assert_eq!(fields[2], ("vsys".into(), "vsys1".into()));
        assert_eq!(fields[3], ("target".into(), "0071".into()));
    }

    fn form_encode(text: &str) -> String {
        let mut out = FormEncoded(Vec::new());
        out.raw(text);
        out.into_string()
    }

    #[test]
    fn form_encoding_keeps_unreserved_bytes_and_escapes_every_other_byte() {
        assert_eq!(form_encode("aZ09*-._"), "aZ09*-._");
        assert_eq!(form_encode("a b"), "a+b");
        assert_eq!(form_encode("<x a=\"1/2\">&"), "%3Cx+a%3D%221%2F2%22%3E%26");
        assert_eq!(form_encode("é\u{7f}\n"), "%C3%A9%7F%0A");
        let all: String = (0u8..128).map(char::from).collect();
        assert_eq!(form_encode(&all).len(), encoded_len(&all));
    }

    #[test]
    fn the_registered_ip_query_pages_by_500() {
        let config = config(r#"{"firewall": "https://fw"}"#);
        let fields = decode_form(&registered_ip_query(&config, 501));
        assert_eq!(fields[0].1, "op");
        assert_eq!(
            fields[1].1,
            "<show><object><registered-ip><limit>500</limit><start-point>501</start-point></registered-ip></object></show>"
        );
    }

    #[test]
    fn a_diff_is_split_only_when_the_body_would_pass_max_message_bytes() {
        let tags: Vec<String> = (0..5)
            .map(|i| format!("ntnx.Category{i}.Value{i}"))
            .collect();
        let tag_refs: Vec<&str> = tags.iter().map(String::as_str).collect();
        let ips: Vec<String> = (0..200)
            .map(|i| format!("10.1.{}.{}", i / 250, i % 250))
            .collect();
        let diff = Diff {
            register: ips
                .iter()
                .map(|ip| (ip.clone(), tags.iter().cloned().collect()))
                .collect(),
            unregister: ip_tags(&[("10.9.9.9", &tag_refs)]),
        };

        let roomy = config(r#"{"firewall": "https://fw"}"#);
        assert_eq!(
            split(&roomy, &diff).len(),
            1,
            "far below the limit: one message"
        );

        let tight =
            config(r#"{"firewall": "https://fw", "vsys": "vsys1", "max_message_bytes": 4096}"#);
        let messages = split(&tight, &diff);
        assert!(messages.len() > 10, "{} messages", messages.len());
        let mut seen = (BTreeSet::new(), BTreeSet::new());
        for message in &messages {
            let body = uid_body(&tight, message);
            assert!(body.len() <= 4096, "a body of {} bytes", body.len());
            for (ip, tags) in &message.register {
                for tag in tags {
                    assert!(seen.0.insert((*ip, *tag)), "sent twice");
                }
            }
            for (ip, tags) in &message.unregister {
                for tag in tags {
                    assert!(seen.1.insert((*ip, *tag)), "sent twice");
                }
            }
        }
        assert_eq!(seen.0.len(), 200 * 5);
        assert_eq!(seen.1.len(), 5);
        let full = messages
            .iter()
            .map(|m| uid_body(&tight, m).len())
            .max()
            .unwrap();
        assert!(
            full > 4096 - 200,
            "messages are filled up to the limit, the largest is {full}"
        );
    }

    #[test]
    fn split_counts_a_body_to_the_byte() {
        // Above the smallest limit allowed, with text that needs escaping twice.
        let register: Vec<(String, Vec<&str>)> = (0..40)
            .map(|i| (format!("10.0.0.{i}"), vec!["ntnx.a b&c", "ntnx.<d>\"é"]))
            .collect();
        let register: Vec<(&str, &[&str])> = register
            .iter()
            .map(|(ip, tags)| (ip.as_str(), tags.as_slice()))
            .collect();
        let diff = Diff {
            register: ip_tags(&register),
            unregister: ip_tags(&[("10.0.1.2", &["ntnx.'e'"])]),
        };
        let base = r#""firewall": "https://fw", "vsys": "vsys 1", "registration_timeout": 60"#;
        let roomy = config(&format!("{{{base}}}"));
        let whole = uid_body(&roomy, &split(&roomy, &diff)[0]);
        assert!(whole.len() > 4096, "{} bytes", whole.len());
        let limit = |bytes: usize| config(&format!(r#"{{{base}, "max_message_bytes": {bytes}}}"#));
        assert_eq!(
            split(&limit(whole.len()), &diff).len(),
            1,
            "a body of exactly the limit fits"
        );
        assert_eq!(
            split(&limit(whole.len() - 1), &diff).len(),
            2,
            "one byte less does not"
        );
    }

    #[test]
    fn an_empty_diff_makes_no_message() {
        let config = config(r#"{"firewall": "https://fw"}"#);
        assert!(split(&config, &Diff::default()).is_empty());
    }
}
