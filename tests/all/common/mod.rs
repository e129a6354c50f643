//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;

// The benches include this file too and use other parts of it.
#[allow(dead_code)]
pub mod setup;

pub use setup::{Cluster, HostConfig};

pub mod balancer;
pub mod process;

/// A guest component built by `cargo xtask plugins`.
pub fn component(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/plugins")
        .join(format!("{name}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: build the guest components first with `cargo xtask plugins`",
        path.display()
    );
    path
}

/// The probe component with a custom section appended: other bytes (and
/// sha256), same behaviour — a "new version" of the file.
pub fn probe_variant(n: u32) -> Vec<u8> {
    let mut bytes = std::fs::read(component("probe")).unwrap();
    let name = b"prismhook-test-variant";
    let payload = n.to_le_bytes();
    let mut section = vec![name.len() as u8];
    section.extend_from_slice(name);
    section.extend_from_slice(&payload);
    bytes.push(0); // custom section id
    bytes.push(section.len() as u8);
    bytes.extend_from_slice(&section);
    bytes
}

/// A fixture from tests/fixtures (see its README for where each came from).
pub fn fixture(rel: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(rel);
    assert!(path.is_file(), "fixture {} is missing", path.display());
    path
}

pub fn fixture_json(rel: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture(rel)).unwrap()).unwrap()
}

