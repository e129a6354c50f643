//! Reading PAN-OS XML API answers.
//!
//! PAN-OS puts its messages in several places depending on release and
//! command: `msg`, `msg/line` (sometimes CDATA), `result/msg`, and for
//! User-ID a `uid-response` nested in a `line`, either as elements or as
//! escaped text. A strict schema would break on the next release, so the
//! answer is read into a tiny tree and searched for messages wherever
//! they are.
//!
//! What an answer means for the caller:
//! - success, or an error whose every message says the state is already
//!   as wanted (`… already exists, ignore`, `… does not exist, ignore
//!   unreg`): done;
//! - HTTP 408/429/5xx, codes 2–5, 11 and 21 (PAN-OS's internal errors), 15
//!   (operation denied: a passive HA peer, a commit holding a lock), 22
//!   (session timed out), 403/16 or HTTP 401/403 (key rejected, maybe being
//!   rotated): retry later;
//! - the platform's registered-IP limit reached: refused, with a reason
//!   that says so;
//! - any other error: the firewall refuses this content; retrying the same
//!   message cannot help.

use quick_xml::events::Event;
use quick_xml::Reader;

use crate::host::Response;

/// The code of a rejection for the platform's registered-IP limit, which the
/// host counts in its metrics (`prismhook_deliveries_rejected_by_code_total`).
pub const REGISTERED_IP_LIMIT: &str = "registered-ip-limit";

/// Longest firewall message quoted in a reason.
pub const MAX_REASON: usize = 1_000;
/// How deep escaped XML inside a message is unpacked.
const MAX_NESTING: usize = 3;
/// Elements nested deeper end the document, as a syntax error does. PAN-OS
/// answers are a few levels deep, and the tree is walked (and dropped)
/// recursively: an answer nested a hundred thousand levels would otherwise
/// exhaust the stack.
const MAX_DEPTH: usize = 64;

/// Why a request did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Passing: the same request may succeed later.
    Retry {
        reason: String,
        delay_ms: Option<u64>,
    },
    /// The firewall refuses the content.
    Reject(String),
}

impl Failure {
    pub fn reason(&self) -> &str {
        match self {
            Failure::Retry { reason, .. } | Failure::Reject(reason) => reason,
        }
    }

    pub fn retry(reason: impl Into<String>) -> Failure {
        Failure::Retry {
            reason: truncate(reason.into()),
            delay_ms: None,
        }
    }
}

#[derive(Debug, Default)]
struct Element {
    name: String,
    attributes: Vec<(String, String)>,
    children: Vec<Node>,
}

#[derive(Debug)]
enum Node {
    Element(Element),
    Text(String),
}

