//! The Cisco FMC plugin, written in Go and built to a component with
//! upstream Go's wasip1 port, in a real host against the FMC simulator: the
//! host signs in for it (`generatetoken`, Basic) and hands over only the
//! `X-auth-access-token`; notifications come from the Prism simulator over
//! real sockets, and the simulator's dynamic objects must hold exactly the
//! addresses the VMs' state calls for after every step.

use crate::common::{
    self, drop_second_nic, empty_delete, note, set_power, table, Cluster, HostConfig,
};

use std::time::Duration;

use prismhook::app::App;
use prismhook_sim::fmc::FmcSim;
use prismhook_sim::prism::{NewVm, PrismFaults, PrismSim};
use serde_json::Value;

const VM: &str = "bdbbad7a-a401-4f9a-a789-2b8406905b56";

struct Rig {
    prism: PrismSim,
    fmc: FmcSim,
    app: App,
    _dir: tempfile::TempDir,
}

/// A host with the Cisco FMC plugin (`settings` continue its `config`),
/// registered with a Prism simulator.
async fn rig(settings: &str) -> Rig {
    rig_with(settings, &[]).await
}

/// [`rig`] with more lines in the plugin's table (`limits = …`).
async fn rig_with(settings: &str, lines: &[&str]) -> Rig {
    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let prism = common::setup::start_prism().await;
    let fmc = common::setup::start_fmc().await;
    let host = lines.iter().fold(
        HostConfig::new(dir.path())
            .instance("fmc")
            .fast_retries()
            .cisco_fmc(&fmc, settings),
        |host, line| host.plugin_line(line),
    );
    let host = host.cluster(Cluster::lab(&prism));
    common::setup::install(host.plugins_dir(), &["cisco-fmc"]);
    let app = App::start(host.config()).await.unwrap();
    assert!(
        app.registry
            .get("cisco-fmc")
            .is_some_and(|e| e.plugin.is_some()),
        "{:?}",
        app.loaded
    );
    common::registered_and_reconciled(&app).await;
    Rig {
        prism,
        fmc,
        app,
        _dir: dir,
    }
}

impl Rig {
    /// Prism posts `body` to the host's webhook; returns once the plugin
    /// has dealt with it.
    async fn notify(&self, body: Value) {
        assert_eq!(self.prism.notify(body).await, 1, "delivered to the host");
        common::drained(&self.app).await;
    }

    /// [`common::plugin_failures`] of the plugin.
    fn failures(&self) -> (u64, u64, u64) {
        common::plugin_failures(&self.app, "cisco-fmc")
    }

    /// Creates `vms` in Prism with every notification lost: the host
    /// knows them from Prism's list only.
    async fn unheard(&self, vms: impl IntoIterator<Item = NewVm>) {
        self.prism.set_faults(PrismFaults {
            drop_rate: 1.0,
            ..Default::default()
        });
        for vm in vms {
            self.prism.create_vm(vm).await.unwrap();
        }
        self.prism.set_faults(PrismFaults::default());
    }

    /// Reconciles cluster `lab` now; the plugin's line of the report.
    async fn reconcile(&self) -> String {
        let report = self.app.source.reconcile(Some("lab")).await.unwrap();
        let lines = &report[0].plugins;
        let line = lines.iter().find(|l| l.starts_with("cisco-fmc: "));
        line.unwrap_or_else(|| panic!("{lines:?}")).clone()
    }

    async fn converged(&self, what: &str) {
        common::drained(&self.app).await;
        assert_eq!(
            common::fmc_mapped(&self.fmc),
            common::fmc_truth(&self.prism.vms()),
            "FMC after {what}"
        );
    }
}

