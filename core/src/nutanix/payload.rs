//! Lenient parsing of Prism v3 notification bodies and VM intents.
//!
//! Prism's payloads differ by AOS release and are barely documented: older
//! releases say `kComplete` and `POWERED_ON`, send an empty `spec`, a numeric
//! `entity_version` and null owner fields; newer ones add fields all the
//! time; a `VM.DELETE` may carry the last intent or just `{}`. So only the
//! envelope is required (an `event_type` of the form `KIND.ACTION` and an
//! entity uuid); everything about the VM is optional, null is the same as
//! absent, and unknown fields are ignored. Anything the listener refuses
//! gets an error that says what was wrong and where, because the only reader
//! is an operator looking at a log.
//!
//! The same VM parser reads the `POST /vms/list` inventory, so an event and
//! a reconcile see a VM identically.
//!
//! The Nutanix source decodes each body once, when it arrives
//! ([`parse_notification`]), into the host's own model ([`crate::event`]),
//! so nothing downstream parses Prism's JSON again. It builds only the
//! members it reads (the `READ` table, with [`super::pruned`]) and checks
//! the rest as strictly as if it built it: [`parse_notification_whole`]
//! builds everything, and the tests and the fuzz target hold the two to
//! the same answers.

use std::fmt::Write as _;

use serde_json::Value;

use super::pruned::{self, Keep};
use super::{member_at, str_at};

pub use crate::event::{Decoded, Nic, Vm};

#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("body is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("body must be a JSON object, found {0}")]
    NotAnObject(&'static str),
    #[error("missing `{0}`")]
    Missing(&'static str),
    #[error("`{field}` must be a string, found {found}")]
    NotAString {
        field: &'static str,
        found: &'static str,
    },
    #[error("`event_type` must look like KIND.ACTION, found {0:?}")]
    BadEventType(Clipped),
    #[error("missing entity uuid: neither `entity_reference.uuid` nor `data.metadata.metadata.uuid` is a non-empty string")]
    MissingEntityUuid,
}

/// The start of a sender's text quoted in an error: an answer and a log
/// line of bounded size, whatever the sender put in.
#[derive(Clone, PartialEq, Eq)]
pub struct Clipped(String);

impl Clipped {
    /// Characters kept.
    const KEPT: usize = 64;

    fn of(text: &str) -> Clipped {
        let mut kept: String = text.chars().take(Self::KEPT).collect();
        if kept.len() < text.len() {
            kept.push('…');
        }
        Clipped(kept)
    }
}

impl std::fmt::Debug for Clipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&self.0, f)
    }
}

/// The entity's uuid and lower-case kind, from the notification's
/// `entity_reference` or else the intent's `metadata`; the kind falls back
/// to the event type's `KIND`. `None` without a uuid.
fn entity(
    event_type: &str,
    reference: Option<&Value>,
    meta: Option<&Value>,
) -> Option<(String, String)> {
    let field = |name: &str| {
        reference
            .and_then(|r| str_at(r, name))
            .or_else(|| meta.and_then(|m| str_at(m, name)))
    };
    let uuid = field("/uuid")?.to_owned();
    let kind = field("/kind")
        .unwrap_or_else(|| event_type.split_once('.').map_or("", |(k, _)| k))
        .to_ascii_lowercase();
    Some((uuid, kind))
}

/// What decoding reads of a notification (in [`decode`] and
/// [`parse_vm_or`]); the rest is checked as JSON but not built. A member
/// read there and missing here would read as absent on the quick path only:
/// the tests compare both paths on every fixture and on variants of each,
/// and so does the notification fuzz target.
const READ: Keep = Keep::Members(&[
    ("event_type", Keep::All),
    ("entity_reference", UUID_KIND),
    ("data", Keep::Members(&[("metadata", INTENT)])),
]);

/// What [`parse_vm`] reads of a VM's intent, in a notification or a
/// listing.
pub const INTENT: Keep = Keep::Members(&[
    ("metadata", METADATA),
    ("spec", SPEC_OR_STATUS),
    ("status", SPEC_OR_STATUS),
]);

/// What [`decode`] and [`parse_vm_or`] read of an intent's `metadata`.
const METADATA: Keep = Keep::Members(&[
    ("uuid", Keep::All),
    ("kind", Keep::All),
    ("categories", Keep::All),
    ("categories_mapping", Keep::All),
    ("entity_version", Keep::All),
    ("spec_version", Keep::All),
    ("last_update_time", Keep::All),
]);

