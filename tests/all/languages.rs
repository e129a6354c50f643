//! Four languages side by side in one host: the Palo Alto plugin (Rust),
//! the F5 BIG-IP plugin (Python, componentize-py), the forwarder
//! (JavaScript, componentize-js) and the Cisco FMC plugin (Go, upstream
//! Go's wasip1 port), loaded together from one plugins directory, fed by the
//! Prism simulator over real sockets, each driving its own simulator
//! (PAN-OS, BIG-IP, FMC) or receiver.
//!
//! The Python and JavaScript components are 11-19 MB and take half a minute
//! each to compile in a debug host, so the tests share one compiled-component
//! cache (under target/tmp): each is compiled at most once per run, and not
//! at all while it is unchanged since the last run.

use crate::common::{self, Cluster, HostConfig};

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Json;
use prismhook::app::App;
use prismhook::config::Config;
use prismhook::runtime::{Runtime, RuntimeOptions};
use prismhook_sim::bigip::{BigipConfig, BigipSim, Faults as BigipFaults};
use prismhook_sim::fmc::FmcSim;
use prismhook_sim::panos::PanosSim;
use prismhook_sim::prism::{NewNic, NewVm, PrismFaults, PrismSim, SimVm, VmChange};
use serde_json::Value;

/// Plugin file stems, which are also the names the plugins give in `init`.
const PLUGINS: [&str; 4] = ["paloalto", "f5-bigip", "forwarder", "cisco-fmc"];
const POOL: &str = "/Common/web";
const MEMBER_PORT: u16 = 8080;
const SIEM_TOKEN: &str = "Bearer siem-token-1";

/// The compiled-component cache every App of this file shares.
fn shared_cache() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("languages-component-cache")
}

/// Compiles the three components into the shared cache once per run, before
/// any App needs them, so that Apps starting in parallel do not each compile
/// them. Entries of components that no longer exist are removed.
async fn warm_cache() {
    static WARM: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    WARM.get_or_init(|| async {
        tokio::task::spawn_blocking(|| {
            let scratch = tempfile::tempdir().unwrap();
            let mut options = RuntimeOptions::new(scratch.path().join("kv.redb"));
            options.cache_dir = Some(shared_cache());
            let runtime = Runtime::new(options).unwrap();
            let mut current = Vec::new();
            for name in PLUGINS {
                let started = Instant::now();
                let compiled = runtime
                    .compile_file(&common::component(name), None)
                    .unwrap();
                eprintln!(
                    "{name}: {} KiB, {} in {:.1}s",
                    compiled.size / 1024,
                    if compiled.from_cache {
                        "from the cache"
                    } else {
                        "compiled"
                    },
                    started.elapsed().as_secs_f64()
                );
                current.push(compiled.sha256);
            }
            for entry in std::fs::read_dir(shared_cache()).unwrap().flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                if !current.iter().any(|sha| file.starts_with(sha.as_str())) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        })
        .await
        .unwrap();
    })
    .await;
}

/// One body posted to the SIEM, with its `Authorization`.
type Post = (Option<String>, Value);

/// A stand-in for a SIEM: records every JSON body posted to `/ingest` and
/// the `Authorization` it came with; answers 503 to the next `fail_next`.
#[derive(Clone, Default)]
struct Siem {
    posts: Arc<Mutex<Vec<Post>>>,
    fail_next: Arc<Mutex<u32>>,
}