#[tokio::test]
async fn the_fixture_lifecycle_moves_addresses_between_dynamic_objects_in_bulk_and_never_deploys() {
    let r = rig("").await;

    // Created powered off: nothing to map, and nothing sent.
    r.notify(note("nutanix/vm_create.json", "VM.CREATE", |_| {}))
        .await;
    assert!(common::fmc_mapped(&r.fmc).is_empty());
    assert_eq!(r.fmc.stats().bulk_mapping_posts, 0);

    r.notify(note("nutanix/vm_create.json", "VM.ON", |b| {
        set_power(b, "ON")
    }))
    .await;
    assert_eq!(
        common::fmc_mapped(&r.fmc),
        table(&[("ntnx.managed", &["10.23.129.96"])])
    );

    // A second NIC and two categories: two new objects, made in one bulk
    // request, and every mapping in one more.
    let before = r.fmc.stats();
    r.notify(note("nutanix/vm_update_nic_ip.json", "VM.UPDATE", |_| {}))
        .await;
    let both: &[&str] = &["10.23.129.96", "10.40.142.61"];
    assert_eq!(
        common::fmc_mapped(&r.fmc),
        table(&[
            ("ntnx.AppTier.Web", both),
            ("ntnx.Environment.Production", both),
            ("ntnx.managed", both),
        ])
    );
    let after = r.fmc.stats();
    assert_eq!(after.objects_created - before.objects_created, 2);
    assert_eq!(after.bulk_mapping_posts - before.bulk_mapping_posts, 1);

    r.notify(note(
        "nutanix/vm_update_nic_ip.json",
        "VM.NIC_UNPLUG",
        drop_second_nic,
    ))
    .await;
    let one: &[&str] = &["10.23.129.96"];
    assert_eq!(
        common::fmc_mapped(&r.fmc),
        table(&[
            ("ntnx.AppTier.Web", one),
            ("ntnx.Environment.Production", one),
            ("ntnx.managed", one),
        ])
    );

    r.notify(note("nutanix/vm_off.json", "VM.OFF", |_| {}))
        .await;
    assert!(common::fmc_mapped(&r.fmc).is_empty());
    // Objects stay (an access rule may name them), empty.
    assert_eq!(r.fmc.objects().len(), 3);

    // Powered on again, then deleted with an empty body: kv says what to undo.
    r.notify(note("nutanix/vm_update_nic_ip.json", "VM.ON", |b| {
        set_power(b, "ON")
    }))
    .await;
    assert_eq!(common::fmc_mapped(&r.fmc).len(), 3);
    r.notify(empty_delete(VM)).await;
    assert!(common::fmc_mapped(&r.fmc).is_empty());

    assert_eq!(r.failures(), (0, 0, 0));
    let stats = r.fmc.stats();
    assert_eq!(stats.logins, 1, "one sign-in served every call");
    assert_eq!((stats.unauthorized, stats.rate_limited), (0, 0));
    // Mappings need no deployment, and the plugin never asks for one.
    let requests = r.fmc.requests(1000);
    assert!(
        requests.iter().all(|q| !q.path.contains("deployment")),
        "{requests:#?}"
    );
    // The plugin never sees the token: nothing in kv holds one.
    let tokens = r.fmc.issued_tokens();
    for (key, value) in r.app.runtime.kv().dump("cisco-fmc").unwrap() {
        let value = String::from_utf8_lossy(&value);
        assert!(
            tokens.iter().all(|t| !value.contains(t.as_str())),
            "kv `{key}` holds a token"
        );
    }
    r.app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_token_that_expires_mid_run_is_renewed_by_the_host_without_a_failed_event() {
    let r = rig("").await;
    let web = r
        .prism
        .create_vm(
            NewVm::named("web-1")
                .powered_on()
                .category("App", "web")
                .nic(["10.50.0.1"]),
        )
        .await
        .unwrap();
    r.converged("the first VM").await;
    assert_eq!(r.fmc.stats().logins, 1);

    // FMC ends every session (30 minutes passed, or an administrator
    // logged the API user in elsewhere): the next request gets 401, the
    // host signs in again and repeats it.
    r.fmc.expire_tokens();
    r.prism.set_power(&web.uuid, false).await.unwrap();
    // One call meets the expired token: calls for two VMs in flight at
    // once would each be refused with it (and share the one sign-in).
    r.converged("the power-off").await;
    r.prism
        .create_vm(NewVm::named("web-2").powered_on().nic(["10.50.0.2"]))
        .await
        .unwrap();
    r.converged("the token expired").await;
    let stats = r.fmc.stats();
    assert_eq!((stats.logins, stats.expired_tokens), (2, 1), "{stats:?}");
    assert_eq!(r.failures(), (0, 0, 0));
    r.app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn bursts_of_429_delay_events_without_losing_or_reordering_them() {
    let r = rig("").await;
    // FMC allows 120 requests a minute; past that it answers 429 with a
    // Retry-After. A short one is waited out inside the call.
    r.fmc.rate_limit_next(2, 1);
    let vm = r
        .prism
        .create_vm(
            NewVm::named("burst")
                .powered_on()
                .category("App", "web")
                .nic(["10.60.0.1"]),
        )
        .await
        .unwrap();
    r.converged("two short 429s").await;
    assert_eq!(r.fmc.stats().rate_limited, 2);
    assert_eq!(
        r.failures(),
        (0, 0, 0),
        "waited out inside the call, not retried"
    );

    // A long one ends the call: the events wait for FMC's Retry-After, in
    // order, with the later events of the same VM behind them.
    r.fmc.rate_limit_next(3, 3);
    r.prism.set_power(&vm.uuid, false).await.unwrap();
    r.prism.set_power(&vm.uuid, true).await.unwrap();
    r.prism
        .set_categories(&vm.uuid, [("App".to_owned(), "db".to_owned())].into())
        .await
        .unwrap();
    r.converged("a long 429").await;
    assert_eq!(r.fmc.stats().rate_limited, 5);
    let (failed, retried, rejected) = r.failures();
    assert!(retried > 0, "the events were retried after the 429");
    assert_eq!((failed, rejected), (0, 0));
    assert_eq!(
        common::fmc_mapped(&r.fmc),
        table(&[
            ("ntnx.App.db", &["10.60.0.1"]),
            ("ntnx.managed", &["10.60.0.1"])
        ])
    );
    r.app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn reconcile_repairs_dropped_notifications_and_hand_edits_but_leaves_foreign_objects_alone() {
    let r = rig("").await;
    for i in 1..=3 {
        r.prism
            .create_vm(
                NewVm::named(format!("app-{i}"))
                    .powered_on()
                    .category("App", "web")
                    .nic([format!("10.70.0.{i}")]),
            )
            .await
            .unwrap();
    }
    r.converged("three VMs").await;

    // Prism's notifications get lost for a while: one VM deleted, one
    // powered off, one created, none of it seen.
    r.prism.set_faults(PrismFaults {
        drop_rate: 1.0,
        ..Default::default()
    });
    let vms = r.prism.vms();
    r.prism.delete_vm(&vms[0].uuid).await.unwrap();
    r.prism.set_power(&vms[1].uuid, false).await.unwrap();
    r.prism
        .create_vm(NewVm::named("app-4").powered_on().nic(["10.70.0.4"]))
        .await
        .unwrap();
    // And hands on the FMC: an owned mapping removed, a stray one added,
    // and an object of someone else's that the plugin must not touch.
    r.fmc.remove_mapping_directly("ntnx.App.web", "10.70.0.3");
    r.fmc.add_mapping_directly("ntnx.managed", "192.0.2.99");
    r.fmc.create_object_directly("corp.servers");
    r.fmc.add_mapping_directly("corp.servers", "172.16.0.1");
    r.prism.set_faults(PrismFaults::default());
    assert_ne!(
        common::fmc_mapped(&r.fmc),
        common::fmc_truth(&r.prism.vms())
    );

    let line = r.reconcile().await;
    assert!(
        line.contains("2 addresses added, 5 removed, 1 VMs gone"),
        "{line}"
    );
    let mut want = common::fmc_truth(&r.prism.vms());
    want.insert("corp.servers".into(), vec!["172.16.0.1".into()]);
    assert_eq!(common::fmc_mapped(&r.fmc), want);
    assert_eq!(r.failures(), (0, 0, 0));
    r.app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// The Go plugin exports `paged.reconcile`, so the host hands it Prism's
/// inventory a page at a time: 1,100 VMs are three of Prism's pages, and
/// 1,100 addresses two of FMC's pages of an object's mappings.
#[tokio::test]
async fn the_go_plugin_reconciles_a_page_at_a_time_across_prisms_and_fmcs_pages() {
    let r = rig("").await;
    let plugin = r.app.registry.get("cisco-fmc").unwrap().plugin.unwrap();
    assert!(plugin.is_paged(), "the FMC plugin exports paged.reconcile");

    // An object of the plugin's name made by hand, with a stray address:
    // adopted, and the stray removed.
    r.fmc.create_object_directly("ntnx.managed");
    r.fmc.add_mapping_directly("ntnx.managed", "192.0.2.7");
    r.unheard((0..1_100u32).map(|i| {
        let vm = NewVm::named(format!("vm-{i}")).powered_on().nic([format!(
            "10.71.{}.{}",
            i / 250,
            i % 250 + 1
        )]);
        if i % 2 == 0 {
            vm.category("Tier", "web")
        } else {
            vm
        }
    }))
    .await;

    let line = r.reconcile().await;
    assert!(
        line.starts_with("cisco-fmc: 1100 VMs, 2 objects owned: 1650 addresses added, 1 removed"),
        "{line}"
    );
    assert_eq!(
        common::fmc_mapped(&r.fmc),
        common::fmc_truth(&r.prism.vms())
    );

    // In step: FMC's mappings are read back over two pages, nothing changes.
    let line = r.reconcile().await;
    assert!(
        line.contains(": 0 addresses added, 0 removed, 0 VMs gone"),
        "{line}"
    );
    r.app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// What the host writes into the Go heap for an import's answer is pinned
/// by wit-bindgen's `cabi_realloc` until an export begins; unless the
/// plugin lets go of it after each import, every page, kv record and FMC
/// answer of a reconcile stays, and its memory grows with the inventory.
/// 8,000 VMs within 16 MiB (a Go plugin starts at about 10 MiB).
#[tokio::test]
async fn the_paged_reconcile_of_the_go_plugin_keeps_pages_not_the_inventory() {
    let r = rig_with("", &["limits = { memory_mib = 16 }"]).await;
    r.unheard((0..8_000u32).map(|i| {
        NewVm::named(format!("vm-{i}"))
            .powered_on()
            .category("Tier", ["web", "app", "db"][i as usize % 3])
            .nic([format!("10.72.{}.{}", i / 250, i % 250 + 1)])
    }))
    .await;
    let line = r.reconcile().await;
    assert!(
        line.starts_with("cisco-fmc: 8000 VMs, 4 objects owned: 16000 addresses added"),
        "{line}"
    );
    assert_eq!(
        common::fmc_mapped(&r.fmc),
        common::fmc_truth(&r.prism.vms())
    );
    r.app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// The host writes a batch into the Go heap through the guest's
/// `cabi_realloc`, where nothing may call out of the instance; a garbage
/// collection finishing in there reads the wall clock through the host and
/// traps. 2,000 events of 8 KiB each are four times Go's first collection
/// goal, so the collector must be held off while they are written.
#[tokio::test]
async fn a_batch_larger_than_the_go_heaps_first_collection_goal_is_handled() {
    use prismhook::runtime::bindings::{Event, Outcome};
    use prismhook::runtime::{PluginSettings, Runtime, RuntimeOptions};

    common::init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(RuntimeOptions::new(dir.path().join("kv.redb"))).unwrap();
    let settings = PluginSettings {
        config: serde_json::json!({ "fmc": "https://fmc.example.com" }),
        ..Default::default()
    };
    let plugin = runtime
        .load(&common::component("cisco-fmc"), settings)
        .await
        .unwrap();
    let padding = "x".repeat(8 << 10);
    let events: Vec<Event> = (0..2_000u32)
        .map(|i| Event {
            id: i.to_string(),
            cluster: "lab".into(),
            // A kind the plugin does not act on: no request, only the batch.
            event_type: "SUBNET.CREATE".into(),
            entity_kind: "subnet".into(),
            entity_uuid: format!("subnet-{i}"),
            attempt: 1,
            received_at_ms: 0,
            body: serde_json::json!({ "padding": padding }).to_string(),
            vm: None,
        })
        .collect();
    let out = plugin.handle(events).await.unwrap();
    assert_eq!(out.len(), 2_000);
    assert!(
        out.iter().all(|o| matches!(o, Outcome::Done)),
        "{:?}",
        &out[..1]
    );
}
