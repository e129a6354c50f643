//! Issue 13's figures: what a 202 costs on JetStream against redb, and how
//! long a dead host's partitions take to move.
//!
//! 1. Durable accepts, side by side in one run: the listener's own router
//!    (Nutanix routes, paloalto.wasm subscribed, so each accept stores the
//!    event and one pending delivery) over three ledgers:
//!    - redb, fsync before every 202;
//!    - JetStream R1, one local `nats-server`;
//!    - JetStream R3, three local nodes: a 202 once two of them have it.
//!
//!    `wrk -t2 -c64` for 5 s, rotating, 3 rounds.
//! 2. The ack latency at a fixed 1,000 notifications/s (open loop), 2 rounds
//!    of 5 s. No dispatcher runs in 1 and 2: they isolate accepting.
//! 3. Failover: three ledger handles ("hosts") sharing a stream on the
//!    three nodes. Each round drops a host as a crash does (no leave: its
//!    leases stay until they expire), appends an event
//!    of a partition it served through a survivor, and times until a
//!    survivor claims it; then the host comes back under its name. 20 kills.
//!
//! 4. End to end, 1 host against 3: whole in-process hosts (`App`, as
//!    `prismhook run` assembles it) on an R3 stream of their own, the Palo
//!    Alto plugin feeding a PAN-OS simulator. 10,000 VM.ON for distinct VMs,
//!    then VM.OFF for the same, posted by 64 keep-alive posters per host,
//!    timed until the firewall holds them all (then none). Three hosts are
//!    fed two ways: every notification to all three (a webhook each, as
//!    Prism posts) and each to one in turn (one URL behind a balancer). The
//!    three set-ups rotate, 2 rounds of ON + OFF each.
//!
//! `cargo bench -p prismhook --bench cluster` (nats-server from `cargo xtask
//! nats-server`, found as the tests find it).

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use prismhook::app::App;
use prismhook::clock::now_ms;
use prismhook::ledger::{
    partition_of_entity, JetStreamLedger, JetStreamOptions, Ledger, LedgerOptions, NewEvent,
    Outcome, RedbLedger, SharedLedger, PARTITIONS,
};
use prismhook_sim::nats::Nats;
use prismhook_sim::panos::PanosSim;
use prismhook_sim::prism::PrismSim;

use common::*;

fn on(nats: &Nats, stream: &str, host: &str, replicas: usize) -> JetStreamOptions {
    JetStreamOptions {
        stream: stream.into(),
        replicas: Some(replicas),
        client_name: host.into(),
        ..JetStreamOptions::new(nats.urls())
    }
}

