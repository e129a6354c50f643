//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;

// The benches include this file too and use other parts of it.
#[allow(dead_code)]
pub mod setup;

pub use setup::{Cluster, HostConfig};

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