impl Element {
    fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|node| match node {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    fn child(&self, name: &str) -> Option<&Element> {
        self.elements().find(|e| e.name == name)
    }

    /// The element's own text (not its descendants'), trimmed.
    fn own_text(&self) -> String {
        let text: String = self
            .children
            .iter()
            .filter_map(|node| match node {
                Node::Text(t) => Some(t.as_str()),
                Node::Element(_) => None,
            })
            .collect();
        text.trim().to_owned()
    }

    fn push_text(&mut self, text: &str) {
        if let Some(Node::Text(last)) = self.children.last_mut() {
            last.push_str(text);
        } else {
            self.children.push(Node::Text(text.to_owned()));
        }
    }
}

/// Reads XML into a tree under a nameless root, leniently: mismatched end
/// tags are accepted and a syntax error ends the document where it is.
fn parse_tree(text: &str) -> Element {
    let mut reader = Reader::from_str(text);
    reader.config_mut().check_end_names = false;
    let mut stack = vec![Element::default()];
    loop {
        match reader.read_event() {
            Ok(Event::Start(start)) => {
                if stack.len() > MAX_DEPTH {
                    break;
                }
                stack.push(element(&start));
            }
            Ok(Event::Empty(start)) => {
                let done = element(&start);
                if let Some(parent) = stack.last_mut() {
                    parent.children.push(Node::Element(done));
                }
            }
            Ok(Event::End(_)) => close(&mut stack),
            Ok(Event::Text(t)) => {
                let text = t.decode().unwrap_or_default();
                if let Some(current) = stack.last_mut() {
                    current.push_text(&text);
                }
            }
            Ok(Event::CData(t)) => {
                let text = t.decode().unwrap_or_default();
                if let Some(current) = stack.last_mut() {
                    current.push_text(&text);
                }
            }
            Ok(Event::GeneralRef(r)) => {
                let name = r.decode().unwrap_or_default();
                let resolved = match r.resolve_char_ref() {
                    Ok(Some(c)) => c.to_string(),
                    _ => quick_xml::escape::resolve_predefined_entity(&name)
                        .map(str::to_owned)
                        .unwrap_or_else(|| format!("&{name};")),
                };
                if let Some(current) = stack.last_mut() {
                    current.push_text(&resolved);
                }
            }
            Ok(Event::Eof) | Err(_) => break,
            Ok(_) => {}
        }
    }
    while stack.len() > 1 {
        close(&mut stack);
    }
    stack.pop().unwrap_or_default()
}

fn close(stack: &mut Vec<Element>) {
    if stack.len() > 1 {
        if let Some(done) = stack.pop() {
            if let Some(parent) = stack.last_mut() {
                parent.children.push(Node::Element(done));
            }
        }
    }
}

fn element(start: &quick_xml::events::BytesStart<'_>) -> Element {
    let attributes = start
        .attributes()
        .flatten()
        .map(|a| {
            let name = String::from_utf8_lossy(a.key.as_ref()).into_owned();
            let value = a
                .unescape_value()
                .map(|v| v.into_owned())
                .unwrap_or_else(|_| String::from_utf8_lossy(&a.value).into_owned());
            (name, value)
        })
        .collect();
    Element {
        name: String::from_utf8_lossy(start.name().as_ref()).into_owned(),
        attributes,
        children: Vec::new(),
    }
}

/// A `<response>` as far as the plugin cares.
#[derive(Debug, Default, PartialEq, Eq)]
struct Answer {
    success: bool,
    code: Option<u32>,
    /// Text of `msg`/`line` elements.
    lines: Vec<String>,
    /// `message` attributes of `uid-response` entries.
    entries: Vec<String>,
}

impl Answer {
    fn all_messages(&self) -> impl Iterator<Item = &String> {
        self.entries.iter().chain(&self.lines)
    }

    /// Whether every message says the firewall already is as asked.
    fn only_harmless(&self) -> bool {
        let harmless = |m: &String| {
            let m = m.trim().trim_end_matches('.').to_ascii_lowercase();
            m.ends_with("already exists, ignore") || m.ends_with("does not exist, ignore unreg")
        };
        self.all_messages().next().is_some() && self.all_messages().all(harmless)
    }

    fn describe(&self) -> String {
        let messages: Vec<&str> = self.all_messages().map(String::as_str).collect();
        let head = match self.code {
            Some(code) => format!("PAN-OS error code {code}"),
            None => "PAN-OS error".to_owned(),
        };
        if messages.is_empty() {
            head
        } else {
            format!("{head}: {}", messages.join("; "))
        }
    }
}

fn parse_answer(response: &Element) -> Answer {
    let mut answer = Answer {
        success: response
            .attribute("status")
            .is_some_and(|s| s.trim().eq_ignore_ascii_case("success")),
        code: response
            .attribute("code")
            .and_then(|c| c.trim().parse().ok()),
        ..Answer::default()
    };
    collect_messages(response, &mut answer, 0);
    answer
}

fn collect_messages(element: &Element, answer: &mut Answer, depth: usize) {
    for child in element.elements() {
        if child.name == "entry" {
            if let Some(message) = child.attribute("message") {
                answer.entries.push(message.trim().to_owned());
            }
        }
        if child.name == "msg" || child.name == "line" {
            let text = child.own_text();
            if text.starts_with('<') && depth < MAX_NESTING {
                // An escaped `<uid-response>`: read it as the XML it is.
                let nested = parse_tree(&text);
                if nested.elements().next().is_some() {
                    collect_messages(&nested, answer, depth + 1);
                } else {
                    answer.lines.push(text);
                }
            } else if !text.is_empty() {
                answer.lines.push(text);
            }
        }
        collect_messages(child, answer, depth);
    }
}

fn truncate(mut text: String) -> String {
    if text.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push('…');
    }
    text
}