#[tokio::main]
async fn main() {
    init_tracing();
    println!("# prismhook bench: cluster (issue 13)");
    machine_note();
    let dir = tempfile::tempdir().unwrap();
    let registry = paloalto_registry(dir.path()).await;
    let one = Nats::single(&dir.path().join("r1")).await.unwrap();
    let three = Nats::start(&dir.path().join("r3"), 3).await.unwrap();

    let redb: SharedLedger =
        Arc::new(RedbLedger::open(LedgerOptions::new(dir.path().join("ledger.redb"))).unwrap());
    let r1: SharedLedger = Arc::new(
        JetStreamLedger::open(on(&one, "PRISMHOOK", "bench", 1))
            .await
            .unwrap(),
    );
    let r3: SharedLedger = Arc::new(
        JetStreamLedger::open(on(&three, "PRISMHOOK", "bench", 3))
            .await
            .unwrap(),
    );
    let mut targets = Vec::new();
    for (name, ledger) in [
        ("redb (fsync)", redb),
        ("JetStream R1", r1),
        ("JetStream R3", r3),
    ] {
        let router = listener_router(ledger, registry.clone(), dir.path());
        targets.push(Target {
            name,
            url: format!("http://{}/listener/callback/lab", serve(router).await),
        });
    }
    let auth = basic_auth(WEBHOOK_USER, WEBHOOK_PASSWORD);
    let script = wrk_script();
    let mut round_id = 5000u32;

    // ------------------------------------------------------------ 1
    println!("\n## 1. Durable accepts at saturation: wrk -t2 -c64 -d5s --latency (wrk shares the 2 cores with the host and the NATS nodes)");
    let sat = saturate(
        &targets,
        3,
        &script,
        &auth,
        &mut round_id,
        &[],
        |_| (),
        |_, (), _| String::new(),
    )
    .await;

    println!("\n## 2. Ack latency at a fixed 1,000 notifications/s (open loop; 2 rounds × 5 s per ledger)");
    let (paced_lat, paced_bad) = paced_rounds(&targets, 2, &auth, 6000, &mut round_id).await;

    let med =
        |v: &[WrkResult], f: fn(&WrkResult) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    println!("\n## Summary, accepting (medians over rounds; paced latencies pooled)");
    println!("| ledger | 202/s saturated | vs redb | p99 saturated | p50 @1k/s | p99 @1k/s | p99.9 @1k/s | non-202 @1k/s |");
    println!("|---|---|---|---|---|---|---|---|");
    let redb_rate = med(&sat[0], |r| r.ok_per_s);
    for i in 0..3 {
        let l = sorted(paced_lat[i].clone());
        println!(
            "| {} | {} | {:.2}× | {} | {} | {} | {} | {} |",
            targets[i].name,
            rate(med(&sat[i], |r| r.ok_per_s)),
            med(&sat[i], |r| r.ok_per_s) / redb_rate,
            us(med(&sat[i], |r| r.p99_us)),
            us(percentile(&l, 50.0)),
            us(percentile(&l, 99.0)),
            us(percentile(&l, 99.9)),
            paced_bad[i]
        );
    }
    let r3_rate = med(&sat[2], |r| r.ok_per_s);
    println!(
        "floors: JetStream R3 ≥ 3,000 durable accepts/s → {} ({}); ≥ 0.3× redb → {:.2}× ({})",
        rate(r3_rate),
        if r3_rate >= 3000.0 { "met" } else { "NOT met" },
        r3_rate / redb_rate,
        if r3_rate >= 0.3 * redb_rate {
            "met"
        } else {
            "NOT met"
        }
    );
    drop(targets);
    let _ = std::fs::remove_file(&script);

    // ------------------------------------------------------------ 3
    println!("\n## 3. Failover: a host dropped as by a crash → the first event of one of its partitions claimed by a survivor (3 hosts, R3, 20 kills)");
    let names = ["host a", "host b", "host c"];
    let mut hosts: Vec<Option<JetStreamLedger>> = Vec::new();
    for name in names {
        hosts.push(Some(
            JetStreamLedger::open(on(&three, "FAILOVER", name, 3))
                .await
                .unwrap(),
        ));
    }
    let mut took = Vec::new();
    let mut serial = 0u64;
    for kill in 0..20 {
        let live: Vec<&dyn Ledger> = hosts.iter().flatten().map(|h| h as &dyn Ledger).collect();
        shared_out(&live).await;
        let victim = kill % names.len();
        let dead = hosts[victim].take().unwrap();
        let partition = dead.membership().unwrap().serving[0];
        // An entity of that partition.
        let entity = (0u64..)
            .map(|i| format!("failover-{kill}-{i}"))
            .find(|uuid| partition_of_entity("lab", uuid) == partition)
            .unwrap();
        drop(dead);
        let killed = Instant::now();
        serial += 1;
        let survivor = hosts.iter().flatten().next().unwrap();
        survivor
            .append(
                NewEvent {
                    cluster: "lab".into(),
                    event_type: "VM.UPDATE".into(),
                    entity_kind: "vm".into(),
                    entity_uuid: entity,
                    dedupe_key: Some(format!("failover-{serial}")),
                    received_at_ms: now_ms(),
                    body: "{}".into(),
                    vm: None,
                },
                vec!["fw".into()],
            )
            .await
            .unwrap();
        'claimed: loop {
            for host in hosts.iter().flatten() {
                let batch = host.claim("fw", 10).await.unwrap();
                if !batch.is_empty() {
                    took.push(killed.elapsed().as_secs_f64() * 1e6);
                    let done = batch.iter().map(|d| (d.event.id, Outcome::Done)).collect();
                    host.complete("fw", done).await.unwrap();
                    break 'claimed;
                }
            }
            assert!(killed.elapsed() < Duration::from_secs(30), "no failover");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!(
            "kill {}: {} (partition {partition}) → claimed after {}",
            kill + 1,
            names[victim],
            us(*took.last().unwrap())
        );
        hosts[victim] = Some(
            JetStreamLedger::open(on(&three, "FAILOVER", names[victim], 3))
                .await
                .unwrap(),
        );
    }
    let took = sorted(took);
    println!(
        "failover over {} kills: p50 {}, p99 {}, max {} (target p99 < 5 s: {})",
        took.len(),
        us(percentile(&took, 50.0)),
        us(percentile(&took, 99.0)),
        us(*took.last().unwrap()),
        if percentile(&took, 99.0) < 5e6 {
            "met"
        } else {
            "NOT met"
        }
    );
    // ------------------------------------------------------------ 4
    end_to_end(&three, dir.path()).await;

    // The listeners and their ledgers live on in server tasks: the process
    // ends right after the NATS nodes stop under them, before those tasks
    // log about it. `exit` runs no destructors, so the nodes are dropped
    // (killed) and their directory removed first, or they would outlive
    // the bench.
    drop((one, three));
    drop(dir);
    std::process::exit(0);
}