impl Siem {
    async fn start(&self) -> SocketAddr {
        let app = axum::Router::new()
            .route("/ingest", post(ingest))
            .with_state(self.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    /// Every event received, in arrival order (batches flattened).
    fn events(&self) -> Vec<Value> {
        let posts = self.posts.lock().unwrap();
        posts
            .iter()
            .flat_map(|(_, body)| match body {
                Value::Array(events) => events.clone(),
                one => vec![one.clone()],
            })
            .collect()
    }

    fn authorizations(&self) -> BTreeSet<Option<String>> {
        self.posts
            .lock()
            .unwrap()
            .iter()
            .map(|(auth, _)| auth.clone())
            .collect()
    }
}

async fn ingest(
    State(siem): State<Siem>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> StatusCode {
    {
        let mut fail = siem.fail_next.lock().unwrap();
        if *fail > 0 {
            *fail -= 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    siem.posts.lock().unwrap().push((auth, body));
    StatusCode::OK
}

struct World {
    prism: PrismSim,
    panos: PanosSim,
    bigip: BigipSim,
    fmc: FmcSim,
    siem: Siem,
    siem_url: String,
    dir: tempfile::TempDir,
}

async fn world() -> World {
    common::init_tracing();
    warm_cache().await;
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir_all(&plugins).unwrap();
    for name in PLUGINS {
        std::fs::copy(
            common::component(name),
            plugins.join(format!("{name}.wasm")),
        )
        .unwrap();
    }
    // The App caches compiled components in <data_dir>/cache.
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::symlink(shared_cache(), data.join("cache")).unwrap();
    let siem = Siem::default();
    let siem_url = format!("http://{}", siem.start().await);
    let bigip = BigipConfig {
        pools: vec![POOL.to_owned()],
        ..Default::default()
    };
    World {
        prism: common::setup::start_prism().await,
        panos: common::setup::start_panos().await,
        bigip: BigipSim::start("127.0.0.1:0".parse().unwrap(), bigip)
            .await
            .unwrap(),
        fmc: common::setup::start_fmc().await,
        siem,
        siem_url,
        dir,
    }
}

impl World {
    fn config(&self) -> Config {
        let lb = self.bigip.base_url();
        let siem = &self.siem_url;
        let lab = Cluster {
            webhook_password: None,
            ..Cluster::lab(&self.prism)
        };
        HostConfig::new(self.dir.path())
            .instance("languages")
            .fast_retries()
            .paloalto(&self.panos)
            .plugin(
                "f5-bigip",
                &[
                    &format!(r#"config = {{ bigip = "{lb}", port = {MEMBER_PORT}, category = "F5Pool" }}"#),
                    &format!(r#"allow = ["{lb}"]"#),
                    &format!(r#"inject = [{{ origin = "{lb}", header = "Authorization", value = "Basic YWRtaW46YWRtaW4=" }}]"#),
                ],
            )
            .plugin(
                "forwarder",
                &[
                    &format!(r#"config = {{ url = "{siem}/ingest", events = ["VM.*"], fields = ["id", "event_type", "entity_uuid", "attempt", "vm"] }}"#),
                    &format!(r#"allow = ["{siem}"]"#),
                    &format!(r#"inject = [{{ origin = "{siem}", header = "Authorization", value = "{SIEM_TOKEN}" }}]"#),
                ],
            )
            .cisco_fmc(&self.fmc, "")
            .cluster(lab)
            .config()
    }

    async fn start(&self) -> App {
        let app = App::start(self.config()).await.unwrap();
        let loaded: BTreeSet<String> = app
            .registry
            .snapshot()
            .iter()
            .filter(|(_, e)| e.plugin.is_some())
            .map(|(name, _)| name.clone())
            .collect();
        assert_eq!(
            loaded,
            PLUGINS.iter().map(|p| p.to_string()).collect(),
            "{:?}",
            app.loaded
        );
        common::registered_and_reconciled(&app).await;
        app
    }

    fn members(&self) -> Vec<String> {
        self.bigip.pools().get(POOL).cloned().unwrap_or_default()
    }
}

async fn wait(ready: impl FnMut() -> bool, what: &str) {
    common::wait_until(what, Duration::from_secs(30), ready).await
}

/// The pool members the VMs' state calls for: every IP of every powered-on
/// VM whose `F5Pool` category names the pool.
fn pool_truth(vms: &[SimVm]) -> Vec<String> {
    let mut members: Vec<String> = vms
        .iter()
        .filter(|vm| {
            vm.power_state == "ON" && vm.categories.get("F5Pool").is_some_and(|p| p == "web")
        })
        .flat_map(|vm| vm.nics.iter().flat_map(|n| &n.ips))
        .map(|ip| format!("{ip}:{MEMBER_PORT}"))
        .collect();
    members.sort();
    members
}

/// What the SIEM should have received for a change: one JSON object per
/// event Prism sent, in order, with the fields asked for.
fn assert_forwarded(received: &[Value], change: &VmChange, power: Option<&str>) {
    let types: Vec<&str> = received
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, change.events, "{received:#?}");
    for event in received {
        assert_eq!(event["entity_uuid"], change.uuid.as_str());
        assert!(
            event["id"].as_str().is_some_and(|id| !id.is_empty()),
            "{event}"
        );
        let keys: BTreeSet<&str> = event
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["id", "event_type", "entity_uuid", "attempt", "vm"]),
            "only the selected fields"
        );
    }
    if let Some(power) = power {
        let last = received.last().unwrap();
        assert_eq!(last["vm"]["power_state"], power, "{last}");
        assert_eq!(last["vm"]["uuid"], change.uuid.as_str());
    }
}

#[tokio::test]
async fn a_vm_lifecycle_reaches_the_firewall_the_load_balancer_and_the_siem_from_one_host() {
    let w = world().await;
    let app = w.start().await;
    let hook = &w.prism.webhooks()[0];
    for event in ["VM.CREATE", "VM.ON", "VM.OFF", "VM.NIC_PLUG", "VM.DELETE"] {
        assert!(
            hook.events_filter_list.iter().any(|e| e == event),
            "{event} in {:?}",
            hook.events_filter_list
        );
    }
    let mut seen = 0;
    let mut step = async |change: VmChange, power: Option<&str>, what: &str| {
        common::drained(&app).await;
        let vms = w.prism.vms();
        assert_eq!(
            w.panos.registered(),
            common::firewall_truth(&vms),
            "firewall after {what}"
        );
        assert_eq!(w.members(), pool_truth(&vms), "pool after {what}");
        assert_eq!(
            common::fmc_mapped(&w.fmc),
            common::fmc_truth(&vms),
            "FMC after {what}"
        );
        let received = w.siem.events();
        assert_forwarded(&received[seen..], &change, power);
        seen = received.len();
    };

    // In the pool's category, created off: nothing to register yet.
    let web = w
        .prism
        .create_vm(
            NewVm::named("web-01")
                .category("F5Pool", "web")
                .category("AppTier", "Web")
                .nic(["10.20.0.11"]),
        )
        .await
        .unwrap();
    let uuid = web.uuid.clone();
    step(web, Some("OFF"), "create (off)").await;
    assert!(w.members().is_empty());

    step(
        w.prism.set_power(&uuid, true).await.unwrap(),
        Some("ON"),
        "power on",
    )
    .await;
    assert_eq!(w.members(), ["10.20.0.11:8080"]);
    assert_eq!(
        w.panos.registered()["10.20.0.11"],
        ["ntnx.AppTier.Web", "ntnx.F5Pool.web", "ntnx.managed"]
    );

    step(
        w.prism
            .plug_nic(&uuid, NewNic::with_ips(["10.20.0.12"]))
            .await
            .unwrap(),
        None,
        "a second NIC",
    )
    .await;
    assert_eq!(w.members(), ["10.20.0.11:8080", "10.20.0.12:8080"]);

    // Not in the pool's category: the firewall knows it, the pool does not.
    let other = w
        .prism
        .create_vm(
            NewVm::named("db-01")
                .powered_on()
                .category("AppTier", "Db")
                .nic(["10.20.0.21"]),
        )
        .await
        .unwrap();
    let db = other.uuid.clone();
    step(other, Some("ON"), "another VM, outside the pool").await;
    assert_eq!(w.members().len(), 2);
    assert!(w.panos.registered().contains_key("10.20.0.21"));

    step(
        w.prism.set_power(&uuid, false).await.unwrap(),
        Some("OFF"),
        "power off",
    )
    .await;
    assert!(w.members().is_empty());
    assert!(!w.panos.registered().contains_key("10.20.0.11"));

    step(
        w.prism.set_power(&uuid, true).await.unwrap(),
        Some("ON"),
        "power on again",
    )
    .await;
    assert_eq!(w.members().len(), 2);

    step(w.prism.delete_vm(&uuid).await.unwrap(), None, "delete").await;
    step(
        w.prism.delete_vm(&db).await.unwrap(),
        None,
        "delete the other",
    )
    .await;
    assert!(w.members().is_empty());
    assert!(w.panos.registered().is_empty());

    // Credentials came from the host, per origin; the plugins never had them.
    assert_eq!(
        w.siem.authorizations(),
        BTreeSet::from([Some(SIEM_TOKEN.to_owned())])
    );
    assert_eq!(w.bigip.stats().unauthorized, 0);
    assert_eq!(w.panos.stats().commits, 0);
    assert_eq!(w.fmc.stats().logins, 1);
    for plugin in PLUGINS {
        let (failed, _, rejected) = common::plugin_failures(&app, plugin);
        assert_eq!((failed, rejected), (0, 0), "{plugin}");
    }
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// A member an administrator put in the pool at a VM's address carries no
/// description of the plugin's: the plugin neither takes it on record nor
/// removes it, by event or by reconcile, while the members it added go.
#[tokio::test]
async fn the_load_balancer_plugin_leaves_a_member_added_by_hand_when_its_vm_goes() {
    let w = world().await;
    w.bigip
        .add_member_described(POOL, "10.20.0.31:8080", Some("kept by the web team"));
    let app = w.start().await;

    let vm = w
        .prism
        .create_vm(
            NewVm::named("web-31")
                .powered_on()
                .category("F5Pool", "web")
                .nic(["10.20.0.31", "10.20.0.32"]),
        )
        .await
        .unwrap();
    common::drained(&app).await;
    assert_eq!(w.members(), ["10.20.0.31:8080", "10.20.0.32:8080"]);

    w.prism.set_power(&vm.uuid, false).await.unwrap();
    common::drained(&app).await;
    assert_eq!(w.members(), ["10.20.0.31:8080"], "by event");

    // Its notifications lost, the VM comes back and goes: reconcile alone
    // brings the pool in line, and leaves the administrator's member too.
    w.prism.set_faults(PrismFaults {
        drop_rate: 1.0,
        ..Default::default()
    });
    w.prism.set_power(&vm.uuid, true).await.unwrap();
    app.source.reconcile(Some("lab")).await.unwrap();
    assert_eq!(w.members(), ["10.20.0.31:8080", "10.20.0.32:8080"]);
    w.prism.delete_vm(&vm.uuid).await.unwrap();
    let report = app.source.reconcile(Some("lab")).await.unwrap().remove(0);
    assert!(
        report
            .plugins
            .iter()
            .any(|l| l.starts_with("f5-bigip: ") && l.contains("1 removed")),
        "{:?}",
        report.plugins
    );
    assert_eq!(w.members(), ["10.20.0.31:8080"], "by reconcile");
    let (failed, _, rejected) = common::plugin_failures(&app, "f5-bigip");
    assert_eq!((failed, rejected), (0, 0));
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

/// The BIG-IP plugin reconciles a page at a time (WIT 0.1.2) and commits
/// its records as it goes (0.1.4, `kv.commit`): when BIG-IP fails partway
/// through, the members it added are on record, so one whose VM then goes
/// unheard is still taken away by the next reconcile.
#[tokio::test]
async fn the_load_balancer_plugin_reconciles_by_pages_and_keeps_what_it_changed_when_bigip_fails_partway(
) {
    let w = world().await;
    // Three pages of Prism's 500; every other VM serves in the pool.
    for i in 0..1_100u32 {
        let ip = format!("10.40.{}.{}", i / 250, i % 250 + 1);
        let mut vm = NewVm::named(format!("vm-{i}")).powered_on().nic([ip]);
        if i % 2 == 0 {
            vm = vm.category("F5Pool", "web");
        }
        w.prism.create_vm(vm).await.unwrap();
    }
    // The reconcile at start reads the pool, adds 50 members, and then
    // BIG-IP fails: before the plugin's first periodic commit (every 100
    // VMs), so only its commit on failure keeps their records.
    w.bigip.set_faults(BigipFaults {
        fail_status: Some(503),
        pass_first: 51,
        ..Default::default()
    });
    let app = w.start().await;
    let f5 = app.registry.get("f5-bigip").unwrap().plugin.unwrap();
    assert!(f5.is_paged(), "the BIG-IP plugin exports paged.reconcile");
    wait(
        || {
            app.cluster_status().iter().any(|c| {
                c.last_reconcile
                    .iter()
                    .any(|l| l.starts_with("f5-bigip: failed"))
            })
        },
        "the reconcile at start to fail at BIG-IP",
    )
    .await;
    assert_eq!(w.members().len(), 50);

    // One of the VMs it added goes, and Prism's notification is lost.
    let first = w.members()[0].clone();
    let gone = w
        .prism
        .vms()
        .into_iter()
        .find(|vm| format!("{}:{MEMBER_PORT}", vm.nics[0].ips[0]) == first)
        .unwrap();
    w.prism.set_faults(PrismFaults {
        drop_rate: 1.0,
        ..Default::default()
    });
    w.prism.delete_vm(&gone.uuid).await.unwrap();
    w.bigip.set_faults(BigipFaults::default());
    let report = app.source.reconcile(Some("lab")).await.unwrap().remove(0);
    let line = report
        .plugins
        .iter()
        .find(|l| l.starts_with("f5-bigip: "))
        .unwrap();
    assert!(line.starts_with("f5-bigip: 1099 VMs: "), "{line}");
    let (members, truth) = (w.members(), pool_truth(&w.prism.vms()));
    assert!(!members.contains(&first), "{first} stayed behind");
    let off: Vec<&String> = members.iter().filter(|m| !truth.contains(m)).collect();
    assert!(off.is_empty(), "members no VM wants: {off:?}");
    assert_eq!((members.len(), truth.len()), (549, 549));
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn a_failing_load_balancer_and_siem_hold_up_only_their_own_plugins() {
    let w = world().await;
    let app = w.start().await;
    w.bigip.set_faults(BigipFaults {
        fail_status: Some(503),
        ..Default::default()
    });
    *w.siem.fail_next.lock().unwrap() = 2;

    let change = w
        .prism
        .create_vm(
            NewVm::named("web-02")
                .powered_on()
                .category("F5Pool", "web")
                .nic(["10.30.0.5"]),
        )
        .await
        .unwrap();
    // The firewall is served at once while the other two retry.
    wait(
        || w.panos.registered().contains_key("10.30.0.5"),
        "the firewall registration",
    )
    .await;
    wait(
        || {
            app.dispatcher
                .counters()
                .get("f5-bigip")
                .is_some_and(|c| c.retried > 0)
        },
        "the BIG-IP plugin to retry",
    )
    .await;
    assert!(w.members().is_empty());

    // The BIG-IP comes back: the queued events go through, in order.
    w.bigip.set_faults(BigipFaults::default());
    common::drained(&app).await;
    assert_eq!(w.members(), ["10.30.0.5:8080"]);
    let counters = app.dispatcher.counters();
    assert!(
        counters["forwarder"].retried > 0,
        "the SIEM's 503s were retried: {:?}",
        counters["forwarder"]
    );
    assert_eq!(counters["paloalto"].retried, 0);
    // Every event reached the SIEM, in order; the first one on the attempt
    // after the two the SIEM refused.
    let received = w.siem.events();
    let types: Vec<&str> = received
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, change.events, "{received:#?}");
    assert_eq!(received[0]["attempt"], 3, "{received:#?}");
    app.shutdown(false, Duration::from_secs(5)).await.unwrap();
}
