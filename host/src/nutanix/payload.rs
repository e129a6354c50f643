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
//! The listener needs only the envelope ([`parse_envelope`]): it reads the
//! few small fields it stores without building the rest of the 5-7 KB body
//! into a tree, and leaves errors and unusual bodies to the full parse, so
//! both always agree.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::value::RawValue;
use serde_json::Value;

/// What the listener needs from one notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// As sent, e.g. `VM.ON`; any `KIND.ACTION` is accepted.
    pub event_type: String,
    /// Lower case, e.g. `vm`, `subnet`.
    pub entity_kind: String,
    pub entity_uuid: String,
    /// The VM as the notification describes it; `None` for other kinds and
    /// for a body without an intent (a `VM.DELETE` with `data.metadata: {}`).
    pub vm: Option<Vm>,
    /// Equal for two deliveries of the same change, different for different
    /// changes; does not name the cluster, so callers prefix it.
    pub dedupe_key: String,
}

/// What the listener stores of a notification: [`Notification`] without the
/// VM, which is parsed again at delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub event_type: String,
    pub entity_kind: String,
    pub entity_uuid: String,
    pub dedupe_key: String,
}

impl From<Notification> for Envelope {
    fn from(n: Notification) -> Envelope {
        Envelope {
            event_type: n.event_type,
            entity_kind: n.entity_kind,
            entity_uuid: n.entity_uuid,
            dedupe_key: n.dedupe_key,
        }
    }
}

/// A VM as plugins see it, whatever the AOS release.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vm {
    pub uuid: String,
    pub name: Option<String>,
    /// `ON` or `OFF` (older `POWERED_ON`/`POWERED_OFF` normalised); other
    /// states are passed on upper-cased.
    pub power_state: Option<String>,
    /// `(key, value)` sorted; a key with several values appears once per
    /// value.
    pub categories: Vec<(String, String)>,
    pub nics: Vec<Nic>,
    pub host_name: Option<String>,
    /// Numeric in older releases, a string in newer ones; always a string
    /// here.
    pub entity_version: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Nic {
    pub uuid: Option<String>,
    pub mac_address: Option<String>,
    /// Assigned and learned addresses, in the order Prism lists them, without
    /// repeats.
    pub ips: Vec<String>,
    pub subnet_name: Option<String>,
    pub subnet_uuid: Option<String>,
}

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
    BadEventType(String),
    #[error("missing entity uuid: neither `entity_reference.uuid` nor `data.metadata.metadata.uuid` is a non-empty string")]
    MissingEntityUuid,
}

/// [`parse_notification`] without the VM: the same envelope and the same
/// errors, at a fraction of the cost for a usual body.
pub fn parse_envelope(body: &[u8]) -> Result<Envelope, PayloadError> {
    match quick_envelope(body) {
        Some(envelope) => Ok(envelope),
        None => parse_notification(body).map(Envelope::from),
    }
}

/// JSON objects with their members left unparsed. A key with escapes does
/// not borrow, so such an object takes the full parse.
type RawObject<'a> = BTreeMap<&'a str, &'a RawValue>;