/// Seconds from `Retry-After`, when the firewall or a proxy sends it.
fn retry_after_ms(response: &Response) -> Option<u64> {
    response
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("retry-after"))
        .and_then(|(_, value)| value.trim().parse::<u64>().ok())
        .map(|seconds| seconds.min(3_600) * 1_000)
}

/// Reads an answer: `Ok` with the `<response>` element when PAN-OS accepted
/// the request (or only reported harmless duplicates), otherwise why not.
fn read(response: &Response) -> Result<Element, Failure> {
    let text = String::from_utf8_lossy(&response.body);
    let mut root = parse_tree(&text);
    let position = root
        .children
        .iter()
        .position(|node| matches!(node, Node::Element(e) if e.name == "response"));
    let element = match position.map(|i| root.children.swap_remove(i)) {
        Some(Node::Element(e)) => Some(e),
        _ => None,
    };
    let answer = element.as_ref().map(parse_answer);
    let detail = answer.as_ref().map(Answer::describe);
    let status = response.status;
    let with_detail = |what: String| match &detail {
        Some(detail) => truncate(format!("{what}: {detail}")),
        None => truncate(what),
    };

    if status == 408 || status == 429 || status >= 500 {
        return Err(Failure::Retry {
            reason: with_detail(format!("firewall answered HTTP {status}")),
            delay_ms: retry_after_ms(response),
        });
    }
    if status == 401 || status == 403 {
        return Err(Failure::retry(with_detail(format!(
            "firewall refused the API key (HTTP {status}); it may be being rotated"
        ))));
    }
    let (Some(element), Some(answer)) = (element, answer) else {
        let what = format!("firewall answered HTTP {status} without a PAN-OS <response>");
        return Err(if (200..300).contains(&status) {
            // Likely a proxy or a firewall restarting; the content is not at fault.
            Failure::retry(what)
        } else {
            Failure::Reject(truncate(what))
        });
    };
    let accepted = answer.success || answer.only_harmless();
    if accepted && (200..300).contains(&status) {
        return Ok(element);
    }
    if accepted {
        return Err(Failure::Reject(truncate(format!(
            "firewall answered HTTP {status} to a successful PAN-OS response"
        ))));
    }
    let limit = answer
        .all_messages()
        .any(|m| m.to_ascii_lowercase().contains("max registered-ip"));
    if limit {
        // Sending it again cannot help until addresses are unregistered or
        // lapse: a dead letter that says so, not a generic error.
        return Err(Failure::Reject(truncate(format!(
            "[{REGISTERED_IP_LIMIT}] the firewall's registered-IP limit for its platform is \
             reached, so it refuses further addresses until others are unregistered or lapse \
             (see `registration_timeout`): {}",
            answer.describe()
        ))));
    }
    Err(match answer.code {
        // The firewall's trouble, not the message's: the same one may pass later.
        Some(2..=5 | 11 | 21) => Failure::retry(format!(
            "the firewall failed internally: {}",
            answer.describe()
        )),
        Some(15) => Failure::retry(format!(
            "the firewall denied the operation for now (a passive HA peer, a lock): {}",
            answer.describe()
        )),
        Some(22) => Failure::retry(format!("session timed out: {}", answer.describe())),
        Some(16 | 403) => Failure::retry(format!(
            "firewall refused the API key, it may be being rotated: {}",
            answer.describe()
        )),
        _ => Failure::Reject(truncate(answer.describe())),
    })
}