/// What [`parse_vm_or`] reads of an intent's `spec` or `status`.
const SPEC_OR_STATUS: Keep = Keep::Members(&[
    ("name", Keep::All),
    ("cluster_reference", NAME),
    (
        "resources",
        Keep::Members(&[
            ("power_state", Keep::All),
            ("nic_list", Keep::Each(&NIC)),
            ("host_reference", NAME),
        ]),
    ),
]);

/// What [`parse_nic`] reads of a NIC.
const NIC: Keep = Keep::Members(&[
    ("uuid", Keep::All),
    ("mac_address", Keep::All),
    (
        "ip_endpoint_list",
        Keep::Each(&Keep::Members(&[("ip", Keep::All)])),
    ),
    ("subnet_reference", NAME_UUID),
]);

/// Of a reference to another entity, what [`entity`] reads.
const UUID_KIND: Keep = Keep::Members(&[("uuid", Keep::All), ("kind", Keep::All)]);

/// Of a reference to another entity, what [`parse_nic`] reads.
const NAME_UUID: Keep = Keep::Members(&[("name", Keep::All), ("uuid", Keep::All)]);

/// Of a reference to a host or cluster, its name.
const NAME: Keep = Keep::Members(&[("name", Keep::All)]);

/// Parse a notification body as Prism POSTs it.
///
/// Only the members decoding reads are built (see [`pruned`]): the whole
/// body was 250–370 allocations, freed again at once, and the allocator's
/// work slowed every handler beside it (BENCHMARKS.md, "Reading only what
/// is decoded").
pub fn parse_notification(body: &[u8]) -> Result<Decoded, PayloadError> {
    let root = pruned::read(body, &READ).map_err(PayloadError::NotJson)?;
    decode(&root, || {
        let whole: Value = serde_json::from_slice(body).map_err(PayloadError::NotJson)?;
        Ok(body_hash(&whole))
    })
}

/// [`parse_notification`] building the whole body: the reference it must
/// agree with, answer for answer, on any input.
pub fn parse_notification_whole(body: &[u8]) -> Result<Decoded, PayloadError> {
    let root: Value = serde_json::from_slice(body).map_err(PayloadError::NotJson)?;
    decode(&root, || Ok(body_hash(&root)))
}

/// Decodes a notification whose `root` holds at least what [`READ`] keeps
/// (its type, and the members named there); `body_hash` hashes the whole
/// body, for a notification without version fields.
fn decode(
    root: &Value,
    body_hash: impl FnOnce() -> Result<u128, PayloadError>,
) -> Result<Decoded, PayloadError> {
    if !root.is_object() {
        return Err(PayloadError::NotAnObject(json_type(root)));
    }
    let event_type = match root.get("event_type") {
        None | Some(Value::Null) => return Err(PayloadError::Missing("event_type")),
        Some(Value::String(s)) => s.trim().to_owned(),
        Some(other) => {
            return Err(PayloadError::NotAString {
                field: "event_type",
                found: json_type(other),
            })
        }
    };
    if !crate::event::is_kind_action(&event_type) {
        return Err(PayloadError::BadEventType(Clipped::of(&event_type)));
    }
    let intent = member_at(root, "/data/metadata").filter(|m| is_non_empty_object(m));
    let (entity_uuid, entity_kind) = entity(
        &event_type,
        root.get("entity_reference"),
        intent.and_then(|i| i.get("metadata")),
    )
    .ok_or(PayloadError::MissingEntityUuid)?;
    let vm = match intent {
        Some(intent) if entity_kind == "vm" => parse_vm_or(intent, &entity_uuid),
        _ => None,
    };
    let dedupe_key = match versioned_key(
        &event_type,
        &entity_uuid,
        intent.and_then(|i| i.get("metadata")),
        vm.as_ref(),
    ) {
        Some(key) => key,
        // Without any of them (a delete with `data.metadata: {}`), the whole
        // body decides.
        None => format!("{event_type}/{entity_uuid}/body={:032x}", body_hash()?),
    };
    Ok(Decoded {
        event_type,
        entity_kind,
        entity_uuid,
        vm,
        dedupe_key,
    })
}

/// Read a VM out of its v3 intent (`{metadata, spec, status}`), as found at
/// a notification's `data.metadata` or in a `/vms/list` answer. `None` when
/// it is not an object or has no uuid.
pub fn parse_vm(intent: &Value) -> Option<Vm> {
    parse_vm_or(intent, "")
}