/// The envelope of a well-formed, versioned notification, read from its
/// small members only (the intent's spec and status, the bulk of a body,
/// are checked as JSON but not built). `None` for anything else, which
/// [`parse_notification`] then handles and explains.
fn quick_envelope(body: &[u8]) -> Option<Envelope> {
    let root: RawObject = serde_json::from_slice(body).ok()?;
    let small = |raw: &RawValue| serde_json::from_str::<Value>(raw.get()).ok();
    let event_type = match small(root.get("event_type")?)? {
        Value::String(s) => s.trim().to_owned(),
        _ => return None,
    };
    if !is_kind_action(&event_type) {
        return None;
    }
    let reference = root.get("entity_reference").and_then(|r| small(r));
    // As `pointer("/data/metadata")`: present only when `data` is an object.
    let intent: Option<RawObject> = root
        .get("data")
        .and_then(|d| serde_json::from_str::<RawObject>(d.get()).ok())
        .and_then(|data| data.get("metadata").copied())
        .and_then(|m| serde_json::from_str::<RawObject>(m.get()).ok())
        .filter(|m| !m.is_empty());
    let meta = intent
        .as_ref()
        .and_then(|i| i.get("metadata"))
        .and_then(|m| small(m));
    let (entity_uuid, entity_kind) = entity(&event_type, reference.as_ref(), meta.as_ref())?;
    let dedupe_key = versioned_key(&event_type, &entity_uuid, meta.as_ref())?;
    Some(Envelope {
        event_type,
        entity_kind,
        entity_uuid,
        dedupe_key,
    })
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

/// Parse a notification body as Prism POSTs it.
pub fn parse_notification(body: &[u8]) -> Result<Notification, PayloadError> {
    let root: Value = serde_json::from_slice(body).map_err(PayloadError::NotJson)?;
    if !root.is_object() {
        return Err(PayloadError::NotAnObject(json_type(&root)));
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
    if !is_kind_action(&event_type) {
        return Err(PayloadError::BadEventType(event_type));
    }
    let intent = root
        .pointer("/data/metadata")
        .filter(|m| is_non_empty_object(m));
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
    let dedupe_key = dedupe_key(&event_type, &entity_uuid, intent, &root);
    Ok(Notification {
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
    Some(Vm {
        uuid,
        name,
        power_state,
        categories: meta.map(parse_categories).unwrap_or_default(),
        nics,
        host_name,
        entity_version: meta.and_then(|m| scalar_string(m.get("entity_version"))),
    })
}

/// `resources[key]` unless it says nothing.
fn field<'a>(resources: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    resources.and_then(|r| r.get(key)).filter(|v| !is_empty(v))
}

fn parse_nic(nic: &Value) -> Nic {
    let mut ips: Vec<String> = Vec::new();
    for endpoint in nic
        .get("ip_endpoint_list")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(ip) = str_at(endpoint, "/ip") {
            if !ips.iter().any(|known| known == ip) {
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

/// Built from the fields that change with every change of the entity, so a
/// redelivery matches and a new change does not. Without any of them (a
/// delete with `data.metadata: {}`), the whole body decides.
fn dedupe_key(event_type: &str, uuid: &str, intent: Option<&Value>, root: &Value) -> String {
    versioned_key(event_type, uuid, intent.and_then(|i| i.get("metadata"))).unwrap_or_else(|| {
        // Hash the compact re-serialisation, so whitespace does not matter.
        let canonical = serde_json::to_vec(root).unwrap_or_default();
        format!("{event_type}/{uuid}/body={:032x}", fnv1a_128(&canonical))
    })
}

/// The dedupe key from the intent's version fields (its `metadata`); `None`
/// when it has none of them.
fn versioned_key(event_type: &str, uuid: &str, meta: Option<&Value>) -> Option<String> {
    let field = |name: &str| meta.and_then(|m| scalar_string(m.get(name)));
    let mut key = format!("{event_type}/{uuid}");
    let mut versioned = false;
    for (label, name) in [
        ("ev", "entity_version"),
        ("sv", "spec_version"),
        ("t", "last_update_time"),
    ] {
        if let Some(value) = field(name) {
            let _ = write!(key, "/{label}={value}");
            versioned = true;
        }
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

fn is_kind_action(event_type: &str) -> bool {
    let Some((kind, action)) = event_type.split_once('.') else {
        return false;
    };
    let word = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    };
    word(kind) && word(action) && !kind.contains('.')
}

/// A non-empty string at `pointer`, trimmed of nothing: Prism's values are
/// used as they are.
fn str_at<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
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

    fn parse(name: &str) -> Notification {
        parse_notification(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const WEB01: &str = "bdbbad7a-a401-4f9a-a789-2b8406905b56";

    /// Every notification body among the shared fixtures.
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
        assert_eq!(
            n.dedupe_key,
            "VM.ON/addfa04e-751f-456d-b35b-4550238a7389/sv=1/t=2019-04-08T06:29:45Z"
        );
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
        assert_eq!(
            n.dedupe_key,
            format!("VM.DELETE/{WEB01}/ev=6/sv=5/t=2025-06-07T18:45:12Z")
        );
    }

    #[test]
    fn a_subnet_event_has_its_kind_and_no_vm() {
        let n = parse("subnet_create.json");
        assert_eq!(n.event_type, "SUBNET.CREATE");
        assert_eq!(n.entity_kind, "subnet");
        assert_eq!(n.entity_uuid, "c7938dc6-7659-453e-a688-e26020c68e43");
        assert!(n.vm.is_none());
    }

    /// The quick envelope must agree with the full parse on every input:
    /// the fixtures, and variants that take each of its way-outs.
    #[test]
    fn the_quick_envelope_agrees_with_the_full_parse() {
        let mut bodies: Vec<Vec<u8>> = FIXTURES.iter().map(|n| fixture(n)).collect();
        let on: Value = serde_json::from_slice(&fixture("vm_on.json")).unwrap();
        let variant = |edit: &dyn Fn(&mut Value)| {
            let mut v = on.clone();
            edit(&mut v);
            serde_json::to_vec(&v).unwrap()
        };
        bodies.extend([
            variant(&|v| v["entity_reference"] = Value::Null),
            variant(&|v| v["entity_reference"]["kind"] = json!("VM")),
            variant(&|v| v["entity_reference"]["uuid"] = json!(7)),
            variant(&|v| v["data"]["metadata"]["metadata"]["spec_version"] = json!(12)),
            variant(&|v| v["data"]["metadata"]["metadata"]["entity_version"] = json!("3")),
            variant(&|v| v["data"]["metadata"]["metadata"] = json!({})),
            variant(&|v| v["data"]["metadata"] = json!({})),
            variant(&|v| v["data"]["metadata"] = json!([1, 2])),
            variant(&|v| v["data"] = json!("x")),
            variant(&|v| v["event_type"] = json!("  VM.ON ")),
            variant(&|v| v["event_type"] = json!("VMON")),
            variant(&|v| v["event_type"] = json!(3)),
            variant(&|v| v["event_type"] = Value::Null),
            variant(&|v| v.as_object_mut().unwrap().clear()),
            br#"{"event_type": "VM.ON", "event_type": "VM.OFF", "entity_reference": {"uuid": "u"}}"#.to_vec(),
            br#"{"event_type": "VM.ON", "entity_reference": {"uuid": "u\u00e9"}, "data": {"metadata": {"metadata": {"spec_version": 1}}}}"#.to_vec(),
            br#"[1]"#.to_vec(),
            br#"{"event_type": "VM.ON""#.to_vec(),
            b"\xff".to_vec(),
        ]);
        for body in &bodies {
            let full = parse_notification(body)
                .map(Envelope::from)
                .map_err(|e| e.to_string());
            let quick = parse_envelope(body).map_err(|e| e.to_string());
            assert_eq!(quick, full, "{}", String::from_utf8_lossy(body));
        }
        // The usual body takes the quick way.
        assert!(quick_envelope(&fixture("vm_on.json")).is_some());
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
}