/// Whether a `type=user-id` request took effect.
pub fn check(response: &Response) -> Result<(), Failure> {
    read(response).map(|_| ())
}

/// One page of `show object registered-ip`: `(ip, tags)` per entry with
/// an address.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Page {
    pub ips: Vec<(String, Vec<String>)>,
    /// Every `entry` the page listed, with an `ip` or not: a full page is
    /// told by this, so an entry of another shape does not end the listing.
    pub listed: usize,
}

/// One page of `show object registered-ip`.
pub fn registered_ips(response: &Response) -> Result<Page, Failure> {
    let response_element = read(response)?;
    let Some(result) = response_element.child("result") else {
        return Ok(Page::default());
    };
    let entries = || result.elements().filter(|e| e.name == "entry");
    let ips = entries()
        .filter_map(|entry| {
            let ip = entry.attribute("ip")?.trim().to_owned();
            let tags = entry
                .child("tag")
                .map(|tag| {
                    tag.elements()
                        .filter(|m| m.name == "member")
                        .map(Element::own_text)
                        .filter(|t| !t.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            Some((ip, tags))
        })
        .collect();
    Ok(Page {
        ips,
        listed: entries().count(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../../tests/fixtures/panos/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    fn answer(status: u16, body: &str) -> Response {
        Response {
            status,
            headers: vec![],
            body: body.as_bytes().to_vec(),
        }
    }

    fn verdict(response: &Response) -> &'static str {
        match check(response) {
            Ok(()) => "ok",
            Err(Failure::Retry { .. }) => "retry",
            Err(Failure::Reject(_)) => "reject",
        }
    }

    #[test]
    fn every_panos_fixture_answer_reads_as_ok_retry_or_reject() {
        let expected = [
            ("commit_response_enqueued.xml", "ok"),
            ("commit_response_no_changes.xml", "ok"),
            ("config_get_response_not_found.xml", "ok"),
            ("config_response_success.xml", "ok"),
            ("error_400_result_msg.xml", "reject"),
            ("error_multiline_code12.xml", "reject"),
            ("error_no_such_node.xml", "reject"),
            ("keygen_response_error_403.xml", "retry"),
            ("keygen_response_success.xml", "ok"),
            ("op_show_job_response.xml", "ok"),
            ("op_show_registered_ip_response.xml", "ok"),
            ("uid_response_error_duplicate.xml", "ok"),
            ("uid_response_error_unreg_missing.xml", "ok"),
            ("uid_response_success.xml", "ok"),
        ];
        let dir = format!("{}/../../tests/fixtures/panos", env!("CARGO_MANIFEST_DIR"));
        let answers: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.ends_with(".xml") && fixture(name).starts_with(b"<response"))
            .collect();
        assert_eq!(
            answers.len(),
            expected.len(),
            "a new fixture answer needs an expectation: {answers:?}"
        );
        for (name, want) in expected {
            let response = Response {
                status: 200,
                headers: vec![],
                body: fixture(name),
            };
            assert_eq!(verdict(&response), want, "{name}: {:?}", check(&response));
        }
    }

    /// The codes the XML API documents as its own failures, and a request
    /// timeout, pass; the content's faults do not.
    #[test]
    fn the_firewalls_internal_errors_and_timeouts_are_retried_and_content_errors_rejected() {
        let coded = |code: u32| {
            answer(
                200,
                &format!("<response status=\"error\" code=\"{code}\"><msg>m</msg></response>"),
            )
        };
        for code in [2, 3, 4, 5, 11, 15, 16, 21, 22] {
            assert_eq!(verdict(&coded(code)), "retry", "code {code}");
        }
        for code in [1, 6, 7, 8, 10, 12, 14, 17, 18, 400] {
            assert_eq!(verdict(&coded(code)), "reject", "code {code}");
        }
        assert_eq!(verdict(&answer(408, "")), "retry");
        assert_eq!(verdict(&answer(404, "")), "reject");
    }

    #[test]
    fn rejections_quote_the_firewall_message_from_every_place_it_hides() {
        let reason = |name: &str| {
            check(&Response {
                status: 200,
                headers: vec![],
                body: fixture(name),
            })
            .unwrap_err()
            .reason()
            .to_owned()
        };
        assert_eq!(
            reason("error_multiline_code12.xml"),
            "PAN-OS error code 12: tf123456 -> server -> first server  is invalid. HTTP method must be GET, \
             Username/Password must not be empty when Tag Distribution is chosen; tf123456 -> server is invalid"
        );
        assert_eq!(
            reason("error_400_result_msg.xml"),
            "PAN-OS error code 400: Parameter \"format\" is required while exporting certificate"
        );
        assert_eq!(
            reason("error_no_such_node.xml"),
            "PAN-OS error: No such node"
        );
        assert!(reason("keygen_response_error_403.xml")
            .ends_with("PAN-OS error code 403: Invalid Credential"));
    }

    #[test]
    fn an_escaped_or_cdata_uid_response_is_read_like_a_literal_one() {
        let escaped = r#"<response status="error"><msg><line>&lt;uid-response&gt;&lt;version&gt;1.0&lt;/version&gt;&lt;payload&gt;&lt;register&gt;&lt;entry ip="10.0.0.1" message="tag ntnx.a already exists, ignore"/&gt;&lt;/register&gt;&lt;/payload&gt;&lt;/uid-response&gt;</line></msg></response>"#;
        assert_eq!(check(&answer(200, escaped)), Ok(()));
        let cdata = r#"<response status="error"><msg><line><![CDATA[<uid-response><payload><unregister><entry ip="10.0.0.1" message="tag ntnx.a does not exist, ignore unreg"/></unregister></payload></uid-response>]]></line></msg></response>"#;
        assert_eq!(check(&answer(200, cdata)), Ok(()));
    }

    #[test]
    fn a_harmless_duplicate_next_to_a_real_error_is_still_an_error() {
        let mixed = r#"<response status="error"><msg><line><uid-response><payload><register>
            <entry ip="10.0.0.1" message="tag ntnx.a already exists, ignore"/>
            <entry ip="10.0.0.2" message="invalid ip address"/></register></payload></uid-response></line></msg></response>"#;
        let failure = check(&answer(200, mixed)).unwrap_err();
        assert_eq!(
            failure,
            Failure::Reject(
                "PAN-OS error: tag ntnx.a already exists, ignore; invalid ip address".into()
            )
        );
    }

    #[test]
    fn busy_timed_out_or_unauthorised_firewalls_are_retried() {
        let timed_out = r#"<response status="error" code="22"><msg><line>Session timed out</line></msg></response>"#;
        assert!(matches!(
            check(&answer(200, timed_out)),
            Err(Failure::Retry { .. })
        ));
        let unauthorised =
            r#"<response status="error" code="16"><msg>Unauthorized request</msg></response>"#;
        assert!(matches!(
            check(&answer(200, unauthorised)),
            Err(Failure::Retry { .. })
        ));
        assert!(matches!(
            check(&answer(403, "")),
            Err(Failure::Retry { .. })
        ));
        assert!(matches!(
            check(&answer(503, "<html>down</html>")),
            Err(Failure::Retry { .. })
        ));
        assert!(matches!(
            check(&answer(200, "<html>portal</html>")),
            Err(Failure::Retry { .. })
        ));

        let busy = Response {
            status: 429,
            headers: vec![("Retry-After".into(), "7".into())],
            body: vec![],
        };
        assert_eq!(
            check(&busy),
            Err(Failure::Retry {
                reason: "firewall answered HTTP 429".into(),
                delay_ms: Some(7_000)
            })
        );
    }

    #[test]
    fn malformed_requests_are_rejected() {
        let malformed = r#"<response status="error" code="18"><msg><line>Malformed Request</line></msg></response>"#;
        assert_eq!(
            check(&answer(200, malformed)),
            Err(Failure::Reject(
                "PAN-OS error code 18: Malformed Request".into()
            ))
        );
        assert!(matches!(
            check(&answer(400, "bad")),
            Err(Failure::Reject(_))
        ));
    }

    #[test]
    fn an_entry_without_an_address_still_counts_towards_a_full_page() {
        let page = registered_ips(&answer(
            200,
            r#"<response status="success"><result>
               <entry ip="10.0.0.1"><tag><member>ntnx.a</member></tag></entry>
               <entry range="10.0.0.2-10.0.0.9"><tag><member>ntnx.b</member></tag></entry>
               <count>2</count></result></response>"#,
        ))
        .unwrap();
        assert_eq!(page.listed, 2);
        assert_eq!(
            page.ips,
            [("10.0.0.1".to_owned(), vec!["ntnx.a".to_owned()])]
        );
    }

    #[test]
    fn the_registered_ip_fixture_lists_ips_with_their_tags() {
        let page = registered_ips(&Response {
            status: 200,
            headers: vec![],
            body: fixture("op_show_registered_ip_response.xml"),
        })
        .unwrap();
        assert_eq!(page.listed, 2);
        let page = page.ips;
        let web = "ntnx.PC-pc1.CL-ncn-dev-sandbox.AppTier.Web".to_owned();
        assert_eq!(
            page,
            vec![
                (
                    "10.23.129.96".to_owned(),
                    vec![web.clone(), "ntnx.vm.web-01".to_owned()]
                ),
                ("10.40.142.61".to_owned(), vec![web]),
            ]
        );
    }

    #[test]
    fn an_answer_nested_deeper_than_any_firewall_writes_is_read_without_exhausting_the_stack() {
        let depth = 200_000;
        let body = format!(
            "<response status=\"error\"><msg>{}deep{}</msg></response>",
            "<a>".repeat(depth),
            "</a>".repeat(depth)
        );
        // Run on a thread with a small stack, as a guest has.
        let verdict = std::thread::Builder::new()
            .stack_size(256 << 10)
            .spawn(move || {
                let answer = answer(200, &body);
                (check(&answer).is_err(), registered_ips(&answer).is_err())
            })
            .unwrap()
            .join()
            .expect("no stack overflow");
        assert_eq!(verdict, (true, true));
    }

    #[test]
    fn truncated_or_garbage_answers_never_panic() {
        for body in [
            "",
            "<",
            "<response status=",
            "<response status=\"error\"><msg><line>&bogus;",
            "\u{0}\u{ffff}",
        ] {
            let _ = check(&answer(200, body));
            let _ = registered_ips(&answer(200, body));
        }
        let reason = check(&answer(
            200,
            &format!(
                "<response status=\"error\"><msg>{}</msg></response>",
                "é".repeat(2000)
            ),
        ))
        .unwrap_err()
        .reason()
        .to_owned();
        assert!(reason.len() <= MAX_REASON + 3);
    }

    #[test]
    fn the_platforms_registered_ip_limit_is_a_refusal_that_says_so() {
        let full = r#"<response status="error"><msg><line><uid-response><version>1.0</version><payload><register>
            <entry ip="10.0.0.1" message="tag ntnx.a already exists, ignore"/>
            <entry ip="10.0.0.2" message="max registered-ip for the platform reached (1000)"/></register></payload></uid-response></line></msg></response>"#;
        match check(&answer(200, full)).unwrap_err() {
            Failure::Reject(reason) => {
                assert!(
                    reason.contains("registered-IP limit for its platform is reached"),
                    "{reason}"
                );
                assert!(reason.contains("(1000)"), "{reason}");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
