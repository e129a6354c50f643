//! The Palo Alto plugin, compiled to a component, against the PAN-OS
//! simulator: the firewall's User-ID table follows a VM's lifecycle built
//! from the Nutanix fixtures, with one User-ID message per batch and no
//! commits.

use crate::common::{self, drop_second_nic, empty_delete, note, set_power, table};

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use prismhook::nutanix::payload::parse_notification;
use prismhook::runtime::bindings::{Event, Outcome, Vm as WitVm};
use prismhook::runtime::policy::{InjectedHeader, OriginRule, OutboundPolicy};
use prismhook::runtime::{Plugin, PluginSettings, Runtime, RuntimeOptions};
use prismhook::secret::Secret;
use prismhook_sim::panos::{Faults, PanosConfig, PanosSim};
use serde_json::{json, Value};

const VM: &str = "bdbbad7a-a401-4f9a-a789-2b8406905b56";

struct Rig {
    panos: PanosSim,
    runtime: Arc<Runtime>,
    plugin: Plugin,
    next_id: u64,
    _dir: tempfile::TempDir,
}

async fn rig(extra: Value) -> Rig {
    rig_on(PanosConfig::default(), extra).await
}

/// The plugin with `extra` settings, against a PAN-OS simulator of `cfg`.
async fn rig_on(cfg: PanosConfig, extra: Value) -> Rig {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let key = cfg.api_key.clone();
    let panos = PanosSim::start("127.0.0.1:0".parse().unwrap(), cfg)
        .await
        .unwrap();
    let runtime = Runtime::new(RuntimeOptions::new(dir.path().join("kv.redb"))).unwrap();
    let fw = panos.base_url();
    let mut config = json!({ "firewall": fw });
    if let (Value::Object(c), Value::Object(e)) = (&mut config, extra) {
        c.extend(e);
    }
    let origin = OriginRule::parse(&fw).unwrap();
    let settings = PluginSettings {
        config,
        policy: OutboundPolicy::new(
            vec![origin.clone()],
            vec![InjectedHeader {
                origin,
                name: http::HeaderName::from_static("x-pan-key"),
                value: Secret::new(key),
            }],
        ),
        ..Default::default()
    };
    let plugin = runtime
        .load(&common::component("paloalto"), settings)
        .await
        .unwrap();
    Rig {
        panos,
        runtime,
        plugin,
        next_id: 1,
        _dir: dir,
    }
}

impl Rig {
    fn event(&mut self, body: &Value) -> Event {
        let text = body.to_string();
        let n = parse_notification(text.as_bytes()).expect("fixture parses");
        let id = self.next_id;
        self.next_id += 1;
        Event {
            id: id.to_string(),
            cluster: "lab".into(),
            event_type: n.event_type,
            entity_kind: n.entity_kind,
            entity_uuid: n.entity_uuid,
            attempt: 1,
            received_at_ms: 0,
            body: text,
            vm: n.vm.as_ref().map(WitVm::from),
        }
    }

    async fn deliver(&mut self, bodies: &[Value]) -> Vec<Outcome> {
        let events: Vec<Event> = bodies.iter().map(|b| self.event(b)).collect();
        self.plugin
            .handle(events)
            .await
            .expect("handle does not fail")
    }

    fn table(&self) -> BTreeMap<String, Vec<String>> {
        self.panos.registered()
    }
}

fn all_done(out: &[Outcome]) -> bool {
    out.iter().all(|o| matches!(o, Outcome::Done))
}

#[tokio::test]
async fn the_firewall_follows_a_vm_through_its_whole_lifecycle() {
    let mut r = rig(json!({})).await;
    let web_tags: &[&str] = &[
        "ntnx.AppTier.Web",
        "ntnx.Environment.Production",
        "ntnx.managed",
    ];

    // Created powered off: nothing to register yet.
    assert!(all_done(
        &r.deliver(&[note("nutanix/vm_create.json", "VM.CREATE", |_| {})])
            .await
    ));
    assert_eq!(r.table(), table(&[]));

    // Powered on: the static tag on its one IP.
    let on = note("nutanix/vm_create.json", "VM.ON", |b| set_power(b, "ON"));
    assert!(all_done(&r.deliver(&[on]).await));
    assert_eq!(r.table(), table(&[("10.23.129.96", &["ntnx.managed"])]));

    // A second NIC with a new IP and two categories.
    assert!(all_done(
        &r.deliver(&[note("nutanix/vm_update_nic_ip.json", "VM.UPDATE", |_| {})])
            .await
    ));
    assert_eq!(
        r.table(),
        table(&[("10.23.129.96", web_tags), ("10.40.142.61", web_tags)])
    );

    // The second NIC unplugged: its IP loses every tag.
    let unplug = note(
        "nutanix/vm_update_nic_ip.json",
        "VM.NIC_UNPLUG",
        drop_second_nic,
    );
    assert!(all_done(&r.deliver(&[unplug]).await));
    assert_eq!(r.table(), table(&[("10.23.129.96", web_tags)]));

    // Powered off: everything it registered goes.
    assert!(all_done(
        &r.deliver(&[note("nutanix/vm_off.json", "VM.OFF", |_| {})])
            .await
    ));
    assert_eq!(r.table(), table(&[]));

    // Deleted with an empty body: nothing left to undo, and nothing fails.
    assert!(all_done(&r.deliver(&[empty_delete(VM)]).await));
    assert_eq!(r.table(), table(&[]));

    let stats = r.panos.stats();
    assert_eq!(stats.commits, 0);
    assert_eq!(
        stats.keygens, 0,
        "the plugin never asks for a key: the host injects it"
    );
    // create and delete changed nothing, so sent nothing.
    assert_eq!(stats.uid_messages, 4);
}

