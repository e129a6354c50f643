//! Any IPs and tags: the `uid-message` built for them is well-formed XML
//! that reads back to exactly the same registrations.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prismhook_plugin_paloalto::uid::Message;
use quick_xml::events::Event;
use quick_xml::Reader;

type Entries = Vec<(String, Vec<String>)>;

/// XML 1.0 cannot carry these at all, escaped or not, and an attribute's
/// tabs and line breaks are normalised to spaces: IPs and tags never hold
/// them (tags are sanitised, IPs normalised before a message is built).
fn representable(s: &str, attribute: bool) -> bool {
    s.chars().all(|c| {
        !(c.is_control() || c == '\u{fffe}' || c == '\u{ffff}' || attribute && c.is_whitespace())
    })
}

/// The register and unregister sections of a `uid-message`, as read back.
#[derive(Default)]
struct ReadBack {
    register: Entries,
    unregister: Entries,
    in_register: bool,
    in_member: bool,
}

impl ReadBack {
    fn section(&mut self) -> &mut Entries {
        if self.in_register {
            &mut self.register
        } else {
            &mut self.unregister
        }
    }

    /// The tag being read.
    fn member(&mut self) -> &mut String {
        let entry = self
            .section()
            .last_mut()
            .expect("a member is inside an entry");
        entry.1.last_mut().expect("text is inside a member")
    }
}

fn read_back(xml: &str) -> (Entries, Entries) {
    let mut reader = Reader::from_str(xml);
    let mut r = ReadBack::default();
    loop {
        match reader.read_event().expect("the message is well-formed XML") {
            Event::Start(e) => match e.name().as_ref() {
                b"register" => r.in_register = true,
                b"unregister" => r.in_register = false,
                b"entry" => {
                    let ip = e
                        .try_get_attribute("ip")
                        .unwrap()
                        .expect("every entry has an ip")
                        .unescape_value()
                        .unwrap()
                        .into_owned();
                    r.section().push((ip, Vec::new()));
                }
                b"member" => {
                    r.in_member = true;
                    let entry = r.section().last_mut().expect("a member is inside an entry");
                    entry.1.push(String::new());
                }
                _ => {}
            },
            Event::End(e) if e.name().as_ref() == b"member" => r.in_member = false,
            Event::Text(t) if r.in_member => {
                let text = t.decode().unwrap().into_owned();
                r.member().push_str(&text);
            }
            Event::GeneralRef(g) if r.in_member => {
                let name = g.decode().unwrap();
                let c = quick_xml::escape::resolve_predefined_entity(&name)
                    .expect("only predefined entities are written");
                r.member().push_str(c);
            }
            Event::Eof => return (r.register, r.unregister),
            _ => {}
        }
    }
}

fn borrow(entries: &Entries) -> Vec<(&str, Vec<&str>)> {
    entries
        .iter()
        .map(|(ip, tags)| (ip.as_str(), tags.iter().map(String::as_str).collect()))
        .collect()
}

fuzz_target!(|input: (Entries, Entries, u64)| {
    let (register, unregister, timeout) = input;
    let all = register.iter().chain(&unregister);
    if !all
        .clone()
        .all(|(ip, tags)| representable(ip, true) && tags.iter().all(|t| representable(t, false)))
    {
        return;
    }
    let message = Message {
        register: borrow(&register),
        unregister: borrow(&unregister),
    };
    let xml = message.to_xml(timeout);
    assert_eq!(read_back(&xml), (register, unregister), "{xml}");
});