/// Waits until the live hosts serve every partition between them.
async fn shared_out(hosts: &[&dyn Ledger]) {
    let started = Instant::now();
    loop {
        let served: usize = hosts
            .iter()
            .map(|h| h.membership().unwrap().serving.len())
            .sum();
        if served == PARTITIONS {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the hosts never shared the partitions out"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One set-up of section 4: hosts on a stream of their own, and the
/// firewall they feed.
struct Fleet {
    name: &'static str,
    apps: Vec<App>,
    urls: Vec<String>,
    spread: Spread,
    panos: PanosSim,
}

impl Fleet {
    /// `count` whole hosts on stream `stream` of `nats`, each with the Palo
    /// Alto plugin feeding one PAN-OS simulator, registered with `prism`,
    /// sharing the partitions and running Cranelift's code.
    async fn start(
        name: &'static str,
        (nats, dir, prism): (&Nats, &Path, &PrismSim),
        stream: &str,
        count: usize,
        spread: Spread,
    ) -> Fleet {
        use setup::{Cluster, HostConfig};
        let panos = setup::start_panos().await;
        let mut apps = Vec::new();
        for i in 0..count {
            let root = dir.join(format!("{stream}-{i}"));
            let host = HostConfig::new(&root)
                .instance(&format!("{}-{i}", stream.to_lowercase()))
                .paloalto(&panos)
                .storage(r#"backend = "jetstream""#)
                .storage(&format!(
                    "jetstream = {{ servers = {:?}, stream = {stream:?}, replicas = 3 }}",
                    nats.urls()
                ));
            setup::install(host.plugins_dir(), &["paloalto"]);
            let config = host
                .cluster(Cluster {
                    webhook_password: Some(WEBHOOK_PASSWORD.into()),
                    extra: vec![format!("webhook_user = {WEBHOOK_USER:?}")],
                    ..Cluster::lab(prism)
                })
                .config();
            apps.push(App::start(config).await.unwrap());
        }
        let started = Instant::now();
        while !apps
            .iter()
            .all(|a| a.cluster_status().iter().all(|c| c.registered))
        {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the hosts of {stream} did not register their webhooks"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let ledgers: Vec<&dyn Ledger> = apps.iter().map(|a| a.ledger.as_ref()).collect();
        shared_out(&ledgers).await;
        for app in &apps {
            wait_for_cranelift(app).await;
        }
        let urls = apps
            .iter()
            .map(|a| format!("http://{}/listener/callback/lab", a.listener_addr))
            .collect();
        Fleet {
            name,
            apps,
            urls,
            spread,
            panos,
        }
    }

    async fn drained(&self) {
        for app in &self.apps {
            drain(&app.ledger, Duration::from_secs(120)).await;
        }
    }
}

async fn end_to_end(nats: &Nats, dir: &Path) {
    const N: u64 = 10_000;
    println!("\n## 4. End to end on JetStream R3, 1 host vs 3 hosts: {N} × VM.ON (vm_on.json) for distinct VMs, then VM.OFF for the same, 64 keep-alive posters per host, until the PAN-OS simulator holds them all / none (the set-ups rotate; 2 rounds of ON + OFF each)");
    let prism = setup::start_prism().await;
    let world = (nats, dir, &prism);
    let fleets = [
        Fleet::start("1 host", world, "E2E1", 1, Spread::All).await,
        Fleet::start(
            "3 hosts, each notification to all",
            world,
            "E2E3",
            3,
            Spread::All,
        )
        .await,
        Fleet::start(
            "3 hosts, each notification to one",
            world,
            "E2E3RR",
            3,
            Spread::RoundRobin,
        )
        .await,
    ];
    let on = Arc::new(VmTemplate::load(&fixtures_dir().join("vm_on.json")));
    let off = Arc::new(VmTemplate::load(&fixtures_dir().join("vm_off.json")));
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let auth = basic_auth(WEBHOOK_USER, WEBHOOK_PASSWORD);
    println!("| set-up | round | 202 answers | posting took | applied after | end-to-end events/s | firewall requests |");
    println!("|---|---|---|---|---|---|---|");
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); fleets.len()];
    for round in 0..2u32 {
        for k in 0..fleets.len() {
            // Rotate, so no set-up always runs first.
            let f = (k + round as usize) % fleets.len();
            let fleet = &fleets[f];
            let series = 4000 + 10 * round + f as u32;
            for (template, want, label) in [(&on, N, "VM.ON"), (&off, 0, "VM.OFF")] {
                let template = template.clone();
                let body: Arc<dyn Fn(u64) -> String + Send + Sync> =
                    Arc::new(move |i| template.render(series, i));
                let limit = Duration::from_secs(180);
                let r = applied_round(
                    &client,
                    &fleet.urls,
                    fleet.spread,
                    &auth,
                    N,
                    body,
                    &fleet.panos,
                    want,
                    limit,
                )
                .await;
                let e2e = r.applied.map(|d| N as f64 / d.as_secs_f64());
                rates[f].extend(e2e);
                println!(
                    "| {} | {} {label} | {} | {:.2} s | {} | {} | {} |",
                    fleet.name,
                    round + 1,
                    r.accepted,
                    r.posting.as_secs_f64(),
                    r.applied
                        .map_or("> 180 s".into(), |d| format!("{:.2} s", d.as_secs_f64())),
                    e2e.map_or("n/a".into(), rate),
                    r.requests
                );
                fleet.drained().await;
            }
        }
    }
    println!("\n| set-up | end-to-end events/s (median of 4) | vs 1 host |");
    println!("|---|---|---|");
    let one = median(&rates[0]);
    for (fleet, r) in fleets.iter().zip(&rates) {
        println!(
            "| {} | {} | {:.2}× |",
            fleet.name,
            rate(median(r)),
            median(r) / one
        );
    }
}
