//! `handle` and `reconcile` against an in-memory `kv` and a scripted
//! firewall that keeps User-ID registrations the way PAN-OS does.

use std::collections::{BTreeMap, BTreeSet};

use quick_xml::events::Event as XmlEvent;
use quick_xml::Reader;

use super::*;
use crate::host::{HttpError, Request, Response};
use crate::tags::tests::web_01;

const WEB: &str = "ntnx.AppTier.Web";
const PROD: &str = "ntnx.Environment.Production";
const MANAGED: &str = "ntnx.managed";
const IP1: &str = "10.23.129.96";
const IP2: &str = "10.40.142.61";
const UUID: &str = "bdbbad7a-a401-4f9a-a789-2b8406905b56";

/// Decodes one `application/x-www-form-urlencoded` body.
fn form(body: &[u8]) -> BTreeMap<String, String> {
    let text = String::from_utf8(body.to_vec()).unwrap();
    text.split('&')
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap();
            let mut out = Vec::new();
            let bytes = value.as_bytes();
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

/// Reads a `uid-message` back into register and unregister sets.
fn read_uid_message(xml: &str) -> Diff {
    let mut reader = Reader::from_str(xml);
    let mut diff = Diff::default();
    let (mut register, mut ip, mut in_member) = (true, String::new(), false);
    loop {
        match reader.read_event().unwrap() {
            XmlEvent::Start(e) => match e.name().as_ref() {
                b"register" => register = true,
                b"unregister" => register = false,
                b"entry" => {
                    let attr = e.try_get_attribute("ip").unwrap().unwrap();
                    ip = attr.unescape_value().unwrap().into_owned();
                }
                b"member" => in_member = true,
                _ => {}
            },
            XmlEvent::End(e) if e.name().as_ref() == b"member" => in_member = false,
            XmlEvent::Text(t) if in_member => {
                let side = if register {
                    &mut diff.register
                } else {
                    &mut diff.unregister
                };
                side.entry(ip.clone())
                    .or_default()
                    .insert(t.decode().unwrap().into_owned());
            }
            XmlEvent::Eof => return diff,
            _ => {}
        }
    }
}

/// A firewall and a host in one: answers like PAN-OS, stores like `kv`.
#[derive(Default)]
struct Fake {
    kv: BTreeMap<String, Vec<u8>>,
    /// What the firewall has registered, per IP.
    registered: BTreeMap<String, BTreeSet<String>>,
    /// Every uid-message received, in order.
    messages: Vec<Diff>,
    /// Requests made, of any type.
    requests: Vec<Request>,
    /// Messages registering this tag are refused with code 12.
    refuse_tag: Option<String>,
    /// Every request fails with this.
    fail: Option<Result<Response, HttpError>>,
    logs: Vec<(Level, String)>,
    /// `kv.list-keys-after` calls, and the most keys one answered with.
    kv_lists: usize,
    largest_key_list: usize,
}

fn xml_answer(body: String) -> Response {
    Response {
        status: 200,
        headers: vec![],
        body: body.into_bytes(),
    }
}

impl Host for Fake {
    fn kv_get(&mut self, key: &str) -> Result<Option<Vec<u8>>, String> {
        Ok(self.kv.get(key).cloned())
    }

    fn kv_set(&mut self, key: &str, value: &[u8]) -> Result<(), String> {
        self.kv.insert(key.to_owned(), value.to_vec());
        Ok(())
    }

    fn kv_delete(&mut self, key: &str) -> Result<(), String> {
        self.kv.remove(key);
        Ok(())
    }

    fn kv_list_after(
        &mut self,
        prefix: &str,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Vec<String>, String> {
        self.kv_lists += 1;
        let keys: Vec<String> = self
            .kv
            .keys()
            .filter(|k| k.starts_with(prefix) && after.is_none_or(|a| k.as_str() > a))
            .take(limit as usize)
            .cloned()
            .collect();
        self.largest_key_list = self.largest_key_list.max(keys.len());
        Ok(keys)
    }

    fn send(&mut self, request: Request) -> Result<Response, HttpError> {
        assert_eq!(request.method, "POST");
        assert_eq!(request.url, "https://fw1.example.com/api/");
        assert!(request.headers.contains(&(
            "Content-Type".to_owned(),
            "application/x-www-form-urlencoded".to_owned()
        )));
        self.requests.push(request.clone());
        if let Some(fail) = &self.fail {
            return fail.clone();
        }
        let fields = form(&request.body);
        let cmd = &fields["cmd"];
        match fields["type"].as_str() {
            "user-id" => {
                let diff = read_uid_message(cmd);
                self.messages.push(diff.clone());
                let refused = self
                    .refuse_tag
                    .as_ref()
                    .is_some_and(|bad| diff.register.values().any(|tags| tags.contains(bad)));
                if refused {
                    return Ok(xml_answer(
                        "<response status=\"error\" code=\"12\"><msg><line>tag is invalid</line></msg></response>".into(),
                    ));
                }
                for (ip, tags) in diff.register {
                    self.registered.entry(ip).or_default().extend(tags);
                }
                for (ip, tags) in diff.unregister {
                    let left = self.registered.entry(ip.clone()).or_default();
                    left.retain(|t| !tags.contains(t));
                    if left.is_empty() {
                        self.registered.remove(&ip);
                    }
                }
                Ok(xml_answer(
                    "<response status=\"success\"><result><uid-response><version>1.0</version><payload/></uid-response></result></response>".into(),
                ))
            }
            "op" => {
                let start: usize = cmd
                    .split("<start-point>")
                    .nth(1)
                    .and_then(|rest| rest.split('<').next())
                    .unwrap()
                    .parse()
                    .unwrap();
                let page: String = self
                    .registered
                    .iter()
                    .skip(start - 1)
                    .take(500)
                    .map(|(ip, tags)| {
                        let members: String = tags.iter().map(|t| format!("<member>{t}</member>")).collect();
                        format!("<entry ip=\"{ip}\" from_agent=\"0\" persistent=\"1\"><tag>{members}</tag></entry>")
                    })
                    .collect();
                Ok(xml_answer(format!(
                    "<response status=\"success\"><result>{page}</result></response>"
                )))
            }
            other => panic!("unexpected request type {other}"),
        }
    }

    fn log(&mut self, level: Level, message: &str) {
        self.logs.push((level, message.to_owned()));
    }
}

fn config() -> Config {
    Config::parse(r#"{"firewall": "https://fw1.example.com"}"#).unwrap()
}

fn event(kind: &str, vm: Option<Vm>) -> Event {
    Event {
        id: format!("ev-{kind}"),
        cluster: "ncn-dev-sandbox".into(),
        event_type: kind.into(),
        entity_uuid: vm.as_ref().map_or(UUID.to_owned(), |vm| vm.uuid.clone()),
        vm,
    }
}

fn set(tags: &[&str]) -> BTreeSet<String> {
    tags.iter().map(|t| (*t).to_owned()).collect()
}

fn ip_tags(entries: &[(&str, &[&str])]) -> IpTags {
    entries
        .iter()
        .map(|(ip, t)| ((*ip).to_owned(), set(t)))
        .collect()
}

fn vm_on_one_nic() -> Vm {
    Vm {
        nics: vec![vec![IP1.into()]],
        categories: vec![],
        ..web_01()
    }
}

/// Handles one event and returns what the firewall was sent for it.
fn step(fake: &mut Fake, event: Event) -> Option<Diff> {
    let before = fake.messages.len();
    assert_eq!(handle(&config(), fake, &[event]), vec![Outcome::Done]);
    assert!(fake.messages.len() - before <= 1, "one message per batch");
    fake.messages.get(before).cloned()
}

#[test]
fn a_vm_lifecycle_registers_and_unregisters_exactly_what_changed() {
    let mut fake = Fake::default();

    // Created powered on with one NIC and no categories.
    let created = step(&mut fake, event("VM.CREATE", Some(vm_on_one_nic()))).unwrap();
    assert_eq!(
        created,
        Diff {
            register: ip_tags(&[(IP1, &[MANAGED])]),
            unregister: IpTags::new()
        }
    );

    // VM.ON with the same state: already registered, nothing sent.
    assert_eq!(step(&mut fake, event("VM.ON", Some(vm_on_one_nic()))), None);

    // Update adds a NIC and two categories.
    let updated = step(&mut fake, event("VM.UPDATE", Some(web_01()))).unwrap();
    assert_eq!(
        updated,
        Diff {
            register: ip_tags(&[(IP1, &[PROD, WEB]), (IP2, &[MANAGED, PROD, WEB])]),
            unregister: IpTags::new(),
        }
    );

    // The second NIC is unplugged: only its IP goes.
    let unplugged_vm = Vm {
        nics: vec![vec![IP1.into()]],
        ..web_01()
    };
    let unplugged = step(
        &mut fake,
        event("VM.NIC_UNPLUG", Some(unplugged_vm.clone())),
    )
    .unwrap();
    assert_eq!(
        unplugged,
        Diff {
            register: IpTags::new(),
            unregister: ip_tags(&[(IP2, &[MANAGED, PROD, WEB])])
        }
    );

    // VM.OFF wins over a payload that still says ON.
    let off = step(&mut fake, event("VM.OFF", Some(unplugged_vm))).unwrap();
    assert_eq!(
        off,
        Diff {
            register: IpTags::new(),
            unregister: ip_tags(&[(IP1, &[MANAGED, PROD, WEB])])
        }
    );
    assert!(fake.registered.is_empty());

    // Deleted with an empty body: nothing left to undo, and no records left.
    assert_eq!(step(&mut fake, event("VM.DELETE", None)), None);
    assert!(
        fake.kv.is_empty(),
        "{:?}",
        fake.kv.keys().collect::<Vec<_>>()
    );
}

#[test]
fn deleting_a_powered_on_vm_without_a_body_undoes_it_from_kv() {
    let mut fake = Fake::default();
    step(&mut fake, event("VM.UPDATE", Some(web_01())));
    assert_eq!(fake.registered.len(), 2);
    let deleted = step(&mut fake, event("VM.DELETE", None)).unwrap();
    assert_eq!(
        deleted.unregister,
        ip_tags(&[(IP1, &[MANAGED, PROD, WEB]), (IP2, &[MANAGED, PROD, WEB])])
    );
    assert!(fake.registered.is_empty());
    assert!(fake.kv.is_empty());
}

#[test]
fn the_kv_records_hold_each_vms_contribution_and_each_ips_holders() {
    let mut fake = Fake::default();
    step(&mut fake, event("VM.CREATE", Some(vm_on_one_nic())));
    let vm_record =
        String::from_utf8(fake.kv[&format!("vm/ncn-dev-sandbox/{UUID}")].clone()).unwrap();
    assert_eq!(vm_record, r#"{"10.23.129.96":["ntnx.managed"]}"#);
    let ip_record = String::from_utf8(fake.kv[&format!("ip/{IP1}")].clone()).unwrap();
    assert_eq!(
        ip_record,
        format!(r#"{{"ncn-dev-sandbox/{UUID}":["ntnx.managed"]}}"#)
    );
}

#[test]
fn an_ip_moving_to_another_vm_keeps_the_tags_the_new_vm_wants() {
    let mut fake = Fake::default();
    let old = Vm {
        uuid: "old".into(),
        categories: vec![("AppTier".into(), "Web".into())],
        ..vm_on_one_nic()
    };
    let new = Vm {
        uuid: "new".into(),
        categories: vec![("AppTier".into(), "Db".into())],
        ..vm_on_one_nic()
    };
    step(&mut fake, event("VM.CREATE", Some(old.clone())));
    let taken = step(&mut fake, event("VM.CREATE", Some(new))).unwrap();
    assert_eq!(taken.register, ip_tags(&[(IP1, &["ntnx.AppTier.Db"])]));

    let deleted = step(
        &mut fake,
        Event {
            entity_uuid: "old".into(),
            ..event("VM.DELETE", None)
        },
    )
    .unwrap();
    // The tag both held is registered again (see `Ledger::plan`).
    assert_eq!(
        deleted,
        Diff {
            register: ip_tags(&[(IP1, &[MANAGED])]),
            unregister: ip_tags(&[(IP1, &[WEB])])
        }
    );
    assert_eq!(fake.registered[IP1], set(&[MANAGED, "ntnx.AppTier.Db"]));
}

/// Two workers' calls on VMs sharing an IP: B going away unregisters the
/// tag they share (it saw only B), then loses its kv writes to A's call
/// (which saw B holding the tag, so sent nothing), and is made again.
#[test]
fn a_tag_a_concurrent_call_unregistered_under_another_vm_is_registered_again() {
    let mut fake = Fake::default();
    let (a, b) = (
        Vm {
            uuid: "a".into(),
            ..vm_on_one_nic()
        },
        Vm {
            uuid: "b".into(),
            ..vm_on_one_nic()
        },
    );
    step(&mut fake, event("VM.CREATE", Some(b.clone())));
    let before_either = fake.kv.clone();
    let b_off = event(
        "VM.OFF",
        Some(Vm {
            power_state: Some("OFF".into()),
            ..b
        }),
    );

    assert_eq!(
        handle(&config(), &mut fake, std::slice::from_ref(&b_off)),
        [Outcome::Done]
    );
    assert!(
        !fake.registered.contains_key(IP1),
        "B's first attempt took it all"
    );
    fake.kv = before_either;
    let a_on = event("VM.CREATE", Some(a));
    assert_eq!(handle(&config(), &mut fake, &[a_on]), [Outcome::Done]);
    assert!(
        !fake.registered.contains_key(IP1),
        "A saw B's tags: nothing sent"
    );

    assert_eq!(handle(&config(), &mut fake, &[b_off]), [Outcome::Done]);
    assert_eq!(
        fake.registered.get(IP1),
        Some(&set(&[MANAGED])),
        "what A wants is on the firewall again"
    );
}

#[test]
fn on_then_off_in_one_batch_registers_nothing_and_unregisters_what_on_may_have_left() {
    let mut fake = Fake::default();
    let outcomes = handle(
        &config(),
        &mut fake,
        &[
            event("VM.ON", Some(web_01())),
            event("VM.OFF", Some(web_01())),
        ],
    );
    assert_eq!(outcomes, vec![Outcome::Done, Outcome::Done]);
    assert_eq!(
        fake.messages,
        vec![Diff {
            register: IpTags::new(),
            unregister: ip_tags(&[(IP1, &[MANAGED, PROD, WEB]), (IP2, &[MANAGED, PROD, WEB])]),
        }]
    );
    assert!(fake.registered.is_empty());
    assert!(fake.kv.is_empty());
}

/// Handles `lost` as a batch whose host died after the firewall took the
/// change and before `kv` stored it, then the batch the next host is
/// delivered: `lost` once more, and `then`, which came after it.
fn lost_then_again(fake: &mut Fake, lost: Event, then: Event) {
    let stored = fake.kv.clone();
    handle(&config(), fake, std::slice::from_ref(&lost));
    fake.kv = stored;
    let outcomes = handle(&config(), fake, &[lost, then]);
    assert_eq!(outcomes, vec![Outcome::Done; 2]);
}

#[test]
fn a_batch_the_firewall_took_but_kv_lost_is_undone_when_delivered_again_with_a_later_off() {
    let categorised = Vm {
        categories: vec![("AppTier".into(), "App".into())],
        ..vm_on_one_nic()
    };
    let moved = Vm {
        nics: vec![vec![IP2.into()]],
        ..vm_on_one_nic()
    };
    // The categories change, or the VM moves to another IP; the host dies
    // before kv; then the VM goes off, or is deleted.
    for (update, end) in [(categorised, "VM.OFF"), (moved, "VM.DELETE")] {
        let mut fake = Fake::default();
        step(&mut fake, event("VM.CREATE", Some(vm_on_one_nic())));
        lost_then_again(
            &mut fake,
            event("VM.UPDATE", Some(update)),
            event(end, None),
        );
        assert!(fake.registered.is_empty(), "{end}: {:?}", fake.registered);
        assert!(fake.kv.is_empty());
    }
}

#[test]
fn what_a_lost_attempt_took_away_is_registered_again_when_the_batch_brings_it_back() {
    let mut fake = Fake::default();
    step(&mut fake, event("VM.UPDATE", Some(web_01())));
    let before = fake.registered.clone();
    let away = Vm {
        nics: vec![vec![IP1.into()]],
        categories: vec![("AppTier".into(), "Db".into())],
        ..web_01()
    };
    let back = event("VM.UPDATE", Some(web_01()));
    lost_then_again(&mut fake, event("VM.UPDATE", Some(away)), back);
    assert_eq!(fake.registered, before);

    // An earlier event that wanted nothing counts too.
    let on = event("VM.ON", Some(web_01()));
    lost_then_again(&mut fake, event("VM.OFF", None), on);
    assert_eq!(fake.registered, before);
}

#[test]
fn what_a_lost_attempt_passed_through_is_unregistered_but_not_what_another_vm_holds() {
    let mut fake = Fake::default();
    let other = Vm {
        uuid: "other".into(),
        nics: vec![vec![IP2.into()]],
        categories: vec![("AppTier".into(), "Web".into())],
        ..vm_on_one_nic()
    };
    step(&mut fake, event("VM.CREATE", Some(other)));
    step(&mut fake, event("VM.CREATE", Some(vm_on_one_nic())));
    // On its way, the VM took the other VM's IP and tag, then left it.
    let through = Vm {
        nics: vec![vec![IP1.into(), IP2.into()]],
        categories: vec![
            ("AppTier".into(), "Web".into()),
            ("Environment".into(), "Production".into()),
        ],
        ..vm_on_one_nic()
    };
    let back = event("VM.UPDATE", Some(vm_on_one_nic()));
    lost_then_again(&mut fake, event("VM.UPDATE", Some(through)), back);
    assert_eq!(fake.registered[IP1], set(&[MANAGED]));
    assert_eq!(fake.registered[IP2], set(&[MANAGED, WEB]));
    assert_eq!(fake.registered.len(), 2);
}

#[test]
fn a_batch_of_several_vms_goes_out_as_one_message() {
    let mut fake = Fake::default();
    let a = Vm {
        uuid: "a".into(),
        nics: vec![vec!["10.0.0.1".into()]],
        ..web_01()
    };
    let b = Vm {
        uuid: "b".into(),
        nics: vec![vec!["10.0.0.2".into()]],
        ..web_01()
    };
    let outcomes = handle(
        &config(),
        &mut fake,
        &[
            event("VM.CREATE", Some(a.clone())),
            event("VM.CREATE", Some(b)),
            event("VM.UPDATE", Some(a)),
        ],
    );
    assert_eq!(outcomes, vec![Outcome::Done; 3]);
    assert_eq!(fake.requests.len(), 1);
    assert_eq!(fake.registered.len(), 2);
}

#[test]
fn redelivering_a_handled_batch_sends_nothing() {
    let mut fake = Fake::default();
    let batch = [event("VM.UPDATE", Some(web_01()))];
    handle(&config(), &mut fake, &batch);
    handle(&config(), &mut fake, &batch);
    assert_eq!(fake.requests.len(), 1);
}

#[test]
fn a_firewall_failure_writes_no_records_so_the_retry_sends_the_same_change() {
    let mut fake = Fake {
        fail: Some(Err(HttpError::Timeout)),
        ..Fake::default()
    };
    let batch = [event("VM.UPDATE", Some(web_01()))];
    let outcomes = handle(&config(), &mut fake, &batch);
    assert!(
        matches!(&outcomes[0], Outcome::Retry { reason, .. } if reason.contains("did not answer"))
    );
    assert!(fake.kv.is_empty());

    fake.fail = None;
    assert_eq!(handle(&config(), &mut fake, &batch), vec![Outcome::Done]);
    assert_eq!(fake.messages.len(), 1);
    assert_eq!(fake.registered.len(), 2);
}

#[test]
fn network_errors_busy_and_expired_keys_are_retried_and_policy_denials_rejected() {
    let batch = [event("VM.UPDATE", Some(web_01()))];
    let retried = [
        Err(HttpError::ConnectionFailed("refused".into())),
        Err(HttpError::Other("tls".into())),
        Ok(Response { status: 503, headers: vec![], body: vec![] }),
        Ok(Response { status: 429, headers: vec![], body: vec![] }),
        Ok(xml_answer("<response status=\"error\" code=\"22\"><msg>Session timed out</msg></response>".into())),
        Ok(xml_answer("<response status = 'error' code = '403'><result><msg>Invalid Credential</msg></result></response>".into())),
    ];
    for fail in retried {
        let mut fake = Fake {
            fail: Some(fail.clone()),
            ..Fake::default()
        };
        let outcome = &handle(&config(), &mut fake, &batch)[0];
        assert!(
            matches!(outcome, Outcome::Retry { .. }),
            "{fail:?} gave {outcome:?}"
        );
    }
    let mut fake = Fake {
        fail: Some(Err(HttpError::Denied("fw1.example.com".into()))),
        ..Fake::default()
    };
    let outcome = &handle(&config(), &mut fake, &batch)[0];
    assert!(
        matches!(outcome, Outcome::Reject(reason) if reason.contains("policy")),
        "{outcome:?}"
    );
}

#[test]
fn a_refused_batch_is_resent_per_vm_and_only_the_bad_vm_is_rejected() {
    let mut fake = Fake {
        refuse_tag: Some("ntnx.Bad.Value".into()),
        ..Fake::default()
    };
    let good = Vm {
        uuid: "good".into(),
        nics: vec![vec!["10.0.0.1".into()]],
        categories: vec![],
        ..web_01()
    };
    let bad = Vm {
        uuid: "bad".into(),
        nics: vec![vec!["10.0.0.2".into()]],
        categories: vec![("Bad".into(), "Value".into())],
        ..web_01()
    };
    let batch = [
        event("VM.CREATE", Some(bad.clone())),
        event("VM.CREATE", Some(good)),
        event("VM.UPDATE", Some(bad)),
        Event {
            event_type: "SUBNET.CREATE".into(),
            ..event("SUBNET.CREATE", None)
        },
    ];
    let outcomes = handle(&config(), &mut fake, &batch);
    let reject = Outcome::Reject("PAN-OS error code 12: tag is invalid".into());
    assert_eq!(
        outcomes,
        vec![reject.clone(), Outcome::Done, reject, Outcome::Done]
    );
    assert_eq!(fake.requests.len(), 3, "the batch, then each VM alone");
    assert_eq!(
        fake.registered,
        BTreeMap::from([("10.0.0.1".to_owned(), set(&[MANAGED]))])
    );
    assert!(fake.kv.contains_key("vm/ncn-dev-sandbox/good"));
    assert!(!fake.kv.contains_key("vm/ncn-dev-sandbox/bad"));
}

#[test]
fn an_event_without_the_body_it_needs_is_done_without_change() {
    let mut fake = Fake::default();
    assert_eq!(
        handle(&config(), &mut fake, &[event("VM.UPDATE", None)]),
        vec![Outcome::Done]
    );
    assert!(fake.requests.is_empty());
    assert!(fake
        .logs
        .iter()
        .any(|(level, m)| *level == Level::Warn && m.contains("no VM body")));
}

#[test]
fn a_vm_off_without_a_body_still_removes_the_vm() {
    let mut fake = Fake::default();
    step(&mut fake, event("VM.UPDATE", Some(web_01())));
    step(&mut fake, event("VM.OFF", None));
    assert!(fake.registered.is_empty());
}

#[test]
fn harmless_duplicate_answers_count_as_success() {
    let duplicate = std::fs::read(format!(
        "{}/../../tests/fixtures/panos/uid_response_error_duplicate.xml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let mut fake = Fake {
        fail: Some(Ok(Response {
            status: 200,
            headers: vec![],
            body: duplicate,
        })),
        ..Fake::default()
    };
    assert_eq!(
        handle(&config(), &mut fake, &[event("VM.UPDATE", Some(web_01()))]),
        vec![Outcome::Done]
    );
    assert!(fake.kv.contains_key(&format!("vm/ncn-dev-sandbox/{UUID}")));
}

/// A reconcile as the host makes it: the whole inventory in one list, or
/// a page at a time.
type Reconcile = fn(&Config, &mut Fake, &str, &[Vm]) -> Result<String, String>;

fn whole(config: &Config, fake: &mut Fake, cluster: &str, vms: &[Vm]) -> Result<String, String> {
    reconcile(config, fake, cluster, vms)
}

/// Pages of two VMs; like the host, discards the kv writes of a failure.
fn paged(config: &Config, fake: &mut Fake, cluster: &str, vms: &[Vm]) -> Result<String, String> {
    let mut pages = vms.chunks(2).map(<[Vm]>::to_vec);
    let stored = fake.kv.clone();
    let result = crate::paged::reconcile(config, fake, cluster, || pages.next());
    if result.is_err() {
        fake.kv = stored;
    }
    result
}

const RECONCILES: [(&str, Reconcile); 2] = [("whole", whole), ("paged", paged)];

#[test]
fn reconcile_repairs_a_hand_changed_tag_and_leaves_foreign_tags_alone() {
    for (how, reconcile) in RECONCILES {
        let registered = BTreeMap::from([
            // Someone removed `ntnx.managed` and added a stale owned tag by hand.
            (
                IP1.to_owned(),
                set(&[WEB, PROD, "ntnx.AppTier.Old", "finance-server"]),
            ),
            // An IP only other systems manage.
            ("192.168.1.1".to_owned(), set(&["user-group-x"])),
            // An owned registration for a VM that no longer exists.
            ("10.9.9.9".to_owned(), set(&[MANAGED])),
        ]);
        let mut fake = Fake {
            registered,
            ..Fake::default()
        };
        let off = Vm {
            uuid: "off".into(),
            power_state: Some("OFF".into()),
            nics: vec![vec!["10.7.7.7".into()]],
            ..web_01()
        };
        let summary = reconcile(&config(), &mut fake, "ncn-dev-sandbox", &[web_01(), off]).unwrap();

        assert_eq!(summary, "4 registered, 2 unregistered, 2 VMs", "{how}");
        assert_eq!(
            fake.registered[IP1],
            set(&[MANAGED, WEB, PROD, "finance-server"]),
            "{how}"
        );
        assert_eq!(fake.registered[IP2], set(&[MANAGED, WEB, PROD]), "{how}");
        assert_eq!(fake.registered["192.168.1.1"], set(&["user-group-x"]));
        assert!(!fake.registered.contains_key("10.9.9.9"), "{how}");
        let unregistered = &fake.messages[0].unregister;
        assert!(unregistered
            .values()
            .flatten()
            .all(|t| t.starts_with("ntnx.")));

        // The records now match, so events and a second reconcile change nothing.
        assert!(fake.kv.contains_key(&format!("vm/ncn-dev-sandbox/{UUID}")));
        assert!(!fake.kv.contains_key("vm/ncn-dev-sandbox/off"), "{how}");
        assert_eq!(
            step(&mut fake, event("VM.UPDATE", Some(web_01()))),
            None,
            "{how}"
        );
        assert_eq!(
            reconcile(&config(), &mut fake, "ncn-dev-sandbox", &[web_01()]).unwrap(),
            "0 registered, 0 unregistered, 1 VMs",
            "{how}"
        );
    }
}

#[test]
fn a_reconcile_sends_every_ip_the_firewall_takes_and_names_the_one_it_refuses() {
    for (how, reconcile) in RECONCILES {
        let mut fake = Fake {
            refuse_tag: Some("ntnx.Bad.Value".into()),
            ..Fake::default()
        };
        let mut vms: Vec<Vm> = (0..300)
            .map(|i| Vm {
                uuid: format!("vm-{i:03}"),
                power_state: Some("ON".into()),
                nics: vec![vec![format!("10.1.{}.{}", i / 250, i % 250)]],
                categories: vec![],
                ..web_01()
            })
            .collect();
        vms[150].categories = vec![("Bad".into(), "Value".into())];
        let bad_ip = vms[150].nics[0][0].clone();

        let summary = reconcile(&config(), &mut fake, "c1", &vms).unwrap();
        assert_eq!(
            summary,
            "301 registered, 0 unregistered, 300 VMs; the firewall refused the change for 1 \
             IPs, tried again at the next reconcile",
            "{how}"
        );
        assert_eq!(
            fake.registered.len(),
            299,
            "{how}: every other IP is registered"
        );
        assert!(!fake.registered.contains_key(&bad_ip), "{how}");
        let warned = fake.logs.iter().any(|(level, line)| {
            *level == Level::Warn && line.contains(&bad_ip) && line.contains("tag is invalid")
        });
        assert!(warned, "{how}: the refused IP is named: {:?}", fake.logs);
        assert!(
            fake.requests.len() < 40,
            "{how}: the bad entry is found by halving, not an IP at a time: {} requests",
            fake.requests.len()
        );

        // The next reconcile sends the refused IP again, and only it.
        fake.requests.clear();
        let again = reconcile(&config(), &mut fake, "c1", &vms).unwrap();
        assert!(
            again.starts_with("2 registered, 0 unregistered"),
            "{how}: {again}"
        );
        assert_eq!(fake.registered.len(), 299, "{how}");
    }
}

#[test]
fn a_refusal_no_single_ip_explains_still_fails_the_reconcile() {
    // Past the halving's budget, and well within it.
    for ((how, reconcile), count) in RECONCILES.iter().flat_map(|r| [(r, 200), (r, 10)]) {
        let mut fake = Fake {
            refuse_tag: Some(MANAGED.into()),
            ..Fake::default()
        };
        let vms: Vec<Vm> = (0..count)
            .map(|i| Vm {
                uuid: format!("vm-{i:03}"),
                nics: vec![vec![format!("10.2.0.{i}")]],
                ..web_01()
            })
            .collect();
        let error = reconcile(&config(), &mut fake, "c1", &vms).unwrap_err();
        assert!(error.contains("tag is invalid"), "{how}: {error}");
        assert!(fake.registered.is_empty(), "{how}");
        assert!(
            fake.requests.len() <= 100,
            "{how}: the halving gives up: {} requests",
            fake.requests.len()
        );
    }
}

#[test]
fn the_paged_reconcile_reads_kv_keys_a_page_at_a_time_and_still_removes_every_stale_vm() {
    // `count` powered-on VMs named `<name>-NNNN`, one IP each in 10.`net`/16.
    let vms = |name: &str, net: u32, count: u32| -> Vec<Vm> {
        (0..count)
            .map(|i| Vm {
                uuid: format!("{name}-{i:04}"),
                power_state: Some("ON".into()),
                nics: vec![vec![format!("10.{net}.{}.{}", i / 250, i % 250)]],
                ..Vm::default()
            })
            .collect()
    };
    let (live, gone) = (vms("live", 1, 2_500), vms("gone", 2, 1_200));
    let mut fake = Fake::default();
    let both = [gone.clone(), live.clone()].concat();
    paged(&config(), &mut fake, "c1", &both).unwrap();
    assert_eq!(fake.registered.len(), 3_700);

    fake.kv_lists = 0;
    fake.largest_key_list = 0;
    let summary = paged(&config(), &mut fake, "c1", &live).unwrap();
    assert_eq!(summary, "0 registered, 1200 unregistered, 2500 VMs");
    assert_eq!(fake.registered.len(), 2_500);
    assert!(fake.registered.keys().all(|ip| ip.starts_with("10.1.")));
    assert!(!fake.kv.keys().any(|k| k.contains("gone-")));
    assert_eq!(
        fake.largest_key_list,
        Keys::PAGE as usize,
        "no list of keys is longer than a page"
    );
    // 3,700 VM records, then the 2,500 IP records left twice (repair and
    // compare; the gone VMs' went with them): 4 + 3 + 3 pages.
    assert!(fake.kv_lists >= 10, "{} lists", fake.kv_lists);
}

#[test]
fn with_a_registration_timeout_reconcile_registers_every_live_tag_again() {
    let timed =
        Config::parse(r#"{"firewall": "https://fw1.example.com", "registration_timeout": 600}"#)
            .unwrap();
    for (how, reconcile) in RECONCILES {
        let mut fake = Fake::default();
        let first = reconcile(&timed, &mut fake, "ncn-dev-sandbox", &[web_01()]).unwrap();
        assert_eq!(
            first, "6 registered (0 refreshed), 0 unregistered, 1 VMs",
            "{how}"
        );
        // Nothing changed, yet everything is registered again so that the
        // firewall starts each timeout over.
        let second = reconcile(&timed, &mut fake, "ncn-dev-sandbox", &[web_01()]).unwrap();
        assert_eq!(
            second, "0 registered (6 refreshed), 0 unregistered, 1 VMs",
            "{how}"
        );
        assert_eq!(fake.messages.len(), 2, "{how}");
        let again = &fake.messages[1];
        assert_eq!(again.register[IP1], set(&[MANAGED, WEB, PROD]));
        assert_eq!(again.register[IP2], set(&[MANAGED, WEB, PROD]));
        assert!(again.unregister.is_empty());
        // Without a timeout there is nothing to refresh and nothing is sent.
        let mut quiet = Fake::default();
        reconcile(&config(), &mut quiet, "ncn-dev-sandbox", &[web_01()]).unwrap();
        reconcile(&config(), &mut quiet, "ncn-dev-sandbox", &[web_01()]).unwrap();
        assert_eq!(quiet.messages.len(), 1, "{how}");
    }
}

#[test]
fn compare_mode_reports_the_difference_and_never_writes() {
    let compare =
        Config::parse(r#"{"firewall": "https://fw1.example.com", "compare": true}"#).unwrap();
    for (how, reconcile) in RECONCILES {
        let registered = BTreeMap::from([
            (IP1.to_owned(), set(&[MANAGED, WEB])),
            ("10.9.9.9".to_owned(), set(&[MANAGED])),
        ]);
        let mut fake = Fake {
            registered: registered.clone(),
            ..Fake::default()
        };
        assert_eq!(
            handle(&compare, &mut fake, &[event("VM.ON", Some(web_01()))]),
            vec![Outcome::Done]
        );
        let summary = reconcile(&compare, &mut fake, "ncn-dev-sandbox", &[web_01()]).unwrap();
        assert_eq!(
            summary, "compare mode: 4 missing, 1 extra, 1 VMs (nothing sent)",
            "{how}"
        );
        assert!(fake.messages.is_empty(), "nothing was sent");
        assert!(fake.kv.is_empty(), "nothing was recorded");
        assert_eq!(fake.registered, registered);
        assert!(
            fake.logs
                .iter()
                .any(|(_, l)| l.contains("10.9.9.9 ntnx.managed")),
            "{:?}",
            fake.logs
        );
    }
}

#[test]
fn reconcile_keeps_other_clusters_and_drops_vms_gone_from_the_inventory() {
    for (how, reconcile) in RECONCILES {
        let mut fake = Fake::default();
        let other = Vm {
            uuid: "other".into(),
            nics: vec![vec!["10.5.5.5".into()]],
            categories: vec![],
            ..web_01()
        };
        let gone = Vm {
            uuid: "gone".into(),
            nics: vec![vec!["10.6.6.6".into()]],
            categories: vec![],
            ..web_01()
        };
        handle(
            &config(),
            &mut fake,
            &[Event {
                cluster: "cl-2".into(),
                ..event("VM.CREATE", Some(other))
            }],
        );
        handle(&config(), &mut fake, &[event("VM.CREATE", Some(gone))]);

        let summary = reconcile(&config(), &mut fake, "ncn-dev-sandbox", &[]).unwrap();
        assert_eq!(summary, "0 registered, 1 unregistered, 0 VMs", "{how}");
        assert_eq!(
            fake.registered,
            BTreeMap::from([("10.5.5.5".to_owned(), set(&[MANAGED]))]),
            "{how}"
        );
        let keys: Vec<&String> = fake.kv.keys().collect();
        assert_eq!(keys, ["ip/10.5.5.5", "vm/cl-2/other"], "{how}");
    }
}

#[test]
fn reconcile_reads_every_page_of_registered_ips() {
    for (how, reconcile) in RECONCILES {
        let mut fake = Fake::default();
        for i in 0..1200 {
            fake.registered
                .insert(format!("10.8.{}.{}", i / 200, i % 200), set(&[MANAGED]));
        }
        let summary = reconcile(&config(), &mut fake, "ncn-dev-sandbox", &[]).unwrap();
        assert_eq!(summary, "0 registered, 1200 unregistered, 0 VMs", "{how}");
        let queries = fake
            .requests
            .iter()
            .filter(|r| form(&r.body)["type"] == "op")
            .count();
        assert_eq!(queries, 3, "{how}");
        assert!(fake.registered.is_empty(), "{how}");
    }
}

#[test]
fn reconcile_reports_a_firewall_failure_as_an_error() {
    for (how, reconcile) in RECONCILES {
        let mut fake = Fake {
            fail: Some(Err(HttpError::Timeout)),
            ..Fake::default()
        };
        let err = reconcile(&config(), &mut fake, "ncn-dev-sandbox", &[web_01()]).unwrap_err();
        assert!(err.contains("did not answer"), "{how}: {err}");
        assert!(fake.kv.is_empty(), "{how}");
    }
}

#[test]
fn the_paged_reconcile_repairs_ip_records_a_dead_host_left_half_written() {
    let mut fake = Fake::default();
    step(&mut fake, event("VM.CREATE", Some(vm_on_one_nic())));
    // An `ip/` record claims the VM for an IP its `vm/` record does not
    // have, and another lost the VM's entry (a JetStream kv batch stored
    // without the next one).
    let key = format!("ncn-dev-sandbox/{UUID}");
    let stray = IpRecord::from([(key.clone(), set(&[MANAGED]))]);
    fake.kv.insert("ip/10.3.3.3".into(), state::encode(&stray));
    fake.kv.remove(&format!("ip/{IP1}"));
    fake.registered.insert("10.3.3.3".into(), set(&[MANAGED]));

    let summary = paged(&config(), &mut fake, "ncn-dev-sandbox", &[vm_on_one_nic()]).unwrap();
    assert_eq!(summary, "0 registered, 1 unregistered, 1 VMs");
    assert_eq!(
        fake.registered,
        BTreeMap::from([(IP1.to_owned(), set(&[MANAGED]))])
    );
    assert!(!fake.kv.contains_key("ip/10.3.3.3"));
    let record: IpRecord = state::decode(&fake.kv[&format!("ip/{IP1}")]).unwrap();
    assert_eq!(record, IpRecord::from([(key, set(&[MANAGED]))]));
}

#[test]
fn requests_never_carry_credentials() {
    let mut fake = Fake::default();
    step(&mut fake, event("VM.UPDATE", Some(web_01())));
    reconcile(&config(), &mut fake, "ncn-dev-sandbox", &[web_01()]).unwrap();
    for request in &fake.requests {
        let body = form(&request.body);
        assert!(!body.contains_key("key") && !request.url.contains("key="));
        assert!(request
            .headers
            .iter()
            .all(|(name, _)| !name.eq_ignore_ascii_case("x-pan-key")));
    }
}

/// A test-only stand-in for the host's reading of a Nutanix notification:
/// `(event_type, entity_uuid, vm)` with the VM from `status`, or `None` when
/// `data.metadata` is empty.
fn nutanix_fixture(name: &str) -> Event {
    let path = format!(
        "{}/../../tests/fixtures/nutanix/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let body: serde_json::Value = serde_json::from_str(&text).unwrap();
    let uuid = body["entity_reference"]["uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    let intent = &body["data"]["metadata"];
    let resources = &intent["status"]["resources"];
    let vm = intent.get("status").map(|_| Vm {
        uuid: uuid.clone(),
        name: intent["status"]["name"].as_str().map(str::to_owned),
        power_state: resources["power_state"].as_str().map(str::to_owned),
        categories: intent["metadata"]["categories"]
            .as_object()
            .map(|c| {
                c.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
                    .collect()
            })
            .unwrap_or_default(),
        cluster_name: intent["status"]["cluster_reference"]["name"]
            .as_str()
            .map(str::to_owned),
        nics: resources["nic_list"]
            .as_array()
            .unwrap()
            .iter()
            .map(|nic| {
                let endpoints = nic["ip_endpoint_list"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                endpoints
                    .iter()
                    .map(|e| e["ip"].as_str().unwrap().to_owned())
                    .collect()
            })
            .collect(),
    });
    Event {
        id: name.to_owned(),
        cluster: "ncn-dev-sandbox".into(),
        event_type: body["event_type"].as_str().unwrap().to_owned(),
        entity_uuid: uuid,
        vm,
    }
}

#[test]
fn the_nutanix_fixture_events_want_the_expected_tags() {
    let config = config();
    let web = &[MANAGED, WEB][..];
    let cases: [(&str, IpTags); 7] = [
        ("vm_create.json", IpTags::new()), // created powered off
        ("vm_on.json", ip_tags(&[("1.2.3.4", &[MANAGED])])),
        (
            "vm_update_nic_ip.json",
            ip_tags(&[(IP1, &[MANAGED, WEB, PROD]), (IP2, &[MANAGED, WEB, PROD])]),
        ),
        (
            "vm_nic_plug.json",
            ip_tags(&[(IP1, web), ("192.168.50.23", web)]),
        ),
        ("vm_migrate.json", ip_tags(&[(IP1, web)])),
        ("vm_off.json", IpTags::new()),
        ("vm_delete_full.json", IpTags::new()),
    ];
    for (name, want) in cases {
        let event = nutanix_fixture(name);
        assert_eq!(
            intended(&config, &mut Fake::default(), &event),
            Some(want),
            "{name}"
        );
    }
}

#[test]
fn the_nutanix_fixture_sequence_keeps_the_firewall_in_step() {
    let mut fake = Fake::default();
    let web = &[MANAGED, WEB][..];
    let steps: [(&str, IpTags); 6] = [
        ("vm_create.json", IpTags::new()),
        (
            "vm_update_nic_ip.json",
            ip_tags(&[(IP1, &[MANAGED, WEB, PROD]), (IP2, &[MANAGED, WEB, PROD])]),
        ),
        (
            "vm_nic_plug.json",
            ip_tags(&[(IP1, web), ("192.168.50.23", web)]),
        ),
        ("vm_migrate.json", ip_tags(&[(IP1, web)])),
        ("vm_off.json", IpTags::new()),
        ("vm_delete_full.json", IpTags::new()),
    ];
    for (name, want) in steps {
        assert_eq!(
            handle(&config(), &mut fake, &[nutanix_fixture(name)]),
            vec![Outcome::Done],
            "{name}"
        );
        assert_eq!(fake.registered, want, "after {name}");
    }
    assert!(fake.kv.is_empty());
}