/// [`parse_vm`], taking `fallback_uuid` when the intent has none.
fn parse_vm_or(intent: &Value, fallback_uuid: &str) -> Option<Vm> {
    if !is_non_empty_object(intent) {
        return None;
    }
    let meta = intent.get("metadata");
    let uuid = meta
        .and_then(|m| str_at(m, "/uuid"))
        .or(Some(fallback_uuid).filter(|u| !u.is_empty()))?
        .to_owned();
    let spec = intent.get("spec");
    let status = intent.get("status");
    let spec_resources = spec
        .and_then(|s| s.get("resources"))
        .filter(|r| is_non_empty_object(r));
    let status_resources = status
        .and_then(|s| s.get("resources"))
        .filter(|r| is_non_empty_object(r));
    // Status is what the VM is; spec is what was asked for. Status wins, but
    // field by field: older releases leave parts of it (or all of spec) out.
    let resource = |key: &str| field(status_resources, key).or_else(|| field(spec_resources, key));
    let name = spec
        .and_then(|s| str_at(s, "/name"))
        .or_else(|| status.and_then(|s| str_at(s, "/name")))
        .map(str::to_owned);
    let power_state = resource("power_state")
        .and_then(Value::as_str)
        .map(normalise_power);
    let nics = resource("nic_list")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter(|n| n.is_object())
                .map(parse_nic)
                .collect()
        })
        .unwrap_or_default();
    let host_name = resource("host_reference")
        .and_then(|h| str_at(h, "/name"))
        .map(str::to_owned);
    // Beside `resources`, not in it; status first, as for the rest.
    let cluster_name = [status, spec]
        .into_iter()
        .flatten()
        .find_map(|s| str_at(s, "/cluster_reference/name"))
        .map(str::to_owned);
    Some(Vm {
        uuid,
        name,
        power_state,
        categories: meta.map(parse_categories).unwrap_or_default(),
        nics,
        host_name,
        cluster_name,
        entity_version: meta.and_then(|m| scalar_string(m.get("entity_version"))),
    })
}

/// `resources[key]` unless it says nothing.
fn field<'a>(resources: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    resources.and_then(|r| r.get(key)).filter(|v| !is_empty(v))
}

fn parse_nic(nic: &Value) -> Nic {
    let mut ips: Vec<String> = Vec::new();
    // A set beside the list: checking the list itself is quadratic in a
    // sender's list of a hundred thousand addresses.
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for endpoint in nic
        .get("ip_endpoint_list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(ip) = str_at(endpoint, "/ip") {
            if seen.insert(ip) {
                ips.push(ip.to_owned());
            }
        }
    }
    let subnet = nic.get("subnet_reference");
    Nic {
        uuid: str_at(nic, "/uuid").map(str::to_owned),
        mac_address: str_at(nic, "/mac_address").map(str::to_owned),
        ips,
        subnet_name: subnet.and_then(|s| str_at(s, "/name")).map(str::to_owned),
        subnet_uuid: subnet.and_then(|s| str_at(s, "/uuid")).map(str::to_owned),
    }
}

