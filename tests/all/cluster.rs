//! Several hosts on one JetStream stream, over the real binaries: the chaos
//! tests. A three-node NATS cluster and three hosts on loopback; Prism's
//! simulator changes VMs and posts each notification to every registered
//! webhook; the Palo Alto plugin feeds the PAN-OS simulator and the probe
//! records what it was handed. Hosts and NATS nodes are SIGKILLed at random
//! moments, one at a time, and restarted. Afterwards every notification a
//! host answered 202 was delivered, in per-VM order, nothing is dead or
//! left over, the webhooks are what the ingest mode calls for, and the
//! firewall's registrations equal the VMs' truth: after the events alone,
//! and again after a reconcile (the leader's, pausing the other hosts).
//!
//! `PRISMHOOK_CHAOS_KILLS` (4 by default; `scripts/chaos.sh` runs the
//! long variant) and `PRISMHOOK_CRASH_SEED` (printed, so a failure can be
//! replayed).

use crate::common::balancer::Balancer;
use crate::common::process::{log_tail, wait_ready, HostProcess};
use crate::common::{self, firewall_truth};
use crate::durability::{
    check_entity, env_setting, kill_a_nats_node, ledger_lines, probe_records, stopped_backlog,
    wait, world, OrderReport, World,
};

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prismhook::ledger::Membership;
use prismhook_sim::nats::Nats;
use prismhook_sim::panos::PanosSim;
use prismhook_sim::prism::{DeliveryRecord, NewNic, NewVm, PrismFaults, PrismSim};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const HOSTS: usize = 3;
const VMS: usize = 10;

/// Prism retries a failed delivery to a webhook this many times, 100 ms
/// apart: long enough to outlast a host's restart or a NATS election.
const PRISM_RETRIES: u32 = 150;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_with_a_webhook_each_keep_the_firewall_true_while_hosts_and_nats_nodes_die() {
    let kills = env_setting("PRISMHOOK_CHAOS_KILLS").unwrap_or(4);
    chaos(Ingest::OwnWebhooks, kills).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_behind_one_load_balancer_url_share_one_webhook_and_keep_the_firewall_true() {
    chaos(Ingest::Balancer, 2).await
}

/// How Prism reaches the hosts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ingest {
    /// Each host registers a webhook of its own (the default), so Prism
    /// posts every notification to every host.
    OwnWebhooks,
    /// Every host's `public_url` is one load balancer's: one webhook for
    /// the service, each notification reaching whichever host is up.
    Balancer,
}

struct Host {
    config: PathBuf,
    log: PathBuf,
    port: u16,
    admin: u16,
    process: HostProcess,
}

/// Three hosts on three NATS nodes, Prism's and PAN-OS's simulators.
struct Fleet {
    w: World,
    nats: Nats,
    panos: PanosSim,
    hosts: Vec<Host>,
    balancer: Option<Balancer>,
    http: reqwest::Client,
}