/// A fixture notification as another event type, edited the way the host
/// would receive it.
pub fn note(
    rel: &str,
    event_type: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> serde_json::Value {
    let mut body = fixture_json(rel);
    body["event_type"] = serde_json::json!(event_type);
    edit(&mut body);
    body
}

/// Sets a notification's VM power state, in spec and status.
pub fn set_power(body: &mut serde_json::Value, state: &str) {
    for part in ["spec", "status"] {
        body["data"]["metadata"][part]["resources"]["power_state"] = serde_json::json!(state);
    }
}

/// Keeps only a notification's first NIC, in spec and status.
pub fn drop_second_nic(body: &mut serde_json::Value) {
    for part in ["spec", "status"] {
        body["data"]["metadata"][part]["resources"]["nic_list"]
            .as_array_mut()
            .unwrap()
            .truncate(1);
    }
}

/// A `VM.DELETE` as Prism sends it when it no longer has the VM's intent:
/// an empty `data.metadata`.
pub fn empty_delete(uuid: &str) -> serde_json::Value {
    serde_json::json!({"entity_reference": {"kind": "vm", "uuid": uuid}, "data": {"metadata": {}}, "version": "1.0", "event_type": "VM.DELETE"})
}

/// A table of names (IPs, objects) to sorted lists, as the simulators
/// report registrations and mappings.
pub fn table(entries: &[(&str, &[&str])]) -> std::collections::BTreeMap<String, Vec<String>> {
    entries
        .iter()
        .map(|(key, values)| {
            (
                key.to_string(),
                values.iter().map(|v| v.to_string()).collect(),
            )
        })
        .collect()
}

/// Logs of the host under test, shown when a test fails.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,prismhook=info".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Polls `ready` until it holds; fails the test after `limit` with `what`.
/// A liveness bound, not a timing assertion: it only stops a stuck test.
pub async fn wait_until(what: &str, limit: std::time::Duration, mut ready: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + limit;
    while !ready() {
        assert!(
            std::time::Instant::now() < until,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Waits until every cluster of a host that runs alone has its webhook and
/// has been reconciled once: the reconcile at start waits for the webhook,
/// and a test that changed the cluster while it ran would see its own
/// reconcile find less to do.
pub async fn registered_and_reconciled(app: &prismhook::app::App) {
    wait_until(
        "registration and the reconcile at start",
        std::time::Duration::from_secs(30),
        || {
            app.cluster_status()
                .iter()
                .all(|c| c.registered && c.last_reconcile_ms.is_some())
        },
    )
    .await
}

/// A loopback port that was free a moment ago, for a process that must be
/// told its port before it starts (the real binary, a fixed admin port).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until no delivery of `app` is pending, in flight or retrying.
pub async fn drained(app: &prismhook::app::App) {
    // Events just acknowledged may not have reached the ledger's index yet.
    tokio::time::sleep(std::time::Duration::from_millis(30)).await;
    wait_until(
        "deliveries to finish",
        std::time::Duration::from_secs(30),
        || {
            app.ledger
                .backlog()
                .unwrap()
                .iter()
                .all(|b| b.pending + b.in_flight + b.retrying == 0)
        },
    )
    .await;
}

/// A plugin's calls that failed for its own reasons (kv conflicts made
/// again are not: two batches on different VMs that update a record both
/// read, a dynamic object's members, race by design, and the loser is made
/// again at no cost to its events), events retried and rejected.
pub fn plugin_failures(app: &prismhook::app::App, plugin: &str) -> (u64, u64, u64) {
    let counters = app.dispatcher.counters();
    let c = counters
        .get(plugin)
        .unwrap_or_else(|| panic!("no counters for `{plugin}`: {counters:?}"));
    (c.failed_calls - c.kv_conflicts, c.retried, c.rejected)
}

/// The registrations the Palo Alto plugin's defaults call for, given the
/// Prism simulator's VMs: the truth convergence tests compare against.
pub fn firewall_truth(
    vms: &[prismhook_sim::prism::SimVm],
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut want: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for vm in vms.iter().filter(|vm| vm.power_state == "ON") {
        for ip in vm.nics.iter().flat_map(|n| &n.ips) {
            let tags = want.entry(ip.clone()).or_default();
            tags.insert("ntnx.managed".into());
            for (k, v) in &vm.categories {
                tags.insert(format!("ntnx.{k}.{v}"));
            }
        }
    }
    want.into_iter()
        .map(|(ip, t)| (ip, t.into_iter().collect()))
        .collect()
}

/// The FMC dynamic objects the Cisco FMC plugin's defaults call for, by
/// name, with their sorted addresses: [`firewall_truth`] turned around, as
/// the plugin uses the same names for its objects as the Palo Alto plugin
/// for its tags. Objects left empty are not listed.
pub fn fmc_truth(
    vms: &[prismhook_sim::prism::SimVm],
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut objects: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (ip, tags) in firewall_truth(vms) {
        for tag in tags {
            objects.entry(tag).or_default().push(ip.clone());
        }
    }
    for ips in objects.values_mut() {
        ips.sort();
    }
    objects
}

/// An FMC simulator's mappings without the objects that hold nothing.
pub fn fmc_mapped(
    fmc: &prismhook_sim::fmc::FmcSim,
) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut mapped = fmc.mappings();
    mapped.retain(|_, ips| !ips.is_empty());
    mapped
}

/// Stores an event of cluster `lab` for `entity` as the listener would
/// (its dedupe key and receive time from `seq`) and hands it to the
/// plugins that subscribe to its type; returns its id.
pub async fn append(app: &prismhook::app::App, seq: u64, entity: &str, event_type: &str) -> u64 {
    append_body(app, seq, entity, event_type, "{}".into()).await
}

/// [`append`] with `body` as the notification's.
pub async fn append_body(
    app: &prismhook::app::App,
    seq: u64,
    entity: &str,
    event_type: &str,
    body: String,
) -> u64 {
    let plugins = app.registry.subscribers(event_type);
    append_for(app, seq, entity, event_type, body, plugins).await
}

/// [`append_body`] for the `plugins` given, loaded or not (events queued
/// for a plugin that is gone, or that has not loaded yet).
pub async fn append_for(
    app: &prismhook::app::App,
    seq: u64,
    entity: &str,
    event_type: &str,
    body: String,
    plugins: Vec<String>,
) -> u64 {
    let ev = prismhook::ledger::NewEvent {
        cluster: "lab".into(),
        event_type: event_type.into(),
        entity_kind: "vm".into(),
        entity_uuid: entity.into(),
        dedupe_key: Some(format!("seq-{seq}")),
        received_at_ms: seq,
        body,
        vm: None,
    };
    match app.ledger.append(ev, plugins).await.unwrap() {
        prismhook::ledger::Appended::Stored { id, .. } => id,
        other => panic!("unexpected {other:?}"),
    }
}

/// What the host's `/metrics` serves now.
pub async fn metrics(app: &prismhook::app::App) -> String {
    reqwest::get(format!("http://{}/metrics", app.admin_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}
