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

/// Escapes text for XML content and attribute values alike.
pub fn escape_xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'*' | b'-' | b'.' | b'_')
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub fn form_encode(text: &str) -> String {
    // A uid-message is mostly markup, so most bytes are escaped: by table,
    // not through `format!` (a formatter and an allocation per byte were a
    // tenth of a batch's time in Wasm).
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(encoded_len(text));
    for &b in text.as_bytes() {
        match b {
            b' ' => out.push(b'+'),
            b if is_unreserved(b) => out.push(b),
            b => out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]),
        }
    }
    String::from_utf8(out).expect("form encoding is ASCII")
}

/// The length of [`form_encode`]`(text)`, without building it.
fn encoded_len(text: &str) -> usize {
    text.bytes()
        .map(|b| if b == b' ' || is_unreserved(b) { 1 } else { 3 })
        .sum()
}

/// A form body: `type=…&cmd=…` plus `vsys` and `target` when configured.
fn form_body(config: &Config, kind: &str, cmd: &str) -> String {
    let mut body = format!("type={kind}&cmd={}", form_encode(cmd));
    for (name, value) in [("vsys", &config.vsys), ("target", &config.target)] {
        if let Some(value) = value {
            body.push_str(&format!("&{name}={}", form_encode(value)));
        }
    }
    body
}

/// The body asking for one page of registered IPs (`start` is 1-based).
pub fn registered_ip_query(config: &Config, start: usize) -> String {
    let cmd = format!(
        "<show><object><registered-ip><limit>{PAGE_SIZE}</limit><start-point>{start}</start-point></registered-ip></object></show>"
    );
    form_body(config, "op", &cmd)
}

/// One `uid-message`'s content: `(ip, tags)` entries per section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Message {
    pub register: Vec<(String, Vec<String>)>,
    pub unregister: Vec<(String, Vec<String>)>,
}

impl Message {
    fn is_empty(&self) -> bool {
        self.register.is_empty() && self.unregister.is_empty()
    }

    /// The `uid-message` document; register members carry `timeout`.
    pub fn to_xml(&self, timeout: u64) -> String {
        let mut xml =
            String::from("<uid-message><version>1.0</version><type>update</type><payload>");
        for (section, entries, member) in [
            (
                "register",
                &self.register,
                format!("<member timeout=\"{timeout}\">"),
            ),
            ("unregister", &self.unregister, "<member>".to_owned()),
        ] {
            if entries.is_empty() {
                continue;
            }
            xml.push_str(&format!("<{section}>"));
            for (ip, tags) in entries {
                xml.push_str(&format!("<entry ip=\"{}\"><tag>", escape_xml(ip)));
                for tag in tags {
                    xml.push_str(&format!("{member}{}</member>", escape_xml(tag)));
                }
                xml.push_str("</tag></entry>");
            }
            xml.push_str(&format!("</{section}>"));
        }
        xml.push_str("</payload></uid-message>");
        xml
    }
}

/// Splits a diff into messages whose encoded bodies each stay within
/// `config.max_message_bytes`. An IP's tags may be spread over two
/// messages; every `(ip, tag)` pair appears exactly once.
pub fn split(config: &Config, diff: &Diff) -> Vec<Message> {
    let timeout = config.registration_timeout;
    // An empty message with both sections open is the fixed cost of each.
    let skeleton = Message {
        register: vec![(String::new(), vec![])],
        unregister: vec![(String::new(), vec![])],
    };
    let fixed = form_body(config, "user-id", &skeleton.to_xml(timeout)).len()
        - 2 * encoded_len("<entry ip=\"\"><tag></tag></entry>");
    let register_member = encoded_len(&format!("<member timeout=\"{timeout}\"></member>"));
    let unregister_member = encoded_len("<member></member>");

    let mut messages = Vec::new();
    let mut current = Message::default();
    let mut size = fixed;
    for (is_register, side) in [(true, &diff.register), (false, &diff.unregister)] {
        let member_cost = if is_register {
            register_member
        } else {
            unregister_member
        };
        for (ip, tags) in side {
            let escaped_ip = escape_xml(ip);
            let entry_cost =
                encoded_len(&format!("<entry ip=\"{escaped_ip}\"><tag></tag></entry>"));
            let mut open = false;
            for tag in tags {
                let member = member_cost + encoded_len(&escape_xml(tag));
                if size + member + if open { 0 } else { entry_cost } > config.max_message_bytes
                    && !current.is_empty()
                {
                    messages.push(std::mem::take(&mut current));
                    size = fixed;
                    open = false;
                }
                let entries = if is_register {
                    &mut current.register
                } else {
                    &mut current.unregister
                };
                match entries.last_mut() {
                    Some((_, members)) if open => members.push(tag.clone()),
                    _ => {
                        entries.push((ip.clone(), vec![tag.clone()]));
                        size += entry_cost;
                        open = true;
                    }
                }
                size += member;
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
    form_body(
        config,
        "user-id",
        &message.to_xml(config.registration_timeout),
    )
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
             <register><entry ip=\"10.0.0.1\"><tag><member timeout=\"3600\">ntnx.a</member></tag></entry></register>\
             <unregister><entry ip=\"10.0.0.2\"><tag><member>ntnx.b</member></tag></entry></unregister>\
             </payload></uid-message>"
        );
    }

    #[test]
    fn names_and_values_are_xml_escaped() {
        let message = Message {
            register: vec![("1.2.3.4\"/><x a=\"".into(), vec!["x'\"]<&>".into()])],
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
            register: vec![("1.2.3.4".into(), vec!["x".into()])],
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
            register: vec![("10.0.0.1".into(), vec!["ntnx.a b&c".into()])],
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
                    assert!(seen.0.insert((ip.clone(), tag.clone())), "sent twice");
                }
            }
            for (ip, tags) in &message.unregister {
                for tag in tags {
                    assert!(seen.1.insert((ip.clone(), tag.clone())), "sent twice");
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
    fn an_empty_diff_makes_no_message() {
        let config = config(r#"{"firewall": "https://fw"}"#);
        assert!(split(&config, &Diff::default()).is_empty());
    }
}