/// `categories` holds one value per key; Prism Central's
/// `categories_mapping` can hold several. Both are read and merged.
fn parse_categories(meta: &Value) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    if let Some(map) = meta.get("categories").and_then(Value::as_object) {
        for (key, value) in map {
            if let Some(value) = scalar_string(Some(value)) {
                out.push((key.clone(), value));
            }
        }
    }
    if let Some(map) = meta.get("categories_mapping").and_then(Value::as_object) {
        for (key, values) in map {
            for value in values.as_array().into_iter().flatten() {
                if let Some(value) = scalar_string(Some(value)) {
                    out.push((key.clone(), value));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn normalise_power(state: &str) -> String {
    let upper = state.trim().to_ascii_uppercase();
    match upper.as_str() {
        "ON" | "POWERED_ON" | "KPOWEREDON" => "ON".to_owned(),
        "OFF" | "POWERED_OFF" | "KPOWEREDOFF" => "OFF".to_owned(),
        _ => upper,
    }
}

/// A body's hash, of its compact re-serialisation so that whitespace does
/// not matter.
fn body_hash(root: &Value) -> u128 {
    fnv1a_128(&serde_json::to_vec(root).unwrap_or_default())
}

/// The dedupe key, built from the intent's version fields (its `metadata`),
/// which change with every change of the entity, so a redelivery matches
/// and a new change does not; `None` when it has none of them. A VM's state
/// as read (power, addresses, categories, host) goes in too: a status the
/// VM's tools report (a new address) need not move its versions, and
/// `last_update_time` counts seconds, so two such changes in one second
/// would otherwise read as one.
///
/// The fields are the sender's free text, so the key holds their hash, not
/// them: of bounded size, whatever their length, and without a separator a
/// value could contain (`"1/sv=2"` and `1`, `2` would otherwise read alike).
fn versioned_key(
    event_type: &str,
    uuid: &str,
    meta: Option<&Value>,
    vm: Option<&Vm>,
) -> Option<String> {
    use sha2::{Digest, Sha256};
    let field = |name: &str| meta.and_then(|m| scalar_string(m.get(name)));
    let mut versions = Sha256::new();
    let mut versioned = false;
    for name in ["entity_version", "spec_version", "last_update_time"] {
        // Each field present or not, and each value length-prefixed: one
        // spelling per set of versions.
        match field(name) {
            Some(value) => {
                versions.update([1]);
                versions.update((value.len() as u64).to_le_bytes());
                versions.update(value.as_bytes());
                versioned = true;
            }
            None => versions.update([0]),
        }
    }
    if let Some(vm) = vm {
        versions.update(serde_json::to_vec(vm).unwrap_or_default());
    }
    let digest = versions.finalize();
    let mut key = format!("{event_type}/{uuid}/v=");
    for byte in &digest[..16] {
        let _ = write!(key, "{byte:02x}");
    }
    versioned.then_some(key)
}

/// FNV-1a, 128 bits: stable across builds and releases (the key may be
/// stored), unlike `std`'s hasher, and dependency-free.
fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u128::from(b)).wrapping_mul(PRIME))
}

/// A string or number as a string; anything else (null, objects) as `None`.
fn scalar_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn is_non_empty_object(v: &Value) -> bool {
    v.as_object().is_some_and(|m| !m.is_empty())
}

/// Null, `""`, `[]` and `{}` say nothing, so the spec may fill them in.
fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fixture(name: &str) -> Vec<u8> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/nutanix")
            .join(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    fn parse(name: &str) -> Decoded {
        parse_notification(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const WEB01: &str = "bdbbad7a-a401-4f9a-a789-2b8406905b56";

    /// Every notification body in `tests/fixtures/nutanix`.
    const FIXTURES: [&str; 8] = [
        "vm_on.json",
        "vm_create.json",
        "vm_off.json",
        "vm_update_nic_ip.json",
        "vm_migrate.json",
        "vm_nic_plug.json",
        "vm_delete_full.json",
        "subnet_create.json",
    ];

    #[test]
    fn the_captured_vm_on_gives_name_power_ip_subnet_and_host() {
        let n = parse("vm_on.json");
        assert_eq!(n.event_type, "VM.ON");
        assert_eq!(n.entity_kind, "vm");
        assert_eq!(n.entity_uuid, "addfa04e-751f-456d-b35b-4550238a7389");
        let vm = n.vm.unwrap();
        assert_eq!(vm.uuid, n.entity_uuid);
        assert_eq!(vm.name.as_deref(), Some("example"));
        assert_eq!(vm.power_state.as_deref(), Some("ON"));
        assert!(vm.categories.is_empty());
        assert_eq!(vm.host_name.as_deref(), Some("10.10.10.101"));
        assert_eq!(vm.cluster_name.as_deref(), Some("ntnx-ahv-cluster"));
        assert_eq!(vm.entity_version, None);
        assert_eq!(
            vm.nics,
            [Nic {
                uuid: Some("e45016a1-a216-47ba-87db-422aed4d41d7".into()),
                mac_address: Some("50:6b:8d:6c:a1:3a".into()),
                ips: vec!["1.2.3.4".into()],
                subnet_name: Some("ExampleNetwork".into()),
                subnet_uuid: Some("b2751567-8165-4781-9020-be9821b593c3".into()),
            }]
        );
        // Keyed by its versions (and its state), not by the whole body.
        assert!(n
            .dedupe_key
            .starts_with("VM.ON/addfa04e-751f-456d-b35b-4550238a7389/v="));
    }

    #[test]
    fn vm_create_is_off_without_a_host_and_has_a_string_entity_version() {
        let n = parse("vm_create.json");
        assert_eq!(n.event_type, "VM.CREATE");
        let vm = n.vm.unwrap();
        assert_eq!(vm.uuid, WEB01);
        assert_eq!(vm.name.as_deref(), Some("web-01"));
        assert_eq!(vm.power_state.as_deref(), Some("OFF"));
        assert_eq!(vm.host_name, None);
        assert_eq!(vm.entity_version.as_deref(), Some("1"));
        assert_eq!(vm.nics[0].ips, ["10.23.129.96"]);
        assert_eq!(vm.nics[0].subnet_name.as_deref(), Some("vlan173"));
    }

    #[test]
    fn vm_off_reads_the_power_state_and_categories() {
        let vm = parse("vm_off.json").vm.unwrap();
        assert_eq!(vm.power_state.as_deref(), Some("OFF"));
        assert_eq!(vm.categories, pairs(&[("AppTier", "Web")]));
        assert_eq!(vm.entity_version.as_deref(), Some("5"));
    }

    #[test]
    fn vm_update_sees_both_nics_and_sorted_categories() {
        let n = parse("vm_update_nic_ip.json");
        assert_eq!(n.event_type, "VM.UPDATE");
        let vm = n.vm.unwrap();
        assert_eq!(
            vm.categories,
            pairs(&[("AppTier", "Web"), ("Environment", "Production")])
        );
        let ips: Vec<&str> = vm
            .nics
            .iter()
            .flat_map(|n| n.ips.iter().map(String::as_str))
            .collect();
        assert_eq!(ips, ["10.23.129.96", "10.40.142.61"]);
        assert_eq!(vm.nics[1].subnet_name.as_deref(), Some("sherlock_net"));
        assert_eq!(vm.host_name.as_deref(), Some("10.17.33.14"));
    }

    #[test]
    fn vm_migrate_reports_the_new_host() {
        let n = parse("vm_migrate.json");
        assert_eq!(n.event_type, "VM.MIGRATE");
        assert_eq!(n.vm.unwrap().host_name.as_deref(), Some("10.17.33.15"));
    }

    #[test]
    fn vm_nic_plug_includes_learned_addresses() {
        let vm = parse("vm_nic_plug.json").vm.unwrap();
        assert_eq!(vm.nics.len(), 2);
        assert_eq!(vm.nics[1].ips, ["192.168.50.23"]);
        assert_eq!(vm.nics[1].mac_address.as_deref(), Some("50:6b:8d:a0:0b:0c"));
        assert_eq!(
            vm.nics[1].subnet_uuid.as_deref(),
            Some("5f1e2d3c-4b5a-4697-8877-66a5b4c3d2e1")
        );
    }

    #[test]
    fn a_full_delete_carries_the_last_intent() {
        let n = parse("vm_delete_full.json");
        assert_eq!(n.event_type, "VM.DELETE");
        let vm = n.vm.unwrap();
        assert_eq!(vm.name.as_deref(), Some("web-01"));
        assert_eq!(vm.entity_version.as_deref(), Some("6"));
        assert!(n.dedupe_key.starts_with(&format!("VM.DELETE/{WEB01}/v=")));
    }

    #[test]
    fn a_subnet_event_has_its_kind_and_no_vm() {
        let n = parse("subnet_create.json");
        assert_eq!(n.event_type, "SUBNET.CREATE");
        assert_eq!(n.entity_kind, "subnet");
        assert_eq!(n.entity_uuid, "c7938dc6-7659-453e-a688-e26020c68e43");
        assert!(n.vm.is_none());
    }

    /// The dedupe key of a notification whose intent's `metadata` is `meta`
    /// and nothing else: which of a body's fields its key depends on.
    fn key_of_versions(event_type: &str, uuid: &str, meta: Value) -> String {
        let body = json!({
            "event_type": event_type,
            "entity_reference": { "kind": "vm", "uuid": uuid },
            "data": { "metadata": { "metadata": meta } },
        });
        parse_notification(&serde_json::to_vec(&body).unwrap())
            .unwrap()
            .dedupe_key
    }

    #[test]
    fn a_dedupe_key_has_a_bounded_size_and_one_spelling_whatever_the_versions_hold() {
        let key = |meta: Value| key_of_versions("VM.ON", WEB01, meta);
        let plain = key(json!({ "entity_version": "1", "spec_version": "2" }));
        assert!(plain.starts_with(&format!("VM.ON/{WEB01}/v=")), "{plain}");
        // A separator inside a value does not make two sets of versions alike.
        assert_ne!(key(json!({ "entity_version": "1/sv=2" })), plain);
        assert_ne!(
            key(json!({ "entity_version": "2", "spec_version": "1" })),
            plain
        );
        assert_ne!(
            key(json!({ "spec_version": "1" })),
            key(json!({ "entity_version": "1" }))
        );
        // Line breaks and a megabyte of version become the same 32 hex digits.
        for hostile in ["1\r\nNats-Msg-Id: x", &"9".repeat(1 << 20)] {
            let k = key(json!({ "entity_version": hostile }));
            assert_eq!(k.len(), plain.len());
            assert!(k.bytes().all(|b| b.is_ascii_graphic()), "{k:?}");
        }
        // A redelivery, the numbers spelt as strings or not, keeps its key.
        assert_eq!(
            key(json!({ "entity_version": 1, "spec_version": 2 })),
            plain
        );
    }

    #[test]
    fn two_states_of_a_vm_under_the_same_versions_have_two_keys_and_a_redelivery_one() {
        let key = |ip: &str, noise: &str| {
            let body = json!({
                "event_type": "VM.UPDATE",
                "entity_reference": { "kind": "vm", "uuid": WEB01 },
                "data": { "metadata": {
                    "metadata": { "kind": "vm", "uuid": WEB01, "last_update_time": "2026-12-07T18:00:01Z" },
                    "status": { "resources": {
                        "power_state": "ON",
                        "nic_list": [{ "ip_endpoint_list": [{ "ip": ip }] }],
                        "unread": noise,
                    } },
                } },
            });
            parse_notification(&serde_json::to_vec(&body).unwrap())
                .unwrap()
                .dedupe_key
        };
        assert_ne!(key("10.0.0.5", ""), key("10.0.0.6", ""), "a new address");
        assert_eq!(
            key("10.0.0.5", ""),
            key("10.0.0.5", "x"),
            "what is not read does not make a change"
        );
    }

    #[test]
    fn a_bad_event_type_is_quoted_clipped() {
        let body = json!({
            "event_type": "<".repeat(1 << 20),
            "entity_reference": { "kind": "vm", "uuid": WEB01 },
        });
        let error = parse_notification(&serde_json::to_vec(&body).unwrap()).unwrap_err();
        let text = error.to_string();
        assert!(
            text.starts_with("`event_type` must look like KIND.ACTION, found \"<<<"),
            "{text}"
        );
        assert!(text.len() < 200, "{} bytes", text.len());
    }

    #[test]
    fn every_fixture_has_a_distinct_dedupe_key() {
        let mut keys: Vec<String> = FIXTURES.iter().map(|n| parse(n).dedupe_key).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), FIXTURES.len());
    }

    #[test]
    fn a_delete_with_empty_metadata_keeps_only_the_uuid() {
        let body = json!({
            "entity_reference": { "kind": "vm", "uuid": WEB01 },
            "data": { "metadata": {} },
            "version": "1.0",
            "event_type": "VM.DELETE",
        });
        let bytes = serde_json::to_vec(&body).unwrap();
        let n = parse_notification(&bytes).unwrap();
        assert_eq!(n.entity_uuid, WEB01);
        assert_eq!(n.entity_kind, "vm");
        assert!(n.vm.is_none());
        assert!(n
            .dedupe_key
            .starts_with(&format!("VM.DELETE/{WEB01}/body=")));

        // Identical bodies, however spaced, dedupe; a different one does not.
        let spaced = serde_json::to_vec_pretty(&body).unwrap();
        assert_eq!(
            parse_notification(&spaced).unwrap().dedupe_key,
            n.dedupe_key
        );
        let mut other = body.clone();
        other["version"] = json!("1.1");
        let other = parse_notification(&serde_json::to_vec(&other).unwrap()).unwrap();
        assert_ne!(other.dedupe_key, n.dedupe_key);
    }

    /// The VM of `vm_off.json` rewritten the way older AOS releases send it.
    fn legacy_body() -> Value {
        let mut body: Value = serde_json::from_slice(&fixture("vm_off.json")).unwrap();
        let intent = &mut body["data"]["metadata"];
        intent["spec"] = json!({});
        intent["status"]["state"] = json!("kComplete");
        intent["metadata"]["entity_version"] = json!(5);
        intent["metadata"]["owner_reference"] = Value::Null;
        intent["metadata"]["project_reference"] = Value::Null;
        let resources = &mut intent["status"]["resources"];
        resources["power_state"] = json!("POWERED_OFF");
        let mib = resources
            .as_object_mut()
            .unwrap()
            .remove("memory_size_mib")
            .unwrap();
        resources["memory_size_mb"] = mib;
        body
    }

    #[test]
    fn legacy_payloads_parse_like_current_ones() {
        let legacy = parse_notification(&serde_json::to_vec(&legacy_body()).unwrap()).unwrap();
        let current = parse("vm_off.json");
        let (old, new) = (legacy.vm.unwrap(), current.vm.unwrap());
        assert_eq!(old, new);
        assert_eq!(old.name.as_deref(), Some("web-01"));
        assert_eq!(old.power_state.as_deref(), Some("OFF"));
        assert_eq!(old.entity_version.as_deref(), Some("5"));
        assert_eq!(legacy.dedupe_key, current.dedupe_key);
    }

    #[test]
    fn powered_on_and_empty_status_fall_back_to_spec() {
        let intent = json!({
            "metadata": { "uuid": "u1", "kind": "vm", "categories": null, "entity_version": null },
            "spec": {
                "name": "from-spec",
                "resources": {
                    "power_state": "POWERED_ON",
                    "nic_list": [{ "ip_endpoint_list": [{ "ip": "10.0.0.1" }, { "ip": "10.0.0.1", "type": "LEARNED" }, { "ip": null }] }],
                },
            },
            "status": { "state": "PENDING", "resources": {}, "name": null },
        });
        let vm = parse_vm(&intent).unwrap();
        assert_eq!(vm.name.as_deref(), Some("from-spec"));
        assert_eq!(vm.power_state.as_deref(), Some("ON"));
        assert_eq!(vm.nics[0].ips, ["10.0.0.1"]);
        assert_eq!(vm.nics[0].uuid, None);
        assert!(vm.categories.is_empty());
        assert_eq!(vm.entity_version, None);
    }

    #[test]
    fn an_empty_status_nic_list_falls_back_to_the_spec_one() {
        let intent = json!({
            "metadata": { "uuid": "u2" },
            "spec": { "resources": { "nic_list": [{ "mac_address": "50:6b:8d:00:00:01" }] } },
            "status": { "name": "older", "resources": { "nic_list": [], "power_state": "OFF" } },
        });
        let vm = parse_vm(&intent).unwrap();
        assert_eq!(vm.name.as_deref(), Some("older"));
        assert_eq!(vm.nics.len(), 1);
        assert_eq!(vm.power_state.as_deref(), Some("OFF"));
    }

    #[test]
    fn multi_valued_categories_come_from_categories_mapping() {
        let intent = json!({
            "metadata": {
                "uuid": "u3",
                "categories": { "Tier": "web", "Count": 3 },
                "categories_mapping": { "Tier": ["web", "edge"], "Env": ["prod"] },
            },
        });
        let vm = parse_vm(&intent).unwrap();
        assert_eq!(
            vm.categories,
            pairs(&[
                ("Count", "3"),
                ("Env", "prod"),
                ("Tier", "edge"),
                ("Tier", "web")
            ])
        );
    }

    #[test]
    fn an_intent_without_uuid_or_content_is_no_vm() {
        assert_eq!(parse_vm(&json!({})), None);
        assert_eq!(parse_vm(&json!(null)), None);
        assert_eq!(parse_vm(&json!({ "spec": { "name": "x" } })), None);
        assert!(parse_vm(&json!({ "metadata": { "uuid": "u4" } })).is_some());
    }

    #[test]
    fn the_entity_uuid_falls_back_to_the_intent_and_the_kind_to_the_event_type() {
        let body = json!({
            "event_type": "vm.on",
            "data": { "metadata": { "metadata": { "uuid": "u5" }, "status": { "name": "x" } } },
        });
        let n = parse_notification(body.to_string().as_bytes()).unwrap();
        assert_eq!(n.entity_uuid, "u5");
        assert_eq!(n.entity_kind, "vm");
        assert_eq!(n.vm.unwrap().name.as_deref(), Some("x"));
    }

    #[test]
    fn any_kind_action_event_type_is_accepted() {
        for event in [
            "NETWORK.CREATE",
            "SUBNET.DELETE",
            "VM.NIC_PLUG",
            "IMAGE.UPDATE",
        ] {
            let body = json!({ "event_type": event, "entity_reference": { "kind": "x", "uuid": "u" }, "extra": [1, null] });
            let n = parse_notification(body.to_string().as_bytes()).unwrap();
            assert_eq!(n.event_type, event);
            assert!(n.vm.is_none());
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let err = |body: &str| parse_notification(body.as_bytes()).unwrap_err().to_string();
        assert_eq!(
            err("{,"),
            "body is not JSON: key must be a string at line 1 column 2"
        );
        assert_eq!(err("[1]"), "body must be a JSON object, found an array");
        assert_eq!(
            err(r#"{"entity_reference":{"uuid":"u"}}"#),
            "missing `event_type`"
        );
        assert_eq!(
            err(r#"{"event_type":7}"#),
            "`event_type` must be a string, found a number"
        );
        assert_eq!(
            err(r#"{"event_type":"VMON","entity_reference":{"uuid":"u"}}"#),
            "`event_type` must look like KIND.ACTION, found \"VMON\""
        );
        assert_eq!(
            err(r#"{"event_type":"VM. ON"}"#),
            "`event_type` must look like KIND.ACTION, found \"VM. ON\""
        );
        assert!(err(r#"{"event_type":"VM.ON","data":{"metadata":{}}}"#)
            .starts_with("missing entity uuid"));
        assert!(err("").starts_with("body is not JSON: EOF while parsing"));
    }

    /// Both paths' answers, errors as their messages.
    fn both(body: &[u8]) -> [Result<Decoded, String>; 2] {
        [
            parse_notification(body).map_err(|e| e.to_string()),
            parse_notification_whole(body).map_err(|e| e.to_string()),
        ]
    }

    /// `body` with the object member at `pointer` replaced (or removed,
    /// with `None`).
    fn with(body: &Value, pointer: &str, new: Option<&Value>) -> Value {
        let mut out = body.clone();
        let (parent, last) = pointer.rsplit_once('/').unwrap();
        let object = out.pointer_mut(parent).unwrap().as_object_mut().unwrap();
        match new {
            Some(value) => object.insert(last.to_owned(), value.clone()),
            None => object.remove(last),
        };
        out
    }

    /// The pointer of every object member down to `depth` levels of
    /// objects and arrays (no fixture's keys need escaping).
    fn member_pointers(value: &Value, depth: usize, at: &str, out: &mut Vec<String>) {
        if depth == 0 {
            return;
        }
        match value {
            Value::Object(object) => {
                for (key, member) in object {
                    let pointer = format!("{at}/{key}");
                    member_pointers(member, depth - 1, &pointer, out);
                    out.push(pointer);
                }
            }
            Value::Array(elements) => {
                for (i, element) in elements.iter().enumerate() {
                    member_pointers(element, depth - 1, &format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn the_quick_read_answers_as_the_whole_one_on_every_fixture_and_its_variants() {
        let replacements = [
            json!(null),
            json!({}),
            json!([]),
            json!(""),
            json!(7),
            json!(true),
            json!([1]),
            json!({ "x": 1 }),
            json!("POWERED_ON"),
        ];
        let mut compared = 0;
        for name in FIXTURES {
            let body: Value = serde_json::from_slice(&fixture(name)).unwrap();
            let mut variants = vec![body.clone()];
            // Without version fields the whole body decides the dedupe key.
            let mut unversioned = body.clone();
            if let Some(meta) = unversioned
                .pointer_mut("/data/metadata/metadata")
                .and_then(Value::as_object_mut)
            {
                for field in ["entity_version", "spec_version", "last_update_time"] {
                    meta.remove(field);
                }
            }
            variants.push(unversioned);
            // Down to each NIC's addresses.
            let mut pointers = Vec::new();
            member_pointers(&body, 9, "", &mut pointers);
            for pointer in &pointers {
                variants.push(with(&body, pointer, None));
                for new in &replacements {
                    variants.push(with(&body, pointer, Some(new)));
                }
            }
            for variant in variants {
                let bytes = serde_json::to_vec(&variant).unwrap();
                let [quick, whole] = both(&bytes);
                assert_eq!(quick, whole, "{name}: {variant}");
                compared += 1;
            }
        }
        // Enough to say the walk reached the NICs.
        assert!(compared > 5_000, "{compared}");
    }

    #[test]
    fn a_repeated_member_counts_once_its_last_time_on_both_paths() {
        let body = String::from_utf8(fixture("vm_on.json")).unwrap();
        let repeats = [
            body.replacen('{', r#"{"event_type": "VM.OFF", "data": 1,"#, 1),
            body.replacen('{', r#"{"event_type": 7,"#, 1),
            body.replacen(
                r#""resources": {"#,
                r#""resources": {"power_state": "OFF", "nic_list": [],"#,
                2,
            ),
            body.replacen(r#""metadata": {"#, r#""metadata": {"spec": [], "#, 1),
        ];
        for repeated in repeats {
            assert_ne!(repeated, body);
            let [quick, whole] = both(repeated.as_bytes());
            assert_eq!(quick, whole, "{repeated}");
        }
    }

    #[test]
    fn a_body_hashed_for_dedupe_hashes_the_same_whatever_its_number_spelling() {
        // Found by the notification fuzz target: an integer too large for
        // i64 is read as a float, and the parser's default fast path did
        // not round it as it rounds the float's own shortest spelling, so
        // the same body compacted got another dedupe key.
        let body = format!(
            r#"{{"event_type": "VM.OFF",
            "entity_reference": {{"kind": "vm", "uuid": "bdbbad7a-a401-4f9a-a789-2b8406905b56"}},
            "data": {{"metadata": {{"spec": {{"n": -5{}}}}}}}}}"#,
            "1".repeat(59)
        );
        let body = body.as_bytes();
        let value: Value = serde_json::from_slice(body).unwrap();
        let compact = serde_json::to_vec(&value).unwrap();
        assert_eq!(
            parse_notification(body).unwrap().dedupe_key,
            parse_notification(&compact).unwrap().dedupe_key
        );
    }
}
