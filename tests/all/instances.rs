//! Plugin instances: one component loaded several times under the
//! operator's names, each with its own settings, kv, deliveries and
//! firewall; and plugins built against an earlier 0.1 contract.

use crate::common::{self, Cluster, HostConfig};

use std::collections::BTreeMap;
use std::time::Duration;

use prismhook::app::App;
use prismhook_sim::panos::Faults;
use prismhook_sim::prism::NewVm;

async fn wait(ready: impl FnMut() -> bool, what: &str) {
    common::wait_until(what, Duration::from_secs(60), ready).await
}

fn kv(app: &App, plugin: &str) -> BTreeMap<String, String> {
    app.runtime
        .kv()
        .dump(plugin)
        .unwrap()
        .into_iter()
        .map(|(k, v)| (k, String::from_utf8(v).unwrap()))
        .collect()
}

/// The event types a probe instance recorded for an entity, in order.
fn seen(app: &App, plugin: &str, entity: &str) -> Vec<String> {
    kv(app, plugin)
        .get(&format!("seen/lab/{entity}"))
        .map(|s| {
            s.lines()
                .map(|l| l.rsplit(':').next().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn one_component_serves_several_instances_each_with_its_own_name_settings_and_kv() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let host = HostConfig::new(dir.path()).plugin(
        "alpha",
        &[
            r#"component = "probe.wasm""#,
            r#"config = { subscriptions = ["VM.*"] }"#,
        ],
    );
    common::setup::install(host.plugins_dir(), &["probe"]);
    // The other instance is declared by a settings file in the directory.
    std::fs::write(
        host.plugins_dir().join("beta.toml"),
        "component = \"probe.wasm\"\nconfig = { subscriptions = [\"VM.ON\"] }\n",
    )
    .unwrap();
    let app = App::start(host.config()).await.unwrap();

    let status = app.registry.status();
    assert_eq!(
        status.keys().collect::<Vec<_>>(),
        ["alpha", "beta"],
        "a component that instances name is not loaded as itself too"
    );
    for name in ["alpha", "beta"] {
        assert_eq!(status[name].component.as_deref(), Some("probe"));
        assert!(status[name].load_error.is_none(), "{:?}", status[name]);
    }

    common::append(&app, 1, "e1", "VM.ON").await;
    common::append(&app, 2, "e1", "VM.OFF").await;
    common::drained(&app).await;
    assert_eq!(seen(&app, "alpha", "e1"), ["VM.ON", "VM.OFF"]);
    assert_eq!(
        seen(&app, "beta", "e1"),
        ["VM.ON"],
        "each instance has its own subscriptions"
    );
    assert_eq!(kv(&app, "alpha")["instance"], "alpha");
    assert_eq!(kv(&app, "beta")["instance"], "beta");
    assert!(
        kv(&app, "probe").is_empty(),
        "instances do not share the component's kv"
    );
    let metrics = common::metrics(&app).await;
    assert!(
        metrics.contains(r#"prismhook_plugin_info{plugin="alpha",component="probe""#),
        "{metrics}"
    );
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn instance_names_and_components_that_cannot_be_used_are_refused_with_the_reason() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let host = HostConfig::new(dir.path());
    common::setup::install(host.plugins_dir(), &["probe"]);
    let plugins = host.plugins_dir().to_owned();
    std::fs::write(plugins.join("Upper.toml"), "component = \"probe.wasm\"\n").unwrap();
    std::fs::write(
        plugins.join("escape.toml"),
        "component = \"../probe.wasm\"\n",
    )
    .unwrap();
    std::fs::write(
        plugins.join("missing.toml"),
        "component = \"nothere.wasm\"\n",
    )
    .unwrap();
    let app = App::start(host.config()).await.unwrap();
    let status = app.registry.status();
    let error = |name: &str| status[name].load_error.clone().unwrap_or_default();
    assert!(
        error("Upper").contains("cannot name an instance"),
        "{status:?}"
    );
    assert!(
        error("escape").contains("expected the name of a `.wasm` file in the plugins directory"),
        "{status:?}"
    );
    assert!(error("missing").contains("nothere.wasm"), "{status:?}");
    assert!(
        status["probe"].load_error.is_none(),
        "instances that fail do not claim the file: {status:?}"
    );
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();

    let bad = HostConfig::new(dir.path())
        .plugin("fw/1", &[r#"component = "probe.wasm""#])
        .toml();
    let err = prismhook::config::Config::parse(&bad, std::path::Path::new("p.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("plugin.fw/1"), "{err}");
}

#[tokio::test]
async fn a_plugin_built_against_the_first_0_1_contract_still_loads_and_runs() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let host = HostConfig::new(dir.path()).plugin("old-one", &[r#"component = "legacy.wasm""#]);
    common::setup::install(host.plugins_dir(), &["legacy"]);
    std::fs::copy(
        common::component("legacy"),
        host.plugins_dir().join("legacy-copy.wasm"),
    )
    .unwrap();
    let app = App::start(host.config()).await.unwrap();
    let status = app.registry.status();
    assert!(
        status.values().all(|s| s.load_error.is_none()),
        "{status:?}"
    );
    // As itself (under its init's name) and as an instance.
    assert_eq!(
        status.keys().collect::<Vec<_>>(),
        ["legacy", "old-one"],
        "{status:?}"
    );
    common::append(&app, 1, "e1", "VM.ON").await;
    common::drained(&app).await;
    for plugin in ["legacy", "old-one"] {
        assert_eq!(
            kv(&app, plugin).get("seen/e1").map(String::as_str),
            Some("VM.ON")
        );
    }
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// One host feeds two firewalls through two instances of the Palo Alto
/// plugin. While one firewall is unreachable the other stays current; once
/// it is back it catches up, each VM's events applied in order.
#[tokio::test]
async fn a_firewall_that_is_down_delays_only_its_own_instance_and_catches_up_in_order() {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let prism = common::setup::start_prism().await;
    let dc1 = common::setup::start_panos().await;
    let dc2 = common::setup::start_panos().await;
    let host = HostConfig::new(dir.path())
        .fast_retries()
        .delivery("max_attempts = 100000")
        .delivery("quarantine_after = 100000")
        .paloalto_instance("fw-dc1", &dc1)
        .paloalto_instance("fw-dc2", &dc2)
        .cluster(Cluster::lab(&prism));
    common::setup::install(host.plugins_dir(), &["paloalto"]);
    let app = App::start(host.config()).await.unwrap();
    common::registered_and_reconciled(&app).await;
    dc2.set_faults(Faults {
        drop_connections: true,
        ..Default::default()
    });

    // Each VM goes through states whose last one differs from the others:
    // applied out of order, a firewall would end up with the wrong tags.
    let mut uuids = Vec::new();
    for i in 0..12 {
        let vm = NewVm::named(format!("vm-{i}"))
            .powered_on()
            .nic([format!("10.7.0.{}", i + 1)])
            .category("AppTier", "Web");
        uuids.push(prism.create_vm(vm).await.unwrap().uuid);
    }
    for (i, uuid) in uuids.iter().enumerate() {
        let tier = BTreeMap::from([("AppTier".to_owned(), "Db".to_owned())]);
        prism.set_categories(uuid, tier).await.unwrap();
        if i % 3 == 0 {
            prism.set_power(uuid, false).await.unwrap();
        }
        if i % 4 == 0 {
            prism.delete_vm(uuid).await.unwrap();
        }
    }
    prism.flush().await;
    let truth = common::firewall_truth(&prism.vms());
    assert!(!truth.is_empty());
    let backlog = |plugin: &str| {
        app.ledger
            .backlog()
            .unwrap()
            .into_iter()
            .find(|b| b.plugin == plugin)
            .map(|b| b.pending + b.in_flight)
            .unwrap_or(0)
    };
    // Current means every event handled, not only the same addresses: a
    // batch that changes nothing in the end can still be in flight.
    wait(
        || backlog("fw-dc1") == 0 && dc1.registered() == truth,
        "the reachable firewall to be current",
    )
    .await;
    assert!(
        backlog("fw-dc2") > 0,
        "the unreachable firewall's events wait"
    );
    assert!(dc2.registered().is_empty());

    dc2.set_faults(Faults::default());
    wait(
        || backlog("fw-dc2") == 0,
        "the recovered firewall to catch up",
    )
    .await;
    assert_eq!(dc2.registered(), truth);
    assert_eq!(dc1.registered(), truth);
    assert_eq!(dc1.stats().commits + dc2.stats().commits, 0);
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}