#[tokio::test]
async fn a_delete_without_a_body_undoes_what_was_registered_for_the_vm() {
    let mut r = rig(json!({})).await;
    r.deliver(&[note("nutanix/vm_update_nic_ip.json", "VM.UPDATE", |_| {})])
        .await;
    assert_eq!(r.table().len(), 2);
    assert!(all_done(&r.deliver(&[empty_delete(VM)]).await));
    assert_eq!(r.table(), table(&[]));
}

#[tokio::test]
async fn a_burst_of_events_for_many_vms_is_one_firewall_request() {
    let mut r = rig(json!({})).await;
    let bodies: Vec<Value> = (0..200)
        .map(|i| {
            note("nutanix/vm_on.json", "VM.ON", |b| {
                let uuid = format!("00000000-0000-4000-8000-{i:012}");
                b["entity_reference"]["uuid"] = json!(uuid);
                b["data"]["metadata"]["metadata"]["uuid"] = json!(uuid);
                for part in ["spec", "status"] {
                    b["data"]["metadata"][part]["resources"]["nic_list"][0]["ip_endpoint_list"]
                        [0]["ip"] = json!(format!("10.1.{}.{}", i / 250, i % 250 + 1));
                }
            })
        })
        .collect();
    assert!(all_done(&r.deliver(&bodies).await));
    assert_eq!(r.table().len(), 200);
    let stats = r.panos.stats();
    assert_eq!(
        (stats.requests, stats.uid_messages, stats.commits),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn a_firewall_that_is_down_gets_the_batch_retried_and_nothing_recorded() {
    let mut r = rig(json!({})).await;
    r.panos.set_faults(Faults {
        fail_status: Some(503),
        ..Default::default()
    });
    let out = r
        .deliver(&[note("nutanix/vm_on.json", "VM.ON", |_| {})])
        .await;
    assert!(
        matches!(&out[0], Outcome::Retry(retry) if retry.reason.contains("503")),
        "{out:?}"
    );
    r.panos.set_faults(Faults::default());
    // Redelivery recomputes the same change, since nothing was recorded.
    let out = r
        .deliver(&[note("nutanix/vm_on.json", "VM.ON", |_| {})])
        .await;
    assert!(all_done(&out));
    assert_eq!(r.table(), table(&[("1.2.3.4", &["ntnx.managed"])]));
}

#[tokio::test]
async fn a_firewall_that_drops_connections_gets_the_batch_retried() {
    let mut r = rig(json!({})).await;
    r.panos.set_faults(Faults {
        drop_connections: true,
        ..Default::default()
    });
    let out = r
        .deliver(&[note("nutanix/vm_on.json", "VM.ON", |_| {})])
        .await;
    assert!(matches!(&out[0], Outcome::Retry(_)), "{out:?}");
}

#[tokio::test]
async fn redelivering_the_same_events_is_harmless() {
    let mut r = rig(json!({})).await;
    let update = note("nutanix/vm_update_nic_ip.json", "VM.UPDATE", |_| {});
    r.deliver(std::slice::from_ref(&update)).await;
    let before = r.table();
    let requests = r.panos.stats().requests;
    assert!(all_done(&r.deliver(&[update]).await));
    assert_eq!(r.table(), before);
    assert_eq!(
        r.panos.stats().requests,
        requests,
        "nothing changed, so nothing is sent"
    );
}

#[tokio::test]
async fn categories_map_to_tags_with_the_configured_format() {
    let mut r = rig(json!({"tag_prefix": "acme", "category_tag": "{prefix}.PC-pc1.CL-{cluster}.{key}.{value}", "static_tag": ""})).await;
    r.deliver(&[note("nutanix/vm_off.json", "VM.UPDATE", |b| {
        set_power(b, "ON")
    })])
    .await;
    assert_eq!(
        r.table(),
        table(&[("10.23.129.96", &["acme.PC-pc1.CL-lab.AppTier.Web"])])
    );
}

#[tokio::test]
async fn a_hostile_category_value_cannot_inject_xml() {
    let mut r = rig(json!({})).await;
    let body = note("nutanix/vm_on.json", "VM.ON", |b| {
        b["data"]["metadata"]["metadata"]["categories"] =
            json!({"App": "x'\"]<member>evil</member>&"});
    });
    assert!(all_done(&r.deliver(&[body]).await));
    let tags = &r.table()["1.2.3.4"];
    assert!(!tags.iter().any(|t| t == "evil"), "{tags:?}");
    assert_eq!(tags.len(), 2, "{tags:?}");
}

#[tokio::test]
async fn reconcile_repairs_a_missed_delete_and_a_tag_changed_by_hand() {
    let mut r = rig(json!({})).await;
    r.deliver(&[note("nutanix/vm_update_nic_ip.json", "VM.UPDATE", |_| {})])
        .await;
    r.deliver(&[note("nutanix/vm_on.json", "VM.ON", |_| {})])
        .await;
    // Someone removes a tag by hand and adds one of ours to a stray IP;
    // a tag outside our prefix must survive, and so must one of Palo Alto's
    // Panorama plugin for Nutanix, under `ntnx.PC-` (running beside it, as
    // when moving from it).
    let panorama = "ntnx.PC-East.CL-ahv-01.AppTier.Web";
    r.panos
        .register_directly("10.99.0.1", &["ntnx.managed", "other.team", panorama]);
    // The inventory no longer has the second VM (its VM.DELETE was lost).
    let vm = parse_notification(
        common::fixture_json("nutanix/vm_update_nic_ip.json")
            .to_string()
            .as_bytes(),
    )
    .unwrap()
    .vm
    .unwrap();
    let summary = r
        .plugin
        .reconcile("lab", std::sync::Arc::new(vec![vm]), Default::default())
        .await
        .unwrap()
        .unwrap();
    let web: &[&str] = &[
        "ntnx.AppTier.Web",
        "ntnx.Environment.Production",
        "ntnx.managed",
    ];
    assert_eq!(
        r.table(),
        table(&[
            ("10.23.129.96", web),
            ("10.40.142.61", web),
            ("10.99.0.1", &[panorama, "other.team"])
        ]),
        "{summary}"
    );
    assert_eq!(r.panos.stats().commits, 0);
    let _ = (&r.runtime, Duration::ZERO);
}

#[tokio::test]
async fn the_platforms_registered_ip_limit_is_a_dead_letter_that_says_so() {
    let full = PanosConfig {
        max_registered_ips: Some(1),
        ..Default::default()
    };
    let mut r = rig_on(full, json!({})).await;
    let out = r
        .deliver(&[note("nutanix/vm_on.json", "VM.ON", |_| {})])
        .await;
    assert!(all_done(&out), "{out:?}");
    let out = r
        .deliver(&[note("nutanix/vm_nic_plug.json", "VM.NIC_PLUG", |_| {})])
        .await;
    assert!(
        matches!(&out[0], Outcome::Reject(reason)
            if reason.contains("registered-IP limit for its platform is reached")
                && reason.contains("max registered-ip for the platform reached (1)")),
        "{out:?}"
    );
    assert_eq!(r.table(), table(&[("1.2.3.4", &["ntnx.managed"])]));
}

#[tokio::test]
async fn through_panorama_every_request_names_the_target_firewall() {
    let serial = prismhook_sim::panos::SERIAL;
    let mut r = rig(json!({ "target": serial, "vsys": "vsys1" })).await;
    let out = r
        .deliver(&[note("nutanix/vm_on.json", "VM.ON", |_| {})])
        .await;
    assert!(all_done(&out), "{out:?}");
    assert_eq!(r.table(), table(&[("1.2.3.4", &["ntnx.managed"])]));
    let sent = r.panos.requests(10);
    assert!(!sent.is_empty());
    for request in &sent {
        assert_eq!(
            request.params.get("target").map(String::as_str),
            Some(serial),
            "{request:?}"
        );
    }

    // A serial Panorama does not manage is the operator's mistake to fix:
    // a dead letter that names it, not an endless retry.
    let mut wrong = rig(json!({ "target": "000000000000" })).await;
    let out = wrong
        .deliver(&[note("nutanix/vm_on.json", "VM.ON", |_| {})])
        .await;
    assert!(
        matches!(&out[0], Outcome::Reject(reason) if reason.contains("000000000000")),
        "{out:?}"
    );
}