impl Fleet {
    async fn start(ingest: Ingest) -> Fleet {
        let w = world(&["probe", "paloalto"]).await;
        let nats = Nats::start(&w.dir.path().join("nats"), 3).await.unwrap();
        let panos = common::setup::start_panos().await;
        let ports: Vec<(u16, u16)> = (0..HOSTS)
            .map(|_| (common::free_port(), common::free_port()))
            .collect();
        let balancer = match ingest {
            Ingest::OwnWebhooks => None,
            Ingest::Balancer => Some(
                Balancer::start(
                    ports
                        .iter()
                        .map(|(port, _)| ([127, 0, 0, 1], *port).into())
                        .collect(),
                )
                .await,
            ),
        };
        let lines = ledger_lines(Some(&nats)).unwrap();
        let mut hosts: Vec<Host> = ports
            .iter()
            .enumerate()
            .map(|(i, &(port, admin))| {
                let root = w.dir.path().join(format!("h{i}"));
                let mut setup = w
                    .host()
                    .instance(&format!("h{i}"))
                    .listen(format!("127.0.0.1:{port}"))
                    .admin_listen(format!("127.0.0.1:{admin}"))
                    .dirs(&root.join("data"), &w.dir.path().join("plugins"))
                    .delivery(r#"retry_initial = "20ms""#)
                    .delivery(r#"retry_max = "200ms""#)
                    .plugin("probe", &[r#"config = { subscriptions = ["VM.*"] }"#])
                    .paloalto(&panos)
                    .storage(r#"backend = "jetstream""#)
                    .storage(&lines);
                if let Some(b) = &balancer {
                    setup = setup.listener(&format!("public_url = {:?}", b.url()));
                }
                std::fs::create_dir_all(&root).unwrap();
                let config = root.join("prismhook.toml");
                std::fs::write(&config, setup.toml()).unwrap();
                let log = root.join("host.log");
                let process = HostProcess::spawn(&config, &log);
                Host {
                    config,
                    log,
                    port,
                    admin,
                    process,
                }
            })
            .collect();
        for h in &mut hosts {
            wait_ready(&mut h.process, h.port, &h.log).await;
        }
        let fleet = Fleet {
            w,
            nats,
            panos,
            hosts,
            balancer,
            http: reqwest::Client::new(),
        };
        fleet.wait_for_webhooks().await;
        fleet.wait_for_shares().await;
        fleet
    }

    /// The webhooks the ingest mode calls for: one per host at its own
    /// URL, or one for all at the balancer's.
    fn expected_webhooks(&self) -> Vec<String> {
        match &self.balancer {
            Some(b) => vec![format!("{}/listener/callback/lab", b.url())],
            None => self
                .hosts
                .iter()
                .map(|h| format!("http://127.0.0.1:{}/listener/callback/lab", h.port))
                .collect(),
        }
    }

    fn webhook_urls(&self) -> Vec<String> {
        let mut urls: Vec<String> = self
            .w
            .prism
            .webhooks()
            .into_iter()
            .map(|h| h.post_url)
            .collect();
        urls.sort();
        urls
    }

    async fn wait_for_webhooks(&self) {
        let mut want = self.expected_webhooks();
        want.sort();
        wait(
            || self.webhook_urls() == want,
            "the webhooks to be registered",
        )
        .await;
    }

    async fn membership(&self, host: usize) -> Option<Membership> {
        let url = format!("http://127.0.0.1:{}/api/hosts", self.hosts[host].admin);
        let answer = self.http.get(url).send().await.ok()?;
        answer.json::<Option<Membership>>().await.ok()?
    }

    /// Every host holds partitions and none is unheld.
    async fn wait_for_shares(&self) {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let m = self.membership(0).await.expect("a membership");
            if m.hosts.len() == HOSTS
                && m.unheld.is_empty()
                && m.hosts.iter().all(|h| !h.partitions.is_empty())
            {
                return;
            }
            assert!(
                Instant::now() < until,
                "the hosts did not share out the partitions: {m:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILLs a random host, and restarts it after long enough, at
    /// times, for its partitions to move to the others.
    async fn kill_a_host(&mut self, rng: &mut StdRng, at: &str) {
        let h = &mut self.hosts[rng.random_range(0..HOSTS)];
        h.process.sigkill().await;
        eprintln!("{at}: host {}", h.config.display());
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..5000))).await;
        h.process = HostProcess::spawn(&h.config, &h.log);
        wait_ready(&mut h.process, h.port, &h.log).await;
    }

    /// Nothing undelivered anywhere, as the first host sees the stream.
    async fn wait_until_drained(&self) {
        let until = Instant::now() + Duration::from_secs(90);
        loop {
            if let Some(m) = self.membership(0).await {
                if m.lag.iter().all(|l| l.undelivered == 0) && m.unheld.is_empty() {
                    return;
                }
                if Instant::now() >= until {
                    for h in &self.hosts {
                        // The 503s of the outages would hide everything else.
                        let text = std::fs::read_to_string(&h.log).unwrap_or_default();
                        let lines: Vec<&str> =
                            text.lines().filter(|l| !l.contains("with 503")).collect();
                        let tail = lines[lines.len().saturating_sub(60)..].join("\n");
                        eprintln!("{}:\n{tail}", h.log.display());
                    }
                    panic!("the hosts did not drain the ledger: {m:?}");
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `POST /api/reconcile` on the first host; what each cluster's
    /// reconcile reported, which must name no error.
    async fn reconcile(&self) -> String {
        let url = format!("http://127.0.0.1:{}/api/reconcile", self.hosts[0].admin);
        let answer = self
            .http
            .post(url)
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{answer:?}");
        let reports: serde_json::Value = answer.json().await.unwrap();
        let text = reports.to_string();
        assert!(
            reports.as_array().is_some_and(|r| !r.is_empty()
                && r.iter().all(|r| r["error"].is_null())
                && !text.contains(": failed")),
            "{text}"
        );
        text
    }

    async fn stop(&mut self) {
        for h in &mut self.hosts {
            let status = h.process.sigterm().await;
            assert!(status.success(), "{status}; log:\n{}", log_tail(&h.log));
        }
    }
}

async fn chaos(ingest: Ingest, kills: usize) {
    let seed: u64 = env_setting("PRISMHOOK_CRASH_SEED").unwrap_or(20_261_204);
    eprintln!("chaos ({ingest:?}): {kills} SIGKILLs, seed {seed}");
    let began = Instant::now();
    let mut fleet = Fleet::start(ingest).await;
    let mut rng = StdRng::seed_from_u64(seed);
    fleet.w.prism.set_faults(PrismFaults {
        retries: PRISM_RETRIES,
        ..PrismFaults::default()
    });

    let load = VmLoad::start(&fleet.w.prism, seed);
    for kill in 1..=kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2000))).await;
        let at = format!(
            "kill {kill}/{kills} at {:.1}s, {} changes so far",
            began.elapsed().as_secs_f64(),
            load.changes()
        );
        if rng.random_bool(0.5) {
            kill_a_nats_node(&mut fleet.nats, &mut rng, &at).await;
        } else {
            fleet.kill_a_host(&mut rng, &at).await;
        }
    }
    // Every host up again, and serving for a while before the load stops.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let changes = load.stop().await;
    eprintln!(
        "load stopped at {:.1}s: {changes} VM changes",
        began.elapsed().as_secs_f64()
    );
    assert!(changes >= 40, "too little load to mean anything: {changes}");

    fleet.wait_until_drained().await;

    // What the events alone left on the firewall, then after a reconcile
    // (the leader's, which pauses the other hosts while it runs).
    let truth = firewall_truth(&fleet.w.prism.vms());
    let by_events = fleet.panos.registered();
    let off: BTreeSet<&String> = by_events
        .keys()
        .chain(truth.keys())
        .filter(|ip| by_events.get(*ip) != truth.get(*ip))
        .collect();
    eprintln!(
        "after the events: {} IPs registered, {} off the truth",
        by_events.len(),
        off.len()
    );
    // What the firewall was told about each, in the order it took it.
    let requests = fleet.panos.requests(usize::MAX);
    let explained: Vec<String> = off
        .iter()
        .map(|ip| {
            let needle = format!("ip=\"{ip}\"");
            let told: Vec<&str> = requests
                .iter()
                .filter_map(|r| r.xml_cmd.as_deref())
                .filter(|xml| xml.contains(&needle))
                .collect();
            format!(
                "{ip}: {:?} where the truth is {:?}; the User-ID messages naming it:\n{}",
                by_events.get(*ip),
                truth.get(*ip),
                told.join("\n")
            )
        })
        .collect();
    assert!(
        off.is_empty(),
        "the events left the firewall off the VMs' truth:\n{}",
        explained.join("\n")
    );
    let reports = fleet.reconcile().await;
    assert_eq!(
        fleet.panos.registered(),
        truth,
        "the firewall's registrations are not the VMs' truth after a reconcile: {reports}"
    );

    fleet.stop().await;
    let mut want = fleet.expected_webhooks();
    want.sort();
    assert_eq!(
        fleet.webhook_urls(),
        want,
        "the webhooks after every restart ({ingest:?})"
    );
    let sent = notifications(&fleet.w.prism.deliveries());
    let unanswered: Vec<String> = sent
        .iter()
        .flat_map(|(uuid, list)| {
            list.iter()
                .filter(|n| !n.accepted)
                .map(move |n| format!("{uuid} {}", n.change))
        })
        .collect();
    assert!(
        unanswered.is_empty(),
        "Prism got no 202 for {} notifications, whatever it retried: {unanswered:?}",
        unanswered.len()
    );
    let kv = probe_records(&fleet.w.data(), Some(&fleet.nats)).await;
    assert_changes_delivered_in_order(&sent, &kv);
    for b in stopped_backlog(&fleet.w.data(), Some(&fleet.nats)).await {
        assert_eq!(
            (b.pending, b.in_flight, b.dead),
            (0, 0, 0),
            "plugin {}: {b:?}",
            b.plugin
        );
    }
    eprintln!(
        "chaos ({ingest:?}) done in {:.1}s: {} IPs registered, {} firewall requests",
        began.elapsed().as_secs_f64(),
        truth.len(),
        fleet.panos.stats().requests
    );
}

// ---------------------------------------------------------------------------
// The load: VMs living their lives in Prism's simulator.

/// One task per VM, each making one change at a time (Prism has posted a
/// change's notifications to every webhook before the next change starts),
/// the VMs at once.
struct VmLoad {
    stop: Arc<AtomicBool>,
    changes: Arc<AtomicU32>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl VmLoad {
    fn start(prism: &Arc<PrismSim>, seed: u64) -> VmLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let changes = Arc::new(AtomicU32::new(0));
        let tasks = (0..VMS)
            .map(|i| {
                tokio::spawn(vm_life(
                    prism.clone(),
                    i,
                    seed ^ (i as u64 + 1),
                    changes.clone(),
                    stop.clone(),
                ))
            })
            .collect();
        VmLoad {
            stop,
            changes,
            tasks,
        }
    }

    fn changes(&self) -> u32 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Stops after each VM's change in progress is posted.
    async fn stop(self) -> u32 {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        self.changes.load(Ordering::Relaxed)
    }
}

/// A VM's life: powered on and off, recategorised, readdressed, NICs
/// plugged and unplugged, migrated, and now and then deleted and created
/// anew under another uuid. Every IP is new, so the truth is unambiguous.
async fn vm_life(
    prism: Arc<PrismSim>,
    n: usize,
    seed: u64,
    changes: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut ips = 0u32;
    let mut ip = || {
        ips += 1;
        format!("10.{}.{}.{}", 100 + n, ips / 250, ips % 250 + 1)
    };
    let tier = |rng: &mut StdRng| ["Web", "App", "Db"][rng.random_range(0..3)];
    let mut uuid = String::new();
    while !stop.load(Ordering::Relaxed) {
        let vm = prism.vms().into_iter().find(|vm| vm.uuid == uuid);
        let Some(vm) = vm else {
            let new = NewVm::named(format!("chaos-{n}"))
                .powered_on()
                .category("AppTier", tier(&mut rng))
                .nic([ip()]);
            uuid = prism.create_vm(new).await.unwrap().uuid;
            changes.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let on = vm.power_state == "ON";
        let change = match rng.random_range(0..10) {
            0..=2 => prism.set_power(&uuid, !on).await,
            3 => {
                let categories =
                    BTreeMap::from([("AppTier".to_owned(), tier(&mut rng).to_owned())]);
                prism.set_categories(&uuid, categories).await
            }
            4 => prism.set_nic_ips(&uuid, &vm.nics[0].uuid, vec![ip()]).await,
            5 => prism.plug_nic(&uuid, NewNic::with_ips([ip()])).await,
            6 if vm.nics.len() > 1 => {
                let nic = &vm.nics[vm.nics.len() - 1].uuid;
                prism.unplug_nic(&uuid, nic).await
            }
            7 => {
                let host = format!("sim-host-{}", rng.random_range(1..4));
                prism.migrate(&uuid, &host).await
            }
            8 if rng.random_bool(0.3) => prism.delete_vm(&uuid).await,
            _ => prism.set_power(&uuid, !on).await,
        };
        change.unwrap();
        changes.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(rng.random_range(5..40))).await;
    }
}

// ---------------------------------------------------------------------------
// What Prism sent, and what reached the probe.

/// A notification Prism sent about a VM: `EVENT@VERSION` (the VM's
/// `entity_version`), as the probe records it, and whether any host
/// answered it 202.
struct Sent {
    change: String,
    accepted: bool,
}

/// Each VM's notifications in the order Prism sent them, from its
/// delivery log.
fn notifications(log: &[DeliveryRecord]) -> BTreeMap<String, Vec<Sent>> {
    let mut sent: BTreeMap<String, Vec<Sent>> = BTreeMap::new();
    for d in log {
        let version = d
            .entity_version
            .expect("every VM notification has a version");
        let change = format!("{}@{version}", d.event_type);
        let list = sent.entry(d.entity_uuid.clone()).or_default();
        let at = match list.iter().position(|s| s.change == change) {
            Some(at) => at,
            None => {
                list.push(Sent {
                    change,
                    accepted: false,
                });
                list.len() - 1
            }
        };
        list[at].accepted |= d.status == Some(202);
    }
    sent
}

/// Every notification a host acknowledged reached the probe, each VM's in
/// the order Prism sent them (its changes' order).
fn assert_changes_delivered_in_order(
    sent: &BTreeMap<String, Vec<Sent>>,
    kv: &BTreeMap<String, Vec<u8>>,
) {
    let mut report = OrderReport::default();
    for (uuid, list) in sent {
        let accepted: Vec<String> = list
            .iter()
            .filter(|s| s.accepted)
            .map(|s| s.change.clone())
            .collect();
        let recorded: Vec<String> = kv
            .get(&format!("changes/lab/{uuid}"))
            .map(|v| {
                String::from_utf8_lossy(v)
                    .lines()
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        report.add(&format!("VM {uuid}"), check_entity(&accepted, &recorded));
    }
    report.assert(sent.values().map(Vec::len).sum());
}
