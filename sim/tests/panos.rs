//! The PAN-OS simulator, driven over real HTTP on loopback the way the
//! firewall plugin and the end-to-end tests drive it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use prismhook_sim::panos::{Faults, PanosConfig, PanosSim, PanosStats, RequestRecord};
use quick_xml::events::Event;
use quick_xml::Reader;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY: &str = "sim-key-0001";
const WEB: &str = "ntnx.PC-pc1.CL-ncn-dev-sandbox.AppTier.Web";

/// `fixtures/panos/uid_register.xml`, verbatim.
const UID_REGISTER_FIXTURE: &str = r#"<uid-message>
  <version>1.0</version>
  <type>update</type>
  <payload>
    <register>
      <entry ip="10.23.129.96">
        <tag>
          <member timeout="0">ntnx.PC-pc1.CL-ncn-dev-sandbox.AppTier.Web</member>
          <member timeout="0">ntnx.vm.web-01</member>
        </tag>
      </entry>
      <entry ip="10.40.142.61">
        <tag>
          <member timeout="0">ntnx.PC-pc1.CL-ncn-dev-sandbox.AppTier.Web</member>
        </tag>
      </entry>
    </register>
  </payload>
</uid-message>
"#;

/// `fixtures/panos/op_show_registered_ip_request.xml`, verbatim.
const SHOW_BY_TAG_FIXTURE: &str = r#"<show><object><registered-ip><limit>500</limit><start-point>1</start-point><tag><entry name="ntnx.PC-pc1.CL-ncn-dev-sandbox.AppTier.Web"/></tag></registered-ip></object></show>"#;

async fn start() -> PanosSim {
    PanosSim::start(([127, 0, 0, 1], 0).into(), PanosConfig::default())
        .await
        .expect("the simulator starts on a free loopback port")
}

#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: String,
    body: String,
}

async fn post(sim: &PanosSim, key: Option<&str>, params: &[(&str, &str)]) -> Answer {
    let mut request = reqwest::Client::new()
        .post(format!("{}/api/", sim.base_url()))
        .form(params);
    if let Some(key) = key {
        request = request.header("X-PAN-KEY", key);
    }
    let response = request.send().await.expect("the simulator answers");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.text().await.expect("the answer has a body");
    Answer {
        status,
        content_type,
        body,
    }
}

async fn api(sim: &PanosSim, params: &[(&str, &str)]) -> Answer {
    post(sim, Some(KEY), params).await
}

async fn user_id(sim: &PanosSim, message: &str) -> Answer {
    api(
        sim,
        &[("type", "user-id"), ("vsys", "vsys1"), ("cmd", message)],
    )
    .await
}

async fn show_registered(sim: &PanosSim, arguments: &str) -> Answer {
    let cmd = format!("<show><object><registered-ip>{arguments}</registered-ip></object></show>");
    api(sim, &[("type", "op"), ("cmd", &cmd)]).await
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// A uid-message with one `<register>` or `<unregister>` block.
fn uid_message(block: &str, entries: &[(&str, &[&str])]) -> String {
    let mut xml =
        format!("<uid-message><version>1.0</version><type>update</type><payload><{block}>");
    for (ip, tags) in entries {
        let _ = write!(xml, "<entry ip=\"{}\"><tag>", xml_escape(ip));
        for tag in *tags {
            let _ = write!(xml, "<member timeout=\"0\">{}</member>", xml_escape(tag));
        }
        xml.push_str("</tag></entry>");
    }
    let _ = write!(xml, "</{block}></payload></uid-message>");
    xml
}

fn register(entries: &[(&str, &[&str])]) -> String {
    uid_message("register", entries)
}

fn unregister(entries: &[(&str, &[&str])]) -> String {
    uid_message("unregister", entries)
}

/// What a client reads out of an answer: the root's attributes, every
/// `entry` element's ip (with its `member` texts) and message, and `count`.
#[derive(Debug, Default)]
struct Parsed {
    status: String,
    code: Option<String>,
    entries: Vec<(String, Vec<String>)>,
    messages: Vec<String>,
    count: Option<usize>,
    key: Option<String>,
}

fn parse(body: &str) -> Parsed {
    let mut reader = Reader::from_str(body);
    let mut parsed = Parsed::default();
    let mut open: Vec<String> = Vec::new();
    let mut text = String::new();
    loop {
        let event = reader.read_event().expect("the answer is well-formed XML");
        match event {
            Event::Start(ref start) | Event::Empty(ref start) => {
                let name = String::from_utf8(start.name().as_ref().to_vec()).expect("utf-8 name");
                for attribute in start.attributes() {
                    let attribute = attribute.expect("well-formed attribute");
                    let value = attribute
                        .decode_and_unescape_value(reader.decoder())
                        .expect("attribute value")
                        .into_owned();
                    match (name.as_str(), attribute.key.as_ref()) {
                        ("response", b"status") => parsed.status = value,
                        ("response", b"code") => parsed.code = Some(value),
                        ("entry", b"ip") => parsed.entries.push((value, Vec::new())),
                        ("entry", b"message") => parsed.messages.push(value),
                        _ => {}
                    }
                }
                text.clear();
                if matches!(event, Event::Start(_)) {
                    open.push(name);
                }
            }
            Event::Text(chunk) => text.push_str(&chunk.decode().expect("utf-8 text")),
            Event::GeneralRef(reference) => {
                let name = reference.decode().expect("utf-8 reference").into_owned();
                let resolved =
                    quick_xml::escape::resolve_predefined_entity(&name).expect("predefined entity");
                text.push_str(resolved);
            }
            Event::End(_) => {
                match open.pop().as_deref() {
                    Some("member") => {
                        if let Some((_, tags)) = parsed.entries.last_mut() {
                            tags.push(text.clone());
                        }
                    }
                    Some("count") => {
                        parsed.count = Some(text.trim().parse().expect("numeric count"))
                    }
                    Some("key") => parsed.key = Some(text.clone()),
                    _ => {}
                }
                text.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    parsed
}

fn tags(list: &[&str]) -> Vec<String> {
    list.iter().map(|tag| (*tag).to_owned()).collect()
}

#[tokio::test]
async fn keygen_with_the_right_credentials_returns_the_configured_key() {
    let sim = start().await;

    let answer = post(
        &sim,
        None,
        &[("type", "keygen"), ("user", "admin"), ("password", "admin")],
    )
    .await;

    assert_eq!(answer.status, 200);
    assert_eq!(answer.content_type, "application/xml");
    let parsed = parse(&answer.body);
    assert_eq!(parsed.status, "success");
    assert_eq!(parsed.key.as_deref(), Some(KEY));
    assert_eq!(sim.stats().keygens, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn keygen_with_wrong_credentials_is_refused_with_403() {
    let sim = start().await;

    let answer = post(
        &sim,
        None,
        &[("type", "keygen"), ("user", "admin"), ("password", "nope")],
    )
    .await;

    assert_eq!(answer.status, 403);
    assert_eq!(
        answer.body,
        "<response status = 'error' code = '403'><result><msg>Invalid Credential</msg></result></response>"
    );
    assert_eq!(sim.stats().errors, 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_custom_configuration_changes_the_credentials_and_the_key() {
    let config = PanosConfig {
        user: "svc-ntnx-sync".to_owned(),
        password: "Secr3t!".to_owned(),
        api_key: "other-key".to_owned(),
        max_registered_ips: None,
    };
    let sim = PanosSim::start(([127, 0, 0, 1], 0).into(), config)
        .await
        .expect("starts");

    let keygen = post(
        &sim,
        None,
        &[
            ("type", "keygen"),
            ("user", "svc-ntnx-sync"),
            ("password", "Secr3t!"),
        ],
    )
    .await;
    let with_default_key = post(&sim, Some(KEY), &[("type", "commit")]).await;
    let with_new_key = post(&sim, Some("other-key"), &[("type", "commit")]).await;

    assert_eq!(parse(&keygen.body).key.as_deref(), Some("other-key"));
    assert_eq!(with_default_key.status, 403);
    assert_eq!(with_new_key.status, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_request_without_the_key_or_with_a_wrong_one_is_refused_with_403() {
    let sim = start().await;
    let message = register(&[("10.0.0.1", &["web"])]);

    let missing = post(&sim, None, &[("type", "user-id"), ("cmd", &message)]).await;
    let wrong = post(
        &sim,
        Some("not-the-key"),
        &[("type", "user-id"), ("cmd", &message)],
    )
    .await;

    for answer in [&missing, &wrong] {
        assert_eq!(answer.status, 403);
        let parsed = parse(&answer.body);
        assert_eq!(
            (parsed.status.as_str(), parsed.code.as_deref()),
            ("error", Some("403"))
        );
        assert!(
            answer.body.contains("Invalid credentials."),
            "{}",
            answer.body
        );
    }
    assert!(sim.registered().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn the_key_is_also_accepted_as_a_parameter() {
    let sim = start().await;

    let answer = post(&sim, None, &[("type", "commit"), ("key", KEY)]).await;

    assert_eq!(answer.status, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_registration_shows_up_in_the_registered_view() {
    let sim = start().await;
    let answer = user_id(&sim, UID_REGISTER_FIXTURE).await;

    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.body,
        "<response status=\"success\"><result><uid-response><version>1.0</version><payload/></uid-response></result></response>"
    );
    let expected = BTreeMap::from([
        ("10.23.129.96".to_owned(), tags(&[WEB, "ntnx.vm.web-01"])),
        ("10.40.142.61".to_owned(), tags(&[WEB])),
    ]);
    assert_eq!(sim.registered(), expected);
    let over_http: BTreeMap<String, Vec<String>> =
        reqwest::get(format!("{}/_sim/registered", sim.base_url()))
            .await
            .expect("answers")
            .json()
            .await
            .expect("json");
    assert_eq!(over_http, expected);
    let stats = sim.stats();
    assert_eq!(
        (stats.uid_messages, stats.registered_entries, stats.errors),
        (1, 3, 0)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn an_unregistration_removes_only_the_listed_tags() {
    let sim = start().await;
    user_id(
        &sim,
        &register(&[("10.0.0.1", &["web", "prod"]), ("10.0.0.2", &["web"])]),
    )
    .await;

    let answer = user_id(
        &sim,
        &unregister(&[("10.0.0.1", &["web"]), ("10.0.0.2", &["web"])]),
    )
    .await;

    assert_eq!(parse(&answer.body).status, "success");
    assert_eq!(
        sim.registered(),
        BTreeMap::from([("10.0.0.1".to_owned(), tags(&["prod"]))]),
        "an address left without tags disappears"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn an_unregister_entry_without_tags_removes_every_tag_of_the_address() {
    let sim = start().await;
    user_id(
        &sim,
        &register(&[("10.0.0.1", &["web", "prod"]), ("10.0.0.2", &["web"])]),
    )
    .await;
    let message = "<uid-message><version>1.0</version><type>update</type><payload>\
                   <unregister><entry ip=\"10.0.0.1\"/></unregister></payload></uid-message>";

    let answer = user_id(&sim, message).await;

    assert_eq!(parse(&answer.body).status, "success");
    assert_eq!(
        sim.registered(),
        BTreeMap::from([("10.0.0.2".to_owned(), tags(&["web"]))])
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_duplicate_registration_answers_already_exists_and_applies_the_rest() {
    let sim = start().await;
    user_id(&sim, &register(&[("10.23.129.96", &["ntnx.vm.web-01"])])).await;

    let answer = user_id(
        &sim,
        &register(&[
            ("10.23.129.96", &[WEB, "ntnx.vm.web-01"]),
            ("10.40.142.61", &[WEB]),
        ]),
    )
    .await;

    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.body,
        "<response status=\"error\"><msg><line><uid-response><version>1.0</version><payload><register>\
         <entry ip=\"10.23.129.96\" message=\"tag ntnx.vm.web-01 already exists, ignore\"/>\
         </register></payload></uid-response></line></msg></response>"
    );
    assert_eq!(
        sim.registered(),
        BTreeMap::from([
            ("10.23.129.96".to_owned(), tags(&[WEB, "ntnx.vm.web-01"])),
            ("10.40.142.61".to_owned(), tags(&[WEB])),
        ])
    );
    assert_eq!(sim.stats().errors, 0, "a harmless note is not a refusal");
    sim.shutdown().await;
}

#[tokio::test]
async fn unregistering_a_missing_tag_answers_does_not_exist_and_applies_the_rest() {
    let sim = start().await;
    user_id(&sim, &register(&[("10.23.129.96", &[WEB])])).await;

    let answer = user_id(
        &sim,
        &unregister(&[("10.23.129.96", &[WEB, "ntnx.vm.web-01"])]),
    )
    .await;

    assert_eq!(
        answer.body,
        "<response status=\"error\"><msg><line><uid-response><version>1.0</version><payload><unregister>\
         <entry ip=\"10.23.129.96\" message=\"tag ntnx.vm.web-01 does not exist, ignore unreg\"/>\
         </unregister></payload></uid-response></line></msg></response>"
    );
    assert!(sim.registered().is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn malformed_messages_answer_code_18_and_change_nothing() {
    let sim = start().await;
    sim.register_directly("10.0.0.1", &["keep"]);
    let valid_then_bad_ip = "<uid-message><version>1.0</version><type>update</type><payload>\
         <register><entry ip=\"10.0.0.2\"><tag><member>new</member></tag></entry></register>\
         <unregister><entry ip=\"10.0.0.1\"/></unregister>\
         <register><entry ip=\"10.0.0.300\"><tag><member>new</member></tag></entry></register>\
         </payload></uid-message>"
        .to_owned();
    let cases = [
        ("not XML at all", "this is not xml".to_owned()),
        ("unclosed element", "<uid-message><version>1.0</version>".to_owned()),
        ("mismatched end tag", "<uid-message><version>1.0</type></uid-message>".to_owned()),
        ("wrong root", "<uid-msg><version>1.0</version><type>update</type><payload/></uid-msg>".to_owned()),
        ("missing version", "<uid-message><type>update</type><payload/></uid-message>".to_owned()),
        ("missing type", "<uid-message><version>1.0</version><payload/></uid-message>".to_owned()),
        (
            "unknown payload element",
            "<uid-message><version>1.0</version><type>update</type><payload><login/></payload></uid-message>".to_owned(),
        ),
        (
            "timeout out of range",
            register(&[("10.0.0.2", &["x"])]).replace("timeout=\"0\"", "timeout=\"2592001\""),
        ),
        ("invalid IP after valid entries", valid_then_bad_ip),
        ("unknown entity", register(&[("10.0.0.2", &["x"])]).replace(">x<", ">&nbsp;<")),
    ];

    for (case, message) in cases {
        let answer = user_id(&sim, &message).await;
        assert_eq!(answer.status, 200, "{case}");
        let parsed = parse(&answer.body);
        assert_eq!(
            (parsed.status.as_str(), parsed.code.as_deref()),
            ("error", Some("18")),
            "{case}: {}",
            answer.body
        );
        assert!(
            answer.body.contains("<msg><line>"),
            "{case}: {}",
            answer.body
        );
    }
    assert_eq!(
        sim.registered(),
        BTreeMap::from([("10.0.0.1".to_owned(), tags(&["keep"]))])
    );
    assert_eq!(sim.stats().errors, 10);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_tag_longer_than_127_characters_answers_code_12_and_changes_nothing() {
    let sim = start().await;
    let longest = "t".repeat(127);
    let too_long = "t".repeat(128);

    let refused = user_id(
        &sim,
        &register(&[("10.0.0.1", &["ok"]), ("10.0.0.2", &[too_long.as_str()])]),
    )
    .await;
    let accepted = user_id(&sim, &register(&[("10.0.0.3", &[longest.as_str()])])).await;

    let parsed = parse(&refused.body);
    assert_eq!(
        (parsed.status.as_str(), parsed.code.as_deref()),
        ("error", Some("12"))
    );
    assert!(refused.body.contains("invalid object"), "{}", refused.body);
    assert_eq!(parse(&accepted.body).status, "success");
    assert_eq!(
        sim.registered(),
        BTreeMap::from([("10.0.0.3".to_owned(), vec![longest])])
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_message_with_whitespace_reordered_attributes_and_self_closing_elements_is_accepted() {
    let sim = start().await;
    let message = "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
        <!-- written by hand -->\n\
        <uid-message>\n  <type> update </type>\n  <version>1.0</version>\n  <payload>\n\
        \t<register>\n\
        \t  <entry persistent=\"1\" ip='2001:DB8::1'>\n\
        \t    <tag><member timeout=\"60\" >  web  </member>\n<member><![CDATA[db]]></member></tag>\n\
        \t  </entry>\n\
        \t</register>\n\
        \t<unregister/>\n  </payload>\n</uid-message>\n";

    let answer = user_id(&sim, message).await;

    assert_eq!(parse(&answer.body).status, "success", "{}", answer.body);
    assert_eq!(
        sim.registered(),
        BTreeMap::from([("2001:db8::1".to_owned(), tags(&["db", "web"]))]),
        "addresses are stored canonically and tag names trimmed"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn escaped_characters_in_tag_names_round_trip() {
    let sim = start().await;
    let awkward = "R&D's <\"lab\">";

    let answer = user_id(&sim, &register(&[("10.0.0.1", &[awkward, "plain"])])).await;
    assert_eq!(parse(&answer.body).status, "success", "{}", answer.body);
    let listed = show_registered(&sim, "").await;
    let duplicate = user_id(&sim, &register(&[("10.0.0.1", &[awkward])])).await;

    assert_eq!(
        sim.registered(),
        BTreeMap::from([("10.0.0.1".to_owned(), tags(&["R&D's <\"lab\">", "plain"]))])
    );
    assert!(
        listed
            .body
            .contains("<member>R&amp;D&apos;s &lt;&quot;lab&quot;&gt;</member>"),
        "{}",
        listed.body
    );
    assert_eq!(
        parse(&listed.body).entries,
        vec![("10.0.0.1".to_owned(), tags(&[awkward, "plain"]))]
    );
    assert_eq!(
        parse(&duplicate.body).messages,
        vec![format!("tag {awkward} already exists, ignore")]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn show_registered_ip_pages_1200_entries_as_500_500_200_then_empty() {
    let sim = start().await;
    let addresses: Vec<String> = (0..1200)
        .map(|i| format!("10.1.{}.{}", i / 250, i % 250 + 1))
        .collect();
    let entries: Vec<(&str, &[&str])> = addresses
        .iter()
        .map(|ip| (ip.as_str(), &["web"][..]))
        .collect();
    let answer = user_id(&sim, &register(&entries)).await;
    assert_eq!(parse(&answer.body).status, "success");

    let mut seen = Vec::new();
    let mut counts = Vec::new();
    for start_point in [1, 501, 1001, 1201] {
        let page = show_registered(
            &sim,
            &format!("<limit>500</limit><start-point>{start_point}</start-point>"),
        )
        .await;
        let parsed = parse(&page.body);
        assert_eq!(parsed.status, "success");
        assert_eq!(parsed.count, Some(parsed.entries.len()));
        counts.push(parsed.entries.len());
        seen.extend(parsed.entries.into_iter().map(|(ip, tags)| {
            assert_eq!(tags, ["web"]);
            ip.parse::<IpAddr>().expect("an IP address")
        }));
    }

    assert_eq!(counts, [500, 500, 200, 0]);
    let mut expected: Vec<IpAddr> = addresses.iter().map(|ip| ip.parse().expect("ip")).collect();
    expected.sort();
    assert_eq!(
        seen, expected,
        "every address exactly once, in numeric order"
    );
    assert_eq!(sim.stats().ops, 4);
    sim.shutdown().await;
}

#[tokio::test]
async fn show_registered_ip_defaults_to_the_first_500_and_refuses_bigger_pages() {
    let sim = start().await;
    let addresses: Vec<String> = (0..501)
        .map(|i| format!("10.2.{}.{}", i / 250, i % 250 + 1))
        .collect();
    let entries: Vec<(&str, &[&str])> = addresses
        .iter()
        .map(|ip| (ip.as_str(), &["web"][..]))
        .collect();
    user_id(&sim, &register(&entries)).await;

    let default_page = show_registered(&sim, "").await;
    let too_big = show_registered(&sim, "<limit>1000</limit>").await;
    let zero_start = show_registered(&sim, "<start-point>0</start-point>").await;

    assert_eq!(parse(&default_page.body).count, Some(500));
    for refused in [&too_big, &zero_start] {
        assert_eq!(
            parse(&refused.body).code.as_deref(),
            Some("18"),
            "{}",
            refused.body
        );
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn show_registered_ip_filters_by_tag_and_by_address() {
    let sim = start().await;
    user_id(
        &sim,
        &register(&[
            ("10.23.129.96", &[WEB, "ntnx.vm.web-01"]),
            ("10.40.142.61", &[WEB]),
            ("10.9.9.9", &["ntnx.other"]),
        ]),
    )
    .await;
    let by_tag = api(&sim, &[("type", "op"), ("cmd", SHOW_BY_TAG_FIXTURE)]).await;
    let by_ip = show_registered(&sim, "<ip>10.9.9.9</ip>").await;

    let parsed = parse(&by_tag.body);
    assert_eq!(
        parsed.entries,
        vec![
            ("10.23.129.96".to_owned(), tags(&[WEB, "ntnx.vm.web-01"])),
            ("10.40.142.61".to_owned(), tags(&[WEB])),
        ],
        "entries carry all their tags, not only the filtered one"
    );
    assert_eq!(parsed.count, Some(2));
    assert_eq!(
        parse(&by_ip.body).entries,
        vec![("10.9.9.9".to_owned(), tags(&["ntnx.other"]))]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_registration_made_by_hand_is_listed_like_any_other() {
    let sim = start().await;

    sim.register_directly("192.0.2.7", &["manual", "also"]);
    let listed = show_registered(&sim, "").await;

    assert_eq!(
        parse(&listed.body).entries,
        vec![("192.0.2.7".to_owned(), tags(&["also", "manual"]))]
    );
    assert_eq!(sim.stats().registered_entries, 2);
    assert_eq!(sim.stats().uid_messages, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_commit_is_counted_and_its_job_reads_back_finished() {
    let sim = start().await;

    let first = api(
        &sim,
        &[
            ("type", "commit"),
            (
                "cmd",
                "<commit><description>ntnx-sync</description></commit>",
            ),
        ],
    )
    .await;
    let second = api(&sim, &[("type", "commit"), ("cmd", "<commit></commit>")]).await;
    let job = api(
        &sim,
        &[
            ("type", "op"),
            ("cmd", "<show><jobs><id>1</id></jobs></show>"),
        ],
    )
    .await;

    assert!(first.body.contains("<job>1</job>"), "{}", first.body);
    assert!(
        second.body.contains("Commit job enqueued with jobid 2"),
        "{}",
        second.body
    );
    assert_eq!(parse(&first.body).code.as_deref(), Some("19"));
    assert!(job.body.contains("<id>1</id>"), "{}", job.body);
    assert!(job.body.contains("<status>FIN</status>"), "{}", job.body);
    assert!(job.body.contains("<result>OK</result>"), "{}", job.body);
    assert!(
        job.body.contains("<description>ntnx-sync</description>"),
        "{}",
        job.body
    );
    assert_eq!(sim.stats().commits, 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn an_unknown_op_command_answers_code_1() {
    let sim = start().await;

    let answer = api(&sim, &[("type", "op"), ("cmd", "<show><clock/></show>")]).await;

    assert_eq!(answer.status, 200);
    let parsed = parse(&answer.body);
    assert_eq!(
        (parsed.status.as_str(), parsed.code.as_deref()),
        ("error", Some("1"))
    );
    assert!(answer.body.contains("unknown command"), "{}", answer.body);
    sim.shutdown().await;
}

#[tokio::test]
async fn config_calls_are_answered_but_not_modelled() {
    let sim = start().await;
    let xpath = "/config/devices/entry[@name='localhost.localdomain']/vsys/entry[@name='vsys1']/address/entry[@name='web-01']";

    let set = api(
        &sim,
        &[
            ("type", "config"),
            ("action", "set"),
            ("xpath", xpath),
            ("element", "<ip-netmask>10.23.129.96</ip-netmask>"),
        ],
    )
    .await;
    let get = api(
        &sim,
        &[("type", "config"), ("action", "get"), ("xpath", xpath)],
    )
    .await;
    let without_xpath = api(&sim, &[("type", "config"), ("action", "delete")]).await;

    assert_eq!(
        set.body,
        "<response status=\"success\" code=\"20\"><msg>command succeeded</msg></response>"
    );
    assert_eq!(
        get.body,
        "<response status=\"success\" code=\"7\"><result/></response>"
    );
    assert_eq!(without_xpath.status, 400);
    let log = sim.requests(10);
    assert_eq!(log[0].params.get("xpath").map(String::as_str), Some(xpath));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_missing_or_unknown_type_answers_400_with_a_message() {
    let sim = start().await;

    let unknown = api(&sim, &[("type", "report")]).await;
    let missing = api(&sim, &[("action", "get")]).await;

    for answer in [&unknown, &missing] {
        assert_eq!(answer.status, 400);
        assert_eq!(parse(&answer.body).code.as_deref(), Some("400"));
    }
    assert!(unknown.body.contains("Invalid type"), "{}", unknown.body);
    assert!(missing.body.contains("type"), "{}", missing.body);
    sim.shutdown().await;
}

#[tokio::test]
async fn query_parameters_are_merged_with_the_form_and_the_form_wins() {
    let sim = start().await;
    let client = reqwest::Client::new();

    let by_get = client
        .get(format!(
            "{}/api/?type=keygen&user=admin&password=admin",
            sim.base_url()
        ))
        .send()
        .await
        .expect("answers")
        .text()
        .await
        .expect("body");
    let merged = client
        .post(format!("{}/api/?type=commit&user=admin", sim.base_url()))
        .form(&[("type", "keygen"), ("password", "admin")])
        .send()
        .await
        .expect("answers")
        .text()
        .await
        .expect("body");

    assert_eq!(parse(&by_get).key.as_deref(), Some(KEY));
    assert_eq!(parse(&merged).key.as_deref(), Some(KEY));
    assert_eq!(sim.stats().commits, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_body_that_is_not_a_form_is_refused_rather_than_ignored() {
    let sim = start().await;

    let answer = reqwest::Client::new()
        .post(format!("{}/api/", sim.base_url()))
        .header("X-PAN-KEY", KEY)
        .header("Content-Type", "application/json")
        .body(r#"{"type":"commit"}"#)
        .send()
        .await
        .expect("answers");

    assert_eq!(answer.status(), 400);
    assert!(answer
        .text()
        .await
        .expect("body")
        .contains("x-www-form-urlencoded"));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_body_over_6_mib_is_refused_with_413() {
    let sim = start().await;
    let huge = "x".repeat(6 * 1024 * 1024 + 1);

    let answer = reqwest::Client::new()
        .post(format!("{}/api/", sim.base_url()))
        .header("X-PAN-KEY", KEY)
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("type=user-id&cmd={huge}"))
        .send()
        .await
        .expect("answers");

    assert_eq!(answer.status(), 413);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_uid_message_near_the_5_mb_limit_is_accepted() {
    let sim = start().await;
    let addresses: Vec<String> = (0..40_000)
        .map(|i| format!("10.{}.{}.{}", i / 62_500, i / 250 % 250, i % 250 + 1))
        .collect();
    let entries: Vec<(&str, &[&str])> = addresses
        .iter()
        .map(|ip| (ip.as_str(), &[WEB][..]))
        .collect();
    let message = register(&entries);
    assert!(
        message.len() > 4_000_000,
        "the message is {} bytes",
        message.len()
    );

    let answer = user_id(&sim, &message).await;

    assert_eq!(parse(&answer.body).status, "success");
    assert_eq!(sim.stats().registered_entries, 40_000);
    sim.shutdown().await;
}

#[tokio::test]
async fn fail_next_answers_503_then_recovers() {
    let sim = start().await;
    let faults = Faults {
        fail_status: Some(503),
        fail_next: 2,
        ..Faults::default()
    };
    let set = reqwest::Client::new()
        .post(format!("{}/_sim/faults", sim.base_url()))
        .json(&faults)
        .send()
        .await
        .expect("answers");
    assert_eq!(set.status(), 204);
    let message = register(&[("10.0.0.1", &["web"])]);

    let first = user_id(&sim, &message).await;
    let second = user_id(&sim, &message).await;
    assert!(
        sim.registered().is_empty(),
        "a failed request changes nothing"
    );
    let third = user_id(&sim, &message).await;

    assert_eq!([first.status, second.status, third.status], [503, 503, 200]);
    assert_eq!(parse(&first.body).status, "error");
    assert_eq!(parse(&third.body).status, "success");
    assert_eq!(sim.registered().len(), 1);
    let stats = sim.stats();
    assert_eq!(
        (stats.requests, stats.errors, stats.uid_messages),
        (3, 2, 1)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn fail_status_alone_fails_every_request_until_cleared() {
    let sim = start().await;
    sim.set_faults(Faults {
        fail_status: Some(500),
        ..Faults::default()
    });

    let failing: Vec<u16> = [
        api(&sim, &[("type", "commit")]).await.status,
        api(&sim, &[("type", "commit")]).await.status,
        api(&sim, &[("type", "commit")]).await.status,
    ]
    .into();
    sim.set_faults(Faults::default());
    let recovered = api(&sim, &[("type", "commit")]).await;

    assert_eq!(failing, [500, 500, 500]);
    assert_eq!(recovered.status, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn dropped_connections_give_the_client_a_connection_error_without_any_answer() {
    let sim = start().await;
    sim.set_faults(Faults {
        drop_connections: true,
        ..Faults::default()
    });

    let through_reqwest = reqwest::Client::new()
        .post(format!("{}/api/", sim.base_url()))
        .header("X-PAN-KEY", KEY)
        .form(&[("type", "commit")])
        .send()
        .await;
    let mut raw = tokio::net::TcpStream::connect(sim.addr())
        .await
        .expect("connects");
    raw.write_all(b"GET /api/?type=commit&key=sim-key-0001 HTTP/1.1\r\nHost: fw\r\n\r\n")
        .await
        .expect("writes");
    let mut received = Vec::new();
    let read = raw.read_to_end(&mut received).await;

    let error = through_reqwest.expect_err("no answer arrives");
    assert!(!error.is_timeout(), "{error}");
    assert!(
        received.is_empty(),
        "got {:?}",
        String::from_utf8_lossy(&received)
    );
    // Either an orderly EOF or a reset, depending on unread bytes: both close.
    drop(read);
    assert_eq!(sim.stats().commits, 0);

    let cleared = reqwest::Client::new()
        .post(format!("{}/_sim/faults", sim.base_url()))
        .json(&serde_json::json!({ "drop_connections": false }))
        .send()
        .await
        .expect("the control endpoints stay up");
    assert_eq!(cleared.status(), 204);
    assert_eq!(api(&sim, &[("type", "commit")]).await.status, 200);
    let log = sim.requests(3);
    assert_eq!(
        log.iter()
            .map(|record| record.status_code)
            .collect::<Vec<_>>(),
        [None, None, Some(200)]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn reset_clears_registrations_stats_faults_and_the_request_log() {
    let sim = start().await;
    user_id(&sim, &register(&[("10.0.0.1", &["web"])])).await;
    sim.set_faults(Faults {
        latency_ms: 1,
        ..Faults::default()
    });

    let reset = reqwest::Client::new()
        .post(format!("{}/_sim/reset", sim.base_url()))
        .send()
        .await
        .expect("answers");

    assert_eq!(reset.status(), 204);
    assert!(sim.registered().is_empty());
    assert_eq!(sim.stats(), PanosStats::default());
    assert!(sim.requests(10).is_empty());
    let stats: PanosStats = reqwest::get(format!("{}/_sim/stats", sim.base_url()))
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    assert_eq!(stats, PanosStats::default());
    sim.shutdown().await;
}

#[tokio::test]
async fn the_request_log_shows_recent_requests_without_secrets() {
    let sim = start().await;
    post(
        &sim,
        None,
        &[("type", "keygen"), ("user", "admin"), ("password", "admin")],
    )
    .await;
    let message = register(&[("10.0.0.1", &["web"])]);
    post(
        &sim,
        None,
        &[
            ("type", "user-id"),
            ("key", KEY),
            ("vsys", "vsys1"),
            ("cmd", &message),
        ],
    )
    .await;

    let log: Vec<RequestRecord> = reqwest::get(format!("{}/_sim/requests?n=50", sim.base_url()))
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");
    let one: Vec<RequestRecord> = reqwest::get(format!("{}/_sim/requests?n=1", sim.base_url()))
        .await
        .expect("answers")
        .json()
        .await
        .expect("json");

    assert_eq!(log.len(), 2);
    assert_eq!(log[0].kind.as_deref(), Some("keygen"));
    assert_eq!(
        log[0].params,
        BTreeMap::from([
            ("type".to_owned(), "keygen".to_owned()),
            ("user".to_owned(), "admin".to_owned())
        ])
    );
    assert_eq!(log[0].status_code, Some(200));
    assert_eq!(log[1].xml_cmd.as_deref(), Some(message.as_str()));
    assert!(!log[1].params.contains_key("key"));
    assert_eq!(log[1].params.get("vsys").map(String::as_str), Some("vsys1"));
    assert_eq!(one, log[1..]);
    let raw = serde_json::to_string(&log).expect("serialises");
    assert!(!raw.contains(KEY) && !raw.contains("\"password\""), "{raw}");
    sim.shutdown().await;
}

#[tokio::test]
async fn shutdown_stops_listening() {
    let sim = start().await;
    let addr = sim.addr();
    assert_eq!(sim.base_url(), format!("http://127.0.0.1:{}", addr.port()));

    sim.shutdown().await;

    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn a_registration_with_a_timeout_lapses_unless_registered_again() {
    let sim = start().await;
    let timed = |ip: &str, secs: u32| {
        format!(
            "<uid-message><version>1.0</version><type>update</type><payload><register>\
             <entry ip=\"{ip}\"><tag><member timeout=\"{secs}\">{WEB}</member></tag></entry>\
             </register></payload></uid-message>"
        )
    };
    user_id(&sim, &timed("10.0.0.1", 1)).await;
    user_id(&sim, &timed("10.0.0.2", 1)).await;
    user_id(&sim, &register(&[("10.0.0.3", &[WEB])])).await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    // Registered again: its second starts over.
    user_id(&sim, &timed("10.0.0.2", 1)).await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(
        sim.registered().keys().collect::<Vec<_>>(),
        ["10.0.0.2", "10.0.0.3"],
        "the first lapsed, the refreshed and the permanent ones stay"
    );
    let listed = show_registered(&sim, "<all/>").await;
    assert!(!listed.body.contains("10.0.0.1"), "{}", listed.body);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_register_beyond_the_platforms_limit_is_refused_for_that_address() {
    let config = PanosConfig {
        max_registered_ips: Some(1),
        ..Default::default()
    };
    let sim = PanosSim::start(([127, 0, 0, 1], 0).into(), config)
        .await
        .expect("starts");
    user_id(&sim, &register(&[("10.0.0.1", &[WEB])])).await;
    let answer = user_id(
        &sim,
        &register(&[("10.0.0.1", &["ntnx.more"]), ("10.0.0.2", &[WEB])]),
    )
    .await;
    assert!(
        answer.body.contains(
            "<entry ip=\"10.0.0.2\" message=\"max registered-ip for the platform reached (1)\"/>"
        ),
        "{}",
        answer.body
    );
    assert_eq!(
        sim.registered(),
        BTreeMap::from([("10.0.0.1".to_owned(), tags(&[WEB, "ntnx.more"]))]),
        "an address already registered may gain tags"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn expired_keys_are_refused_and_keygen_hands_out_the_new_one() {
    let sim = start().await;
    let old = PanosConfig::default().api_key;
    assert_eq!(
        api(
            &sim,
            &[
                ("type", "op"),
                ("cmd", "<show><system><info/></system></show>")
            ]
        )
        .await
        .status,
        200
    );
    sim.expire_api_keys();
    let refused = post(
        &sim,
        Some(&old),
        &[
            ("type", "op"),
            ("cmd", "<show><system><info/></system></show>"),
        ],
    )
    .await;
    assert_eq!(refused.status, 403);
    let keygen = post(
        &sim,
        None,
        &[("type", "keygen"), ("user", "admin"), ("password", "admin")],
    )
    .await;
    assert!(keygen.body.contains(&sim.api_key()), "{}", keygen.body);
    assert_ne!(sim.api_key(), old);
    sim.shutdown().await;
}

#[tokio::test]
async fn show_system_info_tells_the_release_and_serial_clients_read_first() {
    let sim = start().await;
    let answer = api(
        &sim,
        &[
            ("type", "op"),
            ("cmd", "<show><system><info></info></system></show>"),
        ],
    )
    .await;
    assert_eq!(answer.status, 200);
    assert!(
        answer.body.starts_with("<response status=\"success\">"),
        "{}",
        answer.body
    );
    for field in [
        format!(
            "<sw-version>{}</sw-version>",
            prismhook_sim::panos::SW_VERSION
        ),
        format!("<serial>{}</serial>", prismhook_sim::panos::SERIAL),
        "<multi-vsys>off</multi-vsys>".to_owned(),
    ] {
        assert!(answer.body.contains(&field), "{field} in {}", answer.body);
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn a_request_through_panorama_names_the_simulators_serial_as_its_target() {
    let sim = start().await;
    let message = register(&[("10.0.0.1", &[WEB])]);
    let through = |target: &'static str| {
        let message = message.clone();
        let sim = &sim;
        async move {
            api(
                sim,
                &[("type", "user-id"), ("target", target), ("cmd", &message)],
            )
            .await
        }
    };
    let wrong = through("000000000000").await;
    assert!(
        wrong.body.contains("is not a connected device"),
        "{}",
        wrong.body
    );
    assert!(sim.registered().is_empty());
    let right = through(prismhook_sim::panos::SERIAL).await;
    assert!(
        right.body.starts_with("<response status=\"success\">"),
        "{}",
        right.body
    );
    assert_eq!(sim.registered().len(), 1);
    sim.shutdown().await;
}
